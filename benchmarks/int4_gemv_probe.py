"""Int4 decode products on the shapes llmopt's compiled runtime runs for a 7B Llama (q/k/v and
gate/up fused): Marlin as llmopt calls it, Marlin without its fp32 global reduce, and GemLite's
Triton A16W4 kernels (when `gemlite` is installed), beside bf16 cuBLAS. Why: against the fused
bf16 base int4 reached 1.63x at batch 1 on an H200 (issue 14 asks 1.8x); its Marlin products
ran at about 1.7-1.9 TB/s of weight bytes, where bf16 reads 3.1 TB/s. A kernel that reads int4
weights faster is the way to the target; this probe measures the candidates before any is wired
in. Not a test: figures, not asserts (CUDA graphs of 50 calls, medians of 20 replays, as
kernels_micro.py).

    GPTQMODEL_TORCH_EXTENSIONS_DIR=DIR python benchmarks/int4_gemv_probe.py OUT.json [BITS]

BITS 4 (the default: group 128, as the int4 case) or 8 (per output channel, as llmopt's int8
weight-only case, which reached 1.28x the fused base at batch 1 on Marlin where issue 14 asks 1.3x):
the same products, kernels and columns at that width (GemLite's A16W8 in place of A16W4).

GemLite is not one of llmopt's dependencies: for the GPU machine, build its wheel into the
prepared ones (`.venv/bin/pip download gemlite==0.6.0.post2 --no-deps -d /tmp/g && .venv/bin/pip
wheel --no-deps --no-build-isolation /tmp/g/gemlite-*.tar.gz -w .device/wheels`: pure Python over
Triton; `.device/install.sh` installs every wheel there without dependencies).
Without a cached config for the card, its first call per shape autotunes (outside the timing).

Each row: shape, batch, kernel, microseconds, weight TB/s, and the largest error against the
dequantized weight's bf16 product relative to its largest output. `layer_us` sums one decoder
layer's four products per kernel (the figure a TPOT moves by, times 32 layers). A kernel that
fails is recorded with its error, not hidden. Its first run (H200, 2026-11-29, 332 s with Marlin's
112 s build; benchmarks/results/int4_gemv_probe_h200/): Marlin fastest at every batch (a layer
55.8 us at batch 1 against bf16's 109.0 and GemLite's 71.8), its fp32 reduce without measurable
effect; the README's "Fast decode kernels" reads it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kernels_micro import timed  # noqa: E402
from marlin_probe import marlin_layer  # noqa: E402

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# (out, in) of one decoder layer as the compiled runtime runs it: q/k/v stacked, o, gate/up stacked, down
LAYER = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
# PROBE_BATCHES=1,8,16,32,64: the serving engine's decode batches (16, 32, 64) beside the static loop's
BATCHES = [int(b) for b in os.environ.get("PROBE_BATCHES", "1,8,32").split(",")]
BITS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
GROUP = 128 if BITS == 4 else -1  # int8: per output channel


def marlin_variants(layer) -> dict:
    """llmopt's direct call of Marlin's GEMM (llmopt.kernels.linear.MarlinLinear.product), with
    the fp32 global reduce as GPTQModel sets it and without, and with atomic adds in place of the
    global reduce (GPTQModel turns those on only below 2048 outputs; measured here at every shape)."""
    from llmopt.kernels.linear import marlin_gemm_op

    gemm = marlin_gemm_op(layer)
    if gemm is None:
        return {"marlin_gptqmodel_forward": layer}

    def call(fp32: bool, atomic: bool = False):
        return lambda x: gemm(x, None, layer.qweight, None, layer.scales, None, layer.qzeros, layer.g_idx,
                              layer.g_idx_sort_indices, layer.workspace, layer.weight_type.id, x.shape[0],
                              layer.out_features, layer.in_features, layer.is_k_full, atomic, fp32, False)

    return {f"marlin_fp32reduce_{bool(layer.fp32)}": call(bool(layer.fp32)),
            f"marlin_fp32reduce_{not layer.fp32}": call(not layer.fp32),
            "marlin_atomic_add": call(bool(layer.fp32), atomic=True)}


def gemlite_kernel(weight: torch.Tensor):
    """GemLite's A16W<BITS> weight-only kernel on `weight` [N, K] bf16, quantized round-to-nearest,
    asymmetric per group (of 128, or the whole row for int8) in HQQ's form (W ~ (W_q - zero) * scale);
    its dequantized weight."""
    from gemlite.helper import A16Wn

    n, k = weight.shape
    group = k if GROUP == -1 else GROUP
    g = weight.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / (2**BITS - 1)).clamp(min=1e-6)
    zero = -lo / scale
    q = ((g / scale[..., None]) + zero[..., None]).round().clamp(0, 2**BITS - 1)
    dequant = ((q - zero[..., None]) * scale[..., None]).reshape(n, k).to(torch.bfloat16)
    linear = A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
        q.reshape(n, k).to(torch.uint8), scale.to(torch.bfloat16), zero.to(torch.bfloat16), BITS, group)
    return linear, dequant


def main(path: str) -> None:
    rows: list[dict] = []

    def note(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    gen = torch.Generator().manual_seed(0)
    try:
        import gemlite

        note({"gemlite": getattr(gemlite, "__version__", "installed")})
    except ImportError as e:
        gemlite = None
        note({"gemlite": f"not installed: {e}"})
    per_layer: dict[tuple[str, int], list[float]] = {}
    for n, k in LAYER:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        kernels: dict = {"bf16": (lambda x, w=w: F.linear(x, w), w, n * k * 2)}
        layer, ref = marlin_layer(n, k, BITS, GROUP, gen)
        for name, fn in marlin_variants(layer).items():
            kernels[name] = (fn, ref, n * k * BITS // 8)
        if gemlite is not None:
            try:
                linear, dequant = gemlite_kernel(w)
                kernels[f"gemlite_a16w{BITS}"] = (linear, dequant, n * k * BITS // 8)
            except Exception as e:  # recorded, not hidden
                note({"shape": f"{n}x{k}", "kernel": f"gemlite_a16w{BITS}", "error": f"{type(e).__name__}: {e}"[:400]})
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for name, (fn, weight, size) in kernels.items():
                try:
                    with torch.no_grad():
                        expected = x.float() @ weight.float().t()
                        err = ((fn(x).float() - expected).abs().max() / expected.abs().max()).item()
                        us = timed(fn, x)
                    per_layer.setdefault((name, m), []).append(us)
                    note({"shape": f"{n}x{k}", "m": m, "kernel": name, "us": round(us, 2),
                          "weight_tb_s": round(size / us / 1e6, 3), "rel_err": round(err, 5)})
                except Exception as e:
                    note({"shape": f"{n}x{k}", "m": m, "kernel": name, "error": f"{type(e).__name__}: {e}"[:400]})
    # only kernels that ran every product of the layer
    layer_us = {f"{name}@{m}": round(sum(us), 1) for (name, m), us in per_layer.items() if len(us) == len(LAYER)}
    note({"layer_us": layer_us})
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bits": BITS, "group": GROUP,
               "rows": rows}
    Path(path).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
