"""A diffusers pipeline for a distilled one-step generator: ``x = D(sigma_g z, sigma_g, label)``, one U-Net call.

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

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class DibregmanOneStepPipeline(DiffusionPipeline):
    """``unet``: the student's backbone F. ``sigma_data``, ``sigma_g``, ``noise_scale``: its noise conventions
    (stored in ``model_index.json``). A class-conditional U-Net has ``num_classes + 1`` class embeddings, the
    last one being "no label"."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, sigma_data: float = 0.5, sigma_g: float = 2.5, noise_scale: float = 250.0):
        super().__init__()
        self.register_modules(unet=unet)
        self.register_to_config(sigma_data=float(sigma_data), sigma_g=float(sigma_g), noise_scale=float(noise_scale))

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

    def denoise(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """``D(x, sigma_g)``: the EDM-preconditioned U-Net at the generator's noise level."""
        cfg = self.config
        sigma = torch.full((x.shape[0],), cfg.sigma_g, dtype=x.dtype, device=x.device)
        sd2 = cfg.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * cfg.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        view = (-1,) + (1,) * (x.ndim - 1)
        out = self.unet(c_in.view(view) * x, cfg.noise_scale * c_noise, class_labels=labels).sample
        return c_skip.view(view) * x + c_out.view(view) * out

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: int | Sequence[int] | torch.Tensor | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """``batch_size`` images (one per label when ``class_labels`` is a sequence and ``batch_size`` is 1).

        ``latents``: the noise z ~ N(0, I) to use instead of drawing it with ``generator``.
        ``output_type``: "pil" (list of images), "np" (``[B, H, W, C]`` floats) or "pt" (``[B, C, H, W]``), in [0, 1].
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        if batch_size == 1 and latents is None and class_labels is not None:
            batch_size = max(torch.as_tensor(class_labels).numel(), 1)  # a scalar label stays one image
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        dtype = self.unet.dtype
        if latents is None:
            z = randn_tensor((batch_size, cfg.in_channels, *size), generator=generator, device=self.device, dtype=dtype)
        else:
            z = latents.to(device=self.device, dtype=dtype)
        labels = self._labels(class_labels, z.shape[0])
        x = self.denoise(self.config.sigma_g * z, labels)
        image = ((x.float() + 1) / 2).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
