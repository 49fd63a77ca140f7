"""The AIMv2 pixel loss (SPEC section 4) as one fused op.

    target_n = patchify(images)[:, n]                        (B, N, p*p*C), order (row, col, channel)
    t_hat_n  = (target_n - mean(target_n)) / sqrt(var_unbiased(target_n) + eps)
    l_{b,i}  = mean_k (pred[b, i, k] - t_hat_{b, i+1, k})^2     for i = 0 .. N-2
    counted  = (i + 1 >= P_b)
    loss     = sum(l * counted) / max(sum(counted), 1)           token-weighted mean over the batch

Shapes: pred (B, N, p*p*C); images (B, C, H, W) with H, W multiples of p and N = (H/p)(W/p);
prefix_len an int or an int tensor (B,). Returns a 0-dim fp32 tensor. Gradient for pred only.
"""
from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) with per-patch order (row in patch, col in patch, channel)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)            # (B, C, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)                      # (B, h, w, p, q, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)        # (B, N, p*p*C)


def patch_l2_loss_ref(pred: torch.Tensor, images: torch.Tensor, prefix_len, patch_size: int,
                      eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch specification (fp32, or fp64 when the inputs are fp64)."""
    cdt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    target = patchify(images.to(cdt), patch_size)                      # (B, N, K)
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=True)
    target = (target - mean) / torch.sqrt(var + eps)
    B, N, _ = target.shape
    err = (pred.to(cdt)[:, :-1] - target[:, 1:]).pow(2).mean(-1)      # (B, N-1)
    idx = torch.arange(1, N, device=pred.device)                       # target index i+1
    if isinstance(prefix_len, torch.Tensor):
        plen = prefix_len.to(device=pred.device).reshape(B, 1)
    else:
        plen = torch.full((B, 1), int(prefix_len), device=pred.device)
    counted = (idx.unsqueeze(0) >= plen).to(cdt)                       # (B, N-1)
    return (err * counted).sum() / counted.sum().clamp(min=1.0)
