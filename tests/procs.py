"""Running the CLI (or torchrun) in a child process without ever hanging the test session.

``subprocess.run(..., timeout=...)`` kills only the direct child: under torchrun the workers keep the
output pipes open and ``run`` then waits for them forever (a CI run was killed after 87 min that way).
Here the child gets its own process group; on a timeout every process in it first dumps its Python
stacks (``PYTHONFAULTHANDLER`` prints them on SIGABRT), then the group is killed and the test fails
with the tail of what it printed, so a hang says where it hung.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest


def run_proc(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGABRT, signal.SIGKILL):  # stacks first, then certainly gone
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the group holds the pipes: report without them
            out, err = "", "(no output: the pipes are still held open)"
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\nstdout:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-12000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and res.returncode != 0:
        pytest.fail(f"exit code {res.returncode}: {' '.join(cmd)}\nstderr:\n{err[-6000:]}")
    return res
