"""Attention backends for the AIMv2 model: one mask object per forward, shared by every block.

The encoder's prefix mask (method.md §2): query i sees key j iff j < P_b or j <= i.
- "sdpa":   torch SDPA. No mask when P = N (or None), `is_causal` when P = 0, otherwise the dense
            (B, 1, N, N) boolean mask (what the reference frameworks do; it forces the slow path).
- "flex":   FlexAttention with mask_mod `kv < P[b] or q >= kv` and a BlockMask (compiled on a GPU).
- "triton": aimv2.kernels.prefix_attention (per-sample prefix, masked tiles skipped).

`PackedAttentionMask` is the same pattern over images of different sizes packed into one sequence
(native resolution, method.md §8): no token attends across images.
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

    def qkvpacked(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, N, 3, H, D), one projection's output -> (B, H, N, D). "triton": the qkv-packed kernel
        op (its backward writes d_qkv in one piece); the others: this mask on the q, k, v views."""
        if self.backend == "triton":
            from aimv2.kernels import prefix_attention_qkvpacked
            return prefix_attention_qkvpacked(qkv, self.prefix_len)
        return self(*qkv.permute(2, 0, 3, 1, 4).unbind(0))                   # 3 x (B, H, N, D) views


class PackedAttentionMask:
    """The attention pattern of one packed forward (method.md §8): n images of lengths L_s packed into
    one (T, ...) sequence; query i of image s sees key j iff j is in image s and (j - start_s < P_s or
    j <= i). Built once per forward, applied in every block to q, k, v (T, H, Dh) -> (T, H, Dh).

    - "triton": aimv2.kernels.prefix_attention_varlen over the whole pack (one launch per block).
    - "sdpa":   one fixed-length `AttentionMask` per image, applied image by image (the exact per-image
                computation; no (T, T) mask).
    - "flex":   one document block mask over the pack (B = 1, N = T): no cross-image tile is computed.

    cu_seqlens: int32 (n + 1,) on the device; lengths: the L_s as host ints; prefix_len: None
    (bidirectional), an int tensor (n,) in [0, L_s] (already validated), or a host int P >= 0 for every
    image (min(P, L_s); 0 = causal: the decoder, where sdpa then runs `is_causal` per image, no mask).
    """

    def __init__(self, backend: str, cu_seqlens: torch.Tensor, lengths, prefix_len, device: torch.device):
        self.backend = backend
        self.lengths = [int(n) for n in lengths]
        self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        self.max_seqlen = max(self.lengths, default=0)
        self.masks = self.block_mask = None
        if backend == "sdpa":                            # an int stays an int: is_causal / no mask per image
            self.masks = [AttentionMask(backend, min(prefix_len, n) if isinstance(prefix_len, int)
                                        else None if prefix_len is None else prefix_len[s:s + 1].to(device),
                                        1, n, device) for s, n in enumerate(self.lengths)]
        if isinstance(prefix_len, int):                  # host ints: no device read
            prefix_len = torch.tensor([min(prefix_len, n) for n in self.lengths], dtype=torch.int32)
        self.prefix_len = None if prefix_len is None else prefix_len.to(device=device)
        if backend == "flex":
            self.block_mask = self._doc_block_mask(device)
        elif backend == "triton":
            if self.prefix_len is None:                                          # bidirectional: P_s = L_s
                self.plen32 = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).contiguous()
            else:
                self.plen32 = self.prefix_len.to(torch.int32).contiguous()

    def _doc_block_mask(self, device):
        from torch.nn.attention.flex_attention import create_block_mask
        n, T = len(self.lengths), sum(self.lengths)
        doc = torch.repeat_interleave(torch.arange(n, dtype=torch.int32),
                                      torch.tensor(self.lengths, dtype=torch.int64)).to(device)     # (T,)
        start = self.cu_seqlens[:-1]                                                               # (n,)
        if self.prefix_len is None:
            def mask_mod(b, h, q, kv):
                return doc[q] == doc[kv]
        else:
            plen = self.prefix_len.to(torch.int32)

            def mask_mod(b, h, q, kv):
                d = doc[kv]
                return (doc[q] == d) & ((kv - start[d] < plen[d]) | (q >= kv))
        return create_block_mask(mask_mod, 1, None, T, T, device=device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (T, H, Dh) (any strides, last dim contiguous) -> (T, H, Dh) contiguous."""
        if self.backend == "triton":
            from aimv2.kernels import prefix_attention_varlen
            return prefix_attention_varlen(q, k, v, self.cu_seqlens, self.max_seqlen, self.plen32)
        if self.backend == "flex":
            o = _flex_attention()(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=self.block_mask)
            return o[0].transpose(0, 1).contiguous()                               # (1, H, T, Dh) -> (T, H, Dh)
        outs, a = [], 0
        for n, mask in zip(self.lengths, self.masks):
            qs, ks, vs = (t[a:a + n].transpose(0, 1)[None] for t in (q, k, v))   # (1, H, L_s, Dh)
            outs.append(mask(qs, ks, vs)[0].transpose(0, 1))                     # (L_s, H, Dh)
            a += n
        return torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()

    def qkvpacked(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (T, 3, H, Dh), one projection's output -> (T, H, Dh). "triton": the qkv-packed kernel op
        (its backward writes d_qkv in one piece); the others: this mask on the q, k, v views."""
        if self.backend == "triton":
            from aimv2.kernels import prefix_attention_varlen_qkvpacked
            return prefix_attention_varlen_qkvpacked(qkv, self.cu_seqlens, self.max_seqlen, self.plen32)
        return self(*qkv.unbind(1))                                          # 3 x (T, H, Dh) views
