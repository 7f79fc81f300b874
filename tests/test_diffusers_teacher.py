"""Diffusers teachers: tiny UNet2DModels saved with their schedulers, read back through ``load_teacher``, and
checked against the schedulers' own x0 predictions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from dibregman.teachers import load_teacher
from dibregman.teachers.base import Teacher
from dibregman.teachers.diffusers import DiffusersDenoiser, DiffusersTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

C, R = 2, 8


def _unet(seed: int = 0, **kw) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=R, in_channels=C, out_channels=kw.pop("out_channels", C),
                       block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       **kw).eval()


def _save(folder, unet: UNet2DModel, scheduler, flat: bool = False) -> str:
    """A saved pipeline (``unet/``, ``scheduler/``) or, with ``flat``, both in the folder itself."""
    unet.save_pretrained(folder if flat else folder / "unet")
    scheduler.save_pretrained(folder if flat else folder / "scheduler")
    return f"diffusers:{folder}"


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, C, R, R, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _unet_out(unet: UNet2DModel, x: torch.Tensor, t, **kw) -> torch.Tensor:
    return unet(x, t, **kw).sample


# --- agreement with the schedulers' own math --------------------------------------------------------------


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_discrete_vp_matches_scheduler_step(tmp_path, cls, pred):
    unet = _unet()
    sched = cls(prediction_type=pred, clip_sample=False)  # clipping is sampler post-processing, not D
    teacher = load_teacher(_save(tmp_path, unet, sched))
    steps = [0, 7, 250, 600, 999]
    ab = sched.alphas_cumprod.double()[steps]
    sigma = ((1 - ab) / ab).sqrt()
    x_sigma = _x(len(steps)) * (1 + sigma.float()).reshape(-1, 1, 1, 1)
    got = teacher(x_sigma, sigma)
    sched.set_timesteps(sched.config.num_train_timesteps)  # DDIM's step needs an inference grid
    for i, k in enumerate(steps):
        x_t = x_sigma[i : i + 1] / math.sqrt(1 + sigma[i].item() ** 2)
        out = _unet_out(unet, x_t, k)
        ref = sched.step(out, k, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(got[i : i + 1], ref, rtol=1e-4, atol=1e-4 * (1 + sigma[i].item()))
        a = sched.alphas_cumprod[k].double()  # and the closed form of METHOD.md section 7
        closed = {"epsilon": (x_t - (1 - a).sqrt() * out) / a.sqrt(),
                  "v_prediction": a.sqrt() * x_t - (1 - a).sqrt() * out, "sample": out}[pred].float()
        torch.testing.assert_close(got[i : i + 1], closed, rtol=1e-4, atol=1e-4 * (1 + sigma[i].item()))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_matches_scheduler_step(tmp_path, pred, karras):
    unet = _unet()
    sched = EulerDiscreteScheduler(prediction_type=pred, use_karras_sigmas=karras)
    teacher = load_teacher(_save(tmp_path, unet, sched))
    # Karras sigmas fall between the training grid: diffusers then interpolates the timestep in log sigma too
    sched.set_timesteps(6 if karras else sched.config.num_train_timesteps)
    _check_euler_grid(teacher, unet, sched, range(6) if karras else [0, 1, 400, 998, 999], atol_t=1e-3)


def _check_euler_grid(teacher, unet, sched, idx, atol_t: float | None = None) -> None:
    """At each grid point on its own: the teacher's timestep is the scheduler's, and its denoiser is
    ``step(...).pred_original_sample`` (``atol_t`` None: torch's default tolerance for the timestep)."""
    tol = {} if atol_t is None else {"rtol": 1e-5, "atol": atol_t}
    for i in idx:
        sched._step_index = None
        ts, sigma = sched.timesteps[i], sched.sigmas[i]
        torch.testing.assert_close(teacher.timestep_from_sigma(sigma).float(), ts, **tol)
        x_sigma = _x(1, seed=i) * (1 + sigma)
        out = _unet_out(unet, sched.scale_model_input(x_sigma, ts), ts)
        ref = sched.step(out, ts, x_sigma).pred_original_sample
        torch.testing.assert_close(teacher(x_sigma, sigma), ref, rtol=1e-4, atol=1e-4 * (1 + sigma.item()))


def test_euler_continuous_v_timesteps(tmp_path):
    unet = _unet()
    sched = EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    teacher = load_teacher(_save(tmp_path, unet, sched))
    sched.set_timesteps(5)
    _check_euler_grid(teacher, unet, sched, range(5))  # timesteps 0.25 log sigma


def test_flow_matching_matches_scheduler(tmp_path):
    unet = _unet()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    teacher = load_teacher(_save(tmp_path, unet, sched))
    n = sched.config.num_train_timesteps
    t_grid = sched.sigmas.double()
    assert teacher.sigma_min == pytest.approx(float(t_grid.min() / (1 - t_grid.min())))
    assert teacher.sigma_max == pytest.approx(float(t_grid[1] / (1 - t_grid[1])))  # t = 1 is sigma = inf
    sched.set_timesteps(8)
    for i in range(1, 8):  # index 0 is t = 1, pure noise
        t, ts = sched.sigmas[i].double(), sched.timesteps[i]
        sigma = t / (1 - t)
        torch.testing.assert_close(teacher.timestep_from_sigma(sigma).float(), ts)
        assert ts.item() == pytest.approx(t.item() * n, rel=1e-6)
        x_sigma = _x(1, seed=i) * (1 + sigma.float())
        x_t = x_sigma / (1 + sigma.float())
        v = _unet_out(unet, x_t, ts)
        got = teacher(x_sigma, sigma.float())
        torch.testing.assert_close(got, x_t - t.float() * v, rtol=1e-4, atol=1e-4 * (1 + sigma.item()))
        # one Euler step of the scheduler itself from t to 0 lands on x0 = x_t - t v
        one = FlowMatchEulerDiscreteScheduler.from_config(sched.config, shift=1.0)
        one.set_timesteps(sigmas=[t.item()])
        ref = one.step(_unet_out(unet, x_t, one.timesteps[0]), one.timesteps[0], x_t).prev_sample
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * (1 + sigma.item()))


def test_learned_variance_output_uses_mean_half(tmp_path):
    unet = _unet(out_channels=2 * C)
    sched = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    teacher = load_teacher(_save(tmp_path, unet, sched))
    k = 300
    a = sched.alphas_cumprod[k].double()
    sigma = ((1 - a) / a).sqrt().float()
    x_sigma = _x(2) * (1 + sigma)
    x_t = x_sigma / (1 + sigma**2).sqrt()
    ref = sched.step(_unet_out(unet, x_t, k), k, x_t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(teacher(x_sigma, sigma), ref.pred_original_sample, rtol=1e-4, atol=1e-4)


def test_class_conditional(tmp_path):
    unet = _unet(num_class_embeds=3)
    teacher = load_teacher(_save(tmp_path, unet, DDPMScheduler()))
    assert teacher.num_classes == 3
    cond = torch.tensor([0, 2])
    sigma = torch.tensor([0.3, 4.0])
    x_sigma = _x(2)
    x_t = x_sigma / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    eps = _unet_out(unet, x_t, teacher.timestep_from_sigma(sigma).float(), class_labels=cond)
    torch.testing.assert_close(teacher(x_sigma, sigma, cond), x_sigma - sigma.reshape(-1, 1, 1, 1) * eps)
    assert not torch.allclose(teacher(x_sigma, sigma, cond), teacher(x_sigma, sigma, cond.flip(0)))
    with pytest.raises(ValueError, match="class-conditional"):
        teacher(x_sigma, sigma)


# --- the teacher protocol and the sigma <-> timestep map ------------------------------------------------------


def test_protocol_frozen_and_flat_layout(tmp_path):
    unet = _unet()
    teacher = load_teacher(_save(tmp_path, unet, DDIMScheduler(), flat=True))
    assert isinstance(teacher, Teacher) and isinstance(teacher, DiffusersTeacher)
    assert teacher.shape == (C, R, R) and teacher.num_classes == 0 and teacher.sigma_data == 0.5
    assert isinstance(teacher.network, DiffusersDenoiser) and isinstance(teacher.unet, UNet2DModel)
    assert teacher.network.unet is teacher.unet  # students start from copies of the teacher's own denoiser
    ab = DDIMScheduler().alphas_cumprod.double()
    assert teacher.sigma_min == pytest.approx(math.sqrt((1 - ab[0]) / ab[0]))
    assert teacher.sigma_max == pytest.approx(math.sqrt((1 - ab[-1]) / ab[-1]))
    teacher.train()
    assert not teacher.unet.training
    x = _x(2).requires_grad_(True)
    assert not teacher(x, torch.tensor(1.0)).requires_grad  # scalar sigma broadcasts; no autograd by default
    teacher.no_grad = False
    teacher(x, torch.tensor(1.0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vp_sigma_timestep_round_trips(tmp_path):
    teacher = load_teacher(_save(tmp_path, _unet(), DDPMScheduler(beta_schedule="squaredcos_cap_v2")))
    n = teacher.num_train_timesteps
    ab = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    knots = ((1 - ab) / ab).sqrt()
    torch.testing.assert_close(teacher.timestep_from_sigma(knots), torch.arange(n, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    lo, hi = math.log(teacher.sigma_min), math.log(teacher.sigma_max)
    sigma = (lo + (hi - lo) * torch.rand(200, generator=g, dtype=torch.float64)).exp()
    torch.testing.assert_close(teacher.sigma_from_timestep(teacher.timestep_from_sigma(sigma)), sigma)
    t = (n - 1) * torch.rand(200, generator=g, dtype=torch.float64)
    torch.testing.assert_close(teacher.timestep_from_sigma(teacher.sigma_from_timestep(t)), t)
    ts = teacher.timestep_from_sigma(sigma)
    assert bool((ts.diff()[sigma.diff() > 0] > 0).all())  # monotone
    # outside the trained range the timestep is clamped to the grid's ends
    out = teacher.timestep_from_sigma(torch.tensor([teacher.sigma_min / 10, 0.0, teacher.sigma_max * 10]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, n - 1.0], dtype=torch.float64))
    assert torch.isfinite(teacher(_x(2), torch.tensor([0.0, teacher.sigma_max * 10]))).all()


def test_flow_sigma_timestep_round_trips(tmp_path):
    teacher = load_teacher(_save(tmp_path, _unet(), FlowMatchEulerDiscreteScheduler()))
    sigma = torch.logspace(-3, 3, 50, dtype=torch.float64)
    torch.testing.assert_close(teacher.sigma_from_timestep(teacher.timestep_from_sigma(sigma)), sigma)
    t = torch.linspace(1, 999, 50, dtype=torch.float64)
    torch.testing.assert_close(teacher.timestep_from_sigma(teacher.sigma_from_timestep(t)), t)
    torch.testing.assert_close(teacher.timestep_from_sigma(torch.tensor(1.0)), torch.tensor(500.0, dtype=torch.float64))


def test_zero_terminal_snr_keeps_a_finite_range(tmp_path):
    sched = DDIMScheduler(rescale_betas_zero_snr=True)
    assert sched.alphas_cumprod[-1] == 0  # the last step is pure noise: EDM sigma = inf
    teacher = load_teacher(_save(tmp_path, _unet(), sched))
    assert math.isfinite(teacher.sigma_max)
    assert teacher.timestep_from_sigma(torch.tensor(teacher.sigma_max)).item() == pytest.approx(998)
    assert torch.isfinite(teacher(_x(1), torch.tensor(teacher.sigma_max))).all()


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_folder_and_hub_ids_are_refused(tmp_path):
    for spec in (f"diffusers:{tmp_path / 'nope'}", "diffusers:google/ddpm-cifar10-32"):
        with pytest.raises(FileNotFoundError, match="only local folders are read"):
            load_teacher(spec)
    with pytest.raises(ValueError, match="diffusers:"):
        load_teacher("unknown:thing")


def test_missing_scheduler_or_unet(tmp_path):
    _unet().save_pretrained(tmp_path / "a" / "unet")
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        load_teacher(f"diffusers:{tmp_path / 'a'}")
    DDPMScheduler().save_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no UNet"):
        load_teacher(f"diffusers:{tmp_path / 'b'}")


def test_unsupported_scheduler_and_prediction(tmp_path):
    unet = _unet()
    from diffusers import ScoreSdeVeScheduler  # variance exploding: another noise convention

    with pytest.raises(ValueError, match=r"unsupported scheduler 'ScoreSdeVeScheduler'.*DDPMScheduler, DDIMScheduler"):
        load_teacher(_save(tmp_path / "ve", unet, ScoreSdeVeScheduler()))
    spec = _save(tmp_path / "pred", unet, DDPMScheduler())
    path = tmp_path / "pred" / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "flow_prediction"}))
    with pytest.raises(ValueError, match=r"unsupported prediction_type 'flow_prediction'.*epsilon, v_prediction"):
        load_teacher(spec)


@pytest.mark.parametrize("name", ["PNDMScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_samplers_over_the_same_alpha_bar_table_give_the_same_denoiser(tmp_path, name):
    """Stable Diffusion 1.5 ships PNDM: a sampler choice, so the folder reads as its DDPM twin does."""
    import diffusers

    unet = _unet()
    sched = getattr(diffusers, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    teacher = load_teacher(_save(tmp_path / "a", unet, sched))
    twin = load_teacher(_save(tmp_path / "b", unet, DDPMScheduler.from_config(sched.config, clip_sample=False)))
    sigma = torch.tensor([0.05, 1.0, 9.0])
    x = _x(3) * (1 + sigma).reshape(-1, 1, 1, 1)
    assert (teacher.sigma_min, teacher.sigma_max) == (twin.sigma_min, twin.sigma_max)
    torch.testing.assert_close(teacher(x, sigma), twin(x, sigma), rtol=0, atol=0)
    k = 500  # and the closed form at a trained step
    a = sched.alphas_cumprod[k].double()
    s = float(((1 - a) / a).sqrt())
    x_t = _x(1, 2)
    got = teacher(x_t * math.sqrt(1 + s * s), torch.tensor([s]))
    torch.testing.assert_close(got, ((x_t - (1 - a).sqrt() * _unet_out(unet, x_t, k)) / a.sqrt()).float(), rtol=1e-4,
                               atol=1e-4 * (1 + s))


def test_a_dpm_solver_over_flow_sigmas_is_refused(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    with pytest.raises(ValueError, match="use_flow_sigmas"):
        sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
        load_teacher(_save(tmp_path, _unet(), sched))
