"""aimv2.kernels.swiglu against the fp64 reference: output and both gradients, strided views of a
fused gate/up projection, eager, compiled and through opcheck.
Tolerances: tests/_kernel_numerics.py (kernel error <= 2x the same-dtype torch error + 2 ulp)."""
import pytest
import torch

from _kernel_numerics import assert_close_to_truth, poison_empty  # noqa: F401 (fixture)
from aimv2.kernels import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(fn, gate, up, dout):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = fn(gate, up)
    (out.double() * dout.double()).sum().backward()
    return out, gate.grad, up.grad


def _check(gate, up):
    dout = torch.randn(gate.shape, device=gate.device).to(gate.dtype)
    got = _run(swiglu, gate, up, dout)
    same = _run(swiglu_ref, gate, up, dout)
    truth = _run(swiglu_ref, gate.double(), up.double(), dout)
    for name, g, t_same, t in zip(["out", "dgate", "dup"], got, same, truth):
        assert_close_to_truth(name, g, t_same, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 300), (17, 1025)],
                         ids=["one-row", "3d-300", "past-tile-1025"])
def test_matches_fp64(device, dtype, shape, poison_empty):
    # gate spans the saturated regions of the sigmoid (|g| up to ~12) and 0
    gate = (4 * torch.randn(shape, device=device)).to(dtype)
    _check(gate, torch.randn(shape, device=device).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_projection_halves_without_copy(device, dtype, poison_empty):
    H = 96
    gu = torch.randn(2, 9, 2 * H, device=device).to(dtype)       # (B, N, 2H) fused gate/up output
    gate, up = gu[..., :H], gu[..., H:]                           # row stride 2H, unit last stride
    # the op sees these as (B*N, H) views of gu's storage: no copy is made
    assert gate.reshape(-1, H).data_ptr() == gu.data_ptr()
    _check(gate, up)
    # and a transposed input (last-dim stride != 1) is copied, still correct
    _check(torch.randn(H, 11, device=device).to(dtype).t(), torch.randn(11, H, device=device).to(dtype))


def test_compile_fullgraph_fwd_bwd(device):
    gu = torch.randn(2, 5, 2 * 40, device=device, dtype=torch.bfloat16, requires_grad=True)

    def mlp(gu):
        h = swiglu(gu[..., :40], gu[..., 40:])
        return (h.float() * 1.5).sum()

    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    got, = torch.autograd.grad(compiled(gu), gu)
    want, = torch.autograd.grad(mlp(gu), gu)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_opcheck(device):
    gu = torch.randn(7, 2 * 33, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.aimv2.swiglu_fwd.default, (gu[:, :33], gu[:, 33:]))
    dout = torch.randn(7, 33, device=device)
    torch.library.opcheck(torch.ops.aimv2.swiglu_bwd.default,
                          (dout, gu.detach()[:, :33], gu.detach()[:, 33:]))


def test_bad_inputs(device, monkeypatch):
    g = torch.randn(4, 8, device=device)
    with pytest.raises(TypeError, match="gate: expected dtype"):
        swiglu(g.int(), g)
    with pytest.raises(TypeError, match="up: expected the dtype of gate"):
        swiglu(g, g.half())
    with pytest.raises(ValueError, match="up: expected the shape of gate"):
        swiglu(g, torch.randn(4, 9, device=device))
    with pytest.raises(ValueError, match="one device"):
        swiglu(g, g.to("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        swiglu(g.cpu(), g.cpu())


def _run_packed(fn, h, dout):
    h = h.detach().requires_grad_()
    out = fn(h)
    (out.double() * dout.double()).sum().backward()
    return out, h.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 5), (3, 7, 2 * 300), (17, 2 * 1025)],
                         ids=["one-row", "3d-300", "past-tile-1025"])
def test_packed_matches_fp64(device, dtype, shape, poison_empty):
    """swiglu_packed(h), h = [gate | up] (one fc1/fc3 GEMM's output): output and d_h (both halves,
    one tensor) vs the fp64 reference; gate spans the saturated sigmoid."""
    h = torch.randn(shape, device=device)
    h[..., : shape[-1] // 2] *= 4
    h = h.to(dtype)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, device=device).to(dtype)
    got = _run_packed(swiglu_packed, h, dout)
    same = _run_packed(swiglu_packed_ref, h, dout)
    truth = _run_packed(swiglu_packed_ref, h.double(), dout)
    for name, g, t_same, t in zip(["out", "dh"], got, same, truth):
        assert_close_to_truth(name, g, t_same, t)
    assert got[1].shape == h.shape and got[1].is_contiguous()


def test_packed_equals_swiglu_on_halves_and_reads_a_strided_h(device):
    """Bit-equal to swiglu on the two halves (same kernels), also when h is a row-strided view."""
    wide = torch.randn(6, 5, 2 * 48 + 8, device=device)
    h = wide[..., 4:4 + 2 * 48]                                   # row stride 104, unit last stride
    dout = torch.randn(6, 5, 48, device=device)
    out, dh = _run_packed(swiglu_packed, h, dout)
    g, u = h.detach()[..., :48].requires_grad_(), h.detach()[..., 48:].requires_grad_()
    ref = swiglu(g, u)
    (ref.double() * dout.double()).sum().backward()
    assert torch.equal(out, ref) and torch.equal(dh, torch.cat([g.grad, u.grad], -1))


def test_packed_compile_and_opcheck(device):
    h = torch.randn(2, 5, 2 * 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    fn = lambda h: (swiglu_packed(h).float() * 1.5).sum()        # noqa: E731
    got, = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(h), h)
    want, = torch.autograd.grad(fn(h), h)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    h2 = torch.randn(7, 2 * 33, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.aimv2.swiglu_packed_fwd.default, (h2,))
    torch.library.opcheck(torch.ops.aimv2.swiglu_packed_bwd.default, (torch.randn(7, 33, device=device), h2.detach()))
    with pytest.raises(ValueError, match="even last dim"):
        swiglu_packed(torch.randn(3, 7, device=device))
