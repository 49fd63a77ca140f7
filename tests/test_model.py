"""The reference model (impl="torch"): sizes, prefix semantics, backends, FLOPs, bad input, training."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aimv2.model import (AIMv2Encoder, AIMv2Pretrainer, _prefix_pairs, count_params,
                         flops_per_sample, forward_flops)
from aimv2.presets import get_preset, list_presets

PARAM_COUNTS = {  # method.md §1 table, encoder at 224 px
    "aimv2-large": 309_197_824,
    "aimv2-huge": 680_851_968,
    "aimv2-1b": 1_234_958_336,
    "aimv2-3b": 2_720_658_432,
}


def small_cfg(**kw):
    """Tiny config at 56 px (N = 16): fast on a CPU; head dim 64."""
    base = dict(img_size=56, depth=2, dec_depth=1)
    base.update(kw)
    return get_preset("aimv2-tiny", **base)


def rand_batch(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(0, cfg.vocab_size, (B, cfg.text_len), generator=g)
    text[text == cfg.pad_id] = cfg.pad_id + 1         # no pad id inside the caption
    text[:, 50:] = cfg.pad_id                          # right padding
    return images, text


def perturb_(module, std=0.05, seed=1):
    """Make every parameter random (norm weights are 1 after init): catches swapped weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_param_counts_match_spec(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        pre = AIMv2Pretrainer(cfg)
    enc, dec = pre.encoder, pre.decoder
    assert count_params(enc) == PARAM_COUNTS[name]
    # decoder of method.md §3: width 1024, 12 blocks, H = 2816, same for every encoder size
    assert (cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.dec_mlp_hidden) == (1024, 12, 8, 2816)
    blk = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024
    expect = (cfg.dim * 1024 + 1024 + 1024 + 32000 * 1024 + 78 * 1024 + 12 * blk + 1024
              + 1024 * 588 + 1024 * 32000)
    assert count_params(dec) + count_params(pre.text_head) == expect      # the pretrainer owns the text head
    assert cfg.head_dim == 128 and cfg.num_patches == 256


def test_presets_registry_and_overrides():
    assert set(PARAM_COUNTS) | {"aimv2-tiny"} == set(list_presets())
    cfg = get_preset("aimv2-large", img_size=448)
    assert cfg.num_patches == 1024 and get_preset("aimv2-large").img_size == 224
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("aimv2-giant")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        get_preset("aimv2-large", img_size=225)
    with pytest.raises(ValueError, match="attn_backend"):
        get_preset("aimv2-large", attn_backend="xformers-ish")


# ------------------------------------------------------------------ an independent encoder forward
def manual_encoder(enc, images, allowed):
    """fp64 forward written from method.md §1 with an explicit (B, N, N) boolean mask `allowed`."""
    sd = {k: v.double() for k, v in enc.state_dict().items()}
    cfg = enc.cfg
    eps = cfg.norm_eps

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    x = F.conv2d(images.double(), sd["preprocessor.patchifier.proj.weight"],
                 sd["preprocessor.patchifier.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = rms(x, sd["preprocessor.patchifier.norm.weight"]) + sd["preprocessor.pos_embed"]
    B, N, D = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    for b in range(cfg.depth):
        p = f"trunk.blocks.{b}."
        h = rms(x, sd[p + "norm_1.weight"])
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).split(D, dim=-1)
        q, k, v = (t.reshape(B, N, H, Dh).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(Dh)
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
        x = x + o @ sd[p + "attn.proj.weight"].T
        h = rms(x, sd[p + "norm_2.weight"])
        g, u = h @ sd[p + "mlp.fc1.weight"].T, h @ sd[p + "mlp.fc3.weight"].T
        x = x + (F.silu(g) * u) @ sd[p + "mlp.fc2.weight"].T
    return rms(x, sd["trunk.post_trunk_norm.weight"])


def allowed_mask(P, B, N):
    m = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            for j in range(N):
                m[b, i, j] = j < P[b] or j <= i
    return m


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_encoder_prefix_semantics_against_manual_forward(backend):
    cfg = small_cfg(attn_backend=backend)
    enc = perturb_(AIMv2Encoder(cfg)).eval()
    B, N = 3, cfg.num_patches
    images, _ = rand_batch(cfg, B)
    cases = {
        "causal P=0": (0, [0] * B),
        "bidirectional None": (None, [N] * B),
        "bidirectional P=N": (N, [N] * B),
        "per-sample": (torch.tensor([1, 7, N - 1]), [1, 7, N - 1]),
        "int P": (5, [5] * B),
    }
    for name, (arg, plist) in cases.items():
        with torch.no_grad():
            out = enc(images, arg)
        ref = manual_encoder(enc, images, allowed_mask(plist, B, N))
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4, msg=name)


def test_jacobian_zero_for_masked_tokens():
    """d out_i / d in_j is exactly zero whenever j > i and j >= P_b (per sample)."""
    cfg = small_cfg()
    enc = perturb_(AIMv2Encoder(cfg))
    B, N = 2, cfg.num_patches
    images, _ = rand_batch(cfg, B)
    P = torch.tensor([3, 11])
    x0 = enc.preprocessor(images).detach().requires_grad_(True)           # trunk input tokens
    from aimv2.attention import AttentionMask
    out = enc.trunk(x0, AttentionMask("sdpa", P, B, N, x0.device))
    proj = torch.randn_like(out)
    seen_nonzero = False
    for i in range(N):
        (g,) = torch.autograd.grad((out[:, i] * proj[:, i]).sum(), x0, retain_graph=True)
        gnorm = g.abs().sum(-1)                                            # (B, N)
        for b in range(B):
            for j in range(N):
                if j > i and j >= P[b]:
                    assert gnorm[b, j] == 0.0, (b, i, j)
                else:
                    seen_nonzero |= bool(gnorm[b, j] > 0)
    assert seen_nonzero


def test_sdpa_and_flex_agree_forward():
    cfg = small_cfg()
    torch.manual_seed(0)
    enc_s = perturb_(AIMv2Encoder(cfg)).eval()
    enc_f = AIMv2Encoder(cfg.replace(attn_backend="flex")).eval()
    enc_f.load_state_dict(enc_s.state_dict())
    images, text = rand_batch(cfg, 3)
    for P in (None, 0, 9, torch.tensor([0, 5, 16])):
        with torch.no_grad():
            torch.testing.assert_close(enc_f(images, P), enc_s(images, P), atol=1e-5, rtol=1e-5)
    pre_s = perturb_(AIMv2Pretrainer(cfg))
    pre_f = AIMv2Pretrainer(cfg.replace(attn_backend="flex"))
    pre_f.load_state_dict(pre_s.state_dict())
    with torch.no_grad():
        a, b = pre_s(images, text, torch.tensor([2, 8, 15])), pre_f(images, text, torch.tensor([2, 8, 15]))
    for k in ("loss", "pixel_loss", "text_loss"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_flops_match_flop_counter():
    """Encoder inference FLOPs equal torch's FlopCounter on the math SDPA path (dense N x N)."""
    cfg = small_cfg()
    enc = AIMv2Encoder(cfg)
    images, _ = rand_batch(cfg, 2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        enc(images)
    ff = forward_flops(cfg, "none")
    assert fc.get_total_flops() / 2 == ff["patch_embed"] + ff["encoder"]
    assert flops_per_sample(cfg) == 3 * forward_flops(cfg, "random")["total"]


@pytest.mark.parametrize("N", [2, 5, 16, 33])
def test_prefix_pair_count_matches_mask(N):
    brute = sum(int(allowed_mask([P], 1, N).sum()) for P in range(1, N)) / (N - 1)
    assert _prefix_pairs(N) == pytest.approx(brute)


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    cfg = small_cfg()
    model = AIMv2Pretrainer(cfg)
    images, text = rand_batch(cfg, 2)
    with pytest.raises(ValueError, match="images: expected shape"):
        model.encoder(torch.randn(2, 3, 42, 42))
    with pytest.raises(ValueError, match="images: expected shape"):
        model.encoder(torch.randn(2, 1, 56, 56))
    with pytest.raises(ValueError, match="float tensor"):
        model.encoder((images * 50).to(torch.uint8))
    with pytest.raises(ValueError, match="outside"):
        model.encoder(images, 17)
    with pytest.raises(ValueError, match="values must lie"):
        model.encoder(images, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="expected shape"):
        model.encoder(images, torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="integer tensor"):
        model.encoder(images, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="vocab_size"):
        bad = text.clone()
        bad[0, 3] = cfg.vocab_size
        model(images, bad, 4)
    with pytest.raises(ValueError, match="text: expected shape"):
        model(images, text[:, :20], 4)


# ------------------------------------------------------------------ training
def test_tiny_model_overfits_one_batch():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = AIMv2Pretrainer(cfg)
    images, text = rand_batch(cfg, 4)
    P = torch.tensor([1, 4, 9, 15])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(40):
        out = model(images, text, P)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
