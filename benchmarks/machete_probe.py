"""Probe (GPU, Hopper; not a test): Machete (`kernel: machete`, llmopt.kernels.machete) against Marlin
and bf16 cuBLAS on a Llama-shaped 7B's fused products (q/k/v, o, gate/up, down), at the row counts
a server meets: decode batches of 1-64 rows (the engine's 16, 32, 64), and prefills up to 8 prompts
of 288 tokens (2304 rows). Why: at 64 streams on an H100 Marlin's decode step took as long as bf16's
(README, "Serving under load"): Marlin's products at 32-64 rows run no faster than cuBLAS's.

Each product runs through llmopt's own modules (MacheteLinear, MarlinLinear: what the engine runs,
q/k/v and gate/up fused as it fuses them), built from one random symmetric 4-bit grid, group 128;
timed as a CUDA graph of 50 calls, median of 20 replays (benchmarks/kernels_micro.py); error against
the dequantized weight's product, relative to its largest output. Marlin's column needs its
extension (built in the background by the caller, or skipped with a note). `layer_us` sums a layer's
four products per kernel and row count (times 32 layers: a decode step's products).

    python benchmarks/machete_probe.py CACHE_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kernels_micro import timed  # noqa: E402

LAYER = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
ROWS = [int(r) for r in os.environ.get("PROBE_ROWS", "1,8,16,32,48,64,128,512,2304").split(",")]


def grid(n: int, k: int, gen: torch.Generator):
    from llmopt.kernels.linear import QuantizedWeight

    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(k // 128, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    return QuantizedWeight(codes=codes, scales=scales, bits=4, group_size=128)


def schedules(weight, n: int, k: int, note) -> None:
    """PROBE_SCHEDULES=16,32,64: every Machete schedule (tile shape, cluster) its library lists, timed at
    those rows on this product, beside the one its heuristic picks (`schedule=None`): whether a
    per-shape choice would beat the heuristic (vLLM's is tuned on H100s for larger models)."""
    from llmopt.kernels.linear import MacheteLinear

    module = MacheteLinear(weight, "cuda", torch.bfloat16)
    m_ = module.machete
    listed = torch.ops.gptqmodel_machete.machete_supported_schedules(torch.bfloat16, module.type_id, torch.bfloat16,
                                                                     None, None, None, None)
    for m in (int(r) for r in os.environ["PROBE_SCHEDULES"].split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        times = {}
        for schedule in [None, *listed]:
            def call(x, schedule=schedule):
                return torch.ops.gptqmodel_machete.machete_mm(x, m_.qweight, module.type_id, None, m_.scales, None,
                                                              module.group, None, None, schedule)
            try:
                times[schedule or "heuristic"] = round(timed(call, x), 2)
            except Exception as e:
                times[schedule or "heuristic"] = f"{type(e).__name__}: {e}"[:120]
        ok = {s: t for s, t in times.items() if isinstance(t, float) and s != "heuristic"}
        best = min(ok, key=ok.get) if ok else None
        note({"shape": f"{n}x{k}", "m": m, "schedules": times, "best": best, "best_us": ok.get(best)})


def main(cache: Path, path: Path) -> None:
    rows: list[dict] = []

    def note(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    from llmopt.kernels import linear
    from llmopt.kernels.machete import build_machete

    started = time.perf_counter()
    note({"machete_load_s": round(build_machete(cache), 1), "library": os.environ.get("GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY")})
    marlin = os.environ.get("PROBE_MARLIN", "1") != "0"  # PROBE_MARLIN=0: no Marlin column (its build takes minutes)
    try:
        if marlin:
            note({"marlin_build_s": round(linear.build_marlin(cache), 1)})
    except Exception as e:  # recorded: the probe goes on without Marlin's column
        note({"marlin": f"not built: {type(e).__name__}: {e}"[:300]})
        marlin = False
    gen = torch.Generator().manual_seed(0)
    per_layer: dict[tuple[str, int], list[float]] = {}
    for n, k in LAYER:
        weight = grid(n, k, gen)
        dense = weight.dequantize().to("cuda", torch.bfloat16)
        kernels = {"bf16": lambda x, w=dense: F.linear(x, w)}
        for name, cls in (("machete", linear.MacheteLinear), ("marlin", linear.MarlinLinear)):
            if name == "marlin" and not marlin:
                continue
            try:
                kernels[name] = cls(weight, "cuda", torch.bfloat16)
            except Exception as e:
                note({"shape": f"{n}x{k}", "kernel": name, "error": f"{type(e).__name__}: {e}"[:400]})
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                expected = x.float() @ dense.float().t()
                for name, fn in kernels.items():
                    try:
                        err = linear.relative_error(fn(x).float(), expected)
                        us = timed(fn, x)
                    except Exception as e:
                        note({"shape": f"{n}x{k}", "m": m, "kernel": name, "error": f"{type(e).__name__}: {e}"[:400]})
                        continue
                    per_layer.setdefault((name, m), []).append(us)
                    note({"shape": f"{n}x{k}", "m": m, "kernel": name, "us": round(us, 2), "rel_err": round(err, 5)})
        del kernels
        torch.cuda.empty_cache()
        if os.environ.get("PROBE_SCHEDULES"):
            schedules(weight, n, k, note)
    layer_us = {f"{name}@{m}": round(sum(us), 1) for (name, m), us in per_layer.items() if len(us) == len(LAYER)}
    note({"layer_us": layer_us, "seconds": round(time.perf_counter() - started, 1)})
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
