"""Metrics for low-dimensional samples: exact ones against an analytic mixture teacher, and
sample-based distances between two point sets.

Every function takes torch tensors or numpy arrays ``[N, d]`` (``[N]`` is read as ``d = 1``), computes
in float64 and returns a Python float. Pairwise quantities are accumulated in row blocks, so memory
stays ``O(block * N)`` rather than ``O(N^2)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ot
import torch
from scipy.stats import chi2

from ..teachers.gmm import GaussianMixture

Tensor = torch.Tensor
_BLOCK = 1024
# Exact W1 is an O(N^3) linear program: evaluate() caps each set at this many points (a fixed-seed
# random subset), which keeps one evaluation around a second. Call wasserstein1 directly for more.
W1_MAX_POINTS = 2000
# Pairwise sums cost O(N^2): evaluate() uses the first rows of each set (energy: 0.4 s at 5000 points on
# one core; MMD's kernels cost ~8x more). The mixture-exact metrics (mode_tv, off_mode, nll) are O(N) and use
# every sample, so a large evaluation set makes them precise (their spread ~ 1/sqrt(N)).
ENERGY_MAX_POINTS = 5000
MMD_MAX_POINTS = 2000
# The median heuristic needs no more than this many pooled points (a fixed-seed random subset).
_MEDIAN_MAX_POINTS = 2000

METRIC_DOC: dict[str, str] = {
    "energy": "energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| to the reference set (unbiased; 0 = same law; "
              f"at most {ENERGY_MAX_POINTS} points per set)",
    "mmd": "unbiased MMD^2 to the reference set, Gaussian kernels at 0.5/1/2 x the median distance (at most "
           f"{MMD_MAX_POINTS} points per set)",
    "w1": f"exact Wasserstein-1 to the reference set (POT; at most {W1_MAX_POINTS} points per set)",
    "mode_tv": "total variation between per-mode sample frequencies and the mixture weights",
    "off_mode": "fraction of samples outside the 99.9% Mahalanobis ellipsoid of their nearest mode",
    "nll": "mean negative log-likelihood of the samples under the teacher mixture (nats)",
}


def _as_2d(x: Any, what: str = "samples") -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x.detach()).to("cpu", torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{what} must have shape [N, d]; got {list(t.shape)}")
    return t


def _subsample(x: Tensor, max_points: int | None, seed: int) -> Tensor:
    if max_points is None or x.shape[0] <= max_points:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
    return x[idx]


def _cdist(a: Tensor, b: Tensor) -> Tensor:
    # The matmul shortcut loses ~1e-8 near zero distance; the direct form is exact enough for
    # identical-set checks and fast in the low dimensions these metrics are for.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _pair_mean(a: Tensor, b: Tensor, fn: Callable[[Tensor], Tensor], same: bool) -> float:
    """Mean of ``fn(|a_i - b_j|)`` over all pairs, or over ``i != j`` when ``same`` (``a is b``)."""
    n, m = a.shape[0], b.shape[0]
    if same and n < 2:
        raise ValueError("within-set means need at least 2 samples per set")
    total = 0.0
    for i in range(0, n, _BLOCK):
        vals = fn(_cdist(a[i:i + _BLOCK], b))
        if same:
            rows = torch.arange(vals.shape[0])
            vals[rows, rows + i] = 0.0
        total += float(vals.sum())
    return total / (n * (n - 1) if same else n * m)


def energy_distance(x: Any, y: Any) -> float:
    """``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` with Euclidean norms; the within-set means exclude the diagonal
    (U-statistics), so the estimate is unbiased and can be slightly negative when the laws agree."""
    x, y = _as_2d(x), _as_2d(y)

    def norm(dist: Tensor) -> Tensor:
        return dist

    return 2 * _pair_mean(x, y, norm, False) - _pair_mean(x, x, norm, True) - _pair_mean(y, y, norm, True)


def median_bandwidth(x: Any, y: Any) -> float:
    """Median pairwise distance of the pooled sample (the lower middle value for an even count; on at
    most 2000 fixed-seed points)."""
    pooled = _subsample(torch.cat([_as_2d(x), _as_2d(y)]), _MEDIAN_MAX_POINTS, seed=0)
    d = _cdist(pooled, pooled)
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1)
    return float(d[iu[0], iu[1]].median())


def mmd2_unbiased(x: Any, y: Any, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased MMD^2 with the kernel ``k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))``.

    Default bandwidths ``h``: the median pairwise distance of the pooled sample (``median_bandwidth``)
    times (0.5, 1, 2), so the kernel sees both the modes' widths and their layout. Can be slightly
    negative when the laws agree."""
    x, y = _as_2d(x), _as_2d(y)
    if bandwidths is None:
        med = median_bandwidth(x, y)
        bandwidths = [f * med for f in (0.5, 1.0, 2.0)] if med > 0 else [1.0]
    inv = [1.0 / (2.0 * float(h) ** 2) for h in bandwidths]

    def kernel(dist: Tensor) -> Tensor:
        d2 = dist**2
        return sum(torch.exp(-c * d2) for c in inv)

    within = _pair_mean(x, x, kernel, True) + _pair_mean(y, y, kernel, True)
    return within - 2 * _pair_mean(x, y, kernel, False)


def wasserstein1(x: Any, y: Any, max_points: int | None = None) -> float:
    """Exact W1 between the empirical laws (uniform weights, Euclidean cost) by POT's network simplex.
    ``max_points`` caps each set by a fixed-seed random subset (``None``: use all points); both sets use
    the same seed, so a set and a transformed copy of it keep the same rows."""
    x = _subsample(_as_2d(x), max_points, seed=1).numpy()
    y = _subsample(_as_2d(y), max_points, seed=1).numpy()
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    cost = ot.dist(x, y, metric="euclidean")
    return float(ot.emd2(a, b, cost, numItermax=10_000_000))


def mode_weight_tv(samples: Any, gmm: GaussianMixture) -> float:
    """``0.5 sum_k |hat w_k - w_k|``: each sample counts for its most likely component."""
    x = _as_2d(samples)
    counts = torch.bincount(gmm.assign(x), minlength=gmm.num_components).double()
    return 0.5 * float((counts / x.shape[0] - gmm.weights.double().cpu()).abs().sum())


def off_mode_mass(samples: Any, gmm: GaussianMixture, quantile: float = 0.999) -> float:
    """Fraction of samples whose squared Mahalanobis distance to their assigned component exceeds the
    chi-square(d) ``quantile``; exact samples give ``1 - quantile`` (up to overlap between modes)."""
    x = _as_2d(samples)
    m2 = gmm.mahalanobis2(x, gmm.assign(x))
    return float((m2 > chi2.ppf(quantile, x.shape[1])).double().mean())


def mean_nll(samples: Any, gmm: GaussianMixture) -> float:
    """``-mean log p(x)`` under the clean mixture: for exact samples, the mixture's entropy."""
    return float(-gmm.log_prob(_as_2d(samples), 0.0).mean())


def evaluate(samples: Any, reference: Any, gmm: GaussianMixture | None = None) -> dict[str, float]:
    """All metrics of ``samples`` against ``reference`` samples of the target law (see ``METRIC_DOC``); the
    mixture-exact ones too when ``gmm`` is given, on every sample. The pairwise ones use the first
    ``ENERGY_MAX_POINTS`` / ``MMD_MAX_POINTS`` / ``W1_MAX_POINTS`` rows of each set: samples drawn with
    per-sample seeds (``sampling.seeded_noise``) keep their rows whatever the set's size."""
    x, ref = _as_2d(samples), _as_2d(reference, "reference")
    out = {"energy": energy_distance(x[:ENERGY_MAX_POINTS], ref[:ENERGY_MAX_POINTS]),
           "mmd": mmd2_unbiased(x[:MMD_MAX_POINTS], ref[:MMD_MAX_POINTS]),
           "w1": wasserstein1(x[:W1_MAX_POINTS], ref[:W1_MAX_POINTS])}
    if gmm is not None:
        out.update(mode_tv=mode_weight_tv(x, gmm), off_mode=off_mode_mass(x, gmm), nll=mean_nll(x, gmm))
    return out
