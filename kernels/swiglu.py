"""Fused SwiGLU activation: out = silu(gate) * up.

Shapes: gate, up (..., H), any leading shape; strided views (e.g. halves of a fused gate/up
projection output) are accepted as long as the last dim is contiguous.

With sig = sigmoid(gate) and d = d_out:

    out    = gate * sig * up
    d_gate = d * up * sig * (1 + gate * (1 - sig))
    d_up   = d * gate * sig

All arithmetic in fp32; the backward recomputes sig from gate (nothing is stored but the inputs).
gate and up must share one dtype; out, d_gate, d_up come back in it (d_gate, d_up contiguous).
Equivalent PyTorch: `swiglu_ref` below.

`swiglu_packed(h)`: the same on h (..., 2H) = [gate | up], the output of ONE (D -> 2H) projection
(fc1 and fc3 as one GEMM). Its backward writes d_h (..., 2H) in place of the two halves, so the
projection's backward is one GEMM too and nothing is concatenated or zero-filled (slicing h and
calling `swiglu` would make autograd scatter each half's gradient into a zeroed (..., 2H) buffer).
Equivalent PyTorch: `swiglu_packed_ref(h) = swiglu_ref(*h.chunk(2, -1))`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._compat import tl, triton
from ._utils import Tiles, cast_rtne, check_float, check_launchable, check_same_device, is_interpreting, \
    last_dim_contiguous


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch specification (computed in fp32, returned in the input dtype)."""
    g = gate.float() if gate.dtype != torch.float64 else gate
    u = up.to(g.dtype)
    return (F.silu(g) * u).to(gate.dtype)


def swiglu_packed_ref(h: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch specification of `swiglu_packed`: h (..., 2H) = [gate | up] -> (..., H)."""
    gate, up = h.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


# --------------------------------------------------------------------------------------------
# Triton kernels: 2-D tiles over (rows, hidden); each input has its own row stride
# --------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, M, H, stride_g, stride_u, stride_o,
                       BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :],
             cast_rtne(out, OUT.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, G, U, DG, DU, M, H, stride_do, stride_g, stride_u, stride_dg, stride_du,
                       BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    d = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :],
             cast_rtne(dg, DG.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :],
             cast_rtne(d * silu, DU.dtype.element_ty, INTERPRET), mask=mask)


# --------------------------------------------------------------------------------------------
# Host launchers: 2-D (M, H) inputs, contiguous last dim, any row stride
# --------------------------------------------------------------------------------------------
def _tiles(H: int) -> Tiles:
    """block_m (BLOCK_M) rows x block_n (BLOCK_H) columns: ~4k-element tiles at 8 warps (16 a thread).

    NOTE (H200, bf16, (32768, 2816), CUDA-graph timing, benchmarks/tune_kernels.py, 2026-11-29): this
    choice (4 x 1024, 8 warps) was the fastest of 8 tile shapes, forward 0.132 ms (98.5 % of the copy
    bandwidth) and backward 0.222 ms (97.6 %); the others within 1-17 %. ptxas -arch=sm_90 gives the
    backward 85 registers, no spills. Under the interpreter ~16k-element tiles (its cost is per program and op, not per element).
    """
    BLOCK_H = min(triton.next_power_of_2(H), 1024)
    tile = 16384 if is_interpreting() else 4096
    BLOCK_M = max(1, tile // BLOCK_H)
    return Tiles(BLOCK_M, BLOCK_H, 8 if BLOCK_M * BLOCK_H >= 4096 else 4)


def _grid(M, H, t: Tiles):
    return (triton.cdiv(M, t.block_m), triton.cdiv(H, t.block_n))


def _fwd_launch(gate, up):
    M, H = gate.shape
    out = torch.empty((M, H), dtype=gate.dtype, device=gate.device)
    if M == 0 or H == 0:
        return out
    t = _tiles(H)
    _swiglu_fwd_kernel[_grid(M, H, t)](
        gate, up, out, M, H, gate.stride(0), up.stride(0), out.stride(0),
        BLOCK_M=t.block_m, BLOCK_H=t.block_n, INTERPRET=is_interpreting(), num_warps=t.num_warps)
    return out


def _bwd_launch(dout, gate, up, dg=None, du=None):
    """d_gate, d_up (M, H) into `dg`, `du` when given (views with unit column stride, e.g. the halves
    of one (M, 2H) gradient), else into new contiguous tensors."""
    M, H = gate.shape
    dg = torch.empty((M, H), dtype=gate.dtype, device=gate.device) if dg is None else dg
    du = torch.empty((M, H), dtype=up.dtype, device=up.device) if du is None else du
    if M == 0 or H == 0:
        return dg, du
    t = _tiles(H)
    _swiglu_bwd_kernel[_grid(M, H, t)](
        dout, gate, up, dg, du, M, H, dout.stride(0), gate.stride(0), up.stride(0), dg.stride(0),
        du.stride(0), BLOCK_M=t.block_m, BLOCK_H=t.block_n, INTERPRET=is_interpreting(),
        num_warps=t.num_warps)
    return dg, du


# --------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile, fixed rank 2) and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("aimv2::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (M, H) with unit column stride -> out (M, H) contiguous."""
    return _fwd_launch(last_dim_contiguous(gate), last_dim_contiguous(up))


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("aimv2::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dout: torch.Tensor, gate: torch.Tensor,
                   up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, gate, up (M, H) -> d_gate, d_up (M, H) contiguous."""
    return _bwd_launch(last_dim_contiguous(dout), last_dim_contiguous(gate), last_dim_contiguous(up))


@_swiglu_bwd_op.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dout, gate, up)


_swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("aimv2::swiglu_packed_fwd", mutates_args=())
def _swiglu_packed_fwd_op(h: torch.Tensor) -> torch.Tensor:
    """h (M, 2H) = [gate | up] with unit column stride -> out (M, H) contiguous."""
    h = last_dim_contiguous(h)
    H = h.shape[1] // 2
    return _fwd_launch(h[:, :H], h[:, H:])


@_swiglu_packed_fwd_op.register_fake
def _(h):
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@torch.library.custom_op("aimv2::swiglu_packed_bwd", mutates_args=())
def _swiglu_packed_bwd_op(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dout (M, H), h (M, 2H) -> d_h (M, 2H) contiguous = [d_gate | d_up]."""
    h = last_dim_contiguous(h)
    H = h.shape[1] // 2
    dh = torch.empty((h.shape[0], 2 * H), dtype=h.dtype, device=h.device)    # (M, 2H), both halves written
    _bwd_launch(last_dim_contiguous(dout), h[:, :H], h[:, H:], dh[:, :H], dh[:, H:])
    return dh


@_swiglu_packed_bwd_op.register_fake
def _(dout, h):
    return h.new_empty(h.shape)


def _packed_backward(ctx, dout):
    (h,) = ctx.saved_tensors
    return _swiglu_packed_bwd_op(dout, h)


_swiglu_packed_fwd_op.register_autograd(_packed_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (M, H), a view whenever the leading dims collapse (e.g. a half of a fused
    (..., 2H) projection output), else a copy."""
    return last_dim_contiguous(t).reshape(-1, t.shape[-1])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up (..., H) of one dtype; returns a contiguous (..., H) tensor.

    Equivalent PyTorch: `swiglu_ref(gate, up)` (= F.silu(gate.float()) * up.float(), cast back).
    """
    check_float("gate", gate)
    check_float("up", up)
    if gate.dtype != up.dtype:
        raise TypeError(f"up: expected the dtype of gate ({gate.dtype}), got {up.dtype}")
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"up: expected the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same_device(gate=gate, up=up)
    check_launchable(gate)
    if gate.shape[-1] == 0:                                         # H = 0: an empty result, as the reference
        return swiglu_ref(gate, up)
    out = _swiglu_fwd_op(_rows(gate), _rows(up))                    # (M, H)
    return out.view(gate.shape)                                                  # (..., H)


def swiglu_packed(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2H) = [gate | up] (one fused fc1/fc3 projection's output); returns
    a contiguous (..., H) tensor, and d_h as one (..., 2H) tensor in the backward.

    Equivalent PyTorch: `swiglu_packed_ref(h)` (= swiglu_ref(*h.chunk(2, -1))).
    """
    check_float("h", h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"h: expected (..., 2H) with an even last dim, got {tuple(h.shape)}")
    check_launchable(h)
    if h.shape[-1] == 0:
        return swiglu_packed_ref(h)
    out = _swiglu_packed_fwd_op(_rows(h))                           # (M, H)
    return out.view(*h.shape[:-1], h.shape[-1] // 2)                 # (..., H)
