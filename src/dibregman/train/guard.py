"""Guards of a run: a usable output folder, and finite losses and gradients."""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .. import dist
from ..run_folder import RunFolder
from .checkpoint import latest_checkpoint
from .config import ConfigError
from .sharding import is_sharded, local, whole


class NonFiniteError(FloatingPointError):
    """A loss or gradient went NaN/inf under the strict policy; the message names step, network and the
    last good checkpoint."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint of the current step was written before stopping."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def deferred_signals() -> Iterator[dict[str, int | None]]:
    """Turn SIGINT/SIGTERM into a flag the loop polls between steps, so that it stops at a step
    boundary with a fresh checkpoint instead of dying mid-update. Outside the main thread (where
    handlers cannot be installed) it does nothing."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: object) -> None:
        flag["signum"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


_LOCKS: dict[str, int] = {}  # run folder (resolved) -> the open descriptor whose flock holds it


def prepare_run_dir(out: Path, resume: bool) -> Path:
    """Create the run folder and lock it, refusing to write over a finished or started run unless resuming.

    The lock (``flock`` on the folder itself, so nothing is added to it) is taken before the "already
    holds a run" check and held until the run ends (``holds_run_lock``) or the process exits: a second
    process on the same folder, started at any moment, is refused while the first is alive, with or
    without ``--resume``. A lock left by a killed process goes with it (the kernel drops it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror}; choose a writable --out") from None
    _lock(out)
    started = any((out / f).exists() for f in (RunFolder.CONFIG, RunFolder.CHECKPOINTS))
    if started and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if not os.access(out, os.W_OK):
        raise ConfigError(f"output folder {out} is not writable; choose a writable --out")
    return out


def _lock(out: Path) -> None:
    key = str(out.resolve())
    if key in _LOCKS:  # this process holds it already (a run inside a run is the caller's business)
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{out} is in use by another running dibregman process (it holds the folder's lock); "
                          "wait for it to finish, or choose another --out") from None
    except OSError as e:  # a file system without locks (some network mounts): carry on unlocked
        os.close(fd)
        import sys

        print(f"warning: cannot lock {out} ({e.strerror}); make sure no other process uses it", file=sys.stderr)
        return
    _LOCKS[key] = fd


def release_run_lock(out: Path) -> None:
    fd = _LOCKS.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def holds_run_lock(fn):
    """Release the run-folder locks ``fn`` took (via ``prepare_run_dir``) when it returns or raises."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_LOCKS) - before:
                release_run_lock(Path(key))

    return wrapper


def keeps_caller_rng(fn):
    """Run ``fn`` on a fork of torch's global random state: a run seeds it for its network initialisations,
    and the caller's own stream continues afterwards as if the run had not happened."""
    import functools

    import torch

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # every GPU the caller has touched (a run may use another than the current one); none initialises CUDA
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper


# --nonfinite skip stops a run whose updates are mostly skipped: more than SKIP_RATIO of the last SKIP_WINDOW
# updates (of every network; counted once SKIP_MIN_UPDATES were made), which is divergence, not a stray batch.
SKIP_WINDOW, SKIP_MIN_UPDATES, SKIP_RATIO = 200, 50, 0.5
# deferred flags are read at the latest after this many updates, for a loop of one's own that never calls check()
MAX_PENDING = 4096


class NonFiniteGuard:
    """Backward, clip and step, unless the loss or the gradient is not finite: then either stop
    (``strict``) or drop the update and count it (``skip``). Never zeroes NaNs in place.

    The weights are checked after each step too: a finite gradient times a huge step size can overflow
    them to inf. An applied update cannot be undone, so that stops the run under either policy (naming
    the network, instead of a NaN loss one step later in whichever network reads them first).
    ``resume_hint`` is how the user continues in skip mode (``None`` where the command has no such flag).

    ``deferred`` (strict only): the step never waits for the device. Each update leaves one fused flag tensor
    (loss, gradient, weights) where it was computed, and ``check()`` reads all of them in one transfer; the
    run driver calls it before it writes a stats row or a checkpoint, so a non-finite update still stops the
    run, named by network and step, and no checkpoint after it exists (a loop of your own calls ``check()``;
    it also runs every ``MAX_PENDING`` updates). Skip mode decides per update, so it reads its flags at once
    (two host syncs per update: the loss and gradient flags, then the weights').
    """

    def __init__(self, policy: str, resume_hint: str | None = "--resume --nonfinite skip", deferred: bool = False):
        self.policy, self.skipped, self.resume_hint = policy, 0, resume_hint
        self.deferred = deferred and policy == "strict"
        self.resumed_from: Path | None = None  # the checkpoint a resumed run loaded
        self.recent: collections.deque[bool] = collections.deque(maxlen=SKIP_WINDOW)  # True: that update skipped
        self.pending: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []  # (name, step, flags, loss) unread
        self.run_dir: Path | None = None

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, net: nn.Module, name: str, step: int,
             max_norm: float, run_dir: Path) -> bool:
        """One update of ``net``; ``step`` is the 1-based number of the update, as in checkpoint names.
        Returns whether the update was applied (always True when deferred: ``check`` decides later)."""
        self.run_dir = run_dir
        opt.zero_grad(set_to_none=True)
        # Backward even through a non-finite loss: under torchrun every process must join the gradient
        # all-reduce, and the NaN it spreads makes every process take the same decision below.
        loss.backward()
        sharded = is_sharded(net)
        if not sharded:  # FSDP's backward reduce-scatters the mean gradient itself
            dist.average_gradients(net)
        total = dist.all_reduce_sum(loss.detach().clone())
        norm = whole(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm if max_norm > 0 else math.inf))
        ok = torch.stack([torch.isfinite(total), torch.isfinite(norm).to(total.device)])
        if self.deferred:  # applied now, judged at the next check; a non-finite update's run stops there
            opt.step()
            self.pending.append((name, step, torch.cat([ok, _finite(net, sharded).to(ok.device).reshape(1)]),
                                 loss.detach()))
            if len(self.pending) >= MAX_PENDING:
                self.check()
            return True
        loss_ok, grad_ok = ok.tolist()  # one host sync for both checks
        bad = None if loss_ok and grad_ok else f"loss ({loss.item()})" if not loss_ok else "gradient"
        if bad is None:
            self.recent.append(False)
            opt.step()
            if not bool(_finite(net, sharded)):
                raise self._weights_error(name, step)
            return True
        opt.zero_grad(set_to_none=True)
        if self.policy == "skip":
            self.skipped += 1
            self.recent.append(True)
            if self.skipped == 1 and dist.is_main():
                print(f"warning: non-finite {name} {bad} at step {step}: update skipped (--nonfinite skip); the run "
                      f"stops if more than {SKIP_RATIO:.0%} of {SKIP_WINDOW} consecutive updates are skipped",
                      file=sys.stderr)
            bad_share = sum(self.recent) / len(self.recent)
            if len(self.recent) >= SKIP_MIN_UPDATES and bad_share > SKIP_RATIO:
                raise NonFiniteError(f"{sum(self.recent)} of the last {len(self.recent)} updates were non-finite and "
                                     f"skipped ({self.skipped} in all, the last: {name} {bad} at step {step}): the run "
                                     f"has diverged; stopped ({self._last_good(run_dir, step)}). Start a new run "
                                     "(another --out) with a lower learning rate or a gradient clip")
            return False
        raise self._strict_error(name, bad, step)

    def check(self) -> None:
        """Read the flags of the updates since the last check (one host sync) and raise for the first
        non-finite one, as the immediate check would have at that update. Nothing to do unless deferred."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([f.to(pending[0][2].device) for _, _, f, _ in pending]).tolist()
        for (name, step, _, loss), (loss_ok, grad_ok, weights_ok) in zip(pending, flags, strict=True):
            if not loss_ok:
                raise self._strict_error(name, f"loss ({loss.item()})", step)
            if not grad_ok:
                raise self._strict_error(name, "gradient", step)
            if not weights_ok:
                raise self._weights_error(name, step)

    def _strict_error(self, name: str, bad: str, step: int) -> NonFiniteError:
        hint = f", or continue with {self.resume_hint} to drop such steps and count them" if self.resume_hint else ""
        return NonFiniteError(f"non-finite {name} {bad} at step {step}; stopped ({self._last_good(self.run_dir, step)})"
                              f". Start a new run (another --out) with a lower learning rate{hint}")

    def _weights_error(self, name: str, step: int) -> NonFiniteError:
        return NonFiniteError(f"non-finite {name} weights after the update at step {step} (finite loss and gradient: "
                              f"the step overflowed); stopped, the update cannot be undone "
                              f"({self._last_good(self.run_dir, step)}). Start a new run (another --out) with a lower "
                              "learning rate or a gradient clip")

    def _last_good(self, run_dir: Path | None, step: int) -> str:
        resumed = self.resumed_from
        if resumed is not None and resumed.name == f"step-{step - 1:08d}":  # the first update after a resume
            return (f"this is the first update after resuming from {resumed}, which may be damaged: move it aside "
                    f"(rename it to damaged-{resumed.name}) and --resume again to fall back to the one before it")
        last = latest_checkpoint(run_dir / RunFolder.CHECKPOINTS) if run_dir is not None else None
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"


def _finite(net: nn.Module, sharded: bool = False) -> torch.Tensor:
    """One boolean tensor, on the device: whether every trainable weight of ``net`` is finite (``sharded``: on
    every process, each checking its shards). One reduction per tensor: a sum is NaN or inf exactly when a value
    is, and in float64 no sum of float32 values overflows (a norm would, for large finite weights). MPS has no
    float64: there, isfinite per tensor."""
    params = [local(p) for p in net.parameters() if p.requires_grad]  # a frozen weight cannot have changed
    checks = [torch.isfinite(p).all() if p.device.type == "mps" else torch.isfinite(p.sum(dtype=torch.float64))
              for p in params if p.numel()]  # a process may hold an empty shard
    flag = torch.stack(checks).all() if checks else torch.tensor(True, device=params[0].device if params else None)
    if sharded:
        flag = dist.all_reduce(flag.float(), "min") > 0
    return flag
