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

from typing import Any, ClassVar

from llmopt.plugins import Registry, import_modules

_RUNTIMES = Registry("benchmark runtimes")


class Runtime:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    measures: ClassVar[tuple[str, ...]]
    cuda_only: ClassVar[bool] = False
    libraries: ClassVar[tuple[str, ...]] = ()
    loads_model: ClassVar[bool] = True  # the stage loads the model (llmopt.models.load_model) and hands it over
    # a load sweep against a server (`sweep(cfg, src, out, ctx) -> (metrics, report)`), not timed batches
    load_sweep: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _RUNTIMES.add(cls)

    @classmethod
    def open(cls, model, path, device: str, info: dict) -> Runtime:
        """The runtime for this model (`model`, or None when `loads_model` is False: read `path`)."""
        return cls(model, device)

    def prepare(self, batch: list[list[int]], output_tokens: int) -> None:
        pass

    def run(self, batch: list[list[int]], output_tokens: int, stamped: bool = True):
        raise NotImplementedError

    def tags(self) -> dict[str, str]:
        """What this runtime did to the model that a reader of the run should know (MLflow tags)."""
        return {}


def discover() -> dict[str, type[Runtime]]:
    import_modules(__name__, __path__)
    # the order a recipe's error lists them in: the default first
    return dict(sorted(_RUNTIMES.items(), key=lambda item: (item[0] != "transformers-eager", item[0])))


def get(name: str) -> type[Runtime]:
    found = discover()
    if name not in found:
        raise KeyError(f"unknown benchmark runtime {name!r}; known: {', '.join(found)}")
    return found[name]
