"""The method.md §5 step: parameter groups, weight decay semantics, the LR schedule, accumulation and
clipping (against a hand-written reference loop), and the non-finite step skip."""
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from aimv2.model import AIMv2Pretrainer, RMSNorm
from aimv2.train import NonFiniteLossError, train
from aimv2.train.config import OptimConfig
from aimv2.train.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups
from aimv2.train.random_data import RandomBatches
from _train_common import losses, rows, tiny_cfg


def test_param_groups_follow_spec():
    cfg = tiny_cfg("unused").model
    model = AIMv2Pretrainer(cfg)
    # the no-decay set built independently: norm weights by module type, biases, the named embeddings
    expected = {"encoder.preprocessor.pos_embed", "decoder.text_pos_embed", "decoder.cls_token"}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            if isinstance(mod, RMSNorm) or pname == "bias":
                expected.add(f"{mname}.{pname}")
    decay, no_decay = param_groups(model, 0.1)
    ids = {id(p): n for n, p in model.named_parameters()}
    assert {ids[id(p)] for p in no_decay["params"]} == expected
    got_decay = {ids[id(p)] for p in decay["params"]}
    assert got_decay == set(ids.values()) - expected
    assert {"decoder.text_embed.weight", "encoder.preprocessor.patchifier.proj.weight",
            "text_head.weight", "decoder.proj.weight"} <= got_decay
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_weight_decay_is_lr_relative():
    """p <- p * (1 - wd * lr_t / lr_peak) on decayed params, untouched elsewhere (zero gradients)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.pos_embed = nn.Parameter(torch.randn(1, 4, 3))

    m = M()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    o = OptimConfig(lr=0.02, weight_decay=0.1, warmup_steps=4, warmup_init_lr=0.005, decay_steps=10)
    opt = build_optimizer(m, o, torch.device("cpu"))
    sched = build_scheduler(opt, o, steps=10)
    lr0 = opt.param_groups[0]["lr"]
    assert lr0 == pytest.approx(0.005)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    sched.step()
    torch.testing.assert_close(m.lin.weight, before["lin.weight"] * (1 - 0.1 * lr0 / 0.02), rtol=1e-6, atol=0)
    assert torch.equal(m.lin.bias, before["lin.bias"]) and torch.equal(m.pos_embed, before["pos_embed"])
    o2 = OptimConfig(lr=0.02, weight_decay=0.1, weight_decay_mode="torch")
    assert build_optimizer(m, o2, torch.device("cpu")).param_groups[0]["weight_decay"] == 0.1


def test_warmup_cosine_schedule():
    s = WarmupCosine(peak=1e-3, init=1e-6, final=1e-5, warmup=10, total=110)
    assert s.lr(0) == pytest.approx(1e-6)
    assert s.lr(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert s.lr(10) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx((1e-3 + 1e-5) / 2)                       # cosine half-way
    assert s.lr(110) == pytest.approx(1e-5) and s.lr(500) == pytest.approx(1e-5)
    warm = [s.lr(i) for i in range(11)]
    decay = [s.lr(i) for i in range(10, 111)]
    assert all(a < b for a, b in zip(warm, warm[1:])) and all(a > b for a, b in zip(decay, decay[1:]))
    # the torch scheduler follows it step by step
    p = nn.Parameter(torch.randn(3))
    o = OptimConfig(lr=1e-3, warmup_steps=10, decay_steps=110)
    opt = build_optimizer(nn.ParameterList([p]), o, torch.device("cpu"))
    sched = build_scheduler(opt, o, steps=110)
    for i in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(s.lr(i), rel=1e-12)
        opt.step()
        sched.step()
    # default warm-up for short runs: 5 % of the steps
    assert build_scheduler(opt, OptimConfig(lr=1e-3), steps=200).lr_lambdas[0].warmup == 10


def test_step_matches_reference_loop(tmp_path):
    """Trainer (fused AdamW, grad accumulation 2, clipping active) == a plain loop written from method.md §5."""
    over = {"run.steps": 3, "optim.grad_accum": 2, "optim.grad_clip": 0.5, "optim.lr": 5e-3,
            "optim.weight_decay": 0.05, "optim.warmup_steps": 2, "optim.decay_steps": 4}
    cfg = tiny_cfg(tmp_path / "run", **over)
    res = train(cfg)
    got = losses(res.run_dir)
    trained = load_file(str(res.checkpoint / "model.safetensors"))

    torch.manual_seed(cfg.run.seed)
    model = AIMv2Pretrainer(cfg.model)
    no_decay = [p for n, p in model.named_parameters()
                if p.dim() == 1 or n in ("encoder.preprocessor.pos_embed", "decoder.text_pos_embed", "decoder.cls_token")]
    nd = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in nd]
    lr_peak, wd = 5e-3, 0.05
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd / lr_peak},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr_peak, betas=(0.9, 0.95), eps=1e-8, fused=True)
    data = RandomBatches(cfg.model, 2, seed=cfg.data.seed)

    def lr_at(s):
        if s < 2:
            return 1e-6 + (lr_peak - 1e-6) * s / 2
        return 1e-5 + (lr_peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * (s - 2) / 2))

    for s in range(3):
        tot = torch.zeros(3, dtype=torch.float64)
        for _ in range(2):
            b = next(data)
            out = model(b["images"], b["text"], b["prefix_len"])
            (out["loss"] / 2).backward()
            tot += torch.stack([out["loss"], out["pixel_loss"], out["text_loss"]]).detach().double() / 2
        # global l2 norm in fp32, the way torch computes it (so the clipped gradients agree to the bit
        # and Adam's update, ill-conditioned where |g| ~ eps, does not amplify rounding differences)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
        norm64 = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
        torch.testing.assert_close(norm.double(), norm64, rtol=1e-5, atol=0)
        assert float(norm) > 0.5                                  # clipping is exercised
        coef = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
        for p in model.parameters():
            p.grad.mul_(coef)
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(torch.tensor(got[s + 1], dtype=torch.float64), tot, rtol=1e-5, atol=1e-6)
        assert rows(res.run_dir)[s]["lr"] == pytest.approx(lr_at(s), rel=1e-12)
    ref = model.state_dict()
    assert set(trained) == set(ref)
    for k in ref:
        # same AdamW kernel; gradients differ by fp32 rounding (clip coefficient, summation order)
        torch.testing.assert_close(trained[k], ref[k], rtol=1e-4, atol=2e-6, msg=lambda m: f"{k}: {m}")


class PoisonedBatches:
    """Wraps a loader; micro-batch number i (0-based, counting every next()) in `bad` gets NaN images."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.i = inner, set(bad), 0
        self.tokenizer = None

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.inner)
        if self.i in self.bad:
            b["images"] = b["images"].clone()
            b["images"][0, 0, 0, 0] = float("nan")
        self.i += 1
        return b

    def state_dict(self):
        return self.inner.state_dict()

    def stats(self):
        return self.inner.stats()


def _ckpt(run_dir, step):
    from aimv2.train.checkpoint import load_checkpoint
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}")


def _assert_same_state(a, b):
    (ma, _, sa), (mb, _, sb) = a, b
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert set(oa) == set(ob)
    for name in oa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(oa[name][k], ob[name][k]), (name, k)


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_step_is_skipped_without_touching_state(tmp_path, fused):
    cfg = tiny_cfg(tmp_path / "run", **{"run.steps": 3, "run.ckpt_every": 1, "run.keep_ckpts": 5,
                                        "optim.grad_accum": 2, "optim.fused": fused})
    data = PoisonedBatches(RandomBatches(cfg.model, 2, seed=0), bad={3})    # step 2, 2nd micro-batch
    res = train(cfg, loader=data)
    r = rows(res.run_dir)
    assert r[0]["loss"] is not None and math.isfinite(r[0]["loss"]) and r[0]["skipped_steps"] == 0
    assert r[1]["loss"] is None and r[1]["grad_norm"] is None and r[1]["skipped_steps"] == 1
    assert math.isfinite(r[2]["loss"]) and r[2]["skipped_steps"] == 1 and res.skipped_steps == 1
    _assert_same_state(_ckpt(res.run_dir, 1), _ckpt(res.run_dir, 2))
    m2, _, _ = _ckpt(res.run_dir, 2)
    m3, _, _ = _ckpt(res.run_dir, 3)
    assert any(not torch.equal(m2[k], m3[k]) for k in m2)                   # step 3 trained again


def test_too_many_nonfinite_steps_stop_with_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", **{"run.steps": 10, "run.ckpt_every": 1, "run.keep_ckpts": 10,
                                        "run.log_every": 2, "run.max_bad_steps": 3})
    data = PoisonedBatches(RandomBatches(cfg.model, 4, seed=0), bad=range(1, 100))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps with a non-finite loss .*step 4"):
        train(cfg, loader=data)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_00000004").is_dir()
    assert not (run / "checkpoints" / "step_00000005").exists()
    _assert_same_state(_ckpt(run, 1), _ckpt(run, 4))                       # the last good state
    assert rows(run)[-1]["skipped_steps"] == 3


@pytest.mark.parametrize("steps", [1, 3])
def test_run_whose_every_step_is_skipped_is_an_error(tmp_path, steps):
    """Fewer steps than run.max_bad_steps, all non-finite: the run trained nothing and must not
    return as if it had (nor write a final checkpoint of the unchanged state)."""
    cfg = tiny_cfg(tmp_path / "run", **{"run.steps": steps, "run.ckpt_every": 1, "run.log_every": 2})
    assert cfg.run.max_bad_steps > steps
    data = PoisonedBatches(RandomBatches(cfg.model, 4, seed=0), bad=range(100))
    with pytest.raises(NonFiniteLossError, match=rf"every step of this run \(steps 1..{steps}\) .* skipped"):
        train(cfg, loader=data)
    assert not (tmp_path / "run" / "checkpoints" / f"step_{steps:08d}").exists()    # no final checkpoint
    assert all(r["loss"] is None for r in rows(tmp_path / "run"))
    # one good step among them is a (poor) run, not an error
    cfg = tiny_cfg(tmp_path / "run2", **{"run.steps": 3, "run.log_every": 2})
    res = train(cfg, loader=PoisonedBatches(RandomBatches(cfg.model, 4, seed=0), bad={0, 2}))
    assert res.skipped_steps == 2 and res.step == 3
