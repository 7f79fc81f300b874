"""Issue 11, defects 2-5, 8, 14, 20: checksummed checkpoints and artifacts; damage of any kind falls back
to the previous checkpoint or is one line naming the file (docs/reliability.md, "Damaged checkpoints")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_reliability import FLAGS, _linear, assert_one_line_error, assert_same, copy_run, finished, run_cli, weights

import dibregman as db
from dibregman.artifacts import load_generator
from dibregman.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointMismatch,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    write_manifest,
)
from dibregman.train.config import ConfigError
from dibregman.train.guard import NonFiniteError, NonFiniteGuard

pytestmark = pytest.mark.usefixtures("one_thread")
_ = finished  # the module-scoped reference run of test_reliability (checkpoints at steps 2, 4 and 6)

OPTS = {"preset": "tiny", "progress": False, "checkpoint_every": 2, "eval_every": 2, "keep_checkpoints": 3}


def flip(path: Path, offset_from_end: int = 5, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 1 << bit
    path.write_bytes(bytes(data))


def resign(folder: Path) -> None:
    """Rewrite the manifest over the folder's current files: damage that checksums cannot see (a folder of an
    older version, or a consistent edit), so that what lies behind them is tested too."""
    names = [n for n in json.loads((folder / MANIFEST).read_text())["files"] if (folder / n).exists()]
    write_manifest(folder, names)


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _first_weight_offset(path: Path, key: str) -> int:
    """Byte offset of tensor ``key``'s first value in a safetensors file."""
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0]


# --- unit: every kind of damage is CheckpointError, and resume falls back past it ---------------------------

def _three(root: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"net": _linear(step)}, {"x": torch.ones(step)}, {"tag": step}, keep=5)


def _exponent_flip(c: Path) -> None:  # weight 1e37-ish, finite: a NaN check cannot see it (defect 3)
    f = c / "net.safetensors"
    data = bytearray(f.read_bytes())
    data[_first_weight_offset(f, "weight") + 3] ^= 0x40  # the top exponent bit of a little-endian float32
    f.write_bytes(bytes(data))


def _fifo(c: Path) -> None:  # defect 14: opening it would block for ever
    (c / "state.pt").unlink()
    os.mkfifo(c / "state.pt")


UNIT_DAMAGE = {
    "bit in tensor data": lambda c: flip(c / "net.safetensors"),
    "bit in state.pt": lambda c: flip(c / "state.pt", 200),
    "exponent bit (finite 1e37)": _exponent_flip,
    "bit in a tensor name": lambda c: flip(c / "net.safetensors", len((c / "net.safetensors").read_bytes()) - 12),
    "digit in state.json": lambda c: (c / "state.json").write_text(
        (c / "state.json").read_text().replace('"tag": 3', '"tag": 4')),
    "manifest deleted": lambda c: (c / MANIFEST).unlink(),
    "FIFO for state.pt": _fifo,
    "step not its folder's (resigned)": lambda c: (_edit_json(c / "state.json", lambda d: d.update(step=30)),
                                                   resign(c)),
}


@pytest.mark.parametrize("damage", list(UNIT_DAMAGE))
def test_damage_of_any_kind_falls_back_to_the_previous_checkpoint(tmp_path, capsys, damage):
    root = tmp_path / "ckpt"
    _three(root)
    UNIT_DAMAGE[damage](root / "step-00000003")
    with pytest.raises(CheckpointError):
        load_checkpoint(root / "step-00000003", {"net": _linear()})
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("loading hung (a FIFO was opened)"))
    signal.alarm(10)
    try:
        net = _linear(9)
        path, state, meta = load_latest(root, {"net": net})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert path.name == "step-00000002" and meta == {"step": 2, "tag": 2} and torch.equal(state["x"], torch.ones(2))
    assert torch.equal(net.weight, _linear(2).weight)
    err = capsys.readouterr().err
    assert "step-00000003 is damaged" in err and (root / "damaged-step-00000003").is_dir()


def test_a_changed_config_in_a_folder_without_checksums_falls_back_when_an_older_one_matches(tmp_path, capsys):
    """Defect 4 without checksums (a checkpoint of an older version): the newest one failing the config check
    or the tensor names while an older one passes is damage; when none passes it is another config."""
    root = tmp_path / "ckpt"
    _three(root)
    for c in list_checkpoints(root):  # as written before manifests
        (c / MANIFEST).unlink()
        _edit_json(c / "state.json", lambda d: d.pop("integrity"))
    _edit_json(root / "step-00000003" / "state.json", lambda d: d.update(tag=33))

    def same_tag(meta: dict) -> None:
        if meta["tag"] not in (1, 2):
            raise ConfigError(f"tag {meta['tag']} differs")

    path, _, _ = load_latest(root, {"net": _linear()}, check=same_tag)
    assert path.name == "step-00000002" and "while an older checkpoint matches" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tag 20 differs"):  # none matches: the newest named, nothing moved
        load_latest(root, {"net": _linear()}, check=lambda m: same_tag({"tag": m["tag"] * 10}))
    with pytest.raises(CheckpointMismatch):
        load_latest(root, {"net": _linear(n=4)})
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002"]


def test_restore_errors_are_damage_not_a_traceback(tmp_path, capsys):
    root = tmp_path / "ckpt"
    _three(root)

    def restore(state: dict, meta: dict) -> None:
        state["optimizers"]["net"]

    with pytest.raises(CheckpointError, match=r"every checkpoint .* lacks or mistypes an entry \(KeyError"):
        load_latest(root, {"net": _linear()}, restore=restore)
    assert len(list_checkpoints(root)) == 3  # nothing moved


def test_non_finite_first_update_after_a_resume_says_the_checkpoint_may_be_damaged(tmp_path):
    net = _linear()
    guard = NonFiniteGuard("strict")
    guard.resumed_from = tmp_path / "checkpoints" / "step-00000004"
    with pytest.raises(NonFiniteError, match=r"first update after resuming from .*step-00000004, which may be damaged"):
        guard.step(torch.optim.SGD(net.parameters(), 0.1), torch.tensor(float("nan"), requires_grad=True) * 1,
                   net, "generator", 5, 0.0, tmp_path)
    with pytest.raises(NonFiniteError, match="no checkpoint was written yet"):  # a later step: the usual advice
        guard.step(torch.optim.SGD(net.parameters(), 0.1), torch.tensor(float("nan"), requires_grad=True) * 1,
                   net, "generator", 7, 0.0, tmp_path)


# --- end to end: distill, train-teacher, sample ------------------------------------------------------------

def test_a_flipped_bit_in_the_newest_checkpoint_falls_back_and_resumes_bit_identically(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    flip(run / "checkpoints" / "step-00000006" / "ema.safetensors")
    capsys.readouterr()
    db.distill(out=str(run), resume=True, **OPTS)
    err = capsys.readouterr().err
    assert "ema.safetensors does not match its SHA-256" in err and "resuming from" in err and "step-00000004" in err
    assert_same(weights(finished / "checkpoints" / "step-00000006"), weights(run / "checkpoints" / "step-00000006"))
    gen = "generator/model.safetensors"
    assert_same(load_file(finished / gen), load_file(run / gen))


def test_incomplete_metadata_of_every_checkpoint_is_one_line(finished, tmp_path, capsys):
    """Defect 5 (checksums re-signed, as in a folder of an older version): no KeyError traceback."""
    run = copy_run(finished, tmp_path / "run")
    c2, c4, c6 = list_checkpoints(run / "checkpoints")
    _edit_json(c6 / "state.json", lambda d: d.pop("ema_updates"))
    _edit_json(c4 / "state.json", lambda d: d.update(nonfinite_skipped="three"))
    torch.save({}, c2 / "state.pt")  # an empty dict: no optimizers, no RNG
    for c in (c2, c4, c6):
        resign(c)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run, "--resume")
    assert_one_line_error(code, err, "every checkpoint", "lacks or mistypes an entry", "'ema_updates'")


def test_a_digit_changed_in_the_newest_config_falls_back_in_a_run(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    c6 = run / "checkpoints" / "step-00000006"
    _edit_json(c6 / "state.json", lambda d: d["config"].update(lr_critic=0.002))
    capsys.readouterr()
    db.distill(out=str(run), resume=True, **OPTS)  # not "cannot resume ... with a different config"
    assert "step-00000006 is damaged" in capsys.readouterr().err
    assert_same(weights(finished / "checkpoints" / "step-00000006"), weights(c6))


def test_a_teacher_folder_with_a_flipped_bit_is_refused_before_the_run_folder(tmp_path, capsys):
    teacher = db.train_teacher(preset="tiny", progress=False, out=str(tmp_path / "t"))
    assert (teacher / MANIFEST).is_file()
    flip(teacher / "model.safetensors", 9)
    code, _, err = run_cli(capsys, "distill", *FLAGS, "--teacher", f"net:{teacher}", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "model.safetensors does not match its SHA-256", "re-create the teacher")
    assert not (tmp_path / "run").exists()


GENERATOR_DAMAGE = {  # generator.json edited and re-signed: each number is checked on its own
    "sigma_g NaN": (lambda d: d.update(sigma_g=float("nan")), ["sigma_g must be a finite number > 0"]),
    "sigma_g negative": (lambda d: d.update(sigma_g=-1), ["sigma_g must be a finite number > 0"]),
    "sigma_data a string": (lambda d: d.update(sigma_data="1"), ["sigma_data must be a finite number > 0"]),
    "huge shape": (lambda d: d.update(shape=[10**6, 10**6]), ["shape must be 1 to 3 positive integers"]),
    "shape vs arch": (lambda d: d.update(shape=[3]), ["shape [3] does not match its arch"]),
    "huge hidden": (lambda d: d["arch"].update(hidden=10**6), ["describes a network of", "values but"]),
    "hidden past the bound": (lambda d: d["arch"].update(hidden=10**7), ["arch.hidden must be between"]),
    "num_classes -1": (lambda d: d.update(num_classes=-1), ["num_classes must be an integer >= 0"]),
}


@pytest.mark.parametrize("damage", list(GENERATOR_DAMAGE))
def test_generator_json_numbers_are_validated(finished, tmp_path, capsys, damage):
    edit, needles = GENERATOR_DAMAGE[damage]
    run = copy_run(finished, tmp_path / "run")
    _edit_json(run / "generator" / "generator.json", edit)
    code, _, err = run_cli(capsys, "sample", run, "--num", "4", "--out", tmp_path / "s.npz")
    assert_one_line_error(code, err, "generator.json", "generator folder is damaged")  # caught by its checksum
    resign(run / "generator")
    code, _, err = run_cli(capsys, "sample", run, "--num", "4", "--out", tmp_path / "s.npz")
    assert_one_line_error(code, err, "generator.json", *needles, "--resume")
    assert not (tmp_path / "s.npz").exists()


def test_sample_refuses_a_generator_with_a_flipped_bit(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    flip(run / "generator" / "model.safetensors", 7, bit=6)
    code, _, err = run_cli(capsys, "sample", run, "--num", "4", "--out", tmp_path / "s.npz")
    assert_one_line_error(code, err, "model.safetensors does not match its SHA-256", "--resume")
    assert not (tmp_path / "s.npz").exists()
    load_generator(finished)  # the undamaged one loads


# --- property-based: any single-byte change of any checkpoint file is caught ------------------------------

def _byte_flips(max_examples: int):
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "ckpt"
    save_checkpoint(root, 1, {"net": _linear(1)}, {"x": torch.ones(3)}, {"tag": "x"})
    return root / "step-00000001"


def _fuzz(saved: Path, tmp: Path, name: str, position: float, xor: int) -> None:
    folder = tmp / "c"
    shutil.rmtree(folder, ignore_errors=True)  # hypothesis reuses the test's tmp_path
    shutil.copytree(saved, folder)
    f = folder / name
    data = bytearray(f.read_bytes())
    data[min(int(position * len(data)), len(data) - 1)] ^= xor
    f.write_bytes(bytes(data))
    try:
        _, meta = load_checkpoint(folder, {"net": _linear()})
    except CheckpointError:
        return
    pytest.fail(f"a changed byte in {name} was accepted ({meta})")


FILES = st.sampled_from(["net.safetensors", "state.pt", "state.json", MANIFEST])


@_byte_flips(25)
@given(name=FILES, position=st.floats(0, 1), xor=st.integers(1, 255))
def test_any_changed_byte_is_damage(saved, tmp_path, name, position, xor):
    _fuzz(saved, tmp_path, name, position, xor)


@pytest.mark.slow
@_byte_flips(2000)
@given(name=FILES, position=st.floats(0, 1), xor=st.integers(1, 255))
def test_any_changed_byte_is_damage_many(saved, tmp_path, name, position, xor):
    _fuzz(saved, tmp_path, name, position, xor)





def test_a_classifier_folder_with_a_flipped_bit_is_refused(tmp_path):
    from test_classifier import _saved

    from dibregman.train.classifier import load_classifier

    _, folder = _saved(tmp_path)
    load_classifier(folder)
    flip(folder / "model.safetensors", 9)
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its SHA-256.*re-create"):
        load_classifier(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"manifest\.json is missing"):
        load_classifier(folder)


def test_eval_refuses_non_finite_samples_rather_than_scoring_them(finished, tmp_path, capsys):
    """Defect 8: finite weights (so they load) whose samples overflow; the metrics would read as perfect."""
    from dibregman.artifacts import save_generator

    run = copy_run(finished, tmp_path / "run")
    gen, info = load_generator(run)
    with torch.no_grad():
        for p in gen.parameters():
            p.mul_(1e30)
    save_generator(run / "generator", gen, {k: v for k, v in info.items()
                                            if k not in ("format", "version", "arch", "sigma_data", "sigma_g")})
    code, _, err = run_cli(capsys, "eval", run, "--num", "64")
    assert_one_line_error(code, err, "samples of", "hold NaN or inf", "--resume")


# --- property-based: any value in any entry of generator.json loads or is one clear error ---------------------

@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory) -> Path:
    from dibregman.artifacts import save_generator
    from dibregman.generator import OneStepGenerator
    from dibregman.nets.mlp import MLP
    from dibregman.precond import Precond

    torch.manual_seed(0)
    gen = OneStepGenerator(Precond(MLP(2, 16, 1), 0.5), 2.5)
    return save_generator(tmp_path_factory.mktemp("gen") / "generator", gen,
                          {"shape": [2], "teacher": "gmm:ring8", "divergence": "hellinger", "num_classes": 0})


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=6)
GEN_KEYS = st.sampled_from(["sigma_g", "sigma_data", "shape", "num_classes", "arch", "arch.dim", "arch.hidden",
                            "arch.depth", "arch.kind", "format", "version"])


def _edited_copy(generator_folder: Path, tmp: Path, key: str, value) -> Path:
    """A copy of the generator with one entry of generator.json (``arch.<name>`` inside arch) set to ``value``,
    its checksums made consistent: the entries themselves are what is checked."""
    folder = tmp / "g"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(generator_folder, folder)

    def edit(doc: dict) -> None:
        if key.startswith("arch."):
            doc["arch"][key[5:]] = value
        else:
            doc[key] = value

    _edit_json(folder / "generator.json", edit)
    resign(folder)
    return folder


def _gen_fuzz(generator_folder: Path, tmp: Path, key: str, value) -> None:
    folder = _edited_copy(generator_folder, tmp, key, value)
    try:
        gen, info = load_generator(folder)
    except (CheckpointError, ValueError) as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    with torch.no_grad():  # it loaded: then it must be a working generator
        x = gen(torch.randn(4, *info["shape"]), None)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("key, value, named", [
    ("arch.depth", 10**7, "arch.depth must be at most 256"),  # ten million blocks: hours and gigabytes to build
    ("arch.hidden", 2**40, "arch.hidden must be between"),
    ("arch", {"dim": 2, "hidden": 16, "depth": 1, "emb_dim": 10**9}, "arch.emb_dim must be between"),
])
def test_an_arch_too_large_to_build_is_refused_before_building(generator_folder, tmp_path, key, value, named):
    with pytest.raises(CheckpointError, match=named):
        load_generator(_edited_copy(generator_folder, tmp_path, key, value))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=GEN_KEYS, value=JSON_VALUES)
@example(key="arch.depth", value=2**40)
@example(key="arch.depth", value=123456789)
def test_any_generator_json_entry_loads_or_is_one_clear_error(generator_folder, tmp_path, key, value):
    _gen_fuzz(generator_folder, tmp_path, key, value)


@pytest.mark.slow
# derandomized, so that a run is the same everywhere. A random draw once grew this process past 7 GB and
# another timed out in CI: an arch depth of 10**7, which built ten million modules (now refused, see above)
@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=GEN_KEYS, value=JSON_VALUES)
def test_any_generator_json_entry_loads_or_is_one_clear_error_many(generator_folder, tmp_path, key, value):
    _gen_fuzz(generator_folder, tmp_path, key, value)
