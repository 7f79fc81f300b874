"""Latent teachers: a tiny Stable Diffusion 1.x-shaped folder (AutoencoderKL + CLIP + UNet2DConditionModel),
written by the real ``StableDiffusionPipeline.save_pretrained``, read offline through ``diffusers:<folder>``.
Distillation runs on the VAE's scaled latents; grids, metrics and samples are decoded images."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from vp_check import assert_vp_x0

import dibregman as db
from dibregman.artifacts import load_codec_of, load_generator
from dibregman.teachers import latent_codec, load_teacher
from dibregman.teachers.latent import LatentCodec
from dibregman.tiny import sd_pipeline, tiny_vae
from dibregman.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT, IMAGE = (4, 8, 8), (3, 16, 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sd_pipeline(tmp_path_factory.mktemp("latent"), DDPMScheduler(prediction_type="epsilon", clip_sample=False))


def _distill(folder: Path, out: Path, **kw) -> Path:
    options = {"critic_head": "fake_score", "classifier": "none", "critic_data": "teacher", "teacher_pool": 16,
               "prompts": "a red square\na blue circle\n", **kw}
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text(options.pop("prompts"))
    return db.distill(preset="tiny-images", teacher=f"diffusers:{folder}", prompts=str(prompts), out=str(out),
                      progress=False, **options)


def test_a_latent_pipeline_is_a_teacher_on_its_scaled_latents(folder):
    teacher = load_teacher(f"diffusers:{folder}")
    codec = latent_codec(teacher)
    assert isinstance(codec, LatentCodec) and teacher.shape == LATENT and teacher.image_shape == IMAGE
    assert teacher.sigma_data == 1.0  # scaled latents have unit variance by the VAE's design
    assert not any(p.requires_grad for p in codec.parameters()) and not codec.train().training  # frozen
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    # the denoiser on latents equals the pipeline's own x0 prediction from its UNet and scheduler
    states = pipe.encode_prompt(["a red square", "two dots", ""], "cpu", 1, False)[0]
    assert_vp_x0(teacher, pipe.scheduler.alphas_cumprod, [5, 500, 980], LATENT, states,
                 lambda x_t, k, i, s: pipe.scheduler.step(pipe.unet(x_t, k, encoder_hidden_states=states[i:i + 1])
                                                          .sample, k, x_t).pred_original_sample)
    # decoding is the pipeline's: VAE of latents / scaling_factor, post-processed into [0, 1]
    z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = pipe.image_processor.postprocess(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample,
                                                  output_type="pt")
    torch.testing.assert_close(codec.decode(z), theirs * 2 - 1, rtol=1e-5, atol=1e-5)
    images = codec.decode(z)
    with torch.no_grad():
        mean = pipe.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(codec.encode(images), mean * pipe.vae.config.scaling_factor, rtol=1e-5, atol=1e-5)


def test_a_vae_with_a_shift_factor_is_inverted_as_sd3_and_flux_do():
    torch.manual_seed(0)
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.25)
    codec = LatentCodec(vae)
    z = torch.randn(2, *LATENT)
    with torch.no_grad():
        ref = vae.decode(z / 1.5 + 0.25).sample.clamp(-1, 1)
        images = codec.decode(z)
        mean = vae.encode(images).latent_dist.mean
    torch.testing.assert_close(images, ref)
    torch.testing.assert_close(codec.encode(images), (mean - 0.25) * 1.5)


def test_distill_a_latent_pipeline_to_a_one_step_student_that_decodes(tmp_path, folder):
    run = _distill(folder, tmp_path / "run")
    _, info = load_generator(run)
    assert info["shape"] == list(LATENT) and info["latent"]["image_shape"] == list(IMAGE)
    arrays = np.load(run / "samples.npz")
    assert arrays["student"].shape[1:] == IMAGE and arrays["teacher"].shape[1:] == IMAGE  # images, not latents
    assert np.abs(arrays["student"]).max() <= 1 and (run / "samples_student.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert "VAE latents" in summary["protocol"] and math.isfinite(summary["metrics"]["tnet_fd"])
    # the VAE saved with the student is the teacher's, untouched by training
    teacher_vae = latent_codec(load_teacher(f"diffusers:{folder}")).state_dict()
    saved = load_codec_of(run, info).state_dict()
    assert teacher_vae.keys() == saved.keys() and all(torch.equal(teacher_vae[k], saved[k]) for k in saved)
    # db.sample decodes with it; decode=False gives the latents it decodes
    x = db.sample(run, 3, prompts=["a green star"])
    z = db.sample(run, 3, prompts=["a green star"], decode=False)
    assert x.shape == (3, *IMAGE) and z.shape == (3, *LATENT)
    torch.testing.assert_close(x, load_codec_of(run, info).decode(z))
    # the run's own evaluation and `eval` score the same decoded samples
    again = db.evaluate_run(run, classifier="none", prompts=str(tmp_path / "run-prompts.txt"))
    assert again["tnet_fd"] == pytest.approx(summary["metrics"]["tnet_fd"], rel=1e-6)


@pytest.mark.slow
def test_a_latent_run_resumes_exactly(tmp_path, folder):
    whole = _distill(folder, tmp_path / "whole")
    _distill(folder, tmp_path / "part", steps=2)
    part = _distill(folder, tmp_path / "part", resume=True)
    a, b = (load_module_state(r) for r in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("vae") or ".vae." in k for k in a)  # the frozen VAE is not checkpointed


def load_module_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = list_checkpoints(run / "checkpoints")[-1]
    return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_pipelines_it_cannot_distill_are_refused_in_one_line(tmp_path):
    sched = DDPMScheduler()
    inpaint = sd_pipeline(tmp_path / "inpaint", sched, unet_in_channels=9)  # latents + mask + masked image
    with pytest.raises(ValueError, match=r"9 input channels.*4-channel latents"):
        load_teacher(f"diffusers:{inpaint}")
    missing = sd_pipeline(tmp_path / "missing", sched)
    shutil.rmtree(missing / "vae")
    with pytest.raises(FileNotFoundError, match="lists vae but the folder has no vae/"):
        load_teacher(f"diffusers:{missing}")
    no_tokenizer = sd_pipeline(tmp_path / "notok", sched)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_teacher(f"diffusers:{no_tokenizer}")
    video = sd_pipeline(tmp_path / "video", sched)
    index = json.loads((video / "model_index.json").read_text())
    (video / "model_index.json").write_text(json.dumps({**index, "_class_name": "TextToVideoSDPipeline"}))
    with pytest.raises(ValueError, match="TextToVideoSDPipeline folder: only text-to-image"):
        load_teacher(f"diffusers:{video}")
    transformer = sd_pipeline(tmp_path / "dit", sched)  # a transformer class not read yet, in place of the UNet
    shutil.rmtree(transformer / "unet")
    (transformer / "transformer").mkdir()
    (transformer / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel"}))
    with pytest.raises(ValueError, match="unsupported model class 'SanaTransformer2DModel'"):
        load_teacher(f"diffusers:{transformer}")
    out = tmp_path / "runs" / "inpaint"  # and through distill: refused before its run folder is made
    with pytest.raises(ValueError, match="input channels"):
        db.distill(preset="tiny-images", teacher=f"diffusers:{inpaint}", out=str(out), progress=False)
    assert not out.exists()


def test_a_student_exports_to_its_teachers_own_pipeline_class_without_remote_code(tmp_path, folder):
    from diffusers import DiffusionPipeline

    from dibregman.export import export_diffusers
    from dibregman.sampling import seeded_noise

    run = _distill(folder, tmp_path / "run", steps=2)  # at the default sigma_g: refused with the fix to make
    with pytest.raises(ValueError, match="distill with --sigma-g"):
        export_diffusers(run, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    last = load_teacher(f"diffusers:{folder}").sigma_max  # the scheduler's last training noise level
    run = _distill(folder, tmp_path / "at-last", steps=2, sigma_g=last)
    out = export_diffusers(run, tmp_path / "exported")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and not list(out.glob("*.py"))
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)  # no trust_remote_code
    prompts = ["a green star", "two dots"]
    z = seeded_noise(0, 2, LATENT)
    with torch.no_grad():
        theirs = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="pt").images
    ours = db.sample(run, 2, prompts=prompts)
    torch.testing.assert_close(theirs * 2 - 1, ours, rtol=1e-5, atol=1e-5)
    assert export_diffusers(run, out) == out  # an earlier export is replaced


def test_the_tiny_pipeline_command_writes_a_folder_the_loader_reads_and_never_overwrites(tmp_path):
    from dibregman.cli import main

    def code(*argv: str) -> int:
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        return e.value.code

    out = tmp_path / "tiny-sd"
    assert code("tiny-pipeline", "sd", "--out", str(out)) == 0
    before = sorted(p.name for p in out.iterdir())
    assert load_teacher(f"diffusers:{out}").image_shape == IMAGE
    assert code("tiny-pipeline", "sdxl", "--out", str(out)) == 2  # an existing folder is refused, untouched
    assert sorted(p.name for p in out.iterdir()) == before
    assert code("tiny-pipeline", "video", "--out", str(tmp_path / "v")) == 2 and not (tmp_path / "v").exists()


def test_a_damaged_or_swapped_vae_in_the_generator_folder_is_refused(tmp_path, folder):
    from safetensors.torch import load_file, save_file

    from dibregman.train.checkpoint import CheckpointError, write_manifest

    run = _distill(folder, tmp_path / "run", steps=2)
    vae = run / "generator" / "vae"
    weights = next(vae.glob("*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + bytes(8))  # a damaged tail
    with pytest.raises(CheckpointError, match="SHA-256"):
        db.sample(run, 2, prompts=["a cat"])
    weights.write_bytes(original)
    assert db.sample(run, 2, prompts=["a cat"]).shape == (2, *IMAGE)  # restored: it loads again
    tensors = {k: v + 0.01 for k, v in load_file(weights).items()}  # another VAE, with a manifest of its own
    save_file(tensors, weights)
    write_manifest(vae, sorted(f.name for f in vae.iterdir() if f.name != "manifest.json"))
    with pytest.raises(CheckpointError, match="not the VAE this generator was saved with"):
        db.sample(run, 2, prompts=["a cat"])
