"""Self-registering plugins (quantization methods, benchmark runtimes): a registry that subclasses
join by their `name`, and a package whose modules are all imported to fill it.

A package that imports from this module is one whose modules register themselves: the cache counts
all of them as imported by the package (llmopt.cache.code_sources), so a stage's key changes when
any of them does. Imports nothing heavy.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


class Registry(dict):
    """name -> class, for one kind of plugin (`what` names it in errors)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def add(self, cls: type) -> None:
        """Register `cls` under its own `name`; a subclass that inherits its name (a test's variant
        of a registered class) is not registered. Two classes with one name are an error."""
        if "name" not in cls.__dict__:
            return
        if self.get(cls.name, cls) is not cls:
            raise TypeError(f"two {self.what} are named {cls.name!r}: {self[cls.name].__module__} and {cls.__module__}")
        self[cls.name] = cls


_imported: set[str] = set()


def import_modules(package: str, path: Iterable[str]) -> None:
    """Import every module of `package` (once per process): each registers what it defines."""
    if package in _imported:
        return
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
    _imported.add(package)
