"""Packed native-resolution batches (method.md §8): many images of different sizes as one sequence.

A `PackedBatch` holds n images cut into 14x14 patches and concatenated along one token axis:

    patches     (T, p*p*C) float   every image's patches, row-major over its own (h, w) patch grid,
                                   each patch in the order of `kernels.patchify` (row, col, channel);
                                   T = sum of h_s * w_s
    cu_seqlens  (n + 1,) int32     image s owns rows cu_seqlens[s] : cu_seqlens[s + 1]
    grids       tuple of (h, w)    each image's patch grid, on the host (position embeddings and
                                   un-packing need it without a device sync)
    prefix_len  (n,) int64 | None  per-image prefix length in [0, h*w] (None: bidirectional)
    text        (n, L) int64 | None  caption token ids (training)

The patches are the loss targets as well as the encoder input (the patch embedding is a Linear over
the same order), so a packed batch never needs the images again. `pack_images` builds one from a list
of (C, H, W) tensors; `unpack` splits a (T, ...) packed output back per image.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from aimv2.kernels import patchify


@dataclass(frozen=True)
class PackedBatch:
    patches: torch.Tensor
    cu_seqlens: torch.Tensor
    grids: tuple
    prefix_len: torch.Tensor | None = None
    text: torch.Tensor | None = None

    def __post_init__(self):
        check_packed(self)

    @property
    def num_images(self) -> int:
        return len(self.grids)

    @property
    def lengths(self) -> list[int]:
        return [h * w for h, w in self.grids]

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    @property
    def num_tokens(self) -> int:
        return int(self.patches.shape[0])

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        mv = (lambda t: None if t is None else t.to(device, non_blocking=non_blocking))
        return replace(self, patches=mv(self.patches), cu_seqlens=mv(self.cu_seqlens),
                       prefix_len=mv(self.prefix_len), text=mv(self.text))


def cu_seqlens_of(lengths, device=None) -> torch.Tensor:
    """[l_0, l_1, ...] -> int32 (n + 1,) running offsets [0, l_0, l_0 + l_1, ...]."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def check_packed(b: PackedBatch) -> None:
    """Clear errors for a malformed pack (host-side facts only: no device sync)."""
    if not isinstance(b.patches, torch.Tensor) or b.patches.dim() != 2 or not b.patches.is_floating_point():
        raise ValueError("PackedBatch.patches: expected a float tensor (T, p*p*C), got "
                         f"{getattr(b.patches, 'dtype', type(b.patches).__name__)} "
                         f"{tuple(getattr(b.patches, 'shape', ()))}")
    grids = tuple(b.grids)
    for g in grids:
        if (len(g) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in g)
                or min(g) < 1):
            raise ValueError(f"PackedBatch.grids: each entry must be (h, w) positive ints, got {g!r}")
    n, T = len(grids), sum(h * w for h, w in grids)
    if b.patches.shape[0] != T:
        raise ValueError(f"PackedBatch: grids hold {T} patches, patches has {b.patches.shape[0]} rows")
    cu = b.cu_seqlens
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or tuple(cu.shape) != (n + 1,):
        raise ValueError(f"PackedBatch.cu_seqlens: expected int32 ({n + 1},), got "
                         f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if cu.tolist() != cu_seqlens_of(h * w for h, w in grids).tolist():
            raise ValueError(f"PackedBatch.cu_seqlens {cu.tolist()} disagrees with grids {list(grids)}")
    for name, t, shape0 in (("prefix_len", b.prefix_len, n), ("text", b.text, n)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"PackedBatch.{name}: expected an integer tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.shape[0] != shape0 or (name == "prefix_len" and t.dim() != 1):
            raise ValueError(f"PackedBatch.{name}: expected {n} rows (one per image), got {tuple(t.shape)}")
    p = b.prefix_len
    if p is not None and p.device.type == "cpu" and p.numel() and not torch.compiler.is_compiling():
        bad = [(s, int(v), h * w) for s, (v, (h, w)) in enumerate(zip(p.tolist(), grids))
               if not 0 <= v <= h * w]
        if bad:
            s, v, N = bad[0]
            raise ValueError(f"PackedBatch.prefix_len: image {s} has prefix {v} outside [0, {N}]")


def pack_images(images, patch_size: int, prefix_len=None, text=None) -> PackedBatch:
    """A list of (C, H, W) float tensors (H, W multiples of patch_size; sizes may differ) -> PackedBatch."""
    images = list(images)
    if not images:
        raise ValueError("pack_images: no images")
    grids, parts = [], []
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or not im.is_floating_point():
            raise ValueError(f"pack_images: image {i}: expected a float (C, H, W) tensor, got "
                             f"{getattr(im, 'dtype', type(im).__name__)} {tuple(getattr(im, 'shape', ()))}")
        C, H, W = im.shape
        if C != images[0].shape[0]:
            raise ValueError(f"pack_images: image {i} has {C} channels, image 0 has {images[0].shape[0]}")
        if H % patch_size or W % patch_size or H == 0 or W == 0:
            raise ValueError(f"pack_images: image {i} is {H}x{W}, not a positive multiple of the "
                             f"patch size {patch_size}")
        grids.append((H // patch_size, W // patch_size))
        parts.append(patchify(im[None], patch_size)[0])
    if prefix_len is not None and not isinstance(prefix_len, torch.Tensor):
        prefix_len = torch.as_tensor(prefix_len, dtype=torch.int64)
    return PackedBatch(torch.cat(parts), cu_seqlens_of((h * w for h, w in grids), images[0].device),
                       tuple(grids), prefix_len, text)


def unpack(packed: torch.Tensor, grids) -> list[torch.Tensor]:
    """(T, ...) packed rows -> one (h*w, ...) tensor per image (views)."""
    return list(torch.split(packed, [h * w for h, w in grids]))


def unpatchify(patches: torch.Tensor, grid, patch_size: int, channels: int = 3) -> torch.Tensor:
    """One image's (h*w, p*p*C) patches (kernels.patchify order) -> (C, h*p, w*p)."""
    h, w = grid
    p = patch_size
    x = patches.reshape(h, w, p, p, channels)
    return torch.einsum("hwpqc->chpwq", x).reshape(channels, h * p, w * p)


@dataclass(frozen=True)
class DecoderLayout:
    """Where each row goes when every image s of a pack gets `extra` more rows after its N_s own
    (the decoder's [image tokens | CLS | text], method.md §8), all on cu_seqlens' device:

    cu_seqlens  (n + 1,) int32  the longer images' offsets: cu_seqlens[s] + s * extra
    lengths     list of ints    N_s + extra, on the host (from grids)
    image_rows  (T,) int64      row of the long pack that packed row r moves to
    extra_rows  (n, extra) int64  rows of image s's extra tokens in the long pack
    gather      (T + n * extra,) int64  for each long-pack row, its source in cat([packed rows, extra rows])
    """
    cu_seqlens: torch.Tensor
    lengths: list
    image_rows: torch.Tensor
    extra_rows: torch.Tensor
    gather: torch.Tensor


def decoder_layout(cu_seqlens: torch.Tensor, lengths, extra: int) -> DecoderLayout:
    """The `DecoderLayout` of a pack with image lengths `lengths` (host ints, as from grids) and
    cu_seqlens on the device: computed there without reading it on the host (no sync)."""
    lengths = [int(n) for n in lengths]
    n, T, dev = len(lengths), sum(lengths), cu_seqlens.device
    cu = cu_seqlens.long()
    shift = extra * torch.arange(n + 1, device=dev)                                       # (n + 1,)
    image_of_row = torch.repeat_interleave(torch.arange(n, device=dev), cu[1:] - cu[:-1], output_size=T)
    image_rows = torch.arange(T, device=dev) + shift[:-1][image_of_row]                    # (T,)
    extra_rows = (cu[1:] + shift[:-1])[:, None] + torch.arange(extra, device=dev)          # (n, extra)
    total = T + n * extra
    gather = torch.empty(total, dtype=torch.int64, device=dev).scatter_(
        0, torch.cat([image_rows, extra_rows.flatten()]), torch.arange(total, device=dev))
    return DecoderLayout((cu + shift).to(torch.int32), [m + extra for m in lengths], image_rows, extra_rows,
                         gather)
