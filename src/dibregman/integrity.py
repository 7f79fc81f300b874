"""The integrity of every folder this package writes for later loading (checkpoints, ``generator/``,
``teacher/``, classifier and VAE folders): each ends with ``manifest.json``, the SHA-256 and size of each file
in it, verified before the files are used, so a flipped bit is damage instead of a silently different model;
and the one loader of safetensors weights into a module. The base layer: models and plumbing both use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .io import write_json

MANIFEST = "manifest.json"  # written last: checksums of every other file of the folder
MANIFEST_FORMAT = "dibregman-manifest"
INTEGRITY = "integrity"  # key of a metadata file whose folder must hold a manifest (value: its name)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message says which file and why."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint written for another model (other config): not damage, so resume must not
    fall back past it to an older one."""


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


def _brief(e: BaseException) -> str:
    """The first sentence of a library's error: torch's run to a paragraph of advice."""
    text = " ".join(str(e).split())
    first = text.split(". ")[0]
    return first if len(first) <= 160 else first[:157] + "..."
