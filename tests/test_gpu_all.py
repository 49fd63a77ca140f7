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


def test_time_box_sigint_flush_then_next_stage_runs(tmp_path):
    ctx = _ctx(tmp_path, 14.0)                         # generous: importing torch on a loaded CI machine
    nxt = gpu_all.Stage("next", [sys.executable, "-c", "print('next stage ran')"], 1.0)
    plan = gpu_all.run_all([_fake(tmp_path, 1.0), nxt], ctx, dict(os.environ), reserve=0.0, grace_s=5.0)
    ctx.log.close()
    fake, nxt = plan
    assert fake.status == "stopped (time box, rc 130)", fake.status
    assert 7.5 <= fake.seconds < 13                    # SIGINT 5 s before its box (14 s minus the next
                                                       # stage's 1 s budget) ends
    assert nxt.status == "ok"
    rows = _fake_rows(tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert f"flushed {len(rows)}" in log and "next stage ran" in log and "SIGINT" in log
    assert len(rows) >= 1


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


def test_timing_plan_fits_the_deadline():
    plan = gpu_all.stage_plan(sys.executable, Path("/nonexistent"), dry=False)
    assert [s.name for s in plan] == ["tests", "ceilings", "kernels", "attention", "step"]
    setup_s = 15                                                   # set-up and the device report
    assert sum(s.budget_s for s in plan) + gpu_all.RESERVE_S[False] + setup_s <= gpu_all.DEADLINE_S[False]
    start, end = 0.0, gpu_all.DEADLINE_S[False] - setup_s
    first = gpu_all.stage_limit(plan, 0, start, end, gpu_all.RESERVE_S[False])
    assert first >= plan[0].budget_s
    # a stage that ends early passes its time on; the last stage gets all that is left
    assert gpu_all.stage_limit(plan, 4, end - 200, end, 10) == 190
    assert gpu_all.stage_limit(plan, 3, end - 200, end, 10) == 200 - 120 - 10
    # a deadline shorter than the plan: budgets scale down alike, every stage still gets time
    assert gpu_all.stage_limit(plan, 0, 0, 100, 10, scale=90 / 455) == pytest.approx(90 * 150 / 455)
    assert "--gpu-quick" in plan[2].argv and "--time-left" in plan[4].argv
    assert plan[0].argv[:3] == [sys.executable, "-m", "pytest"]


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


def test_make_gpu_dry_mode(tmp_path):
    """The command the GPU runs, on this CPU: set-up with this python as it is, the five stages in
    dry mode, a log, a junit xml, result rows marked cpu and the summary, all under $OUT."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_DEADLINE", "GPU_ARGS")}
    # 30 s on an idle 2-core machine, 2 min on a loaded one: a deadline no stage reaches here
    # (the dry default, 180 s, is what `make gpu` itself uses)
    r = subprocess.run(["make", "-s", "gpu", f"PYTHON={sys.executable}", f"OUT={out}", "GPU_DEADLINE=400"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "[gpu setup] python: " in r.stdout and "used as it is" in r.stdout
    assert "(dry mode): deadline 400 s" in r.stdout and "no CUDA device: dry mode" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    kinds = sorted(n.split("-cpu-")[0] for n in names)
    assert kinds == ["attention", "ceilings", "gpu_all", "kernels", "step", "summary", "tests"], names
    assert len(names) <= 8                                          # the device tool returns 8 files
    rows = {k: json.loads(gpu_all.out_path(out, k).read_text())
            for k in ("ceilings", "kernels", "attention", "step")}
    assert all(r["device"] == "cpu" for rs in rows.values() for r in rs)
    assert {r["provider"] for r in rows["kernels"]} == {"aimv2", "eager_ref"}
    assert {r["pass"] for r in rows["attention"]} == {"fwd", "bwd", "fwdbwd"}
    assert all(r["mask"] == "prefix" for r in rows["attention"])
    assert rows["step"][0]["pass"] == "step" and rows["step"][0]["images_per_s"] > 0
    assert rows["kernels"][0]["ceilings"] == rows["ceilings"][0]["ceilings"]     # read, not re-measured
    counts = gpu_all.junit_counts(gpu_all.out_path(out, "tests", "xml"))
    assert counts["tests"] >= 1 and counts["failures"] == counts["errors"] == 0
    summary = gpu_all.out_path(out, "summary", "md").read_text()
    for stage in ("tests", "ceilings", "kernels", "attention", "step"):
        assert f"| {stage} | ok |" in summary
    assert r.stdout.rstrip().splitlines()[-1].startswith("=== files in")
    assert summary.strip() in r.stdout                             # the output's tail tells the story
    log = gpu_all.out_path(out, "gpu_all", "log").read_text()
    assert log.startswith("[gpu setup] python: ") and "=== stage step: ok" in log


def test_sigint_inside_add_is_held_until_the_row_is_on_disk(tmp_path, monkeypatch):
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
