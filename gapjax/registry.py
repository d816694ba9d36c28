"""A small name -> object registry shared by pools, models, datasets and optimizers.

A registry name is the config value: ``config.model.pool = "gem"`` selects
``POOLS.get("gem")``. Forks add their own entries with ``@REGISTRY.register("mine")``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
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


# --------------------------------------------------------------------------------------
# A fork's own modules: ``config.imports``
# --------------------------------------------------------------------------------------


class ImportSpecError(ValueError):
    """A ``config.imports`` entry that names no file or no importable module."""


def _is_path(spec: str) -> bool:
    return "@" not in spec and (spec.endswith(".py") or os.sep in spec)


def resolve_import(spec: str) -> str:
    """The form of a ``config.imports`` entry that ``config.json`` records, so that every
    command reopening the run imports the same code from any working directory:

    * a ``.py`` path (relative to the working directory) -> its absolute path;
    * a dotted module name found through the working directory or ``PYTHONPATH`` ->
      ``"name@<directory holding its top-level package>"``;
    * an installed module's name, or an already resolved entry -> unchanged.
    """
    if not isinstance(spec, str) or not spec:
        raise ImportSpecError(f"config.imports entries must be module names or .py paths; "
                              f"got {spec!r}")
    if _is_path(spec):
        path = Path(spec).expanduser().absolute()
        if not path.is_file():
            raise ImportSpecError(f"config.imports: no such file: {spec} (looked in "
                                  f"{path.parent})")
        return str(path)
    if "@" in spec:
        return spec
    found = importlib.util.find_spec(spec.split(".")[0])
    if found is None:
        raise ImportSpecError(f"config.imports: no module named {spec.split('.')[0]!r} (from "
                              f"{spec!r}); name its .py file by path instead")
    if not found.has_location or found.origin is None:
        return spec  # built in or frozen
    origin = Path(found.origin)
    directory = origin.parent.parent if origin.name == "__init__.py" else origin.parent
    installed = {"site-packages", "dist-packages"} & set(directory.parts)
    if installed or directory.is_relative_to(sys.base_prefix):
        return spec
    return f"{spec}@{directory}"


def import_modules(specs: Sequence[str]) -> list[ModuleType]:
    """Imports a fork's modules (``config.imports``): each entry a dotted module name, a
    ``name@directory`` pair or a ``.py`` path (see ``resolve_import``). Their
    ``@REGISTRY.register`` decorators run, so their pools, models, evaluators, ... are
    known by name. A file's directory joins ``sys.path``, so files beside it import each
    other by name. Importing twice is a no-op. Raises ``ImportSpecError`` (one line)."""
    modules = []
    for spec in specs or ():
        resolved = resolve_import(spec)
        if _is_path(resolved):
            directory, name = str(Path(resolved).parent), Path(resolved).stem
        else:
            name, _, directory = resolved.partition("@")
        if directory and directory not in sys.path:
            sys.path.insert(0, directory)
        where = getattr(sys.modules.get(name), "__file__", None)
        if _is_path(resolved) and where and Path(where).resolve() != Path(resolved).resolve():
            raise ImportSpecError(f"config.imports: {resolved} is shadowed by the module "
                                  f"{name!r} already imported from {where}; rename the file")
        try:
            modules.append(importlib.import_module(name))
        except Exception as error:  # the fork's own code: reported in one line
            raise ImportSpecError(f"config.imports: importing {spec!r} failed: "
                                  f"{type(error).__name__}: {error}") from error
    return modules
