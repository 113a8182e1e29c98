"""Deployable heads: shapes, spec round trip, decoding and NMS against slow references, detector loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qbheat._compat import nms as greedy_nms
from qbheat.errors import QBHeatError
from qbheat.heads import (
    HEAD_CLASSES as HEADS,
    DetectorHead,
    TransformerProbe,
    box_iou_pairwise,
    build_head,
    cluster_nms_keep,
    create_head,
    head_from_spec,
    head_inputs,
    head_spec,
)
from export.deployable import VARIANTS, DeployableModel
from qbheat.models import create_model

SIZE = 64


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_model("mobilenetv3_small_100", num_classes=0).eval()


class _TokenBackbone(nn.Module):
    """Stand-in with Mobile-Former's surface: forward_features returns (map, tokens)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=32, padding=1)
        self.tokens = nn.Parameter(torch.randn(1, 3, 5))

    def forward_features(self, x):
        return self.conv(x), self.tokens.expand(x.shape[0], -1, -1) + x.mean()


def test_registry_has_the_four_heads():
    assert set(HEADS) == {"linear", "transformer_probe", "detector", "features"}
    with pytest.raises(QBHeatError, match="unknown head type"):
        create_head("mlp", num_classes=3)
    with pytest.raises(QBHeatError, match="cannot be built"):
        create_head("linear", num_classes=3)  # in_features missing


@pytest.mark.parametrize("head_type,kwargs", [("linear", {"num_classes": 5}),
                                              ("transformer_probe", {"num_classes": 5, "width": 32}),
                                              ("features", {}), ("detector", {"num_classes": 3})])
def test_every_variant_has_named_outputs_of_the_documented_shapes(backbone, head_type, kwargs):
    head = build_head(head_type, backbone, image_size=SIZE, **kwargs)
    x = torch.randn(3, 3, SIZE, SIZE)
    n_points = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2
    expected = {
        "logits": [(3, 5)], "probabilities": [(3, 5)], "embedding": [(3, 576)],
        "decode": [(3, n_points, 4), (3, n_points, 3)], "nms": [(3, 50, 4), (3, 50), (3, 50), (3,)],
    }
    for variant, names in VARIANTS[head.task].items():
        model = DeployableModel(backbone, head, variant)
        assert model.output_names == names
        out = model(x)
        assert [tuple(o.shape) for o in out] == expected[variant]
        if variant == "probabilities":
            torch.testing.assert_close(out[0].sum(1), torch.ones(3))
        if variant == "nms":
            assert out[2].dtype == torch.int64 and out[3].dtype == torch.int64
    with pytest.raises(QBHeatError, match="variants"):
        DeployableModel(backbone, head, "bogus")


def test_pool_choice_reads_the_documented_feature_view(backbone):
    x = torch.randn(2, 3, SIZE, SIZE)
    pooled = head_inputs(backbone, x, "pooled")
    fmap = backbone.forward_features(x)
    torch.testing.assert_close(pooled, fmap.mean((2, 3)))
    assert build_head("linear", backbone, image_size=SIZE, num_classes=2).kwargs["in_features"] == 576
    emb = build_head("linear", backbone, image_size=SIZE, num_classes=2, pool="embedding")
    assert emb.kwargs["in_features"] == 1024  # MobileNetV3-Small's conv_head width
    torch.testing.assert_close(head_inputs(backbone, x, "embedding"), backbone(x))


def test_pooled_view_concatenates_token_zero_and_probe_reads_tokens():
    bb = _TokenBackbone()
    x = torch.randn(2, 3, 64, 64)
    pooled = head_inputs(bb, x, "pooled")
    fmap, tokens = bb.forward_features(x)
    torch.testing.assert_close(pooled, torch.cat([fmap.mean((2, 3)), tokens[:, 0]], 1))
    probe = build_head("transformer_probe", bb, image_size=64, num_classes=4, width=16, num_heads=2)
    assert probe.kwargs["in_channels"] == 8 and probe.kwargs["token_dim"] == 5
    logits = DeployableModel(bb, probe)(x)[0]
    assert logits.shape == (2, 4)
    # the global tokens take part: changing them changes the logits
    probe.fc.weight.data.normal_()
    a = probe((fmap, tokens))
    b = probe((fmap, tokens + 1.0))
    assert not torch.allclose(a, b)
    with pytest.raises(QBHeatError, match="global tokens"):
        probe((fmap, None))


def test_spec_round_trip_gives_identical_outputs_and_bad_specs_fail_clearly(backbone):
    head = build_head("transformer_probe", backbone, image_size=SIZE, num_classes=3, width=32)
    head.fc.weight.data.normal_()
    spec = head_spec(head)
    assert set(spec) == {"type", "kwargs", "state"} and spec["type"] == "transformer_probe"
    rebuilt = head_from_spec(spec)
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(DeployableModel(backbone, rebuilt)(x)[0], DeployableModel(backbone, head)(x)[0])
    bad = dict(spec, kwargs={**spec["kwargs"], "width": 64})
    with pytest.raises(QBHeatError, match="do not fit"):
        head_from_spec(bad)
    with pytest.raises(QBHeatError, match="lacks"):
        head_from_spec({"type": "linear"})


def test_frozen_model_stays_in_eval_mode(backbone):
    model = DeployableModel(backbone, build_head("linear", backbone, image_size=SIZE, num_classes=2))
    model.train()
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


# -- detector decoding and NMS against slow references ----------------------------------------

def _slow_decode(head: DetectorHead, raw, height, width):
    """Loop over levels, rows, columns, classes: the obvious FCOS decoding."""
    b = raw["cls"].shape[0]
    boxes, scores = [], []
    i = 0
    for (h, w), s in zip(raw["shapes"], head.strides):
        for r in range(h):
            for c in range(w):
                px, py = c * s + s / 2, r * s + s / 2
                l, t, rr, bb = raw["ltrb"][:, i].unbind(1)
                boxes.append(torch.stack([(px - l).clamp(0, width), (py - t).clamp(0, height),
                                          (px + rr).clamp(0, width), (py + bb).clamp(0, height)], 1))
                scores.append(torch.stack([torch.sqrt(torch.sigmoid(raw["cls"][:, i, k]) * torch.sigmoid(raw["ctr"][:, i]))
                                           for k in range(head.num_classes)], 1))
                i += 1
    return torch.stack(boxes, 1).reshape(b, -1, 4), torch.stack(scores, 1)


def test_decode_matches_slow_reference(backbone):
    head = build_head("detector", backbone, image_size=SIZE, num_classes=3)
    for m in head.modules():  # make the raw outputs far from the init so every branch matters
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.2)
    x = torch.randn(2, 3, SIZE, 96)  # non-square: x and y must not be swapped
    raw = head(head_inputs(backbone, x, "multiscale"))
    boxes, scores = head.decode(raw, SIZE, 96)
    ref_boxes, ref_scores = _slow_decode(head, raw, SIZE, 96)
    torch.testing.assert_close(boxes, ref_boxes)
    torch.testing.assert_close(scores, ref_scores)
    assert boxes[..., 2].max() <= 96 and boxes[..., 3].max() <= SIZE
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def _clustered_boxes(g: torch.Generator, n_clusters: int, per_cluster: int, size: float = 200.0):
    centres = torch.rand(n_clusters, 2, generator=g) * size
    wh = 10 + torch.rand(n_clusters, 2, generator=g) * 40
    jitter = torch.randn(n_clusters, per_cluster, 4, generator=g) * 4
    base = torch.cat([centres - wh / 2, centres + wh / 2], 1)[:, None, :] + jitter
    boxes = base.reshape(-1, 4)
    return torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], 1)


def test_cluster_nms_equals_greedy_nms():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        boxes = _clustered_boxes(g, 6, 8)
        scores = torch.rand(boxes.shape[0], generator=g)
        order = scores.argsort(descending=True)
        keep = cluster_nms_keep(boxes[order][None], iterations=boxes.shape[0], iou_threshold=0.5)[0]
        fast = set(order[keep > 0].tolist())
        assert fast == set(greedy_nms(boxes, scores, 0.5).tolist()), trial
    # a suppression chain a→b→c: b is suppressed by a, so c survives; it needs two matrix steps
    chain = torch.tensor([[[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]]])
    assert cluster_nms_keep(chain, 1, 0.4)[0].tolist() == [1.0, 0.0, 0.0]  # one step: not yet converged
    assert cluster_nms_keep(chain, 2, 0.4)[0].tolist() == [1.0, 0.0, 1.0]  # greedy answer


def _slow_detections(boxes, scores, head: DetectorHead):
    """Reference: per image, per class greedy NMS (qbheat._compat.nms) over the top pre_nms_topk pairs."""
    kw = head.kwargs
    out = []
    for b in range(boxes.shape[0]):
        flat = scores[b].reshape(-1)
        top, idx = flat.topk(min(kw["pre_nms_topk"], flat.numel()))
        point, label = idx // head.num_classes, idx % head.num_classes
        dets = []
        for k in label.unique().tolist():
            sel = label == k
            for j in greedy_nms(boxes[b, point[sel]], top[sel], kw["iou_threshold"]).tolist():
                if top[sel][j] > kw["score_threshold"]:
                    dets.append((float(top[sel][j]), k, boxes[b, point[sel][j]]))
        dets.sort(key=lambda d: -d[0])
        out.append(dets[: kw["max_detections"]])
    return out


def test_in_graph_nms_matches_slow_reference():
    head = DetectorHead([8, 8, 8], num_classes=3, pre_nms_topk=60, max_detections=20, nms_iterations=60,
                        score_threshold=0.3, iou_threshold=0.5)
    g = torch.Generator().manual_seed(1)
    boxes = torch.stack([_clustered_boxes(g, 5, 8) for _ in range(2)])  # B×40×4
    scores = torch.rand(2, 40, 3, generator=g)
    out_boxes, out_scores, out_labels, count = head.nms(boxes, scores, 256, 256)
    ref = _slow_detections(boxes, scores, head)
    for b in range(2):
        assert int(count[b]) == len(ref[b])
        n = len(ref[b])
        torch.testing.assert_close(out_scores[b, :n], torch.tensor([d[0] for d in ref[b]]))
        assert out_labels[b, :n].tolist() == [d[1] for d in ref[b]]
        torch.testing.assert_close(out_boxes[b, :n], torch.stack([d[2] for d in ref[b]]))
        assert (out_scores[b, n:] == 0).all() and (out_labels[b, n:] == -1).all() and (out_boxes[b, n:] == 0).all()


def test_default_nms_iterations_match_greedy_on_dense_detector_output(backbone):
    head = build_head("detector", backbone, image_size=SIZE, num_classes=2, score_threshold=0.0)
    g = torch.Generator().manual_seed(2)
    boxes = torch.stack([_clustered_boxes(g, 4, 21, SIZE) for _ in range(2)])  # 84 points, dense overlap
    scores = torch.rand(2, 84, 2, generator=g)
    _, out_scores, out_labels, count = head.nms(boxes, scores, SIZE, SIZE)
    ref = _slow_detections(boxes, scores, head)
    for b in range(2):
        assert int(count[b]) == len(ref[b])
        torch.testing.assert_close(out_scores[b, : len(ref[b])], torch.tensor([d[0] for d in ref[b]]))


def test_box_iou_pairwise_known_values():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    torch.testing.assert_close(box_iou_pairwise(a, b), torch.tensor([[1.0, 1 / 3, 0.0]]))


# -- detector training --------------------------------------------------------------------------

def test_assignment_puts_positives_inside_the_box_on_the_right_level(backbone):
    head = build_head("detector", backbone, image_size=SIZE, num_classes=3)
    raw = head(head_inputs(backbone, torch.randn(1, 3, SIZE, SIZE), "multiscale"))
    gt = [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0]]), "labels": torch.tensor([2])}]
    cls_t, box_t, pos = head.targets(raw, gt)
    pts = head.points(raw)[pos[0]]
    assert pos.sum() > 0
    assert ((pts[:, 0] > 8) & (pts[:, 0] < 40) & (pts[:, 1] > 16) & (pts[:, 1] < 48)).all()
    assert (cls_t[0, pos[0], 2] == 1).all() and cls_t[0, ~pos[0]].sum() == 0
    n8 = (SIZE // 8) ** 2
    assert pos[0, :n8].sum() >= 4  # max extent ≤ 32 < 64: the stride-8 level, centre sampling radius 1.5·8
    assert not pos[0, n8:].any()


def test_detector_loss_decreases_on_one_synthetic_box(backbone):
    torch.manual_seed(0)
    head = build_head("detector", backbone, image_size=SIZE, num_classes=2, width=32)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = head_inputs(backbone, x, "multiscale")
    gt = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 44.0]]), "labels": torch.tensor([1])}]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        parts = head.loss(head(feats), gt, SIZE, SIZE)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(float(parts["loss"]))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    # after training, the top detection is the box, with the right class
    boxes, scores, labels, count = DeployableModel(backbone, head, "nms")(x)
    assert int(labels[0, 0]) == 1
    assert float(box_iou_pairwise(boxes[0, :1], gt[0]["boxes"])[0, 0]) > 0.5


def test_probe_rejects_bad_pool():
    with pytest.raises(QBHeatError, match="pool"):
        TransformerProbe(8, 2, pool="max")
    with pytest.raises(QBHeatError, match="pool"):
        create_head("linear", in_features=4, num_classes=2, pool="gem")
