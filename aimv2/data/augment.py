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

Draw. train: torchvision's RandomResizedCrop parameters, from rng(seed, epoch, sample id): up to 10
tries of area fraction ~ U(crop_scale) and log aspect ratio ~ U(log crop_ratio), the box placed
uniformly when it fits, else a centre crop with the aspect ratio clamped to crop_ratio; then flip
with p = 0.5. eval: the centred min(W, H) square, no flip (= resize the shorter side to S and
centre-crop S). `random_crop_plan` takes the generator as an argument, so a caller may draw many
plans from one generator (for instance one counter-based generator per chunk of samples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .config import DataConfig
from .dataset import keyed_rng

__all__ = ["CropPlan", "crop_plan", "random_crop_plan", "center_crop_plan",
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
def crop_plan(cfg: DataConfig, epoch: int, sid: int, width: int, height: int) -> CropPlan:
    """The plan of sample id `sid` in `epoch` for a width x height image (train: random; eval: centre)."""
    if not cfg.train:
        return center_crop_plan(width, height)
    return random_crop_plan(keyed_rng(cfg.seed, epoch, sid, 0xC20F), width, height, cfg.crop_scale, cfg.crop_ratio)


def center_crop_plan(width: int, height: int) -> CropPlan:
    side = min(width, height)
    return CropPlan(int(round((width - side) / 2)), int(round((height - side) / 2)), side, side, False)


def random_crop_plan(rng: np.random.Generator, width: int, height: int,
                     scale: tuple[float, float], ratio: tuple[float, float]) -> CropPlan:
    """RandomResizedCrop(scale, ratio) box + flip with p = 0.5, drawn from `rng` (see the module docstring).

    Draw order (fixed: resume and the golden values in tests/test_data_augment.py depend on it): per try
    uniform(scale), uniform(log ratio), and when the box fits integers(y), integers(x); then random() for the flip.
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
            return CropPlan(x, y, w, h, bool(rng.random() < 0.5))
    aspect = width / height  # fallback: centre crop with the aspect ratio clamped to `ratio`
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    return CropPlan((width - w) // 2, (height - h) // 2, w, h, bool(rng.random() < 0.5))


# ---- executors -------------------------------------------------------------------------------------
def pil_crop_resize(im: Image.Image, plan: CropPlan, size: int,
                    scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Decoded RGB image -> uint8 (size, size, 3).

    scale: (fx, fy), the decoded image's size over the source size the plan refers to (a JPEG decoded
    at 1/2, 1/4 or 1/8 by PIL's draft mode); the box is scaled by it, in float, before resizing.
    """
    fx, fy = scale
    x, y, w, h = plan.x, plan.y, plan.w, plan.h
    out = im.resize((size, size), Image.BICUBIC, box=(x * fx, y * fy, (x + w) * fx, (y + h) * fy))
    if plan.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)  # (size, size, 3); NOTE: numpy, not torch: torch's intra-op threads stall
    # tiny per-image ops when the CPU is oversubscribed (measured 19 ms per permute-copy on 2 busy cores)


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
