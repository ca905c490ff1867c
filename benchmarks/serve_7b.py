"""Issue 15's GPU benchmark: a Llama-shaped 7B with random bf16 weights, 4-bit (round-to-nearest,
group 128, on the Marlin kernel) against bf16, both behind `transformers serve` (llmopt.serve:
continuous batching, paged KV cache) under the same GuideLLM sweep, in one `llmopt run`. Not a
test: figures, not asserts. Run from the repository root, with llmopt[serve] installed:

    python benchmarks/serve_7b.py WORKDIR OUTDIR [smoke] [default|graphs|tuned ...]

`smoke` first serves the embedded tiny Llama on the GPU (no Marlin, 2 short points) with the first
preset's server settings, and stops the script if that fails, so a broken setup costs a minute, not
a 7B sweep. The presets:
- `default`: transformers serve as it comes (continuous batching, its own block counts; with sdpa's
  paged attention it runs without CUDA graphs);
- `graphs`: CUDA graphs on for the batching manager (the server's `compile` flag does not reach
  continuous batching, and validation refuses it there). With sdpa's mask, graphs pad each step's
  KV read to transformers' default interval of 16384 tokens: one lone request gathers and attends
  over 16384 keys per layer per step (about 25 GB of traffic a step for this 7B);
- `tuned`: graphs with padding intervals sized to this workload (queries to 16 tokens, the KV read
  to 2048: a 128+256-token request fits one interval, 64 of them 13), and double-buffered (async)
  batching, which transformers turns on by itself only for attention without a mask;
- `sized`: llmopt's defaults (`tune_batching`): on CUDA `tuned`'s settings, and batching buffers
  sized to the load (160 blocks of 256 for 64 streams of up to 512 tokens, 512 tokens a step).
  The three presets above ran before that, with the buffers transformers sizes to fill the GPU
  (8192 tokens a step, 676 blocks), and keep them (`tune_batching: false`). With sdpa, async
  batching copies its whole host-side attention mask, max_batch_tokens x (KV pages + max_batch_tokens)
  elements, to the GPU every step: about 3 GB for those buffers, 42 MB for `sized`'s
  (benchmarks/cb_mask_probe.py measured 139 against 20 ms a step).
- `engine`: not transformers serve but llmopt's own engine (`server: {engine: llmopt}`, llmopt.engine):
  continuous batching over 64 rows of a static cache with the compiled runtime's decode step, which
  decodes a static batch of 8 at 1.79x bf16 on an H100 where transformers serve's step gave 1.20x.
  Its first version (every row every step, commit bbdcb9f) ran on an H100 on 2026-12-06 in one call
  of 536 s (smoke 2 min; per model a server start of about 60 s, warm-ups, 4 points of 12 s):
  3007 tok/s int4 and 3097 bf16 at the SLA (32 streams; README). The version that runs only
  the rows in use compiles one decode graph per decode batch (16, 32, 64) at start-up, and launches
  each step before it reads the last one's tokens (overlapped with the host's turn): longer
  start-ups; measured on an H100 (2026-12-06) first at about 30 ms a step whatever the load (commit
  f4e35f7: a cache write that copied whole layers), then with that fixed (commit 1443d86, `base-engine`
  then `engine` on one warm machine, 2 calls of 408 and 367 s; start-ups of 176-179 s): int4 1.80x
  bf16 at 1 stream, 1.20x at 32, 0.93x at 64, where its TTFT missed the SLA (README).
- `engine-dense`: `engine` with the int4 candidate's prefills of 320 tokens or more run dense
  (`dense_prefill_tokens`: its weights dequantized a layer at a time, cuBLAS), where Marlin computes
  slower than bf16's cuBLAS; not yet measured on a GPU. Its base runs without the setting (it reaches
  quantized layers only), so after `engine` (or `base-engine`) it finds the base's measurement cached
  and serves only the candidate.
- `engine-machete`: `engine` with the int4 candidate on Machete (`kernel: machete`, Hopper only:
  vLLM's CUTLASS mixed-input GEMM, llmopt.kernels.machete), where Marlin's products at 32-64 rows run
  no faster than bf16's; set LLMOPT_MACHETE_LIBRARY to a library built ahead (`python -m
  llmopt.kernels.machete build`), or it builds on first use (needs nvcc and `llmopt[hopper]`).
- `engine-hybrid`: `engine-machete` on `kernel: machete+marlin`: decode steps of fewer than 32 rows on
  Marlin (faster there on an H100), 32 and more and prefills on Machete; both layouts in memory.
  Measured on an H100 (2026-12-07, after `base-engine` on the same warm machine; with `engine-machete`
  and `engine-auto` after it; benchmarks/results/serve_7b_h100_v4/): int4 1.87x / 1.76x / 1.36x / 1.23x
  bf16 at 1 / 8 / 32 / 64 streams, 1.23x at the example SLA (`engine-machete` 0.90x: its 64-stream
  TTFT missed; `engine-auto` 1.04x). The candidate's call took 263 s with the inductor cache warm.
- `engine-auto`: `engine` with `dense_prefill_tokens: auto`: each prefill shape (batch x width) captured
  both ways at start-up, timed on the GPU, the faster kept; the server's stats list both times per shape
  (what benchmarks/dense_prefill_probe.py estimates per product); on an H100 it chose dense for 20 of
  the 36 shapes and served 1.04x bf16 at the example SLA (2026-12-07).
`base-<preset>` (for example `base-engine engine`): the bf16 base alone under that preset's settings,
first, while Marlin builds; the preset's paired run then finds the base's measurement in the cache
(same stage key) and measures only the int4 candidate.
Each preset writes OUTDIR/<preset>.json (metrics and tags of the benchmark run), its log, and
OUTDIR/<preset>-server-stats.json (each server's /llmopt/stats after its last point: for the engine,
the GPU's idle time between decode steps, steps by decode batch, rows wasted past an EOS, prefill padding).
Marlin's extension builds in the background from the start (benchmarks/reference_7b.py).

Measured on an H200 (benchmarks/results/serve_7b_h200/): the graphs preset took 475 s in all
(model written 19 s, RTN 30 s, Marlin build 170 s in the background, then per model a server start
of 14-43 s, a warm-up of about 40 s and 4 points of 15 s); that, plus about 60 s of machine start
and install, fills one 10-minute call. The default preset does not fit in one: it decodes at about
46 ms a step, so a 256-token request takes 12 s. The sized preset (2026-11-29) ran out of the call's
545 s during the base's last point: each of a model's 8 GuideLLM runs then began with ~18 s of
GuideLLM's own start, which a sweep now pays once a model (llmopt.eval.runtimes.loadgen). Its
rerun (`sized2-*`, 2026-11-29) took 454 s in all (model 19 s, RTN 29 s, server starts 52 and 24 s,
warm-ups 64 and 69 s). The third run (`sized3-*`, warm-up rounds of the point's concurrency while
the server still captured graphs, at most 3) ran out of the call's 540 s during the base's last
point: int4's model took 263 s from quantized to done, its warm-ups 130 s; the whole would have
taken about 575 s. A warm-up run after the first is now the point's own workload, so this script
allows one (at most 2 rounds), and its points run 12 s instead of 15 (warm-up runs included):
about 520 s in all, estimated from that run's timeline, not yet measured.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmopt.eval.random_llama import random_llama
from reference_7b import prewarm_marlin, run_recipe

TUNED = "cb_use_cuda_graph: true, cb_q_padding_interval_size: 16, cb_kv_padding_interval_size: 2048, cb_use_async_batching: true"
AUTO = "tune_batching: false"  # the runs before llmopt tuned batching: transformers' defaults where unset
PRESETS = {
    "default": f"    server: {{{AUTO}}}\n",
    "graphs": f"    server: {{cb_use_cuda_graph: true, {AUTO}}}\n",
    "tuned": f"    server: {{{TUNED}, {AUTO}}}\n",
    # llmopt's defaults (tune_batching): tuned's settings on CUDA and buffers sized to the load (160 blocks
    # of 256, 512 tokens a step); its 2026-11-29 run named tuned's settings itself, which resolved the same
    "sized": "",
    # llmopt's own server (llmopt.engine): rows of a static cache, the compiled runtime's decode step, every
    # CUDA graph captured at start-up (64 rows of 288 prompt + 256 output tokens, in blocks of 64: 576 tokens,
    # 19.3 GB of KV cache)
    "engine": "    server: {engine: llmopt}\n",
    # the same, the int4 candidate's prefills of 320 tokens or more dense (dense_prefill_tokens): from the H100
    # reference's prefills (Marlin 50.1 against bf16's 30.5 ms for 1024 tokens, so about 19 us a token more)
    # and an estimated 6 ms to dequantize a 7B's int4 weights, they break even near 316 tokens (not measured)
    "engine-dense": "    server: {engine: llmopt, dense_prefill_tokens: 320}\n",
    # the same, each prefill shape's branch (Marlin or dense) chosen by timing both at start-up on this GPU
    "engine-auto": "    server: {engine: llmopt, dense_prefill_tokens: auto}\n",
    # the int4 candidate on Machete (kernel: machete below; Hopper only, llmopt.kernels.machete), the engine as
    # `engine`; its base runs on auto's kernel (on_base), so after `base-engine` it finds the base cached
    "engine-machete": "    server: {engine: llmopt}\n",
    # the same on `kernel: machete+marlin`: decode batches under 32 rows on Marlin, 32 and more and prefills on Machete
    "engine-hybrid": "    server: {engine: llmopt}\n",
}
# the benchmark stage's kernel where a preset names one (else auto)
KERNEL = {"engine-machete": "machete", "engine-hybrid": "machete+marlin"}
QUANTIZE = "  - stage: quantize\n    method: rtn\n    bits: 4\n    group_size: 128\n"
STAGES = (QUANTIZE +
          "  - stage: benchmark\n    runtime: server\n    kernel: auto\n    input_tokens: {mean: 128, stdev: 32}\n"
          "    output_tokens: 256\n    warmup: 1\n"
          "    load: {profile: concurrent, points: [POINTS], requests: null, duration_s: POINT_S, warmup_max_rounds: 2}\n"
          "    sla: {p99_ttft_ms: 500, p99_itl_ms: 50}\n    gpu_hourly_usd: 2.5\n")


SMOKE = ("name: serve-smoke\nmodel: {embedded: tiny-llama}\ndevice: cuda\nstages:\n"
         "  - stage: quantize\n    method: rtn\n    bits: 4\n    group_size: 32\n"
         "  - stage: benchmark\n    runtime: server\n    kernel: none\n    input_tokens: {mean: 32, stdev: 4}\n"
         "    output_tokens: 16\n    warmup: 1\n    load: {profile: concurrent, points: [1, 4], requests: 8}\n"
         "    sla: {p99_ttft_ms: 5000, p99_itl_ms: 1000}\n")


def main(workdir: Path, out: Path, presets: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    prewarm = prewarm_marlin(workdir / "cache", out / "marlin-prewarm.log")  # while the model is written and quantized
    if "smoke" in presets:
        presets = [p for p in presets if p != "smoke"]
        (workdir / "smoke.yaml").write_text(SMOKE + (PRESETS[presets[0].removeprefix("base-")] if presets else ""))
        if run_recipe(workdir / "smoke.yaml", "serve-smoke", workdir, out / "smoke", {"preset": "smoke"})["exit"] != 0:
            prewarm.kill()
            sys.exit("the smoke run failed: see smoke.log")
    model = random_llama(workdir / "llama-7b", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    # SERVE_POINTS / SERVE_POINT_S: a shorter sweep than the recipe's (1, 8, 32, 64 streams, 12 s each) where
    # a call's time is short; its figures are then a check, not the sweep
    stages_all = STAGES.replace("POINTS", os.environ.get("SERVE_POINTS", "1, 8, 32, 64")).replace(
        "POINT_S", os.environ.get("SERVE_POINT_S", "12"))
    for preset in presets:
        # `base-<preset>`: the bf16 base alone under <preset>'s settings (no quantize stage): the same stage key as
        # the base's half of <preset>'s paired run, which then finds it cached; run first, it measures while
        # Marlin's extension still builds, which only the int4 candidate needs
        base_only = preset.startswith("base-")
        stages = stages_all.replace(QUANTIZE, "") if base_only else stages_all
        if not base_only:  # a base alone has no quantized layer to name a kernel for
            stages = stages.replace("kernel: auto", f"kernel: {KERNEL.get(preset, 'auto')}")
        recipe = workdir / f"serve-{preset}.yaml"
        recipe.write_text(f"name: serve7b-{preset}\nmodel: {{path: {model}, dtype: bfloat16}}\ndevice: cuda\nstages:\n"
                          + stages + PRESETS[preset.removeprefix("base-")])
        run_recipe(recipe, f"serve7b-{preset}", workdir, out / preset, {"preset": preset})
    prewarm.wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or ["default"])
