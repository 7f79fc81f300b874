"""Checkpoints: safetensors weights + torch-saved optimizer/RNG state + JSON metadata, one folder per
step, written to a temporary folder and renamed, so a kill at any moment leaves the last one intact.

A checkpoint ends with ``manifest.json`` like every folder this package writes for later loading
(``integrity.py``), so a flipped bit is damage: resume falls back to the previous checkpoint.

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
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .. import dist
from ..integrity import (  # noqa: F401  (the folder checks; re-exported for callers that import them from here)
    INTEGRITY,
    MANIFEST,
    MANIFEST_FORMAT,
    CheckpointError,
    CheckpointMismatch,
    _brief,
    file_sha256,
    load_module,
    require_regular,
    verify_manifest,
    write_manifest,
)
from ..io import RunIOError, describe_write_error, fsync_dir, write_json
from .config import ConfigError

_DONE = "state.json"  # a folder without it is incomplete and ignored


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
        write_json(tmp / target.name, {"step": step, **meta, INTEGRITY: MANIFEST})
        target = final / MANIFEST
        write_manifest(tmp, [*(f"{name}.safetensors" for name in modules), "state.pt", _DONE])
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


def same_arguments(config: dict[str, Any], out: Path) -> Callable[[dict[str, Any]], None]:
    """A ``load_latest`` check for a run whose checkpoints record the arguments they ran with (``config``): a resume
    with others is refused, naming them."""

    def check(meta: dict[str, Any]) -> None:
        if meta.get("config") != config:
            raise ConfigError(f"cannot resume {out}: it was started with other arguments ({meta.get('config')}); "
                              "resume with the same ones, or use another --out for a new run")

    return check


def load_latest(folder: str | Path, modules: dict[str, nn.Module],
                check: Callable[[dict[str, Any]], None] | None = None,
                restore: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
                ) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """Load the newest checkpoint that loads completely into ``modules``; ``None`` if there is none.

    A damaged one (unreadable metadata, truncated weights or state, a file not matching its checksum,
    entries ``restore(state, meta)`` finds missing or mistyped) is reported on stderr and moved aside to
    ``damaged-step-XXXXXXXX`` (kept for inspection; out of the way of pruning and of the next resume), and
    the next older one is tried. ``check(meta)`` runs before any weights are read. Its errors (e.g. a
    changed config) and ``CheckpointMismatch`` are not damage when every checkpoint fails the same way
    (the newest one's error propagates, nothing moved); a newer checkpoint that fails them while an older
    one loads is damage (a changed digit or a flipped bit in a tensor name of a folder without checksums).
    If every checkpoint is damaged, ``CheckpointError`` names them all and nothing is moved.
    """
    damaged: list[tuple[Path, str]] = []
    mismatch: Exception | None = None
    for path in reversed(list_checkpoints(folder)):
        try:
            meta = read_meta(path)
            if check is not None:
                check(meta)
            state, meta = load_checkpoint(path, modules)
            if restore is not None:
                try:
                    restore(state, meta)
                except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
                    raise CheckpointError(f"{path / 'state.pt'} or {path / _DONE} lacks or mistypes an entry "
                                          f"({type(e).__name__}: {_brief(e)})") from None
        except CheckpointMismatch as e:
            mismatch = mismatch or e
            damaged.append((path, f"{_brief(e)}, while an older checkpoint matches"))
            continue
        except CheckpointError as e:
            damaged.append((path, str(e)))
            continue
        except ValueError as e:  # the config check (ConfigError)
            if check is None or not isinstance(e, ConfigError):
                raise
            mismatch = mismatch or e
            damaged.append((path, f"{_brief(e)}, while an older checkpoint matches"))
            continue
        # reported only now: if none loads, the one error below says it all. Under torchrun every process reads
        # the same files and decides alike; process 0 alone moves the damaged ones aside (two would race)
        for bad, why in damaged if dist.is_main() else ():
            moved = _move_aside(bad)
            print(f"warning: checkpoint {bad} is damaged ({why}); moved it to {moved.name}", file=sys.stderr)
        if damaged and dist.is_main():
            print(f"resuming from {path}, the newest checkpoint that loads", file=sys.stderr)
        return path, state, meta
    if mismatch is not None:  # no checkpoint matches: another config or model, not damage
        raise mismatch
    if damaged:
        names = ", ".join(p.name for p, _ in damaged)
        raise CheckpointError(f"every checkpoint in {folder} is damaged ({names}; the newest: {damaged[0][1]}); "
                              "nothing to resume from: start a new run with another --out")
    return None


def check_any(folder: str | Path, check: Callable[[dict[str, Any]], None]) -> None:
    """``check(meta)`` of the newest checkpoint whose metadata reads; if it fails but an older one passes, the
    newest is damage that ``load_latest`` will handle (so nothing is raised); if none passes, the newest's
    error is raised. For refusing a changed config before any expensive work."""
    first: Exception | None = None
    for path in reversed(list_checkpoints(folder)):
        try:
            check(read_meta(path))
            return
        except CheckpointError:
            continue
        except ValueError as e:
            if not isinstance(e, ConfigError):
                raise
            first = first or e
    if first is not None:
        raise first


def entry(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str | Path,
          default: Any = ...) -> Any:
    """``doc[key]`` if it is a ``kind`` (bool is no int), else ``TypeError``/``KeyError`` naming ``where``:
    for ``restore`` callbacks of ``load_latest``, which turn them into damage."""
    if key not in doc:
        if default is not ...:
            return default
        raise KeyError(f"{where} has no {key!r}")
    value = doc[key]
    if (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))) \
            or not isinstance(value, kind):
        raise TypeError(f"{where}: {key!r} is {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


def _move_aside(path: Path) -> Path:
    dest, n = path.with_name(f"damaged-{path.name}"), 1
    while dest.exists():
        dest, n = path.with_name(f"damaged-{path.name}-{n}"), n + 1
    os.replace(path, dest)
    return dest


def read_meta(path: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint, checked against its checksum and its folder's step number (without
    the manifest marker, which is the checkpoint's business, not its caller's)."""
    p = Path(path) / _DONE
    require_regular(p)
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is unreadable ({e}); the checkpoint is incomplete or corrupt") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool):
        raise CheckpointError(f"{p} holds no step number; the checkpoint is corrupt")
    marker = meta.pop(INTEGRITY, None)
    if marker is not None and (marker != MANIFEST or not verify_manifest(p.parent, (_DONE,), only=_DONE)):
        raise CheckpointError(f"{p.parent / MANIFEST} is missing (its {_DONE} says it has one); "
                              "the checkpoint is damaged")
    name = p.parent.name
    if name.startswith("step-") and name[5:].isdigit() and int(name[5:]) != meta["step"]:
        raise CheckpointError(f"{p} says step {meta['step']} but its folder is {name}; the checkpoint is damaged "
                              "or was renamed")
    return meta


def load_checkpoint(path: str | Path, modules: dict[str, nn.Module]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``modules``; return ``(state, meta)``."""
    path = Path(path)
    meta = read_meta(path)
    verify_manifest(path, (*(f"{name}.safetensors" for name in modules), "state.pt"))  # all, once
    for name, module in modules.items():
        load_module(module, path / f"{name}.safetensors", verify=False)
    require_regular(path / "state.pt")
    try:
        state = torch.load(path / "state.pt", weights_only=True)  # no pickled code runs (tensors, dicts)
    except Exception as e:  # zip damage, or a pickle asking for more than tensors and plain containers
        raise CheckpointError(f"{path / 'state.pt'} is corrupt, truncated or not a plain state file "
                              f"({_brief(e)})") from None
    return state, meta
