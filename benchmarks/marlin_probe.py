"""GPTQModel's Marlin kernel on decode shapes of a 7B Llama: its build time, its speed beside bf16
(CUDA graphs of 50 calls, medians of 20 replays), whether torch.compile captures it whole, and its
output against the GPTQ formula. Also FP8 `_scaled_mm` inside a compiled function (activation
quantization fused). Figures, not asserts.

    GPTQMODEL_TORCH_EXTENSIONS_DIR=DIR python benchmarks/marlin_probe.py OUT.json
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
from kernels_micro import BATCHES, SHAPES, timed  # noqa: E402

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def gptq_tensors(n: int, k: int, bits: int, group: int, gen: torch.Generator):
    """Random GPTQ-format tensors (symmetric) and the bf16 weight they stand for, [n, k]."""
    per = 32 // bits
    groups = 1 if group == -1 else k // group
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int64)
    qweight = torch.zeros(k // per, n, dtype=torch.int64)
    for j in range(per):
        qweight |= codes[j::per] << (bits * j)
    qweight = qweight.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else qweight.to(torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zero = 2 ** (bits - 1)
    g_idx = torch.arange(k, dtype=torch.int32) // (k if group == -1 else group)
    weight = (scales.float()[g_idx.long()] * (codes - zero).float()).t().to(torch.bfloat16)
    qzeros = torch.zeros(groups, n // per, dtype=torch.int64)
    for j in range(per):
        qzeros |= torch.full((groups, n // per), zero - 1, dtype=torch.int64) << (bits * j)  # GPTQ v1 stores zero - 1
    return qweight, qzeros.to(torch.int32), scales, g_idx, weight


def marlin_layer(n, k, bits, group, gen):
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    qweight, qzeros, scales, g_idx, weight = gptq_tensors(n, k, bits, group, gen)
    layer = MarlinLinear(bits=bits, group_size=group, desc_act=False, sym=True, in_features=k, out_features=n,
                         bias=False, register_buffers=True, dtype=torch.bfloat16)
    layer.qweight.data, layer.qzeros.data = qweight.cuda(), qzeros.cuda()
    layer.scales.data, layer.g_idx.data = scales.cuda(), g_idx.cuda()
    layer = layer.cuda()
    layer.post_init()
    return layer, weight.cuda()


def main(path: str) -> None:
    rows: list[dict] = []

    def note(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    from gptqmodel.utils.marlin import prewarm_marlin_extension

    started = time.perf_counter()
    ok = prewarm_marlin_extension(torch.bfloat16)
    note({"marlin_build_s": round(time.perf_counter() - started, 1), "ok": bool(ok),
          "ext_dir": os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")})
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            note({"shape": f"{n}x{k}", "m": m, "kernel": "bf16", "us": round(timed(lambda x, w=w: F.linear(x, w), x), 2)})
        for bits, group in ((4, 128), (8, -1)):
            layer, ref = marlin_layer(n, k, bits, group, gen)
            x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                err = ((layer(x).float() - x.float() @ ref.float().t()).abs().max() / (x.float() @ ref.float().t()).abs().max())
            for m in BATCHES:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    note({"shape": f"{n}x{k}", "m": m, "kernel": f"marlin_int{bits}_g{group}",
                          "us": round(timed(layer, x), 2), "rel_err": round(err.item(), 5)})
    # does torch.compile capture a Marlin layer inside one graph (fullgraph, CUDA graphs)?
    layer, _ = marlin_layer(4096, 4096, 4, 128, gen)
    try:
        step = torch.compile(lambda x: layer(F.silu(x)) * 2, fullgraph=True, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                step(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16))
        note({"compile_fullgraph_marlin": "ok"})
    except Exception as e:
        note({"compile_fullgraph_marlin": f"{type(e).__name__}: {e}"[:600]})
    # FP8 inside a compiled function: activation quantization fused with its producer
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ws = (w.float().abs().max() / 448).reshape(())
        wt = (w.float() / ws).to(torch.float8_e4m3fn).t()
        in_scale = torch.tensor(0.02, device="cuda")

        def fp8(x, wt=wt, ws=ws, in_scale=in_scale):
            m = x.shape[0]
            xq = (F.silu(x) / in_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            if m % 16:
                xq = torch.cat([xq, xq.new_zeros(16 - m % 16, xq.shape[1])])
            return torch._scaled_mm(xq, wt, scale_a=in_scale, scale_b=ws, out_dtype=torch.bfloat16)[:m]

        def bf(x, w=w):
            return F.linear(F.silu(x), w)

        for label, fn in (("bf16_silu_compiled", bf), ("fp8_scaled_mm_compiled", fp8)):
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            for m in BATCHES:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                try:
                    note({"shape": f"{n}x{k}", "m": m, "kernel": label, "us": round(timed(compiled, x), 2)})
                except Exception as e:
                    note({"shape": f"{n}x{k}", "m": m, "kernel": label, "error": f"{type(e).__name__}: {e}"[:300]})
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    Path(path).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
