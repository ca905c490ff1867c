"""The README's GPU benchmark: a Llama-shaped 7B with random bf16 weights, and its bnb nf4 and GPTQ
4-bit versions made by the pipeline, through the benchmark stage (not a test: figures, not asserts).
Run from the repository root, with llmopt installed:

    python benchmarks/reference_7b.py WORKDIR [bf16-compiled bf16-eager nf4-eager gptq-eager ...]

Writes the model once under WORKDIR, runs one recipe per case with a shared cache and MLflow
store there, and prints one JSON line of metrics per case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmopt.eval.random_llama import random_llama

# the repository's calibration file (this script lives in the repository, not in the package)
CALIBRATION = Path(__file__).resolve().parent.parent / "eval" / "data" / "tiny-stories" / "calibration.jsonl"
WORKLOAD = "    input_tokens: 128\n    output_tokens: 256\n    gpu_hourly_usd: 2.5\n"
CASES = {
    "bf16-compiled": ("", "transformers-compiled", "[1, 8, 32]", 2, 5),
    "bf16-eager": ("", "transformers-eager", "[1]", 1, 3),
    "nf4-eager": ("  - stage: quantize\n    method: bnb\n    bits: 4\n    quant_type: nf4\n    compute_dtype: bfloat16\n",
                  "transformers-eager", "[1]", 1, 3),
    "bf16-eager-batches": ("", "transformers-eager", "[8, 32]", 1, 3),
    "nf4-compiled": ("  - stage: quantize\n    method: bnb\n    bits: 4\n    quant_type: nf4\n    compute_dtype: bfloat16\n",
                     "transformers-compiled", "[1, 8, 32]", 2, 5),
    "gptq-compiled": ("  - stage: quantize\n    method: gptq\n    bits: 4\n    group_size: 128\n    calibration:\n"
                      "      dataset: {{path: {data}}}\n      num_samples: 64\n      seq_len: 512\n",
                      "transformers-compiled", "[1, 8, 32]", 2, 5),
    "gptq-eager": ("  - stage: quantize\n    method: gptq\n    bits: 4\n    group_size: 128\n    calibration:\n"
                   "      dataset: {{path: {data}}}\n      num_samples: 64\n      seq_len: 512\n",
                   "transformers-eager", "[1]", 1, 3),
}


def build_7b(path: Path) -> Path:
    return random_llama(path, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, max_position_embeddings=4096)


def main(workdir: Path, cases: list[str]) -> None:
    """Each case in a process of its own, so that no case's memory peaks include another's leftovers."""
    import subprocess

    import mlflow

    model = build_7b(workdir / "llama-7b")
    for case in cases:
        quantize, runtime, batches, warmup, repeats = CASES[case]
        recipe = workdir / f"{case}.yaml"
        recipe.write_text(f"name: ref7b-{case}\nmodel: {{path: {model}, dtype: bfloat16}}\ndevice: cuda\nstages:\n"
                          + quantize.format(data=CALIBRATION) +
                          f"  - stage: benchmark\n    runtime: {runtime}\n    batch_sizes: {batches}\n"
                          f"    warmup: {warmup}\n    repeats: {repeats}\n" + WORKLOAD)
        code = subprocess.run([sys.executable, "-m", "llmopt.cli", "run", str(recipe), "--cache-dir",
                               str(workdir / "cache"), "--mlruns", str(workdir / "mlruns"), "--no-progress"]).returncode
        client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(f"ref7b-{case}")
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.llmopt.stage = 'benchmark'",
                                  order_by=["attributes.start_time DESC"]) if experiment else []
        metrics = runs[0].data.metrics if runs and code == 0 else {}
        print(json.dumps({"case": case, "exit": code, **metrics}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(CASES))
