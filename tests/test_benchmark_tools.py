"""The benchmark tooling that needs no GPU: the performance-table generator (docs/performance.md) and the
step benchmark's CPU smoke path (the GPU numbers themselves are never asserted)."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def _row(provider, ms, **kw):
    return {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-25", "op": "rms_norm", "pass": "fwd",
            "shape": "32768x1024", "dtype": "bf16", "provider": provider, "ms": ms, **kw}


def test_report_table_and_readme_block(tmp_path):
    rows = [_row("compile_ref", 0.2, gbps=1500.0), _row("aimv2", 0.1, gbps=3000.0, pct_of_ceiling=90.0),
            _row("eager_ref", 0.4, gbps=750.0)]
    (tmp_path / "kernels-H100-2026-11-25.json").write_text(json.dumps(rows))
    (tmp_path / "broken.json").write_text("{not json")
    groups = report.load_rows(tmp_path)
    assert list(groups) == ["kernels-H100-2026-11-25"]
    md = report.render(groups)
    lines = [ln for ln in md.splitlines() if ln.startswith("| rms_norm")]
    assert len(lines) == 3
    assert "2.00x compile_ref" in lines[1] and "3,000.0" in lines[1] and "90.0" in lines[1]
    assert "0.50x compile_ref" in lines[2] and "x compile_ref" not in lines[0]
    page = f"intro\n{report.START}\nold\n{report.END}\ntail\n"
    new = report.update_block(page, md)
    assert new.startswith("intro\n") and new.endswith("tail\n") and "old" not in new
    assert report.update_block(new, md) == new
    with pytest.raises(ValueError, match="markers"):
        report.update_block("no markers", md)


def test_performance_page_is_generated_from_the_committed_rows(tmp_path, capsys):
    """docs/performance.md holds exactly the tables benchmarks/results/*.json give (run
    `python benchmarks/report.py` after adding rows), and --check says so; a stale page fails --check."""
    text = report.DOC.read_text()
    assert report.update_block(text, report.render(report.load_rows())) == text, \
        "docs/performance.md is out of date: run python benchmarks/report.py"
    assert report.main(["--check"]) == 0
    stale = tmp_path / "performance.md"
    stale.write_text(text.replace("| aimv2 |", "| aimv3 |", 1))
    assert report.main(["--check", "--doc", str(stale)]) == 1
    assert report.main(["--doc", str(stale)]) == 0 and stale.read_text() == text
    assert "out of date" in capsys.readouterr().err


def test_report_attention_baseline_order_and_masks(tmp_path):
    """flex, then sdpa_dense, before compile_ref (the naive fp32 reference); every row shows its mask."""
    def att(provider, ms, mask):
        return _row(provider, ms, op="prefix_attention", shape="B=128,H=8,N=256,D=128,mask=prefix", mask=mask)
    rows = [att("aimv2", 1.0, "prefix"), att("compile_ref", 8.0, "prefix"), att("sdpa_dense", 3.0, "prefix"),
            att("flex", 2.0, "prefix"), att("sdpa_flash_causal", 0.9, "causal")]
    md = report.table(rows).splitlines()
    assert "| mask |" in md[0]
    assert md[2].startswith("| prefix_attention | fwd |") and "| aimv2 | prefix |" in md[2]
    assert md[2].endswith("| 2.00x flex |")
    assert "| sdpa_flash_causal | causal |" in md[6] and md[6].endswith("| 2.22x flex |")
    no_flex = report.table([r for r in rows if r["provider"] != "flex"]).splitlines()
    assert no_flex[2].endswith("| 3.00x sdpa_dense |") and no_flex[3].endswith("| 0.38x sdpa_dense |")
    steps = [_row(p, ms, op="train_step", **{"pass": "step"}) for p, ms in (("eager_ref", 300.0), ("aimv2", 200.0))]
    assert report.table(steps).splitlines()[3].endswith("| 1.50x eager_ref |")


def test_step_benchmark_cpu_smoke(tmp_path):
    # eager_ref only: on a GPU machine --quick would otherwise compile the flex and aimv2 recipes
    # (minutes of Inductor) under this test's timeout
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick", "--recipes",
                        "eager_ref", "--out", str(tmp_path), "--trace", str(tmp_path / "traces")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (f,) = tmp_path.glob("step-*.json")
    rows = json.loads(f.read_text())
    assert rows[0]["pass"] == "step" and rows[0]["provider"] == "eager_ref"
    assert rows[0]["images_per_s"] > 0 and rows[0]["ms"] > 0
    assert abs(sum(rows[0]["profile_share"].values()) - 1.0) < 1e-2
    top = rows[0]["top_kernels"]                 # CPU ops stand in for kernels here
    assert 5 <= len(top) <= 25 and [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
    assert any(k["name"] == "aten::mm" and k["category"] == "gemm" for k in top)
    assert any("gbps" in k for k in top) and not any("gbps" in k for k in top if k["category"] == "gemm")
    (trace,) = (tmp_path / "traces").glob("step-eager_ref-B2.json.gz")
    with gzip.open(trace) as t:
        assert json.load(t)["traceEvents"]
    assert "Top GPU kernels of `eager_ref`" in report.kernels_table(rows[0])
    for key in ("device", "date", "git_sha", "torch", "triton", "command", "op", "shape", "dtype"):
        assert key in rows[0]


def test_step_kernel_table_arithmetic():
    """bench_step.kernel_table: kernels aggregated by name, per-step calls / ms, shares, estimated
    bytes and GB/s only for memory-bound kernels whose every launch has a byte count."""
    import bench_step
    kernels = [("sm90_xmma_gemm_bf16", 3000.0, 3, None),              # 3 steps: 1 ms a step
               ("triton_red_fused_rms_norm_0", 600.0, 6, 1_000_000),  # 2 calls a step, 1 MB each
               ("triton_red_fused_rms_norm_0", 300.0, 3, 1_000_000),
               ("triton_poi_fused_mul_1", 90.0, 3, None),             # no byte count: no GB/s
               ("triton_poi_fused_mul_1", 10.0, 1, 4)]
    share, rows = bench_step.kernel_table(kernels, steps=3, top=2)
    assert share == {"gemm": 0.75, "norms_activations": 0.25}
    assert [r["name"] for r in rows] == ["sm90_xmma_gemm_bf16", "triton_red_fused_rms_norm_0"]
    gemm, norm = rows
    assert gemm == {"name": "sm90_xmma_gemm_bf16", "category": "gemm", "calls": 1.0, "ms": 1.0, "share": 0.75}
    assert norm["calls"] == 3.0 and norm["ms"] == 0.3 and norm["share"] == 0.225
    assert norm["bytes"] == 3_000_000 and norm["gbps"] == 10.0         # 9 MB in 900 us
    _, rows = bench_step.kernel_table(kernels, steps=3)
    assert "gbps" not in rows[-1]


def test_report_compares_only_rows_timed_alike(tmp_path):
    rows = [_row("compile_ref", 0.2, timing="host"), _row("aimv2", 0.4, timing="host"),
            _row("compile_ref", 0.1, timing="graph"), _row("aimv2", 0.05, timing="graph"),
            _row("aimv2[m=8,n=1024,w=8]", 0.025, timing="graph")]
    md = [ln for ln in report.table(rows).splitlines() if ln.startswith("| rms_norm")]
    assert "| fwd (host) |" in md[1] and md[1].endswith("| 0.50x compile_ref |")
    assert "| fwd (graph) |" in md[3] and md[3].endswith("| 2.00x compile_ref |")
    assert md[4].endswith("| 4.00x compile_ref |")


def test_tune_kernels_cpu_smoke(tmp_path):
    """The kernel tuning script's CPU path: provider rows and a tile sweep whose first row per pass is
    the current tile choice, every row parseable by the report."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_kernels.py"), "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("tune_kernels-*.json")).read_text())
    sweep = [x for x in rows if x.get("kernel_only")]
    assert {(x["op"], x["pass"]) for x in sweep} == {("rms_norm_residual", "fwd"), ("rms_norm_residual", "bwd"),
                                                      ("swiglu", "fwd"), ("swiglu", "bwd")}
    for op_pass in {(x["op"], x["pass"]) for x in sweep}:
        group = [x for x in sweep if (x["op"], x["pass"]) == op_pass]
        assert group[0]["default"] and not any(x["default"] for x in group[1:]) and len(group) >= 2
    assert {x["provider"] for x in rows if not x.get("kernel_only")} == {"aimv2"}     # no compile on CPU
    assert report.table(rows).count("\n") == len(rows) + 1


def test_attention_benchmark_packed_cpu_smoke(tmp_path):
    """--packed --quick: aimv2 varlen, aimv2 padded, eager_ref rows for every pass, the flex mask build row."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--packed", "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FAILED" not in r.stdout, r.stdout[-2000:]
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.json")] == ["attention_packed"]   # not the fixed table
    rows = json.loads(next(tmp_path.glob("attention_packed-*.json")).read_text())
    got = {(x["provider"], x["pass"]) for x in rows}
    assert got == {(p, s) for p in ("aimv2", "aimv2_padded", "eager_ref") for s in ("fwd", "bwd", "fwdbwd")} | \
        {("flex", "mask_build")}
    assert {x["op"] for x in rows} == {"prefix_attention_varlen"} and all(x["ms"] > 0 for x in rows)
    pairs = {x["unmasked_pairs"] for x in rows if "unmasked_pairs" in x}
    assert len(pairs) == 1 and pairs.pop() > 0
    assert report.table(rows).count("\n") == len(rows) + 1


def test_attention_benchmark_packed_baselines_compute_the_packed_mask():
    """The padded inputs hold each image at its sample's start; flex's document mask_mod is the
    packed prefix mask (same image and (j - start < P or j <= i)), element by element."""
    import bench_attention as ba
    case = ba.make_packed_case("t", 2, 16, torch.device("cpu"), torch.float32, spec=(40, 1, 17))
    lens, P = case.lens, case.prefix_len.tolist()
    assert sum(lens) >= 40 and min(lens) >= 1 and all(1 <= p <= max(1, n - 1) for p, n in zip(P, lens))
    (q, k, v), dout = ba._padded(case)
    for s, (a, n) in enumerate(zip(case.cu_seqlens[:-1].tolist(), lens)):
        assert torch.equal(q[s, :, :n], case.q[a:a + n].transpose(0, 1)) and q[s, :, n:].abs().sum() == 0
        assert torch.equal(v[s, :, :n], case.v[a:a + n].transpose(0, 1))
        assert torch.equal(dout[s, :, :n], case.dout[a:a + n].transpose(0, 1))
    T = sum(lens)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    got = ba.document_block_mask(case, compiled=False).mask_mod(0, 0, i, j)
    img = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    start = torch.tensor([0, *lens]).cumsum(0)[img]
    want = (img[:, None] == img[None, :]) & ((j - start[None, :] < torch.tensor(P)[img][None, :]) | (j <= i))
    assert torch.equal(got, want)


def test_report_skips_files_that_are_not_benchmark_rows(tmp_path):
    (tmp_path / "demo-signal-cpu-2026-11-29.json").write_text(json.dumps([{"op": "demo", "wall_s": 3.0}]))
    (tmp_path / "kernels-H100-2026-11-25.json").write_text(json.dumps([_row("aimv2", 0.1)]))
    assert list(report.load_rows(tmp_path)) == ["kernels-H100-2026-11-25"]


def test_step_recipes_build_their_model_configs():
    """Every bench_step recipe builds (compilation is lazy: nothing runs here) with its backends and
    extra model fields, e.g. aimv2_fc13's fused fc1/fc3."""
    import bench_step
    for name, (attn, impl, _, extra) in bench_step.RECIPES.items():
        cfg, model, _ = bench_step.build(name, "aimv2-tiny", 56, torch.device("cpu"))
        assert (cfg.attn_backend, cfg.impl) == (attn, impl)
        assert cfg.fused_fc13 == extra.get("fused_fc13", False) == model.encoder.trunk.blocks[0].mlp.fused_fc13


def test_step_entries_run_in_order_and_the_time_box_uses_measured_times(tmp_path, monkeypatch, capsys):
    """`name@B` entries run in order; under --time-left a compiled entry starts only when the time left
    covers 1.2 x the slowest compiled entry so far (its steps scaled to the batch), RECIPE_MIN_S before
    any: the clock and run_recipe are stubbed, so this is the driver's arithmetic."""
    import bench_step

    class Clock:
        t = 0.0

        def monotonic(self):
            return self.t

    clock, calls = Clock(), []

    def fake(recipe, B, args, device, ceilings, common):
        calls.append((recipe, B))
        clock.t += 30.0 if bench_step.RECIPES[recipe][2] else 5.0
        return {"provider": recipe, "batch": B, "pass": "step", "op": "train_step", "ms": 100.0}

    monkeypatch.setattr(bench_step, "run_recipe", fake)
    monkeypatch.setattr(bench_step, "time", clock)
    # 6 steps of 0.1 s a run (1 warm-up, 2 timed, 3 profiled). t=5: aimv2@3 needs 60 (none measured),
    # 97 left; t=35: fc13 needs 1.2 x 30 = 36, 67 left; t=65: aimv2@6 needs 1.2 x (30 + 0.6) = 36.7,
    # 37 left; t=95: aimv2_attn@3 needs 36 (the B=6 run scaled back to B=3 gives 35.6), 7 left
    assert bench_step.main(["--quick", "--recipes", "eager_ref,aimv2@3,aimv2_fc13@3,aimv2@6,aimv2_attn@3",
                            "--time-left", "102", "--out", str(tmp_path)]) == 0
    assert calls == [("eager_ref", 2), ("aimv2", 3), ("aimv2_fc13", 3), ("aimv2", 6)]
    assert "aimv2_attn  B=3    skipped: 7 s left, it needs ~36 s" in capsys.readouterr().out
    (f,) = tmp_path.glob("step-*.json")
    assert [(r["provider"], r["batch"], r["wall_s"]) for r in json.loads(f.read_text())] == [
        ("eager_ref", 2, 5.0), ("aimv2", 3, 30.0), ("aimv2_fc13", 3, 30.0), ("aimv2", 6, 30.0)]


@pytest.mark.parametrize("spec", ["nope", "aimv2@0", "aimv2@x", "flex@-3"])
def test_step_bad_recipe_entries_are_refused(spec, capsys):
    import bench_step
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--quick", "--recipes", spec])
    assert e.value.code == 2 and "--recipes / --also-batch" in capsys.readouterr().err


def test_step_gpu_quick_runs_every_recipe_once_and_the_curve():
    """`make gpu`'s step stage: every recipe at B=128 (ours first after the eager reference, so a short
    box still compares aimv2 with it), then aimv2 at B=256."""
    import bench_step
    runs = bench_step.parse_runs(bench_step.GPU_QUICK_RUNS, 128)
    assert sorted(r for r, B in runs if B == 128) == sorted(bench_step.RECIPES)
    assert runs[:2] == [("eager_ref", 128), ("aimv2", 128)] and ("aimv2", 256) in runs
    assert bench_step.parse_runs("aimv2,flex,aimv2@128,aimv2@256", 128) == [("aimv2", 128), ("flex", 128),
                                                                         ("aimv2", 256)]


def test_step_also_batch_times_aimv2_and_skips_what_does_not_fit(tmp_path, monkeypatch, capsys):
    """--also-batch: the aimv2 recipe at each extra batch after the recipes; an OOM there is said and
    skipped, the rows measured before it are kept (run_recipe stubbed: this is the driver's logic)."""
    import bench_step
    calls = []

    def fake(recipe, B, args, device, ceilings, common):
        calls.append((recipe, B))
        if B == 512:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"provider": recipe, "batch": B, "pass": "step", "op": "train_step", "ms": 1.0}

    monkeypatch.setattr(bench_step, "run_recipe", fake)
    assert bench_step.main(["--quick", "--recipes", "eager_ref", "--also-batch", "512,3", "--no-profile",
                            "--out", str(tmp_path)]) == 0
    assert calls == [("eager_ref", 2), ("aimv2", 512), ("aimv2", 3)]
    assert "aimv2  B=512  does not fit in device memory (skipped)" in capsys.readouterr().out
    (f,) = tmp_path.glob("step-*.json")
    assert [(r["provider"], r["batch"]) for r in json.loads(f.read_text())] == [("eager_ref", 2), ("aimv2", 3)]
