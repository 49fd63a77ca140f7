"""Bad data is skipped and counted, good samples still arrive exactly once; hopeless inputs fail clearly."""
import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from aimv2.data import DataConfig, build_loader, dali_available
from aimv2.data.shards import index_shard
from aimv2.data.testing import bad_samples, good_sample, write_shard

NO_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia-dali-cuda130 not installed (pip install it to test DALI)")
BACKENDS = ["torch", pytest.param("dali", marks=NO_DALI)]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """3 shards of good samples interleaved with every kind of breakage, plus a truncated shard."""
    d = tmp_path_factory.mktemp("dirty")
    rng = np.random.default_rng(7)
    good, expected, captionless = [], Counter(), []
    for s in range(3):
        samples = []
        for i in range(10):
            g = good_sample(f"s{s}_{i:02d}", rng, width=int(rng.integers(40, 130)), height=int(rng.integers(40, 130)),
                            label=i)
            samples.append(g)
            good.append(f"{d}/{s:05d}.tar:{g['__key__']}")
            if i % 3 == 1:
                for reason, bad in bad_samples(rng, prefix=f"s{s}_{i}").items():
                    samples.append(bad)
                    expected[reason.replace("_decode", "")] += 1
                    if reason in ("missing_caption", "empty_caption"):
                        captionless.append(f"{d}/{s:05d}.tar:{bad['__key__']}")
        write_shard(str(d / f"{s:05d}.tar"), samples)
    # shard 3: 5 good samples, the file cut inside the 5th sample's image
    samples = [good_sample(f"t_{i}", rng) for i in range(5)]
    path = write_shard(str(d / "00003.tar"), samples)
    off, n = index_shard(path).components[4]["jpg"]
    write_shard(path, samples, truncate_at=off + n // 2)
    good += [f"{path}:t_{i}" for i in range(4)]
    expected["truncated_shard"] += 1
    return str(d / "{00000..00003}.tar"), sorted(good), expected, sorted(captionless)


def _cfg(pattern, backend, **kw):
    base = dict(shards=pattern, image_size=28, patch_size=14, batch_size=4, backend=backend, num_workers=1,
                shuffle_buffer=8, label_key="label", return_keys=True, seed=1)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_good_sample_once_and_bad_ones_counted(dirty, backend):
    pattern, good, expected, captionless = dirty
    # evaluation (probe / embed) needs no caption: caption-less samples are delivered, not skipped
    expected = {k: v for k, v in expected.items() if k not in ("missing_caption", "empty_caption")}
    good = sorted(good + captionless)
    loader = build_loader(_cfg(pattern, backend, train=False))
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == good and len(keys) == len(set(keys))
    stats = loader.stats()
    got = {k[len("skipped_"):]: v for k, v in stats.items() if k.startswith("skipped_")}
    assert got == dict(expected), stats
    assert stats["skipped"] == sum(expected.values()) and stats["samples"] == len(good)
    empty = loader.tokenizer([""])[0]                  # what an empty caption tokenises to
    for b in batches:
        for k, t in zip(b["keys"], b["text"]):
            assert torch.equal(t, empty) == (k in captionless), k
    assert stats["truncated_shards"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epochs_survive_bad_data_and_resume(dirty, backend):
    pattern, good, _, _ = dirty
    cfg = _cfg(pattern, backend)
    loader = build_loader(cfg)
    it = iter(loader)
    per_epoch = Counter()
    run = []
    while True:
        b = next(it)
        st = loader.state_dict()
        if st["epoch"] == 2:
            break
        run.append((b, st))
        per_epoch.update((st["epoch"], k) for k in b["keys"])
    n = len(good) // 4 * 4  # drop_last: fewer than 4 left over are dropped
    for e in (0, 1):
        keys = [k for (ep, k) in per_epoch if ep == e]
        assert len(keys) == n and set(keys) <= set(good) and max(per_epoch.values()) == 1
    st = run[5][1]
    resumed = build_loader(replace(cfg, start_epoch=st["epoch"], start_sample=st["sample"]))
    it2 = iter(resumed)
    for b, s in run[6:]:
        c = next(it2)
        assert c["keys"] == b["keys"] and resumed.state_dict() == s
        assert (c["images"] == b["images"]).all() and (c["prefix_len"] == b["prefix_len"]).all()


@NO_DALI
@pytest.mark.parametrize("train", [True, False])
def test_dali_in_flight_refill_forms_the_torch_batches(dirty, train):
    """DALI runs two batches at once (prefetch); a sample only its decoder rejects fails a batch after the
    next one was fed. The batches in flight are taken back, the culprits skipped and the batches re-formed:
    the same keys per batch and positions as the torch backend, which decodes sample by sample."""
    pattern = dirty[0]
    n = 14 if train else 10**6  # train: past the end of epoch 0 (bad samples in every shard)
    got = {}
    for backend in ("torch", "dali"):
        loader = build_loader(_cfg(pattern, backend, train=train))
        it, out = iter(loader), []
        for _ in range(n):
            try:
                b = next(it)
            except StopIteration:
                break
            out.append((b["keys"], loader.state_dict()))
        got[backend] = (out, loader.stats())
    assert got["dali"][0] == got["torch"][0] and len(got["torch"][0]) > 8
    if not train:  # a whole pass: the same skips (in training the counts run ahead with each backend's read-ahead)
        assert got["dali"][1] == got["torch"][1] and got["torch"][1]["skipped_corrupt_image"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_bad_names_the_shard(tmp_path, backend):
    rng = np.random.default_rng(0)
    path = write_shard(str(tmp_path / "bad.tar"), list(bad_samples(rng).values()))
    with pytest.raises(RuntimeError, match="bad.tar"):
        next(iter(build_loader(_cfg(path, backend))))
    # evaluation accepts caption-less samples; everything else in bad_samples is still bad there
    bad = [v for k, v in bad_samples(rng).items() if k not in ("missing_caption", "empty_caption")]
    path = write_shard(str(tmp_path / "bad-eval.tar"), bad)
    with pytest.raises(RuntimeError, match="every sample"):
        list(build_loader(_cfg(path, backend, train=False)))


def test_clear_errors_for_missing_or_unreadable_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        build_loader(_cfg(str(tmp_path / "nothere/{000..003}.tar"), "torch"))
    with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
        build_loader(_cfg(str(tmp_path), "torch"))  # a directory without shards
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        build_loader(_cfg(str(tmp_path / "*.tar"), "torch"))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk.tar.*not a tar"):
        build_loader(_cfg(str(junk), "torch"))
    rng = np.random.default_rng(0)
    few = write_shard(str(tmp_path / "few.tar"), [good_sample(f"k{i}", rng) for i in range(3)])
    with pytest.raises(ValueError, match="batch_size=4"):
        next(iter(build_loader(_cfg(few, "torch"))))
    with pytest.raises(ValueError, match="DataConfig.rank"):
        build_loader(_cfg(few, "torch", rank=2, world_size=2))
    with pytest.raises(ValueError, match="DataConfig.image_size"):
        build_loader(_cfg(few, "torch", image_size=30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_formats_and_modes_decode_to_rgb(tmp_path, backend):
    """Grayscale / CMYK JPEG, RGBA / palette PNG, WebP: all arrive as 3 normalised channels."""
    import io

    from PIL import Image

    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).resize((140, 100))
    variants = {"gray.jpg": (base.convert("L"), "JPEG"), "cmyk.jpg": (base.convert("CMYK"), "JPEG"),
                "rgba.png": (base.convert("RGBA"), "PNG"), "pal.png": (base.convert("P"), "PNG"),
                "rgb.webp": (base, "WEBP")}
    samples = []
    for name, (im, fmt) in variants.items():
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        key, ext = name.split(".")
        samples.append({"__key__": key, ext: buf.getvalue(), "txt": name.encode(), "json": b'{"label": 3}'})
    path = write_shard(str(tmp_path / "fmt.tar"), samples)
    (b,) = list(build_loader(_cfg(path, backend, train=False, batch_size=8)))
    assert [k.split(":")[1] for k in b["keys"]] == ["gray", "cmyk", "rgba", "pal", "rgb"]
    x = b["images"]
    assert x.shape == (5, 3, 28, 28) and torch.isfinite(x).all()
    gray = x[0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert (gray[0] - gray[1]).abs().max() < 0.02 and (gray[1] - gray[2]).abs().max() < 0.02  # R = G = B
    assert (x[2] - x[4]).abs().mean() < 0.1  # RGBA (opaque) and WebP of the same picture agree


def test_backend_choice_and_device_errors(tmp_path, monkeypatch, caplog):
    from aimv2.data import loader as loader_mod

    rng = np.random.default_rng(0)
    path = write_shard(str(tmp_path / "ok.tar"), [good_sample(f"k{i}", rng) for i in range(4)])
    # auto = what was measured fastest on the device: torch on the CPU, DALI (nvJPEG) on a GPU; logged with why
    with caplog.at_level("INFO", logger="aimv2.data.loader"):
        assert build_loader(_cfg(path, "auto")).backend == "torch"
    assert "data: torch backend (auto on the CPU: measured faster" in caplog.text and "decodes with Pillow" in caplog.text
    cuda = torch.device("cuda")
    assert loader_mod.pick_backend("auto", cuda)[0] == ("dali" if dali_available() else "torch")
    assert loader_mod.pick_backend("torch", cuda) == ("torch", "DataConfig.backend")
    if dali_available():
        assert build_loader(_cfg(path, "dali")).backend == "dali"
    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    backend, why = loader_mod.pick_backend("auto", cuda)
    assert backend == "torch" and "DALI is not importable" in why
    assert build_loader(_cfg(path, "auto")).backend == "torch"
    with pytest.raises(ImportError, match="nvidia-dali"):
        build_loader(_cfg(path, "dali"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="DataConfig.device"):
            build_loader(_cfg(path, "torch", device="cuda"))
    with pytest.raises(ValueError, match="DataConfig.backend"):
        build_loader(_cfg(path, "tf"))


def _pil_u8(datas):
    """Stand-in for torchvision.io.decode_jpeg on the CPU: list[bytes] -> list of uint8 (3, H, W)."""
    import io

    from PIL import Image

    out = []
    for d in datas:
        im = Image.open(io.BytesIO(d)).convert("RGB")
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return out


def test_deferred_gpu_style_jpeg_decode_path(dirty):
    """The torch backend's GPU decode path (bytes to the main process, decode, tensor_crop_resize), driven on
    the CPU with a PIL stand-in decoder: same samples and skips, pixels close to the PIL path."""
    pattern, good, expected, captionless = dirty
    good = sorted(good + captionless)                 # eval mode delivers caption-less samples
    ref = build_loader(_cfg(pattern, "torch", train=False, image_size=42))
    alt = build_loader(_cfg(pattern, "torch", train=False, image_size=42))
    alt._jpeg_decoder = _pil_u8
    a, b = list(ref), list(alt)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert sorted(k for x in b for k in x["keys"]) == good
    assert alt.stats() == ref.stats()  # the undecodable JPEG is found by the deferred decoder instead
    for x, y in zip(a, b):
        # PIL's and torch's antialiased bicubic differ by ~2.5 / 255 on average on these noisy images
        # (0.04 normalised); a wrong crop box or flip costs > 10x that
        diff = (x["images"] - y["images"]).abs()
        assert diff.mean() < 0.06 and torch.equal(x["prefix_len"], y["prefix_len"])
        assert (x["images"] - y["images"].flip(-1)).abs().mean() > 5 * diff.mean()
    # train mode, with a flip and resume through the deferred path
    cfg = _cfg(pattern, "torch")
    full = build_loader(cfg)
    full._jpeg_decoder = _pil_u8
    it = iter(full)
    run = [(next(it), full.state_dict()) for _ in range(8)]
    res = build_loader(replace(cfg, start_epoch=run[3][1]["epoch"], start_sample=run[3][1]["sample"]))
    res._jpeg_decoder = _pil_u8
    it2 = iter(res)
    for x, _ in run[4:]:
        y = next(it2)
        assert x["keys"] == y["keys"] and torch.equal(x["images"], y["images"])


def test_tensor_crop_resize_matches_pil():
    from aimv2.data.augment import CropPlan, tensor_crop_resize
    from aimv2.data.dataset import Record
    from aimv2.data.loader import _check_gpu_decoder, decode_pil
    from aimv2.data.testing import jpeg_bytes

    rng = np.random.default_rng(3)
    data = jpeg_bytes(rng, 90, 70)
    rec = Record(0, data, 90, 70, "c", None, "k")
    img = _pil_u8([data])[0]
    for plan in [CropPlan(0, 0, 90, 70, False), CropPlan(10, 4, 41, 57, True), CropPlan(30, 20, 17, 13, False)]:
        got = tensor_crop_resize(img, plan, 32)
        ref = torch.from_numpy(decode_pil(rec, plan, 32).astype(np.float32)).permute(2, 0, 1)
        assert got.shape == (3, 32, 32) and (got - ref).abs().mean() < 3.0, plan
        mirrored = tensor_crop_resize(img, replace(plan, flip=not plan.flip), 32)
        assert torch.equal(mirrored, got.flip(-1))
    assert _check_gpu_decoder(_pil_u8) is None
    assert "mean" in _check_gpu_decoder(lambda ds: [torch.zeros_like(_pil_u8(ds)[0])])
    assert "RuntimeError" in _check_gpu_decoder(lambda ds: (_ for _ in ()).throw(RuntimeError("no nvjpeg")))
