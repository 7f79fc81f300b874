"""LoRA students on one shared frozen network, through ``peft`` (the ``lora`` extra).

``lora_copy(base, rank)`` is a copy of ``base`` whose weights *are* ``base``'s tensors (shared, not copied,
and frozen), with a LoRA adapter ``W + (alpha / rank) B A`` on every ``Linear`` and ``Conv2d``; ``B`` starts at
zero, so the copy starts as ``base`` exactly. The generator and the fake score are two such copies of the
teacher's network, so a run holds one network plus two sets of adapters instead of three networks (and the
EMA shares the frozen weights too, ``train/ema.py``). ``merged(net)`` is a full, independent copy with the
adapters folded into its weights: the plain network a saved generator, sampling and export expect.
``WithoutShared`` is the view of a module that checkpoints hold: its tensors other than the shared ones.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import nn

ADAPTER_LAYERS = (nn.Linear, nn.Conv2d)


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("lora_rank needs the peft library: pip install 'dibregman[lora]' (or pip install peft)"
                          ) from None
    return peft


def tensor_ids(module: nn.Module) -> frozenset[int]:
    """The identities of ``module``'s parameters and buffers (what ``lora_copy`` shares)."""
    return frozenset(id(t) for t in itertools.chain(module.parameters(), module.buffers()))


def lora_copy(base: nn.Module, rank: int, alpha: float = 0.0) -> nn.Module:
    """A copy of ``base`` sharing its (frozen) tensors, with trainable LoRA adapters of ``rank`` on every
    ``Linear`` and ``Conv2d``; ``alpha`` 0 means ``alpha = rank`` (scale 1)."""
    peft = require_peft()
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer; got {rank!r}")
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    net = copy.deepcopy(base, memo=shared)  # the module tree is new; every tensor is base's own
    targets = [name for name, m in net.named_modules() if name and isinstance(m, ADAPTER_LAYERS)]
    if not targets:
        raise ValueError(f"{type(base).__name__} has no Linear or Conv2d layer to put a LoRA adapter on")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0)
    net = peft.inject_adapter_in_model(config, net)
    for p in net.parameters():  # the adapters train, the shared weights never
        p.requires_grad_(id(p) not in shared)
    adapters = sum(p.numel() for p in net.parameters() if p.requires_grad)
    weights = sum(p.numel() for p in base.parameters())
    if adapters > 0.5 * weights:  # a rank near the layers' widths: as many numbers to train as full fine-tuning
        warnings.warn(f"LoRA rank {rank} adapters hold {adapters:,} parameters, {adapters / weights:.0%} of the "
                      f"network's {weights:,}: they save little memory; a smaller lora_rank saves more", stacklevel=2)
    return net


@torch.no_grad()
def merged(net: nn.Module) -> nn.Module:
    """A full copy of ``net`` with each adapter merged into its layer's weight and the adapter layers gone (the
    module tree of the network ``lora_copy`` started from); ``net`` and its shared weights are untouched."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(net)  # its own tensors: merging writes into them
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, attr, module.get_base_layer())
    return out


class WithoutShared(nn.Module):
    """A checkpoint's view of ``net``: ``state_dict`` holds its tensors other than the ``shared`` ones (a LoRA
    network's adapters, a critic's head), and ``load_state_dict`` loads exactly those. The shared weights come
    from the teacher, whose fingerprint every checkpoint records."""

    def __init__(self, net: nn.Module, shared: frozenset[int]):
        super().__init__()
        object.__setattr__(self, "net", net)  # a reference, not a submodule
        object.__setattr__(self, "shared", shared)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.net.state_dict(keep_vars=True).items() if id(v) not in self.shared}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        own = set(self.state_dict())
        if set(state) != own:
            raise RuntimeError(f"expected the tensors {sorted(own)[:5]}...; got {sorted(state)[:5]}...")
        return self.net.load_state_dict(state, strict=False, assign=assign)
