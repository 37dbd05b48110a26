"""Policies chosen by name: built-ins, in-process registrations and entry points, one way."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TypeVar

P = TypeVar("P")

__all__ = ["build_named"]


def build_named(where: str, name: str, section: Any,
                factories: MutableMapping[str, Callable[[Any], P]],
                group: str, kind: Any, shape: str,
                entry_points: Callable[..., Iterable[Any]]) -> P:
    """``factories[name](section)``, looking in the entry-point ``group`` when the name is
    not known yet (built-ins and registrations win a clash). ValueError, naming ``where``,
    when it is unknown or what it makes is not a ``kind`` (a runtime-checkable Protocol;
    ``shape`` says what one has)."""
    if name not in factories:
        for entry in entry_points(group=group):
            if entry.name not in factories:
                loaded = entry.load()
                if not callable(loaded):
                    raise ValueError(f"entry point {group}:{entry.name}: expected a class or "
                                     f"factory taking the section, got {loaded!r}")
                factories[entry.name] = loaded
    factory = factories.get(name)
    if factory is None:
        raise ValueError(f"{where}: unknown policy {name!r} "
                         f"(known: {', '.join(sorted(factories))})")
    policy = factory(section)
    if not isinstance(policy, kind):
        raise ValueError(f"{where}: {name!r} made {policy!r}, which has no {shape}")
    return policy
