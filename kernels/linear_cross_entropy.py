"""Fused linear + cross-entropy (the caption head's loss) that never materialises the logits.

    logits[t, v] = hidden[t] . weight[v] (+ bias[v])                  computed tile by tile in fp32
    lse[t]       = log sum_v exp(logits[t, v])
    loss_tok[t]  = lse[t] - logits[t, target[t]]      if target[t] != ignore_index, else 0
    loss         = sum_t loss_tok / max(#counted, 1)  ("mean": F.cross_entropy(ignore_index=...)
                                                      on the full logits, except that an all-ignored
                                                      batch gives 0 and zero gradients, not NaN)
                 | sum_t loss_tok                     ("sum")
                 | loss_tok                           ("none", shaped like target)

Shapes: hidden (..., D), weight (V, D), bias None or (V,), target (...) integer, matching hidden's
leading dims. hidden, weight (and bias) share one dtype (fp32, fp16 or bf16; under autocast they are
cast to the autocast dtype first, as F.linear would). The loss is fp32.

Forward: program i owns token rows [i*BLOCK_T, (i+1)*BLOCK_T) and sweeps the vocabulary in
BLOCK_V-wide tiles; each (BLOCK_T, BLOCK_V) logit tile is a tl.dot over D in BLOCK_D chunks with
fp32 accumulation, folded into an online log-sum-exp (running max and sum) and into the target's
logit (picked where the column equals the target) in the same pass. Only lse (T,) fp32 is saved.

Backward, with g[t] = d loss_tok[t] (0 where ignored) and p = exp(logits - lse):

    d_logits = g[:, None] * (p - onehot(target))               never stored: one tile at a time
    d_hidden = d_logits @ weight        d_weight = d_logits^T @ hidden        d_bias = sum_t d_logits

Two kernels, both recomputing the logit tiles from hidden and weight:
- d_hidden: one program per token tile sweeps the vocabulary (like the forward) and adds
  d_logits_tile @ weight_tile into its own rows of an fp32 (T, D) buffer, D chunk by D chunk.
- d_weight, d_bias: one program per vocabulary tile sweeps all token tiles and adds
  d_logits_tile^T @ hidden_tile into its own rows of an fp32 (V, D) buffer.
Every output element is owned by exactly one program and summed in a fixed order: the result is
deterministic (bitwise reproducible run to run) with no atomics and no split-K buffer. The price is
compute: 5 matmul-sized passes (forward 1, backward 2 recomputations + 2 products) instead of the
3 of eager linear + cross-entropy; what it buys is memory: besides inputs and gradients, only lse
(T,) and fp32 accumulators for gradients that are not fp32 ((T, D), (V, D)) are allocated, never a
(T, V) tensor. d_logits is rounded to the input dtype before its two products, as the eager
backward does (its d_logits tensor has the logits' dtype).

A non-ignored target outside [0, V) makes that token's loss NaN (no host sync to check it on a GPU;
the public function raises on CPU tensors). Equivalent PyTorch: `linear_cross_entropy_ref` below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from ._compat import tl, triton
from ._utils import cast_rtne, check_float, check_launchable, check_same_device, is_interpreting, \
    last_dim_contiguous

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss_tok: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str):
    """loss_tok (...) with 0 at ignored targets -> the requested reduction (device-side division)."""
    if reduction == "none":
        return loss_tok
    total = loss_tok.sum()
    if reduction == "sum":
        return total
    count = (target != ignore_index).sum().to(total.dtype)
    return total / count.clamp(min=1.0)


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             ignore_index: int = -100, bias: torch.Tensor | None = None,
                             reduction: str = "mean") -> torch.Tensor:
    """Plain PyTorch specification: logits = F.linear in the inputs' dtype (as the model computes
    them), cross-entropy in fp32 (fp64 for fp64 inputs)."""
    logits = F.linear(hidden, weight, bias)                                      # (..., V)
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss_tok = F.cross_entropy(logits.to(cdt).reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction="none")      # (T,), 0 if ignored
    return _reduce(loss_tok.view(target.shape), target, ignore_index, reduction)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(H, W, BIAS, rows, cols, T, V, D, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """(BLOCK_T, BLOCK_V) fp32 logits of token rows x vocabulary cols; cols >= V are -inf."""
    rmask = rows < T
    cmask = cols < V
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(H + rows[:, None] * stride_h + dd[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)                                                   # (BLOCK_T, BLOCK_D)
        w = tl.load(W + cols[:, None] * stride_w + dd[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)                                                   # (BLOCK_V, BLOCK_D)
        if INTERPRET:      # the interpreter's bf16 dot is broken; fp32 products of 16-bit values are exact
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.where(cmask[None, :], acc, float("-inf"))


@triton.jit
def _dlogits_tile(H, W, BIAS, TGT, LSE, G, rows, cols, T, V, D, stride_h, stride_w, ignore_index,
                  HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """(BLOCK_T, BLOCK_V) fp32 g * (softmax - onehot); 0 outside [0, T) x [0, V) and where ignored."""
    rmask = rows < T
    tgt = tl.load(TGT + rows, mask=rmask, other=ignore_index)
    g = tl.load(G + rows, mask=rmask, other=0.0)
    g = tl.where(rmask & (tgt != ignore_index), g, 0.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    logits = _logits_tile(H, W, BIAS, rows, cols, T, V, D, stride_h, stride_w, HAS_BIAS, BLOCK_T,
                          BLOCK_V, BLOCK_D, PRECISION, INTERPRET)
    p = tl.exp(logits - lse[:, None])                                            # 0 at cols >= V
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    return tl.where(rmask[:, None], g[:, None] * (p - onehot), 0.0)


@triton.jit
def _add_product(OUT, out_rows, out_mask, stride_out, a, SRC, src_rows, src_mask, stride_src, D,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """OUT[out_rows, :D] += a @ SRC[src_rows, :D] in BLOCK_D-wide chunks; OUT is fp32 and owned by
    this program, a (R, K) is fp32 (interpreter) or the inputs' dtype, SRC rows src_rows (K,)."""
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        src = tl.load(SRC + src_rows[:, None] * stride_src + dd[None, :],
                      mask=src_mask[:, None] & dmask[None, :], other=0.0)        # (K, BLOCK_D)
        if INTERPRET:
            src = src.to(tl.float32)
        ptrs = OUT + out_rows[:, None] * stride_out + dd[None, :]
        omask = out_mask[:, None] & dmask[None, :]
        tl.debug_barrier()                 # this program's earlier stores (any thread) land first
        acc = tl.load(ptrs, mask=omask, other=0.0)                               # (R, BLOCK_D)
        tl.store(ptrs, tl.dot(a, src, acc, input_precision=PRECISION), mask=omask)


@triton.jit
def _linear_ce_fwd_kernel(H, W, BIAS, TGT, LSE, LOSS, T, V, D, stride_h, stride_w, ignore_index,
                          HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Program i writes LSE and LOSS (per-token, 0 where ignored) of token rows i*BLOCK_T + [0, BLOCK_T)."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rmask = rows < T
    tgt = tl.load(TGT + rows, mask=rmask, other=ignore_index)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)                           # running max
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)                                   # running sum exp
    picked = tl.zeros((BLOCK_T,), dtype=tl.float32)                              # target's logit
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        logits = _logits_tile(H, W, BIAS, rows, cols, T, V, D, stride_h, stride_w, HAS_BIAS,
                              BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, INTERPRET)
        m_new = tl.maximum(m, tl.max(logits, axis=1))        # finite: every tile has a column < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        picked += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
    lse = m + tl.log(s)
    counted = rmask & (tgt != ignore_index)
    in_range = (tgt >= 0) & (tgt < V)
    loss = tl.where(counted, tl.where(in_range, lse - picked, float("nan")), 0.0)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(LOSS + rows, loss, mask=rmask)


@triton.jit
def _linear_ce_bwd_dh_kernel(H, W, BIAS, TGT, LSE, G, DH, T, V, D, stride_h, stride_w, stride_dh,
                             ignore_index, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Program i owns DH (fp32, zero-initialised) rows i*BLOCK_T + [0, BLOCK_T): DH += dlogits @ W."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rmask = rows < T
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        dl = _dlogits_tile(H, W, BIAS, TGT, LSE, G, rows, cols, T, V, D, stride_h, stride_w,
                           ignore_index, HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, INTERPRET)
        dl = cast_rtne(dl, W.dtype.element_ty, INTERPRET)                      # as eager's d_logits
        if INTERPRET:
            dl = dl.to(tl.float32)
        _add_product(DH, rows, rmask, stride_dh, dl, W, cols, cols < V, stride_w, D, BLOCK_D,
                     PRECISION, INTERPRET)                                       # DH += dl @ W


@triton.jit
def _linear_ce_bwd_dw_kernel(H, W, BIAS, TGT, LSE, G, DW, DB, T, V, D, stride_h, stride_w,
                             stride_dw, ignore_index, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Program j owns DW (fp32, zero-initialised) and DB rows j*BLOCK_V + [0, BLOCK_V):
    DW += dlogits^T @ H and DB = sum over tokens of dlogits, token tiles in order."""
    cols = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cmask = cols < V
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        dl = _dlogits_tile(H, W, BIAS, TGT, LSE, G, rows, cols, T, V, D, stride_h, stride_w,
                           ignore_index, HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, INTERPRET)
        db += tl.sum(dl, axis=0)
        dlt = tl.trans(cast_rtne(dl, H.dtype.element_ty, INTERPRET))            # (BLOCK_V, BLOCK_T)
        if INTERPRET:
            dlt = dlt.to(tl.float32)
        _add_product(DW, cols, cmask, stride_dw, dlt, H, rows, rows < T, stride_h, D, BLOCK_D,
                     PRECISION, INTERPRET)                                       # DW += dl^T @ H
    tl.store(DB + cols, db, mask=cmask)


# --------------------------------------------------------------------------------------------
# Host launchers: hidden (T, D), weight (V, D) with unit column stride, target (T,) int
# --------------------------------------------------------------------------------------------
def _blocks(T: int, V: int, D: int) -> dict:
    """Tile sizes and warps.

    NOTE (no GPU measurement yet; based on the usual tensor-core tile shapes for a 2-operand
    fp32-accumulating dot, 64 x 128 outputs x 64-deep chunks at 8 warps). Under the interpreter the
    cost is per program and tile op (measured on a shared 2-core CPU: ~30 ms per 128 x 256 x 256
    step, so T = 9856, V = 32000, D = 1024 took ~15 CPU-s per token tile), so tiles grow with the
    problem: ~8 token tiles and ~32 vocabulary tiles, between 128 x 256 and 1024 x 1024 (x 256
    hidden), which keeps small test shapes at several tiles per dimension."""
    p2 = lambda n: triton.next_power_of_2(max(n, 1))                       # noqa: E731
    if is_interpreting():
        bt = min(1024, max(128, p2(triton.cdiv(T, 8))))
        bv = min(1024, max(256, p2(triton.cdiv(V, 32))))
        bd, warps = 256, 4
    else:
        bt, bv, bd, warps = 64, 128, 64, 8
    fit = lambda n, cap: max(16, min(cap, p2(n)))                          # noqa: E731
    return dict(BLOCK_T=fit(T, bt), BLOCK_V=fit(V, bv), BLOCK_D=fit(D, bd), num_warps=warps)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full fp32 products like torch's default matmul (tf32 only where torch allows it)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _common(hidden, weight, bias, target, ignore_index):
    T, D = hidden.shape
    V = weight.shape[0]
    return (hidden, weight, bias if bias is not None else weight, target), \
        dict(T=T, V=V, D=D, stride_h=hidden.stride(0), stride_w=weight.stride(0),
             ignore_index=ignore_index), \
        dict(HAS_BIAS=bias is not None, PRECISION=_precision(hidden.dtype),
             INTERPRET=is_interpreting(), **_blocks(T, V, D))


def _fwd_launch(hidden, weight, bias, target, ignore_index):
    T = hidden.shape[0]
    lse = torch.empty((T,), dtype=torch.float32, device=hidden.device)
    loss = torch.empty((T,), dtype=torch.float32, device=hidden.device)
    if T == 0:
        return loss, lse
    ptrs, args, meta = _common(hidden, weight, bias, target, ignore_index)
    h, w, b, tgt = ptrs
    _linear_ce_fwd_kernel[(triton.cdiv(T, meta["BLOCK_T"]),)](
        h, w, b, tgt, lse, loss, args["T"], args["V"], args["D"], args["stride_h"],
        args["stride_w"], args["ignore_index"], **meta)
    return loss, lse


def _bwd_launch(dloss, hidden, weight, bias, target, lse, ignore_index):
    T, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros((T, D), dtype=torch.float32, device=dev)                   # fp32 accumulators
    dw = torch.zeros((V, D), dtype=torch.float32, device=dev)
    db = torch.empty((V,), dtype=torch.float32, device=dev)
    if T == 0:
        db.zero_()
    else:
        ptrs, args, meta = _common(hidden, weight, bias, target, ignore_index)
        h, w, b, tgt = ptrs
        _linear_ce_bwd_dh_kernel[(triton.cdiv(T, meta["BLOCK_T"]),)](
            h, w, b, tgt, lse, dloss, dh, T, V, D, args["stride_h"], args["stride_w"], dh.stride(0),
            ignore_index, **meta)
        _linear_ce_bwd_dw_kernel[(triton.cdiv(V, meta["BLOCK_V"]),)](
            h, w, b, tgt, lse, dloss, dw, db, T, V, D, args["stride_h"], args["stride_w"],
            dw.stride(0), ignore_index, **meta)
    bdt = bias.dtype if bias is not None else weight.dtype
    return dh.to(hidden.dtype), dw.to(weight.dtype), db.to(bdt)


# --------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile, fixed rank: hidden (T, D), target (T,)) and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("aimv2::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (T, D), weight (V, D), bias (V,) or None, target (T,) int -> loss_tok (T,), lse (T,) fp32."""
    return _fwd_launch(last_dim_contiguous(hidden), last_dim_contiguous(weight),
                       None if bias is None else bias.contiguous(), target.contiguous(), ignore_index)


@_linear_ce_fwd_op.register_fake
def _(hidden, weight, bias, target, ignore_index):
    T = hidden.shape[0]
    return hidden.new_empty((T,), dtype=torch.float32), hidden.new_empty((T,), dtype=torch.float32)


@torch.library.custom_op("aimv2::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd_op(dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, target: torch.Tensor, lse: torch.Tensor,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dloss (T,) -> d_hidden (T, D), d_weight (V, D), d_bias (V,) (computed even without a bias)."""
    return _bwd_launch(dloss.float().contiguous(), last_dim_contiguous(hidden),
                       last_dim_contiguous(weight), None if bias is None else bias.contiguous(),
                       target.contiguous(), lse.contiguous(), ignore_index)


@_linear_ce_bwd_op.register_fake
def _(dloss, hidden, weight, bias, target, lse, ignore_index):
    bdt = bias.dtype if bias is not None else weight.dtype
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=bdt))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.ignore_index = ignore_index
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, target, lse)


def _backward(ctx, dloss, _dlse):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    dh, dw, db = torch.ops.aimv2.linear_cross_entropy_bwd(dloss, hidden, weight, bias, target, lse,
                                                          ctx.ignore_index)
    return dh, dw, (db if ctx.has_bias else None), None, None


_linear_ce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, bias: torch.Tensor | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of F.linear(hidden, weight, bias) against target without the logits tensor;
    see the module docstring.

    hidden (..., D), weight (V, D), bias None or (V,), target (...) integer ids in [0, V) or
    ignore_index. Returns the fp32 loss: 0-dim for "mean" / "sum", target's shape for "none".
    Equivalent PyTorch: `linear_cross_entropy_ref(hidden, weight, target, ignore_index, bias, reduction)`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        dt = torch.get_autocast_dtype(hidden.device.type)                      # as F.linear would
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    check_float("hidden", hidden)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target: expected an int64 or int32 tensor of class ids, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[-1] if hidden.dim() else 'D'}) "
                         f"for hidden {tuple(hidden.shape)}, got {tuple(weight.shape)}")
    V, D = weight.shape
    if V < 1 or D < 1:
        raise ValueError(f"weight: expected V >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None and (bias.dtype != weight.dtype or tuple(bias.shape) != (V,)):
        raise ValueError(f"bias: expected shape ({V},) and dtype {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                         f"got {tuple(target.shape)}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, target=target)
    check_launchable(hidden)
    ignore_index = int(ignore_index)
    if target.device.type == "cpu" and target.numel() and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bad.any():
            raise ValueError(f"target: class ids must lie in [0, V={V}) or equal ignore_index="
                             f"{ignore_index}, got {target[bad][0].item()}")
    h2 = last_dim_contiguous(hidden).reshape(-1, D)                              # (T, D)
    t1 = target.reshape(-1)                                                      # (T,)
    loss_tok, _ = torch.ops.aimv2.linear_cross_entropy_fwd(h2, last_dim_contiguous(weight), bias,
                                                           t1, ignore_index)
    return _reduce(loss_tok.view(target.shape), target, ignore_index, reduction)
