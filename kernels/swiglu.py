"""Fused SwiGLU activation: out = silu(gate) * up.

Shapes: gate, up (..., H), any leading shape; strided views (e.g. halves of a fused gate/up
projection output) are accepted as long as the last dim is contiguous.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch specification (computed in fp32, returned in the input dtype)."""
    g = gate.float() if gate.dtype != torch.float64 else gate
    u = up.to(g.dtype)
    return (F.silu(g) * u).to(gate.dtype)
