"""Attention backends for the AIMv2 model: one mask object per forward, shared by every block.

The encoder's prefix mask (method.md §2): query i sees key j iff j < P_b or j <= i.
- "sdpa":   torch SDPA. No mask when P = N (or None), `is_causal` when P = 0, otherwise the dense
            (B, 1, N, N) boolean mask (what the reference frameworks do; it forces the slow path).
- "flex":   FlexAttention with mask_mod `kv < P[b] or q >= kv` and a BlockMask (compiled on a GPU).
- "triton": aimv2.kernels.prefix_attention (per-sample prefix, masked tiles skipped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_compiled_flex = None


def _flex_attention():
    """Eager flex_attention on CPU; a compiled one on a GPU (eager flex is a slow fallback there)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if not torch.cuda.is_available() or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class AttentionMask:
    """The attention pattern of one forward pass: built once, applied in every block.

    prefix_len: None (bidirectional), an int in [0, N], or an int tensor (B,) (already validated).
    """

    def __init__(self, backend: str, prefix_len, B: int, N: int, device: torch.device):
        self.backend, self.B, self.N = backend, B, N
        if prefix_len is None:
            prefix_len = N
        self.prefix_len = prefix_len
        self.is_full = isinstance(prefix_len, int) and prefix_len >= N
        self.is_causal = isinstance(prefix_len, int) and prefix_len == 0
        self.dense = None
        self.block_mask = None
        if backend == "sdpa" and not (self.is_full or self.is_causal):
            from aimv2.kernels import prefix_mask
            self.dense = prefix_mask(prefix_len, B, N, device)                # (B, 1, N, N)
        elif backend == "flex" and not self.is_full:
            self.block_mask = self._block_mask(prefix_len, B, N, device)

    @staticmethod
    def _block_mask(prefix_len, B, N, device):
        from torch.nn.attention.flex_attention import create_block_mask
        if isinstance(prefix_len, torch.Tensor):
            plen = prefix_len.to(device=device, dtype=torch.int32)

            def mask_mod(b, h, q, kv):
                return (kv < plen[b]) | (q >= kv)
        else:
            p = int(prefix_len)

            def mask_mod(b, h, q, kv):
                return (kv < p) | (q >= kv)
        return create_block_mask(mask_mod, B, None, N, N, device=device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, N, D) -> (B, H, N, D)."""
        if self.backend == "sdpa":
            if self.dense is not None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense)
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)
        if self.backend == "flex":
            return _flex_attention()(q, k, v, block_mask=self.block_mask)
        from aimv2.kernels import prefix_attention
        return prefix_attention(q, k, v, self.prefix_len)
