"""The packed pre-training forward (method.md §8): the decoder over a pack equals the decoder run on
each image alone, and the pretrainer's packed losses equal the per-image losses combined token-weighted
(fp64), every parameter gradient too, for attention backends sdpa / flex / triton and impl torch /
triton; a 20-step packed training run follows a per-sample loop step for step."""
import copy
from dataclasses import replace

import pytest
import torch

from _kernel_numerics import assert_close_to_truth
from aimv2.kernels import linear_cross_entropy_ref, patch_l2_loss_ref
from aimv2.model import AIMv2Decoder, AIMv2Pretrainer
from aimv2.packing import decoder_layout, pack_images, unpatchify
from aimv2.presets import get_preset

P = 4                                                         # patch side: K = 48 values per patch
GRIDS = [(1, 1), (1, 2), (2, 3), (3, 5), (2, 1)]              # N_s = 1, 2, 6, 15, 2

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


def _cfg(backend="sdpa", impl="torch", **kw):
    # D = Dd = 64 with 2 heads of 32 (a head dim the Triton attention takes), SwiGLU hidden 96, 6 tokens
    return get_preset("aimv2-tiny", img_size=16, patch_size=P, dim=64, depth=1, num_heads=2, mlp_hidden=96,
                      dec_dim=64, dec_depth=2, dec_heads=2, dec_mlp_hidden=96, vocab_size=50, text_len=6,
                      attn_backend=backend, impl=impl, **kw)


def _batch(cfg, grids=GRIDS, gen=None, device="cpu"):
    images = [torch.randn(3, h * P, w * P, generator=gen) for h, w in grids]
    n = len(grids)
    text = torch.randint(1, cfg.vocab_size, (n, cfg.text_len), generator=gen)
    text[0, -2:] = cfg.pad_id                                                    # some padding
    plen = torch.tensor([int(torch.randint(0, h * w + 1, (), generator=gen)) for h, w in grids])
    plen[0] = 0
    return pack_images(images, P, prefix_len=plen, text=text).to(device)


def test_decoder_layout_places_rows():
    cu = torch.tensor([0, 2, 3, 7], dtype=torch.int32)
    lay = decoder_layout(cu, [2, 1, 4], 3)
    assert lay.cu_seqlens.tolist() == [0, 5, 9, 16] and lay.lengths == [5, 4, 7]
    assert lay.image_rows.tolist() == [0, 1, 5, 9, 10, 11, 12]
    assert lay.extra_rows.tolist() == [[2, 3, 4], [6, 7, 8], [13, 14, 15]]
    src = torch.cat([lay.image_rows, lay.extra_rows.flatten()])
    assert torch.equal(lay.gather[src], torch.arange(16))                       # a permutation


def _decoder_per_image(dec, enc, batch):
    pix, txt = [], []
    for s, (a, b) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())):
        p, t = dec(enc[a:b][None], batch.text[s:s + 1])
        pix.append(p[0])
        txt.append(t)
    return torch.cat(pix), torch.cat(txt)


def _results(dec, run, weights):
    """run(dec) -> (pixels, text hidden); returns them and every parameter's gradient of
    sum(pixels * w_pix) + sum(text * w_txt) (none when grad is disabled), keyed by name."""
    dec.zero_grad()
    pix, txt = run(dec)
    out = {"pixels": pix.detach(), "text": txt.detach()}
    if torch.is_grad_enabled():
        ((pix * weights[0].to(pix.dtype)).sum() + (txt * weights[1].to(txt.dtype)).sum()).backward()
        out.update({n: q.grad.clone() for n, q in dec.named_parameters()})
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
def test_decoder_packed_equals_each_image_alone(device, backend):
    """Outputs and every parameter gradient. sdpa / flex in fp64 (exact up to summation order); triton
    in fp32, its error against the fp64 truth within the tolerance of tests/_kernel_numerics.py
    relative to the fixed-length kernel run per image."""
    cfg = _cfg(backend)
    batch = _batch(cfg, device=device)
    dec = AIMv2Decoder(cfg).to(device=device, dtype=torch.float64)
    enc = torch.randn(batch.num_tokens, cfg.dim, device=device, dtype=torch.float64)
    n, T_img = batch.num_images, batch.num_tokens
    weights = (torch.randn(T_img, cfg.patch_dim, device=device), torch.randn(n, cfg.text_len, cfg.dec_dim, device=device))
    packed = (lambda d: d.forward_packed(enc.to(d.proj.weight.dtype), batch))
    alone = (lambda d: _decoder_per_image(d, enc.to(d.proj.weight.dtype), batch))
    with torch.set_grad_enabled(not (backend == "flex" and device == "cpu")):   # no FlexAttention CPU backward
        if backend != "triton":
            got, want = _results(dec, packed, weights), _results(dec, alone, weights)
            assert got["pixels"].shape == (T_img, cfg.patch_dim) and got["text"].shape == (n, cfg.text_len, cfg.dec_dim)
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
            return
        truth = copy.deepcopy(dec)
        truth.cfg = cfg.replace(attn_backend="sdpa")
        truth = _results(truth, alone, weights)
        dec32 = dec.float()
        got, same = _results(dec32, packed, weights), _results(dec32, alone, weights)
    assert got.keys() == truth.keys()
    for k in truth:
        assert_close_to_truth(k, got[k], same[k], truth[k])


# ----------------------------------------------------------------------------- the pretrainer
def _per_sample(model, batch):
    """The specification, through none of the packed code: each image alone through the fixed-size
    encoder (native, own grid, own prefix), decoder and reference losses, combined token-weighted:
    pixel = sum_s c_s pixel_s / sum_s c_s (c_s: pairs past the prefix), text likewise over non-pad tokens."""
    cfg = model.cfg
    pix_sum, txt_sum, c_tot, v_tot = 0.0, 0.0, 0, 0
    cu = batch.cu_seqlens.tolist()
    for s, grid in enumerate(batch.grids):
        image = unpatchify(batch.patches[cu[s]:cu[s + 1]], grid, P, 3)[None]              # (1, 3, H, W)
        N, plen, text = grid[0] * grid[1], int(batch.prefix_len[s]), batch.text[s:s + 1]
        pixels, text_hidden = model.decoder(model.encoder(image, prefix_len=plen), text)
        c, v = max(0, N - max(plen, 1)), int((text != cfg.pad_id).sum())
        pix_sum = pix_sum + c * patch_l2_loss_ref(pixels, image, plen, P, cfg.patch_norm_eps)
        txt_sum = txt_sum + v * linear_cross_entropy_ref(text_hidden, model.text_head.weight, text,
                                                         ignore_index=cfg.pad_id)
        c_tot, v_tot = c_tot + c, v_tot + v
    pixel, text = pix_sum / max(c_tot, 1), txt_sum / max(v_tot, 1)
    return {"loss": cfg.pixel_loss_weight * pixel + cfg.text_loss_weight * text, "pixel_loss": pixel,
            "text_loss": text}


def _losses_and_grads(model, run, batch):
    model.zero_grad()
    out = run(model, batch)
    out["loss"].backward()
    res = {k: v.detach() for k, v in out.items()}
    res.update({n: p.grad.clone() for n, p in model.named_parameters()})
    return res


def _pretrainer(cfg, dtype=torch.float64):
    torch.manual_seed(0)
    model = AIMv2Pretrainer(cfg)
    with torch.no_grad():                                 # break init symmetries (zero biases, unit norms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


PACKED = (lambda m, b: m.forward_packed(b))


def test_pretrainer_packed_equals_per_sample_fp64(device):
    """Losses and every parameter gradient (sdpa, impl torch, fp64)."""
    cfg = _cfg(native=True)
    model = _pretrainer(cfg).to(device)
    batch = _batch(cfg, device=device)
    batch = replace(batch, patches=batch.patches.double())
    got, want = _losses_and_grads(model, PACKED, batch), _losses_and_grads(model, _per_sample, batch)
    assert got.keys() == want.keys() and len(got) == 3 + len(list(model.parameters()))
    assert got["pixel_loss"] > 0.1 and got["text_loss"] > 0.1
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_pretrainer_packed_triton_matches_fp64(device):
    """impl="triton" with Triton attention (the packed pixel loss, varlen attention, fused norms and
    text loss), fp32, against the fp64 per-sample truth; error within tests/_kernel_numerics.py's bound
    relative to the fp32 torch / sdpa packed run."""
    cfg = _cfg(native=True)
    batch = _batch(cfg, device=device)
    truth = _losses_and_grads(_pretrainer(cfg).to(device),
                              _per_sample, replace(batch, patches=batch.patches.double()))
    same = _losses_and_grads(_pretrainer(cfg, torch.float32).to(device), PACKED, batch)
    got = _losses_and_grads(_pretrainer(cfg.replace(attn_backend="triton", impl="triton"), torch.float32).to(device),
                            PACKED, batch)
    assert got.keys() == truth.keys()
    for k in truth:
        assert_close_to_truth(k, got[k], same[k], truth[k])


def test_pretrainer_packed_without_prefix_and_bad_input(device):
    cfg = _cfg(native=True)
    model = _pretrainer(cfg, torch.float32).to(device)
    batch = _batch(cfg, device=device)
    out = model.forward_packed(replace(batch, prefix_len=None))         # bidirectional: nothing to predict
    assert out["pixel_loss"].item() == 0 and out["text_loss"].item() > 0
    with pytest.raises(ValueError, match="batch.text: .*needs captions"):
        model.forward_packed(replace(batch, text=None))
    with pytest.raises(ValueError, match="text: expected shape"):
        model.forward_packed(replace(batch, text=batch.text[:, :3]))


STEPS = 20


def test_packed_training_run_matches_per_sample_loop(device):
    """20 AdamW steps (fp64, a fresh pack of 2-4 images of random grids and prefixes each step): the
    packed run and the per-sample loop give the same losses and the same final weights."""
    cfg = _cfg(native=True)
    g = torch.Generator().manual_seed(3)
    packs = []
    for _ in range(STEPS):
        grids = [tuple(int(v) for v in torch.randint(1, 4, (2,), generator=g))
                 for _ in range(int(torch.randint(2, 5, (), generator=g)))]
        b = _batch(cfg, grids, gen=g, device=device)
        packs.append(replace(b, patches=b.patches.double()))
    runs = []
    for run in (PACKED, _per_sample):
        model = _pretrainer(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        losses = []
        for b in packs:
            opt.zero_grad(set_to_none=True)
            loss = run(model, b)["loss"]
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), model.state_dict()))
    (l_packed, w_packed), (l_loop, w_loop) = runs
    assert l_packed[-1] < l_packed[0]                                   # it trains
    torch.testing.assert_close(l_packed, l_loop, rtol=1e-9, atol=0)
    for k in w_loop:
        torch.testing.assert_close(w_packed[k], w_loop[k], rtol=1e-8, atol=1e-10, msg=lambda m: f"{k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are observable on a GPU only")
def test_packed_step_has_no_host_sync():
    """A packed training step (Triton kernels and attention, bf16 autocast) reads nothing back to the
    host once per-grid caches are warm: layouts, masks and loss reductions stay on the device."""
    cfg = _cfg("triton", "triton", native=True)
    model = _pretrainer(cfg, torch.float32).cuda()
    batch = _batch(cfg, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.forward_packed(batch)["loss"].backward()

    step()                                                               # warm: sin-cos tables, autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("prefix", [None, 0, 5, 12])
def test_fixed_forward_of_a_native_image_equals_its_pack(device, prefix):
    """A native model's forward() on one non-square image (its own N = 12, not cfg.num_patches = 16)
    gives forward_packed's losses for the one-image pack: prefix None counts no pixel pair, and
    prefix N_image is accepted."""
    cfg = _cfg(native=True)
    model = _pretrainer(cfg).to(device)
    image = torch.randn(1, 3, 3 * P, 4 * P, device=device, dtype=torch.float64)
    text = torch.randint(1, cfg.vocab_size, (1, cfg.text_len), device=device)
    plen = None if prefix is None else torch.tensor([prefix], device=device)
    got = model(image, text, plen)
    batch = pack_images(list(image), P, prefix_len=plen, text=text)
    want = model.forward_packed(batch)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    assert (got["pixel_loss"].item() == 0) == (prefix in (None, 12))
    with pytest.raises(ValueError, match=r"prefix_len: 13 outside \[0, N=12\]"):   # not cfg's N = 16
        model(image, text, 13)


def test_packed_causal_mask_needs_no_dense_mask():
    """The decoder's pattern (prefix 0 for every image) is `is_causal` per image on sdpa, no (L, L) mask
    built; flex / triton get per-image zeros clamped to each length."""
    from aimv2.attention import PackedAttentionMask
    lengths = [5, 1, 9]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    sdpa = PackedAttentionMask("sdpa", cu, lengths, 0, torch.device("cpu"))
    assert all(m.is_causal and m.dense is None for m in sdpa.masks)
    some = PackedAttentionMask("sdpa", cu, lengths, 3, torch.device("cpu"))
    assert [m.prefix_len for m in some.masks] == [3, 1, 3] and some.prefix_len.tolist() == [3, 1, 3]
    tri = PackedAttentionMask("triton", cu, lengths, 0, torch.device("cpu"))
    assert tri.plen32.tolist() == [0, 0, 0] and tri.plen32.dtype == torch.int32
