"""One error path for the command line: every error a user can cause is one `error: ...` line on
stderr naming the file or option, exit code 2 (config) or 1 (runtime), no traceback; `--debug` (before
or after the command) or AIMV2_DEBUG=1 adds the traceback. Runs `aimv2.cli.main(argv)` in-process."""
import os
import subprocess
import sys

import pytest
import torch

from aimv2 import errors
from aimv2.cli import main
from aimv2.train import checkpoint as ck
from _train_common import REPO, TINY_SET, cli_env


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs a user may get wrong: good shards, an empty dir, garbage 'tars', a text file, a broken
    YAML, a broken tokenizer, a run directory that already holds a checkpoint."""
    from aimv2.data.synth import write_synthetic_dataset

    d = tmp_path_factory.mktemp("inputs")
    write_synthetic_dataset(str(d / "good"), num=8, size=64, seed=0, shard_size=8, progress=False, workers=1)
    (d / "empty").mkdir()
    (d / "garbage").mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("a.tar", "b.tar"):
        (d / "garbage" / name).write_bytes(bytes(torch.randint(0, 256, (5000,), generator=g).tolist()))
    (d / "notes.txt").write_text("hello\n")
    (d / "bad.yaml").write_text("run: [1\n")
    (d / "tokenizer.json").write_text("{}")
    ck.save_checkpoint(d / "used", 1, {"encoder.w": torch.zeros(2)}, {"name": "x"},
                       {"rng": ck.rng_state()}, "", keep=1)
    return d


def _train(d, *extra):
    args = ["train", "--preset", "aimv2-tiny", "--data", str(d / "good" / "00000.tar"), "--out",
            str(d / "runs" / "x"), "--steps", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    for s in TINY_SET + ["data.num_workers=0", "run.plot=false"]:
        args += ["--set", s]
    return args + list(extra)


# (id, argv builder, exit code, substrings the one line must hold)
CASES = [
    ("tokenizer-missing", lambda d: _train(d, "--set", f"data.tokenizer={d / 'nope.json'}"), 1, ["nope.json"]),
    ("tokenizer-broken", lambda d: _train(d, "--set", f"data.tokenizer={d / 'tokenizer.json'}"), 2,
     ["tokenizer.json", "not a valid"]),
    ("data-missing", lambda d: _train(d, "--data", str(d / "nope")), 1, ["nope"]),
    ("data-empty-dir", lambda d: _train(d, "--data", str(d / "empty")), 1, ["empty"]),
    ("data-all-garbage", lambda d: _train(d, "--data", str(d / "garbage")), (1, 2), ["garbage"]),
    ("data-not-a-tar", lambda d: _train(d, "--data", str(d / "notes.txt")), (1, 2), ["notes.txt"]),
    ("device-unknown", lambda d: _train(d, "--device", "tpu9"), 2, ["run.device", "tpu9"]),
    ("batch-not-divisible", lambda d: _train(d, "--grad-accum", "3"), 2, ["optim.grad_accum", "batch_size=4"]),
    ("vocab-too-small", lambda d: _train(d, "--set", "model.vocab_size=10"), 2, ["model.vocab_size"]),
    ("run-dir-used", lambda d: _train(d, "--out", str(d / "used")), 2, ["used", "already holds checkpoints"]),
    ("out-under-a-file", lambda d: _train(d, "--out", str(d / "notes.txt" / "run")), 1, ["notes.txt"]),
    ("steps-zero", lambda d: _train(d, "--steps", "0"), 2, ["run.steps"]),
    ("set-unknown-key", lambda d: _train(d, "--set", "run.stepz=3"), 2, ["run.stepz"]),
    ("set-bad-value", lambda d: _train(d, "--set", "optim.lr=fast"), 2, ["optim.lr", "fast"]),
    ("config-missing", lambda d: ["train", "--config", str(d / "nope.yaml")], 2, ["nope.yaml"]),
    ("config-not-yaml", lambda d: ["train", "--config", str(d / "bad.yaml")], 2, ["bad.yaml", "line 2"]),
    ("no-preset", lambda d: ["train", "--out", str(d / "runs" / "y")], 2, ["--preset"]),
    ("plot-missing", lambda d: ["plot", str(d / "nope")], 2, ["nope"]),
    ("index-missing", lambda d: ["data", "index", str(d / "nope")], 1, ["nope"]),
    ("inspect-not-a-tar", lambda d: ["data", "inspect", str(d / "notes.txt")], 1, ["no usable sample", "1 shard"]),
    ("inspect-all-garbage", lambda d: ["data", "inspect", str(d / "garbage")], (1, 2), ["garbage"]),
    ("embed-missing-checkpoint", lambda d: ["embed", "--checkpoint", str(d / "nope"), "--data", str(d / "empty"),
                                            "--out", str(d / "e.safetensors")], 1, ["nope"]),
    ("probe-no-checkpoint", lambda d: ["probe", "--train", str(d / "good"), "--val", str(d / "good")], 2,
     ["--checkpoint"]),
    ("probe-bad-lrs", lambda d: ["probe", "--checkpoint", str(d / "nope"), "--train", str(d / "good"),
                                 "--val", str(d / "good"), "--lrs", "x"], 2, ["--lrs"]),
    ("info-img-size", lambda d: ["info", "--preset", "aimv2-tiny", "--img-size", "50"], 2, ["img_size 50"]),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-without-gpu", lambda d: _train(d, "--device", "cuda"), 2, ["run.device", "cuda"]))


def _error_line(err: str) -> str:
    """The one `error:` line of stderr (log lines before it are allowed; no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    errs = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errs) == 1 and err.rstrip().splitlines()[-1] == errs[0], err[-3000:]
    return errs[0]


@pytest.mark.parametrize("argv, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line(files, argv, code, words, capsys, monkeypatch):
    monkeypatch.delenv("AIMV2_DEBUG", raising=False)
    rc = main(argv(files))
    line = _error_line(capsys.readouterr().err)
    assert rc in (code if isinstance(code, tuple) else (code,)), line
    for w in words:
        assert w in line, line


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_debug_shows_the_traceback(files, where, capsys, monkeypatch):
    argv = _train(files, "--grad-accum", "3")
    monkeypatch.delenv("AIMV2_DEBUG", raising=False)
    if where == "before":
        argv = ["--debug"] + argv
    elif where == "after":
        argv = argv + ["--debug"]
    else:
        monkeypatch.setenv("AIMV2_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "micro_batch_size" in err
    assert err.rstrip().splitlines()[-1].startswith("error: data.batch_size=4")


def test_describe_maps_exceptions():
    import errno
    assert errors.describe(errors.ConfigError("a\n  b")) == (2, "a b")
    assert errors.describe(ValueError("v")) == (2, "v")
    assert errors.describe(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")) == \
        (1, "'/x/y': No such file or directory")
    code, msg = errors.describe(OSError(errno.ENOSPC, "No space left on device", "/ckpt/f"))
    assert code == 1 and msg.startswith("disk full writing '/ckpt/f'")
    code, msg = errors.describe(KeyError("k"))
    assert code == 1 and msg.startswith("KeyError: 'k'") and "--debug" in msg
    assert errors.describe(errors.DiskFullError("no room"))[0] == 1


def test_console_entry_point_exit_code(files):
    """The same through a real process (python -m aimv2.cli): exit status and stderr."""
    r = subprocess.run([sys.executable, "-m", "aimv2.cli", "data", "index", str(files / "nope")], cwd=REPO,
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "nope" in r.stderr


def test_train_with_nan_weights_exits_1(files, tmp_path, capsys, monkeypatch):
    """A model with a NaN weight makes every step non-finite (all skipped): one error line, exit 1."""
    from aimv2.train import trainer

    class NaNWeight(trainer.AIMv2Pretrainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            with torch.no_grad():
                next(self.parameters()).view(-1)[0] = float("nan")
    monkeypatch.setattr(trainer, "AIMv2Pretrainer", NaNWeight)
    rc = main(_train(files, "--out", str(tmp_path / "run"), "--steps", "2"))
    line = _error_line(capsys.readouterr().err)
    assert rc == 1 and "every step of this run (steps 1..2)" in line and "non-finite" in line


def test_disk_full_during_training_is_one_line(files, tmp_path, capsys, monkeypatch):
    """A full disk at a checkpoint write: one error line naming the checkpoint and the bytes needed."""
    import shutil
    real_save, usage = torch.save, shutil.disk_usage(tmp_path)

    def save_then_full(obj, f, *a, **k):
        if obj.get("step") == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(ck.torch, "save", save_then_full)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=0))
    out = tmp_path / "run"
    rc = main(_train(files, "--out", str(out), "--steps", "2", "--ckpt-every", "1"))
    line = _error_line(capsys.readouterr().err)
    assert rc == 1 and line.startswith(f"error: disk full writing checkpoint {str(out / 'checkpoints' / 'step_00000002')!r}")
    assert "needs about" in line and "bytes" in line and "step_00000001' is intact" in line
    assert [p.name for p in ck.list_checkpoints(out)] == ["step_00000001"]


@pytest.mark.parametrize("argv, words", [
    (["train", "--preset", "nope"], ["aimv2 train", "--preset", "nope"]),
    (["train", "--steps", "many"], ["--steps", "many"]),
    (["data", "synth"], ["aimv2 data synth", "--out"]),
    (["bogus"], ["bogus"]),
], ids=["bad-choice", "bad-int", "missing-required", "unknown-command"])
def test_usage_error_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = _error_line(capsys.readouterr().err)
    assert all(w in line for w in words) and "--help" in line
