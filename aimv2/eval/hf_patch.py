"""Our Triton kernels inside a transformers AIMv2 model, in place.

    model = Aimv2VisionModel.from_pretrained(...)      # or Aimv2Model
    aimv2.patch_transformers(model)                    # same weights, same outputs (within tolerance)

What is swapped (instance `forward`s are replaced; module classes, parameters, state-dict keys and
transformers' output-capturing hooks stay as they are, so weights are shared, not copied):
- `Aimv2RMSNorm`:      y = x * rsqrt(mean(x^2) + eps) * w            -> aimv2.kernels.rms_norm
- `Aimv2EncoderLayer`: s = h + attn; y = RMSNorm2(s)                -> one fused rms_norm(attn, w2, residual=h)
- `Aimv2MLP`:          down(act(gate(x)) * up(x)), act = SiLU        -> down(aimv2.kernels.swiglu(gate(x), up(x)))
- `Aimv2Attention`:    softmax(q k^T / sqrt(Dh)) v over all N keys    -> aimv2.kernels.prefix_attention(q, k, v, P=N)
  returning (out_proj(o), None) like transformers' SDPA path (which returns no weights).

The original forward still runs where our kernel would not compute the same thing or cannot run: an
attention mask given (the text tower's padding / causal mask), `is_causal` set, attention dropout while
training, attention weights requested (`output_attentions`), or a head dim the kernel lacks. An MLP whose activation is not SiLU is left alone.
On a CPU the kernels need TRITON_INTERPRET=1 (testing only).
"""
from __future__ import annotations

import types

import torch

_MARK = "_aimv2_patched"


def _kernels():
    from aimv2 import kernels as K
    return K


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _kernels().rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_kernels().swiglu(self.gate_proj(x), self.up_proj(x)))


def _layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    h = self.rms_norm1(hidden_states)
    attn_output, _ = self.attention(hidden_states=h, attention_mask=attention_mask, **kwargs)
    norm2 = self.rms_norm2
    h, s = _kernels().rms_norm(attn_output, norm2.weight, norm2.variance_epsilon, residual=hidden_states)
    return s + self.ffn(h)                                                  # (B, N, D)


def _wants_weights(module, kwargs) -> bool:
    return bool(kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)))


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    if (attention_mask is not None or self.is_causal or (self.training and self.dropout > 0)
            or hidden_states.dim() != 3 or self.head_dim not in _kernels().ATTENTION_HEAD_DIMS
            or _wants_weights(self, kwargs)):
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    B, N, D = hidden_states.shape
    H, Dh = self.num_heads, self.head_dim
    q = self.q_proj(hidden_states).view(B, N, H, Dh).transpose(1, 2)        # (B, H, N, Dh)
    k = self.k_proj(hidden_states).view(B, N, H, Dh).transpose(1, 2)        # (B, H, N, Dh)
    v = self.v_proj(hidden_states).view(B, N, H, Dh).transpose(1, 2)        # (B, H, N, Dh)
    o = _kernels().prefix_attention(q, k, v, N)                             # (B, H, N, Dh), P = N
    return self.out_proj(o.transpose(1, 2).reshape(B, N, D)), None


def patch_transformers(model):
    """Swap the RMSNorms, SwiGLU MLPs and attention of a transformers AIMv2 model for our kernels.

    model: an `Aimv2VisionModel`, `Aimv2Model` or `Aimv2TextModel` (transformers >= 5). Patched in
    place (idempotent); returns the model. See the module docstring for what changes and what does not.
    """
    try:
        from transformers.models.aimv2 import modeling_aimv2 as M
    except ImportError as e:
        raise ImportError("patch_transformers needs transformers with AIMv2 support (>= 4.54)") from e
    if not isinstance(model, M.Aimv2PreTrainedModel):
        raise TypeError(f"model: expected a transformers Aimv2VisionModel / Aimv2Model, "
                        f"got {type(model).__name__}")
    why_not = _kernels().unavailable_reason()   # fail here, not in the first forward
    if why_not is not None:
        raise RuntimeError(f"patch_transformers: the Triton kernels cannot run here: {why_not}")
    for module in model.modules():
        if getattr(module, _MARK, False):
            continue
        if isinstance(module, M.Aimv2RMSNorm):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif isinstance(module, M.Aimv2MLP):
            if module.config.hidden_act not in ("silu", "swish"):
                continue
            module.forward = types.MethodType(_mlp_forward, module)
        elif isinstance(module, M.Aimv2EncoderLayer):
            module.forward = types.MethodType(_layer_forward, module)
        elif isinstance(module, M.Aimv2Attention):
            module.forward = types.MethodType(_attention_forward, module)
        else:
            continue
        setattr(module, _MARK, True)
    return model
