"""The training loop: `train(cfg) -> TrainResult` (single process, or one rank under torchrun).

One optimizer step, with A = optim.grad_accum micro-batches of b = batch_size / (world * A) images:

    for a in 0..A-1:  loss_a = model(images_a, text_a, prefix_a)["loss"];  (loss_a / A).backward()
                      (gradient all-reduce / reduce-scatter only after the last micro-batch)
    g = ||grads||_2 (global);  clip to optim.grad_clip;  bad = !isfinite(g) | !isfinite(loss)
    AdamW step with optimizer.found_inf = bad;  LR schedule step;  zero grads

No host sync inside the step: losses, grad norm, the skip flag and the counters stay on the device
and are read once per log interval. A non-finite step is skipped by the fused AdamW kernel itself
(`found_inf`: parameters, moments and the step count are left exactly as they were; GradScaler's
mechanism), so skipped steps never corrupt the state; the LR schedule and the data still advance.
`run.max_bad_steps` non-finite steps in a row stop the run at the next log interval with a
checkpoint (of the last good state, since skipped steps change nothing) and NonFiniteLossError.
With optim.fused=false the skip needs a host read of the flag every step (documented slow path).

SIGTERM / Ctrl-C set a flag; the loop finishes the current step, writes a checkpoint and returns
(`TrainResult.stopped_by`); a second Ctrl-C aborts. run.max_minutes stops the same way on time.
Under torchrun the flag is agreed across ranks at log intervals (an all-reduce there), so set
log_every small enough for your preemption notice.

NOTE torch.compile (per block, fullgraph=True) is on by default for a GPU and off for a CPU:
aimv2-tiny, batch 32, on a shared 2-core CPU (load ~6, torch 2.13): eager 3.4-7.8 img/s, compiled
4.0-7.8 img/s once warm, but the cold compile of the 4 distinct block graphs (first / later block,
encoder / decoder; forward and backward) took ~130 s, so a CPU demo of a few minutes runs eager.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aimv2.model import AIMv2Pretrainer, flops_per_sample

from . import checkpoint as ck
from . import distributed as D
from .config import TrainConfig, validate
from .metrics import MetricsWriter, device_peak_tflops, peak_memory_mb
from .optim import WarmupCosine, build_optimizer, build_scheduler, torch_weight_decay, warmup_steps_for


class NonFiniteLossError(RuntimeError):
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
    if cfg.data.source == "random":
        from .random_data import RandomBatches
        return RandomBatches(model_cfg, micro_bs, seed=cfg.data.seed, rank=info.rank,
                             world_size=info.world_size, device=info.device, start_sample=pos["sample"])
    from aimv2.data import DataConfig, build_loader, default_dataset
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
    d = cfg.data
    return build_loader(DataConfig(
        shards=str(shards), image_size=model_cfg.img_size, patch_size=model_cfg.patch_size,
        batch_size=micro_bs, backend=d.backend, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
        seed=d.seed, rank=info.rank, world_size=info.world_size, device=str(info.device),
        tokenizer=d.tokenizer, text_len=model_cfg.text_len, train=True, drop_last=True,
        start_epoch=int(pos.get("epoch", 0)), start_sample=int(pos.get("sample", 0))))


class _StopFlag:
    """SIGTERM / SIGINT -> remember the signal; the loop checkpoints and returns. Second Ctrl-C aborts."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.getsignal(s)
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, loader=None):
        self.cfg = validate(dataclasses.replace(cfg))
        self.owns_pg = not torch.distributed.is_initialized()
        self.info = D.init_distributed(cfg.run.distributed, cfg.run.device)
        self.device = self.info.device
        self.run_dir = Path(cfg.run.out)
        try:
            self._setup(loader)
        except BaseException:
            if self.owns_pg:
                D.shutdown(self.info)
            raise

    def log(self, msg: str) -> None:
        if self.info.is_main:
            from tqdm import tqdm
            tqdm.write(f"[aimv2 train] {msg}", file=sys.stderr)

    # ------------------------------------------------------------------ set-up
    def _setup(self, loader):
        cfg, info = self.cfg, self.info
        r, o = cfg.run, cfg.optim
        per_step = info.world_size * o.grad_accum
        if cfg.data.batch_size % per_step:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by "
                             f"world_size * optim.grad_accum = {info.world_size} * {o.grad_accum}")
        self.micro_bs = cfg.data.batch_size // per_step
        self.bf16 = r.precision == "bf16" or (r.precision == "auto" and self.device.type == "cuda")
        use_compile = r.compile if r.compile is not None else self.device.type == "cuda"

        ckpt = None
        if r.resume:
            ckpt = ck.latest_checkpoint(self.run_dir)
            if ckpt is None:
                self.log(f"--resume: no whole checkpoint under {self.run_dir / 'checkpoints'}; starting fresh")
        elif ck.list_checkpoints(self.run_dir):
            raise ValueError(f"run directory {str(self.run_dir)!r} already holds checkpoints: pass --resume "
                             f"(run.resume=true) to continue it, or choose another --out")
        model_cfg = resolve_kernels(cfg.model, r.kernels, self.device, self.log)
        state = model_sd = None
        if ckpt is not None:
            model_sd, saved_model_cfg, state = ck.load_checkpoint(ckpt)
        torch.manual_seed(r.seed)
        np.random.seed(r.seed)
        random.seed(r.seed)
        pos = None
        if state is not None:                 # this rank's own position when the world size is unchanged
            per_rank = state.get("data_per_rank") or []
            pos = per_rank[info.rank] if len(per_rank) == info.world_size else state["data"]
        self.loader = loader if loader is not None else build_data(cfg, model_cfg, info, self.micro_bs, pos)
        tok = getattr(self.loader, "tokenizer", None)
        if tok is not None:
            if tok.vocab_size > model_cfg.vocab_size:
                raise ValueError(f"tokenizer vocab_size {tok.vocab_size} > model.vocab_size "
                                 f"{model_cfg.vocab_size}: pass --set model.vocab_size={tok.vocab_size}")
            if tok.pad_id != model_cfg.pad_id:
                self.log(f"model.pad_id {model_cfg.pad_id} -> {tok.pad_id} (the tokenizer's pad id)")
                model_cfg = model_cfg.replace(pad_id=tok.pad_id)
        if ckpt is not None:
            ignore = ("impl", "attn_backend", "pixel_loss_weight", "text_loss_weight", "name")
            diff = {k: (v, getattr(model_cfg, k)) for k, v in saved_model_cfg.items()
                    if k not in ignore and getattr(model_cfg, k, None) != v}
            if diff:
                raise ValueError(f"--resume: the model config differs from checkpoint {str(ckpt)!r} "
                                 f"(field: (checkpoint, now)): {diff}")
        self.model_cfg = model_cfg
        self.cfg = dataclasses.replace(cfg, model=model_cfg)

        model = AIMv2Pretrainer(model_cfg).to(self.device)
        if use_compile:
            compile_blocks(model)
        self.model = D.wrap_model(model, info, self.bf16)
        self.optimizer = build_optimizer(self.model, o, self.device)
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.schedule = WarmupCosine(o.lr, o.warmup_init_lr, o.min_lr, warmup_steps_for(o, r.steps),
                                     o.decay_steps or r.steps)
        self.scheduler = build_scheduler(self.optimizer, o, r.steps)
        self.start_step, self.skipped_prev = 0, 0
        if ckpt is not None:
            D.load_full_state_dicts(self.model, self.optimizer, model_sd, state["optimizer"])
            self._restore_schedule(state["step"])
            ck.set_rng_state(state["rng"])
            self.start_step = state["step"]
            self.skipped_prev = int(state.get("counters", {}).get("skipped_steps", 0))
            self.log(f"resumed from {ckpt} at step {self.start_step}")
        self.resumed_from = ckpt
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) \
            if self.bf16 and info.mode != "fsdp" else contextlib.nullcontext
        self.flops_per_image = flops_per_sample(model_cfg)
        self.peak = device_peak_tflops(self.device, r.peak_tflops)

    def _restore_schedule(self, step: int) -> None:
        """The LR schedule and hyper-parameters come from the (possibly changed) config; the
        checkpoint only supplies the position in it."""
        o = self.cfg.optim
        self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        self.scheduler.last_epoch = step
        self.scheduler._step_count = step + 1
        wd = torch_weight_decay(o)
        for g, decays in zip(self.optimizer.param_groups, (True, False)):    # optim.param_groups order
            g.update(lr=self.schedule.lr(step), betas=tuple(o.betas), eps=o.eps,
                     weight_decay=wd if decays else 0.0)

    # ------------------------------------------------------------------ the step
    def _step(self, it, acc: dict) -> None:
        o, info = self.cfg.optim, self.info
        A = o.grad_accum
        losses = torch.zeros(3, device=self.device)
        for a in range(A):
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError("the data loader ran out: a training loader must be endless "
                                   "(aimv2.data loaders with train=True repeat over epochs)") from None
            self.data_wait += time.perf_counter() - t0
            with D.grad_sync(self.model, info, sync=a == A - 1):
                with self.amp():
                    out = self.model(batch["images"], batch["text"], batch["prefix_len"])
                (out["loss"] / A).backward()
            losses += torch.stack([out["loss"], out["pixel_loss"], out["text_loss"]]).detach().float() / A
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None],
                                             foreach=True)
        if hasattr(norm, "full_tensor"):                              # FSDP2: a DTensor
            norm = norm.full_tensor()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, o.grad_clip, norm, foreach=True)
        bad = (~(torch.isfinite(norm) & torch.isfinite(losses).all())).float()
        D.all_reduce_(bad, info, "max")                            # every rank skips together
        if self.fused:
            self.optimizer.found_inf = bad
            self.optimizer.step()
        elif not bool(bad):                                        # host sync: the unfused slow path
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ok = bad == 0
        acc["sums"] += torch.where(ok, torch.cat([losses, norm.detach().float().view(1)]), 0.0)
        acc["n_ok"] += ok.float()
        acc["bad_total"] += bad
        acc["bad_run"] = torch.where(ok, 0.0, acc["bad_run"] + 1)
        acc["max_bad_run"] = torch.maximum(acc["max_bad_run"], acc["bad_run"])

    # ------------------------------------------------------------------ logging
    def _log_row(self, step: int, acc: dict) -> dict:
        """Read the interval's device accumulators (the one host sync per interval) -> metrics row."""
        info = self.info
        sums = acc["sums"].clone()
        D.all_reduce_(sums[:3], info, "sum")
        vals = torch.cat([sums, acc["n_ok"].view(1), acc["bad_total"].view(1),
                          acc["max_bad_run"].view(1)]).tolist()
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        n_steps = step - self.step_last
        n_ok = vals[4]
        w = info.world_size
        images = n_steps * self.cfg.data.batch_size
        ips = images / dt
        tflops = ips * self.flops_per_image / 1e12
        stats = self.loader.stats() if hasattr(self.loader, "stats") else {}
        mean = (lambda x: x / n_ok) if n_ok > 0 else (lambda x: None)
        row = {
            "step": step,
            "loss": mean(vals[0] / w), "pixel_loss": mean(vals[1] / w), "text_loss": mean(vals[2] / w),
            "lr": self.schedule.lr(step - 1),                        # the last step's learning rate
            "grad_norm": mean(vals[3]),
            "images_per_s": ips,
            "tokens_per_s": ips * (self.model_cfg.num_patches + self.model_cfg.text_len),
            "tflops": tflops,
            "mfu": tflops / (self.peak * w) if self.peak else None,
            "peak_mem_mb": peak_memory_mb(self.device),
            "data_wait_pct": 100.0 * self.data_wait / dt,
            "skipped_samples": int(stats.get("skipped", 0)),
            "skipped_steps": self.skipped_prev + int(vals[5]),
            "elapsed_s": now - self.t_start,
        }
        self.max_bad_run = int(vals[6])
        acc["sums"].zero_()
        acc["n_ok"].zero_()
        acc["max_bad_run"].copy_(acc["bad_run"])
        self.t_last, self.step_last, self.data_wait = now, step, 0.0
        return row

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, skipped_steps: int) -> Path | None:
        model_sd, optim_sd = D.full_state_dicts(self.model, self.optimizer)      # collective (FSDP)
        data_per_rank = D.all_gather_object(dict(self.loader.state_dict()), self.info)
        path = None
        if self.info.is_main:
            train_state = {"optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                           "rng": ck.rng_state(), "data": data_per_rank[0], "data_per_rank": data_per_rank,
                           "counters": {"skipped_steps": skipped_steps},
                           "world_size": self.info.world_size}
            path = ck.save_checkpoint(self.run_dir, step, model_sd, self.model_cfg.to_dict(), train_state,
                                      self.cfg.to_yaml(), self.cfg.run.keep_ckpts)
        D.barrier(self.info)
        return path

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        cfg, info, r = self.cfg, self.info, self.cfg.run
        res = TrainResult(run_dir=self.run_dir, config=self.run_dir / "config.yaml",
                          metrics=self.run_dir / "metrics.jsonl", checkpoint=self.resumed_from,
                          step=self.start_step)
        writer = pbar = it = threads_before = None
        stop = _StopFlag()
        step_sleep = float(os.environ.get("AIMV2_DEBUG_STEP_SLEEP", "0") or 0)   # test hook (slow steps)
        try:
            if info.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                ck.remove_stale_temps(self.run_dir)
                cfg.to_yaml(res.config)
                writer = MetricsWriter(res.metrics, self.start_step if self.resumed_from else None,
                                       r.tensorboard, self.run_dir / "tensorboard")
                from tqdm import tqdm
                pbar = tqdm(total=r.steps, initial=self.start_step, disable=not r.progress,
                            desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
                self.log(f"run dir {self.run_dir} | {self.model_cfg.name} impl={self.model_cfg.impl} "
                         f"attn={self.model_cfg.attn_backend} | {self.device} x{info.world_size} "
                         f"({info.mode}) | batch {cfg.data.batch_size} = {info.world_size} x "
                         f"{cfg.optim.grad_accum} x {self.micro_bs} | "
                         f"{'bf16' if self.bf16 else 'fp32'} | compile="
                         f"{r.compile if r.compile is not None else self.device.type == 'cuda'}")
            stop.install()
            z = lambda: torch.zeros((), device=self.device)                 # noqa: E731
            acc = {"sums": torch.zeros(4, device=self.device), "n_ok": z(), "bad_total": z(),
                   "bad_run": z(), "max_bad_run": z()}
            threads_before = set(threading.enumerate())
            it = iter(self.loader)
            self.t_start = self.t_last = time.perf_counter()
            self.step_last, self.data_wait, self.max_bad_run = self.start_step, 0.0, 0
            step, last_saved, skipped = self.start_step, None, self.skipped_prev
            while step < r.steps:
                self._step(it, acc)
                step += 1
                if step_sleep:
                    time.sleep(step_sleep)
                if pbar is not None:
                    pbar.update(1)
                if r.max_minutes and time.perf_counter() - self.t_start > 60 * r.max_minutes:
                    stop.signal = stop.signal or "time limit"
                at_log = step % r.log_every == 0 or step == r.steps
                stopping = stop.signal is not None and info.world_size == 1
                if info.world_size > 1 and at_log:                       # agree on a stop request
                    flag = torch.tensor([1.0 if stop.signal else 0.0], device=self.device)
                    stopping = bool(D.all_reduce_(flag, info, "max").item())
                    stop.signal = stop.signal or ("SIGTERM on another rank" if stopping else None)
                if at_log or stopping:
                    row = self._log_row(step, acc)
                    skipped = row["skipped_steps"]
                    if writer is not None:
                        writer.write(row)
                        res.loss, res.pixel_loss, res.text_loss = row["loss"], row["pixel_loss"], row["text_loss"]
                        res.images_per_s = row["images_per_s"]
                        if pbar is not None and row["loss"] is not None:
                            pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
                    if self.max_bad_run >= r.max_bad_steps:
                        res.checkpoint = self.save(step, skipped)
                        raise NonFiniteLossError(
                            f"{self.max_bad_run} consecutive steps with a non-finite loss or gradient "
                            f"(run.max_bad_steps={r.max_bad_steps}) before step {step}; stopped. The "
                            f"skipped steps changed nothing, so checkpoint {res.checkpoint} holds the "
                            f"last good state. Lower optim.lr or check the data.")
                if stopping or (r.ckpt_every > 0 and step % r.ckpt_every == 0):
                    res.checkpoint, last_saved = self.save(step, skipped), step
                if stopping:
                    res.stopped_by = stop.signal
                    self.log(f"{stop.signal}: checkpoint written at step {step}; exiting (continue with --resume)")
                    break
            _close_iter(it, threads_before)     # stop loader threads now (position already read)
            if last_saved != step:
                res.checkpoint = self.save(step, skipped)
            res.step, res.skipped_steps = step, skipped
            if info.is_main and r.plot:
                from .plot import plot_run
                writer.close()
                writer = None
                res.plots = plot_run(self.run_dir)
            if info.is_main:
                self.log(f"done at step {step}: checkpoint {res.checkpoint} | metrics {res.metrics}"
                         + (f" | plots {', '.join(map(str, res.plots))}" if res.plots else ""))
            return res
        finally:
            _close_iter(it, threads_before)
            stop.restore()
            if pbar is not None:
                pbar.close()
            if writer is not None:
                writer.close()
            if self.owns_pg:
                D.shutdown(info)


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


def train(cfg: TrainConfig, *, loader=None) -> TrainResult:
    """Train with `cfg` (see aimv2.train). `loader`: an optional iterable of batch dicts with
    state_dict() / stats() that replaces the configured data (e.g. your own data pipeline)."""
    return Trainer(cfg, loader).run()
