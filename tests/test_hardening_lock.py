"""Issue 11, defect 1: one run folder, one process (docs/reliability.md, "Two processes on one folder")."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import run_proc
from test_reliability import FLAGS, assert_one_line_error, run_cli, snapshot

from dibregman.train.checkpoint import save_checkpoint
from dibregman.train.guard import holds_run_lock, prepare_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")

HOLDER = """
import sys, time
from pathlib import Path
from dibregman.train.guard import prepare_run_dir
prepare_run_dir(Path(sys.argv[1]), resume=False)
print("locked", flush=True)
time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that has just started a run in ``folder`` (before writing any file)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_process_on_a_live_run_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "race"
    holder = _holder(run)
    try:
        assert list(run.iterdir()) == []  # the window the old check missed: no config.json, no checkpoints yet
        for extra in ([], ["--resume"]):
            code, _, err = run_cli(capsys, "distill", *FLAGS, "--out", run, *extra)
            assert_one_line_error(code, err, str(run), "in use by another running dibregman process",
                                  "another --out")
        code, _, err = run_cli(capsys, "train-teacher", "--preset", "tiny", "--no-progress", "--out", run)
        assert_one_line_error(code, err, "in use by another running dibregman process")
        assert list(run.iterdir()) == []  # nothing written by the refused runs
    finally:
        holder.kill()
        holder.wait()
    # the holder died: the kernel dropped its lock, and the folder (still empty) takes a run
    holds_run_lock(prepare_run_dir)(run, resume=False)


def test_the_lock_is_held_for_the_life_of_a_run_and_released_after(tmp_path):
    run = tmp_path / "run"

    @holds_run_lock
    def a_run() -> None:
        prepare_run_dir(run, resume=False)
        fd = os.open(run, os.O_RDONLY)  # another open file description: as another process would see it
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)

    a_run()
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the run returned
    finally:
        os.close(fd)


def test_the_entry_points_release_their_run_folder_when_they_return(tmp_path):
    """Not only the decorator: the real ``distill`` and ``train_teacher`` wear it (a run that kept its folder
    locked after returning would refuse every later process, and a resume from this one)."""
    import dibregman as db

    runs = [db.distill(out=str(tmp_path / "d"), preset="tiny", progress=False),
            db.train_teacher(out=str(tmp_path / "t"), preset="tiny", progress=False)]
    for run in runs:
        fd = os.open(run, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_stale_temporary_folders_are_removed_only_when_their_process_is_dead(tmp_path):
    root = tmp_path / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = root / ".tmp-step-00000004-1"  # pid 1 is always alive: a checkpoint in progress elsewhere
    gone = root / f".tmp-step-00000004-{dead.pid}"
    mine = root / f".old-step-00000002-{os.getpid()}"  # left by an earlier failed save of this process
    for folder in (live, gone, mine):
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"partial")
    save_checkpoint(root, 2, {"net": torch.nn.Linear(2, 2)}, {}, {})
    assert live.is_dir() and snapshot(live) == {"state.pt": snapshot(live)["state.pt"]}
    assert not gone.exists() and not mine.exists()


@pytest.mark.slow
def test_under_torchrun_a_refused_folder_is_one_line_from_process_0(tmp_path):
    """Defect 16: the other process stops quietly with the same code instead of a gloo traceback."""
    held = tmp_path / "held"
    (held / "checkpoints").mkdir(parents=True)  # a started run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dibregman",
           "distill", "--preset", "tiny", "--no-progress", "--out", str(held)]
    res = run_proc(cmd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("dibregman: error:")]
    assert lines == [f"dibregman: error: {held} already holds a run; pass --resume to continue it, or choose "
                     "another --out"], res.stderr
    # no traceback of ours (torchrun's launcher still prints its own ChildFailedError summary, and exits 1)
    assert "[rank" not in res.stderr and "dibregman/" not in res.stderr, res.stderr[-3000:]
    assert re.search(r"exitcode\s*: 2", res.stderr), res.stderr[-3000:]
