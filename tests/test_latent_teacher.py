"""A latent text-to-image teacher trained here: ``train-vae`` (a diffusers AutoencoderKL), then ``train-teacher
--backbone sd3 --vae`` (an SD3Transformer2DModel under flow matching on the VAE's scaled latents, captions through
``minilm+pooled``), read back as ``net:<folder>``, distilled, sampled and resumed, on tiny sizes over ``digits``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import dibregman as db
from dibregman.export import export_diffusers
from dibregman.teachers import latent_codec, load_teacher
from dibregman.teachers.diffusers import DiffusersTeacher
from dibregman.teachers.dit import unpack_text
from dibregman.teachers.latent import load_codec
from dibregman.teachers.trained import load_teacher as load_net
from dibregman.teachers.trained import save_teacher
from dibregman.text import load_text_encoder
from dibregman.train.checkpoint import write_manifest
from dibregman.train.config import ConfigError
from dibregman.train.teacher import _captions
from dibregman.train.vae import train_vae

pytestmark = pytest.mark.usefixtures("one_thread")

SD3 = {"backbone": "sd3", "text_encoder": "minilm+pooled", "hidden": 32, "depth": 2}


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return train_vae("digits", tmp_path_factory.mktemp("vae") / "out", steps=60, batch_size=32, channels=(8, 16),
                     progress=False)


@pytest.fixture(scope="module")
def teacher_dir(vae, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    return db.train_teacher(preset="tiny-images", vae=str(vae), steps=40, batch_size=16, log_every=10,
                            checkpoint_every=40, out=str(out), progress=False, **SD3)


def test_train_vae_learns_and_scales_its_latents_to_zero_mean_unit_variance(vae, tmp_path):
    info = json.loads((vae.parent / "vae.json").read_text())
    start = train_vae("digits", tmp_path / "one-step", steps=1, batch_size=32, channels=(8, 16), progress=False)
    first = json.loads((start.parent / "vae.json").read_text())
    assert info["test_l1"] < 0.7 * first["test_l1"]  # 60 steps reconstruct held-out images far better than 1
    assert info["latent_shape"] == [4, 4, 4] and (vae.parent / "reconstructions.png").is_file()
    codec = load_codec(vae)  # the pipeline's scaling: z = (E(x) - shift) * scale
    z = codec.encode(_digits()[:1000])
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
    with pytest.raises(FileExistsError, match="already exists"):
        train_vae("digits", vae.parent, steps=1, progress=False)  # never over a finished VAE


def test_an_interrupted_vae_training_resumes_bit_exactly(tmp_path, monkeypatch):
    import os
    import signal

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from safetensors.torch import load_file

    from dibregman.train.guard import Interrupted

    kw = {"steps": 6, "batch_size": 8, "channels": (8, 16), "checkpoint_every": 2, "progress": False}
    whole = train_vae("digits", tmp_path / "whole", **kw)
    real, calls = DiagonalGaussianDistribution.kl, []

    def sigterm_in_step_5(self, *args, **kwargs):  # the posterior's KL, once per step
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiagonalGaussianDistribution, "kl", sigterm_in_step_5)
    with pytest.raises(Interrupted, match="SIGTERM at step 5"):
        train_vae("digits", tmp_path / "cut", **kw)
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "vae").exists() and (tmp_path / "cut" / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train_vae("digits", tmp_path / "cut", **kw)
    with pytest.raises(ConfigError, match="started with other arguments"):
        train_vae("digits", tmp_path / "cut", resume=True, **{**kw, "kl_weight": 1e-3})
    out = train_vae("digits", tmp_path / "cut", resume=True, **kw)
    a, b = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (whole, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out.parent / "checkpoints").exists()  # a finished folder is the VAE alone
    rows = [json.loads(line) for line in (out.parent / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["loss/vae"] < rows[0]["loss/vae"]


def _digits() -> torch.Tensor:
    from dibregman.data.images import load_images

    return load_images("digits").images


def test_the_sd3_teacher_is_a_flow_model_on_the_vae_latents(teacher_dir, vae):
    teacher = load_teacher(f"net:{teacher_dir}")
    assert isinstance(teacher, DiffusersTeacher) and latent_codec(teacher) is not None
    assert teacher.shape == (4, 4, 4) and teacher.image_shape == (1, 8, 8)
    assert (teacher.sigma_min, teacher.sigma_max) == (0.002, 80.0)  # EDM's range, as our other teachers
    assert teacher.class_names and teacher.text["encoder"] == "minilm+pooled" and teacher.text["templates"]
    assert teacher.data_spec == "digits"
    # the denoiser is the transformer's velocity in SD3's conventions: x0 = x_t - t v, timestep 1000 t
    enc = load_text_encoder("minilm+pooled")
    cond = enc.encode(["a photo of a 3", "a photo of a 7"])
    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor([0.3, 5.0])
    s = sigma[:, None, None, None]
    t, x_t = s / (1 + s), x / (1 + s)  # rectified flow: x_t = (1 - t) x0 + t n
    hidden, pooled = unpack_text(cond, 384)
    with torch.no_grad():
        v = teacher.unet(x_t, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=1000 * t.flatten(),
                         return_dict=False)[0]
    torch.testing.assert_close(teacher(x, sigma, cond), x_t - t * v, atol=1e-5, rtol=1e-5)
    # caption dropout trains the empty prompt's states as "no text" (the U-Net's stays all zeros), and that is
    # the loaded teacher's unconditional input
    names = ("three", "seven")
    null = _captions("minilm+pooled", names)[1]
    assert null.abs().sum() > 0 and not _captions("minilm", names)[1].any()
    torch.testing.assert_close(teacher.null_hidden[0], null)
    torch.testing.assert_close(teacher(x, sigma), teacher(x, sigma, enc.unconditional().expand(2, -1, -1)))
    stats = (teacher_dir.parent / "stats.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss/teacher"] for line in stats]
    assert losses[-1] < 0.8 * losses[0]  # it learned


def test_the_latent_teacher_distills_samples_images_and_resumes_exactly(teacher_dir, tmp_path):
    # critic_data = data: real digits, encoded by the teacher's VAE, stand for p in the critic
    common = dict(preset="tiny-images", teacher=f"net:{teacher_dir}", classifier="none", critic_data="data",
                  gan_weight=0.1, progress=False)
    full = db.distill(out=str(tmp_path / "full"), **common)
    part = db.distill(out=str(tmp_path / "part"), **{**common, "steps": 2})
    resumed = db.distill(out=str(part), resume=True, **common)
    a, b = (load_file(p / "generator" / "model.safetensors") for p in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = db.sample(full, 6, prompts=["a photo of a 3"])
    assert images.shape == (6, 1, 8, 8) and images.std() > 0.05  # decoded by the VAE saved with it
    assert db.sample(full, 2, prompts=["a photo of a 3"], decode=False).shape == (2, 4, 4, 4)
    assert (full / "generator" / "vae" / "manifest.json").is_file()
    with pytest.raises(ValueError, match="not a pipeline's"):  # no pipeline class of its family to go back to
        export_diffusers(full, tmp_path / "exported")


def load_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as read

    return read(str(path))


def test_a_swapped_or_missing_vae_is_refused_in_one_line(teacher_dir, vae, tmp_path):
    copy = shutil.copytree(teacher_dir, tmp_path / "copy")
    other = train_vae("digits", tmp_path / "other", steps=1, batch_size=8, channels=(8, 16), seed=1, progress=False)
    shutil.rmtree(copy / "vae")
    shutil.copytree(other, copy / "vae")
    write_manifest(copy / "vae", ["config.json", "diffusion_pytorch_model.safetensors"])  # swapped whole
    with pytest.raises(ValueError, match="not the VAE this teacher was saved with"):
        load_net(copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(ValueError, match="missing"):
        load_net(copy)


@pytest.mark.parametrize(("options", "match"), [
    ({**SD3, "text_encoder": "minilm"}, "pooled text embedding"),
    ({**SD3, "hidden": 48}, "multiple of 32"),
    ({**SD3, "patch_size": 3}, "patch_size 3 does not divide"),
    ({"data": "moons", "backbone": "sd3"}, "for image teachers"),
    ({"text_encoder": "minilm"}, "vae is for backbone = 'sd3'"),
    ({"text_encoder": "minilm+pooled"}, r"the U-Net takes the token states alone"),
])
def test_bad_sd3_teacher_options_are_refused_before_a_run_folder(options, match, vae, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        db.train_teacher(preset="tiny-images", vae=str(vae), out=str(out), progress=False, **options)
    assert not out.exists()


def test_a_vae_of_other_images_is_refused(tmp_path, vae):
    rgb = tmp_path / "rgb.npz"
    import numpy as np

    np.savez(rgb, images=np.zeros((4, 3, 8, 8), np.float32) + np.arange(4)[:, None, None, None] / 4,
             labels=np.arange(4))
    with pytest.raises(ConfigError, match="takes 1-channel images"):
        db.train_teacher(preset="tiny-images", data=str(rgb), vae=str(vae), out=str(tmp_path / "run"),
                         progress=False, **SD3)
    assert not (tmp_path / "run").exists()


def test_a_resumed_latent_teacher_run_refuses_another_vae_at_the_same_path(vae, tmp_path):
    mine = shutil.copytree(vae, tmp_path / "vae")
    options = dict(preset="tiny-images", vae=str(mine), batch_size=8, checkpoint_every=1, out=str(tmp_path / "run"),
                   progress=False, **SD3)
    db.train_teacher(steps=1, **options)
    shutil.rmtree(mine)
    train_vae("digits", tmp_path / "again", steps=1, batch_size=8, channels=(8, 16), seed=3, progress=False)
    shutil.copytree(tmp_path / "again" / "vae", mine)  # retrained in place
    with pytest.raises(ConfigError, match="not the one this run started with"):
        db.train_teacher(steps=2, resume=True, **options)


def test_a_float16_teacher_folder_loads_as_float32_and_denoises_alike(teacher_dir, tmp_path):
    teacher = load_net(teacher_dir)
    meta = {k: v for k, v in teacher.meta.items() if k not in ("format", "version", "arch", "sigma_data",
                                                               "vae_manifest_sha256")}
    half = load_net(save_teacher(tmp_path / "half", teacher.net, meta, codec=teacher.codec, dtype=torch.float16))
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (teacher_dir / "model.safetensors").stat(
    ).st_size
    assert all(p.dtype == torch.float32 for p in half.parameters())
    x, cond = torch.randn(3, 4, 4, 4), load_text_encoder("minilm+pooled").encode(["a photo of a 3"] * 3)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(half(x, sigma, cond), teacher(x, sigma, cond), atol=2e-2, rtol=2e-2)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(half.codec.encode(images), teacher.codec.encode(images), atol=2e-2, rtol=2e-2)


def test_pooled_text_states_pack_the_masked_mean_after_the_tokens():
    plain, pooled = load_text_encoder("minilm"), load_text_encoder("minilm+pooled")
    prompts = ["a photo of a bag", "sneaker"]
    states, packed = plain.encode(prompts), pooled.encode(prompts)
    assert packed.shape == (2, 17, 384)
    torch.testing.assert_close(packed[:, :16], states)
    mask = plain.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")["attention_mask"]
    mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(packed[:, 16], mean)


def test_the_shipped_latent_teacher_matches_its_provenance():
    import hashlib

    from dibregman.assets import shipped

    folder = shipped("fashion-mnist-latent", "teacher")
    readme = (folder / "README.md").read_text()
    for name in ("model.safetensors", "vae/diffusion_pytorch_model.safetensors"):  # the recorded files are these
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() in readme
    t = load_teacher("net:fashion-mnist-latent")
    assert t.shape == (4, 7, 7) and t.image_shape == (1, 28, 28) and t.text["encoder"] == "minilm+pooled"
    cond = load_text_encoder("minilm+pooled").encode(["a photo of a trouser", "a photo of a bag"])
    noise = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    images = t.codec.decode(t(80 * noise, torch.full((2,), 80.0), cond))
    # at sigma_max the denoiser gives about the mean latent of the caption's class: a trouser is narrow, a bag wide
    middle, sides = images[:, 0, 4:24, 11:17].mean((1, 2)), images[:, 0, 4:24, :5].mean((1, 2))
    assert middle[0] > sides[0] + 0.5 and sides[1] > sides[0] + 0.15
    from dataclasses import asdict

    from dibregman.train.config import TeacherConfig, resolve

    recorded = json.loads((folder / "teacher.json").read_text())["train_config"]
    preset = asdict(resolve(TeacherConfig, preset="fashion-mnist-latent"))
    assert {k: v for k, v in recorded.items() if k != "out"} == {k: v for k, v in preset.items() if k != "out"}
