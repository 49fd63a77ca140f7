"""The attention and mask functions behind `attn_implementation="aimv2"` (registered by aimv2.hf.register).

transformers calls `attention_forward(module, query, key, value, attention_mask, dropout, scaling,
is_causal, **kwargs)` with query (B, H, N, D), key / value (B, Hkv, N_kv, D) and expects
(output (B, N, H, D), weights or None) back, as its sdpa path returns. The mask comes from
`mask_function`, which transformers calls in place of `sdpa_mask` for this name: it returns exactly
what sdpa_mask returns (None, or a boolean (B, 1, N, N_kv) mask), so every fallback runs transformers'
own sdpa path on its own mask. Where the mask is a plain one that our kernels compute (causal or
bidirectional, with or without padding, no cache offset), the mask tensor carries a `_Plan`
(attribute `aimv2_plan`; else the reason it falls back), worked out once per forward, on the host, when
the mask is built:

    run on our kernels                                           where
    prefix_attention(q, k, v, P)                                 no padding: bidirectional (P = N) or causal
                                                                 (P = 0), no mask or an all-True one
    prefix_attention_varlen(q_packed, ..., cu_seqlens, P_s)      a padding mask whose real tokens form one run
                                                                 per sample (left, right or both sides), on a
                                                                 causal (P_s = 0) or bidirectional (P_s = len_s)
                                                                 mask: the real rows. sdpa's padded query rows
                                                                 that see keys (after the run when causal, all
                                                                 when bidirectional) see every real key of
                                                                 their sample, and models read them
                                                                 (SiglipText pools the last position, Aimv2Text
                                                                 the eos, which may be padding): those rows
                                                                 alone go through torch's SDPA against the real
                                                                 keys ("sdpa_padded_rows"); padded rows before a
                                                                 causal run see no key and are 0, as in sdpa
    transformers' sdpa_attention_forward                         everything else: query and key lengths differ
                                                                 (a KV cache while decoding), real tokens not in
                                                                 one run (holes in the padding mask), a
                                                                 sliding-window, chunked, packed or custom mask,
                                                                 dropout > 0, softcap, sinks, position_bias, a
                                                                 head dim the kernel lacks (ATTENTION_HEAD_DIMS),
                                                                 a dtype other than fp16 / bf16 / fp32, kernels
                                                                 that cannot run on the device
                                                                 (unavailable_reason), or a padding mask while
                                                                 torch.compile traces
    the model's own eager_attention_forward                      attention weights requested (output_attentions):
                                                                 the only path that returns them

The causal flag is read as transformers' sdpa path reads it: a mask decides when there is one; without
one, the `is_causal` argument, then `module.is_causal`, then True.
GQA (Hkv < H): q viewed as (B * Hkv, G, N, D) and k, v as (B * Hkv, 1, N, D) expanded to G heads with a
zero stride (no copy) where the strides allow it (B = 1, or head-major q, k, v); otherwise those views
are made by a copy of q, k, v (never K, V repeated G times). The packed path gathers rows (one copy)
and expands K, V to H heads in that gather.

Under torch.compile (fullgraph=True included) the no-mask path compiles with our kernels (custom ops);
a padding mask goes to sdpa there, since its packing plan reads the mask on the host.

`counts()` says what ran: "kernel", "kernel_varlen", "sdpa_padded_rows", "gqa_copy" (a GQA layout
needed a copy) and "fallback:<reason>"; each fallback reason is also logged once (INFO, logger "aimv2.hf").
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import sys

import torch

log = logging.getLogger("aimv2.hf")

_COUNTS: collections.Counter = collections.Counter()
_LOGGED: set[str] = set()
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def counts() -> dict[str, int]:
    """How many attention calls ran each path since the last reset_counts() (see the module docstring)."""
    return dict(_COUNTS)


def reset_counts() -> None:
    _COUNTS.clear()


def _kernels():
    from aimv2 import kernels as K
    return K


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How our kernels compute a plain mask. packed=None: every token of every sample is kept."""
    causal: bool
    packed: tuple | None = None     # (rows (T,) int64, cu_seqlens (S+1,) int32, max_seqlen int, prefix (S,) int32)
    # padded rows that see keys: (positions (B, Nt) int64, picks (Tt,) into B * Nt, rows (Tt,) into B * N,
    # keep (B, N) bool), or None when there are none
    seeing: tuple | None = None


def _padding_plan(keep: torch.Tensor, causal: bool, device) -> _Plan | str:
    """keep: (B, N) bool, True for real tokens. A _Plan, or why our kernels do not compute this mask."""
    keep = keep.to("cpu", torch.bool)                                       # (B, N), one host copy per mask
    B, N = keep.shape
    if bool(keep.all()):
        return _Plan(causal)
    lens = keep.sum(1)                                                      # (B,)
    first = keep.to(torch.int8).argmax(1)                                   # (B,) first real position
    pos = torch.arange(N)
    end = (first + lens)[:, None]                                           # (B, 1) one past the last
    if not torch.equal((pos >= first[:, None]) & (pos < end), keep) or int(lens.sum()) == 0:
        return "a padding mask whose real tokens are not one run per sample"
    kept = lens[lens > 0]                                                   # (S,) samples with tokens
    cu = torch.zeros(kept.numel() + 1, dtype=torch.int32)
    cu[1:] = kept.cumsum(0)
    rows = keep.reshape(-1).nonzero().squeeze(1)                            # (T,) flat b * N + n, in order
    prefix = torch.zeros_like(kept, dtype=torch.int32) if causal else kept.to(torch.int32)
    packed = (rows.to(device), cu.to(device), int(kept.max()), prefix.to(device))
    # sdpa's padded query rows that see keys see every real key of their sample: all of them in a
    # bidirectional mask, those after the real tokens in a causal one (those before see none: 0)
    seeing = ~keep & (lens > 0)[:, None] & ((pos >= end) if causal else True)     # (B, N)
    counts = seeing.sum(1)                                                  # (B,)
    if int(counts.max()) == 0:
        return _Plan(causal, packed)
    Nt = int(counts.max())
    order = torch.where(seeing, pos, N + pos).argsort(1)[:, :Nt]           # (B, Nt) seeing positions first
    valid = torch.arange(Nt) < counts[:, None]                              # (B, Nt)
    picks = valid.reshape(-1).nonzero().squeeze(1)                          # (Tt,) into B * Nt
    seen_rows = (torch.arange(B)[:, None] * N + order)[valid]               # (Tt,) into B * N
    return _Plan(causal, packed, (order.to(device), picks.to(device), seen_rows.to(device), keep.to(device)))


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, **kwargs):
    """transformers' sdpa_mask, plus a `_Plan` on the mask when our kernels compute it (module docstring)."""
    from transformers import masking_utils as MU
    if mask_function is None:
        mask_function = MU.causal_mask_function
    mask = MU.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if mask is None or not isinstance(mask, torch.Tensor):
        return mask
    plain = mask_function is MU.causal_mask_function or mask_function is MU.bidirectional_mask_function
    no_offset = all(isinstance(o, int) and o == 0 for o in (q_offset, kv_offset))
    causal = mask_function is MU.causal_mask_function
    if not plain:
        plan = "a sliding-window, chunked, packed or custom mask"
    elif not (no_offset and q_length == kv_length):
        plan = "query and key lengths differ (a KV cache)"
    elif attention_mask is None:
        plan = _Plan(causal)
    elif torch.compiler.is_compiling():
        # the packing plan reads the mask on the host: a graph break, an error under fullgraph=True
        plan = "a padding mask under torch.compile (the packing plan would read the mask on the host)"
    elif attention_mask.dim() == 2 and tuple(attention_mask.shape) == (batch_size, kv_length):
        plan = _padding_plan(attention_mask, causal, mask.device)
    else:
        plan = "a padding mask of another shape than (B, N)"
    mask.aimv2_plan = plan              # a new tensor made from this mask (a slice, a cast) carries none
    return mask


def _fall_back(reason: str) -> str:
    _COUNTS["fallback:" + reason] += 1
    if reason not in _LOGGED and not torch.compiler.is_compiling():    # dynamo cannot trace logging
        _LOGGED.add(reason)
        log.info("attn_implementation='aimv2': transformers' path runs where %s", reason)
    return reason


def _weights_requested(module, kwargs) -> bool:
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    try:   # transformers >= 5 records attention weights through hooks while this context variable is set
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    active = _active_collector.get()
    return bool(active) and "attentions" in active


def _why_not(module, query, key, value, attention_mask, dropout, position_bias, kwargs) -> str | None:
    """None when our kernels compute this call exactly, else the reason (the fallback's name)."""
    if dropout:
        return "attention dropout > 0"
    if kwargs.get("softcap") is not None:
        return "softcap is set"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks are given"
    if position_bias is not None:
        return "a position_bias is given"
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or query.shape[0] != key.shape[0]:
        return "q, k, v are not (B, H, N, D) with one batch"
    B, H, N, D = query.shape
    if key.shape[2] != N:
        return "query and key lengths differ (a KV cache)"
    if D not in _kernels().ATTENTION_HEAD_DIMS or key.shape[-1] != D:
        return f"head dim {D} is not one of {_kernels().ATTENTION_HEAD_DIMS}"
    if H % key.shape[1]:
        return f"{H} query heads are not a multiple of {key.shape[1]} key heads"
    if query.dtype not in _FLOAT_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (expected one of fp16, bf16, fp32)"
    if attention_mask is not None:
        plan = getattr(attention_mask, "aimv2_plan", None)
        if plan is None:
            return "the mask was not built by aimv2.hf.mask_function"
        if isinstance(plan, str):
            return plan
        if tuple(attention_mask.shape) != (B, 1, N, N):
            return "the mask does not match q, k"
    why = _kernels().unavailable_reason(query.device, query.dtype)
    return None if why is None else f"the kernels cannot run: {why}"


def _gqa_views(query, key, value):
    """(B, H, N, D), (B, Hkv, N, D) x2 -> (B * Hkv, G, N, D) x3, k and v with a zero-stride head dim."""
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    try:
        q = query.view(B * Hkv, G, N, D)                                    # (B * Hkv, G, N, D)
        k, v = (t.view(B * Hkv, 1, N, D) for t in (key, value))             # (B * Hkv, 1, N, D)
    except RuntimeError:                                                    # strides do not merge: copy
        _COUNTS["gqa_copy"] += 1
        q = query.reshape(B * Hkv, G, N, D)
        k, v = (t.reshape(B * Hkv, 1, N, D) for t in (key, value))
    return q, k.expand(-1, G, -1, -1), v.expand(-1, G, -1, -1)


def _dense(query, key, value, causal: bool, scale):
    """No mask: prefix_attention with P = 0 (causal) or N (bidirectional). Returns (B, N, H, D)."""
    K = _kernels()
    B, H, N, D = query.shape
    P = 0 if causal else N
    if key.shape[1] == H:
        return K.prefix_attention(query, key, value, P, scale=scale).transpose(1, 2)      # (B, N, H, D)
    q, k, v = _gqa_views(query, key, value)
    o = K.prefix_attention(q, k, v, P, scale=scale)                         # (B * Hkv, G, N, D)
    Hkv = key.shape[1]
    return o.view(B, Hkv, H // Hkv, N, D).permute(0, 3, 1, 2, 4).reshape(B, N, H, D)


def _packed(query, key, value, plan: _Plan, scale):
    """Padding: the real rows through prefix_attention_varlen; padded rows that see keys (all real keys
    of their sample) through torch's SDPA on those rows only; the rest 0. Returns (B, N, H, D)."""
    rows, cu, max_len, prefix = plan.packed
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(B * N, H, D).index_select(0, rows)  # (T, H, D)
    k, v = (t.transpose(1, 2).reshape(B * N, Hkv, D).index_select(0, rows) for t in (key, value))  # (T, Hkv, D)
    if Hkv != H:
        T = rows.numel()
        k, v = (t[:, :, None].expand(T, Hkv, H // Hkv, D).reshape(T, H, D) for t in (k, v))      # (T, H, D)
    o = _kernels().prefix_attention_varlen(q, k, v, cu, max_len, prefix, scale=scale)          # (T, H, D)
    out = o.new_zeros(B * N, H, D).index_copy(0, rows, o)                  # (B * N, H, D)
    if plan.seeing is not None:
        _COUNTS["sdpa_padded_rows"] += 1
        order, picks, seen_rows, keep = plan.seeing
        Nt = order.shape[1]
        qs = query.gather(2, order[:, None, :, None].expand(B, H, Nt, D))  # (B, H, Nt, D)
        os_ = torch.nn.functional.scaled_dot_product_attention(
            qs, key, value, attn_mask=keep[:, None, None, :], scale=scale, enable_gqa=Hkv != H)  # (B, H, Nt, D)
        out = out.index_copy(0, seen_rows, os_.transpose(1, 2).reshape(B * Nt, H, D).index_select(0, picks))
    return out.view(B, N, H, D)


def _eager(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """The model's own eager attention (it returns the weights); a boolean mask becomes additive."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)                  # (B, 1, N, N_kv)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: torch.Tensor | None = None, **kwargs):
    """transformers' attention interface for "aimv2": our kernels where they compute the same thing as
    sdpa_attention_forward, else that function (or the model's eager one when weights are requested).
    query (B, H, N, D), key / value (B, Hkv, N_kv, D) -> ((B, N, H, D), None)."""
    if _weights_requested(module, kwargs):
        out = _eager(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if out is not None:
            _fall_back("attention weights are requested (the model's eager attention)")
            return out
    why = _why_not(module, query, key, value, attention_mask, dropout, position_bias, kwargs)
    if why is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _fall_back(why)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    scale = None if scaling is None else float(scaling)
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and query.shape[2] > 1
        _COUNTS["kernel"] += 1
        return _dense(query, key, value, causal, scale), None
    plan: _Plan = attention_mask.aimv2_plan
    if plan.packed is None:
        _COUNTS["kernel"] += 1
        return _dense(query, key, value, plan.causal, scale), None
    _COUNTS["kernel_varlen"] += 1
    return _packed(query, key, value, plan, scale), None
