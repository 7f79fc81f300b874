"""Distilling a diffusers teacher: students start from ``DiffusersDenoiser`` copies of its UNet + scheduler
conversion, runs finish, generators reload offline from generator.json, and resume is exact."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from procs import run_proc
from safetensors.torch import load_file

import dibregman as db
from dibregman.artifacts import arch_of, build_precond, load_generator
from dibregman.export import export_diffusers
from dibregman.generator import OneStepGenerator
from dibregman.precond import edm_loss_weight
from dibregman.teachers import load_teacher
from dibregman.teachers.diffusers import DiffusersDenoiser
from dibregman.train.checkpoint import list_checkpoints, load_module

pytestmark = pytest.mark.usefixtures("one_thread")

R, CLASSES = 8, 3


def _folder(root: Path, scheduler, num_class_embeds: int | None) -> str:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=R, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, num_class_embeds=num_class_embeds, down_block_types=("DownBlock2D",
                       "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")
    return f"diffusers:{root}"


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory) -> str:
    """Class-conditional, epsilon prediction."""
    return _folder(tmp_path_factory.mktemp("ddpm"), DDPMScheduler(prediction_type="epsilon"), CLASSES)


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> str:
    """Unconditional rectified flow."""
    return _folder(tmp_path_factory.mktemp("flow"), FlowMatchEulerDiscreteScheduler(shift=3.0), None)


def _inputs(teacher, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.01, 0.5, 3.0, 40.0])[:n].clamp(teacher.sigma_min, teacher.sigma_max)
    x = torch.randn(n, *teacher.shape, generator=g) * (1 + sigma).reshape(-1, 1, 1, 1)
    cond = torch.arange(n) % teacher.num_classes if teacher.num_classes else None
    return x, sigma, cond


def _distill(spec: str, out: Path, **options) -> Path:
    opts = {"critic_head": "fake_score", "classifier": "none", "critic_data": "teacher", "teacher_pool": 16, **options}
    return db.distill(preset="tiny-images", teacher=spec, out=str(out), progress=False, **opts)


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run / "checkpoints")[-1]
    return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("which", ["ddpm", "flow"])
def test_network_is_the_teachers_denoiser(request, which):
    teacher = load_teacher(request.getfixturevalue(which))
    net = teacher.network
    assert isinstance(net, DiffusersDenoiser) and net.unet is teacher.unet
    x, sigma, cond = _inputs(teacher)
    student = copy.deepcopy(net).requires_grad_(True).train()  # what distill makes of it (dropout is 0)
    out = student(x, sigma, cond)
    assert out.requires_grad
    assert torch.equal(out.detach(), teacher(x, sigma, cond))  # the same function, bit for bit
    feats = student.features(x, sigma, cond)
    assert feats.shape == (4, student.backbone.feature_channels, R // 2, R // 2)
    assert torch.equal(student.loss_weight(sigma), edm_loss_weight(sigma, teacher.sigma_data))
    # the arch is plain JSON and rebuilds the same denoiser offline
    arch = json.loads(json.dumps(arch_of(net)))
    assert arch["kind"] == "diffusers" and arch["unet_config"]["block_out_channels"] == [8, 16]
    rebuilt = build_precond(arch, teacher.sigma_data)
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    assert all(k.startswith("backbone.unet.") for k in net.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, sigma, cond), teacher(x, sigma, cond))
    assert (rebuilt.sigma_min, rebuilt.sigma_max) == (teacher.sigma_min, teacher.sigma_max)


def test_features_are_the_unets_bottleneck_and_checkpointing_keeps_gradients(ddpm):
    teacher = load_teacher(ddpm)
    x, sigma, cond = _inputs(teacher)
    net = copy.deepcopy(teacher.network).requires_grad_(True)  # a student's copy, as build makes it
    seen = {}
    hook = net.unet.mid_block.register_forward_hook(lambda m, a, out: seen.update(mid=out))  # returns None
    with torch.no_grad():
        net(x, sigma, cond)  # the full UNet2DModel.forward
        torch.testing.assert_close(net.features(x, sigma, cond), seen["mid"], rtol=0, atol=0)
        hook.remove()
        assert not torch.equal(net.features(x, sigma, cond), net.features(x, sigma, cond.flip(0)))
    with pytest.raises(ValueError, match="class-conditional"):
        net.features(x, sigma)

    def grads(model):
        model.zero_grad()
        (model(x, sigma, cond).square().mean() + model.features(x, sigma, cond).mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(copy.deepcopy(net).train())
    ckpt = copy.deepcopy(net).train()
    ckpt.backbone.unet.enable_gradient_checkpointing()  # what distill's grad_checkpointing calls
    for a, b in zip(plain, grads(ckpt), strict=True):
        torch.testing.assert_close(a, b)


def test_distill_class_conditional_ddpm_and_reload(tmp_path, ddpm):
    # reverse KL with a GAN term: the critic head reads the (class-conditional) fake score's features
    run = _distill(ddpm, tmp_path / "run", divergence="reverse_kl", gan_weight=0.01)
    assert (run / "summary.json").is_file() and (run / "samples_student.png").is_file()
    info = json.loads((run / "generator" / "generator.json").read_text())
    assert info["arch"]["kind"] == "diffusers" and info["arch"]["scheduler_class"] == "DDPMScheduler"
    assert info["shape"] == [1, R, R] and info["num_classes"] == CLASSES
    gen, _ = load_generator(run)
    # the EMA generator of the last checkpoint, rebuilt from the teacher rather than from generator.json
    saved = OneStepGenerator.from_teacher(load_teacher(ddpm).network, info["sigma_g"])
    load_module(saved, list_checkpoints(run / "checkpoints")[-1] / "ema.safetensors")
    z = torch.randn(6, 1, R, R, generator=torch.Generator().manual_seed(3))
    y = torch.arange(6) % CLASSES
    with torch.no_grad():
        assert torch.equal(gen(z, y), saved.eval()(z, y))
        before = OneStepGenerator.from_teacher(load_teacher(ddpm).network, info["sigma_g"]).eval()(z, y)
    assert not torch.equal(gen(z, y), before)  # four steps moved it
    with pytest.raises(ValueError, match="diffusers teacher"):
        export_diffusers(run, tmp_path / "exported")


def test_flow_teacher_resumes_exactly(tmp_path, flow):
    whole = _distill(flow, tmp_path / "whole", divergence="hellinger")
    _distill(flow, tmp_path / "part", divergence="hellinger", steps=2)
    part = db.distill(preset="tiny-images", teacher=flow, out=str(tmp_path / "part"), progress=False, resume=True,
                      critic_head="fake_score", classifier="none", critic_data="teacher", teacher_pool=16,
                      divergence="hellinger")
    a, b = _checkpoint(whole), _checkpoint(part)
    assert a.keys() == b.keys() and any(k.startswith("critic/") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_distills_a_diffusers_folder(tmp_path, ddpm):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cli"
    args = ["distill", "--teacher", ddpm, "--preset", "tiny-images", "--classifier", "none", "--critic-data", "teacher",
            "--teacher-pool", "16", "--out", str(out)]
    proc = run_proc([sys.executable, "-m", "dibregman", *args], timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "generator" / "model.safetensors").is_file()
