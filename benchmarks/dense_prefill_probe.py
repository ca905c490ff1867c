"""Prefill products of a Llama-shaped 7B's fused layers (q/k/v, o, gate/up, down) on Marlin against the
same int4 weights dequantized (`QuantLinear.keep_dense`: the compiled `dense_weight`, then cuBLAS) and
against bf16's own dense product, for prefills of 64 to 2048 token rows: where `dense_prefill_tokens`
should start. Not a test: figures (CUDA events, warm-up, median of 20), per layer and summed over 32
layers. Run on the GPU machine from the repository root:

    python benchmarks/dense_prefill_probe.py CACHE_DIR OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from llmopt.kernels.linear import QuantizedWeight, build_marlin, kernel_module

SHAPES = {"qkv": (3 * 4096, 4096), "o": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008)}
ROWS = (64, 128, 256, 512, 1024, 2048)
LAYERS = 32


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of `fn` (3 warm-up calls first), each call between two CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(cache: Path, out: Path) -> None:
    build_marlin(cache)
    g = torch.Generator().manual_seed(0)
    found: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": {}}
    for name, (n, k) in SHAPES.items():
        weight = QuantizedWeight(torch.randint(0, 16, (n, k), generator=g).to(torch.uint8),
                                 torch.rand(k // 128, n, generator=g) * 0.02 + 1e-3, 4, 128)
        module = kernel_module("marlin", weight, "cuda", torch.bfloat16)
        module.keep_dense(weight, 1, "cuda", torch.bfloat16)
        dense_bf16 = module.dense_weight(torch.bfloat16).clone()
        found["ms"][name] = {"dequantize": timed(lambda m=module: m.dense_weight(torch.bfloat16))}
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                found["ms"][name][rows] = {
                    "marlin": timed(lambda m=module, x=x: m._mm(x)),
                    "dense_from_int4": timed(lambda m=module, x=x: m(x)),
                    "bf16": timed(lambda w=dense_bf16, x=x: F.linear(x, w)),
                }
        print(name, json.dumps(found["ms"][name]), flush=True)
    found["model_ms"] = {rows: {kind: LAYERS * sum(found["ms"][name][rows][kind] for name in SHAPES)
                                for kind in ("marlin", "dense_from_int4", "bf16")} for rows in ROWS}
    found["model_ms"]["dequantize"] = LAYERS * sum(found["ms"][name]["dequantize"] for name in SHAPES)
    print(json.dumps(found["model_ms"], indent=1))
    out.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
