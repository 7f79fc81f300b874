"""LoRA students (``lora_rank``): two adapter sets on the teacher's own frozen weights, checkpoints of the
adapters alone, exact resume, and a saved generator that is the plain network with its adapters merged."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dibregman as db
from dibregman.artifacts import load_generator
from dibregman.assets import shipped
from dibregman.lora import WithoutShared, lora_copy, merged, tensor_ids
from dibregman.teachers import load_teacher
from dibregman.tiny import flux_pipeline, pixart_pipeline, sd3_pipeline, sd_pipeline
from dibregman.train.checkpoint import list_checkpoints
from dibregman.train.config import ConfigError

TEACHER = f"net:{shipped('fashion-mnist', 'teacher')}"
OPTS = {"preset": "tiny-images", "teacher": TEACHER, "classifier": "none", "lora_rank": 4, "progress": False}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(6 * 16, 5))


def test_a_lora_copy_shares_the_frozen_weights_starts_equal_and_merges_back():
    base = _net().requires_grad_(False)
    net = lora_copy(base, rank=2)
    shared = tensor_ids(base)
    assert shared <= tensor_ids(net)  # the base's tensors themselves, no copy
    assert all(p.requires_grad == (id(p) not in shared) for p in net.parameters())
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(net(x), base(x))  # B = 0: the copy starts as the base
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert not torch.allclose(net(x), base(x))
    full = merged(net)
    assert torch.allclose(full(x), net(x), atol=1e-5)
    assert [type(m) for m in full.modules()] == [type(m) for m in base.modules()]  # the plain module tree
    assert not tensor_ids(full) & shared  # its own weights: merging never wrote into the base
    view = WithoutShared(net, shared)
    assert set(view.state_dict()) == {k for k in net.state_dict() if "lora_" in k}
    with pytest.raises(RuntimeError, match="expected the tensors"):
        view.load_state_dict({})


def test_a_lora_run_checkpoints_adapters_resumes_exactly_and_saves_a_plain_generator(tmp_path):
    teacher = load_teacher(TEACHER)  # the object the run shares its weights with
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    whole = db.distill(out=str(tmp_path / "whole"), **{**OPTS, "teacher": teacher})
    # the run never wrote into the teacher it shares, nor made its weights trainable
    assert all(torch.equal(before[k], v) for k, v in teacher.network.state_dict().items())
    assert not any(p.requires_grad for p in teacher.network.parameters())
    part = db.distill(out=str(tmp_path / "part"), **{**OPTS, "steps": 2, "teacher": teacher})
    shutil.rmtree(part / "generator")
    part = db.distill(out=str(tmp_path / "part"), resume=True, **{**OPTS, "teacher": teacher})
    last = list_checkpoints(whole / "checkpoints")[-1]
    for name in ("generator", "fake_score", "ema", "critic"):
        a = load_file(last / f"{name}.safetensors")
        b = load_file(part / "checkpoints" / last.name / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        if name != "critic":  # adapters only: none of the teacher's weights, every adapter
            assert a and all("lora_" in k for k in a), name
    size = sum(v.numel() for v in load_file(last / "generator.safetensors").values())
    assert size < 0.15 * sum(v.numel() for v in before.values())
    gen, _ = load_generator(whole)  # the plain network, adapters merged
    own = gen.denoiser.state_dict()
    assert own.keys() == before.keys()  # the teacher's module tree, no adapter left
    assert any(not torch.equal(own[k], before[k]) for k in before)  # the adapters' change, folded in
    scored = torch.from_numpy(np.load(whole / "samples.npz")["student"][:4])  # the run scored the saved network
    assert torch.allclose(db.sample(whole, 4, seed=0), scored, atol=1e-5)


def test_lora_is_refused_where_there_is_no_network_to_adapt(tmp_path):
    with pytest.raises(ConfigError, match="lora_rank puts adapters on the teacher's network"):
        db.distill(preset="tiny", lora_rank=4, out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="lora_rank and lora_alpha must be >= 0"):
        db.distill(preset="tiny", lora_rank=-1, out=str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize("family", ["sd", "sd3", "pixart"])
def test_lora_students_of_diffusers_u_nets_and_transformers(tmp_path, family):
    folder = {"sd": sd_pipeline, "sd3": sd3_pipeline, "pixart": pixart_pipeline}[family](tmp_path / family)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    run = db.distill(preset="tiny-images", teacher=f"diffusers:{folder}", prompts=str(prompts), lora_rank=2,
                     out=str(tmp_path / "run"), progress=False, classifier="none", critic_data="teacher",
                     teacher_pool=16)
    ema = load_file(list_checkpoints(run / "checkpoints")[-1] / "ema.safetensors")
    assert ema and all("lora_" in k for k in ema)
    x = db.sample(run, 2, prompts=["a red square"])
    assert torch.isfinite(x).all()


def test_a_lora_student_of_stable_diffusion_exports_as_diffusers_lora_weights(tmp_path, capsys):
    # the teacher's own pipeline, its LoRA loaded and Euler's trailing one-step scheduler, is the student
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from dibregman.cli import main
    from dibregman.export import export_lora
    from dibregman.sampling import seeded_noise

    folder = sd_pipeline(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    opts = {"preset": "tiny-images", "teacher": f"diffusers:{folder}", "prompts": str(prompts), "progress": False,
            "classifier": "none", "critic_data": "teacher", "teacher_pool": 16,
            "sigma_g": load_teacher(f"diffusers:{folder}").sigma_max}  # what a one-step pipeline call denoises at
    run = db.distill(out=str(tmp_path / "run"), lora_rank=2, lora_alpha=4, **opts)  # scale 2, folded into B
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--lora", "--out", str(tmp_path / "lora")])
    assert e.value.code == 0 and "load_lora_weights" in capsys.readouterr().out
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    def one_step(lora: bool) -> torch.Tensor:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        if lora:
            pipe.load_lora_weights(str(tmp_path / "lora"))
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                            final_sigmas_type="zero", use_karras_sigmas=False)
        with torch.no_grad():
            return pipe(["a green star", "two dots"], num_inference_steps=1, guidance_scale=1.0,
                        latents=seeded_noise(0, 2, (4, 8, 8)), output_type="pt").images * 2 - 1

    ours = db.sample(run, 2, prompts=["a green star", "two dots"])
    torch.testing.assert_close(one_step(lora=True), ours, rtol=1e-5, atol=1e-5)
    assert (one_step(lora=False) - ours).abs().max() > 1e-3  # the adapters are what makes it the student
    full = db.distill(out=str(tmp_path / "full"), steps=1, **opts)
    with pytest.raises(ValueError, match="lora_rank 0"):
        export_lora(full, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_lora_student_of_a_flow_transformer_exports_as_lora_weights_of_its_pipeline(tmp_path, family):
    """Distilled from pure noise (``sigma_g = inf``), the teacher's own pipeline with its own flow scheduler and
    the exported adapters loaded is the student in one step (Flux with the student's guidance input)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from dibregman.export import export_lora
    from dibregman.sampling import seeded_noise

    folder = (sd3_pipeline if family == "sd3" else flux_pipeline)(tmp_path / family)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    run = db.distill(preset="tiny-images", teacher=f"diffusers:{folder}", prompts=str(prompts), lora_rank=2,
                     lora_alpha=4, sigma_g=float("inf"), guidance=2.0, steps=2, out=str(tmp_path / "run"),
                     progress=False, classifier="none", critic_data="teacher", teacher_pool=16)
    out = export_lora(run, tmp_path / "lora")
    assert "EulerDiscreteScheduler" not in (out / "README.md").read_text()  # the teacher's own scheduler
    _, info = load_generator(run)
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # this SD3 has no T5
    z = seeded_noise(0, 2, (16, 8, 8))
    kw = {"max_sequence_length": info["text"]["length"], "height": 16, "width": 16, "guidance_scale": 1.0}
    if family == "flux":
        z, kw["guidance_scale"] = FluxPipeline._pack_latents(z, 2, 16, 8, 8), 2.0

    def one_step(lora: bool) -> torch.Tensor:
        pipe = cls.from_pretrained(folder, local_files_only=True, **absent)
        if lora:
            pipe.load_lora_weights(str(out))
        with torch.no_grad():
            return pipe(["a green star", "two dots"], num_inference_steps=1, latents=z, output_type="pt",
                        **kw).images * 2 - 1

    ours = db.sample(run, 2, prompts=["a green star", "two dots"])
    torch.testing.assert_close(one_step(lora=True), ours, rtol=1e-5, atol=1e-5)
    assert (one_step(lora=False) - ours).abs().max() > 1e-4  # the adapters are what makes it the student
