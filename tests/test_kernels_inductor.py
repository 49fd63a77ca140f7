"""rms_norm (+ residual), swiglu and patch_l2_loss inside one torch.compile(fullgraph=True) graph
with the default Inductor backend (as the training loop compiles them), forward and backward equal
to eager. The per-op files compile each op with backend="aot_eager" (same Dynamo trace and fake
implementations, no C++ codegen) to stay fast; this is the one Inductor run (~15 s on a CPU)."""
import torch

from aimv2.kernels import patch_l2_loss, rms_norm, swiglu


def test_all_ops_inductor_fullgraph(device):
    x = torch.randn(2, 5, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(2, 5, 40, device=device, requires_grad=True)            # fp32 residual stream
    w = torch.randn(40, device=device, requires_grad=True)
    gu = torch.randn(2, 5, 2 * 24, device=device, requires_grad=True)
    pred = torch.randn(2, 6, 147, device=device, requires_grad=True)
    images = torch.randn(2, 3, 14, 21, device=device).to(memory_format=torch.channels_last)
    plen = torch.tensor([1, 3], device=device)

    def f(x, r, w, gu, pred):
        out, s = rms_norm(x, w, 1e-5, residual=r)
        h = swiglu(gu[..., :24], gu[..., 24:])
        return (out.float() * 0.5).sum() + (s * s).sum() + h.square().sum() + \
            patch_l2_loss(pred, images, plen, 7)

    args = (x, r, w, gu, pred)
    loss = torch.compile(f, fullgraph=True)(*args)
    got = torch.autograd.grad(loss, args)
    want_loss = f(*args)
    want = torch.autograd.grad(want_loss, args)
    # same kernels in the same order; Inductor only fuses the torch ops around them
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
