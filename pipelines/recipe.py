"""The recipe schema: a strict pydantic model of one YAML file, with errors that name file, line and field.

A recipe names a base model, an ordered list of stages and each stage's config. Unknown keys are
errors (`extra="forbid"`), `stage` and `method` are discriminators, booleans and integers are
strict (`desc_act: "yes"` is refused rather than coerced), and relative paths are resolved
against the recipe file's folder and checked to exist before anything runs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from llmopt.errors import RecipeError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

RECIPES_DIR_ENV = "LLMOPT_RECIPES_DIR"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Relative paths in a recipe are relative to the recipe file's folder."""
    base = (info.context or {}).get("base_dir")
    if isinstance(value, str):
        value = Path(value).expanduser()
        if base is not None and not value.is_absolute():
            value = Path(base) / value
        return value.resolve()
    return value


class DatasetSpec(Strict):
    """Text records from a local file (`path`), a hub dataset (`hub`, `config`, `split`), or the
    generated corpus the embedded model was trained on (`embedded: tiny-stories`, `split`)."""

    path: Path | None = None
    hub: str | None = None
    embedded: Literal["tiny-stories"] | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    _resolve = field_validator("path", mode="before")(_resolve_path)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if sum(x is not None for x in (self.path, self.hub, self.embedded)) != 1:
            raise ValueError("give exactly one of `path` (a local .txt/.jsonl/.json file), `hub` (a dataset name) "
                             "or `embedded: tiny-stories`")
        if self.path is not None:
            check_text_file(self.path, self.text_field)
        if self.embedded is not None and self.split not in ("train", "calibration", "validation"):
            raise ValueError(f"the embedded corpus has splits train, calibration, validation (got {self.split!r})")
        return self


def check_text_file(path: Path, text_field: str) -> None:
    """Refuse a missing, unreadable, empty or malformed local text file before any work starts."""
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not text.strip():
        raise ValueError(f"file {path} is empty")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                _check_record(_parse_json(line, path, lineno), text_field, f"{path}:{lineno}")
    elif path.suffix == ".json":
        records = _parse_json(text, path, 1)
        if not isinstance(records, list) or not records:
            raise ValueError(f"{path}: expected a non-empty JSON list of records")
        for i, record in enumerate(records):
            _check_record(record, text_field, f"{path}[{i}]")


def _parse_json(text: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e


def _check_record(record: Any, text_field: str, where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"{where}: record has no string field {text_field!r} (set `text_field`)")


class ModelSpec(Strict):
    """The base model: a hub id (with revision), a local directory, or an embedded model."""

    id: str | None = None
    revision: str = "main"
    path: Path | None = None
    embedded: Literal["smollm2-135m", "tiny-llama"] | None = None
    trust_remote_code: StrictBool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    _resolve = field_validator("path", mode="before")(_resolve_path)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("id", "path", "embedded") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `id` (hub model id), `path` (local directory) or `embedded`")
        if self.path is not None and not (self.path / "config.json").is_file():
            raise ValueError(f"local model directory {self.path} does not exist or has no config.json")
        return self


class CalibrationSpec(Strict):
    dataset: DatasetSpec
    num_samples: PositiveInt = 128
    seq_len: PositiveInt = 512
    seed: int = 0


class BnbQuantize(Strict):
    """bitsandbytes: int8 (LLM.int8) or 4-bit nf4/fp4, quantized at load time; no calibration."""

    stage: Literal["quantize"]
    method: Literal["bnb"]
    name: str = "quantize"
    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: StrictBool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    @model_validator(mode="after")
    def _four_bit_options(self) -> BnbQuantize:
        four_bit_only = {"quant_type", "double_quant", "compute_dtype"} & self.model_fields_set
        if self.bits == 8 and four_bit_only:
            raise ValueError(f"{', '.join(sorted(four_bit_only))} only apply to bits: 4; remove them for bits: 8")
        return self


def _check_group_size(value: int) -> int:
    if value != -1 and value <= 0:
        raise ValueError("group_size must be a positive number of columns, or -1 for one group per row")
    return value


class GptqQuantize(Strict):
    """GPTQ through GPTQModel (the maintained successor of AutoGPTQ, same checkpoint format)."""

    stage: Literal["quantize"]
    method: Literal["gptq"]
    name: str = "quantize"
    bits: Literal[4, 8]
    group_size: int = 128
    desc_act: StrictBool = False
    sym: StrictBool = True
    damp_percent: float = Field(0.05, gt=0, lt=1)
    calibration: CalibrationSpec
    batch_size: PositiveInt = 1
    # Kernel used when the checkpoint is loaded back for evaluation. Named explicitly because
    # GPTQModel's automatic choice on Hopper downloads kernel sources at load time.
    # None: `torch` on CPU, `triton` on CUDA.
    reload_backend: Literal["torch", "triton", "marlin", "exllama_v2"] | None = None

    _group_size = field_validator("group_size")(_check_group_size)


class RtnQuantize(Strict):
    """Round-to-nearest weight quantization, saved dequantized: a baseline that GPTQ must beat."""

    stage: Literal["quantize"]
    method: Literal["rtn"]
    name: str = "quantize"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = 128
    sym: StrictBool = True

    _group_size = field_validator("group_size")(_check_group_size)


class ModeloptQuantize(Strict):
    """NVIDIA ModelOpt: calibrated TensorRT-LLM-native formats. Quality is measured on the
    fake-quantized model in memory (transformers cannot reload these exports); the unified HF
    checkpoint it exports is what TensorRT-LLM's PyTorch backend loads."""

    stage: Literal["quantize"]
    method: Literal["modelopt"]
    name: str = "quantize"
    format: Literal["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4"]
    calibration: CalibrationSpec
    batch_size: PositiveInt = 4  # calibration windows per forward pass
    group_size: Literal[64, 128] = 128  # int4 block size of int4_awq / w4a8_awq (TensorRT-LLM's AWQ kernels: 64, 128)
    kv_cache: Literal["fp8"] | None = None  # quantize the KV cache too (needs SM89+ to serve)
    export_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # unquantized tensors in the exports

    @model_validator(mode="after")
    def _group_size_for_awq(self) -> ModeloptQuantize:
        if "group_size" in self.model_fields_set and self.format not in ("int4_awq", "w4a8_awq"):
            raise ValueError(f"group_size applies to int4_awq and w4a8_awq only, not to format {self.format}")
        return self


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


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


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


class TokenDistribution(Strict):
    mean: PositiveInt
    stdev: float = Field(ge=0)


class Benchmark(Strict):
    """Latency, throughput, memory, roofline and cost of the current model and of the base model,
    with the same runtime, workload and hardware."""

    stage: Literal["benchmark"]
    name: str = "benchmark"
    runtime: Literal["transformers-eager", "transformers-compiled", "trtllm"] = "transformers-eager"
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


class StudentSpec(Strict):
    """The student: an existing model (`model`, sharing the teacher's tokenizer), or derived from the
    teacher by keeping some of its layers (weights copied) and optionally narrowing it (random init)."""

    model: ModelSpec | None = None
    keep_layers: Literal["every_other"] | list[int] | None = None
    hidden_size: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_way(self) -> StudentSpec:
        if (self.model is None) == (self.keep_layers is None):
            raise ValueError("give either `model` (an existing student) or `keep_layers` (derive it from the teacher)")
        if self.model is not None and (self.hidden_size or self.intermediate_size):
            raise ValueError("hidden_size/intermediate_size only apply to a student derived with keep_layers")
        if isinstance(self.keep_layers, list) and (not self.keep_layers or min(self.keep_layers) < 0
                                                    or len(set(self.keep_layers)) != len(self.keep_layers)):
            raise ValueError("keep_layers lists distinct teacher layer indices (>= 0), at least one")
        return self


class DistillLoss(Strict):
    """Weighted sum: kd_weight * KD(teacher, student; temperature) + ce_weight * CE(labels)
    + hidden_weight * hidden-state loss on `layer_map` (student layer -> teacher layer).

    KD directions, with p = teacher and q = student distributions at temperature T:
    forward_kl = KL(p || q) (mean-seeking: the student covers all of the teacher's mass),
    reverse_kl = KL(q || p) (mode-seeking), jsd = beta * KL(p || m) + (1 - beta) * KL(q || m)
    with m = beta * p + (1 - beta) * q (generalized JSD; bounded, between the two)."""

    kd: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    kd_weight: float = Field(1.0, ge=0)
    temperature: float = 2.0
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    ce_weight: float = Field(0.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    hidden_loss: Literal["mse", "cosine"] = "mse"
    layer_map: dict[int, int] | None = None  # None: each kept layer to the teacher layer it came from

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("temperature must be > 0 (it divides the logits); 1.0 leaves them unchanged")
        return v

    @model_validator(mode="after")
    def _some_weight(self) -> DistillLoss:
        if self.kd_weight == self.ce_weight == self.hidden_weight == 0:
            raise ValueError("kd_weight, ce_weight and hidden_weight are all 0: nothing to train on")
        return self


class DistillData(Strict):
    dataset: DatasetSpec
    eval_dataset: DatasetSpec | None = None  # None: hold out the last `eval_fraction` of the blocks
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    seq_len: PositiveInt = 512
    packing: StrictBool = True  # concatenate records into full blocks; else one record per block (padded)
    max_samples: PositiveInt | None = None


class DistillTrain(Strict):
    steps: PositiveInt | None = None
    epochs: PositiveInt | None = None
    micro_batch_size: PositiveInt = 8  # per process
    grad_accum: PositiveInt = 1
    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"  # adafactor: factored second moments, less memory
    learning_rate: float = Field(3e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: StrictBool = False
    seed: int = 0
    eval_every: PositiveInt = 50
    eval_batches: PositiveInt = 8
    save_every: PositiveInt = 50

    @model_validator(mode="after")
    def _length(self) -> DistillTrain:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of `steps` or `epochs`")
        return self


class Distributed(Strict):
    num_processes: PositiveInt = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"


class Distill(Strict):
    """Teacher -> student. Later stages consume the student like any other checkpoint."""

    stage: Literal["distill"]
    name: str = "distill"
    teacher: ModelSpec | None = None  # None: the recipe's base model
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where the teacher runs, if not with the student: "cpu", "cuda" or "cuda:N" (one process only;
    # under several processes each runs its own teacher on its GPU).
    teacher_device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d+)?)$")
    # Precompute the teacher's top-k logits over the training blocks once (cached under the cache
    # root, reused by every run with the same teacher, data and k); training then runs without
    # the teacher in memory, with forward KL on the teacher's top-k renormalised.
    teacher_topk: PositiveInt | None = None
    student: StudentSpec
    loss: DistillLoss = DistillLoss()
    data: DistillData
    train: DistillTrain
    distributed: Distributed = Distributed()

    @model_validator(mode="after")
    def _teacher_options(self) -> Distill:
        if self.teacher_device is not None and self.distributed.num_processes > 1:
            raise ValueError("teacher_device: one process only; with distributed.num_processes > 1 every process "
                             "runs its own teacher on its own GPU")
        if self.teacher_topk is None:
            return self
        if self.loss.kd_weight == 0:
            raise ValueError("teacher_topk: precomputed teacher logits only serve the KD loss, and loss.kd_weight is 0")
        if self.loss.kd != "forward_kl":
            raise ValueError(f"teacher_topk: works with loss.kd: forward_kl only ({self.loss.kd} needs the teacher's "
                             "whole distribution)")
        if self.loss.hidden_weight:
            raise ValueError("teacher_topk: the teacher is not run during training, so there are no teacher hidden "
                             "states for loss.hidden_weight")
        return self


class Launcher(Strict):
    """Where TensorRT-LLM runs: `local` (its commands on PATH, or in `bin_dir`, e.g. a virtual
    environment's bin/) or `container` (an image such as nvcr.io/nvidia/tensorrt-llm/release:1.2.0,
    run with docker or podman and all GPUs)."""

    kind: Literal["local", "container"] = "local"
    bin_dir: str | None = None  # a directory holding trtllm-build, trtllm-serve and python3
    image: str | None = None
    cli: Literal["docker", "podman"] = "docker"

    @model_validator(mode="after")
    def _complete(self) -> Launcher:
        if self.kind == "container" and not self.image:
            raise ValueError("kind: container needs `image` (e.g. nvcr.io/nvidia/tensorrt-llm/release:1.2.0)")
        if self.kind == "local" and self.image:
            raise ValueError("`image` is for kind: container")
        if self.kind == "container" and self.bin_dir:
            raise ValueError("`bin_dir` is for kind: local")
        return self


class Compile(Strict):
    """A TensorRT-LLM bundle: `trtllm` (PyTorch backend: the HF-format checkpoint plus serving
    options and commands) or `trtllm-engine` (a TensorRT-LLM checkpoint built with trtllm-build)."""

    stage: Literal["compile"]
    name: str = "compile"
    target: Literal["trtllm", "trtllm-engine"] = "trtllm"
    gpu: str | None = None  # the GPU it is for (H100, L40S, sm90, 8.9); default: this machine's
    trtllm_version: str | None = None  # default: the launcher's TensorRT-LLM, else 1.2.0
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    max_batch_size: PositiveInt = 64
    max_input_len: PositiveInt = 2048
    max_seq_len: PositiveInt = 4096
    max_num_tokens: PositiveInt = 8192
    kv_cache_free_gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    cuda_graph_batch_sizes: list[PositiveInt] = [1, 2, 4, 8, 16, 32, 64]
    gemm_plugin: Literal["auto", "float16", "bfloat16", "disable"] = "auto"  # trtllm-engine only
    launcher: Launcher = Launcher()
    smoke_prompt: str = "Once upon a time"
    smoke_tokens: PositiveInt = 8

    @model_validator(mode="after")
    def _limits(self) -> Compile:
        if self.max_seq_len <= self.max_input_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must exceed max_input_len ({self.max_input_len}): "
                             "it counts the prompt and the output")
        if too_big := [b for b in self.cuda_graph_batch_sizes if b > self.max_batch_size]:
            raise ValueError(f"cuda_graph_batch_sizes {too_big} exceed max_batch_size {self.max_batch_size}")
        if "gemm_plugin" in self.model_fields_set and self.target != "trtllm-engine":
            raise ValueError("gemm_plugin is a trtllm-build option: it applies to target: trtllm-engine only")
        return self

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        from llmopt.export.support import parse_sm

        if value is not None:
            parse_sm(value)
        return value

    @field_validator("trtllm_version")
    @classmethod
    def _readable_version(cls, value: str | None) -> str | None:
        from llmopt.export.support import parse_version

        if value is not None:
            parse_version(value)
        return value


Quantize = Annotated[BnbQuantize | GptqQuantize | RtnQuantize | ModeloptQuantize, Field(discriminator="method")]
Stage = Annotated[Distill | Quantize | Evaluate | Benchmark | Compile, Field(discriminator="stage")]
STAGE_TYPES = ("distill", "quantize", "evaluate", "benchmark", "compile")
QUANTIZE_METHODS = ("bnb", "gptq", "rtn", "modelopt")


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
            if any(s.stage != "benchmark" or s.runtime != "trtllm" for s in after):
                raise ValueError("compile makes a TensorRT-LLM bundle: only a benchmark with runtime: trtllm can follow "
                                 "it; put distill, quantize and evaluate before it")
        return stages


# ----------------------------------------------------------------------------------------------
# Loading: name or path -> validated Recipe, or one RecipeError line naming file, line and field.


def find_recipe(name_or_path: str, recipes_dir: Path | None = None) -> Path:
    """A path to a YAML file, or a name in the recipes folder (`tiny-int4`: recipes/tiny-int4.yaml).
    A bare file name that is not in the current folder is the recipes folder's file of that name
    (`tiny-int4.yaml`), as a recipe's name is its file name; `run` and `validate` print the path."""
    recipes_dir = recipes_dir or default_recipes_dir()
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if candidate.is_file():
            return candidate
        bare = name_or_path == candidate.name
        if bare and (recipes_dir / candidate.name).is_file():
            return recipes_dir / candidate.name
        folder = recipes_dir if bare else candidate.parent
        files = sorted(p.name for p in folder.glob("*") if p.suffix in (".yaml", ".yml"))
        close = [str(folder / name) for name in difflib.get_close_matches(candidate.name, files, n=3)]
        raise RecipeError(f"recipe file {candidate} does not exist" + (f"; did you mean {', '.join(close)}?" if close else ""))
    path = recipes_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir.glob("*.yaml"))
        raise RecipeError(f"no recipe named {name_or_path!r}: {path} does not exist{_did_you_mean(name_or_path, known)} "
                          f"(available: {', '.join(known) or 'none'})")
    return path


def default_recipes_dir() -> Path:
    return Path(os.environ.get(RECIPES_DIR_ENV, "recipes"))


def load_recipe(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with `name`, `model` and `stages`")
    try:
        return Recipe.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as e:
        raise RecipeError(_describe(e, path, text, data)) from e


def _describe(error: ValidationError, path: Path, text: str, data: dict) -> str:
    """The first validation error as `file:line: field.path: message`."""
    first = error.errors()[0]
    loc = _field_path(first["loc"], data)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = first["ctx"]["discriminator"].strip("'")
        allowed = ", ".join(STAGE_TYPES if tag == "stage" else QUANTIZE_METHODS)
        loc = (*loc, tag)
        if first["type"] == "union_tag_invalid":
            message = f"unknown {tag} {first['ctx']['tag']!r}; expected one of: {allowed}"
        else:
            message = f"missing; expected one of: {allowed}"
    elif first["type"] == "extra_forbidden":
        message = "unknown key (misspelled?)"
        parent = _get(data, loc[:-1])
        if isinstance(parent, dict):
            known = _known_keys(loc, data)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            if close:
                message += f"; did you mean `{close[0]}`?"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict | list):
        message += f" (got {first['input']!r})"
    line = _line_of(text, loc)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {_format_loc(loc) or 'recipe'}: {message}"


def _field_path(loc: tuple, data: dict) -> tuple:
    """Drop the discriminator tags pydantic puts in error locations (`stages.0.quantize.gptq.bits`)."""
    out: list = []
    for part in loc:
        node = _get(data, tuple(out))
        if isinstance(node, dict) and part not in node and part in (*STAGE_TYPES, *QUANTIZE_METHODS):
            continue
        out.append(part)
    return tuple(out)


def _get(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _known_keys(loc: tuple, data: dict) -> list[str]:
    """Field names of the model the misspelled key sits in."""
    model: Any = Recipe
    node: Any = data
    for part in loc[:-1]:
        if isinstance(part, int):
            node = node[part]
            if model is list:
                model = _stage_model(node)
            continue
        node = node.get(part) if isinstance(node, dict) else None
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        model = list if part == "stages" else _model_of(annotation)
    return list(getattr(model, "model_fields", {}))


def _stage_model(node: Any) -> Any:
    if not isinstance(node, dict):
        return None
    if node.get("stage") == "quantize":
        return {"bnb": BnbQuantize, "gptq": GptqQuantize, "rtn": RtnQuantize,
                "modelopt": ModeloptQuantize}.get(node.get("method"))
    return {"evaluate": Evaluate, "distill": Distill, "benchmark": Benchmark, "compile": Compile}.get(node.get("stage"))


def _model_of(annotation: Any) -> Any:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_of(text: str, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node on `loc` that exists in the file."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def recipe_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
