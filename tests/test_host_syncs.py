"""The training step never waits for the device: logged values stay tensors until the log window is read
(one transfer), the finite checks of every update are fused flags read at the driver's next check, and no
value of the step is read into Python in between. On a CPU these reads cost nothing, so they are counted:
each ``item``, ``tolist``, ``bool``, ``float`` or ``int`` of a tensor would be a host sync on a GPU."""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import pytest
import torch

from dibregman.stats import Stats, read_jsonl
from dibregman.teachers import load_teacher
from dibregman.train.conditions import conditions_for
from dibregman.train.config import DistillConfig, resolve
from dibregman.train.guard import NonFiniteError, NonFiniteGuard
from dibregman.train.state import build_state
from dibregman.train.step import distill_step

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "nonzero")


def _masked(index) -> bool:
    """Whether an index holds a boolean tensor (a mask: on a GPU its count is read back to size the result)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)


@pytest.fixture
def syncs(monkeypatch):
    """Counts the reads of a tensor's values into Python (each one a host sync on a GPU)."""
    count = {"n": 0, "at": collections.Counter()}  # and where: (module file, function) of the caller

    def seen() -> None:
        count["n"] += 1
        caller = sys._getframe(2).f_code
        count["at"][Path(caller.co_filename).name, caller.co_name] += 1

    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            seen()
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("__getitem__", "__setitem__"):  # boolean-mask indexing
        original = getattr(torch.Tensor, name)

        def indexed(self, index, *a, _original=original):
            if _masked(index):
                seen()
            return _original(self, index, *a)

        monkeypatch.setattr(torch.Tensor, name, indexed)
    real_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (seen(), real_nonzero(*a, **k))[1])
    return count


def test_the_counter_sees_what_would_wait_for_a_gpu(syncs):
    x = torch.randn(8)
    start = syncs["n"]
    x[x > 0]  # a mask: its size is read back
    x[x < 0] = 0.0
    x.cpu()
    x.numpy()
    torch.nonzero(x)
    assert syncs["n"] - start == 5
    x[torch.arange(3)]  # an index tensor is not a read
    x.to("cpu", copy=True)  # not counted (a copy to a device is how data reaches a GPU, and back by .cpu())
    assert syncs["n"] - start == 5


def test_logged_tensors_are_read_once_per_window(tmp_path, syncs):
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(3, generator=g) for _ in range(50)]
    stats, plain = Stats(tmp_path / "a.jsonl"), Stats(tmp_path / "b.jsonl")
    start = syncs["n"]
    for v in values:
        stats.add({"loss": v[0], "omega_min": v[1], "omega_max": v[2], "time/step_s": 0.5})
    assert syncs["n"] == start  # nothing read while the window fills
    row = stats.flush(50)
    assert syncs["n"] == start + 2  # one transfer for the window (.cpu()), then the CPU copy's tolist
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


def test_a_deferred_update_reads_nothing_and_the_check_reads_once(tmp_path, syncs):
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    guard = NonFiniteGuard("strict", deferred=True)
    start = syncs["n"]
    for step in range(1, 6):
        assert guard.step(opt, net(torch.randn(8, 4)).pow(2).mean(), net, "net", step, 1.0, tmp_path)
    assert syncs["n"] == start
    guard.check()
    assert syncs["n"] == start + 1 and not guard.pending  # five updates' flags in one transfer


@pytest.mark.parametrize("bad", ["loss", "weights"])
def test_a_deferred_check_names_the_first_bad_update(tmp_path, bad):
    # from the second of three updates on: a NaN loss, or a step so large that the weights overflow to inf
    net = torch.nn.Linear(2, 1)
    guard = NonFiniteGuard("strict", deferred=True)
    x = torch.full((4, 2), 10.0)
    for step in (1, 2, 3):
        with torch.no_grad():
            net.weight.fill_(1.0)
            net.bias.fill_(0.0)
        loss = (net(x) ** 2).mean() * (float("nan") if bad == "loss" and step >= 2 else 1.0)
        lr = 1e38 if bad == "weights" and step >= 2 else 0.1
        guard.step(torch.optim.SGD(net.parameters(), lr=lr), loss, net, "net", step, 0.0, tmp_path)
    message = r"non-finite net loss \(nan\) at step 2" if bad == "loss" else "net weights after the update at step 2"
    with pytest.raises(NonFiniteError, match=message) as e:
        guard.check()
    assert "no checkpoint was written yet" in str(e.value)


# reads that only happen on the CPU, where they cost nothing: the analytic teacher checks its sigma with a
# Python read on the CPU and with torch._assert_async on a GPU
CPU_ONLY = {("gmm.py", "_sigma")}


def _state(tmp_path, preset, **overrides):
    cfg = resolve(DistillConfig, preset=preset, overrides={"out": str(tmp_path / "run"), **overrides})
    teacher = load_teacher(cfg.teacher)
    return build_state(cfg, teacher, conditions_for(teacher), tmp_path / "run", torch.device("cpu"), slice(None),
                       "digest", resuming=False)


STEP_CONFIGS = {  # the paths a step can take: critic heads and data, omega normalisations, GAN and regression terms
    "ring": ("tiny", {}),  # hellinger, K = 2, a standalone critic on the teacher's pool, DMD's regression term
    "bins-gan-data": ("tiny", {"omega_normalize": "bins", "gan_weight": 0.01, "critic_data": "data",
                               "regression_weight": 0.0}),
    "reverse_kl": ("tiny", {"divergence": "reverse_kl", "fake_score_steps": 1}),
    "discriminator": ("tiny", {"generator_mode": "discriminator", "divergence": "forward_kl"}),
    "images": ("tiny-images", {"teacher": "net:fashion-mnist", "critic_data": "data"}),
    "lora-bf16": ("tiny-images", {"teacher": "net:fashion-mnist", "lora_rank": 4, "precision": "bf16"}),
}


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_a_distillation_step_reads_no_tensor(tmp_path, syncs, name):
    preset, overrides = STEP_CONFIGS[name]
    s = _state(tmp_path, preset, **overrides)
    distill_step(s)  # warm: lazily built things (cached schedules, say) may read once
    s.guard.check()
    syncs["at"].clear()
    for _ in range(3):
        out = distill_step(s)
    read = {at: n for at, n in syncs["at"].items() if at not in CPU_ONLY}
    assert not read, f"reads in 3 steps: {read}"
    assert len(s.guard.pending) == 3 * s.cfg.fake_score_steps * (s.c.critic is not None) + 3 * (
        s.cfg.fake_score_steps * (s.cfg.generator_mode == "score") + 1)  # one flag per update
    s.guard.check()
    assert sum(syncs["at"].values()) - sum(syncs["at"][at] for at in CPU_ONLY) == 1 and torch.isfinite(out.loss)


def test_a_few_step_student_reads_only_its_cpu_drawn_step_count(tmp_path, syncs):
    # how many of its steps a batch runs is drawn from the CPU generator of the run (the same on every process):
    # reading it waits for no device; nothing else in the step is read
    s = _state(tmp_path, "tiny", student_steps=2)
    distill_step(s)
    syncs["at"].clear()
    distill_step(s)
    read = {at: n for at, n in syncs["at"].items() if at not in CPU_ONLY}
    assert read == {("state.py", "student_batch"): s.cfg.fake_score_steps + 1}  # one per student batch
