"""The trainer's parts, each alone: the step-statistics record, the interval timer, the checkpoint
manager (interval / stop / final / keep K), the stop controller (a real signal to this process, a fake
clock, a fake cross-rank reduction), the schedule restored through its state dict with param groups
matched by name, the probe's schedule, and the loop's callbacks."""
import math
import os
import signal

import pytest
import torch
import torch.nn as nn

from aimv2.train import checkpoint as ck
from aimv2.train.callbacks import Callback
from aimv2.train.config import OptimConfig
from aimv2.train.distributed import DistInfo
from aimv2.train.optim import (WarmupCosine, apply_hyperparameters, build_scheduler, param_groups,
                               restore_schedule, torch_weight_decay)
from aimv2.train.stats import IntervalTimer, StepStats
from aimv2.train.stop import StopController
from _train_common import rows, tiny_cfg

CPU = torch.device("cpu")


def _info(rank=0, world=1):
    return DistInfo(rank=rank, world_size=world, local_rank=rank, mode="none" if world == 1 else "ddp", device=CPU)


# ----------------------------------------------------------------------------- statistics
def _t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_step_stats_means_over_good_steps_and_bad_runs():
    st = StepStats(CPU, skipped_before=5)
    st.update(_t(4.0, 1.0, 3.0), torch.tensor(2.0), torch.tensor(0.0))
    st.update(_t(float("nan"), 1.0, float("nan")), torch.tensor(float("inf")), torch.tensor(1.0))
    st.update(_t(float("nan"), 1.0, 1.0), torch.tensor(9.0), torch.tensor(1.0))
    st.update(_t(2.0, 0.5, 1.5), torch.tensor(4.0), torch.tensor(0.0))
    s = st.read(_info())
    assert (s.loss, s.pixel_loss, s.text_loss, s.grad_norm) == (3.0, 0.75, 2.25, 3.0)  # skipped: left out
    assert s.good_steps == 2 and s.skipped_steps == 5 + 2 and s.max_bad_run == 2
    assert st.skipped_steps == 7
    # the next interval: sums restart, the skip count does not; a run of bad steps spans intervals
    st.update(_t(1.0, 1.0, 1.0), torch.tensor(1.0), torch.tensor(1.0))
    s = st.read(_info())
    assert s.loss is None and s.grad_norm is None and s.good_steps == 0
    assert s.skipped_steps == 8 and s.max_bad_run == 1
    st.update(_t(1.0, 1.0, 1.0), torch.tensor(1.0), torch.tensor(1.0))
    st.update(_t(6.0, 2.0, 4.0), torch.tensor(1.0), torch.tensor(0.0))
    s = st.read(_info())
    assert s.max_bad_run == 2 and s.skipped_steps == 9 and s.loss == 6.0
    s = st.read(_info())                                  # an interval after a good step: no bad run
    assert s.max_bad_run == 0 and s.good_steps == 0


def test_step_stats_update_needs_no_host_sync():
    """update() on device tensors only: it works under a mode where reading a value would fail."""
    st = StepStats(torch.device("meta"))
    st.update(torch.zeros(3, device="meta"), torch.zeros((), device="meta"), torch.zeros((), device="meta"))
    assert st.sums.device.type == "meta"


def test_interval_timer_laps():
    now = [10.0]
    timer = IntervalTimer(step=3, clock=lambda: now[0])
    now[0] = 14.0
    timer.waited(1.0)
    timer.waited(0.5)
    lap = timer.lap(7)
    assert (lap.steps, lap.seconds, lap.data_wait, lap.elapsed) == (4, 4.0, 1.5, 4.0)
    now[0] = 15.0
    lap = timer.lap(9)
    assert (lap.steps, lap.seconds, lap.data_wait, lap.elapsed) == (2, 1.0, 0.0, 5.0)
    assert timer.lap(9).seconds == 1e-9                   # no time passed: never a division by zero


# ----------------------------------------------------------------------------- checkpoints
class _Snap:
    def __init__(self):
        self.calls = []

    def __call__(self):
        step = len(self.calls) + 1
        self.calls.append(step)
        return ({"encoder.w": torch.full((2,), float(step))},
                {"optimizer": {}, "counters": {"skipped_steps": step}})


def test_checkpoint_manager_interval_stop_final_keep(tmp_path):
    snap = _Snap()
    m = ck.CheckpointManager(tmp_path, every=3, keep=2, info=_info(), snapshot=snap,
                             model_config={"dim": 4}, config_yaml="run: {}\n")
    saved = [s for s in range(1, 9) if m.after_step(s, stopping=False) is not None]
    assert saved == [3, 6] and len(snap.calls) == 2
    assert m.final(8) == tmp_path / "checkpoints" / "step_00000008" == m.latest
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]   # keep 2
    model, mcfg, state = ck.load_checkpoint(m.latest)
    assert torch.equal(model["encoder.w"], torch.full((2,), 3.0)) and mcfg == {"dim": 4}
    assert state["step"] == 8 and state["counters"] == {"skipped_steps": 3}
    assert (m.latest / "config.yaml").read_text() == "run: {}\n"
    assert m.final(8) == m.latest and len(snap.calls) == 3          # just saved: not again
    # a stop saves at once, off the interval; the final save then sees it was done
    assert m.after_step(10, stopping=True) == tmp_path / "checkpoints" / "step_00000010"
    assert m.final(10) == m.latest and len(snap.calls) == 4
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000008", "step_00000010"]


def test_checkpoint_manager_no_interval_and_other_ranks(tmp_path):
    snap = _Snap()
    m = ck.CheckpointManager(tmp_path, every=0, keep=1, info=_info(), snapshot=snap, model_config={},
                             config_yaml="", latest=tmp_path / "old")
    assert all(m.after_step(s, stopping=False) is None for s in range(1, 20))
    assert m.latest == tmp_path / "old" and not snap.calls
    assert m.final(19).name == "step_00000019"
    # a rank other than 0 takes part in the snapshot (a collective) but writes nothing
    other = ck.CheckpointManager(tmp_path / "r1", every=1, keep=1, info=_info(rank=1), snapshot=snap,
                                 model_config={}, config_yaml="")
    assert other.after_step(1, stopping=False) is None and len(snap.calls) == 2
    assert not (tmp_path / "r1").exists()
    with pytest.raises(ValueError, match="keep"):
        ck.CheckpointManager(tmp_path, every=1, keep=0, info=_info(), snapshot=snap, model_config={},
                             config_yaml="")


# ----------------------------------------------------------------------------- stopping
def test_stop_controller_signals():
    stop = StopController(_info())
    before = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        assert not stop.check(at_log=True) and stop.reason is None
        os.kill(os.getpid(), signal.SIGTERM)              # delivered to this (main) thread
        assert stop.check(at_log=False) and stop.reason == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)              # a repeated SIGTERM keeps the first reason
        assert stop.reason == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):            # Ctrl-C while stopping: abort
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
    first = StopController(_info())
    first.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)               # a first Ctrl-C only asks to stop
    finally:
        first.restore()
    assert first.reason == "SIGINT" and first.check(at_log=False)


def test_stop_controller_time_limit():
    now = [100.0]
    stop = StopController(_info(), max_minutes=0.5, clock=lambda: now[0])
    now[0] = 1000.0
    stop.start_clock()                                    # the limit counts from the loop's start
    now[0] = 1029.0
    assert not stop.check(at_log=True)
    now[0] = 1030.5
    assert stop.check(at_log=False) and stop.reason == "time limit"
    assert not StopController(_info(), max_minutes=None, clock=lambda: 1e12).check(at_log=True)


def test_stop_controller_ranks_agree_at_log_steps():
    """Rank 1 got SIGTERM; rank 0 learns of it at the next log step, through the reduction."""
    calls = []

    def peer_max(rank_flags):
        def reduce(t):
            calls.append(float(t))
            return torch.maximum(t, torch.tensor([rank_flags()]))
        return reduce

    signalled = StopController(_info(rank=1, world=2), all_reduce_max=peer_max(lambda: 0.0))
    signalled.request("SIGTERM")
    assert not signalled.check(at_log=False) and not calls          # no collective between log steps
    assert signalled.check(at_log=True) and signalled.reason == "SIGTERM" and calls == [1.0]
    calm = StopController(_info(rank=0, world=2), all_reduce_max=peer_max(lambda: 1.0))
    assert not calm.check(at_log=False) and calm.reason is None
    assert calm.check(at_log=True) and calm.reason == "SIGTERM on another rank"
    quiet = StopController(_info(rank=0, world=2), all_reduce_max=peer_max(lambda: 0.0))
    assert not quiet.check(at_log=True) and quiet.reason is None


# ----------------------------------------------------------------------------- the schedule
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.pos_embed = nn.Parameter(torch.randn(1, 2, 3))


def _opt(model, o, reverse=False):
    groups = param_groups(model, torch_weight_decay(o))
    return torch.optim.AdamW(groups[::-1] if reverse else groups, lr=o.lr, fused=True)


def test_schedule_state_round_trip_matches_groups_by_name():
    o = OptimConfig(lr=2e-3, weight_decay=0.1, warmup_steps=3, decay_steps=12)
    opt = _opt(_Net(), o)
    sched = build_scheduler(opt, o, steps=12)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    saved = sched.state_dict()
    # a new run: param groups in the other order, and its own state (as set_optimizer_state_dict leaves it)
    net = _Net()
    opt2 = _opt(net, o, reverse=True)
    assert [g["name"] for g in opt2.param_groups] == ["no_decay", "decay"]
    for g in opt2.param_groups:
        g.update(weight_decay=123.0, betas=(0.1, 0.2), eps=1.0)
    sched2 = build_scheduler(opt2, o, steps=12)
    restore_schedule(sched2, o, saved, step=5)
    assert sched2.last_epoch == 5 and sched2.state_dict()["last_epoch"] == 5
    holding = lambda p: next(g for g in opt2.param_groups if any(q is p for q in g["params"]))  # noqa: E731
    assert holding(net.lin.weight)["weight_decay"] == pytest.approx(0.1 / 2e-3)
    assert holding(net.lin.bias)["weight_decay"] == 0.0 and holding(net.pos_embed)["weight_decay"] == 0.0
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in opt2.param_groups)
    # it continues exactly where the first one was
    ref = WarmupCosine.from_config(o, 12)
    for s in range(5, 12):
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx([ref.lr(s)] * 2, rel=1e-12)
        opt2.step()
        sched2.step()
    assert lrs == pytest.approx([ref.lr(s) for s in range(5)], rel=1e-12)


def test_schedule_restore_takes_the_config_not_the_checkpoint():
    o = OptimConfig(lr=2e-3, warmup_steps=3, decay_steps=12)
    opt = _opt(_Net(), o)
    sched = build_scheduler(opt, o, steps=12)
    for _ in range(4):
        opt.step()
        sched.step()
    new = OptimConfig(lr=5e-4, min_lr=0.0, warmup_steps=2, decay_steps=30)     # changed on resume
    opt2 = _opt(_Net(), new)
    sched2 = build_scheduler(opt2, new, steps=30)
    restore_schedule(sched2, new, sched.state_dict(), step=4)
    want = WarmupCosine.from_config(new, 30)
    assert sched2.lr_lambdas[0].total == 30 and sched2.base_lrs == [5e-4, 5e-4]
    assert opt2.param_groups[0]["lr"] == want.lr(4)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[1]["lr"] == pytest.approx(want.lr(5), rel=1e-12)
    with pytest.raises(ValueError, match="last_epoch 4 != checkpoint step 7"):
        restore_schedule(sched2, new, sched.state_dict(), step=7)
    opt2.param_groups[0]["name"] = "embeddings"
    with pytest.raises(ValueError, match="'embeddings'"):
        apply_hyperparameters(opt2, new, 1e-3)


def test_probe_schedule_is_warmup_cosine_with_offset():
    """The probe's factor: (s + 1) / W during warm-up, then cosine from 1 to 0 at s = total."""
    total, W = 40, 4
    f = WarmupCosine(1.0, 0.0, 0.0, W, total, warmup_offset=1)
    assert [f(s) for s in range(W)] == [0.25, 0.5, 0.75, 1.0]
    assert f(W) == 1.0 and f(total) == 0.0 and f(total + 5) == 0.0
    assert f(W + (total - W) // 2) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 36)))


# ----------------------------------------------------------------------------- callbacks
class _Recorder(Callback):
    def __init__(self):
        self.steps, self.rows = [], []

    def on_step_end(self, trainer, step):
        self.steps.append(step)

    def on_log(self, trainer, row):
        self.rows.append(dict(row))


def test_callbacks_see_every_step_and_row(tmp_path):
    from aimv2.train import train
    rec = _Recorder()
    res = train(tiny_cfg(tmp_path / "run", **{"run.steps": 3, "run.log_every": 2}), callbacks=[rec])
    assert rec.steps == [1, 2, 3] and res.step == 3
    assert rec.rows == rows(res.run_dir) and [r["step"] for r in rec.rows] == [2, 3]
