"""Adversarial webdataset shards, built byte by byte: damaged tar structure and images that lie.

Tar (our own writer, since tarfile refuses to write broken archives):
  `header(name, size, ...)` one 512-byte ustar header (checksum optionally wrong, raw size field);
  `member(name, data)` header + data padded to 512; `pax(records)` a pax extended header member;
  `end()` the two zero blocks. A shard is b"".join of these plus any garbage.
  `PAX_BAD` malformed pax payloads (length 0 / non-numeric / negative / longer than the header /
  no newline / no "=" / bad size value); `TAR_DAMAGE` builders of shards whose structure is damaged
  between good members, each returning (bytes, keys that must survive, {reason: count}).
Images:
  `png16(array, color_type)` 16-bit PNG (gray 0, RGB 2, gray+alpha 4, RGBA 6) written by hand;
  `cut_scan(jpeg, frac, eoi)` the JPEG cut inside its (last) scan, optionally "repaired" with an EOI;
  `with_trailer(jpeg, n)` a valid JPEG followed by n bytes (a fake MP4 "ftyp" box + noise, as a
  motion photo); `thumbnail_jpeg(...)` a JPEG carrying an EXIF-style APP1 with a thumbnail (its own EOI).
"""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

__all__ = ["header", "member", "pax", "end", "sample_members", "PAX_BAD", "TAR_DAMAGE", "png16", "jpeg",
           "cut_scan", "with_trailer", "thumbnail_jpeg"]

BLOCK = 512


# ---- tar -------------------------------------------------------------------------------------------
def header(name: str, size: int, typeflag: bytes = b"0", *, bad_checksum: bool = False,
           size_field: bytes | None = None) -> bytes:
    """A ustar header block; size_field overrides the 12-byte size field (raw, e.g. b"-0000001000\\0")."""
    b = bytearray(BLOCK)
    raw = name.encode()
    assert len(raw) <= 100
    b[0:len(raw)] = raw
    b[100:108] = b"0000644\0"
    b[108:116] = b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = size_field if size_field is not None else f"{size:011o}\0".encode()
    b[136:148] = b"00000000000\0"
    b[156:157] = typeflag
    b[257:263] = b"ustar\0"
    b[263:265] = b"00"
    b[148:156] = b" " * 8
    chk = sum(b) + (1 if bad_checksum else 0)
    b[148:156] = f"{chk:06o}\0 ".encode()
    return bytes(b)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def member(name: str, data: bytes, typeflag: bytes = b"0", **kw) -> bytes:
    return header(name, len(data), typeflag, **kw) + _pad(data)


def pax(payload: bytes) -> bytes:
    """A pax extended header ('x') whose payload is given raw (well-formed or not)."""
    return member("PaxHeaders/x", payload, b"x")


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


def sample_members(key: str, rng: np.random.Generator, w: int = 48, h: int = 40) -> bytes:
    """The members of one good sample: jpg, txt, json."""
    return (member(f"{key}.jpg", jpeg(rng, w, h)) + member(f"{key}.txt", f"caption of {key}".encode())
            + member(f"{key}.json", json.dumps({"label": 1}).encode()))


# malformed pax payloads (each must skip exactly the member it describes, and never hang)
PAX_BAD = {
    "len_zero": b"0 mtime=1\n",
    "len_zero_then_path": b"0 mtime=1\n" + pax_record("path", "renamed.jpg"),
    "non_numeric": b"abc path=x.jpg\n",
    "negative": b"-20 path=x.jpg\n",
    "plus_sign": b"+17 path=x.jpg\n",
    "longer_than_header": b"999 path=x.jpg\n",
    "no_newline": b"15 path=x.jpgX",
    "no_equals": b"11 pathxyz\n",
    "too_short": b"3 \n",
    "no_space": b"1234567890123456789012345678",
    "size_not_numeric": pax_record("size", "12x"),
    "size_negative": pax_record("size", "-5"),
}


def _shard(parts: list[bytes]) -> bytes:
    return b"".join(parts)


def _damage_pax(kind: str):
    def build(rng):
        parts = [sample_members("a0", rng), pax(PAX_BAD[kind]), sample_members("a1", rng), sample_members("a2", rng),
                 end()]
        # the pax header describes a1.jpg, which is skipped: a1 remains without its image
        return _shard(parts), ["a0", "a1", "a2"], {"bad_pax_header": 1}
    return build


def _garbage_blocks(n_blocks: int, zero_inside: bool = False):
    def build(rng):
        junk = bytearray(rng.bytes(n_blocks * BLOCK))
        if zero_inside and n_blocks >= 3:
            junk[BLOCK: 2 * BLOCK] = bytes(BLOCK)  # a zero block inside the garbage is not the end
        parts = [sample_members("g0", rng), bytes(junk), sample_members("g1", rng), sample_members("g2", rng), end()]
        return _shard(parts), ["g0", "g1", "g2"], {"bad_tar_header": 1}
    return build


def _garbage_unaligned(rng):
    parts = [sample_members("u0", rng), rng.bytes(700), sample_members("u1", rng), end()]
    return _shard(parts), ["u0", "u1"], {"bad_tar_header": 1}


def _bad_checksum(rng):
    # b1.jpg's header fails its checksum: its data is skipped up to b1.txt's header (b1 loses its image)
    parts = [sample_members("b0", rng), member("b1.jpg", jpeg(rng, 40, 30), bad_checksum=True),
             member("b1.txt", b"c"), sample_members("b2", rng), end()]
    return _shard(parts), ["b0", "b1", "b2"], {"bad_tar_header": 1}


def _bad_size_field(field: bytes):
    def build(rng):
        parts = [sample_members("s0", rng), header("s1.jpg", 0, size_field=field) + _pad(jpeg(rng, 40, 30)),
                 member("s1.txt", b"c"), sample_members("s2", rng), end()]
        return _shard(parts), ["s0", "s1", "s2"], {"bad_tar_header": 1}
    return build


def _garbage_at_end(rng):
    parts = [sample_members("e0", rng), sample_members("e1", rng), rng.bytes(3 * BLOCK)]
    return _shard(parts), ["e0", "e1"], {"bad_tar_header": 1}


def _two_regions(rng):
    parts = [sample_members("t0", rng), rng.bytes(BLOCK), sample_members("t1", rng), rng.bytes(2 * BLOCK + 33),
             sample_members("t2", rng), end()]
    return _shard(parts), ["t0", "t1", "t2"], {"bad_tar_header": 2}


def _huge_long_name(rng):
    parts = [sample_members("h0", rng), header("././@LongLink", 2 << 20, b"L") + bytes(2 << 20),
             sample_members("h1", rng), sample_members("h2", rng), end()]
    return _shard(parts), ["h0", "h1", "h2"], {"bad_pax_header": 1}


TAR_DAMAGE = {
    **{f"pax_{k}": _damage_pax(k) for k in PAX_BAD},
    "garbage_1_block": _garbage_blocks(1),
    "garbage_4_blocks_zero_inside": _garbage_blocks(4, zero_inside=True),
    "garbage_unaligned": _garbage_unaligned,
    "bad_checksum": _bad_checksum,
    "size_not_octal": _bad_size_field(b"00000009999\0"),
    "size_negative": _bad_size_field(b"-0000001000\0"),
    "size_base256_negative": _bad_size_field(b"\xff" * 12),
    "garbage_at_end": _garbage_at_end,
    "two_regions": _two_regions,
    "huge_long_name": _huge_long_name,
}


# ---- images ----------------------------------------------------------------------------------------
def jpeg(rng: np.random.Generator, w: int, h: int, quality: int = 90, **save) -> bytes:
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **save)
    return buf.getvalue()


def png16(a: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of uint16 a: (H, W) for gray (0), (H, W, C) for gray+alpha (4), RGB (2), RGBA (6)."""
    h, w = a.shape[:2]
    rows = a.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\0" + rows[y].tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _last_sos(data: bytes) -> int:
    """Offset of the entropy-coded data of the last scan."""
    i = data.rindex(b"\xff\xda")
    return i + 2 + int.from_bytes(data[i + 2: i + 4], "big")


def cut_scan(data: bytes, frac: float, eoi: bool = True) -> bytes:
    """The JPEG cut `frac` of the way into its last scan's data; with eoi, "repaired" with FFD9."""
    start = _last_sos(data)
    cut = start + max(1, int((len(data) - 2 - start) * frac))
    body = data[:cut]
    if body.endswith(b"\xff"):
        body = body[:-1]
    return body + (b"\xff\xd9" if eoi else b"")


def with_trailer(data: bytes, n: int, rng: np.random.Generator) -> bytes:
    """A valid JPEG followed by n bytes: an MP4-like box header, then noise that holds FFD9 and FFD8."""
    box = struct.pack(">I", n) + b"ftypmp42"
    noise = bytearray(rng.bytes(max(0, n - len(box))))
    if len(noise) > 100:
        noise[10:12], noise[50:52] = b"\xff\xd8", b"\xff\xd9"
    return data + (box + bytes(noise))[:n]


def thumbnail_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A JPEG with an APP1 segment holding a small JPEG thumbnail (the thumbnail's EOI sits inside APP1)."""
    thumb = jpeg(rng, 16, 12, quality=50)
    body = b"Exif\0\0" + thumb
    main = jpeg(rng, w, h)
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    return main[:2] + app1 + main[2:]
