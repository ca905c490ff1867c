"""The recipe schema: a strict pydantic model of one YAML file, with errors that name file, line and field.

A recipe names a base model, an ordered list of stages and each stage's config. Unknown keys are
errors (`extra="forbid"`), `stage` and `method` are discriminators, booleans and integers are
strict (`desc_act: "yes"` is refused rather than coerced), and relative paths are resolved
against the recipe file's folder and checked to exist before anything runs.

The schema lives in one module per stage (`evaluate`, `benchmark`, `distill`, `compile`; the
quantize stage's union is built from the methods in llmopt.methods) beside the shared pieces
(llmopt.schema) and the loader (`loader`: file -> Recipe, errors as file:line); this module joins
them into `Recipe` and re-exports the public names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from llmopt.recipe.benchmark import Benchmark, TokenDistribution  # noqa: F401
from llmopt.recipe.compile import Compile, Launcher  # noqa: F401
from llmopt.recipe.distill import Distill, DistillData, DistillLoss, DistillTrain, Distributed, StudentSpec  # noqa: F401
from llmopt.recipe.evaluate import Evaluate, Gates, MetricGate, PerplexitySpec  # noqa: F401
from llmopt.recipe.quantize import CONFIGS, QUANTIZE_METHODS, Quantize  # noqa: F401
from llmopt.schema import (  # noqa: F401  (re-exported)
    RECIPES_DIR_ENV,
    TEXT_SUFFIXES,
    CalibrationSpec,
    DatasetSpec,
    ModelSpec,
    Strict,
    check_text_file,
)
from pydantic import Field, field_validator

Stage = Annotated[Distill | Quantize | Evaluate | Benchmark | Compile, Field(discriminator="stage")]
STAGE_TYPES = ("distill", "quantize", "evaluate", "benchmark", "compile")


class Promote(Strict):
    """Register the final artifact as a new version of `model_name`; move `alias` to it when every
    gate passes, else give it the alias `candidate`."""

    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
    alias: str = "production"
    gates: list[str] = []  # "quality/tiny_sums/acc_recovery >= 0.99", "bench/tpot_ms/bs1 <= 0.8 * base"
    description: str = ""

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        from llmopt.registry import check_promotion_alias

        return check_promotion_alias(value)

    @field_validator("gates")
    @classmethod
    def _gates(cls, values: list[str]) -> list[str]:
        from llmopt.registry import Gate

        for value in values:
            Gate.parse(value)
        return values


class Recipe(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    model: ModelSpec
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stages: list[Stage] = Field(min_length=1)
    promote: Promote | None = None

    @field_validator("stages")
    @classmethod
    def _cross_stage_rules(cls, stages: list) -> list:
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; give each a `name:` (duplicated: {', '.join(duplicates)})")
        if sum(s.stage == "quantize" for s in stages) > 1:
            raise ValueError("a recipe quantizes once: keep one `quantize` stage (stacking compounds the error)")
        kinds = [s.stage for s in stages]
        if "distill" in kinds and "quantize" in kinds and kinds.index("distill") > kinds.index("quantize"):
            raise ValueError("distill before quantize: a student is trained in full precision, then quantized")
        if kinds.count("compile") > 1:
            raise ValueError("a recipe compiles once: keep one `compile` stage")
        if "compile" in kinds:
            after = stages[kinds.index("compile") + 1:]
            def serves_bundle(s) -> bool:
                return s.runtime == "trtllm" or (s.runtime == "server" and s.serving.command == "compiled")

            if any(s.stage != "benchmark" or not serves_bundle(s) for s in after):
                raise ValueError("compile makes a TensorRT-LLM bundle: only a benchmark with runtime: trtllm, or runtime: "
                                 "server with server.command: compiled, can follow it; put distill, quantize and evaluate "
                                 "before it")
        return stages


from llmopt.recipe.loader import default_recipes_dir, find_recipe, load_recipe, recipe_hash  # noqa: E402, F401
