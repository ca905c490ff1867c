"""The compile stage: TensorRT-LLM bundles and engines, and where TensorRT-LLM runs."""

from __future__ import annotations

from typing import Literal

from llmopt.schema import Strict
from pydantic import (
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)


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
