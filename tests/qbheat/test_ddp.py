"""DDP on gloo: two processes give the gradients, queue and trained weights of one process on the full batch.

BatchNorm note: under DDP each process normalises with its own half batch, so a BN backbone
cannot match one process on the full batch, and SyncBatchNorm has no CPU kernel. The tests use
timm's ``test_convnext`` (LayerNorm only), a real backbone in training mode whose per-sample
outputs do not depend on the rest of the batch; what is compared is then exactly what DDP and
our collectives are responsible for: gradient averaging, the all-gather with gradients (through
a regularizer on the global batch), MoCo's Shuffling BN round trip and its queue gather, and the
sampler's split of each global batch. MSBReg (its singular-value loss gathers the global batch
with gradients; the Brownian term is switched off because each rank draws its own noise) and
HSSL (its teacher centre is averaged over ranks) ride along in the gradient comparison.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qbheat import distributed
from qbheat.checkpoint import load_checkpoint
from qbheat.config import PretrainConfig
from qbheat.additions import ADDITIONS, register_addition
from qbheat.additions.hssl import HSSLConfig
from qbheat.additions.msbreg import MSBRegConfig
from qbheat.methods.mocov2 import MoCoV2Config
from qbheat.methods.qbheat import QBHeatConfig
from qbheat.train import build_objective, pretrain, wrap_ddp

WORLD = 2
GLOBAL_BATCH = 8


class GlobalSpread(nn.Module):
    """Test regularizer over the *global* batch: the variance of all ranks' embeddings.

    Every sample's term depends on every other sample through the global mean, so its gradient is
    right only if the all-gather carries gradients back to each rank's slice.
    """

    def forward(self, out):
        z = distributed.all_gather_with_grad(out["embeddings"][0])  # (W·b)×F
        return {"loss": 0.5 * (z - z.mean(dim=0)).pow(2).sum(dim=1).mean()}

    @classmethod
    def from_config(cls, config, method):
        return cls()


def _with_spread():
    register_addition("global_spread")(GlobalSpread)


def _grad_cfg(method):
    return PretrainConfig(method=method, model="test_convnext", data="synthetic", image_size=32,
                          batch_size=GLOBAL_BATCH, regularizers=["global_spread", "msbreg"],
                          msbreg=MSBRegConfig(dim=8, hidden_dim=16, weight_brownian=0.0),
                          hssl=HSSLConfig(enabled=True, depth=2, hidden_dim=16, bottleneck_dim=8, out_dim=16),
                          qbheat=QBHeatConfig(visible_corner="top_left"), mocov2=MoCoV2Config(queue_size=16, dim=16))


def _fixed_batch():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for _ in range(2)]


def _one_step(method, rank=0, world=1):
    """Forward + backward of one (DDP-wrapped when world > 1) objective on this rank's slice."""
    torch.manual_seed(0)
    objective = build_objective(_grad_cfg(method))
    ctx = distributed.DistContext(rank, world, rank, torch.device("cpu"), created_group=False)
    model = wrap_ddp(objective, ctx, objective.method.ddp_find_unused_parameters)
    b = GLOBAL_BATCH // world
    batch = [v[rank * b:(rank + 1) * b] for v in _fixed_batch()]
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    buffers = {n: t.clone() for n, t in objective.named_buffers() if "queue" in n or n == "hssl.center"}
    return {"grads": grads, "buffers": buffers, "loss": out["loss"].detach(), "spread": out["global_spread_loss"].detach(),
            "singular_value": out["msbreg_singular_value"].detach()}


def _pretrain_cfg(out_dir):
    return PretrainConfig(method="mocov2", model="test_convnext", data="synthetic", synthetic_size=32, image_size=32,
                          batch_size=GLOBAL_BATCH, steps=3, num_workers=0, log_every=1, ckpt_every=100,
                          progress=False, tensorboard=False, out_dir=str(out_dir),
                          mocov2=MoCoV2Config(queue_size=16, dim=16, momentum=0.9))


def _worker(rank, world, tmp):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        _with_spread()
        for method in ("qbheat", "mocov2"):
            torch.save(_one_step(method, rank, world), f"{tmp}/{method}_rank{rank}.pt")
        pretrain(_pretrain_cfg(f"{tmp}/ddp_run"))  # reuses this process group
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, start_method="spawn", join=True)
    return tmp


@pytest.fixture()
def spread():
    _with_spread()
    yield
    ADDITIONS.pop("global_spread", None)


@pytest.mark.parametrize("method", ["qbheat", "mocov2"])
def test_two_processes_give_full_batch_gradients(ddp_dir, spread, method):
    single = _one_step(method)
    ranks = [torch.load(ddp_dir / f"{method}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert single["grads"].keys() == ranks[0]["grads"].keys()
    assert len(single["grads"]) > 20 and single["spread"] > 0
    for name, g in single["grads"].items():
        for r in range(WORLD):  # DDP leaves the averaged gradient on every rank
            torch.testing.assert_close(ranks[r]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(n.startswith("regularizers.msbreg.") for n in single["grads"])
    assert any(n.startswith("hssl.aux_head.") for n in single["grads"])
    # the global-batch terms see the same value on every rank and in the single process
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["spread"], single["spread"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[r]["singular_value"], single["singular_value"], rtol=1e-5, atol=1e-6)
        # HSSL's teacher centre is the mean over the global batch on every rank
        torch.testing.assert_close(ranks[r]["buffers"]["hssl.center"], single["buffers"]["hssl.center"], rtol=1e-5, atol=1e-7)


def test_moco_queue_under_ddp_holds_the_global_batch_in_order(ddp_dir, spread):
    single = _one_step("mocov2")
    for r in range(WORLD):
        got = torch.load(ddp_dir / f"mocov2_rank{r}.pt", weights_only=True)["buffers"]
        assert int(got["method.queue_ptr"]) == GLOBAL_BATCH
        # keys of all ranks (shuffled across ranks for BN, then restored) in global batch order
        torch.testing.assert_close(got["method.queue"], single["buffers"]["method.queue"], rtol=1e-4, atol=1e-6)


def test_ddp_pretrain_matches_single_process(ddp_dir, tmp_path):
    ddp = load_checkpoint(ddp_dir / "ddp_run" / "last.pt")
    one = load_checkpoint(pretrain(_pretrain_cfg(tmp_path)))
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["step"] == one["step"] == 3
    assert len(ddp["rng"]) == 2  # every rank's RNG state is kept for an exact resume
    for k, v in one["backbone"].items():
        torch.testing.assert_close(ddp["backbone"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    for k, v in one["method_state"].items():
        torch.testing.assert_close(ddp["method_state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
