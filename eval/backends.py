"""Evaluation backends: what each one declares, in the module that implements it.

`BACKENDS` lists the modules; each holds a `BACKEND` (when its `evaluate` fields turn it on, the
libraries it needs, the metrics it logs). The stage catalogue's libraries and the promotion gates'
metric catalogue are built from these declarations. Importing this module imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BACKENDS = ("llmopt.eval.perplexity", "llmopt.eval.harness")


@dataclass(frozen=True)
class Backend:
    name: str
    enabled: Callable[[Any], bool]  # on for this `evaluate` config
    libraries: tuple[str, ...]  # whose versions enter the cache key; validation checks they are installed
    metrics: Callable[[Any], tuple[set[str], set[str]]]  # (metric names, prefixes of names known at run time)


def backends() -> list[Backend]:
    return [importlib.import_module(module).BACKEND for module in BACKENDS]


def enabled(cfg) -> list[Backend]:
    return [backend for backend in backends() if backend.enabled(cfg)]
