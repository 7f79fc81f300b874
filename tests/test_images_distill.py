"""The image path end to end on 8x8 digits: U-Net teacher, distillation with each critic head, image
metrics, grids, exact resume, guidance, precision options, sampling and export through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dibregman as db
from dibregman.cli import main
from dibregman.train.checkpoint import list_checkpoints
from dibregman.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (pip install 'dibregman[data]')")

METRICS = {"fd", "kid", "precision", "recall", "label_acc"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("teacher")
    torch.set_num_threads(1)
    return f"net:{db.train_teacher(preset='tiny-images', out=str(out / 'run'), progress=False)}"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    from dibregman.train.classifier import train_classifier

    out = tmp_path_factory.mktemp("clf") / "digits"
    return str(train_classifier("digits", out, epochs=1, width=8, feature_dim=16, progress=False))


def run(tmp_path, teacher, classifier, name="run", **options):
    opts = {"critic_data": "data", "classifier": classifier, "divergence": "hellinger", **options}
    return db.distill(preset="tiny-images", teacher=teacher, out=str(tmp_path / name), progress=False, **opts)


def weights(out):
    last = list_checkpoints(out / "checkpoints")[-1]
    return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("head", ["standalone", "fake_score", "teacher"])
def test_distill_images_with_each_critic_head(tmp_path, teacher, classifier, head):
    out = run(tmp_path, teacher, classifier, critic_head=head)
    summary = json.loads((out / "summary.json").read_text())
    for row in (summary["metrics"], summary["teacher_metrics"]):
        assert row.keys() >= METRICS and all(math.isfinite(row[k]) for k in METRICS)
        assert 0 <= row["label_acc"] <= 1 and row["fd"] >= 0
    assert "classifier features" in summary["protocol"]
    with np.load(out / "samples.npz") as z:
        assert z["student"].shape == z["teacher"].shape == (16, 1, 8, 8)
        np.testing.assert_array_equal(z["labels"], np.arange(16) % 10)
    for png in ("samples_student.png", "samples_teacher.png", "samples.png", "grids/step-00000002.png"):
        assert (out / png).stat().st_size > 100, png
    critic = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "critic.safetensors"))
    owns_encoder = any(k.startswith("encoder.") for k in critic)
    assert owns_encoder == (head == "standalone")  # a head on another network's features holds the head only


def test_reverse_kl_on_images_trains_no_critic(tmp_path, teacher, classifier):
    out = run(tmp_path, teacher, classifier, divergence="reverse_kl")
    assert not (list_checkpoints(out / "checkpoints")[-1] / "critic.safetensors").exists()


def test_feature_critic_leaves_the_network_it_reads_alone(teacher):
    from dibregman.losses import critic_loss
    from dibregman.teachers import load_teacher
    from dibregman.train.components import build
    from dibregman.train.config import DistillConfig

    t = load_teacher(teacher)
    c = build(DistillConfig(critic_head="fake_score"), t, t.network, torch.device("cpu"))
    assert {id(p) for p in c.critic.parameters()} == {id(p) for p in c.critic.head.parameters()}
    x, n = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    y, sigma = torch.arange(4), torch.full((4,), 0.7)
    loss = critic_loss(c.critic, x, x + 0.1, sigma, n, n, c.dre, y).mean()
    loss.backward()
    assert all(p.grad is None for p in c.fake_score.parameters())
    assert all(p.grad is not None for p in c.critic.head.parameters())
    # the generator's GAN term needs the gradient through the features with respect to the input
    xg = x.clone().requires_grad_(True)
    c.critic(xg, sigma, y).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_a_gan_term_through_a_teacher_feature_critic_builds_no_gradient_on_the_teacher(teacher):
    from dibregman.teachers import load_teacher
    from dibregman.train.components import build
    from dibregman.train.config import DistillConfig

    t = load_teacher(teacher)
    c = build(DistillConfig(critic_head="teacher"), t, t.network, torch.device("cpu"))
    x, sigma, y = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7), torch.arange(4)
    xg = c.generator(x, y)  # the generator's GAN term: the critic's score of its samples, through the features
    c.critic(xg + 0.7 * torch.randn_like(xg), sigma, y).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in t.network.parameters())
    assert all(p.grad is not None for p in c.generator.parameters())  # the student's copy does train
    assert all(p.requires_grad for p in c.fake_score.parameters())


def test_an_image_teacher_object_around_a_network_is_distilled(tmp_path, teacher, classifier):
    net = db.load_teacher(teacher).network
    obj = db.ModuleTeacher(net, shape=(1, 8, 8), sigma_data=net.sigma_data, num_classes=10)
    out = db.distill(preset="tiny-images", teacher=obj, classifier=classifier, divergence="hellinger",
                     out=str(tmp_path / "run"), progress=False)
    x = db.sample(out, 16, labels=torch.arange(16) % 10)  # saved like any student, sampled without the object
    assert x.shape == (16, 1, 8, 8) and torch.isfinite(x).all()
    summary = json.loads((out / "summary.json").read_text())
    again = db.evaluate_run(out, teacher=obj, classifier=classifier)
    assert again["fd"] == pytest.approx(summary["metrics"]["fd"], rel=1e-6)


def test_a_teacher_object_does_not_keep_another_runs_guidance(teacher, classifier):
    t = db.load_teacher(teacher)
    db.teacher_row(t, 8, classifier=classifier, guidance=2.0)
    assert t.guidance == 2.0
    db.teacher_row(t, 8, classifier=classifier)
    assert t.guidance == 1.0


def test_guidance_is_classifier_free_guidance(teacher):
    from dibregman.teachers import load_teacher

    t = load_teacher(teacher)
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 5.0]), torch.tensor([1, 4, 9])
    d_c, d_u = t(x, sigma, y), t(x, sigma, None)
    t.guidance = 2.5
    torch.testing.assert_close(t(x, sigma, y), d_u + 2.5 * (d_c - d_u))
    assert torch.equal(t(x, sigma, None), d_u)  # no labels: nothing to guide


def test_image_run_resumes_exactly(tmp_path, teacher, classifier):
    whole = run(tmp_path, teacher, classifier, name="whole")
    run(tmp_path, teacher, classifier, name="part", steps=2)
    part = db.distill(preset="tiny-images", teacher=teacher, out=str(tmp_path / "part"), progress=False,
                      resume=True, critic_data="data", classifier=classifier, divergence="hellinger")
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_changes_nothing_and_bf16_runs(tmp_path, teacher, classifier):
    plain = weights(run(tmp_path, teacher, classifier, name="plain", steps=2))
    ckpt = weights(run(tmp_path, teacher, classifier, name="ckpt", steps=2, grad_checkpointing=True))
    for k in plain:  # recomputing activations in backward gives the same gradients
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    out = run(tmp_path, teacher, classifier, name="bf16", steps=2, precision="bf16")
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_bad_image_options_are_refused_before_any_work(tmp_path, teacher):
    with pytest.raises(ConfigError, match="class- or text-conditional"):
        db.distill(preset="tiny", guidance=2.0, out=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="analytic teacher"):
        db.distill(preset="tiny", divergence="hellinger", critic_head="teacher", out=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="U-Net"):
        db.distill(preset="tiny", grad_checkpointing=True, out=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="precision"):
        db.distill(preset="tiny-images", teacher=teacher, precision="fp8", out=str(tmp_path / "d"))
    with pytest.raises((FileNotFoundError, ValueError), match="classifier"):
        db.distill(preset="tiny-images", teacher=teacher, classifier=str(tmp_path / "nope"), out=str(tmp_path / "e"))


def test_cli_sample_grid_npz_and_export(tmp_path, teacher, classifier, capsys):
    out = run(tmp_path, teacher, classifier, name="cli")
    with pytest.raises(SystemExit) as e:
        main(["sample", str(out), "--num", "20", "--out", str(tmp_path / "grid.png")])
    assert e.value.code == 0 and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as e:
        main(["sample", str(out), "--num", "6", "--label", "3", "--out", str(tmp_path / "s.npz")])
    with np.load(tmp_path / "s.npz") as z:
        assert z["x"].shape == (6, 1, 8, 8) and (z["labels"] == 3).all()
    with pytest.raises(SystemExit) as e:
        main(["export", str(out), "--out", str(tmp_path / "exported")])
    assert e.value.code == 0 and (tmp_path / "exported" / "model_index.json").is_file()


def test_shipped_teacher_matches_its_provenance():
    import hashlib
    from pathlib import Path

    from dibregman.assets import shipped
    from dibregman.teachers import load_teacher

    folder = shipped("fashion-mnist", "teacher")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest in (folder / "README.md").read_text()  # the recorded weights are the shipped ones
    t = load_teacher("net:fashion-mnist")
    assert t.shape == (1, 28, 28) and t.num_classes == 10 and t.data_spec == "fashion-mnist"
    d = t(80 * torch.randn(2, 1, 28, 28), torch.full((2,), 80.0), torch.tensor([1, 9]))
    # at sigma_max the denoiser returns about the class mean: of pixel scale, and different per class
    assert d.abs().mean() < 1 and (d[0] - d[1]).abs().mean() > 0.1
    assert Path(folder / "samples.png").stat().st_size > 1000
