"""Which checkpoint format TensorRT-LLM can serve, on which GPU, through which route and version:
the table `llmopt validate` checks a recipe against before any GPU hour is spent.

Routes:
- `trtllm`: the PyTorch backend (TensorRT-LLM 1.x default) loads an HF-format checkpoint directly.
- `trtllm-engine`: a TensorRT-LLM checkpoint, then `trtllm-build` to `.engine` files; legacy in
  1.0-1.2.x and removed after 1.2.x.

Sources (read 2026-11):
[Q]  TensorRT-LLM, features/quantization.md ("Quantization in TensorRT LLM", 1.0 and later):
     recipes FP4, FP8 per tensor, FP8 KV cache, W4A16/W4A8 GPTQ, W4A16/W4A8 AWQ, run from
     ModelOpt checkpoints by the default PyTorch backend.
     https://nvidia.github.io/TensorRT-LLM/features/quantization.html
[M]  ModelOpt support matrix (GPU generation per format): FP4 Blackwell and later; FP8 Ada and
     later; INT8 SmoothQuant Ampere and later; W4A16 AWQ Ampere and later; W4A8 AWQ Ada and later.
     https://nvidia.github.io/Model-Optimizer/guides/0_support_matrix.html
[E]  TensorRT-LLM checkpoint / trtllm-build (engine workflow; legacy in 1.0-1.2.x, removed after):
     https://nvidia.github.io/TensorRT-LLM/architecture/checkpoint.html
     https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html
[SQ] INT8 SmoothQuant is built into engines only (the PyTorch backend has no W8A8 SmoothQuant
     path), examples/models/core/llama/README.md "SmoothQuant".
[G]  The engine converter refuses GPTQ checkpoints quantized with act-order (`desc_act: true`):
     examples/models/core/llama/convert_checkpoint.py, `--quant_ckpt_path` for GPTQ.
[B]  bitsandbytes is not among TensorRT-LLM's quantization recipes [Q]: its checkpoints do not load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmopt import methods
from llmopt.methods import Serving

TARGETS = ("trtllm", "trtllm-engine")
ENGINE_LAST = (1, 2)  # the engine route exists up to 1.2.x [E]
PYTORCH_FIRST = (1, 0)  # the PyTorch backend is the default from 1.0 [Q]
DEFAULT_TRTLLM_VERSION = "1.2.0"

# The rows come from the quantization methods' declarations (`Method.serving`, llmopt.methods):
# format -> Serving(smallest compute capability, nearest choice below it, refused targets).
# bf16 (no quantization, or weights saved dequantized) needs Ampere.
ROWS = {"bf16": Serving(80)} | {fmt: row for method in methods.discover().values() for fmt, row in method.serving.items()}
FORMATS = tuple(ROWS)  # source formats: what the stage before `compile` produced
MIN_SM = {fmt: row.min_sm for fmt, row in ROWS.items() if row.min_sm is not None}
# (format, target) -> why not, and the nearest route that works; absent = supported
UNSUPPORTED = {(fmt, target): why for fmt, row in ROWS.items() for target, why in row.refused.items()}

# GPU names a recipe may use for `compile.gpu`, with their compute capability
GPUS = {"V100": 70, "T4": 75, "A100": 80, "A30": 80, "A10": 86, "A10G": 86, "A40": 86, "RTX3090": 86, "RTXA6000": 86,
        "L4": 89, "L40": 89, "L40S": 89, "RTX4090": 89, "RTX6000ADA": 89, "H100": 90, "H200": 90, "GH200": 90,
        "H20": 90, "B200": 100, "GB200": 100, "B300": 103, "GB300": 103, "RTX5090": 120, "RTXPRO6000": 120}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    alternative: str = ""

    def message(self) -> str:
        return f"{self.reason}; nearest valid route: {self.alternative}" if not self.ok else "supported"


def target_sm(gpu: str | None) -> tuple[int, str]:
    """The compute capability a bundle is for, and the GPU's name: the recipe's `gpu`, else this
    machine's first GPU (read through NVML: no torch)."""
    if gpu is not None:
        return parse_sm(gpu), gpu
    from llmopt.machine import gpus

    if not gpus():
        raise ValueError("gpu: not given and this machine has no CUDA device; name the GPU the bundle is for "
                         "(H100, L40S, A100, sm90, ...)")
    return gpus()[0].sm, gpus()[0].name


def parse_sm(gpu: str) -> int:
    """`H100`, `h100-sxm`, `sm90`, `sm_90`, `9.0` -> 90. ValueError for what it cannot read."""
    text = gpu.strip().upper().replace(" ", "").replace("_", "")
    if m := re.fullmatch(r"SM(\d{2,3})A?", text):
        return int(m.group(1))
    if m := re.fullmatch(r"(\d{1,2})\.(\d)", text):
        return int(m.group(1)) * 10 + int(m.group(2))
    name = re.sub(r"[-](SXM|PCIE|NVL|HBM3|\d+GB).*$", "", text.replace("NVIDIA", ""))
    if name in GPUS:
        return GPUS[name]
    raise ValueError(f"unknown GPU {gpu!r}: use a name ({', '.join(sorted(GPUS))}) or a compute capability (sm90, 8.9)")


def parse_version(version: str) -> tuple[int, int]:
    m = re.match(r"^v?(\d+)\.(\d+)", version.strip())
    if not m:
        raise ValueError(f"unreadable TensorRT-LLM version {version!r}: use major.minor[.patch], e.g. 1.2.0")
    return int(m.group(1)), int(m.group(2))


def check(fmt: str, target: str, sm: int, trtllm_version: str) -> Verdict:
    """Can `fmt` be served through `target` on a GPU of compute capability `sm` with TensorRT-LLM
    `trtllm_version`? The reason and the nearest valid route when not."""
    if fmt not in FORMATS or target not in TARGETS:
        raise ValueError(f"unknown format {fmt!r} or target {target!r}")
    if (fmt, target) in UNSUPPORTED:
        reason, alternative = UNSUPPORTED[(fmt, target)]
        return Verdict(False, reason, alternative)
    version = parse_version(trtllm_version)
    if target == "trtllm-engine" and version > ENGINE_LAST:
        return Verdict(False, f"TensorRT-LLM {trtllm_version} has no engine route (trtllm-build was removed after "
                              "1.2.x) [E]", "target: trtllm (PyTorch backend), or TensorRT-LLM 1.2.x for engines")
    if target == "trtllm" and version < PYTORCH_FIRST:
        return Verdict(False, f"TensorRT-LLM {trtllm_version} predates the PyTorch backend as default (1.0) [Q]",
                       "TensorRT-LLM 1.0 or later, or target: trtllm-engine")
    need = MIN_SM[fmt]
    if sm < need:
        fallback = ROWS[fmt].below_min
        if sm < 80:
            fallback = "a GPU of SM80 (Ampere) or newer"
        return Verdict(False, f"{fmt} needs compute capability {need // 10}.{need % 10} or newer and the target GPU is "
                              f"{sm // 10}.{sm % 10} [M]", fallback)
    return Verdict(True)


def format_of(cfg) -> str:
    """The table's format for the quantize stage's config (None: no quantization)."""
    return "bf16" if cfg is None else methods.get(cfg.method).serving_format(cfg)


def source_format(info: dict) -> str:
    """The table's format for an artifact's `info` (what the quantize stage recorded; bf16 otherwise)."""
    return info.get("serving_format", "bf16")
