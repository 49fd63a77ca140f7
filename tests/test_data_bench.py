"""benchmarks/bench_data.py --quick: the data benchmark's whole path (both sets generated, every provider
importable here in a fresh process per cell, rows appended) runs on the CPU and writes schema rows.
Timings are never asserted (CONVENTIONS.md); what is checked is what a broken benchmark would get wrong."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_data  # noqa: E402


def test_photo_set_is_deterministic_and_photo_sized():
    a, b = bench_data.photo_jpeg(3), bench_data.photo_jpeg(3)
    assert a == b and a != bench_data.photo_jpeg(4)
    im = Image.open(__import__("io").BytesIO(a))
    assert im.format == "JPEG" and im.size == (500, 375) and im.mode == "RGB"
    sizes = [len(bench_data.photo_jpeg(i)) for i in range(6)]
    assert 35_000 < np.mean(sizes) < 60_000, sizes  # ~47 KB: photo-like detail, not flat colour or noise


@pytest.mark.timeout(180)
def test_quick_run_writes_rows_for_every_provider(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--quick", "--out", str(tmp_path),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=170, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("data-*.json")
    rows = json.loads(path.read_text())
    for row in rows:
        for key in ("device", "date", "git_sha", "torch", "triton", "command", "op", "pass", "shape", "dtype",
                    "provider", "ms", "uptime_at_start", "pillow"):
            assert key in row, key
    skipped = {r["provider"] for r in rows if r["repeat"] == "skipped"}
    for r in rows:
        if r["repeat"] == "skipped":
            assert "not importable" in r["skipped"] or r["skipped"] == "needs CUDA"
    med = [r for r in rows if r["repeat"] == "median"]
    names = {(r["provider"], r["backend"]) for r in med}
    assert ("aimv2", "torch") in names and {"webdataset", "dali_reader"} <= {p for p, _ in names} | skipped
    assert {r["dataset"] for r in med} == {"synth", "photos"}
    for r in med:
        assert r["images_per_s"] > 0 and r["cpu_s_per_image"] >= 0 and r["ms"] > 0
        assert r["shape"] == f"set={r['dataset']},B=8,S=224,workers=1" and r["op"] == "data"
        if {"webdataset", "dali_reader"} - skipped:  # a ratio needs a peer
            peers = [p["images_per_s"] for p in med if p["dataset"] == r["dataset"] and p["provider"] in
                     ("webdataset", "dali_reader")]
            assert r["ratio_to_best_peer"] == pytest.approx(r["images_per_s"] / max(peers))
    assert rows[-1]["repeat"] == "end"


@pytest.mark.timeout(120)
def test_quick_native_run_writes_packed_rows(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--quick", "--native", "--sets",
                        "synth", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("data-*.json")
    med = [row for row in json.loads(path.read_text()) if row["repeat"] == "median"]
    assert {row["backend"] for row in med} >= {"torch_native"}
    for row in med:
        assert row["shape"] == "set=synth,tokens=4096,patches=256..1024,workers=1" and row["provider"] == "aimv2"
        # every image is 256..1024 patches (the synth set's 224 px crops are clamped up to 256)
        assert 256 <= row["tokens_per_s"] / row["images_per_s"] <= 1024
        assert row["batches_per_s"] * 4096 >= row["tokens_per_s"] > 0
