"""Prefix-causal flash attention (method.md §2): Triton forward and backward, per-sample prefixes.

Query i of sample b sees key j iff  j < P_b  or  j <= i.
P_b = 0 is causal attention; P_b = N is full bidirectional attention.

    S = scale * Q K^T  (masked to -inf where invisible),  A = softmax(S, -1),  O = A V
    dV = A^T dO,  dA = dO V^T,  dS = A * (dA - delta),  delta = rowsum(dO * O),
    dQ = scale * dS K,  dK = scale * dS^T Q

Shapes: q, k, v (B, H, N, D), any strides with a contiguous last dim (views of a fused qkv
projection work without copies), fp16 / bf16 / fp32, D in (16, 32, 64, 128), any N >= 1;
prefix_len an int or an int tensor (B,) with values in [0, N]. Output (B, H, N, D) in q's dtype,
stored as (B, N, H, D) so `out.transpose(1, 2).reshape(B, N, H * D)` is free.

Flash-style (FA2): one program per (query tile, h, b) runs an online softmax in fp32 with exp2
(log2(e) folded into the scale) and saves the log-sum-exp (B, H, N) for the backward; no N x N
tensor exists. Per query tile [m, m + BLOCK_M) the visible keys are [0, max(P, m + BLOCK_M)):
key tiles past that are never loaded; key tiles every query of the tile sees whole (inside the
prefix, or at or below the tile's first query) run a loop with no per-element mask; only tiles
crossing the prefix edge, the diagonal or N are masked. The forward loads its q, k, v tiles by
pointer tiles or, with `_AttentionTiles.fwd_tma`, through tensor descriptors of the sequence's rows
(TMA copies on Hopper; pointer loads where the inputs' alignment or the GPU rules TMA out, with the
reason logged). Backward: the delta pre-pass, then dk/dv
programs (one per key tile; it visits the query tiles that see it: all queries when the tile
starts inside the prefix, else queries >= its first key) and dq programs (the forward's key tiles),
with the same split into unmasked and masked loops, in one of three forms (`_AttentionTiles.bwd`):
"split" (a dk/dv launch and a dq launch; the default), "fused" (one launch holding both kinds of
program, as FlexAttention's backward) or "atomic" (the dk/dv programs also add dS K into an fp32 dq
buffer that the delta pre-pass zeroes: 5 tile GEMMs instead of 7, no second pass over K and V; not
bit-reproducible, so torch.use_deterministic_algorithms(True) runs "split" instead). Tiles and the
form come from a committed table keyed by (compute capability, D, length bucket, dtype) that
benchmarks/sweep_attention.py writes from GPU rows (kernels/_attention_table.py), else fixed
defaults. fp32 inputs use true fp32 dots. docs/attention.md says how a configuration is chosen.

Registered as torch.library custom ops aimv2::prefix_attention_fwd / _bwd (fake + autograd), so
torch.compile(fullgraph=True) traces through with no graph break; eager calls run the same
implementation and autograd rule as an autograd.Function, which skips the library's dispatch
(host CPU time per fwd+bwd call, launches stubbed, on a loaded 2-core CPU: 259 -> 108 us;
benchmarks/results/attention_host-cpu-2026-12-06.json, docs/attention.md).
Limits: B, H <= 65535 (launch grid); a CUDA prefix tensor is not range-checked (that would sync
the host): out-of-range values act as clamped to [0, N]. In the Triton interpreter bf16 inputs
are computed in fp32 (the interpreter's bf16 tl.dot is broken) and stored as bf16.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

from ._compat import tl, triton
from ._utils import Tiles, check_float, check_launchable, check_same_device, is_interpreting, \
    last_dim_contiguous, use_registered_op

_LOG2E = 1.4426950408889634
_log = logging.getLogger(__name__)


def prefix_mask(prefix_len, B: int, N: int, device=None) -> torch.Tensor:
    """Dense boolean mask (B, 1, N, N): True where query i may attend key j."""
    if isinstance(prefix_len, torch.Tensor):
        plen = prefix_len.to(device=device).reshape(B, 1, 1, 1)
    else:
        plen = torch.full((B, 1, 1, 1), int(prefix_len), device=device)
    i = torch.arange(N, device=device).view(1, 1, N, 1)
    j = torch.arange(N, device=device).view(1, 1, 1, N)
    return (j < plen) | (j <= i)


def prefix_attention_ref(q, k, v, prefix_len, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch specification with the dense mask (fp32, or fp64 for fp64 inputs)."""
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bhid,bhjd->bhij", q.to(cdt), k.to(cdt)) * scale
    s = s.masked_fill(~prefix_mask(prefix_len, B, N, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p, v.to(cdt)).to(q.dtype)


# ----------------------------------------------------------------------------- Triton kernels
# Scores are kept in log2 units: s2 = (q . k) * scale * log2(e), p = exp2(s2 - m). The saved
# LSE is in the same units: lse2 = m + log2(l), so the backward recomputes p = exp2(s2 - lse2).
# Visibility of key j to query i:  (j < P) | (j <= i)  -- applied only on tiles that need it.
# Each kernel is a prologue that finds its sequence (here sample b: rows [0, N) of batch entry b) and
# moves the pointers to its first row, then a `_*_program` body on positions local to that sequence.
# The packed variable-length kernels (prefix_attention_varlen.py) share the bodies, and so every tile
# loop below, with their own prologue: a sequence is image s of the pack, N its length.


@triton.jit
def _visible(q_pos, k_pos, P):
    """Key position k_pos is visible to query position q_pos (broadcastable) with prefix P."""
    return (k_pos < P) | (k_pos <= q_pos)


@triton.jit
def _bh_prologue(Q, K, V, PLEN, N, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh):
    """The program's sample b (grid axis 2) and head h (axis 1), as int64; its prefix P clamped to
    [0, N] (no out-of-bounds access on a bad P); Q, K, V moved to (b, h); and the offset of its rows
    in the (B, H, N) fp32 lse / delta."""
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    P = tl.minimum(tl.maximum(tl.load(PLEN + off_b).to(tl.int32), 0), N)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    return off_b, off_h, P, Q, K, V, (off_b * tl.num_programs(1) + off_h) * N


@triton.jit
def _query_tile_start(BLOCK_M: tl.constexpr):
    """First query row of the program's tile: grid axis 0 enumerates query tiles, heavy (late) ones first."""
    return (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M


@triton.jit
def _query_tile(Q, stride_qn, P, N, start_m, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr = False):
    """The query tile [start_m, start_m + BLOCK_M): its row offsets, head-dim offsets, rows < N,
    q (BLOCK_M, HEAD_DIM) (0 past N), and the bounds of its key tiles: [0, full_end) are seen whole
    by every query of the tile (no mask), [full_end, hi) need the mask, keys >= hi are seen by none.
    USE_TMA: Q is a tensor descriptor of the sequence's (N, HEAD_DIM) rows (`_row_descriptor`)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    if USE_TMA:
        q = Q.load([start_m, 0])                                              # rows >= N read as 0
    else:
        q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    # A key tile [n, n + BLOCK_N) is seen whole by every query of the tile iff n + BLOCK_N <= P
    # (all in the prefix) or n + BLOCK_N <= start_m + 1 (all at or below the first query).
    full_end = (tl.maximum(P, start_m + 1) // BLOCK_N) * BLOCK_N
    # No query of the tile sees keys at or past max(P, last query + 1).
    hi = tl.minimum(tl.maximum(P, start_m + BLOCK_M), N)
    return offs_m, offs_d, row_ok, q, full_end, hi


@triton.jit
def _query_tile_bounds(P, start_n, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles of key tile [start_n, start_n + BLOCK_N), on the grid q_lo + k * BLOCK_M:
    [q_lo, full_lo) need the mask, [full_lo, full_hi) see every real key of the tile, [full_hi, N)
    is the masked tail past the last whole tile; queries < q_lo see none of its keys."""
    # Queries that see some key of this tile: all of them if the tile starts inside the prefix,
    # else only queries >= start_n.
    q_lo = tl.where(start_n < P, 0, start_n)
    # Query tile [m, m + BLOCK_M) sees every real key of the tile iff its last real key is in the
    # prefix or m >= that key; full_lo is the first such tile start on the q_lo + k * BLOCK_M grid.
    last_key = tl.minimum(start_n + BLOCK_N, N) - 1
    full_lo = tl.where(last_key < P, 0, q_lo + tl.cdiv(last_key - q_lo, BLOCK_M) * BLOCK_M)
    full_hi = full_lo + tl.maximum(N - full_lo, 0) // BLOCK_M * BLOCK_M   # whole tiles inside N
    return q_lo, full_lo, full_hi


@triton.jit
def _fwd_key_tiles(acc, l_i, m_i, q, K, stride_kn, V, stride_vn, offs_m, offs_d, P, N, lo, hi,
                   qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   USE_TMA: tl.constexpr = False):
    """Online-softmax update of one query tile over key tiles [lo, hi) (lo a multiple of BLOCK_N).
    USE_TMA: K, V are tensor descriptors of the sequence's (N, HEAD_DIM) rows (`_row_descriptor`),
    whose loads give 0 for rows >= N as the masked pointer loads do."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if USE_TMA:
            kT = tl.trans(K.load([start_n, 0]))                               # (D, BLOCK_N)
            v = V.load([start_n, 0])                                          # (BLOCK_N, D)
        elif MASKED:
            kT_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None]       # (D, BLOCK_N)
            v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]        # (BLOCK_N, D)
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < N, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < N, other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None])
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :])
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale            # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], P) & (offs_n[None, :] < N)
            s = tl.where(visible, s, float("-inf"))
        # every row sees key 0, which lies in the first tile visited, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _row_descriptor(X, N, stride_xn, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """A tensor descriptor (TMA on Hopper) of one sequence's rows of one head: X points at row 0,
    shape (N, HEAD_DIM), row stride stride_xn, loads of (BLOCK, HEAD_DIM) tiles; rows >= N read as 0.
    Needs X and stride_xn 16-byte aligned (the host's `_tma_unusable` checks)."""
    return tl.make_tensor_descriptor(X, shape=[N, HEAD_DIM], strides=[stride_xn, 1], block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _fwd_program(Q, K, V, OUT, LSE, P, N, qk_scale, stride_qn, stride_kn, stride_vn, stride_on,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Forward of the program's query tile in one sequence of length N (prefix P) and one head:
    Q, K, V, OUT point at the sequence's first row of that head, LSE at its first fp32 stat.
    USE_TMA: q, k, v tiles are loaded through tensor descriptors (TMA) instead of pointer tiles."""
    if USE_TMA:
        q_src = _row_descriptor(Q, N, stride_qn, HEAD_DIM, BLOCK_M)
        k_src = _row_descriptor(K, N, stride_kn, HEAD_DIM, BLOCK_N)
        v_src = _row_descriptor(V, N, stride_vn, HEAD_DIM, BLOCK_N)
    else:
        q_src, k_src, v_src = Q, K, V
    offs_m, offs_d, row_ok, q, full_end, hi = _query_tile(q_src, stride_qn, P, N, _query_tile_start(BLOCK_M),
                                                          HEAD_DIM, BLOCK_M, BLOCK_N, USE_TMA=USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, k_src, stride_kn, v_src, stride_vn, offs_m, offs_d, P, N,
                                   0, full_end, qk_scale, BLOCK_N, False, DOT_PRECISION, USE_TMA=USE_TMA)
    acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, k_src, stride_kn, v_src, stride_vn, offs_m, offs_d, P, N,
                                   full_end, hi, qk_scale, BLOCK_N, True, DOT_PRECISION, USE_TMA=USE_TMA)

    out = acc / l_i[:, None]
    tl.store(OUT + offs_m[:, None] * stride_on + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _prefix_attention_fwd_kernel(
        Q, K, V, PLEN, OUT, LSE, qk_scale, N,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One program = one query tile of one (b, h). Grid (cdiv(N, BLOCK_M), H, B)."""
    off_b, off_h, P, Q, K, V, stats = _bh_prologue(Q, K, V, PLEN, N, stride_qb, stride_qh,
                                                   stride_kb, stride_kh, stride_vb, stride_vh)
    _fwd_program(Q, K, V, OUT + off_b * stride_ob + off_h * stride_oh, LSE + stats, P, N, qk_scale,
                 stride_qn, stride_kn, stride_vn, stride_on, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, USE_TMA)


@triton.jit
def _prefix_attention_bwd_delta_kernel(
        OUT, DO, DELTA, DQ_ACC, N, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
        stride_ab, stride_ah, stride_an, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        ZERO_DQ: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O (fp32); with ZERO_DQ also zeroes the same rows of the fp32 dq
    accumulator DQ_ACC (the "atomic" backward adds into it). Grid (cdiv(N, BLOCK_M), H, B)."""
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    o = tl.load(OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + (off_b * tl.num_programs(1) + off_h) * N + offs_m, tl.sum(o * do, 1), mask=row_ok)
    if ZERO_DQ:
        tl.store(DQ_ACC + off_b * stride_ab + off_h * stride_ah + offs_m[:, None] * stride_an + offs_d[None, :],
                 tl.zeros([BLOCK_M, HEAD_DIM], tl.float32), mask=row_ok[:, None])


@triton.jit
def _dkdv_query_tiles(dk, dv, k, v, Q, stride_qn, DO, stride_don, LSE, DELTA, DQ_ACC, stride_an, sm_scale,
                      ATOMIC_DQ: tl.constexpr, offs_n, offs_d, P, N, lo, hi, qk_scale, BLOCK_M: tl.constexpr,
                      MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv of one key tile over query tiles starting at lo, lo + BLOCK_M, ... < hi;
    with ATOMIC_DQ also add each query tile's dq share, scale * dS K (BLOCK_M, D), into the fp32
    accumulator DQ_ACC (the "atomic" backward: no second pass over K and V for dq)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT_ptrs = Q + offs_m[None, :] * stride_qn + offs_d[:, None]           # (D, BLOCK_M)
        do_ptrs = DO + offs_m[:, None] * stride_don + offs_d[None, :]         # (BLOCK_M, D)
        if MASKED:
            row_ok = offs_m < N
            qT = tl.load(qT_ptrs, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale          # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            visible = _visible(offs_m[None, :], offs_n[:, None], P) & (offs_m[None, :] < N)
            pT = tl.where(visible, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)          # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT).to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale  # (BLOCK_M, D)
            acc_ptrs = DQ_ACC + offs_m[:, None] * stride_an + offs_d[None, :]
            if MASKED:
                tl.atomic_add(acc_ptrs, dq, mask=(offs_m < N)[:, None], sem="relaxed")
            else:
                tl.atomic_add(acc_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, P, N, start_n, sm_scale, qk_scale,
                  stride_qn, stride_kn, stride_vn, stride_dn, stride_dkn, stride_dvn, stride_an,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv of key tile [start_n, start_n + BLOCK_N) in one sequence of length N (prefix P) and one
    head (with ATOMIC_DQ also its share of dq, added into DQ_ACC): every pointer at the sequence's
    first row of that head (LSE, DELTA: its first fp32 stat)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < N
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # (Padded keys >= N only produce dk/dv rows that are never stored: no key masking needed.)
    q_lo, full_lo, full_hi = _query_tile_bounds(P, start_n, N, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_query_tiles(dk, dv, k, v, Q, stride_qn, DO, stride_dn, LSE, DELTA, DQ_ACC, stride_an, sm_scale,
                               ATOMIC_DQ, offs_n, offs_d, P, N, q_lo, tl.minimum(full_lo, N), qk_scale, BLOCK_M,
                               True, DOT_PRECISION)
    dk, dv = _dkdv_query_tiles(dk, dv, k, v, Q, stride_qn, DO, stride_dn, LSE, DELTA, DQ_ACC, stride_an, sm_scale,
                               ATOMIC_DQ, offs_n, offs_d, P, N, full_lo, full_hi, qk_scale, BLOCK_M,
                               False, DOT_PRECISION)
    dk, dv = _dkdv_query_tiles(dk, dv, k, v, Q, stride_qn, DO, stride_dn, LSE, DELTA, DQ_ACC, stride_an, sm_scale,
                               ATOMIC_DQ, offs_n, offs_d, P, N, full_hi, N, qk_scale, BLOCK_M,
                               True, DOT_PRECISION)
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def _prefix_attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, PLEN, DK, DV, DQ_ACC, sm_scale, qk_scale, N,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
        stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_ab, stride_ah, stride_an,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program = one key tile of one (b, h): dk, dv (and with ATOMIC_DQ its dq shares).
    Grid (cdiv(N, BLOCK_N), H, B)."""
    off_b, off_h, P, Q, K, V, stats = _bh_prologue(Q, K, V, PLEN, N, stride_qb, stride_qh,
                                                   stride_kb, stride_kh, stride_vb, stride_vh)
    _dkdv_program(Q, K, V, DO + off_b * stride_db + off_h * stride_dh, LSE + stats, DELTA + stats,
                  DK + off_b * stride_dkb + off_h * stride_dkh, DV + off_b * stride_dvb + off_h * stride_dvh,
                  DQ_ACC + off_b * stride_ab + off_h * stride_ah, P, N, tl.program_id(0) * BLOCK_N, sm_scale,
                  qk_scale, stride_qn, stride_kn, stride_vn, stride_dn, stride_dkn, stride_dvn, stride_an,
                  HEAD_DIM, BLOCK_M, BLOCK_N, ATOMIC_DQ, DOT_PRECISION)


@triton.jit
def _dq_key_tiles(dq, q, do, lse, delta, K, stride_kn, V, stride_vn, offs_m, offs_d, P, N, lo, hi,
                  qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dq of one query tile over key tiles [lo, hi) (lo a multiple of BLOCK_N)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None]           # (D, BLOCK_N)
        vT_ptrs = V + offs_n[None, :] * stride_vn + offs_d[:, None]           # (D, BLOCK_N)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < N, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_n[None, :] < N, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale            # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], P) & (offs_n[None, :] < N)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)                    # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_program(Q, K, V, DO, LSE, DELTA, DQ, P, N, start_m, sm_scale, qk_scale,
                stride_qn, stride_kn, stride_vn, stride_dn, stride_dqn,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """dq of query tile [start_m, start_m + BLOCK_M) in one sequence of length N (prefix P) and one
    head: every pointer at the sequence's first row of that head (LSE, DELTA: its first fp32 stat)."""
    offs_m, offs_d, row_ok, q, full_end, hi = _query_tile(Q, stride_qn, P, N, start_m, HEAD_DIM, BLOCK_M, BLOCK_N)
    do = tl.load(DO + offs_m[:, None] * stride_dn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_key_tiles(dq, q, do, lse, delta, K, stride_kn, V, stride_vn, offs_m, offs_d, P, N,
                       0, full_end, qk_scale, BLOCK_N, False, DOT_PRECISION)
    dq = _dq_key_tiles(dq, q, do, lse, delta, K, stride_kn, V, stride_vn, offs_m, offs_d, P, N,
                       full_end, hi, qk_scale, BLOCK_N, True, DOT_PRECISION)
    tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _prefix_attention_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, PLEN, DQ, sm_scale, qk_scale, N,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
        stride_dqb, stride_dqh, stride_dqn,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """One program = one query tile of one (b, h): dq. Grid (cdiv(N, BLOCK_M), H, B)."""
    off_b, off_h, P, Q, K, V, stats = _bh_prologue(Q, K, V, PLEN, N, stride_qb, stride_qh,
                                                   stride_kb, stride_kh, stride_vb, stride_vh)
    _dq_program(Q, K, V, DO + off_b * stride_db + off_h * stride_dh, LSE + stats, DELTA + stats,
                DQ + off_b * stride_dqb + off_h * stride_dqh, P, N, _query_tile_start(BLOCK_M), sm_scale, qk_scale,
                stride_qn, stride_kn, stride_vn, stride_dn, stride_dqn, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)


@triton.jit
def _prefix_attention_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, PLEN, DK, DV, DQ, sm_scale, qk_scale, N, N_KEY_TILES, N_QUERY_TILES,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
        stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_dqb, stride_dqh, stride_dqn,
        HEAD_DIM: tl.constexpr, KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr, Q_BLOCK_M: tl.constexpr,
        Q_BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The "fused" backward: one launch whose grid (N_QUERY_TILES + N_KEY_TILES, H, B) holds the dq
    programs (heavy, late query tiles first) and then the dk/dv programs, each with its own tiles."""
    off_b, off_h, P, Q, K, V, stats = _bh_prologue(Q, K, V, PLEN, N, stride_qb, stride_qh,
                                                   stride_kb, stride_kh, stride_vb, stride_vh)
    pid = tl.program_id(0)
    DO += off_b * stride_db + off_h * stride_dh
    if pid < N_QUERY_TILES:
        _dq_program(Q, K, V, DO, LSE + stats, DELTA + stats, DQ + off_b * stride_dqb + off_h * stride_dqh, P, N,
                    (N_QUERY_TILES - 1 - pid) * Q_BLOCK_M, sm_scale, qk_scale, stride_qn, stride_kn, stride_vn,
                    stride_dn, stride_dqn, HEAD_DIM, Q_BLOCK_M, Q_BLOCK_N, DOT_PRECISION)
    else:
        _dkdv_program(Q, K, V, DO, LSE + stats, DELTA + stats, DK + off_b * stride_dkb + off_h * stride_dkh,
                      DV + off_b * stride_dvb + off_h * stride_dvh, DQ, P, N, (pid - N_QUERY_TILES) * KV_BLOCK_N,
                      sm_scale, qk_scale, stride_qn, stride_kn, stride_vn, stride_dn, stride_dkn, stride_dvn, 0,
                      HEAD_DIM, KV_BLOCK_M, KV_BLOCK_N, False, DOT_PRECISION)


# ----------------------------------------------------------------------------- host launchers
@dataclass(frozen=True)
class _AttentionTiles:
    """The launch shape of each attention kernel (the delta pre-pass uses only block_m) and the
    backward's form: "split" (delta pre-pass, a dk/dv launch, a dq launch: deterministic), "fused"
    (one launch holding the dq and the dk/dv programs, each with its tiles, warps and stages of
    dkdv), or "atomic" (the dk/dv programs also add dq into an fp32 buffer, zeroed by the delta
    pre-pass and cast after: 5 GEMMs a tile instead of 7, not bit-reproducible). fwd_tma: the
    forward reads its q, k, v tiles through tensor descriptors (`tl.make_tensor_descriptor`: TMA
    copies on Hopper) instead of pointer tiles, where the inputs allow it (`_tma_unusable`)."""
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles
    delta: Tiles
    bwd: str = "split"
    fwd_tma: bool = False       # the forward loads q, k, v tiles by tensor descriptors (TMA on Hopper)


BWD_MODES = ("split", "fused", "atomic")


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device (a tensor's device always names its index)."""
    return torch.cuda.get_device_capability(device)


def n_bucket(n: int) -> int:
    """The sequence-length bucket of the configuration table: 256, 1024, or 0 (longer)."""
    return 256 if n <= 256 else 1024 if n <= 1024 else 0


def _table_config(cap: tuple[int, int], head_dim: int, n: int, dtype: torch.dtype, delta: Tiles,
                  table: dict | None = None) -> _AttentionTiles | None:
    """The committed table's configuration for this key (kernels/_attention_table.py), or None."""
    if table is None:
        from ._attention_table import TABLE as table
    entry = table.get((cap[0], cap[1], head_dim, n_bucket(n), str(dtype).removeprefix("torch.")))
    if entry is None:
        return None
    if entry.get("bwd", "split") not in BWD_MODES:
        raise ValueError(f"kernels/_attention_table.py: bwd {entry['bwd']!r} not one of {BWD_MODES}")
    return _AttentionTiles(fwd=Tiles(*entry["fwd"]), dkdv=Tiles(*entry["dkdv"]), dq=Tiles(*entry["dq"]),
                           delta=delta, bwd=entry.get("bwd", "split"), fwd_tma=bool(entry.get("fwd_tma", False)))


def _tiles(head_dim: int, dtype: torch.dtype, device: torch.device, n: int | None = None) -> _AttentionTiles:
    """`_tiles_for` (the configuration of every launch), cached: a lookup is a dict hit per call."""
    return _tiles_for(head_dim, dtype, device, n, is_interpreting())


@functools.lru_cache(maxsize=4096)
def _tiles_for(head_dim: int, dtype: torch.dtype, device: torch.device, n: int | None,
               interpreting: bool) -> _AttentionTiles:
    """Tile shapes per kernel: the committed table's entry for (compute capability, head dim,
    sequence-length bucket of n, dtype) (kernels/_attention_table.py, written by
    benchmarks/sweep_attention.py from its GPU rows), else the fixed defaults below.

    Interpreter: the cost is per program x op, so tiles are large, but BLOCK_M != BLOCK_N so the
    diagonal crosses several key tiles and every loop (unmasked, masked, N tail) runs on N ~ 17-97.
    GPU defaults: FA2-in-Triton shapes (fwd 128x64, dk/dv with 128-key tiles, dq with 128-query
    tiles; 8 warps = one warpgroup per 64 rows of a 128-row wgmma), backward "split".
    NOTE (a compile-only check, not timed): compiled for sm_90a with triton 3.6 and 3.7.1 and
    specialised as the real launch at AIMv2-L shapes (bf16, D=128, N=256, integer arguments
    divisible by 16; benchmarks/ptxas_attention.py), the forward uses 128 KiB of shared memory and
    the backward dk/dv and dq kernels 96 KiB, with 0 spill bytes and wgmma on every dot.
    """
    if interpreting:
        return _AttentionTiles(fwd=Tiles(32, 16, 4, 1), dkdv=Tiles(16, 32, 4, 1), dq=Tiles(32, 16, 4, 1),
                               delta=Tiles(32, 0, 4, 1))
    cap = _capability(device)
    major = cap[0]
    stages = 3 if major >= 9 else 2
    delta = Tiles(max(16, 4096 // head_dim), 0, 4, 1)       # 64 rows at D=64: no spills
    chosen = None if n is None else _table_config(cap, head_dim, n, dtype, delta)
    if chosen is not None:
        return chosen
    if dtype == torch.float32:
        w = 8 if head_dim > 64 else 4
        return _AttentionTiles(fwd=Tiles(32, 32, w, 2), dkdv=Tiles(16, 32, w, 2), dq=Tiles(32, 32, w, 2),
                               delta=delta)
    if major < 8:                   # small shared memory (e.g. T4): small tiles
        return _AttentionTiles(fwd=Tiles(64, 32, 4, 2), dkdv=Tiles(32, 64, 4, 2), dq=Tiles(64, 32, 4, 2),
                               delta=delta)
    if head_dim <= 64:
        return _AttentionTiles(fwd=Tiles(128, 64, 4, stages), dkdv=Tiles(32, 128, 8, stages),
                               dq=Tiles(128, 32, 8, stages), delta=delta)
    return _AttentionTiles(fwd=Tiles(128, 64, 8, stages), dkdv=Tiles(32, 128, 8, 2), dq=Tiles(128, 32, 8, 2),
                           delta=delta)


def _bwd_mode(cfg: _AttentionTiles) -> str:
    """The configured backward, "split" when torch.use_deterministic_algorithms(True) is on and the
    configuration adds dq atomically (fp32 additions in no fixed order)."""
    if cfg.bwd == "atomic" and torch.are_deterministic_algorithms_enabled():
        return "split"
    return cfg.bwd


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: true fp32 products (TF32 would be ~1e3x less accurate than fp32 SDPA).
    return "ieee" if dtype == torch.float32 else "tf32"


def _cdiv(a: int, b: int) -> int:
    # (triton.cdiv is a constexpr function: a few microseconds of host time per call)
    return -(-a // b)


def _bhnd_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """Empty (B, H, N, D) tensor stored as (B, N, H, D): `.transpose(1, 2).reshape(B, N, H * D)` is free."""
    B, H, N, D = t.shape
    return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), dtype=dtype or t.dtype,   # (B, H, N, D)
                               device=t.device)


def _fwd_launch(q, k, v, plen, scale: float, out=None, lse=None, cfg: _AttentionTiles | None = None):
    """q, k, v (B, H, N, D) (last dim contiguous), plen int (B,) -> out (B, H, N, D), lse (B, H, N) fp32.

    out / lse may be given (tests poison them); lse must be contiguous. cfg: the launch configuration
    (default: `_tiles`; the sweep passes its candidates).
    """
    B, H, N, D = q.shape
    out = _bhnd_like(q) if out is None else out
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if lse is None else lse
    cfg = cfg or _tiles(D, q.dtype, q.device, N)
    t = cfg.fwd
    grid = (_cdiv(N, t.block_m), H, B)
    _prefix_attention_fwd_kernel[grid](
        q, k, v, plen, out, lse, scale * _LOG2E, N,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, DOT_PRECISION=_dot_precision(q.dtype),
        USE_TMA=_use_tma(cfg, q, k, v), num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def _tma_unusable(q, k, v) -> str | None:
    """None when the forward can read q, k, v through tensor descriptors, else the reason: a TMA
    descriptor needs a 16-byte aligned base and 16-byte multiples for every stride but the last
    (the kernels move the base by whole batch / head / row strides), and a GPU of capability >= 9.0
    (the interpreter emulates descriptors on the CPU)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        size = t.element_size()
        if t.data_ptr() % 16:
            return f"{name}: data pointer not 16-byte aligned"
        for dim, stride in enumerate(t.stride()[:-1]):
            if t.shape[dim] > 1 and stride * size % 16:          # (a size-1 dim never moves the base)
                return f"{name}: stride {stride} of dim {dim} is not a multiple of 16 bytes"
    if q.device.type == "cuda" and _capability(q.device)[0] < 9:
        return "TMA needs compute capability >= 9.0"
    return None


_TMA_REASONS_LOGGED: set = set()


def _torch_scratch(size: int, alignment: int, stream):
    """Triton's runtime allocator: the global scratch its device-side tensor descriptors live in."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_tma(cfg: _AttentionTiles, *qkv) -> bool:
    """cfg asks for TMA loads in the forward and the inputs allow them (else a logged fallback to
    pointer loads). On CUDA a Triton runtime allocator is set (torch memory) when none is."""
    if not cfg.fwd_tma:
        return False
    reason = _tma_unusable(*qkv)
    if reason is not None:
        if reason not in _TMA_REASONS_LOGGED:
            _TMA_REASONS_LOGGED.add(reason)
            _log.info("prefix attention: forward without TMA loads: %s", reason)
        return False
    if qkv[0].device.type == "cuda":
        from triton.runtime import _allocation
        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_torch_scratch)
    return True


def _delta_launch(out, dout, t: Tiles, dq_acc=None) -> torch.Tensor:
    """The backward pre-pass: delta = rowsum(dout * out) (B, H, N) fp32 of out, dout (B, H, N, D);
    dq_acc (B, H, N, D) fp32, when given, is zeroed by the same programs."""
    B, H, N, D = out.shape
    delta = torch.empty(B, H, N, dtype=torch.float32, device=out.device)
    acc = delta if dq_acc is None else dq_acc
    _prefix_attention_bwd_delta_kernel[(_cdiv(N, t.block_m), H, B)](
        out, dout, delta, acc, N, *out.stride()[:3], *dout.stride()[:3],
        *(acc.stride()[:3] if dq_acc is not None else (0, 0, 0)), HEAD_DIM=D, BLOCK_M=t.block_m,
        ZERO_DQ=dq_acc is not None)
    return delta


def _bwd_launch(dout, q, k, v, out, lse, plen, scale: float, dq=None, dk=None, dv=None,
                cfg: _AttentionTiles | None = None):
    """Gradients (dq, dk, dv), each (B, H, N, D) in q's dtype: the delta pre-pass, then the
    configured backward (_AttentionTiles.bwd: split, fused or atomic)."""
    B, H, N, D = q.shape
    dq = _bhnd_like(q) if dq is None else dq
    dk = _bhnd_like(q) if dk is None else dk
    dv = _bhnd_like(q) if dv is None else dv
    cfg = cfg or _tiles(D, q.dtype, q.device, N)
    mode = _bwd_mode(cfg)
    prec = _dot_precision(q.dtype)
    dq_acc = torch.empty(B, H, N, D, dtype=torch.float32, device=q.device) if mode == "atomic" else None
    delta = _delta_launch(out, dout, cfg.delta, dq_acc)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    kv, qt = cfg.dkdv, cfg.dq
    if mode == "fused":
        n_kv, n_q = _cdiv(N, kv.block_n), _cdiv(N, qt.block_m)
        _prefix_attention_bwd_kernel[(n_q + n_kv, H, B)](
            q, k, v, dout, lse, delta, plen, dk, dv, dq, scale, scale * _LOG2E, N, n_kv, n_q,
            *strides, *dk.stride()[:3], *dv.stride()[:3], *dq.stride()[:3],
            HEAD_DIM=D, KV_BLOCK_M=kv.block_m, KV_BLOCK_N=kv.block_n, Q_BLOCK_M=qt.block_m, Q_BLOCK_N=qt.block_n,
            DOT_PRECISION=prec, num_warps=kv.num_warps, num_stages=kv.num_stages)
        return dq, dk, dv
    acc = dq_acc if dq_acc is not None else delta                   # (not read without ATOMIC_DQ)
    _prefix_attention_bwd_dkdv_kernel[(_cdiv(N, kv.block_n), H, B)](
        q, k, v, dout, lse, delta, plen, dk, dv, acc, scale, scale * _LOG2E, N,
        *strides, *dk.stride()[:3], *dv.stride()[:3], *(acc.stride()[:3] if dq_acc is not None else (0, 0, 0)),
        HEAD_DIM=D, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, ATOMIC_DQ=dq_acc is not None, DOT_PRECISION=prec,
        num_warps=kv.num_warps, num_stages=kv.num_stages)
    if dq_acc is not None:
        return dq.copy_(dq_acc), dk, dv
    _prefix_attention_bwd_dq_kernel[(_cdiv(N, qt.block_m), H, B)](
        q, k, v, dout, lse, delta, plen, dq, scale, scale * _LOG2E, N,
        *strides, *dq.stride()[:3],
        HEAD_DIM=D, BLOCK_M=qt.block_m, BLOCK_N=qt.block_n, DOT_PRECISION=prec,
        num_warps=qt.num_warps, num_stages=qt.num_stages)
    return dq, dk, dv


def _check_prefix_values(prefix_len: torch.Tensor, N: int) -> None:
    """Range check for CPU tensors only: on CUDA it would be a host sync (the kernels clamp to [0, N])."""
    if prefix_len.device.type == "cpu" and prefix_len.numel():
        lo, hi = int(prefix_len.min()), int(prefix_len.max())
        if lo < 0 or hi > N:
            raise ValueError(f"prefix_len: values must lie in [0, N={N}], got min {lo}, max {hi}")


def _interpreter_needs_fp32(t: torch.Tensor) -> bool:
    # bf16 tl.dot gives garbage in the Triton interpreter: compute in fp32 there, store bf16.
    return t.dtype == torch.bfloat16 and is_interpreting()


# ----------------------------------------------------------------------------- registered ops
# Each op is a torch.library custom op (what torch.compile traces, with its fake implementation) and,
# for eager calls, an autograd.Function with the same implementation and autograd rule that skips the
# library's dispatch (`use_registered_op`); the public function picks.
def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, H, N, D) stored as (B, N, H, D), lse (B, H, N) fp32 in log2 units (scaled scores)."""
    B, H, N, D = q.shape
    _check_prefix_values(prefix_len, N)
    if q.numel() == 0:
        return _bhnd_like(q), q.new_zeros(B, H, N, dtype=torch.float32)
    if _interpreter_needs_fp32(q):
        out32, lse = _fwd_launch(q.float(), k.float(), v.float(), prefix_len, scale)
        return _bhnd_like(q).copy_(out32), lse
    return _fwd_launch(q, k, v, prefix_len, scale)


def _bwd_into(dout, q, k, v, out, lse, prefix_len, scale: float, dq, dk, dv) -> None:
    """dq, dk, dv (B, H, N, D), any strides with a contiguous last dim, written in place."""
    if q.numel() == 0:
        for g in (dq, dk, dv):
            g.zero_()
        return
    dout = last_dim_contiguous(dout)
    if _interpreter_needs_fp32(q):
        grads = _bwd_launch(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, prefix_len, scale)
        for g, g32 in zip((dq, dk, dv), grads):
            g.copy_(g32)
        return
    _bwd_launch(dout, q, k, v, out, lse, prefix_len, scale, dq=dq, dk=dk, dv=dv)


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, prefix_len: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """-> dq, dk, dv, each (B, H, N, D) stored as (B, N, H, D)."""
    grads = (_bhnd_like(q), _bhnd_like(q), _bhnd_like(q))
    _bwd_into(dout, q, k, v, out, lse, prefix_len, scale, *grads)
    return grads


def _qkv_views(qkv: torch.Tensor):
    """(B, N, 3, H, D) -> q, k, v, each a (B, H, N, D) view."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _fwd_qkv_impl(qkv: torch.Tensor, prefix_len: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3, H, D) -> out (B, H, N, D) stored as (B, N, H, D), lse (B, H, N)."""
    return _fwd_impl(*_qkv_views(qkv), prefix_len, scale)


def _bwd_qkv_impl(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  prefix_len: torch.Tensor, scale: float) -> torch.Tensor:
    """-> d_qkv (B, N, 3, H, D) contiguous: the kernels write dq, dk, dv straight into its three slots
    (the unbound op's gradients would be stacked and then copied into this layout by autograd)."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)        # (B, N, 3, H, D)
    _bwd_into(dout, *_qkv_views(qkv), out, lse, prefix_len, scale, *_qkv_views(dqkv))
    return dqkv


_prefix_attention_fwd_op = torch.library.custom_op("aimv2::prefix_attention_fwd", _fwd_impl, mutates_args=())
_prefix_attention_bwd_op = torch.library.custom_op("aimv2::prefix_attention_bwd", _bwd_impl, mutates_args=())


@_prefix_attention_fwd_op.register_fake
def _(q, k, v, prefix_len, scale):
    B, H, N, D = q.shape
    return _bhnd_like(q), q.new_empty(B, H, N, dtype=torch.float32)


@_prefix_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, prefix_len, scale):
    return _bhnd_like(q), _bhnd_like(q), _bhnd_like(q)


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_len, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.scale = scale


def _backward_by(bwd):
    """The autograd rule, with the backward called through `bwd` (the registered op or its impl)."""
    def backward(ctx, dout, dlse):
        # lse is an internal output (the public op returns only `out`): its gradient is never used.
        q, k, v, prefix_len, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(dout, q, k, v, out, lse, prefix_len, ctx.scale)
        return dq, dk, dv, None, None
    return backward


_prefix_attention_fwd_op.register_autograd(_backward_by(_prefix_attention_bwd_op), setup_context=_setup_context)

_prefix_attention_qkv_fwd_op = torch.library.custom_op("aimv2::prefix_attention_qkv_fwd", _fwd_qkv_impl,
                                                       mutates_args=())
_prefix_attention_qkv_bwd_op = torch.library.custom_op("aimv2::prefix_attention_qkv_bwd", _bwd_qkv_impl,
                                                       mutates_args=())


@_prefix_attention_qkv_fwd_op.register_fake
def _(qkv, prefix_len, scale):
    q = _qkv_views(qkv)[0]
    B, H, N, D = q.shape
    return _bhnd_like(q), q.new_empty(B, H, N, dtype=torch.float32)


@_prefix_attention_qkv_bwd_op.register_fake
def _(dout, qkv, out, lse, prefix_len, scale):
    return qkv.new_empty(qkv.shape)


def _setup_qkv_context(ctx, inputs, output):
    qkv, prefix_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, prefix_len, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.scale = scale


def _qkv_backward_by(bwd):
    def backward(ctx, dout, dlse):
        qkv, prefix_len, out, lse = ctx.saved_tensors
        return bwd(dout, qkv, out, lse, prefix_len, ctx.scale), None, None
    return backward


_prefix_attention_qkv_fwd_op.register_autograd(_qkv_backward_by(_prefix_attention_qkv_bwd_op),
                                               setup_context=_setup_qkv_context)


def _eager_twin(name: str, fwd_impl, setup_context, backward):
    """A registered op's eager twin: an autograd.Function with the same impl, saved tensors and backward,
    without the library dispatch (also used by prefix_attention_varlen.py). forward takes ctx: a separate
    setup_context would make every apply() inspect the signature."""
    def forward(ctx, *inputs):
        out = fwd_impl(*inputs)
        setup_context(ctx, inputs, out)
        return out
    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_PrefixAttentionEager = _eager_twin("_PrefixAttentionEager", _fwd_impl, _setup_context, _backward_by(_bwd_impl))
_PrefixAttentionQKVEager = _eager_twin("_PrefixAttentionQKVEager", _fwd_qkv_impl, _setup_qkv_context,
                                       _qkv_backward_by(_bwd_qkv_impl))


# ----------------------------------------------------------------------------- public op
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)          # head dims D the kernels are built for


def _check_qkv(q, k, v, layout: str) -> None:
    """q, k, v: float tensors of one dtype and one shape `layout` (e.g. "(B, H, N, D)"), D supported."""
    rank = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v: expected one shape {layout}, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"q: head dim D={q.shape[-1]} not supported, expected one of {ATTENTION_HEAD_DIMS}")


def _check_inputs(q, k, v, prefix_len) -> None:
    _check_qkv(q, k, v, "(B, H, N, D)")
    B, H, N, D = q.shape
    if B > 65535 or H > 65535:
        raise ValueError(f"q: B={B} and H={H} must each be <= 65535 (launch grid limit)")
    check_same_device(q=q, k=k, v=v, prefix_len=prefix_len)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.Tensor)):
        raise TypeError(f"prefix_len: expected an int or an int tensor (B,), got {type(prefix_len).__name__}")
    if isinstance(prefix_len, int):
        if not 0 <= prefix_len <= N:
            raise ValueError(f"prefix_len: {prefix_len} outside [0, N={N}]")
    else:
        if prefix_len.is_floating_point() or prefix_len.is_complex() or prefix_len.dtype == torch.bool:
            raise TypeError(f"prefix_len: expected an integer tensor, got {prefix_len.dtype}")
        if tuple(prefix_len.shape) != (B,):
            raise ValueError(f"prefix_len: expected shape ({B},), got {tuple(prefix_len.shape)}")
    check_launchable(q)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len,
                     scale: float | None = None) -> torch.Tensor:
    """Prefix-causal flash attention: query i of sample b sees key j iff j < P_b or j <= i.

    q, k, v: (B, H, N, D), fp16 / bf16 / fp32, D in (16, 32, 64, 128), any strides with a contiguous
    last dim (e.g. `qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`, no copies).
    prefix_len: int or int tensor (B,) on q's device, values in [0, N] (0 causal, N bidirectional;
    a CUDA tensor is not range-checked, which would sync: out-of-range values act as clamped).
    scale: default 1 / sqrt(D). Returns (B, H, N, D) in q's dtype, stored as (B, N, H, D).
    Differentiable in q, k, v; works under torch.compile(fullgraph=True).
    Equivalent PyTorch: prefix_attention_ref(q, k, v, prefix_len, scale).
    """
    _check_inputs(q, k, v, prefix_len)
    registered = use_registered_op()
    plen, scale = _prefix_and_scale(q, prefix_len, scale, registered)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    op = _prefix_attention_fwd_op if registered else _PrefixAttentionEager.apply
    out, _ = op(q, k, v, plen, scale)
    return out


def prefix_attention_qkvpacked(qkv: torch.Tensor, prefix_len, scale: float | None = None) -> torch.Tensor:
    """`prefix_attention` on the fused projection's output: qkv (B, N, 3, H, D) (e.g.
    `linear(x).view(B, N, 3, H, D)`) -> (B, H, N, D) stored as (B, N, H, D). The backward returns d_qkv
    as one (B, N, 3, H, D) tensor written by the kernels, where q, k, v views of qkv would cost autograd
    a stack of dq, dk, dv and a copy into that layout (2 x 3·B·N·H·D elements read and written).
    Equivalent PyTorch: prefix_attention_ref(*qkv.permute(2, 0, 3, 1, 4).unbind(0), prefix_len, scale).
    """
    check_float("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected a 5-D tensor (B, N, 3, H, D), got shape {tuple(qkv.shape)}")
    qkv = last_dim_contiguous(qkv)
    q, k, v = _qkv_views(qkv)
    _check_inputs(q, k, v, prefix_len)
    registered = use_registered_op()
    plen, scale = _prefix_and_scale(q, prefix_len, scale, registered)
    op = _prefix_attention_qkv_fwd_op if registered else _PrefixAttentionQKVEager.apply
    out, _ = op(qkv, plen, scale)
    return out


def _prefix_and_scale(q: torch.Tensor, prefix_len, scale, registered: bool) -> tuple[torch.Tensor, float]:
    """The prefix as an int32 (B,) tensor on q's device and the softmax scale (default 1 / sqrt(D))."""
    B, H, N, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    if not isinstance(prefix_len, int):
        return prefix_len.contiguous(), float(scale)
    if registered or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.full((B,), prefix_len, dtype=torch.int32, device=q.device), float(scale)      # (B,)
    return _constant_prefix(B, prefix_len, q.device), float(scale)                                # (B,)


@functools.lru_cache(maxsize=64)
def _constant_prefix(B: int, P: int, device: torch.device) -> torch.Tensor:
    """int32 (B,) filled with P, made once per (B, P, device) for eager calls with an int prefix (e.g.
    the causal decoder's 0): no allocation and fill launch per call. Never written; made outside
    inference mode so autograd may save it; never made while a CUDA graph is being captured (the fill
    would be recorded, not run)."""
    with torch.inference_mode(False):
        return torch.full((B,), P, dtype=torch.int32, device=device)
