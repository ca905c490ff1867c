"""Decode kernels for quantized weights: which exist, where they run, and how a model gets them.

A quantized checkpoint stays in the format serving stacks load (GPTQ, ModelOpt's export); at load
time for evaluation and benchmarking, its method (llmopt.methods) turns each quantized linear layer
into a `QuantizedWeight` (codes, scales, groups) and `accelerate` swaps the layer for a module
that runs one of these maintained kernels on those codes:

| kernel | what | where |
|---|---|---|
| `marlin` | GPTQModel's Marlin GEMM (4/8-bit symmetric, groups -1/32/64/128, act-order) | CUDA SM80+; JIT-built, cached |
| `machete` | GPTQModel's Machete (vLLM's CUTLASS GEMM; 4-bit symmetric, groups -1/64/128) | CUDA SM90 only; built, cached |
| `machete+marlin` | Machete for products of 32 rows or more, Marlin below (both layouts held) | CUDA SM90 only; both built |
| `int4pack` | torch's int4 weight-only matmul (tinygemm on CUDA, `_weight_int4pack_mm_for_cpu` on CPU) | CPU; CUDA SM80+ |
| `int8pack` | torch's `_weight_int8pack_mm` (per-channel int8) | CPU |
| `fp8` | `torch._scaled_mm`: FP8 e4m3 weights and activations, per-tensor scales (real FP8 products) | CUDA SM89+ |
| `none` | the format's own library as loaded (GPTQModel's reload kernel, bitsandbytes, ModelOpt fake quantization) | anywhere |

`auto` takes the first kernel the method lists for the format and device; with none, it warns and
runs `none` (the run's `env.kernel` tag says which ran, and why). On CPU, `auto` runs each product
under `CPU_DENSE_BELOW` weights dequantized instead (`dequantized`: the reference weight in the
model's dtype, a dense product): there a CPU integer kernel's call costs more than the dense product
it replaces (benchmarks/cpu_small_products.py on a 2-core x86 here: 64x64 at batch 1, int4pack's
module 16-17 us, a dense float32 layer 5.6-5.9; on two threads they cross between 448 and 512
wide, on one int4pack stayed behind up to 640). A named kernel runs every layer; the tag and
`kernel/layers_dequantized` say how many ran dequantized. A kernel the recipe names that cannot
run its format on the recipe's GPU is refused at validation with the nearest valid choice.

Chosen by measurement on an H200 (benchmarks/kernels_micro.py, benchmarks/marlin_probe.py): at
batch 1 on the 7B MLP shapes Marlin int4 runs 1.9-2.1x bf16 and stays ahead at batch 8 (2.1x)
and 32 (1.0-1.4x), where tinygemm falls to 0.75x and 0.24x; FP8 `_scaled_mm` inside a compiled
step runs 2.3x; torch's `_weight_int8pack_mm` is 10x slower than bf16 on CUDA, so int8 runs on
Marlin there.

This module imports no torch (validation reads `KERNELS`); `llmopt.kernels.linear` holds the modules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("llmopt")

BUILD_DIR = "torch-extensions"  # <cache root>/torch-extensions: JIT-built kernels (GPTQModel's Marlin)
# `auto` on CPU: products with fewer weights (out x in) run dequantized, where an integer kernel's
# fixed call cost exceeds a dense product's (1 MiB of float32 at most per product, so no model's
# memory moves by much); SmolLM2-135M's smallest product (576x576) is above it and keeps its kernel
CPU_DENSE_BELOW = 1 << 18


@dataclass(frozen=True)
class Kernel:
    name: str
    summary: str
    devices: tuple[str, ...]  # "cpu", "cuda"
    min_sm: int = 0  # smallest compute capability on CUDA
    builds: tuple[str, ...] = ()  # the extensions it compiles on first use (then cached): `prepare`
    max_sm: int = 0  # largest compute capability on CUDA (0: no limit)
    auto: bool = True  # `auto` may pick it (or pass to it when the one before cannot take a model's shapes)


KERNELS = {
    "marlin": Kernel("marlin", "GPTQModel's Marlin GEMM", ("cuda",), 80, builds=("marlin",)),
    # named only: faster than Marlin from 32 rows, slower below (H100), and its first use compiles for minutes
    "machete": Kernel("machete", "GPTQModel's Machete GEMM (CUTLASS, Hopper)", ("cuda",), 90, builds=("machete",),
                      max_sm=90, auto=False),
    # named only, as machete: both layouts held, each product on the kernel measured faster at its row count
    "machete+marlin": Kernel("machete+marlin", "Machete from 32 rows, Marlin below (both layouts; Hopper)", ("cuda",), 90,
                             builds=("machete", "marlin"), max_sm=90, auto=False),
    "int4pack": Kernel("int4pack", "torch's int4 weight-only matmul (tinygemm / for_cpu)", ("cpu", "cuda"), 80),
    "int8pack": Kernel("int8pack", "torch's _weight_int8pack_mm", ("cpu",)),
    "fp8": Kernel("fp8", "torch._scaled_mm with FP8 e4m3 weights and activations", ("cuda",), 89),
    "none": Kernel("none", "the format's own library, as loaded", ("cpu", "cuda")),
}
CHOICES = ("auto", *KERNELS)


def runs_on(name: str, device: str, sm: int | None) -> str | None:
    """Why `name` cannot run on this device (`cpu`/`cuda`, compute capability `sm`), or None."""
    kernel = KERNELS[name]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind not in kernel.devices:
        return f"{name} runs on {' and '.join(kernel.devices).upper()} only"
    if kind == "cuda" and sm is not None and sm < kernel.min_sm:
        return (f"{name} needs compute capability {kernel.min_sm // 10}.{kernel.min_sm % 10} or newer and this GPU is "
                f"{sm // 10}.{sm % 10}")
    if kind == "cuda" and sm is not None and kernel.max_sm and sm > kernel.max_sm:
        return f"{name} runs on Hopper (compute capability 9.0) only and this GPU is {sm // 10}.{sm % 10}"
    return None


def usable(candidates: tuple[str, ...], device: str, sm: int | None) -> tuple[str, ...]:
    """The kernels among a method's `candidates` (best first) that run on this device."""
    return tuple(name for name in candidates if runs_on(name, device, sm) is None)


def auto_order(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """What `auto` tries, in order: the candidates it may pick (a named-only kernel, Machete, is never
    built or tried on its behalf)."""
    return tuple(name for name in candidates if KERNELS[name].auto)


@dataclass
class Applied:
    """What `accelerate` did: the kernel that runs, why, and what it cost."""

    kernel: str
    reason: str = ""
    layers: int = 0
    build_s: float = 0.0  # compiling the kernel's extension (0 when cached or none)
    prepare_s: float = 0.0  # repacking the weights into the kernel's layout
    dequantized: int = 0  # of `layers`, those `auto` ran dequantized (small products on CPU)
    notes: list[str] = field(default_factory=list)
    dense_prefill_tokens: int | str = 0  # products of this many rows or more run dense (0: none; "auto": the engine times)
    dense_copy_bytes: int = 0  # the codes kept for them

    def metrics(self) -> dict[str, float]:
        found = {"kernel/build_s": self.build_s, "kernel/prepare_s": self.prepare_s, "kernel/layers": float(self.layers),
                 "kernel/layers_dequantized": float(self.dequantized)}
        if self.dense_prefill_tokens:
            found["kernel/dense_copy_gb"] = self.dense_copy_bytes / 1e9
            if self.dense_prefill_tokens != "auto":
                found["kernel/dense_prefill_tokens"] = float(self.dense_prefill_tokens)
        return found

    def tag(self) -> str:
        return self.kernel + (f" ({self.reason})" if self.reason else "")


class KernelBuildError(RuntimeError):
    """A kernel's extension failed to build: names the kernel and its build log (exit 1)."""


def load_accelerated(artifact, device: str, dtype: str, trust_remote_code: bool, wanted: str,
                     cache_root, dense_prefill_tokens: int | str = 0) -> tuple[object, Applied]:
    """`load_model` then `accelerate`, loading only what the fast path needs: where a kernel will be
    tried, the method's `load_for_kernel` (ModelOpt: the plain source model, without the fake
    quantization its kernels replace)."""
    from llmopt import methods
    from llmopt.models import load_model

    method = methods.writing(artifact.info.get("format"))
    if method is not None:
        method.import_libraries()  # before a model exists: GPTQModel and ModelOpt pin the frames importing them
    spec = artifact.info.get("kernel_spec") or {}
    if method is not None and wanted != "none" and method.kernels(spec, device, _sm(device)):
        model = method.load_for_kernel(artifact, device, dtype, trust_remote_code)
    else:
        model = load_model(artifact, device, dtype, trust_remote_code)
    return accelerate(model, artifact, device, wanted, cache_root, dense_prefill_tokens)


def accelerate(model, artifact, device: str, wanted: str, cache_root,
               dense_prefill_tokens: int | str = 0) -> tuple[object, Applied]:
    """Swap the quantized layers of `model` (loaded from `artifact`) for `wanted` (`auto`, a kernel
    name, or `none`). Never silent: with no fast kernel, `auto` logs a warning and says why in the
    result; a named kernel that cannot run here is an error."""
    from llmopt import methods

    method = methods.writing(artifact.info.get("format"))
    if method is None:
        return model, Applied("none", "not quantized")
    sm = _sm(device)
    spec = artifact.info.get("kernel_spec") or {}
    candidates = method.kernels(spec, device, sm)
    if wanted == "none":
        return model, Applied("none", "kernel: none")
    automatic = wanted == "auto"
    if automatic:
        candidates = auto_order(candidates)
        if not candidates:
            reason = method.no_kernel_reason(spec, device, sm)
            log.warning("no fast kernel for %s on %s (%s): running the format's own library, which may be slower than "
                        "the base model", method.name, device, reason)
            return model, Applied("none", reason)
        wanted = candidates[0]
    elif wanted not in candidates:
        why = runs_on(wanted, device, sm) or f"it does not run {method.name} {spec}"
        raise ValueError(f"kernel: {wanted} cannot run here: {why}; nearest valid choice: "
                         f"{candidates[0] if candidates else 'none'}")
    # auto tries the candidates in order: one that cannot take this model's shapes (ValueError before
    # any layer is swapped) passes to the next, with a warning and the reason in the tag
    order = candidates[candidates.index(wanted):] if automatic else (wanted,)
    dense_below = CPU_DENSE_BELOW if automatic and not device.startswith("cuda") else 0
    skipped: list[str] = []
    for kernel in order:
        started = time.perf_counter()
        build_s = prepare(kernel, cache_root)
        try:
            model, layers = method.fast_path(model, artifact, device, kernel, dense_below=dense_below,
                                             dense_prefill_tokens=dense_prefill_tokens)
        except ValueError as e:
            if kernel == order[-1]:
                raise
            log.warning("kernel %s cannot run this model (%s); trying %s", kernel, e, order[order.index(kernel) + 1])
            skipped.append(f"{kernel}: {e}")
            continue
        break
    prepare_s = time.perf_counter() - started - build_s
    from llmopt.kernels.linear import kernels_in

    dequantized = kernels_in(model).get("dequantized", 0) if dense_below else 0
    reasons = list(skipped)
    if dequantized == layers and layers:
        reasons.append(f"every quantized product is under {dense_below} weights: on CPU a dense product beats {kernel}'s "
                       f"call there; kernel: {kernel} runs it anyway")
        log.warning("kernel auto: all %d quantized layers run dequantized (dense, in the model's dtype), faster on CPU than "
                    "%s at these sizes; the model holds them unpacked. kernel: %s forces the kernel", layers, kernel, kernel)
        kernel = "dequantized"
    elif dequantized:
        reasons.append(f"{dequantized} of {layers} layers dequantized: products under {dense_below} weights")
    from llmopt.kernels.linear import dense_copy_bytes

    copied = dense_copy_bytes(model) if dense_prefill_tokens else 0
    if copied:
        if dense_prefill_tokens == "auto":
            reasons.append(f"prefills dense where timed faster at start-up (auto), from a {copied / 1e9:.2f} GB copy of "
                           "the codes, dropped if none is")
        else:
            reasons.append(f"products of {dense_prefill_tokens}+ rows dense, from a {copied / 1e9:.2f} GB copy of the codes")
    applied = Applied(kernel, "; ".join(reasons), layers=layers, build_s=build_s, prepare_s=prepare_s,
                      dequantized=dequantized, dense_prefill_tokens=dense_prefill_tokens if copied else 0,
                      dense_copy_bytes=copied)
    log.info("kernel %s on %d layers (build %.1f s, repack %.1f s)", applied.tag(), layers, applied.build_s,
             applied.prepare_s)
    return model, applied


def prepare(name: str, cache_root) -> float:
    """Build the kernel's extensions if it has any (seconds spent; 0 when the cached builds load)."""
    spent = 0.0
    for extension in KERNELS[name].builds:
        if extension == "machete":
            from llmopt.kernels.machete import build_machete as build
        else:
            from llmopt.kernels.linear import build_marlin as build
        spent += build(cache_root)
    return spent


def _sm(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    from llmopt.machine import gpus

    found = gpus()
    return found[0].sm if found else None
