"""Shared fixtures: small checkpoints whose BatchNorm statistics are measured on real images.

A randomly initialised network has BatchNorm running statistics of 0/1 that do not match its
activations; INT8 calibration of such a network measures noise. Re-estimating the statistics on
a few real photographs (what BN recalibration does after pruning or fusion) gives activations in
a trained network's range, so INT8 parity is meaningful without pretrained weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qbheat.checkpoint import save_checkpoint
from qbheat.data.samples import sample_images
from qbheat.heads import build_head, head_spec

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def recalibrated_backbone(name: str, size: int, seed: int = 0) -> torch.nn.Module:
    from qbheat.models import create_model

    torch.manual_seed(seed)
    model = create_model(name, num_classes=0)
    imgs = torch.from_numpy(sample_images(16, size, seed=5)).permute(0, 3, 1, 2).float() / 255
    imgs = (imgs - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, 16, 8):
            model(imgs[i:i + 8])
    return model.eval()


def write_checkpoint(path, name: str, size: int, kind: str = "pretrain", head=None, labels=None):
    backbone = recalibrated_backbone(name, size)
    payload = {"kind": kind, "model": {"name": name, "kwargs": {}}, "backbone": backbone.state_dict(), "method": "qbheat"}
    if head is not None:
        h = build_head(head[0], backbone, image_size=size, **head[1])
        for p in h.parameters():  # spread the weights like a trained head, so scores are not all ties
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=1.0 / np.sqrt(p[0].numel()))
        if hasattr(h, "cls_logits"):
            torch.nn.init.zeros_(h.cls_logits.bias)  # scores around 0.5 instead of the 0.01 prior: detections exist
        payload.update(head=head_spec(h), labels=labels,
                       preprocessing={"input_size": [3, size, size], "mean": list(MEAN), "std": list(STD),
                                      "interpolation": "bilinear", "crop_pct": 1.0})
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="session")
def probe_ckpt(tmp_path_factory):
    labels = ["tee", "trouser", "pullover", "dress", "coat"]
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "probe.pt", "resnet10t", 64, kind="probe",
                            head=("linear", {"num_classes": 5}), labels=labels), labels


@pytest.fixture(scope="session")
def detector_ckpt(tmp_path_factory):
    labels = ["bag", "boot", "shirt"]
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "det.pt", "resnet10t", 64, kind="detector",
                            head=("detector", {"num_classes": 3, "width": 32, "score_threshold": 0.57}), labels=labels), labels


def fashion_probe(path, name: str = "resnet10t", size: int = 32, train: int = 3000, seed: int = 0):
    """A probe checkpoint that classifies Fashion-MNIST for real: BatchNorm statistics and a
    least-squares linear head (one-hot targets, ridge 1e-2) from ``train`` training images."""
    from qbheat.data import fashion_mnist
    from qbheat.evaluation.features import ProbePreprocessing as Preprocessing, as_uint8_chw, recalibrate_untracked_batchnorm
    from qbheat.heads import head_inputs
    from qbheat.models import create_model

    torch.manual_seed(seed)
    images, labels = fashion_mnist.load("train")
    pick = np.random.default_rng(seed).permutation(len(labels))[:train]
    pre = Preprocessing(input_size=(3, size, size), mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0)
    x = pre(as_uint8_chw(images[pick]))
    y = torch.from_numpy(labels[pick])
    backbone = create_model(name, num_classes=0)
    # every BatchNorm's statistics from 512 of the images (the package's label-free re-estimation)
    recalibrate_untracked_batchnorm(backbone, images[pick[:512]], pre, batch_size=128, progress=False, every_layer=True)
    backbone.eval()
    head = build_head("linear", backbone, image_size=size, num_classes=10)
    with torch.no_grad():
        f = torch.cat([head_inputs(backbone, x[i:i + 256], "pooled") for i in range(0, len(x), 256)]).double()
        mu, sd = f.mean(0), f.std(0) + 1e-6
        z = torch.cat([(f - mu) / sd, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        target = torch.nn.functional.one_hot(y, 10).double()
        w = torch.linalg.solve(z.T @ z + 1e-2 * torch.eye(z.shape[1], dtype=f.dtype), z.T @ target)  # (D+1)×10
        head.fc.weight.copy_((w[:-1] / sd[:, None]).T.float())
        head.fc.bias.copy_((w[-1] - (mu / sd) @ w[:-1]).float())
    payload = {"kind": "probe", "model": {"name": name, "kwargs": {}}, "backbone": backbone.state_dict(), "method": "qbheat",
               "head": head_spec(head), "labels": list(fashion_mnist.CLASSES),
               "preprocessing": {"input_size": [3, size, size], "mean": list(MEAN), "std": list(STD),
                                 "interpolation": "bilinear", "crop_pct": 1.0}}
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="session")
def fashion_ckpt(tmp_path_factory):
    from qbheat.data import fashion_mnist

    if not fashion_mnist.is_available():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return fashion_probe(tmp_path_factory.mktemp("fm") / "probe.pt")
