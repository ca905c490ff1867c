"""Benchmark runtimes: one module each, registered by being a subclass of `Runtime`.

A runtime module declares its `name` (the recipe's `runtime:`), the metrics it `measures`, whether
it runs on CUDA only, the `libraries` it needs (their versions enter the cache key), whether the
stage hands it a loaded model (`loads_model`) or it reads the checkpoint itself; and its calls:
`open(model, path, device, info)`, then per batch `prepare(batch, output_tokens)` and
`run(batch, output_tokens, stamped) -> Sample` (llmopt.eval.bench). The recipe's `runtime:` choices,
the validator, the stage catalogue and the gates' metric catalogue are built from these
declarations; `discover` imports every module here. At module level a runtime imports no torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar


class Runtime:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    measures: ClassVar[tuple[str, ...]]
    cuda_only: ClassVar[bool] = False
    libraries: ClassVar[tuple[str, ...]] = ()
    loads_model: ClassVar[bool] = True  # the stage loads the model (llmopt.models.load_model) and hands it over
    kernel: str = "as-loaded"  # which decode kernel ran (a fast path's name), logged as a tag

    _registry: ClassVar[dict[str, type[Runtime]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # a variant of a registered class (a test's), not one of its own
            return
        if cls.name in Runtime._registry and Runtime._registry[cls.name] is not cls:
            raise TypeError(f"two benchmark runtimes are named {cls.name!r}")
        Runtime._registry[cls.name] = cls

    @classmethod
    def open(cls, model, path, device: str, info: dict) -> Runtime:
        """The runtime for this model (`model`, or None when `loads_model` is False: read `path`)."""
        return cls(model, device)

    def prepare(self, batch: list[list[int]], output_tokens: int) -> None:
        pass

    def run(self, batch: list[list[int]], output_tokens: int, stamped: bool = True):
        raise NotImplementedError


def discover() -> dict[str, type[Runtime]]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    # the order a recipe's error lists them in: the default first
    return dict(sorted(Runtime._registry.items(), key=lambda item: (item[0] != "transformers-eager", item[0])))


def get(name: str) -> type[Runtime]:
    found = discover()
    if name not in found:
        raise KeyError(f"unknown benchmark runtime {name!r}; known: {', '.join(found)}")
    return found[name]
