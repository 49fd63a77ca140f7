"""`aimv2 embed`: features of a folder of images (any size / mode, corrupt files skipped and counted) and of
shards, written as safetensors with names in the metadata; checked against the encoder run directly."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from aimv2.config import ModelConfig
from aimv2.data import IMAGENET_MEAN, IMAGENET_STD
from aimv2.eval.embed import embed, load_image
from aimv2.model import AIMv2Encoder

TINY = ModelConfig(name="tiny28", img_size=28, dim=128, depth=1, num_heads=1, mlp_hidden=256)


def test_load_image_resize_and_center_crop(tmp_path):
    """A 3:1 image whose left / middle / right thirds differ: the shorter side goes to S and the crop is the
    middle third, normalised with the ImageNet statistics."""
    S = 28
    a = np.zeros((40, 120, 3), np.uint8)
    a[:, :40] = (255, 0, 0)
    a[:, 40:80] = (10, 200, 30)
    a[:, 80:] = (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = load_image(str(tmp_path / "wide.png"), S, IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    want = (torch.tensor([10, 200, 30]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    inner = x[:, 2:-2, 2:-2]                     # away from the bicubic ringing at the colour edges
    torch.testing.assert_close(inner, want.view(3, 1, 1).expand_as(inner), atol=2 / 255 / 0.224, rtol=0)


@pytest.mark.parametrize("native", [False, True])
def test_16bit_images_are_scaled_not_clipped(tmp_path, native):
    """A 16-bit gray PNG (random values over the whole 0..65535 range) reads as round(v / 257), as the
    training loader does; convert("RGB") would clip every value above 255 to white."""
    from aimv2.eval.embed import load_image_native
    v = np.random.default_rng(1).integers(0, 65536, (28, 42), dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "deep.png")
    if native:
        x = load_image_native(str(tmp_path / "deep.png"), 14, 64, (0, 0, 0), (1, 1, 1))   # 2 x 3 grid: no resize
    else:
        x = load_image(str(tmp_path / "deep.png"), 28, (0, 0, 0), (1, 1, 1))
        v = v[:, 7:35]                                                                   # the center crop
    want = torch.from_numpy(np.round(v / 257.0).astype(np.float32) / 255.0)
    assert x.shape[1:] == want.shape
    torch.testing.assert_close(x, want.expand(3, -1, -1), atol=1e-6, rtol=0)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 31, 3), dtype=np.uint8)).save(d / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (28, 28, 4), dtype=np.uint8), "RGBA").save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 40), dtype=np.uint8), "L").save(d / "sub" / "c.PNG")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    good = (d / "b.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "notes.txt").write_text("ignored")
    return d


def test_embed_folder_skips_corrupt_and_matches_encoder(folder, tmp_path, capsys):
    from aimv2.cli import main
    from aimv2.weights import save_encoder

    torch.manual_seed(0)
    enc = AIMv2Encoder(TINY).eval()
    save_encoder(enc, str(tmp_path / "enc.safetensors"), format="timm")
    out = tmp_path / "feats.safetensors"
    assert main(["embed", "--checkpoint", str(tmp_path / "enc.safetensors"), "--data", str(folder),
                 "--out", str(out), "--pool", "both", "--num-workers", "0", "--batch-size", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    msg = capsys.readouterr().out
    assert re.search(r"embedded 3 image\(s\).*skipped 2 unreadable", msg), msg
    t = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    names = json.loads(meta["names"])
    assert names == ["a.png", "b.jpg", "sub/c.PNG"]
    assert sorted(json.loads(meta["skipped"])) == ["broken.jpg", "truncated.jpg"] and meta["num_skipped"] == "2"
    assert meta["img_size"] == "28" and meta["dim"] == "128" and meta["pool"] == "both"
    assert t["patch"].shape == (3, 4, 128) and t["pooled"].shape == (3, 128)
    # reference: the encoder on the same preprocessed images, pooled = mean over the patch tokens
    imgs = torch.stack([load_image(str(folder / n), 28, IMAGENET_MEAN, IMAGENET_STD) for n in names])
    with torch.no_grad():
        ref = enc(imgs)
    torch.testing.assert_close(t["patch"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["pooled"], ref.mean(1), rtol=1e-5, atol=1e-5)
    # a hub-style directory with its own preprocessor statistics (CLIP's) is normalised with those
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    save_encoder(enc, str(tmp_path / "hub"), format="hf")
    (tmp_path / "hub" / "preprocessor_config.json").write_text(json.dumps({"image_mean": clip_mean,
                                                                          "image_std": clip_std}))
    res = embed(str(tmp_path / "hub"), data=str(folder), out=str(tmp_path / "clip.safetensors"), device="cpu",
                progress=False)
    imgs = torch.stack([load_image(str(folder / n), 28, clip_mean, clip_std) for n in res["names"]])
    with torch.no_grad():
        ref = enc(imgs).mean(1)
    torch.testing.assert_close(load_file(str(tmp_path / "clip.safetensors"))["pooled"], ref, rtol=1e-5, atol=1e-5)


def test_embed_shards_and_errors(tmp_path):
    from aimv2.data.synth import write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path / "shards"), num=5, size=40, seed=0)
    torch.manual_seed(0)
    enc = AIMv2Encoder(TINY).eval()
    res = embed(encoder=enc, data=str(tmp_path / "shards"), out=str(tmp_path / "s.safetensors"), pool="mean",
                batch_size=2, progress=False)
    assert res["num_images"] == 5 and res["num_skipped"] == 0 and res["keys"] == ["pooled"]
    t = load_file(str(tmp_path / "s.safetensors"))
    assert t["pooled"].shape == (5, 128) and torch.isfinite(t["pooled"]).all()
    assert len(res["names"]) == 5 and all(n.endswith(f"{i:09d}") for i, n in enumerate(res["names"]))
    with pytest.raises(ValueError, match="pool"):
        embed(encoder=enc, data=str(tmp_path / "shards"), out=str(tmp_path / "x.safetensors"), pool="max")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither images"):
        embed(encoder=enc, data=str(tmp_path / "empty"), out=str(tmp_path / "x.safetensors"), progress=False)
