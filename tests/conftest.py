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


# ----------------------------------------------------------------------------- --gpu-only
def pytest_addoption(parser):
    parser.addoption("--gpu-only", action="store_true",
                     help="only the tests a CPU skips: those with a skipif mark whose reason names the GPU or "
                          "CUDA (bf16 and large kernel cases, host-sync checks, the CUDA training defaults); "
                          "`make gpu` runs them alone when nothing under kernels/ changed since its last run")


def _gpu_only(item) -> bool:
    """A skipif mark that names the GPU or CUDA and skips exactly when there is no CUDA device (the
    interpreter-only tests, skipped on a GPU, name the GPU too but skip the other way round)."""
    no_cuda = not torch.cuda.is_available()
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        cond = mark.args[0] if mark.args else mark.kwargs.get("condition", False)
        if ("GPU" in reason or "CUDA" in reason) and not isinstance(cond, str) and bool(cond) == no_cuda:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-only"):
        return
    keep = [it for it in items if _gpu_only(it)]
    config.hook.pytest_deselected(items=[it for it in items if not _gpu_only(it)])
    items[:] = keep
