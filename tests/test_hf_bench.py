"""benchmarks/bench_hf.py --dry: the Llama- and Siglip-shaped "aimv2" vs "sdpa" rows on a CPU (tiny models,
the interpreter), run in this process; the rows carry the schema fields and show which path ran."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("kernels")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_hf  # noqa: E402


def test_dry_run_writes_rows_for_both_shapes(tmp_path):
    assert bench_hf.main(["--dry", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("hf-*.json")
    rows = json.loads(path.read_text())
    need = {"device", "date", "git_sha", "torch", "triton", "command", "op", "pass", "shape", "dtype",
            "provider", "ms", "tflops", "pct_of_ceiling", "peak_mem_mb", "tokens_per_s", "paths",
            "max_abs_diff_vs_sdpa"}
    for r in rows:
        assert need <= r.keys(), need - r.keys()
        assert r["ms"] > 0 and r["tflops"] > 0 and r["dtype"] == "fp32"
    got = {(r["shape"], r["provider"], r["pass"]): r for r in rows}
    for shape in ("llama-b2-n16", "llama-b2-n16-rightpad", "siglip-b2-n16"):      # --dry: no left padding
        providers = ("sdpa", "aimv2", "aimv2_kernelize") if shape.startswith("llama") else ("sdpa", "aimv2")
        for provider in providers:
            for pass_ in ("fwd", "fwdbwd"):
                assert (shape, provider, pass_) in got, (shape, provider, pass_)
    assert len(rows) == 2 * (3 + 3 + 2)
    # our kernels ran (not a fallback) and agree with sdpa; sdpa rows record no aimv2 path
    assert got[("llama-b2-n16", "aimv2", "fwd")]["paths"].get("kernel") == 1
    assert got[("llama-b2-n16-rightpad", "aimv2_kernelize", "fwd")]["paths"] == {"kernel_varlen": 1,
                                                                               "sdpa_padded_rows": 1}
    assert got[("llama-b2-n16-rightpad", "aimv2", "fwdbwd")]["paths"] == {"kernel_varlen": 1, "sdpa_padded_rows": 1}
    assert got[("siglip-b2-n16", "aimv2", "fwdbwd")]["paths"] == {"kernel": 1}
    assert got[("siglip-b2-n16", "sdpa", "fwd")]["paths"] == {}
    for r in rows:
        if r["provider"] != "sdpa":
            assert r["max_abs_diff_vs_sdpa"] < 1e-4, r


def test_refuses_bad_cases(capsys):
    assert bench_hf.main(["--dry", "--cases", "gpt"]) == 2
    assert "--cases: expected a comma list of llama, siglip" in capsys.readouterr().err
