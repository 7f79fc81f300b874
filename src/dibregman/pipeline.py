"""Diffusers pipelines for distilled generators: ``x = D(sigma_g z, sigma_g, cond)``, one U-Net call (a few-step
student: one call per noise level of ``sigmas``, each re-noising the last estimate); ``DibregmanOneStepPipeline``
for class-conditional or unconditional students, ``DibregmanTextOneStepPipeline`` for text students (with their
tokenizer and text encoder).

This file is standalone on purpose (only torch, numpy and diffusers): ``dibregman.export`` copies it into
every exported folder as ``dibregman_pipeline.py``, so the folder loads without dibregman installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("exported/", trust_remote_code=True)
    images = pipe(batch_size=4, class_labels=3, generator=torch.Generator().manual_seed(0)).images

The denoiser is EDM's preconditioned one (Karras et al. 2022, table 1), exactly as ``dibregman.precond``:
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``, with ``c_noise = log(sigma) / 4`` fed to the U-Net as
the timestep ``noise_scale * c_noise``. Samples live in [-1, 1]; the pipeline returns them in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class DibregmanOneStepPipeline(DiffusionPipeline):
    """``unet``: the student's backbone F. ``sigma_data``, ``sigma_g``, ``noise_scale``: its noise conventions
    (stored in ``model_index.json``); ``sigmas``: a few-step student's noise levels (``sigma_g`` first). A
    class-conditional U-Net has ``num_classes + 1`` class embeddings, the last one being "no label"."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, sigma_data: float = 0.5, sigma_g: float = 2.5, noise_scale: float = 250.0,
                 sigmas: Sequence[float] | None = None):
        super().__init__()
        self.register_modules(unet=unet)
        self.register_to_config(sigma_data=float(sigma_data), sigma_g=float(sigma_g), noise_scale=float(noise_scale),
                                sigmas=_valid_sigmas([sigma_g] if sigmas is None else sigmas))

    @property
    def num_classes(self) -> int:
        """Real classes (0 for an unconditional U-Net); label ``num_classes`` is "no label"."""
        n = self.unet.config.num_class_embeds
        return int(n) - 1 if n else 0

    def _labels(self, class_labels: int | Sequence[int] | torch.Tensor | None, batch: int) -> torch.Tensor | None:
        n = self.num_classes
        if class_labels is None:  # unconditional sample: the "no label" class, as in training
            return torch.full((batch,), n, dtype=torch.long, device=self.device) if n else None
        if not n:
            raise ValueError("this generator is unconditional; call it without class_labels")
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch}")
        if ((labels < 0) | (labels > n)).any():
            raise ValueError(f"class labels must lie in [0, {n - 1}] ({n} is the no-label class, what None gives)")
        return labels

    def denoise(self, x: torch.Tensor, labels: torch.Tensor | None, sigma: float | None = None) -> torch.Tensor:
        """``D(x, sigma)``: the EDM-preconditioned U-Net at a noise level of the generator (``sigma_g``)."""
        return _edm_denoise(self.unet, self.config, x, self.config.sigma_g if sigma is None else sigma,
                            class_labels=labels)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: int | Sequence[int] | torch.Tensor | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """``batch_size`` images (one per label when ``class_labels`` is a sequence and ``batch_size`` is 1).

        ``latents``: the noise z ~ N(0, I) to use instead of drawing it with ``generator`` (``[B, C, H, W]``;
        ``[B, steps, C, H, W]`` for a few-step student).
        ``output_type``: "pil" (list of images), "np" (``[B, H, W, C]`` floats) or "pt" (``[B, C, H, W]``), in [0, 1].
        """
        if batch_size == 1 and latents is None and class_labels is not None:
            batch_size = max(torch.as_tensor(class_labels).numel(), 1)  # a scalar label stays one image
        z = _noise(self, batch_size, generator, latents)
        labels = self._labels(class_labels, z.shape[0])
        x = _steps(self.config, z, lambda x, sigma: self.denoise(x, labels, sigma))
        return _output(self, x, output_type, return_dict)


class DibregmanTextOneStepPipeline(DiffusionPipeline):
    """A text student: ``unet`` (a ``UNet2DConditionModel`` reading the text's token states by cross-attention
    and their mean as its class embedding), with the ``tokenizer`` and ``text_encoder`` it was distilled with.
    Prompts are padded to ``max_length`` tokens; an empty prompt list is refused."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, tokenizer, text_encoder, sigma_data: float = 0.5, sigma_g: float = 2.5,
                 noise_scale: float = 250.0, max_length: int = 16, sigmas: Sequence[float] | None = None):
        super().__init__()
        self.register_modules(unet=unet, tokenizer=tokenizer, text_encoder=text_encoder)
        self.register_to_config(sigma_data=float(sigma_data), sigma_g=float(sigma_g), noise_scale=float(noise_scale),
                                max_length=int(max_length),
                                sigmas=_valid_sigmas([sigma_g] if sigmas is None else sigmas))

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's last hidden states ``[N, max_length, dim]`` (as dibregman computes them)."""
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.config.max_length, return_tensors="pt")
        args = {"input_ids": tok["input_ids"].to(self.device)}
        if "attention_mask" in tok and "clip" not in type(self.text_encoder).__name__.lower():
            args["attention_mask"] = tok["attention_mask"].to(self.device)  # BERT-style; CLIP attends causally
        return self.text_encoder(**args).last_hidden_state.to(self.unet.dtype)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """One image per prompt (``num_images_per_prompt`` each, prompt-major); ``latents`` and
        ``output_type`` as in ``DibregmanOneStepPipeline``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt")
        hidden = self.encode_prompt(prompts).repeat_interleave(num_images_per_prompt, dim=0)
        z = _noise(self, len(hidden), generator, latents)
        if len(z) != len(hidden):
            raise ValueError(f"got {len(z)} latents for {len(hidden)} prompts x images")
        x = _steps(self.config, z, lambda x, sigma: _edm_denoise(self.unet, self.config, x, sigma,
                                                                  encoder_hidden_states=hidden,
                                                                  class_labels=hidden.mean(1)))
        return _output(self, x, output_type, return_dict)


def _sigmas(cfg) -> list[float]:
    """The student's noise levels from the config (a folder exported before few-step students: one)."""
    sigmas = getattr(cfg, "sigmas", None)
    return _valid_sigmas([cfg.sigma_g] if sigmas is None else sigmas)


def _valid_sigmas(sigmas) -> list[float]:
    """Refused with a message when ``model_index.json`` was edited or damaged: a NaN or a level out of order
    gives samples, but wrong ones."""
    ok = (isinstance(sigmas, (list, tuple)) and 1 <= len(sigmas) <= 16
          and all(isinstance(s, (int, float)) and not isinstance(s, bool) and np.isfinite(s) and s > 0 for s in sigmas)
          and all(b < a for a, b in pairwise(sigmas)))
    if not ok:
        raise ValueError(f"model_index.json's sigmas must be 1 to 16 decreasing positive numbers (the student's noise "
                         f"levels); got {sigmas!r}: export the generator again with dibregman export")
    return [float(s) for s in sigmas]


def _steps(cfg, z: torch.Tensor, denoise) -> torch.Tensor:
    """The student's chain: ``x_1 = D(sigma_1 z_1, sigma_1)``, then ``x_k = D(x_{k-1} + sigma_k z_k, sigma_k)``."""
    sigmas = _sigmas(cfg)
    if len(sigmas) == 1:
        return denoise(sigmas[0] * z, sigmas[0])
    x = None
    for k, sigma in enumerate(sigmas):
        x = denoise(sigma * z[:, k] if x is None else x + sigma * z[:, k], sigma)
    return x


def _edm_denoise(unet, cfg, x: torch.Tensor, sigma_value: float, **cond) -> torch.Tensor:
    """``D(x, sigma) = c_skip x + c_out F(c_in x, noise_scale c_noise, cond)`` (EDM preconditioning)."""
    sigma = torch.full((x.shape[0],), sigma_value, dtype=x.dtype, device=x.device)
    sd2 = cfg.sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * cfg.sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    view = (-1,) + (1,) * (x.ndim - 1)
    out = unet(c_in.view(view) * x, cfg.noise_scale * c_noise, **cond).sample
    return c_skip.view(view) * x + c_out.view(view) * out


def _noise(pipe: DiffusionPipeline, batch_size: int, generator, latents: torch.Tensor | None) -> torch.Tensor:
    """z ~ N(0, I) of the U-Net's sample shape, one per step of a few-step student (or the given ``latents``)."""
    cfg = pipe.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
    steps = len(_sigmas(pipe.config))
    shape = (cfg.in_channels, *size) if steps == 1 else (steps, cfg.in_channels, *size)
    if latents is not None:
        if tuple(latents.shape[1:]) != shape:
            raise ValueError(f"latents must have shape [batch, {', '.join(map(str, shape))}]; "
                             f"got {list(latents.shape)}")
        return latents.to(device=pipe.device, dtype=pipe.unet.dtype)
    return randn_tensor((batch_size, *shape), generator=generator, device=pipe.device, dtype=pipe.unet.dtype)


def _output(pipe: DiffusionPipeline, x: torch.Tensor, output_type: str, return_dict: bool):
    """[-1, 1] samples as [0, 1] images of ``output_type``."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
    image = ((x.float() + 1) / 2).clamp(0, 1)
    pipe.maybe_free_model_hooks()
    if output_type != "pt":
        image = image.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
        if output_type == "pil":
            image = pipe.numpy_to_pil(image)
    return ImagePipelineOutput(images=image) if return_dict else (image,)
