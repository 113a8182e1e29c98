"""QB-Heat: quarter masking, the heat predictor against a slow reference, the loss, and any-backbone use."""
import pytest
import timm
import torch

from qbheat.errors import QBHeatError
from qbheat.methods.qbheat import (
    HeatPredictor,
    PixelDecoder,
    QBHeat,
    QBHeatConfig,
    assemble_quarters,
    centre_block_mask,
    centre_latent,
    masked_patch_loss,
    masked_reconstruction_loss,
    quarter_block_mask,
    resolve_feature_levels,
    sample_visible_corners,
    visible_quarter,
)
from qbheat.models import create_model

ALL_CORNERS = [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("size", [(8, 8), (64, 64), (224, 224), (32, 48)])
def test_mask_covers_exactly_three_quarters(size):
    h, w = size
    cy = torch.tensor([c[0] for c in ALL_CORNERS])
    cx = torch.tensor([c[1] for c in ALL_CORNERS])
    mask = quarter_block_mask(cy, cx, h, w)
    assert mask.shape == (4, 1, h, w) and mask.dtype == torch.bool
    for b, (r, c) in enumerate(ALL_CORNERS):
        assert int(mask[b].sum()) == 3 * (h // 2) * (w // 2)  # exactly three quarters masked
        visible = ~mask[b, 0]
        rows, cols = visible.nonzero(as_tuple=True)
        # the unmasked pixels form exactly the quarter block at (r, c)
        assert rows.min() == r * h // 2 and rows.max() == (r + 1) * h // 2 - 1
        assert cols.min() == c * w // 2 and cols.max() == (c + 1) * w // 2 - 1


def test_visible_quarter_is_the_unmasked_block():
    x = torch.randn(4, 3, 16, 20)
    cy = torch.tensor([0, 0, 1, 1])
    cx = torch.tensor([0, 1, 0, 1])
    vis = visible_quarter(x, cy, cx)
    assert vis.shape == (4, 3, 8, 10)
    mask = quarter_block_mask(cy, cx, 16, 20)
    for b in range(4):
        assert torch.equal(vis[b].flatten(1), x[b][:, ~mask[b, 0]].reshape(3, -1))


def test_random_corners_cover_all_four():
    torch.manual_seed(0)
    cy, cx = sample_visible_corners(400, "random", torch.device("cpu"))
    counts = torch.bincount(cy * 2 + cx, minlength=4)
    assert (counts > 60).all()  # each corner ≈ 100 of 400
    cy, cx = sample_visible_corners(5, "top_left", torch.device("cpu"))
    assert cy.sum() == 0 and cx.sum() == 0


def _slow_heat(z, a, b, sx, sy, diagonal):
    """Reference: explicit (I ± A), (I ± B) matrices applied to every feature vector in loops."""
    bsz, c, h, w = z.shape
    eye = torch.eye(c, dtype=torch.float64)
    out_h, out_v, out_d = (torch.zeros(bsz, c, h, w, dtype=torch.float64) for _ in range(3))
    for n in range(bsz):
        px = eye + float(sx[n]) * a.double()
        py = eye + float(sy[n]) * b.double()
        diag = {"x_then_y": py @ px, "y_then_x": px @ py, "average": 0.5 * (py @ px + px @ py)}[diagonal]
        for i in range(h):
            for j in range(w):
                v = z[n, :, i, j].double()
                out_h[n, :, i, j] = px @ v
                out_v[n, :, i, j] = py @ v
                out_d[n, :, i, j] = diag @ v
    return out_h, out_v, out_d


@pytest.mark.parametrize("diagonal", ["x_then_y", "y_then_x", "average"])
def test_heat_predictor_matches_slow_reference(diagonal):
    torch.manual_seed(1)
    pred = HeatPredictor(6, diagonal)
    with torch.no_grad():
        pred.A.normal_(0, 0.3)
        pred.B.normal_(0, 0.3)
    z = torch.randn(4, 6, 3, 2)
    sx = torch.tensor([1, -1, 1, -1])
    sy = torch.tensor([1, 1, -1, -1])
    fast = pred(z, sx, sy)
    slow = _slow_heat(z, pred.A.detach(), pred.B.detach(), sx, sy, diagonal)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f.double(), s, atol=1e-5, rtol=1e-5)
    # A and B do not commute here, so the diagonal order matters
    if diagonal == "x_then_y":
        other = HeatPredictor(6, "y_then_x")
        other.load_state_dict(pred.state_dict())
        assert (other(z, sx, sy)[2] - fast[2]).abs().max() > 1e-3


def test_heat_predictor_starts_as_identity_step():
    pred = HeatPredictor(5)
    z = torch.randn(2, 5, 2, 2)
    for out in pred(z):
        assert torch.equal(out, z)


def test_assemble_quarters_places_each_block():
    z, zh, zv, zd = (torch.full((4, 2, 3, 3), float(v)) for v in (1, 2, 3, 4))
    cy = torch.tensor([0, 0, 1, 1])
    cx = torch.tensor([0, 1, 0, 1])
    full = assemble_quarters(z, zh, zv, zd, cy, cx)
    assert full.shape == (4, 2, 6, 6)
    for b, (r, c) in enumerate(ALL_CORNERS):
        for rr in (0, 1):
            for cc in (0, 1):
                block = full[b, :, rr * 3:(rr + 1) * 3, cc * 3:(cc + 1) * 3]
                expected = {(True, True): 1, (True, False): 2, (False, True): 3, (False, False): 4}[(rr == r, cc == c)]
                assert torch.all(block == expected), (b, rr, cc)


def test_masked_loss_matches_slow_reference():
    torch.manual_seed(2)
    pred, img = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = quarter_block_mask(torch.tensor([0, 1]), torch.tensor([1, 0]), 8, 8)
    for norm in (False, True):
        total, count = 0.0, 0
        for b in range(2):
            for i in range(0, 8, 2):
                for j in range(0, 8, 2):
                    if not mask[b, 0, i, j]:
                        continue
                    t = img[b, :, i:i + 2, j:j + 2].double()
                    if norm:
                        t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
                    total += float(((pred[b, :, i:i + 2, j:j + 2].double() - t) ** 2).mean())
                    count += 1
        assert count == 2 * 3 * 4  # 3 masked quarters × 4 patches of 2×2 per quarter
        got = masked_reconstruction_loss(pred, img, mask, patch=2, norm_pix=norm)
        assert got.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("image_size,requested,expected", [(256, None, [16, 32]), (224, None, [16]), (64, None, [16, 32]),
                                                            (224, [16], [16]), (128, [32, 16], [16, 32])])
def test_feature_levels_tile_the_quarter(image_size, requested, expected):
    backbone = create_model("resnet10t", num_classes=0)
    levels = resolve_feature_levels(backbone, image_size, requested)
    assert [s for s, _ in levels] == expected and all((image_size // 2) % s == 0 for s, _ in levels)
    assert [c for _, c in levels] == [{8: 128, 16: 256, 32: 512}[s] for s in expected]


def test_feature_stride_that_does_not_tile_is_refused():
    backbone = create_model("resnet10t", num_classes=0)
    with pytest.raises(QBHeatError, match="does not tile"):
        resolve_feature_levels(backbone, 224, [32])
    with pytest.raises(QBHeatError, match="not a level"):
        resolve_feature_levels(backbone, 224, [64])
    with pytest.raises(QBHeatError, match="distinct powers of two"):
        QBHeat(backbone, QBHeatConfig(feature_strides=[16, 16]), 64)


def _models():
    names = ["resnet10t", "mobilenetv3_small_100", "test_convnext"]
    names += [m for m in ("mobileformer_micro",) if timm.is_model(m)]
    return names


@pytest.mark.parametrize("name", _models())
def test_encoder_sees_only_the_visible_quarter(name):
    torch.manual_seed(0)
    size = 64
    method = QBHeat(create_model(name, num_classes=0), QBHeatConfig(visible_corner="random", feature_strides=[16]), size).eval()
    x = torch.randn(3, 3, size, size)
    torch.manual_seed(5)
    out = method([x])
    # change only masked pixels: same corners (same seed) → same encoder features, different loss
    torch.manual_seed(5)
    cy, cx = sample_visible_corners(3, "random", x.device)
    mask = quarter_block_mask(cy, cx, size, size)
    y = torch.where(mask, torch.randn_like(x), x)
    torch.manual_seed(5)
    out2 = method([y])
    torch.testing.assert_close(out["embeddings"][0], out2["embeddings"][0])
    assert abs(out["loss"].item() - out2["loss"].item()) > 1e-5  # the target (masked pixels) changed
    assert out["embeddings"][0].shape[0] == 3


@pytest.mark.parametrize("name", _models())
def test_qbheat_trains_backbone_predictor_and_decoder(name):
    torch.manual_seed(0)
    method = QBHeat(create_model(name, num_classes=0), QBHeatConfig(), 64)
    out = method([torch.randn(2, 3, 64, 64)])
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for predictor, decoder in zip(method.predictors, method.decoders):
        assert predictor.A.grad.abs().sum() > 0 and predictor.B.grad.abs().sum() > 0
        assert decoder.to_pixels.weight.grad.abs().sum() > 0
    first = next(p for p in method.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_wrong_image_size_is_a_clear_error():
    method = QBHeat(create_model("resnet10t", num_classes=0), QBHeatConfig(), 64)
    with pytest.raises(QBHeatError, match="64-pixel"):
        method([torch.randn(1, 3, 96, 96)])


def _grad_share(method: QBHeat, size: int) -> tuple[float, list[str]]:
    """Share of the backbone's parameters (by count) with a non-zero gradient after one QB-Heat step,
    and the probe-facing modules (last block, final bridge) that got none."""
    method.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    method([torch.randn(4, 3, size, size)])["loss"].backward()
    named = [(n, p) for n, p in method.backbone.named_parameters() if not n.startswith("head.")]
    total = sum(p.numel() for _, p in named)
    live = sum(p.numel() for _, p in named if p.grad is not None and p.grad.abs().sum() > 0)
    dead = sorted(n for n, p in named if p.grad is None or p.grad.abs().sum() == 0)
    return live / total, dead


def test_default_trains_every_part_the_probes_read():
    """Issue 19: at stride 16 alone the last stage and the final bridge got no gradient; the default now
    trains every backbone parameter the pooled probes, the detector and the exported heads read."""
    backbone = create_model("mobileformer_micro", num_classes=0)
    last = len(backbone.blocks) - 1
    old, old_dead = _grad_share(QBHeat(backbone, QBHeatConfig(feature_strides=[16], token_conditioning=False), 64), 64)
    assert any(n.startswith(f"blocks.{last}.") for n in old_dead) and any(n.startswith("mobile_to_former.") for n in old_dead)
    assert 0.3 < old < 0.6  # about half the backbone sat idle
    new, new_dead = _grad_share(QBHeat(create_model("mobileformer_micro", num_classes=0), QBHeatConfig(), 64), 64)
    # At 64 px the last map of a 32-px quarter is one cell: a Mobile→Former query attending over a single
    # position has no effect on the output (softmax of one logit), so only those queries stay idle.
    assert new > 0.97 and all(".q." in n and "mobile_to_former" in n for n in new_dead)
    full, full_dead = _grad_share(QBHeat(create_model("mobileformer_micro", num_classes=0), QBHeatConfig(), 128), 128)
    assert full == 1.0 and full_dead == []


def test_centre_mask_leaves_only_the_central_block_visible():
    mask = centre_block_mask(2, 8, 12, torch.device("cpu"))
    assert mask.shape == (2, 1, 8, 12)
    visible = ~mask[0, 0]
    assert visible[2:6, 3:9].all() and visible.sum() == 4 * 6  # rows [H/4, 3H/4), columns [W/4, 3W/4)


def test_centre_latent_steps_outwards_from_the_visible_block():
    torch.manual_seed(3)
    pred = HeatPredictor(4)
    with torch.no_grad():
        pred.A.normal_(), pred.B.normal_()
    eye = torch.eye(4)
    step = lambda m, z: torch.einsum("oc,bchw->bohw", m, z)  # noqa: E731
    z = torch.randn(2, 4, 2, 2)  # c = 2 cells: the window is [1, 5) of the 3×3 layout's 6 cells
    lat = centre_latent(z, pred)
    assert lat.shape == (2, 4, 4, 4)
    torch.testing.assert_close(lat[..., 1:3, 1:3], z)  # the visible block sits in the centre
    torch.testing.assert_close(lat[..., 1:3, 3], step(eye + pred.A, z)[..., :, 0])  # right: (I + A) z, its left column
    torch.testing.assert_close(lat[..., 0, 1:3], step(eye - pred.B, z)[..., 1, :])  # up: (I − B) z, its bottom row
    torch.testing.assert_close(lat[..., 3, 0], step(eye + pred.B, step(eye - pred.A, z))[..., 0, 1])  # down-left, x then y
    one = torch.randn(2, 4, 1, 1)  # c = 1 (stride 32 at 64 px): each cell averages the block and its neighbours
    lat1 = centre_latent(one, pred)
    assert lat1.shape == (2, 4, 2, 2)
    want = (one + step(eye + pred.A, one) + step(eye + pred.B, one) + step(eye + pred.B, step(eye + pred.A, one))) / 4
    torch.testing.assert_close(lat1[..., 1:, 1:], want)


def test_centre_block_encoder_sees_only_the_centre_and_trains():
    torch.manual_seed(0)
    method = QBHeat(create_model("mobileformer_micro", num_classes=0), QBHeatConfig(visible_corner="centre"), 64).eval()
    x = torch.randn(2, 3, 64, 64)
    out = method([x])
    y = torch.where(centre_block_mask(2, 64, 64, x.device), torch.randn_like(x), x)
    out2 = method([y])
    torch.testing.assert_close(out["embeddings"][0], out2["embeddings"][0])
    assert abs(out["loss"].item() - out2["loss"].item()) > 1e-5
    out["loss"].backward()
    assert all(p.A.grad.abs().sum() > 0 and p.B.grad.abs().sum() > 0 for p in method.predictors)


def test_masked_loss_on_pixels_of_a_cut_patch():
    """A mask that cuts patches (the centred block at stride 32) averages over masked pixels only."""
    torch.manual_seed(4)
    pred, img = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    mask = centre_block_mask(1, 4, 4, torch.device("cpu"))
    got = masked_reconstruction_loss(pred, img, mask, patch=4, norm_pix=False)
    want = ((pred - img) ** 2)[mask.expand(1, 3, 4, 4)].mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("stride,centre", [(4, False), (8, True)])
def test_patch_loss_of_decoder_patches_equals_loss_of_its_image(stride, centre):
    """The training step's loss on the decoder's unshuffled patches is the loss on its output image."""
    torch.manual_seed(5)
    decoder = PixelDecoder(in_dim=8, dim=16, depth=1, stride=stride)
    latent, img = torch.randn(3, 8, 4, 4), torch.randn(3, 3, 4 * stride, 4 * stride)
    size = 4 * stride
    mask = centre_block_mask(3, size, size, torch.device("cpu")) if centre else \
        quarter_block_mask(torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]), size, size)
    for norm in (False, True):
        want = masked_reconstruction_loss(decoder(latent), img, mask, stride, norm_pix=norm)
        got = masked_patch_loss(decoder.patches(latent), img, mask, stride, norm_pix=norm)
        torch.testing.assert_close(got, want)
        assert got.item() > 0.1
