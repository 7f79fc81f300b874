"""Small weight files shipped with the package (each folder's README.md records the command that made it)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def shipped(dataset: str, kind: str) -> Path | None:
    """The shipped ``kind`` ("teacher" or "classifier") folder for ``dataset``, or None."""
    folder = ROOT / dataset / kind
    return folder if folder.is_dir() else None


def shipped_names(kind: str) -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob(f"*/{kind}") if p.is_dir())
