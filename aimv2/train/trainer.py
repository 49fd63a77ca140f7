"""The training loop: `train(cfg) -> TrainResult` (single process, or one rank under torchrun).

One optimizer step, with A = optim.grad_accum micro-batches of b = batch_size / (world * A) images
(data.native: A packs of at most data.tokens_per_batch patches per rank, aimv2.packing.PackedBatch):

    for a in 0..A-1:  loss_a = model(images_a, text_a, prefix_a)["loss"];  (loss_a / A).backward()
                      (native: model(pack_a), i.e. AIMv2Pretrainer.forward_packed, method.md §8)
                      (gradient all-reduce / reduce-scatter only after the last micro-batch)
    g = ||grads||_2 (global);  clip to optim.grad_clip;  bad = !isfinite(g) | !isfinite(loss)
    AdamW step with optimizer.found_inf = bad;  LR schedule step;  zero grads

No host sync inside the step: losses, grad norm, the skip flag and the counters stay on the device
and are read once per log interval. A non-finite step is skipped by the fused AdamW kernel itself
(`found_inf`: parameters, moments and the step count are left exactly as they were; GradScaler's
mechanism), so skipped steps never corrupt the state; the LR schedule and the data still advance.
`run.max_bad_steps` non-finite steps in a row stop the run at the next log interval with a
checkpoint (of the last good state, since skipped steps change nothing) and NonFiniteLossError; so
does a run none of whose steps was good, at its end however short it is (without a checkpoint).
With optim.fused=false the skip needs a host read of the flag every step (documented slow path).

SIGTERM / Ctrl-C set a flag; the loop finishes the current step, writes a checkpoint and returns
(`TrainResult.stopped_by`); a second Ctrl-C aborts. run.max_minutes stops the same way on time.
Under torchrun the flag is agreed across ranks at log intervals (an all-reduce there), so set
log_every small enough for your preemption notice.

The parts, each usable and tested alone: stats.py (StepStats: device accumulators -> IntervalStats,
the typed record of a log interval; IntervalTimer), checkpoint.py (CheckpointManager: interval,
stop and final checkpoints, keep K), stop.py (StopController: signals, time limit, agreement across
ranks), optim.py (the one WarmupCosine schedule; restore_schedule / apply_hyperparameters: resume
through the scheduler's state dict, param groups matched by name), callbacks.py (Callback hooks).

NOTE torch.compile (per block, fullgraph=True) is on by default for a GPU and off for a CPU:
aimv2-tiny, batch 32, on a shared 2-core CPU (load ~6, torch 2.13): eager 3.4-7.8 img/s, compiled
4.0-7.8 img/s once warm, but the cold compile of the 4 distinct block graphs (first / later block,
encoder / decoder; forward and backward) took ~130 s, so a CPU demo of a few minutes runs eager.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aimv2.errors import CheckpointError, ConfigError, RunError
from aimv2.model import AIMv2Pretrainer, flops_per_sample
from aimv2.packing import PackedBatch

from . import checkpoint as ck
from . import distributed as D
from . import float8 as F8
from .callbacks import Callback
from .config import TrainConfig, validate
from .lock import RunLock
from .metrics import MetricsWriter, device_peak_tflops, peak_memory_mb
from .optim import WarmupCosine, build_optimizer, build_scheduler, restore_schedule
from .stats import IntervalStats, IntervalTimer, Lap, StepStats
from .stop import StopController


class NonFiniteLossError(RunError):
    """Too many consecutive steps with a non-finite loss or gradient (a checkpoint was written)."""


@dataclass
class TrainResult:
    run_dir: Path
    config: Path                      # <run>/config.yaml (the resolved config)
    metrics: Path                     # <run>/metrics.jsonl
    checkpoint: Path | None           # newest checkpoint dir (model.safetensors, train_state.pt, ...)
    plots: list[Path] = field(default_factory=list)
    step: int = 0
    loss: float | None = None         # last logged interval's mean losses
    pixel_loss: float | None = None
    text_loss: float | None = None
    images_per_s: float | None = None
    skipped_steps: int = 0
    stopped_by: str | None = None     # "SIGTERM" / "SIGINT" / "time limit" when stopped early


# ----------------------------------------------------------------------------- backends
def triton_unavailable_reason(device=None) -> str | None:
    """Why the Triton kernels cannot train (bf16) on `device` (default: the CUDA device when there is
    one), or None: aimv2.kernels decides."""
    from aimv2 import kernels
    return kernels.unavailable_reason(device, torch.bfloat16)


def resolve_kernels(model_cfg, mode: str, device: torch.device, log) -> object:
    """run.kernels=auto: Triton kernels + Triton attention on a GPU when importable (else torch +
    FlexAttention, with the reason logged); torch + SDPA on a CPU. run.kernels=model: as configured."""
    if mode == "model":
        return model_cfg
    if device.type != "cuda":
        return model_cfg.replace(impl="torch", attn_backend="sdpa")
    reason = triton_unavailable_reason(device)
    if reason is None:
        return model_cfg.replace(impl="triton", attn_backend="triton")
    log(f"kernels: Triton kernels unavailable ({reason}); falling back to impl=torch, attn_backend=flex")
    return model_cfg.replace(impl="torch", attn_backend="flex")


def compile_blocks(model: AIMv2Pretrainer) -> None:
    """torch.compile every encoder and decoder block's forward (fullgraph=True). The module itself is
    untouched (parameter names stay the same; FSDP2 hooks run outside the compiled region)."""
    for blk in [*model.encoder.trunk.blocks, *model.decoder.trunk.blocks]:
        blk.forward = torch.compile(blk.forward, fullgraph=True, dynamic=False)


def build_data(cfg: TrainConfig, model_cfg, info: D.DistInfo, micro_bs: int, pos: dict | None):
    pos = pos or {"epoch": 0, "sample": 0}
    if cfg.data.source == "random" and cfg.data.native:
        from .random_data import RandomPackedBatches
        d = cfg.data
        return RandomPackedBatches(model_cfg, d.tokens_per_batch, d.min_patches, d.max_patches, seed=d.seed,
                                   rank=info.rank, device=info.device, start_sample=pos["sample"])
    if cfg.data.source == "random":
        from .random_data import RandomBatches
        return RandomBatches(model_cfg, micro_bs, seed=cfg.data.seed, rank=info.rank,
                             world_size=info.world_size, device=info.device, start_sample=pos["sample"])
    from aimv2.data import build_loader, default_dataset
    shards = cfg.data.shards
    if shards is None:                             # generated once by rank 0, then read by all
        kw = {"num": cfg.data.synthetic_num, "progress": info.is_main}
        if cfg.data.synthetic_size is not None:
            kw["size"] = cfg.data.synthetic_size
        if info.is_main:
            shards = default_dataset(**kw)
        D.barrier(info)
        if not info.is_main:
            shards = default_dataset(**kw)
    # cfg.data is a DataConfig: fill in what comes from context (model, process group, checkpoint)
    return build_loader(dataclasses.replace(
        cfg.data, shards=str(shards), batch_size=micro_bs, hflip=cfg.data.resolved_hflip(),
        image_size=model_cfg.img_size, patch_size=model_cfg.patch_size, text_len=model_cfg.text_len,
        rank=info.rank, world_size=info.world_size, device=str(info.device), train=True, drop_last=True,
        start_epoch=int(pos.get("epoch", 0)), start_sample=int(pos.get("sample", 0))))


# ----------------------------------------------------------------------------- set-up helpers
def micro_batch_size(cfg: TrainConfig, info: D.DistInfo) -> int:
    """Images per micro-batch; native mode has none (packs are sized by data.tokens_per_batch, and
    data.batch_size is not used there): 1, never checked against world size x grad_accum."""
    if cfg.data.native:
        return 1
    per_step = info.world_size * cfg.optim.grad_accum
    if cfg.data.batch_size % per_step:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by "
                         f"world_size * optim.grad_accum = {info.world_size} * {cfg.optim.grad_accum}")
    return cfg.data.batch_size // per_step


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def data_position(state: dict | None, info: D.DistInfo) -> dict | None:
    """Where this rank's data resumes: its own position when the world size is unchanged, else rank 0's."""
    if state is None:
        return None
    per_rank = state.get("data_per_rank") or []
    return per_rank[info.rank] if len(per_rank) == info.world_size else state["data"]


def match_tokenizer(model_cfg, loader, log):
    """The model's vocabulary must hold the loader's tokenizer; its pad id is the tokenizer's."""
    tok = getattr(loader, "tokenizer", None)
    if tok is None:
        return model_cfg
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tok.vocab_size} > model.vocab_size "
                         f"{model_cfg.vocab_size}: pass --set model.vocab_size={tok.vocab_size}")
    if tok.pad_id != model_cfg.pad_id:
        log(f"model.pad_id {model_cfg.pad_id} -> {tok.pad_id} (the tokenizer's pad id)")
        model_cfg = model_cfg.replace(pad_id=tok.pad_id)
    return model_cfg


def init_weights(model: AIMv2Pretrainer, source: str, log) -> None:
    """run.init (--init): load `source` into a freshly built model before it is wrapped.

    The encoder comes through aimv2.weights.load_encoder (any layout it reads: our training checkpoints
    and run dirs, ml-aim / transformers / timm weights), at this model's img_size (a learned position
    table is resized; a native sin-cos model has none and drops it). The decoder and text head come
    from the same checkpoint when it is one of ours (a run dir: its newest whole checkpoint); released
    weights have none, and those parts keep their fresh initialisation. A checkpoint of another size
    raises ValueError naming the mismatched keys."""
    from aimv2.weights import load_encoder
    # a learned table kept and resized per grid: ask for it as such, so that a sin-cos `-native`
    # checkpoint (no table to resize) is a clear error, not a sin-cos table resized as if learned
    keep = {"native": True, "native_pos": "interpolate"} if model.cfg.native and \
        model.cfg.native_pos == "interpolate" else {}
    try:
        enc = load_encoder(source, img_size=model.cfg.img_size, **keep).state_dict()
    except ValueError as e:
        raise ValueError(f"run.init: {e}") from None
    own = model.encoder.state_dict()
    if "preprocessor.pos_embed" not in own and enc.pop("preprocessor.pos_embed", None) is not None:
        log("init: the checkpoint's learned position table is dropped for the sin-cos code "
            "(model.native_pos=sincos); --set model.native_pos=interpolate keeps it, resized per grid")
    try:
        model.encoder.load_state_dict(enc, strict=True)
    except RuntimeError as e:
        raise ValueError(f"run.init: {source!r} does not fit the model's encoder: {e}") from None
    path = Path(source)
    if path.is_dir() and (path / "checkpoints").is_dir():                 # a run dir: its newest checkpoint
        path = ck.latest_checkpoint(path) or path
    if not (path.is_dir() and (path / ck.STATE_FILE).is_file()):          # not a training checkpoint
        log(f"init: encoder from {source} (no decoder there: decoder and text head start fresh)")
        return
    full, _, _ = ck.load_checkpoint(path, log=log)
    rest = {k: v for k, v in full.items() if not k.startswith("encoder.")}
    try:
        bad = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:
        raise ValueError(f"run.init: {str(path)!r} does not fit the model's decoder: {e}") from None
    missing = [k for k in bad.missing_keys if not k.startswith("encoder.")]
    if missing or bad.unexpected_keys:
        raise ValueError(f"run.init: {str(path)!r} does not fit the model: missing {missing}, "
                         f"unexpected {bad.unexpected_keys}")
    log(f"init: encoder, decoder and text head from {path}")


def check_same_model(saved: dict, model_cfg, ckpt: Path) -> None:
    """--resume needs the checkpoint's architecture (kernels, backends and loss weights may change)."""
    ignore = ("impl", "attn_backend", "fused_fc13", "pixel_loss_weight", "text_loss_weight", "name")
    diff = {k: (v, getattr(model_cfg, k)) for k, v in saved.items()
            if k not in ignore and getattr(model_cfg, k, None) != v}
    if diff:
        raise ValueError(f"--resume: the model config differs from checkpoint {str(ckpt)!r} "
                         f"(field: (checkpoint, now)): {diff}")


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Everything is built in __init__ (data, model, optimizer, schedule, resumed state, checkpoint
    and stop policies); `train()` runs the loop. `callbacks`: aimv2.train.callbacks.Callback hooks."""

    def __init__(self, cfg: TrainConfig, loader=None, callbacks: Sequence[Callback] = ()):
        self.cfg = validate(dataclasses.replace(cfg))
        self.callbacks = list(callbacks)
        self.owns_pg = not torch.distributed.is_initialized()
        self.info = D.init_distributed(cfg.run.distributed, cfg.run.device)
        self.device = self.info.device
        self.run_dir = Path(cfg.run.out)
        self.lock = None
        try:
            if self.info.is_main:                 # one run per output folder (train/lock.py)
                self.lock = RunLock.acquire(self.run_dir, log=self.log)
            self._setup(loader)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            if self.owns_pg:
                D.shutdown(self.info)
            raise

    def log(self, msg: str) -> None:
        if self.info.is_main:
            from tqdm import tqdm
            tqdm.write(f"[aimv2 train] {msg}", file=sys.stderr)

    # ------------------------------------------------------------------ set-up
    def _setup(self, loader) -> None:
        cfg, info, r = self.cfg, self.info, self.cfg.run
        self.micro_bs = micro_batch_size(cfg, info)
        self.bf16 = r.precision == "bf16" or (r.precision == "auto" and self.device.type == "cuda")
        # native packs change shape every step (and the mask's per-image lengths are Python ints that
        # Dynamo guards on), so per-block compilation would recompile each step: off unless asked for
        self.compiled = r.compile if r.compile is not None else self.device.type == "cuda" and not cfg.data.native
        reason = F8.unavailable_reason(r.float8, self.device, r.float8_emulate, self.bf16)
        if reason is not None:                               # refused before any data or model is built
            raise ConfigError(reason)
        self.damaged: list[Path] = []                        # newer checkpoints that failed verification
        ckpt, (model_sd, saved_model_cfg, state) = self._resume_checkpoint()
        self.resumed_from = ckpt
        if r.init is not None and ckpt is not None:
            self.log(f"run.init {r.init} ignored: resuming from {ckpt}")
        model_cfg = resolve_kernels(cfg.model, r.kernels, self.device, self.log)
        seed_everything(r.seed)
        self.loader = loader if loader is not None else \
            build_data(cfg, model_cfg, info, self.micro_bs, data_position(state, info))
        model_cfg = match_tokenizer(model_cfg, self.loader, self.log)
        if ckpt is not None:
            check_same_model(saved_model_cfg, model_cfg, ckpt)
        self.model_cfg = model_cfg
        self.cfg = dataclasses.replace(cfg, model=model_cfg)
        self._build_model()
        self._build_optimizer()
        self.start_step, skipped = self._load_state(model_sd, state) if ckpt is not None else (0, 0)
        self.stats = StepStats(self.device, skipped)
        self.lap_counts = [0, 0, 0.0]                        # native: images, patch tokens, FLOPs this interval
        self.checkpointer = ck.CheckpointManager(self.run_dir, r.ckpt_every, r.keep_ckpts, info, self._snapshot,
                                                 model_cfg.to_dict(), self.cfg.to_yaml(), latest=ckpt)
        self.stop = StopController(info, r.max_minutes)
        self.timer = IntervalTimer(self.start_step)          # restarted when the loop starts
        self.flops_per_image = flops_per_sample(model_cfg)
        self.peak = device_peak_tflops(self.device, r.peak_tflops)

    def _resume_checkpoint(self) -> tuple[Path | None, tuple]:
        """The checkpoint to resume from and its loaded (model state, model config, train state):
        the newest one that verifies (checkpoint.load_checkpoint). A damaged one is logged, remembered
        in self.damaged (set aside when the run starts) and skipped for the one before it; when none
        is whole, CheckpointError. Nothing to resume from: (None, (None, None, None))."""
        none = (None, (None, None, None))
        ckpts = ck.list_checkpoints(self.run_dir)
        if not self.cfg.run.resume:
            if ckpts:
                raise ConfigError(f"run directory {str(self.run_dir)!r} already holds checkpoints: pass "
                                  f"--resume (run.resume=true) to continue it, or choose another --out")
            return none
        if not ckpts:
            if self.cfg.run.resume != "auto":
                raise ConfigError(f"--resume: no checkpoint under {str(self.run_dir / 'checkpoints')!r} to continue "
                                  f"from (check --out; --resume auto starts the run when there is none)")
            self.log(f"--resume auto: no checkpoint under {self.run_dir / 'checkpoints'}; starting the run")
            return none
        for path in reversed(ckpts):
            try:
                return path, ck.load_checkpoint(path, log=self.log)
            except CheckpointError as e:
                self.damaged.append(path)
                self.log(f"--resume: {e}; trying the checkpoint before it")
        raise CheckpointError(f"--resume: none of the {len(ckpts)} checkpoint(s) under "
                              f"{str(self.run_dir / 'checkpoints')!r} is whole (newest: {self.damaged[0].name}; "
                              f"each reason is logged above); continue from a copy you trust or start a new --out")

    def _build_model(self) -> None:
        model = AIMv2Pretrainer(self.model_cfg)
        if self.cfg.run.init is not None and self.resumed_from is None:
            init_weights(model, self.cfg.run.init, self.log)
        model = model.to(self.device)
        r = self.cfg.run
        if r.float8 != "off":                  # before compile and wrapping (aimv2/train/float8.py)
            converted = F8.convert(model, r.float8, min_dim=r.float8_min_dim, emulate=r.float8_emulate,
                                   fsdp=self.info.mode == "fsdp")
            self.log(f"float8 {r.float8}{' (emulated)' if r.float8_emulate else ''}: "
                     + F8.describe(model, converted, r.float8_min_dim))
        if self.compiled:
            compile_blocks(model)
        self.model = D.wrap_model(model, self.info, self.bf16)
        self.float8_hook = F8.after_optimizer_step(self.model) if r.float8 != "off" else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) \
            if self.bf16 and self.info.mode != "fsdp" else contextlib.nullcontext

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg.optim, self.device)
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.run.steps)
        self.schedule: WarmupCosine = self.scheduler.lr_lambdas[0]

    def _load_state(self, model_sd: dict, state: dict) -> tuple[int, int]:
        """Model, optimizer, LR-schedule position and RNG from a checkpoint -> (step, skipped steps)."""
        D.load_full_state_dicts(self.model, self.optimizer, model_sd, state["optimizer"])
        restore_schedule(self.scheduler, self.cfg.optim, state["scheduler"], state["step"])
        ck.set_rng_state(state["rng"])
        self.log(f"resumed from {self.resumed_from} at step {state['step']}")
        return state["step"], int(state.get("counters", {}).get("skipped_steps", 0))

    def _snapshot(self) -> tuple[dict, dict]:
        """(model state dict, train state) of a checkpoint; a collective (FSDP gathers, data positions)."""
        model_sd, optim_sd = D.full_state_dicts(self.model, self.optimizer)
        model_sd = F8.plain_state_dict(model_sd)             # high precision whatever run.float8 is
        data_per_rank = D.all_gather_object(dict(self.loader.state_dict()), self.info)
        return model_sd, {"optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                          "rng": ck.rng_state(), "data": data_per_rank[0], "data_per_rank": data_per_rank,
                          "counters": {"skipped_steps": self.stats.skipped_steps},
                          "world_size": self.info.world_size}

    # ------------------------------------------------------------------ the step
    def train_step(self, it) -> None:
        """One optimizer step (module docstring); statistics stay on the device."""
        losses = self._forward_backward(it)
        norm = self._clip_grads()
        bad = self._optimizer_step(losses, norm)
        self.stats.update(losses, norm, bad)

    def _next_batch(self, it) -> dict:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            raise RuntimeError("the data loader ran out: a training loader must be endless "
                               "(aimv2.data loaders with train=True repeat over epochs)") from None
        self.timer.waited(time.perf_counter() - t0)
        return batch

    def _forward_backward(self, it) -> torch.Tensor:
        """grad_accum micro-batches; returns their mean (loss, pixel_loss, text_loss), (3,) fp32."""
        A = self.cfg.optim.grad_accum
        losses = torch.zeros(3, device=self.device)
        for a in range(A):
            batch = self._next_batch(it)
            packed = isinstance(batch, PackedBatch)
            if packed:                                     # images, patch tokens, FLOPs: host (grids)
                self.lap_counts[0] += batch.num_images
                self.lap_counts[1] += batch.num_tokens
                self.lap_counts[2] += sum(flops_per_sample(self.model_cfg, n) for n in batch.lengths)
            with D.grad_sync(self.model, self.info, sync=a == A - 1):
                with self.amp():
                    out = self.model(batch) if packed else \
                        self.model(batch["images"], batch["text"], batch["prefix_len"])
                (out["loss"] / A).backward()
            losses += torch.stack([out["loss"], out["pixel_loss"], out["text_loss"]]).detach().float() / A
        return losses

    def _clip_grads(self) -> torch.Tensor:
        """The global gradient norm (); gradients clipped to optim.grad_clip when it is > 0."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None],
                                             foreach=True)
        if hasattr(norm, "full_tensor"):                              # FSDP2: a DTensor
            norm = norm.full_tensor()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.optim.grad_clip, norm, foreach=True)
        return norm

    def _optimizer_step(self, losses: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """AdamW step unless the loss or gradient is non-finite on any rank; returns that flag ()."""
        bad = (~(torch.isfinite(norm) & torch.isfinite(losses).all())).float()
        D.all_reduce_(bad, self.info, "max")                       # every rank skips together
        if self.fused:
            self.optimizer.found_inf = bad
            self.optimizer.step()
        elif not bool(bad):                                        # host sync: the unfused slow path
            self.optimizer.step()
        if self.float8_hook is not None:                           # FSDP2 float8 all-gather: next scales
            self.float8_hook()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return bad

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Step, then the per-step hooks, the stop check, a metrics row at log steps, checkpoints."""
        r = self.cfg.run
        res = TrainResult(run_dir=self.run_dir, config=self.run_dir / "config.yaml",
                          metrics=self.run_dir / "metrics.jsonl", checkpoint=self.resumed_from,
                          step=self.start_step)
        self.writer = self.pbar = it = threads_before = None
        self.good_steps_run = 0                     # steps of this process's run that were not skipped
        try:
            self._open_run(res)
            self.stop.install()
            threads_before = set(threading.enumerate())
            it = iter(self.loader)
            self.timer = IntervalTimer(self.start_step)
            self.stop.start_clock()
            step = self.start_step
            while step < r.steps:
                self.train_step(it)
                step += 1
                self._after_step(step)
                at_log = step % r.log_every == 0 or step == r.steps
                stopping = self.stop.check(at_log)
                if at_log or stopping:
                    self._log_interval(step, res)
                self.checkpointer.after_step(step, stopping)
                if stopping:
                    res.stopped_by = self.stop.reason
                    self.log(f"{self.stop.reason}: checkpoint written at step {step}; exiting (continue with --resume)")
                    break
            _close_iter(it, threads_before)     # stop loader threads now (position already read)
            res.checkpoint = self.checkpointer.final(step)
            res.step, res.skipped_steps = step, self.stats.skipped_steps
            self._finish(res)
            return res
        finally:
            self._close(it, threads_before)

    def _open_run(self, res: TrainResult) -> None:
        """Rank 0: the run directory, config.yaml, the metrics writer, the progress bar, a banner."""
        if not self.info.is_main:
            return
        r = self.cfg.run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ck.remove_stale_temps(self.run_dir)
        for path in self.damaged:
            self.log(f"damaged checkpoint {path.name} moved to {ck.set_aside(path)}")
        self.cfg.to_yaml(res.config)
        self.writer = MetricsWriter(res.metrics, self.start_step if self.resumed_from else None,
                                    r.tensorboard, self.run_dir / "tensorboard")
        from tqdm import tqdm
        self.pbar = tqdm(total=r.steps, initial=self.start_step, disable=not r.progress,
                         desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.log(f"run dir {self.run_dir} | {self.model_cfg.name} impl={self.model_cfg.impl} "
                 f"attn={self.model_cfg.attn_backend} | {self.device} x{self.info.world_size} "
                 f"({self.info.mode}) | " + (
                     f"native: {self.info.world_size} x {self.cfg.optim.grad_accum} packs of <= "
                     f"{self.cfg.data.tokens_per_batch} patches | " if self.cfg.data.native else
                     f"batch {self.cfg.data.batch_size} = {self.info.world_size} x "
                     f"{self.cfg.optim.grad_accum} x {self.micro_bs} | ") +
                 f"{'bf16' if self.bf16 else 'fp32'}"
                 + (f" + float8 {self.cfg.run.float8}" if self.cfg.run.float8 != "off" else "")
                 + f" | compile={self.compiled}")

    def _after_step(self, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_end(self, step)
        if self.pbar is not None:
            self.pbar.update(1)

    def _log_interval(self, step: int, res: TrainResult) -> None:
        """Read the interval's statistics (the one host sync per interval) and write its metrics row;
        then stop on non-finite steps (_check_nonfinite)."""
        stats = self.stats.read(self.info)
        row = self._metrics_row(step, stats, self.timer.lap(step))
        if self.lock is not None:
            self.lock.beat()
        for cb in self.callbacks:
            cb.on_log(self, row)
        if self.writer is not None:
            self.writer.write(row)
            res.loss, res.pixel_loss, res.text_loss = row["loss"], row["pixel_loss"], row["text_loss"]
            res.images_per_s = row["images_per_s"]
            if self.pbar is not None and row["loss"] is not None:
                self.pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
        self._check_nonfinite(step, stats)

    def _check_nonfinite(self, step: int, stats: IntervalStats) -> None:
        """NonFiniteLossError after run.max_bad_steps skipped steps in a row, with a checkpoint of the
        last good state; or, when no step of this run was good, at the end of the run however short it
        is (a run that trained nothing never exits 0): its state is the one it started from, so no
        further checkpoint is written then."""
        self.good_steps_run += stats.good_steps
        max_bad = self.cfg.run.max_bad_steps
        too_many = stats.max_bad_run >= max_bad
        if self.good_steps_run == 0 and (too_many or step == self.cfg.run.steps):
            start = f"checkpoint {self.resumed_from}" if self.resumed_from else "the initial weights"
            raise NonFiniteLossError(
                f"every step of this run (steps {self.start_step + 1}..{step}) had a non-finite loss or "
                f"gradient and was skipped, so nothing was trained (no final checkpoint written): the model "
                f"is still {start}. Check those weights (a NaN / Inf parameter), optim.lr and the data.")
        if too_many:
            path = self.checkpointer.save(step)
            raise NonFiniteLossError(
                f"{stats.max_bad_run} consecutive steps with a non-finite loss or gradient "
                f"(run.max_bad_steps={max_bad}) before step {step}; stopped. The skipped steps "
                f"changed nothing, so checkpoint {path} holds the last good state. Lower optim.lr or "
                f"check the data.")

    def _metrics_row(self, step: int, s: IntervalStats, lap: Lap) -> dict:
        """The metrics.jsonl row of an interval (fields: aimv2/train/metrics.py)."""
        w = self.info.world_size
        ips = lap.steps * self.cfg.data.batch_size / lap.seconds
        tokens_per_image = self.model_cfg.num_patches + self.model_cfg.text_len
        tflops = ips * self.flops_per_image / 1e12
        if self.cfg.data.native:                           # packs vary: count them (summed over ranks)
            counts = torch.tensor(self.lap_counts, dtype=torch.float64, device=self.device)
            D.all_reduce_(counts, self.info, "sum")
            images, patches, flops = counts.tolist()
            ips, tflops = images / lap.seconds, flops / lap.seconds / 1e12
            tokens_per_image = (patches + images * self.model_cfg.text_len) / max(images, 1.0)
            self.lap_counts = [0, 0, 0.0]
        loader_stats = self.loader.stats() if hasattr(self.loader, "stats") else {}
        return {
            "step": step, "loss": s.loss, "pixel_loss": s.pixel_loss, "text_loss": s.text_loss,
            "lr": self.schedule.lr(step - 1),                        # the last step's learning rate
            "grad_norm": s.grad_norm,
            "images_per_s": ips,
            "tokens_per_s": ips * tokens_per_image,
            "tflops": tflops,
            "mfu": tflops / (self.peak * w) if self.peak and tflops is not None else None,
            "peak_mem_mb": peak_memory_mb(self.device),
            "data_wait_pct": 100.0 * lap.data_wait / lap.seconds,
            "skipped_samples": int(loader_stats.get("skipped", 0)),
            "skipped_steps": s.skipped_steps,
            "elapsed_s": lap.elapsed,
        }

    def _finish(self, res: TrainResult) -> None:
        """Rank 0: plots (after closing the metrics file) and the closing line."""
        if not self.info.is_main:
            return
        if self.cfg.run.plot:
            from .plot import plot_run
            self.writer.close()
            self.writer = None
            res.plots = plot_run(self.run_dir)
        self.log(f"done at step {res.step}: checkpoint {res.checkpoint} | metrics {res.metrics}"
                 + (f" | plots {', '.join(map(str, res.plots))}" if res.plots else ""))

    def _close(self, it, threads_before) -> None:
        _close_iter(it, threads_before)
        self.stop.restore()
        if self.pbar is not None:
            self.pbar.close()
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()
        if self.owns_pg:
            if self.info.world_size > 1:
                self._release_distributed_state()
            D.shutdown(self.info)

    def _release_distributed_state(self) -> None:
        """Under torchrun, before the process group goes: drop what holds it (the DDP / FSDP2 model,
        whose device mesh and pending collectives keep the group and its gloo / NCCL work alive, the
        optimizer with its sharded state, the loader) and collect it now. Left to the interpreter's
        exit, that work is freed by backend threads while Python is torn down, and the rank aborts
        ("terminate called without an active exception") after a finished run."""
        for name in ("model", "optimizer", "scheduler", "params", "loader", "float8_hook"):   # the hook holds the model
            setattr(self, name, None)
        gc.collect()


def _close_iter(it, threads_before: set | None = None) -> None:
    """Close a generator-based loader iterator and wait (<= 5 s) for the daemon threads it started,
    so none is still freeing tensors while the interpreter exits: that aborts the process
    ("terminate called without an active exception", seen with the DALI reader thread)."""
    close = getattr(it, "close", None)
    if close is not None:
        close()
    if threads_before is not None:
        for t in set(threading.enumerate()) - threads_before:
            if t.daemon and t is not threading.current_thread():
                t.join(timeout=5.0)


def train(cfg: TrainConfig, *, loader=None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train with `cfg` (see aimv2.train). `loader`: an optional iterable of batch dicts with
    state_dict() / stats() that replaces the configured data (e.g. your own data pipeline).
    `callbacks`: aimv2.train.callbacks.Callback hooks called by the loop."""
    return Trainer(cfg, loader, callbacks).train()
