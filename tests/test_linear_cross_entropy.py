"""aimv2.kernels.linear_cross_entropy against the fp64 reference: the loss and every gradient
(hidden, weight, bias) for awkward shapes (T = 1, 7, 77*3; V and D just past a tile and mid-tile;
V past the row kernel's vocabulary tile, so the online log-sum-exp rescales), tokens in several
chunks (a boundary mid-way), the forward-computed gradients against the recompute backward,
ignored tokens (ignore_index outside and inside the vocabulary), an all-ignored batch, the three
reductions, strided and 3-D hidden; determinism; eager, compiled (fullgraph), autocast, opcheck;
bad input. Tolerances: tests/_kernel_numerics.py (kernel error <= 2x the same-dtype torch error +
2 ulp x max|truth|), where the same-dtype torch computation is the reference itself: F.linear in
the input dtype (bf16 / fp16 logits, as the model computes them), cross-entropy in fp32.

The GEMMs are torch's (on the CPU, 16-bit x 16-bit -> fp32 products are emulated by upcasting: the
GPU's cuBLAS out_dtype GEMMs run only on a GPU); the Triton row kernel runs in the interpreter,
whose cost is per program and tile op."""
import importlib

import pytest
import torch

from _kernel_numerics import assert_close_to_truth, poison_empty  # noqa: F401 (fixture)
from aimv2.kernels import linear_cross_entropy, linear_cross_entropy_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
lce = importlib.import_module("aimv2.kernels.linear_cross_entropy")     # the module (the package
                                                                        # re-exports the function)


def _inputs(T, D, V, dtype, device, bias=True, ignore_index=-100, frac_ignored=0.25):
    hidden = torch.randn(T, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * D ** -0.5 * 3).to(dtype)   # logits ~ N(0, 9)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    target = torch.randint(0, V, (T,), device=device)
    target[torch.rand(T, device=device) < frac_ignored] = ignore_index
    return hidden, weight, b, target


def _run(fn, hidden, weight, bias, target, ignore_index, reduction, dloss):
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias) if x is not None]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    loss = fn(h, w, target, ignore_index=ignore_index, bias=b, reduction=reduction)
    (loss * dloss.to(loss.dtype)).sum().backward()
    return [loss] + [x.grad for x in leaves]


def _check(hidden, weight, bias, target, ignore_index=-100, reduction="mean", dloss=None):
    if dloss is None:
        dloss = torch.randn(target.shape if reduction == "none" else (), device=hidden.device)
    args = (hidden, weight, bias, target, ignore_index, reduction, dloss)
    got = _run(linear_cross_entropy, *args)
    same = _run(linear_cross_entropy_ref, *args)
    f64 = [x.double() if x is not None else None for x in (hidden, weight, bias)]
    truth = _run(linear_cross_entropy_ref, *f64, *args[3:])
    assert got[0].dtype == torch.float32 and got[0].shape == (target.shape if reduction == "none" else ())
    for name, g, t_same, t in zip(["loss", "d_hidden", "d_weight", "d_bias"], got, same, truth):
        assert_close_to_truth(name, g.float() if name == "loss" else g,
                              t_same.float() if name == "loss" else t_same, t)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,V", [(1, 64, 300), (7, 70, 257), (231, 300, 1000), (16, 32, 12000)],
                         ids=["T1", "T7-V-past-tile", "T77x3-D-past-tile", "V-past-row-tile"])
def test_shapes_and_dtypes(device, dtype, T, D, V, poison_empty):
    _check(*_inputs(T, D, V, dtype, device))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_reductions_and_bias(device, reduction, bias, poison_empty):
    h, w, b, t = _inputs(20, 48, 130, torch.float16, device, bias=bias)
    _check(h, w, b, t, reduction=reduction)


def test_ignore_index_inside_vocabulary(device, poison_empty):
    """ignore_index = pad id 1, a real class: its column still gets softmax mass from other tokens,
    but padded tokens count for nothing."""
    h, w, b, t = _inputs(40, 32, 90, torch.float32, device, ignore_index=1, frac_ignored=0.4)
    loss, dh, dw, db = _check(h, w, b, t, ignore_index=1)
    assert not dh[t == 1].any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(device, reduction, poison_empty):
    h, w, b, _ = _inputs(9, 32, 50, torch.float32, device)
    t = torch.full((9,), -100, device=device)
    loss, dh, dw, db = _run(linear_cross_entropy, h, w, b, t, -100, reduction,
                            torch.ones(t.shape if reduction == "none" else (), device=device))
    assert not loss.any() and torch.isfinite(loss).all()
    for g in (dh, dw, db):
        assert torch.isfinite(g).all() and not g.any()


def test_strided_and_batched_hidden(device, poison_empty):
    """hidden (B, L, D) taken as a view of a wider tensor (row stride != D), target (B, L)."""
    wide = torch.randn(3, 11, 80, device=device)
    hidden = wide[..., 5:69]                                            # (3, 11, 64), stride 80
    _, w, b, _ = _inputs(1, 64, 200, torch.float32, device)
    t = torch.randint(0, 200, (3, 11), device=device)
    t[0, 6:] = -100
    for reduction in ("mean", "none"):
        _check(hidden, w, b, t, reduction=reduction)


@pytest.fixture
def chunk_rows(monkeypatch):
    """set(C): the op cuts the tokens into chunks of C rows (its CHUNK_ROWS override)."""
    return lambda rows: monkeypatch.setattr(lce, "CHUNK_ROWS", rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["fwd-grads", "recompute"])
def test_several_chunks(device, dtype, reduction, chunk_rows, poison_empty):
    """T = 231 in chunks of 100, 100, 31 (boundaries mid-way, a short last chunk): d_weight and
    d_bias accumulate across chunks, d_hidden rows come from their own chunk."""
    chunk_rows(100)
    h, w, b, t = _inputs(231, 72, 333, dtype, device)
    _check(h, w, b, t, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_gradients_match_recompute(device, dtype, reduction, chunk_rows):
    """The gradients computed in the forward (then scaled by grad_output) equal those of the
    recompute backward: bitwise for fp32 at grad_output 1 (the same d_logits, the same GEMMs in
    the same order), to the dtype's rounding for another grad_output (the scale enters the 16-bit
    d_logits at a different point)."""
    chunk_rows(64)
    h, w, b, t = _inputs(150, 40, 210, dtype, device)
    op = torch.ops.aimv2.linear_cross_entropy_fwd

    def grads(compute_grad, dloss):
        leaves = [x.detach().requires_grad_() for x in (h, w, b)]
        out = op(*leaves, t, -100, reduction, compute_grad)
        assert out[2].shape == ((150, 40) if compute_grad else (0,))          # the path taken
        (out[0] * dloss).backward()
        return [out[0]] + [x.grad for x in leaves]

    for dloss in (torch.tensor(1.0, device=device), torch.tensor(-2.7, device=device)):
        fwd, rec = grads(True, dloss), grads(False, dloss)
        f64 = [x.double() for x in (h, w, b)]
        truth = _run(linear_cross_entropy_ref, *f64, t, -100, reduction, dloss)
        for name, x, y, z in zip(["loss", "d_hidden", "d_weight", "d_bias"], fwd, rec, truth):
            assert x.dtype == y.dtype and torch.isfinite(x).all(), name
            if dtype == torch.float32 and dloss.item() == 1.0:
                assert torch.equal(x, y), name
            else:
                assert_close_to_truth(name, x, y, z)


def test_gradients_in_forward_only_when_wanted(device, monkeypatch):
    """The public function asks the forward for gradients only for "mean" / "sum" with grad mode
    on and an input requiring grad; inference and reduction "none" do not pay for them."""
    asked = []
    real = lce._fwd_launch
    monkeypatch.setattr(lce, "_fwd_launch", lambda *a: asked.append(a[-1]) or real(*a))
    h, w, b, t = _inputs(12, 32, 50, torch.float32, device)
    linear_cross_entropy(h, w, t, bias=b)                                # nothing requires grad
    with torch.no_grad():
        linear_cross_entropy(h, w.requires_grad_(), t, bias=b)
    linear_cross_entropy(h, w, t, bias=b, reduction="none")
    linear_cross_entropy(h, w, t, bias=b, reduction="sum")
    linear_cross_entropy(h, w.detach(), t, bias=b.requires_grad_())
    assert asked == [False, False, False, True, True]


def test_deterministic(device):
    h, w, b, t = _inputs(150, 96, 600, torch.float16, device)
    a = _run(linear_cross_entropy, h, w, b, t, -100, "mean", torch.tensor(1.0, device=device))
    c = _run(linear_cross_entropy, h, w, b, t, -100, "mean", torch.tensor(1.0, device=device))
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_compile_fullgraph_fwd_bwd(device):
    h, w, b, t = _inputs(21, 40, 150, torch.float32, device)
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()

    def f(h, w, b):
        return 1.5 * linear_cross_entropy(h.view(3, 7, 40), w, t.view(3, 7), bias=b)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(h, w, b)
    got = torch.autograd.grad(loss, (h, w, b))
    want_loss = f(h, w, b)
    want = torch.autograd.grad(want_loss, (h, w, b))
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_autocast_casts_like_linear(device):
    """Under bf16 autocast fp32 hidden / weight go in as bf16, as F.linear's would: the op equals
    itself on bf16 inputs, gradients come back in the leaves' fp32."""
    h, w, _, t = _inputs(13, 48, 100, torch.float32, device)
    h.requires_grad_(), w.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    want = linear_cross_entropy(h.detach().bfloat16(), w.detach().bfloat16(), t)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)

    def f(h, w):
        with torch.autocast(device, dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, t)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w)      # autocast traced
    torch.testing.assert_close(compiled, want, rtol=0, atol=0)


def test_opcheck(device):
    h, w, b, t = _inputs(10, 40, 70, torch.float32, device)
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.aimv2.linear_cross_entropy_fwd.default, (h, w, b, t, -100))
    t3 = torch.where(t < 0, 3, t)                                       # pad id 3, a real class
    torch.library.opcheck(torch.ops.aimv2.linear_cross_entropy_fwd.default, (h, w, None, t3, 3))
    for reduction in ("mean", "sum"):                   # the forward-computed gradients path
        torch.library.opcheck(torch.ops.aimv2.linear_cross_entropy_fwd.default,
                              (h, w, b, t, -100, reduction, True))
    lse = torch.ops.aimv2.linear_cross_entropy_fwd(h.detach(), w.detach(), b.detach(), t, -100)[1]
    dloss = torch.randn(10, device=device)
    torch.library.opcheck(torch.ops.aimv2.linear_cross_entropy_bwd.default,
                          (dloss, h.detach(), w.detach(), b.detach(), t, lse, -100))


def test_out_of_range_target_is_nan_in_the_kernel(device):
    """The public function rejects it on CPU tensors; the kernel (no host sync) marks it NaN."""
    h, w, b, t = _inputs(6, 32, 40, torch.float32, device)
    t[2], t[4] = 40, -7
    loss_tok = torch.ops.aimv2.linear_cross_entropy_fwd(h, w, b, t, -100)[0]
    assert torch.isnan(loss_tok[[2, 4]]).all() and torch.isfinite(loss_tok[[0, 1, 3, 5]]).all()


def test_bad_inputs(device, monkeypatch):
    h, w, b, t = _inputs(6, 32, 40, torch.float32, device)
    with pytest.raises(TypeError, match="hidden: expected dtype"):
        linear_cross_entropy(h.long(), w, t)
    with pytest.raises(TypeError, match="weight: expected hidden's dtype"):
        linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match="weight: expected shape"):
        linear_cross_entropy(h, w[:, :31], t)
    with pytest.raises(ValueError, match="bias: expected shape"):
        linear_cross_entropy(h, w, t, bias=b[:39])
    with pytest.raises(TypeError, match="target: expected an int64 or int32"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="target: expected shape"):
        linear_cross_entropy(h, w, t[:5])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(h, w.to("meta"), t)
    bad = t.clone()
    bad[3] = 40
    if bad.device.type == "cpu":
        with pytest.raises(ValueError, match=r"target: class ids must lie in \[0, V=40\)"):
            linear_cross_entropy(h, w, bad)
        bad[3] = -1
        with pytest.raises(ValueError, match="got -1"):
            linear_cross_entropy(h, w, bad)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        linear_cross_entropy(h.cpu(), w.cpu(), t.cpu())


def test_chunk_rows_scale_with_the_tokens():
    """C = T / 4 (a multiple of 128, >= 128) up to the 128 MiB cap: small batches get small chunks
    (their peak memory is a fraction of eager's), large ones the cap (their speed unchanged)."""
    import torch
    f = lce._chunk_rows
    assert f(100, 32000, torch.float32) == 100                      # all of T when smaller than 128
    assert f(1000, 32000, torch.float32) == 128
    assert f(1232, 32000, torch.float32) == 256
    assert f(5000, 32000, torch.float32) == 1024                    # fp32 cap at V = 32k
    assert f(9856, 32000, torch.bfloat16) == 2048                   # the training shape: the bf16 cap
    assert f(9856, 128000, torch.bfloat16) == 512
    for T in (1, 127, 128, 129, 1000, 3333, 100000):
        C = f(T, 32000, torch.bfloat16)
        assert 1 <= C <= T and (C == T or C % 128 == 0) and C * 32000 * 2 <= lce.CHUNK_BYTES


def test_benchmark_quick_cpu(tmp_path):
    """benchmarks/bench_text_loss.py --quick: one fresh process per provider, rows in the results
    schema with a measured peak memory, and both providers computing the same loss."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_text_loss.py"), "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("text_loss-*.json")).read_text())
    assert {(x["provider"], x["pass"]) for x in rows} == \
        {(p, q) for p in ("aimv2", "eager_ref") for q in ("fwd", "bwd", "fwdbwd")}
    for x in rows:
        assert x["op"] == "linear_cross_entropy" and x["ms"] > 0 and x["peak_mem_mb"] >= 0
        assert x["git_sha"] and x["device"] and x["dtype"] in ("fp32", "bf16")
    losses = {x["provider"]: x["loss"] for x in rows}
    assert losses["aimv2"] == pytest.approx(losses["eager_ref"], rel=1e-5)
