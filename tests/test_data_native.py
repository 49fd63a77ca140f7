"""Native-resolution data mode (aimv2/data/native.py): grid rounding, prefixes, packing, both backends.

Loader data: the embedded synthetic dataset at 72 px, 48 samples in 2 shards; native grids with
min_patches 12, max_patches 20 (crops of 45-72 px are 10-26 patches at 14 px: both clamps are hit)
and a budget of 64 tokens (3-6 images per batch).
"""
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, build_loader, dali_available
from aimv2.data.augment import crop_plans
from aimv2.data.dataset import SampleReader, SampleTable, epoch_order
from aimv2.data.native import greedy_packs, native_grid, native_prefix_lengths, patchify_hwc
from aimv2.data.shards import resolve_shards
from aimv2.data.synth import write_synthetic_dataset
from aimv2.data.testing import bad_samples, good_sample, write_shard
from aimv2.kernels import patchify
from aimv2.packing import PackedBatch, pack_images, unpack, unpatchify

NO_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed (pip install it to test DALI)")
BACKENDS = ["torch", pytest.param("dali", marks=NO_DALI)]
P, LO, HI, BUDGET = 14, 12, 20, 64


# ---- native_grid -----------------------------------------------------------------------------------
def brute_grid(H, W, p, lo, hi):
    """Every integer grid in range, the nearest to the ideal one in log coordinates; ties: smaller h, then w."""
    area = min(max(H * W / p ** 2, lo), hi)
    lh = 0.5 * (math.log(area) - math.log(W / H))
    lw = math.log(area) - lh
    best = min(((math.log(h) - lh) ** 2 + (math.log(w) - lw) ** 2, h, w)
               for h in range(1, hi + 1) for w in range(1, hi // h + 1) if lo <= h * w)
    return best[1], best[2]


def test_native_grid_is_the_nearest_grid_in_range():
    rng = np.random.default_rng(0)
    cases = [(int(rng.integers(1, 900)), int(rng.integers(1, 900)), int(rng.integers(1, 40))) for _ in range(300)]
    cases += [(1, 2000, 5), (2000, 1, 5), (1, 1, 1), (7, 7, 1), (4000, 3000, 17), (13, 14, 2)]
    cases = [(H, W, lo, lo + int(rng.integers(0, 60))) for H, W, lo in cases]
    cases += [(int(rng.integers(1, 9000)), int(rng.integers(1, 9000)), 256, 1024) for _ in range(20)]
    cases += [(300, 500, 37, 37), (500, 300, 97, 100), (1, 5000, 256, 1024)]  # prime-only bands: the full scan
    for H, W, lo, hi in cases:
        h, w = native_grid(H, W, 14, lo, hi)
        assert lo <= h * w <= hi and (h, w) == brute_grid(H, W, 14, lo, hi), (H, W, lo, hi, h, w)


def test_native_grid_keeps_in_range_sizes_and_aspect():
    # an image whose patch count is in range keeps its size to the nearest patch
    for H, W in [(224, 224), (336, 224), (14 * 17, 14 * 23), (300, 500), (199, 701)]:
        h, w = native_grid(H, W, 14, 64, 4096)
        assert (h, w) == (round(H / 14), round(W / 14)) or abs(h - H / 14) <= 1 and abs(w - W / 14) <= 1, (H, W, h, w)
    # too large: scaled down to at most max, aspect ratio within a patch of the ideal
    for H, W in [(3000, 4000), (4000, 3000), (1080, 1920), (5000, 5000)]:
        h, w = native_grid(H, W, 14, 256, 1024)
        assert 0.9 * 1024 <= h * w <= 1024 and abs(w / h - W / H) <= (W / H) * (1 / h + 1 / w) * 1.01, (H, W, h, w)
    # too small: scaled up to at least min
    h, w = native_grid(30, 40, 14, 256, 1024)
    assert 256 <= h * w <= 290 and abs(w / h - 4 / 3) < 0.1
    # extreme strips land in range, as near their aspect ratio as the range allows
    assert native_grid(1, 2000, 14, 256, 1024) == (1, 716)  # ideal 0.36 x 715.5: h clamps to 1
    assert native_grid(2000, 1, 14, 256, 1024) == (716, 1)
    assert native_grid(1, 100000, 14, 256, 1024) == (1, 1024)
    assert native_grid(1, 1, 14, 2, 2) in ((1, 2), (2, 1))


@pytest.mark.parametrize("args, match", [
    ((0, 5, 14, 2, 4), "height"), ((5, 5, 14, 0, 4), "min_patches"), ((5, 5, 14, 5, 4), "min_patches=5 > max"),
    ((5.0, 5, 14, 2, 4), "height"), ((5, 5, True, 2, 4), "patch_size")])
def test_native_grid_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        native_grid(*args)


# ---- prefix, patch order, packing ------------------------------------------------------------------
def test_native_prefix_is_uniform_per_position():
    n = np.random.default_rng(1).integers(2, 40, size=4000)
    pos = np.arange(100, 4100)
    p = native_prefix_lengths(7, 0, 3, pos, n).numpy()
    assert ((1 <= p) & (p <= n - 1)).all()
    # U{1..N-1}: for N = 2 always 1; for large N the normalised value is uniform
    assert (p[n == 2] == 1).all()
    big = n >= 20
    z = (p[big] - 1) / (n[big] - 2)
    assert abs(z.mean() - 0.5) < 0.03 and (z < 0.1).mean() > 0.06 and (z > 0.9).mean() > 0.06
    # a pure function of (seed, rank, epoch, position): any subset, any order, gives the same values
    sub = [3, 2000, 17]
    assert native_prefix_lengths(7, 0, 3, pos[sub], n[sub]).tolist() == p[sub].tolist()
    for other in [(8, 0, 3), (7, 1, 3), (7, 0, 4)]:
        assert (native_prefix_lengths(*other, pos, n).numpy() != p).mean() > 0.5, other
    assert native_prefix_lengths(7, 0, 3, [0, 1], [1, 5], "full").tolist() == [1, 5]
    assert native_prefix_lengths(7, 0, 3, [0, 1], [1, 5], 3).tolist() == [1, 3]
    assert native_prefix_lengths(7, 0, 3, [0, 1], [1, 1]).tolist() == [1, 1]  # N = 1: the lone patch is context


def test_patchify_hwc_is_kernels_patchify():
    rng = np.random.default_rng(2)
    for H, W, C, p in [(28, 42, 3, 14), (14, 14, 3, 14), (6, 10, 2, 2)]:
        img = rng.standard_normal((H, W, C)).astype(np.float32)
        want = patchify(torch.from_numpy(img).permute(2, 0, 1)[None], p)[0]
        assert np.array_equal(patchify_hwc(img, p), want.numpy())
        assert torch.equal(patchify_hwc(torch.from_numpy(img), p), want)


def test_greedy_packs():
    rng = np.random.default_rng(3)
    for _ in range(50):
        budget = int(rng.integers(10, 60))
        lengths = rng.integers(1, budget + 1, size=int(rng.integers(0, 30))).tolist()
        packs = greedy_packs(lengths, budget)
        assert [i for a, b in packs for i in range(a, b)] == list(range(len(lengths)))
        for k, (a, b) in enumerate(packs):
            assert b > a and sum(lengths[a:b]) <= budget
            if k + 1 < len(packs):
                assert sum(lengths[a:b + 1]) > budget  # closed only because the next one does not fit
    assert greedy_packs([4, 4, 4], 8) == [(0, 2), (2, 3)] and greedy_packs([8, 1], 8) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        greedy_packs([3, 9], 8)


@pytest.mark.parametrize("field, value, match", [
    ("min_patches", 1, "min_patches: expected an int >= 2"), ("max_patches", 8, "max_patches: expected >= min"),
    ("tokens_per_batch", 10, "every image must fit"), ("min_patches", 2.5, "min_patches: expected an int"),
    ("label_key", "label", "carries no labels"), ("return_keys", True, "carries no keys"),
    ("prefix", 21, r"prefix: expected .* \[0, 20\]"), ("native", 1, "native: expected True or False")])
def test_config_rejects_bad_native_settings(field, value, match):
    cfg = DataConfig(shards="x.tar", native=True, min_patches=LO, max_patches=HI, tokens_per_batch=BUDGET)
    cfg.validate()
    with pytest.raises(ValueError, match=match):
        replace(cfg, **{field: value}).validate()


# ---- the loader ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_native")
    write_synthetic_dataset(str(out), num=48, size=72, seed=5, shard_size=24, progress=False, workers=1)
    return str(out / "{00000..00001}.tar")


def native_cfg(pattern, backend="torch", **kw):
    base = dict(shards=pattern, patch_size=P, backend=backend, num_workers=1, shuffle_buffer=16, seed=11,
                native=True, min_patches=LO, max_patches=HI, tokens_per_batch=BUDGET)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    it = iter(loader)
    return [(next(it), loader.state_dict()) for _ in range(n)]


def same_batch(a: PackedBatch, b: PackedBatch) -> bool:
    return a.grids == b.grids and all(torch.equal(x, y) for x, y in (
        (a.patches, b.patches), (a.cu_seqlens, b.cu_seqlens), (a.prefix_len, b.prefix_len), (a.text, b.text)))


def reference_batches(cfg, epoch, n_batches):
    """Independent of the loader: epoch order -> crop plans -> native grids -> greedy packs -> PIL crop
    and resize -> ImageNet normalise (CHW) -> aimv2.packing.pack_images."""
    table = SampleTable.build(resolve_shards(cfg.shards))
    order = epoch_order(table, cfg, epoch).tolist()
    reader = SampleReader(table, cfg)
    recs = [reader.read(s) for s in order]
    plans = crop_plans(cfg, epoch, order, [(r.width, r.height) for r in recs])
    grids = [native_grid(pl.h, pl.w, P, LO, HI) for pl in plans]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for a, b in greedy_packs([h * w for h, w in grids], cfg.tokens_per_batch)[:n_batches]:
        ims = []
        for r, pl, (h, w) in zip(recs[a:b], plans[a:b], grids[a:b]):
            im = Image.open(__import__("io").BytesIO(r.image)).convert("RGB")
            im = im.resize((w * P, h * P), Image.BICUBIC, box=pl.box)
            if pl.flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()  # (3, h*P, w*P)
            ims.append((x / 255 - mean) / std)
        out.append((pack_images(ims, P), [r.caption for r in recs[a:b]], (a, b)))
    reader.close()
    return out


def test_torch_loader_matches_an_independent_pipeline(shards):
    cfg = native_cfg(shards)
    got = take(build_loader(cfg), 5)
    ref = reference_batches(cfg, 0, 5)
    tok = build_loader(cfg).tokenizer
    sizes = set()
    for (b, state), (want, caps, (lo, hi)) in zip(got, ref):
        assert isinstance(b, PackedBatch) and b.grids == want.grids, (b.grids, want.grids)
        assert b.patches.dtype == torch.float32 and b.cu_seqlens.tolist() == want.cu_seqlens.tolist()
        # PIL decode here vs libjpeg-turbo through simplejpeg in the loader: the same pixels (test_data_augment)
        assert (b.patches - want.patches).abs().max() < 1e-5
        assert torch.equal(b.text, tok(caps, 77)) and state == {"epoch": 0, "sample": hi}
        assert torch.equal(b.prefix_len, native_prefix_lengths(11, 0, 0, range(lo, hi), b.lengths))
        assert b.num_tokens <= BUDGET
        sizes |= {h * w for h, w in b.grids}
    assert min(sizes) == LO and max(sizes) == HI, sizes  # both clamps were exercised


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_resume_is_bit_identical(shards, backend):
    cfg = native_cfg(shards, backend)
    full = take(build_loader(cfg), 16)
    ends = [i for i in range(15) if full[i + 1][1]["epoch"] > full[i][1]["epoch"] or full[i][1]["sample"] == 48]
    assert ends, "16 batches should cross the end of epoch 0"
    for cut in (3, ends[0] + 1):  # mid-epoch, and at the end of epoch 0
        state = full[cut - 1][1]
        resumed = take(build_loader(replace(cfg, start_epoch=state["epoch"], start_sample=state["sample"])), 16 - cut)
        for (a, sa), (b, sb) in zip(full[cut:], resumed):
            assert sa == sb and same_batch(a, b), cut


def test_native_worker_count_does_not_change_batches(shards):
    a = take(build_loader(native_cfg(shards, num_workers=0)), 6)
    b = take(build_loader(native_cfg(shards, num_workers=2)), 6)
    assert all(sa == sb and same_batch(x, y) for (x, sa), (y, sb) in zip(a, b))


def test_native_eval_keeps_whole_images_and_the_last_batch(tmp_path):
    rng = np.random.default_rng(4)
    sizes = [(30, 200), (200, 30), (90, 90), (400, 300), (14, 14), (60, 100), (500, 50)]  # (W, H)
    write_shard(str(tmp_path / "a.tar"), [good_sample(f"{i:03d}", rng, w, h) for i, (w, h) in enumerate(sizes)])
    cfg = native_cfg(str(tmp_path / "a.tar"), train=False, tokens_per_batch=40)
    batches = list(build_loader(cfg))
    grids = [g for b in batches for g in b.grids]
    assert grids == [native_grid(h, w, P, LO, HI) for w, h in sizes]
    packs = greedy_packs([h * w for h, w in grids], 40)
    assert [len(b.grids) for b in batches] == [b - a for a, b in packs]  # the last, partial batch kept
    for b, (lo, hi) in zip(batches, packs):
        assert torch.equal(b.prefix_len, native_prefix_lengths(11, 0, 0, range(lo, hi), b.lengths))


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_skips_bad_samples_as_fixed_mode_does(tmp_path, backend):
    rng = np.random.default_rng(6)
    goods = [good_sample(f"g{i:02d}", rng, int(rng.integers(40, 120)), int(rng.integers(40, 120))) for i in range(12)]
    bads = list(bad_samples(rng).values())
    mixed = [s for pair in itertools.zip_longest(goods, bads) for s in pair if s is not None]
    write_shard(str(tmp_path / "mixed.tar"), mixed)
    fixed = build_loader(DataConfig(shards=str(tmp_path / "mixed.tar"), image_size=28, patch_size=P, batch_size=1,
                                    backend="torch", num_workers=0, train=False, return_keys=True))
    kept = {k.split(":")[-1] for b in fixed for k in b["keys"]}
    write_shard(str(tmp_path / "clean.tar"), [s for s in mixed if s["__key__"] in kept])
    runs = {}
    for name in ("mixed", "clean"):
        loader = build_loader(native_cfg(str(tmp_path / f"{name}.tar"), backend, num_workers=1, train=False))
        runs[name] = (list(loader), loader.stats())
    (mb, ms), (cb, cs) = runs["mixed"], runs["clean"]
    skips = {k: v for k, v in fixed.stats().items() if k.startswith("skipped")}
    assert skips["skipped"] >= 5 and skips == {k: v for k, v in ms.items() if k.startswith("skipped")}
    assert cs["skipped"] == 0 and ms["samples"] == cs["samples"] == len(kept)
    assert len(mb) == len(cb) and all(a.grids == b.grids and torch.equal(a.patches, b.patches)
                                      and torch.equal(a.text, b.text) for a, b in zip(mb, cb))
    assert "skipped_corrupt_image" in ms  # a sample that fails only in the decoder was found and skipped


@NO_DALI
def test_dali_and_torch_native_batches_agree(shards):
    """Same samples, grids, prefixes, flips; pixels (in 0..255 levels) differ only by the resize kernels:
    mean <= 0.5 levels as PIL vs DALI in test_data_augment, max <= 12 at crop edges (PIL reads the
    pixels just outside the box, DALI's slice decode has only the box; 9 measured on this set)."""
    levels = torch.tensor(IMAGENET_STD) * 255  # (3,): normalised units -> levels, per channel
    for train in (True, False):
        t = take(build_loader(native_cfg(shards, "torch", train=train)), 4)
        d = take(build_loader(native_cfg(shards, "dali", train=train)), 4)
        for (a, sa), (b, sb) in zip(t, d):
            assert sa == sb and a.grids == b.grids
            assert torch.equal(a.text, b.text) and torch.equal(a.prefix_len, b.prefix_len)
            assert torch.equal(a.cu_seqlens, b.cu_seqlens)
            diff = ((a.patches - b.patches).view(a.num_tokens, -1, 3) * levels).abs()  # (T, p*p, 3)
            assert diff.mean() <= 0.5 and diff.max() <= 12, (train, diff.mean(), diff.max())
            for x, y, g in zip(unpack(a.patches, a.grids), unpack(b.patches, b.grids), a.grids):
                x, y = unpatchify(x, g, P), unpatchify(y, g, P)  # (3, h*P, w*P)
                assert (x - y.flip(-1)).abs().mean() > 5 * (x - y).abs().mean()  # a mirror would show
