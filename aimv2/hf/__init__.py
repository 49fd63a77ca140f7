"""aimv2's kernels as a transformers backend, through transformers' and HF kernels' public plug-in points.

    import aimv2.hf
    aimv2.hf.register()                                   # attn_implementation="aimv2" for every routed model
    model = AutoModel.from_pretrained(..., attn_implementation="aimv2")   # Aimv2, Siglip, ViT, Llama, ...
    aimv2.hf.kernelize(model, mode="training")            # RMSNorms (+ Aimv2 fusions) on our kernels

- `register(name="aimv2")`: our attention function in `transformers.AttentionInterface` and the matching
  mask function in `AttentionMaskInterface` (without it transformers builds no mask at all for a custom
  name, padding included). What runs on our kernels and what falls back: aimv2/hf/attention.py.
- `kernelize(model, mode)`: HF kernels' `kernelize` with a mapping to our layers (aimv2/hf/layers.py):
  every transformers RMSNorm class decorated `@use_kernel_forward_from_hub("RMSNorm")` that computes
  x * rsqrt(mean(x^2) + eps) * w, plus the Aimv2-only fusions (SwiGLU MLP, residual + RMSNorm).
- `counts()` / `reset_counts()`: which attention path ran, per call.
The full account: docs/transformers.md. On a CPU the kernels need TRITON_INTERPRET=1 (testing only).
"""
from __future__ import annotations

import torch

from .attention import attention_forward, counts, mask_function, reset_counts

__all__ = ["register", "kernelize", "kernelized", "counts", "reset_counts", "attention_forward", "mask_function"]

_BUILTIN = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
            "paged|eager", "paged|sdpa", "paged|flash_attention_2")


def register(name: str = "aimv2") -> str:
    """Register our attention and mask functions with transformers under `name` (idempotent); returns it.
    Then `attn_implementation=name` works in from_pretrained / from_config / set_attn_implementation."""
    if not isinstance(name, str) or not name or name in _BUILTIN:
        raise ValueError(f"name: expected a new attention implementation name, not one of transformers' own "
                         f"{_BUILTIN}, got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("aimv2.hf.register needs transformers >= 5 (AttentionInterface, "
                          "AttentionMaskInterface)") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    return name


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model: expected a module with parameters (its device picks the kernels)")
    return p.device


def kernelize(model: torch.nn.Module, mode: str = "inference") -> torch.nn.Module:
    """Our RMSNorm for every compatible transformers "RMSNorm" module, and for transformers' Aimv2 models
    the fused SwiGLU MLP and residual + RMSNorm, through HF kernels' `kernelize` (instance forwards
    replaced; classes, parameters and state-dict keys unchanged). In place; idempotent; returns model.

    mode: "training" or "inference" (HF kernels' Mode.TRAINING / Mode.INFERENCE; our layers have a
    backward either way). Raises where the kernels cannot run on the model's device.
    Names of the replaced modules: `kernelized(model)`."""
    if mode not in ("training", "inference"):
        raise ValueError(f"mode: expected 'training' or 'inference', got {mode!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    try:   # Hugging Face's package (a checkout's kernels/ folder hands over to it, or is inert without it)
        from kernels import kernelize as _hf_kernelize  # noqa: F401
    except ImportError as e:
        raise ImportError("aimv2.hf.kernelize needs Hugging Face's `kernels` package (pip install kernels)") from e
    from aimv2 import kernels as K
    device = _device_of(model)
    why_not = K.unavailable_reason(device)
    if why_not is not None:
        raise RuntimeError(f"aimv2.hf.kernelize: the Triton kernels cannot run on {device}: {why_not}")
    from .layers import kernelize_modules
    kernelize_modules(model, mode, device)
    return model


def kernelized(model: torch.nn.Module) -> dict[str, str]:
    """{module name: our layer name} for the modules whose forward kernelize replaced."""
    from .layers import REPOSITORIES
    ours = set(REPOSITORIES.values())
    return {n: m.__dict__["_kernel_repo"].layer_name for n, m in model.named_modules()
            if m.__dict__.get("_kernel_repo") in ours}
