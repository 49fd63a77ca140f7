"""Atomic training checkpoints: <run>/checkpoints/step_00000100/{model.safetensors, train_state.pt, config.yaml}.

- model.safetensors: the pretrainer's full fp32 state dict (`encoder.*`, `decoder.*`) with metadata
  {"aimv2_config": json of ModelConfig.to_dict(), "step": "100"}; `aimv2.weights.load_encoder` reads
  the encoder part from this file, its directory, or the run directory.
- train_state.pt (torch.load(weights_only=True)-safe): step, optimizer (keyed by parameter name),
  scheduler, RNG states (torch, cuda, numpy, python), data position (loader.state_dict()), counters.
- config.yaml: the resolved TrainConfig.

- integrity.json: the integrity record, {"format": "aimv2-ckpt-integrity-1", "files": {name:
  {"bytes": size, "sha256": hex}}} of the three files above, computed from the bytes on disk.

Written into `.tmp-step_...` (every file fsynced), then renamed to `step_...` and the parent fsynced:
a kill at any moment leaves either the new checkpoint whole or no trace of it beside the old ones.
Readers ignore `.tmp-*`. Only the newest `keep` checkpoints are kept (old ones are renamed to a
`.tmp-` name before removal, so a half-deleted one is never picked up). A write that fails removes
its temporary directory; when the file system is full it raises DiskFullError naming the checkpoint,
the bytes it needs and the bytes free.

`load_checkpoint` verifies the record first (sizes, then SHA-256: truncation, garbled or zeroed
bytes anywhere), then that both files parse and that every weight is finite; any failure is a
CheckpointError naming the file. Checkpoints written before the record existed load with a warning:
refusing them would strand every earlier run, and the parse and finiteness checks still catch
truncated files and NaN weights; only in-place damage that keeps the values finite goes unseen there,
as it always did. NOTE hashing reads each file back once (SHA-256 at ~1 GB/s per core is seconds for
a ~1 GB checkpoint, small beside writing it), and each rank verifies the checkpoint it resumes from.

`CheckpointManager` is the policy the loop follows: every `run.ckpt_every` steps, when stopping
early (signal, time limit, too many non-finite steps), and at the end unless that step was just saved.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aimv2.errors import NO_SPACE, CheckpointError, DiskFullError

from . import distributed as D

CKPT_RE = re.compile(r"^step_(\d{8})$")
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "train_state.pt", "config.yaml"
INTEGRITY_FILE, INTEGRITY_FORMAT = "integrity.json", "aimv2-ckpt-integrity-1"


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_integrity(ckpt_dir: Path) -> None:
    """Record the size and SHA-256 of the checkpoint's files (from the bytes on disk) in integrity.json."""
    files = {name: {"bytes": (ckpt_dir / name).stat().st_size, "sha256": _sha256(ckpt_dir / name)}
             for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE)}
    (ckpt_dir / INTEGRITY_FILE).write_text(json.dumps({"format": INTEGRITY_FORMAT, "files": files}, indent=1))
    _fsync_file(ckpt_dir / INTEGRITY_FILE)


def verify_integrity(ckpt_dir: str | Path) -> bool:
    """Check the files of checkpoint `ckpt_dir` against its integrity record: True when they match,
    False when the checkpoint has no record (written before records existed); CheckpointError naming
    the file otherwise."""
    ckpt_dir = Path(ckpt_dir)
    rec_path = ckpt_dir / INTEGRITY_FILE
    if not rec_path.exists():
        return False
    try:
        rec = json.loads(rec_path.read_text())
        files = rec["files"]
        ok = rec["format"] == INTEGRITY_FORMAT and set(files) == {MODEL_FILE, STATE_FILE, CONFIG_FILE} \
            and all(isinstance(v["bytes"], int) and isinstance(v["sha256"], str) for v in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {INTEGRITY_FILE} is damaged "
                              f"(expected {INTEGRITY_FORMAT} with the sizes and SHA-256 of its files)") from None
    for name, want in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {name} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {name} is damaged "
                                  f"({size} bytes, the integrity record says {want['bytes']})")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {name} is damaged "
                                  f"(SHA-256 differs from the integrity record)")
    return True


def _nbytes(obj) -> int:
    """Bytes of the tensors in a nested dict / list (the bulk of a checkpoint's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _out_of_space(exc: BaseException, where: Path, needed: int) -> bool:
    """Did a failed write run out of space? safetensors and torch.save report it as their own errors
    (SafetensorError "No space left on device (os error 28)", torch's "unexpected pos" RuntimeError),
    so besides ENOSPC / EDQUOT we ask the file system: less free than the checkpoint needs."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    try:
        return shutil.disk_usage(where).free < needed
    except OSError:
        return False


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, model_config: dict,
                    train_state: dict, config_yaml: str, keep: int) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep`; returns its path.
    A full disk raises DiskFullError (the temporary directory removed, older checkpoints untouched)."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model_state.items()}
    try:
        _write_files(tmp, step, tensors, model_config, train_state, config_yaml)
    except Exception as e:
        needed = _nbytes(tensors) + _nbytes(train_state) + len(config_yaml)
        full = _out_of_space(e, root, needed)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        free = shutil.disk_usage(root).free
        prev = latest_checkpoint(run_dir)
        raise DiskFullError(
            f"disk full writing checkpoint {str(final)!r}: it needs about {needed:,} bytes "
            f"({needed / 2**20:,.1f} MiB), {free:,} bytes are free there ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); " + (f"the previous checkpoint {str(prev)!r} is intact"
                                                 if prev else "no earlier checkpoint exists")) from e
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


def _write_files(tmp: Path, step: int, tensors: dict, model_config: dict, train_state: dict,
                 config_yaml: str) -> None:
    """The checkpoint's files and integrity record in directory `tmp`, each fsynced."""
    from safetensors.torch import save_file

    meta = {"aimv2_config": json.dumps(model_config), "step": str(step), "format": "aimv2-pretrainer"}
    save_file(tensors, str(tmp / MODEL_FILE), metadata=meta)
    _fsync_file(tmp / MODEL_FILE)
    _debug_pause(step)
    torch.save(dict(train_state, step=step), tmp / STATE_FILE)
    _fsync_file(tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    _fsync_file(tmp / CONFIG_FILE)
    write_integrity(tmp)
    _fsync_dir(tmp)


def load_checkpoint(path: str | Path, log: Callable[[str], None] | None = None) -> tuple[dict, dict, dict]:
    """(model state dict, model config dict, train state) of checkpoint dir `path`, verified (module
    docstring): CheckpointError naming the damaged file. `log` gets the warning for a checkpoint
    without an integrity record (default: warnings.warn)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} is missing")
    if not verify_integrity(path):
        (log or (lambda m: warnings.warn(m, stacklevel=3)))(
            f"checkpoint {str(path)!r} has no {INTEGRITY_FILE} (written by an earlier version): "
            f"its files are parsed and checked for non-finite weights, but in-place damage cannot be detected")
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            meta = f.metadata() or {}
        model_sd = load_file(str(path / MODEL_FILE))
        if "aimv2_config" not in meta:
            raise KeyError("no 'aimv2_config' metadata")
        model_cfg = json.loads(meta["aimv2_config"])
    except Exception as e:                                # SafetensorError, KeyError, JSONDecodeError, ...
        raise CheckpointError(f"checkpoint {str(path)!r}: {MODEL_FILE} is damaged ({_why(e)})") from e
    for k, v in model_sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"checkpoint {str(path)!r}: {MODEL_FILE} is damaged "
                                  f"(tensor {k!r} holds non-finite values)")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "step" not in state:
            raise KeyError("no 'step' in it")
    except Exception as e:                                # EOFError, UnpicklingError, RuntimeError, ...
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE_FILE} is damaged ({_why(e)})") from e
    return model_sd, model_cfg, state


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def set_aside(ckpt_dir: Path) -> Path:
    """Move a damaged checkpoint out of checkpoints/ to <run>/damaged-checkpoints/<name>[.N], kept for
    inspection: no reader picks it up, and it no longer takes one of the `keep` places."""
    dest_root = ckpt_dir.parent.parent / "damaged-checkpoints"
    dest_root.mkdir(exist_ok=True)
    dest, n = dest_root / ckpt_dir.name, 1
    while dest.exists():
        dest, n = dest_root / f"{ckpt_dir.name}.{n}", n + 1
    os.rename(ckpt_dir, dest)
    return dest


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
