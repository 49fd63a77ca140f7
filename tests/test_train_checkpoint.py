"""Checkpoints: atomic write / keep-K / newest-whole selection, RNG round trip, encoder loading, and
exact resumption on a CPU after SIGKILL mid-write and after SIGTERM (per-step losses compared with
an uninterrupted run; the data is the real loader over a small synthetic dataset crossing epochs)."""
import json
import random
import signal
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from aimv2.cli import main as cli_main
from aimv2.train import checkpoint as ck
from _train_common import TINY_SET, cli, cli_env, losses, rows, slow_cli


def _fake_state(step):
    return {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "rng": ck.rng_state(),
            "data": {"epoch": 0, "sample": step}, "counters": {"skipped_steps": 0}}


def test_atomic_save_keep_last_and_latest(tmp_path):
    cfg = {"name": "x", "dim": 4}
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, {"encoder.w": torch.full((2, 2), float(step))}, cfg,
                           _fake_state(step), "run: {}\n", keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003"]
    # a partial temp dir (killed writer) and a dir without its state file are never picked
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000009-123"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    half = tmp_path / "checkpoints" / "step_00000008"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")
    assert ck.latest_checkpoint(tmp_path).name == "step_00000003"
    model, mcfg, state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert torch.equal(model["encoder.w"], torch.full((2, 2), 3.0)) and mcfg == cfg
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "sample": 3}
    with safe_open(str(tmp_path / "checkpoints" / "step_00000003" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["aimv2_config"]) == cfg
    # re-saving an existing step replaces it whole
    ck.save_checkpoint(tmp_path, 3, {"encoder.w": torch.zeros(2, 2)}, cfg, _fake_state(3), "", keep=2)
    assert torch.equal(ck.load_checkpoint(tmp_path / "checkpoints" / "step_00000003")[0]["encoder.w"],
                       torch.zeros(2, 2))
    ck.remove_stale_temps(tmp_path)
    assert not tmp.exists()


def test_rng_state_round_trip():
    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(5), random.seed(7)
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ----------------------------------------------------------------------------- stop and resume
STEPS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from aimv2.data.synth import write_synthetic_dataset
    d = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(str(d), num=18, size=64, seed=0, shard_size=9, progress=False, workers=1)
    return str(d / "{00000..00001}.tar")       # 18 samples: 4 batches of 4 per epoch, 8 steps = 2 epochs


def _args(data, out, *extra):
    args = ["train", "--preset", "aimv2-tiny", "--data", data, "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "4", "--log-every", "1", "--ckpt-every", "3", "--no-progress"]
    for s in TINY_SET + ["data.num_workers=0", "run.plot=false", "optim.lr=3e-3", "run.device=cpu"]:
        args += ["--set", s]
    return args + list(extra)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli_main(_args(dataset, out)) == 0
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    return out, got


def _wait_for(cond, proc, timeout=120.0):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process exited early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.05)


def test_sigkill_while_writing_checkpoint_then_resume(dataset, reference, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "run"
    proc = cli(_args(dataset, out), env=cli_env(AIMV2_DEBUG_CKPT_PAUSE="6:120"))
    ckdir = out / "checkpoints"
    _wait_for(lambda: any((p / "model.safetensors").exists() for p in ckdir.glob(".tmp-step_00000006-*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close(), proc.stderr.close()
    assert ck.latest_checkpoint(out).name == "step_00000003"           # the partial step 6 is ignored
    assert any(ckdir.glob(".tmp-step_00000006-*"))
    assert max(losses(out)) == 6                                        # rows 4..6 will be redone
    assert cli_main(_args(dataset, out, "--resume")) == 0
    assert not any(ckdir.glob(".tmp-*"))
    assert losses(out) == ref                                           # bit-identical per step
    assert [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))


def test_sigterm_writes_checkpoint_and_exits_cleanly(dataset, reference, tmp_path, capsys):
    ref_dir, ref = reference
    out = tmp_path / "run"
    proc = slow_cli(0.25, _args(dataset, out, "--ckpt-every", "0"), env=cli_env())
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = max(losses(out))
    assert stopped < STEPS
    assert f"SIGTERM: checkpoint written at step {stopped}" in stderr
    assert f"step {stopped} (stopped by SIGTERM)" in stdout
    assert ck.latest_checkpoint(out).name == f"step_{stopped:08d}"
    assert cli_main(_args(dataset, out, "--resume")) == 0
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'}" in capsys.readouterr().err
    assert losses(out) == ref


def test_checkpoint_is_a_loadable_encoder(reference):
    from aimv2.weights import load_encoder
    run, _ = reference
    ckpt = ck.latest_checkpoint(run)
    model, mcfg, state = ck.load_checkpoint(ckpt)
    assert state["step"] == STEPS and state["data"]["epoch"] >= 1                # crossed an epoch
    assert mcfg["img_size"] == 56 and mcfg["depth"] == 1
    assert any(k.startswith("decoder.") for k in model)
    for src in (run, ckpt, ckpt / "model.safetensors"):
        enc = load_encoder(src)
        sd = enc.state_dict()
        assert set(sd) == {k[len("encoder."):] for k in model if k.startswith("encoder.")}
        assert all(torch.equal(v, model["encoder." + k]) for k, v in sd.items())
    # resuming with another model shape is refused with the differing field named
    with pytest.raises(ValueError, match=r"model config differs .*'depth': \(1, 2\)"):
        from aimv2.train import TrainConfig, train
        cfg = TrainConfig.from_yaml(run / "config.yaml").merge({"model.depth": 2, "run.resume": True})
        train(cfg)
    # a fresh run into a directory with checkpoints is refused
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(TrainConfig.from_yaml(run / "config.yaml").merge({"run.resume": False}))
