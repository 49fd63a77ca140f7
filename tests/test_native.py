"""Native resolution (method.md §8): the per-grid sin-cos position embedding against transformers'
`Aimv2VisionEmbeddings(is_native)` on non-square grids, the learned table resized per grid, and
`AIMv2Encoder.forward_packed` against each image run alone, on every attention backend CPU has
(sdpa, flex in eager, triton in the interpreter).

Tolerances (fp32): the packed path applies the patch-embedding conv as a Linear over
`kernels.patchify` rows, a different summation order than the Conv2d of the per-image path; the
observed gap is ~3e-6 on the final-normed (unit-scale) outputs, so ATOL 2e-5. A token attending
across images, a wrong grid or a wrong position layout gives O(0.1-1) errors.
"""
import random

import pytest
import torch
import transformers
from transformers.models.aimv2.modeling_aimv2 import build_2d_sinusoidal_position_embedding

from _train_common import perturb_weights
from aimv2.config import ModelConfig
from aimv2.model import AIMv2Encoder
from aimv2.packing import PackedBatch, pack_images, unpack
from aimv2.pos_embed import resize_table, sincos_2d
from aimv2.presets import get_preset
from aimv2.weights import _canonical, interpolate_pos_embed, sincos_pos_embed

ATOL = 2e-5
P = 14
SIZES = [(224, 224), (168, 448), (448, 168), (14, 14), (518, 392)]      # pixels, H x W
SMALL = [(56, 56), (42, 112), (112, 42), (14, 14), (70, 56)]              # the same shapes, fewer patches


def _cfg(backend="sdpa", **kw):
    """Tiny native encoder: D 64, 2 heads of 32 (a Triton head dim), 2 blocks."""
    base = dict(dim=64, num_heads=2, depth=2, native=True, attn_backend=backend)
    base.update(kw)
    return get_preset("aimv2-tiny", **base)


def _perturbed(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _close(got, want, atol=ATOL):
    assert len(got) == len(want)
    for s, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (s, a.shape, b.shape)
        err = (a - b).abs().max().item()
        assert err <= atol, f"image {s}: max error {err:.3e} > {atol:.0e}"


# ----------------------------------------------------------------------------- 1. position embedding
def _transformers_native_pe(h, w, dim):
    """What Aimv2VisionEmbeddings(is_native).forward adds, copied from its source: the canonical h-first
    embedding rotated by half the width."""
    pe = build_2d_sinusoidal_position_embedding(height=h, width=w, embed_dim=dim)
    half = pe.shape[-1] // 2
    return torch.cat([pe[..., half:], pe[..., :half]], dim=-1)


@pytest.mark.parametrize("h, w", [(1, 1), (3, 5), (5, 3), (16, 16), (12, 32), (37, 28)])
@pytest.mark.parametrize("dim", [64, 1024])
def test_sincos_equals_transformers_native_layout(h, w, dim):
    torch.testing.assert_close(sincos_2d(h, w, dim), _transformers_native_pe(h, w, dim), rtol=0, atol=0)


def test_sincos_layout_is_width_first_and_square_matches_weights_table():
    pe = sincos_2d(3, 5, 8)                                      # D/4 = 2 frequencies: w = (1, 1/100)
    y, x = 2, 4                                                  # token (row 2, col 4) = index 14
    want = torch.tensor([x, x / 100, y, y / 100], dtype=torch.float64)
    torch.testing.assert_close(pe[y * 5 + x].double(),
                               torch.cat([want[:2].sin(), want[:2].cos(), want[2:].sin(), want[2:].cos()]))
    for g in (1, 4, 16):
        assert torch.equal(sincos_pos_embed(g, 256)[0], sincos_2d(g, g, 256))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(2, 2, 6)
    with pytest.raises(ValueError, match="positive ints"):
        sincos_2d(0, 2, 8)


def _hf_native(dim=64, heads=2, layers=2, seed=3):
    torch.manual_seed(seed)
    cfg = transformers.Aimv2VisionConfig(hidden_size=dim, intermediate_size=256, num_hidden_layers=layers,
                                         num_attention_heads=heads, image_size=56, patch_size=P,
                                         use_head=False, is_native=True)
    return perturb_weights(transformers.Aimv2VisionModel(cfg), seed)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_native_encoder_matches_transformers_on_non_square(backend):
    """Random-weight transformers Aimv2VisionModel(is_native=True) vs our native encoder with the same
    weights (mapped by aimv2.weights), whole model, non-square and square inputs, alone and packed."""
    hf = _hf_native()
    enc = AIMv2Encoder(_cfg(backend, mlp_hidden=256))
    enc.load_state_dict(_canonical(hf.state_dict())[0], strict=True)          # no pos table to load
    enc.eval()
    assert enc.preprocessor.pos_embed is None
    sizes = [(42, 70), (70, 42), (28, 28), (14, 56)]
    ims = _images(sizes, seed=5)
    with torch.no_grad():
        want = [hf(pixel_values=im[None]).last_hidden_state[0] for im in ims]
        alone = [enc(im[None])[0] for im in ims]
        packed = enc.forward_packed(ims)
    _close(alone, want, atol=1e-5)
    _close(packed, want)


# ----------------------------------------------------------------------------- learned table, per grid
def test_resize_table_square_is_interpolate_pos_embed_and_non_square_is_separable():
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 64, 16, generator=g)                                   # 8 x 8 grid
    assert resize_table(pe, (8, 8)) is pe
    for G in (4, 8, 12):
        assert torch.equal(resize_table(pe, G), interpolate_pos_embed(pe, G))
    # both sides grow: one bicubic call; a side that shrinks is antialiased on that axis only
    up = resize_table(pe, (12, 10))
    assert up.shape == (1, 120, 16)
    img = pe.reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
    F = torch.nn.functional
    ref = F.interpolate(F.interpolate(img, size=(12, 8), mode="bicubic", align_corners=False),
                        size=(12, 10), mode="bicubic", align_corners=False)
    torch.testing.assert_close(up, ref.permute(0, 2, 3, 1).reshape(1, 120, 16), atol=1e-5, rtol=0)
    mixed = resize_table(pe[0], (4, 16))
    ref = F.interpolate(F.interpolate(img, size=(4, 8), mode="bicubic", align_corners=False, antialias=True),
                        size=(4, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(mixed, ref.permute(0, 2, 3, 1).reshape(64, 16), atol=0, rtol=0)
    t = pe.clone().requires_grad_()
    resize_table(t, (3, 11)).sum().backward()                                  # trainable through the resize
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_learned_table_native_is_the_fixed_encoder_at_its_own_grid():
    """native_pos="interpolate" keeps the learned table: at the table's own grid the native encoder is
    bit-identical to the fixed-size one, and other grids get the resized table."""
    fixed = _perturbed(AIMv2Encoder(_cfg(native=False, img_size=56)))
    nat = AIMv2Encoder(_cfg(img_size=56, native_pos="interpolate")).eval()
    nat.load_state_dict(fixed.state_dict(), strict=True)
    x = _images([(56, 56)] * 2)
    x = torch.stack(x)
    with torch.no_grad():
        assert torch.equal(nat(x), fixed(x))
        _close(nat.forward_packed(list(x)), list(fixed(x)))
        pe = nat.preprocessor.pos_embed_for(3, 6, "cpu", torch.float32)
    torch.testing.assert_close(pe, resize_table(fixed.preprocessor.pos_embed, (3, 6))[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- 2. packed forward
def _per_image(enc, ims, prefix):
    with torch.no_grad():
        return [enc(im[None], None if prefix is None else torch.tensor([prefix[s]]))[0] for s, im in enumerate(ims)]


def _prefixes(sizes, seed):
    rnd = random.Random(seed)
    n = [(h // P) * (w // P) for h, w in sizes]
    out = [rnd.randint(0, m) for m in n]
    out[0], out[-1] = 0, n[-1]                                 # causal and bidirectional ends included
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("prefix", [None, "random"])
def test_forward_packed_equals_each_image_alone(backend, prefix):
    enc = _perturbed(AIMv2Encoder(_cfg(backend)))
    ims = _images(SIZES)
    plen = None if prefix is None else _prefixes(SIZES, seed=2)
    with torch.no_grad():
        got = enc.forward_packed(ims, prefix_len=plen)
    assert [tuple(o.shape) for o in got] == [((h // P) * (w // P), 64) for h, w in SIZES]
    _close(got, _per_image(enc, ims, plen))


@pytest.mark.parametrize("prefix", [None, "random"])
def test_forward_packed_triton_varlen_equals_each_image_alone(prefix):
    """attn_backend="triton": one prefix_attention_varlen per block over the pack (the interpreter on a
    CPU, hence the smaller grids of the same shapes); truth is each image alone through "sdpa"."""
    tri = _perturbed(AIMv2Encoder(_cfg("triton")))
    ref = AIMv2Encoder(_cfg("sdpa")).eval()
    ref.load_state_dict(tri.state_dict())
    ims = _images(SMALL, seed=4)
    plen = None if prefix is None else _prefixes(SMALL, seed=3)
    with torch.no_grad():
        got = tri.forward_packed(pack_images(ims, P, prefix_len=plen))
    _close(got, _per_image(ref, ims, plen))


def test_forward_packed_outputs_and_inputs():
    enc = _perturbed(AIMv2Encoder(_cfg()))
    ims = _images([(28, 42), (14, 28), (42, 14)])
    batch = pack_images(ims, P, prefix_len=[2, 1, 3])
    with torch.no_grad():
        flat = enc.forward_packed(batch, packed_output=True)                  # batch.prefix_len used
        per = enc.forward_packed(batch)
        override = enc.forward_packed(batch, prefix_len=[6, 2, 3])             # bidirectional for all
        bidir = enc.forward_packed(ims)
        same_size = enc.forward_packed(torch.stack(_images([(28, 42)] * 2)))   # a (B, C, H, W) tensor
    assert flat.shape == (6 + 2 + 3, 64)
    for a, b in zip(unpack(flat, batch.grids), per):
        assert torch.equal(a, b)
    _close(per, _per_image(enc, ims, [2, 1, 3]))
    _close(override, bidir)
    assert len(same_size) == 2 and same_size[0].shape == (6, 64)


def test_forward_packed_gradients_equal_per_image():
    """Training path: the packed loss's parameter gradients equal the sum of per-image ones."""
    enc = _perturbed(AIMv2Encoder(_cfg(depth=1))).train()
    ims = _images([(28, 42), (42, 14), (14, 14)], seed=7)
    plen = [3, 1, 1]
    enc.zero_grad()
    sum(o.square().sum() for o in enc.forward_packed(ims, prefix_len=plen)).backward()
    packed = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    for s, im in enumerate(ims):
        enc(im[None], torch.tensor([plen[s]])).square().sum().backward()
    for n, p in enc.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_native_errors_are_clear():
    with pytest.raises(ValueError, match="native_pos"):
        ModelConfig(native=True, native_pos="learned").validate()
    with pytest.raises(ValueError, match="divisible by 4"):
        ModelConfig(dim=66, num_heads=1, native=True).validate()
    ModelConfig(dim=66, num_heads=1, native=True, native_pos="interpolate").validate()   # no sin-cos needed
    enc = AIMv2Encoder(_cfg())
    with pytest.raises(ValueError, match="multiples"):
        enc(torch.randn(1, 3, 28, 30))
    with pytest.raises(ValueError, match="prefix 5 outside"):
        enc.forward_packed(_images([(28, 28), (14, 28)]), prefix_len=[1, 5])
    with pytest.raises(ValueError, match="PackedBatch or a list"):
        enc.forward_packed("images")
    bad = pack_images(_images([(28, 28)]), 7)
    with pytest.raises(ValueError, match="p\\*p\\*C"):
        enc.forward_packed(bad)
    fixed = AIMv2Encoder(_cfg(native=False, img_size=56))
    with torch.no_grad():
        fixed.forward_packed(_images([(56, 56)] * 2))                          # its own grid packs fine
    with pytest.raises(ValueError, match="not native"):
        fixed.forward_packed(_images([(56, 42)]))
    assert isinstance(enc.pack(_images([(28, 14)])), PackedBatch)
