"""DALI backend: the shared sample plan feeds a DALI decode/augment pipeline.

Pipeline per batch (B <= batch_size samples that passed SampleReader's checks):
  GPU (cfg.device cuda): external_source(jpeg bytes; crop plan as augment.dali_crop_args: anchor (x, y),
     shape (w, h), mirror) -> fn.decoders.image_slice (device "mixed" = nvJPEG, decodes only the crop
     window: ROI decoding)
  CPU: external_source(uint8 (H, W, 3) decoded by the reader thread: decode.decode_rgb, libjpeg-turbo
     strict, so the decode is the JPEG scan check; crop window as roi_start / roi_end (y, x), mirror)
  -> fn.resize to (S, S), cubic, antialiased (CPU: of the ROI, read in place)
  -> fn.crop_mirror_normalize (mirror, mean/std * 255, float32, CHW), on the GPU when cfg.device is cuda;
     on the CPU copied out into the loader's pooled batch buffers (loader._BatchPool).
Native mode (cfg.native, aimv2/data/native.py): fn.resize takes each sample's own (w * p, h * p) from
external sources (native.plan_grid of its crop plan), the flip keeps uint8 HWC, and the host cuts each
image into patch rows and normalises the packed rows as the torch backend does (Loader._finish_packed).
Batches are packed greedily by tokens: the grid is known from the plan, before decoding.

Why not fn.readers.webdataset: it cannot start mid-epoch (no resume), its shuffle order is not the
torch backend's, and a sample its decoder rejects fails the whole pipeline. Reading with the shared
plan (dataset.py) gives both backends the same samples, the same order, the same crop boxes, flips
and prefix lengths; DALI does the expensive part (decode, resize, normalise) on its threads / GPU.

Overlap: a reader thread (`_Prefetch`) runs the plan two batches ahead (pread, header and scan checks or,
on the CPU, the strict decode; crop windows drawn per chunk), and the pipeline runs with prefetch_queue_depth = 2: batch i + 1 is fed
and scheduled before batch i is collected (`DaliDecoder.submit` / `collect`), so DALI decodes the next
batch while the host copies out, tokenises and hands over this one, and while the caller trains on it.
The CPU and the "mixed" (nvJPEG) pipelines share this code; they differ only in where the JPEG is decoded.
Batches are still formed strictly in plan order.

Bad data: SampleReader rejects most bad samples before decoding. When DALI still fails on a batch,
the batches in flight are taken back, the samples of each are decoded alone (in order, until the
culprits are found), which are skipped (`corrupt_image`), the pipeline is rebuilt and the batches
re-formed from the good samples in plan order, as the torch backend refills: the same batches as a
pipeline that ran one batch at a time.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from .config import IMAGENET_MEAN, IMAGENET_STD
from .augment import CropPlan, crop_plans, dali_crop_args
from .dataset import Record, SampleReader, epoch_order
from .decode import decode_rgb
from .native import patchify_hwc, plan_grid

_CHUNK = 16  # samples whose crop plans are drawn at once (any value gives the same plans)

__all__ = ["DaliDecoder", "iterate_dali"]


class DaliDecoder:
    """Decodes lists of (Record, CropPlan) into float32 (n, 3, S, S) normalised images on `device`
    (native mode, `grid_of` given: uint8 (T, p*p*3) patch rows of each plan's own grid, see _copy_out).

    `submit(items)` feeds a batch and schedules it; `collect()` returns the oldest submitted batch's images
    (blocking until DALI is done). Up to PREFETCH batches run at once: submit the next batch before
    collecting this one. `decode(items)` = submit + collect. A pipeline that raised is invalid: `reset()`."""

    PREFETCH = 2  # NOTE: 2 = feed i + 1 while DALI decodes i; measured in benchmarks/bench_data.py (docs/data.md)

    def __init__(self, batch_size: int, size: int, num_threads: int, device: torch.device, seed: int = 0,
                 grid_of=None, patch_size: int = 14, pool=None):
        """grid_of: native mode, plan -> (h, w) patches; the images come out as uint8 patch rows then.
        pool: a loader._BatchPool the CPU batches are copied into (a fresh buffer per batch when None)."""
        self.batch_size, self.size, self.num_threads, self.device, self.seed = batch_size, size, num_threads, device, seed
        self.grid_of, self.patch_size, self.pool = grid_of, patch_size, pool
        self._single = None
        self.reset()

    def reset(self) -> None:
        """Drop the batches in flight and rebuild the batch pipeline."""
        self._pipe = self._build(self.batch_size, self.PREFETCH)
        self._fed: list = []       # items of the batches fed and not yet collected, oldest first
        self._real: list = []      # per fed batch: False for a copy fed only to start the pipeline
        self._started = False

    def _build(self, batch_size: int, depth: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        S = self.size

        @pipeline_def(batch_size=batch_size, num_threads=max(1, self.num_threads), device_id=device_id,
                      seed=self.seed, prefetch_queue_depth=depth)
        def pipe():
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            if gpu:  # nvJPEG decodes the crop window
                data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
                shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
                img = fn.decoders.image_slice(data, anchor, shape, device="mixed", output_type=types.RGB,
                                              normalized_anchor=False, normalized_shape=False, axis_names="WH",
                                              adjust_orientation=False)
                roi = {}
            else:  # decoded on the host (Record.pixels, see _decoded); the resize reads the crop window
                # no_copy: DALI reads Record.pixels in place; the records stay referenced (self._fed, then the
                # batch's unit) until the batch is collected. NOTE: 1.92-1.98 CPU-ms per synth image vs
                # 2.03-2.07 with the copy (B = 64, 1 thread, 2 shared cores, interleaved)
                img = fn.external_source(name="data", dtype=types.UINT8, ndim=3, layout="HWC", no_copy=True)
                roi = dict(roi_start=fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1),
                           roi_end=fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1), roi_relative=False)
            if self.grid_of is not None:  # native: per-sample output sizes, uint8 HWC out
                rx = fn.external_source(name="resize_x", dtype=types.FLOAT, ndim=0)
                ry = fn.external_source(name="resize_y", dtype=types.FLOAT, ndim=0)
                img = fn.resize(img, resize_x=rx, resize_y=ry, interp_type=types.INTERP_CUBIC, antialias=True, **roi)
                return fn.crop_mirror_normalize(img, mirror=mirror, dtype=types.UINT8, output_layout="HWC")
            img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True, **roi)
            return fn.crop_mirror_normalize(img, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

        p = pipe()
        p.build()
        return p

    def _feed(self, pipe, items) -> None:
        plans = [plan for _, plan in items]
        if self.device.type == "cuda":
            pipe.feed_input("data", [np.frombuffer(r.image, dtype=np.uint8) for r, _ in items])
            for name, values in dali_crop_args(plans).items():
                pipe.feed_input(name, values)
        else:
            for r, _ in items:
                if r.pixels is None:  # a caller's own Record (not from _events): decoded here, kept on it (no_copy)
                    r.pixels = decode_rgb(r)
            pipe.feed_input("data", [r.pixels for r, _ in items])
            pipe.feed_input("roi_start", [np.array((p.y, p.x), dtype=np.float32) for p in plans])  # HWC order
            pipe.feed_input("roi_end", [np.array((p.y + p.h, p.x + p.w), dtype=np.float32) for p in plans])
            pipe.feed_input("mirror", dali_crop_args(plans)["mirror"])
        if self.grid_of is not None:
            grids = [self.grid_of(plan) for _, plan in items]
            pipe.feed_input("resize_x", [np.array(w * self.patch_size, dtype=np.float32) for _, w in grids])
            pipe.feed_input("resize_y", [np.array(h * self.patch_size, dtype=np.float32) for h, _ in grids])

    def _copy_out(self, out):
        """float32 (n, 3, S, S) on self.device; native: uint8 (T, p*p*3) patch rows (numpy on the CPU)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if self.grid_of is not None:
            p = self.patch_size
            if self.device.type == "cpu":
                return np.concatenate([patchify_hwc(out.at(i), p) for i in range(len(out))])
            rows = []
            for i in range(len(out)):
                img = torch.empty(out[i].shape(), dtype=torch.uint8, device=self.device)  # (h*p, w*p, 3)
                feed_ndarray(out[i], img, cuda_stream=stream)
                rows.append(patchify_hwc(img, p))
            return torch.cat(rows)
        t = out.as_tensor()
        if self.device.type == "cpu" and self.pool is not None:
            # NOTE: a reused batch buffer: copying out into a fresh 38 MB tensor page-faults it in, 0.36 CPU-ms
            # per 224 px image against 0.07 into a reused one (B = 64, DALI 2.4, 2 shared cores)
            res = torch.from_numpy(self.pool.get(tuple(t.shape())))  # (n, 3, S, S)
        else:
            res = torch.empty(t.shape(), dtype=torch.float32, device=self.device)  # (n, 3, S, S)
        feed_ndarray(t, res, cuda_stream=stream)
        return res

    def submit(self, items: list[tuple[Record, CropPlan]], real: bool = True) -> None:
        """Feed a batch and schedule it. The pipeline's first run prefetches PREFETCH batches, so it starts
        once that many are fed; after that every batch is scheduled as it is fed."""
        self._feed(self._pipe, items)
        self._fed.append(items)
        self._real.append(real)
        if self._started:
            self._pipe.schedule_run()
        elif len(self._fed) == self.PREFETCH:
            self._pipe.schedule_run()  # runs the PREFETCH batches fed so far
            self._started = True

    @property
    def in_flight(self) -> int:
        """Batches submitted and not yet collected."""
        return sum(self._real)

    def collect(self) -> torch.Tensor:
        """float32 (n, 3, S, S) of the oldest batch submitted and not yet collected."""
        while not self._started:  # fewer than PREFETCH batches fed: start with copies, discarded below
            self.submit(self._fed[-1], real=False)
        while True:
            (out,) = self._pipe.outputs()
            self._fed.pop(0)
            if self._real.pop(0):
                return self._copy_out(out)

    def decode(self, items: list[tuple[Record, CropPlan]]) -> torch.Tensor:
        """float32 (n, 3, S, S) of `items`, decoded now (nothing else may be in flight)."""
        self.submit(items)
        return self.collect()

    def find_bad(self, items: list[tuple[Record, CropPlan]]) -> list[int]:
        """Indices of items DALI cannot decode on their own (a batch-1 pipeline; the batch pipeline is untouched)."""
        bad = []
        for i, it in enumerate(items):
            try:
                if self._single is None:
                    self._single = self._build(1, 1)
                self._feed(self._single, [it])
                self._copy_out(self._single.run()[0])
            except RuntimeError:
                bad.append(i)
                self._single = None  # a pipeline that raised is not reused
        return bad


def _events(loader, start_epoch: int, start_sample: int):
    """The plan as events: ("rec", epoch, pos, (Record, CropPlan)) | ("skip", epoch, pos, reason) | ("end", epoch, lo, None).

    Crop plans are drawn per chunk of _CHUNK samples (augment.crop_plans: the same values as one by one)."""
    cfg = loader.cfg
    reader = SampleReader(loader.table, cfg)
    host = loader.device.type == "cpu"
    epoch, lo = start_epoch, start_sample
    try:
        while True:
            order = epoch_order(loader.table, cfg, epoch)
            for a in range(lo, len(order), _CHUNK):
                sids = order[a: a + _CHUNK].tolist()
                recs = [_decoded(reader.read(sid, keep_header=True, defer_scan_check=True)) if host
                        else reader.read(sid) for sid in sids]
                good = [r for r in recs if not isinstance(r, str)]
                plans = iter(crop_plans(cfg, epoch, [r.sid for r in good], [(r.width, r.height) for r in good]))
                for k, rec in enumerate(recs):
                    if isinstance(rec, str):
                        yield "skip", epoch, a + k, rec
                    else:
                        yield "rec", epoch, a + k, (rec, next(plans))
            yield "end", epoch, lo, None
            if not cfg.train:
                return
            epoch, lo = epoch + 1, 0
    finally:
        reader.close()


def _decoded(rec: Record | str) -> Record | str:
    """rec with Record.pixels = its whole image, uint8 (H, W, 3) (decode.decode_rgb: JPEGs strictly, so the
    decode is the scan check), or the skip reason.
    NOTE: on the CPU this decode replaces both the 1/8-scale scan check (0.15 ms per synth image) and DALI's
    own decode (0.32 ms in its executor thread), and the resize reads the crop window in place: 2.04-2.11
    CPU-ms per synth image where bytes + image_slice took 2.14-2.25 (with pooled copy-out; 2.48 before it),
    photos 3.98; DALI's readers.webdataset 2.07-2.13 and 3.91 in the same per-thread count (/proc, B = 64,
    1 thread, 2 shared cores, load 2.3-3.2)."""
    if isinstance(rec, str):
        return rec
    try:
        rec.pixels = decode_rgb(rec)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... on broken streams
        return "corrupt_image"
    return rec


class _Prefetch:
    """Runs an iterator in a daemon thread, `depth` items ahead, so reading overlaps DALI decoding.

    The order of items is the iterator's; an exception in the thread is re-raised in the consumer.
    """

    _DONE = object()

    def __init__(self, it, depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="aimv2-dali-reader")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it) -> None:
        try:
            for item in it:
                if not self._put(item):
                    break
            self._put(self._DONE)
        except BaseException as e:  # forwarded to the consumer
            self._put(e)
        finally:
            it.close()

    def __iter__(self):
        try:
            while True:
                item = self._q.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            # wait for the reader: a thread still inside DALI at interpreter exit aborts the process
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=30)


def iterate_dali(loader, start_epoch: int, start_sample: int) -> Iterator[dict]:
    """Batches of `loader` (a Loader with backend "dali") from position (start_epoch, start_sample).

    Units in plan order: ("batch", epoch, cands) fed to DALI as soon as formed, up to PREFETCH in flight,
    and ("end", epoch, lo, leftovers) at each epoch's end; they are handed over strictly in order."""
    yield from _DaliUnits(loader, start_epoch, start_sample)


class _DaliUnits:
    """iterate_dali's state: the event source, the units formed from it (their batches in flight in DALI)
    and the events taken back after a DALI failure. One instance per iteration."""

    def __init__(self, loader, start_epoch: int, start_sample: int):
        cfg = self.cfg = loader.cfg
        self.good = self.batches = 0  # this epoch's good samples and batches
        self.loader = loader
        self.grid_of = (lambda plan: plan_grid(cfg, plan)) if cfg.native else None
        self.dec = DaliDecoder(cfg.max_images_per_batch, cfg.image_size, cfg.num_workers, loader.device, cfg.seed,
                               self.grid_of, cfg.patch_size, loader._pool)
        self.source = iter(_Prefetch(_events(loader, start_epoch, start_sample),
                                     depth=2 * cfg.max_images_per_batch))
        self.back: list = []   # events taken back after a failure, replayed before the source's
        self.cands: list = []  # (pos, record, plan) read, not yet in a unit
        self.used = 0          # native: tokens in cands (a unit closes when the next sample would pass the budget)
        self.units: list = []  # formed units, oldest first; their batches are in flight in DALI
        self.done = False

    def _next_event(self):
        """The next event (replayed ones first), or None at the stream's end."""
        if self.back:
            return self.back.pop(0)
        try:
            return next(self.source)
        except StopIteration:
            self.done = True
            return None

    def _submit(self, epoch: int) -> None:
        """cands become a unit whose batch goes to DALI."""
        self.units.append(("batch", epoch, self.cands))
        self.dec.submit([(r, pl) for _, r, pl in self.cands])

    def _add(self, epoch: int, pos: int, payload) -> bool:
        """A decodable record joins cands; True when that closed a unit."""
        if self.cfg.native:
            h, w = self.grid_of(payload[1])
            full = self.cands and self.used + h * w > self.cfg.tokens_per_batch
            if full:
                self._submit(epoch)
                self.cands, self.used = [], 0
            self.cands.append((pos, *payload))
            self.used += h * w
            return bool(full)
        self.cands.append((pos, *payload))
        if len(self.cands) == self.cfg.batch_size:
            self._submit(epoch)
            self.cands = []
            return True
        return False

    def _end(self, event) -> None:
        """The end of an epoch's pass (pos = where it started): its partial batch or its leftovers."""
        kind, epoch, pos, payload = event
        if self.cands and self.cfg.keep_last:
            self._submit(epoch)
            self.back.insert(0, event)  # the end comes after the partial batch
        else:
            self.units.append(("end", epoch, pos, self.cands))
        self.cands, self.used = [], 0

    def form(self) -> bool:
        """Read events until one more unit is formed (and its batch submitted); False at the stream's end."""
        while self.back or not self.done:
            event = self._next_event()
            if event is None:
                return False
            kind, epoch, pos, payload = event
            if kind == "skip":
                self.loader._count_skip(payload)
            elif kind == "rec":
                if self._add(epoch, pos, payload):
                    return True
            else:
                self._end(event)
                return True
        return False

    def take_back(self) -> None:
        """After DALI failed: find the culprits among the batches in flight, skip them, replay the rest."""
        replay, found = [], False
        for unit in self.units:
            if unit[0] == "batch":
                items = unit[2]
                bad = set() if found else set(self.dec.find_bad([(r, w) for _, r, w in items]))
                found = found or bool(bad)
                if bad:
                    self.loader._count_skip("corrupt_image", len(bad))
                replay += [("rec", unit[1], p, (r, w)) for i, (p, r, w) in enumerate(items) if i not in bad]
            else:
                replay += [("rec", unit[1], p, (r, w)) for p, r, w in unit[3]] + [("end", unit[1], unit[2], None)]
        if not found:
            raise RuntimeError("DALI failed on batches whose samples decode alone")
        # native: the sample that closed the last unit is read and waits in cands; it comes after that unit
        replay += [("rec", self.units[-1][1], p, (r, w)) for p, r, w in self.cands]
        self.cands, self.used = [], 0
        self.back[:0] = replay
        self.units = []
        self.dec.reset()

    def _batch(self, epoch: int, items: list, images):
        """The loader's batch (packed in native mode) of the collected `images` of `items`."""
        pos, caps = [p for p, _, _ in items], [r.caption for _, r, _ in items]
        if self.cfg.native:
            return self.loader._finish_packed(epoch, pos, images, [self.grid_of(pl) for _, _, pl in items], caps)
        return self.loader._finish(epoch, pos, images, caps, [r.label for _, r, _ in items],
                                   [r.key for _, r, _ in items])

    def _left(self, left: list) -> int:
        """Good samples among an epoch's leftovers (fewer than B, dropped undecoded: drop_last)."""
        if not left or self.batches:
            return len(left)
        bad = self.dec.find_bad([(r, w) for _, r, w in left])  # no batch this epoch: does anything decode?
        if bad:
            self.loader._count_skip("corrupt_image", len(bad))
        return len(left) - len(bad)

    def __iter__(self) -> Iterator[dict]:
        self.good = self.batches = 0
        dec = self.dec
        while True:
            # read ahead until PREFETCH batches are in flight, past at most one epoch end (an epoch without
            # any good sample must raise in _end_epoch, not read on forever)
            while dec.in_flight < DaliDecoder.PREFETCH and sum(u[0] == "end" for u in self.units) < 2 and self.form():
                pass
            if not self.units:
                return
            unit = self.units[0]
            if unit[0] == "batch":
                _, epoch, items = unit
                try:
                    images = dec.collect()
                except RuntimeError:
                    self.take_back()
                    continue
                self.units.pop(0)
                batch = self._batch(epoch, items, images)
                self.good, self.batches = self.good + len(items), self.batches + 1
                yield batch
            else:
                _, epoch, lo, left = self.units.pop(0)
                self.good += self._left(left)
                self.loader._end_epoch(epoch, self.good, self.batches, lo)
                self.good = self.batches = 0
