"""Atomic writes, the network-teacher folder format, EMA, and teacher training with exact resume."""

from __future__ import annotations

import json
import math
import os
import stat
import time

import pytest
import torch
from safetensors.torch import load_file

import dibregman.io as dio
import dibregman.train.teacher as teacher_mod
from dibregman.io import (
    atomic_open,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    write_json,
)
from dibregman.nets.mlp import MLP
from dibregman.precond import Precond
from dibregman.teachers.base import Teacher
from dibregman.teachers.trained import NetworkTeacher, load_teacher, save_teacher
from dibregman.train.config import ConfigError, TeacherConfig, resolve
from dibregman.train.ema import EMA
from dibregman.train.teacher import train_teacher

# --- atomic writes -----------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise OSError("simulated crash")


def test_atomic_writers_write(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")  # creates missing folders
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "j.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    atomic_save_safetensors(tmp_path / "w.safetensors", {"x": torch.arange(6.0).reshape(2, 3).t()})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["x"], torch.arange(6.0).reshape(2, 3).t())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_bytes(p, b"new"),
    lambda p: atomic_write_text(p, "new"),
    lambda p: write_json(p, {"new": 1}),
    lambda p: atomic_save_safetensors(p, {"x": torch.zeros(3)}),
])
def test_failed_replace_keeps_old_file_and_no_temps(tmp_path, monkeypatch, write):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    monkeypatch.setattr(dio.os, "replace", _fail)
    with pytest.raises(OSError, match="simulated crash"):
        write(target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_crash_mid_write_keeps_old_file(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half of the new con")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


# --- EMA -----------------------------------------------------------------------------------------------


def test_ema_update_and_state():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    old = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.9 * old + 0.1 * model.weight)
    other = EMA(torch.nn.Linear(2, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.module.weight, ema.module.weight)


def test_ema_warmup_forgets_the_initialisation():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(1000):
        ema.update(model)
    # without warm-up the initial weight would keep 0.999^1000 = 37% of the average
    assert ema.module.weight.item() == pytest.approx(1.0, abs=1e-2)


# --- the teacher folder --------------------------------------------------------------------------------


def _net(hidden: int = 16, seed: int = 0) -> Precond:
    torch.manual_seed(seed)
    return Precond(MLP(2, hidden, 1), sigma_data=0.7)


def test_save_load_round_trip(tmp_path):
    net = _net()
    save_teacher(tmp_path / "t", net, {"data": "moons", "command": "dibregman train-teacher",
                                       "metrics": {"energy_distance": 0.01}})
    teacher = load_teacher(tmp_path / "t")
    assert isinstance(teacher, NetworkTeacher) and isinstance(teacher, Teacher)
    assert teacher.shape == (2,) and teacher.sigma_data == 0.7 and teacher.num_classes == 0
    assert (teacher.sigma_min, teacher.sigma_max) == (0.002, 80.0)
    assert teacher.meta["command"] == "dibregman train-teacher" and teacher.data_spec == "moons"
    x, sigma = torch.randn(64, 2), torch.exp(torch.randn(64))
    with torch.no_grad():
        assert torch.equal(teacher(x, sigma), net(x, sigma))
    doc = json.loads((tmp_path / "t" / "teacher.json").read_text())
    assert doc["format"] == "dibregman-teacher" and doc["version"] == 1
    assert doc["arch"] == {"kind": "mlp", **net.backbone.arch()} and doc["shape"] == [2]


def test_teacher_calls_are_frozen_but_copies_train(tmp_path):
    save_teacher(tmp_path / "t", _net())
    teacher = load_teacher(tmp_path / "t")
    x = torch.randn(4, 2, requires_grad=True)
    assert not teacher(x, torch.ones(4)).requires_grad
    teacher.train()
    assert not teacher.network.training
    assert not any(p.requires_grad for p in teacher.network.parameters())  # frozen: no gradient lands on it
    from dibregman.train.components import build
    from dibregman.train.config import DistillConfig

    c = build(DistillConfig(), teacher, teacher.network, torch.device("cpu"))  # the students' copies train
    for net in (c.generator, c.fake_score, c.critic):
        assert all(p.requires_grad for p in net.parameters())


def test_truncated_weights(tmp_path):
    save_teacher(tmp_path / "t", _net())
    w = tmp_path / "t" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated.*re-create the teacher folder"):
        load_teacher(tmp_path / "t")


def test_wrong_arch_names_the_tensor(tmp_path):
    save_teacher(tmp_path / "t", _net(hidden=16))
    meta = tmp_path / "t" / "teacher.json"
    doc = json.loads(meta.read_text())
    doc["arch"]["hidden"] = 32
    meta.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"model.safetensors does not match this model: .*tensor 'backbone.inp.weight' "
                                         r"has shape \[16, 2\] but this model expects \[32, 2\].*arch in teacher.json"):
        load_teacher(tmp_path / "t")
    doc["arch"]["hidden"], doc["arch"]["depth"] = 16, 2
    meta.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"tensor 'backbone.blocks.1.1.weight' is missing"):
        load_teacher(tmp_path / "t")


@pytest.mark.parametrize("edit, match", [
    ({"format": "something"}, "not a dibregman-teacher file"),
    ({"version": 2}, "version 2; this dibregman reads version 1"),
    ({"arch": {"kind": "convnet"}}, "unknown arch kind 'convnet'"),
    ({"arch": {"kind": "mlp", "dim": 2, "hidden": 16, "depth": 1, "width": 3}},
     r"unknown MLP arguments \['width'\]"),
    ({"sigma_data": -1}, "sigma_data must be a positive number"),
    ({"shape": [3]}, "arch dim is 2"),
])
def test_bad_metadata(tmp_path, edit, match):
    save_teacher(tmp_path / "t", _net())
    meta = tmp_path / "t" / "teacher.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **edit}))
    with pytest.raises(ValueError, match=match):
        load_teacher(tmp_path / "t")


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "nope")
    save_teacher(tmp_path / "t", _net())
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        load_teacher(tmp_path / "t")
    (tmp_path / "t" / "teacher.json").write_text("{not json")
    save_teacher(tmp_path / "u", _net())
    (tmp_path / "u" / "teacher.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_teacher(tmp_path / "u")


def test_save_rejects_reserved_meta(tmp_path):
    with pytest.raises(ValueError, match="must not set"):
        save_teacher(tmp_path / "t", _net(), {"version": 3})


# --- training ------------------------------------------------------------------------------------------


def _tiny(out, **kw) -> TeacherConfig:
    return resolve(TeacherConfig, preset="tiny", overrides={"out": str(out), "device": "cpu", **kw})


def test_train_teacher_end_to_end(tmp_path):
    cfg = _tiny(tmp_path / "run")
    folder = train_teacher(cfg, progress=False)
    run = tmp_path / "run"
    assert folder == run / "teacher"
    assert json.loads((run / "config.json").read_text())["steps"] == 20
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss/teacher"]) and r["time/step_s"] > 0 for r in rows)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    teacher = load_teacher(folder)
    m = teacher.meta["metrics"]
    assert m["eval_samples"] == 128 and m["eval_nfe"] == 35 and math.isfinite(m["energy_distance"])
    assert teacher.meta["data"] == "moons" and teacher.meta["train_config"]["hidden"] == 32
    assert teacher.sigma_data == pytest.approx(1.0, abs=0.1)  # the std of the moons points
    with pytest.raises(ConfigError, match="pass --resume"):
        train_teacher(cfg, progress=False)


def _tensors(folder) -> dict[str, torch.Tensor]:
    return {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_resume_is_bit_identical(tmp_path):
    train_teacher(_tiny(tmp_path / "a"), progress=False)
    train_teacher(_tiny(tmp_path / "b", steps=10), progress=False)
    train_teacher(_tiny(tmp_path / "b"), progress=False, resume=True)
    for sub in ("teacher", "checkpoints/step-00000020"):
        a, b = _tensors(tmp_path / "a" / sub), _tensors(tmp_path / "b" / sub)
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), k
    meta_a, meta_b = (json.loads((tmp_path / r / "teacher" / "teacher.json").read_text()) for r in "ab")
    assert meta_a["metrics"] == meta_b["metrics"]
    rows_a, rows_b = ([(r["step"], r["loss/teacher"]) for r in map(json.loads, (tmp_path / x / "stats.jsonl")
                       .read_text().splitlines())] for x in "ab")
    assert rows_a == rows_b


def test_resume_refuses_a_changed_config(tmp_path):
    train_teacher(_tiny(tmp_path / "r", steps=10), progress=False)
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.01"):
        train_teacher(_tiny(tmp_path / "r", lr=0.01), progress=False, resume=True)


def test_non_finite_loss_stops_before_checkpoint(tmp_path, monkeypatch):
    real, calls = teacher_mod.denoising_loss, []

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 13 else loss

    monkeypatch.setattr(teacher_mod, "denoising_loss", flaky)
    with pytest.raises(FloatingPointError, match="at step 13"):
        train_teacher(_tiny(tmp_path / "r"), progress=False)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-00000010"]
    assert not (tmp_path / "r" / "teacher").exists()


@pytest.mark.slow
def test_moons_teacher_matches_data(tmp_path):
    # Measured (CPU, 2 shared cores): energy distance ~5e-4 in ~55 s; two independent 2000-point data
    # draws give ~1e-3 in magnitude, a unit Gaussian vs moons 0.059.
    t0 = time.perf_counter()
    cfg = TeacherConfig(data="moons", steps=1500, out=str(tmp_path / "run"), device="cpu",
                        log_every=250, checkpoint_every=1500)
    teacher = load_teacher(train_teacher(cfg, progress=False))
    ed = teacher.meta["metrics"]["energy_distance"]
    print(f"moons teacher: energy distance {ed:.5f} in {time.perf_counter() - t0:.1f} s")
    assert ed < 0.005


def test_non_finite_teacher_weights_are_refused(tmp_path):
    net = _net()
    with torch.no_grad():
        net.backbone.inp.weight[0, 0] = float("nan")
    save_teacher(tmp_path / "t", net)
    with pytest.raises(ValueError, match=r"backbone.inp.weight.*hold NaN or inf.*re-create the teacher folder"):
        load_teacher(tmp_path / "t")
