"""Preset registry: the AIMv2 sizes of method.md §1 (decoder of method.md §3) and a CPU debug size."""
from __future__ import annotations

from .config import ModelConfig, mlp_hidden_for


def _enc(name, dim, depth, heads, **kw) -> ModelConfig:
    return ModelConfig(name=name, dim=dim, depth=depth, num_heads=heads,
                       mlp_hidden=mlp_hidden_for(dim), **kw).validate()


PRESETS: dict[str, ModelConfig] = {
    "aimv2-large": _enc("aimv2-large", 1024, 24, 8),
    "aimv2-huge": _enc("aimv2-huge", 1536, 24, 12),
    "aimv2-1b": _enc("aimv2-1b", 2048, 24, 16),
    "aimv2-3b": _enc("aimv2-3b", 3072, 24, 24),
    # Debug size that trains in minutes on a CPU: patch 14 kept, 112 px (N = 64), head dim 64.
    "aimv2-tiny": ModelConfig(name="aimv2-tiny", img_size=112, dim=128, depth=4, num_heads=2,
                              mlp_hidden=mlp_hidden_for(128), dec_dim=128, dec_depth=2, dec_heads=2,
                              dec_mlp_hidden=mlp_hidden_for(128), vocab_size=1024,
                              pad_id=0).validate(),   # pad id of the built-in tokenizer
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """A copy of preset `name` with `overrides` applied (e.g. img_size=448, attn_backend="flex")."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[key].replace(**overrides)
