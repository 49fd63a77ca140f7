"""torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 give the losses of a 1-process run with the
same global batch, and an FSDP2 checkpoint written by 2 ranks resumes in 1 process.

Same global batch: `data.source=random` generates sample k of the global stream from (seed, k) only;
one process with grad_accum=2 micro-batches of 2 sees samples [4s, 4s+2) then [4s+2, 4s+4) at step s,
and 2 ranks with micro-batch 2 see exactly those two halves. The per-step loss is the mean of the two
half-batch losses in both cases and the gradient is the mean of the two half-batch gradients (DDP
all-reduce average / FSDP reduce-scatter average vs accumulation with loss / 2), so the runs agree up
to fp32 summation order: rtol 1e-5 per step (measured: identical to the printed digits).
"""
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


def _torchrun(args, timeout=600):
    """2 ranks of `aimv2 train args` (through tests/_torchrun_main.py); both must exit 0 having freed
    their DDP / FSDP2 modules and destroyed the process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(REPO / "tests" / "_torchrun_main.py"), *args]
    p = subprocess.run(cmd, cwd=REPO, env=cli_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("after the run: fsdp_modules=0 ddp_modules=0 process_group=destroyed") == 2, \
        [ln for ln in p.stdout.splitlines() if ln.startswith("after the run")]
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli_main(_args(out, STEPS, "--grad-accum", "2")) == 0
    return losses(out)


def _close(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    torch.testing.assert_close(torch.tensor([a[k] for k in sorted(a)], dtype=torch.float64),
                               torch.tensor([b[k] for k in sorted(b)], dtype=torch.float64), rtol=1e-5, atol=0)


def test_ddp_two_ranks_match_one_process(reference, tmp_path):
    out = tmp_path / "ddp"
    p = _torchrun(_args(out, STEPS, "--set", "run.distributed=ddp"))
    assert "cpu x2 (ddp) | batch 4 = 2 x 1 x 2" in p.stderr
    assert p.stdout.count("checkpoint  ") == 1                    # only rank 0 reports / writes
    _close(losses(out), reference)


def test_fsdp_two_ranks_match_and_resume_on_one_process(reference, tmp_path):
    out = tmp_path / "fsdp"
    p = _torchrun(_args(out, 3, "--set", "run.distributed=fsdp"))
    assert "cpu x2 (fsdp)" in p.stderr
    state = ck.load_checkpoint(ck.latest_checkpoint(out))[2]
    assert state["world_size"] == 2 and state["step"] == 3
    assert state["data_per_rank"] == [{"epoch": 0, "sample": 12}] * 2         # 3 steps x 2 ranks x 2
    # full (gathered) state: every optimizer entry has the parameter's full shape
    model_sd = ck.load_checkpoint(ck.latest_checkpoint(out))[0]
    for name, st in state["optimizer"]["state"].items():
        assert st["exp_avg"].shape == model_sd[name].shape, name
    # resume the 2-rank FSDP checkpoint in one process (same global batch via accumulation)
    assert cli_main(_args(out, STEPS, "--grad-accum", "2", "--resume")) == 0
    _close(losses(out), reference)


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
