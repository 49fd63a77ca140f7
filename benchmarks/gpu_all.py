"""`make gpu`: every GPU number of this project in one time-boxed call.

    make gpu                                      # set-up (benchmarks/gpu_all.sh), then this driver
    python benchmarks/gpu_all.py                  # GPU: the stages below under one 480 s deadline
    python benchmarks/gpu_all.py --deadline 300   # another overall deadline (make gpu GPU_DEADLINE=300)
    python benchmarks/gpu_all.py --dry            # dry mode (the default without CUDA)

Stages, in order. Each runs as a subprocess in its own process group and is stopped at its time box
by SIGINT a grace period (15 s) before the box ends (the benchmarks keep every row measured so far,
pytest writes its junit xml), then SIGTERM at the box's end, then SIGKILL:

    stage      GPU box (s)  what
    tests        150    pytest -n 8 over the GPU-relevant tests (every kernel test incl. the bf16
                        cases the interpreter skips, compile / opcheck, model triton-vs-sdpa, the
                        transformers patch, the CUDA train test)              -> tests-*.xml (junit)
    ceilings      15    copy GB/s (1 GiB device-to-device), bf16 matmul TFLOP/s (8192^3)
                                                                              -> ceilings-*.json
    kernels       60    bench_kernels.py --gpu-quick (RMSNorm D=1024 +/- residual, SwiGLU H=2816,
                        the patch loss; fwd, bwd, fwdbwd; aimv2, eager_ref, compile_ref)
                                                                              -> kernels-*.json
    attention    110    bench_attention.py --gpu-quick (encoder N=256 and 1024, decoder N=334; aimv2,
                        sdpa_dense, sdpa_flash_causal, sdpa_cudnn_causal, compiled flex)
                                                                              -> attention-*.json
    step         120    bench_step.py --gpu-quick (aimv2-large, B=128: eager_ref, aimv2, flex only if
                        time is left): img/s, MFU against the measured ceiling, peak memory
                                                                              -> step-*.json
    (before: set-up and the device report, ~15 s; after: the summary, 10 s kept in reserve)

The deadline counts from the start of `make gpu` (--started-at). A stage's box is the time left minus
the budgets of the stages after it and the reserve: a stage that ends early passes its time on, and
none eats into a later stage's budget. Every file goes to $OUT (or --out), else benchmarks/results/:
the log gpu_all-*.log, the junit xml, the four result files (one JSON list each, rewritten after every
row) and summary-*.md: seven files (the device tool returns at most eight). The summary (stage
status, test counts and failures, every aimv2 row's speed-up over each baseline) ends the output.

Without CUDA the same stages run in dry mode: tiny shapes, the Triton interpreter, a short deadline,
rows with device "cpu", results in a temp dir unless --out / $OUT is given (tests/test_gpu_all.py).
It takes 30-90 s on a 2-core machine; its deadline is 180 s.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

GPU_TESTS = ["tests/test_rms_norm.py", "tests/test_swiglu.py", "tests/test_patch_l2_loss.py",
             "tests/test_patch_l2_loss_packed.py", "tests/test_model_packed.py::test_packed_step_has_no_host_sync",
             "tests/test_prefix_attention.py", "tests/test_kernels_inductor.py",
             "tests/test_kernels_package.py", "tests/test_model_impl_triton.py",
             "tests/test_model_triton_attention.py", "tests/test_eval_hf_patch.py",
             "tests/test_train_run.py::test_gpu_defaults_bf16_compiled_triton"]
DRY_TESTS = ["tests/test_swiglu.py", "-k", "matches_fp64 and one-row"]
# dry mode: the --quick smoke profiles, cut to one case each (plumbing, not numbers)
DRY_ARGS = {"kernels": ["--ops", "swiglu"], "attention": ["--shapes", "encoder-256", "--providers",
                                                          "aimv2,sdpa_dense"], "step": []}

# name -> (GPU budget s, dry budget s); the order is the run order
# (dry budgets are generous: a loaded 2-core CI machine runs the dry stages in 30-90 s)
BUDGETS = {"tests": (150, 40), "ceilings": (15, 15), "kernels": (60, 30), "attention": (110, 35),
           "step": (120, 45)}
RESERVE_S = {False: 10.0, True: 5.0}          # kept for the summary (GPU, dry)
DEADLINE_S = {False: 480.0, True: 180.0}
GRACE_S = {False: 15.0, True: 10.0}             # SIGINT -> SIGTERM -> SIGKILL
BASELINES = {"kernels": ("compile_ref", "eager_ref"),
             "attention": ("flex", "sdpa_dense", "sdpa_flash_causal", "sdpa_cudnn_causal"),
             "step": ("flex", "eager_ref")}


@dataclass
class Stage:
    name: str
    argv: list[str]
    budget_s: float
    results: list[str] = field(default_factory=list)        # result kinds ("kernels") it writes
    # filled in by run_stage
    status: str = "not run"
    seconds: float = 0.0
    rc: int | None = None


@dataclass
class Context:
    out: Path
    dry: bool
    end: float                                   # time.monotonic() of the overall deadline
    log: object = None
    stop: str | None = None                      # set when the driver itself is told to stop


def _tag() -> tuple[str, str]:
    from _common import device_name
    dev = re.sub(r"[^A-Za-z0-9.]+", "-", device_name()).strip("-")
    return dev, _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def out_path(out: Path, what: str, ext: str = "json") -> Path:
    """<out>/<what>-<device>-<date>.<ext>, the CONVENTIONS.md name (what _common.ResultFile writes)."""
    dev, date = _tag()
    return out / f"{what}-{dev}-{date}.{ext}"


def say(ctx: Context, line: str) -> None:
    print(line, flush=True)
    if ctx.log is not None:
        ctx.log.write(line + "\n")
        ctx.log.flush()


# ------------------------------------------------------------------------------- the stages
def stage_plan(py: str, out: Path, dry: bool) -> list[Stage]:
    """The five stages with their commands (see the module docstring)."""
    col = 1 if dry else 0
    quick = ["--quick"] if dry else ["--gpu-quick"]
    ceil = ["--ceilings", str(out_path(out, "ceilings"))]
    junit = out_path(out, "tests", "xml")
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE",
             f"--junitxml={junit}"]
    if not dry:
        tests += ["--timeout=300"] + (["-n", "8"] if _has("xdist") else [])
    tests += DRY_TESTS if dry else GPU_TESTS
    bench = lambda name: [py, str(HERE / f"bench_{name}.py"), *quick, "--out", str(out), *ceil,  # noqa: E731
                          *(DRY_ARGS[name] if dry else [])]
    plan = [Stage("tests", tests, BUDGETS["tests"][col]),
            Stage("ceilings", [py, str(HERE / "gpu_all.py"), "--measure-ceilings", "--out", str(out)]
                  + (["--dry"] if dry else []), BUDGETS["ceilings"][col], ["ceilings"]),
            Stage("kernels", bench("kernels"), BUDGETS["kernels"][col], ["kernels"]),
            Stage("attention", bench("attention"), BUDGETS["attention"][col], ["attention"]),
            Stage("step", bench("step"), BUDGETS["step"][col], ["step"])]
    # the step benchmark skips its last compiled recipe itself when its box would cut it short
    plan[-1].argv += ["--time-left", "{limit}"]
    return plan


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def stage_limit(plan: list[Stage], i: int, now: float, end: float, reserve: float,
                scale: float = 1.0) -> float:
    """Seconds stage i may run: the time left minus the (scaled) budgets of the later stages and
    the reserve."""
    later = scale * sum(s.budget_s for s in plan[i + 1:])
    return max(0.0, end - now - later - reserve)


def _pump(stream, ctx: Context) -> None:
    for line in iter(stream.readline, ""):
        say(ctx, line.rstrip("\n"))
    stream.close()


def _signal_group(p: subprocess.Popen, sig) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def run_stage(stage: Stage, limit_s: float, ctx: Context, env: dict, grace_s: float) -> Stage:
    """Run one stage in its own process group until it exits, the driver is told to stop, or its
    box of limit_s has grace_s left (at most half of it); then SIGINT (let it flush), SIGTERM
    grace_s later, SIGKILL grace_s after that. A stage that obeys SIGINT ends inside its box."""
    argv = [a.replace("{limit}", f"{limit_s:.0f}") for a in stage.argv]
    say(ctx, f"=== stage {stage.name}: box {limit_s:.0f} s: {' '.join(argv)}")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace", start_new_session=True)
    reader = threading.Thread(target=_pump, args=(p.stdout, ctx), daemon=True)
    reader.start()
    stopped = None
    sigint_at = max(limit_s - grace_s, limit_s / 2)
    while p.poll() is None and stopped is None:
        if ctx.stop:
            stopped = ctx.stop
        elif time.monotonic() - t0 >= sigint_at:
            stopped = "time box"
        else:
            time.sleep(0.1)
    if stopped is not None:
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
            if p.poll() is not None:
                break
            say(ctx, f"=== stage {stage.name}: {stopped} after {time.monotonic() - t0:.0f} s: "
                     f"{signal.Signals(sig).name}")
            _signal_group(p, sig)
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
    p.wait()
    reader.join(timeout=10)
    stage.seconds, stage.rc = time.monotonic() - t0, p.returncode
    if stopped is not None:
        stage.status = f"stopped ({stopped}, rc {p.returncode})"
    else:
        stage.status = "ok" if p.returncode == 0 else f"failed (rc {p.returncode})"
    say(ctx, f"=== stage {stage.name}: {stage.status} in {stage.seconds:.1f} s")
    return stage


def run_all(plan: list[Stage], ctx: Context, env: dict, reserve: float, grace_s: float) -> list[Stage]:
    """Run the stages in order under ctx.end; a stage with under 1 s left is skipped. A deadline
    shorter than the budgets' sum scales every budget down alike."""
    total = sum(s.budget_s for s in plan)
    scale = min(1.0, max(0.0, ctx.end - time.monotonic() - reserve) / total) if total else 1.0
    for i, stage in enumerate(plan):
        if ctx.stop:
            stage.status = f"skipped ({ctx.stop})"
            continue
        limit = stage_limit(plan, i, time.monotonic(), ctx.end, reserve, scale)
        if limit < 1.0:
            stage.status = "skipped (no time left)"
            say(ctx, f"=== stage {stage.name}: skipped, no time left before the deadline")
            continue
        run_stage(stage, limit, ctx, env, grace_s)
    return plan


# ------------------------------------------------------------------------------- the summary
def _load(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def junit_counts(path: Path) -> dict | None:
    """{tests, failures, errors, skipped, failed: [names]} from a junit xml, None when absent."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in ("tests", "failures", "errors", "skipped"):
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"].append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return counts


def _x(base: float | None, ours: float | None) -> str:
    return f"{base / ours:.2f}x" if base and ours else "-"


def speedup_table(kind: str, rows: list[dict]) -> list[str]:
    """One line per aimv2 row: its time and rate, and baseline ms / aimv2 ms for each baseline
    measured in the same run (> 1: aimv2 is faster), with the mask each baseline computed."""
    def key(r):
        return (r.get("op"), r.get("pass"), r.get("shape"), r.get("dtype"), r.get("batch"))
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r.get("provider")] = r
    bases = BASELINES[kind]
    if kind == "step":
        head = ["recipe", "shape", "ms/step", "img/s", "MFU %", "peak MB"]
        lines = list(rows)
    else:
        head = ["op", "pass", "shape", "aimv2 ms", "GB/s" if kind == "kernels" else "TFLOP/s", "% ceiling"]
        lines = [r for r in rows if r.get("provider") == "aimv2"]
    head += [f"vs {b}" for b in bases]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lines:
        peers = by[key(r)]
        if kind == "step":
            cells = [r.get("provider"), r.get("shape"), f"{r['ms']:.1f}", f"{r.get('images_per_s') or 0:.1f}",
                     f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-",
                     f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-"]
        else:
            rate = r.get("gbps") if kind == "kernels" else r.get("tflops")
            pct = r.get("pct_of_ceiling")
            cells = [r.get("op"), r.get("pass"), r.get("shape"), f"{r['ms']:.3f}",
                     f"{rate:.1f}" if rate is not None else "-", f"{pct:.1f}" if pct is not None else "-"]
        for b in bases:
            peer = peers.get(b)
            if peer is None or peer is r:
                cells.append("-")
                continue
            mask = f" {peer['mask']}" if peer.get("mask") else ""
            cells.append(_x(peer.get("ms"), r.get("ms")) + mask)
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def summary(plan: list[Stage], out: Path, dry: bool, total_s: float) -> str:
    dev, date = _tag()
    lines = [f"# make gpu summary: {dev}, {date}{' (DRY RUN: CPU, interpreter, tiny shapes)' if dry else ''}",
             "", f"Total {total_s:.0f} s. Speed-ups are baseline ms / aimv2 ms (> 1: aimv2 faster); the "
             "word after each is the mask the baseline computed.", "",
             "| stage | status | s | rows |", "|---|---|---:|---:|"]
    for s in plan:
        n = sum(len(_load(out_path(out, w))) for w in s.results)
        if s.name == "tests":
            c = junit_counts(out_path(out, "tests", "xml"))
            n = "-" if c is None else c["tests"]
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {n} |")
    c = junit_counts(out_path(out, "tests", "xml"))
    lines.append("")
    if c is None:
        lines.append("tests: no junit xml")
    else:
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        lines.append(f"tests: {passed} passed, {c['failures']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped")
        lines += [f"- FAILED {name}" for name in c["failed"][:20]]
    ceil = _load(out_path(out, "ceilings"))
    if ceil:
        cc = ceil[0].get("ceilings", {})
        lines.append(f"ceilings: copy {cc.get('copy_gbps') or 0:,.0f} GB/s, bf16 matmul "
                     f"{cc.get('bf16_tflops') or 0:,.1f} TFLOP/s")
    for kind in ("kernels", "attention", "step"):
        rows = _load(out_path(out, kind))
        if rows:
            lines += ["", f"## {kind}", ""] + speedup_table(kind, rows)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- device report
def device_report() -> list[str]:
    import platform

    import torch
    lines = [f"python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError as e:
        lines.append(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
                     f"capability {p.major}.{p.minor}")
    else:
        lines.append("no CUDA device: dry mode")
    if shutil.which("nvidia-smi"):
        q = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
             "temperature.gpu,memory.used,memory.total")
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                           text=True, timeout=30)
        lines += ["nvidia-smi: " + ln for ln in (r.stdout or r.stderr).strip().splitlines()]
    else:
        lines.append("nvidia-smi: not on PATH")
    from _common import git_sha
    lines.append(f"git {git_sha()}")
    return lines


def measure_ceilings_stage(out: Path, dry: bool) -> int:
    """The ceilings stage: two rows (copy, bf16 matmul) whose `ceilings` the later stages read."""
    if not dry:
        os.environ.pop("TRITON_INTERPRET", None)
    from _common import ResultFile, measure_ceilings, result_row
    copy_mb, n = (16, 256) if dry else (1024, 8192)
    c = measure_ceilings(copy_mb, n, cpu=dry)
    if not c:
        print("ceilings: no CUDA device (use --dry)", file=sys.stderr)
        return 2
    res = ResultFile("ceilings", out, extra={"ceilings": c})
    cmd = "gpu_all.py --measure-ceilings"
    res.add(result_row(op="copy", pass_="fwd", shape=f"{copy_mb} MiB", dtype="uint8", provider="torch",
                       ms=2 * copy_mb * 2**20 / (c["copy_gbps"] * 1e9) * 1e3, gbps=c["copy_gbps"],
                       pct_of_ceiling=100.0, command=cmd))
    res.add(result_row(op="matmul", pass_="fwd", shape=f"{n}x{n}x{n}", dtype="bf16", provider="torch",
                       ms=2 * n**3 / (c["bf16_tflops"] * 1e12) * 1e3, tflops=c["bf16_tflops"],
                       pct_of_ceiling=100.0, command=cmd))
    print(f"ceilings: {c}")
    return 0


# ------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadline", type=float, default=None,
                    help="overall seconds (default 480 on a GPU, 180 dry; env GPU_DEADLINE)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results; "
                    "dry: a temp dir)")
    ap.add_argument("--dry", action="store_true", help="dry mode even with CUDA (tiny, interpreter)")
    ap.add_argument("--started-at", type=float, default=None,
                    help="epoch seconds when `make gpu` started (the deadline counts from then)")
    ap.add_argument("--setup-log", default=None, help="a file of set-up output to put first in the log")
    ap.add_argument("--measure-ceilings", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    t_wall = args.started_at or time.time()

    import torch
    dry = args.dry or not torch.cuda.is_available()
    if dry:                               # before any aimv2.kernels import in this process
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out_arg = args.out or os.environ.get("OUT") or None
    if args.measure_ceilings:
        return measure_ceilings_stage(Path(out_arg or HERE / "results"), dry)
    if out_arg is None and dry:
        import tempfile
        out_arg = tempfile.mkdtemp(prefix="aimv2-gpu-dry-")
    out = Path(out_arg or HERE / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or float(os.environ.get("GPU_DEADLINE") or DEADLINE_S[dry])
    end = time.monotonic() + deadline - (time.time() - t_wall)
    dev, date = _tag()
    log_path = out_path(out, "gpu_all", "log")
    with open(log_path, "w") as log:
        ctx = Context(out=out, dry=dry, end=end, log=log)
        if args.setup_log and Path(args.setup_log).is_file():
            log.write(Path(args.setup_log).read_text())
        say(ctx, f"=== make gpu{' (dry mode)' if dry else ''}: deadline {deadline:.0f} s, files in {out}")
        for line in device_report():
            say(ctx, line)

        def on_signal(signum, _frame):             # the caller's limit: stop the stage, then summarise
            ctx.stop = signal.Signals(signum).name
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if dry:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        plan = stage_plan(sys.executable, out, dry)
        run_all(plan, ctx, env, RESERVE_S[dry], GRACE_S[dry])
        text = summary(plan, out, dry, time.time() - t_wall)
        out_path(out, "summary", "md").write_text(text)
        say(ctx, "")
        say(ctx, text)
        files = sorted(p.name for p in out.iterdir() if p.is_file() and (dev in p.name and date in p.name))
        say(ctx, f"=== files in {out}: {', '.join(files)}")
    c = junit_counts(out_path(out, "tests", "xml"))
    failed = any(s.status.startswith("failed") for s in plan) or c is None or c["failures"] or c["errors"]
    return 1 if failed or ctx.stop else 0


if __name__ == "__main__":
    sys.exit(main())
