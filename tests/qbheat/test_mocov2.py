"""MoCo-v2: InfoNCE against a slow reference, queue mechanics, momentum update, queue survives resume."""
import math

import pytest
import torch

from qbheat.checkpoint import load_checkpoint
from qbheat.config import PretrainConfig
from qbheat.errors import QBHeatError
from qbheat.methods._momentum import momentum_at, momentum_copy, momentum_update_
from qbheat.methods.mocov2 import MoCoV2, MoCoV2Config, info_nce_loss
from qbheat.models import create_model
from qbheat.train import pretrain


def _slow_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i].double() @ k[i].double()) / t)
        neg = sum(math.exp(float(q[i].double() @ queue[j].double()) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_matches_slow_reference(t):
    torch.manual_seed(0)
    n = torch.nn.functional.normalize
    q, k, queue = n(torch.randn(5, 8), dim=1), n(torch.randn(5, 8), dim=1), n(torch.randn(12, 8), dim=1)
    assert info_nce_loss(q, k, queue, t).item() == pytest.approx(_slow_info_nce(q, k, queue, t), rel=1e-5)


def test_info_nce_is_low_when_positives_align():
    n = torch.nn.functional.normalize
    q = n(torch.randn(4, 16), dim=1)
    queue = n(torch.randn(32, 16), dim=1)
    aligned = info_nce_loss(q, q, queue, 0.2)
    random_k = info_nce_loss(q, n(torch.randn(4, 16), dim=1), queue, 0.2)
    assert aligned < random_k


def test_momentum_update_is_the_ema():
    online = torch.nn.Linear(3, 2)
    target = momentum_copy(online)
    assert not any(p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    momentum_update_(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    assert momentum_at(0.99, 0.0, "cosine") == pytest.approx(0.99)
    assert momentum_at(0.99, 1.0, "cosine") == pytest.approx(1.0)
    assert momentum_at(0.99, 0.5, "constant") == 0.99


def test_queue_enqueue_and_pointer_wrap():
    method = MoCoV2(create_model("test_convnext", num_classes=0), MoCoV2Config(queue_size=8, dim=4))
    keys = [torch.full((4, 4), float(i)) for i in range(3)]
    method._dequeue_and_enqueue(keys[0])
    assert int(method.queue_ptr) == 4 and torch.all(method.queue[:4] == 0)
    method._dequeue_and_enqueue(keys[1])
    assert int(method.queue_ptr) == 0 and torch.all(method.queue[4:] == 1)
    method._dequeue_and_enqueue(keys[2])  # wraps: the oldest entries are replaced
    assert int(method.queue_ptr) == 4 and torch.all(method.queue[:4] == 2) and torch.all(method.queue[4:] == 1)
    assert {"queue", "queue_ptr"} <= set(dict(method.named_buffers()))


def test_forward_enqueues_keys_and_only_the_query_encoder_learns():
    torch.manual_seed(0)
    method = MoCoV2(create_model("test_convnext", num_classes=0), MoCoV2Config(queue_size=16, dim=8))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    old_queue = method.queue.clone()
    out = method([x1, x2])
    out["loss"].backward()
    _, k = method._keys(x2)
    torch.testing.assert_close(method.queue[:4], k)  # this batch's keys entered the queue
    assert torch.equal(method.queue[4:], old_queue[4:]) and int(method.queue_ptr) == 4
    assert all(p.grad is not None for p in method.backbone.parameters())
    assert all(p.grad is None for p in method.momentum_backbone.parameters())
    assert out["embeddings"][0].shape == (4, method.backbone.num_features)
    assert 0.0 <= float(out["contrastive_acc"]) <= 1.0


def test_queue_must_take_whole_batches():
    with pytest.raises(QBHeatError, match="multiple of batch_size"):
        PretrainConfig(method="mocov2", data="synthetic", batch_size=24, mocov2=MoCoV2Config(queue_size=100)).validate()


def _cfg(tmp, **kw):
    base = dict(method="mocov2", model="test_convnext", data="synthetic", synthetic_size=48, image_size=32,
                batch_size=8, steps=4, num_workers=0, log_every=1, ckpt_every=2, progress=False,
                tensorboard=False, out_dir=str(tmp), mocov2=MoCoV2Config(queue_size=24, dim=16))
    base.update(kw)
    return PretrainConfig(**base)


def test_queue_survives_resume(tmp_path):
    whole = load_checkpoint(pretrain(_cfg(tmp_path / "whole")))
    first = load_checkpoint(pretrain(_cfg(tmp_path / "split", stop_after=2)))
    assert first["step"] == 2 and int(first["method_state"]["queue_ptr"]) == 16  # 2 steps × 8 keys
    resumed = load_checkpoint(pretrain(_cfg(tmp_path / "split", resume="auto")))
    assert resumed["step"] == 4
    # after 4 steps the 24-slot queue has wrapped: ptr = 32 mod 24 = 8, identical to the uninterrupted run
    assert int(resumed["method_state"]["queue_ptr"]) == int(whole["method_state"]["queue_ptr"]) == 8
    assert torch.equal(resumed["method_state"]["queue"], whole["method_state"]["queue"])
    # slots 8..15 still hold keys from step 2, which only the restored queue can contain
    assert torch.equal(resumed["method_state"]["queue"][8:16], first["method_state"]["queue"][8:16])
    for k, v in whole["method_state"].items():
        assert torch.equal(v, resumed["method_state"][k]), k
    for k, v in whole["backbone"].items():
        assert torch.equal(v, resumed["backbone"][k]), k
    fresh = MoCoV2(create_model("test_convnext", num_classes=0), MoCoV2Config(queue_size=24, dim=16))
    assert not torch.allclose(fresh.queue, resumed["method_state"]["queue"])
