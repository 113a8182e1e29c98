"""The training loop: loss falls on real data, exact resume, checkpoints, configs, and CLI errors."""
import csv
from pathlib import Path

import pytest
import timm
import torch

from qbheat import cli
from qbheat.checkpoint import build_backbone, load_checkpoint
from qbheat.config import PretrainConfig, load_config
from qbheat.data import fashion_mnist
from qbheat.errors import QBHeatError
from qbheat.methods.qbheat import QBHeatConfig
from qbheat.train import WarmupCosine, pretrain

CONFIGS = sorted((Path(__file__).parents[2] / "qbheat" / "configs").glob("*.yaml"))
SMALL_MODEL = "mobileformer_micro" if timm.is_model("mobileformer_micro") else "resnet10t"


def _rows(out_dir):
    with open(Path(out_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not fashion_mnist.is_available(), reason="install dataset-fashion-mnist (apt-get) for this test")
def test_qbheat_loss_falls_on_fashion_mnist(tmp_path):
    cfg = PretrainConfig(method="qbheat", model=SMALL_MODEL, data="fashion-mnist", image_size=64, batch_size=32,
                         steps=40, lr=1e-3, crop_scale=(0.5, 1.0), num_workers=0, log_every=1, ckpt_every=1000,
                         progress=False, tensorboard=True, out_dir=str(tmp_path), qbheat=QBHeatConfig(feature_strides=[16]))
    path = pretrain(cfg)
    losses = [float(r["loss"]) for r in _rows(tmp_path)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert any((tmp_path / "tb").iterdir())  # TensorBoard events written next to the CSV
    # the checkpoint is the evaluation engineer's input: weights_only, backbone rebuilds strictly
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["kind"] == "pretrain" and raw["method"] == "qbheat" and raw["step"] == 40
    assert raw["config"]["image_size"] == 64 and raw["preprocessing"]["input_size"] == [3, 64, 64]
    backbone = build_backbone(load_checkpoint(path, kinds=("pretrain",)))
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, raw["backbone"][k])


def _resume_cfg(out, **kw):
    base = dict(method="qbheat", model="resnet10t", model_kwargs={"drop_path_rate": 0.2}, data="synthetic",
                synthetic_size=40, image_size=64, batch_size=8, steps=6, lr=1e-3, num_workers=0, log_every=1,
                ckpt_every=100, progress=False, tensorboard=False, out_dir=str(out),
                qbheat=QBHeatConfig(visible_corner="random", feature_strides=[16]))
    base.update(kw)
    return PretrainConfig(**base)


def test_stopped_and_resumed_run_matches_uninterrupted_run(tmp_path):
    # stochastic depth and random visible corners draw on the RNG; 40 images / 8 = 5 steps per
    # epoch, so the run also crosses an epoch boundary after the resume
    whole = load_checkpoint(pretrain(_resume_cfg(tmp_path / "whole")))
    half = load_checkpoint(pretrain(_resume_cfg(tmp_path / "split", stop_after=3)))
    assert half["step"] == 3 and half["data"]["epoch"] == 0
    # the resumed half uses data-loader workers: views must not depend on them
    resumed = load_checkpoint(pretrain(_resume_cfg(tmp_path / "split", resume="auto", num_workers=2)))
    assert resumed["step"] == whole["step"] == 6
    for key in ("backbone", "method_state"):
        assert whole[key].keys() == resumed[key].keys()
        for k, v in whole[key].items():
            assert torch.equal(v, resumed[key][k]), f"{key}.{k} differs after resume"
    for pid, st in whole["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, resumed["optimizer"]["state"][pid][k])
    assert whole["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == 6
    assert torch.equal(whole["rng"][0]["torch"], resumed["rng"][0]["torch"])
    # metrics.csv reads as one run: steps 1..6 once each, same losses as the uninterrupted run
    split_rows, whole_rows = _rows(tmp_path / "split"), _rows(tmp_path / "whole")
    assert [int(r["step"]) for r in split_rows] == list(range(1, 7))
    assert [r["loss"] for r in split_rows] == [r["loss"] for r in whole_rows]


def test_channels_last_is_a_layout_not_a_different_run(tmp_path):
    """The default NHWC weights and views give the NCHW run's losses and weights (to float rounding)."""
    nhwc = load_checkpoint(pretrain(_resume_cfg(tmp_path / "nhwc", model="mobileformer_micro", steps=3,
                                                 model_kwargs={})))
    nchw = load_checkpoint(pretrain(_resume_cfg(tmp_path / "nchw", model="mobileformer_micro", steps=3,
                                                 model_kwargs={}, channels_last=False)))
    assert PretrainConfig().channels_last
    conv = next(k for k, v in nhwc["backbone"].items() if v.dim() == 4)
    assert nhwc["backbone"][conv].is_contiguous(memory_format=torch.channels_last)
    assert nchw["backbone"][conv].is_contiguous()
    # AdamW moves every weight by up to lr = 1e-3 per step whatever its gradient's size, so rounding
    # differences can show at that scale; a wrong layout would differ at the weights' own scale
    for k, v in nchw["backbone"].items():
        torch.testing.assert_close(nhwc["backbone"][k], v, rtol=0, atol=5e-4, msg=f"backbone.{k}")
    rows = list(zip(_rows(tmp_path / "nhwc"), _rows(tmp_path / "nchw")))
    assert len(rows) == 3
    for a, b in rows:
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)


def test_warmup_cosine_schedule():
    s = WarmupCosine(total_steps=110, warmup_steps=10, floor=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load_and_validate(path):
    cfg = load_config(path).validate()
    assert cfg.method in ("qbheat", "mocov2") and cfg.data


def test_yaml_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: mocov2\nimage_size: 96\nbatch_size: 32\nmocov2:\n  queue_size: 64\n  temperature: 0.1\n")
    cfg = load_config(f, {"image_size": 128, "mocov2.queue_size": 128, "crop_scale": [0.3, 1]})
    assert (cfg.method, cfg.image_size, cfg.batch_size) == ("mocov2", 128, 32)
    assert cfg.mocov2.queue_size == 128 and cfg.mocov2.temperature == 0.1 and cfg.crop_scale == (0.3, 1.0)
    assert cfg.qbheat == QBHeatConfig()


@pytest.mark.parametrize("text,match", [
    ("imagesize: 64\n", "unknown key 'imagesize'"),
    ("batch_size: many\n", "batch_size must be an integer"),
    ("qbheat:\n  diagonal_order: x\n", "unknown key 'qbheat.diagonal_order'"),
    ("- 1\n- 2\n", "mapping"),
])
def test_bad_yaml_is_one_clear_error(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(QBHeatError, match=match):
        load_config(f)


def test_validation_says_what_to_change():
    with pytest.raises(QBHeatError, match="data is not set"):
        PretrainConfig().validate()
    with pytest.raises(QBHeatError, match="multiple of the 3 processes"):
        PretrainConfig(data="synthetic", batch_size=8).validate(world_size=3)
    with pytest.raises(QBHeatError, match="qbheat.visible_corner"):
        PretrainConfig(data="synthetic", qbheat=QBHeatConfig(visible_corner="middle")).validate()


# --- the CLI: bad input gives one sentence on stderr and exit status 2 ---------------------------

def _cli(capsys, *argv):
    code = cli.main(["pretrain", "--no-progress", "--no-tensorboard", "--num-workers", "0", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


def _tiny(out, *extra):
    return ["--model", "test_convnext", "--image-size", 32, "--batch-size", 4, "--steps", 1, "--out-dir", out, *extra]


def test_cli_trains_and_reports_checkpoint(tmp_path, capsys):
    code = cli.main(["pretrain", "--no-progress", "--num-workers", "0", "--data", "synthetic", "--set",
                     "synthetic_size=8", *map(str, _tiny(tmp_path))])
    assert code == 0
    assert f"checkpoint: {tmp_path / 'last.pt'}" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "empty", "unreadable"])
def test_cli_bad_data_folder(tmp_path, capsys, kind):
    folder = tmp_path / "imgs"
    if kind != "missing":
        folder.mkdir()
    if kind == "unreadable":
        for i in range(4):
            (folder / f"ok{i}.png").write_bytes(b"")  # empty files are not images either
        (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    workers = ["--num-workers", "1"] if kind == "unreadable" else []
    code, err = _cli(capsys, "--data", folder, *_tiny(tmp_path / "out"), *workers)
    assert code == 2 and "\n" not in err and "Traceback" not in err
    expected = {"missing": "does not exist", "empty": "holds no images", "unreadable": "cannot be read"}[kind]
    assert expected in err and str(folder) in err


def test_cli_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    code, err = _cli(capsys, "--data", "synthetic", *_tiny(tmp_path, "--resume", bad))
    assert code == 2 and "corrupt" in err and "\n" not in err


@pytest.mark.parametrize("change,match", [(["--model", "resnet10t"], "holds model 'test_convnext'"),
                                          (["--method", "mocov2"], "method 'qbheat'")])
def test_cli_refuses_checkpoint_from_other_model_or_method(tmp_path, capsys, change, match):
    code, _ = _cli(capsys, "--data", "synthetic", "--set", "synthetic_size=8", *_tiny(tmp_path))
    assert code == 0
    code, err = _cli(capsys, "--data", "synthetic", "--set", "synthetic_size=8", "--set", "mocov2.queue_size=8",
                     *_tiny(tmp_path, "--steps", 2, "--resume", "auto", *change))
    assert code == 2 and match in err and "\n" not in err
