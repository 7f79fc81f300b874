"""Issue 11, defects 7, 10-12, 17, 18: bad data, divergences and prompts are one line before any work."""

from __future__ import annotations

import numpy as np
import pytest
from test_reliability import _tripwire, assert_one_line_error, run_cli, snapshot

import dibregman.train.state as state_mod
import dibregman.train.teacher as teacher_mod
from dibregman.text.prompts import read_prompts
from dibregman.train.config import divergence_from_spec

pytestmark = pytest.mark.usefixtures("one_thread")

H_MODULE = '''
import torch


def concave_stretch(r):  # convex outside [1.5, 2.5]; the old 7-point check never looked there
    bump = torch.where((r > 1.5) & (r < 2.5), (r - 1.5) ** 3 * (2.5 - r) ** 3 * 50, torch.zeros_like(r))
    return r ** 3 / 6 - bump

def linear(r):
    return 2 * r + 1

def overflow(r):
    return torch.exp(10 * r)
'''

DIVERGENCES = {  # spec: what the message says (for --divergence and --critic-loss alike)
    "power:nan": "must be a finite number",
    "power:inf": "must be a finite number",
    "power:40": "not finite in float32 at r =",
    "py:hmods:concave_stretch": "not convex over the ratio clip [0.1, 20]",
    "py:hmods:linear": "h''(r) = 0",
    "py:hmods:overflow": "not finite in float32",
    "py:os:system": "failed on a tensor of ratios (TypeError",
    "py:builtins:print": "failed on a tensor of ratios (AttributeError",
}


@pytest.fixture
def hmods(tmp_path, monkeypatch):
    (tmp_path / "hmods.py").write_text(H_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("option", ["--divergence", "--critic-loss"])
@pytest.mark.parametrize("spec", list(DIVERGENCES))
def test_divergences_that_would_stop_mid_run_are_refused_up_front(hmods, capsys, monkeypatch, option, spec):
    monkeypatch.setattr(state_mod, "fitted_start", _tripwire)
    before = snapshot(hmods)
    code, _, err = run_cli(capsys, "distill", "--preset", "tiny", "--out", hmods / "run", option, spec)
    assert_one_line_error(code, err, spec, DIVERGENCES[spec])
    assert not (hmods / "run").exists() and snapshot(hmods) == before


def test_the_members_and_a_convex_h_still_pass(hmods):
    for spec in ("reverse_kl", "forward_kl", "pearson", "logistic", "hellinger", "jeffreys", "softened_rkl",
                 "power:0.5", "power:2", "power:-0.5"):
        divergence_from_spec(spec)
    (hmods / "good.py").write_text("def h(r):\n    return r * r.log()\n")
    divergence_from_spec("py:good:h")


def _bad_data(d):
    np.save(d / "constant.npy", np.ones((50, 2)))
    np.save(d / "huge.npy", np.random.default_rng(0).normal(size=(50, 2)) * 1e30)
    np.save(d / "claims.npy", np.zeros((4, 2)))
    raw = (d / "claims.npy").read_bytes().replace(b"(4, 2)", b"(1000000000000, 2)", 1)
    (d / "claims.npy").write_bytes(raw)
    (d / "latin1.csv").write_bytes("x,y\n1,2\n3,4\n\xe9,1\n".encode("latin-1"))
    return d


TEACHER_DATA = {
    "constant points": ("{d}/constant.npy", ["constant.npy", "identical points", "standard deviation 0"]),
    "data around 1e30": ("{d}/huge.npy", ["huge.npy", "rescale"]),
    "npy header claiming (1e12, 2)": ("{d}/claims.npy", ["claims.npy", "(1000000000000, 2)", "truncated"]),
    "non-UTF-8 CSV": ("{d}/latin1.csv", ["latin1.csv", "not UTF-8"]),
}


@pytest.mark.parametrize("case", list(TEACHER_DATA))
def test_bad_teacher_data_is_one_line_before_the_run_folder(tmp_path, capsys, monkeypatch, case):
    spec, needles = TEACHER_DATA[case]
    d = _bad_data(tmp_path)
    monkeypatch.setattr(teacher_mod, "EMA", _tripwire)
    code, _, err = run_cli(capsys, "train-teacher", "--preset", "tiny", "--data", spec.format(d=d),
                           "--out", tmp_path / "run")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def _folder(d, size, n=2, value=None):
    from PIL import Image

    for i in range(n):
        pixels = np.full((size, size), value, np.uint8) if value is not None else \
            np.random.default_rng(i).integers(0, 255, (size, size), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.png")
    return d


@pytest.mark.parametrize("case, make, needles", [
    ("constant images", lambda d: _folder(d, 8, value=7), ["has standard deviation", "data that varies"]),
    ("5x5 for a U-Net that halves twice", lambda d: _folder(d, 5), ["5x5 images", "multiple of 4", "--channel-mult"]),
    ("1x1", lambda d: _folder(d, 1), ["1x1 images", "multiple of 4"]),
])
def test_bad_images_for_a_teacher_are_refused_before_the_run_folder(tmp_path, capsys, monkeypatch, case, make,
                                                                    needles):
    (tmp_path / "imgs").mkdir()
    folder = make(tmp_path / "imgs")
    monkeypatch.setattr(teacher_mod, "EMA", _tripwire)
    code, _, err = run_cli(capsys, "train-teacher", "--preset", "tiny-images", "--channel-mult", "1,2,2",
                           "--data", f"folder:{folder}", "--out", tmp_path / "run")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_a_png_claiming_20000x20000_is_refused_unread(tmp_path, capsys):
    import struct
    import zlib

    (tmp_path / "imgs").mkdir()
    _folder(tmp_path / "imgs", 8, n=1)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    (tmp_path / "imgs" / "bomb.png").write_bytes(png + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    code, _, err = run_cli(capsys, "train-teacher", "--preset", "tiny-images", "--data", f"folder:{tmp_path / 'imgs'}",
                           "--out", tmp_path / "run")
    assert_one_line_error(code, err, "bomb.png", "resize")
    assert not (tmp_path / "run").exists()


def test_a_prompt_file_with_a_byte_order_mark_reads(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeff0\ta photo of a shirt\n1\tsomeone's bag\n".encode())
    prompts = read_prompts(f, ("shirt", "bag"))
    assert prompts.prompts == ["a photo of a shirt", "someone's bag"] and prompts.labels.tolist() == [0, 1]


def test_an_empty_prompt_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", tmp_path, "--prompt", "", "--out", tmp_path / "s.npz")
    assert_one_line_error(code, err, "--prompt is empty")





@pytest.mark.parametrize("name, content, flags, needles", [
    ("float.toml", "steps = 2.0\n", [], ["option 'steps' in", "must be an integer", "2.0"]),
    ("string.json", '{"steps": "10"}', [], ["option 'steps' in", "must be an integer", "'10'"]),
    ("overridden.json", '{"batch_size": [1]}', ["--batch-size", "8"], ["option 'batch_size'", "[1]"]),
    ("latin1.json", None, [], ["latin1.json", "not UTF-8"]),
])
def test_config_files_hold_typed_values_and_utf8(tmp_path, capsys, monkeypatch, name, content, flags, needles):
    f = tmp_path / name
    if content is None:
        f.write_bytes('{"out": "caf\xe9"}'.encode("latin-1"))
    else:
        f.write_text(content)
    monkeypatch.setattr(state_mod, "fitted_start", _tripwire)
    code, _, err = run_cli(capsys, "distill", "--preset", "tiny", "--config", f, "--out", tmp_path / "run", *flags)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_dry_run_reads_a_mixture_spec_file_as_the_run_would(tmp_path, capsys):
    """Defect 22: an unknown key in a spec file passed --dry-run and failed the run."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"weights": [1, 1], "means": [[0, 0], [1, 1]], "std": 0.1, "colour": "red"}')
    code, _, err = run_cli(capsys, "distill", "--preset", "tiny", "--teacher", f"gmm:{spec}", "--dry-run")
    assert_one_line_error(code, err, "spec.json", "unknown mixture spec keys ['colour']")
    spec.write_text('{"weights": [1, 1], "means": [[0, 0], [1, 1]], "std": 0.1}')
    code, out, _ = run_cli(capsys, "distill", "--preset", "tiny", "--teacher", f"gmm:{spec}", "--dry-run")
    assert code == 0 and '"teacher"' in out
