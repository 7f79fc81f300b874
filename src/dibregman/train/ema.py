"""Exponential moving average of a module's weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .sharding import whole


class EMA:
    """``ema.module`` is a frozen copy of the model, updated by ``ema = d ema + (1 - d) model``.

    ``d = min(decay, (1 + t) / (10 + t))`` after ``t`` updates: without this warm-up a short run's
    average stays dominated by the random initialisation (with decay 0.999, 37% of it after 1000 steps).
    Buffers are copied, not averaged. Frozen parameters (``requires_grad`` off: the shared teacher weights
    under a LoRA adapter) never change, so the copy shares them instead of holding its own.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True,
                 share: Iterable[torch.Tensor] = ()):
        self.decay, self.warmup, self.num_updates = float(decay), warmup, 0
        memo = {id(t): t for t in share}  # also shared: ``share`` (a LoRA base's buffers, say)
        memo.update({id(p): p for p in model.parameters() if not p.requires_grad})
        self.module = copy.deepcopy(model, memo=memo).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        t = self.num_updates
        d = min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            if e is not p:  # the EMA is whole; a sharded (FSDP) parameter is gathered for it
                e.lerp_(whole(p.detach()), 1 - d)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            if e is not b:
                e.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, plus ``num_updates`` as a 0-d int64 tensor (safetensors-friendly)."""
        return {**self.module.state_dict(), "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.num_updates = int(state.pop("num_updates", 0))
        self.module.load_state_dict(state)
