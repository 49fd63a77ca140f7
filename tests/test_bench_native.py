"""benchmarks/bench_native.py --quick: the packed-vs-padded encoder rows on a CPU (tiny encoder)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_native_benchmark_cpu_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_native.py"), "--quick", "--cpu-rounds", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("native-*.json")).read_text())
    by = {x["provider"]: x for x in rows}
    assert set(by) == {"packed", "padded"} and {x["op"] for x in rows} == {"encoder_native"}
    for key in ("device", "date", "git_sha", "torch", "triton", "command", "shape", "dtype", "ms", "images_per_s"):
        assert all(key in x for x in rows), key
    packed, padded = by["packed"], by["padded"]
    assert packed["tokens"] == packed["useful_tokens"] < padded["tokens"]     # padding to the largest square
    assert padded["tokens"] == 10 * (padded["padded_side"] // 14) ** 2
    assert packed["max_abs_diff_alone"] < 1e-4 and packed["speedup_vs_padded"] > 0
    assert [tuple(g) for g in packed["grids"][:5]] == [(7, 9), (9, 7), (6, 10), (8, 8), (10, 6)]
    import report                                                             # the results table reads them
    assert report.table(rows).count("\n") == len(rows) + 1


def test_mix_grids_follow_the_embed_rule():
    import bench_native as bn
    from aimv2.eval.embed import native_grid
    grids = bn.mix_grids(7, 1024)
    assert len(grids) == 7 and grids[5] == grids[0]
    assert grids[:5] == [native_grid(h, w, 14, 1024) for h, w in bn.MIX.values()]
    assert all(h * w <= 1024 for h, w in grids)
