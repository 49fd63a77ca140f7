"""aimv2.data.augment: the crop plan's draw (unchanged values, ranges from DataConfig) and the parity of
its three executors (PIL, tensor, DALI on the CPU): same box, same flip, pixels within a stated tolerance.

Pixel units below are uint8 levels (0..255) of the resized image before normalisation.
"""
import hashlib
import io
from dataclasses import astuple, replace

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, dali_available
from aimv2.data.augment import (PLAN_DRAWS, CropPlan, crop_plan, crop_plans, dali_crop_args, plan_uniforms,
                                 random_crop_plan, tensor_crop_resize)
from aimv2.data.dataset import Record
from aimv2.data.loader import decode_pil
from aimv2.data.testing import jpeg_bytes

NO_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed (pip install it to test DALI)")
EXECUTORS = ["pil", "tensor", pytest.param("dali", marks=NO_DALI)]


# ---- the draw --------------------------------------------------------------------------------------
# crop_plan(DataConfig(shards="x", seed=7), epoch, sid, W, H) of the counter-based draw (augment.plan_uniforms,
# issue 18), which replaced the per-sample np.random.default_rng([seed, epoch, sid, 0xC20F]) of commit
# 6a465e2 on purpose: these values changed then, deliberately (a run checkpointed before it resumes with
# other crops). From here on, resume needs the very same values: a change of these is a change of the data.
GOLDEN = [
    ((3, 0, 33, 620), (0, 288, 33, 44, False)), ((3, 1, 541, 67), (226, 0, 89, 67, False)),
    ((3, 2, 819, 213), (267, 0, 284, 213, True)), ((3, 3, 244, 182), (94, 5, 148, 124, True)),
    ((3, 4, 313, 174), (27, 7, 158, 155, True)), ((3, 5, 326, 734), (0, 149, 326, 435, True)),
    ((3, 6, 417, 832), (3, 15, 409, 411, True)), ((3, 7, 415, 263), (62, 3, 250, 252, False)),
    ((3, 8, 714, 741), (133, 67, 574, 641, True)), ((3, 9, 778, 803), (31, 91, 560, 455, False)),
    ((3, 10, 42, 471), (0, 207, 42, 56, True)), ((3, 11, 255, 235), (90, 50, 165, 148, False)),
    ((0, 0, 1000, 30), (480, 0, 40, 30, False)),  # no try fits: centre crop, ratio clamped to 4/3
    ((0, 1, 25, 900), (0, 433, 25, 33, True)),    # ... clamped to 3/4
    ((0, 2, 3, 2), (1, 0, 2, 2, False)),
]
# sha256 of repr([astuple(crop_plan(DataConfig(shards="x", seed=s), e, i, 640, 480)) for s, e, i in 3 x 3 x 200])
GOLDEN_SHA = "58eaf3afb889c2d2bcb6182e98785d4ba54d7d9ae100ab0ea90e1aa6e500cde7"


def test_draw_matches_golden_values():
    cfg = DataConfig(shards="x", seed=7)
    for (epoch, sid, W, H), want in GOLDEN:
        assert astuple(crop_plan(cfg, epoch, sid, W, H)) == want, (epoch, sid, W, H)
    many = [astuple(crop_plan(DataConfig(shards="x", seed=s), e, i, 640, 480))
            for s in range(3) for e in range(3) for i in range(200)]
    assert hashlib.sha256(repr(many).encode()).hexdigest() == GOLDEN_SHA


def test_chunk_draws_do_not_depend_on_the_chunk():
    """A plan drawn with a chunk (the torch workers, DALI's reader) is the plan drawn alone, whatever the
    chunk's other samples, their order or where the chunk starts (a resumed run cuts chunks elsewhere)."""
    cfg = DataConfig(shards="x", seed=3)
    rng = np.random.default_rng(1)
    sids = rng.permutation(5000)[:48].tolist()
    sizes = [(int(rng.integers(20, 900)), int(rng.integers(20, 900))) for _ in sids]
    alone = [crop_plan(cfg, 2, i, w, h) for i, (w, h) in zip(sids, sizes)]
    assert crop_plans(cfg, 2, sids, sizes) == alone
    assert crop_plans(cfg, 2, sids[::-1], sizes[::-1]) == alone[::-1]
    for lo, hi in ((0, 16), (5, 21), (47, 48)):
        assert crop_plans(cfg, 2, sids[lo:hi], sizes[lo:hi]) == alone[lo:hi]
    assert crop_plans(cfg, 2, [], []) == []
    u = plan_uniforms(3, 2, sids)
    assert u.shape == (48, PLAN_DRAWS) and np.array_equal(u[7:9], plan_uniforms(3, 2, sids[7:9]))
    assert not np.array_equal(u, plan_uniforms(3, 1, sids)) and not np.array_equal(u, plan_uniforms(4, 2, sids))


def test_counter_uniforms_look_uniform_and_independent():
    """The counter-based generator's values: uniform on [0, 1) (mean, variance, deciles) and uncorrelated
    across neighbouring sample ids, draws and epochs (a weak mix would correlate sid and sid + 1)."""
    u = plan_uniforms(0, 0, np.arange(20000))  # (20000, 41)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
    hist = np.histogram(u[:, :5], bins=10, range=(0, 1))[0] / u[:, :5].size
    assert np.abs(hist - 0.1).max() < 0.004
    for a, b in ((u[:-1, 0], u[1:, 0]), (u[:, 0], u[:, 1]), (u[:, 0], plan_uniforms(0, 1, np.arange(20000))[:, 0])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.03


def test_draw_follows_random_resized_crop_ranges():
    cfg = DataConfig(shards="x", seed=5)
    rng = np.random.default_rng(0)
    flips = 0
    for sid in range(400):
        W, H = int(rng.integers(20, 900)), int(rng.integers(20, 900))
        plan = crop_plan(cfg, 0, sid, W, H)
        x, y, w, h, flip = astuple(plan)
        assert plan.fits(W, H) and plan.box == (x, y, x + w, y + h)
        if 0.75 <= W / H <= 4 / 3:  # the first try always fits: scale and ratio ranges hold up to rounding
            assert 0.4 * W * H * 0.95 - 2 * (w + h) <= w * h <= W * H
        assert 0.75 * 0.97 - 1 / h <= w / h <= 4 / 3 * 1.03 + 1 / h
        flips += flip
        assert crop_plan(cfg, 0, sid, W, H) == plan
    assert 150 < flips < 250
    assert crop_plan(cfg, 0, 1, 300, 200) != crop_plan(cfg, 1, 1, 300, 200)
    assert crop_plan(replace(cfg, train=False), 0, 1, 300, 200) == CropPlan(50, 0, 200, 200, False)


def test_draw_reads_scale_and_ratio_from_config():
    cfg = DataConfig(shards="x", seed=2, crop_scale=(0.81, 0.81), crop_ratio=(2.0, 2.0))
    for sid in range(50):
        x, y, w, h, _ = astuple(crop_plan(cfg, 0, sid, 500, 300))
        # w * h = 0.81 * 150000 and w / h = 2: 492.95 x 246.48, rounded
        assert (w, h) == (493, 246) and 0 <= x <= 7 and 0 <= y <= 54, (x, y, w, h)
    # no try fits a 1000 x 30 strip (h = 220 > 30): centre crop with the ratio clamped to 2
    assert astuple(crop_plan(cfg, 0, 0, 1000, 30))[:4] == (470, 0, 60, 30)
    # the same generator state gives the same plan: the draw is a function of (rng, size, ranges) only
    a = random_crop_plan(np.random.default_rng(9), 640, 480, (0.4, 1.0), (3 / 4, 4 / 3))
    assert a == random_crop_plan(np.random.default_rng(9), 640, 480, (0.4, 1.0), (3 / 4, 4 / 3))


def test_hflip_off_keeps_every_box_and_mirrors_nothing():
    on, off = DataConfig(shards="x", seed=4), DataConfig(shards="x", seed=4, hflip=False)
    sizes = [(int(40 + 37 * i % 700), int(30 + 53 * i % 650)) for i in range(300)]
    a, b = crop_plans(on, 2, range(300), sizes), crop_plans(off, 2, range(300), sizes)
    assert 100 < sum(p.flip for p in a) < 200 and not any(p.flip for p in b)
    assert [p.box for p in a] == [p.box for p in b]          # the flip's draw is consumed either way


@pytest.mark.parametrize("field, value, match", [
    ("crop_scale", (0.5, 0.2), r"DataConfig\.crop_scale: expected \(lo, hi\) with 0 < lo <= hi <= 1"),
    ("crop_scale", (0.0, 1.0), r"crop_scale"),
    ("crop_scale", (0.5, 1.5), r"crop_scale"),
    ("crop_ratio", (0.0, 1.0), r"DataConfig\.crop_ratio: expected"),
    ("crop_ratio", (2.0, 1.0), r"crop_ratio"),
    ("crop_ratio", (1.0,), r"crop_ratio"),
    ("hflip", "no", r"DataConfig\.hflip: expected true or false"),
    ("hflip", 0, r"hflip"),
])
def test_config_rejects_bad_crop_ranges(field, value, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(shards="x", **{field: value}).validate()


# ---- the executors ---------------------------------------------------------------------------------
def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _dali_levels(items, size) -> torch.Tensor:
    """DALI's executor (dali.DaliDecoder on the CPU) with its normalisation undone: (n, 3, S, S) levels
    (rounded: DALI resizes uint8 to uint8, so undoing the float normalisation lands within 1e-4 of them)."""
    from aimv2.data.dali import DaliDecoder

    x = DaliDecoder(len(items), size, 1, torch.device("cpu")).decode(items)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x * std + mean).round()


def _run(executor, items, size) -> list[torch.Tensor]:
    """(3, S, S) float levels per (Record, CropPlan), through one executor and its decoder."""
    if executor == "dali":
        return list(_dali_levels(items, size))
    if executor == "pil":
        return [torch.from_numpy(decode_pil(r, p, size).astype(np.float32)).permute(2, 0, 1) for r, p in items]
    out = []
    for r, p in items:  # the GPU path's executor on a PIL decode (as tests/test_data_bad.py drives it)
        img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")).copy()).permute(2, 0, 1)
        out.append(tensor_crop_resize(img, p, size))
    return out


RAMP_W, RAMP_H, RAMP_S = 250, 230, 32
RAMP_PLANS = [CropPlan(13, 40, 150, 90, False), CropPlan(60, 7, 97, 201, True),   # crops >= 2 S: PIL drafts JPEGs
              CropPlan(3, 100, 40, 33, True), CropPlan(200, 150, 50, 80, False)]  # touching the right edge


@pytest.mark.parametrize("fmt, tol", [("PNG", 0.5), ("JPEG", 2.5)])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_executors_apply_the_same_box_and_flip(executor, fmt, tol):
    """A ramp image (red = column, green = row, blue = 128) makes the box readable from the output:
    every antialiased bicubic filter reproduces a linear ramp exactly (symmetric weights summing to 1),
    so away from the box's edges output pixel (i, j) reads x + (j + 0.5) w / S - 0.5 in red (column
    mirrored when flip) and y + (i + 0.5) h / S - 0.5 in green, whatever the executor's kernel.

    Tolerance: PNG 0.5 level = the final uint8 rounding (PIL's intermediate rounding of the horizontal
    pass leaves a ramp along the other axis exact). JPEG 2.5 levels = that, plus the quality-100 4:4:4
    coding error of a ramp (< 2 levels), plus PIL's draft decode (crops >= 2 S) mapping the box with the
    rounded-up reduced size (< 1 level at this image size). A box off by one pixel costs >= 1 level
    on every pixel (a PNG failure), a swapped x / y or w / h or a missing flip tens of levels.
    """
    yy, xx = np.mgrid[0:RAMP_H, 0:RAMP_W]
    ramp = np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)  # (H, W, 3)
    data = _encode(ramp, fmt)
    items = [(Record(0, data, RAMP_W, RAMP_H, "c", None, "k"), p) for p in RAMP_PLANS]
    S, j, edge = RAMP_S, np.arange(RAMP_S), 3  # edge: output pixels whose filter support leaves the box
    for (_, p), got in zip(items, _run(executor, items, S)):
        col = p.x + (j + 0.5) * p.w / S - 0.5
        row = p.y + (j + 0.5) * p.h / S - 0.5
        want = torch.tensor(np.stack([np.broadcast_to((col[::-1] if p.flip else col)[None, :], (S, S)),
                                      np.broadcast_to(row[:, None], (S, S))]), dtype=torch.float32)
        err = (got[:2] - want)[:, edge:-edge, edge:-edge].abs()
        assert got.shape == (3, S, S) and err.max() <= tol, (p, err.max())
        assert (got[2] - 128).abs().max() <= 2 * tol + 1  # blue stays constant


def test_dali_crop_args_are_the_plan():
    args = dali_crop_args([CropPlan(3, 5, 7, 11, True), CropPlan(0, 1, 2, 4, False)])
    assert [a.tolist() for a in args["anchor"]] == [[3, 5], [0, 1]]  # (x, y): image_slice axis_names="WH"
    assert [a.tolist() for a in args["shape"]] == [[7, 11], [2, 4]]  # (w, h)
    assert [int(a) for a in args["mirror"]] == [1, 0]
    assert {a.dtype for v in args.values() for a in v} == {np.dtype(np.float32), np.dtype(np.int32)}


def _noise(rng, W, H, feature: int, fmt: str) -> bytes:
    """Random colours every `feature` pixels, upsampled: content from coarse to near-Nyquist."""
    small = rng.integers(0, 256, (max(1, H // feature), max(1, W // feature), 3), dtype=np.uint8)
    return _encode(np.asarray(Image.fromarray(small).resize((W, H), Image.BICUBIC)), fmt)


@NO_DALI
def test_pil_and_dali_pixels_agree():
    """PIL (the torch backend) and DALI pixels for the same plans, on detailed content (features of 8 px).

    Same decoded pixels (PNG; JPEG crops < 2 S, which both decode with libjpeg-turbo at full size):
    both resize with the same antialiased bicubic filter, so away from the box's edges they differ only
    by rounding (PIL rounds to uint8 between its two passes): <= 1 level. At the edges PIL's filter
    reads the pixels just outside the box and DALI's (which decodes only the box) cannot, so the
    edge rows and columns differ by up to the local contrast; the mean over the whole image stays
    <= 0.5 level (measured 0.15-0.25). Moving the box by one pixel costs ~7 levels on average here.

    JPEG crops >= 2 S: PIL decodes at 1/2..1/8 scale in the DCT domain (loader.decode_pil's draft),
    a different low-pass than DALI's full decode + antialiased resize, so they agree only on content
    well below the output's Nyquist frequency: on features of 32 px at a ~7x shrink, mean <= 1 level,
    max <= 4 (measured 0.33 / 2; on the 8 px features above the two differ by up to 13 levels on
    average, which is the draft's known cost and no parity bug).
    """
    rng = np.random.default_rng(5)
    S, edge = 48, 3
    items = []
    for i in range(12):
        W, H = int(rng.integers(50, 140)), int(rng.integers(50, 140))
        plan = random_crop_plan(rng, W, H, (0.4, 1.0), (3 / 4, 4 / 3))
        plan = replace(plan, w=min(plan.w, 2 * S - 1, W - 1 - plan.x))  # off the draft path; room to shift
        items.append((Record(i, _noise(rng, W, H, 8, "JPEG" if i % 2 else "PNG"), W, H, "c", None, "k"), plan))
    shifted = [(r, replace(p, x=p.x + 1)) for r, p in items]
    for pil, dali, moved in zip(_run("pil", items, S), _dali_levels(items, S), _dali_levels(shifted, S)):
        diff = (pil - dali).abs()
        assert diff.mean() <= 0.5 and diff[:, edge:-edge, edge:-edge].max() <= 1, (diff.mean(), diff.max())
        assert (pil - moved).abs().mean() > 4 * 0.5 and (pil - dali.flip(-1)).abs().mean() > 10 * 0.5

    W, H = 300, 260
    items = [(Record(0, _noise(rng, W, H, 32, "JPEG"), W, H, "c", None, "k"), CropPlan(20, 10, 250, 200, f))
             for f in (False, True)]
    for pil, dali in zip(_run("pil", items, 32), _dali_levels(items, 32)):
        diff = (pil - dali).abs()
        assert diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())


def _pil_reference(data: bytes, plan: CropPlan, size: int) -> np.ndarray:
    """The torch backend's decode as PIL alone does it: header, draft (JPEG crops >= 2 S, the power of 2
    PIL picks for the size keeping the crop >= S), convert, resize of the scaled box, mirror."""
    im = Image.open(io.BytesIO(data))
    W, H = im.size
    if min(plan.w, plan.h) >= 2 * size:
        im.draft("RGB", (-(-W * size // plan.w), -(-H * size // plan.h)))
    fx, fy = im.size[0] / W, im.size[1] / H
    out = im.convert("RGB").resize((size, size), Image.BICUBIC,
                                   box=(plan.x * fx, plan.y * fy, (plan.x + plan.w) * fx, (plan.y + plan.h) * fy))
    return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if plan.flip else out)


@pytest.mark.parametrize("kind", ["420", "444", "progressive", "gray", "png"])
def test_decode_is_pils_pixels_exactly(kind):
    """decode_pil decodes JPEGs with libjpeg-turbo through simplejpeg (strict: the deferred scan check) and
    writes into a preallocated chunk slot as channel planes: the pixels must be PIL's own, bit for bit, with and without the
    DCT-domain downscale (plans at 1x, 2x, 4x and 8x the output; a wrong scale or box moves every pixel)."""
    rng = np.random.default_rng(11)
    W, H, S = 517, 389, 48
    arr = np.asarray(Image.fromarray(rng.integers(0, 256, (H // 6, W // 6, 3), dtype=np.uint8)).resize((W, H)))
    im = Image.fromarray(arr).convert("L") if kind == "gray" else Image.fromarray(arr)
    buf = io.BytesIO()
    if kind == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=90, subsampling=0 if kind == "444" else 2, progressive=kind == "progressive")
    data = buf.getvalue()
    plans = [CropPlan(3, 5, 70, 60, False), CropPlan(10, 20, 2 * S + 1, 2 * S + 3, True),   # 1x, 2x
             CropPlan(0, 0, 4 * S + 7, 5 * S, False), CropPlan(1, 2, W - 1, H - 2, True),  # 4x, 8x (JPEG)
             CropPlan(W - 9 * S, 0, 9 * S, 8 * S - 1, True)]                               # 4x: h < 8 S
    for plan in plans:
        rec = Record(0, data, W, H, "c", None, "k", scan_checked=False)
        slot = np.full((3, S, S), 7, dtype=np.uint8)  # a chunk slot: channel planes
        got = decode_pil(rec, plan, S, slot)
        want = _pil_reference(data, plan, S)  # (S, S, 3)
        assert got is slot and np.array_equal(slot, want.transpose(2, 0, 1)), (kind, plan)
        rec = Record(0, data, W, H, "c", None, "k", scan_checked=False)
        assert np.array_equal(decode_pil(rec, plan, S), want)  # no slot: (S, S, 3)


def test_decode_raises_on_a_cut_scan_only_when_unchecked():
    """The strict decode is the scan check SampleReader deferred (Record.scan_checked False): a scan cut and
    closed with an EOI (PIL decodes it to gray without an error) must raise; intact files must not."""
    from adversarial_shards import cut_scan, jpeg
    good = jpeg(np.random.default_rng(2), 96, 80)
    cut = cut_scan(good, 0.5, eoi=True)
    plan = CropPlan(4, 4, 60, 50, False)
    decode_pil(Record(0, good, 96, 80, "c", None, "k", scan_checked=False), plan, 32)
    with pytest.raises(ValueError):
        decode_pil(Record(0, cut, 96, 80, "c", None, "k", scan_checked=False), plan, 32)
    with Image.open(io.BytesIO(cut)) as im:
        im.load()  # what the decode would deliver without the check: no error from PIL
