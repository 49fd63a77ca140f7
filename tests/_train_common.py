"""Shared helpers of tests/test_train_*.py: a tiny model config, a small synthetic dataset, runners.

`python tests/_train_common.py SECONDS ARGS...` runs `aimv2 train ARGS...` with a SlowSteps(SECONDS)
callback, so a test can signal a CLI run between steps (see `slow_cli`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from aimv2.train.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]

# aimv2-tiny cut down to seconds per run: 56 px (N = 16), one encoder and one decoder block.
TINY = {"model.img_size": 56, "model.depth": 1, "model.dec_depth": 1}
TINY_SET = [f"{k}={v}" for k, v in TINY.items()]


def tiny_cfg(out, **over):
    """TrainConfig: aimv2-tiny cut down, random-batch data, CPU, no progress bar / plots."""
    from aimv2.train import TrainConfig
    base = {**TINY, "run.out": str(out), "run.steps": 4, "run.log_every": 1, "run.ckpt_every": 0,
            "run.progress": False, "run.plot": False, "run.device": "cpu", "data.batch_size": 4,
            "data.source": "random", "optim.warmup_steps": 2, "optim.decay_steps": 20}
    base.update(over)
    return TrainConfig.from_preset("aimv2-tiny", **base)


def rows(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def losses(run_dir) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r["pixel_loss"], r["text_loss"]) for r in rows(run_dir)}


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(args: list[str], **popen_kw) -> subprocess.Popen:
    """Start `python -m aimv2.cli ARGS` in the repo root."""
    return subprocess.Popen([sys.executable, "-m", "aimv2.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)


class SlowSteps(Callback):
    """Sleeps `seconds` after every optimizer step."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer, step: int) -> None:
        time.sleep(self.seconds)


def slow_cli(seconds: float, args: list[str], **popen_kw) -> subprocess.Popen:
    """Start `aimv2 train`-style ARGS (args[0] == "train") with every step slowed by SlowSteps(seconds)."""
    return subprocess.Popen([sys.executable, __file__, str(seconds), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)


if __name__ == "__main__":
    from aimv2.cli import build_parser
    from aimv2.train.cli import cmd_train

    seconds, *argv = sys.argv[1:]
    sys.exit(cmd_train(build_parser().parse_args(argv), callbacks=[SlowSteps(float(seconds))]))


def perturb_weights(model, seed: int = 0):
    """Random weights away from any init (in place; returns model.eval()): 1-D non-bias tensors (norm
    scales) drawn as 1 + 0.3 N(0, 1), every other tensor moved by 0.05 N(0, 1); seeded."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise) if p.dim() == 1 and "bias" not in name else p.add_(0.05 * noise)
    return model.eval()
