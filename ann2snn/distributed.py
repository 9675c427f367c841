"""Data-parallel calibration and evaluation on torch.distributed (processes started by torchrun).

Every process takes a disjoint shard of the data (`shard`) and gathers its own statistics; before
anything is decided from them, they are combined exactly with all-reduce: activation maxima by max,
histogram and evaluation counts by sum (all integers, carried in int64 or float64, so sums do not
depend on the order of addition). The thresholds, accuracies and spike counts therefore come out
identical to one process's run on all the data. The library combines automatically whenever a
process group of more than one process is initialised, so every process must make the same calls.

A process that fails raises on its own; the others are stopped by torchrun (which ends the whole job
when one worker exits non-zero) or, launched otherwise, by the collective timeout of the group.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

DEFAULT_TIMEOUT = timedelta(minutes=10)
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
# Exact transport types: counts stay integers, floats keep their value, masks travel as bytes.
_TRANSPORT_DTYPES = {torch.bool: torch.uint8, int: torch.int64, float: torch.float64}


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """The process that prints and writes the outputs (rank 0; the only one without torchrun)."""
    return rank() == 0


@contextmanager
def process_group(device: torch.device, timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) for the duration: NCCL when computing on GPUs (each process on the GPU of its
    LOCAL_RANK), gloo on CPUs. A collective waiting longer than `timeout` for another process fails.
    A group initialised already, or a single process, is left as it is."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    yield
    # Only on success: a failing process just exits, and torchrun stops the others.
    dist.destroy_process_group()


def shard(dataset: Dataset[Any], batch_size: int) -> Dataset[Any]:
    """This process's share of `dataset` read in order in batches of `batch_size`: whole batches
    rank, rank + W, rank + 2W, ... of the single-process order (W processes), the last one possibly
    short. Unlike DistributedSampler, which pads the shards to equal length by repeating samples, no
    sample is repeated or dropped; shards differ by at most one batch. Each batch is the very batch one
    process would run, so even kernels whose rounding depends on the batch size give identical
    results. Iterate it with batches of the same `batch_size`, without shuffling."""
    if not is_distributed():
        return dataset
    processes, batches = world_size(), math.ceil(len(dataset) / batch_size)
    if batches < processes:
        raise ValueError(f"{len(dataset)} images make {batches} batch(es) of {batch_size}, fewer than the "
                         f"{processes} processes: each needs at least one; use a smaller batch size or fewer "
                         "processes")
    indices = [index for batch in range(rank(), batches, processes)
               for index in range(batch * batch_size, min((batch + 1) * batch_size, len(dataset)))]
    return Subset(dataset, indices)


def gather_in_order(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The leading batches of every process's shard (see `shard`) in the single-process order: process r's
    i-th batch is batch r + i x W. `batches` itself when not distributed; on this process's device."""
    if not is_distributed():
        return batches
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, [batch.cpu() for batch in batches])
    device = batches[0].device if batches else torch.device("cpu")
    return [part[i].to(device) for i in range(max(len(part) for part in gathered)) for part in gathered
            if i < len(part)]


def require_on_every_process(condition: bool, message: str) -> None:
    """Raise ValueError(message) on every process if `condition` fails on any, so that none is left
    waiting in a collective for a process that gave up."""
    if not is_distributed():
        if not condition:
            raise ValueError(message)
        return
    flags: list[Any] = [None] * world_size()
    dist.all_gather_object(flags, bool(condition))
    failed = [str(process) for process, ok in enumerate(flags) if not ok]
    if failed:
        raise ValueError(f"{message} (on process {', '.join(failed)} of {world_size()})")


def _leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{path}/{key}")]
    if isinstance(tree, (list, tuple)):
        return [leaf for index, item in enumerate(tree) for leaf in _leaves(item, f"{path}/{index}")]
    return [(path or "/", tree)]


def _rebuild(tree: Any, leaves: Iterator[Any]) -> Any:
    if isinstance(tree, dict):
        return {key: _rebuild(value, leaves) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(item, leaves) for item in tree)
    return next(leaves)


def _describe(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"tensor {tuple(leaf.shape)} {leaf.dtype}"
    if leaf is None or isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
        return type(leaf).__name__
    raise TypeError(f"cannot combine a {type(leaf).__name__} across processes: only tensors, ints, floats and None")


def _communication_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_over_processes(tree: Any, op: str) -> Any:
    """The element-wise 'sum' or 'max' over all processes of every tensor, int and float in `tree`
    (nested dicts, lists and tuples; None stays None), in the same structure and types: `tree` itself
    when not distributed. Every process must pass the same structure and shapes; where they differ,
    every process raises the same ValueError naming the first difference. One all-reduce per dtype."""
    if not is_distributed():
        return tree
    leaves = _leaves(tree)
    signature = [(path, _describe(leaf)) for path, leaf in leaves]
    signatures: list[Any] = [None] * world_size()
    dist.all_gather_object(signatures, signature)
    for process, other in enumerate(signatures):
        if other != signatures[0]:
            first = next((mine, theirs) for mine, theirs in zip(signatures[0] + [None], other + [None])
                         if mine != theirs)
            raise ValueError(f"processes 0 and {process} do not measure the same things: {first[0]} against "
                             f"{first[1]}; every process must run the same model the same way")

    device = _communication_device()
    groups: dict[torch.dtype, list[int]] = {}
    flat: list[torch.Tensor | None] = []
    for position, (_, leaf) in enumerate(leaves):
        if leaf is None:
            flat.append(None)
            continue
        if isinstance(leaf, torch.Tensor):
            value = leaf.detach().to(device, _TRANSPORT_DTYPES.get(leaf.dtype, leaf.dtype))
        else:
            value = torch.tensor(leaf, dtype=_TRANSPORT_DTYPES[type(leaf)], device=device)
        flat.append(value.reshape(-1))
        groups.setdefault(value.dtype, []).append(position)

    for positions in groups.values():
        buffer = torch.cat([flat[position] for position in positions])
        dist.all_reduce(buffer, op=_REDUCE_OPS[op])
        for position, part in zip(positions, buffer.split([flat[position].numel() for position in positions])):
            flat[position] = part

    reduced = []
    for (_, leaf), value in zip(leaves, flat):
        if isinstance(leaf, torch.Tensor):
            reduced.append(value.reshape(leaf.shape).to(leaf.device, leaf.dtype))
        else:
            reduced.append(None if value is None else type(leaf)(value.item()))
    return _rebuild(tree, iter(reduced))
