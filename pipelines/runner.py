"""The loop over a recipe's stages: the only caller of the cache and of MLflow tracking.

For each stage: compute its key from the parent's key and everything that decides its output,
reuse the cache entry if there is one, otherwise build it atomically; log the stage as a nested
MLflow run. `evaluate` is paired: the base model is evaluated with the identical settings (also
cached, so computed once) and the run reports both and the delta.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmopt.cache import Artifact, Cache, Entry, key_config, stage_code, stage_key
from llmopt.errors import StageError
from llmopt.kernels.builds import use_build_cache
from llmopt.models import hardware_name, quiet_libraries, resolve_base, resolve_device
from llmopt.recipe import Recipe, recipe_hash
from llmopt.stages import HISTORY, StageContext
from llmopt.stages.catalog import STAGES, StageSpec
from llmopt.tracking import Tracker, flatten
from llmopt.validate import _label
from llmopt.versions import environment_lock, library_versions

log = logging.getLogger("llmopt")


@dataclass
class StageOutcome:
    name: str
    key: str
    hit: bool
    seconds: float  # this run's wall time (near zero on a hit)
    metrics: dict[str, float]
    run_id: str
    failed_gates: list[str] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)  # markdown a paired stage prints at the end
    note: str = ""  # one line the stage wants printed at the end (compile: where the bundle is, built or why not)


@dataclass
class RunSummary:
    recipe: str
    run_id: str
    experiment_id: str
    tracking_hint: str
    log_file: Path
    stages: list[StageOutcome] = field(default_factory=list)
    registration: Any = None  # llmopt.registry.Registration when the recipe promotes


def run_recipe(
    recipe: Recipe,
    recipe_path: Path,
    cache_root: Path,
    mlruns_dir: Path | None = None,
    force: bool = False,
    force_stage: str | None = None,
    progress: bool = True,
    on_stage: Callable[[StageOutcome], None] = lambda outcome: None,
) -> RunSummary:
    """Run every stage of `recipe`; raises StageError (after marking the runs FAILED) if one fails."""
    quiet_libraries()
    device = resolve_device(recipe.device)
    cache_root = cache_root.resolve()
    use_build_cache(cache_root)  # JIT-built extensions (ModelOpt's) are cached with the run's other work
    ctx = StageContext(device, recipe.model.dtype, recipe.model.trust_remote_code, progress, cache_root)
    hardware = hardware_name(device)
    cache = Cache(cache_root)
    log_file = _start_log(cache_root, recipe.name)
    tracker = Tracker(mlruns_dir)
    experiment_id = tracker.experiment(recipe.name)
    tracker.close_orphans(experiment_id)
    versions = library_versions()
    tags = {
        "llmopt.recipe": recipe.name,
        "llmopt.recipe_hash": recipe_hash(recipe_path),
        "llmopt.hardware": hardware,
        "mlflow.source.git.commit": _git_sha(),
        **{f"lib.{name}": version for name, version in versions.items()},
    }
    forced_from = 0 if force else next((i for i, s in enumerate(recipe.stages) if s.name == force_stage), None)
    with tracker.run(experiment_id, recipe.name, tags) as parent:
        summary = RunSummary(recipe.name, parent, experiment_id, tracker.run_url_hint(parent, experiment_id), log_file)
        doing = "the run"  # what the one-line error names if something fails
        try:
            tracker.log(parent, params={f"model.{k}": v for k, v in flatten(recipe.model.model_dump(mode="json")).items()})
            tracker.log_file(parent, recipe_path)
            tracker.log_text(parent, environment_lock(), "environment/requirements.lock.txt")
            log.info("recipe %s on %s (%s)", recipe.name, device, hardware)
            try:
                root_key, base = resolve_base(recipe.model, cache_root, progress)
            except Exception as e:
                log.error("base model failed:\n%s", traceback.format_exc())
                source = recipe.model.id or recipe.model.path or recipe.model.embedded
                raise StageError(f"base model {source} could not be loaded: {_error_line(e)}", log_file) from e
            tracker.log(parent, tags={"llmopt.root_key": root_key, "llmopt.base_revision": base.info["revision"]})
            current, current_key = base, root_key
            all_metrics: dict[str, float] = {}
            for index, cfg in enumerate(recipe.stages):
                doing = f"stage {cfg.name!r} ({_label(cfg)})"
                spec = STAGES[cfg.stage]
                forced = forced_from is not None and index >= forced_from
                stage_tags = {**tags, "llmopt.stage": cfg.stage, "llmopt.parent_key": current_key}
                with tracker.run(experiment_id, cfg.name, stage_tags, parent=parent) as child:
                    started = time.perf_counter()
                    try:
                        entries = _execute(cache, spec, cfg, (current_key, current), (root_key, base), ctx, hardware,
                                           forced)
                    except Exception as e:
                        log.error("stage %s failed:\n%s", cfg.name, traceback.format_exc())
                        raise StageError(f"{doing} failed: {_error_line(e)}", log_file) from e
                    seconds = time.perf_counter() - started
                    entry = entries[0]
                    metrics = dict(entry.artifact.metrics)
                    failed_gates: list[str] = []
                    tables: dict[str, str] = {}
                    verdict: dict[str, str] = {}
                    if spec.paired:
                        paired = spec.load().pair(cfg, entry.artifact, entries[-1].artifact)
                        metrics, failed_gates = paired.metrics, paired.failed_gates
                        for name, data in paired.files.items():
                            tracker.log_bytes(child, data, name)
                        tables = {n: d.decode() for n, d in paired.files.items() if n.endswith(".md")}
                    if getattr(cfg, "gates", None):
                        verdict = {"llmopt.gates": "failed: " + "; ".join(failed_gates) if failed_gates else "passed"}
                    metrics["time/stage_s"] = entry.record["seconds"]
                    history_file = entry.artifact.path / HISTORY
                    curves = ([json.loads(line) for line in history_file.read_text().splitlines()]
                              if history_file.is_file() else [])
                    curve_names = {name for row in curves for name in row}
                    tracker.log(
                        child,
                        # the recipe's settings, and those a library resolved at run time (lm-eval's BOS choice)
                        params={**flatten(cfg.model_dump(mode="json")),
                                **{f"resolved.{k}": str(v) for k, v in entry.artifact.info.get("settings", {}).items()}},
                        # a metric with a per-step curve is logged as the curve only (its last point is final)
                        metrics={k: v for k, v in metrics.items() if k not in curve_names},
                        tags={"llmopt.cache_key": entry.key, "llmopt.cache_hit": str(entry.hit).lower(),
                              "llmopt.base_key": root_key,
                              # what a measurement ran on (benchmark: GPU, CUDA, driver, versions, runtime)
                              **{f"env.{k}": v for k, v in entry.artifact.info.get("environment", {}).items()},
                              **_base_environment(entry, entries),
                              **entry.artifact.info.get("tags", {}), **verdict},
                    )
                    if failed_gates:
                        tracker.log(parent, tags=verdict)
                        log.warning("stage %s: gates failed: %s", cfg.name, "; ".join(failed_gates))
                    tracker.log_history(child, curves)
                    for role, report in zip(("candidate", "base"), entries, strict=False):
                        for name in ("artifact.json", "report.json", "lm_eval_results.json", "manifest.json",
                                     "commands.sh", "extra_llm_api_options.yaml"):
                            if (report.artifact.path / name).is_file():
                                tracker.log_file(child, report.artifact.path / name, role)
                        for build_log in sorted((report.artifact.path / "logs").glob("*.log")):
                            tracker.log_file(child, build_log, f"{role}/logs")
                        for sample_file in sorted((report.artifact.path / "samples").glob("*.jsonl")):
                            tracker.log_file(child, sample_file, f"{role}/samples")
                        # runtime: server: the load generator's raw output per load point, and the server's log
                        for raw in sorted((report.artifact.path / "load").glob("*.json")):
                            tracker.log_file(child, raw, f"{role}/load")
                        if (report.artifact.path / "server.log").is_file():
                            tracker.log_file(child, report.artifact.path / "server.log", f"{role}/logs")
                note = entry.artifact.info.get("note", "").format(path=entry.artifact.path)
                outcome = StageOutcome(cfg.name, entry.key, entry.hit, seconds, metrics, child, failed_gates, tables, note)
                summary.stages.append(outcome)
                all_metrics.update({k: v for k, v in metrics.items() if not k.startswith("time/")})
                log.info("stage %s: key %s, %s, %.1fs", cfg.name, entry.key, "hit" if entry.hit else "built", seconds)
                on_stage(outcome)
                if spec.produces_model:
                    current, current_key = entry.artifact, entry.key
            doing = "the run"
            tracker.log(parent, metrics=all_metrics, tags={"llmopt.final_key": current_key})
            if recipe.promote is not None:
                try:
                    from llmopt.registry.promotion import register_run

                    summary.registration = register_run(tracker, recipe, parent, current, all_metrics, tags,
                                                        (root_key, base), {s.name: s.key for s in summary.stages})
                except Exception as e:
                    log.error("registration failed:\n%s", traceback.format_exc())
                    raise StageError(f"registering {recipe.promote.model_name} failed: {_error_line(e)}; "
                                     "the stage outputs are kept in the cache: the same command resumes", log_file) from e
        except StageError:
            raise
        except (Exception, SystemExit) as e:  # after a stage's work (pairing, gates, logging), or a library's exit()
            log.error("%s failed:\n%s", doing, traceback.format_exc())
            raise StageError(f"{doing} failed: {_error_line(e)}", log_file) from e
        finally:
            _stop_log()
            tracker.log_file(parent, log_file, "logs")
    return summary


def _base_environment(candidate, entries) -> dict[str, str]:
    """`env.base.<name>` tags for a paired stage, where the base measured under a setting the
    candidate's `env.<name>` does not show (its kernel; the compiled runtime's dense fusion of a bf16
    base, 0 for a quantized candidate): so that a reviewer reads how each side ran."""
    if len(entries) < 2:
        return {}
    mine = candidate.artifact.info.get("environment", {})
    return {f"env.base.{k}": v for k, v in entries[-1].artifact.info.get("environment", {}).items() if mine.get(k) != v}


def _execute(cache: Cache, spec: StageSpec, cfg, current: tuple[str, Artifact], base: tuple[str, Artifact],
             ctx: StageContext, hardware: str, forced: bool) -> list[Entry]:
    """The stage on the current model, given the second model it reads if any: the teacher for a
    teacher-student stage (cfg.teacher, else the current model), the base model for a paired stage
    (which then also runs on the base, unless the current model is the base).
    Returns [current] or [current, base]."""
    (current_key, current_artifact), (base_key, base_artifact) = current, base
    paired = spec.paired and current_key != base_key
    reference = base if paired and spec.reads_base else None
    if spec.uses_teacher:
        reference = resolve_base(cfg.teacher, ctx.cache_root, ctx.progress) if cfg.teacher else current
    on_base = spec.on_base(cfg)  # without the settings that only reach quantized layers
    entries = [_cached(cache, spec, on_base if current_key == base_key else cfg, current_artifact, current_key, ctx,
                       hardware, forced, reference)]
    if paired:
        entries.append(_cached(cache, spec, on_base, base_artifact, base_key, ctx, hardware, forced))
    return entries


def release_memory(device: str) -> None:
    """Free what a finished stage no longer holds before the next one runs and measures memory. Models
    that libraries build sit in reference cycles that only a collection frees: a benchmarked model
    and its runtime (without a collection, the base model measured next in the process counted 10.6
    GB of the candidate's in its peak); after bitsandbytes' stage (tiny Llama, CPU) 121 modules were
    still alive, after ModelOpt's 200 quantizer modules;
    an FP8 benchmark on an H100 held ~7 GB beyond its weights and cache, the size of ModelOpt's
    exported model (ModelOpt now runs in a child process; the GPU figure is not re-measured)."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _cached(cache: Cache, spec: StageSpec, cfg, src: Artifact, parent_key: str, ctx: StageContext,
            hardware: str, forced: bool, reference: tuple[str, Artifact] | None = None) -> Entry:
    """The stage's entry for this input, built if absent. `reference`: (key, artifact) of a second
    model the stage reads (the base model to compare against, or a teacher); its key enters the
    stage's key."""
    libraries = library_versions(("torch", "transformers", *spec.libraries(cfg)))
    # gates judge a stage's output and do not change it: a new threshold re-judges the cached result
    config = {"stage": key_config(cfg.model_dump(mode="json", exclude={"name", "gates"})), "dtype": ctx.dtype,
              "trust_remote_code": ctx.trust_remote_code, "reference": reference[0] if reference else None}
    code = stage_code(spec.module)  # llmopt's version and the stage's own source: a code fix is a miss
    key = stage_key(parent_key, cfg.stage, config, libraries, hardware, code)
    if forced:
        cache.invalidate(key)
    elif (found := cache.lookup(key)) is not None:
        return found

    def produce(out: Path) -> Artifact:
        import torch

        if ctx.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        run = spec.load().run
        artifact = run(cfg, src, out, ctx, base=reference[1]) if reference else run(cfg, src, out, ctx)
        seconds = time.perf_counter() - started
        record.update(seconds=seconds)
        # a stage run in worker processes (a server, distillation's ranks) reports their peak itself; one
        # that held no GPU memory here reports none, not a peak of 0 GB
        peak = torch.cuda.max_memory_allocated() if ctx.device == "cuda" else 0
        if peak:
            artifact.metrics.setdefault("memory/peak_gpu_gb", peak / 1e9)
        release_memory(ctx.device)
        return artifact

    record: dict[str, Any] = {
        "stage": cfg.stage, "parent_key": parent_key, "config": config, "libraries": libraries,
        "code": code, "hardware": hardware, "source": str(src.path), "created": datetime.now(UTC).isoformat(),
    }
    return cache.build(key, record, produce, resumable=spec.resumable)


def _error_line(e: BaseException) -> str:
    """`Type: message` on one line: the message's first line (the log has all of it)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    more = " [...]" if len(lines) > 1 else ""
    return f"{type(e).__name__}: {lines[0]}{more}" if lines else type(e).__name__


# Library loggers whose warnings go to the run's log rather than the console: torch's "hit
# config.recompile_limit" notices (GPTQModel's CPU kernel recompiles per layer), ten lines each.
LOG_ONLY_WARNINGS = ("torch._dynamo.convert_frame",)


class _IntoRunLog(logging.Filter):
    """On a library logger: every record goes to the run's log; only errors also reach the console."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return record.levelno >= logging.ERROR


def _start_log(cache_root: Path, recipe_name: str) -> Path:
    logs = cache_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{recipe_name}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the console gets rich's lines; the file gets the details
    for name in LOG_ONLY_WARNINGS:
        logging.getLogger(name).addFilter(_IntoRunLog(handler))
    return path


def _stop_log() -> None:
    """Close the run's log; library warnings reach the console again."""
    for name in LOG_ONLY_WARNINGS:
        library = logging.getLogger(name)
        for into_log in [f for f in library.filters if isinstance(f, _IntoRunLog)]:
            library.removeFilter(into_log)
    for handler in log.handlers[:]:
        handler.close()
        log.removeHandler(handler)


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
