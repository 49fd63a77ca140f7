"""aimv2.kernels.prefix_attention against fp64 attention with the dense prefix mask: the output and
dq, dk, dv, eager, compiled (fullgraph) and through opcheck; tile skipping; bad input.

Query i of sample b sees key j iff j < P_b or j <= i. On the CPU the kernels run in the Triton
interpreter (fp32, fp16; small shapes, 32x16 / 16x32 tiles so every loop runs on N ~ 17-97); on a
GPU the same tests run plus bf16 and larger shapes.

Error rule (flash-attention's): truth is prefix_attention_ref in fp64 on the same rounded inputs;
the kernel's max error against it must be <= FACTOR x the max error of same-dtype torch SDPA
(F.scaled_dot_product_attention with the dense boolean mask) + FLOOR_ULPS ulp x the largest
magnitude among out/dq/dk/dv.
- FACTOR 2 for the output: both accumulate in fp32 and round once to the output dtype.
- FACTOR 3 for the gradients: the flash backward recomputes P from the saved log-sum-exp (one more
  exp rounding) and forms dS = P (dP - delta) with delta = rowsum(dO * O) from the rounded O.
- FLOOR: that dP - delta is a difference of O(|dO| |V|) terms, so a true dq = dk = 0 (N = 1, one
  visible key) comes out as ulp-level noise while SDPA's error there is exactly 0. fp32 gets 8 ulp
  (its noise is that cancellation: ~7 ulp measured at D=64), fp16/bf16 1 ulp (their error is the
  final rounding, which SDPA shares). All floors are >= 10x below what a wrong mask, a skipped
  tile or an unwritten row produce (>= 1e-1).
Measured on the CPU (fp32/fp16): kernel/SDPA error ratios 0.4 - 1.2.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from aimv2.kernels import prefix_attention, prefix_attention_qkvpacked, prefix_attention_ref, prefix_mask

PA = importlib.import_module("aimv2.kernels.prefix_attention")   # the module (the package attr is the op)

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
FACTOR_OUT, FACTOR_GRAD = 2.0, 3.0
FLOOR_ULPS = {torch.float32: 8.0, torch.float16: 1.0, torch.bfloat16: 1.0}
needs_gpu_bf16 = pytest.mark.skipif(
    not ON_GPU, reason="bf16 tl.dot is broken in the Triton interpreter (TRITON_ON_CPU.md); bf16 runs on GPU")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_gpu_bf16)]


def _prefix(spec, B, N):
    """spec: an int (passed as a Python int), a list (int tensor), or "rand" (U{0..N} per sample)."""
    if spec == "rand":
        return torch.randint(0, N + 1, (B,), device=DEV)
    if isinstance(spec, list):
        return torch.tensor(spec, device=DEV)
    return spec


def _inputs(B, H, N, D, dtype):
    q, k, v, do = (torch.randn(B, H, N, D, device=DEV, dtype=torch.float64).to(dtype) for _ in range(4))
    return q, k, v, do


def _run(fn, q, k, v, do, plen):
    """Forward + backward of fn; returns [out, dq, dk, dv]."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, plen)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _sdpa(q, k, v, plen):
    B, H, N, D = q.shape
    return F.scaled_dot_product_attention(q, k, v, attn_mask=prefix_mask(plen, B, N, q.device))


def _check_against_truth(got, q, k, v, do, plen):
    same = _run(_sdpa, q, k, v, do, plen)
    truth = _run(prefix_attention_ref, q.double(), k.double(), v.double(), do.double(), plen)
    assert_within_error_rule(got, same, truth, q.dtype)


def assert_within_error_rule(got, same, truth, dtype):
    """got, same (same-dtype SDPA), truth (fp64): [out, dq, dk, dv] each; the rule of the docstring."""
    mag = max(t.abs().max().item() for t in truth)
    floor = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * mag
    for name, g, s, t in zip(["out", "dq", "dk", "dv"], got, same, truth):
        assert g.shape == t.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten or overflowed)"
        err = (g.double() - t).abs().max().item()
        err_sdpa = (s.double() - t).abs().max().item()
        bound = (FACTOR_OUT if name == "out" else FACTOR_GRAD) * err_sdpa + floor
        assert err <= bound, (f"{name} ({dtype}): max err {err:.3e} > bound {bound:.3e} "
                              f"(SDPA err {err_sdpa:.3e}, floor {floor:.3e})")


# (B, H, N, D, prefix spec): N = 1; N not a multiple of the tiles (17, 33, 97); prefixes 0, 1,
# N-1, N, random and mixed per sample, ending inside a tile (23, 41); heads 1 and 3; D 16-128.
CASES = [
    (1, 1, 1, 64, 0),
    (1, 1, 1, 64, [1]),
    (2, 1, 17, 64, [0, 17]),
    (2, 1, 97, 64, [1, 96]),
    (3, 1, 97, 64, "rand"),
    (1, 3, 40, 64, 23),
    (2, 1, 33, 128, [5, 32]),
    (1, 2, 41, 32, [41]),
    (1, 2, 24, 16, [9]),
]
GPU_CASES = [(2, 8, 1000, 128, "rand"), (2, 4, 334, 128, 0), (1, 3, 577, 64, [300]), (2, 2, 256, 128, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_fp64_reference(case, dtype):
    B, H, N, D, spec = case
    q, k, v, do = _inputs(B, H, N, D, dtype)
    plen = _prefix(spec, B, N)
    got = _run(prefix_attention, q, k, v, do, plen)
    _check_against_truth(got, q, k, v, do, plen)


@pytest.mark.skipif(not ON_GPU, reason="large shapes need a GPU (the interpreter costs ~1 s per 100 tiles)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_fp64_reference_large(case, dtype):
    B, H, N, D, spec = case
    q, k, v, do = _inputs(B, H, N, D, dtype)
    plen = _prefix(spec, B, N)
    _check_against_truth(_run(prefix_attention, q, k, v, do, plen), q, k, v, do, plen)


def test_single_visible_key_rows():
    """Row 0 sees only key 0 when P <= 1: its output is v[0] exactly and its dq is ~0."""
    B, H, N, D = 2, 1, 20, 64
    q, k, v, do = _inputs(B, H, N, D, torch.float32)
    out, dq, _, _ = _run(prefix_attention, q, k, v, do, torch.tensor([0, 1], device=DEV))
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=0, atol=1e-6)
    assert dq[:, :, 0].abs().max() < 1e-5
    assert (out[:, :, 1] - v[:, :, 0]).abs().max() > 1e-2       # row 1 sees two keys


def test_fused_qkv_views_are_not_copied(monkeypatch):
    """q, k, v as strided views of one (B, N, 3 H D) projection reach the kernels as they are."""
    B, H, N, D = 2, 3, 33, 64
    qkv = torch.randn(B, N, 3 * H * D, device=DEV, requires_grad=True)
    q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)       # 3 x (B, H, N, D)
    seen = []
    real_fwd = PA._fwd_launch
    monkeypatch.setattr(PA, "_fwd_launch", lambda *a, **kw: (seen.append(a[:3]), real_fwd(*a, **kw))[1])
    plen = torch.tensor([3, 30], device=DEV)
    out = prefix_attention(q, k, v, plen)
    assert [(t.data_ptr(), t.stride()) for t in seen[0]] == [(t.data_ptr(), t.stride()) for t in (q, k, v)]
    do = torch.randn_like(out)
    out.backward(do)
    qkv64 = qkv.detach().double().requires_grad_()
    q2, k2, v2 = qkv64.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    ref = prefix_attention_ref(q2, k2, v2, plen)
    ref.backward(do.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-6)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, rtol=0, atol=2e-5)
    # the output is stored (B, N, H, D) so the model's transpose(1, 2).reshape(B, N, H*D) is free
    assert out.transpose(1, 2).is_contiguous()


def _own_layouts(B, H, N, D, dtype, wide: int = 24):
    """q, k, v of shape (B, H, N, D), each its own layout: q contiguous, k the transpose of a
    (B, N, H, D) buffer, v the last D columns of a (B, H, N, D + wide) buffer (row stride D + wide)."""
    q = torch.randn(B, H, N, D, device=DEV, dtype=torch.float64).to(dtype)
    k = torch.randn(B, N, H, D, device=DEV, dtype=torch.float64).to(dtype).transpose(1, 2)
    v = torch.randn(B, H, N, D + wide, device=DEV, dtype=torch.float64).to(dtype)[..., wide:]
    assert len({q.stride(), k.stride(), v.stride()}) == 3 and all(t.stride(-1) == 1 for t in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_q_k_v_each_with_its_own_layout(dtype):
    """A kernel or launcher that used one tensor's strides for another (or copied one and not the
    others wrongly) is caught: output and every gradient against fp64."""
    B, H, N, D = 2, 3, 41, 32
    q, k, v = _own_layouts(B, H, N, D, dtype)
    do = torch.randn(B, H, N, D, device=DEV, dtype=torch.float64).to(dtype)
    plen = torch.tensor([7, 30], device=DEV)
    _check_against_truth(_run(prefix_attention, q, k, v, do, plen), q, k, v, do, plen)


def test_poisoned_outputs_are_fully_written():
    """Launchers write into NaN-filled buffers (here plain contiguous (B, H, N, D) ones)."""
    B, H, N, D = 2, 1, 97, 64
    q, k, v, do = _inputs(B, H, N, D, torch.float32)
    plen = torch.tensor([41, 7], device=DEV)
    nan = lambda *s: torch.full(s, float("nan"), device=DEV)                # noqa: E731
    out, lse = PA._fwd_launch(q, k, v, plen, 0.125, out=nan(B, H, N, D), lse=nan(B, H, N))
    grads = PA._bwd_launch(do, q, k, v, out, lse, plen, 0.125,
                           dq=nan(B, H, N, D), dk=nan(B, H, N, D), dv=nan(B, H, N, D))
    truth = _run(lambda *a: prefix_attention_ref(*a, scale=0.125), q.double(), k.double(), v.double(),
                 do.double(), plen)
    for name, g, t in zip(["out", "dq", "dk", "dv"], [out, *grads], truth):
        assert torch.isfinite(g).all(), f"{name}: unwritten elements"
        torch.testing.assert_close(g.double(), t, rtol=0, atol=2e-5, msg=name)
    s = (torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * 0.125).masked_fill(
        ~prefix_mask(plen, B, N, q.device), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / math.log(2), rtol=0, atol=1e-5)


def _run_qkv(fn, qkv, do, plen):
    """Forward + backward of fn(qkv (B, N, 3, H, D), plen); returns [out, dq, dk, dv, d_qkv]."""
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv, plen)
    out.backward(do.to(out.dtype))
    return [out.detach(), *qkv.grad.permute(2, 0, 3, 1, 4).unbind(0), qkv.grad]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [[7, 30], 0], ids=["mixed", "causal"])
def test_qkvpacked_matches_fp64_reference_and_writes_one_d_qkv(dtype, spec):
    """prefix_attention_qkvpacked on one (B, N, 3, H, D) tensor (here a view into a wider projection
    output): the output and dq, dk, dv (the three slots of d_qkv) within the error rule of the unbound
    op; d_qkv comes back as one contiguous tensor (no stack + copy in autograd), and the forward is
    bit-equal to prefix_attention on the q, k, v views."""
    B, H, N, D = 2, 3, 41, 32
    wide = torch.randn(B, N, 3 * H * D + 8, device=DEV, dtype=torch.float64).to(dtype)
    qkv = wide[..., 8:].view(B, N, 3, H, D)                         # row stride 3HD + 8: a strided view
    do = torch.randn(B, H, N, D, device=DEV, dtype=torch.float64).to(dtype)
    plen = _prefix(spec, B, N)
    got = _run_qkv(prefix_attention_qkvpacked, qkv, do, plen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    _check_against_truth(got[:4], q, k, v, do, plen)
    assert got[4].shape == qkv.shape and got[4].is_contiguous()
    views = _run(prefix_attention, q, k, v, do, plen)
    torch.testing.assert_close(got[0], views[0], rtol=0, atol=0)


def test_qkvpacked_compile_opcheck_eager_twin_and_errors():
    B, H, N, D = 2, 2, 20, 32
    qkv = torch.randn(B, N, 3, H, D, device=DEV)
    do = torch.randn(B, H, N, D, device=DEV)
    plen = torch.tensor([3, 17], device=DEV, dtype=torch.int32)
    eager = _run_qkv(prefix_attention_qkvpacked, qkv, do, plen)
    f = torch.compile(lambda qkv, p: prefix_attention_qkvpacked(qkv, p) * 1.0, fullgraph=True)
    registered = _run_qkv(lambda x, p: PA._prefix_attention_qkv_fwd_op(x, p, D ** -0.5)[0], qkv, do, plen)
    for got in (_run_qkv(f, qkv, do, plen), registered):
        for name, g, e in zip(["out", "dq", "dk", "dv", "dqkv"], got, eager):
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)
    torch.library.opcheck(PA._prefix_attention_qkv_fwd_op, (qkv.clone().requires_grad_(), plen, 0.2))
    out, lse = PA._prefix_attention_qkv_fwd_op(qkv, plen, 0.2)
    torch.library.opcheck(PA._prefix_attention_qkv_bwd_op, (do, qkv, out, lse, plen, 0.2))
    with pytest.raises(ValueError, match=r"qkv: expected a 5-D tensor \(B, N, 3, H, D\)"):
        prefix_attention_qkvpacked(qkv[:, :, :2], plen)
    with pytest.raises(ValueError, match="head dim D=24 not supported"):
        prefix_attention_qkvpacked(torch.randn(B, N, 3, H, 24, device=DEV), plen)


# ----------------------------------------------------------------------------- tile skipping
def _record_loops(monkeypatch, name, tile_arg):
    """Wrap an inner @triton.jit loop helper (interpreter only) to log (tile start, P, lo, hi, MASKED)."""
    real, calls = getattr(PA, name), []

    def scalar(x):
        return int(x.handle.data.reshape(-1)[0]) if hasattr(x, "handle") else int(x)

    def wrapper(*a, **kw):          # kw: USE_TMA of the forward loop
        offs = a[tile_arg]
        P, N, lo, hi, step, masked = a[-8], a[-7], a[-6], a[-5], a[-3], a[-2]
        calls.append((int(offs.handle.data[0]), scalar(P), scalar(lo), scalar(hi), int(step), bool(masked)))
        return real(*a, **kw)

    monkeypatch.setattr(PA, name, wrapper)
    return calls


def _tiles(calls, N):
    """{(tile start, masked): [[inner tile start, ...], ...]} from the logged loops."""
    out = {}
    for start, _, lo, hi, step, masked in calls:
        out.setdefault(start, []).extend((s, masked) for s in range(lo, hi, step))
    return out


@pytest.mark.skipif(ON_GPU, reason="loop bounds are observable only in the Triton interpreter; "
                                   "on a GPU the numerics tests cover the same code")
@pytest.mark.parametrize("N,P", [(50, 20), (97, 0), (97, 97), (97, 41), (33, 1)])
def test_tiles_skipped_and_masked_only_where_needed(monkeypatch, N, P):
    """Every (query tile, key tile) pair visited has a visible (i, j); every pair with one is visited
    once; per-element masking runs exactly on pairs not wholly visible (prefix edge, diagonal, N)."""
    D = 16
    fwd = _record_loops(monkeypatch, "_fwd_key_tiles", 8)
    dq = _record_loops(monkeypatch, "_dq_key_tiles", 9)
    dkdv = _record_loops(monkeypatch, "_dkdv_query_tiles", 14)
    q, k, v, do = _inputs(1, 1, N, D, torch.float32)
    plen = torch.tensor([P])
    out, lse = PA._fwd_launch(q, k, v, plen, 0.25)
    PA._bwd_launch(do, q, k, v, out, lse, plen, 0.25)
    mask = prefix_mask(P, 1, N)[0, 0]                                       # (N, N): [query, key]
    cfg = PA._tiles(D, torch.float32, q.device)

    def check(calls, outer, inner, by_query):
        visits = _tiles(calls, N)
        for o0 in range(0, N, outer):
            got = sorted(visits.get(o0, []))
            starts = [s for s, _ in got]
            assert all(b - a >= inner for a, b in zip(starts, starts[1:])), f"tile {o0}: overlapping {starts}"
            # the inner tiles must cover every inner index that has a visible pair
            seen = torch.zeros(N, dtype=torch.bool)
            for s, masked in got:
                block = mask[o0:o0 + outer, s:s + inner] if by_query else mask[s:s + inner, o0:o0 + outer]
                assert block.any(), f"tile {o0}: inner tile {s} has no visible pair but was loaded"
                whole = block.all() and s + inner <= N
                assert masked == (not whole), f"tile {o0}: inner tile {s} masked={masked}, whole={whole}"
                seen[s:s + inner] = True
            need = mask[o0:o0 + outer].any(0) if by_query else mask[:, o0:o0 + outer].any(1)
            assert seen[need].all(), f"tile {o0}: visited only {starts}"

    check(fwd, cfg.fwd.block_m, cfg.fwd.block_n, by_query=True)
    check(dq, cfg.dq.block_m, cfg.dq.block_n, by_query=True)
    check(dkdv, cfg.dkdv.block_n, cfg.dkdv.block_m, by_query=False)


# ----------------------------------------------------------------------------- torch.library
def test_torch_compile_fullgraph_forward_backward():
    B, H, N, D = 2, 1, 20, 32
    q, k, v, do = _inputs(B, H, N, D, torch.float32)
    for plen in (torch.tensor([3, 17], device=DEV), 5):
        f = torch.compile(lambda q, k, v: prefix_attention(q, k, v, plen) * 2.0, fullgraph=True)
        got = _run(lambda q, k, v, p: f(q, k, v), q, k, v, do, plen)
        eager = _run(lambda *a: prefix_attention(*a) * 2.0, q, k, v, do, plen)
        for name, g, e in zip(["out", "dq", "dk", "dv"], got, eager):
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)
    truth = _run(lambda *a: prefix_attention_ref(*a) * 2.0, q.double(), k.double(), v.double(), do.double(), plen)
    for name, g, t in zip(["out", "dq", "dk", "dv"], got, truth):
        torch.testing.assert_close(g.double(), t, rtol=0, atol=2e-5, msg=name)


def test_opcheck():
    B, H, N, D = 2, 2, 20, 32
    q, k, v, do = _inputs(B, H, N, D, torch.float32)
    plen = torch.tensor([3, 20], device=DEV, dtype=torch.int32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), plen, 0.2)
    torch.library.opcheck(PA._prefix_attention_fwd_op, args)
    out, lse = PA._prefix_attention_fwd_op(*(a.detach() if torch.is_tensor(a) else a for a in args))
    torch.library.opcheck(PA._prefix_attention_bwd_op, (do, q.detach(), k.detach(), v.detach(), out, lse, plen, 0.2))


def test_eager_calls_skip_the_library_dispatch_and_tracing_uses_it(monkeypatch):
    """Eager calls run the autograd.Function twin of the registered op (same impl and autograd rule,
    no torch.library dispatch: the host-cost cut), bit-identical to the op; under a dispatch mode (fake
    tensors, as torch.compile and make_fx trace) the registered op and its fake implementation run."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    B, H, N, D = 1, 1, 20, 16
    q, k, v, do = _inputs(B, H, N, D, torch.float32)
    plen = torch.tensor([5], device=DEV, dtype=torch.int32)
    registered = _run(lambda *a: PA._prefix_attention_fwd_op(*a, D ** -0.5)[0], q, k, v, do, plen)
    calls, real = [], PA._prefix_attention_fwd_op
    monkeypatch.setattr(PA, "_prefix_attention_fwd_op", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    eager = _run(prefix_attention, q, k, v, do, plen)
    assert calls == []
    for name, e, r in zip(["out", "dq", "dk", "dv"], eager, registered):
        torch.testing.assert_close(e, r, rtol=0, atol=0, msg=name)
    with FakeTensorMode() as mode:
        out = prefix_attention(*(mode.from_tensor(t) for t in (q, k, v)), mode.from_tensor(plen))
        assert prefix_attention(*(mode.from_tensor(t) for t in (q, k, v)), 5).shape == q.shape
    assert len(calls) == 2 and out.shape == q.shape
    # an int prefix: one constant (B,) tensor per (B, P, device), usable by autograd even when first
    # made under inference_mode, giving the tensor prefix's numbers
    PA._constant_prefix.cache_clear()
    with torch.inference_mode():
        torch.testing.assert_close(prefix_attention(q, k, v, 5), eager[0], rtol=0, atol=0)
    for name, e, i in zip(["out", "dq", "dk", "dv"], eager, _run(prefix_attention, q, k, v, do, 5)):
        torch.testing.assert_close(i, e, rtol=0, atol=0, msg=name)
    assert PA._constant_prefix(B, 5, q.device) is PA._constant_prefix(B, 5, q.device)


# ----------------------------------------------------------------------------- dtypes, edges, errors
@pytest.mark.skipif(ON_GPU, reason="tests the interpreter's bf16 path (fp32 compute, bf16 storage)")
def test_bf16_in_interpreter_computes_in_fp32():
    q, k, v, do = _inputs(1, 2, 33, 64, torch.bfloat16)
    plen = torch.tensor([10])
    got = _run(prefix_attention, q, k, v, do, plen)
    _check_against_truth(got, q, k, v, do, plen)


def test_empty_batch():
    q, k, v, do = _inputs(0, 2, 5, 64, torch.float32)
    out, dq, dk, dv = _run(prefix_attention, q, k, v, do, torch.zeros(0, dtype=torch.long, device=DEV))
    assert out.shape == dq.shape == (0, 2, 5, 64)


@pytest.mark.skipif(not ON_GPU, reason="host-sync detection needs CUDA")
def test_no_host_sync_with_cuda_prefix_tensor():
    q, k, v, do = _inputs(2, 2, 100, 64, torch.float16)
    plen = torch.tensor([3, 80], device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(prefix_attention, q, k, v, do, plen)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _bad_cases():
    q, k, v, _ = _inputs(2, 2, 8, 64, torch.float32)
    P = torch.tensor([1, 2], device=DEV)
    cases = [
        ("shape", lambda: prefix_attention(q, k[:, :, :7], v, P), ValueError, "one shape"),
        ("rank", lambda: prefix_attention(q[0], k[0], v[0], P), ValueError, "4-D"),
        ("dtype mix", lambda: prefix_attention(q, k.half(), v, P), TypeError, "one dtype"),
        ("int q", lambda: prefix_attention(q.long(), k.long(), v.long(), P), TypeError, "dtype"),
        ("head dim", lambda: prefix_attention(q[..., :48], k[..., :48], v[..., :48], P), ValueError, "head dim"),
        ("device", lambda: prefix_attention(q, k.to("meta"), v, P), ValueError, "one device"),
        ("P int high", lambda: prefix_attention(q, k, v, 9), ValueError, r"outside \[0, N=8\]"),
        ("P int low", lambda: prefix_attention(q, k, v, -1), ValueError, "outside"),
        ("P float", lambda: prefix_attention(q, k, v, P.float()), TypeError, "integer tensor"),
        ("P bool", lambda: prefix_attention(q, k, v, True), TypeError, "prefix_len"),
        ("P shape", lambda: prefix_attention(q, k, v, P[:1]), ValueError, r"shape \(2,\)"),
        ("P device", lambda: prefix_attention(q, k, v, P.to("meta")), ValueError, "one device"),
        ("scale", lambda: prefix_attention(q, k, v, P, scale=torch.tensor(0.1)), TypeError, "scale"),
    ]
    if not ON_GPU:   # a CPU tensor's range is checked; a CUDA one would need a host sync
        cases.append(("P tensor range", lambda: prefix_attention(q, k, v, torch.tensor([0, 9])),
                      ValueError, r"\[0, N=8\]"))
    return cases


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_errors(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


# ----------------------------------------------------------------------------- backward variants
# the configurations beside the default: a backward form, or TMA loads in the forward ("tma":
# q, k, v tiles read through tensor descriptors, which the interpreter emulates; split backward)
VARIANTS = {"fused": dict(bwd="fused"), "atomic": dict(bwd="atomic"), "tma": dict(fwd_tma=True)}


def force_bwd(monkeypatch, mode):
    """Every launch of the fixed and the packed op uses variant `mode` (VARIANTS) of the default tiles."""
    import dataclasses
    real = PA._tiles

    def forced(*a, **kw):
        return dataclasses.replace(real(*a, **kw), **VARIANTS[mode])
    monkeypatch.setattr(PA, "_tiles", forced)
    monkeypatch.setattr(importlib.import_module("aimv2.kernels.prefix_attention_varlen"), "_tiles", forced)


# N = 17 and 97 (not multiples of the tiles), prefixes 0 / N / 1 / N-1 / random / mid-tile, D 32 and 64
VARIANT_CASES = [CASES[i] for i in (2, 3, 4, 5, 7)]


@pytest.mark.parametrize("mode", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARIANT_CASES, ids=str)
def test_backward_variants_match_fp64_reference(case, dtype, mode, monkeypatch):
    """"fused" (dq and dk/dv programs in one launch), "atomic" (dq added into an fp32 buffer by
    the dk/dv programs) and "tma" (the forward's tiles loaded by tensor descriptors, its out and lse
    feeding the backward) under the same error rule as the default configuration."""
    force_bwd(monkeypatch, mode)
    B, H, N, D, spec = case
    q, k, v, do = _inputs(B, H, N, D, dtype)
    plen = _prefix(spec, B, N)
    _check_against_truth(_run(prefix_attention, q, k, v, do, plen), q, k, v, do, plen)


@pytest.mark.parametrize("mode", ["fused", "atomic"])
def test_backward_variants_write_every_gradient_row(mode):
    """Poisoned gradients come back finite everywhere (every row of dq, dk, dv written, the atomic
    buffer zeroed first) and equal to the split backward's within fp32 summation order."""
    import dataclasses
    B, H, N, D = 2, 2, 45, 32
    q, k, v, do = _inputs(B, H, N, D, torch.float32)
    plen = torch.tensor([0, 30], device=DEV)
    out, lse = PA._fwd_launch(q, k, v, plen, D ** -0.5)
    base = PA._tiles(D, q.dtype, q.device, N)
    split = PA._bwd_launch(do, q, k, v, out, lse, plen, D ** -0.5, cfg=base)
    poisoned = [torch.full_like(q, float("nan")) for _ in range(3)]
    got = PA._bwd_launch(do, q, k, v, out, lse, plen, D ** -0.5, *poisoned, cfg=dataclasses.replace(base, bwd=mode))
    for name, g, s in zip(("dq", "dk", "dv"), got, split):
        assert torch.isfinite(g).all(), f"{mode}: {name} has unwritten rows"
        torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")


def test_deterministic_algorithms_keep_the_split_backward():
    """torch.use_deterministic_algorithms(True) turns a configured "atomic" backward (fp32 adds in
    no fixed order) into "split"; the other forms are deterministic as they are."""
    import dataclasses
    atomic = dataclasses.replace(PA._tiles(32, torch.float32, torch.device(DEV)), bwd="atomic")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert PA._bwd_mode(atomic) == "split"
        assert PA._bwd_mode(dataclasses.replace(atomic, bwd="fused")) == "fused"
        torch.use_deterministic_algorithms(False)
        assert PA._bwd_mode(atomic) == "atomic"
    finally:
        torch.use_deterministic_algorithms(before)


def test_configuration_table_lookup():
    """The committed table is keyed by (capability, head dim, length bucket, dtype); a missing key
    falls back (None), a bad backward name is an error naming the file."""
    from aimv2.kernels._utils import Tiles
    delta = Tiles(32, 0, 4, 1)
    table = {(9, 0, 128, 256, "bfloat16"): {"fwd": (64, 64, 4, 3), "dkdv": (64, 128, 8, 3), "dq": (128, 64, 8, 3),
                                            "bwd": "atomic"}}
    got = PA._table_config((9, 0), 128, 256, torch.bfloat16, delta, table)
    assert got.bwd == "atomic" and got.fwd == Tiles(64, 64, 4, 3) and got.dkdv.block_n == 128 and got.delta == delta
    assert PA._table_config((9, 0), 128, 257, torch.bfloat16, delta, table) is None          # bucket 1024
    assert PA._table_config((9, 0), 128, 256, torch.float16, delta, table) is None
    assert [PA.n_bucket(n) for n in (1, 256, 257, 1024, 1025)] == [256, 256, 1024, 1024, 0]
    with pytest.raises(ValueError, match="_attention_table.py"):
        PA._table_config((9, 0), 128, 256, torch.bfloat16, delta,
                         {(9, 0, 128, 256, "bfloat16"): dict(table[(9, 0, 128, 256, "bfloat16")], bwd="magic")})
    from aimv2.kernels._attention_table import TABLE
    for key, entry in TABLE.items():                                     # the committed entries are valid
        assert PA._table_config(key[:2], key[2], 1 if key[3] == 256 else key[3] or 4096,
                                getattr(torch, key[4]), delta) is not None


def test_tma_forward_reads_through_descriptors_and_falls_back_on_misaligned_inputs(monkeypatch):
    """fwd_tma makes three descriptors per forward program (q, k, v rows of its (b, h)); inputs a TMA
    descriptor cannot address (a base or a stride not a multiple of 16 bytes) get the pointer loads,
    with the reason, and the same numbers."""
    import dataclasses
    B, H, N, D = 1, 2, 24, 16
    q, k, v, _ = _inputs(B, H, N, D, torch.float32)
    plen = torch.tensor([5], device=DEV)
    cfg = dataclasses.replace(PA._tiles(D, q.dtype, q.device, N), fwd_tma=True)
    if ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        assert PA._tma_unusable(q, k, v) == "TMA needs compute capability >= 9.0"
        return
    assert PA._tma_unusable(q, k, v) is None and PA._use_tma(cfg, q, k, v)
    assert not PA._use_tma(dataclasses.replace(cfg, fwd_tma=False), q, k, v)
    odd = torch.randn(q.numel() + 1, device=DEV)[1:].view(B, H, N, D)             # base 4 bytes past 16
    wide = torch.randn(B, H, N, D + 1, device=DEV)[..., :D]                        # rows 68 bytes apart
    assert PA._tma_unusable(odd, k, v) == "q: data pointer not 16-byte aligned"
    assert PA._tma_unusable(q, k, wide) == f"v: stride {D + 1} of dim 2 is not a multiple of 16 bytes"
    assert PA._tma_unusable(q, k, wide[:, :, :1]) is None                          # one row: never strided
    made = []                 # block rows of each descriptor made (observable in the interpreter only)
    real = PA._row_descriptor
    monkeypatch.setattr(PA, "_row_descriptor", lambda *a: (made.append(a[-1]), real(*a))[1])
    truth = prefix_attention_ref(q.double(), k.double(), v.double(), plen)
    out, _ = PA._fwd_launch(q, k, v, plen, D ** -0.5, cfg=cfg)
    if not ON_GPU:
        n_programs = math.ceil(N / cfg.fwd.block_m) * H * B
        assert sorted(made) == sorted([cfg.fwd.block_m, cfg.fwd.block_n, cfg.fwd.block_n] * n_programs)
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=1e-5)
    made.clear()
    out, _ = PA._fwd_launch(odd.copy_(q), k, wide.copy_(v), plen, D ** -0.5, cfg=cfg)
    assert made == []                                                              # the pointer loads
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=1e-5)
