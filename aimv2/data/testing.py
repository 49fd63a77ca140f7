"""Builders of small webdataset shards, good and deliberately broken, for tests and debugging.

`write_shard(path, samples)` writes samples given as {ext: bytes} dicts (plus "__key__");
`bad_samples(size)` returns one sample of every kind of breakage the Loader must survive, keyed by
the skip reason it must be counted under.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

__all__ = ["jpeg_bytes", "write_shard", "bad_samples", "good_sample"]


def jpeg_bytes(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A random smooth-ish RGB JPEG of width x height."""
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def good_sample(key: str, rng: np.random.Generator, width: int = 80, height: int = 64, label: int = 0) -> dict:
    return {"__key__": key, "jpg": jpeg_bytes(rng, width, height),
            "txt": f"  Sample {key}\tWITH  a Caption ".encode(), "json": json.dumps({"label": label, "key": key}).encode()}


def write_shard(path: str, samples: list[dict], truncate_at: int | None = None) -> str:
    """Write samples ({"__key__": k, ext: bytes, ...}) as a tar; optionally cut the file to truncate_at bytes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    if truncate_at is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_at)
    return path


def _patch_sof(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame size in a baseline JPEG's SOF0 header (a decompression-bomb header)."""
    i = data.index(b"\xff\xc0")
    b = bytearray(data)
    b[i + 5: i + 7] = height.to_bytes(2, "big")
    b[i + 7: i + 9] = width.to_bytes(2, "big")
    return bytes(b)


def _bad_scan(data: bytes) -> bytes:
    """Point the first scan (SOS) component selector at a component id the frame does not have."""
    i = data.index(b"\xff\xda")
    b = bytearray(data)
    b[i + 5] = 9
    return bytes(b)


def bad_samples(rng: np.random.Generator, prefix: str = "bad") -> dict[str, dict]:
    """One broken sample per skip reason: {reason: sample}."""
    good = jpeg_bytes(rng, 96, 72)
    cap, meta = b"a caption", json.dumps({"label": 1}).encode()
    cut = good[: len(good) // 2]
    return {
        "corrupt_image": {"__key__": f"{prefix}_trunc", "jpg": cut, "txt": cap, "json": meta},
        # frame header intact, scan header names a missing component: passes the checks, fails decoding
        "corrupt_image_decode": {"__key__": f"{prefix}_badscan", "jpg": _bad_scan(good), "txt": cap, "json": meta},
        "not_image": {"__key__": f"{prefix}_text", "jpg": b"<html>not an image</html>" * 20, "txt": cap, "json": meta},
        "too_large": {"__key__": f"{prefix}_bomb", "jpg": _patch_sof(good, 40000, 30000), "txt": cap, "json": meta},
        "missing_caption": {"__key__": f"{prefix}_nocap", "jpg": good, "json": meta},
        "empty_caption": {"__key__": f"{prefix}_empty", "jpg": good, "txt": b" \n\t ", "json": meta},
        "missing_image": {"__key__": f"{prefix}_noimg", "txt": cap, "json": meta},
        "missing_label": {"__key__": f"{prefix}_nolabel", "jpg": good, "txt": cap, "json": b"{not json"},
    }
