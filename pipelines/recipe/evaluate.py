"""The evaluate stage: perplexity, lm-eval tasks (standard and local), gates."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from llmopt.kernels import CHOICES as KERNEL_CHOICES
from llmopt.schema import DatasetSpec, Strict, _did_you_mean, _resolve_path
from pydantic import (
    Field,
    PositiveInt,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)


class PerplexitySpec(Strict):
    dataset: DatasetSpec
    seq_len: PositiveInt = 2048
    stride: PositiveInt | None = None  # None: seq_len (non-overlapping windows)
    max_samples: PositiveInt | None = None
    batch_size: PositiveInt = 1

    @model_validator(mode="after")
    def _stride(self) -> PerplexitySpec:
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride ({self.stride}) must not exceed seq_len ({self.seq_len}): tokens would be skipped")
        return self




class MetricGate(Strict):
    min: float | None = None
    max: float | None = None


class Gates(Strict):
    """Verdicts on the evaluation; a failed gate marks the run (gates/passed = 0) and blocks promotion."""

    min_recovery: float | None = Field(None, gt=0)  # every task metric's recovery (candidate vs base) at least this
    max_ppl_delta_pct: float | None = None  # the perplexity stage's increase over the base, in percent, at most this
    metrics: dict[str, MetricGate] = {}  # "task/metric": bounds on the candidate's value


class Evaluate(Strict):
    """Quality of the current model and of the base model, under identical settings: perplexity
    (llmopt's sliding window) and lm-eval-harness tasks, standard (`tasks`, by name) or local
    (`local_tasks`: task YAML folders or files; data paths in them relative to the YAML)."""

    stage: Literal["evaluate"]
    name: str = "evaluate"
    perplexity: PerplexitySpec | None = None
    tasks: list[str] = []
    local_tasks: list[Path] = []
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = None  # documents per task (None: all)
    batch_size: PositiveInt = 8
    kernel: Literal[KERNEL_CHOICES] = "auto"  # decode kernel for a quantized model, as the benchmark's
    max_length: PositiveInt | None = None  # None: the model's context
    apply_chat_template: StrictBool = False
    add_bos_token: StrictBool | None = None  # None: lm-eval's choice for the model, recorded as a param
    log_samples: int = Field(20, ge=0)  # per-sample outputs kept per task (artifacts)
    gates: Gates | None = None

    @field_validator("local_tasks", mode="before")
    @classmethod
    def _resolve_local(cls, value: Any, info: ValidationInfo) -> Any:
        return [_resolve_path(v, info) for v in value] if isinstance(value, list) else value

    @field_validator("local_tasks")
    @classmethod
    def _parse_local(cls, paths: list[Path]) -> list[Path]:
        from llmopt.eval.harness import local_task_metrics

        for path in paths:
            local_task_metrics(path)  # parses (without running task code) and checks the data files exist
        return paths

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"limit: {v} evaluates no documents; leave it out to evaluate all of them")
        return v

    @model_validator(mode="after")
    def _what_and_gates(self) -> Evaluate:
        if self.perplexity is None and not self.tasks and not self.local_tasks:
            raise ValueError("nothing to evaluate: give `perplexity`, `tasks` or `local_tasks`")
        if self.gates is not None:
            if self.gates.max_ppl_delta_pct is not None and self.perplexity is None:
                raise ValueError("gates.max_ppl_delta_pct needs the `perplexity` evaluation")
            produced: dict[str, set[str]] = {}
            if self.gates.metrics:  # the field validator parsed them already; only gates need their metric names
                from llmopt.eval.harness import local_task_metrics

                for path in self.local_tasks:
                    produced.update(local_task_metrics(path))
            for name in self.gates.metrics:
                task, _, metric = name.partition("/")
                if task in self.tasks:
                    continue  # a standard task's metrics are checked against lm-eval's index (check_recipe)
                if task not in produced or metric not in produced[task]:
                    known = sorted(f"{t}/{m}" for t, ms in produced.items() for m in ms)
                    raise ValueError(f"gates.metrics: no task produces {name!r}" + _did_you_mean(name, known)
                                     + (f" (produced: {', '.join(known)})" if known else ""))
        return self
