"""The model with impl="triton" (fused RMSNorm+residual, SwiGLU, patch l2 loss, linear + cross-entropy
text loss) trains like impl="torch": same init, same batches, AdamW, 20 steps; and gives the same gradients.

Truth is the impl="torch" model run in fp64. Tolerance (flash-attention's rule applied to a
trajectory): the triton run's distance from the fp64 run must be within FACTOR x the distance of the
fp32 torch run from it, plus a floor of a few fp32 ulps. FACTOR = 3 rather than the 2 of the
element-wise kernel tests: a loss trajectory is one sample of a chaotic random walk (AdamW divides
each update by sqrt(v), so roundoff in near-zero gradients is amplified), not a max over many
independent elements, so the two fp32 runs' distances agree in size but not to within 2x per run.
A real bug (wrong eps, a missing residual gradient, a mis-shifted loss) moves the loss by >= 1e-3
relative at the first step, orders of magnitude beyond this bound.
"""
import copy

import torch

from aimv2.model import AIMv2Pretrainer
from aimv2.presets import get_preset

FACTOR = 3.0
FLOOR_ULPS = 4.0
STEPS = 20
B = 3


def _cfg(impl):
    # N = 16 patches of 588 values, D = 96 (head dim 48), SwiGLU hidden 200: no powers of two
    return get_preset("aimv2-tiny", img_size=56, dim=96, depth=2, num_heads=2, mlp_hidden=200,
                      dec_dim=96, dec_depth=1, dec_heads=2, dec_mlp_hidden=200, vocab_size=64,
                      text_len=8, attn_backend="sdpa", impl=impl)


def _batches(cfg, device):
    g = torch.Generator().manual_seed(1)
    out = []
    N = cfg.num_patches
    for _ in range(STEPS):
        images = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
        text = torch.randint(2, cfg.vocab_size, (B, cfg.text_len), generator=g)
        text[0, -3:] = cfg.pad_id                                        # some padding
        plen = torch.randint(1, N, (B,), generator=g)
        plen[-1] = 0                                                     # a fully causal sample
        out.append((images.to(device), text.to(device), plen.to(device)))
    return out


def _train(model, batches, dtype, autocast=False):
    """Returns (losses per step, grads at step 0, grads at step 1 after one AdamW step)."""
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses, grads = [], []
    for images, text, plen in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(images.to(dtype), text, plen)["loss"]
        loss.backward()
        losses.append(loss.detach().double())
        if len(grads) < 2:
            grads.append({n: p.grad.detach().double().clone() for n, p in model.named_parameters()})
        opt.step()
    return torch.stack(losses), grads


def _within(name, got, f32, f64):
    err = (got - f64).abs().max().item()
    err_ref = (f32 - f64).abs().max().item()
    bound = FACTOR * err_ref + FLOOR_ULPS * torch.finfo(torch.float32).eps * f64.abs().max().item()
    assert err <= bound, f"{name}: triton err {err:.3e} > {FACTOR} x torch fp32 err {err_ref:.3e} + floor"


def test_triton_impl_trains_like_torch(device, one_thread):
    torch.manual_seed(0)
    ref = AIMv2Pretrainer(_cfg("torch")).to(device)
    tri = AIMv2Pretrainer(_cfg("triton")).to(device)
    tri.load_state_dict(ref.state_dict())
    f64 = copy.deepcopy(ref)
    batches = _batches(ref.cfg, device)

    loss32, g32 = _train(ref, batches, torch.float32)
    loss64, g64 = _train(f64, batches, torch.float64)
    loss_tri, g_tri = _train(tri, batches, torch.float32)

    assert torch.isfinite(loss_tri).all()
    assert loss_tri[-1] < loss_tri[0]                                    # it does train
    _within("losses over 20 steps", loss_tri, loss32, loss64)
    for step in (0, 1):
        assert g_tri[step].keys() == g64[step].keys()
        for n in g64[step]:
            _within(f"grad {n} at step {step}", g_tri[step][n], g32[step][n], g64[step][n])


def test_triton_impl_under_bf16_autocast(device, one_thread):
    """The training recipe's numerics (bf16 autocast: bf16 activations into fp32-weight norms, bf16
    predictions against fp32 images): 3 steps, same rule against the fp64 run, with the bf16
    torch run as the error yardstick."""
    torch.manual_seed(0)
    ref = AIMv2Pretrainer(_cfg("torch")).to(device)
    tri = AIMv2Pretrainer(_cfg("triton")).to(device)
    tri.load_state_dict(ref.state_dict())
    f64 = copy.deepcopy(ref)
    batches = _batches(ref.cfg, device)[:3]

    loss_bf, g_bf = _train(ref, batches, torch.float32, autocast=True)
    loss64, g64 = _train(f64, batches, torch.float64)
    loss_tri, g_tri = _train(tri, batches, torch.float32, autocast=True)

    _within("bf16 losses over 3 steps", loss_tri, loss_bf, loss64)
    for n in g64[0]:
        _within(f"bf16 grad {n} at step 0", g_tri[0][n], g_bf[0][n], g64[0][n])


def _logit_shaped_outputs(model, batch) -> tuple[list, list]:
    """Every tensor made in one forward + backward (new storage: not a view of an op's argument,
    such as weight.t(), nor an out= argument) whose last dim is V, as (op, shape), split into
    those with at least a row per text token of the batch (B*T rows: the logits, their softmax or
    their gradient, (B, T, V) or (B*T, V)) and those with fewer (a chunk of the fused loss).
    The recorder steps into the aimv2:: custom ops (opaque to a dispatch mode otherwise): it
    redispatches them to their backend kernel with itself active, so their internal tensors count."""
    from torch.utils._python_dispatch import TorchDispatchMode
    cfg = model.cfg
    V, tokens = cfg.vocab_size, B * cfg.text_len
    full, part = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "aimv2":
                key = torch._C.DispatchKey.CUDA if args[0].is_cuda else torch._C.DispatchKey.CPU
                with Record():
                    out = func.redispatch(torch._C.DispatchKeySet(key), *args, **(kwargs or {}))
            else:
                out = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()]
                     if isinstance(a, torch.Tensor)}
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V \
                        and t.untyped_storage().data_ptr() not in given:      # new, not a view / out=
                    (full if t.numel() // V >= tokens else part).append((str(func), tuple(t.shape)))
            return out

    images, text, plen = batch
    with Record():
        model(images, text, plen)["loss"].backward()
    return full, part


def test_triton_text_loss_never_builds_logits(device, one_thread, monkeypatch):
    """impl="triton" runs the text head inside the fused linear + cross-entropy: no tensor with a
    row per text token and V columns in the forward or the backward, only the op's (C, V) chunk
    buffer (C = 10 rows here, B*T = 24 tokens: three chunks). The torch reference does build them,
    and the recorder sees the fused op's chunks (the detector can fail)."""
    import importlib
    monkeypatch.setattr(importlib.import_module("aimv2.kernels.linear_cross_entropy"), "CHUNK_ROWS", 10)
    torch.manual_seed(0)
    batch = _batches(_cfg("torch"), device)[0]
    assert _logit_shaped_outputs(AIMv2Pretrainer(_cfg("torch")).to(device), batch)[0]
    full, part = _logit_shaped_outputs(AIMv2Pretrainer(_cfg("triton")).to(device), batch)
    assert full == []
    assert ("aten.empty.memory_format", (10, 64)) in part


def test_old_checkpoints_text_head_key_loads():
    """Checkpoints written before the text head moved to the pretrainer (`decoder.text_head.weight`)
    still load, strictly."""
    model = AIMv2Pretrainer(_cfg("torch"))
    sd = model.state_dict()
    sd["decoder.text_head.weight"] = sd.pop("text_head.weight") + 1.0
    other = AIMv2Pretrainer(_cfg("torch"))
    other.load_state_dict(sd)
    torch.testing.assert_close(other.text_head.weight, model.text_head.weight + 1.0)


def test_fused_fc13_same_parameters_outputs_and_gradients(device):
    """model.fused_fc13 (fc1 and fc3 as one GEMM, swiglu_packed): the same state dict, and for both
    impls the loss and every gradient of the split model, to fp64 roundoff (torch impl in fp64) and
    within the kernel rule vs fp64 (triton impl in fp32). A swapped fc1 / fc3 or a lost half of d_h
    moves them by O(1)."""
    split = AIMv2Pretrainer(_cfg("torch")).to(device)
    images, text, plen = _batches(split.cfg, device)[0]

    def run(model, dtype):
        model = model.to(dtype)
        model.zero_grad(set_to_none=True)
        loss = model(images.to(dtype), text, plen)["loss"]
        loss.backward()
        return loss.detach().double(), {n: p.grad.detach().double() for n, p in model.named_parameters()}

    truth = run(copy.deepcopy(split), torch.float64)
    f32 = run(copy.deepcopy(split), torch.float32)
    for impl, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        fused = AIMv2Pretrainer(_cfg(impl).replace(fused_fc13=True)).to(device)
        assert fused.state_dict().keys() == split.state_dict().keys()
        fused.load_state_dict(split.state_dict())
        loss, grads = run(fused, dtype)
        if dtype == torch.float64:
            torch.testing.assert_close(loss, truth[0], rtol=1e-12, atol=0)
            for n, g in grads.items():
                torch.testing.assert_close(g, truth[1][n], rtol=1e-9, atol=1e-12, msg=n)
        else:
            _within("loss", loss, f32[0], truth[0])
            for n, g in grads.items():
                _within(n, g, f32[1][n], truth[1][n])
