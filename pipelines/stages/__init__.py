"""Stages: plain functions `run(cfg, src, out, ctx) -> Artifact`; the list of them is llmopt.stages.catalog."""

from dataclasses import dataclass, field
from pathlib import Path

HISTORY = "history.jsonl"  # per-step curves a stage writes into its output (distill), logged as metric histories


@dataclass(frozen=True)
class StageContext:
    """What every stage needs to know about this run besides its own config."""

    device: str  # "cpu" | "cuda"
    dtype: str  # the recipe's model dtype
    trust_remote_code: bool
    progress: bool = True
    cache_root: Path | None = None  # where further models a stage names (a student) are resolved

    def cache_dir(self) -> Path:
        """Where a stage keeps what outlives its output (models it names, precomputed teacher
        logits, measured device bandwidth): the run's cache root, else the default one."""
        from llmopt.cache import default_cache_dir

        return self.cache_root or default_cache_dir()


@dataclass
class Paired:
    """A paired stage's result for the candidate beside the base: metrics to log, failed gates,
    and files for the stage's MLflow run (name -> bytes: tables, plots)."""

    metrics: dict[str, float]
    failed_gates: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
