"""The Stable Diffusion style path: a tiny randomly initialised pipeline (CLIP tokenizer + CLIP text encoder +
``UNet2DConditionModel`` + scheduler) built and saved here, read back offline through ``diffusers:<folder>``,
checked against the scheduler's own x0 prediction, and distilled to a one-step text-conditional generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextModel, CLIPTokenizer
from vp_check import assert_vp_x0

import dibregman as db
from dibregman.artifacts import load_generator
from dibregman.generator import OneStepGenerator
from dibregman.teachers import load_teacher
from dibregman.tiny import TOKENS, clip_text_encoder, clip_tokenizer, cond_unet
from dibregman.train.checkpoint import list_checkpoints, load_module
from dibregman.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

R = 8


def _pipeline(root: Path, scheduler, **unet_kw) -> str:
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    text = clip_text_encoder(tokenizer)
    unet = cond_unet(R, 1, **unet_kw)
    folder = root / "pipeline"
    tokenizer.save_pretrained(folder / "tokenizer")
    text.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DiffusionPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", type(scheduler).__name__]}))
    return f"diffusers:{folder}"


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> str:
    return _pipeline(tmp_path_factory.mktemp("sd"), DDPMScheduler(prediction_type="epsilon", clip_sample=False))


def _clip_states(folder: str, prompts: list[str]) -> torch.Tensor:
    """What a Stable Diffusion pipeline feeds its UNet: CLIP's last hidden states of the padded prompts."""
    root = Path(folder.removeprefix("diffusers:"))
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return CLIPTextModel.from_pretrained(root / "text_encoder")(ids)[0]


def test_text_denoiser_matches_the_schedulers_x0_with_the_pipelines_own_text_states(sd):
    teacher = load_teacher(sd)
    assert teacher.text["length"] == TOKENS and teacher.num_classes == 0 and teacher.shape == (1, R, R)
    prompts = ["a red square", "a blue circle", "two dots"]
    states = _clip_states(sd, prompts)
    from dibregman.text import load_text_encoder

    torch.testing.assert_close(load_text_encoder(teacher.text["encoder"]).encode(prompts), states)
    torch.testing.assert_close(teacher.null_hidden, _clip_states(sd, [""]))  # the empty prompt is "no text"
    sched, unet = teacher.scheduler, teacher.unet
    assert_vp_x0(teacher, sched.alphas_cumprod, [3, 400, 990], (1, R, R), states,
                 lambda x_t, k, i, s: sched.step(unet(x_t, k, encoder_hidden_states=states[i:i + 1]).sample, k, x_t,
                                                 generator=torch.Generator().manual_seed(0)).pred_original_sample)


def test_guidance_is_the_empty_prompt_extrapolated(sd):
    teacher = load_teacher(sd)
    x, sigma = torch.randn(2, 1, R, R), torch.tensor([0.3, 5.0])
    states = _clip_states(sd, ["a cat", "a dog"])
    d_c = teacher(x, sigma, states)
    d_u = teacher(x, sigma, None)
    teacher.guidance = 3.0
    torch.testing.assert_close(teacher(x, sigma, states), d_u + 3.0 * (d_c - d_u), rtol=1e-5, atol=1e-5)


def test_distill_a_text_pipeline_and_sample_new_prompts(tmp_path, sd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\ntwo dots\n")
    run = db.distill(preset="tiny-images", teacher=sd, prompts=str(prompts), guidance=2.0, critic_head="fake_score",
                     classifier="none", critic_data="teacher", teacher_pool=16, out=str(tmp_path / "run"),
                     progress=False)
    gen, info = load_generator(run)
    assert info["arch"]["unet_class"] == "UNet2DConditionModel" and info["text"]["length"] == TOKENS
    # the reloaded generator is the last checkpoint's EMA generator
    saved = OneStepGenerator.from_teacher(load_teacher(sd).network, info["sigma_g"])
    load_module(saved, list_checkpoints(Path(run) / "checkpoints")[-1] / "ema.safetensors")
    z = torch.randn(2, 1, R, R, generator=torch.Generator().manual_seed(3))
    states = _clip_states(sd, ["a green star", "a blue circle"])
    with torch.no_grad():
        torch.testing.assert_close(gen(z, states), saved.eval()(z, states))
    x = db.sample(run, 4, prompts=["a green star"])  # a prompt it was not distilled on
    assert x.shape == (4, 1, R, R) and torch.isfinite(x).all()


def test_a_vp_pipeline_refuses_a_student_from_pure_noise_before_the_run_folder(tmp_path, sd):
    with pytest.raises(ConfigError, match="a vp network: give a finite sigma_g"):
        db.distill(preset="tiny-images", teacher=sd, sigma_g=float("inf"), classifier="none", critic_data="teacher",
                   out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_flow_text_pipeline_loads_too(tmp_path):
    teacher = load_teacher(_pipeline(tmp_path, FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert teacher.kind == "flow" and teacher.text is not None
    x = teacher(torch.randn(2, 1, R, R), torch.tensor([0.5, 2.0]), teacher.null_hidden.expand(2, -1, -1))
    assert torch.isfinite(x).all()


def test_pipelines_it_cannot_distill_are_refused_with_the_reason(tmp_path):
    spec = _pipeline(tmp_path / "a", DDPMScheduler())
    folder = Path(spec.removeprefix("diffusers:"))
    (folder / "vae").mkdir()  # a latent pipeline whose VAE was not copied
    with pytest.raises(FileNotFoundError, match="holds no VAE"):
        load_teacher(spec)
    spec = _pipeline(tmp_path / "b", DDPMScheduler())
    import shutil

    shutil.rmtree(Path(spec.removeprefix("diffusers:")) / "text_encoder")
    with pytest.raises(FileNotFoundError, match="lists text_encoder but the folder has no text_encoder/"):
        load_teacher(spec)
    spec = _pipeline(tmp_path / "c", DDPMScheduler(), class_embed_type="timestep")
    with pytest.raises(ValueError, match="not supported"):
        load_teacher(spec)


def test_a_run_encodes_its_prompts_with_the_encoder_the_teacher_loaded(sd, monkeypatch):
    import dibregman.text as text_mod
    from dibregman.teachers import take_text_encoder
    from dibregman.train.conditions import conditions_for

    loads, real = [], text_mod.load_text_encoder
    monkeypatch.setattr(text_mod, "load_text_encoder", lambda *a, **k: (loads.append(a), real(*a, **k))[1])
    teacher = load_teacher(sd)
    prompts = Path(sd.removeprefix("diffusers:")).parent / "two-prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    conds = conditions_for(teacher, str(prompts))
    assert len(loads) == 1 and take_text_encoder(teacher) is None  # loaded once, handed over, then dropped
    torch.testing.assert_close(conds.hidden, _clip_states(sd, ["a red square", "a blue circle"]))
    conditions_for(teacher, str(prompts))  # a second encoding loads it again (nothing is kept alive)
    assert len(loads) == 2
