"""`make gpu` and `make gpu-more`: every GPU number of this project in two time-boxed calls.

    make gpu                                      # set-up (benchmarks/gpu_all.sh), then this driver, --call gpu
    make gpu-more                                 # the second call (--call more)
    python benchmarks/gpu_all.py --plan [--call more]   # the call's stages: order, value, budget, why
    python benchmarks/gpu_all.py --deadline 300   # another overall deadline (make gpu GPU_DEADLINE=300)
    python benchmarks/gpu_all.py --dry            # dry mode (the default without CUDA)

The stages (SPECS: which call, what each writes, the paths it watches) and the README's "Running on
a GPU" table: ceilings in both calls; attention_packed, native, tests, attention, step in `make gpu`
(480 s); sweep_attention, decode, kernels, text_loss, tune_kernels in `make gpu-more` (240 s); fp8 and
hf in `make gpu-extra` (480 s: the [fp8] and [hf-backend] issues' own rows, for the device time left
after the first two, or a later lease).

Order within a call (order_by_value): ceilings (the later stages read them), then stages never run on
a GPU ("new"), then those whose watched code changed since their last committed run ("changed"), then
repeats. The last run of a stage is read from the committed driver logs (benchmarks/results/
gpu_all-<GPU>-<date>.log, gpu_more-...: the `git <sha>` line and `=== stage <name>: <status> in <s> s`),
else from committed GPU rows of its kind (their git_sha). Its budget is 1.1 x that duration + 5 s
(1.5 x when a time box cut it), or its estimate. `fit` keeps, in order, each stage whose budget fits
what the deadline leaves after set-up and the reserve; the others are listed as left out.

Each stage runs as a subprocess in its own process group (SIGINT and SIGTERM reset to their default
in it, whatever the driver inherited) and is stopped at its time box by SIGINT a grace period (15 s)
before the box ends (the benchmarks keep every row measured so far, pytest writes its junit xml), then
SIGTERM at the box's end, then SIGKILL. A stage's box is the time left minus the budgets of the stages
after it and the reserve: a stage that ends early passes its time on. A stage whose `needs` (python
modules, e.g. torchao from benchmarks/gpu_wheels.txt) do not import is skipped with that reason.

Every file goes to $OUT (or --out), else benchmarks/results/: the log, the junit xml (`make gpu`), one
result file per stage (one JSON list each, rewritten after every row) and the summary (stage status,
value and seconds, test counts and failures, every row of ours against each baseline), at most eight
files a call (the device tool returns eight). The summary ends the output.

Without CUDA the same stages run in dry mode: tiny shapes, the Triton interpreter, 300 / 200 s
deadlines, rows with device "cpu", results in a temp dir unless --out / $OUT is given
(tests/test_gpu_all.py).
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
             "tests/test_prefix_attention.py", "tests/test_prefix_attention_varlen.py",
             "tests/test_kernels_inductor.py", "tests/test_kernels_package.py", "tests/test_model_impl_triton.py",
             "tests/test_model_triton_attention.py", "tests/test_eval_hf_patch.py", "tests/test_eval_hub.py",
             "tests/test_linear_cross_entropy.py", "tests/test_train_run.py::test_gpu_defaults_bf16_compiled_triton"]
DRY_TESTS = ["tests/test_swiglu.py", "-k", "matches_fp64 and one-row"]
TEXT_LOSS_SHAPES = "9856:1024:32000,19712:1024:32000"        # T = 77 x 128 and 77 x 256 caption tokens


@dataclass(frozen=True)
class StageSpec:
    """One stage of the GPU plan. `call`: which prepared call runs it ("gpu": `make gpu`, "more":
    `make gpu-more`, "both"); `est_s`: its GPU budget until a committed run has measured it; `dry_s`:
    its budget in dry mode; `results`: the result kinds it writes; `watches`: the paths whose change
    since its last committed run makes that run's rows stale; `needs`: python modules without which
    it is skipped (with that reason), e.g. a wheel that travels with the call (gpu_wheels.txt)."""
    name: str
    call: str
    est_s: float
    dry_s: float
    results: tuple[str, ...] = ()
    watches: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    script: str = ""                          # benchmarks/<script>.py
    gpu_args: tuple[str, ...] = ()
    dry_args: tuple[str, ...] | None = ("--quick",)   # None: not in the dry run (its dry mode is tested apart)
    time_left: bool = False                   # pass --time-left {limit}: it skips parts its box would cut


_ATT = ("kernels/prefix_attention.py", "kernels/_utils.py", "benchmarks/bench_attention.py")
_VARLEN = ("kernels/prefix_attention_varlen.py", "kernels/prefix_attention.py", "kernels/_utils.py",
           "benchmarks/bench_attention.py")
_FUSED = ("kernels/rms_norm.py", "kernels/swiglu.py", "kernels/patch_l2_loss.py", "kernels/patch_l2_loss_packed.py",
          "kernels/_utils.py")
# The plan, in the order of the stages' worth within one value class (see order_by_value).
SPECS = (
    StageSpec("ceilings", "both", 15, 15, ("ceilings",)),
    StageSpec("tests", "gpu", 150, 40, (), ("kernels", "aimv2", "tests")),
    StageSpec("attention", "gpu", 110, 35, ("attention",), _ATT, script="bench_attention",
              gpu_args=("--gpu-quick",),
              dry_args=("--quick", "--shapes", "encoder-256", "--providers", "aimv2,sdpa_dense")),
    StageSpec("attention_packed", "gpu", 75, 30, ("attention_packed",), _VARLEN, script="bench_attention",
              gpu_args=("--packed", "--gpu-quick"), dry_args=("--packed", "--quick")),
    StageSpec("step", "gpu", 120, 45, ("step",), ("kernels", "aimv2/model.py", "aimv2/attention.py",
                                                  "benchmarks/bench_step.py"), script="bench_step",
              gpu_args=("--gpu-quick",), time_left=True),
    StageSpec("native", "gpu", 60, 30, ("native",), _VARLEN + ("aimv2/model.py", "aimv2/packing.py",
                                                               "benchmarks/bench_native.py"),
              script="bench_native"),
    StageSpec("kernels", "more", 60, 30, ("kernels",), _FUSED + ("benchmarks/bench_kernels.py",),
              script="bench_kernels", gpu_args=("--gpu-quick",), dry_args=("--quick", "--ops", "swiglu")),
    StageSpec("text_loss", "more", 90, 45, ("text_loss",), ("kernels/linear_cross_entropy.py",
                                                             "benchmarks/bench_text_loss.py"),
              script="bench_text_loss", gpu_args=("--shapes", TEXT_LOSS_SHAPES)),
    StageSpec("sweep_attention", "more", 150, 40, ("sweep_attention",), _VARLEN + ("benchmarks/sweep_attention.py",),
              script="sweep_attention", gpu_args=("--gpu-quick",)),
    StageSpec("decode", "more", 45, 30, ("decode",), ("benchmarks/bench_decode.py", "aimv2/data"),
              script="bench_decode", gpu_args=("--gpu-quick",)),
    StageSpec("tune_kernels", "more", 90, 35, ("tune_kernels",), _FUSED + ("benchmarks/tune_kernels.py",),
              script="tune_kernels"),
    # issue [fp8]: bf16 vs torchao float8 step rows (aimv2-large, aimv2-1b) and the 300-step loss curve.
    # NOTE 360 s is an estimate: the whole benchmark needs ~7 min (its docstring), so the stage does its
    # parts in order while its box allows. In the third call (make gpu-extra), after make gpu and
    # make gpu-more, whose 480 + 240 s fill most of a 15-minute lease. Not in the dry run
    # (tests/test_train_float8.py runs bench_fp8 --dry).
    StageSpec("fp8", "extra", 360, 60, ("fp8",), ("aimv2/train/float8.py", "aimv2/model.py", "benchmarks/bench_fp8.py",
                                                 "benchmarks/bench_step.py"),
              needs=("torchao",), script="bench_fp8", dry_args=None, time_left=True),
    # issue [hf-backend]: transformers models with attn_implementation="aimv2" vs "sdpa" (Llama- and
    # Siglip-shaped, forward and forward+backward; transformers is in the GPU image). NOTE 75 s is an
    # estimate (4-layer models, do_bench). Not in the dry run (tests/test_hf_bench.py runs bench_hf --dry).
    StageSpec("hf", "extra", 75, 60, ("hf",), ("aimv2/hf", "kernels/prefix_attention.py",
                                              "kernels/prefix_attention_varlen.py", "benchmarks/bench_hf.py"),
              script="bench_hf", dry_args=None),
)
CALLS = {"gpu": "make gpu", "more": "make gpu-more", "extra": "make gpu-extra"}
LOG_NAME = {"gpu": "gpu_all", "more": "gpu_more", "extra": "gpu_extra"}             # <name>-<device>-<date>.log
SUMMARY_NAME = {"gpu": "summary", "more": "summary_more", "extra": "summary_extra"}
RESERVE_S = {False: 10.0, True: 5.0}          # kept for the summary (GPU, dry)
SETUP_S = 15.0                                # set-up and the device report, before the first stage
DEADLINE_S = {("gpu", False): 480.0, ("more", False): 240.0, ("extra", False): 480.0,
              ("gpu", True): 300.0, ("more", True): 200.0, ("extra", True): 60.0}
GRACE_S = {False: 15.0, True: 10.0}             # SIGINT -> SIGTERM -> SIGKILL
BASELINES = {"kernels": ("compile_ref", "eager_ref"), "fp8": ("aimv2",), "hf": ("sdpa",),
             "attention": ("flex", "sdpa_dense", "sdpa_flash_causal", "sdpa_cudnn_causal"),
             "attention_packed": ("aimv2_padded", "flex"), "native": ("padded",),
             "text_loss": ("compile_ref", "eager_ref"), "tune_kernels": ("compile_ref",),
             "decode": ("pil",), "step": ("flex", "eager_ref"),
             "sweep_attention": ("flex", "sdpa_cudnn_causal", "sdpa_dense")}


@dataclass
class Stage:
    name: str
    argv: list[str]
    budget_s: float
    results: list[str] = field(default_factory=list)        # result kinds ("kernels") it writes
    needs: list[str] = field(default_factory=list)
    value: str = "new"                                       # new | changed | repeat (order_by_value)
    last: str = ""                                           # what the value rests on, for the log
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


# ------------------------------------------------------------------------------- the plan
@dataclass
class LastRun:
    """A stage's newest GPU run: from a committed driver log (benchmarks/results/gpu_all-<GPU>-<date>.log,
    with its duration), else from committed GPU result rows of its kind (their git_sha, no duration)."""
    sha: str
    seconds: float | None
    status: str
    log: str


_STAGE_END = re.compile(r"^=== stage (\S+): (ok|stopped \(.*\)|failed \(.*\)) in ([0-9.]+) s$")


def last_runs(results: Path = HERE / "results", specs=SPECS) -> dict[str, LastRun]:
    """Every stage's newest GPU run: the commit it ran and how long it took. CPU (dry) files do not
    count. A stage no driver log timed but whose rows were committed (a hand-run benchmark) counts
    as run at its rows' commit."""
    runs: dict[str, LastRun] = {}
    logs = [p for name in LOG_NAME.values() for p in results.glob(f"{name}-*.log") if "-cpu-" not in p.name]
    for log in sorted(logs, key=lambda p: p.name[-14:]):                              # by date
        sha = ""
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("git ") and not sha:
                sha = line.split()[1]
            m = _STAGE_END.match(line)
            if m:
                runs[m.group(1)] = LastRun(sha, float(m.group(3)), m.group(2), log.name)
    for spec in specs:
        if spec.name in runs or not spec.results:
            continue
        files = sorted((f for k in spec.results for f in results.glob(f"{k}-*.json") if "-cpu-" not in f.name
                        and re.fullmatch(rf"{re.escape(k)}-.+-\d{{4}}-\d{{2}}-\d{{2}}\.json", f.name)),
                       key=lambda p: p.name[-15:])
        if files:
            rows = _load(files[-1])
            if rows:
                runs[spec.name] = LastRun(str(rows[0].get("git_sha") or ""), None, "rows", files[-1].name)
    return runs


def changed_since(sha: str, paths, root: Path = ROOT) -> bool | None:
    """Whether `paths` differ between commit `sha` and the working tree, new untracked files
    included (None: git cannot tell, e.g. the commit is not in this clone)."""
    if not sha or not paths:
        return None
    try:
        r = subprocess.run(["git", "diff", "--quiet", sha, "--", *paths], cwd=root, capture_output=True,
                           timeout=30)
        new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", *paths], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode not in (0, 1) or new.returncode != 0:
        return None
    return r.returncode == 1 or bool(new.stdout.strip())


def gpu_budget(spec: StageSpec, last: LastRun | None) -> float:
    """The stage's GPU budget from its last measured duration: 1.1 x that plus 5 s when it ended by
    itself, 1.5 x when a time box cut it (it needed more); its estimate when no committed log timed
    it. Budgets only choose what fits: a stage that ends early passes its time on to the later ones."""
    if last is None or last.seconds is None:
        return spec.est_s
    factor = 1.5 if last.status.startswith("stopped") else 1.1
    return round(factor * last.seconds + 5.0)


def stage_plan(py: str, out: Path, dry: bool, call: str = "gpu", results: Path = HERE / "results",
               root: Path = ROOT, specs=SPECS) -> list[Stage]:
    """The stages of one prepared call with their commands, budgets and value (see order_by_value)."""
    runs = last_runs(results, specs)
    ceil = ["--ceilings", str(out_path(out, "ceilings"))]
    plan = []
    for spec in specs:
        if spec.call not in (call, "both") or (dry and spec.dry_args is None):
            continue
        last = runs.get(spec.name)
        changed = None if last is None else changed_since(last.sha, spec.watches, root)
        value = "always" if spec.name == "ceilings" else \
            "new" if last is None else "changed" if changed is not False else "repeat"
        if spec.name == "ceilings":
            argv = [py, str(HERE / "gpu_all.py"), "--measure-ceilings", "--out", str(out)] + (["--dry"] if dry else [])
        elif spec.name == "tests":
            argv = _tests_argv(py, out, dry, kernels_changed=changed_since(last.sha, ["kernels"], root)
                               if last else None)
        else:
            argv = [py, str(HERE / f"{spec.script}.py"), *(spec.dry_args if dry else spec.gpu_args),
                    "--out", str(out), *ceil]
        if spec.time_left:                    # it skips the parts its box would cut (step: its last recipe)
            argv += ["--time-left", "{limit}"]
        budget = spec.dry_s if dry else gpu_budget(spec, last)
        took = "" if last is None or last.seconds is None else f" in {last.seconds:.0f} s"
        why = "every call measures its own" if value == "always" else "never run on a GPU" if last is None else \
            f"{last.log}: {last.status}{took} at {last.sha[:10] or '?'}, " + \
            ("watched code changed since" if changed else "git cannot tell" if changed is None else "nothing watched changed")
        plan.append(Stage(spec.name, argv, budget, list(spec.results), list(spec.needs), value, why))
    return order_by_value(plan)


def _tests_argv(py: str, out: Path, dry: bool, kernels_changed: bool | None) -> list[str]:
    """pytest over the GPU-relevant tests; when nothing under kernels/ changed since the last GPU run
    of the tests, only the tests that skip without a GPU (conftest's --gpu-only)."""
    junit = out_path(out, "tests", "xml")
    argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE", f"--junitxml={junit}"]
    if dry:
        return argv + DRY_TESTS
    argv += ["--timeout=300"] + (["-n", "8"] if _has("xdist") else [])
    return argv + ([] if kernels_changed is not False else ["--gpu-only"]) + GPU_TESTS


VALUE_ORDER = ("always", "new", "changed", "repeat")


def order_by_value(plan: list[Stage]) -> list[Stage]:
    """Ceilings first (the later stages read them), then the stages never run on a GPU, then those
    whose watched code changed since their last committed run, then repeats; stable within a class."""
    head = [s for s in plan if s.name == "ceilings"]
    rest = [s for s in plan if s.name != "ceilings"]
    return head + sorted(rest, key=lambda s: VALUE_ORDER.index(s.value))


def plan_text(plan: list[Stage], call: str, deadline: float, dry: bool = False) -> str:
    """The call's stages in run order: value, budget and what the value rests on."""
    how = "dry" if dry else "1.1 x the last measured run + 5 s, or the estimate when none"
    lines = [f"=== plan of {CALLS[call]} (deadline {deadline:.0f} s; budgets: {how}):"]
    for s in plan:
        needs = f", needs {', '.join(s.needs)}" if s.needs else ""
        lines.append(f"  {s.name:18s} {s.value:8s} {s.budget_s:5.0f} s  ({s.last}{needs})")
    return "\n".join(lines)


def fit(plan: list[Stage], available_s: float) -> list[Stage]:
    """The stages that run: in plan order, each whose budget fits in what the ones before it left
    of available_s (a stage too long for what is left is left out, a shorter later one may still
    fit). The others get a status saying why they were left out."""
    chosen, left = [], available_s
    for s in plan:
        if s.budget_s <= left:
            chosen.append(s)
            left -= s.budget_s
        else:
            s.status = f"left out ({s.value}, budget {s.budget_s:.0f} s > {max(left, 0):.0f} s left)"
    return chosen


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


def _default_signals() -> None:
    """In the stage's child before exec: SIGINT and SIGTERM to their default action. A driver started
    with SIGINT ignored (a background job of a non-interactive shell, `nohup`, some CI runners)
    would otherwise pass SIG_IGN on through exec, and its stages would never see the SIGINT that
    asks them to flush their rows."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_stage(stage: Stage, limit_s: float, ctx: Context, env: dict, grace_s: float) -> Stage:
    """Run one stage in its own process group until it exits, the driver is told to stop, or its
    box of limit_s has grace_s left (at most half of it); then SIGINT (let it flush), SIGTERM
    grace_s later, SIGKILL grace_s after that. A stage that obeys SIGINT ends inside its box."""
    argv = [a.replace("{limit}", f"{limit_s:.0f}") for a in stage.argv]
    say(ctx, f"=== stage {stage.name}: box {limit_s:.0f} s: {' '.join(argv)}")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace", start_new_session=True,
                         preexec_fn=_default_signals)
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
    """Run the stages in order under ctx.end; a stage with under 1 s left, or whose `needs` do not
    import, is skipped (with the reason). A deadline shorter than the budgets' sum scales every
    budget down alike."""
    total = sum(s.budget_s for s in plan)
    scale = min(1.0, max(0.0, ctx.end - time.monotonic() - reserve) / total) if total else 1.0
    for i, stage in enumerate(plan):
        if ctx.stop:
            stage.status = f"skipped ({ctx.stop})"
            continue
        missing = [m for m in stage.needs if not _has(m)]
        if missing:
            stage.status = f"skipped ({', '.join(missing)} not installed: see benchmarks/gpu_wheels.txt)"
            say(ctx, f"=== stage {stage.name}: {stage.status}")
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


OURS = {"decode": "nvjpeg", "native": "packed"}                    # default "aimv2"
RATE = {"kernels": ("gbps", "GB/s"), "decode": ("images_per_s", "img/s"), "native": ("images_per_s", "img/s")}
SUMMARY_KINDS = ("kernels", "attention", "attention_packed", "native", "text_loss", "decode", "sweep_attention",
                 "step", "fp8", "hf")


def sweep_winners(rows: list[dict]) -> list[dict]:
    """The sweep's rows cut to the summary: per (shape, pass, timing) the fastest correct aimv2
    candidate (its `config` named in the op column) and the baselines."""
    best = {}
    for r in rows:
        if r.get("provider") == "aimv2" and r.get("correct") and r.get("ms"):
            key = (r.get("shape"), r.get("pass"), r.get("timing"))
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    return [r for r in rows if r.get("provider") != "aimv2" or r is best.get((r.get("shape"), r.get("pass"),
                                                                            r.get("timing")))]


def speedup_table(kind: str, rows: list[dict]) -> list[str]:
    """One line per row of ours: its time and rate, and baseline ms / our ms for each baseline
    measured in the same run (> 1: ours is faster), with the mask each baseline computed."""
    def key(r):
        return (r.get("op"), r.get("pass"), r.get("shape"), r.get("dtype"), r.get("batch"), r.get("timing"))
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r.get("provider")] = r
    bases = BASELINES[kind]
    rate_key, rate_name = RATE.get(kind, ("tflops", "TFLOP/s"))
    if kind in ("step", "fp8"):          # every row; fp8: each against the bf16 recipe (aimv2)
        head = ["recipe", "shape", "ms/step", "img/s", "MFU %", "peak MB"]
        lines = list(rows)
    else:
        head = ["op", "pass", "shape", f"{OURS.get(kind, 'aimv2')} ms", rate_name, "% ceiling"]
        lines = [r for r in rows if r.get("provider") == OURS.get(kind, "aimv2")]
    head += [f"vs {b}" for b in bases]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lines:
        peers = by[key(r)]
        if kind in ("step", "fp8"):
            cells = [r.get("provider"), r.get("shape"), f"{r['ms']:.1f}", f"{r.get('images_per_s') or 0:.1f}",
                     f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-",
                     f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-"]
        else:
            rate, pct = r.get(rate_key), r.get("pct_of_ceiling")
            op = r.get("op") + (f" [{r['config']}]" if r.get("config") else "")
            cells = [op, r.get("pass") + (f" ({r['timing']})" if r.get("timing") else ""), r.get("shape"),
                     f"{r['ms']:.3f}",
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


def summary(plan: list[Stage], out: Path, dry: bool, total_s: float, call: str = "gpu") -> str:
    dev, date = _tag()
    from _common import git_sha
    lines = [f"# {CALLS[call]} summary: {dev}, {date}{' (DRY RUN: CPU, interpreter, tiny shapes)' if dry else ''}",
             "", f"Total {total_s:.0f} s at git {git_sha()}. Speed-ups are baseline ms / our ms (> 1: ours "
             "faster); the word after each is the mask the baseline computed. Value: new (never run on a GPU), "
             "changed (its code changed since its last committed run), repeat.", "",
             "| stage | status | s | rows | value |", "|---|---|---:|---:|---|"]
    for s in plan:
        n = sum(len(_load(out_path(out, w))) for w in s.results)
        if s.name == "tests":
            c = junit_counts(out_path(out, "tests", "xml"))
            n = "-" if c is None else c["tests"]
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {n} | {s.value} |")
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
    for kind in SUMMARY_KINDS:
        rows = _load(out_path(out, kind))
        if kind == "sweep_attention":
            rows = sweep_winners(rows)
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
    ap.add_argument("--call", choices=tuple(CALLS), default="gpu",
                    help="which prepared call: gpu (`make gpu`, default), more (`make gpu-more`) or extra (`make gpu-extra`)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="overall seconds (default: gpu 480, more 240, extra 480 on a GPU; 300 / 200 / 60 dry; env GPU_DEADLINE)")
    ap.add_argument("--plan", action="store_true", help="print the call's stages (value, budget, why) and exit")
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
    deadline = args.deadline or float(os.environ.get("GPU_DEADLINE") or DEADLINE_S[args.call, dry])
    end = time.monotonic() + deadline - (time.time() - t_wall)
    dev, date = _tag()
    if args.plan:                         # what the GPU would run (dry only with --dry)
        shown = args.deadline or float(os.environ.get("GPU_DEADLINE") or DEADLINE_S[args.call, args.dry])
        print(plan_text(stage_plan(sys.executable, out, args.dry, args.call), args.call, shown, args.dry))
        return 0
    plan = stage_plan(sys.executable, out, dry, args.call)
    log_path = out_path(out, LOG_NAME[args.call], "log")
    with open(log_path, "w") as log:
        ctx = Context(out=out, dry=dry, end=end, log=log)
        if args.setup_log and Path(args.setup_log).is_file():
            log.write(Path(args.setup_log).read_text())
        say(ctx, f"=== {CALLS[args.call]}{' (dry mode)' if dry else ''}: deadline {deadline:.0f} s, files in {out}")
        for line in device_report():
            say(ctx, line)
        chosen = fit(plan, end - time.monotonic() - RESERVE_S[dry])
        for line in plan_text(plan, args.call, deadline, dry).splitlines():
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
        run_all(chosen, ctx, env, RESERVE_S[dry], GRACE_S[dry])
        text = summary(plan, out, dry, time.time() - t_wall, args.call)
        out_path(out, SUMMARY_NAME[args.call], "md").write_text(text)
        say(ctx, "")
        say(ctx, text)
        files = sorted(p.name for p in out.iterdir() if p.is_file() and (dev in p.name and date in p.name))
        say(ctx, f"=== files in {out}: {', '.join(files)}")
    failed = any(s.status.startswith("failed") for s in plan)
    if any(s.name == "tests" for s in chosen):
        c = junit_counts(out_path(out, "tests", "xml"))
        failed = failed or c is None or c["failures"] or c["errors"]
    return 1 if failed or ctx.stop else 0


if __name__ == "__main__":
    sys.exit(main())
