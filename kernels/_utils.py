"""Shared helpers for the kernel library: input checks and launch-environment facts."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._compat import IMPORT_ERROR, TritonUnavailableError, tl, triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Tiles:
    """The launch shape of one kernel: a program's tile is block_m x block_n, run by num_warps warps.

    block_m: rows of the tile (BLOCK_M; patches BLOCK_T in patch_l2_loss; queries in attention).
    block_n: its other axis (BLOCK_D / BLOCK_H / BLOCK_K: the row width; keys BLOCK_N in attention).
    num_stages: software-pipelining depth of the kernel's loops; None leaves Triton's default.
    """
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int | None = None


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_float(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all inputs must be on one device, got {desc}")


def prefix_lengths(prefix_len, B: int, N: int, device) -> torch.Tensor:
    """int32 (B,) prefix lengths on `device` from an int or an integer tensor of B values in [0, N].

    An int, and a CPU tensor in eager mode, are range-checked (a CUDA tensor is not: that would be a
    host sync; nor is a tensor under torch.compile: a data-dependent graph break); values are clamped to
    [0, N] before the cast to int32, so an int64 2**32 + 1 can never wrap to 1."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.Tensor)):
        raise TypeError(f"prefix_len: expected an int or an integer tensor ({B},), got {type(prefix_len).__name__}")
    if isinstance(prefix_len, int):
        if not 0 <= prefix_len <= N:
            raise ValueError(f"prefix_len: {prefix_len} outside [0, N={N}]")
        return torch.full((B,), prefix_len, dtype=torch.int32, device=device)
    if prefix_len.is_floating_point() or prefix_len.is_complex() or prefix_len.dtype == torch.bool:
        raise TypeError(f"prefix_len: expected an integer tensor, got {prefix_len.dtype}")
    if prefix_len.numel() != B:
        raise ValueError(f"prefix_len: expected {B} values (one per image), got shape {tuple(prefix_len.shape)}")
    if prefix_len.device.type == "cpu" and B and not torch.compiler.is_compiling():
        lo, hi = int(prefix_len.min()), int(prefix_len.max())
        if lo < 0 or hi > N:
            raise ValueError(f"prefix_len: values must lie in [0, N={N}], got min {lo}, max {hi}")
    return clamp_prefix(prefix_len.reshape(B).to(device), N)                                  # (B,)


def clamp_prefix(prefix_len: torch.Tensor, N: int) -> torch.Tensor:
    """int32 prefix lengths clamped to [0, N] first (a cast first would wrap 2**32 + 1 to 1)."""
    return prefix_len.clamp(0, N).to(torch.int32)


def check_pack_values(cu_seqlens: torch.Tensor, prefix_len: torch.Tensor, T: int, max_seqlen: int,
                      rows_of: str = "q.shape[0]") -> None:
    """Value checks of a packed sequence (cu_seqlens 0 first, strictly increasing, T last; every image at
    most max_seqlen long; prefix_len[s] in [0, len_s]) for CPU tensors only: on CUDA they would sync the
    host (the kernels clamp instead). rows_of names the argument whose rows T counts."""
    if cu_seqlens.device.type != "cpu":
        return
    cu = cu_seqlens.long()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {int(cu[0])}")
    if int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens: last value must be T={T} ({rows_of}), got {int(cu[-1])}")
    lens = cu[1:] - cu[:-1]                                                   # (S,)
    if lens.numel() == 0:
        return
    if int(lens.min()) <= 0:
        s = int(torch.nonzero(lens <= 0)[0])
        raise ValueError(f"cu_seqlens: must be strictly increasing, got cu_seqlens[{s}]={int(cu[s])} "
                         f">= cu_seqlens[{s + 1}]={int(cu[s + 1])}")
    if int(lens.max()) > max_seqlen:
        raise ValueError(f"max_seqlen: {max_seqlen} is less than the longest image ({int(lens.max())} tokens)")
    bad = (prefix_len.long() < 0) | (prefix_len.long() > lens)
    if bool(bad.any()):
        s = int(torch.nonzero(bad)[0])
        raise ValueError(f"prefix_len: values must lie in [0, len_s], got prefix_len[{s}]={int(prefix_len[s])} "
                         f"for an image of {int(lens[s])} tokens")


def unavailable_reason(device=None, dtype: torch.dtype | None = None) -> str | None:
    """None when the Triton kernels can run on `device` (default: "cuda" when CUDA is available,
    else "cpu") with inputs of `dtype` (default: any), else the reason they cannot.

    The one capability check of the kernel library: the model's, trainer's and loaders' backend
    choices ask it and log what it says when they fall back.
    """
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        if not is_interpreting():
            return ("CPU device without TRITON_INTERPRET=1 (the kernels need a CUDA GPU; the interpreter, "
                    "enabled before importing aimv2.kernels, is for testing)")
        return None
    if device.type != "cuda":
        return f"device type {device.type!r} has no Triton backend"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if dtype == torch.bfloat16:
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return f"bf16 needs compute capability >= (8, 0) (bf16 tensor cores), {device} has {cap}"
    return None


def check_launchable(t: torch.Tensor) -> None:
    """Triton kernels need triton, and a GPU tensor or a CPU tensor under the interpreter."""
    if IMPORT_ERROR is not None:
        raise TritonUnavailableError(
            f"aimv2.kernels: the Triton kernels cannot run: {IMPORT_ERROR}; use the plain-PyTorch "
            f"references (the model's impl='torch', attn_backend='sdpa')")
    if t.device.type == "cpu" and not is_interpreting():
        raise RuntimeError(
            "aimv2.kernels: Triton kernels need a CUDA tensor; on a CPU set TRITON_INTERPRET=1 before "
            "importing aimv2.kernels (slow, for testing) or use the model's impl='torch'")


def use_registered_op() -> bool:
    """True where an op must be called through its torch.library registration: while torch.compile
    (or export) traces, or under a dispatch mode (fake tensors, make_fx), which need its fake
    implementation. Elsewhere (eager) the ops run an autograd.Function with the same implementation
    and autograd rule, which skips the library's dispatch (benchmarks/bench_attention.py --host-cost)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Return t if its last dim has stride 1, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def programs_per_sm(n_regs: int, shared_bytes: int, num_warps: int, props) -> int:
    """Programs of one compiled kernel resident on an SM at once: the least of what its threads,
    registers and shared memory allow. props: torch.cuda.get_device_properties(...) (or any object
    with max_threads_per_multi_processor, regs_per_multiprocessor, shared_memory_per_multiprocessor)."""
    threads = 32 * num_warps
    by_threads = props.max_threads_per_multi_processor // threads
    by_regs = props.regs_per_multiprocessor // max(1, n_regs * threads)
    by_smem = props.shared_memory_per_multiprocessor // shared_bytes if shared_bytes else by_threads
    return max(1, min(by_threads, by_regs, by_smem))


_RESIDENT: dict = {}


def resident_programs(kernel, args, kwargs: dict, device: torch.device, key) -> int:
    """A persistent grid's size: the programs resident at once, SMs x programs_per_sm of `kernel`
    compiled for these args (Triton's warmup compiles without launching; the answer is cached under
    `key`, which must name everything that changes the compiled code's resources). 4 off the GPU:
    under the interpreter each program is a Python loop, so few is fast."""
    if device.type != "cuda":
        return 4
    cache_key = (kernel.fn.__name__ if hasattr(kernel, "fn") else repr(kernel), device.index, key)
    if cache_key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()                                   # loads the cubin: n_regs
        props = torch.cuda.get_device_properties(device)
        _RESIDENT[cache_key] = props.multi_processor_count * programs_per_sm(
            compiled.n_regs, compiled.metadata.shared, kwargs["num_warps"], props)
    return _RESIDENT[cache_key]


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) -> DTYPE, rounding to nearest even. Compiled Triton already does; the interpreter
    truncates fp32 -> bf16, which biases sums of stored values (e.g. d_weight over rows of a stored
    bf16 residual stream), so there the rounding is done on the fp32 bits first (exact after it)."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
