"""`aimv2.from_pretrained`: a small random encoder saved in the transformers layout, loaded back in eval
mode at its own and at another resolution (bicubic position embedding), with the backend choice logged."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import aimv2
from aimv2.config import ModelConfig
from aimv2.eval.hub import from_pretrained, select_backend
from aimv2.model import AIMv2Encoder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ModelConfig(name="small28", img_size=28, dim=256, depth=2, num_heads=2, mlp_hidden=512)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from aimv2.weights import save_encoder

    torch.manual_seed(0)
    enc = AIMv2Encoder(SMALL).eval()
    d = tmp_path_factory.mktemp("hub") / "aimv2-small-hf"
    save_encoder(enc, str(d), format="hf")
    assert (d / "config.json").exists()
    return enc, d


def test_from_pretrained_same_resolution_is_the_saved_encoder(saved, caplog):
    enc, d = saved
    assert aimv2.from_pretrained is from_pretrained                       # lazy package export
    with caplog.at_level(logging.INFO, logger="aimv2.eval.hub"):
        got = from_pretrained(str(d), device="cpu")
    assert not got.training and got.cfg.img_size == 28
    assert (got.cfg.impl, got.cfg.attn_backend) == ("torch", "sdpa")       # CPU: torch / SDPA, with the reason
    assert "CPU device" in caplog.text
    p = next(got.parameters())
    assert p.dtype == torch.float32 and p.device.type == "cpu"
    sd, ref = got.state_dict(), enc.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(got(x), enc(x), rtol=0, atol=0)


def test_from_pretrained_other_resolution_interpolates_pos_embed(saved):
    enc, d = saved
    got = from_pretrained(str(d), img_size=56, device="cpu")
    assert got.cfg.img_size == 56 and got.cfg.num_patches == 16
    pe = enc.preprocessor.pos_embed.detach()                              # (1, 4, D), 2x2 grid row-major
    grid = pe.reshape(1, 2, 2, 256).permute(0, 3, 1, 2)                   # (1, D, 2, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 16, 256)                   # (1, 16, D)
    torch.testing.assert_close(got.preprocessor.pos_embed.detach(), want, rtol=1e-6, atol=1e-6)
    for k, v in enc.state_dict().items():                                 # everything else unchanged
        if k != "preprocessor.pos_embed":
            assert torch.equal(got.state_dict()[k], v), k
    with torch.no_grad():
        y = got(torch.randn(3, 3, 56, 56))
    assert y.shape == (3, 16, 256) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="expected shape"):
        got(torch.randn(1, 3, 28, 28))


def test_from_pretrained_triton_backend_matches_torch(saved):
    """backend='triton' (interpreter on the CPU) gives the torch backend's output within fp32 tolerance."""
    _, d = saved
    tri = from_pretrained(str(d), backend="triton", device=DEVICE, dtype=torch.float32)
    ref = from_pretrained(str(d), backend="torch", device=DEVICE, dtype=torch.float32)
    assert (tri.cfg.impl, tri.cfg.attn_backend) == ("triton", "triton")
    x = torch.randn(2, 3, 28, 28, device=DEVICE)
    with torch.no_grad():
        a, b = tri(x), ref(x)
    # fp32 kernels vs fp32 PyTorch: different summation orders only, ~1e-6 relative; a wrong eps, scale
    # or residual is >= 1e-3.
    assert (a - b).abs().max() <= 2e-5 * b.abs().max()


def test_backend_selection_and_errors(saved, tmp_path):
    _, d = saved
    assert select_backend("cpu", "torch")[:2] == ("torch", "sdpa")
    impl, attn, why = select_backend("cpu", "auto")
    assert (impl, attn) == ("torch", "sdpa") and "CPU" in why
    with pytest.raises(ValueError, match="backend"):
        select_backend("cpu", "fast")
    with pytest.raises(TypeError, match="dtype"):
        from_pretrained(str(d), dtype=torch.int32)
    half = from_pretrained(str(d), dtype=torch.bfloat16, device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16
    from aimv2.weights import save_encoder

    odd = AIMv2Encoder(ModelConfig(name="hd96", img_size=28, dim=192, depth=1, num_heads=2, mlp_hidden=256))
    save_encoder(odd, str(tmp_path / "hd96"), format="hf")
    with pytest.raises(ValueError, match="head dim 96"):
        from_pretrained(str(tmp_path / "hd96"), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU default (Triton kernels, bf16) needs CUDA")
def test_from_pretrained_gpu_default_is_triton_bf16(saved):
    enc, d = saved
    got = from_pretrained(str(d))
    assert (got.cfg.impl, got.cfg.attn_backend) == ("triton", "triton")
    assert next(got.parameters()).dtype == torch.bfloat16 and next(got.parameters()).is_cuda
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        y, ref = got(x.cuda().bfloat16()).float().cpu(), enc(x)
    assert (y - ref).abs().max() <= 0.05 * ref.abs().max()           # bf16 weights and activations
