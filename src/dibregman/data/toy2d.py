"""Two-dimensional toy distributions, and loading point clouds of any dimension from files.

Every sampler takes ``(n, generator)`` and draws all its randomness from that ``torch.Generator``, so
a seed fixes the data set. Each set is centred and divided by a fixed constant (its population RMS,
analytic or measured once on 8M points) so that ``sqrt(mean(x**2)) ~= 1``: a fixed constant rather
than the sample's own std, so the law does not depend on ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

Tensor = torch.Tensor


def _normal(n: int, g: torch.Generator) -> Tensor:
    return torch.randn(n, 2, generator=g)


def moons(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved half circles (radius 1, noise std 0.05), centred; RMS sqrt(0.4996) analytic."""
    t = math.pi * torch.rand(n, generator=g)
    lower = torch.rand(n, generator=g) < 0.5
    x = torch.where(lower, 1 - t.cos(), t.cos()) - 0.5
    y = torch.where(lower, 0.5 - t.sin(), t.sin()) - 0.25
    return (torch.stack([x, y], 1) + 0.05 * _normal(n, g)) / 0.70682


def swiss_roll(n: int, g: torch.Generator) -> Tensor:
    """``t (cos t, sin t)``, t ~ U[1.5 pi, 4.5 pi], noise std 0.5, centred (mean (2, 2/(3 pi)) analytic);
    RMS 6.806 measured."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    p = torch.stack([t * t.cos() - 2, t * t.sin() - 2 / (3 * math.pi)], 1)
    return (p + 0.5 * _normal(n, g)) / 6.806


def spirals(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved arms ``+-t (cos t, sin t)``, t = 3 pi sqrt(u) (uniform along the area), noise
    std 0.3; RMS sqrt(9 pi^2 / 4 + 0.09) = 4.722 analytic."""
    t = 3 * math.pi * torch.rand(n, generator=g).sqrt()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).unsqueeze(1)
    p = sign * torch.stack([t * t.cos(), t * t.sin()], 1)
    return (p + 0.3 * _normal(n, g)) / 4.7220


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on 8 of the 16 unit squares of [-2, 2]^2 (alternating); both marginals are U[-2, 2], so
    dividing by 2/sqrt(3) gives unit std exactly."""
    x = 4 * torch.rand(n, generator=g) - 2
    row = 2 * torch.randint(0, 2, (n,), generator=g) - 2  # -2 or 0: lower-left corner of a 2-row band
    y = torch.rand(n, generator=g) + row + (x.floor() % 2)
    return torch.stack([x, y], 1) / (2 / math.sqrt(3))


def grid25(n: int, g: torch.Generator) -> Tensor:
    """5 x 5 equal Gaussians at spacing c, std 0.1 c, with 2 c^2 + 0.01 c^2 = 1: unit std exactly."""
    c = 1 / math.sqrt(2.01)
    k = torch.randint(0, 25, (n,), generator=g)
    centres = torch.stack([k // 5, k % 5], 1).float() - 2
    return c * centres + 0.1 * c * _normal(n, g)


def ring8(n: int, g: torch.Generator) -> Tensor:
    """8 equal Gaussians (std 0.1) on a circle of radius R, R^2 / 2 + 0.01 = 1: unit std exactly."""
    radius = math.sqrt(2 * (1 - 0.01))
    angle = 2 * math.pi / 8 * torch.randint(0, 8, (n,), generator=g).float()
    return radius * torch.stack([angle.cos(), angle.sin()], 1) + 0.1 * _normal(n, g)


TOY_SETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "moons": moons,
    "swiss_roll": swiss_roll,
    "checkerboard": checkerboard,
    "spirals": spirals,
    "grid25": grid25,
    "ring8": ring8,
}

_EXTENSIONS = (".npy", ".csv")


def load_points(spec: str, n: int, generator: torch.Generator) -> Tensor:
    """``[N, d]`` float32 points: ``n`` draws from a toy set named ``spec``, or every row of a ``.npy``
    (2-D numeric array) or ``.csv`` (comma separated, optional header row) file of any dimension ``d``.
    """
    if spec in TOY_SETS:
        if n < 2:
            raise ValueError(f"need at least 2 points from toy set {spec!r}; got n={n}")
        return TOY_SETS[spec](n, generator).float()
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        if suffix or path.exists():
            raise ValueError(f"data file {spec!r} has an unsupported extension {suffix or '(none)'!r}; "
                             "save the points as .npy (numpy.save of an [N, d] array) or .csv")
        raise ValueError(f"unknown toy data set {spec!r}; choose one of {', '.join(TOY_SETS)}, "
                         "or give the path of a .npy or .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; check the path")
    arr = _read_npy(path) if suffix == ".npy" else _read_csv(path)
    return _check(arr, path)


MAX_ABS = 1e6  # data beyond this scale is refused: EDM's noise levels span 0.002..80 around unit-scale data


def _npy_header_fits(path: Path) -> None:
    """The shape an ``.npy`` header claims must fit in the file: a header claiming (1e12, 2) would make
    numpy allocate 16 TB before noticing that the bytes are not there."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, TypeError):
        return  # not a plain .npy: np.load names the problem
    need = math.prod(shape) * dtype.itemsize
    have = path.stat().st_size - offset
    if dtype.hasobject:
        return  # refused unread by np.load(allow_pickle=False)
    if need > have:
        raise ValueError(f"{str(path)!r} claims an array of shape {tuple(shape)} ({need} bytes) but holds {have} "
                         "bytes after its header: the file is truncated or damaged; save it again with numpy.save")


def _read_npy(path: Path) -> np.ndarray:
    _npy_header_fits(path)
    try:
        arr = np.load(path, allow_pickle=False)  # never unpickle a data file
    except ValueError as e:
        raise ValueError(f"cannot read {str(path)!r} as a numeric .npy array ({e}); save a plain "
                         "float array with numpy.save") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive renamed .npy
        raise ValueError(f"{str(path)!r} is not a single .npy array; save one [N, d] array with numpy.save")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{str(path)!r} holds a {arr.dtype} array; it must be a real numeric [N, d] array")
    return arr


def _read_csv(path: Path) -> np.ndarray:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); save the CSV as UTF-8, "
                         "or the points as a .npy array") from None
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    skip = 0
    if first is not None:
        try:
            [float(v) for v in lines[first].split(",")]
        except ValueError:
            skip = first + 1  # a header row: the first non-empty line is not all numbers
    if not any(line.strip() for line in lines[skip:]):
        return np.zeros((0, 0))  # no data rows: reported by _check (loadtxt would only warn)
    try:
        return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"cannot parse {str(path)!r} as numeric CSV ({e}); every row after an "
                         "optional header must hold the same number of comma-separated numbers") from None


def _check(arr: np.ndarray, path: Path) -> Tensor:
    if arr.ndim != 2:
        raise ValueError(f"{str(path)!r} holds an array of shape {tuple(arr.shape)}; it must be 2-D "
                         "[N points, d dimensions] (reshape 1-D data to [N, 1])")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{str(path)!r} holds {arr.shape[0]} rows of {arr.shape[1]} columns; need at "
                         "least 2 rows (points) and 1 column")
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():  # checked after the cast: values beyond float32 range become inf
        rows = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise ValueError(f"{str(path)!r} has non-finite values (NaN, inf, or beyond float32 range) in "
                         f"{len(rows)} rows, first at row {rows[0]} (0-based, after any header); remove "
                         "or fix those rows")
    top = float(np.abs(arr).max())
    if top > MAX_ABS:
        raise ValueError(f"{str(path)!r} holds values up to {top:.3g}; rescale the points to roughly unit scale "
                         f"(|x| <= {MAX_ABS:g}): the diffusion noise levels are fixed (0.002 to 80) and its squares "
                         "overflow float32")
    if float(arr.std()) == 0:
        raise ValueError(f"{str(path)!r} holds {len(arr)} identical points (standard deviation 0): there is no "
                         "distribution to learn")
    return torch.from_numpy(arr)
