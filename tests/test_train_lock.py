"""One run per output folder (aimv2/train/lock.py): a second `aimv2 train --out DIR` while a run holds
DIR is refused with one line naming it (host, pid, start time); a lock whose holder is gone (a dead
pid on this host, a lock another host stopped refreshing, a predecessor of the same torchrun job) is
taken over with a message; a finished or failed run leaves no lock behind."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from _train_common import TINY_SET, cli_env, slow_cli, tiny_cfg
from aimv2.cli import main as cli_main
from aimv2.train import lock as L
from aimv2.train.trainer import train

LOCK = L.LOCK_NAME


def _args(out, *extra):
    args = ["train", "--preset", "aimv2-tiny", "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--log-every", "1", "--ckpt-every", "0", "--no-progress", "--device", "cpu"]
    for s in TINY_SET + ["data.source=random", "run.plot=false"]:
        args += ["--set", s]
    return args + list(extra)


def _write_lock(out, **holder):
    out.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-06T00:00:00+00:00",
            "run_id": None, "command": "aimv2 train"}
    (out / LOCK).write_text(json.dumps({**base, **holder}))
    return out / LOCK


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_cli_run_is_refused_then_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = slow_cli(0.5, _args(out, "--steps", "200"), env=cli_env())
    try:
        t0 = time.time()
        while not (out / "metrics.jsonl").exists():                    # the first run is training
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() - t0 < 600, "the first run never started training"
            time.sleep(0.1)
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname() and holder["started"]
        assert cli_main(_args(out)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by another run" in err[0], err
        assert f"pid {first.pid}" in err[0] and socket.gethostname() in err[0] and holder["started"] in err[0]
        assert (out / LOCK).exists()                                     # the refused run did not touch it
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert cli_main(_args(tmp_path / "other")) == 0                     # another folder was never locked
    assert cli_main(_args(out, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert f"took over the run lock of {out} from host {socket.gethostname()} pid {first.pid}" in err
    assert f"pid {first.pid} is no longer running" in err
    assert not (out / LOCK).exists()                                     # released at the end


def test_lock_is_held_and_refreshed_while_training_and_gone_after(tmp_path):
    from aimv2.train.callbacks import Callback
    seen = []

    class Look(Callback):
        def on_log(self, trainer, row):
            p = tmp_path / "run" / LOCK
            seen.append((json.loads(p.read_text()), p.stat().st_mtime))

    (tmp_path / "run").mkdir()
    stale = _write_lock(tmp_path / "run", pid=_dead_pid())
    os.utime(stale, (time.time() - 100, time.time() - 100))
    train(tiny_cfg(tmp_path / "run", **{"run.steps": 3}), callbacks=[Look()])
    assert [h["pid"] for h, _ in seen] == [os.getpid()] * 3
    assert seen[-1][1] > time.time() - 60                                # refreshed, not the old mtime
    assert not (tmp_path / "run" / LOCK).exists()


def test_failed_setup_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, **{"run.steps": 2, "run.ckpt_every": 2}))
    with pytest.raises(ValueError, match="already holds checkpoints"):    # no --resume on a used folder
        train(tiny_cfg(out, **{"run.steps": 2}))
    assert not (out / LOCK).exists()


def test_who_is_gone():
    me = {"host": "h1", "pid": 10, "run_id": None}
    alive = os.getpid()
    assert L.holder_gone({"host": "h1", "pid": alive}, 5.0, me) is None                        # running here
    assert "no longer running" in L.holder_gone({"host": "h1", "pid": _dead_pid()}, 5.0, me)
    assert "this process" in L.holder_gone({"host": "h1", "pid": 10}, 5.0, me)
    assert L.holder_gone({"host": "h2", "pid": alive}, L.STALE_S - 1, me) is None               # other host
    assert "not refreshed" in L.holder_gone({"host": "h2", "pid": alive}, L.STALE_S + 1, me)
    job = dict(me, run_id="job7")
    assert "same torchrun job" in L.holder_gone({"host": "h2", "pid": alive, "run_id": "job7"}, 1.0, job)
    none = dict(me, run_id="none")                    # torchrun's default id: two jobs can share it
    assert L.holder_gone({"host": "h2", "pid": alive, "run_id": "none"}, 1.0, none) is None
    assert L.holder_gone("garbage", 5.0, me) is None and "unreadable" in L.holder_gone("garbage", 61.0, me)


def test_another_hosts_fresh_lock_refuses_a_stale_one_is_taken(tmp_path, capsys):
    out = tmp_path / "run"
    lock = _write_lock(out, host="node-b", pid=1234)
    assert cli_main(_args(out)) == 1
    assert "host node-b, pid 1234" in capsys.readouterr().err
    old = time.time() - L.STALE_S - 60
    os.utime(lock, (old, old))
    assert cli_main(_args(out)) == 0
    assert "took over the run lock" in capsys.readouterr().err and not lock.exists()


def test_resume_needs_a_checkpoint_and_resume_auto_starts_without_one(tmp_path, capsys):
    """--resume on a folder with no checkpoint is an error naming it (a mistyped --out must not
    start a new run silently); --resume auto starts there, and continues where one exists: the one
    command an elastic restart (torchrun --max-restarts) can repeat."""
    out = tmp_path / "run"
    assert cli_main(_args(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume: no checkpoint under" in err and "--resume auto" in err and not (out / "metrics.jsonl").exists()
    assert cli_main(_args(out, "--resume", "auto", "--ckpt-every", "2")) == 0
    assert "--resume auto: no checkpoint" in capsys.readouterr().err
    assert cli_main(_args(out, "--resume", "auto", "--steps", "5")) == 0
    assert f"resumed from {out / 'checkpoints' / 'step_00000003'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(_args(out, "--resume", "bogus"))
    assert e.value.code == 2 and "expected nothing or 'auto'" in capsys.readouterr().err
