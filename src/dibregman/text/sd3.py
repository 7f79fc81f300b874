"""Stable Diffusion 3's prompt handling, taken from its pipeline: CLIP-L and CLIP-G (penultimate states and
pooled projections) and T5, as ``StableDiffusion3Pipeline.encode_prompt`` does it, packed into one condition
tensor per prompt (``teachers/dit.py: pack_text``).

Only the text half of the pipeline is loaded (no transformer, no VAE). A folder saved without T5 (SD3 allows
dropping it) gets the zeros the pipeline itself uses in its place; their width is the transformer's
``joint_attention_dim``, read from ``transformer/config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

Tensor = torch.Tensor

PIPELINE = "StableDiffusion3Pipeline"
DEFAULT_LENGTH = 256  # the pipeline's max_sequence_length for T5


def is_sd3_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == PIPELINE
    except (OSError, ValueError, AttributeError):
        return False


class SD3PromptEncoder(nn.Module):
    """``encode(prompts) -> [N, 77 + max_length + k, joint_dim]``: the pipeline's prompt embeddings followed by
    the pooled projections as ``k`` packed tokens. ``spec`` is the folder, so runs re-create it from
    ``generator.json``."""

    def __init__(self, folder: str | Path, max_length: int | None = None):
        super().__init__()
        from diffusers import StableDiffusion3Pipeline

        folder = Path(folder)
        absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if not (folder / name).is_dir()}
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), transformer=None, vae=None, **absent,
                                                            local_files_only=True)
            joint = json.loads((folder / "transformer" / "config.json").read_text())["joint_attention_dim"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the text encoders of the SD3 pipeline {str(folder)!r} "
                             f"({str(e).splitlines()[0]}); it needs tokenizer/, text_encoder/, tokenizer_2/, "
                             "text_encoder_2/ (optionally tokenizer_3/, text_encoder_3/), transformer/config.json"
                             ) from None
        pipe.transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=int(joint)))  # T5's zeros
        for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if enc is not None:
                enc.eval().requires_grad_(False)
        self.pipe = pipe
        self.encoders = nn.ModuleList([e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
                                       if e is not None])  # so .to(device) moves them
        self.spec, self.max_length, self.dim = str(folder), int(max_length or DEFAULT_LENGTH), int(joint)

    def train(self, mode: bool = True) -> SD3PromptEncoder:
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: list[str], batch: int = 64) -> Tensor:
        from ..teachers.dit import pack_text

        out = []
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i:i + batch])
            hidden, _, pooled, _ = self.pipe.encode_prompt(chunk, None, None, do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_length)
            out.append(pack_text(hidden.float(), pooled.float()).cpu())
        if not out:
            return torch.zeros(0, 0, self.dim)
        return torch.cat(out)
