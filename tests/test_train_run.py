"""End to end: `aimv2 train` with no --data (the embedded synthetic dataset), the run directory, the
metrics rows, the plots, `aimv2 plot`, the device-peak table, and torch.compile (the one compiling test)."""
import math

import pytest
import torch
import yaml
from PIL import Image

from aimv2.cli import main as cli_main
from aimv2.model import flops_per_sample
from aimv2.train import TrainConfig
from aimv2.train.metrics import device_peak_tflops, peak_for_name
from aimv2.train.optim import WarmupCosine
from _train_common import TINY_SET, rows, tiny_cfg

FIELDS = {"step", "loss", "pixel_loss", "text_loss", "lr", "grad_norm", "images_per_s", "tokens_per_s",
          "tflops", "mfu", "peak_mem_mb", "data_wait_pct", "skipped_samples", "skipped_steps", "elapsed_s"}


def test_cli_trains_on_embedded_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["train", "--preset", "aimv2-tiny", "--out", str(out), "--steps", "30", "--batch-size", "8",
            "--log-every", "5", "--ckpt-every", "10", "--lr", "2e-3", "--no-progress", "--device", "cpu"]
    for s in TINY_SET + ["data.synthetic_num=40", "data.synthetic_size=64", "data.num_workers=0",
                         "run.keep_ckpts=2"]:
        args += ["--set", s]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert list((tmp_path / "cache" / "aimv2").glob("synth-64-40-0/*.tar"))       # generated on first use
    # run directory
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    assert cfg.run.steps == 30 and cfg.model.img_size == 56 and cfg.model.impl == "torch"
    assert cfg.model.attn_backend == "sdpa" and cfg.optim.lr == 2e-3
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["synthetic_num"] == 40
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]
    assert f"checkpoint  {out / 'checkpoints' / 'step_00000030'}" in printed
    # metrics rows
    r = rows(out)
    assert [x["step"] for x in r] == [5, 10, 15, 20, 25, 30]
    sched = WarmupCosine(2e-3, 1e-6, 1e-5, warmup=1, total=30)                    # warm-up 30 // 20 = 1
    for x in r:
        assert set(x) == FIELDS
        assert all(math.isfinite(x[k]) for k in FIELDS - {"mfu"})
        assert x["mfu"] is None                                                     # no peak for a CPU
        assert x["lr"] == pytest.approx(sched.lr(x["step"] - 1), rel=1e-12)
        assert x["tokens_per_s"] == pytest.approx(x["images_per_s"] * (16 + 77))
        assert x["tflops"] == pytest.approx(x["images_per_s"] * flops_per_sample(cfg.model) / 1e12)
        assert x["peak_mem_mb"] > 50 and 0 <= x["data_wait_pct"] <= 100
        assert x["skipped_samples"] == 0 and x["skipped_steps"] == 0 and x["grad_norm"] > 0
    # it learns: the caption loss falls fast on the synthetic captions, the pixel loss falls too
    assert r[-1]["loss"] < r[0]["loss"] - 1.0
    assert r[-1]["text_loss"] < r[0]["text_loss"] and r[-1]["pixel_loss"] < r[0]["pixel_loss"]
    # plots, written at the end and again on demand
    for name in ("losses.png", "throughput.png"):
        with Image.open(out / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
        (out / "plots" / name).unlink()
    assert cli_main(["plot", str(out)]) == 0
    assert (out / "plots" / "losses.png").is_file() and (out / "plots" / "throughput.png").is_file()
    assert cli_main(["plot", str(tmp_path / "nothing")]) == 2


def test_peak_table_and_mfu_inputs():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA H100 NVL") == 835.0
    assert peak_for_name("NVIDIA H200") == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("NVIDIA A10G") == 70.0
    assert peak_for_name("Some Future GPU") is None
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), override=123.0) == 123.0


def test_tensorboard_optional(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", **{"run.steps": 1, "run.tensorboard": True})
    from aimv2.train import train
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="run.tensorboard=true but TensorBoard is not importable"):
            train(cfg)
    else:
        train(cfg)
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_compiled_blocks_match_eager(tmp_path):
    """torch.compile(fullgraph=True) per block: same losses as eager (Inductor may reassociate fp32
    sums: rtol 1e-4) and parameter names unchanged in the checkpoint."""
    from aimv2.train.trainer import Trainer
    from aimv2.train.checkpoint import load_checkpoint

    eager = Trainer(tiny_cfg(tmp_path / "eager", **{"run.steps": 2})).train()
    tr = Trainer(tiny_cfg(tmp_path / "comp", **{"run.steps": 2, "run.compile": True}))
    for blk in [*tr.model.encoder.trunk.blocks, *tr.model.decoder.trunk.blocks]:
        assert hasattr(blk.forward, "_torchdynamo_orig_callable")          # compiled wrapper
    comp = tr.train()
    a = torch.tensor([[x["loss"], x["pixel_loss"], x["text_loss"]] for x in rows(eager.run_dir)])
    b = torch.tensor([[x["loss"], x["pixel_loss"], x["text_loss"]] for x in rows(comp.run_dir)])
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)
    assert set(load_checkpoint(comp.checkpoint)[0]) == set(load_checkpoint(eager.checkpoint)[0])


def test_max_minutes_stops_with_checkpoint(tmp_path):
    from aimv2.train import train
    res = train(tiny_cfg(tmp_path / "run", **{"run.steps": 10_000, "run.max_minutes": 1e-6}))
    assert res.stopped_by == "time limit" and res.step == 1
    assert res.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000001"
    assert rows(res.run_dir)[-1]["step"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_defaults_bf16_compiled_triton(tmp_path):
    """On a GPU the defaults are bf16 autocast, compiled blocks and the Triton kernels (when importable)."""
    from aimv2.train.trainer import Trainer, triton_unavailable_reason
    tr = Trainer(tiny_cfg(tmp_path / "run", **{"run.steps": 3, "run.device": "cuda"}))
    assert tr.bf16 and tr.device.type == "cuda"
    want = ("triton", "triton") if triton_unavailable_reason() is None else ("torch", "flex")
    assert (tr.model_cfg.impl, tr.model_cfg.attn_backend) == want
    res = tr.train()
    r = rows(res.run_dir)
    assert all(math.isfinite(x["loss"]) for x in r) and r[-1]["peak_mem_mb"] > 0
    assert (r[-1]["mfu"] is not None) == (device_peak_tflops(torch.device("cuda")) is not None)
