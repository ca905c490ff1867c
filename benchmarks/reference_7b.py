"""The README's GPU benchmark: a Llama-shaped 7B with random bf16 weights, quantized by the
pipeline into each format llmopt produces, each benchmarked beside the bf16 base in the same run
(the benchmark stage pairs them) with the fast kernels (`kernel: auto`) in the compiled runtime.
Not a test: figures, not asserts. Run from the repository root, with llmopt installed:

    python benchmarks/reference_7b.py WORKDIR OUTDIR [int4 int8 fp8 awq ...]

Writes the model once under WORKDIR, runs one recipe per case with a shared cache (so the base's
benchmark and the kernels' builds are done once) and MLflow store there, and writes one JSON file
of metrics and tags per case to OUTDIR (also printed). Each run's log (stages, models loaded, each
batch size measured) is WORKDIR/cache/logs/: a GPU call that may be cut short should copy that
folder to its output after the script, as the AWQ run cut off on 2026-11-29 showed nothing past its
quantize stage in its console output.

The int4 case is round-to-nearest in the GPTQ format (`gptq_rtn`): the same checkpoint layout and
kernel as calibrated GPTQ, without its ~100 s of calibration on random weights, which would mean
nothing for speed (GPTQModel's RTN still took 153 s on an H200). The int8 case is llmopt's own `rtn`
(per channel, saved dequantized; its grid is read back exactly and runs on the same Marlin kernel):
seconds to quantize, which is what let it fit in one GPU call. `rtn4` is the same for 4 bits, group
128: the int4 case's kernel and grid without GPTQModel's 153 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from llmopt.eval.random_llama import random_llama

# the repository's calibration file (this script lives in the repository, not in the package)
CALIBRATION = Path(__file__).resolve().parent.parent / "eval" / "data" / "tiny-stories" / "calibration.jsonl"
MODELOPT = "      dataset: {{path: {data}}}\n      num_samples: 8\n      seq_len: 128\n"
CASES = {
    "int4": "  - stage: quantize\n    method: gptq_rtn\n    bits: 4\n    group_size: 128\n",
    "int8": "  - stage: quantize\n    method: rtn\n    bits: 8\n    group_size: -1\n",
    # GPTQ's grid (4-bit, group 128, symmetric) by llmopt's own round-to-nearest: the same Marlin layers
    # as `int4`, quantized in seconds instead of GPTQModel's 153 s
    "rtn4": "  - stage: quantize\n    method: rtn\n    bits: 4\n    group_size: 128\n",
    "fp8": "  - stage: quantize\n    method: modelopt\n    format: fp8\n    calibration:\n" + MODELOPT,
    "awq": "  - stage: quantize\n    method: modelopt\n    format: int4_awq\n    group_size: 128\n    calibration:\n"
           + MODELOPT,
    "gptq-int4": "  - stage: quantize\n    method: gptq\n    bits: 4\n    group_size: 128\n    calibration:\n"
                 "      dataset: {{path: {data}}}\n      num_samples: 32\n      seq_len: 512\n",
}
BENCHMARK = ("  - stage: benchmark\n    runtime: transformers-compiled\n    kernel: auto\n    batch_sizes: [1, 8, 32]\n"
             "    input_tokens: 128\n    output_tokens: 256\n    warmup: 1\n    repeats: 3\n    gpu_hourly_usd: 2.5\n")


def build_7b(path: Path) -> Path:
    return random_llama(path, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, max_position_embeddings=4096)


def prewarm_marlin(cache: Path, log: Path) -> subprocess.Popen:
    """Build Marlin's extension into `cache` in the background (nvcc, CPU only): the runs that need it
    wait on torch's build lock, then load it."""
    return subprocess.Popen([sys.executable, "-c", f"from llmopt.kernels.linear import build_marlin; "
                             f"print('marlin build s', round(build_marlin({str(cache)!r}), 1))"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115 (lives past this call)


def run_recipe(recipe: Path, name: str, workdir: Path, out: Path, label: dict) -> dict:
    """`llmopt run` of one recipe in a process of its own (its output streamed to `<out>.log`: a call cut
    short keeps what ran), then its benchmark run's metrics and env tags, written to `<out>.json` and printed."""
    import mlflow

    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        done = subprocess.run([sys.executable, "-m", "llmopt.cli", "run", str(recipe), "--cache-dir", str(workdir / "cache"),
                               "--mlruns", str(workdir / "mlruns"), "--no-progress"], stdout=log, stderr=subprocess.STDOUT)
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.llmopt.stage = 'benchmark'",
                              order_by=["attributes.start_time DESC"]) if experiment else []
    found = runs[0].data if runs and done.returncode == 0 else None
    result = {**label, "exit": done.returncode, "wall_s": round(time.perf_counter() - started, 1),
              "metrics": found.metrics if found else {},
              "tags": {k: v for k, v in (found.tags if found else {}).items() if k.startswith("env.")}}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    # a served run's server statistics (llmopt.serve's /llmopt/stats after its last point: the engine's
    # counters, the KV cache), candidate and base, from the stage reports this run wrote
    reports = [json.loads(r.read_text()) for r in (workdir / "cache" / "stages").glob("*/report.json")
               if r.stat().st_mtime >= time.time() - (time.perf_counter() - started)]
    if served := [{"kernel": r.get("kernel"), **r["server_stats"]} for r in reports if r.get("server_stats")]:
        out.with_name(out.name + "-server-stats.json").write_text(json.dumps(served, indent=1))
    return result


def main(workdir: Path, out: Path, cases: list[str]) -> None:
    """Each case in a process of its own, so that no case's memory peaks include another's leftovers.
    Marlin's extension (about 2 minutes of nvcc on a fresh machine, CPU only) is built in the background
    from the start, into the cache the runs use: a case that needs it waits on torch's build lock and
    then loads it, and reports the wait as its `kernel/build_s`."""
    out.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    prewarm = prewarm_marlin(cache, out / "marlin-prewarm.log")
    model = build_7b(workdir / "llama-7b")
    for case in cases:
        recipe = workdir / f"{case}.yaml"
        recipe.write_text(f"name: ref7b-{case}\nmodel: {{path: {model}, dtype: bfloat16}}\ndevice: cuda\nstages:\n"
                          + CASES[case].format(data=CALIBRATION) + BENCHMARK)
        run_recipe(recipe, f"ref7b-{case}", workdir, out / case, {"case": case})
    prewarm.wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or ["int4", "int8", "fp8", "awq"])
