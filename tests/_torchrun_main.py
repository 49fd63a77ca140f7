"""A torchrun worker for tests/test_train_distributed.py: `aimv2.cli.main(argv)`, then what is still
alive once it returned, before the interpreter exits. A finished run must have destroyed its process
group and freed every DDP / FSDP2 module (they hold the group's pending work: left to the
interpreter's exit, a backend thread frees it during teardown and the rank aborts), so the line reads
`after the run: fsdp_modules=0 ddp_modules=0 process_group=destroyed`."""
import gc
import sys

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from aimv2.cli import main

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    live = gc.get_objects()                     # no gc.collect(): what the interpreter would meet at exit
    print(f"after the run: fsdp_modules={sum(isinstance(o, FSDPModule) for o in live)} "
          f"ddp_modules={sum(isinstance(o, DistributedDataParallel) for o in live)} "
          f"process_group={'initialized' if dist.is_initialized() else 'destroyed'}", flush=True)
    sys.exit(rc)
