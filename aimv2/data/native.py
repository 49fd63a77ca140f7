"""Native-resolution mode (method.md §8): each crop keeps its aspect ratio, batches are packed by tokens.

Per sample (both backends, DataConfig.native = True):

  crop    the RandomResizedCrop plan of augment.py (train), or the whole image (eval), as today
  grid    (h, w) patches = native_grid(crop height, crop width, patch_size, min_patches, max_patches)
  resize  the crop to (h * p, w * p) pixels, bicubic, antialiased, then the flip
  patches (h * w, p * p * 3) rows in kernels.patchify order (`patchify_hwc`), ImageNet-normalised
  prefix P_s = native_prefix_lengths: U{1..N_s - 1} per sample, N_s = h * w (method.md §2)

Packing (`greedy_packs` is the specification the loaders stream): samples in plan order join the
current batch until the next one would take it past `tokens_per_batch` tokens; that one opens the next
batch. DataConfig checks max_patches <= tokens_per_batch, so every sample fits in an empty batch. A
batch is an aimv2.packing.PackedBatch; its position in the epoch order (Loader.state_dict) is just
past its last sample, as for fixed-size batches, and the packing from there depends on nothing
before it, so a resumed loader yields the same batches.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .augment import plan_uniforms

__all__ = ["native_grid", "plan_grid", "native_prefix_lengths", "patchify_hwc", "greedy_packs"]


def native_grid(height: int, width: int, patch_size: int, min_patches: int, max_patches: int) -> tuple[int, int]:
    """The (h, w) patch grid of a height x width pixel image (or crop) at native resolution.

    The ideal real grid keeps the aspect ratio a = width / height and the patch count
    T = clamp(height * width / patch_size^2, min_patches, max_patches): h* = sqrt(T / a), w* = sqrt(T a).
    Rounding: among every integer grid with h, w >= 1 and min_patches <= h * w <= max_patches, the one
    nearest (h*, w*) in log coordinates, (log h - log h*)^2 + (log w - log w*)^2 = relative errors of
    the area and of the aspect ratio weighted alike; ties go to the smaller h, then the smaller w. So an image already in
    range keeps its size to the nearest patch, h * w never exceeds max_patches, and a 1 x 2000 px strip
    still lands in range (h = 1, w as near its aspect ratio as the range allows).
    Equivalent brute force: min over all (h, w) of that distance (tests/test_data_native.py).
    """
    for name, v in (("height", height), ("width", width), ("patch_size", patch_size),
                    ("min_patches", min_patches), ("max_patches", max_patches)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"native_grid: {name} must be a positive int, got {v!r}")
    if min_patches > max_patches:
        raise ValueError(f"native_grid: min_patches={min_patches} > max_patches={max_patches}")
    area = min(max(height * width / patch_size ** 2, min_patches), max_patches)
    log_h = 0.5 * (math.log(area) - math.log(width / height))  # log h*
    log_w = math.log(area) - log_h                                # log w*
    w_star = math.exp(log_w)

    def best_at(h):  # (cost, h, w) of the best w for this h (floor or ceil of w*, clamped to the range)
        lo, hi = -(-min_patches // h), max_patches // h
        if lo > hi:
            return None
        return min(((math.log(h) - log_h) ** 2 + (math.log(w) - log_w) ** 2, h, w)
                   for w in (min(max(math.floor(w_star), lo), hi), min(max(math.ceil(w_star), lo), hi)))

    first = best_at(min(max(round(math.exp(log_h)), 1), max_patches))
    # exact: an h can beat cost c only if (log h - log h*)^2 <= c, so only h in exp(log h* -+ sqrt(c)) is
    # searched (a full scan when the rounded h* has no w in range: a band narrower than h)
    # NOTE: 30-34 us per image (2,000 random 100-2000 px sizes, 2 shared cores) where a numpy scan of
    # every h in 1..1024 took 140 us
    span = math.sqrt(first[0]) if first is not None else math.inf
    lo_h = 1 if span == math.inf else max(1, math.floor(math.exp(log_h - span)) - 1)
    hi_h = max_patches if span == math.inf else min(max_patches, math.ceil(math.exp(log_h + span)) + 1)
    best = min(filter(None, map(best_at, range(lo_h, hi_h + 1))))
    return best[1], best[2]


def native_prefix_lengths(seed: int, rank: int, epoch: int, positions, lengths, prefix="random") -> torch.Tensor:
    """(n,) int64 prefix lengths of the samples at `positions` of the epoch order, with `lengths` patches.

    "random": P_s ~ U{1..N_s - 1} (method.md §2), from a uniform that is a pure function of
    (seed, rank, epoch, position), whatever batch the sample lands in. N_s = 1 has no such P (and no
    pixel pair to predict): P = 1 = N_s, the lone patch is context. DataConfig requires
    min_patches >= 2, so the loader never meets it. "full": P = N_s. An int P: min(P, N_s).
    """
    n = np.asarray(lengths, dtype=np.int64)  # (n,)
    if prefix == "full":
        return torch.from_numpy(n.copy())
    if prefix != "random":
        return torch.from_numpy(np.minimum(n, int(prefix)))
    key = (int(seed) * 0x100000001B3 + int(rank) * 0x9E3779B1 + 0x9F1C) & ((1 << 63) - 1)
    u = plan_uniforms(key, epoch, positions, n_draws=1)[:, 0]  # (n,) in [0, 1)
    p = 1 + np.floor(u * (n - 1)).astype(np.int64)             # U{1..N-1}
    return torch.from_numpy(np.where(n >= 2, np.minimum(p, n - 1), 1))


def patchify_hwc(img, patch_size: int):
    """One (H, W, C) image (numpy or torch), H and W multiples of patch_size -> (h*w, p*p*C) rows in
    kernels.patchify order (row in patch, column in patch, channel): the same as
    patchify(img.permute(2, 0, 1)[None], p)[0], without the CHW detour."""
    H, W, C = img.shape
    p = patch_size
    x = img.reshape(H // p, p, W // p, p, C)  # (h, p, w, q, C)
    x = x.transpose(1, 2) if isinstance(img, torch.Tensor) else x.transpose(0, 2, 1, 3, 4)  # (h, w, p, q, C)
    return x.reshape((H // p) * (W // p), p * p * C)


def greedy_packs(lengths, tokens_per_batch: int) -> list[tuple[int, int]]:
    """[(start, end), ...] of the batches greedy packing makes of samples with these token counts:
    each batch takes samples in order until the next would exceed tokens_per_batch (the last one may
    be partial). A sample longer than the budget is an error (DataConfig prevents it)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if n > tokens_per_batch:
            raise ValueError(f"greedy_packs: sample {i} has {n} tokens > tokens_per_batch={tokens_per_batch}")
        if used + n > tokens_per_batch:
            out.append((start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def plan_grid(cfg, plan) -> tuple[int, int]:
    """The (h, w) patch grid a crop plan's box gets in native mode (both backends call this)."""
    return native_grid(plan.h, plan.w, cfg.patch_size, cfg.min_patches, cfg.max_patches)
