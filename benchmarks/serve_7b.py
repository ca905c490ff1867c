"""Issue 15's GPU benchmark: a Llama-shaped 7B with random bf16 weights, 4-bit (round-to-nearest,
group 128, on the Marlin kernel) against bf16, both behind `transformers serve` (llmopt.serve:
continuous batching, paged KV cache) under the same GuideLLM sweep, in one `llmopt run`. Not a
test: figures, not asserts. Run from the repository root, with llmopt[serve] installed:

    python benchmarks/serve_7b.py WORKDIR OUTDIR [default|tuned ...]

`default` is transformers serve as it comes (continuous batching, its own block counts); `tuned`
adds CUDA graphs for the batching manager and torch.compile. Each preset writes OUTDIR/<preset>.json
(metrics and tags of the benchmark run) and its log. Marlin's extension builds in the background
from the start (benchmarks/reference_7b.py). Planned for one 10-minute GPU call per preset: model
written ~20 s, RTN ~30 s, per model a server start (~1-3 min with Marlin) and 4 points of 20 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmopt.eval.random_llama import random_llama
from reference_7b import prewarm_marlin, run_recipe

PRESETS = {
    "default": "",
    "tuned": "    server: {cb_use_cuda_graph: true, compile: true}\n",
}
STAGES = ("  - stage: quantize\n    method: rtn\n    bits: 4\n    group_size: 128\n"
          "  - stage: benchmark\n    runtime: server\n    kernel: auto\n    input_tokens: {mean: 128, stdev: 32}\n"
          "    output_tokens: 256\n    warmup: 2\n"
          "    load: {profile: concurrent, points: [1, 8, 32, 64], requests: null, duration_s: 20}\n"
          "    sla: {p99_ttft_ms: 500, p99_itl_ms: 50}\n    gpu_hourly_usd: 2.5\n")


def main(workdir: Path, out: Path, presets: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prewarm = prewarm_marlin(workdir / "cache", out / "marlin-prewarm.log")  # while the model is written and quantized
    model = random_llama(workdir / "llama-7b", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    for preset in presets:
        recipe = workdir / f"serve-{preset}.yaml"
        recipe.write_text(f"name: serve7b-{preset}\nmodel: {{path: {model}, dtype: bfloat16}}\ndevice: cuda\nstages:\n"
                          + STAGES + PRESETS[preset])
        run_recipe(recipe, f"serve7b-{preset}", workdir, out / preset, {"preset": preset})
    prewarm.wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or ["default"])
