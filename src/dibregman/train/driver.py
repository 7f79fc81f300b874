"""The run driver shared by distillation and teacher training: the plumbing around a training step (the run
folder's logs on a start or resume, progress, the log and checkpoint cadence, a clean stop on SIGINT/SIGTERM).
It knows nothing of what a step trains; the caller passes the step, the checkpoint writer and the hooks."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from .. import dist
from ..io import write_json
from ..run_folder import RunFolder
from ..stats import Stats, truncate_jsonl
from .guard import Interrupted, deferred_signals


class RunDriver:
    """Runs ``update(step)`` from the current step to ``steps``; after each step it adds ``time/step_s``, reduces
    and writes the stats every ``log_every`` steps and at the last, calls ``after``, checkpoints every
    ``checkpoint_every`` steps and at the last, and on SIGINT/SIGTERM (on any process) checkpoints where it
    stopped and raises ``Interrupted`` (under torchrun at the next log or checkpoint step). Only process 0
    writes; every process runs the same cadence."""

    def __init__(self, out: Path, steps: int, log_every: int, checkpoint_every: int, *, desc: str,
                 progress: bool | None = None, tensorboard: bool = False, logs: tuple[str, ...] = (RunFolder.STATS,)):
        self.out, self.steps, self.log_every, self.checkpoint_every = out, steps, log_every, checkpoint_every
        self.main, self.desc, self.logs = dist.is_main(), desc, logs
        self.show = (sys.stderr.isatty() if progress is None else progress) and self.main
        self.stats = Stats(out / RunFolder.STATS, write=self.main, tensorboard=out / "tensorboard" if tensorboard
                           else None)
        self.step_times: list[float] = []

    def begin(self, step: int, config: dict, resume: bool, loaded: Path | None) -> None:
        """On a start or resume at ``step``: rows logged after the checkpoint (all of them, if none loaded) belong
        to no run now; then ``config.json``."""
        if not self.main:
            return
        if resume:
            for log in self.logs:
                truncate_jsonl(self.out / log, step)
        if loaded is not None:
            print(f"resuming from {loaded} (step {step})", file=sys.stderr)
        write_json(self.out / RunFolder.CONFIG, config)

    def run(self, step: int, update: Callable[[int], None], save: Callable[[int], None], *,
            extra: Callable[[int, bool], dict] | None = None,
            after: Callable[[int, dict | None], dict | None] | None = None,
            check: Callable[[], None] | None = None,
            whole_state: Callable[[], contextlib.AbstractContextManager] | None = None) -> int:
        """Steps from ``step``; returns the last. ``update(step)`` trains one step and adds its stats (timed);
        ``extra(step, logging)`` gives stats measured outside the timing (``logging``: this step writes a row);
        ``save(step)`` writes a checkpoint (called on process 0, the others wait for it); ``after(step, row)``
        (``row``: the written stats row, or None) may return values for the progress bar. ``check()`` (a deferred
        finite check, ``NonFiniteGuard.check``) runs before every stats row and every checkpoint: what it refuses
        is never logged or saved. ``whole_state()`` is entered on every process around each checkpoint (a sharded
        run gathers its state there)."""
        bar = tqdm(total=self.steps, initial=step, disable=not self.show, desc=self.desc, dynamic_ncols=True)

        def checkpoint(at: int) -> None:
            if check is not None:
                check()
            with whole_state() if whole_state is not None else contextlib.nullcontext():
                if self.main:
                    save(at)
            dist.barrier()

        try:
            with deferred_signals() as interrupt:
                while step < self.steps:
                    t0 = time.perf_counter()
                    update(step)
                    step += 1
                    self.step_times.append(time.perf_counter() - t0)
                    self.stats.add({"time/step_s": self.step_times[-1]})
                    logging = step % self.log_every == 0 or step == self.steps
                    if extra is not None:
                        self.stats.add(extra(step, logging))
                    row = None
                    if logging:
                        if check is not None:
                            check()
                        self.stats.all_reduce()
                        row = self.stats.flush(step)
                    shown = after(step, row) if after is not None else None
                    if shown:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
                    if step % self.checkpoint_every == 0 or step == self.steps:
                        checkpoint(step)
                    bar.update(1)
                    # under torchrun the processes agree on a stop at log and checkpoint steps only: the agreement
                    # is a collective, which would make every step wait for the device
                    saved = step % self.checkpoint_every == 0 or step == self.steps
                    polled = dist.world_size() == 1 or logging or saved
                    if polled and dist.any_true(interrupt["signum"] is not None):  # stop here, saved
                        if not saved:
                            checkpoint(step)
                        signum = interrupt["signum"] or signal.SIGTERM  # a process that saw none stops too
                        raise Interrupted(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in "
                                          f"{self.out / 'checkpoints'}; continue with --resume", signum)
        finally:
            bar.close()
            self.stats.close()
        return step
