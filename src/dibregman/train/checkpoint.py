"""Checkpoints: safetensors weights + torch-saved optimizer/RNG state + JSON metadata, one folder per
step, written to a temporary folder and renamed, so a kill at any moment leaves the last one intact.

Nothing here unpickles arbitrary objects: weights load through safetensors, the rest through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..io import RunIOError, describe_write_error, fsync_dir, write_json

_DONE = "state.json"  # written last: a folder without it is incomplete and ignored


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message says which file and why."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint written for another model (other config): not damage, so resume must not
    fall back past it to an older one."""


def _write_bytes(path: Path, data: bytes) -> None:
    # Python file I/O rather than safetensors.save_file: its I/O errors arrive as SafetensorError without
    # an errno (and it renames a temporary over the target), so a full disk could not be told apart.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(folder: str | Path, step: int, modules: dict[str, nn.Module],
                    state: dict[str, Any], meta: dict[str, Any], keep: int = 3) -> Path:
    """Write ``folder/step-XXXXXXXX`` atomically; ``state`` holds tensors and plain objects (optimizer
    state dicts, RNG states) for ``torch.save``; ``meta`` is JSON. Keeps the newest ``keep``.

    On any failure the temporary folder is removed and the previous checkpoints are untouched; an
    ``OSError`` (disk full, read-only, no permission) becomes a ``RunIOError`` naming the intact one."""
    root = Path(folder)
    previous = list_checkpoints(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    aside = root / f".old-step-{step:08d}-{os.getpid()}"
    target = final  # the file being written, named as it will appear (not its temporary path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
            if not _alive(stale.name.rpartition("-")[2]):  # left by a killed process (or by this one)
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for name, module in modules.items():
            target = final / f"{name}.safetensors"
            tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            _write_bytes(tmp / target.name, safetensors_bytes(tensors))
        target = final / "state.pt"
        with open(tmp / target.name, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        target = final / _DONE
        write_json(tmp / target.name, {"step": step, **meta})
        fsync_dir(tmp)
        target = final
        if final.exists():  # the same step saved again (e.g. after a resume): swap, never delete first
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException as e:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no checkpoint was written yet"
        cause = e.__cause__ if isinstance(e, RunIOError) and isinstance(e.__cause__, OSError) else e
        raise RunIOError(f"{describe_write_error(cause, target)}; {kept}", e.errno) from e
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _alive(pid: str) -> bool:
    """Whether ``pid`` (a temporary folder's suffix) is another process that is still running: its folder
    may be a checkpoint in progress (the run-folder lock keeps a second run out; this is a second guard)."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / _DONE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint whose metadata reads (a cheap check; ``load_latest`` loads everything)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            read_meta(path)
            return path
        except CheckpointError as e:
            print(f"warning: skipping checkpoint {path}: {e}", file=sys.stderr)
    return None


def load_latest(folder: str | Path, modules: dict[str, nn.Module],
                check: Callable[[dict[str, Any]], None] | None = None,
                ) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """Load the newest checkpoint that loads completely into ``modules``; ``None`` if there is none.

    A damaged one (unreadable metadata, truncated weights or state) is reported on stderr and moved
    aside to ``damaged-step-XXXXXXXX`` (kept for inspection; out of the way of pruning and of the next
    resume), and the next older one is tried. ``check(meta)`` runs before any weights are read; its
    errors (e.g. a changed config) and ``CheckpointMismatch`` propagate: they are not damage, and an
    older checkpoint would fail the same way. If every checkpoint is damaged, ``CheckpointError`` names
    them all and nothing is moved.
    """
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(folder)):
        try:
            meta = read_meta(path)
            if check is not None:
                check(meta)
            state, meta = load_checkpoint(path, modules)
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            damaged.append((path, str(e)))
            continue
        # reported only now: if none loads, the one error below says it all
        for bad, why in damaged:
            moved = _move_aside(bad)
            print(f"warning: checkpoint {bad} is damaged ({why}); moved it to {moved.name}", file=sys.stderr)
        if damaged:
            print(f"resuming from {path}, the newest checkpoint that loads", file=sys.stderr)
        return path, state, meta
    if damaged:
        names = ", ".join(p.name for p, _ in damaged)
        raise CheckpointError(f"every checkpoint in {folder} is damaged ({names}; the newest: {damaged[0][1]}); "
                              "nothing to resume from: start a new run with another --out")
    return None


def _move_aside(path: Path) -> Path:
    dest, n = path.with_name(f"damaged-{path.name}"), 1
    while dest.exists():
        dest, n = path.with_name(f"damaged-{path.name}-{n}"), n + 1
    os.replace(path, dest)
    return dest


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / _DONE
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is unreadable ({e}); the checkpoint is incomplete or corrupt") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{p} holds no step number; the checkpoint is corrupt")
    return meta


def load_module(module: nn.Module, file: str | Path,
                hint: str = "the checkpoint comes from another config") -> None:
    """Load safetensors weights into ``module`` (every checkpoint, teacher and generator goes through
    here). Damage (unreadable, NaN/inf) raises ``CheckpointError``; weights of another model raise
    ``CheckpointMismatch`` naming each missing, unexpected or misshapen tensor, then ``hint``."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated ({_brief(e)})") from None
    own = module.state_dict()
    problems = [f"tensor {k!r} is missing" for k in own if k not in tensors]
    problems += [f"tensor {k!r} is not part of this model" for k in tensors if k not in own]
    problems += [f"tensor {k!r} has shape {list(tensors[k].shape)} but this model expects {list(v.shape)}"
                 for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]  # in the model's order
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointMismatch(f"{file} does not match this model: {'; '.join(problems[:5])}{more}; {hint}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{file}: tensors {bad[:5]} hold NaN or inf; the file is damaged or its run diverged")
    module.load_state_dict(tensors)


def load_checkpoint(path: str | Path, modules: dict[str, nn.Module]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``modules``; return ``(state, meta)``."""
    path = Path(path)
    meta = read_meta(path)
    for name, module in modules.items():
        load_module(module, path / f"{name}.safetensors")
    try:
        state = torch.load(path / "state.pt", weights_only=True)  # no pickled code runs (tensors, dicts)
    except Exception as e:  # zip damage, or a pickle asking for more than tensors and plain containers
        raise CheckpointError(f"{path / 'state.pt'} is corrupt, truncated or not a plain state file "
                              f"({_brief(e)})") from None
    return state, meta


def _brief(e: BaseException) -> str:
    """The first sentence of a library's error: torch's run to a paragraph of advice."""
    text = " ".join(str(e).split())
    first = text.split(". ")[0]
    return first if len(first) <= 160 else first[:157] + "..."
