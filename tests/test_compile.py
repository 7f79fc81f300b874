"""``compile = true``: the networks a step calls run through torch.compile, in place, so a compiled run trains
the same weights (to float rounding) and writes the same checkpoints, which a run without it resumes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import dibregman as db

pytestmark = pytest.mark.slow  # the inductor compiles each network on the first calls: about a minute here


def test_a_compiled_run_matches_an_eager_one_and_resumes_without_compiling(tmp_path, capsys):
    compiled = db.distill(preset="tiny", out=str(tmp_path / "c"), compile=True, progress=False)
    eager = db.distill(preset="tiny", out=str(tmp_path / "e"), progress=False)
    a, b = (load_file(run / "generator" / "model.safetensors") for run in (compiled, eager))
    assert a.keys() == b.keys()  # no "_orig_mod." prefix: the state dict is the network's own
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    # it continues without compiling from its step-6 checkpoint, as an eager run of 8 steps trains
    capsys.readouterr()
    resumed = db.distill(preset="tiny", out=str(compiled), steps=8, resume=True, progress=False)
    assert "step-00000006 (step 6)" in capsys.readouterr().err  # loaded the compiled run's checkpoint
    fresh = db.distill(preset="tiny", out=str(tmp_path / "f"), steps=8, progress=False)
    a, b = (load_file(run / "checkpoints" / "step-00000008" / "generator.safetensors") for run in (resumed, fresh))
    six = load_file(compiled / "checkpoints" / "step-00000006" / "generator.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], six[k]) for k in a)  # two more steps were trained
