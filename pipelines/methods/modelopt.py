"""NVIDIA ModelOpt: calibrated TensorRT-LLM-native formats (FP8, INT8 SmoothQuant, INT4-AWQ, W4A8-AWQ, NVFP4).

Quality is measured on the fake-quantized model in memory (transformers cannot reload these
exports); the unified HF checkpoint it exports is what TensorRT-LLM's PyTorch backend loads. The
ModelOpt calls themselves live in llmopt.export.modelopt (the compile stage uses them too).
"""

from __future__ import annotations

from typing import Literal

from llmopt.methods import Method, Serving
from llmopt.schema import CalibrationSpec, Strict
from pydantic import PositiveInt, model_validator

AWQ = ("int4_awq", "w4a8_awq")


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
        if "group_size" in self.model_fields_set and self.format not in AWQ:
            raise ValueError(f"group_size applies to int4_awq and w4a8_awq only, not to format {self.format}")
        return self


class Modelopt(Method):
    name = "modelopt"
    Config = ModeloptQuantize
    summary = "NVIDIA ModelOpt: FP8, INT8 SmoothQuant, INT4-AWQ, W4A8-AWQ, NVFP4 for TensorRT-LLM"
    libraries = ("modelopt",)
    extra = "modelopt"
    formats = ("modelopt",)
    metrics = ("quantize/calibration_windows",)
    # smallest compute capability per format [M]
    serving = {
        "fp8": Serving(89, below_min="format: int4_awq (SM80+)"),
        "int8_sq": Serving(80, refused={"trtllm": (
            "INT8 SmoothQuant runs only as a TensorRT engine; the PyTorch backend has no W8A8 SmoothQuant path [SQ]",
            "target: trtllm-engine with TensorRT-LLM <= 1.2.x, or format: fp8 (SM89+) on target: trtllm")}),
        "int4_awq": Serving(80),
        "w4a8_awq": Serving(89, below_min="format: int4_awq (SM80+)"),
        "nvfp4": Serving(100, below_min="format: fp8 (SM89+) or int4_awq (SM80+)"),
    }

    @classmethod
    def serving_format(cls, cfg) -> str:
        return cfg.format

    @classmethod
    def describe(cls, cfg) -> str:
        return f"modelopt {cfg.format}"

    @classmethod
    def check(cls, cfg, model_config: dict) -> tuple[str, str] | None:
        if cfg.format in AWQ:
            for field in ("hidden_size", "intermediate_size"):
                if field in model_config and model_config[field] % cfg.group_size:
                    return "group_size", (f"{cfg.group_size} does not divide the model's {field} ({model_config[field]}); "
                                          "TensorRT-LLM's AWQ kernels take 64 or 128")
        return None

    @classmethod
    def refuse_runtime(cls, cfg, runtime: str) -> str | None:
        if runtime != "trtllm":
            return (f"{runtime} over a ModelOpt {cfg.format} model would time ModelOpt's fake quantization, not the "
                    "format; add a compile stage and benchmark with runtime: trtllm, or benchmark the base model")
        return None

    @classmethod
    def serve_check(cls, cfg, sm: int, gpu: str) -> tuple[str, str] | None:
        if cfg.kv_cache == "fp8" and sm < 89:
            return "gpu", (f"kv_cache: fp8 needs compute capability 8.9 or newer and {gpu} is {sm // 10}.{sm % 10}; "
                           "drop kv_cache from the quantize stage")
        return None

    @classmethod
    def quantize(cls, cfg: ModeloptQuantize, src, out, ctx):
        """Calibrate, keep the quantizer state (to rebuild the fake-quantized model for evaluation),
        then export the unified HF checkpoint for TensorRT-LLM's PyTorch backend (export last: it
        mutates the model)."""
        import os
        from pathlib import Path

        import torch
        from llmopt.cache import Artifact
        from llmopt.data import calibration_windows, load_texts
        from llmopt.export import modelopt
        from llmopt.models import load_model, load_tokenizer, output_to
        from llmopt.progress import progress_bar

        tokenizer = load_tokenizer(src.path, ctx.trust_remote_code)
        cal = cfg.calibration
        windows = calibration_windows(tokenizer, load_texts(cal.dataset), cal.num_samples, cal.seq_len, cal.seed)
        batches = [torch.tensor(windows[i:i + cfg.batch_size]) for i in range(0, len(windows), cfg.batch_size)]
        model = load_model(src, ctx.device, ctx.dtype, ctx.trust_remote_code)
        before = modelopt.fingerprints(model)
        torch.manual_seed(cal.seed)
        # AWQ runs the calibration data twice (statistics, then the scale search)
        passes = 2 if cfg.format in AWQ else 1
        terminal = os.fdopen(os.dup(1), "w")  # ModelOpt's own prints go to modelopt.log, the bar stays here
        with terminal, progress_bar(passes * len(batches), f"modelopt {cfg.format}: calibrate", enabled=ctx.progress,
                                    file=terminal) as advance, output_to(out / "modelopt.log"):
            model = modelopt.quantize(model, cfg.format, cfg.group_size, cfg.kv_cache, batches, on_batch=advance)
            settings = {"format": cfg.format, "group_size": cfg.group_size, "kv_cache": cfg.kv_cache}
            modelopt.save_state(model, out / modelopt.STATE_DIR, settings, before)
            modelopt.export_hf(model, out, getattr(torch, cfg.export_dtype))
        tokenizer.save_pretrained(out)
        info = {"format": "modelopt", "modelopt_format": cfg.format, "kv_cache": cfg.kv_cache,
                **({"group_size": cfg.group_size} if cfg.format in AWQ else {}),
                "export_dtype": cfg.export_dtype,
                "source": {"path": str(Path(src.path).resolve()), "info": src.info}}
        return Artifact(out, "hf-checkpoint", {"quantize/calibration_windows": float(len(windows))}, info)

    @classmethod
    def load(cls, artifact, device, dtype, trust_remote_code):
        """transformers cannot reload ModelOpt's exports: rebuild the fake-quantized model from its
        source and the calibrated quantizer state the quantize stage kept."""
        from pathlib import Path

        from llmopt.cache import Artifact
        from llmopt.export import modelopt
        from llmopt.models import load_model

        source = artifact.info["source"]
        model = load_model(Artifact(Path(source["path"]), "hf-checkpoint", info=source["info"]), device, dtype,
                           trust_remote_code)
        return modelopt.restore(model, artifact.path / modelopt.STATE_DIR).eval()

    @classmethod
    def card(cls, info: dict) -> list[str]:
        return ["A ModelOpt unified checkpoint (`hf_quant_config.json`): serve `model/` with TensorRT-LLM's PyTorch "
                "backend (`trtllm-serve model --backend pytorch`). transformers cannot load it correctly."]

    @classmethod
    def limits(cls, info: dict) -> list[str]:
        return ["- Quality was measured on the fake-quantized model in memory (ModelOpt), not on a TensorRT-LLM engine."]
