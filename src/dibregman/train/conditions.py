"""What each sample is conditioned on: nothing, a class label, or a prompt.

Conditions travel as integer indices (a class, or a row of the prompt table) and become network inputs
only per batch (``lookup``), so sample sets of any size cost a long per sample, not a ``[L, D]`` text
embedding. Conventions shared by every sample set (evaluation, the teacher pool, the reference rows):
sample ``i`` has condition ``i % K`` (``cycle``); real images come in class order ``i % classes``, and
``for_classes`` gives each a prompt that asks for its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..teachers.base import class_names, take_text_encoder, text_spec
from ..text.prompts import PromptSet

Tensor = torch.Tensor


@dataclass
class Conditions:
    num_classes: int = 0  # classes the conditions name (label accuracy, class-balanced data); 0: none
    hidden: Tensor | None = None  # text: the prompt table's encoder states [P, L, D]; None: labels or nothing
    prompt_labels: Tensor | None = None  # text: the class each prompt asks for ([P], -1 unknown)
    prompts: list[str] = field(default_factory=list)

    @classmethod
    def from_prompts(cls, prompts: PromptSet, hidden: Tensor) -> Conditions:
        return cls(len(prompts.class_names) if prompts.labelled else 0, hidden, prompts.labels, list(prompts.prompts))

    @property
    def text(self) -> bool:
        return self.hidden is not None

    @property
    def size(self) -> int:
        """How many distinct conditions: prompts, classes, or 0 for an unconditional model."""
        return len(self.hidden) if self.hidden is not None else self.num_classes

    def draw(self, n: int, g: torch.Generator) -> Tensor | None:
        """Training: ``n`` conditions uniformly (no draw from ``g`` when there are none)."""
        return torch.randint(self.size, (n,), generator=g) if self.size else None

    def cycle(self, n: int) -> Tensor | None:
        """Sample sets: sample ``i`` gets condition ``i % size``."""
        return torch.arange(n) % self.size if self.size else None

    def classes(self, idx: Tensor | None) -> Tensor | None:
        """The class each condition asks for (label accuracy); None where that is unknown."""
        if idx is None or not self.num_classes:
            return None
        return self.prompt_labels[idx] if self.text else idx

    def for_classes(self, labels: Tensor | None) -> Tensor | None:
        """A condition asking for each label: the label itself, or the prompts of that class in turn (a
        ValueError if the prompts name no classes: real images could not be paired with them)."""
        if not self.text:
            return labels
        if labels is None or not self.num_classes:
            raise ValueError("these prompts name no classes (lines '<class>\\t<prompt>'), so real images cannot be "
                             "paired with them: use critic_data = teacher, or give each prompt its class")
        out = torch.empty_like(labels)
        for c in range(self.num_classes):
            rows = (labels == c).nonzero().squeeze(1)
            of_class = (self.prompt_labels == c).nonzero().squeeze(1)
            if len(rows) and not len(of_class):
                raise ValueError(f"no prompt asks for class {c}; every class needs one to pair real images with")
            if len(rows):
                out[rows] = of_class[torch.arange(len(rows)) % len(of_class)]
        return out

    def lookup(self, idx: Tensor | None, device: torch.device | str = "cpu") -> Tensor | None:
        """What the networks take: labels as they are, prompts as their encoder states."""
        if idx is None:
            return None
        return (self.hidden[idx.cpu()] if self.text else idx).to(device)


def conditions_for(teacher: object, prompts: str | PromptSet = "", device: torch.device | str = "cpu"
                   ) -> Conditions:
    """The conditions of a run: the teacher's classes, or, for a text teacher (or a generator distilled from
    one), ``prompts`` encoded once (on ``device``; the table is kept on the CPU): ``""`` its own training
    captions, ``unseen`` captions in templates it never saw, a prompt file (``text/prompts.py``), or a
    ``PromptSet``."""
    from ..text import caption_prompts, load_text_encoder, read_prompts
    from ..text.prompts import UNSEEN_TEMPLATES
    from .config import ConfigError

    text = text_spec(teacher)
    if not text:
        if prompts:
            raise ConfigError(f"prompts = {prompts!r} is for text-conditional teachers; this teacher is "
                              f"{'class-conditional' if teacher.num_classes else 'unconditional'} (leave it empty)")
        return Conditions(teacher.num_classes)
    names = class_names(teacher)
    try:
        if isinstance(prompts, PromptSet):
            chosen = prompts
        elif prompts in ("", "unseen"):
            templates = text.get("templates") if prompts == "" else UNSEEN_TEMPLATES
            if not names or not templates:
                raise ConfigError("this text teacher has no training captions to distill on: give a prompt file "
                                  "(--prompts FILE, one prompt per line)")
            chosen = caption_prompts(names, tuple(templates))
        else:
            chosen = read_prompts(prompts, names)
        encoder = take_text_encoder(teacher) or load_text_encoder(text["encoder"], text.get("length"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Conditions.from_prompts(chosen, encoder.to(device).encode(chosen.prompts).cpu())
