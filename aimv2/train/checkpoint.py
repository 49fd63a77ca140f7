"""Atomic training checkpoints: <run>/checkpoints/step_00000100/{model.safetensors, train_state.pt, config.yaml}.

- model.safetensors: the pretrainer's full fp32 state dict (`encoder.*`, `decoder.*`) with metadata
  {"aimv2_config": json of ModelConfig.to_dict(), "step": "100"}; `aimv2.weights.load_encoder` reads
  the encoder part from this file, its directory, or the run directory.
- train_state.pt (torch.load(weights_only=True)-safe): step, optimizer (keyed by parameter name),
  scheduler, RNG states (torch, cuda, numpy, python), data position (loader.state_dict()), counters.
- config.yaml: the resolved TrainConfig.

Written into `.tmp-step_...` (every file fsynced), then renamed to `step_...` and the parent fsynced:
a kill at any moment leaves either the new checkpoint whole or no trace of it beside the old ones.
Readers ignore `.tmp-*`. Only the newest `keep` checkpoints are kept (old ones are renamed to a
`.tmp-` name before removal, so a half-deleted one is never picked up).

`CheckpointManager` is the policy the loop follows: every `run.ckpt_every` steps, when stopping
early (signal, time limit, too many non-finite steps), and at the end unless that step was just saved.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import distributed as D

CKPT_RE = re.compile(r"^step_(\d{8})$")
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "train_state.pt", "config.yaml"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Whole checkpoints, oldest first (only fully renamed `step_XXXXXXXX` dirs with a state file)."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / STATE_FILE).is_file()
           and (p / MODEL_FILE).is_file()]
    return sorted(out, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def remove_stale_temps(run_dir: str | Path) -> None:
    root = ckpt_root(run_dir)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- write / read
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _debug_pause(step: int) -> None:
    """Test hook: AIMV2_DEBUG_CKPT_PAUSE="STEP:SECONDS" sleeps half-way through writing checkpoint
    STEP (after model.safetensors, before train_state.pt and the rename), so a test can SIGKILL the
    writer at that moment. Read at call time, never at import."""
    spec = os.environ.get("AIMV2_DEBUG_CKPT_PAUSE")
    if spec:
        s, _, secs = spec.partition(":")
        if int(s) == step:
            time.sleep(float(secs))


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, model_config: dict,
                    train_state: dict, config_yaml: str, keep: int) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep`; returns its path."""
    from safetensors.torch import save_file

    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model_state.items()}
    meta = {"aimv2_config": json.dumps(model_config), "step": str(step), "format": "aimv2-pretrainer"}
    save_file(tensors, str(tmp / MODEL_FILE), metadata=meta)
    _fsync_file(tmp / MODEL_FILE)
    _debug_pause(step)
    torch.save(dict(train_state, step=step), tmp / STATE_FILE)
    _fsync_file(tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    _fsync_file(tmp / CONFIG_FILE)
    _fsync_dir(tmp)
    if final.exists():                                # re-saving a step (e.g. stopped right after resume)
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = root / f".tmp-del-{old.name}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """(model state dict, model config dict, train state) of checkpoint dir `path`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MODEL_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise ValueError(f"checkpoint {str(path)!r}: expected {MODEL_FILE} and {STATE_FILE} inside")
    with safe_open(str(path / MODEL_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    if "aimv2_config" not in meta:
        raise ValueError(f"checkpoint {str(path)!r}: {MODEL_FILE} has no 'aimv2_config' metadata")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return load_file(str(path / MODEL_FILE)), json.loads(meta["aimv2_config"]), state


# ----------------------------------------------------------------------------- policy
class CheckpointManager:
    """When to write checkpoints and who writes them.

    snapshot() -> (model state dict, train state) is called on every rank at each save (it may be a
    collective, e.g. gathering FSDP shards); rank 0 writes the checkpoint, then all ranks meet at a
    barrier. `latest` is the newest checkpoint this process knows of (None on ranks other than 0)."""

    def __init__(self, run_dir: str | Path, every: int, keep: int, info: D.DistInfo,
                 snapshot: Callable[[], tuple[dict, dict]], model_config: dict, config_yaml: str,
                 latest: Path | None = None):
        if keep < 1:
            raise ValueError(f"keep: expected >= 1 checkpoints to keep, got {keep}")
        self.run_dir, self.every, self.keep, self.info = Path(run_dir), every, keep, info
        self.snapshot, self.model_config, self.config_yaml = snapshot, model_config, config_yaml
        self.latest: Path | None = latest
        self.last_saved: int | None = None          # the step saved last by this process

    def due(self, step: int) -> bool:
        """An interval checkpoint is due after `step` (never when every <= 0)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int) -> Path | None:
        """Write checkpoint `step` now (every rank calls it); keep the newest `keep`."""
        model_sd, train_state = self.snapshot()
        path = None
        if self.info.is_main:
            path = save_checkpoint(self.run_dir, step, model_sd, self.model_config, train_state,
                                   self.config_yaml, self.keep)
        D.barrier(self.info)
        self.latest, self.last_saved = path, step
        return path

    def after_step(self, step: int, stopping: bool) -> Path | None:
        """Save when an interval checkpoint is due or the run is stopping early."""
        return self.save(step) if stopping or self.due(step) else None

    def final(self, step: int) -> Path | None:
        """At the end of the run: save unless `step` was just saved; the newest checkpoint."""
        if self.last_saved != step:
            self.save(step)
        return self.latest
