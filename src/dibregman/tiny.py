"""Tiny randomly initialised pipeline folders of the real diffusers / transformers classes, saved by the
pipelines' own ``save_pretrained``: Stable Diffusion 1.x, SDXL, SD3, Flux and PixArt-Sigma shapes in a few
hundred kB.

They exist to try a command line or a script before pointing it at a 10 GB folder (``dibregman tiny-pipeline
sd3 --out tiny-sd3``, then ``--teacher diffusers:tiny-sd3``), and they are what the test suite distills. Their
weights are random: a student of one learns nothing worth looking at. Nothing is downloaded; the tokenizers
are built here over single letters.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENS, WIDTH = 12, 32  # CLIP's token budget and width here


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges): enough to turn prompts into distinct ids."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:  # the class reads its vocabulary from files
        root = Path(tmp)
        (root / "vocab.json").write_text(json.dumps(vocab))
        (root / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=TOKENS,
                             unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENS,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def cond_unet(sample_size: int, channels: int, in_channels: int | None = None, **kw) -> UNet2DConditionModel:
    kw = {"cross_attention_dim": WIDTH, **kw}
    return UNet2DConditionModel(sample_size=sample_size, in_channels=in_channels or channels, out_channels=channels,
                                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **kw)


def tiny_vae(image_channels: int = 3, latent_channels: int = 4, **kw) -> AutoencoderKL:
    """Images of side ``2 * latent side``: two blocks, one halving."""
    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels, latent_channels=latent_channels,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=16, **kw)


def sd_pipeline(folder: Path, scheduler: Any = None, latent_side: int = 8, unet_in_channels: int | None = None,
                vae_kw: dict | None = None) -> Path:
    """A Stable Diffusion 1.x-shaped folder (VAE + CLIP + UNet2DConditionModel + scheduler, DDPM by default) saved
    by the real ``StableDiffusionPipeline.save_pretrained``; returns the folder."""
    torch.manual_seed(0)
    scheduler = scheduler if scheduler is not None else DDPMScheduler(clip_sample=False, steps_offset=1)
    tokenizer = clip_tokenizer()
    vae = tiny_vae(**(vae_kw or {}))
    unet = cond_unet(latent_side, vae.config.latent_channels, in_channels=unet_in_channels)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def sd3_pipeline(folder: Path, shift: float = 3.0, latent_side: int = 8) -> Path:
    """A Stable Diffusion 3-shaped folder: two CLIP encoders with projections (no T5, which SD3 allows), an
    ``SD3Transformer2DModel``, a 16-channel VAE with a shift factor, flow matching with a shifted grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()

    def clip(width: int, projection: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=projection))

    vae = tiny_vae(latent_channels=16, scaling_factor=1.5, shift_factor=0.1)
    transformer = SD3Transformer2DModel(sample_size=latent_side, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
                                        pos_embed_max_size=latent_side)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=clip(16, 24), tokenizer=tokenizer,
                                    text_encoder_2=clip(32, 16),
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def t5_tokenizer() -> Any:
    """A T5 (Unigram) tokenizer over single letters, built with the tokenizers library and saved as T5's is."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(ch, -1.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    with tempfile.TemporaryDirectory() as tmp:  # saved and read back: the form T5's loader expects
        t5.save_pretrained(tmp)
        return T5TokenizerFast.from_pretrained(tmp)


def flux_pipeline(folder: Path, guidance_embeds: bool = True) -> Path:
    """A Flux-shaped folder: CLIP (pooled output) + T5, a ``FluxTransformer2DModel`` over 2x2-packed 16-channel
    latents with a guidance embedding, flow matching with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=WIDTH, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(latent_channels=16, scaling_factor=0.4, shift_factor=0.1),
                        text_encoder=clip_text_encoder(tokenizer), tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def sdxl_pipeline(folder: Path) -> Path:
    """An SDXL-shaped folder: CLIP-L + CLIP-G with projection, a UNet with added ``text_time`` conditions (pooled
    text and six size ids), a 4-channel VAE, Euler's scheduler; saved by ``StableDiffusionXLPipeline``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    unet = cond_unet(8, 4, cross_attention_dim=2 * WIDTH, addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=16 + 6 * 4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(tokenizer), text_encoder_2=clip_g,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def pixart_pipeline(folder: Path, alpha: bool = False, sized: bool = False) -> Path:
    """A PixArt-Sigma-shaped folder: T5 (states and attention mask), a ``PixArtTransformer2DModel`` with learned
    variance, a 4-channel VAE, DPM-Solver over the VP table; saved by ``PixArtSigmaPipeline``. ``alpha``: saved by
    ``PixArtAlphaPipeline`` instead; ``sized``: the transformer takes PixArt-Alpha 1024's size conditions
    (``use_additional_conditions``, which the real pipeline feeds only at its 128-latent sample size)."""
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    heads = 3 if sized else 2  # the size conditions take a third of the width each: a width divisible by 3
    transformer = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=8, in_channels=4,
                                           out_channels=8, num_layers=2, cross_attention_dim=8 * heads, sample_size=8,
                                           patch_size=2, caption_channels=32, use_additional_conditions=sized)
    cls = diffusers.PixArtAlphaPipeline if alpha else diffusers.PixArtSigmaPipeline
    pipe = cls(tokenizer=t5_tok, text_encoder=t5, vae=tiny_vae(), transformer=transformer,
               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def pixart_alpha_pipeline(folder: Path) -> Path:
    """A PixArt-Alpha-shaped folder (``PixArtAlphaPipeline``: T5 at 120 tokens), otherwise ``pixart_pipeline``'s."""
    return pixart_pipeline(folder, alpha=True)


FAMILIES = {"sd": sd_pipeline, "sdxl": sdxl_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline,
            "pixart": pixart_pipeline, "pixart-alpha": pixart_alpha_pipeline}


def make_tiny_pipeline(family: str, folder: str | Path) -> Path:
    """Write a tiny random pipeline folder of ``family`` (a key of ``FAMILIES``) to
    ``folder``, which must not exist yet or be empty; returns it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown pipeline family {family!r}; choose one of {', '.join(FAMILIES)}")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new folder")
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "text_encoder_3=None cannot be saved": SD3 without T5 is meant
    logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random state left alone
            return FAMILIES[family](folder)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
