"""torchrun integration: process group, device, DDP / FSDP2 wrapping and full (gathered) state dicts.

- `torchrun --nproc-per-node K -m aimv2.cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; the
  process group uses NCCL on GPUs, gloo on CPUs.
- Elastic restarts (`torchrun --max-restarts N ... --resume auto`): every attempt of a torchrun job
  meets in the same agent store (same MASTER_ADDR / MASTER_PORT), where the previous attempt's
  process-group keys (each rank's gloo address, NCCL's unique id) are still stored, so a restarted
  rank can read a dead peer's address and fail (gloo: "connectFullMesh ... Connection refused") or
  hang. The process group therefore gets its keys under a prefix per attempt
  (TORCHELASTIC_RESTART_COUNT): see `_elastic_store`.
- "ddp": DistributedDataParallel over the whole pretrainer (gradients all-reduced in fp32).
- "fsdp": FSDP2 `fully_shard` on every encoder and decoder block, then on the encoder and the decoder
  (embeddings, heads, final norms), then the root. With bf16 precision:
  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), i.e. bf16 compute copies of fp32
  sharded master weights and fp32 gradient reduce-scatter; the root does not cast its inputs, so the
  losses see the fp32 images (pixel targets) and upcast the bf16 predictions.
- Checkpoints hold FULL state dicts (gathered to rank 0 with CPU offload, keyed by parameter name;
  optimizer state keyed by name too), so a run saved on K ranks resumes on any other world size.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    mode: str                   # "none" | "ddp" | "fsdp"
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"run.device={spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={spec!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _elastic_store(world: int):
    """torchrun's agent store with this restart attempt's own key prefix, or None outside torchelastic
    (plain env:// then). Measured (torch 2.13, gloo, 2 ranks, one killed): without the prefix the
    restarted ranks read attempt 0's addresses and fail; with it they resume (tests/test_train_elastic.py)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    from torch.distributed.constants import default_pg_timeout
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"aimv2/attempt_{attempt}", agent)


def init_distributed(mode: str, device_spec: str) -> DistInfo:
    """Read the torchrun environment, start the process group when WORLD_SIZE > 1, pick the mode."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _elastic_store(world)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    if world == 1:
        mode = "none"
    elif mode == "auto":
        mode = "ddp"
    elif mode == "none":
        raise ValueError(f"run.distributed='none' but WORLD_SIZE={world}: use 'ddp' or 'fsdp' under torchrun")
    return DistInfo(rank, world, local_rank, mode, device)


def wrap_model(model: nn.Module, info: DistInfo, bf16: bool) -> nn.Module:
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if info.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        kw, root_kw = {"mesh": mesh}, {"mesh": mesh}
        if bf16:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # the root keeps its fp32 inputs: the pixel-loss targets are patches of the fp32 images
            root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                        cast_forward_inputs=False)
        for blk in [*model.encoder.trunk.blocks, *model.decoder.trunk.blocks]:
            fully_shard(blk, **kw)
        fully_shard(model.encoder, **kw)          # patch embedding, position embedding, final norm
        fully_shard(model.decoder, **kw)          # projection, CLS, text embeddings, heads
        fully_shard(model, **root_kw)             # no parameters of its own left
        from torch.distributed.fsdp import register_fsdp_forward_method
        for part in (model.encoder, model.decoder):   # packed batches (method.md §8) enter through these
            register_fsdp_forward_method(part, "forward_packed")
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def grad_sync(model: nn.Module, info: DistInfo, sync: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce / reduce-scatter on all
    but the last micro-batch of an accumulation."""
    if info.mode == "ddp" and not sync:
        return model.no_sync()
    if info.mode == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on the CPU, keyed by parameter name. Collective under
    FSDP: every rank calls it; only rank 0's copy is complete."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                          optim_sd: dict | None) -> None:
    """Inverse of `full_state_dicts`; every rank passes the full dicts (read from the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def all_reduce_(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.world_size > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op])
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a host-side collective; used at checkpoints only)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
