"""Teachers handed to ``db.distill`` as Python objects: the contract checked at the edge, a function teacher
that learns, the same run as the spec string for the same teacher, resume and evaluation with the object."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dibregman as db
from dibregman.cli import main
from dibregman.nets.mlp import MLP
from dibregman.precond import Precond
from dibregman.train.checkpoint import list_checkpoints
from dibregman.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

MU, TAU = torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.3


def blobs(x, sigma, mu=MU):
    """The exact denoiser of the equal mixture of N(mu_k, TAU^2 I): responsibilities under N(mu_k, (TAU^2 +
    sigma^2) I) times each component's posterior mean."""
    mu, s2 = mu.to(x), sigma.reshape(-1, 1) ** 2 + TAU**2
    w = (-((x[:, None, :] - mu) ** 2).sum(-1) / (2 * s2)).softmax(-1)
    post = mu + (TAU**2 / s2)[:, :, None] * (x[:, None, :] - mu)
    return (w[:, :, None] * post).sum(1)


def blobs_teacher(shift: float = 0.0) -> db.ModuleTeacher:
    """The same function name whatever the blobs: a changed teacher differs by its fingerprint alone."""

    def two_blobs(x, sigma, cond=None):
        return blobs(x, sigma, MU + shift)

    return db.ModuleTeacher(two_blobs, shape=(2,), sigma_data=2.0)


def weights(run) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run / "checkpoints")[-1]
    return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


LEARN = dict(regression_weight=0.0, fit_steps=300, hidden=64, depth=2, batch_size=128, eval_samples=20000,
             eval_every=10**6, log_every=50, checkpoint_every=10**6, progress=False, divergence="hellinger")


def test_a_function_teacher_is_distilled_and_the_student_learns(tmp_path):
    t = blobs_teacher()
    start = db.distill(teacher=t, steps=1, out=str(tmp_path / "start"), **LEARN)
    end = db.distill(teacher=t, steps=300, out=str(tmp_path / "end"), **LEARN)
    m0, m1 = (json.loads((r / "summary.json").read_text())["metrics"] for r in (start, end))
    assert m1["energy"] < 0.3 * m0["energy"], (m0, m1)
    x = db.sample(end, 20000, seed=1)
    share = (x[:, 0] > 0).float().mean()
    assert abs(share - 0.5) < 0.1 and ((x - MU[(x[:, 0] > 0).long()]).norm(dim=1) < 4 * TAU).float().mean() > 0.8
    config = json.loads((end / "config.json").read_text())
    assert config["teacher"] == "object:two_blobs"
    # the run's own samples come back with the object, and `eval` of the spec-less run says what to pass
    assert db.evaluate_run(end, teacher=t)["energy"] == pytest.approx(m1["energy"], rel=1e-9)
    with pytest.raises(ValueError, match=r"passed to db\.distill as a Python object.*teacher=obj"):
        db.evaluate_run(end)


def test_a_teacher_object_gives_the_run_its_spec_gives(tmp_path):
    spec = "gmm:ring8_imbalanced"
    a = db.distill(preset="tiny", teacher=spec, out=str(tmp_path / "spec"), progress=False)
    b = db.distill(preset="tiny", teacher=db.load_teacher(spec), out=str(tmp_path / "object"), progress=False)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((r / "summary.json").read_text())["metrics"] for r in (a, b))
    assert sa == sb and "mode_tv" in sb  # an analytic mixture object keeps its exact metrics


def test_resume_takes_the_same_object_and_refuses_another(tmp_path):
    out = str(tmp_path / "run")
    whole = db.distill(preset="tiny", teacher=blobs_teacher(), out=str(tmp_path / "whole"), progress=False)
    db.distill(preset="tiny", teacher=blobs_teacher(), steps=3, out=out, progress=False)
    with pytest.raises(ConfigError, match=r"its teacher has changed since the run started \(fingerprint \w+, now"):
        db.distill(preset="tiny", teacher=blobs_teacher(1.0), out=out, progress=False, resume=True)
    part = db.distill(preset="tiny", teacher=blobs_teacher(), out=out, progress=False, resume=True)
    wa, wb = weights(whole), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same object resumes exactly


def test_the_cli_eval_of_an_object_run_says_what_to_pass(tmp_path, capsys):
    run = db.distill(preset="tiny", teacher=blobs_teacher(), out=str(tmp_path / "run"), progress=False)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run)])
    assert e.value.code != 0 and "Python object" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a spec of the same teacher can stand in for it
        main(["eval", str(run), "--teacher", "gmm:ring8_imbalanced", "--num", "100"])
    assert e.value.code == 0


def test_eps_prediction_is_converted_to_the_clean_sample():
    x, sigma = torch.randn(16, 2), torch.exp(torch.randn(16))
    d = blobs(x, sigma)
    eps = db.ModuleTeacher(lambda x, s, c: (x - blobs(x, s)) / s[:, None], (2,), prediction="eps")
    torch.testing.assert_close(eps(x, sigma), d)
    net = Precond(MLP(2, 16, 1), 0.5)
    t = db.ModuleTeacher(net, (2,))
    assert t.network is net and not any(p.requires_grad for p in net.parameters())
    assert db.ModuleTeacher(blobs, (2,)).network is None


class _Good(torch.nn.Module):
    shape, sigma_min, sigma_max, sigma_data, num_classes, network = (2,), 0.002, 80.0, 0.5, 0, None

    def forward(self, x, sigma, cond=None):
        return x / (1 + sigma[:, None] ** 2)


def _bad(**changes):
    """A ``_Good`` with some members changed (class attributes: a module value set on an instance would be
    registered as a submodule and hidden by the class's own attribute)."""
    return type("Bad", (_Good,), {k: staticmethod(v) if k == "forward" else v for k, v in changes.items()})()


@pytest.mark.parametrize("teacher, match", [
    (blobs, r"must be a torch\.nn\.Module.*dibregman\.ModuleTeacher"),
    (_bad(shape=[2, 2]), r"shape must be one sample's shape"),
    (_bad(shape=(0,)), r"shape must be one sample's shape"),
    (_bad(sigma_min=80.0, sigma_max=1.0), r"sigma_min \(80\.0\) must be below its sigma_max"),
    (_bad(sigma_data=float("nan")), r"sigma_data must be a positive finite number"),
    (_bad(num_classes=-1), r"num_classes must be an integer >= 0"),
    (_bad(num_classes=3), r"class-conditional teacher needs a network"),
    (_bad(network=torch.nn.Linear(2, 2)), r"network is a Linear; it must be a dibregman\.precond\.Precond"),
    (_bad(network=Precond(torch.nn.Linear(2, 2), 0.5)), r"a Precond around a Linear; .* registered in dibregman.nets"),
    (_bad(shape=(1, 4, 4)), r"image teacher needs a network"),
    (_bad(forward=lambda x, s, c=None: x[:, :1]), r"returned \(2, 1\) for inputs of shape \(2, 2\)"),
    (_bad(forward=lambda x, s, c=None: x * float("nan")), r"NaN or inf"),
    (_bad(forward=lambda x, s, c=None: x @ torch.ones(3, 3)), r"calling the teacher on two noisy inputs .* failed: "
                                                              r"RuntimeError"),
], ids=["function", "shape-list", "shape-zero", "sigma-order", "sigma-data", "classes", "cond-no-net",
        "net-type", "backbone-type", "image-no-net", "out-shape", "nan", "raises"])
def test_a_teacher_object_that_breaks_the_contract_is_refused_before_any_run(tmp_path, teacher, match):
    with pytest.raises((TypeError, ValueError), match=match):
        db.distill(preset="tiny", teacher=teacher, out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    assert db.check_teacher(_Good()) is not None


TEACHER_MODULE = '''
import torch
import dibregman as db

MU, TAU = torch.tensor([[-2.0, 0.0], [2.0, 0.0]]) * SCALE, 0.3


def blobs(x, sigma, cond=None):
    mu, s2 = MU.to(x), sigma.reshape(-1, 1) ** 2 + TAU**2
    w = (-((x[:, None, :] - mu) ** 2).sum(-1) / (2 * s2)).softmax(-1)
    return (w[:, :, None] * (mu + (TAU**2 / s2)[:, :, None] * (x[:, None, :] - mu))).sum(1)


def make():
    return db.ModuleTeacher(blobs, shape=(2,), sigma_data=2.0)


def bad():
    return "not a teacher"
'''


def test_a_py_spec_builds_the_teacher_for_the_cli_which_resumes_and_evaluates_it(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_teachers.py").write_text(TEACHER_MODULE.replace("SCALE", "1.0"))
    args = ["distill", "--preset", "tiny", "--teacher", "py:my_teachers:make", "--out", "run", "--no-progress"]
    monkeypatch.delitem(sys.modules, "my_teachers", raising=False)
    for extra in (["--steps", "3"], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            main(args + extra)
        assert e.value.code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["teacher"] == "py:my_teachers:make"
    with pytest.raises(SystemExit) as e:
        main(["eval", "run", "--num", "200"])  # the spec rebuilds the teacher
    assert e.value.code == 0
    # the same spec building another teacher (code edited between runs) is refused on resume
    (tmp_path / "my_teachers.py").write_text(TEACHER_MODULE.replace("SCALE", "1.5"))
    monkeypatch.delitem(sys.modules, "my_teachers")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*args, "--steps", "9", "--resume"])
    assert e.value.code == 2 and "its teacher has changed since the run started" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["distill", "--preset", "tiny", "--teacher", "py:my_teachers:bad", "--out", "bad", "--no-progress"])
    assert e.value.code == 2 and "py:my_teachers:bad returned: a teacher object is expected" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_teacher_folder_changed_under_a_run_is_refused_on_resume(tmp_path):
    from dibregman.teachers.trained import save_teacher

    torch.manual_seed(0)
    folder = save_teacher(tmp_path / "teacher", Precond(MLP(2, 32, 1), 0.5), {"data": "moons"})
    out = str(tmp_path / "run")
    db.distill(preset="tiny", teacher=f"net:{folder}", steps=3, out=out, progress=False)
    save_teacher(folder, Precond(MLP(2, 32, 1), 0.5), {"data": "moons"})  # other weights, same folder
    with pytest.raises(ConfigError, match="its teacher has changed since the run started"):
        db.distill(preset="tiny", teacher=f"net:{folder}", out=out, progress=False, resume=True)


def test_the_fingerprint_reads_weights_and_persistent_buffers_only():
    from dibregman.teachers.objects import fingerprint

    class Scaled(_Good):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.0))  # a 0-dim parameter
            self.register_buffer("cache", torch.zeros(3), persistent=False)  # derived: may differ in its last bits

        def forward(self, x, sigma, cond=None):
            return self.scale * x / (1 + sigma[:, None] ** 2)

    t = Scaled()
    before = fingerprint(db.check_teacher(t))
    t.cache += 1e-7
    assert fingerprint(t) == before
    with torch.no_grad():
        t.scale += 1e-3
    assert fingerprint(t) != before
    assert fingerprint(blobs_teacher()) == fingerprint(blobs_teacher()) != fingerprint(blobs_teacher(0.5))
