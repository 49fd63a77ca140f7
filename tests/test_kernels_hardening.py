"""Bad input at the kernels' edges (issue 14, class 7): out-of-range or wrapping prefix lengths and a
fractional patch size are refused with a clear error instead of giving a wrong loss; empty hidden
dims give empty results (forward and backward) instead of a reshape error."""
import pytest
import torch

from aimv2.kernels import patch_l2_loss, patch_l2_loss_ref, rms_norm, rms_norm_ref, swiglu
from aimv2.kernels._utils import prefix_lengths

B, S, P = 3, 12, 4                                   # N = 9 patches of 48 values


def _inputs():
    images = torch.randn(B, 3, S, S)
    pred = torch.randn(B, (S // P) ** 2, P * P * 3)
    return pred, images


@pytest.mark.parametrize("bad", [-5, 10, 9 + 7, 2**32 + 1])
def test_patch_loss_refuses_prefix_outside_0_N(bad):
    pred, images = _inputs()
    with pytest.raises(ValueError, match=r"prefix_len.*\[0, N=9\]"):
        patch_l2_loss(pred, images, torch.tensor([1, bad, 2]), P)
    if bad < 2**31:
        with pytest.raises(ValueError, match=r"prefix_len.*N=9"):
            patch_l2_loss(pred, images, bad, P)


def test_prefix_is_clamped_before_the_int32_cast():
    """Where values are not range-checked (a CUDA tensor: a check would sync) they are clamped to
    [0, N], never wrapped: as int32, 2**32 + 1 would be 1 and the loss would silently use P = 1."""
    from aimv2.kernels._utils import clamp_prefix
    assert torch.tensor([2**32 + 1]).to(torch.int32).item() == 1            # the wrap this guards against
    got = clamp_prefix(torch.tensor([2**32 + 1, -3, 4, 2**40]), 9)
    assert got.dtype == torch.int32 and got.tolist() == [9, 0, 4, 9]
    meta = prefix_lengths(torch.tensor([2**32 + 1, -3, 4], device="meta"), 3, 9, "meta")
    assert meta.dtype == torch.int32 and meta.shape == (3,)


@pytest.mark.parametrize("p", [14.9, 4.0, True, "4"])
def test_patch_loss_refuses_non_int_patch_size(p):
    pred, images = _inputs()
    with pytest.raises(TypeError, match="patch_size: expected a Python int"):
        patch_l2_loss(pred, images, 2, p)


def test_patch_loss_valid_edges_match_reference():
    pred, images = _inputs()
    plen = torch.tensor([0, 9, 4])                    # causal, all prefix (nothing counted), mid
    got = patch_l2_loss(pred, images, plen, P)
    ref = patch_l2_loss_ref(pred.double(), images.double(), plen, P)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_swiglu_and_rms_norm_empty_hidden_dim():
    g = torch.randn(5, 0, requires_grad=True)
    u = torch.randn(5, 0, requires_grad=True)
    out = swiglu(g, u)
    assert out.shape == (5, 0)
    out.sum().backward()
    assert g.grad.shape == (5, 0) and u.grad.shape == (5, 0)
    x = torch.randn(2, 5, 0, requires_grad=True)
    w = torch.randn(0, requires_grad=True)
    r = torch.randn(2, 5, 0, requires_grad=True)
    y, s = rms_norm(x, w, 1e-5, r)
    ry, rs = rms_norm_ref(x, w, 1e-5, r)
    assert y.shape == ry.shape == (2, 5, 0) and s.shape == rs.shape and y.dtype == ry.dtype
    (y.sum() + s.sum()).backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape and w.grad.shape == (0,)
    assert rms_norm(x, w).shape == (2, 5, 0)
