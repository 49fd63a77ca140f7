"""Loader tests on both backends (CPU): layout, normalisation, captions, rank splits, resume, determinism.

Data: the embedded synthetic dataset at 72 px, 96 samples in 4 shards of 24 (written once per module).
Loader: image_size 56, patch 14 -> N = 16 patches, batch 8.
"""
import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, build_loader, dali_available, normalize_caption
from aimv2.data.synth import write_synthetic_dataset

NO_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia-dali-cuda130 not installed (pip install it to test DALI)")
BACKENDS = ["torch", pytest.param("dali", marks=NO_DALI)]
NUM, PER_SHARD, S, B = 96, 24, 56, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = write_synthetic_dataset(str(out), num=NUM, size=72, seed=3, shard_size=PER_SHARD, progress=False, workers=1)
    return str(out / "{00000..00003}.tar"), paths


@pytest.fixture(scope="module")
def truth(shards):
    """key -> (jpg bytes, caption, label) read with tarfile, independent of the loader's index."""
    out = {}
    for p in shards[1]:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(f"{p}:{key}", {})[ext] = tar.extractfile(m).read()
    return {k: (v["jpg"], v["txt"].decode(), json.loads(v["json"])["label"]) for k, v in out.items()}


def cfg_for(pattern, backend, **kw):
    base = dict(shards=pattern, image_size=S, patch_size=14, batch_size=B, backend=backend, num_workers=1,
                shuffle_buffer=16, seed=11, label_key="label", return_keys=True)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    """n batches and the state_dict after each."""
    it, out = iter(loader), []
    for _ in range(n):
        b = next(it)
        out.append((b, loader.state_dict()))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_layout_ranges_captions_labels(shards, truth, backend):
    loader = build_loader(cfg_for(shards[0], backend, label_key="label"))
    assert loader.backend == backend and loader.num_samples == NUM
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for b, _ in take(loader, 3):
        assert b["images"].shape == (B, 3, S, S) and b["images"].dtype == torch.float32
        assert b["text"].shape == (B, 77) and b["text"].dtype == torch.int64
        assert b["prefix_len"].shape == (B,) and b["prefix_len"].dtype == torch.int64
        assert b["labels"].dtype == torch.int64 and b["images"].is_contiguous()
        x = b["images"]
        assert torch.all(x >= lo.view(1, 3, 1, 1) - 1e-4) and torch.all(x <= hi.view(1, 3, 1, 1) + 1e-4)
        assert x.std() > 0.3  # real pixels, not a constant
        assert ((b["prefix_len"] >= 1) & (b["prefix_len"] <= 15)).all()
        tok = loader.tokenizer
        for i, key in enumerate(b["keys"]):
            _, caption, label = truth[key]
            assert tok.decode(b["text"][i]) == normalize_caption(caption)  # caption round trip
            assert int(b["labels"][i]) == label
            n = int((b["text"][i] != tok.pad_id).sum())
            assert b["text"][i, n - 1] == tok.eos_id and (b["text"][i, n:] == tok.pad_id).all()


def test_eval_pixels_match_independent_pil_pipeline(shards, truth):
    """Eval: centre square -> bicubic resize -> /255 -> ImageNet normalise, against a plain PIL reference."""
    loader = build_loader(cfg_for(shards[0], "torch", train=False, num_workers=0))
    b = next(iter(loader))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, key in enumerate(b["keys"]):
        im = Image.open(io.BytesIO(truth[key][0])).convert("RGB")
        side = min(im.size)
        l, t = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        ref = im.crop((l, t, l + side, t + side)).resize((S, S), Image.BICUBIC)
        ref = torch.from_numpy(np.asarray(ref, dtype=np.float64)).permute(2, 0, 1) / 255.0
        ref = ((ref - mean.double()) / std.double()).float()
        torch.testing.assert_close(b["images"][i], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_is_one_ordered_pass_keeping_last_batch(shards, truth, backend):
    loader = build_loader(cfg_for(shards[0], backend, train=False, batch_size=10))
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert keys == sorted(truth)  # shard order, every sample once
    assert [len(b["keys"]) for b in batches] == [10] * 9 + [6]
    assert not batches[0]["images"].flip(-1).equal(batches[0]["images"])  # sanity: images are not symmetric
    assert list(loader) and len(list(loader)) == 10  # a second pass restarts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])  # 4 shards: split by shard (2) and by sample stride (3)
def test_ranks_cover_every_sample_exactly_once(shards, truth, backend, world):
    for train in (False, True):
        seen = []
        for rank in range(world):
            cfg = cfg_for(shards[0], backend, rank=rank, world_size=world, train=train, batch_size=4)
            loader = build_loader(cfg)
            if train:  # one epoch: batches while the position stays in epoch 0 (4 divides 48 and 32)
                got = [k for b, st in take(loader, loader.num_samples // 4) for k in b["keys"]]
                assert loader.state_dict() == {"epoch": 0, "sample": loader.num_samples}
            else:
                got = [k for b in loader for k in b["keys"]]
            assert len(got) == len(set(got)) == loader.num_samples
            seen += got
        assert sorted(seen) == sorted(truth), f"world={world} train={train}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bit_identical(shards, backend):
    cfg = cfg_for(shards[0], backend)  # 12 batches per epoch
    full = take(build_loader(cfg), 16)
    for cut in (5, 12):  # mid-epoch, and exactly at the end of epoch 0
        state = full[cut - 1][1]
        resumed = take(build_loader(replace(cfg, start_epoch=state["epoch"], start_sample=state["sample"])), 16 - cut)
        for (a, sa), (b, sb) in zip(full[cut:], resumed):
            assert a["keys"] == b["keys"] and sa == sb
            for k in ("images", "text", "prefix_len", "labels"):
                assert torch.equal(a[k], b[k]), (cut, k)
    assert full[11][1] == {"epoch": 0, "sample": 96} and full[12][1]["epoch"] == 1


def test_worker_count_does_not_change_batches(shards):
    ref = take(build_loader(cfg_for(shards[0], "torch", num_workers=0)), 14)
    two = take(build_loader(cfg_for(shards[0], "torch", num_workers=2)), 14)
    for (a, sa), (b, sb) in zip(ref, two):
        assert sa == sb and a["keys"] == b["keys"]
        assert all(torch.equal(a[k], b[k]) for k in ("images", "text", "prefix_len"))
    # eval: 96 samples = 6 chunks + an end marker, so one worker runs out first
    ev = [list(build_loader(cfg_for(shards[0], "torch", train=False, batch_size=7, num_workers=n))) for n in (0, 2)]
    assert [b["keys"] for b in ev[0]] == [b["keys"] for b in ev[1]] and len(ev[0]) == 14
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(*ev))


@NO_DALI
def test_dali_and_torch_agree(shards):
    """Same samples, captions, crops, flips and prefix lengths; pixels differ only by resize kernels."""
    for train in (True, False):
        t = take(build_loader(cfg_for(shards[0], "torch", train=train)), 4)
        d = take(build_loader(cfg_for(shards[0], "dali", train=train)), 4)
        for (a, sa), (b, sb) in zip(t, d):
            assert sa == sb and a["keys"] == b["keys"]
            assert torch.equal(a["text"], b["text"]) and torch.equal(a["prefix_len"], b["prefix_len"])
            diff = (a["images"] - b["images"]).abs()
            assert diff.mean() < 0.03 and diff.max() < 1.5, (train, diff.mean(), diff.max())
            # a mirrored or shifted crop would differ by ~0.5 on average
            assert (a["images"] - b["images"].flip(-1)).abs().mean() > 5 * diff.mean()


def test_epochs_reshuffle_deterministically(shards):
    def epoch_keys(seed, n_epochs=2):
        out = take(build_loader(cfg_for(shards[0], "torch", seed=seed, num_workers=0)), 12 * n_epochs)
        keys = [k for b, _ in out for k in b["keys"]]
        return [keys[i * NUM:(i + 1) * NUM] for i in range(n_epochs)]

    e0, e1 = epoch_keys(11)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert epoch_keys(11, 1)[0] == e0 and epoch_keys(12, 1)[0] != e0
    in_order = sorted(e0)
    assert e0 != in_order  # shuffled within the epoch, not just shard order


def test_prefix_lengths_cover_range_and_depend_on_seed_rank_step(shards):
    from aimv2.data.dataset import prefix_lengths

    cfg = cfg_for(shards[0], "torch")
    p = torch.cat([prefix_lengths(cfg, 0, pos, 64) for pos in range(0, 6400, 64)])
    assert p.min() == 1 and p.max() == cfg.num_patches - 1
    assert abs(p.float().mean().item() - cfg.num_patches / 2) < 0.3
    counts = torch.bincount(p, minlength=16)[1:]
    assert counts.min() > 0.8 * len(p) / 15
    a = prefix_lengths(cfg, 0, 64, 64)
    assert torch.equal(a, prefix_lengths(cfg, 0, 64, 64))
    for other in (replace(cfg, seed=1), replace(cfg, rank=1, world_size=2)):
        assert not torch.equal(a, prefix_lengths(other, 0, 64, 64))
    assert not torch.equal(a, prefix_lengths(cfg, 0, 128, 64)) and not torch.equal(a, prefix_lengths(cfg, 1, 64, 64))
    assert (prefix_lengths(replace(cfg, prefix="full"), 0, 0, 3) == 16).all()


def test_batch_buffers_are_reused_only_once_released():
    """The torch backend normalises into pooled batch buffers: one still referenced by a batch (or a view
    of it) is never handed out again; a dropped one is."""
    from aimv2.data.loader import _BatchPool

    pool = _BatchPool(keep=2)
    ta = torch.from_numpy(pool.get((2, 3, 4, 4)))  # a batch made from the first buffer
    first = ta.data_ptr()
    view = ta[1:]
    del ta
    tb = torch.from_numpy(pool.get((2, 3, 4, 4)))
    assert tb.data_ptr() != first  # `view` keeps the first buffer in use
    del view
    tc = torch.from_numpy(pool.get((2, 3, 4, 4)))
    assert tc.data_ptr() == first  # released: reused
    assert torch.from_numpy(pool.get((2, 3, 4, 4))).data_ptr() not in (first, tb.data_ptr())  # both in use
    assert pool.get((1, 3, 4, 4)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_held_batches_are_never_overwritten(shards, backend):
    """Both backends hand out pooled batch buffers on the CPU: batches the caller still holds (more than the
    pool keeps) stay as they were delivered while later ones are made; dropped ones are reused."""
    cfg = cfg_for(shards[0], backend, seed=int(np.random.default_rng().integers(1 << 30)))
    copies = [b["images"].clone() for b, _ in take(build_loader(cfg), 10)]  # each copied as it arrives
    held = [b["images"] for b, _ in take(build_loader(cfg), 10)]  # all 10 kept
    assert len({x.data_ptr() for x in held}) == 10
    for i, (h, c) in enumerate(zip(held, copies)):
        assert torch.equal(h, c), i
    it = iter(build_loader(cfg))
    ptrs = set()
    for _ in range(10):
        ptrs.add(next(it)["images"].data_ptr())  # dropped at once: a few buffers serve every batch
    assert len(ptrs) <= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_hflip_off_never_mirrors_a_training_crop(tmp_path, backend):
    """Images red on the left, blue on the right: with hflip=False every training crop keeps red on the left;
    with the default some come out mirrored (so the check can fail)."""
    from aimv2.data.testing import write_shard
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40, 0], img[:, 40:, 2] = 230, 230
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    samples = [{"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": b"a red left half",
                "json": json.dumps({"label": 0}).encode()} for i in range(24)]
    pattern = write_shard(str(tmp_path / "lr.tar"), samples)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1), torch.tensor(IMAGENET_STD).view(3, 1)

    def mirrored(**kw):
        out = []
        for b, _ in take(build_loader(cfg_for(pattern, backend, crop_scale=(0.5, 1.0), **kw)), 6):
            px = b["images"].float() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)   # back to [0, 1]
            left, right = px[..., :, :S // 4].mean((2, 3)), px[..., :, -S // 4:].mean((2, 3))  # (B, 3)
            out += (left[:, 2] > left[:, 0]).tolist()                # blue on the left: mirrored
            assert ((left[:, 0] - right[:, 0]).abs() > 0.5).all()   # every crop straddles the two halves
        return out

    assert not any(mirrored(hflip=False))
    assert 0 < sum(mirrored()) < 48
