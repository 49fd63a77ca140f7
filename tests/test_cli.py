"""The `aimv2` console script."""
import json
import subprocess
import sys

from aimv2.cli import main


def test_info_json(capsys):
    assert main(["info", "--preset", "aimv2-large", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_encoder"] == 309_197_824
    assert info["num_patches"] == 256
    assert info["train_backward_flops_per_image"] == 2 * info["train_forward_flops_per_image"]
    assert info["train_flops_per_image"] == 3 * info["train_forward_flops_per_image"]


def test_info_text_and_resolution(capsys):
    assert main(["info", "--preset", "aimv2-huge", "--img-size", "448"]) == 0
    out = capsys.readouterr().out
    assert "680,851,968" not in out          # 448 px: 1024 positions, more parameters
    assert "patches per image      1024" in out and "backward" in out


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "aimv2.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("info", "data", "train", "plot", "probe", "embed", "demo"):
        assert cmd in r.stdout, cmd
    r = subprocess.run([sys.executable, "-m", "aimv2.cli", "info", "--preset", "nope"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "invalid choice" in r.stderr
