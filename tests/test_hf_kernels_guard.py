"""kernels/__init__.py imported under the top-level name `kernels` (a checkout's root on sys.path) hands
over to an installed package of that name (Hugging Face's `kernels`, which transformers imports) and
stays inert when none is installed; `aimv2.kernels` is unaffected either way.

Each case runs in a fresh interpreter started in the repository root, with a fake installed `kernels`
on a temporary path *after* the root, so the root's folder is what Python finds first."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, pythonpath: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def test_hands_over_to_the_installed_package(tmp_path):
    fake = tmp_path / "site" / "kernels"
    (fake / "_internals").mkdir(parents=True)
    (fake / "__init__.py").write_text("FAKE_HF = 1\nfrom kernels._internals.layer import Mode\n")
    (fake / "_internals" / "__init__.py").write_text("")
    (fake / "_internals" / "layer.py").write_text("Mode = 'mode'\n")
    code = (
        "import sys, kernels\n"
        "from kernels._internals.layer import Mode\n"          # submodules resolve in the installed package
        f"assert kernels.FAKE_HF == 1 and Mode == 'mode', kernels.__file__\n"
        f"assert kernels.__file__.startswith({str(tmp_path)!r}), kernels.__file__\n"
        "assert sys.modules['kernels'] is kernels\n"
        "print('ok')\n")
    # the root both as '' (python -c) and by its path (PYTHONPATH), before the installed package
    r = _run(code, [str(ROOT), str(tmp_path / "site")])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_failing_installed_package_raises_its_error(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('broken fake kernels')\n")
    code = ("import sys\n"
            "try:\n    import kernels\nexcept ImportError as e:\n    print(e)\n"
            "assert 'kernels' not in sys.modules\n")
    r = _run(code, [str(ROOT), str(tmp_path / "site")])
    assert r.returncode == 0 and r.stdout.strip() == "broken fake kernels", r.stdout + r.stderr[-3000:]


def test_inert_when_none_is_installed():
    # drop every site-packages folder (the venv has Hugging Face's kernels): only the root's folder is left
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "import kernels\n"
            f"assert kernels.__file__.startswith({str(ROOT)!r}) and kernels.__version__ == 'N/A'\n"
            "assert not hasattr(kernels, 'prefix_attention') and 'torch' not in sys.modules\n"
            "print('ok')\n")
    r = _run(code, [str(ROOT)])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_transformers_hub_kernels_import_in_this_process():
    """The import that failed under `python -m pytest` from the root (the root is on sys.path here):
    "cannot import name 'CUDAProperties' from 'kernels'"."""
    import pytest
    pytest.importorskip("transformers")
    import transformers.integrations.hub_kernels  # noqa: F401
    import kernels
    assert not kernels.__file__.startswith(str(ROOT / "kernels")), kernels.__file__
