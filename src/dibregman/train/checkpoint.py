"""Checkpoints: safetensors weights + torch-saved optimizer/RNG state + JSON metadata, one folder per
step, written to a temporary folder and renamed, so a kill at any moment leaves the last one intact.

Nothing here unpickles arbitrary objects: weights load through safetensors, the rest through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import fsync_dir, write_json

_DONE = "state.json"  # written last: a folder without it is incomplete and ignored


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message says which file and why."""


def save_checkpoint(folder: str | Path, step: int, modules: dict[str, nn.Module],
                    state: dict[str, Any], meta: dict[str, Any], keep: int = 3) -> Path:
    """Write ``folder/step-XXXXXXXX`` atomically; ``state`` holds tensors and plain objects (optimizer
    state dicts, RNG states) for ``torch.save``; ``meta`` is JSON. Keeps the newest ``keep``."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    for stale in root.glob(".tmp-step-*"):  # left by a process killed mid-save (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    for name, module in modules.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    write_json(tmp / _DONE, {"step": step, **meta})
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step (e.g. saved again after resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / _DONE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint that loads; a corrupt newer one is reported and skipped."""
    for path in reversed(list_checkpoints(folder)):
        try:
            read_meta(path)
            return path
        except CheckpointError as e:
            print(f"warning: skipping checkpoint {path}: {e}")
    return None


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / _DONE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is unreadable ({e}); the checkpoint is incomplete or corrupt") from None


def load_module(module: nn.Module, file: str | Path) -> None:
    """Load safetensors weights into ``module``, naming any missing, unexpected or misshapen tensor."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated ({e}); delete it or resume from another") from None
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise CheckpointError(f"{file} does not match this model: missing {missing[:5]}, unexpected "
                              f"{extra[:5]}; was it written with another config?")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{file}: tensor {k!r} has shape {tuple(v.shape)} but this model expects "
                                  f"{tuple(own[k].shape)}; the checkpoint comes from another config")
    module.load_state_dict(tensors)


def load_checkpoint(path: str | Path, modules: dict[str, nn.Module]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``modules``; return ``(state, meta)``."""
    path = Path(path)
    meta = read_meta(path)
    for name, module in modules.items():
        load_module(module, path / f"{name}.safetensors")
    try:
        state = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / 'state.pt'} is corrupt or truncated ({e})") from None
    return state, meta
