"""Why `kernel: auto` on CPU runs small products dequantized (issue 14: "tiny GPTQ no slower than
its base"). Two measurements on this machine's CPU, figures not asserts:

1. The shipped tiny Llama, 4-bit (`gptq_rtn`, group 32), as `auto` runs it (every product
   dequantized) and on `int4pack`, beside its float32 base: `generate` (64 tokens in, 24 out) in
   rounds whose order is shuffled, each model's tokens/s over the base's in the same round;
   quartiles of those ratios. Paired rounds, because on a 2-core machine the base alone moved from
   245 to 353 tok/s between runs.
2. One linear layer at batch 1: torch's int4 kernel as llmopt runs it (`Int4PackLinear`, its bf16
   conversions included) against a dense float32 `nn.Linear`, on square products from 64 to 640
   wide, on one thread and on two: where the two meet (`llmopt.kernels.CPU_DENSE_BELOW`).

    python benchmarks/cpu_small_products.py OUT.json

Each part runs in a process of its own (the script calls itself): in one process, switching torch's
thread count made later products 3-5x slower, and the base's batch-4 decode ran at 385 tok/s after
a GPTQModel quantization in that process, where a fresh process gave 946 (llmopt now quantizes with
GPTQModel in a child process: llmopt.isolated).

Measured on this project's 2-core CPU machine (2026-12-06): see the README's "CPU" paragraph.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def per_call_us(fn, x, calls: int = 1000) -> float:
    """Median of 7 timings of `calls` calls, after 100 warm-up calls."""
    for _ in range(100):
        fn(x)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(calls):
            fn(x)
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def products(note, threads: int) -> None:
    from llmopt.kernels.linear import Int4PackLinear, QuantizedWeight

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    for width in (64, 128, 256, 384, 448, 512, 576, 640):
        weight = QuantizedWeight(torch.randint(0, 16, (width, width), generator=gen, dtype=torch.uint8),
                                 torch.rand(width // 32, width, generator=gen) * 0.01, 4, 32)
        int4, dense = Int4PackLinear(weight, "cpu", torch.float32), torch.nn.Linear(width, width, bias=False)
        x = torch.randn(1, 1, width)
        with torch.no_grad():
            int4_us, dense_us = per_call_us(int4, x), per_call_us(dense, x)
        note({"threads": threads, "product": f"{width}x{width}", "weights": width * width,
              "int4pack_us": round(int4_us, 1), "dense_fp32_us": round(dense_us, 1),
              "faster": "int4pack" if int4_us < dense_us else "dense"})


def quantized(tmp: Path) -> None:
    """The tiny Llama's 4-bit checkpoint (GPTQ layout, round-to-nearest, group 32) in tmp/q."""
    from llmopt.cache import Artifact
    from llmopt.embedded import EMBEDDED_MODELS
    from llmopt.methods.gptq_rtn import GptqRtnQuantize
    from llmopt.stages import StageContext, quantize

    base = EMBEDDED_MODELS["tiny-llama"].checkpoint(tmp / "embedded")
    (tmp / "q").mkdir()
    artifact = quantize.run(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32),
                            Artifact(base, "hf-checkpoint"), tmp / "q", StageContext("cpu", "float32", False, progress=False))
    (tmp / "artifact.json").write_text(json.dumps({"base": str(base), "info": artifact.info}))


def tiny_model(note, tmp: Path, rounds: int = 25) -> None:
    from llmopt import kernels
    from llmopt.cache import Artifact
    from llmopt.models import load_model

    written = json.loads((tmp / "artifact.json").read_text())
    base, artifact = Artifact(Path(written["base"]), "hf-checkpoint"), Artifact(tmp / "q", "hf-checkpoint", {}, written["info"])
    models = {"base": load_model(base, "cpu", "float32")}
    for wanted in ("auto", "int4pack"):
        models[wanted], applied = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", wanted,
                                                     tmp / "cache")
        note({"kernel": wanted, "ran": applied.tag(), "layers_dequantized": applied.dequantized})
    for batch in (1, 4):
        ids = torch.randint(3, 200, (batch, 64), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)
        tok_s: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(rounds):
            order = list(models)
            random.Random(round_).shuffle(order)
            for name in order:
                with torch.no_grad():
                    models[name].generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                    started = time.perf_counter()
                    models[name].generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
                tok_s[name].append(batch * 24 / (time.perf_counter() - started))
        for name in ("auto", "int4pack"):
            ratios = [a / b for a, b in zip(tok_s[name], tok_s["base"], strict=True)]
            note({"batch": batch, "model": name, "threads": torch.get_num_threads(), "rounds": rounds,
                  "tok_s_median": round(statistics.median(tok_s[name]), 1),
                  "base_tok_s_median": round(statistics.median(tok_s["base"]), 1),
                  "ratio_to_base_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)]})


def part(name: str, tmp: str) -> None:
    """One part in this process, its rows as JSON lines on stdout."""
    def note(row):
        print(json.dumps(row), flush=True)

    {"quantize": lambda: quantized(Path(tmp)), "model": lambda: tiny_model(note, Path(tmp)),
     "products1": lambda: products(note, 1), "products2": lambda: products(note, 2)}[name]()


def main(path: str) -> None:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("quantize", "model", "products1", "products2"):
            done = subprocess.run([sys.executable, __file__, "--part", name, tmp], capture_output=True, text=True,
                                  check=True)
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line, flush=True)
    Path(path).write_text(json.dumps({"torch": torch.__version__, "default_threads": torch.get_num_threads(),
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--part":
        part(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1])
