"""Test set-up: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before aimv2.kernels
is imported, so it is set here at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def one_thread():
    """Tiny shapes: one intra-op thread avoids oversubscription on a shared 2-core CI machine
    (tests/test_model_impl_triton.py: 13 s CPU for the interpreter run either way, but 3x the wall time
    with 2 threads under load; tests/test_model_packed.py's 20-step run: 28 s with 2 threads at load ~3,
    AdamW's per-parameter sqrt alone 4 ms a call, 3.5 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
