"""Fused linear + cross-entropy (the caption head's loss) that never materialises the (T, V) logits.

    logits[t, v] = hidden[t] . weight[v] (+ bias[v])                  in the inputs' dtype, as F.linear
    lse[t]       = log sum_v exp(logits[t, v])                        fp32
    loss_tok[t]  = lse[t] - logits[t, target[t]]      if target[t] != ignore_index, else 0
    loss         = sum_t loss_tok / max(#counted, 1)  ("mean": F.cross_entropy(ignore_index=...)
                                                      on the full logits, except that an all-ignored
                                                      batch gives 0 and zero gradients, not NaN)
                 | sum_t loss_tok                     ("sum")
                 | loss_tok                           ("none", shaped like target)

    with g[t] = d loss / d loss_tok[t] (0 where ignored), p = exp(logits - lse):
    d_logits = g[:, None] * (p - onehot(target))
    d_hidden = d_logits @ weight        d_weight = d_logits^T @ hidden        d_bias = sum_t d_logits

Shapes: hidden (..., D), weight (V, D), bias None or (V,), target (...) integer, matching hidden's
leading dims. hidden, weight (and bias) share one dtype (fp32, fp16 or bf16; under autocast they are
cast to the autocast dtype first, as F.linear would). The loss is fp32; gradients have the inputs'
dtypes.

Design: the tokens are cut into chunks of C rows; for each chunk, in a fixed order,
  1. logits_c = hidden_c @ weight^T (+ bias)   torch.mm / addmm (cuBLAS on a GPU) into one reused
     (C, V) buffer in the inputs' dtype: the same GEMM, rounding and bias epilogue as the reference's
     F.linear, at cuBLAS speed;
  2. one Triton row kernel (`_ce_rows_kernel`): per row an online log-sum-exp over BLOCK_V-wide
     tiles and the target's logit -> lse, loss_tok; when gradients are wanted a second sweep writes
     d_logits = g * (softmax - onehot) IN PLACE over the row, rounded to the inputs' dtype like the
     reference's d_logits (its fp32 CE gradient cast back to the logits' dtype);
  3. d_hidden_c = d_logits_c @ weight (its own rows: no accumulation),
     d_weight += d_logits_c^T @ hidden_c into an fp32 (V, D) accumulator, d_bias += column sums (fp32).
`_chunk_loop` is that loop, shared by both paths:
- reduction "mean" / "sum" with gradients wanted (`compute_grad`, decided by the public function:
  grad mode on and an input requiring grad): the incoming gradient is a scalar, so the forward runs
  the loop with g = 1 / max(#counted, 1) (mean, device-side: no host sync) or 1 (sum) and returns
  the fp32 gradients as extra outputs of the forward op; the backward only scales them by
  grad_output (one rounding to the inputs' dtype). 3 GEMMs in all, like eager.
- reduction "none" (per-token grad_output), or gradients not computed in the forward: the forward
  runs the loop without step 3, saves lse (T,) fp32, and the backward op runs it again with
  g = grad_output (x the mean's 1 / count), lse read back. 4 GEMMs.

Chunk size: C = T / 4 rounded down to a multiple of 128, at least 128 and at most CHUNK_BYTES (128 MiB)
/ (V x itemsize) (rounded down to a multiple of 128, at least 128; all of T when smaller): the cap is
bf16 V = 32000 -> 2048 rows, V = 128000 -> 512; fp32 V = 32000 -> 1024. Sized from T so that small
batches save memory too: a fixed 128 MiB buffer held 36 % of eager's fwd+bwd peak at T = 1,232 (CPU,
fp32, D = 256, V = 32,000: 165.7 vs 457.2 MB); with C = T / 4 it is 101.1 MB (22 %), and 85.4 vs
372.8 MB (23 %) at T = 1,000 (benchmarks/results/text_loss-cpu-2026-12-06.json). From T = 4 x cap up
(T = 8,192 at bf16 V = 32k) C is the cap as before; the GPU training shape T = 77 x 128 = 9,856 at bf16
keeps C = 2048, so the large-T speed is unchanged there.
Why 128 MiB (reasoned from datasheet rates, not measured yet): every GEMM keeps >= 512 rows (M of
the logits / d_hidden products, K of the d_weight product) up to V = 128k in bf16, enough to fill an
H100/H200 with 128-row tiles; the fp32 d_weight accumulator's read-modify-write per chunk
(2 x V x D x 4 bytes) then costs ~1/4 of the chunk's d_weight GEMM at V = 32k (C = 2048) and about
as much as it at V = 128k (C = 512); and the buffer is ~1/20 of eager's fp32 logits and their
gradient at T = 77 x 128, V = 32k. `CHUNK_ROWS` (module attribute) overrides C (tests: chunk
boundaries mid-way through T).

Precision: logits and d_logits are rounded to the inputs' dtype exactly where the reference rounds
them (the reference computes bf16 logits; fp32 logits would be more accurate than the specification
and cost 2x the buffer); every sum over tokens that spans chunks (d_weight, d_bias) accumulates in
fp32 and is rounded once, as the reference's single GEMM does (a 16-bit accumulator would round once
per chunk). On a GPU the 16-bit x 16-bit -> fp32 products use cuBLAS's out_dtype GEMMs; on the CPU,
which has none, the operands are upcast (fp32 products of 16-bit values are exact: the same numbers
up to summation order).

Determinism: bitwise reproducible run to run: chunks run in a fixed order; each GEMM is a plain
torch.mm / addmm, as reproducible as the reference's own (cuBLAS: same GPU architecture and library
version, and with several streams a fixed workspace, CUBLAS_WORKSPACE_CONFIG, as
torch.use_deterministic_algorithms requires); each row of the row kernel is owned by one program and
reduced in a fixed order; no atomics anywhere.

Memory (besides inputs and returned gradients): the (C, V) buffer; with forward-computed gradients
also the fp32 d_hidden (T, D), d_weight (V, D) (and d_bias) held from forward to backward;
recompute: lse (T,) and the fp32 d_weight accumulator. Peak ~ C x V + d_weight + d_hidden, never a
(T, V) tensor.

A non-ignored target outside [0, V) makes that token's loss NaN (no host sync to check it on a GPU;
the public function raises on CPU tensors). Equivalent PyTorch: `linear_cross_entropy_ref` below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from ._compat import tl, triton
from ._utils import Tiles, cast_rtne, check_float, check_launchable, check_same_device, is_interpreting, \
    last_dim_contiguous

REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 128 * 2**20        # the (C, V) logits buffer's budget, in the inputs' dtype
CHUNK_ROWS: int | None = None    # overrides C when set (tests); None: from CHUNK_BYTES


def _count(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """max(#counted tokens, 1), a 0-dim int64 tensor on target's device (no host sync)."""
    return (target != ignore_index).sum().clamp(min=1)


def _reduce(loss_tok: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str):
    """loss_tok (...) with 0 at ignored targets -> the requested reduction (device-side division)."""
    if reduction == "none":
        return loss_tok
    total = loss_tok.sum()
    if reduction == "sum":
        return total
    return total / _count(target, ignore_index).to(total.dtype)


def _token_scale(target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """(T,) fp32 d loss / d loss_tok for reduction "mean" (1 / count) or "sum" (1); the row kernel
    zeroes it at ignored tokens."""
    one = torch.ones(target.shape, dtype=torch.float32, device=target.device)
    return one / _count(target, ignore_index) if reduction == "mean" else one


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
# Triton row kernel: one chunk's logits (n, V) -> lse, loss_tok and, in place, d_logits
# --------------------------------------------------------------------------------------------
@triton.jit
def _ce_rows_kernel(X, TGT, G, LSE, LOSS, n_rows, V, stride_x, ignore_index,
                    LSE_GIVEN: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_V: tl.constexpr, INTERPRET: tl.constexpr):
    """Program i owns rows i*BLOCK_M + [0, BLOCK_M) of X (n_rows, V), the inputs' dtype.
    LSE_GIVEN: read LSE; else compute it (online over BLOCK_V-wide tiles, fp32) and write LSE and
    LOSS (lse - X[t, target], 0 where ignored, NaN where the target is out of [0, V)).
    WRITE_GRAD: overwrite the rows with G[t] * (softmax - onehot), 0 on ignored rows."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < n_rows
    tgt = tl.load(TGT + rows, mask=rmask, other=ignore_index)
    counted = rmask & (tgt != ignore_index)
    row_ptr = X + rows[:, None] * stride_x
    if LSE_GIVEN:
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    else:
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)                       # running max
        s = tl.zeros((BLOCK_M,), dtype=tl.float32)                               # running sum exp
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols[None, :], mask=rmask[:, None] & (cols < V)[None, :],
                        other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)                 # rows past n_rows
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
            m = m_new
        lse = tl.where(rmask, m + tl.log(tl.where(rmask, s, 1.0)), 0.0)        # rows past n_rows: 0
        in_range = (tgt >= 0) & (tgt < V)
        picked = tl.load(X + rows * stride_x + tgt, mask=counted & in_range, other=0.0).to(tl.float32)
        loss = tl.where(counted, tl.where(in_range, lse - picked, float("nan")), 0.0)
        tl.store(LSE + rows, lse, mask=rmask)
        tl.store(LOSS + rows, loss, mask=rmask)
    if WRITE_GRAD:
        g = tl.where(counted, tl.load(G + rows, mask=rmask, other=0.0), 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = rmask[:, None] & (cols < V)[None, :]
            x = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            dl = g[:, None] * (p - (cols[None, :] == tgt[:, None]).to(tl.float32))
            tl.store(row_ptr + cols[None, :], cast_rtne(dl, X.dtype.element_ty, INTERPRET), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side: hidden (T, D), weight (V, D) with unit column stride, target (T,) int
# --------------------------------------------------------------------------------------------
def _tiles(V: int) -> Tiles:
    """block_m (BLOCK_M) rows x block_n (BLOCK_V) vocabulary columns per tile, and num_warps.

    NOTE (no GPU measurement yet): one row per program (a chunk has >= 128 rows, 2048 at bf16
    V = 32000: enough programs for every SM), 4096-wide tiles at 8 warps (16 fp32 values a thread,
    no spills expected: x, p and the d_logits tile); the kernel is bandwidth-bound (reads the chunk
    twice and writes it once when it writes d_logits), so the tile only has to keep loads wide.
    Under the interpreter ~64k-element tiles (its cost is per program and op, not per element)."""
    block_n = min(triton.next_power_of_2(V), 8192 if is_interpreting() else 4096)
    block_m = max(1, min(64, 65536 // block_n)) if is_interpreting() else 1
    return Tiles(block_m, block_n, 8 if block_n >= 4096 else 4)


def _chunk_rows(T: int, V: int, dtype: torch.dtype) -> int:
    """Rows C of one chunk (module docstring): CHUNK_ROWS if set, else T / 4 rounded down to a
    multiple of 128, at least 128 and at most CHUNK_BYTES / (V x itemsize) (itself a multiple of 128,
    at least 128); never more than T (nor less than 1)."""
    if CHUNK_ROWS is not None:
        rows = CHUNK_ROWS
    else:
        cap = max(128, CHUNK_BYTES // (V * dtype.itemsize) // 128 * 128)
        rows = min(cap, max(128, T // 4 // 128 * 128))
    return max(1, min(rows, T))


def _mm_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out (=|+=) a @ b with fp32 accumulation; out is a's dtype or fp32 (16-bit a, b: rounded once
    into fp32, cuBLAS's out_dtype GEMM; the CPU has none, so there the operands are upcast: fp32
    products of 16-bit values are exact, the sums fp32)."""
    if out.dtype != a.dtype and a.device.type != "cuda":
        a, b = a.float(), b.float()
    if out.dtype == a.dtype:
        torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    elif accumulate:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def _chunk_loop(hidden, weight, bias, target, ignore_index, lse, loss=None, g=None, dh=None,
                dw=None, db=None) -> None:
    """The one loop over token chunks of both paths (module docstring), in chunk order.

    loss (T,) fp32 given: lse and loss_tok are computed into lse (T,) and loss; else lse is read.
    g (T,) fp32 given: d_logits = g * (softmax - onehot), then dh[rows] = d_logits @ weight
    (dh (T, D): the inputs' dtype or fp32), dw += d_logits^T @ hidden (fp32 (V, D)) and, if db is
    given, db += column sums of d_logits (fp32 (V,))."""
    T = hidden.shape[0]
    V = weight.shape[0]
    C = _chunk_rows(T, V, hidden.dtype)
    buf = torch.empty((C, V), dtype=hidden.dtype, device=hidden.device)        # logits, then d_logits
    tiles = _tiles(V)
    for c0 in range(0, T, C):
        c1 = min(c0 + C, T)
        n = c1 - c0
        x, h = buf[:n], hidden[c0:c1]
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=x)
        else:
            torch.mm(h, weight.t(), out=x)
        _ce_rows_kernel[(triton.cdiv(n, tiles.block_m),)](
            x, target[c0:c1], lse if g is None else g[c0:c1], lse[c0:c1],
            lse if loss is None else loss[c0:c1], n, V, x.stride(0), ignore_index,
            LSE_GIVEN=loss is None, WRITE_GRAD=g is not None, BLOCK_M=tiles.block_m,
            BLOCK_V=tiles.block_n, INTERPRET=is_interpreting(), num_warps=tiles.num_warps)
        if g is None:
            continue
        _mm_out(dh[c0:c1], x, weight)                                          # d_hidden rows
        _mm_out(dw, x.t(), h, accumulate=True)                                 # d_weight
        if db is not None:
            db += x.sum(0, dtype=torch.float32)
    # Free the buffer now, whoever still refers to its storage: the Triton interpreter's argument
    # bookkeeping (a recursive closure in GridExecutor._restore_args_dev) keeps the last launch's
    # storages in a reference cycle until Python's cyclic GC runs. Stream-ordered on a GPU.
    buf.untyped_storage().resize_(0)


def _fwd_outputs(T: int, D: int, V: int, has_bias: bool, grads: bool, reduction: str, new):
    """Empty outputs of the forward op: loss ((T,) or ()), lse (T,), dh (T, D), dw (V, D), db (V,)
    fp32, the last three (0,) unless the forward computes the gradients. new(shape) -> fp32 tensor."""
    loss = new((T,) if reduction == "none" else ())
    if not grads:
        return loss, new((T,)), new((0,)), new((0,)), new((0,))
    return loss, new((T,)), new((T, D)), new((V, D)), new((V,) if has_bias else (0,))


def _fwd_launch(hidden, weight, bias, target, ignore_index, reduction, compute_grad):
    T, D = hidden.shape
    V = weight.shape[0]
    grads = compute_grad and reduction != "none"
    new = lambda shape: torch.empty(shape, dtype=torch.float32, device=hidden.device)  # noqa: E731
    _, lse, dh, dw, db = _fwd_outputs(T, D, V, bias is not None, grads, reduction, new)
    loss_tok = new((T,))
    if grads:
        dw.zero_()
        db.zero_()
    with torch.autocast(hidden.device.type, enabled=False):                     # GEMMs as given
        _chunk_loop(hidden, weight, bias, target, ignore_index, lse, loss=loss_tok,
                    g=_token_scale(target, ignore_index, reduction) if grads else None,
                    dh=dh, dw=dw, db=db if bias is not None else None)
    return _reduce(loss_tok, target, ignore_index, reduction), lse, dh, dw, db


def _bwd_launch(g, hidden, weight, bias, target, lse, ignore_index):
    T, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dh = torch.empty((T, D), dtype=hidden.dtype, device=dev)                   # every row written
    dw = torch.zeros((V, D), dtype=torch.float32, device=dev)                  # fp32 accumulators
    db = torch.zeros((V,), dtype=torch.float32, device=dev)
    with torch.autocast(dev.type, enabled=False):
        _chunk_loop(hidden, weight, bias, target, ignore_index, lse, g=g, dh=dh, dw=dw,
                    db=db if bias is not None else None)
    bdt = bias.dtype if bias is not None else weight.dtype
    return dh, dw.to(weight.dtype), db.to(bdt)


# --------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile, fixed rank: hidden (T, D), target (T,)) and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("aimv2::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      target: torch.Tensor, ignore_index: int, reduction: str = "none",
                      compute_grad: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (T, D), weight (V, D), bias (V,) or None, target (T,) int -> loss ((T,) for "none",
    else 0-dim), lse (T,), and the fp32 gradients of loss (dh (T, D), dw (V, D), db (V,) or (0,))
    when compute_grad and reduction != "none", else three (0,) tensors. All fp32."""
    return _fwd_launch(last_dim_contiguous(hidden), last_dim_contiguous(weight),
                       None if bias is None else bias.contiguous(), target.contiguous(), ignore_index,
                       reduction, compute_grad)


@_linear_ce_fwd_op.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction="none", compute_grad=False):
    T, D = hidden.shape
    new = lambda shape: hidden.new_empty(shape, dtype=torch.float32)           # noqa: E731
    return _fwd_outputs(T, D, weight.shape[0], bias is not None,
                        compute_grad and reduction != "none", reduction, new)


@torch.library.custom_op("aimv2::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd_op(dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, target: torch.Tensor, lse: torch.Tensor,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dloss (T,) = d loss / d loss_tok -> d_hidden (T, D), d_weight (V, D), d_bias (V,) (computed
    even without a bias), recomputing the logits chunk by chunk."""
    return _bwd_launch(dloss.float().contiguous(), last_dim_contiguous(hidden),
                       last_dim_contiguous(weight), None if bias is None else bias.contiguous(),
                       target.contiguous(), lse.contiguous(), ignore_index)


@_linear_ce_bwd_op.register_fake
def _(dloss, hidden, weight, bias, target, lse, ignore_index):
    bdt = bias.dtype if bias is not None else weight.dtype
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=bdt))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, reduction, compute_grad = inputs
    _, lse, dh, dw, db = output
    ctx.mark_non_differentiable(lse, dh, dw, db)
    ctx.set_materialize_grads(False)          # no zero (T, D) / (V, D) grads for those outputs
    ctx.ignore_index, ctx.reduction = ignore_index, reduction
    ctx.has_bias = bias is not None
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.grads_saved = compute_grad and reduction != "none"
    if ctx.grads_saved:                 # the forward's fp32 gradients: the backward only scales them
        ctx.save_for_backward(dh, dw, db)
    else:
        ctx.save_for_backward(hidden, weight, bias, target, lse)


def _scaled(grad32: torch.Tensor, dloss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad32 * dloss (0-dim) computed in fp32, rounded once into a new tensor of dtype."""
    return torch.mul(grad32, dloss, out=torch.empty(grad32.shape, dtype=dtype, device=grad32.device))


def _backward(ctx, dloss, _dlse, _ddh, _ddw, _ddb):
    hdt, wdt, bdt = ctx.dtypes
    if ctx.grads_saved:
        dh32, dw32, db32 = ctx.saved_tensors
        dloss = dloss.float()
        dh, dw = _scaled(dh32, dloss, hdt), _scaled(dw32, dloss, wdt)
        db = _scaled(db32, dloss, bdt) if ctx.has_bias else None
    else:
        hidden, weight, bias, target, lse = ctx.saved_tensors
        g = dloss.float()
        if ctx.reduction != "none":
            g = g * _token_scale(target, ctx.ignore_index, ctx.reduction)
        dh, dw, db = torch.ops.aimv2.linear_cross_entropy_bwd(g, hidden, weight, bias, target, lse,
                                                              ctx.ignore_index)
    return dh, dw, (db if ctx.has_bias else None), None, None, None, None


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
    compute_grad = reduction != "none" and torch.is_grad_enabled() and \
        any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    loss = torch.ops.aimv2.linear_cross_entropy_fwd(h2, last_dim_contiguous(weight), bias, t1,
                                                    ignore_index, reduction, compute_grad)[0]
    return loss.view(target.shape) if reduction == "none" else loss
