"""End-to-end training-step throughput of AIMv2 (issue [gpu-e2e]): images/s, MFU, memory, profile.

Times full training steps (forward, backward, fused AdamW step) of the pretrainer (encoder + decoder,
bf16 autocast) on data already on the GPU, for three recipes side by side in one run:

    eager_ref   eager PyTorch, SDPA with the dense (B, 1, N, N) prefix mask (the reference frameworks)
    flex        torch.compile per block + FlexAttention with the prefix BlockMask
    aimv2       torch.compile per block + our Triton kernels (attention, RMSNorm+residual, SwiGLU, loss)
    aimv2_fc13  aimv2 with the MLP's fc1 and fc3 as one GEMM (model.fused_fc13)
    aimv2_attn  torch.compile per block + our attention kernel only; the rest are the references as in
                flex (RMSNorm, SwiGLU compiled in the blocks, losses eager): do the fused kernels earn
                their place in the step?

A `--recipes` entry `name@B` runs that recipe at batch B; `--also-batch 256,...` appends `aimv2@B`
entries (the throughput curve). An entry whose batch does not fit is said and skipped. `--gpu-quick`
runs eager_ref, aimv2, flex, aimv2_fc13, aimv2@256, aimv2_attn in that order; under --time-left an
entry starts only when the time left covers its estimate (RECIPE_MIN_S until a compiled recipe has
run in this process, then 1.2 x the measured time of one, with its steps scaled to the batch).

For each: images/s, achieved TFLOP/s and MFU (FLOPs from `aimv2.model.flops_per_sample`, against the
bf16 matmul ceiling measured in the same run and against the datasheet peak), peak memory, and the
share of GPU time in attention / GEMMs / norms+activations / losses / optimizer / other, from a
torch.profiler trace (kernel-name rules in `CATEGORIES`). `--max-batch` also searches each recipe's
largest batch (halving on OOM). `--real-data SHARDS` then runs the `aimv2` recipe on the GPU decode
pipeline (DALI when installed, else the torch backend) and reports the data-wait share.

    python benchmarks/bench_step.py --preset aimv2-large --batch 128 [--max-batch] [--real-data 'shards/{0..9}.tar']
    python benchmarks/bench_step.py --gpu-quick      # `make gpu`: aimv2-large, B=128, GPU_QUICK_RUNS in
                                                     # order, each while --time-left covers it
    python benchmarks/bench_step.py --quick          # CPU smoke run (tiny model), results to a temp dir

Dynamo is reset before each recipe is built: every recipe compiles `Block.forward` (fullgraph) into
the same code object's cache, and without a reset the cache entries of all recipes and batch sizes
add up to Dynamo's recompile limit (FailOnRecompileLimitHit, every row lost).

Rows (CONVENTIONS.md schema) go to benchmarks/results/step-<device>-<date>.json, each appended as its
recipe is measured (SIGINT stops the run with them kept, exit code 130); `pass` = "step", with
`images_per_s`, `mfu`, `mfu_datasheet`, `peak_mem_mb`, `profile_share`, and `top_kernels`: the 25
most expensive GPU kernels of the profiled steps (name, category, calls and ms per step, share of GPU
time; for memory-bound ones an estimate of the bytes they move and the GB/s they reach; `kernel_table`).
`--trace DIR` also writes the profiler trace of each recipe (gzipped Chrome / Perfetto JSON).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES = {  # name -> (attn_backend, impl, compile, other ModelConfig fields)
    "eager_ref": ("sdpa", "torch", False, {}),
    "flex": ("flex", "torch", True, {}),
    "aimv2": ("triton", "triton", True, {}),
    "aimv2_fc13": ("triton", "triton", True, {"fused_fc13": True}),     # fc1 + fc3 as one GEMM (model.py)
    "aimv2_attn": ("triton", "torch", True, {}),        # our attention, the references elsewhere
}
GPU_QUICK_RUNS = "eager_ref,aimv2,flex,aimv2_fc13,aimv2@256,aimv2_attn"

# NOTE: what a compiled recipe of aimv2-large is assumed to need (Inductor compile of the encoder and
# decoder blocks, forward and backward, then 13 steps and the profile) until one has run in this
# process; the H200 call of 2026-11-29 ran eager_ref, aimv2 and flex in 92 s of stage time in all.
RECIPE_MIN_S = 60.0


class RecipeClock:
    """Estimates of a recipe entry's wall time, from the compiled entries this process has run."""

    def __init__(self, default_s: float = RECIPE_MIN_S):
        self.default_s, self.runs = default_s, []        # (wall s, batch, seconds of timed steps)

    def record(self, wall_s: float, B: int, step_ms: float, steps: int) -> None:
        self.runs.append((wall_s, B, step_ms * steps / 1e3))

    def estimate(self, B: int) -> float:
        """1.2 x the slowest compiled entry so far, its steps' time scaled from its batch to B
        (compilation does not grow with the batch); RECIPE_MIN_S before any has run."""
        if not self.runs:
            return self.default_s
        return max(1.2 * (wall + steps_s * (B / b - 1.0)) for wall, b, steps_s in self.runs)


def parse_runs(spec: str, batch: int) -> list[tuple[str, int]]:
    """'eager_ref,aimv2@256' -> [('eager_ref', batch), ('aimv2', 256)], each (recipe, batch) once (as
    `--also-batch` at --batch's own size did before: not timed twice); ValueError names a bad entry."""
    runs = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        name, _, b = entry.partition("@")
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; expected names from {list(RECIPES)}")
        if b and not (b.isdigit() and int(b) > 0):
            raise ValueError(f"{entry!r}: the batch after @ must be a positive integer")
        runs.append((name, int(b) if b else batch))
    return list(dict.fromkeys(runs))

CATEGORIES = [  # first match wins; lower-case substring rules on GPU kernel names
    ("attention", ("prefix_attention", "flash", "fmha", "attn", "flex", "sdpa", "cudnn_mha", "softmax")),
    ("losses", ("patch_l2", "cross_entropy", "nll_loss", "log_softmax")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused_adam")),
    ("gemm", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "sm90", "sm80", "cublas", "aten::mm", "addmm",
              "bmm", "conv")),
    ("norms_activations", ("rms", "swiglu", "silu", "norm", "triton_poi", "triton_red", "triton_per",
                           "elementwise", "vectorized", "reduce")),
]


def categorize(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def make_batch(cfg, B, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    text = torch.randint(2, cfg.vocab_size, (B, cfg.text_len), generator=g)
    text[:, 40:] = cfg.pad_id
    prefix = torch.randint(1, cfg.num_patches, (B,), generator=g)
    return images, text.to(device), prefix.to(device)


def build(recipe, preset, img_size, device, float8: dict | None = None):
    """(cfg, model, optimizer) of `recipe`; `float8`: aimv2.train.float8.convert's keyword arguments
    (mode, min_dim, emulate) to run its linears as torchao float8 GEMMs (benchmarks/bench_fp8.py)."""
    from aimv2.model import AIMv2Pretrainer
    from aimv2.presets import get_preset
    from aimv2.train.trainer import compile_blocks
    attn, impl, comp, extra = RECIPES[recipe]
    torch._dynamo.reset()             # one recipe's compiled blocks never count against the next's
    cfg = get_preset(preset, img_size=img_size, attn_backend=attn, impl=impl, **extra)
    model = AIMv2Pretrainer(cfg).to(device)
    if float8:                        # before compile, as the trainer does (run.float8)
        from aimv2.train.float8 import convert
        convert(model, **float8)
    if comp:
        compile_blocks(model)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    return cfg, model, opt


def step_fn(model, opt, device):
    bf16 = device.type == "cuda"

    def step(images, text, prefix):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images, text, prefix)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out["loss"].detach()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batch, device, warmup, iters):
    for _ in range(warmup):
        step(*batch)
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step(*batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]      # noqa: E731
    return q(0.5), q(0.2), q(0.8)


MEMORY_BOUND = ("norms_activations", "losses", "optimizer", "other")
TOP_KERNELS = 25
VIEW_OPS = {f"aten::{n}" for n in ("select", "slice", "view", "_unsafe_view", "detach", "t", "transpose", "expand",
                                   "as_strided", "unsqueeze", "squeeze", "permute", "reshape", "alias", "unbind",
                                   "split", "split_with_sizes", "chunk", "narrow", "empty", "empty_like",
                                   "empty_strided", "resolve_conj", "resolve_neg")}


def _input_bytes(shapes, types) -> int:
    """Bytes of an op's tensor inputs (profiler record_shapes: shapes and dtype names)."""
    size = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2, "double": 8, "long int": 8, "int": 4,
            "bool": 1, "unsigned char": 1, "signed char": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}
    total = 0
    for shp, ty in zip(shapes or (), types or ()):
        if isinstance(shp, (list, tuple)) and shp and all(isinstance(d, int) for d in shp) and ty in size:
            n = 1
            for d in shp:
                n *= d
            total += n * size[ty]
    return total


def kernel_table(kernels, steps: int, top: int = TOP_KERNELS) -> tuple[dict, list[dict]]:
    """(share of time per category, the `top` most expensive kernels) from `kernels`, an iterable of
    (kernel name, total us over `steps` steps, calls over `steps` steps, bytes moved per call or None).

    Rows: name, category, calls (per step), ms (per step), share (of all kernel time), and for the
    memory-bound categories with a byte count: bytes (per step, an estimate: the launching op's
    inputs read once plus one output as large as its largest input; a lower bound for ops with
    several outputs) and gbps (bytes / kernel time). Equivalent to sorting the profiler's kernel
    averages by device time."""
    agg: dict[str, list] = {}
    for name, us, calls, nbytes in kernels:
        a = agg.setdefault(name, [0.0, 0, 0, True])
        a[0] += us
        a[1] += calls
        if nbytes is None:
            a[3] = False
        else:
            a[2] += nbytes * calls
    total = sum(a[0] for a in agg.values()) or 1.0
    share: dict[str, float] = {}
    for name, a in agg.items():
        c = categorize(name)
        share[c] = share.get(c, 0.0) + a[0] / total
    rows = []
    for name, (us, calls, nbytes, known) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        cat = categorize(name)
        row = {"name": name[:120], "category": cat, "calls": round(calls / steps, 2),
               "ms": round(us / 1e3 / steps, 4), "share": round(us / total, 4)}
        if cat in MEMORY_BOUND and known and nbytes and us > 0:
            row.update(bytes=int(nbytes / steps), gbps=round(nbytes / (us * 1e-6) / 1e9, 1))
        rows.append(row)
    return {k: round(v, 4) for k, v in sorted(share.items(), key=lambda kv: -kv[1])}, rows


def _profiled_kernels(prof, cuda: bool):
    """(name, us, calls, bytes per call or None) per kernel (CUDA) or CPU op (self time) of a trace.
    Kernel times come from the profiler's averages (device events only); bytes from the CPU op that
    launched each kernel (`FunctionEvent.kernels`, input shapes recorded), None where not found."""
    def op_bytes(ev) -> int:
        shapes, types = getattr(ev, "input_shapes", None) or (), getattr(ev, "input_dtypes", None) or ()
        return _input_bytes(shapes, types) + max((_input_bytes([s], [t]) for s, t in zip(shapes, types)), default=0)

    if not cuda:                                    # CPU ops by self time; views move no bytes
        for ev in prof.events():
            if ev.self_cpu_time_total > 0:
                yield ev.name, ev.self_cpu_time_total, 1, None if ev.name in VIEW_OPS else op_bytes(ev) or None
        return
    per_call: dict[str, list] = {}
    try:                                            # bytes are extra: a profiler change costs them, not the row
        for ev in prof.events():                    # CPU ops, each with the kernels it launched
            for k in getattr(ev, "kernels", None) or ():
                per_call.setdefault(k.name, []).append(op_bytes(ev))
    except Exception as e:                          # noqa: BLE001
        print(f"bench_step: kernel byte counts unavailable ({type(e).__name__}: {e})", file=sys.stderr)
        per_call = {}
    for ev in prof.key_averages():
        if getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        if ev.device_time_total <= 0:
            continue
        b = per_call.get(ev.key)
        yield ev.key, ev.device_time_total, ev.count, (sum(b) / len(b) if b and all(b) else None)


def profile_step(step, batch, device, iters=3, trace_dir=None, tag="") -> tuple[dict, list[dict]]:
    """Profile `iters` steps: (share of GPU time per category, the top kernels table; kernel_table),
    and with `trace_dir` the Chrome / Perfetto trace, gzipped (`<trace_dir>/step-<tag>.json.gz`)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(iters):
            step(*batch)
        sync(device)
    if trace_dir is not None:
        import gzip
        import tempfile
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(Path(trace_dir) / f"step-{tag}.json.gz", "wb") as dst:
                dst.write(src.read())
    return kernel_table(_profiled_kernels(prof, cuda), iters)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def largest_batch(recipe, args, device, start):
    B = start
    while B >= 1:
        try:
            cfg, model, opt = build(recipe, args.preset, args.img_size, device, getattr(args, "float8", None))
            step_fn(model, opt, device)(*make_batch(cfg, B, device))
            sync(device)
            return B
        except Exception as e:          # noqa: BLE001 - OOM surfaces as several exception types
            if not is_oom(e):
                raise
            B //= 2
        finally:
            model = opt = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


def run_recipe(recipe, B, args, device, ceilings, common):
    from _common import result_row
    from aimv2.model import flops_per_sample
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    float8 = getattr(args, "float8", None)
    cfg, model, opt = build(recipe, args.preset, args.img_size, device, float8)
    step = step_fn(model, opt, device)
    batch = make_batch(cfg, B, device)
    ms, p20, p80 = (t * 1e3 for t in time_steps(step, batch, device, args.warmup, args.iters))
    ips = B / (ms / 1e3)
    tflops = flops_per_sample(cfg) * ips / 1e12
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    share, top = {}, []
    if args.profile:                    # the timing is the row; a failed profile only leaves its fields empty
        try:
            share, top = profile_step(step, batch, device, trace_dir=args.trace, tag=f"{recipe}-B{B}")
        except Exception as e:          # noqa: BLE001
            print(f"{recipe:>10}  profile failed ({type(e).__name__}: {e}); row kept without it", file=sys.stderr)
    row = result_row(op="train_step", pass_="step", shape=f"B={B},S={cfg.img_size},N={cfg.num_patches}",
                     dtype="bf16" if device.type == "cuda" else "fp32",
                     provider=f"{recipe}_{float8['mode']}" if float8 else recipe, ms=ms,
                     ms_p20=p20, ms_p80=p80, tflops=tflops,
                     pct_of_ceiling=100 * tflops / ceilings["bf16_tflops"] if ceilings.get("bf16_tflops") else None,
                     peak_mem_mb=peak, **common)
    row.update(images_per_s=ips, preset=args.preset, batch=B,
               mfu=tflops / ceilings["bf16_tflops"] if ceilings.get("bf16_tflops") else None,
               mfu_datasheet=tflops / ceilings["datasheet_bf16_tflops"] if ceilings.get("datasheet_bf16_tflops") else None,
               profile_share=share, top_kernels=top)
    print(f"{row['provider']:>10}  B={B:<4} {ms:9.1f} ms/step  {ips:9.1f} img/s  {tflops:7.1f} TFLOP/s  "
          f"MFU {100 * (row['mfu'] or 0):5.1f}%  peak {peak or 0:8.0f} MB  {share}")
    return row


def run_real_data(args, device, B, common):
    """The aimv2 recipe fed by the decode pipeline: data-wait share of the step time."""
    from _common import result_row
    from aimv2.data import DataConfig, build_loader
    cfg, model, opt = build("aimv2" if device.type == "cuda" else "eager_ref", args.preset, args.img_size, device)
    step = step_fn(model, opt, device)
    loader = build_loader(DataConfig(shards=args.real_data, image_size=cfg.img_size, batch_size=B,
                                     device=str(device), num_workers=args.workers))
    it = iter(loader)
    wait = total = 0.0
    n = 0
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        batch = next(it)
        sync(device)
        t1 = time.perf_counter()
        step(batch["images"], batch["text"], batch["prefix_len"])
        sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            wait, total, n = wait + (t1 - t0), total + (t2 - t0), n + 1
    row = result_row(op="train_step_real_data", pass_="step", shape=f"B={B},S={cfg.img_size}",
                     dtype="bf16" if device.type == "cuda" else "fp32", provider=f"aimv2+{loader.backend if hasattr(loader, 'backend') else 'loader'}",
                     ms=1e3 * total / n, **common)
    row.update(images_per_s=B * n / total, data_wait_pct=100 * wait / total, stats=loader.stats())
    print(f"real data: {B * n / total:.1f} img/s, data wait {100 * wait / total:.1f}%")
    return row


def time_for(args, clock: RecipeClock, t_start: float, recipe: str, B: int) -> bool:
    """False (said so) when --time-left does not cover a compiled entry's estimated time."""
    left = None if args.time_left is None else args.time_left - (time.monotonic() - t_start)
    need = clock.estimate(B)
    if left is not None and RECIPES[recipe][2] and left < need:
        print(f"{recipe:>10}  B={B:<4} skipped: {left:.0f} s left, it needs ~{need:.0f} s")
        return False
    return True


def run_entries(runs, args, device, ceilings, common, results, clock: RecipeClock, t_start: float) -> None:
    """Each (recipe, batch) entry in order, its row (with `wall_s`, the entry's seconds) added as it
    ends; an entry at another batch than --batch that does not fit is said and skipped."""
    steps_per_run = args.warmup + args.iters + (3 if args.profile else 0)
    for r, B in runs:
        if not time_for(args, clock, t_start, r, B):
            continue
        t0 = time.monotonic()
        try:
            row = run_recipe(r, B, args, device, ceilings, common)
        except Exception as e:    # noqa: BLE001 - OOM surfaces as several exception types
            if B == args.batch or not is_oom(e):
                raise
            print(f"{r:>10}  B={B:<4} does not fit in device memory (skipped)")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row["wall_s"] = round(time.monotonic() - t0, 1)
        if RECIPES[r][2]:
            clock.record(row["wall_s"], B, row["ms"], steps_per_run)
        results.add(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="aimv2-large")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--recipes", default=None,
                    help="comma-separated, each `name` or `name@B` (default eager_ref,flex,aimv2; --gpu-quick: "
                         f"{GPU_QUICK_RUNS})")
    ap.add_argument("--max-batch", action="store_true", help="also each recipe at its largest batch")
    ap.add_argument("--also-batch", default=None,
                    help="comma-separated batch sizes at which the aimv2 recipe is also timed, after the recipes "
                         "(appends aimv2@B entries); one that does not fit is said and skipped")
    ap.add_argument("--real-data", default=None, help="shards for the decode-pipeline run")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="also write each recipe's profiler trace (3 steps, Chrome / Perfetto JSON, gzipped) to DIR")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 2 steps")
    ap.add_argument("--gpu-quick", action="store_true",
                    help="the short GPU profile of `make gpu`: 3 warm-up and 10 timed steps per recipe")
    ap.add_argument("--time-left", type=float, default=None,
                    help="seconds this run may take: a compiled entry whose estimate (RecipeClock) exceeds "
                         "the time left is skipped (said so), the others still run")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp dir with --quick)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    if args.gpu_quick:
        args.warmup, args.iters = 3, 10
    also = [f"aimv2@{b.strip()}" for b in (args.also_batch or "").split(",") if b.strip()]

    from _common import finish, load_ceilings, result_file
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("bench_step: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1") if device.type == "cpu" else None
        args.preset, args.img_size, args.batch, args.warmup, args.iters = "aimv2-tiny", 56, 2, 1, 2
    spec = ",".join([args.recipes or (GPU_QUICK_RUNS if args.gpu_quick else "eager_ref,flex,aimv2"), *also])
    try:
        runs = parse_runs(spec, args.batch)
    except ValueError as e:
        ap.error(f"--recipes / --also-batch: {e}")
    if args.quick and device.type == "cpu":  # FlexAttention has no backward on CPU; compile is slow there
        runs = [(r, B) for r, B in runs if r == "eager_ref" or B != args.batch]
    ceilings = load_ceilings(args.ceilings) if device.type == "cuda" or args.ceilings else {}
    common = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    results = result_file("step", args.out, args.quick, ceilings)

    clock = RecipeClock()
    try:
        run_entries(runs, args, device, ceilings, common, results, clock, t_start)
        if args.max_batch and device.type == "cuda":
            for r in dict.fromkeys(r for r, _ in runs):
                B = largest_batch(r, args, device, 512) if time_for(args, clock, t_start, r, 512) else 0
                if B and B != args.batch:
                    results.add(run_recipe(r, B, args, device, ceilings, common))
        if args.real_data:
            results.add(run_real_data(args, device, args.batch, common))
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


if __name__ == "__main__":
    sys.exit(main())
