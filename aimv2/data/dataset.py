"""The sample plan shared by both backends: which sample each rank reads when, and how it is cropped.

Everything here is a pure function of the config and the shard indexes, never of timing, worker
count or backend, which is what makes resume bit-exact and ranks exactly-once:

  order(e)     rank's sample ids for epoch e (`epoch_order`):
               train: shards permuted by rng(seed, e); with `num_shards % world_size == 0` rank r takes
               shards perm[r::W], otherwise it takes every W-th sample (offset r) of the concatenated
               stream, so each sample goes to exactly one rank either way; then a streaming shuffle
               buffer of `shuffle_buffer` samples seeded by rng(seed, e, r).
               eval: shards in the given order, same split, no shuffle.
  plan(e, i)   crop box and flip of sample id i in epoch e, from rng(seed, e, i) and the image's header
               size: `augment.crop_plan` (a CropPlan; the draw and its executors live in augment.py).
  prefix(e, p) (B,) prefix lengths of the batch whose first sample sits at position p of order(e):
               U{1..N-1} from rng(seed, rank, e, p); the pair (e, p) identifies the training step.

`SampleReader.read(sid)` reads a sample's components with pread and checks it before any pixel is
decoded: image present and at most MAX_IMAGE_BYTES, caption present and non-empty after
normalisation, label present when asked for, image header parses (PIL, lazily), format decodable by
both backends, W*H <= max_image_pixels, and for JPEGs `jpeg_intact`: the marker segments reach an EOI
after the last scan (bytes after the EOI are allowed: motion photos append a video) and the
entropy-coded data does not run short (a scan cut and "repaired" with an EOI, which PIL and DALI
both decode to flat gray without an error). It returns a `Record` or the name of the skip reason.
"""
from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import DataConfig
from .shards import ShardIndex, load_index
from .tokenizer import normalize_caption

__all__ = ["SampleTable", "epoch_order", "keyed_rng", "prefix_lengths", "Record", "SampleReader", "SKIP_REASONS",
           "jpeg_intact", "jpeg_scans_intact", "scan_damage"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
CAPTION_EXTS = ("txt", "caption", "text")
DECODABLE = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"}  # formats both PIL and DALI decode
MAX_IMAGE_BYTES = 64 << 20  # encoded image payloads above this are skipped unread
MAX_CAPTION_BYTES = 64 << 10
SKIP_REASONS = ("missing_image", "missing_caption", "empty_caption", "missing_label", "not_image",
                "corrupt_image", "unsupported_format", "too_large",
                "truncated_shard", "bad_tar_header", "bad_pax_header")  # the last three: counted at indexing


class SampleTable:
    """Flat view of every sample of every shard: sample id i -> (shard, key, component offsets)."""

    def __init__(self, indexes: list[ShardIndex]):
        self.paths = [ix.path for ix in indexes]
        self.indexes = indexes
        counts = np.array([len(ix.keys) for ix in indexes], dtype=np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(counts)])  # (num_shards + 1,)
        self.num_samples = int(self.shard_start[-1])
        self.dropped = sum(ix.dropped for ix in indexes)
        self.damaged = Counter(d[2] for ix in indexes for d in ix.damaged)  # {reason: damaged regions / members}
        self.truncated = [ix.path for ix in indexes if ix.truncated]

    @classmethod
    def build(cls, paths: list[str], index_dir: str | None = None, threads: int = 4) -> "SampleTable":
        if len(paths) == 1 or threads <= 1:
            return cls([load_index(p, index_dir) for p in paths])
        with ThreadPoolExecutor(min(threads, len(paths))) as ex:
            return cls(list(ex.map(lambda p: load_index(p, index_dir), paths)))

    @property
    def num_shards(self) -> int:
        return len(self.paths)

    def locate(self, sid: int) -> tuple[int, int]:
        """sample id -> (shard number, sample number within the shard)."""
        s = int(np.searchsorted(self.shard_start, sid, side="right")) - 1
        return s, int(sid - self.shard_start[s])

    def shard_ids(self, s: int) -> np.ndarray:
        return np.arange(self.shard_start[s], self.shard_start[s + 1], dtype=np.int64)


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator that is a pure function of the integer key (seed, epoch, ..., a per-use tag)."""
    return np.random.default_rng([int(k) & 0xFFFFFFFFFFFFFFFF for k in key])


def _buffer_shuffle(ids: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Streaming shuffle buffer of size k: the order a webdataset-style buffer would emit."""
    if k <= 1 or len(ids) <= 1:
        return ids
    picks = rng.integers(0, k, size=len(ids))
    buf = ids[:k].tolist()
    out = []
    for t, x in enumerate(ids[k:].tolist()):
        j = int(picks[t])
        out.append(buf[j])
        buf[j] = x
    tail = rng.permutation(len(buf))
    out.extend(buf[j] for j in tail)
    return np.asarray(out, dtype=np.int64)


def epoch_order(table: SampleTable, cfg: DataConfig, epoch: int) -> np.ndarray:
    """(n,) int64 sample ids rank `cfg.rank` reads in epoch `epoch`, in order."""
    ns, W, r = table.num_shards, cfg.world_size, cfg.rank
    perm = keyed_rng(cfg.seed, epoch, 0x5A4D).permutation(ns) if cfg.train else np.arange(ns)
    if W == 1:
        ids = np.concatenate([table.shard_ids(s) for s in perm])
    elif ns % W == 0:
        ids = np.concatenate([table.shard_ids(s) for s in perm[r::W]])
    else:  # sample-level striding keeps every sample on exactly one rank
        ids = np.concatenate([table.shard_ids(s) for s in perm])[r::W]
    if cfg.train and cfg.shuffle_buffer > 1:
        ids = _buffer_shuffle(ids, cfg.shuffle_buffer, keyed_rng(cfg.seed, epoch, r, 0xB0FF))
    return ids


def prefix_lengths(cfg: DataConfig, epoch: int, first_pos: int, n: int) -> torch.Tensor:
    """(n,) int64 prefix lengths of the batch starting at position first_pos of epoch's order."""
    N = cfg.num_patches
    if cfg.prefix == "random":
        p = keyed_rng(cfg.seed, cfg.rank, epoch, first_pos, 0x9F1C).integers(1, N, size=n)  # U{1..N-1}
        return torch.from_numpy(p.astype(np.int64))
    return torch.full((n,), N if cfg.prefix == "full" else int(cfg.prefix), dtype=torch.int64)


@dataclass
class Record:
    """A sample that passed every pre-decode check."""

    sid: int
    image: bytes
    width: int
    height: int
    caption: str
    label: int | None
    key: str
    header: Image.Image | None = None  # the PIL image opened on the header (SampleReader.read(keep_header=True))
    scan_checked: bool = True  # False: a JPEG whose scan data the decoder must check (read(defer_scan_check=True))
    pixels: np.ndarray | None = None  # uint8 (H, W, 3) once decoded on the host (the DALI backend on the CPU)


class SampleReader:
    """Reads and checks samples by id (one instance per process: it holds open file descriptors)."""

    def __init__(self, table: SampleTable, cfg: DataConfig):
        self.table, self.cfg = table, cfg
        self._fds: dict[int, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _pread(self, shard: int, off: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.table.paths[shard]
            try:
                fd = self._fds[shard] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise OSError(f"shards: cannot open {path!r}: {e}") from e
        data = os.pread(fd, size, off)
        if len(data) != size:
            raise OSError(f"shards: {self.table.paths[shard]!r} shrank while reading (wanted {size} bytes at {off})")
        return data

    def read(self, sid: int, keep_header: bool = False, defer_scan_check: bool = False) -> Record | str:
        """The sample's Record, or the name of the reason it is skipped.

        keep_header: keep the PIL image opened on the header in Record.header, so the decoder does not
          parse it a second time. defer_scan_check: check only the JPEG's marker structure here and
          leave the scan check (`jpeg_scans_intact`) to a decoder that decodes strictly anyway
          (loader.decode_pil): Record.scan_checked is False then."""
        s, j = self.table.locate(sid)
        ix = self.table.indexes[s]
        comp = ix.components[j]
        key = f"{ix.path}:{ix.keys[j]}"
        img_ext = next((e for e in IMAGE_EXTS if e in comp), None)
        if img_ext is None:
            return "missing_image"
        cap_ext = next((e for e in CAPTION_EXTS if e in comp), None)
        caption = ""
        if cap_ext is not None:
            cap_off, cap_size = comp[cap_ext]
            raw = self._pread(s, cap_off, min(cap_size, MAX_CAPTION_BYTES))  # a caption past 64 KiB is cut
            caption = normalize_caption(raw.decode("utf-8", errors="replace"))
        if not caption and self.cfg.train:   # evaluation (probe / embed) needs no caption
            return "missing_caption" if cap_ext is None else "empty_caption"
        label = None
        if self.cfg.label_key is not None:
            try:
                label = int(json.loads(self._pread(s, *comp["json"]))[self.cfg.label_key])
            except (KeyError, ValueError, TypeError):
                return "missing_label"
        if comp[img_ext][1] > MAX_IMAGE_BYTES:
            return "too_large"  # refuse before reading it
        data = self._pread(s, *comp[img_ext])
        im = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))  # parses the header only
                fmt, (w, h) = im.format, im.size
        except Image.DecompressionBombError:
            return "too_large"
        except Image.UnidentifiedImageError:
            return "not_image"
        except Exception:
            return "corrupt_image"
        finally:
            if im is not None and not keep_header:
                im.close()
        jpeg = fmt in ("JPEG", "MPO")
        if fmt not in DECODABLE:
            reason = "unsupported_format"
        elif w * h > self.cfg.max_image_pixels:
            reason = "too_large"
        elif w < 1 or h < 1 or (jpeg and _jpeg_end(data) is None) or (
                jpeg and not defer_scan_check and not jpeg_scans_intact(data)):
            reason = "corrupt_image"
        else:
            return Record(sid, data, w, h, caption, label, key, im if keep_header else None,
                          scan_checked=not (jpeg and defer_scan_check))
        if keep_header:
            im.close()
        return reason


def _jpeg_end(data: bytes) -> int | None:
    """Offset just past the EOI that ends the JPEG's marker structure, or None when it has no complete one.

    Walks the segments from SOI by their lengths (so an EXIF thumbnail's EOI is never mistaken for
    ours) and each scan's entropy-coded data up to its next marker; bytes before a marker are skipped
    as libjpeg does. Whatever follows the EOI (an appended video, padding) is not looked at."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    pos, ends = 2, None
    while True:
        pos = data.find(b"\xff", pos)
        while 0 <= pos < n and data[pos] == 0xFF:  # fill bytes before the marker code
            pos += 1
        if pos < 0 or pos >= n:
            return None
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:
            return pos
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            continue
        length = int.from_bytes(data[pos: pos + 2], "big")
        if length < 2 or pos + length > n:
            return None
        pos += length
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next marker (FF00 = stuffing, FFD0-D7 = RSTn)
            if ends is None:
                ends = _marker_ends(data)
            k = int(np.searchsorted(ends, pos))  # the first marker at or after pos
            if k == len(ends):
                return None
            pos = int(ends[k])


def _marker_ends(data: bytes) -> np.ndarray:
    """Sorted offsets of every FF that is followed by a marker code (not 00 stuffing, not RSTn, not another
    FF fill byte): where entropy-coded data can end. NOTE: numpy over the whole file, 0.02 ms for a 15 KB
    JPEG where a find() loop over its FF bytes took 0.1 ms and a regex search 0.3 ms."""
    arr = np.frombuffer(data, dtype=np.uint8)
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    code = arr[ff + 1]
    return ff[(code != 0) & (code != 0xFF) & ((code < 0xD0) | (code > 0xD7))]


try:
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency; logged where the check is skipped
    _simplejpeg = None
# libjpeg warnings that mean missing or garbled entropy-coded data (PIL and DALI both decode such a
# file without an error, filling the lost blocks with gray); others (e.g. extraneous bytes between
# segments) leave a correct image and are accepted
_SCAN_DAMAGE = ("premature end", "huffman", "instead of rst")
_warned_no_simplejpeg = False


def jpeg_intact(data: bytes) -> bool:
    """False for a JPEG cut short: no EOI after its scans (`_jpeg_end`), or scans whose data ends early (a
    cut file "repaired" with an EOI) or holds bad Huffman codes (`jpeg_scans_intact`)."""
    return _jpeg_end(data) is not None and jpeg_scans_intact(data)


def scan_damage(err: ValueError) -> bool:
    """True when simplejpeg's strict-mode error is a libjpeg warning about missing or garbled scan data."""
    msg = str(err).lower()
    return any(s in msg for s in _SCAN_DAMAGE)


def jpeg_scans_intact(data: bytes) -> bool:
    """False when the scan data ends early or holds bad Huffman codes: decoded at 1/8 scale with
    libjpeg-turbo (simplejpeg, strict: warnings raise; the entropy decoding, where these warnings arise,
    is the same at every scale, so a strict decode at any scale is the same check: loader.decode_pil).
    NOTE: 0.7 ms for a 500x375 q90 JPEG where PIL's full decode takes 1.6 ms (2 shared cores): the
    price of never training on gray blocks, paid by the GPU DALI backend's reader thread; the torch
    backend's and the CPU DALI backend's strict decodes make it for free."""
    global _warned_no_simplejpeg
    if _simplejpeg is None:
        if not _warned_no_simplejpeg:
            _warned_no_simplejpeg = True
            log.warning("data: simplejpeg is not importable: JPEGs whose scan was cut but that end with an EOI "
                        "are not detected (pip install simplejpeg)")
        return True
    try:
        cs = _simplejpeg.decode_jpeg_header(data)[2]
        _simplejpeg.decode_jpeg(data, colorspace="CMYK" if cs in ("CMYK", "YCCK") else "GRAY",
                                min_height=1, min_width=1, min_factor=8, strict=True)
    except ValueError as e:
        return not scan_damage(e)
    return True
