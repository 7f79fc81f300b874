"""Toy distributions and point-cloud loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dibregman.data.toy2d import TOY_SETS, load_points


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_required_sets_exist():
    assert {"moons", "swiss_roll", "checkerboard", "spirals", "grid25", "ring8"} <= TOY_SETS.keys()


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_toy_set_shape_scale_determinism(name):
    x = TOY_SETS[name](20000, gen(0))
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, TOY_SETS[name](20000, gen(0)))  # the generator alone decides the points
    assert not torch.equal(x, TOY_SETS[name](20000, gen(1)))
    rms = x.pow(2).mean().sqrt().item()
    assert 0.95 < rms < 1.05, rms  # each set is divided by its population RMS
    assert x.mean(0).abs().max() < 0.05  # and centred


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_toy_sets_leave_global_rng_alone(name):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    TOY_SETS[name](100, gen(0))
    assert torch.equal(before, torch.get_rng_state())


def test_load_points_toy_name():
    assert torch.equal(load_points("ring8", 300, gen(3)), TOY_SETS["ring8"](300, gen(3)))


def test_load_points_npy(tmp_path):
    arr = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "p.npy", arr)
    x = load_points(str(tmp_path / "p.npy"), 10, gen())  # a file gives all its rows, whatever n
    assert x.shape == (50, 3) and x.dtype == torch.float32
    assert np.allclose(x.numpy(), arr, atol=1e-6)
    np.save(tmp_path / "i.npy", np.arange(8).reshape(4, 2))
    assert load_points(str(tmp_path / "i.npy"), 0, gen()).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("header", [False, True])
def test_load_points_csv(tmp_path, header):
    text = ("x,y,z\n" if header else "") + "1,2,3\n4.5,-5,6e-1\n\n7,8,9\n"
    (tmp_path / "p.csv").write_text(text)
    x = load_points(str(tmp_path / "p.csv"), 0, gen())
    assert np.allclose(x.numpy(), [[1, 2, 3], [4.5, -5, 0.6], [7, 8, 9]])


def test_load_points_csv_one_column(tmp_path):
    (tmp_path / "p.csv").write_text("v\n1\n2\n3\n")
    assert load_points(str(tmp_path / "p.csv"), 0, gen()).shape == (3, 1)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown toy data set 'mooons'.*moons.*swiss_roll.*\.npy or \.csv"):
        load_points("mooons", 10, gen())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        load_points(str(tmp_path / "nope.npy"), 10, gen())


def test_wrong_extension(tmp_path):
    (tmp_path / "p.txt").write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"unsupported extension '\.txt'.*save the points as \.npy"):
        load_points(str(tmp_path / "p.txt"), 10, gen())


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_not_2d(tmp_path, shape):
    np.save(tmp_path / "p.npy", np.zeros(shape))
    with pytest.raises(ValueError, match=r"must be 2-D \[N points, d dimensions\]"):
        load_points(str(tmp_path / "p.npy"), 10, gen())


def test_non_finite(tmp_path):
    arr = np.zeros((4, 2))
    arr[2, 1] = np.nan
    np.save(tmp_path / "p.npy", arr)
    with pytest.raises(ValueError, match=r"non-finite values.*first at row 2.*remove or fix"):
        load_points(str(tmp_path / "p.npy"), 10, gen())
    (tmp_path / "p.csv").write_text("a,b\n1,2\n3,inf\n1e39,0\n")  # 1e39 overflows float32
    with pytest.raises(ValueError, match=r"non-finite values.*in 2 rows, first at row 1"):
        load_points(str(tmp_path / "p.csv"), 10, gen())


def test_too_few_rows(tmp_path):
    (tmp_path / "one.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="need at least 2 rows"):
        load_points(str(tmp_path / "one.csv"), 10, gen())
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="need at least 2 rows"):
        load_points(str(tmp_path / "empty.csv"), 10, gen())
    with pytest.raises(ValueError, match="at least 2 points"):
        load_points("moons", 1, gen())


def test_ragged_or_text_csv(tmp_path):
    (tmp_path / "p.csv").write_text("1,2\n3\n")
    with pytest.raises(ValueError, match=r"cannot parse .* as numeric CSV"):
        load_points(str(tmp_path / "p.csv"), 10, gen())


def test_npy_never_unpickles(tmp_path):
    np.save(tmp_path / "p.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"cannot read .* as a numeric \.npy array"):
        load_points(str(tmp_path / "p.npy"), 10, gen())
