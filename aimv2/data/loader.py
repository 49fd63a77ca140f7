"""Loader: batches of (images, text, prefix_len[, labels]) from webdataset shards, two backends.

Batch layout (B = batch_size, S = image_size, L = text_len, N = (S / patch_size)^2):
  images     float32 (B, 3, S, S) on cfg.device, (x / 255 - mean) / std with ImageNet statistics
  text       int64 (B, L) on cfg.device, caption ids + eos, right-padded with tokenizer.pad_id
  prefix_len int64 (B,) on cfg.device, method.md §2 prefix lengths (dataset.prefix_lengths)
  labels     int64 (B,) on cfg.device, json[label_key] (only when cfg.label_key is set)
  keys       list[str] "<shard>:<key>" (only when cfg.return_keys)

A batch is the next B samples of the epoch order (dataset.epoch_order) that pass every check and
decode; skipped samples are counted in `stats()` under `skipped_<reason>`. The position after a
batch, `state_dict() = {"epoch", "sample"}`, is the index in the epoch order just past the batch's
last sample; a Loader built with `start_epoch / start_sample` set to it yields the same following
batches bit for bit, because crops depend only on (seed, epoch, sample id) and prefix lengths only
on (seed, rank, epoch, first position).

Backend "torch": a torch DataLoader over an IterableDataset of fixed-size chunks of the order; chunk
c goes to worker c % num_workers and the DataLoader returns chunks in order, so the stream of decoded
samples (PIL decode, JPEG DCT-domain downscaling when the crop is >= 2x the output, then
augment.pil_crop_resize) does not depend on the worker count. With device="cuda" and torchvision importable (and
passing a self-test against PIL at start-up), JPEGs skip PIL: workers pass the bytes and the main
process decodes the batch with torchvision.io.decode_jpeg(device="cuda") and crops / resizes /
flips on the GPU (augment.tensor_crop_resize); a JPEG nvJPEG rejects is skipped and the batch refilled.
Backend "dali": see aimv2/data/dali.py.

Native mode (cfg.native, aimv2/data/native.py, method.md §8): the same plan and skips, but each sample
keeps its crop's aspect ratio on its own patch grid, workers send uint8 patch rows, and the main process
packs them greedily into batches of at most tokens_per_batch tokens, yielded as
aimv2.packing.PackedBatch (patches normalised as above, cu_seqlens, grids, per-sample prefix_len, text);
the state after a batch is again the position just past its last sample. JPEGs are decoded by PIL on
the workers even with device="cuda" (the batch is then copied to the GPU).
"""
from __future__ import annotations

import io
import logging
import sys
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from .augment import CropPlan, crop_plans, tensor_crop_resize
from .decode import decode_pil, decode_rgb, pillow_info, to_rgb  # noqa: F401 (re-exported: loader.decode_pil etc.)
from .native import native_prefix_lengths, patchify_hwc, plan_grid
from .dataset import Record, SampleReader, SampleTable, epoch_order, prefix_lengths
from .shards import resolve_shards
from .tokenizer import _Base as _BaseTokenizer
from .tokenizer import get_tokenizer
from ..packing import PackedBatch, cu_seqlens_of

__all__ = ["Loader", "build_loader", "dali_available", "decode_pil", "decode_rgb", "pick_backend", "pillow_info", "to_rgb"]

log = logging.getLogger(__name__)


# samples per DataLoader item; any value gives the same batches. NOTE: 32 over 16 halves the per-item
# IPC (a shared-memory tensor, its fd sent over a socket, pickling): 1.63-1.66 vs 1.71-1.78 CPU-ms per synth
# image (workers + main process), 2.79-2.88 vs 2.98-3.00 per photo, at 2 workers (B = 64, 2 shared cores)
_CHUNK = 32


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """(backend, reason) for DataConfig.backend on `device`: "auto" picks the one measured fastest there.

    NOTE: on the 2-core CPU machine (benchmarks/results/data-cpu-2026-11-30.json, interleaved runs) the
    torch backend spent less CPU per image than our DALI CPU backend on every set and worker count (1.71-1.78
    vs 1.97-2.02 ms per synth image, 2.93-2.97 vs 3.91-3.95 per photo) and was as fast or faster
    (docs/data.md); on a GPU DALI's nvJPEG "mixed" decode of the crop window leaves the host free."""
    if backend != "auto":
        return backend, "DataConfig.backend"
    if device.type == "cuda":
        if dali_available():
            return "dali", "auto on a GPU: nvJPEG decode through DALI"
        return "torch", "auto on a GPU: DALI is not importable (pip install nvidia-dali-cuda130)"
    return "torch", "auto on the CPU: measured faster than DALI's CPU decoder (benchmarks/results/data-cpu-*.json)"



def _identity(x):
    return x


class _ChunkStream(IterableDataset):
    """Yields ordered chunks {"epoch", "pos", "sid", "reason", "images", ...} and one "end" item per epoch."""

    def __init__(self, table: SampleTable, cfg: DataConfig, start_epoch: int, start_sample: int,
                 defer_jpeg: bool = False):
        self.table, self.cfg, self.defer_jpeg = table, cfg, defer_jpeg
        self.start_epoch, self.start_sample = start_epoch, start_sample

    def _chunks(self):
        epoch = self.start_epoch
        lo = self.start_sample
        while True:
            order = epoch_order(self.table, self.cfg, epoch)
            if len(order) == 0:
                raise ValueError(f"rank {self.cfg.rank} of {self.cfg.world_size} gets no sample in epoch {epoch} "
                                 f"from {self.table.num_shards} shard(s) starting {self.table.paths[0]!r}")
            for a in range(lo, len(order), _CHUNK):
                yield epoch, a, order[a: a + _CHUNK]
            yield epoch, len(order), None  # end of epoch
            if not self.cfg.train:
                return
            epoch, lo = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        reader = SampleReader(self.table, self.cfg)
        S, p, native = self.cfg.image_size, self.cfg.patch_size, self.cfg.native
        try:
            for c, (epoch, a, ids) in enumerate(self._chunks()):
                if c % nw != wid:
                    continue
                if ids is None:
                    yield {"end": True, "epoch": epoch, "length": a}
                    continue
                out = {"end": False, "epoch": epoch, "pos": list(range(a, a + len(ids))), "reason": [],
                       "caption": [], "label": [], "key": [], "images": [], "raw": []}
                # header parsed once (kept open for the decoder); JPEG scans checked by the strict decode
                recs = [reader.read(sid, keep_header=True, defer_scan_check=not self.defer_jpeg) for sid in ids.tolist()]
                good = [r for r in recs if isinstance(r, Record)]
                plans = iter(crop_plans(self.cfg, epoch, [r.sid for r in good], [(r.width, r.height) for r in good]))
                images = np.empty((0 if native else len(good), 3, S, S), dtype=np.uint8)  # (n_good, 3, S, S)
                rows, grids = [], []  # native: each image's uint8 (h*w, p*p*3) patch rows and (h, w)
                d = 0
                for rec in recs:
                    raw = None
                    if isinstance(rec, Record):
                        plan = next(plans)
                        if self.defer_jpeg and rec.image[:2] == b"\xff\xd8":
                            rec.header = rec.header.close()  # decoded on the GPU by the main process
                            raw = (rec.image, plan)
                        else:
                            try:
                                if native:
                                    h, w = plan_grid(self.cfg, plan)
                                    rows.append(patchify_hwc(decode_pil(rec, plan, (w * p, h * p)), p))
                                    grids.append((h, w))
                                else:
                                    decode_pil(rec, plan, S, images[d])
                                d += 1
                            except Exception:  # PIL raises OSError, SyntaxError, ValueError... on broken streams
                                rec = "corrupt_image"
                    if isinstance(rec, str):
                        out["reason"].append(rec)
                        continue
                    out["reason"].append(None)
                    out["raw"].append(raw)
                    out["caption"].append(rec.caption)
                    out["label"].append(rec.label)
                    out["key"].append(rec.key)
                out["images"] = torch.from_numpy(images[:d])  # (n_decoded, 3, S, S) uint8, shared memory
                if native:  # (sum of h*w, p*p*3) uint8 and the grids, in sample order
                    out["images"] = torch.from_numpy(np.concatenate(rows) if rows else np.empty((0, 3 * p * p), np.uint8))
                    out["grids"] = grids
                yield out
        finally:
            reader.close()


class _BatchPool:
    """float32 batch buffers handed out again once nothing but the pool references them (the batch tensor
    made with torch.from_numpy holds a reference to its array until every view of it is gone)."""

    def __init__(self, keep: int = 4):
        self.keep, self._bufs = keep, []

    def get(self, shape: tuple) -> np.ndarray:
        for buf in self._bufs:
            # references: the list, `buf`, getrefcount's argument; one more = still in use by a batch
            if buf.shape == shape and sys.getrefcount(buf) == 3:
                return buf
        buf = np.empty(shape, dtype=np.float32)
        if len(self._bufs) < self.keep:
            self._bufs.append(buf)
        return buf


class Loader:
    """Iterable over batch dicts; see the module docstring. Build with `build_loader(cfg)`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg.validate()
        self.paths = resolve_shards(cfg.shards)
        self.table = SampleTable.build(self.paths, cfg.index_dir)
        if self.table.num_samples == 0:
            raise ValueError(f"shards: no sample found in {len(self.paths)} shard(s): {self.paths[:3]!r}")
        self.tokenizer = get_tokenizer(cfg.tokenizer, cfg.text_len)
        if cfg.backend == "dali" and not dali_available():
            raise ImportError('DataConfig.backend="dali" needs DALI: pip install nvidia-dali-cuda130 (or -cuda120)')
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"DataConfig.device: {cfg.device!r} requested but CUDA is not available")
        self.backend, reason = pick_backend(cfg.backend, self.device)
        log.info("data: %s backend (%s)%s", self.backend, reason,
                 f"; decodes with {pillow_info()}" if self.backend == "torch" else "")
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0
        self._mean_np = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1) * 255.0
        self._inv_std_np = 1.0 / (np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1) * 255.0)
        # torch backend on a GPU: JPEGs decoded by nvJPEG through torchvision when it works, else by PIL
        self._jpeg_decoder = None
        if self.backend == "torch" and self.device.type == "cuda" and not cfg.native:  # native: PIL decodes
            decode, reason = torchvision_jpeg_decoder(self.device)
            reason = reason or _check_gpu_decoder(decode)
            if reason is None:
                self._jpeg_decoder = decode
            else:
                log.info("data: torch backend decodes JPEGs with PIL on the CPU workers: %s", reason)
        self._pool = _BatchPool()
        self._epoch, self._sample = cfg.start_epoch, cfg.start_sample
        self._stats = Counter(samples=0, batches=0, skipped=0)
        if self.table.dropped:
            self._count_skip("truncated_shard", self.table.dropped)
        for reason, n in sorted(self.table.damaged.items()):  # damaged tar regions / members (logged by shards)
            self._count_skip(reason, n)
        self._stats["truncated_shards"] = len(self.table.truncated)
        self._order_len = len(epoch_order(self.table, cfg, cfg.start_epoch))
        self.num_samples = self._order_len  # samples (before skips) this rank reads per epoch

    # ---- public API --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "sample": self._sample}

    def stats(self) -> dict:
        return dict(self._stats)

    def __len__(self) -> int:
        """Batches per epoch if no sample were skipped (an upper bound)."""
        n, B = self._order_len, self.cfg.batch_size
        if self.cfg.native:  # any tokens_per_batch // max_patches samples fit in one batch
            B = self.cfg.tokens_per_batch // self.cfg.max_patches
        return -(-n // B) if self.cfg.keep_last else n // B

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.train:
            start = (self._epoch, self._sample)
        else:
            start = (self.cfg.start_epoch, self.cfg.start_sample)
        if self.backend == "dali":
            from .dali import iterate_dali

            return iterate_dali(self, *start)
        return self._iter_torch(*start)

    # ---- shared helpers ----------------------------------------------------------------------
    def _count_skip(self, reason: str, n: int = 1) -> None:
        self._stats["skipped"] += n
        self._stats["skipped_" + reason] += n

    def _normalize(self, imgs: list[np.ndarray]) -> torch.Tensor:
        """uint8 (3, S, S) images -> float32 (n, 3, S, S), (x - mean) / std, on self.device.

        CPU: stack + normalise in one loop, image by image (the float image stays in cache for the
        scale pass), into a batch buffer reused once the caller has dropped every batch made from it.
        NOTE: a fresh 38 MB batch is page-faulted in on every touch: 28-34 ms per B = 64 batch where a
        reused one took 24 ms (2 shared cores)."""
        if self.device.type == "cuda":
            u8 = torch.from_numpy(np.stack(imgs)).pin_memory().to(self.device, non_blocking=True)  # (n, 3, S, S)
            return u8.float().sub_(self._mean).div_(self._std)
        out = self._pool.get((len(imgs),) + imgs[0].shape)  # (n, 3, S, S) float32
        for i, img in enumerate(imgs):
            o = out[i]  # (3, S, S)
            np.subtract(img, self._mean_np, out=o, dtype=np.float32)
            np.multiply(o, self._inv_std_np, out=o)
        return torch.from_numpy(out)

    def _finish(self, epoch: int, pos: list[int], images: torch.Tensor, captions: list[str], labels, keys) -> dict:
        """Assemble a batch dict from decoded images and advance the position past pos[-1]."""
        dev = self.device
        batch = {
            "images": images,
            "text": self._tokenize(captions).to(dev, non_blocking=True),
            "prefix_len": prefix_lengths(self.cfg, epoch, pos[0], len(pos)).to(dev, non_blocking=True),
        }
        if self.cfg.label_key is not None:
            batch["labels"] = torch.tensor(labels, dtype=torch.int64).to(dev, non_blocking=True)
        if self.cfg.return_keys:
            batch["keys"] = list(keys)
        self._advance(epoch, pos)
        return batch

    def _finish_packed(self, epoch: int, pos: list[int], rows, grids: list, captions: list[str]) -> PackedBatch:
        """A PackedBatch from uint8 (T, p*p*3) patch rows (numpy on the host, or a tensor on self.device),
        ImageNet-normalised per channel (the last axis of a patch row), and advance the position past
        pos[-1]. Prefix lengths per sample (native.native_prefix_lengths, method.md §2)."""
        dev, cfg = self.device, self.cfg
        lengths = [h * w for h, w in grids]
        if isinstance(rows, np.ndarray) and dev.type == "cpu":
            out = np.empty(rows.shape, dtype=np.float32)  # (T, p*p*3)
            x, o = rows.reshape(len(rows), -1, 3), out.reshape(len(rows), -1, 3)  # (T, p*p, 3)
            np.subtract(x, self._mean_np.reshape(3), out=o, dtype=np.float32)  # the fixed path's float ops
            np.multiply(o, self._inv_std_np.reshape(3), out=o)
            patches = torch.from_numpy(out)
        else:
            if isinstance(rows, np.ndarray):
                rows = torch.from_numpy(rows).pin_memory().to(dev, non_blocking=True)
            x = rows.float().view(rows.shape[0], -1, 3)  # (T, p*p, 3)
            patches = x.sub_(self._mean.view(3)).div_(self._std.view(3)).view(rows.shape[0], -1)
        prefix = native_prefix_lengths(cfg.seed, cfg.rank, epoch, pos, lengths, cfg.prefix)
        batch = PackedBatch(patches, cu_seqlens_of(lengths).to(dev, non_blocking=True), tuple(grids),
                            prefix.to(dev, non_blocking=True), self._tokenize(captions).to(dev, non_blocking=True))
        self._advance(epoch, pos)
        return batch

    def _advance(self, epoch: int, pos: list[int]) -> None:
        """Count a yielded batch of the samples at `pos` and move the position past its last one."""
        self._epoch, self._sample = epoch, pos[-1] + 1
        self._stats["samples"] += len(pos)
        self._stats["batches"] += 1

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        """(B, text_len) int64; a user tokenizer object is called with the captions only."""
        if isinstance(self.tokenizer, _BaseTokenizer):
            return self.tokenizer(captions, self.cfg.text_len)
        return torch.as_tensor(self.tokenizer(captions), dtype=torch.int64)

    def _end_epoch(self, epoch: int, good: int, batches: int, started_at: int) -> None:
        """Checks at the end of an epoch's pass, then move the position to the next epoch."""
        if started_at == 0 and good == 0:
            raise RuntimeError(
                f"every sample of epoch {epoch} was skipped ({self._skip_summary()}); "
                f"rank {self.cfg.rank}/{self.cfg.world_size} reads {len(self.paths)} shard(s): {self.paths[:3]!r}")
        if self.cfg.train and started_at == 0 and batches == 0 and self.cfg.native:
            raise ValueError(
                f"DataConfig.tokens_per_batch={self.cfg.tokens_per_batch} is more than the patches of the {good} "
                f"good samples rank {self.cfg.rank} gets per epoch from {self.paths[:3]!r} (drop_last)")
        if self.cfg.train and started_at == 0 and batches == 0:
            raise ValueError(
                f"DataConfig.batch_size={self.cfg.batch_size} is larger than the {good} good samples rank "
                f"{self.cfg.rank} gets per epoch from {self.paths[:3]!r}")
        if self.cfg.train:
            self._epoch, self._sample = epoch + 1, 0

    def _skip_summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self._stats.items()) if k.startswith("skipped_")) or "none"

    # ---- torch backend -----------------------------------------------------------------------
    def _iter_torch(self, start_epoch: int, start_sample: int) -> Iterator[dict]:
        cfg, B = self.cfg, self.cfg.batch_size
        nw = cfg.num_workers
        stream = _ChunkStream(self.table, cfg, start_epoch, start_sample, defer_jpeg=self._jpeg_decoder is not None)
        dl = DataLoader(stream, batch_size=None,
                        num_workers=nw, collate_fn=_identity, prefetch_factor=4 if nw else None,
                        persistent_workers=False)
        buf: list[tuple] = []  # (pos, image or (jpeg, plan), caption, label, key) of good samples not yet batched
        # native: image = (uint8 (h*w, p*p*3) rows, (h, w)); a batch closes when the next sample would take it
        # past tokens_per_batch tokens (native.greedy_packs)
        used = 0  # native: tokens in buf
        good = batches = 0
        started_at = start_sample
        for chunk in dl:
            epoch = chunk["epoch"]
            if chunk["end"]:
                while buf and cfg.keep_last:
                    n = len(buf)
                    batch, buf = self._batch_from(epoch, buf)
                    if batch is not None:
                        good, batches = good + n, batches + 1
                        yield batch
                if buf and batches == 0:  # learn whether the leftovers decode, for the all-bad error
                    _, ok = self._decode_deferred(buf)
                    good += len(ok)
                else:
                    good += len(buf)
                buf, used = [], 0
                self._end_epoch(epoch, good, batches, started_at)
                good = batches = started_at = 0
                continue
            g = d = 0  # index among the chunk's good samples / among its CPU-decoded images
            decoded = chunk["images"].numpy()  # (n_decoded, 3, S, S) uint8; native: (T_chunk, p*p*3)
            row = 0  # native: first row of the next image in `decoded`
            for pos, reason in zip(chunk["pos"], chunk["reason"]):
                if reason is not None:
                    self._count_skip(reason)
                    continue
                img = chunk["raw"][g]
                if cfg.native:
                    h, w = chunk["grids"][g]
                    n = h * w
                    img, row = (decoded[row: row + n], (h, w)), row + n
                    if buf and used + n > cfg.tokens_per_batch:
                        good, batches = good + len(buf), batches + 1
                        yield self._batch_from(epoch, buf)[0]
                        buf, used = [], 0
                    used += n
                elif img is None:
                    img, d = decoded[d], d + 1
                buf.append((pos, img, chunk["caption"][g], chunk["label"][g], chunk["key"][g]))
                g += 1
                if len(buf) == B and not cfg.native:
                    batch, buf = self._batch_from(epoch, buf)
                    if batch is not None:
                        good, batches = good + B, batches + 1
                        yield batch

    def _decode_deferred(self, items: list[tuple]) -> tuple[dict, list[tuple]]:
        """GPU-decode the items holding (jpeg, plan): ({index: float (3, S, S) in [0, 255]}, good items)."""
        idx = [i for i, it in enumerate(items) if isinstance(it[1], tuple)]
        if not idx or self._jpeg_decoder is None:  # nothing deferred (native items are tuples too)
            return {}, items
        datas = [items[i][1][0] for i in idx]
        try:
            decoded = self._jpeg_decoder(datas)
        except Exception:  # find the culprits one by one
            decoded = []
            for d in datas:
                try:
                    decoded.append(self._jpeg_decoder([d])[0])
                except Exception:
                    decoded.append(None)
        out, bad = {}, set()
        for i, img in zip(idx, decoded):
            if img is None:
                bad.add(i)
            else:
                out[i] = tensor_crop_resize(img, items[i][1][1], self.cfg.image_size)
        if bad:
            self._count_skip("corrupt_image", len(bad))
        return out, [it for i, it in enumerate(items) if i not in bad]

    def _batch_from(self, epoch: int, items: list[tuple]) -> tuple[dict | None, list[tuple]]:
        """(batch, []) or, when deferred decoding dropped bad samples, (None, the good items to refill)."""
        if self.cfg.native:
            pos, imgs, caps = [it[0] for it in items], [it[1] for it in items], [it[2] for it in items]
            return self._finish_packed(epoch, pos, np.concatenate([r for r, _ in imgs]), [g for _, g in imgs], caps), []
        gpu, ok = self._decode_deferred(items)
        if len(ok) < len(items):
            return None, ok
        cpu = [i for i in range(len(items)) if i not in gpu]
        u8 = [items[i][1] for i in cpu]  # uint8 (3, S, S) each
        if not gpu:
            images = self._normalize(u8)
        else:
            images = torch.empty((len(items),) + tuple(next(iter(gpu.values())).shape), device=self.device)
            for i, plane in gpu.items():
                images[i] = plane
            images.sub_(self._mean).div_(self._std)
            if cpu:
                images[cpu] = self._normalize(u8)
        pos, _, caps, labels, keys = zip(*items)
        return self._finish(epoch, list(pos), images, list(caps), list(labels), list(keys)), []


def torchvision_jpeg_decoder(device: torch.device):
    """(decode(list[bytes]) -> list of uint8 (3, H, W) on device, None) or (None, reason)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        return None, f"torchvision is not importable ({e})"

    def decode(datas: list[bytes]) -> list[torch.Tensor]:
        ts = [torch.from_numpy(np.frombuffer(d, dtype=np.uint8).copy()) for d in datas]
        return list(decode_jpeg(ts, mode=ImageReadMode.RGB, device=device))

    return decode, None


def _check_gpu_decoder(decode, size: int = 32) -> str | None:
    """None when `decode` + tensor_crop_resize matches the PIL path on a test JPEG, else the reason."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((80, 60), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=95)
    rec = Record(0, buf.getvalue(), 80, 60, "x", None, "selftest")
    plan = CropPlan(7, 5, 50, 44, True)
    try:
        got = tensor_crop_resize(decode([rec.image])[0], plan, size).cpu()
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        return f"{type(e).__name__}: {e}"
    ref = torch.from_numpy(decode_pil(rec, plan, size).astype(np.float32)).permute(2, 0, 1)
    err = (got - ref).abs().mean().item()
    return None if err < 4.0 else f"mean |GPU - PIL| = {err:.1f} / 255 on the self-test image"


def build_loader(cfg: DataConfig) -> Loader:
    """Resolve shards, index them (cached), pick the backend and return an iterable Loader."""
    return Loader(cfg)
