"""Named implementations of a plug-in point (divergences, teacher formats, critic heads, backbones, image sources,
sigma samplers): a pure name table, so the math may keep one too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One implementation of a plug-in point: ``make`` builds it, ``usage`` is how an option names it."""
    name: str
    make: Callable[..., Any]
    help: str
    usage: str
    check: bool  # what it makes is checked against the contract (code from outside the package)
    meta: dict[str, Any] = field(default_factory=dict)  # what else the plug-in point reads (e.g. image_shape)


class Registry:
    """The named implementations of one plug-in point (teacher formats, critic heads, backbones, ...). Validation, the
    CLI's ``--help`` and ``dibregman list`` read it, so a registered name is accepted and shown everywhere::

        @CRITIC_HEADS.register("mine", help="a head on ...")
        def build(teacher, base, fake_score, cfg): ...
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, make: Callable[..., Any] | None = None, *, help: str, usage: str | None = None,
                 check: bool = True, **meta: Any) -> Any:
        """Add ``make`` as ``name`` (or, without ``make``, a decorator that does); ``meta``: what else the plug-in
        point reads of it. A taken name is refused."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a {self.what} name is letters, digits, '_' and '-'; got {name!r}")

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered already")
            self._entries[name] = Entry(name, fn, help, usage or name, check, dict(meta))
            return fn

        return add(make) if make is not None else add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Entry:
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries  # a hand-edited arch may hold any JSON value

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def describe(self, sep: str = "; ") -> str:
        """Each entry as ``usage (help)``: the text of ``--help`` and ``dibregman list``."""
        return sep.join(f"{e.usage} ({e.help})" for e in self._entries.values())
