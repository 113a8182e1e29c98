"""Shipped device profiles load, cover the required devices, and bad files fail with one sentence."""
from __future__ import annotations

import pytest

from qbheat_contract.errors import QBHeatError
from deploy_targets.profiles import RUNTIMES, list_profiles, load_profile
from deploy_targets.transport import parse_reach


def test_shipped_profiles_cover_the_issue_devices():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) >= {"local-cpu-ort", "local-cpu-openvino", "desktop-nvidia-tensorrt", "jetson-orin-tensorrt",
                             "iphone-coreml", "mac-apple-silicon-coreml", "android-litert-xnnpack",
                             "android-executorch-xnnpack", "rpi5-ort"}
    assert {p.runtime for p in profiles.values()} == set(RUNTIMES)
    assert profiles["iphone-coreml"].options["compute_units"] == ["cpu_only", "cpu_and_gpu", "cpu_and_ne"]
    assert profiles["local-cpu-openvino"].options["inference_precision"] == "f32"
    for p in profiles.values():
        parse_reach(p.reach)  # every reach is valid for the transport layer
        assert p.hardware and p.input_size == (224, 224) and all(b >= 1 for b in p.batch)


def test_user_profile_by_path(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('name = "mine"\nhardware = "laptop"\nruntime = "onnxruntime"\nthreads = [1, 4]\nbatch = 2\n'
                    'reach = "ssh://me@box.lan:2222"\n[protocol]\nmin_runs = 5\n')
    p = load_profile(str(path))
    assert (p.name, p.threads, p.batch, p.protocol) == ("mine", (1, 4), (2,), {"min_runs": 5})
    r = parse_reach(p.reach)
    assert (r.user, r.host, r.port) == ("me", "box.lan", 2222)


@pytest.mark.parametrize("body, message", [
    ('hardware = "x"\nruntime = "onnxruntime"', "'name' is required"),
    ('name = "a"\nhardware = "x"\nruntime = "tflite"', "runtime 'tflite' is not one of"),
    ('name = "a"\nhardware = "x"\nruntime = "openvino"\nprecision = "fp64"', "precision 'fp64'"),
    ('name = "a"\nhardware = "x"\nruntime = "openvino"\nthreads = [-1]', "threads must be"),
    ('name = "a"\nhardware = "x"\nruntime = "openvino"\nreach = "ssh://-oProxyCommand=x"', "reach"),
    ('name = "a"\nhardware = "x"\nruntime = "openvino"\ncolour = 1', "unknown keys ['colour']"),
    ('name = "a"\nhardware = "x"\nruntime = "openvino"\ninput_size = [224]', "input_size"),
    ('name = "a" hardware', "not valid TOML"),
])
def test_bad_profiles_fail_with_one_sentence(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(QBHeatError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as e:
        load_profile(str(path))
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


def test_unknown_target_names_the_shipped_ones():
    with pytest.raises(QBHeatError, match="local-cpu-ort"):
        load_profile("pixel-99")
