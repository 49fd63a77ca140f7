"""aimv2.kernels.patch_l2_loss_packed: the pixel loss over images of different sizes packed in one
sequence equals the token-weighted combination of each image's fixed-size loss computed alone (fp64),
gradients too; the kernel against the fp64 reference in every dtype (tolerances:
tests/_kernel_numerics.py); a pack of equal sizes is the fixed-size op; eager, compiled, opcheck."""
import pytest
import torch

from _kernel_numerics import assert_close_to_truth, assert_compiled_matches_eager, poison_empty  # noqa: F401 (fixture)
from aimv2.kernels import patch_l2_loss, patch_l2_loss_packed, patch_l2_loss_packed_ref, patch_l2_loss_ref
from aimv2.packing import pack_images, unpatchify

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
P, C = 4, 3                                                  # K = 48 values per patch
GRIDS = [(1, 1), (1, 2), (2, 3), (3, 5), (1, 7), (4, 2)]    # N = 1, 2, 6, 15, 7, 8: T = 39


def _pack(grids, prefix, device, dtype=torch.float32, gen=None):
    """Random images of the given patch grids packed, and prefix lengths of `prefix` kind."""
    images = [torch.randn(C, h * P, w * P, generator=gen).to(device) for h, w in grids]
    lens = [h * w for h, w in grids]
    plen = {"0": [0] * len(lens), "1": [min(1, n) for n in lens], "len": lens,
            "len-1": [n - 1 for n in lens],
            "random": [int(torch.randint(0, n + 1, (), generator=gen)) for n in lens]}[prefix]
    batch = pack_images(images, P, prefix_len=torch.tensor(plen, device=device))
    pred = torch.randn(batch.num_tokens, P * P * C, generator=gen).to(device=device, dtype=dtype)
    return batch, pred


def _per_image(pred, batch):
    """fp64 truth from the fixed-size reference run on each image alone, combined token-weighted:
    sum_s c_s * loss_s / sum_s c_s with c_s the pairs image s counts. Returns (loss, d_pred)."""
    pred = pred.detach().double().requires_grad_()
    total, count = pred.new_zeros(()), 0
    for s, (grid, a, b) in enumerate(zip(batch.grids, batch.cu_seqlens[:-1], batch.cu_seqlens[1:])):
        image = unpatchify(batch.patches[a:b].double(), grid, P, C)[None]           # (1, C, H, W)
        N, plen = grid[0] * grid[1], int(batch.prefix_len[s])
        c = sum(1 for i in range(N - 1) if i + 1 >= plen)                          # counted pairs
        total = total + c * patch_l2_loss_ref(pred[a:b][None], image, plen, P)
        count += c
    loss = total / max(count, 1)
    loss.backward()
    return loss.detach(), pred.grad


def _run(fn, pred, batch, dloss=1.0):
    pred = pred.detach().requires_grad_()
    loss = fn(pred, batch.patches, batch.cu_seqlens, batch.prefix_len)
    (loss * dloss).backward()
    return loss, pred.grad


@pytest.mark.parametrize("prefix", ["0", "1", "len-1", "len", "random"])
def test_ref_equals_each_image_alone_fp64(device, prefix):
    """The specification: the packed reference is the per-image fixed-size loss, token-weighted."""
    batch, pred = _pack(GRIDS, prefix, device, torch.float64)
    batch = type(batch)(batch.patches.double(), batch.cu_seqlens, batch.grids, batch.prefix_len)
    loss, grad = _run(patch_l2_loss_packed_ref, pred, batch)
    want_loss, want_grad = _per_image(pred, batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    if prefix == "len":                                         # nothing to predict anywhere
        assert loss.item() == 0 and not grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix", ["0", "1", "len-1", "len", "random"])
def test_kernel_matches_fp64(device, dtype, prefix, poison_empty):
    batch, pred = _pack(GRIDS, prefix, device, dtype)
    got = _run(patch_l2_loss_packed, pred, batch, dloss=2.5)
    same = _run(patch_l2_loss_packed_ref, pred, batch, dloss=2.5)
    truth = _per_image(pred, batch)
    truth = (truth[0], 2.5 * truth[1])
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for name, g, t_same, t in zip(["loss", "dpred"], got, same, truth):
        assert_close_to_truth(name, g, t_same, t)
    last_rows = (batch.cu_seqlens[1:] - 1).long()
    assert not got[1][last_rows].any()                           # an image's last row predicts nothing


def _check_layouts(batch, pred, patches):
    """The kernel on pred / patches as given (any row strides) against the same-dtype reference and
    fp64: loss and d_pred."""
    got, same, truth = (_run(fn, p_, type(batch)(x, batch.cu_seqlens, batch.grids, batch.prefix_len))
                        for fn, p_, x in ((patch_l2_loss_packed, pred, patches),
                                          (patch_l2_loss_packed_ref, pred, patches),
                                          (patch_l2_loss_packed_ref, pred.double(), patches.double())))
    for name, g, t_same, t in zip(["loss", "dpred"], got, same, truth):
        assert_close_to_truth(name, g, t_same, t)


def test_awkward_rows_and_near_constant_patches(device, poison_empty):
    """K = 147 (not a power of two), a strided pred and patches (row stride K + 5), a 1x1 image first,
    tile edges inside images, and near-constant / exactly constant target patches (eps dominates)."""
    p, grids = 7, [(1, 1), (3, 3), (2, 5), (1, 1), (5, 1)]
    images = [torch.randn(C, h * p, w * p, device=device) for h, w in grids]
    images[1] = images[1][:, :1, :1].expand_as(images[1]) + 1e-4 * torch.randn_like(images[1])
    images[2][:, :p, p:2 * p] = 3.0                              # patch 1 of image 2: var = 0
    batch = pack_images(images, p, prefix_len=torch.tensor([0, 2, 1, 1, 3], device=device))
    T, K = batch.num_tokens, p * p * C
    big_x = torch.randn(T, K + 5, device=device)
    big_x[:, 5:] = batch.patches
    big_p = torch.randn(T, K + 5, device=device)
    pred, patches = big_p[:, 5:], big_x[:, 5:]                   # row stride K + 5
    _check_layouts(batch, pred, patches)


def test_pred_and_patches_with_different_row_strides(device, poison_empty):
    """pred and patches each their own layout (pred: rows of a (T, K + 5) buffer, patches: rows of a
    (T, 2K + 3) buffer at column 3), so a kernel that read one tensor with the other's row stride, or
    assumed contiguous rows, is caught; loss and d_pred against fp64."""
    batch, _ = _pack(GRIDS, "random", device, gen=torch.Generator().manual_seed(3))
    T, K = batch.patches.shape
    big_p = torch.randn(T, K + 5, device=device)
    big_x = torch.randn(T, 2 * K + 3, device=device)
    big_x[:, 3:3 + K] = batch.patches
    pred, patches = big_p[:, 5:], big_x[:, 3:3 + K]                  # row strides K + 5 and 2K + 3
    assert pred.stride(0) != patches.stride(0) != K
    _check_layouts(batch, pred, patches)


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_sizes_is_the_fixed_op(device, dtype):
    """A pack of B images of one size is the fixed-size op on the (B, N, K) batch, bit for bit in the
    loss's sense: the same fp32 arithmetic per row."""
    B, h, w = 3, 2, 3
    images = torch.randn(B, C, h * P, w * P, device=device)
    plen = torch.tensor([0, 2, 5], device=device)
    batch = pack_images(list(images), P, prefix_len=plen)
    pred = torch.randn(B * h * w, P * P * C, device=device).to(dtype)
    packed = _run(patch_l2_loss_packed, pred, batch)
    fixed_pred = pred.detach().view(B, h * w, -1).requires_grad_()
    fixed = patch_l2_loss(fixed_pred, images, plen, P)
    fixed.backward()
    torch.testing.assert_close(packed[0], fixed, rtol=2e-6, atol=0)
    torch.testing.assert_close(packed[1], fixed_pred.grad.view(B * h * w, -1), rtol=2e-6, atol=1e-9)


def test_int_prefix_and_one_image(device):
    batch, pred = _pack([(3, 5)], "0", device)
    for plen in (0, 4):
        got = patch_l2_loss_packed(pred, batch.patches, batch.cu_seqlens, plen)
        want = patch_l2_loss_ref(pred.view(1, 15, -1).double(), unpatchify(batch.patches, (3, 5), P, C)[None].double(),
                                 plen, P)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:var\\(\\):UserWarning")          # torch: var() over zero rows (T = 0)
def test_empty_pack_and_one_patch(device):
    """No images (T = 0) and one 1x1 image (T = 1, nothing to predict): loss 0, gradient 0, no error."""
    for T, cu in ((0, [0]), (1, [0, 1])):
        pred = torch.randn(T, P * P * C, device=device, requires_grad=True)
        cu = torch.tensor(cu, dtype=torch.int32, device=device)
        plen = torch.zeros(len(cu) - 1, dtype=torch.int64, device=device)
        for fn in (patch_l2_loss_packed, patch_l2_loss_packed_ref):
            loss = fn(pred, torch.randn_like(pred), cu, plen)
            grad, = torch.autograd.grad(loss, pred)
            assert loss.item() == 0 and grad.shape == pred.shape and not grad.any()


def test_compile_fullgraph_fwd_bwd(device):
    batch, pred = _pack([(2, 3), (1, 2), (3, 1)], "random", device, torch.bfloat16)
    pred.requires_grad_()

    def f(pred):
        return 0.4 * patch_l2_loss_packed(pred, batch.patches, batch.cu_seqlens, batch.prefix_len)

    assert_compiled_matches_eager(f, pred)


def test_opcheck(device):
    batch, pred = _pack([(2, 3), (1, 2)], "random", device)
    pred.requires_grad_()
    counted = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool, device=device)
    torch.library.opcheck(torch.ops.aimv2.patch_l2_loss_packed_fwd.default, (pred, batch.patches, counted, 1e-6))
    scale = torch.tensor(0.3, device=device)
    torch.library.opcheck(torch.ops.aimv2.patch_l2_loss_packed_bwd.default,
                          (scale, pred.detach(), batch.patches, counted, 1e-6))


def test_bad_inputs(device, monkeypatch):
    batch, pred = _pack([(2, 3), (1, 2)], "1", device)
    x, cu, plen = batch.patches, batch.cu_seqlens, batch.prefix_len
    f = patch_l2_loss_packed
    with pytest.raises(TypeError, match="pred: expected dtype"):
        f(pred.long(), x, cu, plen)
    with pytest.raises(ValueError, match="pred: expected shape"):
        f(pred[None], x, cu, plen)
    with pytest.raises(ValueError, match="patches: expected pred's shape"):
        f(pred, x[:-1], cu, plen)
    with pytest.raises(ValueError, match="cu_seqlens: expected an int32"):
        f(pred, x, cu.long(), plen)
    with pytest.raises(ValueError, match="cu_seqlens: last value must be T=8 .pred.shape.0.."):
        f(pred, x, torch.tensor([0, 6, 9], dtype=torch.int32, device=device), plen)
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0"):
        f(pred, x, torch.tensor([1, 6, 8], dtype=torch.int32, device=device), plen)
    with pytest.raises(ValueError, match="strictly increasing"):
        f(pred, x, torch.tensor([0, 0, 8], dtype=torch.int32, device=device), plen)
    with pytest.raises(ValueError, match=r"prefix_len: expected shape \(2,\)"):
        f(pred, x, cu, plen[:1])
    with pytest.raises(ValueError, match=r"prefix_len\[1\]=3 for an image of 2 tokens"):
        f(pred, x, cu, torch.tensor([0, 3], device=device))
    with pytest.raises(TypeError, match="prefix_len: expected an integer tensor"):
        f(pred, x, cu, plen.float())
    with pytest.raises(ValueError, match="one device"):
        f(pred, x.to("meta"), cu, plen)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        f(pred.cpu(), x.cpu(), cu.cpu(), plen.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are observable on a GPU only")
def test_no_host_sync():
    """The packed loss reads nothing back to the host: the per-row mask comes from cu_seqlens and
    prefix_len on the device (searchsorted), the division too."""
    batch, pred = _pack(GRIDS, "random", "cuda", torch.bfloat16)
    pred.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = patch_l2_loss_packed(pred, batch.patches, batch.cu_seqlens, batch.prefix_len)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(pred.grad.float()).all()
