"""Stages: plain functions `run(cfg, src, out, ctx) -> Artifact`; the registry is in llmopt.runner."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageContext:
    """What every stage needs to know about this run besides its own config."""

    device: str  # "cpu" | "cuda"
    dtype: str  # the recipe's model dtype
    trust_remote_code: bool
    progress: bool = True
    cache_root: Path | None = None  # where further models a stage names (a student) are resolved
