"""The stages llmopt knows, declared without importing them: what each needs and produces.

One explicit list. Validation reads it (which libraries a stage needs, whether it produces a
model) without importing a stage module, so `llmopt validate` loads no torch; the runner imports a
stage's module (`run`, and `pair` for a paired stage) only when it runs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from llmopt import methods
from llmopt.eval import backends, runtimes


@dataclass(frozen=True)
class StageSpec:
    module: str  # holds run(cfg, src, out, ctx[, base=reference model]) -> Artifact, and pair() if paired
    libraries: Callable[[Any], tuple[str, ...]]  # whose versions go into the cache key
    produces_model: bool  # later stages consume its output (distill, quantize) or not (evaluate)
    paired: bool = False  # also run on the base model; pair(cfg, candidate, base) -> Paired puts the two side by side
    reads_base: bool = False  # the candidate's run also gets the base model (evaluate: KL from the base)
    uses_teacher: bool = False  # gets the teacher (cfg.teacher, else the current model) as `base`
    resumable: bool = False  # keeps a killed run's partial output (its checkpoints) for the next run
    optional: tuple[str, ...] = ()  # libraries whose versions enter the key but need not be installed
    # the stage's config as it runs on the base model (and is keyed there): without the settings that only
    # reach quantized layers, so runs that differ only in those share one base measurement
    on_base: Callable[[Any], Any] = lambda cfg: cfg

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)



STAGES: dict[str, StageSpec] = {
    "distill": StageSpec("llmopt.stages.distill", lambda cfg: (), produces_model=True, uses_teacher=True,
                         resumable=True),
    "quantize": StageSpec("llmopt.stages.quantize", lambda cfg: methods.get(cfg.method).libraries, produces_model=True),
    "evaluate": StageSpec("llmopt.stages.evaluate",
                          lambda cfg: tuple(lib for backend in backends.enabled(cfg) for lib in backend.libraries),
                          produces_model=False, paired=True, reads_base=True),
    "benchmark": StageSpec("llmopt.stages.benchmark", lambda cfg: runtimes.get(cfg.runtime).libraries,
                           produces_model=False, paired=True, on_base=lambda cfg: cfg.on_base()),
    # a bundle made where TensorRT-LLM was not reachable is cached like any output: a local
    # tensorrt_llm's version is in the key, a container's image is in the settings; --force-stage
    # rebuilds it once TensorRT-LLM is reachable otherwise
    "compile": StageSpec("llmopt.stages.compile", lambda cfg: ("modelopt", "tensorrt_llm") if cfg.target == "trtllm-engine"
                         else ("tensorrt_llm",), produces_model=True, optional=("tensorrt_llm",)),
}

# the pip extra that installs a library a stage needs (the methods declare theirs)
EXTRAS = {"modelopt": "modelopt", "guidellm": "serve", "openai": "serve"} | {
    library: method.extra for method in methods.discover().values() for library in method.libraries if method.extra}
