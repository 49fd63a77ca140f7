"""When to stop early: SIGTERM / SIGINT, the run.max_minutes time limit, and agreement across ranks.

A signal only records its name; the loop finishes the current step, writes a checkpoint and returns
(a second Ctrl-C raises KeyboardInterrupt). With one process a request stops the run after the step
it arrives in. Under torchrun the ranks agree at log intervals (an all-reduce of the flag there, so
every rank stops at the same step); set run.log_every small enough for your preemption notice.
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import torch

from . import distributed as D

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopController:
    """`check(at_log)` after every step says whether to stop now; `reason` says why.

    clock: seconds (time.perf_counter); all_reduce_max: the cross-rank max of a (1,) float tensor
    (default: an all-reduce over the process group). Both are injectable for tests."""

    def __init__(self, info: D.DistInfo, max_minutes: float | None = None, clock: Callable[[], float] =
                 time.perf_counter, all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.info, self.clock = info, clock
        self.limit_s = 60.0 * max_minutes if max_minutes else None
        self.all_reduce_max = all_reduce_max or (lambda t: D.all_reduce_(t, info, "max"))
        self.reason: str | None = None
        self.start = clock()
        self._old_handlers: dict = {}

    # ------------------------------------------------------------------ signals
    def install(self) -> None:
        """Handle SIGINT / SIGTERM (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            self._old_handlers[s] = signal.getsignal(s)
            signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask the loop to stop (the first reason is kept)."""
        self.reason = self.reason or reason

    # ------------------------------------------------------------------ the per-step check
    def start_clock(self) -> None:
        self.start = self.clock()

    def check(self, at_log: bool) -> bool:
        """True when the run should stop after this step. Multi-rank: only at log steps, where every
        rank learns whether any rank was asked to stop (a collective: call it on every rank)."""
        if self.limit_s is not None and self.clock() - self.start > self.limit_s:
            self.request("time limit")
        if self.info.world_size == 1:
            return self.reason is not None
        if not at_log:
            return False
        flag = torch.tensor([1.0 if self.reason else 0.0], device=self.info.device)
        stopping = bool(self.all_reduce_max(flag).item())
        if stopping:
            self.request("SIGTERM on another rank")
        return stopping
