"""Benchmark of prefix-causal flash attention (issue 4) against the attention baselines.

Shapes (bf16, B=128, H=8, D=128; q, k, v are views of one (B, N, 3, H, D) qkv buffer, as in the model):

    encoder     N = 256, 576, 1024, prefix P_b ~ U{1..N-1} per sample (seeded)    mask "prefix"
    decoder     N = 334, causal (P = 0)                                          mask "causal"
    inference   N = 256, 1024, bidirectional (P = N)                             mask "none"

Providers, in the same run (each row's `mask` says what that provider computed):

    aimv2               aimv2.kernels.prefix_attention (masked tiles skipped)
    sdpa_dense          SDPA with the dense (B, 1, N, N) boolean mask (what reference frameworks do)
    flex                torch.compile(flex_attention) with mask_mod `kv < P[b] or q >= kv` + BlockMask
    sdpa_flash_causal   SDPA is_causal=True on the flash backend    } plain causal: the yardstick
    sdpa_cudnn_causal   SDPA is_causal=True on the cuDNN backend    } (a little less work than prefix)
    flash_attn, xformers  causal (or unmasked) kernels, when importable
    eager_ref, compile_ref  prefix_attention_ref eager / torch.compile'd (fp32 scores: slow, big)
On bidirectional shapes the sdpa rows run unmasked and are named sdpa_flash / sdpa_cudnn.

TFLOP/s count only unmasked (i, j) pairs of the mask the provider computed: forward 4 * D flops per
pair, backward 2.5x that (5 matmuls vs 2), forward+backward 3.5x; pct_of_ceiling against the bf16
matmul TFLOP/s measured in the same run. Backward times `torch.autograd.grad` on a retained graph.
peak_mem_mb: what one call allocates above its inputs.

    python benchmarks/bench_attention.py                       # GPU: all shapes and providers
    python benchmarks/bench_attention.py --shapes encoder-1024 --providers aimv2,flex
    pytest benchmarks/bench_attention.py                       # the same through pytest-benchmark
    python benchmarks/bench_attention.py --gpu-quick           # the `make gpu` profile (below)
    python benchmarks/bench_attention.py --quick               # CPU smoke run (interpreter, tiny)

--gpu-quick: encoder-256, encoder-1024, decoder-334; aimv2, sdpa_dense, sdpa_flash_causal,
sdpa_cudnn_causal, flex (the compiled one last: its compile is the slow part). B=128, H=8: B*H =
1024 (b, h) pairs, several query tiles each, so every case fills the 132 SMs of an H100/H200 many
times over.

--packed: images of different sizes packed into one sequence (issue 16), bf16, H=8, D=128, image
lengths U{196..1024} (seeded) drawn until the pack holds >= 16k / 64k tokens, prefix P_s ~ U{1..len-1}:

    aimv2               aimv2.kernels.prefix_attention_varlen on the pack (cu_seqlens)
    aimv2_padded        aimv2.kernels.prefix_attention on the images padded to the longest (S, H, max, D)
                        (the padding sits after every real token and outside every prefix: invisible)
    flex                torch.compile(flex_attention) on the pack (1, H, T, D) with a document mask
                        `same image and (kv - start < P or q >= kv)`; the BlockMask is rebuilt for
                        every batch, so its build time is a row of its own (pass "mask_build")
    eager_ref           each image alone through prefix_attention_ref (--quick only)
TFLOP/s count the visible pairs of the pack for every provider (the padded one does more work).

    python benchmarks/bench_attention.py --packed              # GPU: packed-16k, packed-64k
    python benchmarks/bench_attention.py --packed --gpu-quick  # the same (`make gpu`'s attention_packed stage)
    python benchmarks/bench_attention.py --packed --quick      # CPU smoke run (a pack of ~100 tokens)

--host-cost: what a call costs on the host before its kernels run (input checks, configuration,
allocation, autograd, the torch.library dispatch), every Triton launch stubbed out and counted; the
fixed op (B=2, H=2, N=256) and the packed op (3 images), bf16, fwd / bwd / fwdbwd, for the eager path
(provider aimv2) and the torch.library op path (aimv2_registered, as under torch.compile), interleaved
in one run. Runs on a CPU (with the configuration path a capability-9.0 GPU takes) or a GPU.

    python benchmarks/bench_attention.py --host-cost           # rows: attention_host-<device>-<date>.json
    python benchmarks/bench_attention.py --host-cost --baseline 030f101   # + the kernels as of that commit

Rows (CONVENTIONS.md schema) go to benchmarks/results/attention-<device>-<date>.json, with --packed
attention_packed-<device>-<date>.json (a temp dir
with --quick unless --out is given), each appended the moment it is measured; SIGINT stops the run
with the rows so far kept (exit code 130).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSES = ("fwd", "bwd", "fwdbwd")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
# name -> (N, mask kind)
SHAPES = {"encoder-256": (256, "prefix"), "encoder-576": (576, "prefix"), "encoder-1024": (1024, "prefix"),
          "decoder-334": (334, "causal"), "inference-256": (256, "none"), "inference-1024": (1024, "none")}
GPU_QUICK_SHAPES = "encoder-256,encoder-1024,decoder-334"
GPU_QUICK_PROVIDERS = "aimv2,sdpa_dense,sdpa_flash_causal,sdpa_cudnn_causal,flex"
PROVIDERS = ("aimv2", "sdpa_dense", "flex", "sdpa_flash_causal", "sdpa_cudnn_causal", "flash_attn",
             "xformers", "eager_ref", "compile_ref")
# name -> (tokens at least, image lengths lo, hi)
PACKED = {"packed-16k": (16384, 196, 1024), "packed-64k": (65536, 196, 1024)}
PACKED_QUICK = {"packed-quick": (64, 3, 30)}
PACKED_PROVIDERS = ("aimv2", "aimv2_padded", "flex", "eager_ref")


@dataclass
class Case:
    name: str
    B: int
    H: int
    N: int
    D: int
    kind: str                 # "prefix" | "causal" | "none"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    prefix_len: object        # int tensor (B,) or int

    @property
    def shape(self) -> str:
        return f"B={self.B},H={self.H},N={self.N},D={self.D},mask={self.kind}"


def make_case(name: str, B: int, H: int, D: int, device, dtype, N: int | None = None) -> Case:
    N_, kind = SHAPES[name]
    N = N or N_
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device=device, dtype=dtype)
    # 3 x (B, H, N, D) strided views of the qkv buffer, made leaves that require grad
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    dout = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    plen = {"prefix": torch.randint(1, N, (B,), generator=g).to(device), "causal": 0, "none": N}[kind]
    return Case(name, B, H, N, D, kind, q, k, v, dout, plen)


def unmasked_pairs(case: Case, mask: str) -> float:
    """Visible (i, j) pairs summed over batch and heads: prefix rows i < P see P keys, rows i >= P
    see i + 1 keys, so P^2 + (N(N+1) - P(P+1)) / 2 per (b, h)."""
    N = case.N
    if mask == "none":
        per_b = torch.full((case.B,), float(N * N))
    elif mask == "causal":
        per_b = torch.full((case.B,), N * (N + 1) / 2)
    else:
        P = case.prefix_len.double().cpu()
        per_b = P * P + (N * (N + 1) - P * (P + 1)) / 2
    return float(per_b.sum()) * case.H


def _sdpa_backend(backend: str, causal: bool) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def fn(q, k, v):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def providers(case: Case, wanted) -> dict[str, tuple[Callable, str]]:
    """provider name -> (fn(q, k, v) -> out, mask it computes). Unavailable ones are left out (logged)."""
    from aimv2.kernels import prefix_attention, prefix_attention_ref, prefix_mask
    B, N, plen, kind = case.B, case.N, case.prefix_len, case.kind
    cuda = case.q.is_cuda
    causal = kind != "none"
    out = {}
    if "aimv2" in wanted:
        out["aimv2"] = (lambda q, k, v: prefix_attention(q, k, v, plen), kind)
    if "sdpa_dense" in wanted:
        dense = prefix_mask(plen, B, N, case.q.device)                       # (B, 1, N, N) bool
        out["sdpa_dense"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), kind)
    suffix = "_causal" if causal else ""
    for be in ("flash", "cudnn"):
        if f"sdpa_{be}_causal" in wanted and cuda:
            out[f"sdpa_{be}{suffix}"] = (_sdpa_backend(be, causal), "causal" if causal else "none")
    if "flex" in wanted and cuda:       # after the SDPA rows: its compile is the slow part of a case
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        if kind == "prefix":
            P = plen.to(torch.int32)
            block_mask = create_block_mask(lambda b, h, qi, kv: (kv < P[b]) | (qi >= kv), B, None, N, N,
                                           device=case.q.device)
        elif kind == "causal":
            block_mask = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, N, N, device=case.q.device)
        else:
            block_mask = None
        out["flex"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask), kind)
    if "flash_attn" in wanted and cuda:
        try:
            from flash_attn import flash_attn_func
            out["flash_attn"] = (lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2),
                "causal" if causal else "none")
        except ImportError as e:
            print(f"  flash_attn unavailable: {e}")
    if "xformers" in wanted and cuda:
        try:
            import xformers.ops as xops
            bias = xops.LowerTriangularMask() if causal else None
            out["xformers"] = (lambda q, k, v: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias).transpose(1, 2),
                "causal" if causal else "none")
        except ImportError as e:
            print(f"  xformers unavailable: {e}")
    if "eager_ref" in wanted:
        out["eager_ref"] = (lambda q, k, v: prefix_attention_ref(q, k, v, plen), kind)
    if "compile_ref" in wanted and cuda:
        ref_c = torch.compile(prefix_attention_ref)
        out["compile_ref"] = (lambda q, k, v: ref_c(q, k, v, plen), kind)
    return out


def pass_fn(case: Case, fn: Callable, pass_: str, qkv=None, dout=None) -> Callable:
    """The timed callable of one pass; qkv / dout default to the case's (a provider may bring its own)."""
    qkv = (case.q, case.k, case.v) if qkv is None else qkv
    dout = case.dout if dout is None else dout
    if pass_ == "fwd":
        return lambda: fn(*qkv)
    if pass_ == "fwdbwd":
        return lambda: torch.autograd.grad(fn(*qkv), qkv, dout)
    out = fn(*qkv)
    return lambda: torch.autograd.grad(out, qkv, dout, retain_graph=True)


def measure(case, op: str, provider: str, fn: Callable, mask: str, pairs: float, ceilings: dict,
            command: str, log=print, emit=None, qkv=None, dout=None) -> list[dict]:
    """The three passes of one provider on one case (Case or PackedCase): a row each, handed to emit
    (e.g. ResultFile.add) the moment it is measured; a pass that cannot run is logged and skipped."""
    from _common import bench, peak_mem_mb, result_row
    rows = []
    for pass_ in PASSES:
        try:
            f = pass_fn(case, fn, pass_, qkv, dout)
            f()                                                    # warm-up / compile
            ms, p20, p80 = bench(f)
            peak = peak_mem_mb(f)
        except Exception as e:                                      # a baseline that cannot run
            log(f"  {case.name:15s} {pass_:6s} {provider:18s} FAILED: {type(e).__name__}: {str(e)[:200]}")
            if case.q.is_cuda:
                torch.cuda.empty_cache()
            continue
        tflops = FLOP_FACTOR[pass_] * 4 * case.D * pairs / (ms * 1e-3) / 1e12
        pct = 100 * tflops / ceilings["bf16_tflops"] if ceilings.get("bf16_tflops") else None
        rows.append(result_row(op=op, pass_=pass_, shape=case.shape, dtype=_DT[case.q.dtype], provider=provider,
                               ms=ms, ms_p20=p20, ms_p80=p80, tflops=tflops, pct_of_ceiling=pct,
                               peak_mem_mb=peak, command=command, mask=mask, case=case.name, unmasked_pairs=pairs))
        if emit is not None:
            emit(rows[-1])
        log(f"  {case.name:15s} {pass_:6s} {provider:18s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s"
            + (f" {pct:5.1f}%" if pct is not None else "") + (f" {peak:8.0f} MB" if peak else ""))
    return rows


def run_case(case: Case, wanted, ceilings: dict, command: str, log=print, emit=None) -> list[dict]:
    """Every (provider, pass) of one case; each row is handed to emit (e.g. ResultFile.add) the
    moment it is measured, and all are returned."""
    rows = []
    for provider, (fn, mask) in providers(case, wanted).items():
        rows += measure(case, "prefix_attention", provider, fn, mask, unmasked_pairs(case, mask), ceilings,
                        command, log, emit)
    return rows


# ------------------------------------------------------------------ packed images (--packed)
@dataclass
class PackedCase:
    name: str
    H: int
    D: int
    lens: list[int]
    q: torch.Tensor             # (T, H, D) views of one (T, 3, H, D) qkv buffer, leaves
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor          # (T, H, D)
    cu_seqlens: torch.Tensor    # int32 (S + 1,)
    prefix_len: torch.Tensor    # int32 (S,)

    @property
    def shape(self) -> str:
        return (f"T={sum(self.lens)},S={len(self.lens)},H={self.H},D={self.D},"
                f"lens={min(self.lens)}-{max(self.lens)},mask=prefix")


def make_packed_case(name: str, H: int, D: int, device, dtype, spec=None) -> PackedCase:
    total, lo, hi = spec or PACKED[name]
    g = torch.Generator(device="cpu").manual_seed(0)
    lens: list[int] = []
    while sum(lens) < total:
        lens.append(int(torch.randint(lo, hi + 1, (), generator=g)))
    T = sum(lens)
    qkv = torch.randn(T, 3, H, D, generator=g).to(device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(1))             # 3 x (T, H, D)
    dout = torch.randn(T, H, D, generator=g).to(device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    P = [int(torch.randint(1, max(2, n), (), generator=g)) for n in lens]                 # U{1..n-1}; 1 if n = 1
    return PackedCase(name, H, D, lens, q, k, v, dout, cu, torch.tensor(P, dtype=torch.int32, device=device))


def packed_pairs(case: PackedCase) -> float:
    """Visible (i, j) pairs of the pack: per image P^2 + (N(N+1) - P(P+1)) / 2, times H."""
    N = torch.tensor(case.lens, dtype=torch.float64)
    P = case.prefix_len.double().cpu()
    return float((P * P + (N * (N + 1) - P * (P + 1)) / 2).sum()) * case.H


def _padded(case: PackedCase):
    """The pack's images padded to the longest: q, k, v leaves (S, H, max, D) (views of one padded
    (S, max, 3, H, D) buffer) and dout (S, H, max, D), zero past each image."""
    S, N, H, D = len(case.lens), max(case.lens), case.H, case.D
    qkv = case.q.new_zeros(S, N, 3, H, D)
    dout = case.q.new_zeros(S, N, H, D)
    packed_qkv = torch.stack([case.q.detach(), case.k.detach(), case.v.detach()], 1)   # (T, 3, H, D)
    for s, (a, n) in enumerate(zip(case.cu_seqlens[:-1].tolist(), case.lens)):
        qkv[s, :n] = packed_qkv[a:a + n]
        dout[s, :n] = case.dout[a:a + n]
    qkv_views = tuple(t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # 3 x (S, H, N, D)
    return qkv_views, dout.transpose(1, 2)


def document_block_mask(case: PackedCase, compiled: bool):
    """FlexAttention's BlockMask of the pack: query i sees key j iff same image and (j - start < P or
    j <= i). Built from the device tensors alone (what a training step rebuilds per batch)."""
    from torch.nn.attention.flex_attention import create_block_mask
    T, S = sum(case.lens), len(case.lens)
    cu = case.cu_seqlens.long()
    doc = torch.repeat_interleave(torch.arange(S, device=cu.device), cu[1:] - cu[:-1], output_size=T)  # (T,)
    start, P = cu[:-1][doc], case.prefix_len.long()[doc]                                             # (T,)

    def mask_mod(b, h, qi, kv):
        return (doc[qi] == doc[kv]) & ((kv - start[kv] < P[kv]) | (qi >= kv))
    return create_block_mask(mask_mod, None, None, T, T, device=cu.device, _compile=compiled)


def run_packed_case(case: PackedCase, wanted, ceilings: dict, command: str, log=print, emit=None) -> list[dict]:
    """aimv2 varlen, aimv2 padded to the longest image, flex with a per-batch document mask (its
    build timed as a row of its own), eager_ref; rows as run_case's, op "prefix_attention_varlen"."""
    from _common import bench, result_row

    from aimv2.kernels import prefix_attention, prefix_attention_varlen, prefix_attention_varlen_ref
    op, pairs, cu, P, max_len = "prefix_attention_varlen", packed_pairs(case), case.cu_seqlens, case.prefix_len, \
        max(case.lens)
    rows = []
    if "aimv2" in wanted:
        rows += measure(case, op, "aimv2", lambda q, k, v: prefix_attention_varlen(q, k, v, cu, max_len, P),
                        "prefix", pairs, ceilings, command, log, emit)
    if "aimv2_padded" in wanted:
        qkv, dout = _padded(case)
        rows += measure(case, op, "aimv2_padded", lambda q, k, v: prefix_attention(q, k, v, P), "prefix", pairs,
                        ceilings, command, log, emit, qkv=qkv, dout=dout)
        del qkv, dout
    if "flex" in wanted:
        compiled = case.q.is_cuda       # compiling create_block_mask with lookups fails on CPU (TRITON_ON_CPU.md)
        try:
            block_mask = document_block_mask(case, compiled)                    # warm-up / compile
            ms, p20, p80 = bench(lambda: document_block_mask(case, compiled))
            rows.append(result_row(op=op, pass_="mask_build", shape=case.shape, dtype=_DT[case.q.dtype],
                                   provider="flex", ms=ms, ms_p20=p20, ms_p80=p80, command=command, mask="prefix",
                                   case=case.name, mask_build="compiled" if compiled else "eager"))
            if emit is not None:
                emit(rows[-1])
            log(f"  {case.name:15s} {'mask':6s} {'flex':18s} {ms:9.3f} ms (create_block_mask, per batch)")
        except Exception as e:
            log(f"  {case.name:15s} mask   flex               FAILED: {type(e).__name__}: {str(e)[:200]}")
            block_mask = None
        if block_mask is not None and case.q.is_cuda:           # flex has no backward on the CPU
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)

            def flex_fn(q, k, v):                # (T, H, D) -> (1, H, T, D) views and back
                out = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)
                return out[0].transpose(0, 1)
            rows += measure(case, op, "flex", flex_fn, "prefix", pairs, ceilings, command, log, emit)
    if "eager_ref" in wanted:
        rows += measure(case, op, "eager_ref", lambda q, k, v: prefix_attention_varlen_ref(q, k, v, cu, P), "prefix",
                        pairs, ceilings, command, log, emit)
    return rows


# ------------------------------------------------------------------ host cost (--host-cost)
class _StubKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` only counts the launch."""
    launches = 0

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        _StubKernel.launches += 1


def _kernels_at(rev: str):
    """The kernels/ package as committed at git revision `rev`, imported side by side with today's
    (a copy under a temp dir, its torch.library namespace renamed so its ops register apart)."""
    import importlib
    import subprocess
    import tempfile
    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout
    sha = git("rev-parse", "--short", rev).strip()
    pkg = Path(tempfile.mkdtemp(prefix="aimv2-kernels-")) / f"kernels_{sha}"
    for path in git("ls-tree", "-r", "--name-only", rev, "kernels/").split():
        dst = pkg / path.removeprefix("kernels/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(git("show", f"{rev}:{path}").replace('"aimv2::', f'"aimv2_{sha}::'))
    sys.path.insert(0, str(pkg.parent))
    return sha, importlib.import_module(f"{pkg.name}.prefix_attention"), \
        importlib.import_module(f"{pkg.name}.prefix_attention_varlen")


def host_cost(device, command: str, emit, calls: int = 200, repeats: int = 9, baseline: str | None = None,
              log=print) -> list[dict]:
    """The ops' host (Python) cost per call with every Triton launch stubbed out (counted instead),
    fixed op (B=2, H=2, N=256, D=128, per-sample prefixes) and packed op (3 images), bf16, on the
    launch configuration a GPU of capability 9.0 gets: what a call costs before its kernels run
    (checks, configuration, allocation, autograd, the torch.library dispatch). Providers: aimv2 (the
    eager path: the autograd.Function twin), aimv2_registered (every call through the torch.library
    op, as torch.compile calls it) and, with `baseline` a git revision, aimv2@<sha> (the kernels as
    committed there, imported beside today's), timed interleaved, `repeats` x `calls` calls each.
    Rows: op prefix_attention_host / prefix_attention_varlen_host, ms per call (wall, median over
    repeats), ms_cpu (the process's CPU time, every thread: steadier on a shared machine), `launches` per call."""
    import importlib
    import statistics
    import time
    from _common import result_row
    mods = {"aimv2": (importlib.import_module("aimv2.kernels.prefix_attention"),
                      importlib.import_module("aimv2.kernels.prefix_attention_varlen"))}
    mods["aimv2_registered"] = mods["aimv2"]
    if baseline:
        sha, *old = _kernels_at(baseline)
        mods[f"aimv2@{sha}"] = tuple(old)
    saved = {(m, n): getattr(m, n) for pa_pv in set(mods.values()) for m in pa_pv for n in dir(m)
             if (n.endswith("_kernel") and n.startswith("_prefix_attention"))
             or n in ("is_interpreting", "_capability", "use_registered_op")}
    if device.type != "cuda":               # (older kernels ask for the current device: there is none)
        saved[(torch.cuda, "current_device")] = torch.cuda.current_device
    dtype = torch.bfloat16

    def path(prov):                             # the eager path, or every call through the library op
        for m in mods[prov]:
            if (m, "use_registered_op") in saved:
                m.use_registered_op = (lambda: True) if prov == "aimv2_registered" else saved[(m, "use_registered_op")]

    try:
        for m, n in saved:
            if n.endswith("_kernel"):
                setattr(m, n, _StubKernel())
            elif device.type != "cuda" and n != "use_registered_op":  # a capability-9.0 GPU's configuration
                setattr(m, n, {"is_interpreting": lambda: False, "_capability": lambda *a: (9, 0),
                               "current_device": lambda: 0}[n])
        case = make_case("encoder-256", 2, 2, 128, device, dtype)
        packed = make_packed_case("packed-host", 2, 128, device, dtype, (600, 150, 300))
        rows = []
        for op, c in (("prefix_attention_host", case), ("prefix_attention_varlen_host", packed)):
            fns = {}
            for prov, (PA, PV) in mods.items():
                fn = (lambda q, k, v, PA=PA: PA.prefix_attention(q, k, v, case.prefix_len)) if c is case else \
                    (lambda q, k, v, PV=PV: PV.prefix_attention_varlen(q, k, v, packed.cu_seqlens, max(packed.lens),
                                                                       packed.prefix_len))
                path(prov)                          # the bwd pass's graph is made here, on its path
                fns.update({(prov, p): pass_fn(c, fn, p) for p in PASSES})
            wall: dict = {key: [] for key in fns}
            cpu: dict = {key: [] for key in fns}
            launches = {}
            for rep in range(repeats + 1):
                for key, f in fns.items():
                    path(key[0])
                    _StubKernel.launches = 0
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(calls):
                        f()
                    if rep:                                          # the first round warms up
                        wall[key].append((time.perf_counter() - t0) / calls * 1e3)
                        cpu[key].append((time.process_time() - c0) / calls * 1e3)
                    launches[key] = _StubKernel.launches / calls
            for (prov, p), ts in wall.items():
                ts.sort()
                ms, ms_cpu = statistics.median(ts), statistics.median(cpu[(prov, p)])
                rows.append(result_row(op=op, pass_=p, shape=c.shape, dtype=_DT[dtype], provider=prov, ms=ms,
                                       ms_p20=ts[len(ts) // 5], ms_p80=ts[(4 * len(ts)) // 5], ms_cpu=ms_cpu,
                                       command=command, timing="host_stubbed", launches=launches[(prov, p)],
                                       note="Triton launches stubbed out (counted): host Python cost only"))
                emit(rows[-1])
                log(f"  {op:30s} {p:6s} {prov:17s} {ms * 1e3:8.1f} us/call wall {ms_cpu * 1e3:8.1f} us cpu  "
                    f"{launches[(prov, p)]:.0f} launches")
        return rows
    finally:
        for (m, n), obj in saved.items():
            setattr(m, n, obj)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated names (default: all; --quick: "
                    "encoder-256,decoder-334,inference-256, one per mask kind)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, interpreter")
    ap.add_argument("--gpu-quick", action="store_true", help="the short GPU profile of `make gpu`")
    ap.add_argument("--packed", action="store_true", help="packed images of 196-1024 tokens (varlen) instead "
                    f"of the fixed shapes; providers {','.join(PACKED_PROVIDERS[:3])} (+ eager_ref with --quick)")
    ap.add_argument("--host-cost", action="store_true", help="the ops' host cost per call, Triton launches "
                    "stubbed (runs on a CPU; writes attention_host-<device>-<date>.json)")
    ap.add_argument("--baseline", default=None, metavar="REV", help="--host-cost: also the kernels as "
                    "committed at git revision REV (provider aimv2@<sha>), in the same run")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp dir with --quick)")
    args = ap.parse_args(argv)
    if args.gpu_quick and not args.packed:
        args.shapes = args.shapes or GPU_QUICK_SHAPES
        args.providers = GPU_QUICK_PROVIDERS
    elif args.packed and args.providers == ",".join(PROVIDERS):
        args.providers = ",".join(PACKED_PROVIDERS if args.quick else PACKED_PROVIDERS[:3])
    cuda = torch.cuda.is_available()
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    if args.host_cost:
        if not cuda:                   # the launch checks accept CPU tensors only under the interpreter
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from _common import finish, result_file
        torch.set_num_threads(1)
        results = result_file("attention_host", args.out, args.quick)
        host_cost(torch.device("cuda" if cuda else "cpu"), command, results.add, baseline=args.baseline,
                  **({"calls": 20, "repeats": 2} if args.quick else {}))
        return finish(results)
    if not cuda and not args.quick:
        print("bench_attention: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    if not cuda:                       # before aimv2.kernels defines its @triton.jit functions
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from _common import finish, load_ceilings, result_file
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32    # bf16 tl.dot is broken in the interpreter
    B, H, D = (2, 2, 64) if args.quick else (args.batch, 8, 128)
    ceilings = load_ceilings(args.ceilings) if cuda or args.ceilings else {}
    print(f"ceilings: {ceilings}", flush=True)
    wanted = set(args.providers.split(","))
    results = result_file("attention_packed" if args.packed else "attention", args.out, args.quick, ceilings)
    shapes = args.shapes or ("encoder-256,decoder-334,inference-256" if args.quick else ",".join(SHAPES))
    try:
        if args.packed:
            for name, spec in (PACKED_QUICK if args.quick else PACKED).items():
                if args.shapes and name not in args.shapes.split(","):
                    continue
                run_packed_case(make_packed_case(name, H, D, device, dtype, spec), wanted, ceilings, command,
                                emit=results.add)
                if cuda:
                    torch.cuda.empty_cache()
            return finish(results)
        for name in shapes.split(","):
            N = max(8, SHAPES[name][0] // 16) if args.quick else None
            run_case(make_case(name, B, H, D, device, dtype, N), wanted, ceilings, command,
                     emit=results.add)
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
    @pytest.fixture(scope="module")
    def _session():
        from _common import gpu_session
        yield from gpu_session("attention")

    @pytest.mark.parametrize("name", list(SHAPES))
    def test_attention_benchmark(benchmark, _session, name):
        case = make_case(name, 128, 8, 128, torch.device("cuda"), torch.bfloat16)
        rows = run_case(case, set(PROVIDERS), _session["ceilings"], "pytest benchmarks/bench_attention.py")
        _session["results"].extend(rows)
        benchmark.extra_info["rows"] = rows
        f = pass_fn(case, providers(case, {"aimv2"})["aimv2"][0], "fwdbwd")
        benchmark.pedantic(lambda: (f(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
