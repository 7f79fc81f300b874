"""An analytic teacher: a Gaussian mixture in any dimension, with exact denoiser, score, density and
samples at every noise level.

Noising a mixture keeps it a mixture: ``p_sigma = sum_k w_k N(mu_k, Sigma_k + sigma^2 I)``, and the
posterior mean of ``x0`` given ``x_sigma = x`` is

    D(x, sigma) = sum_k gamma_k(x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)],

with ``gamma_k`` the component posteriors under ``p_sigma``. Everything is computed in float64 with
log-space responsibilities, so the teacher is an oracle for tests and metrics, from sigma = 0.002 to 80.

Why an eigendecomposition rather than a Cholesky factor of ``Sigma_k + sigma^2 I``: sigma differs per
sample, so Cholesky would need ``B * K`` factorisations per call. ``Sigma_k = U_k diag(lam_k) U_k^T``
diagonalises ``Sigma_k + sigma^2 I`` for every sigma at once (eigenvalues ``lam_k + sigma^2``), so one
factorisation at construction gives exact solves, log-determinants and shrinkage factors
``lam / (lam + sigma^2)`` with no cancellation at any sigma. Sampling uses the Cholesky factor of
``Sigma_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor
_F64 = torch.float64
# Rows per chunk in the [B, K, d] intermediates, so that 10^6-sample metrics stay within memory.
_CHUNK = 16384

SPEC_KEYS = ("weights", "means", "covs", "variances", "std", "name", "description")
_COV_KEYS = ("covs", "variances", "std")


def _as_f64(value: Any, what: str) -> Tensor:
    try:
        # A copy: validation symmetrises in place and the buffers must not alias the caller's tensors.
        t = torch.as_tensor(value, dtype=_F64).detach().clone()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numbers (nested lists or a tensor); got {value!r:.80}") from e
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains non-finite values")
    return t


class GaussianMixture(nn.Module):
    """``sum_k w_k N(mu_k, Sigma_k)`` as a frozen EDM-convention teacher (see ``teachers/base.py``).

    ``weights [K]`` (positive; normalised here), ``means [K, d]``, ``covs [K, d, d]`` symmetric positive
    definite, or ``[K, d]`` per-component diagonals. ``cond`` is accepted and ignored (unconditional).
    Inputs may be any float dtype; outputs come back in the input's dtype.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    num_classes: int = 0

    def __init__(self, weights: Any, means: Any, covs: Any, name: str | None = None,
                 description: str | None = None):
        super().__init__()
        w, mu, cov = self._validate(weights, means, covs)
        self.name, self.description = name, description
        self.shape: tuple[int, ...] = (mu.shape[1],)
        self.register_buffer("weights", w)
        self.register_buffer("means", mu)
        self.register_buffer("covs", cov)
        # Derived factors: rebuilt from the spec, so kept out of the state dict.
        evals, evecs = torch.linalg.eigh(cov)
        self.register_buffer("_evals", evals, persistent=False)
        self.register_buffer("_evecs", evecs, persistent=False)
        self.register_buffer("_chol", torch.linalg.cholesky(cov), persistent=False)
        _, total = self.moments()
        self.sigma_data: float = math.sqrt(float(total.diagonal().mean()))

    # --- construction and validation ---------------------------------------------------------------

    @staticmethod
    def _validate(weights: Any, means: Any, covs: Any) -> tuple[Tensor, Tensor, Tensor]:
        w = _as_f64(weights, "weights")
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must be a non-empty list [K]; got shape {list(w.shape)}")
        k = w.numel()
        if bool((w < 0).any()):
            raise ValueError(f"weights must be positive; got negative weights {w.tolist()}")
        if bool((w == 0).any()):
            raise ValueError(f"weights must be positive (drop zero-weight components); got {w.tolist()}")
        mu = _as_f64(means, "means")
        if mu.ndim != 2 or mu.shape[0] != k or mu.shape[1] < 1:
            raise ValueError(f"means must have shape [K, d] = [{k}, d] (K from weights); "
                             f"got {list(mu.shape)}")
        d = mu.shape[1]
        cov = _as_f64(covs, "covs")
        if cov.shape == (k, d):
            if bool((cov <= 0).any()):
                bad = int((cov <= 0).any(1).nonzero()[0])
                raise ValueError(f"variances of component {bad} must be positive; got {cov[bad].tolist()}")
            cov = torch.diag_embed(cov)
        if cov.shape != (k, d, d):
            raise ValueError(f"covs must have shape [K, d, d] = [{k}, {d}, {d}] (or [K, d] diagonals); "
                             f"got {list(cov.shape)}")
        for i in range(k):
            c = cov[i]
            if not torch.allclose(c, c.T, rtol=1e-6, atol=1e-12 * max(1.0, float(c.abs().max()))):
                raise ValueError(f"covariance of component {i} is not symmetric")
            cov[i] = (c + c.T) / 2
            if int(torch.linalg.cholesky_ex(cov[i]).info) != 0:
                raise ValueError(f"covariance of component {i} is not positive definite "
                                 f"(eigenvalues {torch.linalg.eigvalsh(cov[i]).tolist()})")
        return w / w.sum(), mu, cov

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GaussianMixture:
        """Build from ``{"weights", "means"}`` plus exactly one of ``covs`` (``K`` matrices ``d x d``),
        ``variances`` (``K`` diagonals of ``d`` numbers) or ``std`` (one scalar, or one per component).
        ``name`` and ``description`` are optional labels."""
        if not isinstance(spec, dict):
            raise ValueError("a mixture spec must be a dict (JSON object / TOML table); "
                             f"got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"unknown mixture spec keys {unknown}; valid keys are {list(SPEC_KEYS)}")
        missing = [key for key in ("weights", "means") if key not in spec]
        if missing:
            raise ValueError(f"mixture spec is missing {missing}; it needs 'weights', 'means' and one of "
                             f"{list(_COV_KEYS)}")
        given = [key for key in _COV_KEYS if key in spec]
        if len(given) != 1:
            raise ValueError(f"mixture spec needs exactly one of {list(_COV_KEYS)}; got {given or 'none'}")
        means = _as_f64(spec["means"], "means")
        weights = _as_f64(spec["weights"], "weights")
        if weights.ndim != 1:
            raise ValueError(f"weights must be a list [K]; got shape {list(weights.shape)}")
        k = weights.numel()
        if given[0] == "std":
            std = _as_f64(spec["std"], "std")
            if std.ndim == 0:
                std = std.expand(k)
            if std.ndim != 1 or std.numel() != k:
                raise ValueError(f"std must be one number or a list of K = {k} numbers; got {spec['std']!r}")
            if bool((std <= 0).any()):
                raise ValueError(f"std must be positive; got {std.tolist()}")
            if means.ndim != 2:
                raise ValueError(f"means must have shape [K, d]; got {list(means.shape)}")
            covs = (std**2)[:, None].expand(k, means.shape[1])
        else:
            covs = spec[given[0]]
            if given[0] == "variances" and _as_f64(covs, "variances").ndim != 2:
                raise ValueError(f"variances must have shape [K, d] (one diagonal per component); "
                                 f"got {list(_as_f64(covs, 'variances').shape)}")
        return cls(weights, means, covs, name=spec.get("name"), description=spec.get("description"))

    def to_spec(self) -> dict[str, Any]:
        """A plain-JSON dict that ``from_spec`` rebuilds exactly (full covariances)."""
        spec: dict[str, Any] = {
            "weights": self.weights.double().tolist(),
            "means": self.means.double().tolist(),
            "covs": self.covs.double().tolist(),
        }
        for key in ("name", "description"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        return spec

    @classmethod
    def load(cls, path: str | Path) -> GaussianMixture:
        """Read a spec from a ``.json`` or ``.toml`` file (TOML: top-level keys as in ``from_spec``)."""
        from ..io import read_json_or_toml

        spec = read_json_or_toml(path, "mixture spec file")
        try:
            return cls.from_spec(spec)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    # --- teacher protocol ----------------------------------------------------------------------------

    @property
    def network(self) -> None:
        """An analytic teacher has no trainable network to start students from."""
        return None

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    def moments(self) -> tuple[Tensor, Tensor]:
        """Exact mean ``[d]`` and covariance ``[d, d]`` of the mixture (float64)."""
        w, mu, cov = self.weights.double(), self.means.double(), self.covs.double()
        mean = w @ mu
        second = torch.einsum("k,kij->ij", w, cov + mu[:, :, None] * mu[:, None, :])
        return mean, second - mean[:, None] * mean[None, :]

    def _check_x(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.shape[0]:
            raise ValueError(f"expected x of shape [B, {self.shape[0]}]; got {list(x.shape)}")
        return x

    @staticmethod
    def _sigma(sigma: float | Tensor, b: int, device: torch.device) -> Tensor:
        s = torch.as_tensor(sigma, dtype=_F64, device=device)
        if s.numel() == 1:
            s = s.reshape(1)  # one sigma for the batch: broadcast, so per-(k, dim) terms are computed once
        elif s.numel() == b:
            s = s.reshape(b)
        else:
            raise ValueError(f"sigma must be a scalar or have one value per sample ({b}); "
                             f"got shape {list(s.shape)}")
        ok = ((s >= 0) & torch.isfinite(s)).all()
        if s.device.type == "cuda":  # checked on the GPU (a step never waits for it); a failure is a device assert
            torch._assert_async(ok, "sigma must be finite and >= 0")
        elif not bool(ok):  # the CPU (free), and MPS, which has no asynchronous assert
            raise ValueError("sigma must be finite and >= 0")
        return s

    def _parts(self, x: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per component, in each component's eigenbasis: ``z = U^T (x - mu)`` ``[B,K,d]``, the noised
        eigenvalues ``lam + sigma^2`` ``[B or 1,K,d]``, and ``log w_k + log N(x; mu_k, Sigma_k + sigma^2 I)``
        ``[B,K]``. ``s2`` is ``[B]``, or ``[1]`` for one sigma shared by the batch."""
        mu, evecs, evals = self.means.to(x), self._evecs.to(x), self._evals.to(x)
        z = torch.einsum("bki,kij->bkj", x[:, None, :] - mu[None], evecs)
        var = evals[None] + s2[:, None, None]
        d = x.shape[1]
        log_joint = self.weights.to(x).log()[None] - 0.5 * (
            d * math.log(2 * math.pi) + var.log().sum(-1) + (z**2 / var).sum(-1))
        return z, var, log_joint

    def _chunked(self, fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: float | Tensor,
                 cast: bool = True) -> Tensor:
        """``fn(x64, sigma^2)`` over row chunks; the result in x's float dtype when ``cast``."""
        x = self._check_x(x)
        x64 = x.to(_F64)
        s2 = self._sigma(sigma, x.shape[0], x.device) ** 2
        out = torch.cat([fn(x64[i:i + _CHUNK], s2 if s2.numel() == 1 else s2[i:i + _CHUNK])
                         for i in range(0, max(x.shape[0], 1), _CHUNK)])
        return out.to(x.dtype) if cast and x.is_floating_point() else out

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """Exact posterior mean ``E[x0 | x_sigma = x]`` ``[B, d]``."""

        def fn(xc: Tensor, s2: Tensor) -> Tensor:
            z, var, log_joint = self._parts(xc, s2)
            gamma = torch.softmax(log_joint, dim=1)
            # Shrink each component's offset by lam / (lam + sigma^2) in its eigenbasis.
            comp = self.means.to(xc)[None] + torch.einsum("bkj,kij->bki", z * (self._evals.to(xc) / var),
                                                          self._evecs.to(xc))
            return torch.einsum("bk,bki->bi", gamma, comp)

        return self._chunked(fn, x, sigma)

    denoise = forward

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """``grad_x log p_sigma(x) = (D - x) / sigma^2``, computed directly (no cancellation as sigma -> 0;
        defined at sigma = 0 too)."""

        def fn(xc: Tensor, s2: Tensor) -> Tensor:
            z, var, log_joint = self._parts(xc, s2)
            gamma = torch.softmax(log_joint, dim=1)
            comp = torch.einsum("bkj,kij->bki", z / var, self._evecs.to(xc))
            return -torch.einsum("bk,bki->bi", gamma, comp)

        return self._chunked(fn, x, sigma)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Exact ``log p_sigma(x)`` ``[B]``; ``sigma = 0`` is the clean mixture."""
        return self._chunked(lambda xc, s2: torch.logsumexp(self._parts(xc, s2)[2], dim=1), x, sigma)

    def responsibilities(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Posterior component probabilities ``P(k | x_sigma = x)`` ``[B, K]``."""
        return self._chunked(lambda xc, s2: torch.softmax(self._parts(xc, s2)[2], dim=1), x, sigma)

    def assign(self, x: Tensor) -> Tensor:
        """The most likely component of each clean point ``[B]`` (long)."""
        return self._chunked(lambda xc, s2: self._parts(xc, s2)[2].argmax(dim=1), x, 0.0, cast=False)

    def mahalanobis2(self, x: Tensor, k: int | Tensor | None = None, sigma: float | Tensor = 0.0) -> Tensor:
        """Squared Mahalanobis distance ``(x - mu_k)^T (Sigma_k + sigma^2 I)^-1 (x - mu_k)``: ``[B, K]``
        for all components, or ``[B]`` for one component ``k`` (an int, or one index per sample)."""

        def fn(xc: Tensor, s2: Tensor) -> Tensor:
            z, var, _ = self._parts(xc, s2)
            return (z**2 / var).sum(-1)

        m2 = self._chunked(fn, x, sigma)
        if k is None:
            return m2
        idx = torch.as_tensor(k, dtype=torch.long, device=m2.device).expand(m2.shape[0])
        return m2.gather(1, idx[:, None])[:, 0]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0,
               return_components: bool = False,
               dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` exact samples of ``p_sigma`` ``[n, d]`` in ``dtype`` (default: torch's default dtype):
        component by ``torch.multinomial``, then ``mu + L eps``, then ``+ sigma * noise``. All randomness
        comes from ``generator``; draws happen on its device and move to the mixture's device."""
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0; got {sigma}")
        dev = generator.device if generator is not None else self.weights.device
        w = self.weights.to(dev, _F64)
        comps = torch.multinomial(w, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long, device=dev)
        eps = torch.randn(n, self.shape[0], generator=generator, dtype=_F64, device=dev)
        x = self.means.to(dev, _F64)[comps] + torch.einsum("bij,bj->bi", self._chol.to(dev, _F64)[comps], eps)
        if sigma > 0:
            x = x + sigma * torch.randn(n, self.shape[0], generator=generator, dtype=_F64, device=dev)
        x = x.to(self.weights.device, dtype or torch.get_default_dtype())
        return (x, comps.to(self.weights.device)) if return_components else x

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, K={self.num_components}, d={self.shape[0]}, "
                f"sigma_data={self.sigma_data:.4g}")


# --- built-in mixtures ------------------------------------------------------------------------------


def _ring(weights: list[float], name: str, radius: float = 2.0, std: float = 0.1) -> dict[str, Any]:
    k = len(weights)
    angles = [2 * math.pi * i / k for i in range(k)]
    means = [[radius * math.cos(a), radius * math.sin(a)] for a in angles]
    return {"name": name, "weights": weights, "means": means, "std": std}


def ring8_imbalanced() -> dict[str, Any]:
    """The default demo. 8 modes on a circle of radius 2 (angle 2 pi k / 8), std 0.1 (neighbours are
    15 std apart), weights proportional to [8, 6, 4, 3, 2, 1, 1, 1] (8:1 heaviest to lightest; the three
    lightest modes sit side by side, which a mode-seeking student is expected to drop)."""
    return _ring([w / 26 for w in (8, 6, 4, 3, 2, 1, 1, 1)], "ring8_imbalanced")


def ring8() -> dict[str, Any]:
    """8 modes on a circle of radius 2, std 0.1, uniform weights."""
    return _ring([1 / 8] * 8, "ring8")


def _grid(weight: Callable[[int, int], float], name: str) -> dict[str, Any]:
    coords = [-2.0, -1.0, 0.0, 1.0, 2.0]
    means = [[coords[i], coords[j]] for i in range(5) for j in range(5)]
    w = [weight(i, j) for i in range(5) for j in range(5)]
    return {"name": name, "weights": [v / sum(w) for v in w], "means": means, "std": 0.05}


def grid25() -> dict[str, Any]:
    """5 x 5 modes at {-2,-1,0,1,2}^2, std 0.05 (20 std between neighbours), uniform weights."""
    return _grid(lambda i, j: 1.0, "grid25")


def grid25_imbalanced() -> dict[str, Any]:
    """grid25 with weights proportional to ``1 + (7 i + 3 j) % 5`` for the mode at (coords[i], coords[j]):
    a Latin square of 1..5 (each row and column holds each weight once), 5:1 heaviest to lightest."""
    return _grid(lambda i, j: 1.0 + (7 * i + 3 * j) % 5, "grid25_imbalanced")


def _givens_product(d: int, angles: list[float]) -> Tensor:
    """A fixed rotation: Givens rotations in planes (i, i+1), one angle per plane, applied in order."""
    r = torch.eye(d, dtype=_F64)
    for i, a in enumerate(angles):
        g = torch.eye(d, dtype=_F64)
        c, s = math.cos(a), math.sin(a)
        g[i, i], g[i, i + 1], g[i + 1, i], g[i + 1, i + 1] = c, -s, s, c
        r = g @ r
    return r


def blobs8d_imbalanced() -> dict[str, Any]:
    """6 modes in d = 8: means ``3 (-1)^k e_k`` (k = 0..5; every pair 3 sqrt 2 = 4.24 apart), covariances
    ``R_k diag(v_k) R_k^T`` with ``v_k[i] = 0.05 (1 + (i + k) % 4)`` (std 0.22 to 0.45) and ``R_k`` the
    product of Givens rotations in planes (i, i+1) by angle ``0.3 (i + 1) + 0.2 k``, so every covariance
    is full and different; weights proportional to [8, 5, 3, 2, 1, 1] (8:1)."""
    d, k_total = 8, 6
    means, covs = [], []
    for k in range(k_total):
        m = [0.0] * d
        m[k] = 3.0 * (-1) ** k
        means.append(m)
        r = _givens_product(d, [0.3 * (i + 1) + 0.2 * k for i in range(d - 1)])
        v = torch.tensor([0.05 * (1 + (i + k) % 4) for i in range(d)], dtype=_F64)
        c = r @ torch.diag(v) @ r.T
        covs.append(((c + c.T) / 2).tolist())
    w = [8.0, 5.0, 3.0, 2.0, 1.0, 1.0]
    return {"name": "blobs8d_imbalanced", "weights": [v / sum(w) for v in w], "means": means, "covs": covs}


BUILTINS: dict[str, Callable[[], dict[str, Any]]] = {
    "ring8_imbalanced": ring8_imbalanced,
    "ring8": ring8,
    "grid25": grid25,
    "grid25_imbalanced": grid25_imbalanced,
    "blobs8d_imbalanced": blobs8d_imbalanced,
}


def get_mixture(name_or_path: str | Path) -> GaussianMixture:
    """A built-in mixture by name (an optional ``gmm:`` prefix is accepted), or a ``.json``/``.toml``
    spec file."""
    spec = str(name_or_path)
    spec = spec.removeprefix("gmm:")
    if spec in BUILTINS:
        return GaussianMixture.from_spec(BUILTINS[spec]())
    if Path(spec).suffix.lower() in (".json", ".toml"):
        return GaussianMixture.load(spec)
    raise ValueError(f"unknown mixture {str(name_or_path)!r}; choose a built-in ({', '.join(BUILTINS)}) "
                     "or a path to a .json / .toml spec file")
