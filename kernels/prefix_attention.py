"""Prefix-causal attention (SPEC section 2).

Query i of sample b sees key j iff  j < P_b  or  j <= i.
P_b = 0 is causal attention; P_b = N is full bidirectional attention.

Shapes: q, k, v (B, H, N, D); prefix_len an int or an int tensor (B,) with values in [0, N].
"""
from __future__ import annotations

import math

import torch


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
