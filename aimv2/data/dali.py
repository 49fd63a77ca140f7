"""DALI backend: the shared sample plan feeds encoded bytes to a DALI decode/augment pipeline.

Pipeline per batch (B <= batch_size samples that passed SampleReader's checks):
  external_source(jpeg bytes; crop plan as augment.dali_crop_args: anchor (x, y), shape (w, h), mirror)
  -> fn.decoders.image_slice (device "mixed" = nvJPEG on the GPU when cfg.device is cuda, else "cpu";
     decodes only the crop window: ROI decoding)
  -> fn.resize to (S, S), cubic, antialiased
  -> fn.crop_mirror_normalize (mirror, mean/std * 255, float32, CHW), on the GPU when cfg.device is cuda.

Why not fn.readers.webdataset: it cannot start mid-epoch (no resume), its shuffle order is not the
torch backend's, and a sample its decoder rejects fails the whole pipeline. Reading with the shared
plan (dataset.py) gives both backends the same samples, the same order, the same crop boxes, flips
and prefix lengths; DALI does the expensive part (decode, resize, normalise) on its threads / GPU.

A reader thread (`_Prefetch`) runs the plan two batches ahead (pread, header checks, crop windows),
so reading overlaps DALI's decoding; batches are still formed strictly in plan order.

Bad data: SampleReader rejects most bad samples before decoding. When DALI still fails on a batch,
each of its samples is decoded alone to find the culprits, which are skipped (`corrupt_image`), and
the pipeline is rebuilt; the batch is refilled from the following samples, as the torch backend does.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from .config import IMAGENET_MEAN, IMAGENET_STD
from .augment import CropPlan, crop_plan, dali_crop_args
from .dataset import Record, SampleReader, epoch_order

__all__ = ["DaliDecoder", "iterate_dali"]


class DaliDecoder:
    """Decodes a list of (Record, CropPlan) into float32 (n, 3, S, S) normalised images on `device`."""

    def __init__(self, batch_size: int, size: int, num_threads: int, device: torch.device, seed: int = 0):
        self.batch_size, self.size, self.num_threads, self.device, self.seed = batch_size, size, num_threads, device, seed
        self._pipe = self._build(batch_size)
        self._single = None

    def _build(self, batch_size: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        S = self.size

        @pipeline_def(batch_size=batch_size, num_threads=max(1, self.num_threads), device_id=device_id,
                      seed=self.seed, prefetch_queue_depth=1)
        def pipe():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            img = fn.decoders.image_slice(data, anchor, shape, device="mixed" if gpu else "cpu",
                                          output_type=types.RGB, normalized_anchor=False, normalized_shape=False,
                                          axis_names="WH", adjust_orientation=False)
            img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(img, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

        p = pipe()
        p.build()
        return p

    def _run(self, pipe, items) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe.feed_input("data", [np.frombuffer(r.image, dtype=np.uint8) for r, _ in items])
        for name, values in dali_crop_args([plan for _, plan in items]).items():
            pipe.feed_input(name, values)
        (out,) = pipe.run()
        t = out.as_tensor()
        res = torch.empty(t.shape(), dtype=torch.float32, device=self.device)  # (n, 3, S, S)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(t, res, cuda_stream=stream)
        return res

    def decode(self, items: list[tuple[Record, CropPlan]]) -> torch.Tensor:
        return self._run(self._pipe, items)

    def find_bad(self, items: list[tuple[Record, CropPlan]]) -> list[int]:
        """Indices of items DALI cannot decode on their own (rebuilds the batch pipeline)."""
        bad = []
        for i, it in enumerate(items):
            try:
                if self._single is None:
                    self._single = self._build(1)
                self._run(self._single, [it])
            except RuntimeError:
                bad.append(i)
                self._single = None  # a pipeline that raised is not reused
        self._pipe = self._build(self.batch_size)
        return bad


def _events(loader, start_epoch: int, start_sample: int):
    """The plan as events: ("rec", epoch, pos, (Record, CropPlan)) | ("skip", epoch, pos, reason) | ("end", epoch, lo, None)."""
    cfg = loader.cfg
    reader = SampleReader(loader.table, cfg)
    epoch, lo = start_epoch, start_sample
    try:
        while True:
            order = epoch_order(loader.table, cfg, epoch)
            for pos in range(lo, len(order)):
                sid = int(order[pos])
                rec = reader.read(sid)
                if isinstance(rec, str):
                    yield "skip", epoch, pos, rec
                else:
                    yield "rec", epoch, pos, (rec, crop_plan(cfg, epoch, sid, rec.width, rec.height))
            yield "end", epoch, lo, None
            if not cfg.train:
                return
            epoch, lo = epoch + 1, 0
    finally:
        reader.close()


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
    """Batches of `loader` (a Loader with backend "dali") from position (start_epoch, start_sample)."""
    cfg, B = loader.cfg, loader.cfg.batch_size
    dec = DaliDecoder(B, cfg.image_size, cfg.num_workers, loader.device, cfg.seed)
    cands: list[tuple[int, Record, CropPlan]] = []  # (pos, record, plan) waiting for a batch
    good = batches = 0

    def decode(epoch):
        """A batch from `cands`, or None after dropping the samples DALI cannot decode (refill then)."""
        nonlocal cands
        items = [(r, w) for _, r, w in cands]
        try:
            images = dec.decode(items)
        except RuntimeError as e:
            bad = set(dec.find_bad(items))
            if not bad:
                raise RuntimeError(f"DALI failed on a batch whose samples decode alone: {e}") from e
            loader._count_skip("corrupt_image", len(bad))
            cands = [c for i, c in enumerate(cands) if i not in bad]
            return None
        batch = loader._finish(epoch, [p for p, _, _ in cands], images, [r.caption for _, r, _ in cands],
                               [r.label for _, r, _ in cands], [r.key for _, r, _ in cands])
        cands = []
        return batch

    for kind, epoch, pos, payload in _Prefetch(_events(loader, start_epoch, start_sample), depth=2 * B):
        if kind == "skip":
            loader._count_skip(payload)
        elif kind == "rec":
            cands.append((pos, *payload))
            if len(cands) == B:
                batch = decode(epoch)
                if batch is not None:
                    good, batches = good + B, batches + 1
                    yield batch
        else:  # end of the epoch's pass; pos = where it started
            while cands and cfg.keep_last:
                n = len(cands)
                batch = decode(epoch)
                if batch is not None:
                    good, batches = good + n, batches + 1
                    yield batch
            if cands and batches == 0:  # no batch this epoch: learn whether anything decodes, for the error
                bad = dec.find_bad([(r, w) for _, r, w in cands])
                if bad:
                    loader._count_skip("corrupt_image", len(bad))
                good += len(cands) - len(bad)
            else:
                good += len(cands)  # fewer than B left: dropped undecoded (drop_last)
            cands = []
            loader._end_epoch(epoch, good, batches, pos)
            good = batches = 0
