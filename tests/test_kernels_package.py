"""`kernels/` is the package aimv2.kernels; imported under another name it must stay inert."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_kernels_import_does_not_replace_the_ops():
    # transformers imports a top-level `kernels` when a checkout's root is on sys.path; that copy
    # must not re-register the torch.library ops (which would bypass aimv2.kernels' modules).
    code = (
        "import importlib, os, torch\n"
        "gpu = torch.cuda.is_available()\n"
        "if not gpu: os.environ['TRITON_INTERPRET'] = '1'   # a GPU runs the compiled kernel\n"
        "import aimv2.kernels as K\n"
        "PA = importlib.import_module('aimv2.kernels.prefix_attention')\n"
        "top = importlib.import_module('kernels')\n"
        "# kernels/__init__.py hands over to an installed HF `kernels`, else stays inert\n"
        "assert not hasattr(top, 'prefix_attention')\n"
        "assert top.__version__ == 'N/A' or not top.__file__.startswith(os.path.dirname(K.__file__))\n"
        "calls = []\n"
        "real = PA._fwd_launch\n"
        "PA._fwd_launch = lambda *a, **k: (calls.append(1), real(*a, **k))[1]\n"
        "q = torch.randn(1, 1, 8, 64, device='cuda' if gpu else 'cpu', dtype=torch.float16 if gpu else torch.float32)\n"
        "K.prefix_attention(q, q, q, 3)\n"
        "assert calls == [1], calls\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_unavailable_reason_names_why():
    """The one capability check of the library (the trainer, the hub and the transformers patch ask it)."""
    import torch

    import aimv2.kernels as K
    if torch.cuda.is_available():       # the compiled kernels: the CPU needs the interpreter, unset here
        assert "TRITON_INTERPRET=1" in K.unavailable_reason("cpu")
    else:
        assert K.unavailable_reason("cpu") is None                         # conftest: the interpreter
    assert "'meta'" in K.unavailable_reason("meta")
    assert K.unavailable_reason("cuda") == (None if torch.cuda.is_available() else "CUDA is not available")
    code = "import aimv2.kernels as K; print(K.unavailable_reason('cpu'))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0 and "TRITON_INTERPRET=1" in r.stdout, r.stdout + r.stderr[-3000:]
