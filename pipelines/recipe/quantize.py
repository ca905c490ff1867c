"""The quantize stage: one schema per method, and the union a recipe's `method:` selects from."""

from __future__ import annotations

from typing import Annotated, Literal

from llmopt.recipe.base import CalibrationSpec, Strict, _check_group_size
from pydantic import (
    Field,
    PositiveInt,
    StrictBool,
    field_validator,
    model_validator,
)


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




Quantize = Annotated[BnbQuantize | GptqQuantize | RtnQuantize | ModeloptQuantize, Field(discriminator="method")]

QUANTIZE_METHODS = ("bnb", "gptq", "rtn", "modelopt")
