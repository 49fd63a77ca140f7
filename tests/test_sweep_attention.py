"""benchmarks/sweep_attention.py on the CPU: every candidate is checked against fp64 before it is
timed (a wrong one is recorded and never timed), the rows name the candidate and mark the default,
and --write-table turns GPU rows into kernels/_attention_table.py entries that the op reads."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep_attention as SW  # noqa: E402

PA = importlib.import_module("aimv2.kernels.prefix_attention")


def test_quick_run_checks_and_times_every_candidate(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_attention.py"), "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("sweep_attention-*.json")).read_text())
    ours = [x for x in rows if x["provider"] == "aimv2"]
    want = {("fwd", "default")} | {("bwd", "default")} | {("fwd", n) for n, *_ in SW.FWD_QUICK} | \
        {("bwd", n) for n, *_ in SW.BWD_QUICK}
    assert {(x["pass"], x["config"]) for x in ours} == want
    assert all(x["correct"] and 0 <= x["err_ratio"] <= 1 and x["ms"] > 0 for x in ours)
    assert {x["bwd_form"] for x in ours if x["pass"] == "bwd"} == {"split", "fused", "atomic"}
    assert {x["fwd_tma"] for x in ours if x["pass"] == "fwd"} == {False, True}           # TMA checked, timed
    assert sum(x["default"] for x in ours) == 2
    assert {x["provider"] for x in rows} == {"aimv2", "sdpa_dense"}
    assert "winner encoder-256 D=32 fwd:" in r.stdout and "winner encoder-256 D=32 bwd:" in r.stdout


def test_check_flags_a_wrong_kernel(monkeypatch):
    import bench_attention as BA
    case = BA.make_case("encoder-256", 2, 2, 32, torch.device("cpu"), torch.float32, 24)
    cfg = PA._tiles(32, torch.float32, torch.device("cpu"))
    assert SW.check(case, cfg) <= 1.0
    real = PA._bwd_launch
    monkeypatch.setattr(PA, "_bwd_launch", lambda *a, **k: [g * 1.001 for g in real(*a, **k)])   # 0.1 % off
    assert SW.check(case, cfg) > 1.0


def test_an_incorrect_candidate_is_recorded_and_not_timed(monkeypatch):
    rows = []
    monkeypatch.setattr(SW, "check", lambda case, cfg: float("inf") if cfg.bwd == "fused" else 0.5)
    SW.sweep_shape(SW.QUICK_SHAPES[0], torch.device("cpu"), torch.float32, True, {}, "test", rows.append)
    bad = [r for r in rows if r.get("config") == "fused"]
    assert len(bad) == 1 and bad[0]["correct"] is False and bad[0]["ms"] is None
    assert all(r["ms"] > 0 for r in rows if r is not bad[0])


def _gpu_row(pass_, config, ms, timing, form="split", cap=(9, 0)):
    tiles = {"fwd": [64, 64, 4, 3] if config.startswith("f64") else [128, 64, 8, 3], "dkdv": [64, 128, 8, 2],
             "dq": [128, 32, 8, 2]}
    return {"provider": "aimv2", "pass": pass_, "config": config, "ms": ms, "timing": timing, "correct": True,
            "capability": list(cap), "head_dim": 128, "n_bucket": 256, "dtype": "bf16", "tiles": tiles,
            "bwd_form": form, "fwd_tma": config.endswith("tma")}


def test_write_table_picks_the_fastest_correct_by_device_time(tmp_path):
    rows = [_gpu_row("fwd", "default", 0.30, "graph"), _gpu_row("fwd", "f64", 0.25, "graph"),
            _gpu_row("fwd", "f64tma", 0.24, "graph"),                              # same tiles, TMA loads
            _gpu_row("fwd", "f64", 0.10, "host"),                                  # host never beats graph
            _gpu_row("bwd", "split", 0.90, "graph"), _gpu_row("bwd", "atomic", 0.60, "graph", "atomic"),
            dict(_gpu_row("bwd", "fused", 0.20, "graph", "fused"), correct=False)]  # wrong: never chosen
    path = tmp_path / "sweep_attention-NVIDIA-H100-2026-12-06.json"
    path.write_text(json.dumps(rows))
    table = tmp_path / "_attention_table.py"
    table.write_text((ROOT / "kernels" / "_attention_table.py").read_text())
    assert SW.write_table(str(path), table) == 0
    ns = {}
    exec(table.read_text(), ns)
    entry = ns["TABLE"][(9, 0, 128, 256, "bfloat16")]
    assert entry["fwd"] == (64, 64, 4, 3) and entry["bwd"] == "atomic" and entry["dkdv"] == (64, 128, 8, 2)
    assert entry["fwd_tma"] is True
    from aimv2.kernels._utils import Tiles
    got = PA._table_config((9, 0), 128, 200, torch.bfloat16, Tiles(32, 0, 4, 1), ns["TABLE"])
    assert got.bwd == "atomic" and got.fwd == Tiles(64, 64, 4, 3) and got.fwd_tma
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps([dict(r, capability=None) for r in rows]))
    assert SW.write_table(str(cpu), table) == 2                     # CPU rows never write the table


def test_candidates_include_the_default_and_every_form():
    got = SW.candidates(32, torch.float32, torch.device("cpu"), True)
    assert ("fwd", "default") in {(p, n) for p, n, _ in got}
    assert {c.bwd for p, _, c in got if p == "bwd"} == {"split", "fused", "atomic"}


def test_host_cost_mode_counts_launches_and_restores_the_kernels():
    """bench_attention --host-cost: every (op, provider, pass) timed with the Triton launches stubbed
    and counted (split backward: delta, dk/dv, dq), the real kernels back in place afterwards."""
    import bench_attention as BA
    PV = importlib.import_module("aimv2.kernels.prefix_attention_varlen")
    before = (PA._prefix_attention_fwd_kernel, PV._prefix_attention_varlen_bwd_dq_kernel, PA.is_interpreting,
              PA.use_registered_op)
    rows = []
    BA.host_cost(torch.device("cpu"), "test", rows.append, calls=2, repeats=1, log=lambda *a: None)
    assert {(r["op"], r["provider"], r["pass"]) for r in rows} == {
        (op, prov, p) for op in ("prefix_attention_host", "prefix_attention_varlen_host")
        for prov in ("aimv2", "aimv2_registered") for p in ("fwd", "bwd", "fwdbwd")}
    assert all(r["launches"] == {"fwd": 1, "bwd": 3, "fwdbwd": 4}[r["pass"]] and r["ms"] > 0 for r in rows)
    assert (PA._prefix_attention_fwd_kernel, PV._prefix_attention_varlen_bwd_dq_kernel, PA.is_interpreting,
            PA.use_registered_op) == before
