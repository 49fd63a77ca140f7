"""Benchmark of the caption loss (issue 15): fused linear + cross-entropy against linear + F.cross_entropy.

    loss = cross_entropy(hidden @ weight.T, target, ignore_index=pad)   hidden (T, D), weight (V, D)
    T = 77 x {128, 256} tokens, D = 1024, V = {32000, 128000}, ~10% padding (seeded)

Providers, side by side: `aimv2` (aimv2.kernels.linear_cross_entropy: no (T, V) tensor), `eager_ref`
(its reference: F.linear, then fp32 F.cross_entropy, the model's impl="torch"), `compile_ref`
(torch.compile(fullgraph=True) of it), and on a GPU `liger` (Liger-Kernel's fused linear-CE) and `cce`
(Apple's cut-cross-entropy) when importable. Passes fwd, bwd (grads of hidden and weight) and fwdbwd.

Every (shape, provider) runs in a fresh subprocess, so one provider's allocations (and its caching
allocator) never colour another's memory:
- GPU (bf16): time by triton.testing.do_bench (median, p20, p80); TFLOP/s counts the useful matmul
  FLOPs (fwd 2TVD, bwd 4TVD) and pct_of_ceiling is over the bf16 matmul TFLOP/s measured in the
  same run; peak_mem_mb is torch.cuda.max_memory_allocated above what was live with the inputs.
- CPU (fp32): one pass each (the Triton kernel runs in the interpreter, far too slow for repeats;
  its times say nothing about speed). peak_mem_mb is the process's peak resident set (VmHWM, reset
  through /proc/self/clear_refs just before the pass) minus its resident set with the inputs
  allocated: the memory the loss itself takes, gradients included, whatever allocated it (torch,
  Inductor's code, the interpreter's tiles). A shape whose eager logits cannot fit in the machine's
  available memory is skipped with the reason printed.

    python benchmarks/bench_text_loss.py                  # GPU: all shapes; CPU: T = 77x128, V = 32000
    python benchmarks/bench_text_loss.py --shapes all     # every shape on the CPU too (needs ~30 GB)
    python benchmarks/bench_text_loss.py --quick          # CPU smoke run, tiny shapes, temp dir

Rows go to benchmarks/results/text_loss-<device>-<date>.json (CONVENTIONS.md schema).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSES = ("fwd", "bwd", "fwdbwd")
SHAPES = [(77 * b, 1024, v) for b in (128, 256) for v in (32000, 128000)]          # (T, D, V)
QUICK_SHAPES = [(77 * 2, 64, 500)]
PROVIDERS = ("aimv2", "eager_ref", "compile_ref", "liger", "cce")
PAD = 1


# ------------------------------------------------------------------ one provider, in a child process
def _loss_fn(provider: str):
    """callable(hidden, weight, target) -> scalar loss, or None when the provider is unavailable."""
    from aimv2.kernels import linear_cross_entropy, linear_cross_entropy_ref
    if provider == "aimv2":
        return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=PAD)
    if provider == "eager_ref":
        return lambda h, w, t: linear_cross_entropy_ref(h, w, t, ignore_index=PAD)
    if provider == "compile_ref":
        return torch.compile(lambda h, w, t: linear_cross_entropy_ref(h, w, t, ignore_index=PAD),
                             fullgraph=True, dynamic=False)
    if not torch.cuda.is_available():
        return None
    try:
        if provider == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, ignore_index=PAD)
        if provider == "cce":
            from cut_cross_entropy import linear_cross_entropy as cce
            return lambda h, w, t: cce(h, w, t, ignore_index=PAD)
    except ImportError:
        return None
    raise ValueError(provider)


def _inputs(T, D, V, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * D ** -0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, V, (T,), generator=g)
    target[torch.rand(T, generator=g) < 0.1] = PAD
    return hidden, weight, target.to(device)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS (Linux >= 4.0)


def _child_cpu(fn, T, D, V, compiled: bool) -> dict:
    """One fwd and one bwd, fp32; peaks in MB above the resident set with the inputs allocated."""
    import gc
    h, w, t = _inputs(T, D, V, torch.float32, "cpu")
    small = _inputs(min(T, 20), D, min(V, 300), torch.float32, "cpu")
    torch.autograd.grad(fn(*small), small[:2])              # lazy imports, kernel set-up (tiny)
    if compiled:
        torch.autograd.grad(fn(h, w, t), (h, w))            # compile at this shape (dynamic=False)
    del small
    gc.collect()
    base = _rss_kb("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    loss = fn(h, w, t)
    t1 = time.perf_counter()
    fwd_peak = _rss_kb("VmHWM")
    _reset_peak_rss()
    t2 = time.perf_counter()
    grads = torch.autograd.grad(loss, (h, w))
    t3 = time.perf_counter()
    bwd_peak = _rss_kb("VmHWM")
    assert all(torch.isfinite(g).all() for g in grads) and torch.isfinite(loss)
    mb = lambda kb: max(kb - base, 0) / 1024                 # noqa: E731
    return {"ms": {"fwd": (t1 - t0) * 1e3, "bwd": (t3 - t2) * 1e3, "fwdbwd": (t3 - t2 + t1 - t0) * 1e3},
            "peak_mem_mb": {"fwd": mb(fwd_peak), "bwd": mb(bwd_peak), "fwdbwd": mb(max(fwd_peak, bwd_peak))},
            "loss": float(loss), "mem_method": "VmHWM - VmRSS with inputs allocated (fresh process)"}


def _child_gpu(fn, T, D, V) -> dict:
    from _common import bench
    h, w, t = _inputs(T, D, V, torch.bfloat16, "cuda")
    out = {"ms": {}, "ms_p20": {}, "ms_p80": {}, "peak_mem_mb": {},
           "mem_method": "cuda max_memory_allocated above the live inputs"}
    for pass_ in PASSES:
        if pass_ == "fwd":
            f = lambda: fn(h, w, t)                                                  # noqa: E731
        elif pass_ == "fwdbwd":
            f = lambda: torch.autograd.grad(fn(h, w, t), (h, w))                     # noqa: E731
        else:
            loss = fn(h, w, t)
            f = lambda: torch.autograd.grad(loss, (h, w), retain_graph=True)         # noqa: E731
        f()
        torch.cuda.synchronize()
        ms, p20, p80 = bench(f)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        f()
        torch.cuda.synchronize()
        out["ms"][pass_], out["ms_p20"][pass_], out["ms_p80"][pass_] = ms, p20, p80
        out["peak_mem_mb"][pass_] = (torch.cuda.max_memory_allocated() - before) / 2**20
    out["loss"] = float(fn(h, w, t))
    return out


def child_main(provider: str, T: int, D: int, V: int) -> int:
    if not torch.cuda.is_available():            # before aimv2.kernels defines its @triton.jit functions
        os.environ.setdefault("TRITON_INTERPRET", "1")
    fn = _loss_fn(provider)
    if fn is None:
        print(json.dumps({"unavailable": True}))
        return 0
    res = _child_gpu(fn, T, D, V) if torch.cuda.is_available() else _child_cpu(fn, T, D, V, provider == "compile_ref")
    print("RESULT " + json.dumps(res))
    return 0


# ------------------------------------------------------------------ parent: shapes x providers
def _available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_one(provider, T, D, V, timeout_s) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", provider, str(T), str(D), str(V)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        print(f"  {provider}: FAILED (exit {r.returncode}): {r.stderr.strip()[-800:]}")
        return None
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None                                                    # unavailable


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("PROVIDER", "T", "D", "V"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, no compile_ref")
    ap.add_argument("--shapes", default=None, help="'all', or T:D:V[,T:D:V...] (default: see above)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per (shape, provider) process")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them on a GPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp with --quick)")
    args = ap.parse_args(argv)
    if args.child:
        p, T, D, V = args.child
        return child_main(p, int(T), int(D), int(V))
    from _common import finish, load_ceilings, result_file
    cuda = torch.cuda.is_available()
    if args.shapes == "all":
        shapes = SHAPES
    elif args.shapes:
        shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else (SHAPES if cuda else SHAPES[:1])
    providers = [p for p in args.providers.split(",") if not (args.quick and p == "compile_ref")]
    ceilings = load_ceilings(args.ceilings) if cuda or args.ceilings else {}
    dtype = "bf16" if cuda else "fp32"
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    results = result_file("text_loss", args.out, args.quick, ceilings)
    try:
        run_shapes(shapes, providers, cuda, ceilings, dtype, command, args.timeout, emit=results.add)
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


def run_shapes(shapes, providers, cuda, ceilings, dtype, command, timeout_s, emit) -> None:
    """Every (shape, provider) in its own process; emit(row) for each of its passes as measured."""
    from _common import result_row
    for T, D, V in shapes:
        logits_mb = T * V * 4 / 2**20
        avail = _available_mb()
        for provider in providers:
            if not cuda and provider in ("eager_ref", "compile_ref") and avail is not None \
                    and 3.5 * logits_mb > 0.8 * avail:
                print(f"T={T} D={D} V={V} {provider}: skipped, needs ~{3.5 * logits_mb:.0f} MB "
                      f"(3.5 x the fp32 logits), {avail:.0f} MB available")
                continue
            res = run_one(provider, T, D, V, timeout_s)
            if res is None:
                continue
            for pass_ in PASSES:
                ms = res["ms"][pass_]
                flops = (2 if pass_ == "fwd" else 4 if pass_ == "bwd" else 6) * T * V * D
                tflops = flops / (ms * 1e-3) / 1e12
                pct = 100 * tflops / ceilings["bf16_tflops"] if ceilings.get("bf16_tflops") else None
                emit(result_row(
                    op="linear_cross_entropy", pass_=pass_, shape=f"T={T}, D={D}, V={V}", dtype=dtype,
                    provider=provider, ms=ms, ms_p20=res.get("ms_p20", {}).get(pass_),
                    ms_p80=res.get("ms_p80", {}).get(pass_), tflops=tflops, pct_of_ceiling=pct,
                    peak_mem_mb=res["peak_mem_mb"][pass_], command=command,
                    mem_method=res["mem_method"], logits_fp32_mb=logits_mb, loss=res["loss"],
                    interpreter=not cuda and provider == "aimv2"))
                print(f"T={T:6d} D={D} V={V:6d} {pass_:6s} {provider:12s} {ms:11.1f} ms  "
                      f"peak {res['peak_mem_mb'][pass_]:9.1f} MB  loss {res['loss']:.6f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
