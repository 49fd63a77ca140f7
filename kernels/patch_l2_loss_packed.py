"""The AIMv2 pixel loss (method.md §4, §8) on a packed batch: images of different sizes in one sequence.

Image s owns the packed rows [start_s, end_s) (start_s = cu_seqlens[s], end_s = cu_seqlens[s + 1]) of
both the predictions and the patches, with its own prefix P_s. Row r = start_s + i predicts the patch
in row r + 1 of the same image:

    t_hat_r  = (patches[r] - mean(patches[r])) / sqrt(var_unbiased(patches[r]) + eps)
    l_r      = mean_k (pred[r, k] - t_hat_{r+1, k})^2
    counted  = (r + 1 < end_s) and (r + 1 - start_s >= P_s)     target inside image s, past its prefix
    loss     = sum(l * counted) / max(sum(counted), 1)           token-weighted over the whole pack

so the last row of every image predicts nothing (its "next row" is the next image's first patch) and
the reduction is the fixed op's: every counted (patch, element) pair of the pack weighs the same, i.e.
the loss equals sum_s c_s * patch_l2_loss(image s alone) / sum_s c_s with c_s = the number of pairs
image s counts (not a mean of per-image means). With every image the same size it is `patch_l2_loss`.

Shapes: pred (T, p*p*C) float, patches (T, p*p*C) float (`aimv2.packing.PackedBatch.patches`:
kernels.patchify order, any row stride, contiguous last dim), cu_seqlens int32 (n + 1,), prefix_len
an int or an integer tensor (n,). Returns a 0-dim fp32 tensor. Gradient for pred only.

The kernels are the fixed op's (kernels/patch_l2_loss.py) with the target read from row r + 1 of
`patches` instead of an image, and `counted` given per row: a (T,) bool computed on the device from
cu_seqlens and prefix_len (searchsorted over cu_seqlens; nothing is read on the host), so the launch
grid is a flat cdiv(T, BLOCK_T) over the pack with no per-image padding. Each program normalises its
BLOCK_T targets in registers with the shared `normalise_rows` and writes one (sum of counted
per-pair losses, number counted) partial; the division happens on the device (no host sync).

Backward (pred only), with cnt = max(sum(counted), 1):

    d_pred[r, k] = d_loss * 2 * (pred[r, k] - t_hat[r+1, k]) / (p*p*C * cnt)   if counted[r], else 0

recomputing t_hat from patches.
"""
from __future__ import annotations

import torch

from ._compat import tl, triton
from ._utils import cast_rtne, check_float, check_launchable, check_pack_values, check_same_device, \
    is_interpreting, last_dim_contiguous
from .patch_l2_loss import _tiles, normalise_patches_ref, normalise_rows


def counted_rows(cu_seqlens: torch.Tensor, prefix_len, T: int) -> torch.Tensor:
    """(T,) bool: row r of image s is scored iff r + 1 < end_s and r + 1 - start_s >= P_s.

    All on cu_seqlens' device, no host read (searchsorted finds each row's image); a bad cu_seqlens
    on CUDA (unchecked there) gives a wrong mask, never an out-of-bounds read."""
    n = cu_seqlens.numel() - 1
    rows = torch.arange(T, device=cu_seqlens.device, dtype=torch.int32)                  # (T,)
    if n < 1:
        return torch.zeros(T, dtype=torch.bool, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int32)
    s = torch.searchsorted(cu[1:], rows, right=True).clamp(max=n - 1)                   # image of row r
    j = rows + 1                                                                         # its target row
    if isinstance(prefix_len, int):
        plen = prefix_len
    else:
        plen = prefix_len.to(cu_seqlens.device)[s]                                       # (T,)
    return (j < cu[s + 1]) & (j - cu[s] >= plen)


def patch_l2_loss_packed_ref(pred: torch.Tensor, patches: torch.Tensor, cu_seqlens: torch.Tensor, prefix_len,
                             eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch specification (fp32, or fp64 when pred is fp64); no host sync."""
    cdt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    T = pred.shape[0]
    target = normalise_patches_ref(patches.to(cdt), eps)                                 # (T, K)
    err = (pred.to(cdt)[:-1] - target[1:]).pow(2).mean(-1)                              # (T-1,) row r vs r+1
    counted = counted_rows(cu_seqlens, prefix_len, T)[:-1].to(cdt)                      # (T-1,)
    return (err * counted).sum() / counted.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _packed_rows(PRED, PATCHES, COUNTED, T, K, stride_pt, stride_xt, eps,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows r of this program: r, counted (BLOCK_T,), pred (BLOCK_T, BLOCK_K) fp32 and t_hat of row
    r + 1, both 0 where not counted or k >= K."""
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    counted = tl.load(COUNTED + r, mask=r < T, other=0) != 0
    k = tl.arange(0, BLOCK_K)
    mask = counted[:, None] & (k < K)[None, :]
    r64 = r.to(tl.int64)
    t = tl.load(PATCHES + (r64 + 1)[:, None] * stride_xt + k[None, :], mask=mask, other=0.0).to(tl.float32)
    pred = tl.load(PRED + r64[:, None] * stride_pt + k[None, :], mask=mask, other=0.0).to(tl.float32)
    return r, counted, pred, normalise_rows(t, mask, K, eps)


@triton.jit
def _patch_l2_loss_packed_fwd_kernel(PRED, PATCHES, COUNTED, PART, T, K, stride_pt, stride_xt, eps,
                                     BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program tb writes PART[tb] = (sum of counted per-pair losses, number counted) of its rows."""
    _, counted, pred, t_hat = _packed_rows(PRED, PATCHES, COUNTED, T, K, stride_pt, stride_xt, eps,
                                           BLOCK_T, BLOCK_K)
    e = pred - t_hat                                                               # 0 off the mask
    err = tl.div_rn(tl.sum(e * e, axis=1), K * 1.0)                                # (BLOCK_T,)
    part = PART + tl.program_id(0) * 2
    tl.store(part, tl.sum(err, axis=0))
    tl.store(part + 1, tl.sum(counted.to(tl.float32), axis=0))


@triton.jit
def _patch_l2_loss_packed_bwd_kernel(SCALE, PRED, PATCHES, COUNTED, DPRED, T, K, stride_pt, stride_xt,
                                     stride_dt, eps, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                                     INTERPRET: tl.constexpr):
    """Program tb writes d_pred of its rows, zeros included. SCALE holds d_loss / max(count, 1)."""
    r, _, pred, t_hat = _packed_rows(PRED, PATCHES, COUNTED, T, K, stride_pt, stride_xt, eps,
                                     BLOCK_T, BLOCK_K)
    k = tl.arange(0, BLOCK_K)
    scale = tl.div_rn(tl.load(SCALE) * 2.0, K * 1.0)
    dpred = (pred - t_hat) * scale                                                 # 0 off the mask
    wmask = (r < T)[:, None] & (k < K)[None, :]
    tl.store(DPRED + r.to(tl.int64)[:, None] * stride_dt + k[None, :],
             cast_rtne(dpred, DPRED.dtype.element_ty, INTERPRET), mask=wmask)


# --------------------------------------------------------------------------------------------
# Host launchers: pred, patches (T, K) with a contiguous last dim, counted (T,) bool
# --------------------------------------------------------------------------------------------
def _fwd_launch(pred, patches, counted, eps):
    T, K = pred.shape
    if T == 0:
        z = torch.zeros((), dtype=torch.float32, device=pred.device)
        return z, z.clone()
    t = _tiles(K, backward=False)
    n_tb = triton.cdiv(T, t.block_m)
    part = torch.empty((n_tb, 2), dtype=torch.float32, device=pred.device)        # (sum err, count)
    _patch_l2_loss_packed_fwd_kernel[(n_tb,)](
        pred, patches, counted, part, T, K, pred.stride(0), patches.stride(0), eps,
        BLOCK_T=t.block_m, BLOCK_K=t.block_n, num_warps=t.num_warps)
    count = part[:, 1].sum()                       # exact in fp32 up to 2^24 counted pairs
    return part[:, 0].sum() / count.clamp(min=1.0), count


def _bwd_launch(scale, pred, patches, counted, eps):
    T, K = pred.shape
    dpred = torch.empty((T, K), dtype=pred.dtype, device=pred.device)
    if T == 0:
        return dpred
    t = _tiles(K, backward=True)
    _patch_l2_loss_packed_bwd_kernel[(triton.cdiv(T, t.block_m),)](
        scale, pred, patches, counted, dpred, T, K, pred.stride(0), patches.stride(0), dpred.stride(0), eps,
        BLOCK_T=t.block_m, BLOCK_K=t.block_n, INTERPRET=is_interpreting(), num_warps=t.num_warps)
    return dpred


# --------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile) and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("aimv2::patch_l2_loss_packed_fwd", mutates_args=())
def _packed_fwd_op(pred: torch.Tensor, patches: torch.Tensor, counted: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pred (T, K), patches (T, K), counted (T,) bool -> loss (), count () fp32."""
    return _fwd_launch(last_dim_contiguous(pred), last_dim_contiguous(patches), counted.contiguous(), eps)


@_packed_fwd_op.register_fake
def _(pred, patches, counted, eps):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("aimv2::patch_l2_loss_packed_bwd", mutates_args=())
def _packed_bwd_op(scale: torch.Tensor, pred: torch.Tensor, patches: torch.Tensor, counted: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """scale () fp32 = d_loss / max(count, 1) -> d_pred (T, K) contiguous, pred's dtype."""
    return _bwd_launch(scale.float().contiguous(), last_dim_contiguous(pred), last_dim_contiguous(patches),
                       counted.contiguous(), eps)


@_packed_bwd_op.register_fake
def _(scale, pred, patches, counted, eps):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    pred, patches, counted, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.eps = eps
    ctx.save_for_backward(pred, patches, counted, output[1])


def _backward(ctx, dloss, _dcount):
    pred, patches, counted, count = ctx.saved_tensors
    scale = dloss.float() / count.clamp(min=1.0)                                    # () on device
    return _packed_bwd_op(scale, pred, patches, counted, ctx.eps), None, None, None


_packed_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def _check_inputs(pred, patches, cu_seqlens, prefix_len) -> None:
    check_float("pred", pred)
    check_float("patches", patches)
    if pred.dim() != 2:
        raise ValueError(f"pred: expected shape (T, p*p*C), got {tuple(pred.shape)}")
    if tuple(patches.shape) != tuple(pred.shape):
        raise ValueError(f"patches: expected pred's shape {tuple(pred.shape)} (one target row per "
                         f"prediction row), got {tuple(patches.shape)}")
    if pred.shape[1] < 2:
        raise ValueError(f"pred: a patch needs at least 2 values (unbiased variance), got {pred.shape[1]}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected an int32 tensor (n + 1,), got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    n = cu_seqlens.numel() - 1
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.Tensor)):
        raise TypeError(f"prefix_len: expected an int or an integer tensor ({n},), got {type(prefix_len).__name__}")
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.is_floating_point() or prefix_len.is_complex() or prefix_len.dtype == torch.bool:
            raise TypeError(f"prefix_len: expected an integer tensor, got {prefix_len.dtype}")
        if tuple(prefix_len.shape) != (n,):
            raise ValueError(f"prefix_len: expected shape ({n},) (one per image of cu_seqlens), "
                             f"got {tuple(prefix_len.shape)}")
    elif prefix_len < 0:
        raise ValueError(f"prefix_len: expected >= 0, got {prefix_len}")
    check_same_device(pred=pred, patches=patches, cu_seqlens=cu_seqlens, prefix_len=prefix_len)
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        plen = prefix_len if isinstance(prefix_len, torch.Tensor) else torch.full((n,), prefix_len)
        check_pack_values(cu_seqlens, plen, pred.shape[0], pred.shape[0], rows_of="pred.shape[0]")


def patch_l2_loss_packed(pred: torch.Tensor, patches: torch.Tensor, cu_seqlens: torch.Tensor, prefix_len,
                         eps: float = 1e-6) -> torch.Tensor:
    """The AIMv2 pixel loss over a packed batch in one fused op; see the module docstring.

    pred (T, p*p*C): row r predicts row r + 1 of the same image; patches (T, p*p*C) the packed patches
    (targets); cu_seqlens int32 (n + 1,), 0 first, strictly increasing, T last; prefix_len an int or an
    integer tensor (n,) with P_s in [0, len_s]. Value checks run on CPU tensors only (on CUDA they would
    sync the host). Returns a 0-dim fp32 loss, token-weighted over the pack.
    Equivalent PyTorch: `patch_l2_loss_packed_ref(pred, patches, cu_seqlens, prefix_len, eps)`.
    """
    _check_inputs(pred, patches, cu_seqlens, prefix_len)
    check_launchable(pred)
    counted = counted_rows(cu_seqlens, prefix_len, pred.shape[0])                       # (T,) bool
    loss, _ = _packed_fwd_op(last_dim_contiguous(pred), last_dim_contiguous(patches), counted, float(eps))
    return loss
