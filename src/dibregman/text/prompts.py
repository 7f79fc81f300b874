"""Prompt sets: captions built from templates, or read from a file, each with the class it asks for.

A prompt's class (when known) is what prompt adherence is measured against: the project's classifier
on the image generated for the prompt. Captions built here cycle through the classes (prompt ``j`` asks
for class ``j % K``), the same convention as every labelled sample set in dibregman.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# the teacher is trained on these ...
TRAIN_TEMPLATES = ("a photo of {a}", "a picture of {a}", "{a}", "an image of {a}", "a grayscale photo of {a}",
                   "a small photo of {a}", "a product photo of {a}", "{noun}")
# ... and never sees these (prompt adherence on unseen wording)
UNSEEN_TEMPLATES = ("a low-resolution photo of {a}", "this is {a}", "{a} on a black background",
                    "a close-up shot of {a}", "someone's {noun}")


def caption(template: str, class_name: str) -> str:
    """``template`` filled in: ``{noun}`` the class name in lower case, ``{a}`` the same with its article
    ("a photo of {a}" -> "a photo of an ankle boot")."""
    n = class_name.lower()
    return template.format(noun=n, a=("an " if n[0] in "aeiou" else "a ") + n)


@dataclass
class PromptSet:
    """Prompts and the class each asks for (``-1``: unknown); ``class_names`` as the teacher knows them."""

    prompts: list[str]
    labels: torch.Tensor
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def caption_prompts(class_names: tuple[str, ...] | list[str], templates: tuple[str, ...] = TRAIN_TEMPLATES
                    ) -> PromptSet:
    """Every template for every class, prompt ``j`` of class ``j % K``."""
    prompts = [caption(t, c) for t in templates for c in class_names]
    labels = torch.arange(len(prompts)) % len(class_names)
    return PromptSet(prompts, labels, tuple(class_names))


def read_prompts(path: str | Path, class_names: tuple[str, ...] | list[str] = ()) -> PromptSet:
    """One prompt per line; ``<class>\\t<prompt>`` names the class it asks for (an index, or a name from
    ``class_names``, case-insensitive). Blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is no text
    except FileNotFoundError:
        raise ValueError(f"prompt file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {str(path)!r} ({e}); it must be UTF-8 text") from None
    by_name = {c.lower(): i for i, c in enumerate(class_names)}
    prompts, labels = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label, sep, text = line.partition("\t")
        if not sep:
            label, text = "", line
        text, label = text.strip(), label.strip()
        if not text:
            raise ValueError(f"{path}:{n}: empty prompt")
        if not label:
            labels.append(-1)
        elif label.lower() in by_name:
            labels.append(by_name[label.lower()])
        elif label.isdigit() and (not class_names or int(label) < len(class_names)):
            labels.append(int(label))
        else:
            known = ", ".join(class_names) if class_names else "none (the teacher has no class names)"
            raise ValueError(f"{path}:{n}: unknown class {label!r}; give an index or one of: {known}")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} has no prompts (one per line, optionally '<class>\\t<prompt>')")
    return PromptSet(prompts, torch.tensor(labels, dtype=torch.long), tuple(class_names))
