#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, run once on a lent GPU machine whose python3 has CUDA torch
# and timm:  OUT=DIR bash scripts/gpu_check.sh   (default DIR ./gpu_check_out)
# Writes: bf16 and fp32 training-step throughput of QB-Heat vs MoCo-v2 (pretrain_cost.py also
# overwrites benchmarks/results/pretrain_cost.* in that checkout), a torchrun (NCCL) pre-training
# run with bf16 autocast stopped and resumed, and PyTorch CUDA latency of Mobile-Former-294M vs
# MobileNetV3-Large. Results of the run on an H200: benchmarks/results/gpu_h200/.
set -u
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi -L; python3 -c "import torch, timm, sys; print(sys.version.split()[0], torch.__version__, timm.__version__)"
# batch 128 (bf16 and fp32: the AMP check), then batch 512 bf16 (out of the launch-bound regime)
for cfg in "bf16 128" "fp32 128" "bf16 512"; do
  set -- $cfg
  echo "== pretrain_cost $1 batch $2"
  timeout 200 python3 benchmarks/pretrain_cost.py --model mobileformer_294m --image-size 224 --device cuda \
    --precision "$1" --batch-size "$2" --threads 16 --warmup 3 --rounds 10 \
    && cp benchmarks/results/pretrain_cost.md "$OUT/pretrain_cost_cuda_$1_b$2.md" \
    && cp benchmarks/results/pretrain_cost.json "$OUT/pretrain_cost_cuda_$1_b$2.json"
done
echo "== torchrun (NCCL) bf16, stop at 20 then resume to 40"
run=/tmp/gpu_run
common=(--method qbheat --model mobileformer_294m --data synthetic --image-size 224 --batch-size 64 --steps 40
        --device cuda --precision bf16 --log-every 10 --ckpt-every 20 --out-dir $run --no-progress --no-tensorboard)
timeout 150 torchrun --nproc-per-node 1 -m qbheat.cli pretrain "${common[@]}" --stop-after 20 \
  && timeout 150 torchrun --nproc-per-node 1 -m qbheat.cli pretrain "${common[@]}" --resume auto \
  && cp $run/metrics.csv "$OUT/torchrun_metrics.csv"
echo "== cuda_latency"
timeout 200 python3 benchmarks/cuda_latency.py --batch 1 32 --runs 200 --out "$OUT/cuda_latency.md"
echo "== done"
