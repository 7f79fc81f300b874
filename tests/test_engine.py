"""The engine's pieces called on their own: a ``DistillState`` built once, ``distill_step`` on it (no run
folder, no files), and a run that validates its config and parses its divergence specs once."""

from __future__ import annotations

import collections

import pytest
import torch

import dibregman.divergences as divergences_mod
import dibregman.train.config as config_mod
from dibregman.cli import main
from dibregman.teachers import load_teacher
from dibregman.train.conditions import conditions_for
from dibregman.train.config import DistillConfig, resolve
from dibregman.train.guard import NonFiniteError
from dibregman.train.state import build_state
from dibregman.train.step import distill_step


def _state(tmp_path, **overrides):
    cfg = resolve(DistillConfig, preset="tiny", overrides={"out": str(tmp_path / "run"), **overrides})
    teacher = load_teacher(cfg.teacher)
    return build_state(cfg, teacher, conditions_for(teacher), tmp_path / "run", torch.device("cpu"), slice(None),
                       "digest", resuming=False)


def test_a_step_updates_every_network_once_and_touches_no_file(tmp_path):
    s = _state(tmp_path, divergence="hellinger", fake_score_steps=2)
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in s.c.modules().items()}
    out = distill_step(s)
    assert s.step == 1 and s.c.ema.num_updates == 1
    for name, module in s.c.modules().items():
        moved = any(not torch.equal(a, b) for a, b in zip(before[name], module.parameters(), strict=True))
        assert moved, f"{name} did not change"
    keys = [k for record in out.logs for k in record]
    assert collections.Counter(keys)["loss/fake_score"] == 2 and collections.Counter(keys)["loss/critic"] == 2
    assert {"loss/generator", "ratio/omega_mean", "ratio/log_r_mean"} <= set(keys)
    assert torch.isfinite(out.loss) and out.result.omega.shape == (s.cfg.batch_size,)
    assert not (tmp_path / "run").exists()  # the step is pure training: the driver owns the run folder


def test_steps_on_two_states_of_one_config_are_identical(tmp_path):
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for _ in range(3):
        la, lb = distill_step(a), distill_step(b)
        assert torch.equal(la.loss, lb.loss)
    for pa, pb in zip(a.c.generator.parameters(), b.c.generator.parameters(), strict=True):
        assert torch.equal(pa, pb)


class _Poisoned:
    """The teacher, answering NaN."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def __call__(self, *args, **kwargs):
        return self.teacher(*args, **kwargs) * float("nan")


def test_a_non_finite_teacher_is_named_at_the_step_that_met_it(tmp_path):
    s = _state(tmp_path)
    distill_step(s)
    s.guard.check()  # finite so far
    s.teacher = _Poisoned(s.teacher)  # the generator update asks D_T
    distill_step(s)  # the step does not wait for the device: its flags are read at the driver's next check
    distill_step(s)
    with pytest.raises(NonFiniteError, match=r"non-finite generator loss \(nan\) at step 2"):
        s.guard.check()


def test_a_cli_run_validates_its_config_once_and_parses_each_divergence_spec_once(tmp_path, monkeypatch):
    checks, parses = [], collections.Counter()
    real_check, real_parse = config_mod._check, divergences_mod.parse_spec
    monkeypatch.setattr(config_mod, "_VALIDATED", collections.OrderedDict())  # no config passed before this test
    monkeypatch.setattr(config_mod, "_check", lambda cfg, d: (checks.append(type(cfg).__name__), real_check(cfg, d)))
    monkeypatch.setattr(divergences_mod, "parse_spec", lambda spec: (parses.update([spec]), real_parse(spec))[1])
    monkeypatch.setattr("dibregman.report.write_run_report", lambda run: None)  # the report re-reads the run
    with pytest.raises(SystemExit) as e:
        main(["distill", "--preset", "tiny", "--steps", "2", "--divergence", "power:0.5", "--out",
              str(tmp_path / "run"), "--no-progress"])
    assert e.value.code == 0
    assert checks == ["DistillConfig"]  # the CLI's; the API and the loop reuse it
    assert parses == {"power:0.5": 1, "logistic": 1}  # the generator's member and the critic's loss


def test_a_config_changed_after_validation_is_checked_again():
    cfg = resolve(DistillConfig, preset="tiny", overrides={"out": "unused"})
    cfg.steps = 0
    with pytest.raises(config_mod.ConfigError, match="steps"):
        config_mod.validate(cfg)


def test_regression_pairs_sets_how_many_pairs_apart_from_the_critics_pool(tmp_path):
    shared = _state(tmp_path / "a", regression_weight=1.0, teacher_pool=120, critic_data="teacher")
    assert len(shared.pairs[0]) == 120 and shared.pool is shared.pairs[1]  # one set of samples serves both
    apart = _state(tmp_path / "b", regression_weight=1.0, teacher_pool=120, regression_pairs=50,
                   critic_data="teacher")
    z, x, _ = apart.pairs
    assert len(z) == len(x) == 50 and len(apart.pool) == 120
    assert torch.isfinite(distill_step(apart).loss)
