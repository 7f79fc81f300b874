"""Pure samplers over a denoiser ``D(x, sigma, cond)``, with injected randomness.

Noise comes from a ``torch.Generator`` or from per-sample seeds (``noise_from_seeds``), so a sample
does not depend on the batch it was drawn in, nor on the number of processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch

from .precond import Denoiser
from .schedules import karras_sigmas

Tensor = torch.Tensor


MAX_NOISE_BYTES = 1 << 36  # 64 GiB: more noise than this in one call is refused (also bounded by the RAM)


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], device: str | torch.device = "cpu") -> Tensor:
    """One standard normal tensor of ``shape`` per seed, stacked: ``[len(seeds), *shape]``.

    Row ``i`` is ``torch.randn(shape, generator=torch.Generator().manual_seed(seeds[i]))``, drawn into the
    output in place with one re-seeded generator (``manual_seed`` resets its whole state), so memory is the
    output alone, moved to ``device`` in chunks. A request larger than the machine's memory (or
    ``MAX_NOISE_BYTES``) is a ``ValueError`` before anything is allocated."""
    shape = tuple(int(s) for s in shape)
    n = len(seeds)
    if n < 0 or any(s < 0 for s in shape):
        raise ValueError(f"noise needs a count and a shape of sizes >= 0; got {n} of {list(shape)}")
    need = n * math.prod(shape) * 4
    limit = min(MAX_NOISE_BYTES, _memory_bytes())
    if need > limit:
        raise ValueError(f"noise for {n} samples of shape {list(shape)} needs {need / 2**30:.1f} GiB, more than "
                         f"{limit / 2**30:.1f} GiB (this machine's memory or the limit); ask for fewer samples")
    device = torch.device(device)
    out = torch.empty((n, *shape), device=device)
    g = torch.Generator()
    chunk = max(1, (1 << 24) // max(1, math.prod(shape)))  # ~64 MB of CPU noise at a time
    for start in range(0, n, chunk):
        block = out[start:start + chunk] if device.type == "cpu" else torch.empty((min(chunk, n - start), *shape))
        for j, s in enumerate(seeds[start:start + chunk]):  # indexing: iterating a tensor makes every row's view
            g.manual_seed(int(s))
            block[j].normal_(generator=g)
        if device.type != "cpu":
            out[start:start + len(block)] = block.to(device)
    return out


CALL_VALUES = 1 << 22  # values in the inputs of one evaluation-time network call (4 Mi): 1024 28x28 images,
# 64 SD latents of 4x64x64, 5 decoded 512x512 RGB images; activations scale with it


def batch_for(shape: Sequence[int], cap: int = 1024) -> int:
    """Samples of ``shape`` per network call outside training (sampling, evaluation, decoding): at most ``cap``,
    fewer for large samples so a call's activations stay bounded whatever the resolution."""
    return max(1, min(int(cap), CALL_VALUES // max(1, math.prod(shape))))


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: the fixed limit alone
        return MAX_NOISE_BYTES


def seeded_noise(seed: int, num: int, shape: Sequence[int], device: str | torch.device = "cpu") -> Tensor:
    """The evaluation noise of the whole project: sample ``i`` of draw ``seed`` depends on ``(seed, i)``
    alone, so a run's own evaluation, ``dibregman eval`` / ``sample`` and ``db.sample`` with the same seed
    draw the same samples, and the first ``k`` of ``num`` are the draw of ``k``."""
    start = int(seed) * 1_000_003
    return noise_from_seeds(range(start, start + int(num)), shape, device)


@torch.no_grad()
def euler(denoise: Denoiser, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None) -> Tensor:
    """Probability-flow ODE, first order: one network call per step. ``noise`` is unit-variance."""
    sigmas = sigmas.to(noise.dtype)
    x = noise * sigmas[0]
    for s_cur, s_next in pairwise(sigmas):
        d = (x - denoise(x, s_cur.expand(x.shape[0]), cond)) / s_cur
        x = x + (s_next - s_cur) * d
    return x


@torch.no_grad()
def heun(denoise: Denoiser, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None) -> Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, algorithm 1): ``2 n - 1`` calls for
    ``n`` sigmas, so 18 sigmas give the reference 35 NFE."""
    sigmas = sigmas.to(noise.dtype)
    x = noise * sigmas[0]
    for s_cur, s_next in pairwise(sigmas):
        d = (x - denoise(x, s_cur.expand(x.shape[0]), cond)) / s_cur
        x_next = x + (s_next - s_cur) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next, s_next.expand(x.shape[0]), cond)) / s_next
            x_next = x + (s_next - s_cur) * (d + d_next) / 2
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"heun": heun, "euler": euler}


def nfe(method: str, num_steps: int) -> int:
    return 2 * num_steps - 1 if method == "heun" else num_steps


def sample(denoise: Denoiser, noise: Tensor, *, num_steps: int = 18, sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, method: str = "heun",
           cond: Tensor | None = None) -> Tensor:
    """Multi-step sampling on EDM's Karras grid. Defaults: Heun with 18 sigmas = 35 NFE."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {sorted(SAMPLERS)}")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).to(noise.device)
    return SAMPLERS[method](denoise, noise, sigmas, cond)


@torch.no_grad()
def one_step(generator: Callable[..., Tensor], z: Tensor, cond: Tensor | None = None) -> Tensor:
    return generator(z, cond)
