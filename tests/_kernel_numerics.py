"""Shared numerics checks for the kernel tests (imported by tests/test_rms_norm.py,
test_swiglu.py, test_patch_l2_loss.py; pytest puts tests/ on sys.path through its conftest).

The rule (flash-attention's): truth is the reference run in fp64 on the same (already rounded)
input values; the kernel's max error against it must be within FACTOR x the max error that the
same-dtype PyTorch reference makes, plus a floor of FLOOR_ULPS units in the last place of the
output dtype times max|truth|.

Why these numbers:
- FACTOR = 2: both compute in fp32 and round once to the output dtype (to nearest: the kernels'
  kernels/_utils.cast_rtne makes the interpreter, which truncates fp32 -> bf16, round too); the
  fp32 paths differ (1/sqrt vs rsqrt, block sums vs torch's order), so errors are equal on average
  but not element for element.
- FLOOR_ULPS = 2: covers outputs where the torch error happens to be ~0 (exactly representable
  results) and fp32 reductions summed in a different order (block partials vs torch's order):
  a couple of fp32 ulps of the largest value, far below any real bug (a wrong mask, a missing
  term, a wrong eps or an unwritten element is >= 1e-3 relative).
"""
from __future__ import annotations

import pytest
import torch

FACTOR = 2.0
FLOOR_ULPS = 2.0


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_to_truth(name: str, got: torch.Tensor, torch_same: torch.Tensor,
                          truth: torch.Tensor) -> None:
    """got: kernel output; torch_same: the reference in the same dtype; truth: fp64 reference."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert got.dtype == torch_same.dtype, f"{name}: dtype {got.dtype} != {torch_same.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or overflowed)"
    truth = truth.double()
    err = (got.double() - truth).abs().max().item() if got.numel() else 0.0
    err_ref = (torch_same.double() - truth).abs().max().item() if got.numel() else 0.0
    scale = truth.abs().max().item() if got.numel() else 0.0
    bound = FACTOR * err_ref + FLOOR_ULPS * ulp(got.dtype) * scale
    assert err <= bound, (f"{name} ({got.dtype}): kernel max err {err:.3e} > {FACTOR} x torch err "
                          f"{err_ref:.3e} + {FLOOR_ULPS} ulp x max|truth| {scale:.3e} = {bound:.3e}")


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty during the test is filled with NaN (floats) or -12345 (ints), so an
    element a kernel forgets to write shows up as non-finite / wrong."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.device.type != "meta" and t.numel():
            t.fill_(float("nan") if t.dtype.is_floating_point else -12345)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield


def assert_compiled_matches_eager(f, x: torch.Tensor) -> None:
    """f(x) -> scalar loss: torch.compile(fullgraph=True) (Dynamo's trace through the registered op and
    its fake implementation, then eager kernels) gives the eager loss and d/dx bit for bit."""
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    got, = torch.autograd.grad(loss, x)
    want_loss = f(x)
    want, = torch.autograd.grad(want_loss, x)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
