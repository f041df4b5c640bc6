"""Multi-process training: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; we pick the backend and the wrapper.

DDP (default) replicates the model and averages gradients; FSDP (`--fsdp`, PyTorch's `fully_shard`,
one unit per block) shards parameters, gradients and optimizer state for models that do not fit one
device. Rank 0 alone prints and writes files; full (unsharded) state dicts are gathered for it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from codellm.errors import UserError
from codellm.model import Transformer


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None) -> Dist:
    """Join the process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    from codellm.options import resolve_device

    dev = torch.device(resolve_device(device))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)  # nccl and all_gather_object use the current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: Transformer, d: Dist, fsdp: bool) -> nn.Module:
    """The module to train: the model itself, DDP around it, or the model sharded in place by FSDP."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if d.world == 1:
            raise UserError("--fsdp shards across ranks: launch with torchrun --nproc_per_node N (N > 1)")
        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def no_grad_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    return _all_reduce(values, d, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float], d: Dist) -> list[float]:
    return _all_reduce(values, d, dist.ReduceOp.MAX)


def _all_reduce(values: list[float], d: Dist, op) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def gather(obj, d: Dist) -> list:
    """`obj` of every rank, in rank order (on every rank)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def full_model(model: nn.Module, fsdp: bool, d: Dist) -> Transformer | None:
    """The unsharded model on rank 0 (None elsewhere); call on every rank. Without FSDP: the model itself."""
    if not fsdp:
        return model if d.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    with torch.device("meta"):
        copy = Transformer(model.cfg)
    copy.load_state_dict(state, assign=True)
    return copy


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> dict:
    if not fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
