"""aimv2.kernels.prefix_attention_varlen (images of different sizes packed in one sequence) against
each image alone through the fp64 reference: the output and dq, dk, dv, eager, compiled (fullgraph)
and through opcheck; which tiles the kernels visit; equality with the fixed-length op; bad input.

Query i of image s sees key j iff j is in image s and (j - start_s < P_s or j <= i). On the CPU the
kernels run in the Triton interpreter (fp32, fp16; the tiles of tests/test_prefix_attention.py,
32x16 / 16x32, so images of 1-577 tokens start and end anywhere inside a tile); on a GPU the same
tests run plus bf16 and large packs.

Error rule: tests/test_prefix_attention.py's (flash-attention's), per pack: truth is
prefix_attention_varlen_ref in fp64 (each image alone through prefix_attention_ref) on the same
rounded inputs; the kernel's max error must be <= FACTOR x the max error of same-dtype torch SDPA run
image by image with the dense prefix mask + FLOOR_ULPS ulp x the largest magnitude among
out/dq/dk/dv. The factors and floors are that file's, with the reasoning written there: the kernel
computes each image exactly as the fixed-length kernel computes a sample.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aimv2.kernels import (prefix_attention, prefix_attention_varlen, prefix_attention_varlen_qkvpacked,
                           prefix_attention_varlen_ref, prefix_mask)
from test_prefix_attention import ON_GPU, assert_within_error_rule, force_bwd, needs_gpu_bf16

PA = importlib.import_module("aimv2.kernels.prefix_attention")
PV = importlib.import_module("aimv2.kernels.prefix_attention_varlen")

DEV = "cuda" if ON_GPU else "cpu"


def _pack(lens, spec):
    """cu_seqlens int32 (S + 1,) and prefix_len int32 (S,) on DEV. spec: "rand" (U{0..len} per image),
    or a list with per image an int, "len" (bidirectional) or "rand"."""
    spec = [spec] * len(lens) if isinstance(spec, str) else spec
    P = [int(torch.randint(0, n + 1, ())) if p == "rand" else n if p == "len" else p for n, p in zip(lens, spec)]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return cu, torch.tensor(P, dtype=torch.int32, device=DEV)


def _inputs(T, H, D, dtype):
    return [torch.randn(T, H, D, device=DEV, dtype=torch.float64).to(dtype) for _ in range(4)]


def _run(fn, q, k, v, do):
    """Forward + backward of fn(q, k, v); returns [out, dq, dk, dv]."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _sdpa(q, k, v, plen, scale):
    """Same-dtype torch attention of one image (1, H, N, D) with the dense prefix mask."""
    N = q.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=prefix_mask(plen, 1, N, q.device), scale=scale)


def _check_against_truth(got, q, k, v, do, cu, P):
    same = _run(lambda *a: prefix_attention_varlen_ref(*a, cu, P, attention=_sdpa), q, k, v, do)
    truth = _run(lambda *a: prefix_attention_varlen_ref(*a, cu, P), q.double(), k.double(), v.double(), do.double())
    assert_within_error_rule(got, same, truth, q.dtype)


def _varlen(cu, P, max_seqlen=None):
    max_seqlen = max_seqlen or int((cu[1:] - cu[:-1]).max())
    return lambda q, k, v: prefix_attention_varlen(q, k, v, cu, max_seqlen, P)


# (image lengths, H, D, prefix spec, extra max_seqlen): one image; one token; images ending mid-tile
# with P = 0 / 1 / len / random; D = 128; a grid sized past the longest image; the 1-577 pack (D=16
# and one head keep the interpreter at ~2 k tiles).
MANY = [1, 2, 13, 64, 97, 256, 577]
CASES = [
    ([97], 1, 64, "rand", 0),
    ([1], 2, 64, [0], 0),
    ([13, 40, 7, 33], 2, 64, [0, 1, "len", "rand"], 0),
    ([17, 50, 3], 1, 128, ["len", 5, 1], 0),
    ([33, 20], 1, 64, ["rand", 0], 40),
    (MANY, 1, 16, "rand", 0),                  # ~18 s per dtype in the interpreter
]
GPU_CASES = [
    ([196, 1024, 577, 256, 400, 1000, 729, 1, 64], 8, 128, "rand", 0),
    (MANY * 3, 4, 64, "rand", 0),
    ([1024] * 6 + [196] * 9, 8, 128, "len", 0),
]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_gpu_bf16)]


def _case_id(c):
    lens = "many" if c[0] == MANY else "-".join(map(str, c[0]))
    return f"L{lens}_H{c[1]}_D{c[2]}_P{c[3]}" + (f"_max+{c[4]}" if c[4] else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_per_image_fp64_reference(case, dtype):
    lens, H, D, spec, extra = case
    cu, P = _pack(lens, spec)
    q, k, v, do = _inputs(sum(lens), H, D, dtype)
    got = _run(_varlen(cu, P, max(lens) + extra), q, k, v, do)
    _check_against_truth(got, q, k, v, do, cu, P)


# (mode, dtype): the backward forms at every dtype; the "tma" forward, whose loads differ from the fixed
# op's only in the descriptor's base and row count (the image's), at fp16 (the fixed op's test has both)
VARIANT_MODES = [(m, d) for m in ("fused", "atomic") for d in (torch.float32, torch.float16)] + \
    [pytest.param(m, torch.bfloat16, marks=needs_gpu_bf16) for m in ("fused", "atomic", "tma")] + \
    [("tma", torch.float16)]


@pytest.mark.parametrize("mode,dtype", VARIANT_MODES, ids=str)
@pytest.mark.parametrize("case", CASES[2:5], ids=_case_id)
def test_backward_variants_match_per_image_fp64_reference(case, dtype, mode, monkeypatch):
    """The packed op's "fused" and "atomic" backward and its "tma" forward (descriptors of each
    image's own rows; kernels/prefix_attention.py _AttentionTiles) under the same rule: images of
    3-50 tokens, prefixes 0 / 1 / len / random, a grid past the longest image."""
    force_bwd(monkeypatch, mode)
    lens, H, D, spec, extra = case
    cu, P = _pack(lens, spec)
    q, k, v, do = _inputs(sum(lens), H, D, dtype)
    got = _run(_varlen(cu, P, max(lens) + extra), q, k, v, do)
    _check_against_truth(got, q, k, v, do, cu, P)


@pytest.mark.skipif(not ON_GPU, reason="large packs need a GPU (the interpreter costs ~1 s per 100 tiles)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_matches_per_image_fp64_reference_large(case, dtype):
    lens, H, D, spec, _ = case
    cu, P = _pack(lens, spec)
    q, k, v, do = _inputs(sum(lens), H, D, dtype)
    _check_against_truth(_run(_varlen(cu, P), q, k, v, do), q, k, v, do, cu, P)


def test_equals_fixed_length_op_on_equal_length_images():
    """S images of N tokens packed = a batch of S samples: the same tiles, the same arithmetic."""
    S, H, N, D = 3, 2, 45, 64
    cu = torch.arange(0, S * N + 1, N, dtype=torch.int32, device=DEV)
    P = torch.tensor([0, 45, 17], dtype=torch.int32, device=DEV)
    q, k, v, do = _inputs(S * N, H, D, torch.float16)

    def fixed(q, k, v):                                 # (S*N, H, D) -> (S, H, N, D) views and back
        out = prefix_attention(*(t.view(S, N, H, D).transpose(1, 2) for t in (q, k, v)), P)
        return out.transpose(1, 2).reshape(S * N, H, D)

    exact = {} if ON_GPU else {"rtol": 0, "atol": 0}       # the interpreter runs the same operations
    for name, a, b in zip(["out", "dq", "dk", "dv"], _run(_varlen(cu, P), q, k, v, do), _run(fixed, q, k, v, do)):
        torch.testing.assert_close(a, b, **exact, msg=name)


def test_fused_qkv_views_are_not_copied(monkeypatch):
    """q, k, v as strided views of one packed (T, 3 H D) projection reach the kernel as they are."""
    lens, H, D = [9, 30], 3, 32
    cu, P = _pack(lens, [4, 30])
    T = sum(lens)
    qkv = torch.randn(T, 3 * H * D, device=DEV, requires_grad=True)
    q, k, v = qkv.view(T, 3, H, D).unbind(1)                                 # 3 x (T, H, D)
    seen = []
    real = PV._varlen_fwd_launch
    monkeypatch.setattr(PV, "_varlen_fwd_launch", lambda *a, **kw: (seen.append(a[:3]), real(*a, **kw))[1])
    out = prefix_attention_varlen(q, k, v, cu, 30, P)
    assert [(t.data_ptr(), t.stride()) for t in seen[0]] == [(t.data_ptr(), t.stride()) for t in (q, k, v)]
    do = torch.randn_like(out)
    out.backward(do)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = prefix_attention_varlen_ref(*qkv64.view(T, 3, H, D).unbind(1), cu, P)
    ref.backward(do.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-6)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, rtol=0, atol=2e-5)
    assert out.is_contiguous()                            # (T, H, D): reshape(T, H * D) is free


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_q_k_v_each_with_its_own_layout(dtype):
    """Packed q, k, v (T, H, D) each their own layout: q contiguous, k the transpose of an (H, T, D)
    buffer, v the last D columns of a (T, H, D + 24) buffer; output and every gradient against fp64."""
    lens = [13, 30, 5]
    cu, P = _pack(lens, [3, 0, "len"])
    T, H, D = sum(lens), 2, 32
    q = torch.randn(T, H, D, device=DEV, dtype=torch.float64).to(dtype)
    k = torch.randn(H, T, D, device=DEV, dtype=torch.float64).to(dtype).transpose(0, 1)
    v = torch.randn(T, H, D + 24, device=DEV, dtype=torch.float64).to(dtype)[..., 24:]
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    do = torch.randn(T, H, D, device=DEV, dtype=torch.float64).to(dtype)
    got = _run(_varlen(cu, P), q, k, v, do)
    _check_against_truth(got, q, k, v, do, cu, P)


def test_poisoned_outputs_are_fully_written_and_lse():
    """Launchers write into NaN-filled buffers; lse (H, T) is each image's log2-sum-exp."""
    lens, H, D, scale = [20, 1, 37], 2, 64, 0.125
    cu, P = _pack(lens, [3, 1, 0])
    T = sum(lens)
    q, k, v, do = _inputs(T, H, D, torch.float32)
    nan = lambda *s: torch.full(s, float("nan"), device=DEV)                # noqa: E731
    out, lse = PV._varlen_fwd_launch(q, k, v, cu, P, 37, scale, out=nan(T, H, D), lse=nan(H, T))
    grads = PV._varlen_bwd_launch(do, q, k, v, out, lse, cu, P, 37, scale,
                                  dq=nan(T, H, D), dk=nan(T, H, D), dv=nan(T, H, D))
    truth = _run(lambda *a: prefix_attention_varlen_ref(*a, cu, P, scale), q.double(), k.double(), v.double(),
                 do.double())
    for name, g, t in zip(["out", "dq", "dk", "dv"], [out, *grads], truth):
        assert torch.isfinite(g).all(), f"{name}: unwritten elements"
        torch.testing.assert_close(g.double(), t, rtol=0, atol=2e-5, msg=name)
    mask = _doc_mask(lens, P.tolist())                                     # (T, T)
    s = (torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)).double(),
                               rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- tile visits
def _doc_mask(lens, P):
    """(T, T) bool: query i (row) sees key j (column) iff same image and (j - start < P or j <= i)."""
    img = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))          # (T,)
    start = torch.tensor([0, *lens]).cumsum(0)[img]                                     # (T,)
    pos = torch.arange(len(img))
    same = img[:, None] == img[None, :]
    return same & ((pos[None, :] - start[None, :] < torch.tensor(P)[img][None, :]) | (pos[None, :] <= pos[:, None]))


def _record(monkeypatch, name, ptr_arg, tile_arg, base, row_stride, elem):
    """Wrap a shared tile-loop helper (interpreter only) to log (absolute outer tile start, absolute
    inner tile starts, MASKED): positions in the loops are local to the image, and the image's first
    row is read off the pointer the loop loads from (at row start_s of its head)."""
    real, calls = getattr(PA, name), []

    def scalar(x):
        return int(x.handle.data.reshape(-1)[0]) if hasattr(x, "handle") else int(x)

    def wrapper(*a, **kw):          # kw: USE_TMA of the forward loop
        start = (scalar(a[ptr_arg]) - base) // elem // row_stride
        lo, hi, step, masked = scalar(a[-6]), scalar(a[-5]), int(a[-3]), bool(a[-2])
        outer = start + int(a[tile_arg].handle.data[0])
        calls.append((outer, [start + s for s in range(lo, hi, step)], masked))
        return real(*a, **kw)

    monkeypatch.setattr(PA, name, wrapper)
    return calls


@pytest.mark.skipif(ON_GPU, reason="loop bounds are observable only in the Triton interpreter; "
                                   "on a GPU the numerics tests cover the same code")
@pytest.mark.parametrize("lens,P", [([5, 40, 17, 33], [2, 40, 0, 21]), ([1, 64, 30], [1, 7, 30])],
                         ids=["mixed", "aligned"])
def test_tiles_stay_inside_images_and_match_the_analytic_count(monkeypatch, lens, P):
    """Every (outer tile, inner tile) pair visited lies in one image, has a visible (i, j) and is
    masked exactly when not wholly visible (prefix edge, diagonal, image end); the number visited
    equals the analytic count: forward / dq, the aligned (query tile, key tile) pairs of each image
    with a visible pair; dk/dv, per key tile the BLOCK_M tiles covering the queries that see it."""
    H, D = 1, 16
    T = sum(lens)
    cu, plen = _pack(lens, P)
    q, k, v, do = _inputs(T, H, D, torch.float32)
    row, elem = H * D, 4
    fwd = _record(monkeypatch, "_fwd_key_tiles", 4, 8, k.data_ptr(), row, elem)
    dq = _record(monkeypatch, "_dq_key_tiles", 5, 9, k.data_ptr(), row, elem)
    dkdv = _record(monkeypatch, "_dkdv_query_tiles", 4, 14, q.data_ptr(), row, elem)
    out, lse = PV._varlen_fwd_launch(q, k, v, cu, plen, max(lens) + 7, 0.25)
    PV._varlen_bwd_launch(do, q, k, v, out, lse, cu, plen, max(lens) + 7, 0.25)
    mask = _doc_mask(lens, P)                                              # (T, T): [query, key]
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    cfg = PA._tiles(D, torch.float32, q.device)

    def check(calls, outer, inner, by_query):
        m = mask if by_query else mask.T                                   # [outer index, inner index]
        visits = {}
        for o0, starts, masked in calls:
            visits.setdefault(o0, []).extend((s, masked) for s in starts)
        expected = 0
        for a, b in bounds:
            for o0 in range(a, b, outer):
                rows = m[o0:min(o0 + outer, b)]               # the outer tile's rows past the image: unused
                need = rows.any(0)
                if by_query:      # aligned key tiles of the image with a visible pair
                    expected += sum(bool(need[s:s + inner].any()) for s in range(a, b, inner))
                else:             # query tiles covering the (contiguous) queries that see the key tile
                    expected += -(-int(need.sum()) // inner)
                got = sorted(visits.pop(o0, []))
                seen = torch.zeros(T, dtype=torch.bool)
                for s, masked in got:
                    assert a <= s < b, f"image [{a}, {b}) tile {o0}: inner tile {s} starts outside the image"
                    block = rows[:, s:s + inner]
                    assert block.any(), f"tile {o0}: inner tile {s} has no visible pair but was loaded"
                    whole = bool(block.all()) and s + inner <= T
                    assert masked == (not whole), f"tile {o0}: inner tile {s} masked={masked}, whole={whole}"
                    assert not seen[s:s + inner].any(), f"tile {o0}: inner tile {s} overlaps another"
                    seen[s:s + inner] = True
                assert seen[need].all(), f"tile {o0}: visited only {[s for s, _ in got]}"
        assert not visits, f"tiles outside every image visited: {sorted(visits)}"
        assert sum(len(starts) for _, starts, _ in calls) == expected

    check(fwd, cfg.fwd.block_m, cfg.fwd.block_n, by_query=True)
    check(dq, cfg.dq.block_m, cfg.dq.block_n, by_query=True)
    check(dkdv, cfg.dkdv.block_n, cfg.dkdv.block_m, by_query=False)


# ----------------------------------------------------------------------------- torch.library
def test_torch_compile_fullgraph_forward_backward():
    lens, H, D = [7, 20, 13], 1, 32
    cu, P = _pack(lens, [3, 0, 13])
    q, k, v, do = _inputs(sum(lens), H, D, torch.float32)
    f = torch.compile(lambda q, k, v: prefix_attention_varlen(q, k, v, cu, 20, P) * 2.0, fullgraph=True)
    got = _run(f, q, k, v, do)
    eager = _run(lambda q, k, v: prefix_attention_varlen(q, k, v, cu, 20, P) * 2.0, q, k, v, do)
    for name, g, e in zip(["out", "dq", "dk", "dv"], got, eager):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)
    truth = _run(lambda *a: prefix_attention_varlen_ref(*a, cu, P) * 2.0, q.double(), k.double(), v.double(),
                 do.double())
    for name, g, t in zip(["out", "dq", "dk", "dv"], got, truth):
        torch.testing.assert_close(g.double(), t, rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkvpacked_matches_per_image_fp64_reference_and_writes_one_d_qkv(dtype):
    """prefix_attention_varlen_qkvpacked on one (T, 3, H, D) tensor (a view into a wider projection
    output): output and dq, dk, dv (d_qkv's slots) within the error rule, d_qkv one contiguous tensor,
    the forward bit-equal to the op on the unbound views; compiled and registered op equal eager; opcheck."""
    lens, H, D = [7, 33, 13], 2, 32
    cu, P = _pack(lens, [3, "len", 0])
    T = sum(lens)
    wide = torch.randn(T, 3 * H * D + 8, device=DEV, dtype=torch.float64).to(dtype)
    qkv = wide[:, 8:].view(T, 3, H, D)                             # row stride 3HD + 8
    do = torch.randn(T, H, D, device=DEV, dtype=torch.float64).to(dtype)

    def run(fn):
        x = qkv.detach().requires_grad_()
        out = fn(x)
        out.backward(do.to(out.dtype))
        return [out.detach(), *x.grad.unbind(1), x.grad]

    got = run(lambda x: prefix_attention_varlen_qkvpacked(x, cu, 33, P))
    _check_against_truth(got[:4], *qkv.unbind(1), do, cu, P)
    assert got[4].shape == qkv.shape and got[4].is_contiguous()
    torch.testing.assert_close(got[0], _run(_varlen(cu, P), *qkv.unbind(1), do)[0], rtol=0, atol=0)
    if dtype != torch.float32:
        return
    f = torch.compile(lambda x: prefix_attention_varlen_qkvpacked(x, cu, 33, P) * 1.0, fullgraph=True)
    for other in (run(f), run(lambda x: PV._varlen_qkv_fwd_op(x, cu, P, 33, D ** -0.5)[0])):
        for name, g, e in zip(["out", "dq", "dk", "dv", "dqkv"], other, got):
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)
    x = qkv.detach().contiguous()
    torch.library.opcheck(PV._varlen_qkv_fwd_op, (x.clone().requires_grad_(), cu, P, 33, 0.2))
    out, lse = PV._varlen_qkv_fwd_op(x, cu, P, 33, 0.2)
    torch.library.opcheck(PV._varlen_qkv_bwd_op, (do, x, out, lse, cu, P, 33, 0.2))
    with pytest.raises(ValueError, match=r"qkv: expected a 4-D tensor \(T, 3, H, D\)"):
        prefix_attention_varlen_qkvpacked(x[:, :2], cu, 33, P)


def test_opcheck():
    lens, H, D = [5, 15], 2, 32
    cu, P = _pack(lens, [2, 15])
    q, k, v, do = _inputs(sum(lens), H, D, torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, P, 15, 0.2)
    torch.library.opcheck(PV._varlen_fwd_op, args)
    out, lse = PV._varlen_fwd_op(*(a.detach() if torch.is_tensor(a) else a for a in args))
    torch.library.opcheck(PV._varlen_bwd_op, (do, q.detach(), k.detach(), v.detach(), out, lse, cu, P, 15, 0.2))


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter never sees what only compiled Triton rejects (here the early `return` of a
    program whose tile lies past its image): the varlen kernels (the forward with pointer and with TMA
    loads: cp.async.bulk.tensor in its PTX), and the backward forms "atomic" and "fused" of both ops,
    compile for sm_90a at bf16 as the launchers specialise them (benchmarks/ptxas_attention.py), with
    wgmma and no spills."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ptxas_attention.py"
    kernels = ("varlen_fwd,varlen_fwd_tma,varlen_dkdv,varlen_dkdv_atomic,varlen_dq,varlen_bwd_fused,"
               "dkdv_atomic,bwd_fused")
    proc = subprocess.run([sys.executable, str(script), "--kernels", kernels,
                           "--dtypes", "bf16", "--head-dims", "64,128"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 16, proc.stdout
    for line in lines:
        assert "wgmma True" in line and "0 bytes spill stores" in line and "FAILED" not in line, line
        assert ("tma True" in line) == ("_tma " in line), line          # TMA copies exactly in the TMA form


# ----------------------------------------------------------------------------- dtypes, edges, errors
@pytest.mark.skipif(ON_GPU, reason="tests the interpreter's bf16 path (fp32 compute, bf16 storage)")
def test_bf16_in_interpreter_computes_in_fp32():
    lens = [10, 23]
    cu, P = _pack(lens, [4, 0])
    q, k, v, do = _inputs(sum(lens), 2, 64, torch.bfloat16)
    _check_against_truth(_run(_varlen(cu, P), q, k, v, do), q, k, v, do, cu, P)


def test_empty_pack():
    q, k, v, do = _inputs(0, 2, 64, torch.float32)
    cu = torch.zeros(1, dtype=torch.int32, device=DEV)
    out, dq, dk, dv = _run(lambda q, k, v: prefix_attention_varlen(q, k, v, cu, 0, cu[:0]), q, k, v, do)
    assert out.shape == dq.shape == (0, 2, 64)


@pytest.mark.skipif(not ON_GPU, reason="host-sync detection needs CUDA")
def test_no_host_sync():
    lens = [100, 3, 64]
    cu, P = _pack(lens, [3, 0, 64])
    q, k, v, do = _inputs(sum(lens), 2, 64, torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(_varlen(cu, P, 100), q, k, v, do)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _bad_cases():
    q, k, v, _ = _inputs(10, 2, 64, torch.float32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEV)
    P = torch.tensor([1, 6], dtype=torch.int32, device=DEV)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device=DEV)        # noqa: E731
    f = prefix_attention_varlen
    cases = [
        ("shape", lambda: f(q, k[:9], v, cu, 6, P), ValueError, "one shape"),
        ("rank", lambda: f(q[None], k[None], v[None], cu, 6, P), ValueError, r"3-D tensor \(T, H, D\)"),
        ("dtype mix", lambda: f(q, k.half(), v, cu, 6, P), TypeError, "one dtype"),
        ("int q", lambda: f(q.long(), k.long(), v.long(), cu, 6, P), TypeError, "dtype"),
        ("head dim", lambda: f(q[..., :48], k[..., :48], v[..., :48], cu, 6, P), ValueError, "head dim"),
        ("cu dtype", lambda: f(q, k, v, cu.long(), 6, P), TypeError, "cu_seqlens: expected dtype int32"),
        ("cu list", lambda: f(q, k, v, [0, 4, 10], 6, P), TypeError, "cu_seqlens: expected an int32 tensor"),
        ("cu rank", lambda: f(q, k, v, cu[None], 6, P), ValueError, r"cu_seqlens: expected shape \(S \+ 1,\)"),
        ("P dtype", lambda: f(q, k, v, cu, 6, P.long()), TypeError, "prefix_len: expected dtype int32"),
        ("P shape", lambda: f(q, k, v, cu, 6, P[:1]), ValueError, r"prefix_len: expected shape \(S,\) = \(2,\)"),
        ("max_seqlen tensor", lambda: f(q, k, v, cu, torch.tensor(6), P), TypeError,
         "max_seqlen: expected a Python int"),
        ("max_seqlen 0", lambda: f(q, k, v, cu, 0, P), ValueError, "max_seqlen: expected >= 1"),
        ("device", lambda: f(q, k, v, cu.to("meta"), 6, P), ValueError, "one device"),
        ("scale", lambda: f(q, k, v, cu, 6, P, scale=torch.tensor(0.1)), TypeError, "scale"),
    ]
    if not ON_GPU:   # values of CPU tensors are checked; on CUDA that would sync the host
        cases += [
            ("cu not increasing", lambda: f(q, k, v, i32(0, 6, 4, 10), 6, i32(0, 0, 0)), ValueError,
             r"strictly increasing, got cu_seqlens\[1\]=6 >= cu_seqlens\[2\]=4"),
            ("cu repeated", lambda: f(q, k, v, i32(0, 4, 4, 10), 6, i32(0, 0, 0)), ValueError, "strictly increasing"),
            ("cu last", lambda: f(q, k, v, i32(0, 4, 9), 6, P), ValueError, r"last value must be T=10.*got 9"),
            ("cu first", lambda: f(q, k, v, i32(1, 4, 10), 6, P), ValueError, "must start at 0, got 1"),
            ("max_seqlen short", lambda: f(q, k, v, cu, 5, P), ValueError, r"max_seqlen: 5 is less than.*\(6 tokens\)"),
            ("P high", lambda: f(q, k, v, cu, 6, i32(5, 6)), ValueError, r"prefix_len\[0\]=5 for an image of 4 tokens"),
            ("P low", lambda: f(q, k, v, cu, 6, i32(1, -1)), ValueError, r"in \[0, len_s\].*prefix_len\[1\]=-1"),
        ]
    return cases


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_errors(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()
