"""bitsandbytes: int8 (LLM.int8) or 4-bit nf4/fp4, quantized at load time; no calibration.

A memory format: it shrinks the weights, and its kernels are not faster than bf16 at decode."""

from __future__ import annotations

from typing import Literal

from llmopt.methods import Method, Serving
from llmopt.schema import Strict
from pydantic import StrictBool, model_validator

_REFUSED = ("bitsandbytes checkpoints do not load in TensorRT-LLM [B]",
            "quantize with method: modelopt, format: int4_awq (or method: gptq)")


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


class Bnb(Method):
    name = "bnb"
    Config = BnbQuantize
    summary = "bitsandbytes int8 or nf4/fp4 at load time (a memory format; no calibration)"
    libraries = ("bitsandbytes",)
    extra = "bnb"
    formats = ("bnb",)
    serving = {"bnb": Serving(None, refused={"trtllm": _REFUSED, "trtllm-engine": _REFUSED})}
    metrics = ("quantize/roundtrip_max_logit_diff",)

    @classmethod
    def refuse_runtime(cls, cfg, runtime: str, kernel: str) -> str | None:
        if runtime == "transformers-compiled":
            return ("transformers-compiled over a bitsandbytes model is not supported (on an H100, compiling a 7B nf4 "
                    "model did not finish in 10 minutes); use transformers-eager")
        return None

    @classmethod
    def quantize(cls, cfg: BnbQuantize, src, out, ctx):
        """Quantize at load time and save before any forward pass.

        On CPU, bitsandbytes repacks 4-bit weights in place on the first forward pass; a model saved
        after that reloads with corrupted weights and no error. So: save first, check that the
        packed layout is still the one bitsandbytes serialises, and verify the round trip.
        """
        import torch
        from llmopt.cache import Artifact
        from llmopt.models import load_tokenizer, torch_dtype
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if cfg.bits == 8:
            qconfig = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qconfig = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=cfg.quant_type,
                bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
            )
        model = AutoModelForCausalLM.from_pretrained(
            src.path, quantization_config=qconfig, device_map=ctx.device, use_safetensors=True,
            trust_remote_code=ctx.trust_remote_code, dtype=torch_dtype(ctx.dtype, ctx.device),
        )
        save_bnb(model, out)
        load_tokenizer(src.path, ctx.trust_remote_code).save_pretrained(out)
        info = {"format": "bnb", "bits": cfg.bits}
        drift = max_logit_drift(model, Artifact(out, "hf-checkpoint", info=info), ctx)
        if drift > 1e-3:
            raise RuntimeError(f"bitsandbytes checkpoint did not round-trip: logits differ by {drift:.3g} after reload")
        return Artifact(out, "hf-checkpoint", {"quantize/roundtrip_max_logit_diff": drift}, info)

    @classmethod
    def load(cls, artifact, device, dtype, trust_remote_code):
        from llmopt.models import load_pretrained

        return load_pretrained(artifact.path, device, trust_remote_code)  # the checkpoint's own config quantizes

    @classmethod
    def card(cls, info: dict) -> list[str]:
        return ["`AutoModelForCausalLM.from_pretrained('model', use_safetensors=True)` (needs `bitsandbytes`); vLLM "
                "and SGLang load the same folder. A memory format: expect bf16's speed or slower, not faster."]


def save_bnb(model, out) -> None:
    """Save a bitsandbytes model, refusing one whose 4-bit weights were repacked by a forward pass."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.dim() == 2 and module.weight.shape[1] != 1:
            raise RuntimeError(
                f"{name}: 4-bit weight has layout {tuple(module.weight.shape)} (repacked by a forward pass on CPU); "
                "saving it would write corrupted weights. Quantize again and save before running the model."
            )
    model.save_pretrained(out, safe_serialization=True)


def max_logit_drift(model, saved, ctx) -> float:
    """Largest absolute logit difference between an in-memory model and its saved copy."""
    import torch
    from llmopt.models import load_model

    probe = torch.arange(3, 35).remainder(model.config.vocab_size).unsqueeze(0).to(ctx.device)
    reloaded = load_model(saved, ctx.device, ctx.dtype, ctx.trust_remote_code)
    with torch.inference_mode():
        expected = model(probe).logits.float()
        got = reloaded(probe).logits.float()
    return (expected - got).abs().max().item()
