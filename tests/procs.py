"""Running the CLI (or torchrun) in a child process without ever hanging or swamping the test session.

The child writes to files, not pipes: a torchrun worker that outlives the launcher cannot hold the test
on a pipe, and a child that prints without end fills a file, not this process's memory; each process's
address space is capped too (a CI run was killed after 87 min inside a torchrun test, cause unknown: this
bounds its time, output and memory). On a timeout every process of the child's tree (torchrun starts its
workers in sessions of their own, so a process group would miss them) first dumps its Python stacks
(``PYTHONFAULTHANDLER`` prints them on SIGABRT), then all are killed and the test fails with the tail of
what they printed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

KEEP = 4 * 2**20  # characters kept of each stream (its end): CLI runs print kilobytes
# address space of each child process: a tiny CLI run peaks at 1.3 GB; a runaway one fails with a
# MemoryError of its own instead of pushing the 24 GB machine into swap and the OOM killer. Not under CUDA,
# whose start-up reserves far more address space than it uses.
ADDRESS_SPACE = None if torch.cuda.is_available() else 12 * 2**30


def _limits() -> None:
    if ADDRESS_SPACE is not None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the SIGABRT stack dump leaves no core file


def tree(pid: int) -> list[int]:
    """``pid`` and its living descendants, parents first (read from /proc; just ``pid`` without it)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(pid: int, dump: bool) -> None:
    pids = tree(pid)  # while the launcher lives: its workers are still its children
    for sig in (signal.SIGABRT, signal.SIGKILL) if dump else (signal.SIGKILL,):
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        if sig == signal.SIGABRT:
            time.sleep(2)  # time to print the stacks


def run_proc(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True, preexec_fn=_limits)
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            _kill_tree(proc.pid, dump=True)
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
    """A child that the test drives itself; whatever happens in the test, its process tree is killed on
    the way out, so a failed assertion leaves no run training in the background."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_limits, **popen_kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid, dump=False)
        proc.wait()
