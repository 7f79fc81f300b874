"""Runs killed at arbitrary moments: SIGTERM saves and stops cleanly; SIGKILL loses at most the steps since
the last checkpoint; either way, resuming ends with weights bit-identical to an uninterrupted run (CPU)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import run_proc, spawned
from safetensors.torch import load_file

from dibregman.train.checkpoint import list_checkpoints

ARGS = ["distill", "--preset", "tiny", "--steps", "{steps}", "--checkpoint-every", "{every}", "--eval-every", "1000",
        "--log-every", "1000", "--no-progress"]


def cli(out: Path, steps: int, every: int, *extra: str) -> list[str]:
    args = [a.format(steps=steps, every=every) for a in ARGS]
    return [sys.executable, "-m", "dibregman", *args, "--out", str(out), *extra]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run / "checkpoints")[-1]
    return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while not list_checkpoints(run / "checkpoints"):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.slow  # 26 s; SIGINT's save-and-resume stays in the default suite (test_reliability)
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    # The run asks for far more steps than it gets to, so the signal always lands inside training; it is then
    # resumed to a length fixed after the fact (steps may change on resume) and compared with a fresh run of it.
    every = 50
    run = tmp_path / "run"
    with spawned(cli(run, 10**7, every), stderr=subprocess.PIPE, text=True) as proc:
        wait_for_checkpoint(proc, run)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM at step" in err and "--resume" in err and "Traceback" not in err
    stopped = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step-{stopped:08d}"  # saved where it stopped
    steps = stopped + 30
    run_proc(cli(run, steps, every, "--resume"), timeout=300, check=True)
    run_proc(cli(tmp_path / "full", steps, every), timeout=300, check=True)
    assert_same(final_weights(tmp_path / "full"), final_weights(run))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_exact(tmp_path):
    steps, every = 400, 20
    run_proc(cli(tmp_path / "full", steps, every), timeout=300, check=True)
    run, rng, kills = tmp_path / "run", random.Random(0), 0
    first = True
    while kills < 4:
        with spawned(cli(run, steps, every, *([] if first else ["--resume"])), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL) as proc:
            first = False
            wait_for_checkpoint(proc, run)
            time.sleep(rng.uniform(0.0, 1.5))
            proc.kill()  # SIGKILL: no handler runs, files may be half-written
            proc.wait()
        if proc.returncode == 0:
            break
        kills += 1
    run_proc(cli(run, steps, every, "--resume"), timeout=300, check=True)
    assert kills >= 1
    assert not list(run.glob("checkpoints/.tmp-*"))  # half-written checkpoints of killed runs are gone
    assert_same(final_weights(tmp_path / "full"), final_weights(run))
