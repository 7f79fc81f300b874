"""Devices and process groups: the one place that knows where tensors live and how many processes train.

Under ``torchrun`` (``WORLD_SIZE > 1``) every process draws the *global* batch's randomness from the same
seeded generator and keeps its own slice, so a run means the same with any process count; gradients are
averaged across processes and every batch statistic (the ``omega`` normaliser, logged values) is
all-reduced. With one process every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def collective_device() -> torch.device:
    """Where small bookkeeping tensors must live to be all-reduced (NCCL only reduces GPU tensors)."""
    if world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present (this process's local GPU under torchrun), else CPU; asking for CUDA
    without it is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is None and world_size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def local_slice(n: int) -> slice:
    """This process's share of a global batch of ``n`` (the global batch must divide evenly)."""
    w, r = world_size(), rank()
    if n % w:
        raise ValueError(f"batch_size {n} does not divide among {w} processes; use a multiple of {w}")
    return slice(r * n // w, (r + 1) * n // w)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place, returned); the identity with one process."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """``op`` in sum, min, max (in place, returned)."""
    if world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def average_gradients(net: nn.Module) -> None:
    """Mean of each gradient over processes: with equal local batches, the gradient of the global mean."""
    w = world_size()
    if w == 1:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= w
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class PeerStopped(RuntimeError):
    """Process 0 stopped with an error (which it printed); the other processes of a torchrun stop quietly."""


def reports() -> bool:
    """Whether this process prints user errors: process 0 of a torchrun (known from the environment even
    before the process group exists), or the only one."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def on_main(fn, default):
    """``fn()`` on process 0 while the others wait, which get ``default``; if ``fn`` raises there, it raises
    there and every other process raises ``PeerStopped`` (instead of a gloo/NCCL "connection closed" when
    process 0 exits). With one process: ``fn()``."""
    if world_size() == 1:
        return fn()
    error, result = None, default
    if is_main():
        try:
            result = fn()
        except BaseException as e:
            error = e
    flag = torch.tensor([0.0 if error is None else 1.0], device=collective_device())
    dist.broadcast(flag, src=0)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise PeerStopped("process 0 stopped; its message says why")
    return result


def shutdown() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down by its destructor at exit can
    abort the process (SIGABRT) instead of letting it exit with its own code."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_true(flag: bool) -> bool:
    """True on every process when it is true on any (a signal seen by one stops all at the same step)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
