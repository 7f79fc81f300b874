"""Plug-in points from outside the package: a teacher format and a critic head registered by user code are
accepted by the config, used by a run, and listed by `dibregman list` and `--help`."""

from __future__ import annotations

import pytest
import torch

import dibregman as db
from dibregman.cli import main
from dibregman.cli import run as cli_run
from dibregman.plugins import Registry
from dibregman.ratio import Critic
from dibregman.teachers import TEACHER_FORMATS, load_teacher
from dibregman.train.config import ConfigError
from dibregman.train.critics import CRITIC_HEADS

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(distance: str) -> db.ModuleTeacher:
    """Two equal blobs ``distance`` apart: a teacher format ``blobs:<distance>``."""
    mu, tau = torch.tensor([[-float(distance) / 2, 0.0], [float(distance) / 2, 0.0]]), 0.3

    def denoiser(x, sigma, cond=None):
        s2 = sigma.reshape(-1, 1) ** 2 + tau**2
        w = (-((x[:, None, :] - mu) ** 2).sum(-1) / (2 * s2)).softmax(-1)
        return (w[:, :, None] * (mu + (tau**2 / s2)[:, :, None] * (x[:, None, :] - mu))).sum(1)

    return db.ModuleTeacher(denoiser, shape=(2,), sigma_data=float(distance) / 2)


built: list[str] = []


def _small_mlp_critic(teacher, base, fake_score, cfg):
    from dibregman.nets.mlp import MLP

    built.append(cfg.critic_head)
    return Critic(MLP(teacher.shape[0], 16, 1, out_dim=1), teacher.sigma_data)


@pytest.fixture
def plugins():
    TEACHER_FORMATS.register("blobs", _blobs, usage="blobs:<distance>", help="two blobs that far apart")
    CRITIC_HEADS.register("small_mlp", _small_mlp_critic, help="a one-block MLP of width 16")
    yield
    TEACHER_FORMATS.unregister("blobs")
    CRITIC_HEADS.unregister("small_mlp")


def test_registered_format_and_head_run_and_are_listed(plugins, tmp_path, capsys):
    assert load_teacher("blobs:4").sigma_data == 2.0
    run = db.distill(teacher="blobs:4", critic_head="small_mlp", steps=3, batch_size=32, fit_steps=20, hidden=16,
                     depth=1, teacher_pool=64, eval_samples=256, regression_weight=0.0, out=str(tmp_path / "run"),
                     progress=False)
    assert built == ["small_mlp"] and run.config["teacher"] == "blobs:4" and run.metrics
    assert cli_run(["list"]) == 0
    listed = capsys.readouterr().out
    assert "blobs:<distance> (two blobs that far apart)" in listed and "small_mlp (a one-block MLP" in listed
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "blobs:<distance>" in shown and "small_mlp" in shown


def test_unknown_and_taken_names_are_refused(plugins):
    with pytest.raises(ConfigError, match="critic_head' must be one of fake_score, teacher, standalone, small_mlp"):
        db.distill(preset="tiny", critic_head="nope", out="unused")
    with pytest.raises(ValueError, match=r"cannot read teacher spec 'nope:1': use gmm:.*blobs:<distance>"):
        load_teacher("nope:1")
    with pytest.raises(ValueError, match="critic head 'small_mlp' is registered already"):
        CRITIC_HEADS.register("small_mlp", _small_mlp_critic, help="again")
    with pytest.raises(ValueError, match="letters, digits"):
        Registry("thing").register("a:b", print, help="a colon would split a spec")


def test_a_format_that_makes_no_teacher_is_named(tmp_path):
    TEACHER_FORMATS.register("broken", lambda arg: object(), help="returns no teacher")
    try:
        with pytest.raises(ValueError, match="the teacher broken:x returned: "):
            load_teacher("broken:x")
    finally:
        TEACHER_FORMATS.unregister("broken")
