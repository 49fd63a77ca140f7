"""Position embeddings over a patch grid of any shape (method.md §8): the fixed 2-D sin-cos of the
`-native` checkpoints and the bicubic resize of a learned square table.

    sincos_2d(h, w, D)          (h*w, D)  token (y, x) -> [sin(x w) | cos(x w) | sin(y w) | cos(y w)]
    resize_table(pe, (h, w))    learned (1, g*g, D) or (g*g, D) table -> same rank with h*w tokens

Tokens are row-major over the (h, w) grid (row = image y), the order of `Conv2d(...).flatten(2)` and of
`kernels.patchify`. The frequencies are w_i = 10000^(-i / (D/4)), i < D/4, computed in float64.

Layout. transformers' `build_2d_sinusoidal_position_embedding` writes the canonical h-first vector
[sin(y w) | cos(y w) | sin(x w) | cos(x w)]; its `Aimv2VisionEmbeddings(is_native)` then rotates it by
half the width (the last D/2 entries first), so the released `-native` AIMv2 weights see the x (width)
half first. `sincos_2d` builds that rotated layout directly, with the same float64 operations in the same
order, so it equals transformers' embedding exactly (tests/test_native.py); on a square grid it is
the table `aimv2.weights.sincos_pos_embed` always built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TEMPERATURE = 10000.0


def _grid(g) -> tuple[int, int]:
    h, w = (g, g) if isinstance(g, int) and not isinstance(g, bool) else tuple(g)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"grid: expected positive ints (h, w), got {g!r}")
    return h, w


def sincos_2d(h: int, w: int, dim: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h*w, dim) fixed sin-cos embedding of an h x w patch grid in the `-native` AIMv2 layout
    [sin(x w) | cos(x w) | sin(y w) | cos(y w)] (x = column, y = row); float64 math, cast to `dtype`."""
    h, w = _grid((h, w))
    if not isinstance(dim, int) or dim <= 0 or dim % 4:
        raise ValueError(f"dim: the sin-cos embedding needs a positive multiple of 4, got {dim!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    cdt = torch.float32 if device.type == "mps" else torch.float64       # mps has no float64
    omega = torch.arange(dim // 4, dtype=cdt, device=device) / (dim // 4)
    omega = 1.0 / TEMPERATURE ** omega                                   # (D/4,)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=cdt, device=device),
                            torch.arange(w, dtype=cdt, device=device), indexing="ij")   # (h, w) each
    ey = gy.flatten().outer(omega)                                       # (h*w, D/4)
    ex = gx.flatten().outer(omega)
    return torch.cat([ex.sin(), ex.cos(), ey.sin(), ey.cos()], dim=1).to(dtype)


def resize_table(pe: torch.Tensor, grid) -> torch.Tensor:
    """Bicubic resize of a learned position table over its square 2-D grid to `grid` = G or (h, w).

    pe (1, g*g, D) or (g*g, D), row-major tokens -> same rank with h*w tokens. Per axis: PyTorch's
    cubic convolution (a = -0.75, align_corners=False) when that side grows, its antialiased resize
    when it shrinks (the rule of `aimv2.weights.interpolate_pos_embed`; torch's antialiased kernel is
    PIL's a = -0.5 one, so a side that grows and one that shrinks take one separable pass each).
    Computed in fp32, returned in pe's dtype; differentiable. The same size returns pe itself."""
    if not isinstance(pe, torch.Tensor) or pe.dim() not in (2, 3) or (pe.dim() == 3 and pe.shape[0] != 1):
        raise ValueError(f"pe: expected a (1, N, D) or (N, D) tensor, got {getattr(pe, 'shape', type(pe))}")
    h, w = _grid(grid)
    N, D = pe.shape[-2:]
    g = math.isqrt(N)
    if g * g != N:
        raise ValueError(f"pe: {N} tokens do not form a square grid")
    if (h, w) == (g, g):
        return pe
    img = pe.reshape(1, g, g, D).permute(0, 3, 1, 2).float()                     # (1, D, g, g)
    if (h < g) == (w < g):
        img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False, antialias=h < g)
    else:                                                                        # one pass per axis
        img = F.interpolate(img, size=(h, g), mode="bicubic", align_corners=False, antialias=h < g)
        img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False, antialias=w < g)
    out = img.permute(0, 2, 3, 1).reshape(1, h * w, D).to(pe.dtype)              # (1, h*w, D)
    return out if pe.dim() == 3 else out[0]
