"""The quantize stage: bitsandbytes (int8, nf4/fp4), GPTQ via GPTQModel, round-to-nearest, and
NVIDIA ModelOpt's TensorRT-LLM formats.

Each method writes an HF checkpoint directory (safetensors + config + tokenizer); `Artifact.info`
says how `load_model` gets the model back (format, reload kernel, or for ModelOpt the source
model plus the calibrated quantizer state, since transformers cannot reload its exports).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from llmopt.cache import Artifact
from llmopt.data import calibration_windows, load_texts
from llmopt.models import load_model, load_tokenizer, output_to, torch_dtype, weights_bytes
from llmopt.progress import progress_bar
from llmopt.recipe import BnbQuantize, GptqQuantize, ModeloptQuantize, RtnQuantize
from llmopt.stages import StageContext

GPTQ_WORKERS_ENV = "GPTQMODEL_CPU_WORKERS"


def run(cfg: BnbQuantize | GptqQuantize | RtnQuantize | ModeloptQuantize, src: Artifact, out: Path,
        ctx: StageContext) -> Artifact:
    method = {"bnb": _bnb, "gptq": _gptq, "rtn": _rtn, "modelopt": _modelopt}[cfg.method]
    artifact = method(cfg, src, out, ctx)
    stored = weights_bytes(out)
    base = weights_bytes(src.path)
    metrics = {
        "memory/weights_gb": stored / 1e9,
        "memory/weights_gb_base": base / 1e9,
        "memory/compression_ratio": base / stored,
        **artifact.metrics,
    }
    return Artifact(out, "hf-checkpoint", metrics, artifact.info)


# --- bitsandbytes -----------------------------------------------------------------------------


def _bnb(cfg: BnbQuantize, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    """Quantize at load time and save before any forward pass.

    On CPU, bitsandbytes repacks 4-bit weights in place on the first forward pass; a model saved
    after that reloads with corrupted weights and no error. So: save first, check that the
    packed layout is still the one bitsandbytes serialises, and verify the round trip.
    """
    import torch
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


def save_bnb(model, out: Path) -> None:
    """Save a bitsandbytes model, refusing one whose 4-bit weights were repacked by a forward pass."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.dim() == 2 and module.weight.shape[1] != 1:
            raise RuntimeError(
                f"{name}: 4-bit weight has layout {tuple(module.weight.shape)} (repacked by a forward pass on CPU); "
                "saving it would write corrupted weights. Quantize again and save before running the model."
            )
    model.save_pretrained(out, safe_serialization=True)


def max_logit_drift(model, saved: Artifact, ctx: StageContext) -> float:
    """Largest absolute logit difference between an in-memory model and its saved copy."""
    import torch

    probe = torch.arange(3, 35).remainder(model.config.vocab_size).unsqueeze(0).to(ctx.device)
    reloaded = load_model(saved, ctx.device, ctx.dtype, ctx.trust_remote_code)
    with torch.inference_mode():
        expected = model(probe).logits.float()
        got = reloaded(probe).logits.float()
    return (expected - got).abs().max().item()


# --- GPTQ (GPTQModel) -------------------------------------------------------------------------


def gptq_worker_env() -> None:
    """GPTQModel sizes its CPU pool at import as (cores + 1) // 2; on 2 cores that is 1 worker and
    quantization stalls. Ask for at least 2 unless the user set the variable."""
    os.environ.setdefault(GPTQ_WORKERS_ENV, str(max(2, ((os.cpu_count() or 1) + 1) // 2)))


def _gptq(cfg: GptqQuantize, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    """GPTQModel prints a banner, notices and bars of its own: they go to `gptqmodel.log` in the
    stage's folder (with `quant_log.csv`, GPTQ's per-layer error), and the console shows ours."""
    gptq_worker_env()
    import torch

    tokenizer = load_tokenizer(src.path, ctx.trust_remote_code)
    cal = cfg.calibration
    windows = calibration_windows(tokenizer, load_texts(cal.dataset), cal.num_samples, cal.seq_len, cal.seed)
    examples = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    torch.manual_seed(cal.seed)
    terminal = os.fdopen(os.dup(1), "w")  # the bar stays on the terminal while fd 1 goes to the log
    with terminal, progress_bar(3, "gptq: load, quantize, save", enabled=ctx.progress, file=terminal) as advance:
        with output_to(out / "gptqmodel.log"):
            from gptqmodel import GPTQModel, QuantizeConfig

            logging.getLogger("logbar").setLevel(logging.WARNING)  # no per-layer INFO tables in the log either
            qconfig = QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act, sym=cfg.sym,
                                     damp_percent=cfg.damp_percent)
            model = GPTQModel.load(
                str(src.path), qconfig, trust_remote_code=ctx.trust_remote_code, device=ctx.device,
                dtype=torch_dtype(ctx.dtype, ctx.device),
            )
        advance()
        # GPTQModel writes timing logs to a relative ./logs: keep them out of the user's checkout.
        with output_to(out / "gptqmodel.log"), tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
            model.quantize(examples, batch_size=cfg.batch_size)
        advance()
        with output_to(out / "gptqmodel.log"):
            model.save(str(out))
        advance()
    tokenizer.save_pretrained(out)
    backend = cfg.reload_backend or ("triton" if ctx.device == "cuda" else "torch")
    return Artifact(out, "hf-checkpoint", info={"format": "gptq", "bits": cfg.bits, "desc_act": cfg.desc_act,
                                                     "reload_backend": f"gptq_{backend}"})


# --- NVIDIA ModelOpt ---------------------------------------------------------------------------


def _modelopt(cfg: ModeloptQuantize, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    """Calibrate, keep the quantizer state (to rebuild the fake-quantized model for evaluation),
    then export the unified HF checkpoint for TensorRT-LLM's PyTorch backend (export last: it
    mutates the model)."""
    import torch
    from llmopt.export import modelopt

    tokenizer = load_tokenizer(src.path, ctx.trust_remote_code)
    cal = cfg.calibration
    windows = calibration_windows(tokenizer, load_texts(cal.dataset), cal.num_samples, cal.seq_len, cal.seed)
    batches = [torch.tensor(windows[i:i + cfg.batch_size]) for i in range(0, len(windows), cfg.batch_size)]
    model = load_model(src, ctx.device, ctx.dtype, ctx.trust_remote_code)
    before = modelopt.fingerprints(model)
    torch.manual_seed(cal.seed)
    # AWQ runs the calibration data twice (statistics, then the scale search)
    passes = 2 if cfg.format in ("int4_awq", "w4a8_awq") else 1
    terminal = os.fdopen(os.dup(1), "w")  # ModelOpt's own prints go to modelopt.log, the bar stays here
    with terminal, progress_bar(passes * len(batches), f"modelopt {cfg.format}: calibrate", enabled=ctx.progress,
                                file=terminal) as advance, output_to(out / "modelopt.log"):
        model = modelopt.quantize(model, cfg.format, cfg.group_size, cfg.kv_cache, batches, on_batch=advance)
        settings = {"format": cfg.format, "group_size": cfg.group_size, "kv_cache": cfg.kv_cache}
        modelopt.save_state(model, out / modelopt.STATE_DIR, settings, before)
        modelopt.export_hf(model, out, getattr(torch, cfg.export_dtype))
    tokenizer.save_pretrained(out)
    info = {"format": "modelopt", "modelopt_format": cfg.format, "kv_cache": cfg.kv_cache,
            **({"group_size": cfg.group_size} if cfg.format in ("int4_awq", "w4a8_awq") else {}),
            "export_dtype": cfg.export_dtype,
            "source": {"path": str(Path(src.path).resolve()), "info": src.info}}
    return Artifact(out, "hf-checkpoint", {"quantize/calibration_windows": float(len(windows))}, info)


# --- round-to-nearest -------------------------------------------------------------------------


def _rtn(cfg: RtnQuantize, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    """Round each linear layer's weights to `bits` per group, and save them dequantized."""
    import torch

    model = load_model(src, ctx.device, ctx.dtype, ctx.trust_remote_code)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, cfg.bits, cfg.group_size, cfg.sym))
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(src.path, ctx.trust_remote_code).save_pretrained(out)
    return Artifact(out, "hf-checkpoint", info={"format": "rtn-dequantized", "bits": cfg.bits})


def fake_quantize(weight, bits: int, group_size: int, sym: bool):
    """Round-to-nearest per group of `group_size` input columns (-1: one group per row)."""
    rows, cols = weight.shape
    group = cols if group_size == -1 else group_size
    if cols % group:
        raise ValueError(f"group_size {group_size} does not divide the layer width {cols}")
    w = weight.float().reshape(rows, cols // group, group)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
        q = (w / scale).round().clamp(-qmax - 1, qmax) * scale
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
        zero = (-lo / scale).round()
        q = ((w / scale).round() + zero).clamp(0, 2**bits - 1)
        q = (q - zero) * scale
    return q.reshape(rows, cols).to(weight.dtype)

