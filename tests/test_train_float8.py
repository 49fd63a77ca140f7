"""run.float8 (aimv2/train/float8.py): torchao's float8 training of the encoder's and decoder's linears.

Real float8 GEMMs need CUDA sm_89+; on the CPU these tests run torchao's emulation
(run.float8_emulate=true: the same float8 rounding of every GEMM operand, with fp32 matmuls), on the
tiny model with run.float8_min_dim=16 so that its 128 / 512-wide linears are converted. The high-
precision run they compare against is fp32 here (the trainer's CPU precision; torchao takes the
autocast dtype from CUDA's autocast state only, so a CPU bf16-autocast run is not what a GPU runs).

Tolerances (the errors float8 is expected to make, truth = the same model in fp64):
- rounding to e4m3 has a relative error of at most u = 2^-4 (RMS u / sqrt(3) = 0.036 for a value
  spread over its binade), e5m2 (tensorwise's gradient format) at most 2^-3 (RMS 0.072). One GEMM
  of two rounded operands then has a relative error of RMS ~0.05 (e4m3 x e4m3) to ~0.08 (e5m2 x
  e4m3). A parameter's gradient passes through the quantized GEMMs of every later layer (up to 2 x
  5 + 1 on the tiny model): independent errors add in quadrature, a few x 0.08, so we allow 0.35 of
  relative (Frobenius) error for every gradient. Measured max (torch 2.13, torchao 0.17): tensorwise
  0.20, rowwise 0.17; a factor-2 scale bug or a dropped gradient gives >= 0.5 / 1.0.
- the losses are means over thousands of rounded products, whose errors average out: 1 % is the
  bound (measured <= 0.1 %).
- and float8 must have been used: every gradient's error is >= 100 x the fp32 run's (measured
  >= 0.06 vs <= 2e-6), which an unconverted model (an fp32 run) fails.
"""
from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _train_common import TINY, losses, tiny_cfg  # noqa: E402

from aimv2.errors import ConfigError  # noqa: E402
from aimv2.model import AIMv2Pretrainer  # noqa: E402
from aimv2.presets import get_preset  # noqa: E402
from aimv2.train import float8 as F8  # noqa: E402

needs_torchao = pytest.mark.skipif(F8.torchao_version() is None,
                                   reason="torchao is not installed (pip install 'aimv2[fp8]'; make setup installs it)")
pytestmark = pytest.mark.usefixtures("one_thread")
MODES = ("tensorwise", "rowwise")
EMULATED = {"run.float8_emulate": True, "run.float8_min_dim": 16}
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.fc3")


def tiny_model() -> AIMv2Pretrainer:
    return AIMv2Pretrainer(get_preset("aimv2-tiny", img_size=TINY["model.img_size"], depth=TINY["model.depth"],
                                      dec_depth=TINY["model.dec_depth"]))


def tiny_batch(cfg, B=3, seed=1) -> dict:
    from aimv2.train.random_data import RandomBatches
    return next(iter(RandomBatches(cfg, B, seed=seed)))


# ----------------------------------------------------------------------------- which linears
@needs_torchao
@pytest.mark.parametrize("mode", MODES)
def test_which_linears_are_converted(mode):
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_linear import Float8Linear
    model = tiny_model()
    params = dict(model.named_parameters())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert F8.convert(copy.deepcopy(model), mode) == []            # default threshold 1024: tiny stays fp32
    converted = F8.convert(model, mode, min_dim=16, emulate=True)
    expected = [f"{part}.trunk.blocks.0.{x}" for part in ("encoder", "decoder") for x in BLOCK_LINEARS]
    assert sorted(converted) == sorted(expected + ["decoder.proj"])
    granularity = ScalingGranularity.TENSORWISE if mode == "tensorwise" else ScalingGranularity.AXISWISE
    for name in converted:
        mod = model.get_submodule(name)
        assert type(mod) is Float8Linear and mod.config.emulate
        assert mod.config.cast_config_weight.scaling_granularity == granularity
    for name in F8.HIGH_PRECISION:                                  # heads and the patch embedding kept
        assert type(model.get_submodule(name)) is nn.Linear
    assert type(model.encoder.preprocessor.patchifier.proj) is nn.Conv2d
    # the same parameter objects under the same names: optimizers and checkpoints see no difference
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


@pytest.mark.parametrize("preset, blocks", [("aimv2-large", 24 + 12), ("aimv2-1b", 24 + 12)])
def test_threshold_converts_every_trunk_linear_of_the_real_sizes(preset, blocks):
    """The documented default (MIN_DIM = 1024) on the presets the GPU benchmark runs: every block
    linear and the decoder's projection in float8, the heads in high precision (built on meta)."""
    with torch.device("meta"):
        model = AIMv2Pretrainer(get_preset(preset))
    why = {n: F8.keeps_high_precision(m, n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert sum(w is None for w in why.values()) == 5 * blocks + 1
    assert why["decoder.proj"] is None
    assert why["decoder.pixel_head"] == why["text_head"] == "a head"
    assert F8.describe(model, [n for n, w in why.items() if w is None]) == \
        f"{5 * blocks + 1} linears in float8 ({93 if preset == 'aimv2-large' else 98}% of linear weights); " \
        "in high precision: 2 (a head)"
    assert "not multiples of 16" in F8.keeps_high_precision(nn.Linear(1000, 4096, device="meta"), "encoder.x")
    assert "below run.float8_min_dim=1024" in F8.keeps_high_precision(nn.Linear(4096, 512, device="meta"),
                                                                      "decoder.x")
    assert F8.keeps_high_precision(nn.Conv2d(3, 1024, 14, device="meta"), "encoder.p") == "not a Linear"


# ----------------------------------------------------------------------------- numerics
def _loss_and_grads(model, batch, dtype):
    model = model.to(dtype)
    out = model(batch["images"].to(dtype), batch["text"], batch["prefix_len"])
    out["loss"].backward()
    return ({k: out[k].detach().double() for k in ("loss", "pixel_loss", "text_loss")},
            {n: p.grad.double() for n, p in model.named_parameters()})


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


@needs_torchao
@pytest.mark.parametrize("mode", MODES)
def test_forward_and_every_gradient_within_float8_error(mode):
    """Losses and every parameter's gradient of the emulated float8 model against fp64 truth, within
    the module docstring's bounds, and far from the fp32 model's error (float8 really ran)."""
    model = tiny_model()
    batch = tiny_batch(model.cfg)
    ref_loss, ref_grad = _loss_and_grads(copy.deepcopy(model), batch, torch.float64)
    _, hp_grad = _loss_and_grads(copy.deepcopy(model), batch, torch.float32)
    F8.convert(model, mode, min_dim=16, emulate=True)
    loss, grad = _loss_and_grads(model, batch, torch.float32)
    for k, v in loss.items():
        assert _rel(v, ref_loss[k]) <= 0.01, (k, _rel(v, ref_loss[k]))
    assert set(grad) == set(ref_grad)
    for n, g in grad.items():
        err, hp_err = _rel(g, ref_grad[n]), _rel(hp_grad[n], ref_grad[n])
        assert err <= 0.35, (n, err)
        assert err >= 100 * hp_err, (n, err, hp_err)


class FixedBatches:
    """A loader cycling over K fixed random batches: a tiny model learns them (the captions first), so
    the loss falls fast and a float8 error that harmed training would show within 50 steps."""

    def __init__(self, cfg, B, K=2):
        self.batches = [tiny_batch(cfg, B, seed=s) for s in range(K)]
        self.i = 0
        self.tokenizer = None

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def state_dict(self):
        return {"epoch": 0, "sample": self.i}

    def stats(self):
        return {"skipped": 0}


@needs_torchao
def test_50_step_emulated_rowwise_run_tracks_the_high_precision_run(tmp_path):
    """Two trainer runs, fp32 and emulated rowwise float8, same seed and data (8 fixed batches of 2):
    the loss curves stay within 3 % of each other at every step (each step's parameters carry all
    earlier float8 errors; measured max 1.7 %), and the final loss (mean of the last 5 steps) within
    1.5 %, the GPU target's tolerance (measured 0.5 %), while training took the loss down by more
    than a third (7.5 -> 3.9: a flat, broken run cannot pass)."""
    from aimv2.train import train
    curves = {}
    for mode in ("off", "rowwise"):
        cfg = tiny_cfg(tmp_path / mode, **{**EMULATED, "run.float8": mode, "run.steps": 50, "data.batch_size": 2,
                                           "optim.lr": 3e-3, "optim.warmup_steps": 5, "optim.decay_steps": 50})
        train(cfg, loader=FixedBatches(cfg.model, 2, K=8))
        curves[mode] = [losses(tmp_path / mode)[s][0] for s in range(1, 51)]
    hp, f8 = curves["off"], curves["rowwise"]
    assert sum(hp[-5:]) < 0.65 * sum(hp[:5]), hp
    worst = max(abs(a - b) / a for a, b in zip(hp, f8))
    assert worst <= 0.03, (worst, hp, f8)
    assert abs(sum(f8[-5:]) - sum(hp[-5:])) / sum(hp[-5:]) <= 0.015, (hp[-5:], f8[-5:])


# ----------------------------------------------------------------------------- checkpoints
def _saved_model(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


@needs_torchao
def test_checkpoints_are_high_precision_interchangeable_and_resume_exactly(tmp_path):
    """A float8 run's checkpoint has the fp32 run's keys, shapes and dtypes; it resumes exactly (the
    same losses and weights as the run that never stopped); an fp32 run resumes from it and a float8
    run from an fp32 run's (weights loaded as saved); load_encoder and from_pretrained read it."""
    from aimv2.eval.hub import from_pretrained
    from aimv2.train import train
    from aimv2.train.trainer import Trainer
    from aimv2.weights import load_encoder
    f8 = {**EMULATED, "run.float8": "rowwise", "run.ckpt_every": 2}
    a = tmp_path / "a"
    train(tiny_cfg(a, **f8))                                        # 4 steps, checkpoints at 2 and 4
    train(tiny_cfg(tmp_path / "off", **{"run.steps": 2}))
    sd8, sd_off = _saved_model(a, 4), _saved_model(tmp_path / "off", 2)
    assert {k: (v.shape, v.dtype) for k, v in sd8.items()} == {k: (v.shape, v.dtype) for k, v in sd_off.items()}
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in sd8.values())

    c = tmp_path / "c"                                              # stopped after step 2, resumed
    shutil.copytree(a, c)
    shutil.rmtree(c / "checkpoints" / "step_00000004")
    train(tiny_cfg(c, **f8, **{"run.resume": True}))
    assert [losses(c)[s] for s in (3, 4)] == [losses(a)[s] for s in (3, 4)]
    assert all(torch.equal(v, sd8[k]) for k, v in _saved_model(c, 4).items())

    for src, sd, over in ((a, sd8, {"run.float8": "off"}), (tmp_path / "off", sd_off, f8)):
        steps = 5 if src == a else 3
        t = Trainer(tiny_cfg(src, **{**over, "run.resume": True, "run.steps": steps}))
        assert t.start_step == steps - 1
        assert any(type(m).__name__ == "Float8Linear" for m in t.model.modules()) == (over is f8)
        assert all(torch.equal(v, sd[k]) for k, v in t.model.state_dict().items())
        t.train()
        assert max(losses(src)) == steps

    enc_keys = {k[len("encoder."):]: v for k, v in sd8.items() if k.startswith("encoder.")}
    for enc in (load_encoder(a / "checkpoints" / "step_00000004"), from_pretrained(a / "checkpoints" / "step_00000004",
                                                                                    device="cpu")):
        assert all(torch.equal(v, enc_keys[k]) for k, v in enc.state_dict().items())
        assert torch.isfinite(enc(tiny_batch(enc.cfg, 1)["images"])).all()


@needs_torchao
def test_float8_all_gather_weights_are_saved_as_plain_tensors():
    """Under FSDP2 with tensorwise scaling the converted weights are torchao's float8 all-gather
    wrappers (made here without a process group: the wrapping is done at conversion); checkpoints
    get them unwrapped, equal to the fp32 weights. rowwise has no such wrapper (torchao offers none)."""
    model = tiny_model()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    converted = F8.convert(model, "tensorwise", min_dim=16, emulate=True, fsdp=True)
    sd = model.state_dict()
    assert sorted(k for k, v in sd.items() if type(v) is not torch.Tensor) == sorted(f"{n}.weight" for n in converted)
    plain = F8.plain_state_dict(sd)
    assert plain.keys() == ref.keys()
    assert all(type(v) is torch.Tensor and torch.equal(v, ref[k]) for k, v in plain.items())
    assert not F8.float8_config("rowwise", emulate=True, fsdp=True).enable_fsdp_float8_all_gather


# ----------------------------------------------------------------------------- refusals
def test_refused_without_cuda_sm89_in_one_line(tmp_path, monkeypatch, capsys):
    from aimv2.cli import main
    from aimv2.train import train
    msg = F8.unavailable_reason("rowwise", torch.device("cpu"))
    if F8.torchao_version() is not None:
        assert msg.startswith("run.float8=rowwise needs a CUDA GPU of compute capability >= 8.9") and "cpu" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=r"^run\.float8=rowwise needs"):
        train(tiny_cfg(tmp_path / "t", **{"run.float8": "rowwise"}))
    assert not (tmp_path / "t" / "checkpoints").exists()
    rc = main(["train", "--preset", "aimv2-tiny", "--float8", "tensorwise", "--out", str(tmp_path / "cli"),
               "--device", "cpu", "--steps", "1", "--no-progress", "--set", "data.source=random"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "run.float8=tensorwise needs" in err[0], err
    # a GPU older than Ada, and one new enough (capability faked: the check itself)
    monkeypatch.setattr(F8, "torchao_version", lambda: F8.MIN_TORCHAO)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert "but NVIDIA A100-SXM4-80GB is sm_80" in F8.unavailable_reason("tensorwise", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert F8.unavailable_reason("rowwise", torch.device("cuda", 0)) is None
    assert F8.unavailable_reason("rowwise", torch.device("cuda", 0), bf16=False) == \
        "run.float8=rowwise needs bf16 precision (run.precision=bf16, or auto on a GPU), not fp32"
    assert F8.unavailable_reason("off", torch.device("cpu")) is None


@pytest.mark.parametrize("version, found", [(None, "which is not installed"), ((0, 8, 0), "found 0.8.0")])
def test_refused_without_torchao_or_with_an_old_one(monkeypatch, version, found):
    monkeypatch.setattr(F8, "torchao_version", lambda: version)
    for emulate in (False, True):
        msg = F8.unavailable_reason("rowwise", torch.device("cpu"), emulate)
        assert msg.startswith("run.float8=rowwise needs torchao >= 0.17.0") and found in msg, msg
        assert "pip install 'aimv2[fp8]'" in msg and "\n" not in msg


def test_config_and_cli():
    from aimv2.cli import build_parser
    from aimv2.train import TrainConfig
    from aimv2.train.cli import build_config
    args = build_parser().parse_args(["train", "--preset", "aimv2-tiny", "--float8", "rowwise",
                                      "--set", "run.float8_min_dim=512"])
    cfg = build_config(args)
    assert (cfg.run.float8, cfg.run.float8_min_dim, cfg.run.float8_emulate) == ("rowwise", 512, False)
    assert TrainConfig().run.float8 == "off" and TrainConfig().run.float8_min_dim == F8.MIN_DIM
    assert TrainConfig().set(["run.float8=tensorwise"]).run.float8 == "tensorwise"
    with pytest.raises(ValueError, match=r"run\.float8 must be one of \('off', 'tensorwise', 'rowwise'\), got 'fp8'"):
        TrainConfig().set(["run.float8=fp8"])
    with pytest.raises(ValueError, match=r"run\.float8_min_dim must be >= 16"):
        TrainConfig().set(["run.float8_min_dim=8"])
    with pytest.raises(ValueError, match=r"run\.float8=rowwise with model\.fused_fc13=true: the fused fc1/fc3 GEMM"):
        TrainConfig().set(["model.fused_fc13=true", "run.float8=rowwise"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--preset", "aimv2-tiny", "--float8", "fp8"])
    with pytest.raises(ValueError, match="run.float8: expected one of"):
        F8.convert(tiny_model(), "e4m3")


# ----------------------------------------------------------------------------- the GPU benchmark, dry
@needs_torchao
def test_benchmark_dry_mode(tmp_path, monkeypatch):
    """benchmarks/bench_fp8.py --dry (the `make gpu-more` fp8 stage's script, on the CPU with the
    emulation): the three step rows at one batch, the two curve rows with their losses and the
    rowwise row's gap to the high-precision run, and the summary's speed-up table over them."""
    import json
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))           # the embedded dataset's cache
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_fp8
    import gpu_all
    assert bench_fp8.main(["--dry", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("fp8-cpu-*.json")).read_text())
    step = [r for r in rows if r["op"] == "train_step"]
    assert [r["provider"] for r in step] == ["eager_ref", "eager_ref_tensorwise", "eager_ref_rowwise"]
    assert len({(r["shape"], r["batch"]) for r in step}) == 1 and all(r["images_per_s"] > 0 for r in step)
    curve = {r["provider"]: r for r in rows if r["op"] == "train_curve"}
    assert set(curve) == {"aimv2", "aimv2_rowwise"}
    steps = bench_fp8.DRY["curve_steps"]
    for r in curve.values():
        assert [s for s, _ in r["losses"]] == list(range(1, steps + 1))
        assert r["final_loss"] == pytest.approx(sum(v for _, v in r["losses"][-3:]) / 3)
    assert abs(curve["aimv2_rowwise"]["loss_vs_bf16"]) <= 0.015 and "loss_vs_bf16" not in curve["aimv2"]
    table = gpu_all.speedup_table("fp8", rows)
    assert table[0].startswith("| recipe |") and table[0].endswith("vs aimv2 |")
    assert len(table) == 2 + len(rows) and all(ln.split("|")[-2].strip().endswith("x")
                                                for ln in table[2:] if "aimv2_rowwise" in ln)
