"""Wrap a model for one process, DataParallel, or DistributedDataParallel.

``dp`` (one process driving every visible GPU) and ``ddp`` (one process per GPU) are
both offered so they can be compared honestly (``launch.py bench``); ``dp`` inside a
multi-process world would replicate each rank's model over GPUs other ranks own, so it
is refused there.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from distrib.context import DistContext
from distrib.errors import LaunchError

log = logging.getLogger(__name__)


def resolve_mode(mode: str, ctx: DistContext) -> str:
    """auto -> ddp with several processes, else none; dp only in a single-process world."""
    if mode == "auto":
        return "ddp" if ctx.distributed else "none"
    if mode == "fsdp" and not ctx.distributed:
        raise LaunchError("fsdp shards a model over several processes; this job has one")
    if mode == "dp" and ctx.distributed:
        raise LaunchError(
            f"parallel.mode = 'dp' (DataParallel) runs in one process, but this job has "
            f"{ctx.world_size} processes. Use parallel.mode = 'ddp' (or auto) with several "
            "processes, or start one process (no --nproc-per-node) for dp."
        )
    if mode == "ddp" and not ctx.distributed:
        log.info("parallel.mode = 'ddp' with one process: training without a wrapper")
        return "none"
    return mode


def wrap(model: nn.Module, ctx: DistContext, mode: str, sync_bn: bool = False) -> nn.Module:
    """Return the model wrapped for ``mode`` (already on ``ctx.device``)."""
    mode = resolve_mode(mode, ctx)
    if mode == "dp":
        if ctx.device == "cpu" or torch.cuda.device_count() < 2:
            log.info(
                "DataParallel on %s: a plain module call (it splits batches only over two or more GPUs)",
                "the CPU" if ctx.device == "cpu" else "one GPU",
            )
        return nn.DataParallel(model)
    if mode == "ddp":
        if sync_bn and not ctx.is_cuda:
            raise LaunchError(
                "parallel.sync_bn needs CUDA: torch's SyncBatchNorm runs on GPU modules only. "
                "On the CPU set parallel.sync_bn = false."
            )
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [torch.device(ctx.device).index] if ctx.is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if mode == "fsdp":
        return shard(model, ctx)
    return model


def shard(model: nn.Module, ctx: DistContext) -> nn.Module:
    """FSDP2 (``fully_shard``): each top-level child with parameters, then the root, over all ranks.

    Used by ``bench parallel``; ``train`` does not offer it yet (its checkpoints hold plain tensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if ctx.is_cuda else "cpu", (ctx.world_size,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DataParallel / DDP (what checkpoints store)."""
    while isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        model = model.module
    return model
