"""HcNet (qbheat/models/hcnet.py): the HC and RA layers, the published and edge configs, the timm
surface, and export through torch.export → ONNX Runtime / OpenVINO with parity."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import qbheat  # noqa: F401  (shim before timm)
import timm

from qbheat.data.samples import sample_images
from deploy_targets.runners.openvino_runner import shared_core
from qbheat.errors import QBHeatError
from qbheat.models import create_model, multiscale_features
from qbheat.models.hcnet import HCNET_CONFIGS, HcNetConfig, HeatConduction, RefinementApproximation

NAMES = sorted(HCNET_CONFIGS)


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, by PyTorch's FlopCounterMode (FLOPs / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def closed_form_count(cfg: HcNetConfig, size: int = 224, num_classes: int = 1000) -> tuple[int, int]:
    """(params, MACs) of an HcNet written out by hand from the paper's layer list, the slow obvious way.

    MACs count convolutions and the classifier only (what FlopCounterMode counts): the gate's
    sigmoid, the norms, GELU and the element-wise products are not multiply-accumulates of a layer.
    """
    c0, k, f, r = cfg.widths[0], cfg.stencil_size, cfg.ra_filter_size, cfg.ra_ratio
    h1, h4 = size // 2, size // 4
    params = (3 * 9 * c0 // 2 + c0 // 2) + c0 + (c0 // 2 * 9 * c0 + c0) + 2 * c0  # stem convs + 2 GN
    macs = 3 * 9 * (c0 // 2) * h1 * h1 + (c0 // 2) * 9 * c0 * h4 * h4
    prev, side = c0, h4
    for i, (c, depth) in enumerate(zip(cfg.widths, cfg.depths)):
        if i:
            side //= 2
            params += 9 * prev * c + 2 * c  # downsample conv (no bias) + GN
            macs += 9 * prev * c * side * side
        hidden = int(c * r)
        hw = side * side
        block_params = (k * k * c + c * c) + (2 * c + c * hidden + hidden + f * f * hidden + hidden * c + c)
        block_macs = (k * k * c * hw + c * c) + (c * hidden * hw + f * f * hidden * hw + hidden * c * hw)
        params += depth * block_params
        macs += depth * block_macs
        prev = c
    params += 2 * prev + prev * num_classes + num_classes  # final GN + linear head
    macs += prev * num_classes
    return params, macs


def test_registry_holds_every_config():
    assert sorted(timm.list_models("hcnet*")) == NAMES == ["hcnet_edge_s", "hcnet_edge_xs", "hcnet_tiny"]


@pytest.mark.parametrize("name", NAMES)
def test_params_and_macs_match_the_closed_form(name):
    model = create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    assert (params, macs) == closed_form_count(HCNET_CONFIGS[name])


def test_hcnet_tiny_is_as_published():
    """HcNet-T: "28M parameters and 4.1G MACs" (paper abstract), within 3 %."""
    model = create_model("hcnet_tiny").eval()
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    assert params == 28_616_936 and abs(params / 28e6 - 1) <= 0.03
    assert macs == 4_216_637_440 and abs(macs / 4.1e9 - 1) <= 0.03


@pytest.mark.parametrize("name,params,macs", [("hcnet_edge_s", 3_510_248, 497_356_032), ("hcnet_edge_xs", 2_044_552, 286_709_184)])
def test_edge_variants_are_under_one_gmac(name, params, macs):
    model = create_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    measured = count_macs(model, torch.randn(1, 3, 224, 224))
    assert measured == macs < 1e9


def test_heat_conduction_is_a_zero_sum_euler_step():
    torch.manual_seed(0)
    layer = HeatConduction(6, stencil_size=5)
    with torch.no_grad():
        layer.stencil.normal_()  # a large, clearly non-zero-sum K
        layer.diffusivity.weight.normal_()
    assert layer.stencil.sum(dim=(1, 2, 3)).abs().min() > 0.1
    assert torch.allclose(layer.laplacian_kernel().sum(dim=(1, 2, 3)), torch.zeros(6), atol=1e-5)

    # A constant temperature field does not change away from the zero-padded border.
    const = torch.full((2, 6, 12, 12), 3.0)
    out = layer(const)
    assert torch.allclose(out[..., 2:-2, 2:-2], const[..., 2:-2, 2:-2], atol=1e-5)
    assert not torch.allclose(out[..., :2, :], const[..., :2, :], atol=1e-2)  # cold outside at the edge

    # The folded stencil equals the official form u + σ(W_g GAP u) ⊙ (DWConv_K(u) − s ⊙ u).
    u = torch.randn(2, 6, 12, 10)
    s = layer.stencil.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    lap = F.conv2d(u, layer.stencil, padding=2, groups=6) - s * u
    gate = torch.sigmoid(F.conv2d(u.mean(dim=(2, 3), keepdim=True), layer.diffusivity.weight))
    assert torch.allclose(layer(u), u + gate * lap, atol=1e-5)
    g = layer.alpha_dt(u)
    assert g.shape == (2, 6, 1, 1) and bool(((g > 0) & (g < 1)).all())


def test_refinement_approximation_matches_its_definition():
    torch.manual_seed(0)
    layer = RefinementApproximation(8, ratio=4.0, filter_size=3).eval()
    assert layer.fc1.out_channels == 32 and layer.filters.groups == 32 and layer.filters.bias is None
    u = torch.randn(2, 8, 7, 9)
    normed = F.group_norm(u, 1, layer.norm.weight, layer.norm.bias)
    hidden = F.gelu(F.conv2d(normed, layer.fc1.weight, layer.fc1.bias))
    expected = u + F.conv2d(F.conv2d(hidden, layer.filters.weight, padding=1, groups=32), layer.fc2.weight, layer.fc2.bias)
    assert torch.allclose(layer(u), expected, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward_at_any_size_divisible_by_32(name, batch):
    model = create_model(name, num_classes=7).train()
    x = torch.randn(batch, 3, 64, 96, requires_grad=True)
    fmap = model.forward_features(x)
    assert fmap.shape == (batch, HCNET_CONFIGS[name].widths[-1], 2, 3)
    logits = model.forward_head(fmap)
    assert logits.shape == (batch, 7)
    logits.square().mean().backward()
    assert x.grad.abs().sum() > 0
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert without_grad == []


def test_features_only_strides_and_multiscale_features():
    x = torch.randn(2, 3, 128, 96)
    feats = timm.create_model("hcnet_edge_xs", features_only=True)
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    assert feats.feature_info.channels() == [24, 48, 120, 192]
    outs = feats(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    for cls in ("list", "getter"):
        sub = timm.create_model("hcnet_edge_xs", features_only=True, out_indices=(1, 2, 3), feature_cls=cls)
        assert sub.feature_info.reduction() == [8, 16, 32]

    # The same backbone instance gives the same stride-8/16/32 maps as the features_only wrapper.
    model = create_model("hcnet_edge_xs").eval()
    feats = timm.create_model("hcnet_edge_xs", features_only=True, out_indices=(1, 2, 3)).eval()
    renamed = {re.sub(r"^stages\.(\d)", r"stages_\1", k): v for k, v in model.state_dict().items()}  # timm flattens
    feats.load_state_dict({k: v for k, v in renamed.items() if not k.startswith(("head", "norm"))})
    with torch.no_grad():
        ours, theirs = multiscale_features(model, x, (8, 16, 32)), feats(x)
    assert [o.shape[1] for o in ours] == [48, 120, 192]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))

    # forward_intermediates with norm=True ends at forward_features' output.
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[3], norm=True)
        assert torch.equal(final, model.forward_features(x)) and torch.equal(inter[0], final)


def test_classifier_surface_and_pretrained_cfg():
    model = create_model("hcnet_edge_xs").eval()
    cfg = model.pretrained_cfg
    assert cfg["url"] == "" and "hf_hub_id" not in cfg  # nothing to download
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 192)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
        model.reset_classifier(0)
        assert model(x).shape == (2, 192)
    with pytest.raises(QBHeatError, match="pretrained"):
        create_model("hcnet_edge_xs", pretrained=True)
    with pytest.raises(QBHeatError, match="odd"):
        HcNetConfig(stencil_size=4).validate()


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = create_model("hcnet_edge_xs", num_classes=3).eval()
    b = create_model("hcnet_edge_xs", num_classes=3).eval()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    a(x).sum().backward()
    b(x).sum().backward()
    ga, gb = a.stem.conv1.weight.grad, b.stem.conv1.weight.grad
    assert torch.allclose(ga, gb, atol=1e-6) and ga.abs().sum() > 0


def _images(n: int, size: int, model: torch.nn.Module) -> torch.Tensor:
    """Real photographs, normalised with the model's own mean/std."""
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(sample_images(n, size, seed=n)).permute(0, 3, 1, 2).float() / 255.0  # B×3×H×W
    return (x - mean) / std


def test_export_dynamic_batch_onnxruntime_and_openvino(tmp_path):
    """torch.export (example batch 2, dynamic batch) → ONNX (dynamo) → ONNX Runtime at batch 1 and 3,
    and OpenVINO from the ExportedProgram and from the ONNX in f32; max abs diff ≤ 1e-4 × output scale."""
    ort = pytest.importorskip("onnxruntime")
    ov = pytest.importorskip("openvino")
    size = 96
    model = create_model("hcnet_edge_xs", num_classes=10).eval()
    with torch.no_grad():  # a head with real spread, so the logits are not all ≈ 0
        model.get_classifier().weight.normal_(0, 0.5)
    batch = torch.export.Dim("batch", min=1, max=64)
    example = _images(2, size, model)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    onnx_path = tmp_path / "hcnet_edge_xs.onnx"
    program = torch.onnx.export(exported, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(onnx_path))

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # not fixed to the example's 2
    core = shared_core()
    compiled = {
        "openvino(ExportedProgram)": core.compile_model(ov.convert_model(exported), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
        "openvino(onnx)": core.compile_model(ov.convert_model(str(onnx_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
    }
    for n in (1, 3):
        x = _images(n, size, model)
        with torch.no_grad():
            ref = model(x).numpy()
        scale = float(np.abs(ref).max())
        assert scale > 0.1 and ref.shape == (n, 10)
        outputs = {"onnxruntime": session.run(None, {"image": x.numpy()})[0]}
        outputs.update({k: c(x.numpy())[0] for k, c in compiled.items()})
        for runtime, out in outputs.items():
            assert out.shape == (n, 10), runtime
            assert np.abs(out - ref).max() <= 1e-4 * scale, runtime
            assert (out.argmax(1) == ref.argmax(1)).all(), runtime
