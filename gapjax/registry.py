"""A small name -> object registry shared by pools, models, datasets and optimizers.

A registry name is the config value: ``config.model.pool = "gem"`` selects
``POOLS.get("gem")``. Forks add their own entries with ``@REGISTRY.register("mine")``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """Raised for a name a registry does not hold; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


def build_with_options(cls: type, what: str, kwargs: Mapping[str, Any]) -> Any:
    """``cls(**kwargs)`` for a dataclass (a Linen module), after checking every key is one
    of its fields: an unknown key (a config typo) is one line naming it, its value, and the
    valid options, instead of a bare ``TypeError``. ``what`` names the thing being built
    (``"model 'resnet50'"``, ``"pool 'gem'"``)."""
    options = sorted(field.name for field in dataclasses.fields(cls)
                     if field.name != "parent")
    for key, value in kwargs.items():
        if key not in options:
            shown = ", ".join(option for option in options if option != "name")
            raise ValueError(f"{what} has no option {key!r} (got {key}={value!r}); "
                             f"valid options: {shown or 'none'}")
    return cls(**kwargs)


class Registry(Generic[T]):
    """Maps names (and aliases) to objects.

    Example:
        POOLS = Registry("pool")

        @POOLS.register("gap", "mean")
        class GAP(nn.Module): ...

        POOLS.get("mean") is GAP  # True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` and any ``aliases``."""

        def decorator(obj: T) -> T:
            self.add(name, obj, *aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T, *aliases: str) -> T:
        """Registers ``obj`` directly (non-decorator form)."""
        for key in (name, *aliases):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind} names must be non-empty strings, got {key!r}")
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} name {key!r} is already registered")
        self._entries[name] = obj
        for alias in aliases:
            self._aliases[alias] = name
        return obj

    def canonical(self, name: str) -> str:
        """The primary name for ``name`` (resolving aliases); raises if unknown."""
        if not isinstance(name, str):  # e.g. None or a list from a malformed config
            raise UnknownNameError(self._unknown_message(name))
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownNameError(self._unknown_message(name))

    def get(self, name: str) -> T:
        """The object registered under ``name`` or one of its aliases."""
        return self._entries[self.canonical(name)]

    def names(self, aliases: bool = False) -> list[str]:
        """Registered primary names (plus aliases when ``aliases=True``), sorted."""
        keys = list(self._entries)
        if aliases:
            keys += list(self._aliases)
        return sorted(keys)

    def _unknown_message(self, name: object) -> str:
        choices = self.names(aliases=True)
        message = f"unknown {self.kind} {name!r}; choose one of: {', '.join(choices)}"
        close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        return message

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
