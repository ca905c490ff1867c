"""Round-to-nearest weight quantization, saved dequantized: the baseline GPTQ must beat.

Its checkpoint holds the rounded weights in the model's own dtype, so it serves as bf16 does and
is no smaller; it measures what rounding alone costs in quality.
"""

from __future__ import annotations

from typing import Literal

from llmopt.methods import Method
from llmopt.schema import Strict, _check_group_size
from pydantic import Field, StrictBool, field_validator


class RtnQuantize(Strict):
    """Round-to-nearest weight quantization, saved dequantized: a baseline that GPTQ must beat."""

    stage: Literal["quantize"]
    method: Literal["rtn"]
    name: str = "quantize"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = 128
    sym: StrictBool = True

    _group_size = field_validator("group_size")(_check_group_size)


class Rtn(Method):
    name = "rtn"
    Config = RtnQuantize
    summary = "round-to-nearest per group, saved dequantized (a quality baseline; serves as bf16)"
    formats = ("rtn-dequantized",)

    @classmethod
    def serving_format(cls, cfg) -> str:
        return "bf16"

    @classmethod
    def quantize(cls, cfg: RtnQuantize, src, out, ctx):
        """Round each linear layer's weights to `bits` per group, and save them dequantized."""
        import torch
        from llmopt.cache import Artifact
        from llmopt.models import load_model, load_tokenizer

        model = load_model(src, ctx.device, ctx.dtype, ctx.trust_remote_code)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    module.weight.copy_(fake_quantize(module.weight, cfg.bits, cfg.group_size, cfg.sym))
        model.save_pretrained(out, safe_serialization=True)
        load_tokenizer(src.path, ctx.trust_remote_code).save_pretrained(out)
        return Artifact(out, "hf-checkpoint", info={"format": "rtn-dequantized", "bits": cfg.bits})

    @classmethod
    def load(cls, artifact, device, dtype, trust_remote_code):
        from llmopt.models import load_plain

        return load_plain(artifact.path, device, dtype, trust_remote_code)

    @classmethod
    def kernel_candidates(cls, spec: dict, device: str) -> tuple[str, ...]:
        from llmopt.methods.gptq import gptq_kernels

        return gptq_kernels(spec, device)  # the same integer grids

    @classmethod
    def fast_path(cls, model, artifact, device: str, kernel: str, dense_below: int = 0, dense_prefill_tokens: int | str = 0):
        """The saved weights lie on the rounding grid: recover codes and scales from them exactly
        (checked), and run them as integers."""
        import torch
        from llmopt.kernels.linear import swap

        spec = artifact.info["kernel_spec"]
        weights = {name: regrid(module.weight.data, spec["bits"], spec["group_size"], spec["sym"], module.bias)
                   for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name != "lm_head"}
        return model, swap(model, weights, kernel, device, dense_below=dense_below, dense_prefill_tokens=dense_prefill_tokens)

    @classmethod
    def limits(cls, info: dict) -> list[str]:
        return ["- Saved dequantized: the rounding's quality cost, at bf16's size and speed."]


def fake_quantize(weight, bits: int, group_size: int, sym: bool):
    """Round-to-nearest per group of `group_size` input columns (-1: one group per row)."""
    rows, cols = weight.shape
    group = cols if group_size == -1 else group_size
    if cols % group:
        raise ValueError(f"group_size {group_size} does not divide the layer width {cols}")
    w = weight.float().reshape(rows, cols // group, group)
    _, _, rounded = _rounded(w, bits, sym)
    return rounded.reshape(rows, cols).to(weight.dtype)


def _rounded(w, bits: int, sym: bool):
    """Weights grouped [rows, groups, group] onto the grid: (codes, (scale, zero) per group, the
    rounded weights). Symmetric: scale max|w| / (2**(bits-1) - 1) around the code 2**(bits-1);
    otherwise min to max over 2**bits - 1 steps, with a rounded zero code. `fake_quantize` rounds
    with it and `regrid` reads the rounded weights back with it: one formula, so they agree."""
    import torch

    if sym:
        scale = w.abs().amax(-1).clamp(min=1e-8) / (2 ** (bits - 1) - 1)  # [rows, groups]
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
        zero = (-lo / scale).round()
    codes = ((w / scale[..., None]).round() + zero[..., None]).clamp(0, 2**bits - 1)
    return codes, (scale, zero), (codes - zero[..., None]) * scale[..., None]


def regrid(weight, bits: int, group_size: int, sym: bool, bias=None):
    """The integer grid behind weights `fake_quantize` rounded: codes, scales and zeros per group,
    read back from the rounded values (ValueError when they are not on such a grid)."""
    import torch
    from llmopt.kernels.linear import QuantizedWeight

    rows, cols = weight.shape
    group = cols if group_size == -1 else group_size
    w = weight.float().reshape(rows, cols // group, group)
    codes, (scale, zero), rebuilt = _rounded(w, bits, sym)
    error = ((rebuilt - w).abs().amax() / w.abs().amax().clamp(min=1e-12)).item()
    if error > 1e-2:
        raise ValueError(f"the weights are not on a {bits}-bit grid of {group} columns ({error:.2%} off): "
                         "not an rtn checkpoint of these settings")
    return QuantizedWeight(codes.reshape(rows, cols).to(torch.uint8), scale.t().contiguous(), bits, group,
                           None if sym else zero.t().to(torch.int32).contiguous(), None, None,
                           None if bias is None else bias.data)
