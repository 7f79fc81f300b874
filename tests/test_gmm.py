"""The analytic Gaussian-mixture teacher against independent closed forms (scipy densities, Cholesky
solves written here, Tweedie's formula by autograd, quadrature, sample moments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal

from dibregman.teachers.base import Teacher
from dibregman.teachers.gmm import BUILTINS, GaussianMixture, get_mixture

F64 = torch.float64


def full_cov_spec(d: int = 3, k: int = 3, seed: int = 0) -> dict:
    """A mixture with full, different covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    covs = 0.3 * a @ a.transpose(1, 2) + 0.1 * torch.eye(d, dtype=F64)
    means = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    weights = torch.arange(1, k + 1, dtype=F64)
    return {"weights": (weights / weights.sum()).tolist(), "means": means.tolist(), "covs": covs.tolist()}


def exact_moments(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the mixture by the law of total variance, from the spec alone."""
    w, mu, cov = (np.asarray(spec[k], dtype=float) for k in ("weights", "means", "covs"))
    w = w / w.sum()
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu))
    return mean, second - np.outer(mean, mean)


def reference_denoiser(spec: dict, x: np.ndarray, sigma: float) -> np.ndarray:
    """Posterior mean with one Cholesky-based solve per component (scipy), in log space."""
    w, mu, cov = (np.asarray(spec[k], dtype=float) for k in ("weights", "means", "covs"))
    d = mu.shape[1]
    logs, comps = [], []
    for k in range(len(w)):
        s = cov[k] + sigma**2 * np.eye(d)
        logs.append(np.log(w[k]) + multivariate_normal(mu[k], s).logpdf(x))
        comps.append(mu[k] + (cov[k] @ np.linalg.solve(s, (x - mu[k]).T)).T)
    gamma = softmax(np.stack(logs, 1), axis=1)
    return np.einsum("bk,kbi->bi", gamma, np.stack(comps))


RING = BUILTINS["ring8_imbalanced"]()
FULL = full_cov_spec()
SIGMAS = (0.01, 0.3, 2.0, 50.0)


@pytest.mark.parametrize("spec", [FULL, RING], ids=["full3d", "ring"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_denoiser_is_tweedie(spec: dict, sigma: float) -> None:
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x), the gradient taken by autograd of log_prob."""
    gmm = GaussianMixture.from_spec(spec)
    x = gmm.sample(64, torch.Generator().manual_seed(1), sigma=sigma, dtype=F64).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    x = x.detach()
    tol = 1e-9 * (1 + sigma**2)
    torch.testing.assert_close(gmm(x, sigma), x + sigma**2 * grad, rtol=0, atol=tol)
    torch.testing.assert_close(gmm.score(x, sigma), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.0, 0.002, 0.3, 5.0, 80.0])
def test_denoiser_matches_cholesky_reference(sigma: float) -> None:
    gmm = GaussianMixture.from_spec(FULL)
    x = gmm.sample(50, torch.Generator().manual_seed(2), sigma=sigma, dtype=F64)
    x = torch.cat([x, torch.tensor([[40.0, -30.0, 10.0]], dtype=F64)])  # far from every mode
    ref = reference_denoiser(FULL, x.numpy(), sigma)
    np.testing.assert_allclose(gmm.denoise(x, sigma).numpy(), ref, rtol=1e-9, atol=1e-9)


def test_single_gaussian_closed_form() -> None:
    spec = full_cov_spec(d=3, k=1, seed=3)
    gmm = GaussianMixture.from_spec(spec)
    mu, cov = np.asarray(spec["means"][0]), np.asarray(spec["covs"][0])
    x = np.random.default_rng(0).normal(size=(20, 3)) * 3
    for sigma in (0.002, 0.1, 1.0, 80.0):
        expect = mu + (cov @ np.linalg.solve(cov + sigma**2 * np.eye(3), (x - mu).T)).T
        got = gmm(torch.as_tensor(x), sigma).numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_log_prob_matches_scipy(sigma: float) -> None:
    gmm = GaussianMixture.from_spec(FULL)
    x = gmm.sample(30, torch.Generator().manual_seed(4), sigma=sigma, dtype=F64)
    w, mu, cov = (np.asarray(FULL[k]) for k in ("weights", "means", "covs"))
    comps = [np.log(w[k]) + multivariate_normal(mu[k], cov[k] + sigma**2 * np.eye(3)).logpdf(x.numpy())
             for k in range(3)]
    np.testing.assert_allclose(gmm.log_prob(x, sigma).numpy(), logsumexp(np.stack(comps), 0), rtol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_log_prob_integrates_to_one(sigma: float) -> None:
    spec = {"weights": [0.2, 0.5, 0.3], "means": [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]],
            "covs": [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.25]]]}
    gmm = GaussianMixture.from_spec(spec)
    u = torch.linspace(-6, 6, 241, dtype=F64)
    grid = torch.cartesian_prod(u, u)
    mass = gmm.log_prob(grid, sigma).exp().sum() * (u[1] - u[0]) ** 2
    assert abs(float(mass) - 1) < 1e-6


def test_sigma_per_sample_dtype_and_shape() -> None:
    gmm = get_mixture("ring8_imbalanced")
    x = gmm.sample(6, torch.Generator().manual_seed(5), sigma=1.0, dtype=F64)
    sigma = torch.tensor([0.002, 0.01, 0.3, 2.0, 50.0, 80.0], dtype=F64)
    per_sample = gmm(x, sigma)
    one_by_one = torch.cat([gmm(x[i:i + 1], float(s)) for i, s in enumerate(sigma)])
    torch.testing.assert_close(per_sample, one_by_one, rtol=0, atol=1e-14)
    torch.testing.assert_close(gmm(x, sigma[:, None]), per_sample)  # [B, 1] is accepted too
    out32 = gmm(x.float(), sigma.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, per_sample.float(), rtol=1e-5, atol=1e-5)
    assert gmm.log_prob(x.float()).dtype == torch.float32
    assert gmm.sample(3).dtype == torch.get_default_dtype()


def test_extreme_sigmas_are_finite_and_right() -> None:
    gmm = get_mixture("ring8_imbalanced")
    far = torch.tensor([[30.0, 0.0], [0.0, -500.0], [1e3, 1e3]], dtype=F64)
    d = gmm(far, 0.002)
    assert torch.isfinite(d).all()
    # The far points belong to one component with certainty: D = mu + lam/(lam + sigma^2) (x - mu).
    shrink = 0.01 / (0.01 + 0.002**2)
    mu0 = gmm.means[0]
    torch.testing.assert_close(d[0], mu0 + shrink * (far[0] - mu0), rtol=1e-12, atol=1e-12)
    # At sigma = 80, x_sigma says almost nothing: D is near the mixture mean.
    x = 80 * torch.randn(100, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    mean, _ = gmm.moments()
    assert (gmm(x, 80.0) - mean).norm(dim=1).max() < 0.1
    assert torch.isfinite(gmm.score(far, 0.002)).all() and torch.isfinite(gmm.log_prob(far)).all()
    torch.testing.assert_close(gmm.responsibilities(x, 80.0).mean(0), gmm.weights, rtol=0, atol=2e-3)


@pytest.mark.parametrize("spec", [FULL, RING], ids=["full3d", "ring"])
def test_sample_moments(spec: dict) -> None:
    gmm = GaussianMixture.from_spec(spec)
    mean, cov = exact_moments(gmm.to_spec())
    np.testing.assert_allclose(gmm.moments()[0].numpy(), mean, atol=1e-12)
    np.testing.assert_allclose(gmm.moments()[1].numpy(), cov, atol=1e-12)
    assert gmm.sigma_data == pytest.approx(math.sqrt(np.trace(cov) / cov.shape[0]), rel=1e-12)
    n = 200_000
    for sigma in (0.0, 0.5):
        x, comps = gmm.sample(n, torch.Generator().manual_seed(7), sigma=sigma, return_components=True,
                              dtype=F64)
        x = x.numpy()
        se_mean = x.std(0) / math.sqrt(n)
        assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean)
        c = x - x.mean(0)
        prod = c[:, :, None] * c[:, None, :]
        se_cov = prod.std(0) / math.sqrt(n)
        target = cov + sigma**2 * np.eye(cov.shape[0])
        assert np.all(np.abs(prod.mean(0) - target) < 5 * se_cov + 1e-12)
        freq = torch.bincount(comps, minlength=gmm.num_components).double() / n
        w = gmm.weights
        assert torch.all((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt())
    a = gmm.sample(5, torch.Generator().manual_seed(8))
    b = gmm.sample(5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)


def test_responsibilities_assign_mahalanobis() -> None:
    gmm = GaussianMixture.from_spec(FULL)
    x, comps = gmm.sample(500, torch.Generator().manual_seed(9), return_components=True, dtype=F64)
    resp = gmm.responsibilities(x)
    torch.testing.assert_close(resp.sum(1), torch.ones(500, dtype=F64))
    assert torch.equal(gmm.assign(x), resp.argmax(1))
    m2 = gmm.mahalanobis2(x)
    for k in range(3):
        diff = x.numpy() - np.asarray(FULL["means"][k])
        expect = np.einsum("bi,bi->b", diff, np.linalg.solve(np.asarray(FULL["covs"][k]), diff.T).T)
        np.testing.assert_allclose(m2[:, k].numpy(), expect, rtol=1e-10)
        torch.testing.assert_close(gmm.mahalanobis2(x, k), m2[:, k])
    torch.testing.assert_close(gmm.mahalanobis2(x, comps), m2.gather(1, comps[:, None])[:, 0])


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtins(name: str) -> None:
    gmm = get_mixture(name)
    assert isinstance(gmm, Teacher) and gmm.network is None and gmm.num_classes == 0
    assert (gmm.sigma_min, gmm.sigma_max) == (0.002, 80.0)
    assert gmm.shape == (gmm.means.shape[1],)
    # Modes are well separated: exact samples are assigned to the component that drew them.
    x, comps = gmm.sample(20_000, torch.Generator().manual_seed(10), return_components=True, dtype=F64)
    assert (gmm.assign(x) != comps).float().mean() < 1e-3
    assert torch.equal(get_mixture(f"gmm:{name}").means, gmm.means)


def test_builtin_parameters() -> None:
    ring = get_mixture("ring8_imbalanced")
    assert ring.num_components == 8 and ring.shape == (2,)
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64))
    assert float(ring.weights.max() / ring.weights.min()) == pytest.approx(8.0)
    torch.testing.assert_close(ring.covs, 0.01 * torch.eye(2, dtype=F64).expand(8, 2, 2))
    torch.testing.assert_close(get_mixture("ring8").weights, torch.full((8,), 1 / 8, dtype=F64))
    grid = get_mixture("grid25_imbalanced")
    assert grid.num_components == 25
    assert float(grid.weights.max() / grid.weights.min()) == pytest.approx(5.0)
    blobs = get_mixture("blobs8d_imbalanced")
    assert blobs.shape == (8,) and blobs.num_components == 6
    off_diag = blobs.covs - torch.diag_embed(blobs.covs.diagonal(dim1=1, dim2=2))
    assert (off_diag.abs().amax(dim=(1, 2)) > 1e-2).all()  # full covariances, not diagonal


def test_spec_round_trip_and_forms(tmp_path) -> None:
    gmm = GaussianMixture.from_spec(FULL)
    spec = json.loads(json.dumps(gmm.to_spec()))
    again = GaussianMixture.from_spec(spec)
    for name in ("weights", "means", "covs"):
        assert torch.equal(getattr(again, name), getattr(gmm, name))
    base = {"weights": [1.0, 3.0], "means": [[0.0, 0.0], [3.0, 0.0]]}
    by_var = GaussianMixture.from_spec({**base, "variances": [[0.1, 0.2], [0.3, 0.4]]})
    torch.testing.assert_close(by_var.covs[1], torch.diag(torch.tensor([0.3, 0.4], dtype=F64)))
    torch.testing.assert_close(by_var.weights, torch.tensor([0.25, 0.75], dtype=F64))
    by_std = GaussianMixture.from_spec({**base, "std": 0.5})
    torch.testing.assert_close(by_std.covs, 0.25 * torch.eye(2, dtype=F64).expand(2, 2, 2))
    by_stds = GaussianMixture.from_spec({**base, "std": [0.5, 2.0]})
    torch.testing.assert_close(by_stds.covs[1], 4.0 * torch.eye(2, dtype=F64))

    path = tmp_path / "mix.json"
    path.write_text(json.dumps(gmm.to_spec()))
    assert torch.equal(get_mixture(str(path)).covs, gmm.covs)
    toml = tmp_path / "mix.toml"
    toml.write_text('name = "two"\nweights = [1.0, 3.0]\nmeans = [[0.0, 0.0], [3.0, 0.0]]\n'
                    "variances = [[0.1, 0.2], [0.3, 0.4]]\n")
    from_toml = GaussianMixture.load(toml)
    assert from_toml.name == "two"
    labelled = GaussianMixture.from_spec({**base, "std": 1.0, "name": "n", "description": "two blobs"})
    assert (labelled.to_spec()["name"], labelled.to_spec()["description"]) == ("n", "two blobs")
    assert torch.equal(from_toml.covs, by_var.covs)


BAD_SPECS = [
    ({"weights": [1.0], "means": [[0.0]], "std": 1.0, "mean": 1}, r"unknown mixture spec keys \['mean'\]"),
    ({"weights": [1.0], "std": 1.0}, r"missing \['means'\]"),
    ({"weights": [1.0], "means": [[0.0]]}, "exactly one of"),
    ({"weights": [1.0], "means": [[0.0]], "std": 1.0, "covs": [[[1.0]]]}, "exactly one of"),
    ({"weights": [0.5, -0.5], "means": [[0.0], [1.0]], "std": 1.0}, "negative weights"),
    ({"weights": [0.5, 0.0], "means": [[0.0], [1.0]], "std": 1.0}, "positive"),
    ({"weights": [0.5, 0.5], "means": [[0.0, 1.0]], "std": 1.0},
     r"means must have shape \[K, d\] = \[2, d\]"),
    ({"weights": [1.0, 1.0], "means": [[0.0], [1.0]], "std": [1.0, 2.0, 3.0]}, "K = 2"),
    ({"weights": [1.0, 1.0], "means": [[0.0], [1.0]], "std": -1.0}, "std must be positive"),
    ({"weights": [1.0], "means": [[0.0, 0.0]], "covs": [[[1.0, 0.0, 0.0]]]}, r"\[1, 2, 2\]"),
    ({"weights": [1.0, 1.0], "means": [[0.0, 0.0], [1.0, 1.0]],
      "covs": [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]]}, "component 1 is not positive definite"),
    ({"weights": [1.0], "means": [[0.0, 0.0]], "covs": [[[1.0, 0.5], [0.0, 1.0]]]}, "not symmetric"),
    ({"weights": [1.0], "means": [[0.0, 0.0]], "variances": [[1.0, -1.0]]}, "variances of component 0"),
    ({"weights": [1.0], "means": [[float("nan")]], "std": 1.0}, "non-finite"),
]


@pytest.mark.parametrize(("spec", "match"), BAD_SPECS)
def test_bad_specs(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GaussianMixture.from_spec(spec)


def test_bad_files_names_and_inputs(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        GaussianMixture.load(tmp_path / "nope.json")
    broken = tmp_path / "broken.toml"
    broken.write_text("weights = [1.0,\n")
    with pytest.raises(ValueError, match=r"could not parse .*broken\.toml as TOML"):
        GaussianMixture.load(broken)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"weights": [1.0], "means": [[0.0]], "sd": 1.0}))
    with pytest.raises(ValueError, match=r"bad\.json: unknown mixture spec keys"):
        get_mixture(bad_json)
    with pytest.raises(ValueError, match="ring8_imbalanced"):
        get_mixture("ring9")
    gmm = get_mixture("ring8")
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 2\]"):
        gmm(torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        gmm(torch.zeros(4, 2), -1.0)
    with pytest.raises(ValueError, match="one value per sample"):
        gmm(torch.zeros(4, 2), torch.ones(3))
