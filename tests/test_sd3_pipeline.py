"""Stable Diffusion 3: a tiny randomly initialised ``StableDiffusion3Pipeline`` (two CLIP encoders with
projections, no T5, an ``SD3Transformer2DModel``, a 16-channel VAE with a shift factor, flow matching with a
shifted grid) saved by the real ``save_pretrained`` and read offline through ``diffusers:<folder>``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_pipelines import sd3_pipeline

import dibregman as db
from dibregman.teachers import load_teacher
from dibregman.teachers.dit import pack_text, unpack_text
from dibregman.text import load_text_encoder
from dibregman.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT, IMAGE = (16, 8, 8), (3, 16, 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd3_pipeline(tmp_path_factory.mktemp("sd3"))


def _pipe(folder) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), length=st.integers(1, 5), d=st.integers(1, 9), p=st.integers(1, 30))
def test_packing_the_pooled_projections_as_tokens_round_trips(n, length, d, p):
    hidden, pooled = torch.randn(n, length, d), torch.randn(n, p)
    h, q = unpack_text(pack_text(hidden, pooled), p)
    assert torch.equal(h, hidden) and torch.equal(q, pooled)


def test_the_sd3_denoiser_is_the_pipelines_own_x0_with_its_prompt_handling(folder):
    teacher = load_teacher(f"diffusers:{folder}")
    assert teacher.shape == LATENT and teacher.image_shape == IMAGE and teacher.kind == "flow"
    pipe = _pipe(folder)
    prompts = ["a red square", "two dots", ""]
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    cond = pack_text(hidden, pooled)
    torch.testing.assert_close(load_text_encoder(str(folder)).encode(prompts), cond)
    torch.testing.assert_close(teacher.null_hidden, cond[2:])  # the empty prompt: the pipeline's negative
    pipe.scheduler.set_timesteps(4)  # the shifted grid SD3 samples on, after its first time t = 1 (pure noise)
    t = pipe.scheduler.sigmas[1:4].double()
    x_t = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(1))
    sigma = t / (1 - t)  # x_t = (1 - t) x0 + t n  <=>  x_sigma = x_t / (1 - t), sigma = t / (1 - t)
    got = teacher(x_t * (1 + sigma.float()).reshape(-1, 1, 1, 1), sigma, cond)
    with torch.no_grad():
        v = pipe.transformer(x_t, encoder_hidden_states=hidden, pooled_projections=pooled,
                             timestep=pipe.scheduler.timesteps[1:4]).sample
    torch.testing.assert_close(got, x_t - t.float().reshape(-1, 1, 1, 1) * v, rtol=1e-4, atol=1e-4)
    teacher.guidance = 3.0  # guidance on x0 is the pipeline's guidance on the velocity (x0 is affine in v)
    x_sigma = x_t[:2] * (1 + sigma[:2].float()).reshape(-1, 1, 1, 1)
    d_c, d_u = teacher.net(x_sigma, sigma[:2], cond[:2]), teacher.net(x_sigma, sigma[:2], cond[2:].expand(2, -1, -1))
    torch.testing.assert_close(teacher(x_sigma, sigma[:2], cond[:2]), d_u + 3.0 * (d_c - d_u), rtol=1e-5, atol=1e-5)


def _distill(folder, out, **kw):
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    return db.distill(preset="tiny-images", teacher=f"diffusers:{folder}", prompts=str(prompts), out=str(out),
                      critic_head="fake_score", classifier="none", critic_data="teacher", teacher_pool=16,
                      progress=False, **kw)


def test_distill_an_sd3_pipeline_sample_new_prompts_and_resume_exactly(tmp_path, folder):
    from safetensors.torch import load_file

    from dibregman.export import export_diffusers

    whole = _distill(folder, tmp_path / "whole", guidance=2.0)
    arrays = np.load(whole / "samples.npz")
    assert arrays["student"].shape[1:] == IMAGE and arrays["teacher"].shape[1:] == IMAGE
    x = db.sample(whole, 2, prompts=["a green star"])
    assert x.shape == (2, *IMAGE) and torch.isfinite(x).all() and x.abs().max() <= 1
    _distill(folder, tmp_path / "part", guidance=2.0, steps=2)
    part = _distill(folder, tmp_path / "part", guidance=2.0, resume=True)

    def state(run):
        last = list_checkpoints(run / "checkpoints")[-1]
        return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = state(whole), state(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="starts from pure noise at t = 1"):
        export_diffusers(whole, tmp_path / "exported")


def test_grad_checkpointing_and_a_fake_score_critic_head_work_on_the_transformer(tmp_path, folder):
    run = _distill(folder, tmp_path / "gc", steps=2, grad_checkpointing=True, divergence="hellinger")
    assert (run / "generator" / "model.safetensors").is_file()
