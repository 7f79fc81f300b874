"""Training statistics: per-step values are averaged over a logging window and appended to JSONL."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from .io import append_line, atomic_write_text


class Stats:
    """Accumulates ``{name: float}`` between flushes; min/max keys keep their extremes, others the mean."""

    def __init__(self, path: str | Path, write: bool = True):
        self.path, self.write = Path(path), write
        self._sum: dict[str, float] = defaultdict(float)
        self._n: dict[str, int] = defaultdict(int)
        self._ext: dict[str, float] = {}

    def add(self, values: dict[str, float]) -> None:
        for key, v in values.items():
            v = float(v)
            if key.endswith("_min"):
                self._ext[key] = min(v, self._ext.get(key, math.inf))
            elif key.endswith("_max"):
                self._ext[key] = max(v, self._ext.get(key, -math.inf))
            else:
                self._sum[key] += v
                self._n[key] += 1

    def all_reduce(self) -> None:
        """Make the window's values global under torchrun: sums and counts add up, extremes combine."""
        from . import dist

        if dist.world_size() == 1:
            return
        keys, ext = sorted(self._sum), sorted(self._ext)
        dev = dist.collective_device()
        sums = dist.all_reduce_sum(torch.tensor([self._sum[k] for k in keys] + [float(self._n[k]) for k in keys],
                                                dtype=torch.float64, device=dev)).cpu()
        for i, k in enumerate(keys):
            self._sum[k], self._n[k] = float(sums[i]), int(sums[len(keys) + i])
        for k in ext:
            self._ext[k] = float(dist.all_reduce(torch.tensor([self._ext[k]], dtype=torch.float64, device=dev),
                                                 "min" if k.endswith("_min") else "max"))

    def flush(self, step: int) -> dict[str, float]:
        row: dict[str, float] = {"step": step}
        row.update({k: self._sum[k] / self._n[k] for k in self._sum})
        row.update(self._ext)
        self._sum.clear()
        self._n.clear()
        self._ext.clear()
        if self.write:
            append_jsonl(self.path, row)
        return row


def append_jsonl(path: str | Path, row: dict) -> None:
    append_line(path, json.dumps(row, sort_keys=True))


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a crash mid-append) is ignored, any other bad line raises."""
    p = Path(path)
    if not p.exists():
        return []
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{p}: line {i + 1} is not valid JSON") from None
    return rows


def truncate_jsonl(path: str | Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the log reads as one uninterrupted run."""
    p = Path(path)
    if p.exists():
        rows = [r for r in read_jsonl(p) if r.get("step", 0) <= after_step]
        atomic_write_text(p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
