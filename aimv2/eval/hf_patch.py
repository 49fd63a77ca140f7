"""Our Triton kernels inside a transformers AIMv2 model, in place: a thin wrapper over aimv2.hf.

    model = Aimv2VisionModel.from_pretrained(...)      # or Aimv2Model
    aimv2.patch_transformers(model)                    # same weights, same outputs (within tolerance)

equals `aimv2.hf.register(); model.set_attn_implementation("aimv2"); aimv2.hf.kernelize(model, mode)`
(mode "training" or "inference" from model.training). What is swapped (instance `forward`s are replaced
through HF kernels' kernelize; module classes, parameters, state-dict keys and transformers'
output-capturing hooks stay as they are, so weights are shared, not copied):
- `Aimv2RMSNorm`:      y = x * rsqrt(mean(x^2) + eps) * w            -> aimv2.kernels.rms_norm
- `Aimv2EncoderLayer`: s = h + attn; y = RMSNorm2(s)                -> one fused rms_norm(attn, w2, residual=h)
- `Aimv2MLP`:          down(act(gate(x)) * up(x)), act = SiLU        -> down(aimv2.kernels.swiglu(gate(x), up(x)))
- attention:           softmax(q k^T / sqrt(Dh)) v                   -> config._attn_implementation = "aimv2":
  aimv2.kernels.prefix_attention (P = N, or P = 0 causal); with the text tower's padding mask the real rows
  through prefix_attention_varlen and the padded rows that SDPA lets see keys through SDPA on those rows
  alone; returns no weights, like transformers' SDPA path.

transformers' own attention still runs where our kernel would not compute the same thing or cannot run
(aimv2/hf/attention.py has the full list): attention weights requested (`output_attentions`: the model's
eager attention), attention dropout while training, a mask our kernels do not compute, or a head dim the
kernel lacks (sdpa). An MLP whose activation is not SiLU is left alone.
On a CPU the kernels need TRITON_INTERPRET=1 (testing only).
"""
from __future__ import annotations


def _kernels():
    from aimv2 import kernels as K
    return K


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
    from aimv2 import hf
    name = hf.register()
    model.set_attn_implementation(name)
    return hf.kernelize(model, mode="training" if model.training else "inference")
