"""torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 give the losses of a 1-process run with the
same global batch, and an FSDP2 checkpoint written by 2 ranks resumes in 1 process.

Same global batch: `data.source=random` generates sample k of the global stream from (seed, k) only;
one process with grad_accum=2 micro-batches of 2 sees samples [4s, 4s+2) then [4s+2, 4s+4) at step s,
and 2 ranks with micro-batch 2 see exactly those two halves. The per-step loss is the mean of the two
half-batch losses in both cases and the gradient is the mean of the two half-batch gradients (DDP
all-reduce average / FSDP reduce-scatter average vs accumulation with loss / 2), so the runs agree up
to fp32 summation order: rtol 1e-5 per step (measured: identical to the printed digits).

Elastic restarts (`torchrun --max-restarts 1 ... --resume auto`, rendezvous c10d): a rank SIGKILLed
after a step (DDP) or rank 0 SIGKILLed half-way through writing a checkpoint (FSDP2); the group
restarts, resumes from the newest whole checkpoint, and ends with the weights of the uninterrupted
2-rank run bit for bit (fault hooks: tests/_torchrun_main.py, first attempt only).
"""
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from aimv2.cli import main as cli_main
from _train_common import REPO, TINY_SET, cli_env, losses
from aimv2.train import checkpoint as ck

STEPS = 6


def _args(out, steps, *extra):
    args = ["train", "--preset", "aimv2-tiny", "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--log-every", "1", "--ckpt-every", "3", "--no-progress", "--device", "cpu"]
    for s in TINY_SET + ["data.source=random", "run.plot=false", "optim.lr=3e-3", "optim.warmup_steps=2",
                         "optim.decay_steps=20"]:
        args += ["--set", s]
    return args + list(extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=600, restarts=0, **env):
    """2 ranks of `aimv2 train args` (through tests/_torchrun_main.py); both must exit 0 having freed
    their DDP / FSDP2 modules and destroyed the process group. `restarts` > 0: an elastic job
    (--max-restarts, c10d rendezvous), `env` its fault hooks."""
    rdzv = (["--max-restarts", str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
             "--rdzv-id", "elastic-test"] if restarts else
            ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *rdzv,
           str(REPO / "tests" / "_torchrun_main.py"), *args]
    p = subprocess.run(cmd, cwd=REPO, env=cli_env(OMP_NUM_THREADS=1, **env), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("after the run: fsdp_modules=0 ddp_modules=0 process_group=destroyed") == 2, \
        [ln for ln in p.stdout.splitlines() if ln.startswith("after the run")]
    return p


def _weights(out) -> dict:
    """The final (step STEPS) checkpoint's weights."""
    from safetensors.torch import load_file
    return load_file(str(out / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


def _bit_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} of {len(a)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli_main(_args(out, STEPS, "--grad-accum", "2")) == 0
    return losses(out)


def _close(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    torch.testing.assert_close(torch.tensor([a[k] for k in sorted(a)], dtype=torch.float64),
                               torch.tensor([b[k] for k in sorted(b)], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The uninterrupted 2-rank DDP run (STEPS steps, checkpoints at 3 and 6) and its stderr."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    p = _torchrun(_args(out, STEPS, "--set", "run.distributed=ddp"))
    assert p.stdout.count("checkpoint  ") == 1                    # only rank 0 reports / writes
    return out, p.stderr


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The uninterrupted 2-rank FSDP2 run (STEPS steps, checkpoints every 2) and its stderr."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    p = _torchrun(_args(out, STEPS, "--ckpt-every", "2", "--set", "run.distributed=fsdp"))
    return out, p.stderr


def test_ddp_two_ranks_match_one_process(reference, ddp_run):
    out, stderr = ddp_run
    assert "cpu x2 (ddp) | batch 4 = 2 x 1 x 2" in stderr
    _close(losses(out), reference)


def test_fsdp_two_ranks_match_and_resume_on_one_process(reference, fsdp_run, tmp_path):
    src, stderr = fsdp_run
    assert "cpu x2 (fsdp)" in stderr
    _close(losses(src), reference)
    out = tmp_path / "fsdp"                                   # the run as it stood at step 2
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    state = ck.load_checkpoint(ck.latest_checkpoint(out))[2]
    assert state["world_size"] == 2 and state["step"] == 2
    assert state["data_per_rank"] == [{"epoch": 0, "sample": 8}] * 2          # 2 steps x 2 ranks x 2
    # full (gathered) state: every optimizer entry has the parameter's full shape
    model_sd = ck.load_checkpoint(ck.latest_checkpoint(out))[0]
    for name, st in state["optimizer"]["state"].items():
        assert st["exp_avg"].shape == model_sd[name].shape, name
    # resume the 2-rank FSDP checkpoint in one process (same global batch via accumulation)
    assert cli_main(_args(out, STEPS, "--grad-accum", "2", "--resume")) == 0
    _close({k: v for k, v in losses(out).items() if k > 2}, {k: v for k, v in reference.items() if k > 2})


def test_elastic_ddp_rank_killed_mid_run_resumes_to_the_same_weights(ddp_run, tmp_path):
    """Rank 1 SIGKILLed after step 4: the restarted group resumes from step 3 and ends bit-equal."""
    out = tmp_path / "ddp"
    p = _torchrun(_args(out, STEPS, "--resume", "auto", "--set", "run.distributed=ddp"), restarts=1,
                  AIMV2_TEST_KILL_AT="1:4")
    assert "rank 1: SIGKILL (fault injection)" in p.stdout
    assert "--resume auto: no checkpoint under" in p.stderr                   # attempt 0 started the run
    assert f"resumed from {out / 'checkpoints' / 'step_00000003'} at step 3" in p.stderr
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    _bit_equal(_weights(out), _weights(ddp_run[0]))


def test_elastic_fsdp_rank0_killed_writing_a_checkpoint_resumes_from_the_last_whole_one(fsdp_run, tmp_path):
    """Rank 0 SIGKILLed between model.safetensors and train_state.pt of checkpoint 4 (its run lock left
    behind): the restarted group takes the lock over, skips the partial checkpoint, resumes from step 2
    and ends bit-equal to the uninterrupted FSDP2 run."""
    out = tmp_path / "fsdp"
    p = _torchrun(_args(out, STEPS, "--ckpt-every", "2", "--resume", "auto", "--set", "run.distributed=fsdp"),
                  restarts=1, AIMV2_TEST_KILL_IN_CKPT="4")
    assert "rank 0: SIGKILL (fault injection)" in p.stdout
    assert "took over the run lock" in p.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in p.stderr
    assert [c.name for c in ck.list_checkpoints(out)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list((out / "checkpoints").glob(".tmp-*"))                     # the partial one cleared
    _bit_equal(_weights(out), _weights(fsdp_run[0]))


def test_native_packs_fsdp_matches_ddp(tmp_path):
    """--native under torchrun: each rank trains on its own packs (data.source=random streams per rank,
    the same in both runs); FSDP2 all-gathers for the packed encoder / decoder entry points
    (forward_packed, registered as forward methods) and gives DDP's losses."""
    native = ["--native", "--min-patches", "4", "--max-patches", "20", "--tokens-per-batch", "50"]
    runs = {}
    for mode in ("ddp", "fsdp"):
        p = _torchrun(_args(tmp_path / mode, 3, *native, "--set", f"run.distributed={mode}"))
        assert f"cpu x2 ({mode}) | native: 2 x 1 packs of <= 50 patches" in p.stderr
        runs[mode] = losses(tmp_path / mode)
    _close(runs["fsdp"], runs["ddp"])


def test_fsdp_float8_matches_ddp_float8(tmp_path):
    """run.float8 composes with FSDP2 (tensorwise: float8 all-gather of the sharded weights, scales
    refreshed after each optimizer step) as with DDP: 2 ranks each, torchao's emulation, the same
    losses to fp32 summation order, and fp32 checkpoints (tests/test_train_float8.py has the numerics)."""
    from aimv2.train import float8 as F8
    if F8.torchao_version() is None:
        pytest.skip("torchao is not installed (pip install 'aimv2[fp8]'; make setup installs it)")
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        p = _torchrun(_args(out, 3, "--float8", "tensorwise", "--set", "run.float8_emulate=true",
                            "--set", "run.float8_min_dim=16", "--set", f"run.distributed={mode}"))
        assert "float8 tensorwise (emulated)" in p.stderr
        runs[mode] = losses(out)
        sd = ck.load_checkpoint(ck.latest_checkpoint(out))[0]
        assert all(t.dtype == torch.float32 and type(t) is torch.Tensor for t in sd.values())
    _close(runs["fsdp"], runs["ddp"])
