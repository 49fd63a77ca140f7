"""Fused RMSNorm with an optional residual add.

    s   = x + residual                      (when residual is given; else s = x)
    out = s / sqrt(mean(s^2, -1) + eps) * weight      statistics in fp32

Shapes: x (..., D), weight (D,), residual like x. Returns `out` (dtype of x), or `(out, s)` when
residual is given (s in promote_types(x.dtype, residual.dtype)). x and residual may differ in dtype
(bf16 activations with an fp32 residual stream under autocast); weight may be fp32 with bf16 x.

Backward, with s_hat = s * rstd, rstd = 1 / sqrt(mean(s^2) + eps), dy = d_out * weight:

    d_s      = rstd * (dy - s_hat * mean(dy * s_hat, -1)) + d_s_passthrough
    d_x      = d_s (in x.dtype),  d_residual = d_s (in residual.dtype)
    d_weight = sum_rows(d_out * s_hat)

The forward stores `s` (when a residual is given) and the fp32 `rstd` per row (4 bytes a row); the
backward re-reads s. d_weight is reduced deterministically: each program of a persistent grid sums
its rows into one fp32 partial row, and the partials are summed by torch (no atomics).

Limits: the whole row lives in one tile (BLOCK_D = next_power_of_2(D)); D <= 4096 is checked to
compile for sm_90 without register spills (tests/test_kernels_sm90_compile.py).
Equivalent PyTorch: `rms_norm_ref` below.
"""
from __future__ import annotations

import torch

from ._compat import tl, triton
from ._utils import Tiles, cast_rtne, check_float, check_launchable, check_same_device, is_interpreting, \
    last_dim_contiguous, resident_programs


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                 residual: torch.Tensor | None = None):
    """Plain PyTorch specification (upcasts to fp32 for the statistics)."""
    s = x if residual is None else x + residual
    sf = s.float() if s.dtype != torch.float64 else s
    var = sf.pow(2).mean(-1, keepdim=True)
    out = (sf * torch.rsqrt(var + eps) * weight.to(sf.dtype)).to(x.dtype)
    return out if residual is None else (out, s)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(X, R, W, OUT, S, RSTD, M, D, stride_x, stride_r, stride_o, stride_s, eps,
                         HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """One program normalises BLOCK_M whole rows."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # round s to its storage dtype first: the backward reads the stored s, and the forward
        # must normalise the same numbers the caller gets back
        s = cast_rtne(s + r, S.dtype.element_ty, INTERPRET)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        s = s.to(tl.float32)
    # div_rn / sqrt_rn: exactly rounded, as in the interpreter and torch; a plain `/` and tl.sqrt
    # compile to approximate PTX (div.full, sqrt.approx), which the fp32 bounds do not allow for
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(s * s, axis=1), D * 1.0) + eps))   # (BLOCK_M,)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    out = s * rstd[:, None] * w[None, :]
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :],
             cast_rtne(out, OUT.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _rms_norm_bwd_kernel(DOUT, DS_IN, S, W, RSTD, DX, DRES, DW_PART, M, D, rows_per_prog,
                         stride_do, stride_dsi, stride_s, stride_dx, stride_dr,
                         HAS_DS_IN: tl.constexpr, HAS_DRES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """Persistent: program pid walks rows [pid * rows_per_prog, ...) BLOCK_M at a time and writes
    its fp32 partial d_weight row to DW_PART[pid]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        s_hat = s * rstd[:, None]
        dy = dout * w[None, :]
        c = tl.div_rn(tl.sum(dy * s_hat, axis=1), D * 1.0)          # (BLOCK_M,), exactly rounded
        ds = (dy - s_hat * c[:, None]) * rstd[:, None]
        if HAS_DS_IN:
            ds += tl.load(DS_IN + rows[:, None] * stride_dsi + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :],
                 cast_rtne(ds, DX.dtype.element_ty, INTERPRET), mask=mask)
        if HAS_DRES:
            tl.store(DRES + rows[:, None] * stride_dr + cols[None, :],
                     cast_rtne(ds, DRES.dtype.element_ty, INTERPRET), mask=mask)
        dw_acc += dout * s_hat
    tl.store(DW_PART + pid * D + cols, tl.sum(dw_acc, axis=0), mask=cmask)


# --------------------------------------------------------------------------------------------
# Host launchers: 2-D (M, D) tensors with a contiguous last dim
# --------------------------------------------------------------------------------------------
def _tiles(D: int) -> Tiles:
    """block_m (BLOCK_M) whole rows of block_n (BLOCK_D) lanes per tile, and num_warps: tiles of ~4k
    elements at 16 elements a thread, forward and backward alike.

    NOTE (H200, bf16, (32768, 1024) with residual, CUDA-graph timing, benchmarks/tune_kernels.py,
    2026-11-29): forward 4 rows x 8 warps 0.067 ms (94% of copy bandwidth; 1-16 rows within 3%);
    backward 4 rows x 8 warps 0.090 ms against 0.100 ms for the former 2 rows x 8 warps (2k-element
    tiles, 8 a thread). ptxas -arch=sm_90: no spills. Under the interpreter tiles of ~16k elements
    (its cost is per program and op, not per element).
    """
    BLOCK_D = triton.next_power_of_2(D)
    tile = 16384 if is_interpreting() else 4096
    BLOCK_M = max(1, min(64, tile // BLOCK_D))
    num_warps = min(max(BLOCK_M * BLOCK_D // (32 * 16), 4), 16)
    return Tiles(BLOCK_M, BLOCK_D, num_warps)


def _fwd_launch(x, weight, residual, eps):
    M, D = x.shape
    out = torch.empty((M, D), dtype=x.dtype, device=x.device)
    if residual is not None:
        s = torch.empty((M, D), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        s = torch.empty((0,), dtype=x.dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return out, s, rstd
    t = _tiles(D)
    r = residual if residual is not None else x
    s_arg = s if residual is not None else out
    _rms_norm_fwd_kernel[(triton.cdiv(M, t.block_m),)](
        x, r, weight, out, s_arg, rstd, M, D, x.stride(0), r.stride(0), out.stride(0),
        s_arg.stride(0), eps, HAS_RES=residual is not None, BLOCK_M=t.block_m, BLOCK_D=t.block_n,
        INTERPRET=is_interpreting(), num_warps=t.num_warps)
    return out, s, rstd


def _bwd_launch(dout, ds_in, s, weight, rstd, x_dtype, res_dtype):
    M, D = s.shape
    dx = torch.empty((M, D), dtype=x_dtype, device=s.device)
    separate_dres = res_dtype is not None and res_dtype != x_dtype
    dres = torch.empty((M, D) if separate_dres else (0,), dtype=res_dtype or x_dtype, device=s.device)
    if M == 0:
        return dx, dres, torch.zeros_like(weight)
    t = _tiles(D)
    BLOCK_M, BLOCK_D, num_warps = t.block_m, t.block_n, t.num_warps
    dsi = ds_in if ds_in is not None else dout
    dr = dres if separate_dres else dx
    kw = dict(HAS_DS_IN=ds_in is not None, HAS_DRES=separate_dres, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
              INTERPRET=is_interpreting(), num_warps=num_warps)

    def args(dw_part, rows_per_prog):
        return (dout, dsi, s, weight, rstd, dx, dr, dw_part, M, D, rows_per_prog,
                dout.stride(0), dsi.stride(0), s.stride(0), dx.stride(0), dr.stride(0))
    # persistent grid: as many programs as are resident at once (occupancy of the compiled kernel:
    # threads, registers, shared memory per SM), each with whole BLOCK_M tiles of rows
    resident = resident_programs(
        _rms_norm_bwd_kernel, args(torch.empty((1, D), dtype=torch.float32, device=s.device), 16 * BLOCK_M),
        kw, s.device, (BLOCK_M, BLOCK_D, num_warps, dout.dtype, dsi.dtype, s.dtype, weight.dtype, dx.dtype,
                       dr.dtype, ds_in is not None, separate_dres))
    n_prog = max(1, min(triton.cdiv(M, BLOCK_M), resident))
    rows_per_prog = triton.cdiv(triton.cdiv(M, n_prog), BLOCK_M) * BLOCK_M
    n_prog = triton.cdiv(M, rows_per_prog)
    dw_part = torch.empty((n_prog, D), dtype=torch.float32, device=s.device)
    _rms_norm_bwd_kernel[(n_prog,)](*args(dw_part, rows_per_prog), **kw)
    return dx, dres, dw_part.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile, fixed rank 2) and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("aimv2::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (M, D); weight (D,) -> out (M, D), s (M, D) or (0,) without residual, rstd (M,)."""
    return _fwd_launch(x, weight, residual, eps)


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps):
    M, D = x.shape
    if residual is not None:
        s = x.new_empty((M, D), dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        s = x.new_empty((0,))
    return x.new_empty((M, D)), s, x.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op("aimv2::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dout: torch.Tensor, ds_in: torch.Tensor | None, s: torch.Tensor,
                     weight: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype,
                     res_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, D) in x_dtype, d_residual (M, D) in res_dtype when that differs from x_dtype
    (else (0,): d_residual is dx), d_weight (D,)."""
    dout, s = last_dim_contiguous(dout), last_dim_contiguous(s)
    ds_in = last_dim_contiguous(ds_in) if ds_in is not None else None
    return _bwd_launch(dout, ds_in, s, weight, rstd, x_dtype, res_dtype)


@_rms_norm_bwd_op.register_fake
def _(dout, ds_in, s, weight, rstd, x_dtype, res_dtype):
    M, D = s.shape
    separate = res_dtype is not None and res_dtype != x_dtype
    dres = s.new_empty((M, D) if separate else (0,), dtype=res_dtype or x_dtype)
    return s.new_empty((M, D), dtype=x_dtype), dres, torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps = inputs
    _, s, rstd = output
    ctx.has_res = residual is not None
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s if residual is not None else x, weight, rstd)


def _backward(ctx, dout, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds_in = ds if ctx.has_res else None
    dx, dres, dw = _rms_norm_bwd_op(dout, ds_in, s, weight, rstd, ctx.x_dtype, ctx.res_dtype)
    if not ctx.has_res:
        return dx, dw, None, None
    return dx, dw, (dres if ctx.res_dtype != ctx.x_dtype else dx), None


_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
             residual: torch.Tensor | None = None):
    """Fused RMSNorm (+ residual add) over the last dim; see the module docstring.

    x (..., D), weight (D,), residual None or shaped like x. Returns out (..., D) in x.dtype, or
    (out, s) with s = x + residual in promote_types(x.dtype, residual.dtype).
    Equivalent PyTorch: `rms_norm_ref(x, weight, eps, residual)`.
    """
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected shape ({x.shape[-1] if x.dim() else '?'},) to match the "
                         f"last dim of x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None:
        check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {tuple(x.shape)} like x, got "
                             f"{tuple(residual.shape)}")
    check_same_device(x=x, weight=weight, residual=residual)
    check_launchable(x)
    D = x.shape[-1]
    if D == 0:                                      # nothing to normalise: empty outputs, as the reference
        return rms_norm_ref(x, weight, eps, residual)
    x2 = last_dim_contiguous(x).reshape(-1, D)                                   # (M, D)
    r2 = last_dim_contiguous(residual).reshape(-1, D) if residual is not None else None
    out, s, _ = _rms_norm_fwd_op(x2, last_dim_contiguous(weight), r2, float(eps))
    out = out.view(x.shape)                                                      # (..., D)
    return out if residual is None else (out, s.view(x.shape))
