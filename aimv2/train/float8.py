"""FP8 training of the encoder's and decoder's linears through torchao's float8 training (run.float8).

    run.float8 = off | tensorwise | rowwise          (aimv2 train --float8 MODE; --set run.float8=...)

`convert(model, mode)` swaps the chosen `nn.Linear`s of an AIMv2Pretrainer for torchao's `Float8Linear`
(`torchao.float8.convert_to_float8_training` with `Float8LinearConfig.from_recipe_name(mode)`):

    y = x @ W^T  ->  y = (s_x q(x / s_x)) @ (s_w q(W / s_w))^T      q: round to float8 e4m3
    dL/dx, dL/dW the same way from dL/dy (tensorwise: e5m2, rowwise: e4m3)

with dynamic scales s = amax / fp8_max computed every step: one per tensor ("tensorwise", cuBLAS's
float8 GEMM) or one per row of each GEMM operand ("rowwise", CUTLASS; scales rounded down to powers
of two). The parameters stay what they were (fp32 master weights, same names, same shapes): only
the GEMMs run in float8, so a checkpoint is the same whatever run.float8 was (`plain_state_dict`
also unwraps the float8 all-gather weight wrapper) and every reader of checkpoints is unaffected.

Which linears (`keeps_high_precision` says why for each, `convert` returns the converted names):
every `nn.Linear` of the encoder and the decoder (the blocks' qkv, proj, fc1, fc2, fc3; the decoder's
input projection) whose two dimensions are multiples of 16 (float8 GEMMs need it) and at least
`min_dim` (run.float8_min_dim, default MIN_DIM = 1024). Always kept in high precision: the patch
embedding (a Conv2d), the pixel head (its output, p*p*C = 588, is no multiple of 16) and the text
head (the fused caption loss reads its weight; the vocabulary GEMM sets the loss's precision).
NOTE the 1024 threshold is not measured here: it is a reading of torchao's published H100
per-shape speed-ups (float8 pays a cast of each operand, O(M K + K N + M N) memory traffic, for a
GEMM of O(M K N); at K or N well below ~1k the casts cost more than the faster GEMM saves). It keeps
every trunk linear of aimv2-large (dims 1024, 2816, 3072) and larger, and no layer of aimv2-tiny;
benchmarks/bench_fp8.py measures the result.

Composition: conversion comes before `torch.compile` of the blocks and before DDP / FSDP2 wrapping
(trainer.py). Under FSDP2 with tensorwise scaling the weights are all-gathered in float8
(`enable_fsdp_float8_all_gather`), and their scales are computed for all of them in one all-reduce
after each optimizer step (`after_optimizer_step`); rowwise all-gathers in bf16 (torchao offers the
float8 all-gather for tensorwise only).

Where it cannot run, `unavailable_reason` says why in one line and the trainer refuses the run:
torchao missing or older than MIN_TORCHAO, or no CUDA device of compute capability >= 8.9 (Ada,
Hopper, Blackwell). `emulate=True` (run.float8_emulate) runs torchao's emulation instead (the
float8 rounding done with ordinary fp32 matmuls, on any device): the numerics of float8 without its
speed, for the CPU tests and for debugging; no real run should set it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import re
from collections.abc import Callable

import torch
import torch.nn as nn

from .config import FLOAT8 as MODES       # off | tensorwise | rowwise
from .config import FLOAT8_MIN_DIM as MIN_DIM      # 1024: see the module docstring's NOTE

MIN_TORCHAO = (0, 17, 0)           # the version tested (benchmarks/gpu_wheels.txt, setup.py's [fp8] extra)
MIN_CAPABILITY = (8, 9)            # float8 tensor cores: Ada (sm_89), Hopper (sm_90), Blackwell
HIGH_PRECISION = ("decoder.pixel_head", "text_head")      # never converted (module docstring)
INSTALL_HINT = "pip install 'aimv2[fp8]'"


def torchao_version() -> tuple[int, int, int] | None:
    """The installed torchao's (major, minor, patch), or None when it is not installed."""
    try:
        text = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in m.groups()) if m else (0, 0, 0)


def _version_text(v) -> str:
    return ".".join(map(str, v))


def unavailable_reason(mode: str, device: torch.device, emulate: bool = False, bf16: bool = True) -> str | None:
    """Why run.float8=`mode` cannot train on `device` (one line naming the setting), or None. `bf16`:
    the run's precision is bf16; float8 training is built for bf16 autocast only, as torchao's
    recipes run it (fp32 outputs of float8 GEMMs are untested here)."""
    if mode == "off":
        return None
    if mode not in MODES:
        return f"run.float8: expected one of {MODES}, got {mode!r}"
    have = torchao_version()
    if have is None:
        return (f"run.float8={mode} needs torchao >= {_version_text(MIN_TORCHAO)}, which is not installed "
                f"({INSTALL_HINT}); or run.float8=off")
    if have < MIN_TORCHAO:
        return (f"run.float8={mode} needs torchao >= {_version_text(MIN_TORCHAO)}, found {_version_text(have)} "
                f"({INSTALL_HINT}); or run.float8=off")
    if emulate:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return (f"run.float8={mode} needs a CUDA GPU of compute capability >= "
                f"{_version_text(MIN_CAPABILITY)} (Ada / Hopper), but this run's device is {device.type}; "
                f"use run.float8=off (run.float8_emulate=true emulates float8 slowly, for tests only)")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"run.float8={mode} needs a CUDA GPU of compute capability >= "
                f"{_version_text(MIN_CAPABILITY)} (Ada / Hopper), but {torch.cuda.get_device_name(device)} "
                f"is sm_{cap[0]}{cap[1]}; use run.float8=off")
    if not bf16:
        return f"run.float8={mode} needs bf16 precision (run.precision=bf16, or auto on a GPU), not fp32"
    return None


def keeps_high_precision(mod: nn.Module, fqn: str, min_dim: int = MIN_DIM) -> str | None:
    """Why the linear `fqn` (a name in the AIMv2Pretrainer) stays in high precision, or None when it
    is converted. Modules other than nn.Linear are never converted (the patch embedding is a Conv2d)."""
    if not isinstance(mod, nn.Linear):
        return "not a Linear"
    if fqn in HIGH_PRECISION:
        return "a head"
    if not fqn.startswith(("encoder.", "decoder.")):
        return "outside the encoder and the decoder"
    out_f, in_f = mod.weight.shape
    if in_f % 16 or out_f % 16:
        return f"dims not multiples of 16 ({in_f} -> {out_f})"
    if min(in_f, out_f) < min_dim:
        return f"dims below run.float8_min_dim={min_dim} ({in_f} -> {out_f})"
    return None


@contextlib.contextmanager
def _quiet_import():
    """Import torchao.float8 without its import-time log noise where it means nothing: on a machine
    without CUDA, torchao's CUDA extension libraries (unused by float8 training) fail to load with a
    warning each, and torch warns once about an enum torchao registers with pytree."""
    names = ("torchao", "torch.utils._pytree")
    quiet = not torch.cuda.is_available()
    old = [logging.getLogger(n).level for n in names]
    if quiet:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in zip(names, old):
            logging.getLogger(n).setLevel(level)


def float8_config(mode: str, *, emulate: bool = False, fsdp: bool = False):
    """torchao's Float8LinearConfig of recipe `mode`; float8 all-gather under FSDP2 when the recipe
    offers it (tensorwise)."""
    cfg = _torchao_float8().Float8LinearConfig.from_recipe_name(mode)
    return dataclasses.replace(cfg, emulate=emulate,
                               enable_fsdp_float8_all_gather=fsdp and mode == "tensorwise")


def _torchao_float8():
    """torchao.float8, imported quietly (_quiet_import)."""
    with _quiet_import():
        import torchao.float8
    return torchao.float8


def _contiguous_input(mod: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def convert(model: nn.Module, mode: str, *, min_dim: int = MIN_DIM, emulate: bool = False,
            fsdp: bool = False) -> list[str]:
    """Swap `model`'s eligible linears (keeps_high_precision) for torchao Float8Linear of recipe `mode`,
    in place, before compile and DDP / FSDP2 wrapping; returns the converted names. Parameters are
    the same objects, so an optimizer built afterwards (or before) sees the same tensors.

    rowwise: each converted linear gets a forward pre-hook making its input contiguous. torchao 0.17
    flattens the input after its rowwise cast and cannot copy a rowwise-scaled float8 tensor
    ("aten.clone.default with axiswise scaling is not supported yet"), and the first encoder block's
    qkv input is a transposed view of the patch embedding's output (impl="torch"): (B, N, D) with
    strides (N D, 1, N). The copy is a no-op for a contiguous input."""
    if mode not in MODES:
        raise ValueError(f"run.float8: expected one of {MODES}, got {mode!r}")
    if mode == "off":
        return []
    f8 = _torchao_float8()
    chosen: list[str] = []

    def keep_or_convert(mod: nn.Module, fqn: str) -> bool:
        ok = keeps_high_precision(mod, fqn, min_dim) is None
        if ok:
            chosen.append(fqn)
        return ok

    f8.convert_to_float8_training(model, module_filter_fn=keep_or_convert,
                                  config=float8_config(mode, emulate=emulate, fsdp=fsdp))
    if mode == "rowwise":
        for fqn in chosen:
            model.get_submodule(fqn).register_forward_pre_hook(_contiguous_input)
    return chosen


def describe(model: nn.Module, converted: list[str], min_dim: int = MIN_DIM) -> str:
    """One log line: how many linears (and what share of their weights) run in float8, and the
    reasons of those that do not."""
    kept: dict[str, int] = {}
    n8 = n_all = 0
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            n_all += mod.weight.numel()
            if fqn in converted:
                n8 += mod.weight.numel()
            else:
                why = (keeps_high_precision(mod, fqn, min_dim) or "not converted").split(" (")[0]
                kept[why] = kept.get(why, 0) + 1
    rest = ", ".join(f"{n} ({why})" for why, n in kept.items())
    return (f"{len(converted)} linears in float8 ({100 * n8 / max(n_all, 1):.0f}% of linear weights)"
            + (f"; in high precision: {rest}" if rest else ""))


def after_optimizer_step(model: nn.Module) -> Callable[[], None] | None:
    """The per-step hook the trainer calls after the optimizer step, or None when none is needed: under
    FSDP2 with float8 all-gather, the next step's weight scales in one all-reduce (torchao's
    precompute_float8_dynamic_scale_for_fsdp)."""
    from torch.distributed.tensor import DTensor
    f8 = _torchao_float8()
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    if not any(isinstance(p, DTensor) and isinstance(p._local_tensor, WeightWithDynamicFloat8CastTensor)
               for p in model.parameters()):
        return None
    return lambda: f8.precompute_float8_dynamic_scale_for_fsdp(model)


def plain_state_dict(sd: dict) -> dict:
    """`sd` with every tensor a plain high-precision tensor: the float8 all-gather weight wrapper
    (a tensor subclass holding the fp32 master weight parameter in `_tensor`) unwrapped; other values
    as they are."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and type(v) is not torch.Tensor and hasattr(v, "_tensor"):
            while hasattr(v, "_tensor"):
                v = v._tensor
            v = v.detach()                  # the wrapper holds the nn.Parameter itself: a plain view of it
        out[k] = v
    return out
