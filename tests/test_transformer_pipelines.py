"""Transformer pipelines: tiny randomly initialised Stable Diffusion 3 (two CLIP encoders with projections, no
T5, an ``SD3Transformer2DModel``, a shifted flow grid) and Flux (CLIP + T5, a ``FluxTransformer2DModel`` over
2x2-packed latents with a guidance embedding, dynamic shifting) folders, saved by the real ``save_pretrained``
and read offline through ``diffusers:<folder>``; both with a 16-channel VAE with a shift factor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from vp_check import assert_vp_x0

import dibregman as db
from dibregman.teachers import load_teacher
from dibregman.teachers.dit import pack_text, unpack_text
from dibregman.text import load_text_encoder
from dibregman.tiny import flux_pipeline, sd3_pipeline
from dibregman.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT, IMAGE = (16, 8, 8), (3, 16, 16)
BUILD = {"sd3": sd3_pipeline, "flux": flux_pipeline}


@pytest.fixture(scope="module", params=sorted(BUILD))
def family(request, tmp_path_factory):
    return request.param, BUILD[request.param](tmp_path_factory.mktemp(request.param))


def _pipe(name, folder):
    if name == "sd3":
        return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                        local_files_only=True)
    return FluxPipeline.from_pretrained(folder, local_files_only=True)


def _pipeline_x0(name, pipe, x_t, t, timesteps, prompts, guidance=1.0):
    """x0 as the pipeline predicts it: its own prompt encoding, model call and velocity (Flux: with its
    ``guidance_scale`` as the model's guidance input)."""
    b = len(x_t)
    with torch.no_grad():
        if name == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
            v = pipe.transformer(x_t, encoder_hidden_states=hidden, pooled_projections=pooled,
                                 timestep=timesteps).sample
        else:
            hidden, pooled, text_ids = pipe.encode_prompt(prompts, None)
            c, h, w = x_t.shape[1:]
            v = pipe.transformer(hidden_states=pipe._pack_latents(x_t, b, c, h, w), timestep=timesteps / 1000,
                                 guidance=torch.full((b,), guidance), pooled_projections=pooled,
                                 encoder_hidden_states=hidden, txt_ids=text_ids,
                                 img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x_t.dtype)).sample
            v = pipe._unpack_latents(v, h, w, 1)
    return x_t - t.float().reshape(-1, 1, 1, 1) * v, pack_text(hidden, pooled)


def test_flux_latent_packing_is_the_pipelines():
    from dibregman.teachers.dit import pack_latents, unpack_latents

    x = torch.randn(2, 3, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 3, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(unpack_latents(packed, 6, 4), FluxPipeline._unpack_latents(packed, 6, 4, 1))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), length=st.integers(1, 5), d=st.integers(1, 9), p=st.integers(1, 30))
def test_packing_the_pooled_projections_as_tokens_round_trips(n, length, d, p):
    hidden, pooled = torch.randn(n, length, d), torch.randn(n, p)
    h, q = unpack_text(pack_text(hidden, pooled), p)
    assert torch.equal(h, hidden) and torch.equal(q, pooled)


def test_the_denoiser_is_the_pipelines_own_x0_with_its_prompt_handling(family):
    name, folder = family
    teacher = load_teacher(f"diffusers:{folder}")
    assert teacher.shape == LATENT and teacher.image_shape == IMAGE and teacher.kind == "flow"
    pipe = _pipe(name, folder)
    prompts = ["a red square", "two dots", ""]
    # the pipeline's own sampling grid, after its first time t = 1 (pure noise)
    pipe.scheduler.set_timesteps(4, **({"mu": 0.8} if name == "flux" else {}))
    t, timesteps = pipe.scheduler.sigmas[1:4].double(), pipe.scheduler.timesteps[1:4]
    x_t = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(1))
    ref, cond = _pipeline_x0(name, pipe, x_t, t, timesteps, prompts)
    torch.testing.assert_close(load_text_encoder(str(folder)).encode(prompts), cond)
    torch.testing.assert_close(teacher.null_hidden, cond[2:])  # the empty prompt: the pipeline's negative
    sigma = t / (1 - t)  # x_t = (1 - t) x0 + t n  <=>  x_sigma = x_t / (1 - t), sigma = t / (1 - t)
    x_sigma = x_t * (1 + sigma.float()).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(teacher(x_sigma, sigma, cond), ref, rtol=1e-4, atol=1e-4)
    teacher.guidance = 3.0
    if name == "flux":  # guidance-distilled: the scale is the model's guidance input, one call, as the pipeline
        ref, _ = _pipeline_x0(name, pipe, x_t, t, timesteps, prompts, guidance=3.0)
        torch.testing.assert_close(teacher(x_sigma, sigma, cond), ref, rtol=1e-4, atol=1e-4)
        return
    # classifier-free guidance on x0 is guidance on the velocity (x0 is affine in v), as true CFG does it
    d_c, d_u = teacher.net(x_sigma[:2], sigma[:2], cond[:2]), teacher.net(x_sigma[:2], sigma[:2],
                                                                         cond[2:].expand(2, -1, -1))
    torch.testing.assert_close(teacher(x_sigma[:2], sigma[:2], cond[:2]), d_u + 3.0 * (d_c - d_u), rtol=1e-5,
                               atol=1e-5)


def _distill(folder, out, **kw):
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    options = {"critic_head": "fake_score", "classifier": "none", "critic_data": "teacher", "teacher_pool": 16, **kw}
    return db.distill(preset="tiny-images", teacher=f"diffusers:{folder}", prompts=str(prompts), out=str(out),
                      progress=False, **options)


def _state(run):
    from safetensors.torch import load_file

    last = list_checkpoints(run / "checkpoints")[-1]
    return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_distill_sample_new_prompts_and_say_why_a_finite_sigma_g_does_not_export(tmp_path, family):
    from dibregman.artifacts import load_generator
    from dibregman.export import export_diffusers

    _, folder = family
    whole = _distill(folder, tmp_path / "whole", guidance=2.0)
    arrays = np.load(whole / "samples.npz")
    assert arrays["student"].shape[1:] == IMAGE and arrays["teacher"].shape[1:] == IMAGE
    x = db.sample(whole, 2, prompts=["a green star"])
    assert x.shape == (2, *IMAGE) and torch.isfinite(x).all() and x.abs().max() <= 1
    gen, info = load_generator(whole)  # rebuilt offline from generator.json (a Flux arch keeps its latent size)
    assert gen.denoiser.shape == LATENT
    if family[0] == "flux":  # and the guidance input the student was distilled with
        assert info["arch"]["options"]["embedded_guidance"] == 2.0 == gen.denoiser.backbone.embedded_guidance
    with pytest.raises(ValueError, match=r"starts from pure noise at t = 1.*--sigma-g inf"):
        export_diffusers(whole, tmp_path / "exported")


def test_a_pure_noise_student_exports_to_its_own_pipeline_class_that_reproduces_it(tmp_path, family):
    """``sigma_g = inf``: the student is the flow model at t = 1, what a one-step SD3 / Flux call computes, so the
    exported ``StableDiffusion3Pipeline`` / ``FluxPipeline`` folder (no custom code) draws `dibregman sample`'s
    images from the same noise; Flux with the student's guidance input as its ``guidance_scale``."""
    import json

    from diffusers import DiffusionPipeline

    from dibregman.export import export_diffusers
    from dibregman.sampling import seeded_noise

    name, folder = family
    run = _distill(folder, tmp_path / "run", guidance=2.0, sigma_g=float("inf"), steps=2)
    info = json.loads((run / "generator" / "generator.json").read_text())
    assert info["sigma_g"] == float("inf")
    out = export_diffusers(run, tmp_path / "exported")
    readme = (out / "README.md").read_text()
    cls = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[name]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == cls
    absent = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}  # this SD3 has no T5
    assert ("text_encoder_3=None" in readme) == bool(absent) and "from pure noise (t = 1)" in readme
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True, **absent)
    z = seeded_noise(0, 2, LATENT)
    kw = {"max_sequence_length": info["text"]["length"], "height": IMAGE[1], "width": IMAGE[2],
          "guidance_scale": 1.0}
    if name == "flux":  # packed latents; the guidance input the student was distilled with
        z = FluxPipeline._pack_latents(z, 2, *LATENT)
        kw["guidance_scale"] = 2.0
        assert "guidance_scale=2," in readme
    asked = ["a green star", "two dots"]
    with torch.no_grad():
        theirs = pipe(asked, num_inference_steps=1, latents=z, output_type="pt", **kw).images
    torch.testing.assert_close(theirs * 2 - 1, db.sample(run, 2, prompts=asked), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_transformer_run_resumes_exactly(tmp_path, family):
    _, folder = family
    whole = _distill(folder, tmp_path / "whole", guidance=2.0)
    _distill(folder, tmp_path / "part", guidance=2.0, steps=2)
    part = _distill(folder, tmp_path / "part", guidance=2.0, resume=True)
    a, b = _state(whole), _state(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gradient_checkpointing_changes_no_weight_and_a_standalone_critic_trains(tmp_path, family):
    _, folder = family
    kw = {"steps": 2, "divergence": "hellinger", "critic_head": "standalone"}
    plain = _state(_distill(folder, tmp_path / "plain", **kw))
    saved = _state(_distill(folder, tmp_path / "gc", grad_checkpointing=True, **kw))
    assert plain.keys() == saved.keys() and any(k.startswith("critic/") for k in plain)
    for k in plain:  # recomputing activations in the backward pass is the same arithmetic
        torch.testing.assert_close(saved[k], plain[k], rtol=1e-5, atol=1e-6)


def test_pixart_sigma_reads_as_a_vp_transformer_with_t5_and_its_attention_mask(tmp_path):
    """PixArt-Sigma: T5 states and their padding mask, a VP (DPM-Solver) table, learned variance."""
    import math

    from diffusers import PixArtSigmaPipeline

    from dibregman.teachers.dit import unpack_masked
    from dibregman.tiny import pixart_pipeline

    folder = pixart_pipeline(tmp_path / "pixart")
    teacher = load_teacher(f"diffusers:{folder}")
    assert teacher.shape == (4, 8, 8) and teacher.image_shape == IMAGE and teacher.kind == "vp"
    pipe = PixArtSigmaPipeline.from_pretrained(folder, local_files_only=True)
    prompts = ["a red square", "two dots"]
    states, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    cond = load_text_encoder(str(folder)).encode(prompts)
    s, m = unpack_masked(cond)
    torch.testing.assert_close(s, states)
    assert torch.equal(m, mask.float()) and 0 < m.sum() < m.numel()  # padding is masked out

    def x0(x_t, k, i, s):
        out = pipe.transformer(x_t, encoder_hidden_states=states[i:i + 1], encoder_attention_mask=mask[i:i + 1],
                               timestep=torch.tensor([k]), added_cond_kwargs={"resolution": None,
                                                                              "aspect_ratio": None}).sample
        eps = out.chunk(2, dim=1)[0]  # the learned-variance half is not the denoiser's
        return x_t * math.sqrt(1 + s * s) - s * eps

    assert_vp_x0(teacher, pipe.scheduler.alphas_cumprod, [10, 600], (4, 8, 8), cond, x0)
    run = _distill(folder, tmp_path / "run", guidance=2.0)
    assert db.sample(run, 2, prompts=["a green star"]).shape == (2, *IMAGE)


@pytest.mark.parametrize("cls", ["PixArtSigmaPipeline", "PixArtAlphaPipeline"])
def test_a_pixart_student_exports_to_its_pixart_pipeline_that_reproduces_it(tmp_path, cls):
    import json

    from diffusers import DiffusionPipeline

    from dibregman.export import export_diffusers
    from dibregman.sampling import seeded_noise
    from dibregman.tiny import pixart_pipeline

    folder = pixart_pipeline(tmp_path / "pixart", alpha=cls == "PixArtAlphaPipeline")
    teacher = load_teacher(f"diffusers:{folder}")
    run = _distill(folder, tmp_path / "run", sigma_g=teacher.sigma_max, steps=2)
    out = export_diffusers(run, tmp_path / "exported")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == cls
    length = teacher.text["length"]
    assert length == {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}[cls]  # each pipeline's T5 budget
    assert f"max_sequence_length={length}" in (out / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)  # no custom code
    asked = ["a green star", "two dots"]
    with torch.no_grad():
        theirs = pipe(asked, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=length,
                      use_resolution_binning=False, clean_caption=False, latents=seeded_noise(0, 2, teacher.shape),
                      output_type="pt").images
    torch.testing.assert_close(theirs * 2 - 1, db.sample(run, 2, prompts=asked), rtol=1e-5, atol=1e-5)


def test_pixart_alpha_1024s_size_conditions_are_the_pipelines_at_the_students_size(tmp_path):
    """PixArt-Alpha 1024 (``use_additional_conditions``) is conditioned on the image's size in pixels and its
    aspect ratio, which ``PixArtAlphaPipeline`` computes from ``height`` and ``width``: the teacher feeds the
    student's own size, and the students keep it in their arch."""
    from diffusers import PixArtTransformer2DModel

    from dibregman.artifacts import load_generator
    from dibregman.tiny import pixart_pipeline

    folder = pixart_pipeline(tmp_path / "alpha", alpha=True, sized=True)
    teacher = load_teacher(f"diffusers:{folder}")
    assert teacher.net.backbone.options == {"image_size": [16, 16]}
    model = PixArtTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
    cond = load_text_encoder(str(folder)).encode(["a red square", "two dots"])
    from dibregman.teachers.dit import unpack_masked

    states, mask = unpack_masked(cond)
    x_t, k = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300.0, 300.0])
    sizes = {"resolution": torch.tensor([[16.0, 16.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():
        ref = model(x_t, encoder_hidden_states=states, encoder_attention_mask=mask, timestep=k,
                    added_cond_kwargs=sizes).sample
        ours = teacher.net.backbone(x_t, k, cond)
        other = model(x_t, encoder_hidden_states=states, encoder_attention_mask=mask, timestep=k,
                      added_cond_kwargs={**sizes, "resolution": torch.tensor([[32.0, 16.0]] * 2)}).sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (other - ref).abs().max() > 1e-4  # the condition is read
    run = _distill(folder, tmp_path / "run", steps=2, sigma_g=teacher.sigma_max)
    gen, info = load_generator(run)
    assert info["arch"]["options"] == {"image_size": [16, 16]} and gen.denoiser.backbone.sized
    from dibregman.export import export_diffusers

    with pytest.raises(ValueError, match="feeds only to a model of sample size 128"):  # its pipeline would fail
        export_diffusers(run, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_a_pixart_config_of_the_legacy_class_name_reads_as_pixart(tmp_path):
    """The Hub's PixArt folders name ``Transformer2DModel`` (with ``norm_type = ada_norm_single``), which diffusers
    remaps to ``PixArtTransformer2DModel``: read the same teacher."""
    import json

    from dibregman.tiny import pixart_pipeline

    folder = pixart_pipeline(tmp_path / "pixart")
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, 3.0])
    cond = load_text_encoder(str(folder)).encode(["a red square", "two dots"])
    with torch.no_grad():
        ref = load_teacher(f"diffusers:{folder}")(x, sigma, cond)
        config = folder / "transformer" / "config.json"
        doc = json.loads(config.read_text())
        assert doc["norm_type"] == "ada_norm_single"
        config.write_text(json.dumps({**doc, "_class_name": "Transformer2DModel"}))
        torch.testing.assert_close(load_teacher(f"diffusers:{folder}")(x, sigma, cond), ref, rtol=0, atol=0)
