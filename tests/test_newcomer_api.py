"""The Python API a researcher reaches for first: db.sample on a device, db.load_generator, db.read_run,
and DMD2 runs named as such in every table."""

from __future__ import annotations

import json

import pytest
import torch

import dibregman as db
from dibregman.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return db.distill(preset="tiny", steps=3, out=str(tmp_path_factory.mktemp("r") / "run"), progress=False)


def test_sample_on_a_device_is_the_same_samples(run):
    x = db.sample(run, 40, seed=1)
    assert torch.equal(x, db.sample(run, 40, seed=1, device=torch.device("cpu")))
    # any batch size: the same draws (up to float rounding of batched matrix products)
    torch.testing.assert_close(db.sample(run, 40, seed=1, device="cpu", batch_size=7), x, rtol=1e-5, atol=1e-6)
    y = db.sample(run, 40, seed=1, device="auto")
    torch.testing.assert_close(y.cpu(), x, rtol=1e-4, atol=1e-5)
    if torch.cuda.is_available():
        z = db.sample(run, 40, seed=1, device="cuda")
        assert z.device.type == "cuda"
        torch.testing.assert_close(z.cpu(), x, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="device"):
        db.sample(run, 4, device="tpu")


def test_load_generator_and_read_run(run):
    gen, info = db.load_generator(run)
    assert info["divergence"] == "hellinger" and info["shape"] == [2]
    with torch.no_grad():
        assert gen(torch.randn(5, *info["shape"]), None).shape == (5, 2)
    rec = db.read_run(run)
    assert rec["config"]["steps"] == 3 and rec["summary"]["metrics"].keys() == rec["summary"]["teacher_metrics"].keys()
    assert [m["step"] for m in rec["metrics"]][-1] == 3 and all("step" in s for s in rec["stats"])
    assert rec["samples"]["student"].shape == rec["samples"]["teacher"].shape
    assert db.read_run(run / "nothing") == {"config": {}, "summary": {}, "stats": [], "metrics": [], "samples": {}}


def test_a_run_is_its_folder_and_reads_its_records(run, tmp_path):
    import os
    import pickle
    from pathlib import Path

    assert isinstance(run, db.RunFolder) and isinstance(run, os.PathLike)
    path = Path(run)
    assert run == path and run == str(path) and hash(run) == hash(path) and str(run) == str(path)
    assert run.exists() and run.name == "run" and (run / "config.json").is_file() and os.fspath(run) == str(path)
    assert run.generator.is_dir() and run.report.is_file() and run.checkpoints.is_dir()
    rec = db.read_run(run)
    assert run.config == rec["config"] and run.summary == rec["summary"] and run.stats == rec["stats"]
    assert run.metrics == rec["summary"]["metrics"] and run.evaluations == rec["metrics"]
    assert pickle.loads(pickle.dumps(run)) == run  # a run can cross process boundaries
    empty = db.RunFolder(tmp_path / "none")
    assert empty.config == {} and empty.metrics == {} and empty.stats == [] and empty.samples == {}


def test_dmd2_runs_are_labelled_dmd2_in_tables(tmp_path, capsys):
    out = tmp_path / "dmd2"
    assert_exit(main, ["distill", "--preset", "tiny", "--steps", "2", "--divergence", "reverse_kl", "--gan-weight",
                       "0.01", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "student reverse_kl+GAN (DMD2) (1 NFE)" in printed
    assert "reverse_kl+GAN (DMD2)" in (out / "report.md").read_text()
    assert db.evaluate_run(out, num=64)["method"] == "student (reverse_kl+GAN (DMD2), 1 NFE)"
    assert json.loads((out / "config.json").read_text())["gan_weight"] == 0.01


def assert_exit(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 0
