#!/usr/bin/env bash
# One call on a lent GPU machine (its python3 has CUDA torch and timm; OpenVINO and NNCF come as
# wheels, see benchmarks/results/device_h100/README.md):  OUT=DIR bash scripts/device_check.sh
# Writes: PyTorch CUDA latency of Mobile-Former-294M vs MobileNetV3-Large (the lean graph now has
# the split depthwise convs), and benchmarks/latency.py run on two of the host CPU's cores, whose
# INT8 instructions (VNNI / AMX) this repo's AVX2 CI machine lacks: the OpenVINO INT8 target's
# bound on AVX2 says nothing about such CPUs, and this measures them with the same script.
set -u
OUT=${OUT:-device_check_out}; mkdir -p "$OUT/cpu"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi -L
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket"
echo "INT8 flags: $(grep -o -w -E 'avx512_vnni|avx_vnni|amx_int8|amx_bf16|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 -c "import sys, torch, timm, onnxruntime, openvino, nncf; print(sys.version.split()[0], torch.__version__, timm.__version__, onnxruntime.__version__, openvino.get_version(), nncf.__version__)"
echo "== cuda_latency"
timeout 150 python3 benchmarks/cuda_latency.py --batch 1 32 --runs 200 --out "$OUT/cuda_latency.md"
echo "== latency.py on two CPU cores"
pin=(); taskset -c 0,1 true 2>/dev/null && pin=(taskset -c 0,1)
timeout 330 "${pin[@]}" python3 benchmarks/latency.py --rounds 3 --out-dir "$OUT/cpu"
echo "== done"
