"""Checkpoints: safetensors weights + torch-saved optimizer/RNG state + JSON metadata, one folder per
step, written to a temporary folder and renamed, so a kill at any moment leaves the last one intact.

Every folder this package writes for later loading (checkpoints, ``generator/``, ``teacher/``, classifier
folders) ends with ``manifest.json``: the SHA-256 and size of each file in it, verified before the
files are used, so a flipped bit is damage (a checkpoint falls back to the previous one) instead of a
silently different model.

Nothing here unpickles arbitrary objects: weights load through safetensors, the rest through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
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
from .config import ConfigError

_DONE = "state.json"  # a folder without it is incomplete and ignored
MANIFEST = "manifest.json"  # written last: checksums of every other file of the folder
MANIFEST_FORMAT = "dibregman-manifest"
INTEGRITY = "integrity"  # key of a metadata file whose folder must hold a manifest (value: its name)


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_regular(path: str | Path, what: str = "checkpoint") -> None:
    """``path`` must be a regular file: a FIFO would block the reader for ever, a device or a folder is damage."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the {what} is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder); the {what} is damaged")


def write_manifest(folder: str | Path, names: list[str]) -> None:
    """Write ``folder/manifest.json`` (atomically, after ``names``, which must be complete)."""
    folder = Path(folder)
    files = {n: {"sha256": file_sha256(folder / n), "bytes": (folder / n).stat().st_size} for n in names}
    write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "version": 1, "files": files})


def verify_manifest(folder: str | Path, required: tuple[str, ...] = (), only: str | None = None,
                    what: str = "checkpoint") -> bool:
    """Check the files of ``folder`` against its manifest: ``False`` if it has none (a folder written before
    manifests), else ``True`` or a ``CheckpointError`` naming the first file that is missing, not regular, or
    of another size or checksum. ``required`` names must be listed; ``only`` checks that one file alone."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return False
    require_regular(path, what)
    try:
        text = path.read_bytes().decode("utf-8")  # bytes: read_text would turn a damaged "\r" into "\n"
        doc = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the {what} is damaged") from None
    # exactly as write_manifest writes it: a changed byte anywhere (a key, the version, white space) is damage
    if text != json.dumps(doc, indent=2, sort_keys=True) + "\n" or not isinstance(doc, dict) \
            or set(doc) != {"format", "version", "files"} or doc.get("version") != 1:
        raise CheckpointError(f"{path} is not as dibregman writes it (an edited or damaged manifest); "
                              f"the {what} is damaged")
    files = doc.get("files") if doc.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict) or not all(
            isinstance(n, str) and isinstance(e, dict) and set(e) == {"sha256", "bytes"}
            and isinstance(e["sha256"], str) and isinstance(e["bytes"], int) for n, e in files.items()):
        raise CheckpointError(f"{path} is not a {MANIFEST_FORMAT} file (format, files, sha256, bytes); "
                              f"the {what} is damaged")
    missing = [n for n in required if n not in files]
    if missing:
        raise CheckpointError(f"{path} lists no checksum for {', '.join(missing)}; the {what} is damaged")
    for name, entry in files.items():
        if only is not None and name != only:
            continue
        if not name or name != os.path.basename(name) or name in (".", ".."):  # never a path out of the folder
            raise CheckpointError(f"{path} names a file outside its folder ({name!r}); the {what} is damaged")
        file = folder / name
        require_regular(file, what)
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes but {MANIFEST} records {entry['bytes']} "
                                  f"(truncated or replaced); the {what} is damaged")
        if file_sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file} does not match its SHA-256 in {MANIFEST} (a flipped bit or an edited "
                                  f"file); the {what} is damaged")
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
        # reported only now: if none loads, the one error below says it all
        for bad, why in damaged:
            moved = _move_aside(bad)
            print(f"warning: checkpoint {bad} is damaged ({why}); moved it to {moved.name}", file=sys.stderr)
        if damaged:
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


def load_module(module: nn.Module, file: str | Path,
                hint: str = "the checkpoint comes from another config", verify: bool = True) -> None:
    """Load safetensors weights into ``module`` (every checkpoint, teacher and generator goes through
    here). Damage (unreadable, NaN/inf, then, with ``verify``, any file of the folder's ``manifest.json`` that
    does not match it) raises ``CheckpointError``; weights of another model raise
    ``CheckpointMismatch`` naming each missing, unexpected or misshapen tensor, then ``hint``."""
    file = Path(file)
    require_regular(file, "folder")
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
    if verify:  # after the structural checks, whose messages are more precise; before anything is loaded
        verify_manifest(file.parent, (file.name,), what="folder")
    module.load_state_dict(tensors)


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


def _brief(e: BaseException) -> str:
    """The first sentence of a library's error: torch's run to a paragraph of advice."""
    text = " ".join(str(e).split())
    first = text.split(". ")[0]
    return first if len(first) <= 160 else first[:157] + "..."
