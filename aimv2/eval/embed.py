"""Encoder features for a folder of images or webdataset shards, written as one safetensors file.

    aimv2 embed --checkpoint CKPT --data DIR|SHARDS --out feats.safetensors [--pool mean|none|both]

Per image i (in file-name order for a folder, stream order for shards) with tokens x_i (N, D) from the
frozen, fully bidirectional encoder:
    "pooled": (M, D)     mean_n x_i[n]                 (pool = "mean" or "both")
    "patch":  (M, N, D)  x_i, row-major patch grid       (pool = "none" or "both")
Metadata (safetensors header, strings): "names" (JSON list of the M file names relative to DIR, or
shard keys), "skipped" (JSON list of unreadable files), "num_skipped", "source", "img_size", "dim",
"num_patches", "pool".

Folder images (jpg / jpeg / png / webp / bmp, any size, any mode) are converted to RGB, resized so the
shorter side is S (bicubic), center-cropped to S x S (S = the encoder's resolution) and normalised with
the mean / std of the checkpoint directory's preprocessor_config.json (Apple's hub checkpoints: CLIP
statistics) or else the training pipeline's ImageNet ones. Files that fail to decode are skipped and
counted.
All features are held in memory before writing: per-patch output costs M * N * D * 4 bytes in fp32.

Native resolution (`--native`, method.md §8; image folders only): no crop. Each image keeps its aspect
ratio and is resized (bicubic) to H' x W', both multiples of the patch size p, with (H'/p)(W'/p) <=
max_patches (`native_grid`); `batch_size` images at a time are packed into one sequence
(`AIMv2Encoder.forward_packed`). The images have different token counts N_i, so "patch" is packed:
    "patch":   (sum N_i, D)  rows offsets[i] : offsets[i+1] are image i, row-major over its grid
    "grids":   (M, 2) int64  each image's (h, w) patch grid;   "offsets": (M + 1,) int64
("pooled" is (M, D) as before; metadata "native" = "1", "max_patches", "img_size" = "native").
"""
from __future__ import annotations

import glob
import json
import logging
import os

import torch

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
POOLS = ("mean", "none", "both")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _norm_stats(checkpoint=None):
    """Normalisation: the checkpoint's `preprocessor_config.json` (image_mean / image_std, e.g. the CLIP
    statistics of Apple's hub checkpoints) when it has one, else the data pipeline's (ImageNet, method.md §5)."""
    if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint):
        pp = os.path.join(checkpoint, "preprocessor_config.json")
        if os.path.exists(pp):
            with open(pp) as f:
                c = json.load(f)
            if len(c.get("image_mean", ())) == 3 and len(c.get("image_std", ())) == 3:
                return tuple(map(float, c["image_mean"])), tuple(map(float, c["image_std"]))
    try:
        from aimv2 import data as D
        mean, std = getattr(D, "IMAGENET_MEAN", None), getattr(D, "IMAGENET_STD", None)
        if mean is not None and std is not None:
            return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except ImportError:
        pass
    return IMAGENET_MEAN, IMAGENET_STD


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive), as sorted paths relative to it."""
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(IMAGE_EXTS):
                out.append(os.path.relpath(os.path.join(root, f), folder))
    return sorted(out)


def load_image(path: str, size: int, mean, std) -> torch.Tensor:
    """RGB (16-bit images scaled, not clipped: `aimv2.data.loader.to_rgb`), shorter side -> size (bicubic),
    center crop size x size, normalised: (3, size, size) fp32."""
    import numpy as np
    from PIL import Image

    from aimv2.data.loader import to_rgb

    with Image.open(path) as im:
        im = to_rgb(im)                                    # decodes fully: truncated files raise here
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, S, S)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


DEFAULT_MAX_PATCHES = 4096


def native_grid(height: int, width: int, patch_size: int = 14, max_patches: int = DEFAULT_MAX_PATCHES):
    """The (h, w) patch grid an H x W image is resized to for native-resolution inference: the
    training loader's rule (`aimv2.data.native.native_grid`) with no lower bound — the image's own
    patch count, aspect ratio kept, the nearest grid in log terms; over `max_patches` the nearest grid
    that fits. No upper bound on max_patches other than memory."""
    if isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1:
        raise ValueError(f"max_patches: expected a positive int, got {max_patches!r}")
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width}: expected positive sides")
    from aimv2.data.native import native_grid as grid
    return grid(int(height), int(width), patch_size, 1, max_patches)


def load_image_native(path: str, patch_size: int, max_patches: int, mean, std) -> torch.Tensor:
    """RGB (as `load_image`), resized (bicubic, aspect ratio kept) to the `native_grid` size, no crop,
    normalised: (3, h*p, w*p) fp32."""
    import numpy as np
    from PIL import Image

    from aimv2.data.loader import to_rgb

    with Image.open(path) as im:
        im = to_rgb(im)
        w, h = im.size
        gh, gw = native_grid(h, w, patch_size, max_patches)
        im = im.resize((gw * patch_size, gh * patch_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, H', W')
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


class ImageFolder(torch.utils.data.Dataset):
    """Items (index, image (3, S, S) or None when the file cannot be decoded). With `max_patches` set
    (native resolution) images are (3, h*p, w*p) at their own aspect ratio (`load_image_native`)."""

    def __init__(self, folder: str, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 max_patches: int | None = None, patch_size: int = 14):
        self.folder, self.size, self.mean, self.std = folder, size, mean, std
        self.max_patches, self.patch_size = max_patches, patch_size
        self.names = list_images(folder)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        try:
            path = os.path.join(self.folder, self.names[i])
            if self.max_patches is not None:
                return i, load_image_native(path, self.patch_size, self.max_patches, self.mean, self.std)
            return i, load_image(path, self.size, self.mean, self.std)
        except Exception as e:                                 # noqa: BLE001 - PIL raises many types
            log.debug("embed: skipping %s: %s", self.names[i], e)
            return i, None


def _collate(items):
    ok = [(i, x) for i, x in items if x is not None]
    bad = [i for i, x in items if x is None]
    images = torch.stack([x for _, x in ok]) if ok else None
    return {"index": [i for i, _ in ok], "bad": bad, "images": images}


def _collate_list(items):
    """Native resolution: the images keep their own sizes, so a list instead of a stack."""
    ok = [(i, x) for i, x in items if x is not None]
    return {"index": [i for i, _ in ok], "bad": [i for i, x in items if x is None],
            "images": [x for _, x in ok] or None}


def _is_image_folder(data: str) -> bool:
    return os.path.isdir(data) and not glob.glob(os.path.join(data, "*.tar")) and bool(list_images(data))


def _shards_of(data):
    if isinstance(data, str) and os.path.isdir(data):
        tars = sorted(glob.glob(os.path.join(data, "*.tar")))
        if not tars:
            raise ValueError(f"data: {data!r} holds neither images ({', '.join(IMAGE_EXTS)}) nor .tar shards")
        return tars
    return data


def _check_embed_args(checkpoint, encoder, data, pool: str, native: bool, img_size, max_patches) -> None:
    """embed's argument checks: one line naming the argument and what was expected."""
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    if (checkpoint is None) == (encoder is None):
        raise ValueError("embed: give exactly one of checkpoint or encoder")
    if native:
        native_grid(1, 1, max_patches=max_patches)                         # validates max_patches
        if not (isinstance(data, str) and _is_image_folder(data)):
            raise ValueError(f"data: native-resolution embedding reads a folder of images; {data!r} is not one "
                             "(shards are decoded at a fixed size)")
        if img_size is not None:
            raise ValueError("img_size: not used with native=True (images keep their own size; see max_patches)")


def _embed_encoder(checkpoint, encoder, device, preset, img_size, native: bool):
    """(encoder in eval mode, source string for the file's metadata)."""
    if encoder is None:
        from aimv2.eval.hub import from_pretrained
        encoder = from_pretrained(checkpoint, device=device, preset=preset, img_size=img_size, native=native)
        source = str(checkpoint)
    else:
        if native and not encoder.cfg.native:
            raise ValueError(f"encoder: {encoder.cfg.name} is not native; build it with native=True")
        source = f"encoder:{encoder.cfg.name}"
    encoder.eval()
    return encoder, source


def _embed_loader(checkpoint, data, cfg, device, native: bool, max_patches: int, batch_size: int,
                  num_workers: int):
    """(ImageFolder or None for shards, the loader over `data`, its length or None)."""
    if isinstance(data, str) and _is_image_folder(data):
        ds = ImageFolder(data, cfg.img_size, *_norm_stats(checkpoint),
                         max_patches=max_patches if native else None, patch_size=cfg.patch_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=_collate_list if native else _collate)
        return ds, loader, len(loader)
    from aimv2.data import DataConfig, build_loader
    if _norm_stats(checkpoint) != _norm_stats():
        log.warning("embed: shards are normalised with the data pipeline's ImageNet statistics, not the "
                    "checkpoint's preprocessor_config.json ones")
    loader = build_loader(DataConfig(shards=_shards_of(data), image_size=cfg.img_size,
                                     patch_size=cfg.patch_size, batch_size=batch_size,
                                     num_workers=num_workers, train=False, label_key=None,
                                     return_keys=True, device=str(device)))
    return None, loader, None


class _Features:
    """The features of the batches seen so far, on the CPU in `dtype`, as `pool` asks."""

    def __init__(self, pool: str, dtype):
        self.pool, self.dtype = pool, dtype
        self.names, self.skipped, self.pooled, self.patches, self.grids = [], [], [], [], []
        self.seen = 0

    def add_packed(self, encoder, images, p) -> None:
        """Native resolution: `images` (3, H_i, W_i) run as one packed sequence."""
        ps = encoder.cfg.patch_size
        self.seen += len(images)
        feats = encoder.forward_packed([im.to(p.device, p.dtype, non_blocking=True) for im in images])
        self.grids += [(im.shape[1] // ps, im.shape[2] // ps) for im in images]
        if self.pool in ("mean", "both"):
            self.pooled.append(torch.stack([f.float().mean(0) for f in feats]).to("cpu", self.dtype))  # (B, D)
        if self.pool in ("none", "both"):
            self.patches += [f.to("cpu", self.dtype) for f in feats]          # (N_i, D) each

    def add(self, encoder, images, p) -> None:
        """Fixed size: `images` (B, 3, S, S)."""
        self.seen += images.shape[0]
        x = encoder(images.to(p.device, p.dtype, non_blocking=True))       # (B, N, D)
        if self.pool in ("mean", "both"):
            self.pooled.append(x.float().mean(1).to("cpu", self.dtype))     # (B, D)
        if self.pool in ("none", "both"):
            self.patches.append(x.to("cpu", self.dtype))                    # (B, N, D)

    def tensors(self, native: bool) -> dict:
        out = {}
        if self.pooled:
            out["pooled"] = torch.cat(self.pooled).contiguous()             # (M, D)
        if self.patches:
            out["patch"] = torch.cat(self.patches).contiguous()             # (M, N, D); native (sum N_i, D)
        if native and self.patches:
            lengths = torch.tensor([h * w for h, w in self.grids], dtype=torch.int64)
            out["grids"] = torch.tensor(self.grids, dtype=torch.int64).reshape(-1, 2)          # (M, 2)
            out["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (M + 1,)
        return out


def _embed_meta(feats: _Features, cfg, source: str, native: bool, max_patches: int) -> dict:
    """The safetensors metadata: names, skipped files, source, sizes, pool."""
    meta = {"names": json.dumps(feats.names), "skipped": json.dumps(feats.skipped),
            "num_skipped": str(len(feats.skipped)), "source": source, "img_size": str(cfg.img_size),
            "dim": str(cfg.dim), "num_patches": str(cfg.num_patches), "pool": feats.pool}
    if native:
        meta.update(native="1", max_patches=str(max_patches), img_size="native",
                    num_patches=str(sum(h * w for h, w in feats.grids)))
    return meta


@torch.no_grad()
def embed(checkpoint=None, *, encoder=None, data, out: str, pool: str = "mean", batch_size: int = 32,
          num_workers: int = 0, device=None, dtype=torch.float32, preset: str | None = None,
          img_size: int | None = None, progress: bool = True, native: bool = False,
          max_patches: int = DEFAULT_MAX_PATCHES) -> dict:
    """Write encoder features of `data` (image folder or shards) to `out` (safetensors); see module doc.

    checkpoint: anything `aimv2.weights.load_encoder` reads (or pass `encoder`). dtype: storage dtype of
    the features. native: images at their own aspect ratio, at most `max_patches` patches each, packed
    `batch_size` at a time (image folders only; a given `encoder` must be native). Returns dict(out,
    num_images, num_skipped, skipped, names, keys (tensor names)).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    _check_embed_args(checkpoint, encoder, data, pool, native, img_size, max_patches)
    encoder, source = _embed_encoder(checkpoint, encoder, device, preset, img_size, native)
    p = next(encoder.parameters())
    cfg = encoder.cfg
    ds, loader, total = _embed_loader(checkpoint, data, cfg, p.device, native, max_patches, batch_size, num_workers)
    feats = _Features(pool, dtype)
    for batch in tqdm(loader, desc="embed", unit="batch", total=total, disable=not progress):
        if ds is not None:
            feats.names += [ds.names[i] for i in batch["index"]]
            feats.skipped += [ds.names[i] for i in batch["bad"]]
        images = batch["images"]
        if images is None:
            continue
        if native:                                                           # one packed sequence
            feats.add_packed(encoder, images, p)
            continue
        if ds is None:
            feats.names += [str(k) for k in batch["keys"]]                   # "<shard path>:<key>"
        feats.add(encoder, images, p)
    if ds is not None and not ds.names:
        raise ValueError(f"data: no images in {data!r}")
    if feats.seen == 0:
        raise ValueError(f"data: none of the images in {data!r} could be read ({len(feats.skipped)} skipped)")
    tensors = feats.tensors(native)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=_embed_meta(feats, cfg, source, native, max_patches))
    if feats.skipped:
        log.warning("embed: skipped %d unreadable image(s): %s", len(feats.skipped), ", ".join(feats.skipped[:5]))
    return {"out": out, "num_images": feats.seen, "num_skipped": len(feats.skipped), "skipped": feats.skipped,
            "names": feats.names, "keys": sorted(tensors)}
