"""aimv2.kernels.rms_norm against the fp64 reference: output, s = x + residual, and the gradients
for x, weight and residual (flowing from both outputs), eager, compiled and through opcheck.
Tolerances: tests/_kernel_numerics.py (kernel error <= 2x the same-dtype torch error + 2 ulp)."""
import pytest
import torch

from _kernel_numerics import assert_close_to_truth, poison_empty  # noqa: F401 (fixture)
from aimv2.kernels import rms_norm, rms_norm_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# a residual of another dtype: s is promote_types(x, residual); fp16 + bf16 -> fp32 (neither)
OTHER = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float32, torch.float16: torch.bfloat16}


def _run(fn, x, w, r, dout, ds, eps):
    """Forward + backward of fn; returns (out, s, dx, dw, dres) (s, dres None without residual)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    r = r.detach().requires_grad_() if r is not None else None
    res = fn(x, w, eps, r)
    out, s = (res, None) if r is None else res
    loss = (out.double() * dout.double()).sum()
    if s is not None:
        loss = loss + (s.double() * ds.double()).sum()
    loss.backward()
    return out, s, x.grad, w.grad, (r.grad if r is not None else None)


def _check(x, w, r, eps=1e-5):
    dout = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    ds = None if r is None else torch.randn(x.shape, device=x.device).to(
        torch.promote_types(x.dtype, r.dtype))
    got = _run(rms_norm, x, w, r, dout, ds, eps)
    same = _run(rms_norm_ref, x, w, r, dout, ds, eps)
    truth = _run(rms_norm_ref, x.double(), w.double(), r.double() if r is not None else None,
                 dout, ds, eps)
    for name, g, t_same, t in zip(["out", "s", "dx", "dweight", "dresidual"], got, same, truth):
        if t is None:
            assert g is None, name
            continue
        assert_close_to_truth(name, g, t_same, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (2, 37, 300), (37, 1025)],
                         ids=["one-row", "3d-300", "past-tile-1025"])
@pytest.mark.parametrize("res", [None, "same", "other"])
def test_matches_fp64(device, dtype, shape, res, poison_empty):
    x = torch.randn(shape, dtype=dtype, device=device)
    w = 1 + 0.5 * torch.randn(shape[-1], device=device)                # fp32 weight
    r = None if res is None else torch.randn(shape, device=device).to(
        dtype if res == "same" else OTHER[dtype])
    _check(x, w, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_in_low_precision(device, dtype, poison_empty):
    x = torch.randn(5, 130, dtype=dtype, device=device)
    _check(x, (1 + 0.5 * torch.randn(130, device=device)).to(dtype), torch.randn_like(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_eps_dominates_near_constant_and_tiny_rows(device, dtype, poison_empty):
    D = 200
    x = torch.empty(4, D, device=device)
    x[0] = 1e-3 * torch.randn(D)                  # mean(s^2) ~ 1e-6 < eps = 1e-5
    x[1] = 2.5 + 1e-3 * torch.randn(D)            # near-constant row
    x[2] = 1e-4 * torch.randn(D)                  # eps dominates entirely
    x[3] = torch.randn(D)
    _check(x.to(dtype), torch.randn(D, device=device), None)
    _check(x.to(dtype), torch.randn(D, device=device), (1e-3 * torch.randn(4, D, device=device)).to(dtype))


def test_strided_inputs(device):
    big = torch.randn(6, 40, device=device)
    x = big[:, 3:35]                               # row stride 40, unit last stride: no copy
    r = torch.randn(32, 6, device=device).t()      # last stride 6: copied
    _check(x, torch.randn(32, device=device), r)


def test_weight_grad_is_deterministic(device):
    x = torch.randn(70, 96, device=device, requires_grad=True)
    w = torch.randn(96, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        w.grad = None
        rms_norm(x, w).pow(2).sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_compile_fullgraph_fwd_bwd(device):
    x = torch.randn(3, 17, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(3, 17, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)

    def block(x, r, w):
        out, s = rms_norm(x, w, 1e-5, residual=r)
        return (out.float() * 1.5).sum() + (s * s).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, r, w), (x, r, w))
    want = torch.autograd.grad(block(x, r, w), (x, r, w))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_opcheck(device):
    x = torch.randn(9, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    r = torch.randn(9, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.aimv2.rms_norm_fwd.default, (x, w, r, 1e-5))
    torch.library.opcheck(torch.ops.aimv2.rms_norm_fwd.default, (x, w, None, 1e-6))
    dout = torch.randn(9, 40, device=device, dtype=torch.bfloat16)
    rstd = torch.rand(9, device=device) + 0.5
    torch.library.opcheck(torch.ops.aimv2.rms_norm_bwd.default,
                          (dout, torch.randn(9, 40, device=device), r.detach(), w.detach(), rstd,
                           torch.bfloat16, torch.float32))


def test_bad_inputs(device, monkeypatch):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(TypeError, match="x: expected dtype"):
        rms_norm(x.long(), w)
    with pytest.raises(ValueError, match="weight: expected shape"):
        rms_norm(x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="residual: expected shape"):
        rms_norm(x, w, residual=torch.randn(4, 9, device=device))
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, w.to("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        rms_norm(x.cpu(), w.cpu())


def test_backward_grid_from_occupancy():
    """The backward's persistent grid is SMs x the programs of the compiled kernel that fit on an
    SM at once (threads, registers, shared memory), not a fixed multiple of the SMs; 4 off the GPU."""
    from types import SimpleNamespace

    from aimv2.kernels._utils import programs_per_sm, resident_programs
    h100 = SimpleNamespace(max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536,
                           shared_memory_per_multiprocessor=233472)
    assert programs_per_sm(64, 0, 8, h100) == 4                 # registers: 65536 / (64 * 256)
    assert programs_per_sm(32, 0, 8, h100) == 8                 # threads: 2048 / 256
    assert programs_per_sm(32, 100_000, 4, h100) == 2           # shared memory: 233472 // 100000
    assert programs_per_sm(255, 0, 16, h100) == 1               # at least one
    assert resident_programs(None, (), {"num_warps": 8}, torch.device("cpu"), key=None) == 4
