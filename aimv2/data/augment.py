"""Augmentation: a sample's crop plan, how it is drawn, and the three executors that apply it.

A sample's augmentation is a `CropPlan`: a box (x, y, w, h) in the pixels of the source image as its
header declares it, and a horizontal flip. The plan is drawn once per sample by `crop_plan`, a pure
function of (seed, epoch, sample id, image size) and the DataConfig ranges, so both backends, every
worker count and a resumed run see the same plan. Every executor then does the same thing:

    crop the box -> resize it to (S, S), bicubic, antialiased (a w != h box is stretched) -> mirror if flip

  PIL     `pil_crop_resize(im, plan, S)`     decoded RGB PIL image -> uint8 (S, S, 3)
  tensor  `tensor_crop_resize(img, plan, S)` uint8 (3, H, W) on any device (torchvision's nvJPEG
                                             decode) -> float32 (3, S, S), rounded to integers in [0, 255]
  DALI    `dali_crop_args(plans)`            the per-sample inputs of the DALI graph (dali.py):
                                             fn.decoders.image_slice(anchor=(x, y), shape=(w, h))
                                             -> fn.resize(S, S, cubic, antialias) -> mirror

Decoding is not here: loader.decode_pil (PIL, with JPEG DCT-domain downscaling) and dali.py decode
the bytes and hand the pixels, or the arguments, to these executors.

Draw. train: torchvision's RandomResizedCrop parameters: up to 10 tries of area fraction ~ U(crop_scale)
and log aspect ratio ~ U(log crop_ratio), the box placed uniformly when it fits, else a centre crop with
the aspect ratio clamped to crop_ratio; then flip with p = 0.5 (never when cfg.hflip is false; the draw is
consumed either way). eval: the centred min(W, H) square, no
flip (= resize the shorter side to S and centre-crop S).

The uniforms come from a counter-based generator (`plan_uniforms`): uniform j of sample `sid` in
`epoch` is a hash (SplitMix64's finaliser) of (seed, epoch, sid, j), so a whole chunk of samples gets
its (n, PLAN_DRAWS) uniforms from a few numpy operations, and sample sid's values do not depend on
which chunk, worker, backend or resume position drew them. `random_crop_plan(rng, ...)` consumes them
in a fixed order through `CounterDraws` (any object with numpy Generator's uniform / integers / random
works, e.g. np.random.default_rng(0) in tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .config import DataConfig

__all__ = ["CropPlan", "output_wh", "crop_plan", "crop_plans", "plan_uniforms", "CounterDraws", "random_crop_plan", "center_crop_plan",
           "pil_crop_resize", "tensor_crop_resize", "dali_crop_args"]


@dataclass(frozen=True)
class CropPlan:
    """Crop box (x, y, w, h) in source pixels (x, w along the width), then resize, then mirror if flip."""

    x: int
    y: int
    w: int
    h: int
    flip: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), right and bottom exclusive (PIL's box convention)."""
        return self.x, self.y, self.x + self.w, self.y + self.h

    def fits(self, width: int, height: int) -> bool:
        """True when the box is non-empty and lies inside a width x height image."""
        return 0 <= self.x and 0 <= self.y and 0 < self.w and 0 < self.h and \
            self.x + self.w <= width and self.y + self.h <= height


# ---- drawing ---------------------------------------------------------------------------------------
PLAN_DRAWS = 41  # uniforms a train plan may consume: 10 tries x (scale, ratio, y, x) + the flip
_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection of 64-bit words."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def plan_uniforms(seed: int, epoch: int, sids, n_draws: int = PLAN_DRAWS) -> np.ndarray:
    """(len(sids), n_draws) float64 uniforms in [0, 1): row i is a pure function of (seed, epoch, sids[i]).

    Counter-based: u[i, j] = top 53 bits of mix(mix(key ^ sid * G2) + (j + 1) * G) with key = a hash of
    (seed, epoch), G SplitMix64's increment; every sample has its own stream, whatever chunk it is in."""
    key = _mix64(np.array([(seed * _GAMMA + 0xC20F) & _M64], np.uint64))
    key = _mix64(key ^ np.uint64((epoch * 0xD1B54A32D192ED03 + 1) & _M64))
    sid = np.asarray(sids, dtype=np.int64).astype(np.uint64).reshape(-1, 1)  # (n, 1)
    base = _mix64(key ^ (sid * np.uint64(0xA0761D6478BD642F)))  # (n, 1) per-sample stream
    j = (np.arange(1, n_draws + 1, dtype=np.uint64) * np.uint64(_GAMMA)).reshape(1, -1)  # (1, n_draws)
    z = _mix64(base + j)  # (n, n_draws) uint64
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class CounterDraws:
    """numpy Generator's uniform / integers / random over one row of `plan_uniforms`, in order."""

    __slots__ = ("_u", "_i")

    def __init__(self, row):
        self._u, self._i = row, 0

    def random(self) -> float:
        u = self._u[self._i]
        self._i += 1
        return u

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def integers(self, lo: int, hi: int) -> int:
        """An int in [lo, hi) (hi > lo), as numpy's integers(lo, hi)."""
        return min(lo + int(self.random() * (hi - lo)), hi - 1)


def crop_plans(cfg: DataConfig, epoch: int, sids, sizes) -> list[CropPlan]:
    """The plans of samples `sids` in `epoch` for images of sizes [(W, H), ...] (train: random; eval:
    centre), their uniforms drawn for the whole list at once; plan i depends on sids[i] and sizes[i] only."""
    if not cfg.train:  # native mode keeps the whole image (method.md §8)
        return [CropPlan(0, 0, w, h, False) if cfg.native else center_crop_plan(w, h) for w, h in sizes]
    if len(sizes) == 0:
        return []
    rows = plan_uniforms(cfg.seed, epoch, sids).tolist()  # (n, PLAN_DRAWS) Python floats: cheap scalar math
    flip_p = 0.5 if cfg.hflip else 0.0
    return [random_crop_plan(CounterDraws(row), w, h, cfg.crop_scale, cfg.crop_ratio, flip_p)
            for row, (w, h) in zip(rows, sizes)]


def crop_plan(cfg: DataConfig, epoch: int, sid: int, width: int, height: int) -> CropPlan:
    """The plan of sample id `sid` in `epoch` for a width x height image (train: random; eval: centre)."""
    return crop_plans(cfg, epoch, [sid], [(width, height)])[0]


def center_crop_plan(width: int, height: int) -> CropPlan:
    side = min(width, height)
    return CropPlan(int(round((width - side) / 2)), int(round((height - side) / 2)), side, side, False)


def random_crop_plan(rng, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                     flip_p: float = 0.5) -> CropPlan:
    """RandomResizedCrop(scale, ratio) box + flip with p = flip_p, drawn from `rng` (a CounterDraws or a numpy
    Generator; see the module docstring).

    Draw order (fixed: resume and the golden values in tests/test_data_augment.py depend on it): per try
    uniform(scale), uniform(log ratio), and when the box fits integers(y), integers(x); then random() for the
    flip: at most PLAN_DRAWS values.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return CropPlan(x, y, w, h, bool(rng.random() < flip_p))
    aspect = width / height  # fallback: centre crop with the aspect ratio clamped to `ratio`
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    return CropPlan((width - w) // 2, (height - h) // 2, w, h, bool(rng.random() < flip_p))


# ---- executors -------------------------------------------------------------------------------------
def output_wh(size) -> tuple[int, int]:
    """An executor's output size: an int S = (S, S), or (width, height) (native mode)."""
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def pil_crop_resize(im: Image.Image, plan: CropPlan, size,
                    scale: tuple[float, float] = (1.0, 1.0), out: np.ndarray | None = None) -> np.ndarray:
    """Decoded RGB image -> uint8 (size, size, 3); or, when `out` (uint8 (3, size, size), e.g. a slot of
    the torch backend's chunk) is given, the same pixels written into it as channel planes.
    size: an int, or (width, height) for a (height, width, 3) result (native mode).

    scale: (fx, fy), the decoded image's size over the source size the plan refers to (a JPEG decoded
    at 1/2, 1/4 or 1/8 in the DCT domain); the box is scaled by it, in float, before resizing.
    """
    fx, fy = scale
    x, y, w, h = plan.x, plan.y, plan.w, plan.h
    res = im.resize(output_wh(size), Image.BICUBIC, box=(x * fx, y * fy, (x + w) * fx, (y + h) * fy))
    if plan.flip:
        res = res.transpose(Image.FLIP_LEFT_RIGHT)
    if out is None:
        return np.asarray(res)  # (size, size, 3)
    # NOTE: planes straight from PIL's bands: the batch's CHW layout without a strided transpose, which
    # halves the main process's normalise (51 vs 108 us per 224 px image; 2 shared cores)
    for c, band in enumerate(res.split()):
        out[c] = np.asarray(band)  # (size, size)
    return out  # NOTE: numpy, not torch: torch's intra-op threads stall tiny per-image ops when the CPU
    # is oversubscribed (measured 19 ms per permute-copy on 2 busy cores)


def tensor_crop_resize(img: torch.Tensor, plan: CropPlan, size: int) -> torch.Tensor:
    """uint8 (3, H, W) on any device -> float32 (3, size, size) in [0, 255], rounded as a uint8 result
    would be. The PyTorch counterpart of pil_crop_resize: the same antialiased bicubic filter, but PIL
    rounds to uint8 between its horizontal and vertical passes and reads the pixels just outside the
    box, where this crops first (tests/test_data_augment.py bounds the difference)."""
    crop = img[:, plan.y: plan.y + plan.h, plan.x: plan.x + plan.w].unsqueeze(0).float()  # (1, 3, h, w)
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False,
                                          antialias=True)[0].clamp_(0, 255).round_()  # (3, size, size)
    return out.flip(-1) if plan.flip else out


def dali_crop_args(plans: Sequence[CropPlan]) -> dict[str, list[np.ndarray]]:
    """The DALI graph's per-sample inputs for `plans`, by external_source name (dali.py):
    "anchor" float32 (2,) = (x, y) and "shape" float32 (2,) = (w, h) of image_slice with
    axis_names="WH" and absolute coordinates; "mirror" int32 () of crop_mirror_normalize."""
    return {
        "anchor": [np.array((p.x, p.y), dtype=np.float32) for p in plans],
        "shape": [np.array((p.w, p.h), dtype=np.float32) for p in plans],
        "mirror": [np.array(int(p.flip), dtype=np.int32) for p in plans],
    }
