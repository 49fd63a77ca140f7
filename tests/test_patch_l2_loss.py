"""aimv2.kernels.patch_l2_loss against the fp64 reference: the loss and d_pred, for every prefix
edge case, strided image layouts, near-constant patches; eager, compiled and through opcheck.
Tolerances: tests/_kernel_numerics.py (kernel error <= 2x the same-dtype torch error + 2 ulp)."""
import pytest
import torch

from _kernel_numerics import assert_close_to_truth, assert_compiled_matches_eager, poison_empty  # noqa: F401 (fixture)
from aimv2.kernels import patch_l2_loss, patch_l2_loss_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(fn, pred, images, prefix_len, p, dloss):
    pred = pred.detach().requires_grad_()
    loss = fn(pred, images, prefix_len, p)
    (loss * dloss).backward()
    return loss, pred.grad


def _check(pred, images, prefix_len, p, dloss=1.0):
    got = _run(patch_l2_loss, pred, images, prefix_len, p, dloss)
    same = _run(patch_l2_loss_ref, pred, images, prefix_len, p, dloss)
    truth = _run(patch_l2_loss_ref, pred.double(), images.double(), prefix_len, p, dloss)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for name, g, t_same, t in zip(["loss", "dpred"], got, same, truth):
        assert_close_to_truth(name, g, t_same, t)
    return got


def _images(B, C, H, W, layout, device, dtype=torch.float32):
    """(B, C, H, W) images with the given memory layout (values do not depend on it)."""
    if layout == "nchw":
        return torch.randn(B, C, H, W, device=device).to(dtype)
    if layout == "channels_last":
        return torch.randn(B, C, H, W, device=device).to(dtype).to(memory_format=torch.channels_last)
    if layout == "cropped-view":       # row stride W+7, offset start: patches strided in memory
        return torch.randn(B, C, H + 3, W + 7, device=device).to(dtype)[:, :, 2:H + 2, 5:W + 5]
    if layout == "every-other-col":    # unit stride nowhere
        return torch.randn(B, C, H, 2 * W, device=device).to(dtype)[..., ::2]
    raise ValueError(layout)


def _prefix(kind, B, N, device):
    return {"0": 0, "1": 1, "N-1": N - 1, "N": N,
            "random": torch.randint(0, N + 1, (B,), device=device),
            "mixed": torch.tensor([0, 1, N - 1, N, 7][:B], device=device, dtype=torch.int32)}[kind]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix", ["0", "1", "random", "N-1", "N", "mixed"])
def test_prefix_lengths(device, dtype, prefix, poison_empty):
    B, C, H, W, p = 5, 3, 28, 42, 7                         # N = 24, K = 147 (not powers of two)
    images = _images(B, C, H, W, "nchw", device)
    pred = torch.randn(B, 24, p * p * C, device=device).to(dtype)
    loss, dpred = _check(pred, images, _prefix(prefix, B, 24, device), p, dloss=2.5)
    if prefix == "N":                                       # nothing counted: loss 0, grad 0
        assert loss.item() == 0 and not dpred.any()
    assert not dpred[:, -1].any()                           # the last position predicts nothing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "cropped-view", "every-other-col"])
def test_strided_images(device, dtype, layout, poison_empty):
    B, C, H, W, p = 2, 3, 28, 21, 7                         # N = 12, K = 147
    images = _images(B, C, H, W, layout, device)
    pred = torch.randn(B, 12, p * p * C, device=device).to(dtype)
    _check(pred, images, torch.randint(0, 12, (B,), device=device), p)


@pytest.mark.parametrize("geometry", [(2, 3, 56, 84, 7), (2, 3, 56, 70, 14), (3, 2, 20, 12, 4),
                                      (1, 3, 14, 14, 7)],
                         ids=["N96-past-tile", "K588-aimv2-patch", "C2-K32", "B1-N4"])
def test_geometries_low_precision_images(device, geometry, poison_empty):
    B, C, H, W, p = geometry
    N, K = (H // p) * (W // p), p * p * C
    images = _images(B, C, H, W, "nchw", device, torch.bfloat16)
    pred = torch.randn(B, N, K, device=device).to(torch.bfloat16)
    _check(pred, images, torch.randint(0, N, (B,), device=device), p)
    # a strided pred (last dim contiguous) is read in place
    big = torch.randn(B, N, K + 5, device=device).to(torch.bfloat16)
    _check(big[..., 5:], images, 1, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_near_constant_patches_eps_dominates(device, dtype, poison_empty):
    B, C, H, W, p = 2, 3, 14, 28, 7                         # N = 8
    base = torch.randn(B, C, H // p, W // p, device=device)
    images = base.repeat_interleave(p, 2).repeat_interleave(p, 3)   # constant per patch & channel
    images = images + 1e-4 * torch.randn_like(images)       # var ~ 1e-8 << eps = 1e-6
    images[:, :, :p, :p] = 3.0                              # one exactly constant patch: var = 0
    pred = torch.randn(B, 8, p * p * C, device=device).to(dtype)
    _check(pred, images, 0, p)


def test_compile_fullgraph_fwd_bwd(device):
    images = torch.randn(2, 3, 14, 21, device=device)
    pred = torch.randn(2, 6, 147, device=device, dtype=torch.bfloat16, requires_grad=True)
    plen = torch.tensor([1, 3], device=device)

    def f(pred):
        return 0.4 * patch_l2_loss(pred, images, plen, 7)

    assert_compiled_matches_eager(f, pred)


def test_opcheck(device):
    images = torch.randn(2, 3, 14, 21, device=device).to(memory_format=torch.channels_last)
    pred = torch.randn(2, 6, 147, device=device, requires_grad=True)
    plen = torch.tensor([0, 4], device=device, dtype=torch.int32)
    torch.library.opcheck(torch.ops.aimv2.patch_l2_loss_fwd.default, (pred, images, plen, 7, 1e-6))
    scale = torch.tensor(0.3, device=device)
    torch.library.opcheck(torch.ops.aimv2.patch_l2_loss_bwd.default,
                          (scale, pred.detach(), images, plen, 7, 1e-6))


def test_bad_inputs(device, monkeypatch):
    images = torch.randn(2, 3, 14, 21, device=device)
    pred = torch.randn(2, 6, 147, device=device)
    with pytest.raises(TypeError, match="pred: expected dtype"):
        patch_l2_loss(pred.long(), images, 0, 7)
    with pytest.raises(ValueError, match="pred: expected shape"):
        patch_l2_loss(pred[:, :5], images, 0, 7)
    with pytest.raises(ValueError, match="images: expected shape"):
        patch_l2_loss(pred, images[0], 0, 7)
    with pytest.raises(ValueError, match="patch_size"):
        patch_l2_loss(pred, images, 0, 5)
    with pytest.raises(TypeError, match="prefix_len"):
        patch_l2_loss(pred, images, torch.tensor([0.5, 1.0], device=device), 7)
    with pytest.raises(ValueError, match="prefix_len"):
        patch_l2_loss(pred, images, torch.tensor([0, 1, 2], device=device), 7)
    with pytest.raises(ValueError, match="one device"):
        patch_l2_loss(pred, images.to("meta"), 0, 7)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        patch_l2_loss(pred.cpu(), images.cpu(), 0, 7)
