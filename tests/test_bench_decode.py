"""benchmarks/bench_decode.py: the CPU smoke run, the PIL path against the augmentation code, the nvjpeg
path and its correctness gate with a host stand-in for nvJPEG, and the step file behind headroom."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_decode as bd  # noqa: E402
from aimv2.data import DataConfig  # noqa: E402
from aimv2.data.augment import crop_plan, pil_crop_resize  # noqa: E402
from aimv2.data.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from aimv2.data.dataset import SampleReader, SampleTable  # noqa: E402
from aimv2.data.synth import write_synthetic_dataset  # noqa: E402


def _step_file(d: Path, date: str, aimv2: float, device: str = "NVIDIA H200") -> None:
    rows = [{"provider": "eager_ref", "images_per_s": 1.0, "device": device, "preset": "aimv2-large"},
            {"provider": "aimv2", "images_per_s": aimv2, "device": device, "preset": "aimv2-large"}]
    (d / f"step-{device.replace(' ', '-')}-{date}.json").write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """8 samples of the embedded set read as the pil provider reads them: (cfg, recs, plans, sids)."""
    d = tmp_path_factory.mktemp("decode")
    paths = write_synthetic_dataset(str(d / "synth"), num=8, size=224, shard_size=8, progress=False)
    cfg = DataConfig(shards=paths, seed=0)
    reader = SampleReader(SampleTable.build(paths, str(d / "idx")), cfg)
    epoch, sids = bd.batch_ids(8, 8, 0)
    recs, plans = bd.read_batch(reader, cfg, epoch, sids, keep_header=True, defer_scan_check=True)
    reader.close()
    return cfg, recs, plans, sids


def _host_decode(datas, offset: int = 0):
    """A stand-in for nvJPEG: PIL's decode as uint8 (3, H, W) tensors, each level + offset (clamped)."""
    return [torch.from_numpy(np.clip(np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.int16) + offset,
                                     0, 255).astype(np.uint8)).permute(2, 0, 1) for d in datas]


def test_quick_cli_writes_pil_rows_and_says_why_nvjpeg_is_skipped(tmp_path):
    steps = tmp_path / "steps"
    steps.mkdir()
    _step_file(steps, "2026-11-29", 500.0)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--quick", "--out", str(tmp_path),
                        "--data-dir", str(tmp_path / "data"), "--step-results", str(steps)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("decode-*.json")).read_text())
    pil = [x for x in rows if x["provider"] == "pil"]
    assert len(pil) == 1 and pil[0]["images_per_s"] > 0 and pil[0]["ms_p20"] <= pil[0]["ms"] <= pil[0]["ms_p80"]
    for key in ("device", "date", "git_sha", "torch", "triton", "command", "ms", "ms_read", "batch"):
        assert key in pil[0], key
    assert (pil[0]["op"], pil[0]["pass"], pil[0]["shape"], pil[0]["dtype"]) == \
        ("jpeg_decode", "fwd", "synth-224px-b16", "uint8->fp32")
    assert pil[0]["consumes_images_per_s"] == 500.0
    assert pil[0]["headroom"] == pytest.approx(pil[0]["images_per_s"] / 500.0)
    if not torch.cuda.is_available():
        assert {x["provider"] for x in rows} == {"pil"}
        for p in ("nvjpeg", "nvjpeg_decode_only"):
            line = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"skip {p}: "))
            assert "CUDA" in line or "torchvision" in line, line


def test_pil_path_equals_the_augmentation_code(batch):
    """Plans drawn independently (augment.crop_plan per sample), pixels from PIL's own decode and
    pil_crop_resize, normalised in float64: the bench's batch must equal it up to float32 rounding
    (|x| <= 2.7, so 1e-5 is ~ 40 ulp; a wrong box, flip, channel order or statistic is >= 1 level = 0.017)."""
    cfg, recs, plans, sids = batch
    mine = [crop_plan(cfg, 0, sid, 224, 224) for sid in sids]
    assert plans == mine
    assert {p.flip for p in mine} == {True, False} and any(p.w < 224 for p in mine)  # the batch exercises both
    mean, std = np.array(IMAGENET_MEAN).reshape(3, 1, 1), np.array(IMAGENET_STD).reshape(3, 1, 1)
    want = np.stack([(pil_crop_resize(Image.open(io.BytesIO(r.image)).convert("RGB"), p, 224)
                      .transpose(2, 0, 1) / 255.0 - mean) / std for r, p in zip(recs, mine)])  # (8, 3, 224, 224)
    got = bd.pil_batch(recs, plans, torch.device("cpu"))
    assert got.shape == (8, 3, 224, 224) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_nvjpeg_path_and_gate_with_a_host_stand_in(batch, tmp_path, monkeypatch, capsys):
    """The GPU path's crop / flip / normalise (tensor_crop_resize) on a host decoder agrees with the PIL path
    to well under a level on average (the two bicubic filters differ at the box's edges, a wrong flip or
    box costs tens of levels); an exact decoder passes the gate with diff 0, one 8 levels off or one that
    raises is refused with the reason and the pil row is still measured."""
    _, recs, plans, _ = batch
    gpu = bd.nvjpeg_batch(recs, plans, _host_decode)
    assert gpu.shape == (8, 3, 224, 224) and gpu.dtype == torch.float32
    levels = (gpu - bd.pil_batch(recs, plans, torch.device("cpu"))) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert levels.abs().mean() < 0.5
    assert bd.decode_check(_host_decode, recs) == {"max_abs_diff_vs_pil": 0.0, "mean_abs_diff_vs_pil": 0.0}
    assert bd.decode_check(lambda d: _host_decode(d, 8), recs)["mean_abs_diff_vs_pil"] > bd.MAX_MEAN_DIFF

    args = ["--quick", "--data-dir", str(tmp_path / "data"), "--step-results", str(tmp_path), "--batch", "8", "--num", "16",
            "--batches", "2"]

    def broken(datas):
        raise RuntimeError("nvjpeg: not compiled in")

    cases = {"good": _host_decode, "off": lambda d: _host_decode(d, 8), "broken": broken}
    for name, decode in cases.items():
        monkeypatch.setattr(bd, "gpu_decoder", lambda device, f=decode: (f, None))
        assert bd.main(args + ["--out", str(tmp_path / name)]) == 0
        rows = json.loads(next((tmp_path / name).glob("decode-*.json")).read_text())
        got, err = {x["provider"]: x for x in rows}, capsys.readouterr().err
        if name == "good":
            assert set(got) == set(bd.PROVIDERS) and got["nvjpeg"]["max_abs_diff_vs_pil"] == 0
            assert all(x["images_per_s"] > 0 and x["headroom"] is None for x in rows)   # no step file there
        else:   # the nvjpeg providers refused with the reason, the pil row still measured
            assert set(got) == {"pil"}
            why = "mean |nvJPEG - libjpeg-turbo| = 8.00 levels > 3.0" if name == "off" else \
                "the decode of the first batch failed: RuntimeError: nvjpeg"
            assert f"error: nvjpeg B=8: {why}" in err and f"error: nvjpeg_decode_only B=8: {why}" in err


def test_consumes_reads_the_newest_step_file(tmp_path):
    assert bd.step_images_per_s(tmp_path) == (None, None)
    _step_file(tmp_path, "2026-11-29", 400.0)
    _step_file(tmp_path, "2026-12-01", 531.5, device="NVIDIA H100 80GB HBM3")
    _step_file(tmp_path, "2026-12-02", 3.0, device="cpu")            # a CPU dry run feeds nothing
    (tmp_path / "step-broken-2026-12-03.json").write_text("[{")       # unreadable: passed over
    assert bd.step_images_per_s(tmp_path) == (531.5, "step-NVIDIA-H100-80GB-HBM3-2026-12-01.json")
