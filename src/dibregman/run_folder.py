"""A distillation run folder: the one place that knows its layout, and its records read back.

What ``db.distill`` returns and what the CLI, the API, the reports and the benchmarks read through::

    config.json      the run's options (written at the start)
    stats.jsonl      one row per log window: losses, ratio statistics, timings (``step`` in each)
    metrics.jsonl    the evaluations during training
    checkpoints/     step-XXXXXXXX/ folders (train/checkpoint.py)
    generator/       the finished student (artifacts.py)
    summary.json     the final evaluation: metrics, the teacher's, timings
    samples.npz      the final evaluation's samples (data, teacher, student)
    report.md        the run report, with its PNGs beside it

A ``RunFolder`` is an ``os.PathLike``: ``open``, ``Path(run)``, ``run / "file"`` and every ``Path`` attribute
(``run.exists()``, ``run.name``) work on it as on its path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class RunFolder(os.PathLike):
    CONFIG, STATS, METRICS, SUMMARY, SAMPLES = "config.json", "stats.jsonl", "metrics.jsonl", "summary.json", \
        "samples.npz"
    CHECKPOINTS, GENERATOR, REPORT = "checkpoints", "generator", "report.md"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    # -- a path -------------------------------------------------------------------------------------------
    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        return self.path / other

    def __getattr__(self, name: str) -> Any:  # exists(), name, parent, ...: the path's
        if name == "path":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.path, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RunFolder | os.PathLike | str):
            return self.path == Path(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- its parts ----------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def generator(self) -> Path:
        return self.path / self.GENERATOR

    @property
    def report(self) -> Path:
        return self.path / self.REPORT

    # -- its records (what is missing or unreadable reads as empty) ------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return read_json(self.path / self.CONFIG)

    @property
    def summary(self) -> dict[str, Any]:
        return read_json(self.path / self.SUMMARY)

    @property
    def metrics(self) -> dict[str, float]:
        """The final evaluation's metrics (``summary.json``), ``{}`` before the run finished."""
        return dict(self.summary.get("metrics") or {})

    @property
    def stats(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / self.STATS)

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``: the evaluations during training."""
        return read_jsonl(self.path / self.METRICS)

    @property
    def samples(self) -> dict[str, np.ndarray]:
        """The arrays of ``samples.npz`` by name (``data``, ``teacher``, ``student``), ``{}`` before the end."""
        try:
            with np.load(self.path / self.SAMPLES) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError):
            return {}

    def records(self) -> dict[str, Any]:
        """Everything above as plain values: ``config``, ``summary``, ``stats``, ``metrics`` (the rows of
        ``metrics.jsonl``) and ``samples``."""
        return {"config": self.config, "summary": self.summary, "stats": self.stats, "metrics": self.evaluations,
                "samples": self.samples}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL log that have a ``step``; a torn last line (a run still writing) or blank lines
    are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")  # a damaged line fails to parse below
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out
