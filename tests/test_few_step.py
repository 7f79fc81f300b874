"""Few-step students (``student_steps``): the noise grid, the chain against its closed form, backward
simulation's gradients, save/load/export round trips, and distillation through the real entry points."""

from __future__ import annotations

import json
import sys
from itertools import pairwise

import pytest
import torch
from safetensors.torch import load_file

import dibregman as db
from dibregman.artifacts import load_generator, save_generator
from dibregman.generator import Generator, student_sigmas
from dibregman.nets.mlp import MLP
from dibregman.nets.unet import UNet
from dibregman.precond import Precond
from dibregman.schedules import karras_sigmas
from dibregman.train.checkpoint import CheckpointError, list_checkpoints
from dibregman.train.config import ConfigError, DistillConfig, validate

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_denoiser() -> Precond:
    torch.manual_seed(0)
    return Precond(MLP(dim=2, hidden=16, depth=2), 1.0)


def test_the_grid_is_edm_s_from_sigma_g_to_the_last_level():
    assert student_sigmas(1, 2.5, 0.3) == (2.5,)
    for n in (2, 3, 4, 8):
        s = student_sigmas(n, 2.5, 0.3)
        assert len(s) == n and s[0] == 2.5 and s[-1] == 0.3 and all(a > b for a, b in pairwise(s))
        torch.testing.assert_close(torch.tensor(s, dtype=torch.float64), karras_sigmas(n, 0.3, 2.5)[:n],
                                   rtol=1e-12, atol=0)


def test_the_chain_renoises_and_denoises_its_last_estimate():
    d = mlp_denoiser()
    one = Generator(d, 2.5)
    z = torch.randn(5, 2)
    full = lambda x, s: d(x, torch.full((len(x),), s))  # noqa: E731
    torch.testing.assert_close(one(z), full(2.5 * z, 2.5))
    assert one.latent_shape((2,)) == (2,) and one.steps == 1

    sig = student_sigmas(3, 2.5, 0.4)
    gen = Generator(d, sigmas=sig)
    assert gen.latent_shape((2,)) == (3, 2) and gen.sigma_g == 2.5
    z = torch.randn(5, 3, 2)
    x1 = full(sig[0] * z[:, 0], sig[0])
    x2 = full(x1 + sig[1] * z[:, 1], sig[1])
    x3 = full(x2 + sig[2] * z[:, 2], sig[2])
    torch.testing.assert_close(gen(z), x3)
    torch.testing.assert_close(gen(z, upto=2), x2)
    torch.testing.assert_close(gen(z, upto=1), x1)
    torch.testing.assert_close(gen.first_step(z[:, 0]), x1)
    with pytest.raises(ValueError, match="must decrease"):
        Generator(d, sigmas=(1.0, 2.0))


def test_backward_simulation_trains_the_last_step_alone():
    """``upto=k``: the earlier steps are the student's own samples, constants for the gradient."""
    d = mlp_denoiser()
    sig = student_sigmas(2, 2.5, 0.5)
    gen = Generator(d, sigmas=sig)
    z = torch.randn(7, 2, 2)
    gen(z, upto=2).square().sum().backward()
    got = [p.grad.clone() for p in gen.parameters()]
    gen.zero_grad()
    with torch.no_grad():
        x1 = gen(z, upto=1)
    d(x1 + sig[1] * z[:, 1], torch.full((7,), sig[1])).square().sum().backward()
    for a, p in zip(got, gen.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    gen.zero_grad()
    gen(z).square().sum().backward()  # without `upto` the whole chain is differentiated: another gradient
    assert any(not torch.allclose(a, p.grad) for a, p in zip(got, gen.parameters(), strict=True))


def test_save_load_round_trip_and_damaged_levels(tmp_path):
    gen = Generator(mlp_denoiser(), sigmas=student_sigmas(4, 2.5, 0.2)).eval()
    save_generator(tmp_path / "g", gen, {"shape": [2]})
    back, info = load_generator(tmp_path / "g")
    assert back.sigmas == gen.sigmas and info["sigmas"] == list(gen.sigmas)
    z = torch.randn(6, 4, 2)
    torch.testing.assert_close(back(z), gen(z).detach())
    for bad in ([2.5, 3.0], [2.0, 1.0], [], [2.5, -1.0], "2.5"):
        path = tmp_path / "g" / "generator.json"
        info = json.loads(path.read_text())
        info["sigmas"] = bad
        path.write_text(json.dumps(info))
        with pytest.raises(CheckpointError, match="sigmas must be"):
            _load_unverified(tmp_path / "g")


def _load_unverified(folder):
    """Checksums aside (a hand edit is caught by them first): the numbers themselves are checked."""
    (folder / "manifest.json").unlink(missing_ok=True)
    info = json.loads((folder / "generator.json").read_text())
    info.pop("integrity", None)
    (folder / "generator.json").write_text(json.dumps(info))
    return load_generator(folder)


def test_config_bounds():
    with pytest.raises(ConfigError, match="student_steps"):
        validate(DistillConfig(student_steps=0))
    with pytest.raises(ConfigError, match="student_steps"):
        validate(DistillConfig(student_steps=17))
    with pytest.raises(ConfigError, match="student_sigma_min"):
        validate(DistillConfig(student_steps=2, student_sigma_min=3.0))
    with pytest.raises(ConfigError, match="student_sigma_min"):  # a level the saved generator could not load
        validate(DistillConfig(student_steps=2, student_sigma_min=1e-5))


def test_an_explicit_last_level_is_used_as_given():
    from dibregman.teachers import load_teacher
    from dibregman.train.components import build

    teacher = load_teacher("gmm:ring8")
    c = build(DistillConfig(student_steps=2, student_sigma_min=2.0, hidden=8, depth=1), teacher,
              mlp_denoiser(), torch.device("cpu"))
    assert c.generator.sigmas == (2.5, 2.0)
    c = build(DistillConfig(student_steps=3, hidden=8, depth=1), teacher, mlp_denoiser(), torch.device("cpu"))
    assert c.generator.sigmas[-1] == pytest.approx(0.16 * teacher.sigma_data)  # the automatic one


def test_a_run_from_before_the_option_is_not_resumed_as_few_step():
    """A checkpoint whose config has no ``student_steps`` was a one-step run."""
    from dibregman.train.config import check_resumable, to_dict

    old = {k: v for k, v in to_dict(DistillConfig()).items() if k not in ("student_steps", "student_sigma_min")}
    check_resumable(old, DistillConfig(), "run")  # the same run
    with pytest.raises(ConfigError, match="student_steps: 1 -> 2"):
        check_resumable(old, DistillConfig(student_steps=2), "run")


def test_export_runs_the_same_chain(tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dyn
    from diffusers import DiffusionPipeline

    from dibregman.export import export_diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    torch.manual_seed(0)
    unet = UNet(channels=1, resolution=8, base=8, mult=(1, 2), norm_groups=4, num_classes=0)
    gen = Generator(Precond(unet, 0.5), sigmas=student_sigmas(2, 2.5, 0.25)).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_generator(tmp_path / "gen", gen, {"shape": [1, 8, 8]})
    pipe = DiffusionPipeline.from_pretrained(str(export_diffusers(tmp_path / "gen", tmp_path / "x")),
                                             trust_remote_code=True)
    assert pipe.config.sigmas == list(gen.sigmas)
    z = torch.randn(3, 2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = pipe(latents=z, output_type="pt").images
    torch.testing.assert_close(got, ((gen(z).detach() + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    got = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(got, ((gen(z).detach() + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(latents=z[:, 0], output_type="pt")
    assert "2 U-Net evaluations" in (tmp_path / "x" / "README.md").read_text()
    index = tmp_path / "x" / "model_index.json"
    good = json.loads(index.read_text())
    for bad in ([2.5, "nan"], [0.25, 2.5], [], [2.5, -1.0], "2.5", 2.5, [True]):  # an edited model_index.json
        index.write_text(json.dumps({**good, "sigmas": [2.5, float("nan")] if bad == [2.5, "nan"] else bad}))
        with pytest.raises(ValueError, match=r"model_index\.json's sigmas must be"):
            DiffusionPipeline.from_pretrained(str(tmp_path / "x"), trust_remote_code=True)


TINY = dict(preset="tiny", student_steps=2, progress=False)


def _weights(run) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run / "checkpoints")[-1]
    return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_a_two_step_run_evaluates_samples_and_resumes_exactly(tmp_path):
    run = db.distill(out=str(tmp_path / "full"), **TINY)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nfe"] == 2
    gen, info = load_generator(run)
    assert gen.steps == 2 and len(info["sigmas"]) == 2
    again = db.evaluate_run(run)  # the run's own final draw
    assert again["nfe"] == 2 and "2 NFE" in again["method"]
    for key, value in summary["metrics"].items():
        assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    x = db.sample(run, 10, seed=3)
    assert x.shape == (10, 2) and torch.equal(x[:4], db.sample(run, 4, seed=3))  # sample i: (seed, i) alone
    # stopped at step 3 and resumed to 6: the weights of the straight run
    part = db.distill(out=str(tmp_path / "part"), **{**TINY, "steps": 3})
    db.distill(out=str(part), resume=True, **{**TINY, "steps": 6})
    a, b = _weights(run), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = (run / "report.md").read_text()
    assert "(2 NFE)" in report and "(1 NFE)" not in report.split("## Final metrics")[1]


def test_a_resume_keeps_the_noise_levels_it_trained_at(tmp_path, monkeypatch):
    """The automatic last level comes from code (a fraction of the teacher's sigma_data): when it changes
    between versions, a resume is refused with the setting that continues the run, and that setting works."""
    import dibregman.train.components as components
    import dibregman.train.state as state_mod

    run = db.distill(out=str(tmp_path / "run"), **{**TINY, "steps": 3})
    trained = load_generator(run)[0].sigmas
    monkeypatch.setattr(components, "STUDENT_SIGMA_MIN_FRACTION", 0.3)
    with monkeypatch.context() as m:  # refused before the teacher's pool costs anything
        m.setattr(state_mod, "teacher_samples", lambda *a, **k: pytest.fail("sampled the teacher's pool"))
        with pytest.raises(ConfigError, match=f"set student_sigma_min to {trained[-1]}"):
            db.distill(out=str(run), resume=True, **{**TINY, "steps": 6})
    db.distill(out=str(run), resume=True, **{**TINY, "steps": 6, "student_sigma_min": trained[-1]})
    assert load_generator(run)[0].sigmas == trained


@pytest.mark.slow
def test_a_two_step_student_learns(tmp_path):
    """The distribution-matching update alone (no regression pairs) through backward simulation."""
    opts = dict(teacher="gmm:ring8_imbalanced", divergence="reverse_kl", regression_weight=0.0, fit_steps=300,
                hidden=64, depth=2, student_steps=2, eval_samples=20000, eval_every=10**6, log_every=50,
                checkpoint_every=10**6, progress=False)
    start = json.loads((db.distill(steps=1, out=str(tmp_path / "s"), **opts) / "summary.json").read_text())
    end = json.loads((db.distill(steps=400, out=str(tmp_path / "e"), **opts) / "summary.json").read_text())
    s, e = start["metrics"], end["metrics"]
    # chained twice, the fitted start is already far better than as one step (energy 0.093, off-mode 0.65,
    # nll 18.7 when written, against 0.40, 0.96, 52): the margins are smaller than test_learning's
    assert e["energy"] < 0.25 * s["energy"] and e["nll"] < 0.5 * s["nll"], (s, e)
    assert e["off_mode"] < 0.7 * s["off_mode"], (s, e)

