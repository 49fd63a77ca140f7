"""Step statistics: device-side accumulators updated every step, read into a typed record once per
log interval (the loop's one host sync), and the interval's wall-clock accounting.

Per optimizer step the loop hands over losses (3,) = (loss, pixel_loss, text_loss), the global
gradient norm () and the skip flag bad () in {0., 1.} (1 when the step was non-finite and skipped).
Only good steps add to the sums; `bad_run` counts consecutive skipped steps, `max_bad_run` is its
largest value in the interval (the run stops when it reaches run.max_bad_steps).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import distributed as D


@dataclass(frozen=True)
class IntervalStats:
    """One log interval, on the host. Means are over the interval's good steps (and, for the losses,
    over the ranks); None when every step of the interval was skipped."""
    loss: float | None
    pixel_loss: float | None
    text_loss: float | None
    grad_norm: float | None
    good_steps: int                # steps of the interval that were not skipped
    skipped_steps: int             # skipped steps of the whole run so far (resumed runs included)
    max_bad_run: int               # the longest run of consecutive skipped steps in the interval


class StepStats:
    """Device accumulators of the steps since the last `read()`; no host sync in `update()`."""

    def __init__(self, device: torch.device, skipped_before: int = 0):
        z = lambda: torch.zeros((), device=device)                      # noqa: E731
        self.sums = torch.zeros(4, device=device)     # loss, pixel_loss, text_loss, grad_norm
        self.good, self.bad_total, self.bad_run, self.max_bad_run = z(), z(), z(), z()
        self.skipped_before = skipped_before          # from the checkpoint a run resumed from
        self.skipped_steps = skipped_before           # as of the last read()

    def update(self, losses: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
        ok = bad == 0
        self.sums += torch.where(ok, torch.cat([losses, grad_norm.detach().float().view(1)]), 0.0)
        self.good += ok.float()
        self.bad_total += bad
        self.bad_run = torch.where(ok, 0.0, self.bad_run + 1)
        self.max_bad_run = torch.maximum(self.max_bad_run, self.bad_run)

    def read(self, info: D.DistInfo) -> IntervalStats:
        """The interval's statistics (losses summed over ranks: a collective), then start a new one."""
        sums = self.sums.clone()
        D.all_reduce_(sums[:3], info, "sum")
        loss, pixel, text, norm, good, bad_total, max_bad_run = torch.cat(
            [sums, self.good.view(1), self.bad_total.view(1), self.max_bad_run.view(1)]).tolist()
        w = info.world_size
        mean = (lambda x: x / good) if good > 0 else (lambda x: None)
        self.skipped_steps = self.skipped_before + int(bad_total)
        self.sums.zero_()
        self.good.zero_()
        self.max_bad_run.copy_(self.bad_run)
        return IntervalStats(loss=mean(loss / w), pixel_loss=mean(pixel / w), text_loss=mean(text / w),
                             grad_norm=mean(norm), good_steps=int(good),
                             skipped_steps=self.skipped_steps, max_bad_run=int(max_bad_run))


@dataclass(frozen=True)
class Lap:
    """Wall-clock accounting of one log interval."""
    steps: int                     # optimizer steps in the interval
    seconds: float                 # its wall time (> 0)
    data_wait: float               # seconds of it spent waiting for the data loader
    elapsed: float                 # seconds since the timer started (the run, or the resume)


class IntervalTimer:
    """Times log intervals and the data-loader waits within them (`clock`: injectable for tests)."""

    def __init__(self, step: int, clock=time.perf_counter):
        self.clock = clock
        self.start = self.last = clock()
        self.step_last, self.data_wait = step, 0.0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def lap(self, step: int) -> Lap:
        now = self.clock()
        lap = Lap(steps=step - self.step_last, seconds=max(now - self.last, 1e-9),
                  data_wait=self.data_wait, elapsed=now - self.start)
        self.last, self.step_last, self.data_wait = now, step, 0.0
        return lap
