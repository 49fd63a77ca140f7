"""Where the fused kernels' time goes: host overhead vs kernel time, and a tile sweep (GPU).

The first H200 run (`make gpu`, 2026-11-29) timed RMSNorm / SwiGLU / the patch loss at 8-45 % of the
copy bandwidth, behind `torch.compile` of the references, and the forward+backward of RMSNorm at
twice the forward plus the backward. `triton.testing.do_bench` launches from Python, so a 40 us
kernel behind ~100 us of custom-op + autograd dispatch is timed as host-bound. This script separates
the two, in one run, at the AIMv2-L shapes of `bench_kernels.py --gpu-quick`:

1. `timing="host"` vs `timing="graph"`: every (provider, pass) of aimv2 and compile_ref timed both
   ways; "graph" replays the calls from a CUDA graph (`triton.testing.do_bench_cudagraph`), which
   removes the Python dispatch and leaves the device time.
2. `provider="aimv2[...]"`: the launchers alone (no autograd, no custom-op boundary) under CUDA
   graphs for a grid of tile shapes (rows per program, columns per program, warps), the current
   choice marked `default=True`.

Rows: benchmarks/results/tune_kernels-<device>-<date>.json (or --out), appended as measured.
CPU smoke run (interpreter, tiny shapes, wall-clock timing, numbers meaningless): --quick.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (BLOCK_M rows, BLOCK_N columns (None: the whole row), num_warps)
_RMS_FWD = [(1, None, 4), (2, None, 4), (4, None, 4), (4, None, 8), (8, None, 8), (16, None, 16)]
_RMS_BWD = [(1, None, 4), (2, None, 4), (2, None, 8), (4, None, 8), (8, None, 16)]
_SWIGLU = [(1, 2048, 8), (2, 1024, 4), (4, 1024, 8), (8, 1024, 8), (16, 1024, 16), (8, 512, 4),
           (16, 512, 8), (32, 256, 8)]


def _graph_bench(fn) -> tuple[float, float, float]:
    import triton.testing
    q = triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=[0.5, 0.2, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def _timer(timing: str):
    from _common import bench
    if timing == "graph" and torch.cuda.is_available():
        return _graph_bench
    return bench


def provider_rows(case, ceilings, command, emit, log=print) -> None:
    """aimv2 and compile_ref, every pass, timed from the host and from a CUDA graph."""
    from bench_kernels import PASSES, _pass_fn
    timings = ("host", "graph") if torch.cuda.is_available() else ("host",)
    for provider in ("aimv2", "compile_ref"):
        fn = case.providers.get(provider)
        if fn is None:
            continue
        for pass_ in PASSES:
            for timing in timings:
                try:
                    f = _pass_fn(case, fn, pass_)
                    f()
                    ms, p20, p80 = _timer(timing)(f)
                except Exception as e:                                  # noqa: BLE001 a row says why
                    log(f"  {case.op:18s} {pass_:6s} {provider:12s} {timing:5s} FAILED: {type(e).__name__}: {e}")
                    continue
                _emit(emit, log, case.op, case.shape, case.dtype, pass_, provider, ms, p20, p80,
                      case.bytes[pass_], ceilings, command, timing=timing)


def _emit(emit, log, op, shape, dtype, pass_, provider, ms, p20, p80, nbytes, ceilings, command, **extra):
    from _common import result_row
    gbps = nbytes / (ms * 1e-3) / 1e9
    pct = 100 * gbps / ceilings["copy_gbps"] if ceilings.get("copy_gbps") else None
    emit(result_row(op=op, pass_=pass_, shape=shape, dtype=dtype, provider=provider, ms=ms, ms_p20=p20,
                    ms_p80=p80, gbps=gbps, pct_of_ceiling=pct, command=command, min_bytes=nbytes, **extra))
    log(f"  {op:18s} {shape:16s} {pass_:4s} {provider:34s} {extra.get('timing', ''):5s} {ms:8.4f} ms "
        f"{gbps:8.1f} GB/s" + (f" {pct:5.1f}%" if pct is not None else ""))


def _sweep(module, configs, default, launch, name, op, shape, pass_, nbytes, ceilings, command, emit, log,
           full_cols):
    """Time `launch()` under each tile config by swapping the module's `_tiles` for the run."""
    from aimv2.kernels._utils import Tiles
    real = module._tiles
    seen = set()
    try:
        for bm, bn, w in [default] + list(configs):
            t = Tiles(bm, bn if bn is not None else full_cols, w)
            key = (t.block_m, t.block_n, t.num_warps)
            if key in seen:
                continue
            seen.add(key)
            module._tiles = lambda *a, **k: t                                   # noqa: B023
            try:
                launch()
                ms, p20, p80 = _timer("graph")(launch)
            except Exception as e:                                              # noqa: BLE001
                log(f"  {op} {pass_} {key} FAILED: {type(e).__name__}: {e}")
                continue
            _emit(emit, log, op, shape, "bf16", pass_, f"{name}[m={t.block_m},n={t.block_n},w={t.num_warps}]",
                  ms, p20, p80, nbytes, ceilings, command, kernel_only=True,
                  timing="graph" if torch.cuda.is_available() else "host",
                  default=len(seen) == 1, block_m=t.block_m, block_n=t.block_n, num_warps=t.num_warps)
    finally:
        module._tiles = real


def sweep_rows(M, D, H, device, ceilings, command, emit, log=print, quick=False) -> None:
    import importlib

    import triton
    RN = importlib.import_module("aimv2.kernels.rms_norm")     # the modules (the package exports the ops)
    SW = importlib.import_module("aimv2.kernels.swiglu")
    dt = torch.bfloat16
    nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts)             # noqa: E731
    x, r, dout, ds = (torch.randn(M, D, device=device, dtype=dt) for _ in range(4))
    w = 1 + 0.1 * torch.randn(D, device=device)
    _, s, rstd = RN._fwd_launch(x, w, r, 1e-5)
    cols = triton.next_power_of_2(D)
    d_f = d_b = RN._tiles(D)
    few = slice(0, 2) if quick else slice(None)
    _sweep(RN, _RMS_FWD[few], (d_f.block_m, None, d_f.num_warps), lambda: RN._fwd_launch(x, w, r, 1e-5),
           "aimv2", "rms_norm_residual", f"({M}, {D})", "fwd", nb(x, r, x, x), ceilings, command, emit, log, cols)
    _sweep(RN, _RMS_BWD[few], (d_b.block_m, None, d_b.num_warps),
           lambda: RN._bwd_launch(dout, ds, s, w, rstd, dt, dt),
           "aimv2", "rms_norm_residual", f"({M}, {D})", "bwd", nb(dout, ds, x, x), ceilings, command, emit,
           log, cols)
    del x, r, dout, ds, s
    g, u, do = (torch.randn(M, H, device=device, dtype=dt) for _ in range(3))
    d_s = SW._tiles(H)
    _sweep(SW, _SWIGLU[few], (d_s.block_m, d_s.block_n, d_s.num_warps), lambda: SW._fwd_launch(g, u),
           "aimv2", "swiglu", f"({M}, {H})", "fwd", nb(g, u, g), ceilings, command, emit, log, None)
    _sweep(SW, _SWIGLU[few], (d_s.block_m, d_s.block_n, d_s.num_warps), lambda: SW._bwd_launch(do, g, u),
           "aimv2", "swiglu", f"({M}, {H})", "bwd", nb(do, g, u, g, u), ceilings, command, emit, log, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, interpreter")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp with --quick)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("tune_kernels: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench_kernels import make_cases
    from _common import finish, load_ceilings, result_file
    device = torch.device("cuda" if cuda else "cpu")
    ceilings = load_ceilings(args.ceilings) if cuda or args.ceilings else {}
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    results = result_file("tune_kernels", args.out, args.quick, ceilings)
    try:
        for build in make_cases(["rms_norm", "swiglu", "patch_l2_loss"], device, args.quick, cuda,
                                gpu_quick=True):
            provider_rows(build(), ceilings, command, results.add)
            if cuda:
                torch.cuda.empty_cache()
        M, D, H = (64, 96, 96) if args.quick else (128 * 256, 1024, 2816)
        sweep_rows(M, D, H, device, ceilings, command, results.add, quick=args.quick)
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


if __name__ == "__main__":
    sys.exit(main())
