"""The distill stage: teacher, student, losses, data, training, processes."""

from __future__ import annotations

from typing import Literal

from llmopt.schema import DatasetSpec, ModelSpec, Strict
from pydantic import (
    Field,
    PositiveInt,
    StrictBool,
    field_validator,
    model_validator,
)


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
