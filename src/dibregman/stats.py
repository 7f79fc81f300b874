"""Training statistics: per-step values are averaged over a logging window and appended to JSONL
(and, optionally, written as TensorBoard scalars)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .io import append_line, atomic_write_text

_TB_HINT = "TensorBoard logging needs the tensorboard package: pip install 'dibregman[tensorboard]'"


def tensorboard_writer(log_dir: str | Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``; imported here so tensorboard stays optional."""
    try:  # torch's wrapper raises ImportError itself when the tensorboard package is missing
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"{_TB_HINT} ({e})") from e
    return SummaryWriter(log_dir=str(log_dir))


class Stats:
    """Accumulates ``{name: value}`` between flushes; min/max keys keep their extremes, others the mean.

    A value may be a float or a one-element tensor. Tensors stay where they are (on the GPU, say) and are
    combined there; all of them are read in one transfer when the window is reduced or flushed, so a
    training step that logs tensors never waits for the device.

    ``tensorboard``: a log folder that also receives every flushed row as scalars ``(key, value, step)``.
    Only the writing process (``write=True``, rank 0) opens it, so other ranks need no tensorboard install.
    """

    def __init__(self, path: str | Path, write: bool = True, tensorboard: str | Path | None = None):
        self.path, self.write = Path(path), write
        self._pending: dict[str, list[float | torch.Tensor]] = defaultdict(list)  # not yet read
        self._sum: dict[str, float] = defaultdict(float)
        self._n: dict[str, int] = defaultdict(int)
        self._ext: dict[str, float] = {}
        self._tb = tensorboard_writer(tensorboard) if write and tensorboard is not None else None

    def add(self, values: dict[str, float | torch.Tensor]) -> None:
        for key, v in values.items():
            self._pending[key].append(v.detach().reshape(()) if isinstance(v, torch.Tensor) else float(v))

    def _read(self) -> None:
        """Fold the pending values into the window: the tensors in one transfer per device and dtype."""
        tensors: dict[Any, list[tuple[list, int]]] = defaultdict(list)
        for values in self._pending.values():
            for i, v in enumerate(values):
                if isinstance(v, torch.Tensor):
                    tensors[v.device, v.dtype].append((values, i))
        for slots in tensors.values():  # float64 on the CPU only: MPS has none
            floats = torch.stack([vs[i] for vs, i in slots]).cpu().double().tolist()
            for (vs, i), f in zip(slots, floats, strict=True):
                vs[i] = f
        for key, values in self._pending.items():
            if key.endswith("_min"):
                self._ext[key] = min([*values, self._ext.get(key, math.inf)])
            elif key.endswith("_max"):
                self._ext[key] = max([*values, self._ext.get(key, -math.inf)])
            else:
                self._sum[key] += sum(values)
                self._n[key] += len(values)
        self._pending.clear()

    def all_reduce(self) -> None:
        """Make the window's values global under torchrun: sums and counts add up, extremes combine."""
        from . import dist

        self._read()
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
        self._read()
        row: dict[str, float] = {"step": step}
        row.update({k: self._sum[k] / self._n[k] for k in self._sum})
        row.update(self._ext)
        self._sum.clear()
        self._n.clear()
        self._ext.clear()
        if self.write:
            append_jsonl(self.path, row)
            if self._tb is not None:
                for key, value in row.items():
                    if key != "step":
                        self._tb.add_scalar(key, value, step)
                self._tb.flush()  # rows are rare (one per window): keep the event file as current as the JSONL
        return row

    def close(self) -> None:
        """Flush and close the TensorBoard writer (if any); the JSONL needs nothing. Safe to call twice."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def append_jsonl(path: str | Path, row: dict) -> None:
    append_line(path, json.dumps(row, sort_keys=True))


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a crash mid-append) is ignored, any other bad line raises."""
    p = Path(path)
    if not p.exists():
        return []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text (bad byte at offset {e.start}): the log is damaged; move it "
                         "aside (the checkpoints hold the run) and resume, or start a new run") from None
    lines = [line for line in text.splitlines() if line.strip()]
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
