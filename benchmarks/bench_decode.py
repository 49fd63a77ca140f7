"""GPU JPEG decode without DALI: torchvision's nvJPEG batch decode as a data backend, in images/s.

Every provider turns B samples of the embedded set (`aimv2 data synth`: 224 x 224 JPEGs q90 in webdataset
shards, rendered on every core, cached under --data-dir) into the training batch, float32 (B, 3, 224, 224)
on the device: the loader's crop plan (augment.crop_plans, train: RandomResizedCrop area (0.4, 1), aspect
(3/4, 4/3), flip p = 0.5), resized to 224 bicubic antialiased, flipped, ImageNet-normalised:

    nvjpeg              the loader's GPU decode path (torch backend on CUDA) in the main process: host read
                        and checks (SampleReader.read, JPEG scan check included, as the loader runs it
                        before an nvJPEG decode), torchvision.io.decode_jpeg(list, device="cuda") of the batch
                        (loader.torchvision_jpeg_decoder), augment.tensor_crop_resize per image, normalise
    nvjpeg_decode_only  the same read and decode alone: where the time goes
    pil                 the loader's CPU path in the main process, 1 thread: read (scan check left to the
                        strict decode), loader.decode_pil (libjpeg-turbo + augment.pil_crop_resize) into uint8
                        (B, 3, 224, 224), moved to the device, normalised there. The CPU reference; without
                        torchvision or CUDA the only provider (the others are skipped with the reason printed).

A batch is timed whole (host read included, synchronised at its end), --batches of them after --warmup;
batches walk the sample ids in order, a new crop epoch on each pass over the set.

Rows (CONVENTIONS.md): op "jpeg_decode", pass "fwd", shape "synth-224px-b<B>", dtype "uint8->fp32",
provider, ms / ms_p20 / ms_p80 per batch, ms_read (the host read's median), images_per_s (timed images over
timed wall time), consumes_images_per_s (the aimv2 row of the newest step-*.json under --step-results: the
AIMv2-L training step this decode must feed; None without one), consumes_from, headroom = images_per_s /
consumes_images_per_s, batch, batches, num_images, pillow, torchvision. nvjpeg rows add max_abs_diff_vs_pil
and mean_abs_diff_vs_pil: nvJPEG's uint8 pixels of the first batch, before cropping, against libjpeg-turbo's
(loader.decode_rgb); above a mean of MAX_MEAN_DIFF levels (or when that decode raises) the nvjpeg providers
are skipped with an error.

    python benchmarks/bench_decode.py              # GPU: 4096 images, B = 64, rows to benchmarks/results
    python benchmarks/bench_decode.py --gpu-quick  # the prepared GPU call: 2048 images, B = 64 and 256
    python benchmarks/bench_decode.py --quick      # smoke run: 64 images, B = 16, rows to a temp dir (~3 s CPU)

NOTE: --gpu-quick is budgeted for < 60 s on an H100 from the CPU machine's timings (2 cores: 25 s for its pil
part and the data set); not yet timed on a GPU. Rows are appended as measured; SIGINT stops the run with
them kept (exit code 130).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROVIDERS = ("nvjpeg", "nvjpeg_decode_only", "pil")
S = 224
MAX_MEAN_DIFF = 3.0   # levels of 255: nvJPEG's IDCT / chroma upsampling differ from libjpeg-turbo's by a few
PROFILES = {"default": dict(num=4096, batch="64", batches=40, warmup=3),
            "quick": dict(num=64, batch="16", batches=3, warmup=1),
            "gpu_quick": dict(num=2048, batch="64,256", batches=20, warmup=3)}
SHARD_SIZE = 128      # 16 shards for --gpu-quick's 2048 images: one per core of the GPU machine's 16


def step_images_per_s(results_dir) -> tuple[float | None, str | None]:
    """(images_per_s, file name) of the provider "aimv2" row of the newest step-*.json in results_dir
    (by the date in its name; rows measured on the CPU ignored), or (None, None)."""
    def date(p: Path) -> str:
        m = re.search(r"(\d{4}-\d{2}-\d{2})\.json$", p.name)
        return m.group(1) if m else ""
    for f in sorted(Path(results_dir).glob("step-*.json"), key=lambda p: (date(p), p.name), reverse=True):
        try:
            rows = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for r in rows if isinstance(rows, list) else []:
            if isinstance(r, dict) and r.get("provider") == "aimv2" and r.get("device") != "cpu" \
                    and r.get("images_per_s") and r.get("preset", "aimv2-large") == "aimv2-large":
                return float(r["images_per_s"]), f.name
    return None, None


def batch_ids(num: int, B: int, k: int) -> tuple[int, list[int]]:
    """(crop epoch, sample ids) of batch k: ids k*B .. k*B + B - 1 modulo num, epoch = passes so far."""
    return k * B // num, [(k * B + j) % num for j in range(B)]


def read_batch(reader, cfg, epoch: int, sids: list[int], **read_kw):
    """(Records, CropPlans) of sids, read and checked by SampleReader.read(**read_kw), plans as the loader draws them."""
    from aimv2.data.augment import crop_plans
    recs = [reader.read(sid, **read_kw) for sid in sids]
    bad = [(sid, r) for sid, r in zip(sids, recs) if isinstance(r, str)]
    if bad:
        raise RuntimeError(f"bench_decode: samples skipped by the reader: {bad[:3]}")
    return recs, crop_plans(cfg, epoch, sids, [(r.width, r.height) for r in recs])


@functools.lru_cache(maxsize=4)
def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255 x ImageNet mean and std, (1, 3, 1, 1) float32 on device (made once: no copy inside a timed batch)."""
    from aimv2.data.config import IMAGENET_MEAN, IMAGENET_STD
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255.0 for v in (IMAGENET_MEAN, IMAGENET_STD))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) pixels in [0, 255] -> float32 (x - 255 mean) / (255 std), as the loader normalises."""
    mean, std = _stats(x.device)
    return x.float().sub_(mean).div_(std)


def pil_batch(recs, plans, device, size: int = S) -> torch.Tensor:
    """Host decode (loader.decode_pil) -> uint8 (B, 3, size, size) -> device -> float32 normalised."""
    from aimv2.data.loader import decode_pil
    u8 = np.empty((len(recs), 3, size, size), np.uint8)  # (B, 3, S, S)
    for i, (rec, plan) in enumerate(zip(recs, plans)):
        decode_pil(rec, plan, size, u8[i])
    return _normalize(torch.from_numpy(u8).to(device))


def nvjpeg_batch(recs, plans, decode, size: int = S, decode_only: bool = False):
    """decode(list of JPEG bytes) -> uint8 (3, H, W) each on the device; then tensor_crop_resize per image and
    normalise: float32 (B, 3, size, size). decode_only: the decoded list."""
    from aimv2.data.augment import tensor_crop_resize
    imgs = decode([r.image for r in recs])
    if decode_only:
        return imgs
    return _normalize(torch.stack([tensor_crop_resize(im, p, size) for im, p in zip(imgs, plans)]))  # (B, 3, S, S)


def gpu_decoder(device: torch.device):
    """(decode, None) when the nvjpeg providers can run on `device` (the loader's torchvision decoder), else
    (None, the reason)."""
    from aimv2.data.loader import torchvision_jpeg_decoder
    decode, why = torchvision_jpeg_decoder(device)
    why = "; ".join(w for w in (why, None if device.type == "cuda" else "needs CUDA") if w)
    return (None, why) if why else (decode, None)


def decode_check(decode, recs) -> dict:
    """max / mean |decode - libjpeg-turbo| in uint8 levels over the whole images of recs (inf: shapes differ)."""
    from aimv2.data.loader import decode_rgb
    got = decode([r.image for r in recs])
    mx, tot, n = 0.0, 0.0, 0
    for img, rec in zip(got, recs):
        ref = torch.from_numpy(decode_rgb(rec)).permute(2, 0, 1)  # (3, H, W)
        if tuple(img.shape) != tuple(ref.shape):
            return {"max_abs_diff_vs_pil": float("inf"), "mean_abs_diff_vs_pil": float("inf")}
        d = (img.cpu().int() - ref.int()).abs()
        mx, tot, n = max(mx, float(d.max())), tot + float(d.sum()), n + d.numel()
    return {"max_abs_diff_vs_pil": mx, "mean_abs_diff_vs_pil": tot / n}


def time_provider(step, reader, cfg, num: int, B: int, warmup: int, batches: int, read_kw: dict, sync) -> dict:
    """Time `batches` batches of step(recs, plans) (read included) after `warmup`: ms / ms_read per batch."""
    times, reads = [], []
    for k in range(warmup + batches):
        t0 = time.perf_counter()
        recs, plans = read_batch(reader, cfg, *batch_ids(num, B, k), **read_kw)
        t1 = time.perf_counter()
        step(recs, plans)
        sync()
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            reads.append((t1 - t0) * 1e3)
    q = sorted(times)
    return {"ms": statistics.median(times), "ms_p20": q[int(0.2 * (len(q) - 1))], "ms_p80": q[int(0.8 * (len(q) - 1))],
            "ms_read": statistics.median(reads), "images_per_s": B * batches / (sum(times) / 1e3)}


def run(args, paths: list[str], device: torch.device, results, consumes: tuple) -> None:
    from _common import result_row
    from aimv2.data import DataConfig
    from aimv2.data.dataset import SampleReader, SampleTable
    from aimv2.data.loader import pillow_info

    cfg = DataConfig(shards=paths, image_size=S, seed=0)  # train mode: the loader's crop ranges and flip
    reader = SampleReader(SampleTable.build(paths), cfg)
    decode, why = gpu_decoder(device)
    tv = getattr(sys.modules.get("torchvision"), "__version__", None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    providers = args.providers.split(",")
    for p in [p for p in providers if p.startswith("nvjpeg") and why]:
        print(f"skip {p}: {why}", flush=True)
    providers = [p for p in providers if p == "pil" or not why]
    common = dict(batches=args.batches, warmup=args.warmup, num_images=args.num, dataset="synth",
                  pillow=pillow_info(), torchvision=tv, consumes_images_per_s=consumes[0], consumes_from=consumes[1])
    for B in [int(b) for b in args.batch.split(",")]:
        check = None
        for p in providers:
            extra = {}
            if p.startswith("nvjpeg"):
                if check is None:
                    try:
                        check = decode_check(decode, read_batch(reader, cfg, *batch_ids(args.num, B, 0))[0])
                        bad = None if check["mean_abs_diff_vs_pil"] <= MAX_MEAN_DIFF else (
                            f"mean |nvJPEG - libjpeg-turbo| = {check['mean_abs_diff_vs_pil']:.2f} levels > "
                            f"{MAX_MEAN_DIFF} on the first batch")
                    except Exception as e:  # noqa: BLE001 - a decoder that fails runs no provider, the rest go on
                        check, bad = {}, f"the decode of the first batch failed: {type(e).__name__}: {e}"
                if bad:
                    print(f"error: {p} B={B}: {bad}; provider skipped", file=sys.stderr, flush=True)
                    continue
                extra = dict(check)
                step = functools.partial(nvjpeg_batch, decode=decode, size=S, decode_only=p.endswith("decode_only"))
                read_kw = {}  # the loader's GPU path: the JPEG scan checked on the host
            else:
                step = functools.partial(pil_batch, device=device, size=S)
                read_kw = {"keep_header": True, "defer_scan_check": True}
            old = torch.get_num_threads()
            torch.set_num_threads(1 if p == "pil" else old)  # pil: the main process's one thread
            try:
                m = time_provider(step, reader, cfg, args.num, B, args.warmup, args.batches, read_kw, sync)
            finally:
                torch.set_num_threads(old)
            headroom = m["images_per_s"] / consumes[0] if consumes[0] else None
            results.add(result_row(op="jpeg_decode", pass_="fwd", shape=f"synth-{S}px-b{B}", dtype="uint8->fp32",
                                   provider=p, ms=m.pop("ms"), ms_p20=m.pop("ms_p20"), ms_p80=m.pop("ms_p80"),
                                   batch=B, **m, headroom=headroom, **common, **extra))
            print(f"{p:18s} B={B:<4d} {results.rows[-1]['ms']:8.2f} ms/batch (read {m['ms_read']:.2f}) "
                  f"{m['images_per_s']:9.1f} img/s" + (f"  headroom x{headroom:.2f}" if headroom else "")
                  + (f"  max|diff| {extra['max_abs_diff_vs_pil']:.0f}" if extra else ""), flush=True)
    reader.close()


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 64)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per provider and batch size (40)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed batches first (3)")
    ap.add_argument("--num", type=int, default=None, help="images in the generated set (4096)")
    ap.add_argument("--data-dir", default=None, help="cache of the generated set (default: a temp dir, removed)")
    ap.add_argument("--step-results", default=str(Path(__file__).resolve().parent / "results"),
                    help="where the step-*.json giving consumes_images_per_s is looked for")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (carried in the rows; not measured)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp dir with --quick)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 64 images, B = 16, 3 batches")
    ap.add_argument("--gpu-quick", action="store_true", help="2048 images, B = 64 and 256, 20 batches")
    args = ap.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "gpu_quick" if args.gpu_quick else "default"]
    for k, v in profile.items():  # a profile's values, unless given on the command line
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    unknown = set(args.providers.split(",")) - set(PROVIDERS)
    if unknown:
        ap.error(f"--providers: unknown {sorted(unknown)}; expected a subset of {','.join(PROVIDERS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench_decode: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    from _common import finish, load_ceilings, result_file
    from aimv2.data.shards import resolve_shards
    from aimv2.data.synth import default_dataset

    results = result_file("decode", args.out, args.quick, load_ceilings(args.ceilings) if args.ceilings else {})
    consumes = step_images_per_s(args.step_results)
    print(f"consumes: {consumes[0]} images/s (aimv2 step row of {consumes[1]})", flush=True)
    try:
        with contextlib.ExitStack() as stack:
            root = Path(args.data_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="aimv2-decode-")))
            t0 = time.perf_counter()   # default_dataset: cached (DONE marker); rendered on every core
            paths = resolve_shards(default_dataset(str(root / f"synth-{S}-{args.num}-s{SHARD_SIZE}"), num=args.num,
                                                   size=S, shard_size=SHARD_SIZE, progress=False))
            print(f"data: {args.num} images in {len(paths)} shards ({time.perf_counter() - t0:.1f} s)", flush=True)
            run(args, paths, torch.device("cuda" if cuda else "cpu"), results, consumes)
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


if __name__ == "__main__":
    sys.exit(main())
