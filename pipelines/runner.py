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

from llmopt.cache import Artifact, Cache, Entry, default_cache_dir, key_config, stage_code, stage_key
from llmopt.errors import RecipeError, StageError
from llmopt.models import hardware_name, quiet_libraries, resolve_base, resolve_device
from llmopt.recipe import ModelSpec, Recipe, recipe_hash
from llmopt.stages import Paired, StageContext, benchmark, compile, distill, evaluate, quantize
from llmopt.tracking import Tracker, environment_lock, flatten, library_versions

log = logging.getLogger("llmopt")


@dataclass(frozen=True)
class StageSpec:
    run: Callable[..., Artifact]  # run(cfg, src, out, ctx[, base=reference model]) -> Artifact
    libraries: Callable[[Any], tuple[str, ...]]  # whose versions go into the cache key
    produces_model: bool  # later stages consume its output (distill, quantize) or not (evaluate)
    # also run on the base model; pair(cfg, candidate, base) -> Paired puts the two side by side
    pair: Callable[..., Paired] | None = None
    reads_base: bool = False  # the candidate's run also gets the base model (evaluate: KL from the base)
    uses_teacher: bool = False  # gets the teacher (cfg.teacher, else the current model) as `base`
    resumable: bool = False  # keeps a killed run's partial output (its checkpoints) for the next run
    optional: tuple[str, ...] = ()  # libraries whose versions enter the key but need not be installed


QUANTIZE_LIBRARIES = {"bnb": ("bitsandbytes",), "gptq": ("gptqmodel", "optimum"), "rtn": (), "modelopt": ("modelopt",)}

STAGES: dict[str, StageSpec] = {
    "distill": StageSpec(distill.run, lambda cfg: (), produces_model=True, uses_teacher=True, resumable=True),
    "quantize": StageSpec(quantize.run, lambda cfg: QUANTIZE_LIBRARIES[cfg.method], produces_model=True),
    "evaluate": StageSpec(evaluate.run, lambda cfg: ("lm_eval",) if cfg.tasks or cfg.local_tasks else (),
                          produces_model=False, pair=evaluate.pair, reads_base=True),
    "benchmark": StageSpec(benchmark.run, lambda cfg: ("tensorrt_llm",) if cfg.runtime == "trtllm" else (),
                           produces_model=False, pair=benchmark.pair),
    # a bundle made where TensorRT-LLM was not reachable is cached like any output: a local
    # tensorrt_llm's version is in the key, a container's image is in the settings; --force-stage
    # rebuilds it once TensorRT-LLM is reachable otherwise
    "compile": StageSpec(compile.run, lambda cfg: ("modelopt", "tensorrt_llm") if cfg.target == "trtllm-engine"
                         else ("tensorrt_llm",), produces_model=True, optional=("tensorrt_llm",)),
}


EXTRAS = {"bitsandbytes": "bnb", "gptqmodel": "gptq", "optimum": "gptq", "modelopt": "modelopt"}


def preflight(recipe: Recipe, path: Path) -> None:
    """Everything that can be known before any work: `check_recipe`, then `check_machine`."""
    check_recipe(recipe, path)
    check_machine(recipe, path)


def check_recipe(recipe: Recipe, path: Path) -> None:
    """What the recipe's own models say, where they can be read without a download: layer indices
    against the teacher's depth, teacher and student tokenizers; promotion gates against the
    metrics the stages log."""
    _check_promote(recipe, path)
    config = _local_config(recipe.model) or {}
    for index, cfg in enumerate(recipe.stages):
        if cfg.stage == "evaluate" and cfg.tasks:
            from llmopt.eval.harness import check_standard_tasks

            try:
                check_standard_tasks(cfg.tasks, [name for name in (cfg.gates.metrics if cfg.gates else {})
                                                 if name.partition("/")[0] in cfg.tasks])
            except ValueError as e:
                raise RecipeError(f"{path}: stages[{index}].{e}") from None
        earlier = recipe.stages[:index]
        if cfg.stage == "benchmark" and cfg.runtime == "transformers-compiled" and any(
                s.stage == "quantize" and s.method == "bnb" for s in earlier):
            raise RecipeError(f"{path}: stages[{index}].runtime: transformers-compiled over a bitsandbytes model is not "
                              "supported (on an H100, compiling a 7B nf4 model did not finish in 10 minutes); use "
                              "transformers-eager")
        context = config.get("max_position_embeddings")
        if cfg.stage == "benchmark" and context is not None and cfg.longest_input + cfg.output_tokens > context:
            raise RecipeError(f"{path}: stages[{index}].output_tokens: {cfg.output_tokens} output after "
                              f"{cfg.longest_input} input tokens exceed the model's context of {context} tokens")
        where = f"{path}: stages[{index}]"
        modelopt = next((s for s in earlier if s.stage == "quantize" and s.method == "modelopt"), None)
        if cfg.stage == "benchmark" and cfg.runtime != "trtllm" and modelopt is not None:
            raise RecipeError(f"{where}.runtime: {cfg.runtime} over a ModelOpt {modelopt.format} model would time "
                              "ModelOpt's fake quantization, not the format; add a compile stage and benchmark with "
                              "runtime: trtllm, or benchmark the base model")
        if cfg.stage == "quantize" and cfg.method == "modelopt" and cfg.format in ("int4_awq", "w4a8_awq"):
            for field in ("hidden_size", "intermediate_size"):
                if field in config and config[field] % cfg.group_size:
                    raise RecipeError(f"{where}.group_size: {cfg.group_size} does not divide the model's {field} "
                                      f"({config[field]}); TensorRT-LLM's AWQ kernels take 64 or 128")
        if cfg.stage == "compile":
            _preflight_compile(cfg, earlier, config, where)
        if cfg.stage == "distill":
            first_model_stage = all(not STAGES[s.stage].produces_model for s in recipe.stages[:index])
            teacher = cfg.teacher or (recipe.model if first_model_stage else None)
            _preflight_distill(cfg, teacher, f"{path}: stages[{index}]")


def _check_promote(recipe: Recipe, path: Path) -> None:
    from llmopt.registry import Gate, check_gates

    if recipe.promote is not None:
        try:
            check_gates([Gate.parse(g) for g in recipe.promote.gates], recipe)
        except ValueError as e:
            raise RecipeError(f"{path}: promote.gates: {e}") from None


def check_machine(recipe: Recipe, path: Path) -> None:
    """What this machine must have to run the recipe: CUDA if asked for, the stages' libraries,
    devices for the processes."""
    from importlib.util import find_spec

    if recipe.device == "cuda" and not _cuda_available():
        raise RecipeError(f"{path}: device: cuda is asked for, but this machine has no CUDA device (use auto or cpu)")
    for index, cfg in enumerate(recipe.stages):
        for library in STAGES[cfg.stage].libraries(cfg):
            if library not in STAGES[cfg.stage].optional and find_spec(library) is None:
                fix = f"pip install 'llmopt[{EXTRAS[library]}]'" if library in EXTRAS else f"pip install {library}"
                raise RecipeError(f"{path}: stages[{index}]: {_label(cfg)} needs {library}, which is not installed; {fix}")
        if cfg.stage == "evaluate" and cfg.tasks:
            from llmopt.eval.harness import offline_blockers

            if blocked := offline_blockers(cfg.tasks):
                raise RecipeError(f"{path}: stages[{index}].tasks: {blocked}")
        cuda_only = cfg.stage == "benchmark" and cfg.runtime in ("transformers-compiled", "trtllm")
        if cuda_only and (recipe.device == "cpu" or not _cuda_available()):
            raise RecipeError(f"{path}: stages[{index}].runtime: {cfg.runtime} runs on CUDA only, and this run is on "
                              "the CPU; use transformers-eager")
        if cfg.stage == "distill":
            _preflight_processes(cfg.distributed.num_processes, recipe.device, f"{path}: stages[{index}]")
            if cfg.teacher_device and cfg.teacher_device.startswith("cuda"):
                wanted = int(cfg.teacher_device.partition(":")[2] or 0)
                have = _cuda_device_count()
                if wanted >= have:
                    raise RecipeError(f"{path}: stages[{index}].teacher_device: {cfg.teacher_device}, but this machine "
                                      f"has {have} CUDA device(s)")


def offline_models(recipe: Recipe) -> list[str]:
    """Hub models the recipe loads that this machine cannot get: it is offline (HF_HUB_OFFLINE) and
    they are not in the local Hugging Face cache (with safetensors weights). `validate` notes each;
    `run` finds out when it loads the model (exit 1)."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if offline.upper() not in ("1", "ON", "YES", "TRUE"):
        return []
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from llmopt.models import HUB_PATTERNS

    specs = [("model", recipe.model)]
    for index, cfg in enumerate(recipe.stages):
        if cfg.stage == "distill":
            specs += [(f"stages[{index}].teacher", cfg.teacher), (f"stages[{index}].student.model", cfg.student.model)]
    notes = []
    for where, spec in specs:
        if spec is None or spec.id is None:
            continue
        try:
            folder = Path(snapshot_download(spec.id, revision=spec.revision, allow_patterns=HUB_PATTERNS,
                                            local_files_only=True))
            cached = any(folder.glob("*.safetensors"))
        except LocalEntryNotFoundError:
            cached = False
        if not cached:
            notes.append(f"{where}: {spec.id}@{spec.revision} is not in the local Hugging Face cache, and "
                         f"HF_HUB_OFFLINE={offline} forbids downloading it; run where the hub is reachable, or fill the "
                         "cache first")
    return notes


def _preflight_compile(cfg, earlier: list, config: dict, where: str) -> None:
    """Method x target x GPU compute capability x TensorRT-LLM version, from the table in
    llmopt.export.support, before any GPU hour is spent."""
    from llmopt.export import support
    from llmopt.stages.compile import target_sm

    quantize_cfg = next((s for s in earlier if s.stage == "quantize"), None)
    fmt = support.format_of(getattr(quantize_cfg, "method", None), getattr(quantize_cfg, "format", None),
                            getattr(quantize_cfg, "desc_act", False))
    try:
        sm, gpu = target_sm(cfg)
    except ValueError as e:
        raise RecipeError(f"{where}.gpu: {e}") from None
    version = cfg.trtllm_version or support.DEFAULT_TRTLLM_VERSION
    verdict = support.check(fmt, cfg.target, sm, version)
    if not verdict.ok:
        raise RecipeError(f"{where}.target: {fmt} -> {cfg.target} on {gpu} (sm{sm}) with TensorRT-LLM {version}: "
                          f"{verdict.message()}")
    if quantize_cfg is not None and quantize_cfg.method == "modelopt" and quantize_cfg.kv_cache == "fp8" and sm < 89:
        raise RecipeError(f"{where}.gpu: kv_cache: fp8 needs compute capability 8.9 or newer and {gpu} is "
                          f"{sm // 10}.{sm % 10}; drop kv_cache from the quantize stage")
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    if heads is not None and heads % cfg.tp:
        raise RecipeError(f"{where}.tp: {cfg.tp} does not divide the model's {heads} key-value heads")
    layers = config.get("num_hidden_layers")
    if layers is not None and layers % cfg.pp:
        raise RecipeError(f"{where}.pp: {cfg.pp} does not divide the model's {layers} layers")
    context = config.get("max_position_embeddings")
    if context is not None and cfg.max_seq_len > context:
        raise RecipeError(f"{where}.max_seq_len: {cfg.max_seq_len} exceeds the model's context of {context} tokens")


def _preflight_processes(n: int, device: str, where: str) -> None:
    """One process per GPU on CUDA; on CPU, at most one per usable core."""
    if n == 1:
        return
    if device == "cuda" or (device == "auto" and _cuda_available()):
        have, what = _cuda_device_count(), "CUDA devices"
    else:
        from llmopt.stages.distill_parallel import usable_cpus

        have, what = usable_cpus(), "usable CPU cores (device: cpu)"
    if n > have:
        raise RecipeError(f"{where}.distributed.num_processes: {n} processes, but this machine has {have} {what}; "
                          f"use at most {have}")


def _preflight_distill(cfg, teacher: ModelSpec | None, where: str) -> None:
    """Layer indices against the teacher's depth, where the teacher's config can be read without a download."""
    if cfg.student.model is not None and teacher is not None:
        from llmopt.models import tokenizer_mismatch

        pair = _local_tokenizer(teacher), _local_tokenizer(cfg.student.model)
        if None not in pair and (reason := tokenizer_mismatch(*pair)) is not None:
            raise RecipeError(f"{where}.student.model: {reason}; teacher and student must share one tokenizer")
    teacher_layers = (_local_config(teacher) or {}).get("num_hidden_layers") if teacher is not None else None
    if teacher_layers is None:
        return
    keep = cfg.student.keep_layers
    kept = list(range(0, teacher_layers, 2)) if keep == "every_other" else keep
    if isinstance(keep, list) and max(keep) >= teacher_layers:
        raise RecipeError(f"{where}.student.keep_layers: layer {max(keep)} is out of range; the teacher has "
                          f"{teacher_layers} layers (0-{teacher_layers - 1})")
    student_layers = len(kept) if kept is not None else None
    for s, t in (cfg.loss.layer_map or {}).items():
        if t >= teacher_layers or (student_layers is not None and s >= student_layers):
            raise RecipeError(f"{where}.loss.layer_map: {s} -> {t} is out of range (student has "
                              f"{student_layers if student_layers is not None else '?'} layers, teacher {teacher_layers})")


def _local_tokenizer(spec: ModelSpec):
    """The model's tokenizer where it can be had without a download or a conversion (the shipped
    tiny model's, a converted embedded model's, a local directory's); None otherwise."""
    if spec.embedded is not None:
        from llmopt.embedded import EMBEDDED_MODELS
        from llmopt.models import load_tokenizer

        folder = EMBEDDED_MODELS[spec.embedded].local_tokenizer_dir(default_cache_dir().resolve())
        return load_tokenizer(folder) if folder is not None else None
    if spec.path is not None:
        from llmopt.models import load_tokenizer

        return load_tokenizer(spec.path, spec.trust_remote_code)
    return None


def _local_config(spec: ModelSpec) -> dict | None:
    """The model's config where it can be read without a download or a build (for an embedded
    model, the fields its spec fixes); None for a hub model."""
    if spec.embedded is not None:
        from llmopt.embedded import EMBEDDED_MODELS

        return dict(EMBEDDED_MODELS[spec.embedded].config)
    if spec.path is not None:
        return json.loads((spec.path / "config.json").read_text())
    return None


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
                    if spec.pair is not None:
                        paired = spec.pair(cfg, entry.artifact, entries[-1].artifact)
                        metrics, failed_gates = paired.metrics, paired.failed_gates
                        for name, data in paired.files.items():
                            tracker.log_bytes(child, data, name)
                        tables = {n: d.decode() for n, d in paired.files.items() if n.endswith(".md")}
                    if getattr(cfg, "gates", None):
                        verdict = {"llmopt.gates": "failed: " + "; ".join(failed_gates) if failed_gates else "passed"}
                    metrics["time/stage_s"] = entry.record["seconds"]
                    history_file = entry.artifact.path / distill.HISTORY
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
                    summary.registration = _register(tracker, recipe, parent, current, all_metrics, tags,
                                                     (root_key, base), summary)
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


def _register(tracker: Tracker, recipe: Recipe, parent: str, final: Artifact, metrics: dict[str, float],
              tags: dict[str, str], root: tuple[str, Artifact], summary: RunSummary):
    """Register the final artifact (a new model version with its card) and move the alias."""
    from llmopt import registry

    root_key, base = root

    source = recipe.model.id or str(recipe.model.path or f"embedded:{recipe.model.embedded}")
    def step(cfg) -> str:
        detail = {"quantize": lambda: f"{cfg.method} {getattr(cfg, 'format', None) or str(getattr(cfg, 'bits', '')) + '-bit'}",
                  "compile": lambda: cfg.target, "distill": lambda: "student"}[cfg.stage]()
        return f"{cfg.name} ({detail})"

    steps = [step(cfg) for cfg in recipe.stages if STAGES[cfg.stage].produces_model]
    lineage = " -> ".join([f"{source}@{recipe.model.revision}" if recipe.model.id else source, *steps])
    gate_lines, _ = registry.judge([registry.Gate.parse(g) for g in recipe.promote.gates], metrics)
    card = registry.model_card(recipe, final, metrics, lineage, gate_lines, tags, parent, base.info)
    digest = registry.content_digest(final.path)
    version_tags = {"llmopt.recipe": recipe.name, "llmopt.recipe_hash": tags["llmopt.recipe_hash"],
                    "llmopt.run_id": parent, "llmopt.base_model": source,
                    "llmopt.base_revision": base.info["revision"], "llmopt.base_key": root_key,
                    "llmopt.lineage": lineage,
                    "llmopt.cache_keys": json.dumps({s.name: s.key for s in summary.stages}),
                    "llmopt.hardware": tags["llmopt.hardware"]}
    result = registry.register(tracker, recipe.promote, parent, final.path, metrics, card, version_tags, digest)
    verdict = "passed" if not result.failed else "failed: " + "; ".join(result.failed)
    tracker.log(parent, tags={"llmopt.registered": f"{result.name}/{result.version}", "llmopt.alias": result.alias,
                              "llmopt.promotion_gates": verdict, "llmopt.registration": result.note or "new version"})
    log.info("registered %s version %s, alias %s (gates %s; %s)", result.name, result.version, result.alias, verdict,
             result.note or "new version")
    return result


def _execute(cache: Cache, spec: StageSpec, cfg, current: tuple[str, Artifact], base: tuple[str, Artifact],
             ctx: StageContext, hardware: str, forced: bool) -> list[Entry]:
    """The stage on the current model, given the second model it reads if any: the teacher for a
    teacher-student stage (cfg.teacher, else the current model), the base model for a paired stage
    (which then also runs on the base, unless the current model is the base).
    Returns [current] or [current, base]."""
    (current_key, current_artifact), (base_key, base_artifact) = current, base
    paired = spec.pair is not None and current_key != base_key
    reference = base if paired and spec.reads_base else None
    if spec.uses_teacher:
        reference = resolve_base(cfg.teacher, ctx.cache_root, ctx.progress) if cfg.teacher else current
    entries = [_cached(cache, spec, cfg, current_artifact, current_key, ctx, hardware, forced, reference)]
    if paired:
        entries.append(_cached(cache, spec, cfg, base_artifact, base_key, ctx, hardware, forced))
    return entries


def _cached(cache: Cache, spec: StageSpec, cfg, src: Artifact, parent_key: str, ctx: StageContext,
            hardware: str, forced: bool, reference: tuple[str, Artifact] | None = None) -> Entry:
    """The stage's entry for this input, built if absent. `reference`: (key, artifact) of a second
    model the stage reads (the base model to compare against, or a teacher); its key enters the
    stage's key."""
    libraries = library_versions(("torch", "transformers", *spec.libraries(cfg)))
    # gates judge a stage's output and do not change it: a new threshold re-judges the cached result
    config = {"stage": key_config(cfg.model_dump(mode="json", exclude={"name", "gates"})), "dtype": ctx.dtype,
              "trust_remote_code": ctx.trust_remote_code, "reference": reference[0] if reference else None}
    code = stage_code(spec.run.__module__)  # llmopt's version and the stage's own source: a code fix is a miss
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
        artifact = spec.run(cfg, src, out, ctx, base=reference[1]) if reference else spec.run(cfg, src, out, ctx)
        seconds = time.perf_counter() - started
        record.update(seconds=seconds)
        if ctx.device == "cuda":  # a stage run in worker processes reports their peak itself
            artifact.metrics.setdefault("memory/peak_gpu_gb", torch.cuda.max_memory_allocated() / 1e9)
        return artifact

    record: dict[str, Any] = {
        "stage": cfg.stage, "parent_key": parent_key, "config": config, "libraries": libraries,
        "code": code, "hardware": hardware, "source": str(src.path), "created": datetime.now(UTC).isoformat(),
    }
    return cache.build(key, record, produce, resumable=spec.resumable)


def _label(cfg) -> str:
    return f"{cfg.stage} {cfg.method}" if cfg.stage == "quantize" else cfg.stage


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
