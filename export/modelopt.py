"""NVIDIA ModelOpt: calibrated TensorRT-LLM-native formats (fp8, int8_sq, int4_awq, w4a8_awq,
nvfp4), kept three ways.

- The fake-quantized model in memory is what quality is measured on: transformers cannot reload
  ModelOpt's exports (FP8/INT8 load as garbage). To rebuild it in a later process, the calibrated
  quantizer state (`_amax`, `_pre_quant_scale` buffers) is saved as safetensors with a JSON of
  which quantizers are on, together with the weights calibration changed (AWQ and SmoothQuant
  fold their smoothing scales into the linear weights; FP8 changes none); `restore` loads those
  into the source model, re-inserts the quantizers without calibrating and puts the state back
  (tested for every format: identical logits).
- `export_hf_checkpoint`: the unified HF checkpoint (`hf_quant_config.json`) that TensorRT-LLM's
  PyTorch backend loads directly.
- `export_tensorrt_llm_checkpoint`: the TensorRT-LLM checkpoint for `trtllm-build`, written from a
  freshly restored model (export_hf_checkpoint mutates the model it exports).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

FORMATS = ("fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")
STATE_DIR = "fakequant"
STATE_WEIGHTS = "quantizers.safetensors"
STATE_JSON = "quantizers.json"
STATE_CHANGED = "changed_weights.safetensors"
BUFFERS = ("_amax", "_pre_quant_scale")


@contextlib.contextmanager
def quiet():
    """ModelOpt prints what it inserts and warns about untested transformers versions on every
    call; callers that keep a log of their own use `output_to` instead."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"modelopt\..*")
        yield


def quant_config(fmt: str, group_size: int = 128, kv_cache: str | None = None) -> dict:
    """ModelOpt's config for a format, with the AWQ block size and an FP8 KV cache where asked."""
    import modelopt.torch.quantization as mtq

    base = {"fp8": mtq.FP8_DEFAULT_CFG, "int8_sq": mtq.INT8_SMOOTHQUANT_CFG, "int4_awq": mtq.INT4_AWQ_CFG,
            "w4a8_awq": mtq.W4A8_AWQ_BETA_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[fmt]
    cfg = copy.deepcopy(base)
    if fmt in ("int4_awq", "w4a8_awq"):
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                for c in entry["cfg"] if isinstance(entry["cfg"], list) else [entry["cfg"]]:
                    if c.get("num_bits") == 4 and "block_sizes" in c:
                        c["block_sizes"] = {**c["block_sizes"], -1: group_size}
    if kv_cache == "fp8":
        cfg["quant_cfg"] = [*cfg["quant_cfg"], *copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])]
    return cfg


def build_extensions(fmt: str, kv_cache: str | None) -> float:
    """Build (or load) the CUDA extensions ModelOpt's fake quantization of `fmt` runs, before
    anything uses them, safely (llmopt.kernels.builds); seconds spent, 0 without CUDA (ModelOpt
    then quantizes in plain torch). FP8 quantizers (fp8, W4A8's activations, NVFP4's scales, an FP8
    KV cache) have an extension of their own; any other ModelOpt loads lazily, as it would anyway."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    from llmopt.kernels import builds
    from modelopt.torch.quantization import extensions

    # raise_if_failed: ModelOpt would otherwise warn and fail later, far from the cause
    loaders = {"modelopt_cuda_ext": lambda: extensions.get_cuda_ext(raise_if_failed=True)}
    if fmt in ("fp8", "w4a8_awq", "nvfp4") or kv_cache == "fp8":
        loaders["modelopt_cuda_ext_fp8"] = lambda: extensions.get_cuda_ext_fp8(raise_if_failed=True)
    return builds.build(loaders, "ModelOpt's CUDA extensions")


def quantize(model, fmt: str, group_size: int, kv_cache: str | None, batches, on_batch=lambda: None):
    """Insert quantizers and calibrate them on `batches` (tensors of token ids) in place."""
    import modelopt.torch.quantization as mtq
    import torch

    def forward_loop(m) -> None:
        with torch.no_grad():
            for batch in batches:
                m(batch.to(next(m.parameters()).device))
                on_batch()

    return mtq.quantize(model, quant_config(fmt, group_size, kv_cache), forward_loop)


def _quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: module for name, module in model.named_modules() if isinstance(module, TensorQuantizer)}


def fingerprints(model) -> dict:
    """A cheap fingerprint of every parameter (sum, sum of squares, position-weighted sum, in
    float64): calibration that rescales a weight changes all three."""
    import torch

    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().flatten().double()
            ramp = torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device)
            out[name] = torch.stack([flat.sum(), (flat * flat).sum(), (flat * ramp).sum()]).cpu()
    return out


def save_state(model, dest: Path, settings: dict, before: dict) -> None:
    """The calibrated quantizer state: buffers as safetensors, switches and settings as JSON, and
    the parameters whose fingerprint changed since `before` (taken before calibration)."""
    import torch
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    after = fingerprints(model)
    params = dict(model.named_parameters())
    changed = {name: params[name].detach().cpu().contiguous() for name in after
               if name in before and not torch.equal(before[name], after[name])}
    save_file(changed, str(dest / STATE_CHANGED))
    tensors, enabled = {}, {}
    for name, q in _quantizers(model).items():
        enabled[name] = [bool(q.is_enabled), bool(getattr(q, "_enable_pre_quant_scale", False))]
        for buffer in BUFFERS:
            if hasattr(q, buffer):
                tensors[f"{name}.{buffer}"] = getattr(q, buffer).detach().cpu().contiguous()
    save_file(tensors, str(dest / STATE_WEIGHTS))
    (dest / STATE_JSON).write_text(json.dumps({**settings, "enabled": enabled}, indent=1, sort_keys=True))


def restore(model, state: Path):
    """Rebuild the fake-quantized model from its source model and the saved quantizer state."""
    import modelopt.torch.quantization as mtq
    import torch
    from safetensors.torch import load_file

    settings = json.loads((state / STATE_JSON).read_text())
    changed = load_file(str(state / STATE_CHANGED))
    params = dict(model.named_parameters())
    if unknown := sorted(set(changed) - set(params))[:3]:
        raise RuntimeError(f"{state}: changed weights {unknown} are not parameters of the source model")
    for name, tensor in changed.items():
        params[name].data.copy_(tensor)
    cfg = quant_config(settings["format"], settings["group_size"], settings.get("kv_cache"))
    cfg["algorithm"] = None  # structure only: the calibration result is loaded below
    with quiet():
        model = mtq.quantize(model, cfg, None)
    quantizers = _quantizers(model)
    if sorted(quantizers) != sorted(settings["enabled"]):
        missing = sorted(set(settings["enabled"]) ^ set(quantizers))[:3]
        raise RuntimeError(f"{state}: saved quantizers do not match the model's (first differences: {missing})")
    device = next(model.parameters()).device
    for key, tensor in load_file(str(state / STATE_WEIGHTS)).items():
        name, buffer = key.rsplit(".", 1)
        q = quantizers[name]
        if buffer == "_pre_quant_scale":
            q._enable_pre_quant_scale = True  # the setter refuses otherwise; the saved switch is applied below
            q.pre_quant_scale = tensor.to(device)
        else:
            q.amax = tensor.to(device)
    for name, (on, pre_quant_scale) in settings["enabled"].items():
        quantizers[name].enable() if on else quantizers[name].disable()
        quantizers[name]._enable_pre_quant_scale = pre_quant_scale
    # block quantizers learn their weights' block layout on the first forward pass (calibration did
    # that for the original); the TensorRT-LLM export needs it, so give the rebuilt model one
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=device))
    return model


def decoder_type(model) -> str:
    from modelopt.torch.export import get_model_type

    return get_model_type(model)


def export_hf(model, dest: Path, dtype) -> None:
    """The unified HF checkpoint (mutates `model`: export last, or from a fresh one)."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, dtype=dtype, export_dir=dest)


def export_trtllm(model, dest: Path, dtype, tp: int = 1, pp: int = 1) -> None:
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    export_tensorrt_llm_checkpoint(model, decoder_type(model), dtype=dtype, export_dir=dest,
                                   inference_tensor_parallel=tp, inference_pipeline_parallel=pp)
