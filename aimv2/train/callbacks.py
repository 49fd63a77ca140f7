"""Hooks into the training loop: `train(cfg, callbacks=[...])` / `Trainer(cfg, callbacks=[...])`.

Subclass `Callback` and override what you need; the loop calls every callback in order, on every
rank. Hooks run outside the step, so a hook may read tensors (a host sync) without slowing the
step itself, but it does slow the loop by its own time.
"""
from __future__ import annotations


class Callback:
    def on_step_end(self, trainer, step: int) -> None:
        """After optimizer step `step` (1-based), before the stop check, logging and checkpoints."""

    def on_log(self, trainer, row: dict) -> None:
        """With each metrics row (the fields of aimv2/train/metrics.py), before it is written."""
