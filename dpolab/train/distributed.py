"""Data parallelism on torch.distributed: the same script runs alone or under ``torchrun --nproc_per_node=N``.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) every process joins one process group
(NCCL on GPUs, gloo on CPUs), holds a replica of the policy wrapped in DDP — or a shard of it with
FSDP (``fully_shard``) for models that do not fit — and works on its own share of each global batch.
DDP averages gradients over processes; the trainer scales each process's loss by the number of
processes so that the average is the mean over the pairs of the whole global batch (exact
accumulation). Metrics are sums reduced across processes; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dpolab.data.device import resolve_device


@dataclass
class DistributedContext:
    """Where this process stands: rank, number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0


def setup(device: str = "auto") -> DistributedContext:
    """Join the torchrun process group if there is one, and pick this process's device.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda[:N]"``; under torchrun
            a CUDA process uses GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    single = resolve_device(device)  # checks the setting, and that CUDA exists where it is asked for
    if world_size == 1:
        return DistributedContext(device=single)
    use_cuda = single.type == "cuda"
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if owns:
        _import_group_default_holders()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank,
                              torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"), owns)


def _import_group_default_holders() -> None:
    """Import, before the process group exists, the module that would otherwise keep it alive after
    ``destroy_process_group``.

    ``torch.distributed.nn.functional`` declares its ten collectives with ``group=group.WORLD`` as a default
    argument. Imported after ``init_process_group`` — DDP's constructor imports it through ``torch._dynamo`` — those
    defaults hold the live default group, so ``destroy_process_group`` cannot free it: gloo's three threads (the TCP
    loop and two work loops) and its sockets outlive training and are torn down inside the interpreter's own
    shutdown, in module-teardown order, while the other process may be closing its end. That teardown is what
    aborted now and then with "terminate called without an active exception". Imported first, the defaults are None
    (the functions look the group up when called) and ``destroy_process_group`` joins the threads and closes the
    connections while both processes are still running normally.
    """
    import torch.distributed.nn.functional  # noqa: F401


def teardown(ctx: DistributedContext, synchronize: bool = True) -> None:
    """Leave the process group if :func:`setup` created it.

    The group's threads are joined here unless something still references it. One such thing is by design: an
    FSDP-sharded model (its parameters are DTensors on a DeviceMesh of the group), as :func:`dpolab.train.trainer.train`
    returns with ``fsdp=True`` (and DTensor operations on it, such as ``state_dict()``, fill DTensor's caches with the
    mesh again); drop it before the process ends (``del result``) so the group goes with it, and not in the
    interpreter's shutdown.

    Args:
        ctx: this process's context from :func:`setup`.
        synchronize: wait for every process first (after a run that finished normally), so that no process
            closes its connections while another is still in a collective; False when leaving because of an error,
            where the other processes may never arrive.
    """
    if ctx.owns_group and dist.is_initialized():
        if synchronize:
            dist.barrier()
        _release_dtensor_caches()
        dist.destroy_process_group()
        gc.collect()  # what held the group in reference cycles goes now, not at interpreter exit


def _release_dtensor_caches() -> None:
    """Empty DTensor's caches of sharding and redistribution plans, which hold DeviceMeshes, and through them the
    process group (FSDP2's shards are DTensors; gathering full weights for a checkpoint fills them).

    Left filled, they keep the group alive after ``destroy_process_group``, with the consequence described in
    :func:`_import_group_default_holders`. Only the caches of modules already imported are touched; they refill on
    the next use.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("torch.distributed.tensor"):
            continue
        values = list(vars(module).values())
        values += [v for cls in values if isinstance(cls, type) and cls.__module__ == name for v in vars(cls).values()]
        for value in values:  # e.g. _redistribute._gen_transform_infos, MeshTopoInfo.build_from_mesh
            value = getattr(value, "__func__", value)  # a staticmethod's or classmethod's function
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()
    clear_planners = getattr(sys.modules.get("torch.distributed.tensor._redistribute"),
                             "clear_redistribute_planner_cache", None)
    if clear_planners is not None:
        clear_planners()
    from torch.distributed.tensor import debug

    if hasattr(debug, "_clear_sharding_prop_cache"):  # "the recommended way to clear all sharding propagation caches"
        debug._clear_sharding_prop_cache()


def backend_threads() -> list[str]:
    """Names of this process's threads that belong to a communication backend (gloo's, NCCL's); Linux only, else [].

    Empty after :func:`teardown` when the process group was really freed: what tests check to show that nothing of
    the group is left to be torn down at interpreter exit.
    """
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for task in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, task, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(name for name in names if "gloo" in name or "nccl" in name.lower())


def wrap(model: torch.nn.Module, ctx: DistributedContext, fsdp: bool = False) -> torch.nn.Module:
    """The model as trained on this process: itself alone, DDP across processes, or FSDP-sharded."""
    if not ctx.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place, so it is its own module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: all-reduce gradients only on the last one of a step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Element-wise sum of ``values`` over processes (float64 on CPU for gloo; returned on CPU)."""
    if not ctx.enabled:
        return values.detach().cpu()
    buf = values.detach().to(ctx.device, torch.float64 if ctx.device.type == "cpu" else torch.float32)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def all_gather_objects(obj: Any, ctx: DistributedContext) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistributedContext) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistributedContext) -> None:
    """Wait for every process (no-op alone)."""
    if ctx.enabled:
        dist.barrier()


def model_state(model: torch.nn.Module, ctx: DistributedContext, fsdp: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on CPU; call on every process, use on rank 0."""
    if fsdp and ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def optimizer_state(model, optimizer, ctx: DistributedContext, fsdp: bool) -> dict[str, Any]:
    """Full optimiser state; call on every process, use on rank 0."""
    if fsdp and ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict[str, Any], ctx: DistributedContext, fsdp: bool) -> None:
    """Inverse of :func:`optimizer_state` (every process loads the full state)."""
    if fsdp and ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (sharded one by one so only one is gathered at a time)."""
    names = getattr(model, "_no_split_modules", None) or []
    layers = [m for m in model.modules() if type(m).__name__ in names]
    return layers or [layer for block in model.modules() if isinstance(block, torch.nn.ModuleList) for layer in block]
