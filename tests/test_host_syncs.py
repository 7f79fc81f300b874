"""The training step waits for the device as little as it can: logged values stay tensors until the log
window is read (one transfer), and an update's loss and gradient checks are read together."""

from __future__ import annotations

import math

import pytest
import torch

from dibregman.stats import Stats, read_jsonl
from dibregman.train.guard import NonFiniteGuard

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def syncs(monkeypatch):
    """Counts the reads of a tensor's values into Python (each one a host sync on a GPU)."""
    count = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            count["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def test_logged_tensors_are_read_once_per_window(tmp_path, syncs):
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(3, generator=g) for _ in range(50)]
    stats, plain = Stats(tmp_path / "a.jsonl"), Stats(tmp_path / "b.jsonl")
    start = syncs["n"]
    for v in values:
        stats.add({"loss": v[0], "omega_min": v[1], "omega_max": v[2], "time/step_s": 0.5})
    assert syncs["n"] == start  # nothing read while the window fills
    row = stats.flush(50)
    assert syncs["n"] == start + 1  # one transfer for the window
    for v in values:
        plain.add({"loss": float(v[0]), "omega_min": float(v[1]), "omega_max": float(v[2]), "time/step_s": 0.5})
    assert row == plain.flush(50) == read_jsonl(tmp_path / "a.jsonl")[0]
    assert math.isclose(row["loss"], float(torch.stack([v[0] for v in values]).double().mean()), rel_tol=1e-12)


def test_an_update_reads_its_checks_in_two_syncs(tmp_path, syncs):
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    guard = NonFiniteGuard("strict")
    start = syncs["n"]
    assert guard.step(opt, net(torch.randn(8, 4)).pow(2).mean(), net, "net", 1, 1.0, tmp_path)
    assert syncs["n"] - start == 2  # the loss and gradient flags together, then the weights after the step
