"""Atomic file writes: a reader (or a crash) never sees a half-written file (checkpoint folders: train/checkpoint.py).

Each writer fills a temporary file in the destination's folder (same file system, so the rename is
atomic), flushes and fsyncs it, ``os.replace``-s it over the destination, then fsyncs the folder so the
rename itself survives a power cut. On any error the temporary is removed and the old file is kept,
and an ``OSError`` (disk full, read-only, no permission) becomes a ``RunIOError`` that names the file
and the fix, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

PathLike = str | os.PathLike

# mkstemp/mkdtemp create private (0600/0700) entries; give results the modes open()/mkdir() would.
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunIOError(OSError):
    """Writing a run file failed for a reason outside the program (disk full, read-only file system, no
    permission): the message names the file, the cause and the fix. ``errno`` is the original one."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:  # OSError would prefix "[Errno N]"
        return self.message


_HINTS = {
    errno.ENOSPC: ("no space left on device", "free some space or choose another --out"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another --out"),
    errno.EROFS: ("read-only file system", "choose a writable --out"),
    errno.EACCES: ("permission denied", "choose a writable --out"),
    errno.EPERM: ("operation not permitted", "choose a writable --out"),
}


def describe_write_error(e: OSError, path: PathLike, doing: str = "writing") -> str:
    """``"<cause> while writing <path>; <fix>"`` for an OSError raised while writing ``path``."""
    cause, fix = _HINTS.get(e.errno, (e.strerror or str(e), "check the output folder (--out) and free space"))
    return f"{cause} while {doing} {path}; {fix}"


@contextlib.contextmanager
def writing(path: PathLike, note: str = "") -> Iterator[None]:
    """Turn an OSError raised in the block into a ``RunIOError`` about ``path`` (``note`` is appended)."""
    try:
        yield
    except RunIOError:
        raise
    except OSError as e:
        raise RunIOError(describe_write_error(e, path) + note, e.errno) from e


def fsync_dir(folder: PathLike) -> None:
    """Persist a folder's entries (renames, new files). A no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_open(p) as f: f.write(...)``: ``p`` appears complete at the end of the block, or
    is left as it was if the block raises."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    """Atomic JSON with sorted keys, two-space indent and a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    """Tensors are copied to contiguous CPU memory first (safetensors refuses views and shared storage)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def append_line(path: PathLike, line: str) -> None:
    """Append one line to a log (JSONL). Not atomic: a crash mid-append leaves a torn last line, which
    ``stats.read_jsonl`` ignores and a resume removes."""
    with writing(path), open(path, "a") as f:
        f.write(line + "\n")


def read_json_or_toml(path: PathLike, what: str = "file") -> Any:
    """Parse a ``.json`` or ``.toml`` file; errors name the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ValueError(f"{what} must end in .json or .toml; got {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    try:
        if suffix == ".json":
            return json.loads(text)
        try:
            import tomllib  # Python >= 3.11
        except ModuleNotFoundError:  # Python 3.10: the same parser as a package
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ValueError("reading TOML on Python 3.10 needs the 'tomli' package (or use JSON)") from None
        return tomllib.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are both ValueErrors
        raise ValueError(f"could not parse {p} as {suffix[1:].upper()}: {e}") from None


def read_tagged_json(path: PathLike, fmt: str, fix: str) -> dict[str, Any]:
    """A JSON object whose ``format`` entry is ``fmt`` (the metadata beside saved weights); anything
    else raises a ValueError naming the file and ending with ``fix``."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON ({e}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{p} is not a {fmt} file (format {found!r}); {fix}")
    return doc


def require_files(folder: PathLike, what: str, names: tuple[str, ...], make: str) -> Path:
    """``folder`` as a Path after checking it holds ``names``; else a FileNotFoundError saying how to
    ``make`` one (``what``: "teacher", "classifier", ... for the message)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist; {make} or check the path")
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{what} folder {str(folder)!r} has no {name}; a {what} folder needs "
                                    f"{' and '.join(names)} ({make})")
    return folder
