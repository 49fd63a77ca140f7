"""`make gpu`'s plumbing, proven on the CPU (its dry mode): stage time boxes, the SIGINT flush,
rows appended per case, a stage killed mid-way keeping its earlier rows, the summary, and the very
command the GPU runs (`make gpu` without CUDA runs the same stages on tiny shapes)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_all  # noqa: E402
from _common import ResultFile, result_row  # noqa: E402

# a stage that appends one row every few ms; IGNORE=1: deaf to SIGINT and SIGTERM (needs SIGKILL)
FAKE_STAGE = """
import os, signal, sys, time
sys.path.insert(0, {bench!r})
from _common import ResultFile
if os.environ.get("IGNORE"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
res = ResultFile("fake", {out!r})
i = 0
try:
    while True:
        res.add({{"i": i, "pad": "x" * 2000}})
        i += 1
        print("row", i, flush=True)
        time.sleep(float(os.environ.get("PAUSE", "0.05")))
except KeyboardInterrupt:
    print("flushed", len(res.rows), flush=True)
    sys.exit(130)
"""


def _ctx(tmp_path, seconds):
    log = open(tmp_path / "log.txt", "w")
    return gpu_all.Context(out=tmp_path, dry=True, end=time.monotonic() + seconds, log=log)


def _fake(tmp_path, budget):
    code = FAKE_STAGE.format(bench=str(ROOT / "benchmarks"), out=str(tmp_path))
    return gpu_all.Stage("fake", [sys.executable, "-c", code], budget, ["fake"])


def _fake_rows(tmp_path):
    rows = json.loads(gpu_all.out_path(tmp_path, "fake").read_text())     # always a valid list
    assert [r["i"] for r in rows] == list(range(len(rows)))               # none lost, none torn
    return rows


class _Log:
    """The driver's log file, which also notes when the stage's first row was printed."""

    def __init__(self, path, ready_line):
        self.f, self.ready_line, self.ready = open(path, "w"), ready_line, threading.Event()

    def write(self, text):
        self.f.write(text)
        if text.startswith(self.ready_line):
            self.ready.set()

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


class _ClockFromReady:
    """gpu_all's `time` with a monotonic clock that stands at 0 until the stage has printed its
    first row and then runs: the time box counts from the child's readiness, so a SIGINT can never
    land while it still imports torch (seconds on a loaded machine; the box is what is tested here,
    not how fast a child starts). After 600 s without a row it runs anyway (no hang)."""

    sleep, time = staticmethod(time.sleep), staticmethod(time.time)

    def __init__(self, ready):
        self.ready, self.created, self.t0 = ready, time.monotonic(), None

    def monotonic(self):
        if self.t0 is None:
            if not self.ready.is_set() and time.monotonic() - self.created < 600:
                return 0.0
            self.t0 = time.monotonic()
        return time.monotonic() - self.t0


def test_time_box_sigint_flush_then_next_stage_runs(tmp_path, monkeypatch):
    log = _Log(tmp_path / "log.txt", "row 1")
    monkeypatch.setattr(gpu_all, "time", _ClockFromReady(log.ready))
    # the fake stage's box: 28 s minus the next stage's 10 s budget = 18 s; SIGINT 10 s (grace)
    # before it ends, i.e. 8 s after its first row; SIGTERM only 10 s later
    ctx = gpu_all.Context(out=tmp_path, dry=True, end=28.0, log=log)
    nxt = gpu_all.Stage("next", [sys.executable, "-c", "print('next stage ran')"], 10.0)
    plan = gpu_all.run_all([_fake(tmp_path, 1.0), nxt], ctx, dict(os.environ), reserve=0.0, grace_s=10.0)
    log.close()
    fake, nxt = plan
    assert fake.status == "stopped (time box, rc 130)", fake.status
    assert 8.0 <= fake.seconds < 18.0
    assert nxt.status == "ok"
    rows = _fake_rows(tmp_path)
    text = (tmp_path / "log.txt").read_text()
    assert f"flushed {len(rows)}" in text and "next stage ran" in text and "SIGINT" in text
    assert len(rows) >= 1


def test_stage_gets_sigint_even_when_the_driver_ignores_it(tmp_path):
    """A driver started with SIGINT ignored (a background job of a non-interactive shell) still
    stops its stages with SIGINT: the child's SIGINT is reset to its default before exec."""
    import signal
    code = "import signal; print('child SIGINT', signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctx = _ctx(tmp_path, 120.0)
        (stage,) = gpu_all.run_all([gpu_all.Stage("probe", [sys.executable, "-c", code], 1.0)], ctx,
                                   dict(os.environ), reserve=0.0, grace_s=5.0)
        ctx.log.close()
    finally:
        signal.signal(signal.SIGINT, old)
    assert stage.status == "ok", stage.status
    assert "child SIGINT True" in (tmp_path / "log.txt").read_text()


def _stop_when_rows(ctx, path, n, how):
    def watch():
        while not ctx.stop:
            try:
                if len(json.loads(path.read_text())) >= n:
                    ctx.stop = how
            except (OSError, ValueError):      # not written yet (a torn file fails _fake_rows)
                pass
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()


def test_stage_killed_midway_keeps_earlier_rows(tmp_path):
    ctx = _ctx(tmp_path, 120.0)
    env = dict(os.environ, IGNORE="1", PAUSE="0")                 # writes as fast as it can
    _stop_when_rows(ctx, gpu_all.out_path(tmp_path, "fake"), 3, "SIGTERM")
    (stage,) = gpu_all.run_all([_fake(tmp_path, 1.0)], ctx, env, reserve=0.0, grace_s=0.5)
    ctx.log.close()
    assert stage.status == "stopped (SIGTERM, rc -9)", stage.status
    log = (tmp_path / "log.txt").read_text()
    assert "SIGTERM" in log and "SIGKILL" in log and "\nflushed " not in log    # (the code itself says "flushed")
    assert len(_fake_rows(tmp_path)) >= 3


def test_real_benchmark_flushes_on_sigint(tmp_path):
    """The driver's stop (its own SIGINT / SIGTERM) reaches a real benchmark as SIGINT: it stops
    after the rows so far, which stay in its file, and exits 130."""
    ctx = _ctx(tmp_path, 120.0)
    stage = gpu_all.Stage("kernels", [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"),
                                      "--quick", "--out", str(tmp_path)], 120.0, ["kernels"])
    path = gpu_all.out_path(tmp_path, "kernels")
    _stop_when_rows(ctx, path, 2, "SIGTERM")
    gpu_all.run_stage(stage, 120.0, ctx, dict(os.environ, TRITON_INTERPRET="1"), grace_s=30.0)
    ctx.log.close()
    assert stage.status == "stopped (SIGTERM, rc 130)", stage.status
    rows = json.loads(path.read_text())
    assert 2 <= len(rows) < 42                                     # 42 rows in a whole --quick run
    assert f"stopped by SIGINT; kept {len(rows)} rows" in (tmp_path / "log.txt").read_text()
    assert all(r["device"] == "cpu" and r["op"] == "rms_norm" for r in rows)


def test_both_calls_fit_their_deadlines_new_stages_first():
    """The committed plan: every stage belongs to a call, each call's chosen stages fit its deadline
    after set-up and the reserve, ceilings come first and what was never run on a GPU next."""
    names = set()
    for call in gpu_all.CALLS:
        plan = gpu_all.stage_plan(sys.executable, Path("/nonexistent"), dry=False, call=call)
        names |= {s.name for s in plan}
        available = gpu_all.DEADLINE_S[call, False] - gpu_all.SETUP_S - gpu_all.RESERVE_S[False]
        chosen = gpu_all.fit(plan, available)
        assert sum(s.budget_s for s in chosen) <= available
        assert plan[0].name == "ceilings" and chosen[0] is plan[0]
        values = [s.value for s in plan[1:]]
        assert values == sorted(values, key=gpu_all.VALUE_ORDER.index)
        assert all(s in chosen for s in plan if s.value == "new"), [(s.name, s.budget_s) for s in plan]
        by = {s.name: s for s in plan}
        if call == "gpu":
            assert by["tests"].argv[:3] == [sys.executable, "-m", "pytest"]
            assert "--gpu-quick" in by["attention"].argv and "--time-left" in by["step"].argv
            assert by["attention_packed"].argv[2:4] == ["--packed", "--gpu-quick"]
    assert names == {s.name for s in gpu_all.SPECS}


def test_stage_limit_passes_time_on():
    plan = [gpu_all.Stage(n, [], b) for n, b in (("a", 150), ("b", 15), ("c", 60), ("d", 120), ("e", 120))]
    end = 475.0
    assert gpu_all.stage_limit(plan, 0, 0.0, end, 10) == end - 315 - 10 == plan[0].budget_s
    # a stage that ends early passes its time on; the last stage gets all that is left
    assert gpu_all.stage_limit(plan, 4, end - 200, end, 10) == 190
    assert gpu_all.stage_limit(plan, 3, end - 200, end, 10) == 200 - 120 - 10
    # a deadline shorter than the plan: budgets scale down alike, every stage still gets time
    assert gpu_all.stage_limit(plan, 0, 0, 100, 10, scale=90 / 465) == pytest.approx(90 * 150 / 465)


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_value_and_budget_come_from_the_committed_runs(tmp_path):
    """new: never run on a GPU; changed: a watched path differs from the commit of its last run;
    repeat: nothing watched changed. Budgets: 1.1 x the last duration + 5 s (1.5 x when a time box
    cut it), the estimate when no log timed it; rows without a log count as a run at their commit."""
    repo, results = tmp_path / "repo", tmp_path / "results"
    for f in ("a/x.py", "b/y.py", "c/z.py"):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text("1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    sha = _git(repo, "commit", "-q", "-m", "one")
    results.mkdir()
    (results / "gpu_all-NVIDIA-H100-2026-12-01.log").write_text(
        f"=== make gpu: deadline 480 s\ngit {sha}\n=== stage tests: ok in 100.0 s\n"
        "=== stage alpha: ok in 40.0 s\n=== stage beta: stopped (time box, rc 130) in 100.0 s\n")
    (results / "gpu_all-cpu-2026-12-02.log").write_text("git 0000\n=== stage gamma: ok in 1.0 s\n")  # dry: ignored
    (results / "delta-NVIDIA-H100-2026-12-01.json").write_text(json.dumps([{"git_sha": sha, "provider": "x"}]))
    S = gpu_all.StageSpec
    specs = (S("ceilings", "gpu", 15, 15, ("ceilings",)), S("tests", "gpu", 150, 40, (), ("a",)),
             S("beta", "gpu", 90, 30, ("beta",), ("b",), script="bench_beta"),
             S("alpha", "gpu", 90, 30, ("alpha",), ("a",), script="bench_alpha"),
             S("gamma", "gpu", 70, 30, ("gamma",), ("c",), script="bench_gamma"),
             S("delta", "gpu", 80, 30, ("delta",), ("c",), script="bench_delta"))
    (repo / "a" / "x.py").write_text("2\n")                          # uncommitted: counts as changed
    plan = gpu_all.stage_plan("py", tmp_path / "out", dry=False, results=results, root=repo, specs=specs)
    got = [(s.name, s.value, s.budget_s) for s in plan]
    assert got == [("ceilings", "always", 15), ("gamma", "new", 70), ("tests", "changed", 115),
                   ("alpha", "changed", 49), ("beta", "repeat", 155), ("delta", "repeat", 80)], got
    tests = plan[2]
    assert "--gpu-only" in tests.argv                                 # nothing under kernels/ changed
    (repo / "kernels").mkdir()
    (repo / "kernels" / "k.py").write_text("3\n")
    plan = gpu_all.stage_plan("py", tmp_path / "out", dry=False, results=results, root=repo, specs=specs)
    assert "--gpu-only" not in next(s for s in plan if s.name == "tests").argv
    # fit: in order, a stage too long for what is left is left out, a later shorter one still fits
    chosen = gpu_all.fit(plan, 15 + 70 + 115 + 49 + 90)
    assert [s.name for s in chosen] == ["ceilings", "gamma", "tests", "alpha", "delta"]
    assert plan[4].status.startswith("left out (repeat, budget 155 s > 90 s left)"), plan[4].status


def test_stage_whose_package_is_missing_is_skipped_with_the_reason(tmp_path):
    ctx = _ctx(tmp_path, 60.0)
    lacking = gpu_all.Stage("fp8", [sys.executable, "-c", "print('must not run')"], 5.0,
                            needs=["no_such_module_aimv2_xyz"])
    nxt = gpu_all.Stage("next", [sys.executable, "-c", "print('next stage ran')"], 5.0)
    gpu_all.run_all([lacking, nxt], ctx, dict(os.environ), reserve=0.0, grace_s=5.0)
    ctx.log.close()
    assert lacking.status == "skipped (no_such_module_aimv2_xyz not installed: see benchmarks/gpu_wheels.txt)"
    assert nxt.status == "ok"
    log = (tmp_path / "log.txt").read_text()
    assert "must not run" not in log and "next stage ran" in log


def _write(out, what, rows):
    res = ResultFile(what, out)
    res.extend(rows)


def _r(op, provider, ms, **kw):
    return result_row(op=op, pass_=kw.pop("pass_", "fwd"), shape=kw.pop("shape", "s"), dtype="bf16",
                      provider=provider, ms=ms, command="test", **kw)


def test_summary_speedups_masks_and_failures(tmp_path):
    _write(tmp_path, "kernels", [_r("rms_norm", "aimv2", 1.0, gbps=3000.0), _r("rms_norm", "compile_ref", 2.0),
                                 _r("rms_norm", "eager_ref", 4.0)])
    _write(tmp_path, "attention", [_r("prefix_attention", "aimv2", 1.0, tflops=400.0, mask="prefix"),
                                   _r("prefix_attention", "flex", 1.5, mask="prefix"),
                                   _r("prefix_attention", "sdpa_dense", 3.0, mask="prefix"),
                                   _r("prefix_attention", "sdpa_flash_causal", 0.8, mask="causal")])
    _write(tmp_path, "step", [_r("train_step", "eager_ref", 300.0, pass_="step", images_per_s=400.0, mfu=0.2),
                              _r("train_step", "aimv2", 200.0, pass_="step", images_per_s=600.0, mfu=0.3)])
    gpu_all.out_path(tmp_path, "tests", "xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_b"/><testcase classname="tests.test_x" name="test_c">'
        '<skipped/></testcase></testsuite></testsuites>')
    plan = [gpu_all.Stage("tests", [], 1, status="ok"), gpu_all.Stage("kernels", [], 1, ["kernels"], status="ok"),
            gpu_all.Stage("step", [], 1, ["step"], status="stopped (time box, rc 130)")]
    md = gpu_all.summary(plan, tmp_path, dry=True, total_s=42)
    assert "| kernels | ok | 0 | 3 |" in md and "| step | stopped (time box, rc 130) | 0 | 2 |" in md
    assert "tests: 1 passed, 1 failed, 0 errors, 1 skipped" in md and "- FAILED tests.test_x::test_a" in md
    kern = next(ln for ln in md.splitlines() if ln.startswith("| rms_norm"))
    assert "| 2.00x | 4.00x |" in kern and "3000.0" in kern
    att = next(ln for ln in md.splitlines() if ln.startswith("| prefix_attention"))
    assert "| 1.50x prefix | 3.00x prefix | 0.80x causal | - |" in att
    step = [ln for ln in md.splitlines() if ln.startswith("| aimv2") or ln.startswith("| eager_ref")]
    assert len(step) == 2 and step[1].endswith("| 1.50x |") and "30.0" in step[1]


def _make(target, out, deadline):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_DEADLINE", "GPU_ARGS", "GPU_CALL")}
    r = subprocess.run(["make", "-s", target, f"PYTHON={sys.executable}", f"OUT={out}", f"GPU_DEADLINE={deadline}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "[gpu setup] python: " in r.stdout and "used as it is" in r.stdout
    assert f"(dry mode): deadline {deadline} s" in r.stdout and "no CUDA device: dry mode" in r.stdout
    assert "=== plan of " in r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8, names                                   # the device tool returns 8 files
    assert r.stdout.rstrip().splitlines()[-1].startswith("=== files in")
    return r, names


def _dry_rows(out, kinds):
    rows = {k: json.loads(gpu_all.out_path(out, k).read_text()) for k in kinds}
    assert all(r["device"] == "cpu" for rs in rows.values() for r in rs)
    ceilings = json.loads(gpu_all.out_path(out, "ceilings").read_text())[0]["ceilings"]
    assert all(rs and rs[0]["ceilings"] == ceilings for k, rs in rows.items() if k != "ceilings"), \
        "every stage reads the call's ceilings file"
    return rows


def test_make_gpu_dry_mode(tmp_path):
    """The command the GPU runs, on this CPU: set-up with this python as it is, the stages of the
    first call in dry mode, a log, a junit xml, result rows marked cpu and the summary, all under $OUT."""
    out = tmp_path / "out"
    # 60-90 s on an idle 2-core machine, a few minutes on a loaded one: a deadline no stage reaches here
    r, names = _make("gpu", out, 600)
    kinds = sorted(n.split("-cpu-")[0] for n in names)
    assert kinds == ["attention", "attention_packed", "ceilings", "gpu_all", "native", "step", "summary",
                     "tests"], names
    rows = _dry_rows(out, ("attention", "attention_packed", "native", "step"))
    assert {r["pass"] for r in rows["attention"]} == {"fwd", "bwd", "fwdbwd"}
    assert all(r["mask"] == "prefix" for r in rows["attention"])
    assert {r["op"] for r in rows["attention_packed"]} >= {"prefix_attention_varlen"}
    assert {r["provider"] for r in rows["native"]} == {"packed", "padded"}
    assert rows["step"][0]["pass"] == "step" and rows["step"][0]["images_per_s"] > 0
    counts = gpu_all.junit_counts(gpu_all.out_path(out, "tests", "xml"))
    assert counts["tests"] >= 1 and counts["failures"] == counts["errors"] == 0
    summary = gpu_all.out_path(out, "summary", "md").read_text()
    for stage in ("tests", "ceilings", "attention", "attention_packed", "native", "step"):
        assert f"| {stage} | ok |" in summary, summary
    assert "## attention_packed" in summary and "## native" in summary
    assert summary.strip() in r.stdout                             # the output's tail tells the story
    log = gpu_all.out_path(out, "gpu_all", "log").read_text()
    assert log.startswith("[gpu setup] python: ") and "=== stage step: ok" in log


def test_make_gpu_more_dry_mode(tmp_path):
    """The second call in dry mode: the attention sweep, the fused kernels, the caption loss, the
    decode backend and the kernel tuning, each with rows, its own log and summary names (both calls' files can sit side by
    side in benchmarks/results), no junit xml and no failure for its absence."""
    out = tmp_path / "out"
    r, names = _make("gpu-more", out, 600)
    kinds = sorted(n.split("-cpu-")[0] for n in names)
    assert kinds == ["ceilings", "decode", "gpu_more", "kernels", "summary_more", "sweep_attention", "text_loss",
                     "tune_kernels"], names
    rows = _dry_rows(out, ("kernels", "text_loss", "decode", "tune_kernels", "sweep_attention"))
    assert {r["bwd_form"] for r in rows["sweep_attention"] if r["provider"] == "aimv2"} == {"split", "fused", "atomic"}
    assert {r["provider"] for r in rows["kernels"]} == {"aimv2", "eager_ref"}
    assert {r["provider"] for r in rows["text_loss"]} == {"aimv2", "eager_ref"}
    assert "pil" in {r["provider"] for r in rows["decode"]}
    summary = gpu_all.out_path(out, "summary_more", "md").read_text()
    assert summary.startswith("# make gpu-more summary")
    for stage in ("ceilings", "sweep_attention", "kernels", "text_loss", "decode", "tune_kernels"):
        assert f"| {stage} | ok |" in summary, summary
    sweep = [ln for ln in summary.splitlines() if ln.startswith("| prefix_attention [")]
    assert len(sweep) == 2 and all("x" in ln.split("|")[-2] for ln in sweep), sweep     # winners vs sdpa_dense
    assert "=== stage tune_kernels: ok" in gpu_all.out_path(out, "gpu_more", "log").read_text()


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for the test, whatever this process inherited: SIGINT is ignored
    in a background job of a non-interactive shell (`make test &` in a script), and an ignored
    signal is rightly not re-raised by add()."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_sigint_inside_add_is_held_until_the_row_is_on_disk(tmp_path, monkeypatch, python_ctrl_c):
    """A SIGINT arriving while add() writes (CI saw it: the stage said it kept 125 rows, the file
    held 124) is delivered only once the file and `rows` agree, whichever row it lands in."""
    import signal
    import _common
    res = ResultFile("sig", tmp_path)
    res.add({"i": 0})
    real_dumps = _common.json.dumps

    def dumps_then_interrupted(*a, **k):
        text = real_dumps(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)            # lands mid-write, before the file is replaced
        time.sleep(0.01)
        return text

    monkeypatch.setattr(_common.json, "dumps", dumps_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        res.add({"i": 1})
    monkeypatch.setattr(_common.json, "dumps", real_dumps)
    on_disk = json.loads(res.path.read_text())
    assert [r["i"] for r in on_disk] == [r["i"] for r in res.rows] == [0, 1]
    assert not res.path.with_name(res.path.name + ".tmp").exists()


def test_gpu_wheels_are_pinned_and_cover_every_stage_need():
    """benchmarks/gpu_wheels.txt is the one list of what travels with a call: every line pinned
    (name==version, so the offline install is the tested one) and every stage's `needs` in it."""
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()]
    pins = dict(ln.split("==") for ln in lines if ln)
    assert pins and all(v and v[0].isdigit() for v in pins.values()), pins
    assert all(n in pins for s in gpu_all.SPECS for n in s.needs)
    assert ".gpu-wheels/" in (ROOT / ".gitignore").read_text()                # carried, never committed
