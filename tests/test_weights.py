"""aimv2.weights: parity with transformers' Aimv2VisionModel, the three key formats (method.md §7), save /
load round trips, size inference, clear errors, position-embedding resizing and our training
checkpoints.

Truth for parity is transformers' own forward pass on random weights (norm weights perturbed away
from their init of 1, so a norm-to-norm mix-up shows). Tolerance 1e-5 (fp32): both sides compute the
same math in fp32 with a different summation order (fused qkv vs three projections, SDPA vs eager);
the observed gap is ~1.5e-6 on unit-scale outputs, and any wrong mapping gives O(1) errors.
"""
import json
import math

import pytest
import torch
import transformers                                   # the `test` extra: parity truth
from safetensors import safe_open
from safetensors.torch import save_file

from aimv2.config import ModelConfig, mlp_hidden_for
from aimv2.model import AIMv2Encoder, AIMv2Pretrainer
from aimv2.presets import get_preset
from aimv2.weights import (FORMATS, detect_format, from_mlaim, infer_config, interpolate_pos_embed,
                           latest_checkpoint, load_encoder, save_encoder, to_mlaim)

D, DEPTH, IMG, P = 256, 2, 56, 14                     # 2 heads of 128, 4x4 grid, MLP hidden 768
H = mlp_hidden_for(D)
ATOL = 1e-5


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "bias" not in name:          # RMSNorm weights: init 1 -> 1 +- 0.3
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.add_(0.05 * noise)
    return model.eval()


def _hf_vision(layers=DEPTH, heads=2, img=IMG, **kw):
    cfg = transformers.Aimv2VisionConfig(hidden_size=D, intermediate_size=H, num_hidden_layers=layers,
                                         num_attention_heads=heads, image_size=img, patch_size=P,
                                         use_head=False, **kw)
    return _perturb(transformers.Aimv2VisionModel(cfg))


def _hf_out(model, x):
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def _out(enc, x):
    with torch.no_grad():
        return enc(x)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return _hf_vision()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ref(hf_model, images):
    return _hf_out(hf_model, images)


def _expected_keys(fmt, depth=DEPTH):
    """method.md §7's table written out independently of aimv2.weights."""
    blk = {
        "ml-aim": ["trunk.blocks.{b}.norm_1.weight", "trunk.blocks.{b}.norm_2.weight",
                   "trunk.blocks.{b}.attn.qkv.weight", "trunk.blocks.{b}.attn.proj.weight",
                   "trunk.blocks.{b}.mlp.fc1.weight", "trunk.blocks.{b}.mlp.fc2.weight",
                   "trunk.blocks.{b}.mlp.fc3.weight"],
        "hf": ["encoder.layers.{b}.rms_norm1.weight", "encoder.layers.{b}.rms_norm2.weight",
               "encoder.layers.{b}.attention.q_proj.weight", "encoder.layers.{b}.attention.k_proj.weight",
               "encoder.layers.{b}.attention.v_proj.weight", "encoder.layers.{b}.attention.out_proj.weight",
               "encoder.layers.{b}.ffn.gate_proj.weight", "encoder.layers.{b}.ffn.up_proj.weight",
               "encoder.layers.{b}.ffn.down_proj.weight"],
        "timm": ["blocks.{b}.norm1.weight", "blocks.{b}.norm2.weight", "blocks.{b}.attn.qkv.weight",
                 "blocks.{b}.attn.proj.weight", "blocks.{b}.mlp.fc1_g.weight", "blocks.{b}.mlp.fc1_x.weight",
                 "blocks.{b}.mlp.fc2.weight"],
    }[fmt]
    top = {
        "ml-aim": ["preprocessor.patchifier.proj.weight", "preprocessor.patchifier.proj.bias",
                   "preprocessor.patchifier.norm.weight", "preprocessor.pos_embed", "trunk.post_trunk_norm.weight"],
        "hf": ["embeddings.patch_embed.weight", "embeddings.patch_embed.bias", "embeddings.rms_norm.weight",
               "embeddings.position_embedding.weight", "rms_norm.weight"],
        "timm": ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "pos_embed",
                 "norm.weight"],
    }[fmt]
    return set(top) | {k.format(b=b) for b in range(depth) for k in blk}


# ----------------------------------------------------------------------------- parity
def test_parity_transformers_vision_model(hf_model, images, ref):
    sd = hf_model.state_dict()
    assert detect_format(sd) == "hf" and set(sd) == _expected_keys("hf")
    enc = load_encoder(sd)
    c = enc.cfg
    assert (c.dim, c.depth, c.num_heads, c.mlp_hidden, c.img_size, c.patch_size) == (D, DEPTH, 2, H, IMG, P)
    assert not enc.training and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in enc.parameters())
    torch.testing.assert_close(_out(enc, images), ref, atol=ATOL, rtol=0)
    # the caller's tensors are copied, not aliased
    with torch.no_grad():
        enc.trunk.post_trunk_norm.weight.zero_()
    assert sd["rms_norm.weight"].abs().min() > 0


def test_parity_transformers_aimv2_model_prefix_and_head(images):
    """transformers' Aimv2Model (vision + text, pooling head on): `vision_model.` prefix, head and
    text tower dropped."""
    torch.manual_seed(2)
    vc = dict(hidden_size=D, intermediate_size=H, num_hidden_layers=1, num_attention_heads=2,
              image_size=IMG, patch_size=P, use_head=True)
    tc = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=1, max_position_embeddings=8, eos_token_id=3)
    model = _perturb(transformers.Aimv2Model(transformers.Aimv2Config(vision_config=vc, text_config=tc)))
    sd = model.state_dict()
    assert any(k.startswith("vision_model.head.") for k in sd) and any(k.startswith("text_model.") for k in sd)
    enc = load_encoder(sd)
    assert enc.cfg.depth == 1
    torch.testing.assert_close(_out(enc, images), _hf_out(model.vision_model, images), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["ml-aim", "timm"])
def test_parity_converted_formats(fmt, hf_model, images, ref):
    hsd = hf_model.state_dict()
    sd = from_mlaim(to_mlaim(hsd, "hf"), fmt)
    assert set(sd) == _expected_keys(fmt) and detect_format(sd) == fmt
    # the exact mapping, checked tensor by tensor on block 1
    hb = "encoder.layers.1."
    if fmt == "ml-aim":
        torch.testing.assert_close(sd["trunk.blocks.1.attn.qkv.weight"],
                                   torch.cat([hsd[hb + f"attention.{c}_proj.weight"] for c in "qkv"]), atol=0, rtol=0)
        assert torch.equal(sd["trunk.blocks.1.mlp.fc1.weight"], hsd[hb + "ffn.gate_proj.weight"])
        assert torch.equal(sd["trunk.blocks.1.mlp.fc3.weight"], hsd[hb + "ffn.up_proj.weight"])
        assert sd["preprocessor.pos_embed"].shape == (1, (IMG // P) ** 2, D)
    else:
        assert torch.equal(sd["blocks.1.mlp.fc1_g.weight"], hsd[hb + "ffn.gate_proj.weight"])
        assert torch.equal(sd["blocks.1.mlp.fc1_x.weight"], hsd[hb + "ffn.up_proj.weight"])
        assert torch.equal(sd["blocks.1.norm2.weight"], hsd[hb + "rms_norm2.weight"])
    assert torch.equal(from_mlaim(to_mlaim(sd, fmt), "hf")["encoder.layers.0.attention.k_proj.weight"],
                       hsd["encoder.layers.0.attention.k_proj.weight"])
    enc = load_encoder(sd)
    torch.testing.assert_close(_out(enc, images), ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("fmt,as_file", [("hf", False), ("ml-aim", False), ("ml-aim", True),
                                         ("timm", False), ("timm", True)])
def test_save_load_roundtrip(fmt, as_file, hf_model, images, ref, tmp_path):
    enc = load_encoder(hf_model.state_dict(), attn_backend="sdpa")
    target = tmp_path / ("enc.safetensors" if as_file else "enc")
    written = save_encoder(enc, target, format=fmt)
    assert written.exists() and (as_file or (target / "config.json").exists())
    with safe_open(str(written), framework="pt") as f:
        assert set(f.keys()) == _expected_keys(fmt)
    back = load_encoder(target)
    assert back.cfg == enc.cfg
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    torch.testing.assert_close(_out(back, images), ref, atol=ATOL, rtol=0)
    if fmt == "hf":                                     # the original library reads our save
        theirs = transformers.Aimv2VisionModel.from_pretrained(target).eval()
        assert theirs.config.model_type == "aimv2_vision_model" and not theirs.config.use_head
        torch.testing.assert_close(_hf_out(theirs, images), ref, atol=ATOL, rtol=0)


def test_hf_dir_sharded_bin_and_pt(hf_model, images, ref, tmp_path):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="3MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_out(load_encoder(tmp_path / "sharded"), images), ref, atol=ATOL, rtol=0)
    torch.save({"model": hf_model.state_dict()}, tmp_path / "ckpt.pt")
    torch.testing.assert_close(_out(load_encoder(tmp_path / "ckpt.pt"), images), ref, atol=ATOL, rtol=0)
    (tmp_path / "pt").mkdir()
    torch.save(hf_model.state_dict(), tmp_path / "pt" / "pytorch_model.bin")
    torch.testing.assert_close(_out(load_encoder(tmp_path / "pt"), images), ref, atol=ATOL, rtol=0)


def test_heads_from_config_json(images, tmp_path):
    """Head dim 64 (4 heads) is only knowable from config.json: the shapes alone say 2 heads."""
    torch.manual_seed(3)
    model = _hf_vision(layers=1, heads=4)
    model.save_pretrained(tmp_path)
    enc = load_encoder(tmp_path)
    assert enc.cfg.num_heads == 4
    torch.testing.assert_close(_out(enc, images), _hf_out(model, images), atol=ATOL, rtol=0)
    assert load_encoder(model.state_dict()).cfg.num_heads == 2      # no config: head dim 128


def test_native_sincos_position_embedding(tmp_path):
    """`-native` checkpoints carry no position embedding; the sin-cos one is rebuilt per resolution."""
    torch.manual_seed(4)
    model = _hf_vision(layers=1, is_native=True)
    model.save_pretrained(tmp_path)
    for img in (IMG, 84):
        x = torch.randn(1, 3, img, img)
        enc = load_encoder(tmp_path, img_size=img)
        torch.testing.assert_close(_out(enc, x), _hf_out(model, x), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- size inference
@pytest.mark.parametrize("fmt", FORMATS)
def test_infer_config_presets(fmt):
    for name, img in (("aimv2-large", 224), ("aimv2-huge", 336), ("aimv2-1b", 448), ("aimv2-3b", 224)):
        want = get_preset(name, img_size=img)
        with torch.device("meta"):
            sd = from_mlaim(AIMv2Encoder(want).state_dict(), fmt)
        got = infer_config(sd)
        assert got.name == name and got == want, (name, got)
        assert infer_config({"module." + k: v for k, v in sd.items()}) == want


def test_infer_config_custom_and_errors():
    cfg = ModelConfig(img_size=70, dim=384, depth=3, num_heads=3, mlp_hidden=1024)
    with torch.device("meta"):
        sd = AIMv2Encoder(cfg).state_dict()
    got = infer_config(sd)
    assert (got.name, got.img_size, got.dim, got.depth, got.num_heads, got.mlp_hidden) == \
        ("custom", 70, 384, 3, 3, 1024)
    odd = ModelConfig(img_size=28, dim=96, depth=1, num_heads=2, mlp_hidden=256)
    with torch.device("meta"):
        sd = AIMv2Encoder(odd).state_dict()
    with pytest.raises(ValueError, match="num_heads"):
        infer_config(sd)
    assert load_encoder({k: torch.randn(v.shape) for k, v in sd.items()}, num_heads=2).cfg.num_heads == 2
    with pytest.raises(ValueError, match="no AIMv2 patch-embedding key"):
        detect_format({"foo.weight": torch.ones(1)})


# ----------------------------------------------------------------------------- errors
def test_other_size_with_preset_lists_misshaped_keys():
    with torch.device("meta"):
        sd = AIMv2Encoder(get_preset("aimv2-huge")).state_dict()
    with pytest.raises(ValueError) as e:
        load_encoder(sd, "aimv2-large")
    msg = str(e.value)
    assert "mis-shaped keys" in msg and "another size" in msg and "aimv2-huge" in msg
    assert "trunk.blocks.0.attn.qkv.weight: checkpoint (4608, 1536) vs model (3072, 1024)" in msg
    assert "missing keys" not in msg and "unexpected keys" not in msg


def test_small_checkpoint_with_wrong_preset(hf_model):
    with pytest.raises(ValueError, match=r"mis-shaped keys \(\d+\):.*preprocessor.patchifier.proj.weight"):
        load_encoder(hf_model.state_dict(), "aimv2-tiny")


def test_missing_and_unexpected_keys(hf_model, images):
    sd = to_mlaim(hf_model.state_dict(), "hf")
    bad = dict(sd)
    del bad["trunk.blocks.1.mlp.fc2.weight"]
    bad["trunk.blocks.0.attn.q_norm.weight"] = torch.ones(D)
    with pytest.raises(ValueError) as e:
        load_encoder(bad)
    msg = str(e.value)
    assert "missing keys (1): trunk.blocks.1.mlp.fc2.weight" in msg
    assert "unexpected keys (1): trunk.blocks.0.attn.q_norm.weight" in msg
    enc = load_encoder(bad, strict=False)                  # tolerated: fc2 keeps its init
    got = enc.state_dict()
    assert torch.isfinite(got["trunk.blocks.1.mlp.fc2.weight"]).all()
    assert torch.equal(got["trunk.blocks.0.mlp.fc2.weight"], sd["trunk.blocks.0.mlp.fc2.weight"])
    # hf: a block without k_proj cannot form its qkv
    hsd = dict(hf_model.state_dict())
    del hsd["encoder.layers.0.attention.k_proj.weight"]
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\): trunk.blocks.0.attn.qkv.weight.*"
                                         r"unexpected keys \(2\): encoder.layers.0.attention.q_proj"):
        load_encoder(hsd)


def test_bad_arguments(hf_model, tmp_path):
    with pytest.raises(TypeError, match="source"):
        load_encoder(42)
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "nope")
    enc = load_encoder(hf_model.state_dict())
    with pytest.raises(ValueError, match="format"):
        save_encoder(enc, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="directory"):
        save_encoder(enc, tmp_path / "x.safetensors", format="hf")
    with pytest.raises(TypeError, match="encoder"):
        save_encoder(torch.nn.Linear(2, 2), tmp_path / "y")
    with pytest.raises(ValueError, match="img_size"):
        load_encoder(hf_model.state_dict(), img_size=60)


# ----------------------------------------------------------------------------- position embedding
def _bicubic_ref(grid: torch.Tensor, G: int) -> torch.Tensor:
    """(g, g, D) -> (G, G, D): separable cubic convolution (a = -0.75), half-pixel centres, clamped
    borders, in float64 (written independently of F.interpolate)."""
    g, A = grid.shape[0], -0.75

    def kernel(d):
        d = abs(d)
        return (A + 2) * d ** 3 - (A + 3) * d ** 2 + 1 if d <= 1 else A * d ** 3 - 5 * A * d ** 2 + 8 * A * d - 4 * A
    W = torch.zeros(G, g, dtype=torch.float64)
    for o in range(G):
        src = (o + 0.5) * g / G - 0.5
        i0 = math.floor(src)
        for j in range(i0 - 1, i0 + 3):
            W[o, min(max(j, 0), g - 1)] += kernel(src - j)
    return torch.einsum("Yy,Xx,yxd->YXd", W, W, grid.double())


def test_pos_embed_identity(hf_model, images, ref):
    pe = torch.randn(1, 16, 8)
    assert torch.equal(interpolate_pos_embed(pe, 4), pe)
    a, b = load_encoder(hf_model.state_dict()), load_encoder(hf_model.state_dict(), img_size=IMG)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_pos_embed_2x_resolution(hf_model):
    sd = to_mlaim(hf_model.state_dict(), "hf")
    g = IMG // P
    pe = sd["preprocessor.pos_embed"]                                          # (1, g*g, D)
    want = _bicubic_ref(pe[0].reshape(g, g, D), 2 * g).reshape(1, 4 * g * g, D).float()
    torch.testing.assert_close(interpolate_pos_embed(pe, 2 * g), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(interpolate_pos_embed(pe[0], 2 * g), want[0], atol=1e-5, rtol=0)
    enc = load_encoder(hf_model.state_dict(), img_size=2 * IMG)
    assert enc.cfg.img_size == 2 * IMG
    torch.testing.assert_close(enc.preprocessor.pos_embed.detach(), want, atol=1e-5, rtol=0)
    out = _out(enc, torch.randn(2, 3, 2 * IMG, 2 * IMG))
    assert out.shape == (2, 4 * g * g, D) and torch.isfinite(out).all()
    # everything else is untouched
    assert torch.equal(enc.trunk.blocks[1].attn.qkv.weight, sd["trunk.blocks.1.attn.qkv.weight"])


# ----------------------------------------------------------------------------- training checkpoints
def _write_ckpt(model, path, cfg):
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"aimv2_config": json.dumps(cfg.to_dict())})


def test_pretrainer_checkpoint_and_run_dir(tmp_path):
    """encoder./decoder. keys + aimv2_config metadata; head dim 64 (aimv2-tiny) is only in the
    metadata; a run dir picks its newest whole checkpoint."""
    cfg = get_preset("aimv2-tiny")
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    run = tmp_path / "run"
    models = {}
    for step, seed in ((10, 5), (20, 6)):
        torch.manual_seed(seed)
        models[step] = _perturb(AIMv2Pretrainer(cfg), seed)
        _write_ckpt(models[step], run / "checkpoints" / f"step_{step:06d}" / "model.safetensors", cfg)
    half = run / "checkpoints" / "step_000030" / "model.safetensors"          # newest, half written
    _write_ckpt(models[10], half, cfg)
    half.write_bytes(half.read_bytes()[:-1000])
    assert latest_checkpoint(run).name == "step_000020"
    want = _out(models[20].encoder.eval(), x)
    for src in (run, run / "checkpoints" / "step_000020", run / "checkpoints" / "step_000020" / "model.safetensors"):
        enc = load_encoder(src)
        assert enc.cfg.num_heads == 2 and enc.cfg.to_dict() == cfg.to_dict()
        torch.testing.assert_close(_out(enc, x), want, atol=ATOL, rtol=0)
    # overrides reach the built modules (their forward passes are tested with the model)
    other = load_encoder(run, "aimv2-tiny", attn_backend="flex", impl="triton")
    assert (other.cfg.attn_backend, other.trunk.blocks[0].norm_1.impl, other.trunk.blocks[0].mlp.impl) \
        == ("flex", "triton", "triton")
    assert torch.equal(other.preprocessor.pos_embed, models[20].encoder.preprocessor.pos_embed)
    with pytest.raises(ValueError, match="heads"):
        load_encoder(run, cfg.replace(num_heads=1))
