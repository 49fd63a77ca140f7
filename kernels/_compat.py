"""`triton` and `triton.language` for the op modules, or stand-ins when triton cannot be imported.

setup.py installs triton on Linux only, and a CPU box may lack it. Without triton the op modules
must still import, so that `aimv2.kernels` serves its plain-PyTorch references (`<op>_ref`,
`prefix_mask`, `patchify`) and the model's impl="torch" path; only running a kernel must fail, with
the reason. The stand-ins allow exactly what the op modules do at import time, decorating with
`@triton.jit` (annotations such as `BLOCK: tl.constexpr` are never evaluated: every op module has
`from __future__ import annotations`); launching a decorated kernel, or touching any other attribute,
raises `TritonUnavailableError` naming the import error.
"""
from __future__ import annotations


class TritonUnavailableError(RuntimeError):
    """A Triton kernel was asked to run where triton cannot be imported."""


try:
    import triton
    import triton.language as tl
    IMPORT_ERROR: str | None = None
except Exception as e:                            # ImportError, or a broken install (driver, versions)
    IMPORT_ERROR = f"triton cannot be imported ({type(e).__name__}: {e})"

    def _fail(what: str):
        raise TritonUnavailableError(
            f"aimv2.kernels: {what} needs Triton, but {IMPORT_ERROR}; use the plain-PyTorch references "
            f"(the model's impl='torch', attn_backend='sdpa')")

    class _UnlaunchableKernel:
        """What `@triton.jit` gives without triton: keeps the function, refuses to launch it."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")
            self.__doc__ = getattr(fn, "__doc__", None)

        def __getitem__(self, grid):
            _fail(f"kernel {self.__name__}")

        def __call__(self, *args, **kwargs):
            _fail(f"kernel {self.__name__}")

    class _MissingModule:
        def __init__(self, name: str):
            self.__name__ = name

        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            _fail(f"{self.__name__}.{attr}")

    class _MissingTriton(_MissingModule):
        @staticmethod
        def jit(fn=None, **kwargs):
            return _UnlaunchableKernel(fn) if fn is not None else _UnlaunchableKernel

    triton = _MissingTriton("triton")
    tl = _MissingModule("triton.language")
