"""SDXL: a tiny randomly initialised ``StableDiffusionXLPipeline`` (CLIP-L + CLIP-G with projection, a UNet with
added ``text_time`` conditions, a VAE, Euler's scheduler) saved by the real ``save_pretrained``, read offline
through ``diffusers:<folder>``, distilled on its latents and exported back to its own pipeline class."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from vp_check import assert_vp_x0

import dibregman as db
from dibregman.export import export_diffusers
from dibregman.sampling import seeded_noise
from dibregman.teachers import load_teacher
from dibregman.teachers.dit import pack_text
from dibregman.text import load_text_encoder
from dibregman.tiny import sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT, IMAGE = (4, 8, 8), (3, 16, 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def test_the_sdxl_denoiser_is_the_pipelines_own_x0_with_pooled_text_and_time_ids(folder):
    teacher = load_teacher(f"diffusers:{folder}")
    assert teacher.shape == LATENT and teacher.image_shape == IMAGE
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    prompts = ["a red square", "two dots", "a cat"]
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    cond = pack_text(hidden, pooled)
    torch.testing.assert_close(load_text_encoder(str(folder)).encode(prompts), cond)
    assert torch.equal(teacher.null_hidden, torch.zeros_like(cond[:1]))  # force_zeros_for_empty_prompt
    h, w = IMAGE[1:]  # the pipeline's default size: no crop, original = target
    ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)

    def x0(x_t, k, i, s):  # epsilon prediction: x0 = x_sigma - sigma eps
        eps = pipe.unet(x_t, k, encoder_hidden_states=hidden[i:i + 1],
                        added_cond_kwargs={"text_embeds": pooled[i:i + 1], "time_ids": ids}).sample
        return x_t * math.sqrt(1 + s * s) - s * eps

    assert_vp_x0(teacher, pipe.scheduler.alphas_cumprod, [3, 500, 990], LATENT, cond, x0)


def test_an_sdxl_student_exports_to_a_stable_diffusion_xl_pipeline_that_reproduces_it(tmp_path, folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    sigma_g = load_teacher(f"diffusers:{folder}").sigma_max
    run = db.distill(preset="tiny-images", teacher=f"diffusers:{folder}", prompts=str(prompts), guidance=2.0,
                     sigma_g=sigma_g, critic_head="fake_score", classifier="none", critic_data="teacher",
                     teacher_pool=16, out=str(tmp_path / "run"), progress=False, steps=2)
    out = export_diffusers(run, tmp_path / "exported")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    asked = ["a green star", "two dots"]
    with torch.no_grad():
        theirs = pipe(asked, num_inference_steps=1, guidance_scale=1.0, latents=seeded_noise(0, 2, LATENT),
                      output_type="pt").images
    torch.testing.assert_close(theirs * 2 - 1, db.sample(run, 2, prompts=asked), rtol=1e-5, atol=1e-5)
