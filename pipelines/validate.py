"""Validation: everything that can be known about a recipe before any work, without importing torch.

`load_recipe` (llmopt.recipe) checks the schema; this module checks what the schema cannot:
- `check_recipe`: what the recipe's own models say where they can be read without a download
  (layer indices against the teacher's depth, tokenizers, context lengths), formats against their
  targets (llmopt.export.support), promotion gates against the metrics the stages log;
- `check_machine`: what this machine must have to run it (GPUs, read through NVML; libraries;
  processes), which `llmopt validate` reports as a note and `llmopt run` as an error.
It imports no stage module, no torch and no lm-eval (the standard task index is cached), so
`llmopt validate` over every shipped recipe takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmopt import methods
from llmopt.cache import default_cache_dir
from llmopt.errors import RecipeError
from llmopt.eval import runtimes
from llmopt.machine import gpu_count, usable_cpus
from llmopt.recipe import ModelSpec, Recipe
from llmopt.stages.catalog import EXTRAS, STAGES


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
                gated = [name for name in (cfg.gates.metrics if cfg.gates else {}) if name.partition("/")[0] in cfg.tasks]
                check_standard_tasks(cfg.tasks, gated, default_cache_dir().resolve())
            except ValueError as e:
                raise RecipeError(f"{path}: stages[{index}].{e}") from None
        earlier = recipe.stages[:index]
        where = f"{path}: stages[{index}]"
        quantized = next((s for s in earlier if s.stage == "quantize"), None)
        if cfg.stage == "benchmark" and quantized is not None and (
                why := methods.get(quantized.method).refuse_runtime(quantized, cfg.runtime, cfg.kernel)):
            raise RecipeError(f"{where}.runtime: {why}")
        context = config.get("max_position_embeddings")
        if cfg.stage == "benchmark" and context is not None and cfg.longest_input + cfg.longest_output > context:
            raise RecipeError(f"{where}.output_tokens: {cfg.longest_output} output after "
                              f"{cfg.longest_input} input tokens exceed the model's context of {context} tokens")
        if cfg.stage in ("benchmark", "evaluate") and cfg.kernel not in ("auto", "none"):
            _check_kernel(cfg.kernel, quantized, recipe.device, f"{where}.kernel")
        if (cfg.stage == "benchmark" and cfg.runtime == "server" and cfg.serving.command == "compiled"
                and not any(s.stage == "compile" for s in earlier)):
            raise RecipeError(f"{where}.server.command: compiled serves a compile stage's bundle, and no compile stage "
                              "comes before this one")
        if cfg.stage == "quantize" and (problem := methods.get(cfg.method).check(cfg, config)):
            raise RecipeError(f"{where}.{problem[0]}: {problem[1]}")
        if cfg.stage == "compile":
            _preflight_compile(cfg, earlier, config, where)
        if cfg.stage == "distill":
            first_model_stage = all(not STAGES[s.stage].produces_model for s in recipe.stages[:index])
            teacher = cfg.teacher or (recipe.model if first_model_stage else None)
            _preflight_distill(cfg, teacher, f"{path}: stages[{index}]")


def _check_kernel(kernel: str, quantized, device: str, where: str) -> None:
    """A named kernel must run the quantize stage's format on the recipe's kind of device."""
    if quantized is None:
        raise RecipeError(f"{where}: {kernel} runs quantized weights, and no quantize stage comes before; use auto")
    method = methods.get(quantized.method)
    spec = method.kernel_spec(quantized)
    kinds = ("cuda", "cpu") if device == "auto" else (device,)
    found = {kind: method.kernel_candidates(spec, kind) for kind in kinds}
    if not any(kernel in c for c in found.values()):
        nearest = next((c[0] for c in found.values() if c), "none")
        raise RecipeError(f"{where}: {kernel} cannot run {_label(quantized)} ({spec}) on {'/'.join(kinds)}; nearest valid "
                          f"choice: {nearest}")


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

    if recipe.device == "cuda" and not gpu_count():
        raise RecipeError(f"{path}: device: cuda is asked for, but this machine has no CUDA device (use auto or cpu)")
    for index, cfg in enumerate(recipe.stages):
        for library in STAGES[cfg.stage].libraries(cfg):
            if library not in STAGES[cfg.stage].optional and find_spec(library) is None:
                fix = f"pip install 'llmopt[{EXTRAS[library]}]'" if library in EXTRAS else f"pip install {library}"
                raise RecipeError(f"{path}: stages[{index}]: {_label(cfg)} needs {library}, which is not installed; {fix}")
        if cfg.stage == "evaluate" and cfg.tasks:
            from llmopt.eval.harness import offline_blockers

            if blocked := offline_blockers(cfg.tasks, default_cache_dir().resolve()):
                raise RecipeError(f"{path}: stages[{index}].tasks: {blocked}")
        if cfg.stage in ("benchmark", "evaluate") and cfg.kernel not in ("auto", "none"):
            _kernel_on_this_machine(cfg, recipe, index, path)
        if cfg.stage == "benchmark" and runtimes.get(cfg.runtime).loads_model:
            _timed_format_on_this_machine(cfg, recipe, index, path)
        if cfg.stage == "benchmark" and cfg.runtime == "server":
            _server_on_this_machine(cfg, f"{path}: stages[{index}].server")
        cuda_only = cfg.stage == "benchmark" and runtimes.get(cfg.runtime).cuda_only
        if cuda_only and (recipe.device == "cpu" or not gpu_count()):
            raise RecipeError(f"{path}: stages[{index}].runtime: {cfg.runtime} runs on CUDA only, and this run is on "
                              "the CPU; use transformers-eager")
        if cfg.stage == "distill":
            _preflight_processes(cfg.distributed.num_processes, recipe.device, f"{path}: stages[{index}]")
            if cfg.teacher_device and cfg.teacher_device.startswith("cuda"):
                wanted = int(cfg.teacher_device.partition(":")[2] or 0)
                have = gpu_count()
                if wanted >= have:
                    raise RecipeError(f"{path}: stages[{index}].teacher_device: {cfg.teacher_device}, but this machine "
                                      f"has {have} CUDA device(s)")


def _server_on_this_machine(cfg, where: str) -> None:
    """A server command this machine does not have, or a port already taken: refused before any work."""
    import shutil

    from llmopt.eval.runtimes.server import port_in_use

    spec = cfg.serving
    if spec.command == "compiled":
        if shutil.which("trtllm-serve") is None:
            raise RecipeError(f"{where}.command: compiled runs the bundle's trtllm-serve, which is not on this machine's "
                              "PATH (TensorRT-LLM installed locally; a container launcher does not serve here)")
    elif spec.command is not None and shutil.which(spec.command[0]) is None:
        raise RecipeError(f"{where}.command: {spec.command[0]!r} is not on this machine's PATH (the server cannot start)")
    if spec.port is not None and port_in_use(spec.host, spec.port):
        raise RecipeError(f"{where}.port: {spec.port} on {spec.host} is already in use; name another port or leave it "
                          "out (a free port is chosen)")


def _run_device(recipe: Recipe):
    """Where this machine runs the recipe: (`cuda` or `cpu`, its first GPU or None)."""
    from llmopt.machine import gpus

    found = gpus()
    device = "cuda" if recipe.device == "cuda" or (recipe.device == "auto" and found) else "cpu"
    return device, (found[0] if device == "cuda" and found else None)


def _kernel_on_this_machine(cfg, recipe: Recipe, index: int, path: Path) -> None:
    """A kernel this machine's GPU (or CPU) cannot run: exit 2 with the nearest one it can."""
    from llmopt import kernels

    device, gpu = _run_device(recipe)
    sm = gpu.sm if gpu else None
    if (why := kernels.runs_on(cfg.kernel, device, sm)) is None:
        return
    quantized = next(s for s in recipe.stages[:index] if s.stage == "quantize")
    method = methods.get(quantized.method)
    usable = method.kernels(method.kernel_spec(quantized), device, sm)
    where = f" ({gpu.name}, sm{sm})" if gpu else ""
    raise RecipeError(f"{path}: stages[{index}].kernel: {why}{where}; nearest valid choice: "
                      f"{usable[0] if usable else 'none (the format as its library loads it)'}")


def _timed_format_on_this_machine(cfg, recipe: Recipe, index: int, path: Path) -> None:
    """A benchmark of a format whose library only emulates it (ModelOpt) needs a real kernel on
    this machine: otherwise it would time the emulation."""
    quantized = next((s for s in recipe.stages[:index] if s.stage == "quantize"), None)
    method = methods.get(quantized.method) if quantized is not None else None
    if method is None or not method.timed_only_with_kernel:
        return
    device, gpu = _run_device(recipe)
    spec = method.kernel_spec(quantized)
    usable = method.kernels(spec, device, gpu.sm if gpu else None)
    if not usable or cfg.kernel == "none":
        why = "kernel: none" if usable else method.no_kernel_reason(spec, device, gpu.sm if gpu else None)
        raise RecipeError(f"{path}: stages[{index}].runtime: {cfg.runtime} on this machine ({device}) would time "
                          f"{method.name}'s fake quantization, not the format ({why}); benchmark where a kernel runs it "
                          "(CUDA), or with runtime: trtllm after a compile stage")


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

    quantize_cfg = next((s for s in earlier if s.stage == "quantize"), None)
    fmt = support.format_of(quantize_cfg)
    try:
        sm, gpu = support.target_sm(cfg.gpu)
    except ValueError as e:
        raise RecipeError(f"{where}.gpu: {e}") from None
    version = cfg.trtllm_version or support.DEFAULT_TRTLLM_VERSION
    verdict = support.check(fmt, cfg.target, sm, version)
    if not verdict.ok:
        raise RecipeError(f"{where}.target: {fmt} -> {cfg.target} on {gpu} (sm{sm}) with TensorRT-LLM {version}: "
                          f"{verdict.message()}")
    if quantize_cfg is not None and (problem := methods.get(quantize_cfg.method).serve_check(quantize_cfg, sm, gpu)):
        raise RecipeError(f"{where}.{problem[0]}: {problem[1]}")
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
    if device == "cuda" or (device == "auto" and gpu_count()):
        have, what = gpu_count(), "CUDA devices"
    else:
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
    """The model's tokenizer where its `tokenizer.json` can be read without a download or a
    conversion (the shipped tiny model, a converted embedded model, a local directory), through the
    `tokenizers` library (no transformers or torch at validation); None otherwise: the stage then
    compares the tokenizers once it has loaded them (exit 1, the stage named)."""
    if spec.embedded is not None:
        from llmopt.embedded import EMBEDDED_MODELS

        folder = EMBEDDED_MODELS[spec.embedded].local_tokenizer_dir(default_cache_dir().resolve())
    else:
        folder = spec.path
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    return _TokenizerFile(folder / "tokenizer.json")


class _TokenizerFile:
    """A tokenizer.json read by `tokenizers`, with the two calls `tokenizer_mismatch` makes."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids


def _local_config(spec: ModelSpec) -> dict | None:
    """The model's config where it can be read without a download or a build (for an embedded
    model, the fields its spec fixes); None for a hub model."""
    if spec.embedded is not None:
        from llmopt.embedded import EMBEDDED_MODELS

        return dict(EMBEDDED_MODELS[spec.embedded].config)
    if spec.path is not None:
        return json.loads((spec.path / "config.json").read_text())
    return None


def _label(cfg) -> str:
    return f"{cfg.stage} {cfg.method}" if cfg.stage == "quantize" else cfg.stage
