"""Plug-in points from outside the package: a teacher format and a critic head registered by user code are
accepted by the config, used by a run, and listed by `dibregman list` and `--help`."""

from __future__ import annotations

import pytest
import torch

import dibregman as db
from dibregman.cli import main
from dibregman.cli import run as cli_run
from dibregman.ratio import Critic
from dibregman.registry import Registry
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


class Fourier(torch.nn.Module):
    """A point backbone from outside the package: random Fourier features of ``(x, c_noise)``, a linear read-out."""

    arch_kind = "fourier"

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        self.dim, self.width = dim, width
        self.proj = torch.nn.Linear(dim + 1, width)
        self.out = torch.nn.Linear(2 * width, dim)

    @classmethod
    def from_arch(cls, arch: dict) -> Fourier:
        return cls(arch["dim"], arch["width"])

    def arch(self) -> dict:
        return {"dim": self.dim, "width": self.width}

    def forward(self, x, c_noise, cond=None):
        h = self.proj(torch.cat([x, c_noise.reshape(-1, 1).to(x.dtype)], 1))
        return self.out(torch.cat([h.sin(), h.cos()], 1))


@pytest.fixture
def fourier():
    from dibregman.nets import BACKBONES

    BACKBONES.register("fourier", Fourier.from_arch, help="random Fourier features")
    yield
    BACKBONES.unregister("fourier")


def test_a_registered_backbone_is_trained_saved_and_reloaded(fourier, tmp_path):
    from dibregman.precond import Precond
    from dibregman.teachers.trained import load_teacher as load_folder
    from dibregman.teachers.trained import save_teacher

    torch.manual_seed(0)
    net = Precond(Fourier(2), sigma_data=2.0)
    folder = save_teacher(tmp_path / "teacher", net, {"data": "moons"})
    back = load_folder(folder)
    assert isinstance(back.network.backbone, Fourier) and back.shape == (2,)
    x, sigma = torch.randn(8, 2), torch.full((8,), 0.7)
    torch.testing.assert_close(back(x, sigma), net(x, sigma))
    run = db.distill(teacher=str(folder), divergence="reverse_kl", steps=3, batch_size=16, teacher_pool=64,
                     eval_samples=64, regression_weight=0.0, out=str(tmp_path / "run"), progress=False)
    gen, info = db.load_generator(run)
    assert info["arch"]["kind"] == "fourier" and isinstance(gen.denoiser.backbone, Fourier)
    assert db.sample(run, 5).shape == (5, 2)


def test_an_unregistered_backbone_is_named(tmp_path):
    from dibregman.precond import Precond
    from dibregman.teachers.trained import save_teacher

    with pytest.raises(TypeError, match="BACKBONES"):
        save_teacher(tmp_path / "t", Precond(Fourier(2)), {})
    assert not (tmp_path / "t").exists()


def test_a_registered_image_source_is_read_and_checked():
    from dibregman.data.images import IMAGE_SOURCES, ImageSet, is_image_spec, load_images

    def stripes(arg: str) -> ImageSet:
        n = int(arg or 4)
        x = torch.linspace(-1, 1, 8).repeat(n, 1, 8, 1)
        return ImageSet(x, torch.arange(n) % 2, ("left", "right"), f"stripes:{n}")

    IMAGE_SOURCES.register("stripes", stripes, usage="stripes[:<n>]", help="n striped 8x8 images")
    IMAGE_SOURCES.register("bad", lambda arg: ImageSet(torch.full((2, 1, 4, 4), 3.0), None, (), "bad"),
                           help="pixels outside [-1, 1]")
    try:
        assert is_image_spec("stripes:6") and load_images("stripes:6").images.shape == (6, 1, 8, 8)
        with pytest.raises(ValueError, match="pixels must be finite and in"):
            load_images("bad")
        assert cli_run(["list"]) == 0
    finally:
        IMAGE_SOURCES.unregister("stripes")
        IMAGE_SOURCES.unregister("bad")


def test_a_registered_sigma_sampler_is_used_and_checked(tmp_path):
    from dibregman.train.sigmas import SIGMA_SAMPLERS

    seen: list[float] = []

    def midrange(cfg, sigma_min, sigma_max):
        def draw(n, generator=None):
            s = torch.full((n,), (sigma_min * sigma_max) ** 0.5)
            seen.append(float(s[0]))
            return s

        return draw

    SIGMA_SAMPLERS.register("midrange", midrange, help="the geometric middle of the noise range")
    SIGMA_SAMPLERS.register("negative", lambda cfg, lo, hi: lambda n, generator=None: -torch.ones(n),
                            help="no noise levels")
    try:
        db.distill(preset="tiny", steps=2, generator_sigmas="midrange", fit_steps=20, teacher_pool=64,
                   eval_samples=64, out=str(tmp_path / "run"), progress=False)
        assert seen and len(set(seen)) == 1
        with pytest.raises(ConfigError, match=r"fake_score_sigmas = 'negative'.*positive finite"):
            db.distill(preset="tiny", fake_score_sigmas="negative", out=str(tmp_path / "refused"), progress=False)
        assert not (tmp_path / "refused").exists()
        with pytest.raises(ConfigError, match="generator_sigmas' must be one of karras, lognormal, loguniform"):
            db.distill(preset="tiny", generator_sigmas="nope", out=str(tmp_path / "unused"))
    finally:
        SIGMA_SAMPLERS.unregister("midrange")
        SIGMA_SAMPLERS.unregister("negative")


def test_a_registered_divergence_is_a_valid_option(tmp_path, capsys):
    from dibregman.divergences import DIVERGENCES, from_h, get_divergence

    DIVERGENCES.register("chi_sqrt", lambda: from_h(lambda r: r.sqrt() * r, name="chi_sqrt"), help="h = r^1.5")
    try:
        div = get_divergence("chi_sqrt")
        r = torch.tensor([0.5, 1.0, 2.0])
        torch.testing.assert_close(div.log_omega(r.log()), (0.75 * r.sqrt()).log())  # h'' r = 0.75 sqrt(r)
        with pytest.raises(ValueError, match="takes no parameter"):
            get_divergence("chi_sqrt:2")
        run = db.distill(preset="tiny", divergence="chi_sqrt", steps=2, fit_steps=20, teacher_pool=64,
                         eval_samples=64, out=str(tmp_path / "run"), progress=False)
        assert run.summary["divergence"] == "chi_sqrt"
        assert cli_run(["list"]) == 0 and "chi_sqrt (h = r^1.5)" in capsys.readouterr().out
    finally:
        DIVERGENCES.unregister("chi_sqrt")


def test_a_network_that_would_not_reload_as_itself_is_refused(fourier, tmp_path):
    from dibregman.precond import Precond
    from dibregman.schedules import EDMParameterisation, FlowParameterisation

    class Scaled(Precond):
        def _network(self, x_in, c_noise, cond):
            return 2 * super()._network(x_in, c_noise, cond)

    for net, match in [(Precond(Fourier(2), 1.0, FlowParameterisation()), "FlowParameterisation"),
                       (Precond(Fourier(2), 1.0, EDMParameterisation(0.5)), "EDMParameterisation"),
                       (Scaled(Fourier(2), 1.0), "a Scaled with")]:
        teacher = db.ModuleTeacher(lambda x, sigma, cond=None: x / (1 + sigma.reshape(-1, 1) ** 2), shape=(2,),
                                   sigma_data=1.0, network=net)
        with pytest.raises(TypeError, match=match):
            db.distill(teacher=teacher, steps=1, out=str(tmp_path / "run"), progress=False)
        assert not (tmp_path / "run").exists()
