"""``parallel = fsdp``: the trainable networks sharded across the torchrun processes with FSDP2
(``torch.distributed.fsdp.fully_shard``). Each process keeps 1/N of the generator's, the fake score's and
the critic's weights, gradients and Adam moments; a forward all-gathers one block's weights at a time (each
block of a network is a unit of its own, ``blocks``), the backward reduce-scatters its gradients (their mean
over processes, as DDP's all-reduce). The teacher (frozen) and the generator's EMA stay whole on every
process, so evaluation and sampling on process 0 need no peers.

Checkpoints hold full (gathered) state dicts in the usual files, keyed by parameter name: they load on any
number of processes. Gathering is collective, so ``Components.whole_state`` is entered on every process
around process 0's write."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .. import dist


def _dtensor() -> type | None:
    """DTensor, once a process group exists (none can exist before). Until then nothing is imported: the import
    takes most of a second, and most runs never shard."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _full() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to process 0, on its CPU


_OWN_GROUP = False  # whether shard() made the process group (of one), for release()
_FORWARD_METHODS = ("features", "forward_features", "forward_with_features", "from_features")


def is_sharded(net: nn.Module) -> bool:
    kind = _dtensor()
    return kind is not None and any(isinstance(p, kind) for p in net.parameters())


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered (collective), any other as it is."""
    kind = _dtensor()
    return t.full_tensor() if kind is not None and isinstance(t, kind) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor, any other as it is."""
    kind = _dtensor()
    return t.to_local() if kind is not None and isinstance(t, kind) else t


def shard(nets: list[nn.Module], device: torch.device) -> None:
    """``fully_shard`` each of ``nets`` in place, over every process; methods other than ``forward`` that read
    their weights (a fake score's features, a critic head's ``from_features``) gather them too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    global _OWN_GROUP
    if not torch.distributed.is_initialized():  # one process without torchrun: a process group of one
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    # FSDP warns that a network returns a view (a reshaped output) on which an in-place op would skip its hook;
    # the losses use their outputs out of place only, and tests/test_fsdp.py checks the gradients against DDP's
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor", module="torch")
    for net in nets:
        # no mixed-precision policy: bf16 is the run's autocast, as under DDP (a bf16 parameter dtype would also
        # cast every floating input, the noise level too, before the time embedding reads it)
        for unit in blocks(net):  # one unit per block: a forward gathers one block's weights at a time
            fully_shard(unit, mesh=mesh)
        fully_shard(net, mesh=mesh)
        for name in _FORWARD_METHODS:
            if callable(getattr(net, name, None)):
                register_fsdp_forward_method(net, name)


def blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks of ``net`` that become FSDP units of their own: the elements of its outermost ``ModuleList``s and
    ``ModuleDict``s (a U-Net's down and up blocks, an EDM network's encoder and decoder blocks, a transformer's
    blocks, an MLP's layers) that hold weights. The rest (stems,
    embeddings, heads) stays in the network's own unit."""
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList | nn.ModuleDict):
                members = child.values() if isinstance(child, nn.ModuleDict) else child
                found.extend(m for m in members if m is not None and any(True for _ in m.parameters()))
            else:
                walk(child)

    walk(net)
    return found


def release() -> None:
    """Leave the process group of one that ``shard`` made (at the end of its run), so that a later run in the
    same Python process starts from none."""
    global _OWN_GROUP
    if _OWN_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWN_GROUP = False


class FullState(nn.Module):
    """A checkpoint's view of a sharded ``net``: ``state_dict`` is what ``gather`` collected (on process 0: the
    whole network; before any gather: the live sharded tensors, whose shapes are the whole ones), and
    ``load_state_dict`` of a whole state dict shards it onto every process (each reads the same file)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        object.__setattr__(self, "net", net)  # a reference, not a submodule
        object.__setattr__(self, "gathered", None)

    def gather(self) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        object.__setattr__(self, "gathered", get_model_state_dict(self.net, options=_full()))

    def drop(self) -> None:
        object.__setattr__(self, "gathered", None)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.gathered if self.gathered is not None else self.net.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        return set_model_state_dict(self.net, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimiser state of a sharded ``net``, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, opt, options=_full())


def load_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(net, opt, state, options=StateDictOptions(full_state_dict=True))
