"""GPTQ through GPTQModel (the maintained successor of AutoGPTQ, same checkpoint format).

GPTQModel prints a banner, notices and bars of its own: they go to `gptqmodel.log` in the stage's
folder (with `quant_log.csv`, GPTQ's per-layer error), and the console shows llmopt's bar.
"""

from __future__ import annotations

import os
from typing import Literal

from llmopt.methods import Method, Serving
from llmopt.schema import CalibrationSpec, Strict, _check_group_size
from pydantic import Field, PositiveInt, StrictBool, field_validator

GPTQ_WORKERS_ENV = "GPTQMODEL_CPU_WORKERS"


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


class Gptq(Method):
    name = "gptq"
    Config = GptqQuantize
    summary = "GPTQ via GPTQModel: calibrated 4/8-bit weights, the GPTQ checkpoint format"
    libraries = ("gptqmodel", "optimum")
    extra = "gptq"
    formats = ("gptq",)
    serving = {
        "gptq": Serving(80, refused={"trtllm-engine": (
            "llmopt builds engines from ModelOpt's TensorRT-LLM checkpoint, and GPTQ checkpoints are not ModelOpt's",
            "target: trtllm (the PyTorch backend loads GPTQ), or method: modelopt, format: int4_awq")}),
        "gptq_desc_act": Serving(80, refused={"trtllm-engine": (
            "the engine converter refuses GPTQ with desc_act: true [G]",
            "quantize with desc_act: false, or target: trtllm (PyTorch backend)")}),
    }

    @classmethod
    def serving_format(cls, cfg) -> str:
        return "gptq_desc_act" if cfg.desc_act else "gptq"

    @classmethod
    def quantize(cls, cfg: GptqQuantize, src, out, ctx):
        from llmopt.data import calibration_windows, load_texts
        from llmopt.models import load_tokenizer

        tokenizer = load_tokenizer(src.path, ctx.trust_remote_code)
        cal = cfg.calibration
        windows = calibration_windows(tokenizer, load_texts(cal.dataset), cal.num_samples, cal.seq_len, cal.seed)
        examples = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
        return run_gptqmodel(cfg, src, out, ctx, examples, seed=cal.seed, label="gptq")

    @classmethod
    def import_libraries(cls) -> None:
        quiet_gptqmodel()  # detached, and its banner off the terminal

    @classmethod
    def load(cls, artifact, device, dtype, trust_remote_code):
        return load_gptq(artifact, device, trust_remote_code)

    @classmethod
    def kernel_candidates(cls, spec: dict, device: str) -> tuple[str, ...]:
        return gptq_kernels(spec, device)

    @classmethod
    def fast_path(cls, model, artifact, device: str, kernel: str, dense_below: int = 0, dense_prefill_tokens: int | str = 0):
        from llmopt.kernels.linear import swap

        return model, swap(model, read_gptq(artifact.path, device), kernel, device, dense_below=dense_below,
                           dense_prefill_tokens=dense_prefill_tokens)

    @classmethod
    def card(cls, info: dict) -> list[str]:
        return ["`AutoModelForCausalLM.from_pretrained('model', use_safetensors=True)` (needs `optimum` and `gptqmodel`; "
                "name the kernel, e.g. `GPTQConfig(bits=4, backend=...)`); vLLM and SGLang load the same folder."]


def gptq_worker_env() -> None:
    """GPTQModel sizes its CPU pool at import as (cores + 1) // 2; on 2 cores that is 1 worker and
    quantization stalls. Ask for at least 2 unless the user set the variable."""
    os.environ.setdefault(GPTQ_WORKERS_ENV, str(max(2, ((os.cpu_count() or 1) + 1) // 2)))


def run_gptqmodel(cfg, src, out, ctx, examples: list | None, seed: int, label: str, qconfig=None):
    """Load `src` into GPTQModel, quantize (with `examples`, or none for a weight-only method),
    save the GPTQ checkpoint to `out` with the tokenizer; GPTQModel's output goes to gptqmodel.log.
    In a child process of its own (llmopt.isolated): GPTQModel's worker threads outlive its
    quantization, and in the process they ran in, later multi-threaded torch ops (the benchmark
    stage's) ran 2.9-3.2x slower. `qconfig`, when given, must pickle (a module-level function or a
    partial of one)."""
    from llmopt.isolated import run_isolated

    gptq_worker_env()  # before the child starts: it reads the variable at GPTQModel's import
    return run_isolated(_gptqmodel_quantize, cfg, src, out, ctx, examples, seed, label, qconfig, label=f"{label} (GPTQModel)")


def _gptqmodel_quantize(cfg, src, out, ctx, examples: list | None, seed: int, label: str, qconfig=None):
    """run_gptqmodel's work, in the child process."""
    import contextlib
    import logging
    import tempfile

    import torch
    from llmopt.cache import Artifact
    from llmopt.models import load_tokenizer, output_to, torch_dtype
    from llmopt.progress import progress_bar

    torch.manual_seed(seed)
    terminal = os.fdopen(os.dup(1), "w")  # the bar stays on the terminal while fd 1 goes to the log
    with terminal, progress_bar(3, f"{label}: load, quantize, save", enabled=ctx.progress, file=terminal) as advance:
        with output_to(out / "gptqmodel.log"):
            from gptqmodel import GPTQModel, QuantizeConfig

            logging.getLogger("logbar").setLevel(logging.WARNING)  # no per-layer INFO tables in the log either
            qconfig = qconfig() if qconfig else QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size,
                                                               desc_act=cfg.desc_act, sym=cfg.sym,
                                                               damp_percent=cfg.damp_percent)
            model = GPTQModel.load(
                str(src.path), qconfig, trust_remote_code=ctx.trust_remote_code, device=ctx.device,
                dtype=torch_dtype(ctx.dtype, ctx.device),
            )
        advance()
        # GPTQModel writes timing logs to a relative ./logs: keep them out of the user's checkout.
        with output_to(out / "gptqmodel.log"), tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
            model.quantize(examples, batch_size=getattr(cfg, "batch_size", 1))
        advance()
        with output_to(out / "gptqmodel.log"):
            model.save(str(out))
        advance()
    load_tokenizer(src.path, ctx.trust_remote_code).save_pretrained(out)
    backend = getattr(cfg, "reload_backend", None) or ("triton" if ctx.device == "cuda" else "torch")
    return Artifact(out, "hf-checkpoint", info={"format": "gptq", "bits": cfg.bits,
                                                "desc_act": bool(getattr(cfg, "desc_act", False)),
                                                "reload_backend": f"gptq_{backend}"})


def quiet_gptqmodel() -> None:
    """Import GPTQModel with its banner and notices off the terminal, and its INFO lines (kernel
    chosen, format converted) off for the process; its import-time warnings go to llmopt's run log
    (at INFO: such as its note that the GIL is on), its errors to the console. The quantizing
    process is a child (run_gptqmodel), so the pipeline's first import is at load."""
    import logging
    import sys
    import tempfile
    from pathlib import Path

    from llmopt.models import import_detached, output_to

    if "gptqmodel" not in sys.modules:
        with tempfile.TemporaryDirectory() as tmp:
            said = Path(tmp) / "import.log"
            with output_to(said):
                import_detached("gptqmodel")
            for line in said.read_text(errors="replace").splitlines():
                if "ERROR" in line or "WARN" in line:
                    level = logging.WARNING if "ERROR" in line else logging.INFO
                    logging.getLogger("llmopt").log(level, "GPTQModel: %s", line.strip())
    logging.getLogger("logbar").setLevel(logging.WARNING)


def load_gptq(artifact, device: str, trust_remote_code: bool):
    """A GPTQ checkpoint through transformers, with the kernel named: GPTQModel's automatic choice on
    Hopper downloads kernel sources at load time."""
    from llmopt.models import load_pretrained
    from transformers import GPTQConfig

    quiet_gptqmodel()
    qconfig = GPTQConfig(bits=artifact.info["bits"], backend=artifact.info["reload_backend"])
    return load_pretrained(artifact.path, device, trust_remote_code, quantization_config=qconfig)


# --- decode kernels --------------------------------------------------------------------------------


def gptq_kernels(spec: dict, device: str) -> tuple[str, ...]:
    """Kernels that run a GPTQ grid, best first (llmopt.kernels: measured on an H200)."""
    bits, group, sym = spec.get("bits"), spec.get("group_size"), spec.get("sym", True)
    found = []
    if device == "cuda" and sym and bits in (4, 8) and group in (-1, 32, 64, 128):
        found.append("marlin")
    if device == "cuda" and sym and bits == 4 and group in (-1, 64, 128) and not spec.get("desc_act"):
        found += ["machete", "machete+marlin"]  # Hopper only (`usable` drops them elsewhere); named, never auto's
    if bits == 4 and group in (-1, 32, 64, 128, 256):
        found.append("int4pack")
    if device == "cpu" and bits == 8 and group == -1 and sym and not spec.get("desc_act"):
        found.append("int8pack")
    return tuple(found)


def read_gptq(path, device: str) -> dict:
    """Every quantized layer of a GPTQ checkpoint as a QuantizedWeight (read from its safetensors,
    not from the loaded model: a Marlin-loaded layer no longer holds GPTQ's packing)."""
    import json
    from pathlib import Path

    import torch
    from llmopt.kernels.linear import QuantizedWeight, unpack_gptq
    from safetensors import safe_open

    path = Path(path)
    config = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if (path / "quantize_config.json").is_file():
        config = {**json.loads((path / "quantize_config.json").read_text()), **config}
    bits, group = config["bits"], config["group_size"]
    v1 = config.get("checkpoint_format", "gptq") == "gptq"  # v1 stores each zero minus one
    tensors: dict = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                prefix, _, leaf = key.rpartition(".")
                if leaf in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    tensors.setdefault(prefix, {})[leaf] = f.get_tensor(key)
    weights = {}
    for prefix, t in tensors.items():
        if "qweight" not in t:
            continue
        # uint8 codes: a 7B's 6.7e9 of them stay 6.7 GB until every layer is swapped (int64: 54 GB)
        codes = unpack_gptq(t["qweight"].to(device), bits).t().to(torch.uint8).contiguous()  # [N, K]
        zeros = unpack_gptq(t["qzeros"].to(device).t().contiguous(), bits).t()  # [G, N]
        zeros = (zeros + 1) & (2**bits - 1) if v1 else zeros
        k = codes.shape[1]
        weights[prefix] = QuantizedWeight(codes, t["scales"].to(device), bits, k if group == -1 else group, zeros,
                                          t["g_idx"].to(device) if "g_idx" in t else None, None,
                                          t["bias"].to(device) if "bias" in t else None)
    return weights
