"""method.md §4 losses against a direct, independently written evaluation, and the no-leakage property."""
import math

import pytest
import torch
import torch.nn.functional as F

from aimv2.kernels import patch_l2_loss_ref, patchify
from aimv2.model import AIMv2Pretrainer, text_loss_fn

from test_model import perturb_, rand_batch, small_cfg


def direct_pixel_loss(pred, images, P, p, eps=1e-6):
    """Loops over samples and pairs, patches cut by hand, statistics with Python floats."""
    B, C, H, W = images.shape
    gw = W // p
    N = (H // p) * gw
    total, count = 0.0, 0
    for b in range(B):
        for i in range(N - 1):
            n = i + 1                                    # target patch
            if n < P[b]:
                continue
            r0, c0 = (n // gw) * p, (n % gw) * p
            vals = [float(images[b, c, r0 + r, c0 + q]) for r in range(p) for q in range(p) for c in range(C)]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)     # unbiased
            tgt = [(v - mean) / math.sqrt(var + eps) for v in vals]
            total += sum((float(pred[b, i, k]) - tgt[k]) ** 2 for k in range(len(vals))) / len(vals)
            count += 1
    return total / max(count, 1)


def direct_text_loss(logits, text, pad):
    total, count = 0.0, 0
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T):
            y = int(text[b, t])
            if y == pad:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[y])
            count += 1
    return total / max(count, 1)


def test_patchify_order_row_col_channel():
    p, C = 2, 3
    img = torch.arange(1 * C * 4 * 6, dtype=torch.float64).reshape(1, C, 4, 6)
    t = patchify(img, p)                                  # (1, 6, 12)
    assert t.shape == (1, 6, 12)
    n, r, q, c = 4, 1, 0, 2                               # patch 4 = grid row 1, col 1
    assert t[0, n, (r * p + q) * C + c] == img[0, c, 1 * p + r, 1 * p + q]


@pytest.mark.parametrize("P", [[0, 0], [1, 3], [8, 9], [9, 9], [2, 0]])
def test_pixel_loss_matches_direct_formula(P):
    torch.manual_seed(0)
    B, C, p = 2, 3, 2
    images = torch.randn(B, C, 6, 6, dtype=torch.float64)
    images[1, :, 0:2, 2:4] = 0.25 + 1e-4 * torch.randn(C, 2, 2)   # near-constant patch: eps matters
    pred = torch.randn(B, 9, p * p * C, dtype=torch.float64)
    got = patch_l2_loss_ref(pred, images, torch.tensor(P), p)
    assert got.item() == pytest.approx(direct_pixel_loss(pred, images, P, p), rel=1e-10, abs=1e-12)
    if P[0] == P[1]:
        assert patch_l2_loss_ref(pred, images, P[0], p).item() == pytest.approx(got.item(), rel=1e-12)


def test_text_loss_matches_direct_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    text = torch.randint(2, 11, (3, 7))
    text[0, 4:] = 1
    text[2, :] = 1                                      # an all-padding caption contributes nothing
    got = text_loss_fn(logits, text, pad_id=1)
    assert got.item() == pytest.approx(direct_text_loss(logits, text, 1), rel=1e-5)
    assert text_loss_fn(logits, torch.ones_like(text), pad_id=1).item() == 0.0


def test_pretrainer_losses_are_spec_formulas():
    """The model's three losses equal the direct formulas applied to its own decoder outputs."""
    cfg = small_cfg()
    model = perturb_(AIMv2Pretrainer(cfg))
    images, text = rand_batch(cfg, 2)
    P = torch.tensor([4, 13])
    captured = {}
    model.decoder.register_forward_hook(
        lambda m, i, o: captured.update(pix=o[0], logits=model.text_logits(o[1])))
    out = model(images, text, P)
    pix, logits = captured["pix"].detach(), captured["logits"].detach()
    assert pix.shape == (2, cfg.num_patches, 588) and logits.shape == (2, 77, cfg.vocab_size)
    pl = direct_pixel_loss(pix, images, P.tolist(), cfg.patch_size)
    tl = direct_text_loss(logits, text, cfg.pad_id)
    assert out["pixel_loss"].item() == pytest.approx(pl, rel=1e-5)
    assert out["text_loss"].item() == pytest.approx(tl, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.4 * pl + 1.0 * tl, rel=1e-5)


def test_no_leakage_of_targets():
    """Changing patch i+1 (outside the prefix) or token t_{k+1} leaves the output that predicts it."""
    cfg = small_cfg()
    model = perturb_(AIMv2Pretrainer(cfg)).eval()
    images, text = rand_batch(cfg, 1)
    P, p, gw = 5, cfg.patch_size, cfg.grid
    captured = {}
    model.decoder.register_forward_hook(
        lambda m, i, o: captured.update(pix=o[0], logits=model.text_logits(o[1])))

    def run(img, txt):
        with torch.no_grad():
            model(img, txt, P)
        return captured["pix"].clone(), captured["logits"].clone()

    pix0, log0 = run(images, text)
    for n in (P, 9, cfg.num_patches - 1):                 # target patches outside the prefix
        img = images.clone()
        r0, c0 = (n // gw) * p, (n % gw) * p
        img[:, :, r0:r0 + p, c0:c0 + p] += torch.randn(1, 3, p, p)
        pix, _ = run(img, text)
        torch.testing.assert_close(pix[:, :n], pix0[:, :n], rtol=0, atol=0)    # outputs 0..n-1 unchanged
        assert not torch.equal(pix[:, n:], pix0[:, n:])                         # later ones do change
    for k in (1, 10, 40):                                 # token t_{k+1} sits at text index k
        txt = text.clone()
        txt[0, k] = (txt[0, k] + 7) % cfg.vocab_size
        _, logits = run(images, txt)
        torch.testing.assert_close(logits[:, :k + 1], log0[:, :k + 1], rtol=0, atol=0)
        assert not torch.equal(logits[:, k + 1:], log0[:, k + 1:])
