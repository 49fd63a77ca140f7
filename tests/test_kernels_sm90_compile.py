"""The fused kernels (RMSNorm, SwiGLU, patch l2 loss, fixed and packed) compile for an H100 (sm_90) with the block
choices their launchers make at AIMv2 shapes, without a GPU: Triton -> TTGIR -> PTX -> cubin with
Triton's bundled ptxas. The interpreter runs kernels as Python and never sees what only compiled
Triton rejects (constexpr-only branches, scalar/tensor type rules), so this is the CPU machine's
check of the GPU path. Each kernel must also fit in registers (no local memory, read with the
bundled cuobjdump when present).

The compile runs in a subprocess: TRITON_INTERPRET (set by conftest on a CPU machine) would turn the
@triton.jit functions into interpreter objects.
"""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

_FP32_PTRS = {"W", "RSTD", "DW_PART", "PART", "SCALE", "IMG", "DRES"}
_INT_SIZES = {"M", "D", "H", "N", "N_W", "K", "T"}          # upper-case names that are not pointers


def _signature(fn, ptr_dtypes):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.isupper() and p.name not in _INT_SIZES:
            sig[p.name] = ptr_dtypes.get(p.name, "*fp32" if p.name in _FP32_PTRS else "*bf16")
        else:
            sig[p.name] = "fp32" if p.name == "eps" else "i32"
    return sig


def _configs():
    """(module, kernel, launcher block choice (BLOCK_* , num_warps), extra constexprs, ptr dtypes)."""
    R, S, L, LP = (importlib.import_module("aimv2.kernels." + m)
                   for m in ("rms_norm", "swiglu", "patch_l2_loss", "patch_l2_loss_packed"))
    out = []
    for D in (1024, 3072):
        for res in (False, True):
            t = R._tiles(D)
            out.append((R._rms_norm_fwd_kernel, {"HAS_RES": res, "BLOCK_M": t.block_m, "BLOCK_D": t.block_n},
                        t.num_warps, {}))
            t = R._tiles(D)
            out.append((R._rms_norm_bwd_kernel, {"HAS_DS_IN": res, "HAS_DRES": res, "BLOCK_M": t.block_m,
                                                 "BLOCK_D": t.block_n}, t.num_warps, {}))
    t = S._tiles(2816)
    for k in (S._swiglu_fwd_kernel, S._swiglu_bwd_kernel):
        out.append((k, {"BLOCK_M": t.block_m, "BLOCK_H": t.block_n}, t.num_warps, {}))
    for bwd, k in ((False, L._patch_l2_loss_fwd_kernel), (True, L._patch_l2_loss_bwd_kernel)):
        t = L._tiles(588, backward=bwd)
        out.append((k, {"P": 14, "C": 3, "BLOCK_T": t.block_m, "BLOCK_K": t.block_n}, t.num_warps,
                    {"PLEN": "*i32"}))
    for bwd, k in ((False, LP._patch_l2_loss_packed_fwd_kernel), (True, LP._patch_l2_loss_packed_bwd_kernel)):
        t = L._tiles(588, backward=bwd)
        out.append((k, {"BLOCK_T": t.block_m, "BLOCK_K": t.block_n}, t.num_warps, {"COUNTED": "*i1"}))
    return out


def _resource_usage(cubin: bytes):
    """(registers, local-memory bytes) from the bundled cuobjdump, or (None, None) without it."""
    import tempfile

    import triton.backends.nvidia as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    results = []
    for fn, consts, nw, ptrs in _configs():
        consts = dict(consts)
        if any(p.name == "INTERPRET" for p in fn.params):
            consts["INTERPRET"] = False
        src = ASTSource(fn=fn, signature=_signature(fn, ptrs), constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
        regs, local = _resource_usage(k.asm["cubin"])
        results.append({"kernel": fn.__name__, "consts": consts, "num_warps": nw,
                        "cubin_bytes": len(k.asm["cubin"]), "regs": regs, "local_bytes": local})
    return results


def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(_configs())
    for r in results:
        assert r["cubin_bytes"] > 0, r
        assert not r["local_bytes"], f"{r['kernel']} {r['consts']}: register spills ({r})"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
