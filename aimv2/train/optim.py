"""AdamW with the method.md §5 parameter groups and the warm-up + cosine learning-rate schedule.

Groups: weight decay on every matrix (Linear, conv, token embedding); none on biases, norm weights
(every 1-D tensor), position embeddings (`pos_embed`, `text_pos_embed`) and the CLS token.

Weight decay ("lr_relative", method.md §5): p <- p * (1 - wd * lr_t / lr_peak), which is torch AdamW's
decoupled p <- p * (1 - lr_t * wd_torch) with wd_torch = wd / lr_peak (= 0.1 for wd 1e-4, lr 1e-3).

Schedule, step s = 0, 1, ... (the index of the optimizer step about to be taken), W warm-up steps,
T decay steps:
    s <  W:  lr = lr_init + (lr_peak - lr_init) * s / W                  (linear from 1e-6)
    s >= W:  lr = lr_min + (lr_peak - lr_min) * (1 + cos(pi * min(1, (s - W) / (T - W)))) / 2
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import OptimConfig

NO_DECAY_SUFFIXES = ("pos_embed", "cls_token")


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases and norm weights (1-D), position embeddings and CLS get no weight decay."""
    return p.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def torch_weight_decay(cfg: OptimConfig) -> float:
    return cfg.weight_decay / cfg.lr if cfg.weight_decay_mode == "lr_relative" else cfg.weight_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`. Fused by default (CPU and GPU): the fused kernel honours
    `optimizer.found_inf`, which is how the trainer skips a non-finite step without a host sync."""
    fused = True if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(param_groups(model, torch_weight_decay(cfg)), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def warmup_steps_for(cfg: OptimConfig, steps: int) -> int:
    """Explicit optim.warmup_steps, else min(12500, max(1, steps // 20)) (method.md §5: 12,500 at full scale)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else min(12500, max(1, steps // 20))


class WarmupCosine:
    """lr(s) of the module docstring; `factor(s)` = lr(s) / lr_peak for torch's LambdaLR.

    warmup_offset: the warm-up counts from step `warmup_offset` (0: lr(0) = init; 1: lr(0) is one
    warm-up step in, so lr(W - 1) = peak, the attentive probe's schedule in aimv2/eval/probe.py)."""

    def __init__(self, peak: float, init: float, final: float, warmup: int, total: int,
                 warmup_offset: int = 0):
        if warmup < 0 or total <= 0:
            raise ValueError(f"WarmupCosine: need warmup >= 0 and total > 0, got {warmup}, {total}")
        self.peak, self.init, self.final, self.warmup, self.total = peak, init, final, warmup, total
        self.warmup_offset = warmup_offset

    @classmethod
    def from_config(cls, cfg: OptimConfig, steps: int) -> "WarmupCosine":
        return cls(cfg.lr, cfg.warmup_init_lr, cfg.min_lr, warmup_steps_for(cfg, steps), cfg.decay_steps or steps)

    def lr(self, s: int) -> float:
        if s < self.warmup:
            return self.init + (self.peak - self.init) * (s + self.warmup_offset) / self.warmup
        t = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))

    def __call__(self, s: int) -> float:
        return self.lr(s) / self.peak


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps: int):
    """LambdaLR over `WarmupCosine.from_config` (the one schedule object: `.lr_lambdas[0]`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine.from_config(cfg, steps))


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float) -> None:
    """Set lr, betas, eps and weight decay of every group from `cfg`, matching groups by their
    `name` ("decay" / "no_decay", see `param_groups`), never by their order."""
    wd = {"decay": torch_weight_decay(cfg), "no_decay": 0.0}
    for g in optimizer.param_groups:
        if g.get("name") not in wd:
            raise ValueError(f"optimizer param group named {g.get('name')!r}: expected one of {sorted(wd)}")
        g.update(lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=wd[g["name"]])


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig, saved: dict,
                     step: int) -> None:
    """Resume `scheduler` from its saved `state_dict()` at optimizer step `step`. The position comes
    from the checkpoint; the schedule itself and every hyper-parameter come from `cfg` (which may
    have changed since), so the checkpoint's schedule parameters and base learning rates are
    replaced by this scheduler's own before `load_state_dict`."""
    if saved.get("last_epoch") != step:
        raise ValueError(f"scheduler state: last_epoch {saved.get('last_epoch')!r} != checkpoint step {step}")
    own = scheduler.state_dict()
    scheduler.load_state_dict(dict(saved, lr_lambdas=own["lr_lambdas"], base_lrs=[cfg.lr] * len(own["base_lrs"])))
    apply_hyperparameters(scheduler.optimizer, cfg, scheduler.lr_lambdas[0].lr(step))
