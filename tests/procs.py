"""Running the CLI (or torchrun) in a child process without ever hanging or swamping the test session.

The child gets its own process group and writes to files, not pipes: a torchrun worker that outlives
the launcher cannot hold the test on a pipe, and a child that prints without end fills a file, not this
process's memory; each child's address space is capped too (a CI run was killed after 87 min inside a
torchrun test, cause unknown: this bounds its time, output and memory). On a timeout every process in
the group first dumps its Python stacks (``PYTHONFAULTHANDLER`` prints them on SIGABRT), then the group
is killed and the test fails with the tail of what it printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

KEEP = 4 * 2**20  # characters kept of each stream (its end): CLI runs print kilobytes
# address space per child (and its workers): a tiny CLI run peaks at 1.3 GB; a runaway one fails with a
# MemoryError of its own instead of pushing the 24 GB machine into swap and the OOM killer
ADDRESS_SPACE = 12 * 2**30


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_proc(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True,
                                preexec_fn=_limit_memory)
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
        for sig in (signal.SIGABRT, signal.SIGKILL) if hung else (signal.SIGKILL,):
            try:  # stacks first, then certainly gone; after a clean exit: any worker left behind
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2 if sig == signal.SIGABRT else 0)
        proc.wait()
        out, err = _tail(fo), _tail(fe)
    if hung:
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\nstdout:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-12000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and res.returncode != 0:
        pytest.fail(f"exit code {res.returncode}: {' '.join(cmd)}\nstderr:\n{err[-6000:]}")
    return res


def _tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - KEEP))
    text = f.read().decode("utf-8", "replace")
    return text if size <= KEEP else f"[{size - KEEP} bytes cut]\n{text}"


@contextlib.contextmanager
def spawned(cmd: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """A child (in its own process group) that the test drives itself; whatever happens in the test, the
    group is killed on the way out, so a failed assertion leaves no run training in the background."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_limit_memory, **popen_kwargs)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
