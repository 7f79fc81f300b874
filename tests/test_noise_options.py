"""The noise-schedule options: the generator/critic sigma range and the fake score's noise law reach the
samplers the loop draws from, and bad values are refused before a run folder is made."""

from __future__ import annotations

import pytest
import torch

import dibregman as db
from dibregman.teachers import load_teacher
from dibregman.train.components import build, fit_network
from dibregman.train.config import ConfigError, DistillConfig


def _components(**options):
    teacher = load_teacher("gmm:ring8_imbalanced")
    cfg = DistillConfig(hidden=16, depth=1, **options)
    base = fit_network(teacher, 16, 1, 1, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    return build(cfg, teacher, base, torch.device("cpu"))


def test_the_sigma_range_and_the_fake_score_law_are_used():
    c = _components(sigma_min=0.05, sigma_max=3.0, fake_score_p_mean=0.5, fake_score_p_std=0.1)
    sigma = c.generator_sigmas(4000, torch.Generator().manual_seed(0))
    assert float(sigma.min()) >= 0.05 and float(sigma.max()) <= 3.0 and float(sigma.max()) > 2.0
    log_f = c.fake_score_sigmas(4000, torch.Generator().manual_seed(0)).log()
    assert abs(float(log_f.mean()) - 0.5) < 0.01 and abs(float(log_f.std()) - 0.1) < 0.01
    default = _components()  # 0: the teacher's own range, EDM's law
    assert (default.generator_sigmas.sigma_min, default.generator_sigmas.sigma_max) == (0.002, 80.0)
    assert (default.fake_score_sigmas.p_mean, default.fake_score_sigmas.p_std) == (-1.2, 1.2)


@pytest.mark.parametrize("options, message", [
    ({"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_min < sigma_max"),
    ({"sigma_min": -1.0}, "sigma_min < sigma_max"),
    ({"fake_score_p_std": 0.0}, "fake_score_p_std"),
    ({"sigma_min": 100.0}, "noise range .* is empty"),  # above the teacher's sigma_max of 80
    ({"sigma_g": float("inf")}, "only a flow-matching teacher's network"),  # pure noise: an MLP in EDM's form
    ({"sigma_g": float("-inf")}, "must be finite"),
    ({"sigma_g": float("inf"), "student_steps": 2}, "one student step for now"),
    ({"sigma_g": 1e5}, "or inf"),
])
def test_bad_noise_options_are_refused_before_the_run_folder(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        db.distill(preset="tiny", out=str(tmp_path / "run"), progress=False, **options)
    assert not (tmp_path / "run").exists()
