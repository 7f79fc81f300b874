"""Toy metrics against closed forms: exact samples of a known mixture, point masses, translations,
brute-force kernel sums, Gaussian entropies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from dibregman.metrics.toy import (
    METRIC_DOC,
    W1_MAX_POINTS,
    energy_distance,
    evaluate,
    mean_nll,
    mmd2_unbiased,
    mode_weight_tv,
    off_mode_mass,
    wasserstein1,
)
from dibregman.teachers.gmm import GaussianMixture, get_mixture

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mode_weight_tv() -> None:
    gmm = get_mixture("ring8_imbalanced")
    x, comps = gmm.sample(20_000, gen(0), return_components=True, dtype=F64)
    assert mode_weight_tv(x, gmm) < 0.02  # expected sampling floor here is about 0.007
    for j in (0, 5):
        only_j = x[comps == j]
        assert mode_weight_tv(only_j, gmm) == pytest.approx(1 - float(gmm.weights[j]), abs=1e-12)
    # Half the points on mode 0, half on mode 1, of the uniform ring: 0.5 (3/8 + 3/8 + 6/8) = 0.75.
    ring = get_mixture("ring8")
    pts = torch.cat([ring.means[0].expand(50, 2), ring.means[1].expand(50, 2)])
    assert mode_weight_tv(pts.numpy(), ring) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("name", ["ring8_imbalanced", "blobs8d_imbalanced"])
def test_off_mode_mass_of_exact_samples(name: str) -> None:
    gmm = get_mixture(name)
    n, q = 50_000, 0.99
    x = gmm.sample(n, gen(1), dtype=F64)
    se = math.sqrt(q * (1 - q) / n)
    assert abs(off_mode_mass(x, gmm, quantile=q) - (1 - q)) < 5 * se
    # Default 0.999: still about 1 - q; points between the modes are all off-mode.
    assert off_mode_mass(x, gmm) < 0.003
    assert off_mode_mass(torch.zeros(10, gmm.shape[0]), gmm) == 1.0


def test_energy_distance_closed_forms() -> None:
    # Two point masses: the within-set terms vanish and 2 E|X - Y| = 2 |a - b|.
    assert energy_distance(np.full((5, 1), 1.0), np.full((7, 1), 3.5)) == pytest.approx(5.0, abs=1e-12)
    # {0, 1} vs {3, 5}: 2 * 3.5 - 1 - 2 = 4.
    assert energy_distance(np.array([0.0, 1.0]), np.array([3.0, 5.0])) == pytest.approx(4.0, abs=1e-12)
    # N(0, 1) vs N(mu, 1): 2 E|N(mu, 2)| - 2 E|N(0, 2)|, with E|N(m, s2)| = s sqrt(2/pi) e^(-m^2/2s2)
    # + m (1 - 2 Phi(-m / s)).
    mu, s = 1.0, math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * (1 - 2 * norm.cdf(-mu / s))
    expect = 2 * e_xy - 2 * s * math.sqrt(2 / math.pi)
    x = torch.randn(3000, 1, generator=gen(2), dtype=F64)
    y = mu + torch.randn(3000, 1, generator=gen(3), dtype=F64)
    assert energy_distance(x, y) == pytest.approx(expect, abs=0.04)
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-12)


def test_same_law_near_zero_shifted_law_positive() -> None:
    gmm = get_mixture("ring8_imbalanced")
    x, y = gmm.sample(1500, gen(4), dtype=F64), gmm.sample(1500, gen(5), dtype=F64)
    shifted = y + torch.tensor([0.3, 0.0], dtype=F64)
    same_e, shift_e = energy_distance(x, y), energy_distance(x, shifted)
    same_m, shift_m = mmd2_unbiased(x, y), mmd2_unbiased(x, shifted)
    # Same law: O(1/n) noise around 0 (about 1e-3 here); a shift by 3 mode widths: about 0.07 and 0.02.
    assert abs(same_e) < 5e-3 and shift_e > 0.04
    assert abs(same_m) < 2.5e-3 and shift_m > 0.01


def test_mmd_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 2)), rng.normal(size=(4, 2)) + 0.5
    hs = [0.4, 1.3]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return sum(math.exp(-float(np.sum((a - b) ** 2)) / (2 * h * h)) for h in hs)

    kxx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    kyy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    kxy = sum(k(a, b) for a in x for b in y) / 20
    assert mmd2_unbiased(x, y, hs) == pytest.approx(kxx + kyy - 2 * kxy, abs=1e-12)
    # Default bandwidths: the pooled median distance times (0.5, 1, 2).
    pooled = np.concatenate([x, y])
    dists = [np.linalg.norm(pooled[i] - pooled[j]) for i in range(9) for j in range(i + 1, 9)]
    med = sorted(dists)[17]  # 36 pairs: the lower of the two middle values (torch.median's convention)
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_unbiased(x, y, [0.5 * med, med, 2 * med]), abs=1e-12)


def test_wasserstein1_exact_cases() -> None:
    x = torch.randn(500, 1, generator=gen(6), dtype=F64)
    assert wasserstein1(x, x + 0.7) == pytest.approx(0.7, abs=1e-9)
    assert wasserstein1(x, x) == pytest.approx(0.0, abs=1e-12)
    # In any dimension a translation by v costs |v|: |E(X - Y)| <= W1 and the identity coupling attains it.
    x2 = torch.randn(400, 2, generator=gen(7), dtype=F64)
    v = torch.tensor([0.3, -0.4], dtype=F64)
    assert wasserstein1(x2, x2 + v) == pytest.approx(0.5, abs=1e-9)
    assert wasserstein1(x2, x2 + v, max_points=100) == pytest.approx(0.5, abs=1e-9)
    square = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert wasserstein1(square, square + np.array([0.0, 1.0])) == pytest.approx(1.0, abs=1e-12)
    assert wasserstein1(np.array([0.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(2.0, abs=1e-12)


def test_mean_nll_is_entropy() -> None:
    spec = {"weights": [1.0], "means": [[0.5, -1.0, 2.0]],
            "covs": [[[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]]]}
    gmm = GaussianMixture.from_spec(spec)
    n, d = 20_000, 3
    cov = np.asarray(spec["covs"][0])
    # At the mean, -log p = log det(2 pi Sigma) / 2 exactly.
    at_mean = np.tile(spec["means"][0], (4, 1))
    assert mean_nll(at_mean, gmm) == pytest.approx(0.5 * np.linalg.slogdet(2 * math.pi * cov)[1], abs=1e-12)
    entropy = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * cov))
    # -log p of exact samples is entropy + (chi2_d - d)/2: standard error sqrt(d/2n).
    x = gmm.sample(n, gen(8), dtype=F64)
    assert mean_nll(x, gmm) == pytest.approx(entropy, abs=5 * math.sqrt(d / 2 / n))
    # Well-separated mixture: entropy = H(w) + sum_k w_k H(N_k), up to negligible overlap.
    ring = get_mixture("ring8_imbalanced")
    w = ring.weights.numpy()
    entropy = float(-(w * np.log(w)).sum()) + math.log(2 * math.pi * math.e * 0.01)  # d = 2, var 0.01
    x = ring.sample(n, gen(9), dtype=F64)
    se = float(ring.log_prob(x).std()) / math.sqrt(n)
    assert mean_nll(x, ring) == pytest.approx(entropy, abs=5 * se)


def test_evaluate_keys_and_values() -> None:
    gmm = get_mixture("ring8")
    x = gmm.sample(W1_MAX_POINTS + 300, gen(10), dtype=F64)
    ref = gmm.sample(400, gen(11), dtype=F64)
    assert set(evaluate(x[:300], ref)) == {"energy", "mmd", "w1"}
    out = evaluate(x.float().numpy(), ref, gmm)
    assert set(out) == {"energy", "mmd", "w1", "mode_tv", "off_mode", "nll"} == set(METRIC_DOC)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["energy"] == pytest.approx(energy_distance(x, ref), abs=1e-5)
    assert out["w1"] == pytest.approx(wasserstein1(x[:W1_MAX_POINTS], ref), abs=1e-5)  # the first rows
    assert out["mode_tv"] == pytest.approx(mode_weight_tv(x, gmm), abs=1e-12)
    assert out["nll"] == pytest.approx(mean_nll(x, gmm), abs=1e-4)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"shape \[N, d\]"):
        energy_distance(np.zeros((2, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        energy_distance(np.zeros((1, 2)), np.zeros((3, 2)))
