"""Compile the prefix-attention kernels for a GPU architecture without a GPU and print ptxas stats.

For each dtype and head dim, the kernels of the fixed op (fwd, its TMA-load form fwd_tma, bwd delta,
bwd dk/dv, its atomic-dq form,
bwd dq, the fused one-launch backward) and of the packed variable-length op (varlen_*) are compiled with
the tiles `_tiles` would pick on that architecture, then assembled with Triton's bundled
ptxas (-v): shared memory, registers per thread, spill bytes, and whether wgmma (Hopper tensor-core
MMA) and TMA copies (cp.async.bulk.tensor) are used. This backs the NOTE in
kernels/prefix_attention.py::_tiles; it times nothing.

The kernels are specialised as a real launch at one shape specialises them: Triton's launcher marks
every pointer and every integer argument divisible by 16 with tt.divisibility=16 and turns an integer
equal to 1 into a constant. So the integer arguments (N and the strides the launchers pass: q, k, v
as views of one (B, N, 3, H, D) qkv buffer, out / dout / dq / dk / dv stored as (B, N, H, D)) are
computed at --seq-len / --heads and specialised the same way. Specialising only the pointers (as an
earlier version did) compiles a kernel the real launch never runs: without the divisibility of the
strides the loads are not vectorised and the pipelining is different (different shared memory, and
spills the real kernel does not have). The varlen kernels get q, k, v as views of one packed
(T, 3, H, D) qkv buffer (the same row and head strides) and T = 64 N + 1: a pack's token count is
any number, so T is not specialised as divisible by 16.

    python benchmarks/ptxas_attention.py                 # sm_90a (H100), bf16/fp16/fp32, D 64 and 128, N=256
    python benchmarks/ptxas_attention.py --dtypes bf16 --head-dims 128 --seq-len 334   # the decoder
    python benchmarks/ptxas_attention.py --cap 80 --head-dims 128 --dtypes bf16
    python benchmarks/ptxas_attention.py --kernels varlen_fwd,varlen_dkdv,varlen_dq --dtypes bf16

Takes ~10 s per bf16 kernel and up to a minute per fp32 kernel on a CPU.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)          # compiled kernels, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

PA = importlib.import_module("aimv2.kernels.prefix_attention")
PV = importlib.import_module("aimv2.kernels.prefix_attention_varlen")
# name -> (kernel, the _AttentionTiles field its launch uses, constexprs beyond the tile's)
KERNELS = {"fwd": (PA._prefix_attention_fwd_kernel, "fwd", {"USE_TMA": False}),
           "fwd_tma": (PA._prefix_attention_fwd_kernel, "fwd", {"USE_TMA": True}),
           "dkdv": (PA._prefix_attention_bwd_dkdv_kernel, "dkdv", {"ATOMIC_DQ": False}),
           "dkdv_atomic": (PA._prefix_attention_bwd_dkdv_kernel, "dkdv", {"ATOMIC_DQ": True}),
           "dq": (PA._prefix_attention_bwd_dq_kernel, "dq", {}),
           "bwd_fused": (PA._prefix_attention_bwd_kernel, "fused", {}),
           "delta": (PA._prefix_attention_bwd_delta_kernel, "delta", {"ZERO_DQ": False}),
           "varlen_fwd": (PV._prefix_attention_varlen_fwd_kernel, "fwd", {"USE_TMA": False}),
           "varlen_fwd_tma": (PV._prefix_attention_varlen_fwd_kernel, "fwd", {"USE_TMA": True}),
           "varlen_dkdv": (PV._prefix_attention_varlen_bwd_dkdv_kernel, "dkdv", {"ATOMIC_DQ": False}),
           "varlen_dkdv_atomic": (PV._prefix_attention_varlen_bwd_dkdv_kernel, "dkdv", {"ATOMIC_DQ": True}),
           "varlen_dq": (PV._prefix_attention_varlen_bwd_dq_kernel, "dq", {}),
           "varlen_bwd_fused": (PV._prefix_attention_varlen_bwd_kernel, "fused", {})}
_TY = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FLOATS = ("qk_scale", "sm_scale")


def launch_ints(name: str, N: int, H: int, D: int) -> int:
    """The value a launcher passes for integer argument `name` at (N, H, D) (see the docstring)."""
    if name == "N":
        return N
    if name == "T":
        return 64 * N + 1
    if name in ("N_KEY_TILES", "N_QUERY_TILES"):       # cdiv(N, a 32- to 128-row tile): any count
        return 3
    qkv = {"b": N * 3 * H * D, "h": D, "n": 3 * H * D}                 # views of (B, N, 3, H, D)
    bnhd = {"b": N * H * D, "h": D, "n": H * D}                       # out, dout, dq, dk, dv
    # (the fp32 dq accumulator, stride_a*, is (B, H, N, D) / (T, H, D): other values, the same
    # divisibility by 16, which is all the compiler is told)
    m = re.fullmatch(r"stride_([a-z]+)([bhn])", name)
    if m is None:
        raise ValueError(f"ptxas_attention: no launch value known for integer argument {name!r}")
    return (qkv if m.group(1) in ("q", "k", "v") else bnhd)[m.group(2)]


def compile_stats(fn, elem: str, consts: dict, num_warps: int, num_stages: int, cap: int,
                  N: int, H: int) -> str:
    sig, attrs, consts = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.isupper() and name not in ("N", "T", "N_KEY_TILES", "N_QUERY_TILES"):   # pointers, 16-byte aligned
            plen = "i32" if "CU_SEQLENS" in fn.arg_names else "i64"     # as the public ops pass them
            sig[name] = "*" + {"LSE": "fp32", "DELTA": "fp32", "DQ_ACC": "fp32", "PLEN": plen,
                               "CU_SEQLENS": "i32"}.get(name, elem)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:                                                  # as the launcher specialises ints
            value = launch_ints(name, N, H, consts["HEAD_DIM"])
            if value == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(k.asm["ptx"])
        arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
        res = subprocess.run([ptxas, f"--gpu-name={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    info = [ln.split(":", 1)[-1].strip() for ln in res.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return (f"smem {k.metadata.shared:6d} B  wgmma {'wgmma' in k.asm['ptx']!s:5}  "
            f"tma {'cp.async.bulk.tensor' in k.asm['ptx']!s:5}  "
            + "; ".join(info) + ("" if res.returncode == 0 else f"  PTXAS FAILED: {res.stderr[-300:]}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", type=int, default=90, help="compute capability x 10 (90 = H100)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seq-len", type=int, default=256, help="N of the launch (256: AIMv2-L encoder)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    args = ap.parse_args(argv)
    PA.is_interpreting = lambda: False                         # the GPU tables, on this CPU
    PA._capability = lambda device: (args.cap // 10, args.cap % 10)
    dev = torch.device("cuda", 0)
    for name in args.dtypes.split(","):
        dtype = _TY[name]
        for D in map(int, args.head_dims.split(",")):
            cfg = PA._tiles(D, dtype, dev)
            prec = PA._dot_precision(dtype)
            for kern in args.kernels.split(","):
                fn, field, extra = KERNELS[kern]
                t = cfg.dkdv if field == "fused" else getattr(cfg, field)   # one launch: dk/dv's warps
                if field == "fused":
                    consts = {"HEAD_DIM": D, "KV_BLOCK_M": t.block_m, "KV_BLOCK_N": t.block_n,
                              "Q_BLOCK_M": cfg.dq.block_m, "Q_BLOCK_N": cfg.dq.block_n, "DOT_PRECISION": prec}
                else:
                    consts = {"HEAD_DIM": D, "BLOCK_M": t.block_m, **extra}
                    if field != "delta":
                        consts.update(BLOCK_N=t.block_n, DOT_PRECISION=prec)
                stats = compile_stats(fn, name, consts, t.num_warps, t.num_stages, args.cap,
                                      args.seq_len, args.heads)
                tiles = f"{t.block_m:3d}x{t.block_n:<3d} w{t.num_warps} s{t.num_stages}"
                print(f"{name} D={D:<4d}{kern:14s} {tiles}  {stats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
