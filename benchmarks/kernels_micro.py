"""Decode-shaped matrix products of a 7B Llama, one kernel candidate per quantized format, timed on
one GPU (CUDA graphs of 50 calls, medians of 20 replays): how llmopt chose its fast kernels.

    python benchmarks/kernels_micro.py OUT.json

Prints and writes microseconds per product and the weight bandwidth they imply. Figures, not asserts.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): attention, MLP up/gate, MLP down
BATCHES = [1, 8, 32]
CALLS = 50


def timed(fn, x) -> float:
    """Microseconds per call: CALLS calls captured in a CUDA graph, median of 20 replays."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(x)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def candidates(w: torch.Tensor, group: int = 128) -> dict:
    """name -> (function of x, bytes of weights it reads)."""
    n, k = w.shape
    out = {"bf16": (lambda x: F.linear(x, w), w.numel() * 2)}
    # int4, asymmetric grid per group (as GPTQ/AWQ/RTN give), tinygemm layout
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
    sz = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
    for tiles in (2, 4, 8):
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        out[f"int4pack_t{tiles}"] = ((lambda p: lambda x: torch.ops.aten._weight_int4pack_mm(x, p, group, sz))(packed),
                                     n * k // 2)
    # int8 per channel
    s8 = (w.float().abs().amax(1) / 127).clamp(min=1e-8)
    w8 = (w.float() / s8[:, None]).round().clamp(-128, 127).to(torch.int8)
    s8b = s8.to(torch.bfloat16)
    out["int8pack"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s8b), n * k)
    out["int8_compiled"] = (torch.compile(lambda x: F.linear(x, w8.to(x.dtype)) * s8b, mode="max-autotune-no-cudagraphs"),
                            n * k)
    # fp8 e4m3, per-tensor scales (ModelOpt's FP8: static input scale, per-tensor weight scale)
    ws = w.float().abs().max() / 448
    w8f = (w.float() / ws).to(torch.float8_e4m3fn)
    wt = w8f.t()  # column-major as _scaled_mm wants
    one = torch.ones((), device=w.device)
    in_scale = torch.tensor(0.02, device=w.device)

    def fp8_mm(x):
        m = x.shape[0]
        xq = (x / in_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        if m % 16:
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, 16 - m % 16)).view(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, wt, scale_a=in_scale, scale_b=ws * one, out_dtype=torch.bfloat16)[:m]

    out["fp8_scaled_mm"] = (fp8_mm, n * k)
    wsb = ws.to(torch.bfloat16)
    out["fp8_weight_only_compiled"] = (torch.compile(lambda x: F.linear(x, w8f.to(x.dtype)) * wsb,
                                                     mode="max-autotune-no-cudagraphs"), n * k)
    return out


def main(path: str) -> None:
    torch.manual_seed(0)
    rows = []
    name = torch.cuda.get_device_name()
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for label, (fn, size) in candidates(w).items():
            for m in BATCHES:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                try:
                    us = timed(fn, x)
                    row = {"shape": f"{n}x{k}", "m": m, "kernel": label, "us": round(us, 2),
                           "weight_tb_s": round(size / us / 1e6, 3)}
                except Exception as e:  # a kernel this card or torch build lacks: recorded, not hidden
                    error = f"{type(e).__name__}: {e}"[:300]
                    row = {"shape": f"{n}x{k}", "m": m, "kernel": label, "error": error}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {"gpu": name, "torch": torch.__version__, "rows": rows}
    Path(path).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
