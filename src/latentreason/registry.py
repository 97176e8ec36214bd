"""One small registry class, instantiated for tasks, methods, latent steps and answer checkers.

Why one class: every lookup by name in the project fails the same way (an error that lists what
exists and suggests near matches), and user code can be plugged in by dotted path
(``package.module:attr``) without touching ours.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps short names to objects (functions, classes or instances)."""

    def __init__(self, name: str, base: type | None = None) -> None:
        self.name = name
        self.base = base
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(item: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.name}: {name!r} is already registered")
            if self.base is not None and not (
                isinstance(item, self.base) or (isinstance(item, type) and issubclass(item, self.base))
            ):
                raise TypeError(f"{self.name}: {name!r} is not a {self.base.__name__}")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Look ``name`` up; a ``module:attr`` path imports user code instead."""
        if name in self._items:
            return self._items[name]
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise RegistryError(f"{self.name}: cannot import {name!r}: {exc}") from exc
        close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(
            f"unknown {self.name} {name!r}.{hint} Valid names: {', '.join(sorted(self._items))} "
            "(or a 'package.module:attr' path)"
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
