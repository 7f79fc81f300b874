"""The test helper that runs child processes: a hang fails the test in bounded time, grandchildren included."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from procs import run_proc

# a child that starts a grandchild in a session of its own holding the same outputs (as torchrun starts its
# workers), then both hang
HANG = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(g.pid, flush=True)
time.sleep(600)
"""


def test_a_hung_process_tree_fails_the_test_and_is_killed():
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"timed out after 3 s") as e:
        run_proc([sys.executable, "-c", HANG], timeout=3)
    assert time.monotonic() - t0 < 30
    assert "Fatal Python error: Aborted" in str(e.value)  # the stacks of the hung process were printed
    grandchild = int(str(e.value).split("stdout:\n")[1].split()[0])
    time.sleep(0.5)
    assert not _running(grandchild)  # killed with its group


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's first process may never reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_output_and_exit_code_come_back():
    res = run_proc([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                   timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")
    with pytest.raises(pytest.fail.Exception, match="exit code 3"):
        run_proc([sys.executable, "-c", "raise SystemExit(3)"], timeout=60, check=True)


def test_a_child_cannot_take_the_machine_s_memory():
    res = run_proc([sys.executable, "-c", "bytearray(16 * 2**30)"], timeout=60)  # refused, never touched
    assert res.returncode == 1 and "MemoryError" in res.stderr
