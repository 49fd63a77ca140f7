"""Native-resolution serving (method.md §8): `from_pretrained(..., native=True)` on Apple's `-native`
layout (a random-weight transformers Aimv2VisionModel(is_native=True) saved locally, no network) and on
learned-table checkpoints, save / load round trips, the `native_grid` resize rule and
`aimv2 embed --native`."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from _train_common import perturb_weights
from aimv2.config import ModelConfig
from aimv2.eval.embed import load_image_native, native_grid
from aimv2.eval.hub import from_pretrained
from aimv2.model import AIMv2Encoder
from aimv2.weights import load_encoder, save_encoder

D, P = 64, 14
ATOL = 2e-5                      # packed Linear vs per-image Conv2d patch embedding (tests/test_native.py)




@pytest.fixture(scope="module")
def hf_native(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Aimv2VisionConfig(hidden_size=D, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=56, patch_size=P,
                                         use_head=False, is_native=True)
    model = perturb_weights(transformers.Aimv2VisionModel(cfg))
    d = tmp_path_factory.mktemp("hub") / "aimv2-tiny-native"
    model.save_pretrained(d)
    assert "embeddings.position_embedding.weight" not in load_file(str(d / "model.safetensors"))
    return model, d


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _hf(model, ims):
    with torch.no_grad():
        return [model(pixel_values=im[None]).last_hidden_state[0] for im in ims]


def _close(got, want, atol=ATOL):
    for s, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and (a - b).abs().max().item() <= atol, (s, (a - b).abs().max().item())


def test_from_pretrained_native_checkpoint_maps_onto_native_encoder(hf_native):
    model, d = hf_native
    enc = from_pretrained(str(d), native=True, device="cpu")
    assert enc.cfg.native and enc.cfg.native_pos == "sincos" and enc.preprocessor.pos_embed is None
    assert (enc.cfg.num_heads, enc.cfg.dim, enc.cfg.depth) == (2, D, 2)
    ims = _images([(42, 98), (98, 42), (56, 56), (14, 28)])
    with torch.no_grad():
        packed = enc.forward_packed(ims)
    _close(packed, _hf(model, ims))
    # without native=True the checkpoint still loads as before: a fixed-size encoder, sin-cos table baked in
    fixed = from_pretrained(str(d), device="cpu")
    assert not fixed.cfg.native and fixed.preprocessor.pos_embed.shape == (1, 16, D)
    x = torch.stack(_images([(56, 56)] * 2, seed=1))
    with torch.no_grad():
        _close(list(fixed(x)), _hf(model, list(x)), atol=1e-5)


def test_native_checkpoint_round_trip_is_readable_by_transformers(hf_native, tmp_path):
    model, d = hf_native
    enc = load_encoder(str(d), native=True)
    out = tmp_path / "resaved"
    save_encoder(enc, str(out), format="hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["is_native"] is True
    back = transformers.Aimv2VisionModel.from_pretrained(out).eval()
    ims = _images([(28, 70)], seed=2)
    _close(_hf(back, ims), _hf(model, ims), atol=1e-6)
    again = load_encoder(str(out))                                   # our metadata keeps the native config
    assert again.cfg.native and again.cfg.native_pos == "sincos"
    ml = tmp_path / "native.safetensors"
    save_encoder(enc, str(ml), format="ml-aim")
    fixed = load_encoder(str(ml), native=False)                      # a native file read as fixed-size
    assert not fixed.cfg.native and fixed.preprocessor.pos_embed.shape == (1, 16, D)
    with pytest.raises(ValueError, match="native_pos='interpolate'"):
        load_encoder(str(d), native=True, native_pos="interpolate")


def test_learned_table_checkpoint_switched_to_native(tmp_path, caplog):
    cfg = ModelConfig(name="tiny56", img_size=56, dim=D, depth=1, num_heads=2, mlp_hidden=256)
    torch.manual_seed(1)
    src = perturb_weights(AIMv2Encoder(cfg))
    save_encoder(src, str(tmp_path / "learned"), format="hf")
    enc = from_pretrained(str(tmp_path / "learned"), native=True, device="cpu")
    assert enc.cfg.native and enc.cfg.native_pos == "interpolate"
    assert torch.equal(enc.preprocessor.pos_embed, src.preprocessor.pos_embed)
    x = _images([(56, 56), (42, 84)], seed=3)
    with torch.no_grad():
        got = enc.forward_packed(x)
        _close(got[:1], [src(x[0][None])[0]])                       # its own grid: the fixed encoder
        assert got[1].shape == (3 * 6, D)
    with caplog.at_level(logging.WARNING, logger="aimv2.weights"):
        dropped = load_encoder(str(tmp_path / "learned"), native=True, native_pos="sincos")
    assert dropped.preprocessor.pos_embed is None and "drops the checkpoint's learned position" in caplog.text


@pytest.mark.parametrize("hw, cap, want", [
    ((224, 224), 4096, (16, 16)),
    ((480, 640), 4096, (34, 46)),             # 4:3 kept, both sides rounded to multiples of 14
    ((4000, 3000), 4096, (74, 55)),           # downscaled to fit the cap, aspect kept (73.9 x 55.4 exact)
    ((5, 9), 4096, (1, 1)),                   # at least one patch
    ((14, 14 * 10_000), 4096, (1, 4096)),     # extreme aspect: the short side stays at one patch
    ((1080, 1920), 256, (12, 21)),
    ((10_000, 10_000), 600_000, (714, 714)),  # no hard limit beyond the cap
])
def test_native_grid(hw, cap, want):
    h, w = native_grid(*hw, patch_size=P, max_patches=cap)
    assert (h, w) == want and h * w <= cap
    if min(want) > 1:
        assert abs(w / h - hw[1] / hw[0]) / (hw[1] / hw[0]) < 0.05
    with pytest.raises(ValueError, match="max_patches"):
        native_grid(10, 10, P, 0)


def test_embed_native_folder(hf_native, tmp_path, capsys):
    from aimv2.cli import main
    from aimv2.data import IMAGENET_MEAN, IMAGENET_STD

    model, d = hf_native
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    shapes = {"a.png": (40, 90), "b.png": (70, 30), "c.png": (28, 28), "d.png": (300, 200)}
    for name, (h, w) in shapes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "feats.safetensors"
    assert main(["embed", "--checkpoint", str(d), "--data", str(folder), "--out", str(out), "--native",
                 "--max-patches", "64", "--pool", "both", "--batch-size", "3", "--num-workers", "0",
                 "--no-progress", "--device", "cpu"]) == 0
    assert "embedded 4 image(s)" in capsys.readouterr().out
    t = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    names = json.loads(meta["names"])
    assert names == sorted(shapes) and meta["native"] == "1" and meta["max_patches"] == "64"
    grids = [tuple(g) for g in t["grids"].tolist()]
    assert grids == [native_grid(*shapes[n], P, 64) for n in names] == [(3, 6), (5, 2), (2, 2), (10, 6)]
    assert t["offsets"].tolist() == [0, 18, 28, 32, 92] and t["patch"].shape == (92, D)
    ims = [load_image_native(str(folder / n), P, 64, IMAGENET_MEAN, IMAGENET_STD) for n in names]
    want = _hf(model, ims)                                               # transformers, each image alone
    got = [t["patch"][a:b] for a, b in zip(t["offsets"][:-1], t["offsets"][1:])]
    _close(got, want)
    _close(list(t["pooled"]), [w.mean(0) for w in want])
    assert main(["embed", "--checkpoint", str(d), "--data", str(folder), "--out", str(out), "--native",
                 "--img-size", "56", "--no-progress"]) == 2                # config error: one line
    assert "img_size" in capsys.readouterr().err
