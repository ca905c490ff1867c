"""The benchmark stage: runtime, workload, repeats, price."""

from __future__ import annotations

from typing import Literal

from llmopt.eval import runtimes
from llmopt.kernels import CHOICES as KERNEL_CHOICES
from llmopt.schema import Strict
from pydantic import (
    Field,
    PositiveInt,
    field_validator,
)

RUNTIMES = tuple(runtimes.discover())


class TokenDistribution(Strict):
    mean: PositiveInt
    stdev: float = Field(ge=0)


class Benchmark(Strict):
    """Latency, throughput, memory, roofline and cost of the current model and of the base model,
    with the same runtime, workload and hardware."""

    stage: Literal["benchmark"]
    name: str = "benchmark"
    runtime: Literal[RUNTIMES] = "transformers-eager"  # one module each: llmopt.eval.runtimes
    # decode kernel for a quantized model (llmopt.kernels): auto = the fastest that runs its format here
    kernel: Literal[KERNEL_CHOICES] = "auto"
    batch_sizes: list[int] = Field([1], min_length=1)
    input_tokens: PositiveInt | TokenDistribution = 128
    output_tokens: PositiveInt = 128
    warmup: int = Field(2, ge=0)
    repeats: PositiveInt = 5
    gpu_hourly_usd: float | None = None  # cost per 1M output tokens when given
    memory_budget_gb: float | None = Field(None, gt=0)  # for "cached tokens that fit"; default: the GPU's memory
    seed: int = 0

    @property
    def longest_input(self) -> int:
        """The longest prompt to plan for: fixed, or the distribution's mean + 4 standard deviations."""
        if isinstance(self.input_tokens, int):
            return self.input_tokens
        return round(self.input_tokens.mean + 4 * self.input_tokens.stdev)

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, values: list[int]) -> list[int]:
        for v in values:
            if v < 1:
                raise ValueError(f"batch size {v}: every batch size must be at least 1")
        if len(set(values)) != len(values):
            raise ValueError("batch sizes must be distinct")
        return sorted(values)

    @field_validator("gpu_hourly_usd")
    @classmethod
    def _price(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"gpu_hourly_usd: {v} is negative; a price per GPU hour is >= 0")
        return v
