"""Packed variable-length prefix attention: many images of different sizes in one sequence.

Image s holds the packed rows [start_s, end_s), start_s = cu_seqlens[s], end_s = cu_seqlens[s + 1],
len_s = end_s - start_s, with its own prefix P_s. Query i of image s sees key j iff

    start_s <= j < end_s   and   (j - start_s < P_s  or  j <= i)

so no token sees another image; within an image this is `prefix_attention` (P_s = 0 causal,
P_s = len_s bidirectional). Equivalent PyTorch: each image alone through prefix_attention_ref
(`prefix_attention_varlen_ref`).

Shapes: q, k, v (T, H, D) packed over the S images (any strides with a contiguous last dim, e.g.
views of a packed (T, 3, H, D) qkv projection: no copies), fp16 / bf16 / fp32, D in (16, 32, 64,
128); cu_seqlens int32 (S + 1,), 0 first, strictly increasing, T last; prefix_len int32 (S,) with
P_s in [0, len_s]; max_seqlen a Python int >= every len_s. Output (T, H, D) contiguous in q's dtype.

The kernels are the fixed-length ones (kernels/prefix_attention.py) with another prologue: program
(t, h, s) of a (cdiv(max_seqlen, BLOCK), H, S) grid reads start_s and end_s, returns at once when its
tile starts at or past len_s, moves every pointer to row start_s of head h and runs the shared
`_fwd_program` / `_dkdv_program` / `_dq_program` body with N = len_s and P = P_s. Positions in those
bodies are local to the image, so the fixed kernel's tile logic holds per image unchanged: tiles are
aligned to the image start, key tiles past max(P_s, last query + 1) are never loaded (a tile wholly
in another image never is), tiles every query sees whole run unmasked, and only tiles crossing the
prefix edge, the diagonal or the image end (the `< N` mask) are masked. The delta pre-pass is the
fixed kernel's over all T rows. LSE and delta are (H, T) fp32.
NOTE (a compile-only check, not timed): the tiles are the fixed kernel's table (`_tiles`). Compiled
for sm_90a with triton 3.7.1 at bf16 (benchmarks/ptxas_attention.py), the three kernels use the
fixed kernels' shared memory, wgmma on every dot and 0 spill bytes; registers per thread fwd / dkdv /
dq 226 / 184 / 120 at D=64 (fixed 236 / 168 / 106) and 184 / 249 / 136 at D=128 (fixed 170 / 245 / 142).

Registered as torch.library custom ops aimv2::prefix_attention_varlen_fwd / _bwd (fake + autograd):
torch.compile(fullgraph=True) traces through with no graph break; eager calls run the same
implementation as an autograd.Function (no library dispatch, as the fixed op); nothing reads a device
tensor on the host. The forward's TMA form (`fwd_tma`) makes its descriptors over each image's own
rows, so a tile past the image end reads zeros as the masked pointer loads do. The qkv-packed entry
point (aimv2::prefix_attention_varlen_qkv_fwd / _bwd) writes dq, dk, dv into one d_qkv.
Limits: S, H <= 65535 (launch grid). On a CPU tensor cu_seqlens, prefix_len and max_seqlen are
checked; on CUDA that would sync, so they are not: the kernels clamp start_s, end_s to [0, T]
and P_s to [0, len_s] (no out-of-bounds access), and rows of an image longer than max_seqlen past
max_seqlen are left unwritten. In the Triton interpreter bf16 is computed in fp32 and stored as bf16.
"""
from __future__ import annotations

import math

import torch

from ._compat import tl, triton
from ._utils import (check_float, check_launchable, check_pack_values, check_same_device, last_dim_contiguous,
                     use_registered_op)
from .prefix_attention import (_LOG2E, _bwd_mode, _cdiv, _check_qkv, _delta_launch, _dkdv_program, _dot_precision,
                               _dq_program, _eager_twin, _fwd_program, _interpreter_needs_fp32, _query_tile_start,
                               _tiles, _use_tma, prefix_attention_ref)


def _split(t: torch.Tensor, cu: list[int]):
    """The images of a packed (T, H, D) tensor, each as a (1, H, len_s, D) view."""
    return [t[a:b].transpose(0, 1).unsqueeze(0) for a, b in zip(cu[:-1], cu[1:])]


def prefix_attention_varlen_ref(q, k, v, cu_seqlens, prefix_len, scale: float | None = None,
                                attention=prefix_attention_ref) -> torch.Tensor:
    """Plain PyTorch specification: each image alone through `attention` (default
    prefix_attention_ref), the results packed back into (T, H, D). Reads cu_seqlens on the host."""
    cu = [int(x) for x in cu_seqlens]
    P = [int(x) for x in prefix_len]
    outs = [attention(qs, ks, vs, torch.tensor([p], device=q.device), scale)
            for qs, ks, vs, p in zip(_split(q, cu), _split(k, cu), _split(v, cu), P)]
    return torch.cat([o[0].transpose(0, 1) for o in outs]) if outs else torch.empty_like(q)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _image_prologue(Q, K, V, CU_SEQLENS, PLEN, T, stride_qn, stride_qh, stride_kn, stride_kh,
                    stride_vn, stride_vh):
    """The program's image s (grid axis 2) and head h (axis 1): its first row start (int64) and
    length N, both clamped into [0, T] (no out-of-bounds access on a bad cu_seqlens), its prefix P
    clamped to [0, N], Q, K, V moved to (row start, h), and the offset of its first row in the
    (H, T) fp32 lse / delta."""
    off_h = tl.program_id(1).to(tl.int64)
    off_s = tl.program_id(2)
    start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + off_s), 0), T)
    N = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + off_s + 1), start), T) - start
    P = tl.minimum(tl.maximum(tl.load(PLEN + off_s), 0), N)
    start = start.to(tl.int64)
    Q += start * stride_qn + off_h * stride_qh
    K += start * stride_kn + off_h * stride_kh
    V += start * stride_vn + off_h * stride_vh
    return off_h, start, N, P, Q, K, V, off_h * T + start


@triton.jit
def _prefix_attention_varlen_fwd_kernel(
        Q, K, V, CU_SEQLENS, PLEN, OUT, LSE, qk_scale, T,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One program = one query tile of one (image, h). Grid (cdiv(max_seqlen, BLOCK_M), H, S).
    USE_TMA: tensor descriptors of the image's own rows (rows past its end read as 0)."""
    off_h, start, N, P, Q, K, V, stats = _image_prologue(Q, K, V, CU_SEQLENS, PLEN, T, stride_qn, stride_qh,
                                                         stride_kn, stride_kh, stride_vn, stride_vh)
    if _query_tile_start(BLOCK_M) >= N:
        return
    _fwd_program(Q, K, V, OUT + start * stride_on + off_h * stride_oh, LSE + stats, P, N, qk_scale,
                 stride_qn, stride_kn, stride_vn, stride_on, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, USE_TMA)


@triton.jit
def _prefix_attention_varlen_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, CU_SEQLENS, PLEN, DK, DV, DQ_ACC, sm_scale, qk_scale, T,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dn, stride_dh,
        stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_an, stride_ah,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program = one key tile of one (image, h): dk, dv (and with ATOMIC_DQ its dq shares).
    Grid (cdiv(max_seqlen, BLOCK_N), H, S)."""
    off_h, start, N, P, Q, K, V, stats = _image_prologue(Q, K, V, CU_SEQLENS, PLEN, T, stride_qn, stride_qh,
                                                         stride_kn, stride_kh, stride_vn, stride_vh)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= N:
        return
    _dkdv_program(Q, K, V, DO + start * stride_dn + off_h * stride_dh, LSE + stats, DELTA + stats,
                  DK + start * stride_dkn + off_h * stride_dkh, DV + start * stride_dvn + off_h * stride_dvh,
                  DQ_ACC + start * stride_an + off_h * stride_ah, P, N, start_n, sm_scale, qk_scale,
                  stride_qn, stride_kn, stride_vn, stride_dn, stride_dkn, stride_dvn, stride_an,
                  HEAD_DIM, BLOCK_M, BLOCK_N, ATOMIC_DQ, DOT_PRECISION)


@triton.jit
def _prefix_attention_varlen_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, CU_SEQLENS, PLEN, DQ, sm_scale, qk_scale, T,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dn, stride_dh,
        stride_dqn, stride_dqh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """One program = one query tile of one (image, h): dq. Grid (cdiv(max_seqlen, BLOCK_M), H, S)."""
    off_h, start, N, P, Q, K, V, stats = _image_prologue(Q, K, V, CU_SEQLENS, PLEN, T, stride_qn, stride_qh,
                                                         stride_kn, stride_kh, stride_vn, stride_vh)
    start_m = _query_tile_start(BLOCK_M)
    if start_m >= N:
        return
    _dq_program(Q, K, V, DO + start * stride_dn + off_h * stride_dh, LSE + stats, DELTA + stats,
                DQ + start * stride_dqn + off_h * stride_dqh, P, N, start_m, sm_scale, qk_scale,
                stride_qn, stride_kn, stride_vn, stride_dn, stride_dqn, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)


@triton.jit
def _prefix_attention_varlen_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, CU_SEQLENS, PLEN, DK, DV, DQ, sm_scale, qk_scale, T, N_KEY_TILES, N_QUERY_TILES,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dn, stride_dh,
        stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_dqn, stride_dqh,
        HEAD_DIM: tl.constexpr, KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr, Q_BLOCK_M: tl.constexpr,
        Q_BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The "fused" backward of a pack: one launch, grid (N_QUERY_TILES + N_KEY_TILES, H, S) over
    max_seqlen: the dq programs (late query tiles first), then the dk/dv programs."""
    off_h, start, N, P, Q, K, V, stats = _image_prologue(Q, K, V, CU_SEQLENS, PLEN, T, stride_qn, stride_qh,
                                                         stride_kn, stride_kh, stride_vn, stride_vh)
    pid = tl.program_id(0)
    DO += start * stride_dn + off_h * stride_dh
    if pid < N_QUERY_TILES:
        start_m = (N_QUERY_TILES - 1 - pid) * Q_BLOCK_M
        if start_m < N:
            _dq_program(Q, K, V, DO, LSE + stats, DELTA + stats, DQ + start * stride_dqn + off_h * stride_dqh, P, N,
                        start_m, sm_scale, qk_scale, stride_qn, stride_kn, stride_vn, stride_dn, stride_dqn,
                        HEAD_DIM, Q_BLOCK_M, Q_BLOCK_N, DOT_PRECISION)
    else:
        start_n = (pid - N_QUERY_TILES) * KV_BLOCK_N
        if start_n < N:
            _dkdv_program(Q, K, V, DO, LSE + stats, DELTA + stats, DK + start * stride_dkn + off_h * stride_dkh,
                          DV + start * stride_dvn + off_h * stride_dvh, DQ, P, N, start_n, sm_scale, qk_scale,
                          stride_qn, stride_kn, stride_vn, stride_dn, stride_dkn, stride_dvn, 0,
                          HEAD_DIM, KV_BLOCK_M, KV_BLOCK_N, False, DOT_PRECISION)


# ----------------------------------------------------------------------------- host launchers
def _varlen_fwd_launch(q, k, v, cu_seqlens, plen, max_seqlen: int, scale: float, out=None, lse=None, cfg=None):
    """q, k, v (T, H, D) (last dim contiguous) -> out (T, H, D), lse (H, T) fp32 (log2 units).

    out / lse may be given (tests poison them); lse must be contiguous.
    """
    T, H, D = q.shape
    S = cu_seqlens.numel() - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device) if lse is None else lse
    cfg = cfg or _tiles(D, q.dtype, q.device, max_seqlen)
    t = cfg.fwd
    _prefix_attention_varlen_fwd_kernel[(_cdiv(max_seqlen, t.block_m), H, S)](
        q, k, v, cu_seqlens, plen, out, lse, scale * _LOG2E, T,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, DOT_PRECISION=_dot_precision(q.dtype),
        USE_TMA=_use_tma(cfg, q, k, v), num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def _varlen_bwd_launch(dout, q, k, v, out, lse, cu_seqlens, plen, max_seqlen: int, scale: float,
                       dq=None, dk=None, dv=None, cfg=None):
    """Gradients (dq, dk, dv), each (T, H, D) contiguous in q's dtype: the fixed kernel's delta pre-pass
    over all T rows (as B = 1), then the configured backward (split, fused or atomic, as the fixed op)."""
    T, H, D = q.shape
    S = cu_seqlens.numel() - 1
    dq, dk, dv = (torch.empty_like(q, memory_format=torch.contiguous_format) if g is None else g
                  for g in (dq, dk, dv))
    cfg = cfg or _tiles(D, q.dtype, q.device, max_seqlen)
    mode = _bwd_mode(cfg)
    prec = _dot_precision(q.dtype)
    dq_acc = torch.empty(T, H, D, dtype=torch.float32, device=q.device) if mode == "atomic" else None
    delta = _delta_launch(out.transpose(0, 1)[None], dout.transpose(0, 1)[None], cfg.delta,
                          None if dq_acc is None else dq_acc.transpose(0, 1)[None])[0]    # (H, T)
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *dout.stride()[:2])
    kv, qt = cfg.dkdv, cfg.dq
    if mode == "fused":
        n_kv, n_q = _cdiv(max_seqlen, kv.block_n), _cdiv(max_seqlen, qt.block_m)
        _prefix_attention_varlen_bwd_kernel[(n_q + n_kv, H, S)](
            q, k, v, dout, lse, delta, cu_seqlens, plen, dk, dv, dq, scale, scale * _LOG2E, T, n_kv, n_q,
            *strides, *dk.stride()[:2], *dv.stride()[:2], *dq.stride()[:2],
            HEAD_DIM=D, KV_BLOCK_M=kv.block_m, KV_BLOCK_N=kv.block_n, Q_BLOCK_M=qt.block_m, Q_BLOCK_N=qt.block_n,
            DOT_PRECISION=prec, num_warps=kv.num_warps, num_stages=kv.num_stages)
        return dq, dk, dv
    acc = dq_acc if dq_acc is not None else delta                   # (not read without ATOMIC_DQ)
    _prefix_attention_varlen_bwd_dkdv_kernel[(_cdiv(max_seqlen, kv.block_n), H, S)](
        q, k, v, dout, lse, delta, cu_seqlens, plen, dk, dv, acc, scale, scale * _LOG2E, T,
        *strides, *dk.stride()[:2], *dv.stride()[:2], *(acc.stride()[:2] if dq_acc is not None else (0, 0)),
        HEAD_DIM=D, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, ATOMIC_DQ=dq_acc is not None, DOT_PRECISION=prec,
        num_warps=kv.num_warps, num_stages=kv.num_stages)
    if dq_acc is not None:
        return dq.copy_(dq_acc), dk, dv
    _prefix_attention_varlen_bwd_dq_kernel[(_cdiv(max_seqlen, qt.block_m), H, S)](
        q, k, v, dout, lse, delta, cu_seqlens, plen, dq, scale, scale * _LOG2E, T,
        *strides, *dq.stride()[:2],
        HEAD_DIM=D, BLOCK_M=qt.block_m, BLOCK_N=qt.block_n, DOT_PRECISION=prec,
        num_warps=qt.num_warps, num_stages=qt.num_stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------- registered ops
# A torch.library op for torch.compile and an autograd.Function twin for eager calls, as the fixed op.
def _varlen_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     prefix_len: torch.Tensor, max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (T, H, D), lse (H, T) fp32 in log2 units (scaled scores)."""
    T, H, D = q.shape
    check_pack_values(cu_seqlens, prefix_len, T, max_seqlen)
    if q.numel() == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_zeros(H, T, dtype=torch.float32)
    if _interpreter_needs_fp32(q):
        out32, lse = _varlen_fwd_launch(q.float(), k.float(), v.float(), cu_seqlens, prefix_len, max_seqlen, scale)
        return out32.to(q.dtype), lse
    return _varlen_fwd_launch(q, k, v, cu_seqlens, prefix_len, max_seqlen, scale)


def _varlen_bwd_into(dout, q, k, v, out, lse, cu_seqlens, prefix_len, max_seqlen: int, scale: float,
                     dq, dk, dv) -> None:
    """dq, dk, dv (T, H, D), any strides with a contiguous last dim, written in place."""
    if q.numel() == 0:
        for g in (dq, dk, dv):
            g.zero_()
        return
    dout = last_dim_contiguous(dout)
    if _interpreter_needs_fp32(q):
        grads = _varlen_bwd_launch(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, cu_seqlens,
                                   prefix_len, max_seqlen, scale)
        for g, g32 in zip((dq, dk, dv), grads):
            g.copy_(g32)
        return
    _varlen_bwd_launch(dout, q, k, v, out, lse, cu_seqlens, prefix_len, max_seqlen, scale, dq=dq, dk=dk, dv=dv)


def _varlen_bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, cu_seqlens: torch.Tensor, prefix_len: torch.Tensor, max_seqlen: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, each (T, H, D) contiguous."""
    grads = tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    _varlen_bwd_into(dout, q, k, v, out, lse, cu_seqlens, prefix_len, max_seqlen, scale, *grads)
    return grads


def _varlen_fwd_qkv_impl(qkv: torch.Tensor, cu_seqlens: torch.Tensor, prefix_len: torch.Tensor, max_seqlen: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (T, 3, H, D) -> out (T, H, D), lse (H, T)."""
    return _varlen_fwd_impl(*qkv.unbind(1), cu_seqlens, prefix_len, max_seqlen, scale)


def _varlen_bwd_qkv_impl(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         cu_seqlens: torch.Tensor, prefix_len: torch.Tensor, max_seqlen: int,
                         scale: float) -> torch.Tensor:
    """-> d_qkv (T, 3, H, D) contiguous, dq, dk, dv written straight into its slots (no stack)."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)        # (T, 3, H, D)
    _varlen_bwd_into(dout, *qkv.unbind(1), out, lse, cu_seqlens, prefix_len, max_seqlen, scale, *dqkv.unbind(1))
    return dqkv


_varlen_fwd_op = torch.library.custom_op("aimv2::prefix_attention_varlen_fwd", _varlen_fwd_impl, mutates_args=())
_varlen_bwd_op = torch.library.custom_op("aimv2::prefix_attention_varlen_bwd", _varlen_bwd_impl, mutates_args=())


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, prefix_len, max_seqlen, scale):
    T, H, D = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(H, T, dtype=torch.float32)


@_varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, prefix_len, max_seqlen, scale):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, prefix_len, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_seqlens, prefix_len, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward_by(bwd):
    """The autograd rule, with the backward called through `bwd` (the registered op or its impl)."""
    def backward(ctx, dout, dlse):
        # lse is an internal output (the public op returns only `out`): its gradient is never used.
        q, k, v, cu_seqlens, prefix_len, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_seqlens, prefix_len, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None, None
    return backward


_varlen_fwd_op.register_autograd(_backward_by(_varlen_bwd_op), setup_context=_setup_context)

_varlen_qkv_fwd_op = torch.library.custom_op("aimv2::prefix_attention_varlen_qkv_fwd", _varlen_fwd_qkv_impl,
                                             mutates_args=())
_varlen_qkv_bwd_op = torch.library.custom_op("aimv2::prefix_attention_varlen_qkv_bwd", _varlen_bwd_qkv_impl,
                                             mutates_args=())


@_varlen_qkv_fwd_op.register_fake
def _(qkv, cu_seqlens, prefix_len, max_seqlen, scale):
    T, _, H, D = qkv.shape
    return qkv.new_empty(T, H, D), qkv.new_empty(H, T, dtype=torch.float32)


@_varlen_qkv_bwd_op.register_fake
def _(dout, qkv, out, lse, cu_seqlens, prefix_len, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


def _setup_qkv_context(ctx, inputs, output):
    qkv, cu_seqlens, prefix_len, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, cu_seqlens, prefix_len, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _qkv_backward_by(bwd):
    def backward(ctx, dout, dlse):
        qkv, cu_seqlens, prefix_len, out, lse = ctx.saved_tensors
        return bwd(dout, qkv, out, lse, cu_seqlens, prefix_len, ctx.max_seqlen, ctx.scale), None, None, None, None
    return backward


_varlen_qkv_fwd_op.register_autograd(_qkv_backward_by(_varlen_qkv_bwd_op), setup_context=_setup_qkv_context)


_VarlenAttentionEager = _eager_twin("_VarlenAttentionEager", _varlen_fwd_impl, _setup_context,
                                    _backward_by(_varlen_bwd_impl))
_VarlenAttentionQKVEager = _eager_twin("_VarlenAttentionQKVEager", _varlen_fwd_qkv_impl, _setup_qkv_context,
                                       _qkv_backward_by(_varlen_bwd_qkv_impl))


# ----------------------------------------------------------------------------- public op
def _check_inputs(q, k, v, cu_seqlens, max_seqlen, prefix_len) -> None:
    _check_qkv(q, k, v, "(T, H, D)")
    T, H, D = q.shape
    for name, t in (("cu_seqlens", cu_seqlens), ("prefix_len", prefix_len)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected an int32 tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype int32, got {str(t.dtype).replace('torch.', '')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected shape (S + 1,), got {tuple(cu_seqlens.shape)}")
    S = cu_seqlens.numel() - 1
    if tuple(prefix_len.shape) != (S,):
        raise ValueError(f"prefix_len: expected shape (S,) = ({S},) (one per image of cu_seqlens), "
                         f"got {tuple(prefix_len.shape)}")
    if S > 65535 or H > 65535:
        raise ValueError(f"S={S} images and H={H} heads must each be <= 65535 (launch grid limit)")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen: expected a Python int (never read from a device tensor), "
                        f"got {type(max_seqlen).__name__}")
    if max_seqlen < (1 if S else 0):
        raise ValueError(f"max_seqlen: expected >= 1, got {max_seqlen}")
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens, prefix_len=prefix_len)
    check_launchable(q)


def prefix_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, prefix_len: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Prefix-causal flash attention over images packed into one sequence: query i of image s sees key
    j iff j is in image s and (j - cu_seqlens[s] < prefix_len[s] or j <= i).

    q, k, v: (T, H, D), fp16 / bf16 / fp32, D in (16, 32, 64, 128), any strides with a contiguous last
    dim (e.g. `qkv.view(T, 3, H, D).unbind(1)`, no copies). cu_seqlens: int32 (S + 1,), 0 first,
    strictly increasing, T last. max_seqlen: a Python int >= the longest image (sizes the launch grid;
    never read from the device). prefix_len: int32 (S,), prefix_len[s] in [0, len_s] (0 causal, len_s
    bidirectional). Value checks run on CPU tensors only (on CUDA they would sync the host).
    scale: default 1 / sqrt(D). Returns (T, H, D) in q's dtype, contiguous.
    Differentiable in q, k, v; works under torch.compile(fullgraph=True).
    Equivalent PyTorch: prefix_attention_varlen_ref(q, k, v, cu_seqlens, prefix_len, scale).
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, prefix_len)
    scale = _scale(q, scale)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    op = _varlen_fwd_op if use_registered_op() else _VarlenAttentionEager.apply
    out, _ = op(q, k, v, cu_seqlens.contiguous(), prefix_len.contiguous(), max_seqlen, scale)
    return out


def prefix_attention_varlen_qkvpacked(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                      prefix_len: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`prefix_attention_varlen` on the fused projection's output qkv (T, 3, H, D) -> (T, H, D). The
    backward returns d_qkv as one (T, 3, H, D) tensor written by the kernels (with `qkv.unbind(1)` views,
    autograd would stack dq, dk, dv into it: one more pass of 3·T·H·D elements).
    Equivalent PyTorch: prefix_attention_varlen_ref(*qkv.unbind(1), cu_seqlens, prefix_len, scale).
    """
    check_float("qkv", qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv: expected a 4-D tensor (T, 3, H, D), got shape {tuple(qkv.shape)}")
    qkv = last_dim_contiguous(qkv)
    q, k, v = qkv.unbind(1)
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, prefix_len)
    op = _varlen_qkv_fwd_op if use_registered_op() else _VarlenAttentionQKVEager.apply
    out, _ = op(qkv, cu_seqlens.contiguous(), prefix_len.contiguous(), max_seqlen, _scale(q, scale))
    return out


def _scale(q: torch.Tensor, scale) -> float:
    """The softmax scale: default 1 / sqrt(D)."""
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return float(scale)
