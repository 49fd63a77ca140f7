"""The input pipeline against its peers: images/s and CPU-seconds per image, interleaved, at 224 px.

Every provider does the same work per image: read the sample (jpg + txt) from webdataset shards,
shuffle (buffer 1000), decode, RandomResizedCrop (area (0.4, 1), aspect (3/4, 4/3)) to 224 x 224
bicubic antialiased, horizontal flip p = 0.5, ImageNet normalise to float32 (B, 3, 224, 224), B = 64:

    aimv2        backend "torch" (provider aimv2, backend torch) and "dali" on the CPU (backend dali_cpu):
                 `aimv2.data.build_loader`, train mode (also checks, tokenises, draws prefix lengths)
    webdataset   the `webdataset` library: WebDataset(resampled) -> shuffle -> decode("pil") -> crop /
                 flip / normalise per sample (PIL + numpy + torch, as torchvision's transforms do) ->
                 batched(64) in torch DataLoader workers
    dali_reader  DALI's own pipeline: fn.readers.webdataset (random_shuffle, initial_fill 1000) ->
                 fn.decoders.image_random_crop (ROI decode) -> fn.resize (cubic, antialias) ->
                 fn.crop_mirror_normalize (coin-flip mirror); outputs copied into torch tensors

on two sets: "synth" (the embedded dataset, `aimv2 data synth`, 224 x 224 JPEGs q90) and "photos"
(500 x 375 photo-like JPEGs q90, ~47 KB: smooth multi-scale noise, shapes and grain, generated here
deterministically), at each worker / thread count. Peers are optional imports, skipped with a reason
(`pip install -e .[bench]` installs webdataset; DALI: `.[dali-cu13]`).

Fairness: each cell (provider x set x workers) runs in a fresh process, `--repeats` times, the cells'
order rotated between repeats (interleaved: a load change on a shared machine hits every provider),
and the median is reported. A cell times `--batches` batches after `--warmup` batches; CPU-seconds
come from /proc (the process and its DataLoader workers, all threads). Rows are appended as measured:
one per cell run (`repeat` = 0, 1, ...), then one median row per cell (`repeat` = "median") with
`ratio_to_best_peer` (images/s over the best peer's at the same set and worker count).

    python benchmarks/bench_data.py --out benchmarks/results       # the committed CPU table (~10 min)
    python benchmarks/bench_data.py --quick                         # smoke run, rows to a temp dir (< 60 s)

    python benchmarks/bench_data.py --native --out benchmarks/results  # native-resolution mode rows

--native times aimv2's native-resolution mode alone (no peer has one): the same crops, each resized to
its own patch grid of 256..1024 patches (aspect ratio kept) and packed greedily into batches of at most
--tokens (16384) patches; providers aimv2_torch_native / aimv2_dali_native (backend "torch_native" /
"dali_cpu_native"), shape "set=...,tokens=16384,patches=256..1024,workers=...".

Rows (CONVENTIONS.md): op "data", pass "fwd", shape "set=...,B=64,S=224,workers=...", provider, ms = ms
per batch, images_per_s, tokens_per_s (patches; 256 per image at 224 px), batches_per_s,
cpu_s_per_image, cores_busy, load_avg (1-minute load at the cell's start), pillow (version,
Pillow-SIMD or not).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ResultFile, result_row  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE, RATIO, S = (0.4, 1.0), (3 / 4, 4 / 3), 224
PROVIDERS = ("aimv2_torch", "aimv2_dali", "webdataset", "dali_reader")
GPU_PROVIDERS = ("aimv2_dali_gpu", "aimv2_torch_gpu")  # nvJPEG through DALI "mixed" / torchvision (CUDA only)
PEERS = ("webdataset", "dali_reader")
NATIVE_PROVIDERS = ("aimv2_torch_native", "aimv2_dali_native")  # --native: aimv2's native-resolution mode
MIN_PATCHES, MAX_PATCHES = 256, 1024


# ---- data sets -------------------------------------------------------------------------------------
def photo_jpeg(i: int, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """A photo-like JPEG (~47 KB at 500 x 375 q90), a pure function of i: smooth noise at three scales
    (cells of 64, 16 and 4 px, bicubic-upsampled), six filled ellipses / rectangles, and grain."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1000 + i)
    acc = np.zeros((height, width, 3), np.float32)
    for cell, amp in ((64, 90.0), (16, 40.0), (4, 12.0)):
        small = rng.normal(0, 1, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        acc += amp * np.stack([np.asarray(Image.fromarray(small[..., c], mode="F").resize((width, height), Image.BICUBIC))
                               for c in range(3)], -1)
    acc += rng.uniform(60, 190, 3).astype(np.float32)
    im = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    grain = np.asarray(im).astype(np.float32) + rng.normal(0, 3, (height, width, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_photo_shard(args) -> str:
    path, lo, hi = args
    with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(lo, hi):
            for ext, data in (("jpg", photo_jpeg(i)), ("txt", f"a photo-like picture number {i}".encode()),
                              ("json", json.dumps({"label": i % 10}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    os.replace(path + ".tmp", path)
    return path


def make_sets(root: Path, num: int, shards: int) -> dict[str, list[str]]:
    """{"synth": tars, "photos": tars} under root (cached: a set whose shards exist is reused), with the
    DALI index files (wds2idx) next to them for dali_reader."""
    from aimv2.data.shards import index_shard, write_dali_index
    from aimv2.data.synth import write_synthetic_dataset

    per = max(1, num // shards)
    synth = root / f"synth-{num}"
    if not (synth / f"{shards - 1:05d}.tar").exists():
        write_synthetic_dataset(str(synth), num=num, size=224, seed=0, shard_size=per, progress=False)
    photos = root / f"photos-{num}"
    photos.mkdir(parents=True, exist_ok=True)
    jobs = [(str(photos / f"{s:05d}.tar"), s * per, min(num, (s + 1) * per)) for s in range(shards)]
    todo = [j for j in jobs if not os.path.exists(j[0])]
    if todo:
        with ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1)) as ex:
            list(ex.map(_write_photo_shard, todo))
    sets = {"synth": sorted(str(p) for p in synth.glob("*.tar")), "photos": [j[0] for j in jobs]}
    for tars in sets.values():
        for t in tars:
            if not os.path.exists(_idx(t)):
                write_dali_index(index_shard(t), _idx(t))  # what `aimv2 data index --dali` writes
    return sets


def _idx(tar: str) -> str:
    return os.path.splitext(tar)[0] + ".idx"


def _dali_ok() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def skip_reason(provider: str) -> str | None:
    """Why `provider` cannot run here (None when it can)."""
    if provider in ("aimv2_dali", "dali_reader", "aimv2_dali_native") and not _dali_ok():
        return "nvidia-dali is not importable (pip install -e .[dali-cu13])"
    if provider in GPU_PROVIDERS:
        import torch
        if not torch.cuda.is_available():
            return "needs CUDA"
        if provider == "aimv2_dali_gpu" and not _dali_ok():
            return "nvidia-dali is not importable (pip install -e .[dali-cu13])"
    if provider == "webdataset" and importlib.util.find_spec("webdataset") is None:
        return "webdataset is not importable (pip install -e .[bench])"
    return None


# ---- one cell: a provider's batches, timed --------------------------------------------------------
def _tree_cpu_s() -> float:
    """CPU-seconds (user + system, every thread) of this process and all its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    keep, total = {os.getpid()}, 0.0
    changed = True
    while changed:
        changed = False
        for pid, pp in parent.items():
            if pp in keep and pid not in keep:
                keep.add(pid)
                changed = True
    return sum(cpu.get(p, 0.0) for p in keep)


def _rrc_box(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (x, y, w, h)."""
    area = width * height
    log_r = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_r))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def _webdataset_batches(tars: list[str], workers: int, batch: int):
    import torch
    import webdataset as wds
    from PIL import Image

    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    rng = random.Random(0)

    def augment(sample):
        im, caption = sample
        x, y, w, h = _rrc_box(rng, *im.size)
        im = im.resize((S, S), Image.BICUBIC, box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255)  # ToTensor
        return t.sub_(mean).div_(std), caption                                           # Normalize

    ds = (wds.WebDataset(tars, resampled=True, shardshuffle=False, nodesplitter=None)
          .shuffle(1000).decode("pil").to_tuple("jpg", "txt").map(augment).batched(batch, partial=False))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                            prefetch_factor=4 if workers else None))


def _dali_reader_batches(tars: list[str], workers: int, batch: int):
    import torch
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    @pipeline_def(batch_size=batch, num_threads=max(1, workers), device_id=None, seed=0)
    def pipe():
        jpg, txt = fn.readers.webdataset(paths=tars, index_paths=[_idx(t) for t in tars], ext=["jpg", "txt"],
                                         random_shuffle=True, initial_fill=1000, name="reader")
        img = fn.decoders.image_random_crop(jpg, device="cpu", output_type=types.RGB, random_area=list(SCALE),
                                            random_aspect_ratio=list(RATIO), num_attempts=10)
        img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.crop_mirror_normalize(img, mirror=fn.random.coin_flip(), dtype=types.FLOAT, output_layout="CHW",
                                       mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])
        return img, txt

    p = pipe()
    p.build()
    while True:
        img, txt = p.run()
        t = img.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32)
        feed_ndarray(t, out)
        yield out, [np.array(x).tobytes().decode() for x in txt]


def _aimv2_batches(tars: list[str], workers: int, batch: int, backend: str, device: str = "cpu", tokens: int = 0):
    """aimv2's loader; tokens > 0: native mode, packed batches of at most `tokens` patches."""
    from aimv2.data import DataConfig, build_loader

    native = dict(native=True, min_patches=MIN_PATCHES, max_patches=MAX_PATCHES, tokens_per_batch=tokens) if tokens else {}
    cfg = DataConfig(shards=tars, image_size=S, batch_size=batch, backend=backend, device=device,
                     num_workers=workers, shuffle_buffer=1000, seed=0, crop_scale=SCALE, crop_ratio=RATIO, **native)
    return iter(build_loader(cfg))


def run_cell(provider: str, tars: list[str], workers: int, batch: int, batches: int, warmup: int,
             tokens: int = 16384) -> dict:
    """Time `batches` batches of `provider` after `warmup` (this process and its workers)."""
    if provider in NATIVE_PROVIDERS:
        it = _aimv2_batches(tars, workers, batch, provider.split("_")[1], tokens=tokens)
    elif provider == "aimv2_torch":
        it = _aimv2_batches(tars, workers, batch, "torch")
    elif provider == "aimv2_dali":
        it = _aimv2_batches(tars, workers, batch, "dali")
    elif provider in GPU_PROVIDERS:
        it = _aimv2_batches(tars, workers, batch, provider.split("_")[1], "cuda")
    elif provider == "webdataset":
        it = _webdataset_batches(tars, workers, batch)
    else:
        it = _dali_reader_batches(tars, workers, batch)
    for _ in range(warmup):
        next(it)
    load = os.getloadavg()[0]
    cpu0, t0 = _tree_cpu_s(), time.perf_counter()
    times, n, tokens_seen = [], 0, 0
    for _ in range(batches):
        t = time.perf_counter()
        b = next(it)
        if provider in GPU_PROVIDERS:
            import torch
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
        if provider in NATIVE_PROVIDERS:  # a PackedBatch
            assert b.num_tokens <= tokens and b.patches.shape[1] == 14 * 14 * 3, (b.num_tokens, b.patches.shape)
            n, tokens_seen = n + b.num_images, tokens_seen + b.num_tokens
        else:
            images = b["images"] if isinstance(b, dict) else b[0]
            assert tuple(images.shape) == (batch, 3, S, S), images.shape
            n, tokens_seen = n + batch, tokens_seen + batch * (S // 14) ** 2
    wall, cpu = time.perf_counter() - t0, _tree_cpu_s() - cpu0
    times.sort()
    return {"images_per_s": n / wall, "tokens_per_s": tokens_seen / wall, "batches_per_s": batches / wall, "cpu_s_per_image": cpu / n, "cores_busy": cpu / wall,
            "ms": statistics.median(times), "ms_p20": times[int(0.2 * (len(times) - 1))],
            "ms_p80": times[int(0.8 * (len(times) - 1))], "load_avg": load}


# ---- the run: cells in fresh processes, interleaved -----------------------------------------------
def _cell_in_fresh_process(args, provider, tars, workers) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", provider, "--workers", str(workers),
           "--batch", str(args.batch), "--batches", str(args.batches), "--warmup", str(args.warmup),
           "--tokens", str(args.tokens), "--shards", *tars]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout)
    if r.returncode != 0:
        raise RuntimeError(f"cell {provider} workers={workers} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(args) -> ResultFile:
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="aimv2-bench-data-"))
    sets = make_sets(root, args.num, args.shards_per_set)
    sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    out = args.out or (tempfile.mkdtemp(prefix="aimv2-bench-") if args.quick else None)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    from aimv2.data.loader import pillow_info

    results = ResultFile("data", out, extra={"uptime_at_start": uptime, "pillow": pillow_info(),
                                             "cpu_cores": len(os.sched_getaffinity(0))})
    if args.providers:
        providers = args.providers.split(",")
    elif args.native:
        providers = list(NATIVE_PROVIDERS)
    else:
        providers = list(PROVIDERS) + [p for p in GPU_PROVIDERS if skip_reason(p) != "needs CUDA"]
    for p in providers:
        why = skip_reason(p)
        if why:
            print(f"skip {p}: {why}", flush=True)
            results.add(_row(p, "-", 0, None, repeat="skipped", skipped=why))
    providers = [p for p in providers if skip_reason(p) is None]
    workers = [int(w) for w in args.workers.split(",")]
    cells = [(name, w, p) for name in sets for w in workers for p in providers]
    got: dict[tuple, list[dict]] = {c: [] for c in cells}
    for r in range(args.repeats):
        k = r % len(providers)
        order = [(n, w, providers[(providers.index(p) + k) % len(providers)]) for n, w, p in cells]  # rotated
        for name, w, p in order:
            m = _cell_in_fresh_process(args, p, sets[name], w)
            got[(name, w, p)].append(m)
            print(f"repeat {r} {name:6s} workers={w} {p:12s} {m['images_per_s']:7.1f} img/s "
                  f"{m['tokens_per_s']:8.0f} tokens/s "
                  f"{1e3 * m['cpu_s_per_image']:6.2f} CPU-ms/img {m['cores_busy']:4.2f} cores "
                  f"(load {m['load_avg']:.2f})", flush=True)
            results.add(_row(p, name, w, m, repeat=r, batch=args.batch, tokens=args.tokens))
    for name in sets:
        for w in workers:
            med = {p: {key: statistics.median(m[key] for m in got[(name, w, p)]) for key in got[(name, w, p)][0]}
                   for p in providers}
            best_peer = max((med[p]["images_per_s"] for p in providers if p in PEERS), default=None)
            for p in providers:
                ratio = med[p]["images_per_s"] / best_peer if best_peer else None
                results.add(_row(p, name, w, med[p], repeat="median", batch=args.batch, ratio_to_best_peer=ratio,
                                 repeats=args.repeats, tokens=args.tokens))
                print(f"median {name:6s} workers={w} {p:12s} {med[p]['images_per_s']:7.1f} img/s "
                      f"{1e3 * med[p]['cpu_s_per_image']:6.2f} CPU-ms/img"
                      + (f"  x{ratio:.2f} of the best peer" if ratio else ""), flush=True)
    results.add(_row("-", "-", 0, None, repeat="end", uptime_at_end=subprocess.run(
        ["uptime"], capture_output=True, text=True).stdout.strip()))
    print(f"wrote {len(results.rows)} rows to {results.path}")
    return results


def _row(provider: str, name: str, workers: int, m: dict | None, batch: int = 64, tokens: int = 0, **extra) -> dict:
    native = provider in NATIVE_PROVIDERS
    provider, backend = {"aimv2_torch": ("aimv2", "torch"), "aimv2_dali": ("aimv2", "dali_cpu"),
                         "aimv2_dali_gpu": ("aimv2", "dali_gpu"), "aimv2_torch_gpu": ("aimv2", "torch_gpu"),
                         "aimv2_torch_native": ("aimv2", "torch_native"),
                         "aimv2_dali_native": ("aimv2", "dali_cpu_native")}.get(provider, (provider, None))
    m = dict(m or {})
    ms = m.pop("ms", None)
    shape = (f"set={name},tokens={tokens},patches={MIN_PATCHES}..{MAX_PATCHES},workers={workers}" if native
             else f"set={name},B={batch},S={S},workers={workers}")
    return result_row(op="data", pass_="fwd", shape=shape, dtype="float32",
                      provider=provider, ms=ms, ms_p20=m.pop("ms_p20", None), ms_p80=m.pop("ms_p80", None),
                      backend=backend, dataset=name, workers=workers, **m, **extra)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--providers", default=None, help=f"subset of {','.join(PROVIDERS + GPU_PROVIDERS)} "
                   "(default: all; the GPU ones only with CUDA)")
    p.add_argument("--sets", default="synth,photos")
    p.add_argument("--workers", default="1,2", help="comma-separated worker / thread counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num", type=int, default=1024, help="images per set")
    p.add_argument("--shards-per-set", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=24, help="timed batches per cell (24 x 64 = 1,536 images)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--cell-timeout", type=int, default=300)
    p.add_argument("--data-dir", default=None, help="where the two sets are generated (cached; default: a temp dir)")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results; --quick: a temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sets, 1 worker, 1 repeat")
    p.add_argument("--native", action="store_true", help="time aimv2's native-resolution mode instead "
                   f"({', '.join(NATIVE_PROVIDERS)}: patches {MIN_PATCHES}..{MAX_PATCHES}, packed by --tokens)")
    p.add_argument("--tokens", type=int, default=16384, help="--native: tokens_per_batch")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    p.add_argument("--shards", nargs="*", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.shards_per_set, args.batch, args.batches, args.warmup = 48, 2, 8, 2, 1
        args.workers, args.repeats = "1", 1
        args.tokens = min(args.tokens, 4096)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.cell:
        m = run_cell(args.cell, args.shards, int(args.workers), args.batch, args.batches, args.warmup, args.tokens)
        print(json.dumps(m), flush=True)
        os._exit(0)  # DataLoader workers / DALI threads: leave without running their teardown
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
