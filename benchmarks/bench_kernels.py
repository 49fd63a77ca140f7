"""Benchmarks of the fused kernels (issue 3): RMSNorm (+ residual), SwiGLU, the patch l2 loss.

Each op forward, backward and forward+backward at AIMv2 training shapes, bf16, side by side with
the eager reference (`eager_ref`), `torch.compile` of the reference (`compile_ref`), and Liger-Kernel
(`liger`) / apex (`apex`) where importable and applicable:

    rms_norm       x (128*256, D), D in 1024, 1536, 2048, 3072; fp32 weight; with and without a bf16
                   residual (out, s = x + residual)
    swiglu         gate, up (128*256, H), H in 2816, 8192, contiguous (the model's fc1 / fc3 outputs)
    patch_l2_loss  pred (128, 256, 588) bf16, images (128, 3, 224, 224) fp32, patch 14, prefix
                   lengths uniform in [1, N-1] per image (seeded)
    patch_l2_loss_packed  the same 32768 tokens as a native pack (method.md §8): 128 images of seeded
                   random grids with 64..512 patches, pred (T, 588) bf16, patches (T, 588) fp32, prefix
                   uniform in [1, N_s-1]; not in --gpu-quick (`--ops patch_l2_loss_packed`)

Timing: `triton.testing.do_bench` (median, p20, p80). Backward times `torch.autograd.grad` on a
retained graph; forward runs with autograd recording (as in training). GB/s counts the minimum
bytes: every input read once and every output written once (backward: grad_out and the saved
inputs read, the input grads written; parameters' few bytes ignored; the loss: only counted pairs'
pred rows and target patches are read, d_pred is written whole). pct_of_ceiling is GB/s over the
copy bandwidth measured in the same run; peak_mem_mb the memory a call allocates above its inputs.

Run on a GPU (one command; rows go to benchmarks/results/kernels-<device>-<date>.json):

    python benchmarks/bench_kernels.py                    # all ops, all providers
    python benchmarks/bench_kernels.py --ops rms_norm     # a subset
    python benchmarks/bench_kernels.py --gpu-quick        # `make gpu`: AIMv2-L shapes (D=1024 with and
                                                          # without residual, H=2816, the loss) only
    pytest benchmarks/bench_kernels.py                    # the same through pytest-benchmark

CPU smoke run (tiny shapes, Triton interpreter, aimv2 + eager_ref only; results to a temp dir unless
--out is given; the numbers mean nothing):

    python benchmarks/bench_kernels.py --quick

Each row is appended to the result file the moment it is measured; SIGINT stops the run with the
rows so far kept (exit code 130).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSES = ("fwd", "bwd", "fwdbwd")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Case:
    """One op at one shape. providers: name -> callable(*inputs) returning a tensor or a tuple;
    grads_out: the upstream gradient per output (None: the output is not differentiated)."""
    op: str
    shape: str
    dtype: str
    inputs: list
    grad_inputs: list          # the inputs that get gradients
    grads_out: list
    providers: dict
    bytes: dict                # pass -> minimum bytes


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _liger(name):
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        return LigerSiLUMulFunction.apply
    except ImportError:
        return None


def _apex_rms_norm():
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return lambda x, w, eps: fused_rms_norm_affine(x, w, (x.shape[-1],), eps)


def _providers(ours, ref, compile_ref: bool) -> dict:
    p = {"aimv2": ours, "eager_ref": ref}
    if compile_ref:
        p["compile_ref"] = torch.compile(ref, fullgraph=True, dynamic=False)
    return p


def rms_norm_case(M, D, residual, device, dtype, compile_ref) -> Case:
    from aimv2.kernels import rms_norm, rms_norm_ref
    eps = 1e-5
    x = torch.randn(M, D, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D, device=device)).requires_grad_()
    dout = torch.randn(M, D, device=device, dtype=dtype)
    if residual:
        r = torch.randn(M, D, device=device, dtype=dtype, requires_grad=True)
        ds = torch.randn(M, D, device=device, dtype=dtype)
        providers = _providers(lambda x, w, r: rms_norm(x, w, eps, r),
                               lambda x, w, r: rms_norm_ref(x, w, eps, r), compile_ref)
        fwd_b = _nbytes(x, r, x, x)                                # read x, r; write out, s
        bwd_b = _nbytes(dout, ds, x, x)                            # read d_out, d_s, s; write d_s
        return Case("rms_norm_residual", f"({M}, {D})", _DT[dtype], [x, w, r],
                    [x, w, r], [dout, ds], providers, {"fwd": fwd_b, "bwd": bwd_b, "fwdbwd": fwd_b + bwd_b})
    providers = _providers(lambda x, w: rms_norm(x, w, eps), lambda x, w: rms_norm_ref(x, w, eps),
                           compile_ref)
    for name, fn in (("liger", _liger("rms_norm")), ("apex", _apex_rms_norm())):
        if fn is not None and device.type == "cuda":
            providers[name] = (lambda f: lambda x, w: f(x, w, eps))(fn)
    fwd_b, bwd_b = _nbytes(x, x), _nbytes(dout, x, x)              # fwd: x -> out; bwd: d_out, x -> dx
    return Case("rms_norm", f"({M}, {D})", _DT[dtype], [x, w], [x, w], [dout],
                providers, {"fwd": fwd_b, "bwd": bwd_b, "fwdbwd": fwd_b + bwd_b})


def swiglu_case(M, H, device, dtype, compile_ref) -> Case:
    from aimv2.kernels import swiglu, swiglu_ref
    g = torch.randn(M, H, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(M, H, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(M, H, device=device, dtype=dtype)
    providers = _providers(swiglu, swiglu_ref, compile_ref)
    if _liger("swiglu") is not None and device.type == "cuda":
        providers["liger"] = _liger("swiglu")
    fwd_b, bwd_b = _nbytes(g, u, g), _nbytes(dout, g, u, g, u)
    return Case("swiglu", f"({M}, {H})", _DT[dtype], [g, u], [g, u], [dout],
                providers, {"fwd": fwd_b, "bwd": bwd_b, "fwdbwd": fwd_b + bwd_b})


def patch_l2_loss_case(B, img, p, device, dtype, compile_ref) -> Case:
    from aimv2.kernels import patch_l2_loss, patch_l2_loss_ref
    C, N, K = 3, (img // p) ** 2, p * p * 3
    gen = torch.Generator().manual_seed(0)
    plen = torch.randint(1, N, (B,), generator=gen).to(device)
    pred = torch.randn(B, N, K, device=device, dtype=dtype, requires_grad=True)
    images = torch.randn(B, C, img, img, device=device)
    dloss = torch.tensor(1.0, device=device)
    providers = _providers(lambda pr, im: patch_l2_loss(pr, im, plen, p),
                           lambda pr, im: patch_l2_loss_ref(pr, im, plen, p), compile_ref)
    counted = int((N - plen.clamp(min=1)).sum())                  # pairs (b, i) with i+1 >= P_b
    read = counted * K * (pred.element_size() + images.element_size())
    fwd_b, bwd_b = read, read + _nbytes(pred)                      # bwd also writes d_pred whole
    return Case("patch_l2_loss", f"pred ({B}, {N}, {K}), images ({B}, {C}, {img}, {img})",
                _DT[dtype], [pred, images], [pred], [dloss], providers,
                {"fwd": fwd_b, "bwd": bwd_b, "fwdbwd": fwd_b + bwd_b})


def patch_l2_loss_packed_case(n, lo, hi, p, device, dtype, compile_ref) -> Case:
    from aimv2.kernels import patch_l2_loss_packed, patch_l2_loss_packed_ref
    from aimv2.packing import cu_seqlens_of
    K = p * p * 3
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (n,), generator=gen)
    plen = torch.cat([torch.randint(1, int(m), (1,), generator=gen) for m in lens]).to(device)
    cu = cu_seqlens_of(lens.tolist(), device)
    T = int(lens.sum())
    pred = torch.randn(T, K, device=device, dtype=dtype, requires_grad=True)
    patches = torch.randn(T, K, device=device)
    dloss = torch.tensor(1.0, device=device)
    providers = _providers(lambda pr, x: patch_l2_loss_packed(pr, x, cu, plen),
                           lambda pr, x: patch_l2_loss_packed_ref(pr, x, cu, plen), compile_ref)
    counted = int((lens - plen.cpu()).sum())                      # pairs with target past the prefix
    read = counted * K * (pred.element_size() + patches.element_size())
    fwd_b, bwd_b = read, read + _nbytes(pred)                      # bwd also writes d_pred whole
    return Case("patch_l2_loss_packed", f"pred ({T}, {K}), {n} images", _DT[dtype], [pred, patches], [pred],
                [dloss], providers, {"fwd": fwd_b, "bwd": bwd_b, "fwdbwd": fwd_b + bwd_b})


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _pass_fn(case: Case, fn, pass_: str) -> Callable:
    def grad(outs):
        return torch.autograd.grad(outs, case.grad_inputs, case.grads_out[:len(outs)],
                                   retain_graph=pass_ == "bwd")
    if pass_ == "fwd":
        return lambda: fn(*case.inputs)
    if pass_ == "fwdbwd":
        return lambda: grad(_as_tuple(fn(*case.inputs)))
    outs = _as_tuple(fn(*case.inputs))
    return lambda: grad(outs)


def run_case(case: Case, ceilings: dict, command: str, log=print, emit=None) -> list[dict]:
    """Every (provider, pass) of one case; each row is handed to emit (e.g. ResultFile.add) the
    moment it is measured, and all are returned."""
    from _common import bench, peak_mem_mb, result_row
    rows = []
    for provider, fn in case.providers.items():
        for pass_ in PASSES:
            try:
                f = _pass_fn(case, fn, pass_)
                f()                                                # warm-up / compile
                ms, p20, p80 = bench(f)
                peak = peak_mem_mb(f)
            except Exception as e:                                  # a baseline that cannot run
                log(f"  {case.op:18s} {pass_:6s} {provider:12s} FAILED: {type(e).__name__}: {e}")
                continue
            gbps = case.bytes[pass_] / (ms * 1e-3) / 1e9
            pct = 100 * gbps / ceilings["copy_gbps"] if ceilings.get("copy_gbps") else None
            rows.append(result_row(op=case.op, pass_=pass_, shape=case.shape, dtype=case.dtype,
                                   provider=provider, ms=ms, ms_p20=p20, ms_p80=p80, gbps=gbps,
                                   pct_of_ceiling=pct, peak_mem_mb=peak, command=command,
                                   min_bytes=case.bytes[pass_]))
            if emit is not None:
                emit(rows[-1])
            log(f"  {case.op:18s} {case.shape:28s} {pass_:6s} {provider:12s} {ms:9.3f} ms "
                f"{gbps:8.1f} GB/s" + (f" {pct:5.1f}%" if pct is not None else ""))
    return rows


def make_cases(ops, device, quick: bool, compile_ref: bool, gpu_quick: bool = False) -> list[Callable[[], Case]]:
    """Deferred case builders (each allocates its tensors only when run). gpu_quick: the AIMv2-L
    shapes only (D=1024, H=2816, the loss at 224 px)."""
    dt = torch.bfloat16
    M = 64 if quick else 128 * 256
    cases = []
    if "rms_norm" in ops:
        for D in ((96, 160) if quick else (1024,) if gpu_quick else (1024, 1536, 2048, 3072)):
            for res in (False, True):
                cases.append(lambda D=D, res=res: rms_norm_case(M, D, res, device, dt, compile_ref))
    if "swiglu" in ops:
        for H in ((96,) if quick else (2816,) if gpu_quick else (2816, 8192)):
            cases.append(lambda H=H: swiglu_case(M, H, device, dt, compile_ref))
    if "patch_l2_loss" in ops:
        B, img, p = (2, 16, 4) if quick else (128, 224, 14)
        cases.append(lambda: patch_l2_loss_case(B, img, p, device, dt, compile_ref))
    if "patch_l2_loss_packed" in ops and not gpu_quick:
        n, lo, hi, p = (3, 2, 9, 4) if quick else (128, 64, 512, 14)
        cases.append(lambda: patch_l2_loss_packed_case(n, lo, hi, p, device, dt, compile_ref))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="rms_norm,swiglu,patch_l2_loss,patch_l2_loss_packed")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, interpreter")
    ap.add_argument("--no-compile-ref", dest="compile_ref", action="store_false",
                    help="skip torch.compile of the references (always skipped with --quick on CPU)")
    ap.add_argument("--gpu-quick", action="store_true", help="the short GPU profile of `make gpu`")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them)")
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/results; a temp dir with --quick)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench_kernels: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    if not cuda:                       # before aimv2.kernels defines its @triton.jit functions
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from _common import finish, load_ceilings, result_file
    device = torch.device("cuda" if cuda else "cpu")
    compile_ref = args.compile_ref and cuda
    ceilings = load_ceilings(args.ceilings) if cuda or args.ceilings else {}
    print(f"ceilings: {ceilings}")
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    results = result_file("kernels", args.out, args.quick, ceilings)
    try:
        for build in make_cases(args.ops.split(","), device, args.quick, compile_ref, args.gpu_quick):
            run_case(build(), ceilings, command, emit=results.add)
            if cuda:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


# ------------------------------------------------------------------ pytest-benchmark harness
try:
    import pytest
except ImportError:                    # the CLI does not need pytest
    pytest = None

if pytest is not None:
    _CASE_IDS = ([f"rms_norm-D{D}-{'res' if r else 'nores'}" for D in (1024, 1536, 2048, 3072)
                  for r in (False, True)] + ["swiglu-H2816", "swiglu-H8192", "patch_l2_loss"])

    @pytest.fixture(scope="module")
    def _session():
        from _common import gpu_session
        yield from gpu_session("kernels")

    @pytest.mark.parametrize("idx", range(len(_CASE_IDS)), ids=_CASE_IDS)
    def test_kernel_benchmark(benchmark, _session, idx):
        case = make_cases(["rms_norm", "swiglu", "patch_l2_loss"], torch.device("cuda"), False, True)[idx]()
        rows = run_case(case, _session["ceilings"], "pytest benchmarks/bench_kernels.py")
        _session["results"].extend(rows)
        benchmark.extra_info["rows"] = rows
        f = _pass_fn(case, case.providers["aimv2"], "fwdbwd")
        benchmark.pedantic(lambda: (f(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


if __name__ == "__main__":
    sys.exit(main())
