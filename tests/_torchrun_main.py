"""A torchrun worker for tests/test_train_distributed.py: `aimv2.cli.main(argv)`, then what is still
alive once it returned, before the interpreter exits. A finished run must have destroyed its process
group and freed every DDP / FSDP2 module (they hold the group's pending work: left to the
interpreter's exit, a backend thread frees it during teardown and the rank aborts), so the line reads
`after the run: fsdp_modules=0 ddp_modules=0 process_group=destroyed`.

Fault injection for the elastic-restart tests, in the first attempt only (TORCHELASTIC_RESTART_COUNT=0),
so the restarted group runs clean:
  AIMV2_TEST_KILL_AT="RANK:STEP"   rank RANK SIGKILLs itself after optimizer step STEP (mid-run);
  AIMV2_TEST_KILL_IN_CKPT="STEP"   rank 0 SIGKILLs itself half-way through writing checkpoint STEP
                                   (model.safetensors written, train_state.pt not yet, no rename).
"""
import gc
import os
import signal
import sys

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from aimv2.cli import main
from aimv2.train import checkpoint, trainer
from aimv2.train.callbacks import Callback


def _die() -> None:
    print(f"rank {os.environ.get('RANK')}: SIGKILL (fault injection)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.step:
            _die()


def _install_faults() -> None:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank = os.environ.get("RANK", "0")
    kill_at = os.environ.get("AIMV2_TEST_KILL_AT")
    if kill_at and kill_at.split(":")[0] == rank:
        step, train = int(kill_at.split(":")[1]), trainer.train
        trainer.train = lambda cfg, *, loader=None, callbacks=(): train(
            cfg, loader=loader, callbacks=[*callbacks, _KillAt(step)])
    in_ckpt = os.environ.get("AIMV2_TEST_KILL_IN_CKPT")
    if in_ckpt:
        pause = checkpoint._debug_pause
        checkpoint._debug_pause = lambda step: _die() if step == int(in_ckpt) else pause(step)


if __name__ == "__main__":
    _install_faults()
    rc = main(sys.argv[1:])
    live = gc.get_objects()                     # no gc.collect(): what the interpreter would meet at exit
    print(f"after the run: fsdp_modules={sum(isinstance(o, FSDPModule) for o in live)} "
          f"ddp_modules={sum(isinstance(o, DistributedDataParallel) for o in live)} "
          f"process_group={'initialized' if dist.is_initialized() else 'destroyed'}", flush=True)
    sys.exit(rc)
