"""Decoding of one sample's image, shared by both backends (the torch backend's workers and the DALI
backend's reader thread): the whole image as uint8 (H, W, 3) (decode_rgb) or decoded and cropped /
resized by a CropPlan (decode_pil), JPEGs strictly by libjpeg-turbo so that the decode is the scan check.
loader.py and dali.py both import from here (neither imports the other at module level).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from .augment import CropPlan, output_wh, pil_crop_resize
from .dataset import Record, jpeg_scans_intact, scan_damage

__all__ = ["decode_pil", "decode_rgb", "pillow_info", "to_rgb"]

try:
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a dependency; PIL decodes every image then
    _simplejpeg = None


def _draft_scale(width: int, height: int, plan: CropPlan, size) -> int:
    """The JPEG DCT-domain downscale (1, 2, 4 or 8) for `plan`: 1 unless the crop is >= 2x the output on
    both axes, else the largest power of 2 keeping the crop >= the output (S, or (w, h) in native mode)
    on each axis (so the final resize still only shrinks), as PIL's draft((ceil(W S / w), ceil(H S / h)))
    picks it."""
    ow, oh = output_wh(size)
    if plan.w < 2 * ow or plan.h < 2 * oh:
        return 1
    f = min(width // math.ceil(width * ow / plan.w), height // math.ceil(height * oh / plan.h))
    return next(a for a in (8, 4, 2, 1) if f >= a)


def pillow_info() -> str:
    """The PIL build that decodes / resizes for the torch backend, e.g. "Pillow 13.0.0 (libjpeg-turbo, ...)";
    Pillow-SIMD (a faster drop-in fork, versioned X.Y.Z.postN) is named when it is the one installed."""
    import PIL
    from PIL import features

    simd = "post" in PIL.__version__
    turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    return f"Pillow{'-SIMD' if simd else ''} {PIL.__version__} ({turbo}, libjpeg API {features.version('jpg')})"



def decode_pil(rec: Record, plan: CropPlan, size, out: np.ndarray | None = None) -> np.ndarray:
    """Decode rec.image and apply `plan` (augment.pil_crop_resize): uint8 (size, size, 3), or written into
    `out`, a uint8 (3, size, size) slot, as channel planes.

    JPEGs (YCbCr, RGB or gray) are decoded by libjpeg-turbo through simplejpeg, strictly: a scan that ends
    early or holds bad Huffman codes raises ValueError, which is the scan check SampleReader defers to
    this decode (Record.scan_checked False); the pixels are PIL's own (same libjpeg-turbo, ISLOW DCT,
    fancy upsampling: tests/test_data_augment.py compares them). Other images are decoded by PIL; the
    header PIL parsed in SampleReader.read (Record.header) is reused, never parsed again.
    NOTE: strict simplejpeg decode + Image.fromarray: 1.4 ms for a 500x375 q90 photo where PIL's decode
    took 1.6 ms plus 1.3 ms for the separate scan check (2 shared cores)."""
    W, H = rec.width, rec.height
    im = rec.header if rec.header is not None else Image.open(io.BytesIO(rec.image))
    rec.header = None
    try:
        a = _draft_scale(W, H, plan, size) if im.format in ("JPEG", "MPO") else 1
        src = _decode_source(rec, im, a)
        if isinstance(src, np.ndarray):
            src = Image.fromarray(src)
        return pil_crop_resize(src, plan, size, (src.size[0] / W, src.size[1] / H), out)
    finally:
        im.close()


def decode_rgb(rec: Record) -> np.ndarray:
    """rec.image decoded whole: uint8 (H, W, 3), by decode_pil's decoders with its checks (JPEGs strictly
    by libjpeg-turbo: ValueError on scan damage). The DALI backend's CPU pipeline resizes it (dali.py)."""
    im = rec.header if rec.header is not None else Image.open(io.BytesIO(rec.image))
    rec.header = None
    try:
        src = _decode_source(rec, im, 1)
        return src if isinstance(src, np.ndarray) else np.asarray(src)
    finally:
        im.close()


def _decode_source(rec: Record, im: Image.Image, a: int) -> np.ndarray | Image.Image:
    """rec.image (im: its open header) decoded at 1/a scale: uint8 (ceil(H / a), ceil(W / a), 3) from
    simplejpeg for RGB / gray JPEGs, else an RGB PIL image; ValueError when the JPEG's scan is damaged."""
    W, H = rec.width, rec.height
    if im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L") and _simplejpeg is not None:
        src = _decode_jpeg_strict(rec.image, W, H, a)
        if src is not None:
            return src
    if not rec.scan_checked and not jpeg_scans_intact(rec.image):
        raise ValueError("JPEG scan data ends early or is corrupt")
    if a > 1:
        im.draft("RGB", ((W + a - 1) // a, (H + a - 1) // a))
    return im if im.mode == "RGB" else to_rgb(im)  # NOTE: no convert("RGB") copy of an RGB image


def _decode_jpeg_strict(data: bytes, width: int, height: int, scale: int) -> np.ndarray | None:
    """uint8 (ceil(H / scale), ceil(W / scale), 3) decoded by libjpeg-turbo; ValueError on scan damage;
    None when simplejpeg refuses the file for another reason (PIL decodes it then, as before)."""
    kw = dict(min_factor=scale, min_width=-(-width // scale), min_height=-(-height // scale)) if scale > 1 else {}
    try:
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **kw)
    except ValueError as e:
        if scan_damage(e):
            raise
    return None


_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit gray PNG / TIFF (Pillow has no 16-bit RGB mode)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image; 16-bit gray is scaled as round(v / 257) as DALI does, where
    convert("RGB") would clip every value above 255 to white. Mode "I" is read as 16-bit (0..65535)."""
    if im.mode in _WIDE_GRAY:
        v = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # (H, W)
        im = Image.fromarray(((v * 510 + 65535) // 131070).astype(np.uint8))  # round(v * 255 / 65535)
    return im.convert("RGB")
