"""Transformer backbones of diffusers pipelines behind the same denoiser contract as the U-Nets.

Each wrapper takes the sample as ``[B, C, H, W]`` latents and the text condition as one tensor, and calls its
model in the pipeline's own conventions (packing, position ids, timestep scale, guidance embedding).

``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) takes two text conditions: the token states
``encoder_hidden_states [N, L, joint_dim]`` and the pooled CLIP projections ``pooled_projections [N, P]``. The
rest of the library carries one condition tensor per sample, so the pooled vector travels as ``ceil(P /
joint_dim)`` extra tokens at the end of the sequence (zero-padded): ``pack_text`` / ``unpack_text``. A
prompt table, the empty prompt for guidance and the critic's conditions are then the same tensors as for a
Stable Diffusion 1.x UNet.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor

TRANSFORMER_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel")
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: what a guidance-distilled Flux is fed


def pooled_tokens(pooled_dim: int, joint_dim: int) -> int:
    return math.ceil(pooled_dim / joint_dim)


def pack_text(hidden: Tensor, pooled: Tensor) -> Tensor:
    """``[N, L, D]`` token states and ``[N, P]`` pooled projections as one ``[N, L + ceil(P / D), D]`` tensor."""
    n, _, d = hidden.shape
    k = pooled_tokens(pooled.shape[1], d)
    tail = torch.zeros(n, k * d, dtype=hidden.dtype, device=hidden.device)
    tail[:, :pooled.shape[1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, tail.reshape(n, k, d)], 1)


def unpack_text(cond: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of ``pack_text``: ``(hidden [N, L, D], pooled [N, P])``."""
    k = pooled_tokens(pooled_dim, cond.shape[2])
    return cond[:, :-k], cond[:, -k:].flatten(1)[:, :pooled_dim]


class _Transformer(nn.Module):
    """What the three wrappers share: ``unet`` names the wrapped model, as in ``DiffusersUNet`` (the training
    code enables gradient checkpointing and reads dtypes through it); ``sample_shape`` is the latents' shape;
    ``options`` what the arch must record beyond the model's config; ``features`` return token maps."""

    text = True
    num_classes = 0

    def __init__(self, transformer: nn.Module, sample_shape: tuple[int, int, int]):
        super().__init__()
        self.unet = transformer
        cfg = transformer.config
        self.sample_shape = sample_shape
        self.options: dict = {}
        self.feature_channels = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        self.feature_block = len(transformer.transformer_blocks) // 2  # the middle one

    @staticmethod
    def token_map(tokens: Tensor, h: int, w: int) -> Tensor:
        """Image tokens ``[B, h * w, D]`` (row-major patches) as a map ``[B, D, h, w]``."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _square(cfg: dict) -> tuple[int, int, int]:
    return int(cfg["in_channels"]), int(cfg["sample_size"]), int(cfg["sample_size"])


class DiffusersSD3(_Transformer):
    """An ``SD3Transformer2DModel`` called as ``F(x_t, timestep, cond)`` with ``cond`` from ``pack_text``, and
    ``features``: the image tokens after the middle joint block as a map ``[B, inner_dim, H/p, W/p]`` (what
    critic heads read)."""

    def __init__(self, transformer: nn.Module):
        super().__init__(transformer, _square(transformer.config))
        self.pooled_dim = int(transformer.config["pooled_projection_dim"])

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        hidden, pooled = unpack_text(cond, self.pooled_dim)
        return self.unet(x_t, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timestep,
                         return_dict=False)[0]

    def features(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        """The first steps of ``SD3Transformer2DModel.forward`` (patch embedding, time and pooled-text embedding,
        context embedding, joint blocks up to ``feature_block``), the image tokens as a spatial map."""
        t, p = self.unet, int(self.unet.config["patch_size"])
        hidden, pooled = unpack_text(cond, self.pooled_dim)
        h, w = x_t.shape[-2] // p, x_t.shape[-1] // p
        x = t.pos_embed(x_t)
        temb = t.time_text_embed(timestep.expand(x_t.shape[0]), pooled)
        context = t.context_embedder(hidden)
        for block in t.transformer_blocks[: self.feature_block + 1]:
            context, x = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        return self.token_map(x, h, w)


def pack_latents(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]``: 2x2 patches in row-major order, channels outermost, as Flux's
    pipeline packs them (checked against ``FluxPipeline._pack_latents`` in the tests)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of ``pack_latents`` for latents of side ``h x w``."""
    b, _, d = x.shape
    return x.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class DiffusersFlux(_Transformer):
    """A ``FluxTransformer2DModel`` called as ``FluxPipeline`` calls it: latents packed into 2x2 patches
    (``pack_latents``), image position ids ``(0, row, col)``, zero text ids, ``timestep / 1000``, and, for a
    guidance-distilled model (``guidance_embeds``), the guidance scale as an input (``embedded_guidance``, the
    pipeline's ``guidance_scale``; the teacher sets it from ``--guidance``). ``cond`` packs T5's states and CLIP's
    pooled output (``pack_text``).

    The config has no sample size, so ``latent_size`` (the latents' side, even) comes from the loader (the
    VAE's ``sample_size`` over its down-sampling factor) and is saved with the arch."""

    def __init__(self, transformer: nn.Module, latent_size: int, embedded_guidance: float = FLUX_GUIDANCE):
        cfg = transformer.config
        if int(cfg.get("patch_size", 1)) != 1 or int(cfg["in_channels"]) % 4:
            raise ValueError("FluxTransformer2DModel: only patch_size 1 over 2x2-packed latents (in_channels a "
                             f"multiple of 4) is supported; got {dict(cfg)}")
        if int(latent_size) % 2:
            raise ValueError(f"Flux latents must have an even side to be packed in 2x2 patches; got {latent_size}")
        super().__init__(transformer, (int(cfg["in_channels"]) // 4, int(latent_size), int(latent_size)))
        self.embedded_guidance = float(embedded_guidance) if cfg.get("guidance_embeds") else None
        self.options = {"latent_size": int(latent_size), "embedded_guidance": float(embedded_guidance)}
        self.pooled_dim = int(cfg["pooled_projection_dim"])

    def set_embedded_guidance(self, scale: float) -> None:
        """The guidance input of a guidance-distilled model (no effect on one without ``guidance_embeds``)."""
        self.options["embedded_guidance"] = float(scale)
        if self.embedded_guidance is not None:
            self.embedded_guidance = float(scale)

    def _inputs(self, x_t: Tensor, timestep: Tensor, cond: Tensor) -> dict[str, Tensor | None]:
        b, _, h, w = x_t.shape
        hidden, pooled = unpack_text(cond, self.pooled_dim)
        dtype = x_t.dtype
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((b,), self.embedded_guidance, device=x_t.device, dtype=torch.float32)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)  # (0, row, col) per patch
        return {"hidden_states": pack_latents(x_t), "timestep": (timestep.expand(b) / 1000).to(dtype),
                "guidance": guidance, "pooled_projections": pooled, "encoder_hidden_states": hidden,
                "txt_ids": torch.zeros(hidden.shape[1], 3, device=x_t.device, dtype=dtype),
                "img_ids": img_ids.to(x_t.device, dtype)}

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        out = self.unet(**self._inputs(x_t, timestep, cond), return_dict=False)[0]
        return unpack_latents(out, x_t.shape[2], x_t.shape[3])

    def features(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        """The image stream after the last dual-stream block (``FluxTransformer2DModel.forward`` up to its single
        blocks) as a map ``[B, inner_dim, H/2, W/2]``."""
        t, a = self.unet, self._inputs(x_t, timestep, cond)
        x = t.x_embedder(a["hidden_states"])
        step = a["timestep"].to(x.dtype) * 1000
        temb = (t.time_text_embed(step, a["pooled_projections"]) if a["guidance"] is None
                else t.time_text_embed(step, a["guidance"].to(x.dtype) * 1000, a["pooled_projections"]))
        context = t.context_embedder(a["encoder_hidden_states"])
        rotary = t.pos_embed(torch.cat((a["txt_ids"], a["img_ids"]), 0))
        for block in t.transformer_blocks:
            context, x = block(hidden_states=x, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)
        return self.token_map(x, x_t.shape[2] // 2, x_t.shape[3] // 2)


def unpack_masked(cond: Tensor) -> tuple[Tensor, Tensor]:
    """``pack_text(states, mask)`` read back without knowing the token count ``L``: ``(states [N, L, D],
    mask [N, L])``, ``L`` being the one count whose ``ceil(L / D)`` mask tokens fill the rest."""
    n, d = cond.shape[1], cond.shape[2]
    for k in range(1, n):
        if pooled_tokens(n - k, d) == k:
            return unpack_text(cond, n - k)
    raise ValueError(f"a condition of {n} tokens of width {d} does not hold states and their mask")


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the activations it wants are captured."""


class DiffusersPixArt(_Transformer):
    """A ``PixArtTransformer2DModel`` called as ``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline`` call it: T5
    states with their attention mask (``cond`` = ``pack_text(states, mask)``; T5 pads and the mask says which
    tokens are real), the VP timestep, and the size conditions: ``None`` for a model without them (Sigma, and
    Alpha below 1024 px), else the image's ``(height, width)`` in pixels and its aspect ratio ``height / width``
    (PixArt-Alpha 1024, ``use_additional_conditions``), fixed at the student's size (``image_size``, from the
    loader, saved with the arch). Its learned-variance half is dropped by the denoiser. ``features``: the image
    tokens after the middle block, captured by a forward hook that ends the pass there, as a map
    ``[B, inner_dim, H/p, W/p]``."""

    def __init__(self, transformer: nn.Module, image_size: tuple[int, int] | list[int] | None = None):
        super().__init__(transformer, _square(transformer.config))
        self.sized = bool(getattr(transformer, "use_additional_conditions", False))
        if self.sized:
            if image_size is None:
                raise ValueError("a PixArt transformer with size conditions (use_additional_conditions) needs the "
                                 "image size (the loader reads it from the VAE)")
            self.options = {"image_size": [int(n) for n in image_size]}

    def _sizes(self, x_t: Tensor) -> dict[str, Tensor | None]:
        if not self.sized:
            return {"resolution": None, "aspect_ratio": None}
        h, w = self.options["image_size"]
        b = x_t.shape[0]
        return {"resolution": torch.tensor([float(h), float(w)], device=x_t.device, dtype=x_t.dtype).repeat(b, 1),
                "aspect_ratio": torch.tensor([h / w], device=x_t.device, dtype=x_t.dtype).repeat(b, 1)}

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        states, mask = unpack_masked(cond)
        return self.unet(x_t, encoder_hidden_states=states, encoder_attention_mask=mask,
                         timestep=timestep.expand(x_t.shape[0]), added_cond_kwargs=self._sizes(x_t),
                         return_dict=False)[0]

    def features(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        captured: list[Tensor] = []

        def stop(module: nn.Module, args: Any, out: Tensor) -> None:
            captured.append(out)
            raise _Stop

        handle = self.unet.transformer_blocks[self.feature_block].register_forward_hook(stop)
        try:  # removed before any backward pass, so a checkpointed recomputation never meets the hook
            self(x_t, timestep, cond)
        except _Stop:
            pass
        finally:
            handle.remove()
        p = int(self.unet.config["patch_size"])
        return self.token_map(captured[0], x_t.shape[2] // p, x_t.shape[3] // p)


def transformer_backbone(model: nn.Module, options: dict | None = None) -> nn.Module:
    """The wrapper of a diffusers transformer (``TRANSFORMER_CLASSES``); ``options``: what its config lacks."""
    name = type(model).__name__
    if name == "SD3Transformer2DModel":
        return DiffusersSD3(model)
    if name == "PixArtTransformer2DModel":
        return DiffusersPixArt(model, (options or {}).get("image_size"))
    if name == "FluxTransformer2DModel":
        options = options or {}
        if "latent_size" not in options:
            raise ValueError("a Flux transformer needs its latent size (the loader reads it from the VAE)")
        return DiffusersFlux(model, options["latent_size"], options.get("embedded_guidance", FLUX_GUIDANCE))
    raise ValueError(f"unsupported transformer class {name}; supported: {', '.join(TRANSFORMER_CLASSES)}")
