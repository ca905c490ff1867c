"""Round-to-nearest in the GPTQ checkpoint format, through GPTQModel's weight-only RTN: no calibration.

`bits: 8, group_size: -1` is int8 weight-only (one scale per output channel); `bits: 4` is the
calibration-free twin of GPTQ. Unlike `rtn` (saved dequantized, a quality baseline) its weights are
stored packed, so the checkpoint is small and loads wherever GPTQ loads (transformers with
GPTQModel, vLLM, SGLang, TensorRT-LLM's PyTorch backend), with GPTQ's kernels.
"""

from __future__ import annotations

import functools
from typing import Literal

from llmopt.methods import Method
from llmopt.methods.gptq import Gptq, gptq_kernels, load_gptq, run_gptqmodel
from llmopt.schema import Strict, _check_group_size
from pydantic import StrictBool, field_validator


class GptqRtnQuantize(Strict):
    """Round-to-nearest weights in the GPTQ format (GPTQModel's weight-only RTN); int8 weight-only by default."""

    stage: Literal["quantize"]
    method: Literal["gptq_rtn"]
    name: str = "quantize"
    bits: Literal[4, 8] = 8
    group_size: int = -1  # -1: one scale per output channel
    sym: StrictBool = True
    reload_backend: Literal["torch", "triton", "marlin", "exllama_v2"] | None = None  # as for gptq

    _group_size = field_validator("group_size")(_check_group_size)


class GptqRtn(Method):
    name = "gptq_rtn"
    Config = GptqRtnQuantize
    summary = "round-to-nearest packed in the GPTQ format (int8 weight-only by default); no calibration"
    libraries = Gptq.libraries
    extra = Gptq.extra
    formats = ()  # it writes format `gptq`: loaded, served and carded as GPTQ is

    @classmethod
    def serving_format(cls, cfg) -> str:
        return "gptq"

    @classmethod
    def describe(cls, cfg) -> str:
        return f"gptq_rtn {cfg.bits}-bit round-to-nearest"

    @classmethod
    def kernel_candidates(cls, spec: dict, device: str) -> tuple[str, ...]:
        return gptq_kernels(spec, device)  # GPTQ's grid, GPTQ's kernels (its artifacts load as gptq)

    @classmethod
    def quantize(cls, cfg: GptqRtnQuantize, src, out, ctx):
        qconfig = functools.partial(rtn_config, cfg.bits, cfg.group_size, cfg.sym)  # pickles: built in GPTQModel's process
        return run_gptqmodel(cfg, src, out, ctx, examples=None, seed=0, label=f"rtn int{cfg.bits}", qconfig=qconfig)

    @classmethod
    def load(cls, artifact, device, dtype, trust_remote_code):
        return load_gptq(artifact, device, trust_remote_code)


def rtn_config(bits: int, group_size: int, sym: bool):
    """GPTQModel's round-to-nearest config (built where GPTQModel runs)."""
    from gptqmodel.quantization.config import RTNConfig

    return RTNConfig(bits=bits, group_size=group_size, sym=sym)
