"""Data-loader throughput at 224 px: images/s for DALI CPU, DALI GPU (when CUDA) and the torch backend.

Each provider runs the real training loader (`aimv2.data.build_loader`, train mode: index, read,
pre-decode checks, decode, random resized crop, flip, normalise, tokenise, prefix lengths) over the
same shards, for each thread / worker count, and times `--batches` batches after `--warmup` batches:

    dali_cpu   backend="dali", device="cpu"   (num_workers = DALI CPU threads)
    dali_gpu   backend="dali", device="cuda"  (nvJPEG "mixed" decode; needs CUDA)
    torch      backend="torch", device="cpu" or "cuda" (num_workers = DataLoader processes)

What a training GPU needs: aimv2-large trains at `flops_per_sample` = 822 GFLOP per image (SPEC
recipe, prefix mask), so an H100 at 40% of its 989 TFLOP/s bf16 peak consumes ~480 images/s; each
row carries `needed_images_per_s` and `pct_of_ceiling` = images/s / needed * 100.

    python benchmarks/bench_data.py                       # synthetic 224 px shards in a temp dir
    python benchmarks/bench_data.py --shards 'data/{00000..00009}.tar' --threads 1,2,4,8 --batches 50
    python benchmarks/bench_data.py --quick                # CPU smoke run, results to a temp dir

Rows (CONVENTIONS.md schema): op "decode", pass "fwd", ms = median ms per batch, plus
`images_per_s`, `threads`. Written to benchmarks/results/data-<device>-<date>.json on a GPU or with
--out; a CPU run without --out writes into a temporary directory.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result_row, write_results  # noqa: E402

from aimv2.data import DataConfig, build_loader, dali_available  # noqa: E402
from aimv2.data.synth import write_synthetic_dataset  # noqa: E402

H100_BF16_PEAK = 989e12
MFU = 0.4


def needed_images_per_s(preset: str = "aimv2-large") -> float:
    """Images/s one H100 consumes training `preset` at 40% MFU."""
    from aimv2.model import flops_per_sample
    from aimv2.presets import get_preset

    return MFU * H100_BF16_PEAK / flops_per_sample(get_preset(preset))


def measure(shards: str, provider: str, threads: int, batch: int, batches: int, warmup: int) -> dict:
    backend, device = {"dali_cpu": ("dali", "cpu"), "dali_gpu": ("dali", "cuda"),
                       "torch": ("torch", "cpu"), "torch_gpu": ("torch", "cuda")}[provider]
    cfg = DataConfig(shards=shards, image_size=224, batch_size=batch, backend=backend, device=device,
                     num_workers=threads, shuffle_buffer=1000, seed=0)
    loader = build_loader(cfg)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    times = []
    t_all = time.perf_counter()
    for _ in range(batches):
        t0 = time.perf_counter()
        b = next(it)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    total = time.perf_counter() - t_all
    del b, it
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8),
            "images_per_s": batch * batches / total}


def run(args) -> Path | None:
    tmp = tempfile.mkdtemp(prefix="aimv2-bench-data-")
    shards = args.shards
    if shards is None:
        out = Path(tmp) / "synth"
        paths = write_synthetic_dataset(str(out), num=args.num, size=224, seed=0, shard_size=max(1, args.num // 4),
                                        progress=False)
        shards = [str(p) for p in paths]
    providers = ["torch"]
    if dali_available():
        providers.insert(0, "dali_cpu")
        if torch.cuda.is_available():
            providers.insert(1, "dali_gpu")
    if torch.cuda.is_available():
        providers.append("torch_gpu")
    if args.providers:
        providers = [p for p in args.providers.split(",") if p in providers]
    need = needed_images_per_s()
    rows = []
    for provider in providers:
        for t in [int(x) for x in args.threads.split(",")]:
            r = measure(shards, provider, t, args.batch, args.batches, args.warmup)
            print(f"{provider:9s} threads={t:2d}  {r['images_per_s']:8.1f} img/s  ({r['ms']:.1f} ms/batch of {args.batch})"
                  f"  {100 * r['images_per_s'] / need:5.1f}% of the {need:.0f} img/s an H100 needs for aimv2-large")
            rows.append(result_row(op="decode", pass_="fwd", shape=f"B={args.batch},S=224,threads={t}", dtype="float32",
                                   provider=provider, ms=r["ms"], ms_p20=r["ms_p20"], ms_p80=r["ms_p80"],
                                   pct_of_ceiling=100 * r["images_per_s"] / need, images_per_s=r["images_per_s"],
                                   threads=t, needed_images_per_s=need, cpu_cores=_cores()))
    out_dir = args.out if args.out else (None if torch.cuda.is_available() else tmp)
    path = write_results(rows, "data", out_dir=out_dir)
    print(f"results: {path}")
    return path


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=None, help="shards to read (default: synthesise --num images at 224 px)")
    p.add_argument("--num", type=int, default=512)
    p.add_argument("--threads", default="1,2", help="comma-separated thread / worker counts")
    p.add_argument("--providers", default=None, help="subset of dali_cpu,dali_gpu,torch,torch_gpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results on a GPU)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.batch, args.batches, args.warmup, args.threads = 96, 16, 3, 1, "1"
    return args


# ------------------------------------------------------------------ pytest-benchmark harness
try:
    import pytest
except ImportError:  # the CLI does not need pytest
    pytest = None

if pytest is not None:
    _PROVIDERS = ["torch"] + (["dali_cpu"] if dali_available() else []) + (
        ["dali_gpu", "torch_gpu"] if torch.cuda.is_available() and dali_available() else [])

    @pytest.fixture(scope="module")
    def _shards(tmp_path_factory):
        """Small synthetic 224 px shards (runs on the CPU too: the loader is CPU work)."""
        out = tmp_path_factory.mktemp("bench-data")
        return [str(p) for p in write_synthetic_dataset(str(out), num=128, size=224, shard_size=32, progress=False)]

    @pytest.mark.parametrize("provider", _PROVIDERS)
    def test_data_benchmark(benchmark, _shards, provider, tmp_path):
        backend, device = {"dali_cpu": ("dali", "cpu"), "dali_gpu": ("dali", "cuda"),
                           "torch": ("torch", "cpu"), "torch_gpu": ("torch", "cuda")}[provider]
        loader = build_loader(DataConfig(shards=_shards, image_size=224, batch_size=16, backend=backend,
                                         device=device, num_workers=2, seed=0))
        it = iter(loader)
        next(it)
        batch = benchmark.pedantic(lambda: next(it), rounds=4, warmup_rounds=1)
        assert batch["images"].shape == (16, 3, 224, 224)
        ms = benchmark.stats.stats.median * 1e3
        row = result_row(op="decode", pass_="fwd", shape="B=16,S=224,threads=2", dtype="float32", provider=provider,
                         ms=ms, images_per_s=16e3 / ms, threads=2, command="pytest benchmarks/bench_data.py")
        benchmark.extra_info["rows"] = [row]
        write_results([row], f"data-{provider}", out_dir=tmp_path)


if __name__ == "__main__":
    run(parse())
