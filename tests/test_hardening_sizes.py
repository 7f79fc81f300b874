"""Issue 11, defects 6, 10 (sizes, seeds, labels, devices), 13, 21: sizes and names checked before any work."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reliability import _tripwire, assert_one_line_error, finished, run_cli, snapshot

import dibregman.sampling as sampling_mod
import dibregman.train.state as state_mod
import dibregman.train.teacher as teacher_mod
from dibregman.sampling import noise_from_seeds

pytestmark = pytest.mark.usefixtures("one_thread")
_ = finished


def _reference(seeds, shape):  # the formula before defect 6's fix: one generator per sample
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


SHAPES = st.lists(st.integers(1, 6), min_size=0, max_size=3)
SEEDS = st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=20)


@settings(max_examples=30, deadline=None)
@given(seeds=SEEDS, shape=SHAPES)
def test_noise_keeps_its_values_per_seed(seeds, shape):
    assert torch.equal(noise_from_seeds(seeds, shape), _reference(seeds, shape))


@pytest.mark.slow
@settings(max_examples=1000, deadline=None)
@given(seeds=SEEDS, shape=SHAPES)
def test_noise_keeps_its_values_per_seed_many(seeds, shape):
    assert torch.equal(noise_from_seeds(seeds, shape), _reference(seeds, shape))


def test_noise_keeps_one_generator_not_one_per_sample(monkeypatch):
    made = []
    real = torch.Generator

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling_mod.torch, "Generator", counting)
    x = noise_from_seeds(range(5000), (2,))  # 2.6 KB kept per sample before: 13 MB here, 26 GB at 10^7
    assert x.shape == (5000, 2) and len(made) == 1
    monkeypatch.undo()
    assert torch.equal(x[[0, 1234, 4999]], _reference([0, 1234, 4999], (2,)))


def test_noise_beyond_memory_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"noise for 1000000000000 samples .* ask for fewer samples"):
        noise_from_seeds(range(10**12), (2,))


@pytest.mark.parametrize("extra, needles", [
    (["--num", "0"], ["--num must be a positive integer; got 0"]),
    (["--num", "-3"], ["--num must be a positive integer"]),
    (["--num", "10000000000000"], ["--num 10000000000000 needs", "GiB", "draw fewer"]),
    (["--seed", "18446744073709551614"], ["--seed must be an integer in [0, 2**40)"]),
    (["--label", "99"], ["--label is for class-conditional generators"]),
    (["--out", "{tmp}/s.txt"], ["--out must end in .npz or .png"]),
])
def test_bad_sample_options_are_one_line_before_sampling(finished, tmp_path, capsys, monkeypatch, extra, needles):
    monkeypatch.setattr(sampling_mod, "noise_from_seeds", _tripwire)
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, err = run_cli(capsys, "sample", finished, "--out", tmp_path / "s.npz", *extra)
    assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, needles", [
    (["--num", "0"], ["--num must be an integer in 2..10000000"]),
    (["--seed", "-1"], ["--seed must be an integer in [0, 2**40)"]),
])
def test_bad_eval_options_are_one_line(finished, capsys, extra, needles):
    code, _, err = run_cli(capsys, "eval", finished, *extra)
    assert_one_line_error(code, err, *needles)


DISTILL = {
    "batch_size 1e12": (["--batch-size", "1000000000000"], ["option 'batch_size' must be at most 1048576"]),
    "eval_samples 1e12": (["--eval-samples", "1000000000000"], ["option 'eval_samples' must be at most"]),
    "teacher_pool 1e12": (["--teacher-pool", "1000000000000"], ["option 'teacher_pool' must be at most"]),
    "seed 2**64 - 2": (["--seed", "18446744073709551614"], ["option 'seed' must be an integer in [0, 2**40)"]),
    "empty --out": (["--out", ""], ["option 'out' is empty", "working folder"]),
    "undecodable --out": (["--out", "run-\udcff"], ["option 'out'", "not valid UTF-8"]),
    "device meta": (["--device", "meta"], ["unknown device 'meta'", "cuda:N"]),
    "device cpu:5": (["--device", "cpu:5"], ["unknown device 'cpu:5'"]),
}


@pytest.mark.parametrize("case", list(DISTILL))
def test_bad_sizes_and_names_are_refused_before_the_run_folder(tmp_path, capsys, monkeypatch, case):
    extra, needles = DISTILL[case]
    monkeypatch.chdir(tmp_path)  # an empty --out would write here
    monkeypatch.setattr(state_mod, "fitted_start", _tripwire)
    monkeypatch.setattr(state_mod, "build", _tripwire)
    code, _, err = run_cli(capsys, "distill", "--preset", "tiny", "--no-progress", "--out", tmp_path / "run", *extra)
    assert_one_line_error(code, err, *needles)
    assert snapshot(tmp_path) == {} and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, needles", [
    (["--num-points", "1000000000000"], ["option 'num_points' must be at most"]),
    (["--out", ""], ["option 'out' is empty"]),
    (["--seed", "-5"], ["option 'seed'"]),
])
def test_bad_teacher_sizes_are_refused_before_the_run_folder(tmp_path, capsys, monkeypatch, extra, needles):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(teacher_mod, "EMA", _tripwire)
    code, _, err = run_cli(capsys, "train-teacher", "--preset", "tiny", "--out", tmp_path / "run", *extra)
    assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("label", ["10", "-1"])
def test_a_label_outside_the_generators_classes_is_one_line(tmp_path, capsys, label):
    from test_export import tiny_generator

    from dibregman.artifacts import save_generator

    folder = save_generator(tmp_path / "gen", tiny_generator(10), {"shape": [1, 8, 8], "num_classes": 10})
    code, _, err = run_cli(capsys, "sample", folder, "--label", label, "--num", "4", "--out", tmp_path / "s.npz")
    assert_one_line_error(code, err, f"--label must be a class number in 0..9; got {label}")
    assert not (tmp_path / "s.npz").exists()
