"""The exact variety diagnostics (metrics/exact.py) against closed forms, and the seed plan that makes a
run's own evaluation and ``dibregman eval`` score the same samples."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dibregman as db
from dibregman.metrics.exact import empirical_denoiser, empirical_log_density, variety_diagnostics
from dibregman.teachers.gmm import get_mixture

F64 = torch.float64


def _direct_log_density(x: torch.Tensor, sigma: float, samples: torch.Tensor) -> torch.Tensor:
    comps = torch.distributions.MultivariateNormal(samples, covariance_matrix=sigma**2 * torch.eye(2, dtype=F64))
    return torch.logsumexp(comps.log_prob(x[:, None, :]), dim=1) - math.log(len(samples))


def test_empirical_density_and_denoiser_are_the_mixture_of_gaussians_and_its_tweedie_mean():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(7, 2, generator=g, dtype=F64)
    x = (2 * torch.randn(3000, 2, generator=g, dtype=F64)).requires_grad_(True)  # > one block of queries
    for sigma in (0.05, 0.7, 3.0):
        direct = _direct_log_density(x, sigma, samples)
        assert torch.allclose(empirical_log_density(x.detach(), sigma, samples), direct.detach(), atol=1e-9)
        score = torch.autograd.grad(direct.sum(), x)[0]  # Tweedie: D = x + sigma^2 grad log q_sigma
        assert torch.allclose(empirical_denoiser(x.detach(), sigma, samples), x.detach() + sigma**2 * score,
                              atol=1e-9)


def test_diagnostics_of_exact_networks_are_perfect_and_of_the_teacher_copy_are_one():
    ring = get_mixture("ring8_imbalanced")
    g = torch.Generator().manual_seed(1)
    students = ring.sample(3000, generator=g).double() * 0.9  # a student that is not the teacher
    queries = ring.sample(500, generator=g).double() * 0.9
    sigmas = (0.1, 0.5)

    def exact_fake(x, s, cond=None):
        return empirical_denoiser(x, s, students)

    def exact_critic(x, s, cond=None):  # the logit says "from the teacher": -log r
        return ring.log_prob(x, s[0]).double() - empirical_log_density(x, s, students)

    out = variety_diagnostics(students, queries, ring, ring.log_prob, exact_fake, exact_critic, sigmas,
                              generator=torch.Generator().manual_seed(2))
    for s in ("0.1", "0.5"):
        assert out[f"diag/fake_score_err@{s}"] == pytest.approx(0, abs=1e-12)
        assert out[f"diag/update_cos@{s}"] == pytest.approx(1, abs=1e-9)
        assert out[f"diag/log_r_rmse@{s}"] == pytest.approx(0, abs=1e-9)
        assert out[f"diag/log_r_corr@{s}"] == pytest.approx(1, abs=1e-9)
        assert out[f"diag/log_r_true@{s}"] > 0.01  # q is narrower than p where the students are
    copy = variety_diagnostics(students, queries, ring, ring.log_prob, ring, None, sigmas,
                               generator=torch.Generator().manual_seed(2))
    assert copy["diag/fake_score_err@0.1"] == pytest.approx(1, abs=1e-9)  # no better than the teacher itself


def test_log_r_true_vanishes_when_the_students_are_teacher_samples():
    ring = get_mixture("ring8_imbalanced")
    g = torch.Generator().manual_seed(3)
    out = variety_diagnostics(ring.sample(20000, generator=g).double(), ring.sample(2000, generator=g).double(),
                              ring, ring.log_prob, sigmas=(0.2, 1.0), generator=g)
    assert abs(out["diag/log_r_true@0.2"]) < 0.05 and abs(out["diag/log_r_true@1"]) < 0.01


def test_run_summary_and_evaluate_run_score_the_same_samples(tmp_path):
    run = db.distill(preset="tiny", out=str(tmp_path / "run"), progress=False)
    summary = json.loads((run / "summary.json").read_text())
    again = db.evaluate_run(run, summary["eval_samples"], seed=0)
    for key, value in summary["metrics"].items():
        assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    other = db.evaluate_run(run, summary["eval_samples"], seed=1)
    assert other["w1"] != pytest.approx(summary["metrics"]["w1"], rel=1e-6)  # another seed, other samples
    diag = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert any("diag/fake_score_err@0.05" in row for row in diag)  # logged for the analytic teacher


def test_sampling_does_not_touch_the_callers_global_rng(tmp_path):
    run = db.distill(preset="tiny", out=str(tmp_path / "run"), progress=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    db.sample(run, 50, seed=4)
    db.evaluate_run(run, 200, seed=4)
    assert torch.equal(before, torch.get_rng_state())


def test_eval_refuses_a_sample_count_below_two(tmp_path, capsys):
    from dibregman.cli import main

    run = db.distill(preset="tiny", out=str(tmp_path / "run"), progress=False)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--num", "0"])
    assert e.value.code == 2 and "--num must be an integer in 2..10000000" in capsys.readouterr().err
