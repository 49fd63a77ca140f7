"""The model with attn_backend="triton" (aimv2.kernels.prefix_attention) against "sdpa": the encoder
with a random prefix per sample and the full pretrainer (its decoder is causal), forward and every
parameter gradient. impl="torch" elsewhere, so only the attention differs.

Rule (as in tests/test_prefix_attention.py): truth is the "sdpa" model run in fp64; the fp32
"triton" model's max error against it must be <= FACTOR x the fp32 "sdpa" model's error + a
floor of FLOOR_ULPS fp32 ulp x max|truth|. FACTOR 3: a few blocks compound the per-op errors, and
the flash backward's P-from-LSE and dP - delta roundings (see the kernel tests); the floor covers
entries whose sdpa error happens to be ~0. A wrong mask or gradient gives errors >= 1e-3 relative.
"""
import pytest
import torch

from aimv2.model import AIMv2Encoder, AIMv2Pretrainer
from aimv2.presets import get_preset

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FACTOR, FLOOR_ULPS = 3.0, 16.0


def _cfg(backend, **kw):
    """Tiny config at 56 px: N = 16 patches, head dim 64; short captions keep the decoder at N = 30."""
    return get_preset("aimv2-tiny", img_size=56, depth=2, dec_depth=1, text_len=13, attn_backend=backend, **kw)


def _perturbed(model, seed=1):
    """Random norm weights / biases too (they init to 1 / 0), so every gradient is generic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)
    return model


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_rule(name, got, same, truth):
    truth = truth.double()
    err = (got.double() - truth).abs().max().item()
    err_same = (same.double() - truth).abs().max().item()
    bound = FACTOR * err_same + FLOOR_ULPS * torch.finfo(torch.float32).eps * truth.abs().max().item()
    assert err <= bound, f"{name}: triton err {err:.3e} > bound {bound:.3e} (sdpa fp32 err {err_same:.3e})"


def _three_models(build):
    """(triton fp32, sdpa fp32, sdpa fp64) with identical weights."""
    torch.manual_seed(0)
    tri = _perturbed(build("triton")).to(DEV)
    sdpa = build("sdpa").to(DEV)
    sdpa.load_state_dict(tri.state_dict())
    truth = build("sdpa").to(DEV)
    truth.load_state_dict(tri.state_dict())
    return tri, sdpa, truth.double()


@pytest.mark.parametrize("prefix", ["random", "none"])
def test_encoder_triton_matches_sdpa(prefix):
    tri, sdpa, truth = _three_models(lambda b: AIMv2Encoder(_cfg(b)))
    B, N = 3, tri.cfg.num_patches
    images = torch.randn(B, 3, 56, 56, device=DEV)
    plen = torch.tensor([1, 9, N - 1], device=DEV) if prefix == "random" else None
    w = torch.randn(B, N, tri.cfg.dim, device=DEV)
    outs, grads = [], []
    for m, dt in ((tri, torch.float32), (sdpa, torch.float32), (truth, torch.float64)):
        out = m(images.to(dt), plen)                                       # (B, N, D)
        outs.append(out.detach())
        grads.append(_grads(m, (out * w.to(dt)).sum()))
    _assert_rule("encoder out", *outs)
    assert (outs[0] - outs[1]).abs().max() > 0          # the two backends really ran different code
    for n in grads[0]:
        _assert_rule(f"grad {n}", grads[0][n], grads[1][n], grads[2][n])


def test_pretrainer_triton_matches_sdpa():
    """Encoder with per-sample prefixes + causal decoder + both losses, all parameter gradients."""
    tri, sdpa, truth = _three_models(lambda b: AIMv2Pretrainer(_cfg(b)))
    cfg = tri.cfg
    B, N = 2, cfg.num_patches
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 56, 56, generator=g).to(DEV)
    text = torch.randint(2, cfg.vocab_size, (B, cfg.text_len), generator=g)
    text[:, 10:] = cfg.pad_id
    text = text.to(DEV)
    plen = torch.tensor([3, N - 2], device=DEV)
    losses, grads = [], []
    for m, dt in ((tri, torch.float32), (sdpa, torch.float32), (truth, torch.float64)):
        out = m(images.to(dt), text, plen)
        losses.append(torch.stack([out["loss"], out["pixel_loss"], out["text_loss"]]).detach())
        grads.append(_grads(m, out["loss"]))
    _assert_rule("losses", *losses)
    for n in grads[0]:
        _assert_rule(f"grad {n}", grads[0][n], grads[1][n], grads[2][n])
