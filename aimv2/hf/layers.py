"""Our kernels as Hugging Face `kernels` layers, for `aimv2.hf.kernelize(model, mode)`.

HF kernels' `kernelize` replaces the instance `forward` of every module whose class carries a
`kernel_layer_name` with the `forward` of the layer that a mapping names; a mapping entry is any
object with `load()` (returning the layer class) and `layer_name` (`_Repository` here: no Hub
repository). Layers are stateless nn.Modules whose `forward` matches the replaced one's signature
and reads the replaced module's attributes.

- "RMSNorm" (transformers decorates ~130 classes with @use_kernel_forward_from_hub("RMSNorm")):
  y = x * rsqrt(mean(x^2) + eps) * w  ->  aimv2.kernels.rms_norm. Classes differ in details (the eps
  attribute's name, w vs 1 + w, casting order), so each class is probed once before its modules are
  kernelized (`rms_norm_compatible`): its own forward on a random input against rms_norm_ref with the
  module's eps and a random weight. Classes that differ are left alone, with the reason logged.
- "Aimv2MLP": down(act(gate(x)) * up(x)), act = SiLU  ->  down(aimv2.kernels.swiglu(gate(x), up(x))).
- "Aimv2EncoderLayer": s = h + attn(norm1(h)); y = s + mlp(norm2(s))  ->  one fused
  rms_norm(attn, w2, residual=h) returning (norm2(s), s). The attention inside runs whatever
  config._attn_implementation names (aimv2.hf.register's "aimv2" among them).
transformers' Aimv2 classes carry no `kernel_layer_name`: kernelize marks them for the duration of
its call only (`_scoped_kernel_layers`), as HF kernels' `replace_kernel_forward_from_hub` would, and
restores them.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging

import torch
from torch import nn

log = logging.getLogger("aimv2.hf")


def _kernels():
    from aimv2 import kernels as K
    return K


def _eps(module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


class RMSNorm(nn.Module):
    """Layer for transformers' "RMSNorm" classes (those with `weight` and a float eps attribute)."""
    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _kernels().rms_norm(hidden_states, self.weight, _eps(self))


class Aimv2MLP(nn.Module):
    """Layer for transformers' Aimv2MLP with a SiLU activation."""
    has_backward = True
    can_torch_compile = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_kernels().swiglu(self.gate_proj(x), self.up_proj(x)))


class Aimv2EncoderLayer(nn.Module):
    """Layer for transformers' Aimv2EncoderLayer: the residual add fused into the second RMSNorm."""
    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        h = self.rms_norm1(hidden_states)
        attn_output, _ = self.attention(hidden_states=h, attention_mask=attention_mask, **kwargs)
        norm2 = self.rms_norm2
        h, s = _kernels().rms_norm(attn_output, norm2.weight, _eps(norm2), residual=hidden_states)
        return s + self.ffn(h)                                              # (B, N, D)


class _Repository:
    """What a HF kernels mapping entry needs: `layer_name` and `load()`; hashable (kernels caches by it)."""

    def __init__(self, layer: type[nn.Module]):
        self.layer_name = layer.__name__
        self._layer = layer

    def load(self) -> type[nn.Module]:
        return self._layer

    def __repr__(self) -> str:
        return f"aimv2.hf.layers.{self.layer_name}"


REPOSITORIES = {"RMSNorm": _Repository(RMSNorm), "Aimv2MLP": _Repository(Aimv2MLP),
                "Aimv2EncoderLayer": _Repository(Aimv2EncoderLayer)}
_PROBED: dict[type, str | None] = {}


def _probe(module: nn.Module, D: int, eps: float):
    """The class's own forward and rms_norm_ref on a CPU fp32 copy of the module with a random weight."""
    probe = copy.deepcopy(module).to("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.weight.copy_(torch.rand(D, generator=g) + 0.5)
        x = torch.randn(3, 5, D, generator=g)
        return type(module).forward(probe, x), _kernels().rms_norm_ref(x, probe.weight, eps)


def rms_norm_compatible(module: nn.Module) -> str | None:
    """None when `type(module).forward` computes x * rsqrt(mean(x^2) + eps) * weight, else why not.
    Probed once per class on the CPU in fp32 (a copy of the module with a random weight)."""
    cls = type(module)
    if cls in _PROBED:
        return _PROBED[cls]
    why = None
    weight, eps = getattr(module, "weight", None), _eps(module)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        why = "no 1-D `weight` and float eps attribute"
    elif len(inspect.signature(cls.forward).parameters) != 2:
        why = "forward takes more than the hidden states"
    else:
        try:
            got, ref = _probe(module, weight.shape[0], eps)
        except Exception as e:  # noqa: BLE001 - a class we cannot probe is left alone, with the reason
            why = f"its forward fails on a probe: {type(e).__name__}: {e}"
        else:
            if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-5, atol=1e-5):
                why = "its forward computes something else than x * rsqrt(mean(x^2) + eps) * weight"
    if why is not None:
        log.info("aimv2.hf.kernelize: %s left alone: %s", cls.__name__, why)
    _PROBED[cls] = why
    return why


def _set_class_attrs(values: dict[type, dict[str, object]]):
    """Set class attributes; returns a function that restores what each class itself held."""
    saved = {cls: {k: cls.__dict__.get(k, _MISSING) for k in attrs} for cls, attrs in values.items()}
    for cls, attrs in values.items():
        for k, v in attrs.items():
            setattr(cls, k, v)

    def restore():
        for cls, attrs in saved.items():
            for k, v in attrs.items():
                if v is _MISSING:
                    delattr(cls, k)
                else:
                    setattr(cls, k, v)
    return restore


_MISSING = object()


@contextlib.contextmanager
def _scoped_kernel_layers(model: nn.Module):
    """While kernelize runs: transformers' Aimv2MLP / Aimv2EncoderLayer are marked as kernel layers
    (as HF kernels' replace_kernel_forward_from_hub would), and every kernel layer class of the model
    gets a condition that admits only the modules we map (RMSNorms that pass the probe, SiLU MLPs),
    so modules of other layer names are skipped, not reset. Everything is restored on exit."""
    marks: dict[type, dict[str, object]] = {}
    try:
        from transformers.models.aimv2 import modeling_aimv2 as M
        marks[M.Aimv2MLP] = {"kernel_layer_name": "Aimv2MLP"}
        marks[M.Aimv2EncoderLayer] = {"kernel_layer_name": "Aimv2EncoderLayer"}
    except ImportError:
        pass
    restore_marks = _set_class_attrs(marks)
    try:
        selected = set()
        for module in model.modules():
            layer = getattr(type(module), "kernel_layer_name", None)
            if layer == "RMSNorm" and rms_norm_compatible(module) is None:
                selected.add(id(module))
            elif layer == "Aimv2MLP" and module.config.hidden_act in ("silu", "swish"):
                selected.add(id(module))
            elif layer == "Aimv2EncoderLayer":
                selected.add(id(module))
        classes = {type(m) for m in model.modules() if hasattr(type(m), "kernel_layer_name")}
        restore_conditions = _set_class_attrs(
            {cls: {"kernel_condition": staticmethod(lambda m: id(m) in selected)} for cls in classes})
        try:
            yield
        finally:
            restore_conditions()
    finally:
        restore_marks()


def kernelize_modules(model: nn.Module, mode: str, device: torch.device) -> None:
    """HF kernels' kernelize over the model with our mapping (module docstring)."""
    from kernels import Mode, kernelize, use_kernel_mapping
    hf_mode = {"training": Mode.TRAINING, "inference": Mode.INFERENCE}[mode]
    dev = device.type                         # passed as a string: HF kernels' Device(type=dev), ROCm as "cuda"
    mapping = {name: {dev: {hf_mode: repo}} for name, repo in REPOSITORIES.items()}
    quiet = logging.getLogger("kernels")      # "no mapping for <other layer>": those stay as they are
    level = quiet.level
    with _scoped_kernel_layers(model), use_kernel_mapping(mapping):
        quiet.setLevel(logging.ERROR)
        try:
            kernelize(model, mode=hf_mode, device=dev, use_fallback=True)
        finally:
            quiet.setLevel(level)
