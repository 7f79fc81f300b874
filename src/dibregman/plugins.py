"""The user's code: named by a spec string ``py:<module>:<function>`` (a divergence's convex ``h``, a function
that builds a teacher), imported as ``python -m`` would find it, from the working directory too; or
registered in a ``Registry`` of a plug-in point (teacher formats, critic heads) under a name of its own."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function ``py:<module>:<function>`` names; a ``ValueError`` naming ``what`` it should be otherwise.
    The working directory is on the import path only for this import: the caller's ``sys.path`` is kept."""
    module, _, name = spec.removeprefix("py:").rpartition(":")
    if not spec.startswith("py:") or not module or not name:
        raise ValueError(f"{what} from your own code is 'py:<module>:<function>'; got {spec!r}")
    added = "" not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {what} {spec!r}: {e}") from None
    finally:
        if added:
            sys.path.remove("")
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable; it must be {what}")
    return fn


@dataclass(frozen=True)
class Entry:
    """One implementation of a plug-in point: ``make`` builds it, ``usage`` is how an option names it."""
    name: str
    make: Callable[..., Any]
    help: str
    usage: str
    check: bool  # what it makes is checked against the contract (code from outside the package)


class Registry:
    """The named implementations of one plug-in point (teacher formats, critic heads). Validation, the
    CLI's ``--help`` and ``dibregman list`` read it, so a registered name is accepted and shown everywhere::

        @CRITIC_HEADS.register("mine", help="a head on ...")
        def build(teacher, base, fake_score, cfg): ...
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, make: Callable[..., Any] | None = None, *, help: str, usage: str | None = None,
                 check: bool = True) -> Any:
        """Add ``make`` as ``name`` (or, without ``make``, a decorator that does). A taken name is refused."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a {self.what} name is letters, digits, '_' and '-'; got {name!r}")

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered already")
            self._entries[name] = Entry(name, fn, help, usage or name, check)
            return fn

        return add(make) if make is not None else add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def describe(self, sep: str = "; ") -> str:
        """Each entry as ``usage (help)``: the text of ``--help`` and ``dibregman list``."""
        return sep.join(f"{e.usage} ({e.help})" for e in self._entries.values())
