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
from aimv2.errors import CheckpointError, DiskFullError
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


# ----------------------------------------------------------------------------- integrity
INTEGRITY = "integrity.json"                          # the record's file name (part of the format)


def _saved(tmp_path, steps=(1,), keep=5):
    """Checkpoints of a small fake model (float tensors big enough to hold a data area)."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        sd = {"encoder.w": torch.randn(64, 32, generator=g), "decoder.b": torch.randn(100, generator=g)}
        ck.save_checkpoint(tmp_path, step, sd, {"name": "x", "dim": 4}, _fake_state(step), "run: {}\n", keep=keep)
    return ck.latest_checkpoint(tmp_path)


def test_integrity_record_matches_the_files(tmp_path):
    import hashlib
    path = _saved(tmp_path)
    rec = json.loads((path / INTEGRITY).read_text())
    assert set(rec["files"]) == {ck.MODEL_FILE, ck.STATE_FILE, ck.CONFIG_FILE}
    for name, want in rec["files"].items():
        data = (path / name).read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ck.verify_integrity(path) is True


def _tensor_data_offset(path):
    """Where the tensor bytes of a safetensors file start (8-byte header length + JSON header)."""
    return 8 + int.from_bytes((path / ck.MODEL_FILE).read_bytes()[:8], "little")


def _cut(name, frac):
    def damage(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:int(len(data) * frac)])
    return damage


def _overwrite(name, where, value):
    """Replace 16 bytes at offset where(path, data) with `value` * 16."""
    def damage(path):
        data = bytearray((path / name).read_bytes())
        at = where(path, data)
        data[at:at + 16] = value * 16
        (path / name).write_bytes(bytes(data))
    return damage


DAMAGE = {
    "model-truncated": (_cut(ck.MODEL_FILE, 0.5), ck.MODEL_FILE),
    "model-garbled-header": (_overwrite(ck.MODEL_FILE, lambda p, d: 8, b"#"), ck.MODEL_FILE),
    "model-zeroed-tensor-bytes": (_overwrite(ck.MODEL_FILE, lambda p, d: _tensor_data_offset(p) + 400, b"\0"),
                                  ck.MODEL_FILE),
    "state-empty": (_cut(ck.STATE_FILE, 0.0), ck.STATE_FILE),
    "state-cut": (_cut(ck.STATE_FILE, 0.6), ck.STATE_FILE),
    "state-zeroed-bytes": (_overwrite(ck.STATE_FILE, lambda p, d: len(d) // 2, b"\0"), ck.STATE_FILE),
    "config-edited": (lambda p: (p / ck.CONFIG_FILE).write_text("run: {steps: 1}\n"), ck.CONFIG_FILE),
    "record-garbled": (lambda p: (p / INTEGRITY).write_text("{not json"), INTEGRITY),
    "model-missing": (lambda p: (p / ck.MODEL_FILE).unlink(), ck.MODEL_FILE),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, kind):
    path = _saved(tmp_path)
    damage, name = DAMAGE[kind]
    damage(path)
    with pytest.raises(CheckpointError, match=rf"{path.name}.*: {name} is (damaged|missing)"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize("kind", ["model-truncated", "model-garbled-header", "state-empty", "state-cut"])
def test_old_checkpoint_without_record_still_parsed(tmp_path, kind):
    """Checkpoints from before the record: structural damage is still caught by parsing."""
    path = _saved(tmp_path)
    (path / INTEGRITY).unlink()
    damage, name = DAMAGE[kind]
    damage(path)
    with pytest.warns(UserWarning, match="no integrity.json"), \
            pytest.raises(CheckpointError, match=rf": {name} is damaged"):
        ck.load_checkpoint(path)


def test_old_checkpoint_without_record_loads_with_warning_unless_weights_non_finite(tmp_path):
    path = _saved(tmp_path)
    (path / INTEGRITY).unlink()
    logged = []
    model, mcfg, state = ck.load_checkpoint(path, log=logged.append)
    assert len(logged) == 1 and "no integrity.json" in logged[0] and state["step"] == 1
    # bytes turned into NaN inside the tensor data (0xFF.. is a NaN in fp32): refused
    _overwrite(ck.MODEL_FILE, lambda p, d: _tensor_data_offset(p) + 64, b"\xff")(path)
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged \(tensor .* non-finite"):
        ck.load_checkpoint(path, log=logged.append)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")], ids=["+inf", "-inf"])
@pytest.mark.parametrize("name", ["encoder.w", "decoder.b"])
def test_checkpoint_saved_with_infinite_weights_is_refused_naming_the_tensor(tmp_path, bad, name):
    """One +-inf element, saved as is (save_checkpoint writes what it is given and records its hash, so
    the integrity record matches): only the finiteness check stands between it and a resumed run."""
    g = torch.Generator().manual_seed(3)
    sd = {"encoder.w": torch.randn(64, 32, generator=g), "decoder.b": torch.randn(100, generator=g)}
    sd[name].view(-1)[37] = bad
    path = ck.save_checkpoint(tmp_path, 1, sd, {"name": "x", "dim": 4}, _fake_state(1), "run: {}\n", keep=5)
    assert ck.verify_integrity(path) is True
    with pytest.raises(CheckpointError, match=rf"{path.name}'?: model.safetensors is damaged "
                                              rf"\(tensor '{name}' holds non-finite values\)"):
        ck.load_checkpoint(path)


def test_resume_refuses_checkpoints_with_infinite_weights(tmp_path, capsys):
    """`aimv2 train --resume`: a checkpoint holding +inf (the newest) and one holding -inf (the one before)
    are both refused naming the tensor, and the run stops with one error line instead of resuming."""
    from aimv2.train import train
    out = tmp_path / "run"
    train(_tiny(out, **{"run.steps": 4}))                              # checkpoints 2 and 4
    named = {}
    for path, bad in zip(ck.list_checkpoints(out), (float("-inf"), float("inf"))):
        model, mcfg, state = ck.load_checkpoint(path)
        name = sorted(k for k, v in model.items() if v.is_floating_point() and v.numel() > 1)[len(named)]
        model[name].view(-1)[1] = bad
        ck.save_checkpoint(out, state.pop("step"), model, mcfg, state, (path / ck.CONFIG_FILE).read_text(), keep=5)
        assert ck.verify_integrity(path) is True                        # re-saved whole: only the values are bad
        named[path.name] = name
    capsys.readouterr()
    assert cli_main(["train", "--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "resumed from" not in err
    for ckpt, name in named.items():
        assert f"{ckpt}': model.safetensors is damaged (tensor {name!r} holds non-finite values)" in err
    assert err.rstrip().splitlines()[-1].startswith("error: --resume: none of the 2 checkpoint(s) under")


def test_disk_full_names_path_and_bytes_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno
    import shutil
    prev = _saved(tmp_path, steps=(1,))
    sd = {"encoder.w": torch.zeros(1000, 250)}                       # 1,000,000 bytes of fp32

    # torch.save reports a full disk as its own RuntimeError; the file system says how much is free
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(ck.torch, "save", full)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(DiskFullError) as e:
        ck.save_checkpoint(tmp_path, 2, sd, {"name": "x"}, _fake_state(2), "run: {}\n", keep=5)
    msg = str(e.value)
    assert "step_00000002" in msg and "4,096 bytes are free" in msg and "unexpected pos" in msg
    need = int(msg.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert need >= 1_000_000
    assert f"previous checkpoint {str(prev)!r} is intact" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]   # no temp left
    assert ck.verify_integrity(prev) and ck.load_checkpoint(prev)[2]["step"] == 1

    # a plain ENOSPC from Python I/O, with free space reported as plenty (a quota): still disk full
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage)
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError, match="disk full writing checkpoint .*step_00000002"):
        ck.save_checkpoint(tmp_path, 2, sd, {"name": "x"}, _fake_state(2), "", keep=5)
    # any other write error is not called a full disk, and leaves no temp either
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        ck.save_checkpoint(tmp_path, 2, sd, {"name": "x"}, _fake_state(2), "", keep=5)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


# ----------------------------------------------------------------------------- resume fallback
def _tiny(out, **over):
    from _train_common import tiny_cfg
    return tiny_cfg(out, **{"run.steps": 6, "run.ckpt_every": 2, "run.keep_ckpts": 2, **over})


@pytest.fixture(scope="module")
def random_reference(tmp_path_factory):
    from aimv2.train import train
    out = tmp_path_factory.mktemp("rref") / "run"
    train(_tiny(out))
    return losses(out)


@pytest.mark.parametrize("kind", ["model-zeroed-tensor-bytes", "state-cut"])
def test_resume_falls_back_to_the_newest_whole_checkpoint(tmp_path, random_reference, kind, capsys):
    from aimv2.train import train
    out = tmp_path / "run"
    train(_tiny(out, **{"run.steps": 4}))                              # checkpoints 2 and 4
    newest = ck.latest_checkpoint(out)
    assert newest.name == "step_00000004"
    DAMAGE[kind][0](newest)
    capsys.readouterr()
    res = train(_tiny(out, **{"run.resume": True}))
    err = capsys.readouterr().err
    assert f"step_00000004': {DAMAGE[kind][1]} is damaged" in err
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in err
    assert (out / "damaged-checkpoints" / "step_00000004").is_dir()       # set aside, kept for inspection
    assert "damaged checkpoint step_00000004 moved to" in err
    assert res.step == 6 and losses(out) == random_reference            # steps 3..6 redone exactly
    assert [p.name for p in ck.list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    assert all(ck.verify_integrity(p) for p in ck.list_checkpoints(out))


def test_resume_with_no_whole_checkpoint_is_one_error_line(tmp_path, capsys):
    from aimv2.train import train
    out = tmp_path / "run"
    train(_tiny(out, **{"run.steps": 4}))
    for p in ck.list_checkpoints(out):
        DAMAGE["model-zeroed-tensor-bytes"][0](p)
    capsys.readouterr()
    assert cli_main(["train", "--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: --resume: none of the 2 checkpoint(s) under") and "step_00000004" in last
    assert err.count("model.safetensors is damaged") == 2                  # each one named in the log
    assert [p.name for p in ck.list_checkpoints(out)] == ["step_00000002", "step_00000004"]   # untouched
