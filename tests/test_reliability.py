"""A run is never lost to a crash, a bad flag or a bad file (docs/reliability.md lists each fault).

Every user error reaches the CLI as one ``dibregman: error:`` line with exit code 2, before any
training where the error is knowable up front, and without creating or destroying run files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dibregman as db
import dibregman.train.checkpoint as ckpt_mod
import dibregman.train.loop as loop_mod
import dibregman.train.state as state_mod
import dibregman.train.step as step_mod
import dibregman.train.teacher as teacher_mod
from dibregman.cli import main
from dibregman.io import RunIOError, append_line, write_json
from dibregman.nets.mlp import MLP
from dibregman.precond import Precond
from dibregman.stats import read_jsonl
from dibregman.teachers.trained import save_teacher
from dibregman.train.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from dibregman.train.config import ConfigError
from dibregman.train.guard import NonFiniteError, NonFiniteGuard

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny preset with checkpoints (and evaluations) every 2 of its 6 steps: kept 2, 4 and 6
OPTS = {"preset": "tiny", "progress": False, "checkpoint_every": 2, "eval_every": 2, "keep_checkpoints": 3}
FLAGS = ["--preset", "tiny", "--no-progress", "--checkpoint-every", "2", "--eval-every", "2",
         "--keep-checkpoints", "3"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dibregman: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{f.stem}/{k}": v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="session")  # shared by the tests/test_hardening_*.py modules
def finished(tmp_path_factory) -> Path:
    """One uninterrupted tiny run: the reference that resumed runs must match bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return db.distill(out=str(tmp_path_factory.mktemp("ref") / "run"), **OPTS)
    finally:
        torch.set_num_threads(n)


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- resume falls back past a damaged newest checkpoint ----------------------------------------------

DAMAGE = {
    "truncated weights": lambda c: truncate(c / "generator.safetensors"),
    "truncated state.pt": lambda c: truncate(c / "state.pt"),
    "garbage state.json": lambda c: (c / "state.json").write_text('{"step": 6, "conf'),
    "missing fake score": lambda c: (c / "fake_score.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_past_a_damaged_newest_checkpoint(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path / "run")
    DAMAGE[damage](run / "checkpoints" / "step-00000006")
    capsys.readouterr()
    db.distill(out=str(run), resume=True, **OPTS)
    err = capsys.readouterr().err
    assert "step-00000006 is damaged" in err and "resuming from" in err and "step-00000004" in err
    assert (run / "checkpoints" / "damaged-step-00000006").is_dir()  # kept for inspection, out of the way
    # steps 5 and 6 were recomputed from step 4: the same weights as the run that was never damaged
    assert_same(weights(finished / "checkpoints" / "step-00000006"), weights(run / "checkpoints" / "step-00000006"))


def test_every_checkpoint_damaged_is_one_error_naming_them(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    for c in list_checkpoints(run / "checkpoints"):
        truncate(c / "state.pt")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run, "--resume")
    assert_one_line_error(code, err, "every checkpoint", "step-00000002", "step-00000004", "step-00000006",
                          "another --out")
    assert snapshot(run) == before  # nothing moved or rewritten when there is nothing to resume from


def test_teacher_resume_falls_back_too(tmp_path, capsys):
    opts = {"preset": "tiny", "progress": False, "out": str(tmp_path / "t")}
    folder = db.train_teacher(**opts)  # checkpoints at steps 10 and 20
    reference = load_file(folder / "model.safetensors")
    truncate(tmp_path / "t" / "checkpoints" / "step-00000020" / "teacher.safetensors")
    capsys.readouterr()
    db.train_teacher(resume=True, **opts)
    assert "resuming from" in capsys.readouterr().err
    assert_same(reference, load_file(folder / "model.safetensors"))


def _linear(seed: int = 0, n: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(n, n)


def test_load_latest_unit(tmp_path, capsys):
    root = tmp_path / "ckpt"
    assert load_latest(root, {"net": _linear()}) is None  # nothing saved yet: a fresh start
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"net": _linear(step)}, {"x": torch.ones(step)}, {"tag": step}, keep=5)
    truncate(root / "step-00000003" / "net.safetensors")
    net = _linear(9)
    path, state, meta = load_latest(root, {"net": net})
    assert path.name == "step-00000002" and meta == {"step": 2, "tag": 2} and torch.equal(state["x"], torch.ones(2))
    assert torch.equal(net.weight, _linear(2).weight)
    assert "step-00000003 is damaged" in capsys.readouterr().err
    # a config check runs before the weights are read, and its error is not treated as damage
    def changed_config(meta: dict) -> None:
        raise ConfigError("changed")

    with pytest.raises(ConfigError, match="changed"):
        load_latest(root, {"net": _linear()}, check=changed_config)
    # a readable checkpoint of another model is not damage either: no fallback, nothing moved
    with pytest.raises(CheckpointMismatch, match="shape"):
        load_latest(root, {"net": _linear(n=4)})
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002"]


# --- full disk, read-only or unwritable output -------------------------------------------------------

def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("where, code", [
    ("weights", errno.ENOSPC), ("state", errno.ENOSPC), ("meta", errno.EDQUOT), ("rename", errno.EROFS),
])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, where, code):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"net": _linear(1)}, {"x": torch.ones(1)}, {"tag": 1})
    before = snapshot(root)
    if where == "weights":
        monkeypatch.setattr(ckpt_mod, "_write_bytes", _raise(code))
    elif where == "state":
        monkeypatch.setattr(ckpt_mod.torch, "save", _raise(code))
    elif where == "meta":
        monkeypatch.setattr(ckpt_mod, "write_json", _raise(code))
    else:
        real = os.replace
        monkeypatch.setattr(os, "replace", lambda a, b: _raise(code)() if Path(b).name == "step-00000002"
                            else real(a, b))
    with pytest.raises(RunIOError) as e:
        save_checkpoint(root, 2, {"net": _linear(2)}, {"x": torch.ones(2)}, {"tag": 2})
    msg = str(e.value)
    assert e.value.errno == code and isinstance(e.value, OSError)
    assert {errno.ENOSPC: "no space left on device", errno.EDQUOT: "quota", errno.EROFS: "read-only"}[code] in msg
    assert f"the previous checkpoint {root / 'step-00000001'} is intact" in msg and "--out" in msg
    monkeypatch.undo()
    assert snapshot(root) == before  # no temporary folder left, the old checkpoint byte-identical
    _, meta = load_checkpoint(root / "step-00000001", {"net": _linear(5)})
    assert meta["tag"] == 1


def test_failed_resave_of_the_same_step_restores_it(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 2, {"net": _linear(1)}, {}, {"tag": "old"})
    before, real = snapshot(root), os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: _raise(errno.ENOSPC)() if Path(a).name.startswith(".tmp-step")
                        else real(a, b))
    with pytest.raises(RunIOError, match="no space left"):
        save_checkpoint(root, 2, {"net": _linear(2)}, {}, {"tag": "new"})
    monkeypatch.undo()
    assert snapshot(root) == before


def test_full_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    run, real = tmp_path / "run", ckpt_mod._write_bytes

    def disk_fills_at_step_4(path: Path, data: bytes) -> None:
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", disk_fills_at_step_4)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run)
    assert_one_line_error(code, err, "no space left on device while writing", "free some space",
                          f"the previous checkpoint {run / 'checkpoints' / 'step-00000002'} is intact")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # no temporary left
    monkeypatch.undo()  # space was freed
    assert run_cli(capsys, "distill", *FLAGS, "--out", run, "--resume")[0] == 0


def test_run_file_writers_raise_run_io_error(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunIOError, match=r"while writing .*a_file/log.jsonl"):  # a folder that is a file
        append_line(tmp_path / "a_file" / "log.jsonl", "{}")
    target = tmp_path / "config.json"
    write_json(target, {"old": 1})
    monkeypatch.setattr(os, "replace", _raise(errno.ENOSPC))
    with pytest.raises(RunIOError, match=r"no space left on device while writing .*config\.json; free some space"):
        write_json(target, {"new": 1})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": 1} and sorted(os.listdir(tmp_path)) == ["a_file", "config.json"]


def test_unwritable_output_fails_before_any_work(tmp_path, capsys, monkeypatch):
    # tests run as root, where chmod cannot make a folder unwritable: a path below a file is never writable
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(state_mod, "fitted_start", _tripwire)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", tmp_path / "a_file" / "run")
    assert_one_line_error(code, err, "cannot create output folder", "choose a writable --out")
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", tmp_path / "a_file")
    assert_one_line_error(code, err, "is not a folder")
    assert os.listdir(tmp_path) == ["a_file"]


# --- non-finite values --------------------------------------------------------------------------------

def _tripwire(*args, **kwargs):
    raise AssertionError("training work started before the input was checked")


class NaNTeacherFrom:
    """Wraps the generator loss: from its ``first``-th call (one per step) to its ``last``-th, the
    teacher it is handed returns NaN, as a diverged or broken teacher network would."""

    def __init__(self, loss, first: int, last: int = 10**9):
        self.loss, self.first, self.last, self.calls = loss, first, last, 0

    def __getattr__(self, name: str):
        return getattr(self.loss, name)

    def __call__(self, x, sigma, n, teacher, *args, **kwargs):
        self.calls += 1
        if self.first <= self.calls <= self.last:
            real = teacher
            teacher = lambda *a, **k: real(*a, **k) * float("nan")  # noqa: E731
        return self.loss(x, sigma, n, teacher, *args, **kwargs)


def poison_teacher(monkeypatch, first: int, last: int = 10**9) -> None:
    real = state_mod.build

    def build(*args, **kwargs):
        c = real(*args, **kwargs)
        c.generator_loss = NaNTeacherFrom(c.generator_loss, first, last)
        return c

    monkeypatch.setattr(state_mod, "build", build)


def test_nan_strict_stops_at_the_step_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch, capsys):
    run, saved, real_save = tmp_path / "run", {}, loop_mod.save_checkpoint

    def recording_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        saved[path.name] = snapshot(path)
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", recording_save)
    poison_teacher(monkeypatch, first=3)
    with pytest.raises(NonFiniteError) as e:
        db.distill(out=str(run), **OPTS)
    msg = str(e.value)
    assert "non-finite generator loss (nan) at step 3" in msg
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-00000002'}" in msg and "--nonfinite skip" in msg
    assert list(saved) == ["step-00000002"]
    assert snapshot(run / "checkpoints" / "step-00000002") == saved["step-00000002"]  # untouched since saved
    assert all(torch.isfinite(v).all() for v in weights(run / "checkpoints" / "step-00000002").values())
    assert not (run / "generator").exists() and not (run / "summary.json").exists()

    # the CLI: one line, exit 2; then resuming in skip mode replays steps 3..6 and drops the bad ones
    shutil.rmtree(run)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run)
    assert_one_line_error(code, err, "non-finite generator loss", "at step 3", "step-00000002")
    monkeypatch.undo()
    poison_teacher(monkeypatch, first=1)  # the resumed process counts its own calls: steps 3 to 6
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run, "--resume", "--nonfinite", "skip")
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["nonfinite_skipped"] == 4


def test_nan_skip_mode_counts_and_finishes_with_finite_weights(tmp_path, monkeypatch):
    poison_teacher(monkeypatch, first=2, last=4)  # generator updates at steps 2, 3 and 4 get a NaN teacher
    run = db.distill(out=str(tmp_path / "run"), nonfinite="skip", **OPTS)
    assert json.loads((run / "summary.json").read_text())["nonfinite_skipped"] == 3
    rows = read_jsonl(run / "stats.jsonl")
    assert [(r["step"], r["nonfinite/skipped"]) for r in rows] == [(2, 1), (4, 3), (6, 3)]
    last = list_checkpoints(run / "checkpoints")[-1]
    assert json.loads((last / "state.json").read_text())["nonfinite_skipped"] == 3
    for name, v in {**weights(last), **load_file(run / "generator" / "model.safetensors")}.items():
        assert torch.isfinite(v).all(), name
    assert torch.isfinite(db.sample(run, 32)).all()


@pytest.mark.parametrize("policy", ["strict", "skip"])
def test_overflowing_weights_stop_either_policy(policy):
    # a finite loss and gradient, but a step so large that the float32 weights overflow to inf: caught
    # right after the update and named, not one step later as a NaN loss of whichever network reads them
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
    guard = NonFiniteGuard(policy)
    loss = (net(torch.full((4, 2), 10.0)) ** 2).mean()  # gradient ~400 per weight: 1e38 * 400 overflows
    with pytest.raises(NonFiniteError, match="non-finite net weights after the update at step 7"):
        guard.step(torch.optim.SGD(net.parameters(), lr=1e38), loss, net, "net", 7, 0.0, Path("nowhere"))


def test_large_finite_weights_are_finite_and_one_bad_value_is_not():
    from dibregman.train.guard import _finite

    net = nn.Linear(1000, 1000)
    with torch.no_grad():
        net.weight.fill_(3e38)  # their float32 sum or norm would overflow
        net.bias.fill_(-3e38)
    assert _finite(net)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            net.weight[7, 3] = bad
        assert not _finite(net), bad


def test_non_finite_weights_in_a_run_name_the_network_and_step(tmp_path, monkeypatch):
    # however they arise (Adam's update is bounded by lr, so here a broken step writes them), weights
    # that turn non-finite stop the run at that step with the last good checkpoint, in skip mode too
    real = state_mod.build

    def build(*args, **kwargs):
        c = real(*args, **kwargs)
        opt, calls = c.optimizers["critic"], []
        step = opt.step

        def broken_step(*a, **k):
            calls.append(1)
            out = step(*a, **k)
            if len(calls) == 7:  # two critic updates per step: the first of step 4
                with torch.no_grad():
                    next(c.critic.parameters()).view(-1)[0] = float("inf")
            return out

        opt.step = broken_step
        return c

    monkeypatch.setattr(state_mod, "build", build)
    with pytest.raises(NonFiniteError) as e:
        db.distill(out=str(tmp_path / "run"), nonfinite="skip", **OPTS)
    assert "non-finite critic weights after the update at step 4" in str(e.value)
    assert str(tmp_path / "run" / "checkpoints" / "step-00000002") in str(e.value)


def test_learning_rate_beyond_float32_is_a_config_error():
    with pytest.raises(ConfigError, match=r"lr_generator.*float32"):  # torch would fail mid-step
        db.distill(out="unused", lr_generator=1e39, preset="tiny")


# --- signals, torn logs ---------------------------------------------------------------------------------

def test_sigint_saves_where_it_stopped_and_resume_is_exact(finished, tmp_path, monkeypatch, capsys):
    run, real, calls = tmp_path / "run", step_mod.fake_score_loss, []

    def ctrl_c_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # two fake-score updates per step: the first one of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_mod, "fake_score_loss", ctrl_c_in_step_3)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run)
    assert code == 128 + signal.SIGINT and "SIGINT at step 3" in err and "--resume" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list_checkpoints(run / "checkpoints")[-1].name == "step-00000003"
    monkeypatch.undo()
    assert run_cli(capsys, "distill", *FLAGS, "--out", run, "--resume")[0] == 0
    assert_same(weights(finished / "checkpoints" / "step-00000006"), weights(run / "checkpoints" / "step-00000006"))


def test_torn_log_line_from_a_kill_is_dropped_on_resume(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # killed after step 6's log row, before its checkpoint
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"loss/fake_score": 0.1, "st')  # ... and in the middle of appending the next row
    assert [r["step"] for r in read_jsonl(run / "stats.jsonl")] == [2, 4, 6]  # readers skip a torn last line
    db.distill(out=str(run), resume=True, **OPTS)
    lines = (run / "stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]  # every line parses; no duplicate rows

    def logged(r: Path) -> list[dict]:  # everything but wall-clock times
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_jsonl(r / "stats.jsonl")]

    assert logged(run) == logged(finished)


# --- safe loading -----------------------------------------------------------------------------------------

RAN: list[str] = []


def _record_execution(tag: str) -> None:
    RAN.append(tag)


class Payload:
    """Unpickling this calls ``_record_execution``: a stand-in for code hidden in someone's file."""

    def __reduce__(self):
        return _record_execution, ("pickled code ran",)


def test_loading_a_checkpoint_never_runs_pickled_code(tmp_path, capsys):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"net": _linear()}, {"x": torch.ones(1)}, {})
    torch.save({"optimizers": Payload()}, root / "step-00000001" / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt"):
        load_checkpoint(root / "step-00000001", {"net": _linear()})
    with pytest.raises(CheckpointError, match="every checkpoint"):  # and resume does not fall for it either
        load_latest(root, {"net": _linear()})
    assert RAN == []


def test_a_pickled_data_file_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "points.npy"
    np.save(path, np.array([Payload(), Payload()], dtype=object), allow_pickle=True)
    code, _, err = run_cli(capsys, "train-teacher", "--preset", "tiny", "--data", path, "--out", tmp_path / "t")
    assert_one_line_error(code, err, "points.npy", "numeric")
    assert RAN == [] and not (tmp_path / "t").exists()


# --- the bad input matrix ----------------------------------------------------------------------------------

def _teacher(folder: Path, hidden: int = 16) -> Path:
    torch.manual_seed(0)
    return save_teacher(folder, Precond(MLP(2, hidden, 1), sigma_data=0.7), {"data": "moons"})


def _files(d: Path) -> dict[str, Path]:
    """Bad files of every kind, made once per test in ``d``."""
    f = {}
    for name, text in {"typo.json": '{"lr_generater": 0.01}', "typo.toml": "stepz = 5\n",
                       "type.json": '{"steps": "many"}', "type.toml": 'hidden = [1, 2]\n',
                       "broken.json": '{"steps": 3,', "broken.toml": "steps = = 3\n", "list.json": "[1, 2]",
                       "empty.csv": "", "header_only.csv": "x,y\n", "config.yaml": "steps: 3\n"}.items():
        (d / name).write_text(text)
        f[name] = d / name
    np.save(d / "nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    np.save(d / "flat.npy", np.arange(10.0))
    f["nan.npy"], f["flat.npy"] = d / "nan.npy", d / "flat.npy"
    f["no_meta"] = _teacher(d / "no_meta")
    (f["no_meta"] / "teacher.json").unlink()
    f["corrupt"] = _teacher(d / "corrupt")
    truncate(f["corrupt"] / "model.safetensors")
    f["mismatch"] = _teacher(d / "mismatch", hidden=16)
    meta = json.loads((f["mismatch"] / "teacher.json").read_text())
    meta["arch"]["hidden"] = 24
    (f["mismatch"] / "teacher.json").write_text(json.dumps(meta))
    f["a_file"] = d / "a_file"
    f["a_file"].write_text("not a folder")
    return f


DISTILL_CASES = {  # name: (extra argv; {f} is a path from _files), what the message must say
    "unknown key (JSON)": (["--config", "{typo.json}"], ["unknown option 'lr_generater'", "did you mean lr_generator"]),
    "unknown key (TOML)": (["--config", "{typo.toml}"], ["unknown option 'stepz'", "did you mean steps"]),
    "wrong type (JSON)": (["--config", "{type.json}"], ["option 'steps'", "'many'"]),
    "wrong type (TOML)": (["--config", "{type.toml}"], ["option 'hidden'", "[1, 2]"]),
    "wrong type (flag)": (["--batch-size", "lots"], ["option 'batch_size'", "'lots'"]),
    "negative lr": (["--lr-generator", "-0.001"], ["lr_generator", "must be > 0"]),
    "beta2 = 1": (["--beta2", "1"], ["beta2", "[0, 1)"]),
    "r_clip_min >= 1": (["--r-clip-min", "1.5"], ["must contain 1"]),
    "non-finite value": (["--sigma-g", "nan"], ["sigma_g", "finite"]),
    "unknown divergence": (["--divergence", "kl"], ["unknown divergence 'kl'", "forward_kl"]),
    "unknown critic loss": (["--critic-loss", "hinge"], ["critic_loss", "unknown divergence 'hinge'"]),
    "bad power": (["--divergence", "power:x"], ["must be a number"]),
    "unknown preset": (["--preset", "huge"], ["invalid choice: 'huge'", "tiny"]),
    "unknown choice": (["--weighting", "sigma"], ["weighting", "dmd"]),
    "malformed JSON": (["--config", "{broken.json}"], ["could not parse", "broken.json"]),
    "malformed TOML": (["--config", "{broken.toml}"], ["could not parse", "broken.toml"]),
    "config is a list": (["--config", "{list.json}"], ["must hold a table of options", "list"]),
    "config not JSON/TOML": (["--config", "{config.yaml}"], [".json or .toml"]),
    "missing config": (["--config", "{missing.json}"], ["config file not found"]),
    "unknown flag": (["--learning-rate", "0.1"], ["unrecognized arguments: --learning-rate"]),
    "missing teacher folder": (["--teacher", "net:{missing_teacher}"], ["does not exist", "train-teacher"]),
    "teacher without teacher.json": (["--teacher", "net:{no_meta}"], ["has no teacher.json"]),
    "corrupt teacher weights": (["--teacher", "net:{corrupt}"], ["model.safetensors", "corrupt or truncated"]),
    "weights vs teacher.json arch": (["--teacher", "net:{mismatch}"], ["does not match this model", "[24, 2]"]),
    "unknown mixture": (["--teacher", "gmm:ring9"], ["unknown mixture 'ring9'", "ring8"]),
    "bad teacher spec": (["--teacher", "ring8"], ["cannot read teacher spec"]),
    "no CUDA": (["--device", "cuda"], ["CUDA is not available"]),
    "unknown device": (["--device", "tpu"], ["unknown device 'tpu'"]),
}
TEACHER_CASES = {
    "toy data typo": (["--data", "moon"], ["unknown toy data set 'moon'", "moons"]),
    "missing data file": (["--data", "{missing.npy}"], ["does not exist"]),
    "empty .csv": (["--data", "{empty.csv}"], ["empty.csv", "0 rows"]),
    "header-only .csv": (["--data", "{header_only.csv}"], ["header_only.csv", "0 rows"]),
    "NaN in .npy": (["--data", "{nan.npy}"], ["nan.npy", "non-finite", "row 1"]),
    "1-D .npy": (["--data", "{flat.npy}"], ["flat.npy", "must be 2-D"]),
    "bad lr": (["--lr", "0"], ["option 'lr' must be > 0"]),
    "distill-only key": (["--config", "{typo.json}"], ["unknown option 'lr_generater'", "TeacherConfig"]),
}


def _argv(extra: list[str], files: dict[str, Path], d: Path) -> list[str]:
    paths = {**files, "missing.json": d / "missing.json", "missing.npy": d / "missing.npy",
             "missing_teacher": d / "missing_teacher"}
    for key, path in paths.items():
        extra = [a.replace("{" + key + "}", str(path)) for a in extra]
    return extra


@pytest.mark.parametrize("case", list(DISTILL_CASES))
def test_bad_distill_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, case):
    extra, needles = DISTILL_CASES[case]
    files = _files(tmp_path)
    monkeypatch.setattr(state_mod, "fitted_start", _tripwire)  # fails the test if training work begins
    monkeypatch.setattr(state_mod, "build", _tripwire)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "distill", "--preset", "tiny", "--out", tmp_path / "run", *_argv(extra, files,
                                                                                                   tmp_path))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_bad_teacher_training_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, case):
    extra, needles = TEACHER_CASES[case]
    files = _files(tmp_path)
    monkeypatch.setattr(teacher_mod, "EMA", _tripwire)  # built just before the first step
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "train-teacher", "--preset", "tiny", "--out", tmp_path / "run",
                           *_argv(extra, files, tmp_path))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists() and snapshot(tmp_path) == before


def test_an_existing_run_is_never_overwritten_or_resumed_differently(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run)
    assert_one_line_error(code, err, "already holds a run", "--resume", "another --out")
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run, "--resume", "--divergence", "reverse_kl",
                           "--lr-critic", "0.01")
    assert_one_line_error(code, err, "cannot resume", "divergence: 'hellinger' -> 'reverse_kl'",
                          "lr_critic: 0.001 -> 0.01", "another --out")
    assert snapshot(run) == before


@pytest.mark.parametrize("command, damage, needles", [
    ("sample", None, ["holds no generator.json", "dibregman distill"]),
    ("eval", "{not json", ["generator.json is not valid JSON"]),
    ("eval", "[1, 2]", ["not a dibregman-generator file"]),
    ("sample", '{"format": "dibregman-generator", "version": 1}', ["generator.json is damaged", "'arch'"]),
    ("sample", "weights", ["model.safetensors has", "truncated", "--resume"]),  # its size is in manifest.json
])
def test_sample_and_eval_on_a_bad_run_folder(finished, tmp_path, capsys, command, damage, needles):
    run = copy_run(finished, tmp_path / "run")
    if damage is None:
        run = tmp_path / "run" / "checkpoints"  # a folder, but not a run
    elif damage == "weights":
        truncate(run / "generator" / "model.safetensors")
    else:  # a generator.json of its own (no checksums), so that its entries are what is checked
        (run / "generator" / "generator.json").write_text(damage)
        (run / "generator" / "manifest.json").unlink()
    before = snapshot(tmp_path)
    extra = ["--out", tmp_path / "s.npz"] if command == "sample" else ["--num", "64"]
    code, _, err = run_cli(capsys, command, run, *extra)
    assert_one_line_error(code, err, *needles)
    assert snapshot(tmp_path) == before  # no samples file, nothing changed


def test_sample_bad_output_suffix(finished, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", finished, "--num", "4", "--out", tmp_path / "s.txt")
    assert_one_line_error(code, err, "must end in .npz or .png")
    assert not (tmp_path / "s.txt").exists()
