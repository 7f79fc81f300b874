"""The prompt handling of multi-encoder pipelines, taken from the pipelines themselves: SDXL's
``encode_prompt`` (CLIP-L and CLIP-G penultimate states, CLIP-G's pooled projection), Stable Diffusion 3's (the
same and T5), Flux's (T5 states, CLIP's pooled output) and PixArt-Sigma's (T5 states and their attention mask),
packed into one condition tensor per prompt (``teachers/dit.py: pack_text``).

Only the text half of the pipeline is loaded (no transformer, no VAE). An SD3 folder saved without T5 (SD3
allows dropping it) gets the zeros the pipeline itself uses in its place; their width is the transformer's
``joint_attention_dim``, read from ``transformer/config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

Tensor = torch.Tensor

# pipeline class -> its T5 token budget (the pipeline's default max_sequence_length; SDXL has no T5)
PIPELINES = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512, "StableDiffusionXLPipeline": None,
             "PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}


def pipeline_class(folder: Path) -> str | None:
    """The folder's pipeline class if its prompts are encoded here (``PIPELINES``), else None."""
    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in PIPELINES else None


class PipelinePromptEncoder(nn.Module):
    """``encode(prompts) -> [N, L + k, joint_dim]``: the pipeline's prompt embeddings followed by the pooled
    projections as ``k`` packed tokens. ``spec`` is the folder, so runs re-create it from ``generator.json``;
    ``max_length`` is T5's token budget."""

    def __init__(self, folder: str | Path, max_length: int | None = None):
        super().__init__()
        import diffusers

        folder = Path(folder)
        self.pipeline = pipeline_class(folder)
        if self.pipeline is None:
            raise ValueError(f"{str(folder)!r} is not a {', '.join(PIPELINES)} folder (its model_index.json)")
        absent = {}
        if self.pipeline == "StableDiffusion3Pipeline":
            absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if not (folder / name).is_dir()}
        denoiser = "unet" if self.pipeline == "StableDiffusionXLPipeline" else "transformer"
        try:
            pipe = getattr(diffusers, self.pipeline).from_pretrained(str(folder), **{denoiser: None}, vae=None,
                                                                     **absent, local_files_only=True,
                                                                     use_safetensors=True)
            config = json.loads((folder / denoiser / "config.json").read_text())
            joint = config.get("cross_attention_dim" if denoiser == "unet" else "joint_attention_dim",
                               config.get("caption_channels"))  # PixArt: T5's width
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the text encoders of the {self.pipeline} folder {str(folder)!r} "
                             f"({str(e).splitlines()[0]}); it needs its tokenizer*/ and text_encoder*/ folders "
                             f"and {denoiser}/config.json (pipeline.save_pretrained)") from None
        if absent:  # SD3 without T5: the pipeline sizes the zeros in its place from its transformer's config
            pipe.transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=int(joint)))
        found = (getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        self.encoders = nn.ModuleList([e.eval().requires_grad_(False) for e in found if e is not None])  # for .to()
        self.pipe = pipe
        self.spec, self.dim = str(folder), int(joint)
        self.max_length = int(max_length or PIPELINES[self.pipeline] or pipe.tokenizer.model_max_length)
        # SDXL's guidance pairs a prompt with zeros, not with the empty prompt's states
        self.zero_unconditional = bool(pipe.config.get("force_zeros_for_empty_prompt", False))

    def train(self, mode: bool = True) -> PipelinePromptEncoder:
        return super().train(False)

    def unconditional(self) -> Tensor:
        """What the pipeline's classifier-free guidance pairs a prompt with: the empty prompt's condition, or
        zeros where the pipeline forces them (SDXL's ``force_zeros_for_empty_prompt``)."""
        empty = self.encode([""])
        return torch.zeros_like(empty) if self.zero_unconditional else empty

    @torch.no_grad()
    def encode(self, prompts: list[str], batch: int = 64) -> Tensor:
        from ..teachers.dit import pack_text

        out = []
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i:i + batch])
            if self.pipeline == "FluxPipeline":
                hidden, pooled, _ = self.pipe.encode_prompt(chunk, None, max_sequence_length=self.max_length)
            elif self.pipeline.startswith("PixArt"):  # T5 states and the attention mask of their padding
                hidden, pooled, _, _ = self.pipe.encode_prompt(chunk, do_classifier_free_guidance=False,
                                                               max_sequence_length=self.max_length)
            elif self.pipeline == "StableDiffusionXLPipeline":
                hidden, _, pooled, _ = self.pipe.encode_prompt(chunk, do_classifier_free_guidance=False)
            else:
                hidden, _, pooled, _ = self.pipe.encode_prompt(chunk, None, None, do_classifier_free_guidance=False,
                                                               max_sequence_length=self.max_length)
            out.append(pack_text(hidden.float(), pooled.float()).cpu())
        if not out:
            return torch.zeros(0, 0, self.dim)
        return torch.cat(out)
