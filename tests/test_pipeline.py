"""The spine end to end on the embedded model: run, cache hits on the second run, forced recompute,
resume after kill -9, a stage failing at run time, and what lands in MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import DATA, RECIPES, ROOT, run_cli

SECRET = "hf_secret_value_that_must_never_be_logged"


def fast_recipe(tmp: Path, method: str = "gptq", eval_seq_len: int = 128) -> Path:
    """tiny-int4 with a smaller evaluation set, so the end-to-end tests stay quick."""
    quantize = {
        "gptq": f"method: gptq\n    bits: 4\n    group_size: 64\n    calibration:\n"
                f"      dataset: {{path: {DATA / 'calibration.jsonl'}}}\n      num_samples: 32\n      seq_len: 128\n",
        "bnb": "method: bnb\n    bits: 8\n",
    }[method]
    path = tmp / "fast.yaml"
    path.write_text(
        "name: fast\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n    " + quantize +
        f"  - stage: evaluate\n    perplexity:\n      dataset: {{path: {DATA / 'validation.jsonl'}}}\n"
        f"      seq_len: {eval_seq_len}\n      stride: {eval_seq_len}\n      max_samples: 60\n      batch_size: 8\n"
    )
    return path


def runs(mlruns: Path, experiment: str):
    client = mlflow.MlflowClient(f"sqlite:///{mlruns / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in found if "mlflow.parentRunId" in r.data.tags]


def test_run_then_rerun_from_cache(tiny_workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    recipe = fast_recipe(tmp_path)
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    first = capsys.readouterr().out
    assert "stage quantize: computed" in first and "stage evaluate: computed" in first

    client, parents, children = runs(tiny_workdir["mlruns"], "fast")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [c.info.run_name for c in children] == ["quantize", "evaluate"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    quant, evaluate = children
    m = evaluate.data.metrics
    assert m["quality/ppl_delta_pct"] == pytest.approx(100 * (m["quality/ppl"] / m["quality/ppl_base"] - 1))
    assert 1.0 < m["quality/ppl_base"] < 4.0
    assert m["quality/ppl"] != m["quality/ppl_base"], "the quantized model is a different model"
    assert quant.data.params["calibration.num_samples"] == "32"
    assert quant.data.metrics["memory/compression_ratio"] > 2.5
    for tag in ("llmopt.cache_key", "llmopt.parent_key", "llmopt.cache_hit", "mlflow.source.git.commit",
                "lib.torch", "lib.gptqmodel", "llmopt.hardware"):
        assert tag in quant.data.tags, tag
    assert quant.data.tags["llmopt.cache_hit"] == "false"
    assert evaluate.data.tags["llmopt.parent_key"] == quant.data.tags["llmopt.cache_key"]
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"fast.yaml", "environment", "logs"} <= parent_files
    assert {a.path for a in client.list_artifacts(evaluate.info.run_id, "base")} == {"base/artifact.json",
                                                                                    "base/report.json"}

    # warm: nothing recomputed (entries and their records untouched), instead of a wall-clock bound
    entries = {p.parent.name: p.stat().st_mtime_ns for p in (tiny_workdir["cache"] / "stages").glob("*/artifact.json")}
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    assert {p.parent.name: p.stat().st_mtime_ns for p in (tiny_workdir["cache"] / "stages").glob("*/artifact.json")} == entries
    second = capsys.readouterr().out
    assert "stage quantize: cache hit" in second and "stage evaluate: cache hit" in second
    assert "2/2 stages from cache" in second
    _, parents, children = runs(tiny_workdir["mlruns"], "fast")
    assert len(parents) == 2 and all(c.data.tags["llmopt.cache_hit"] == "true" for c in children[2:])
    assert children[3].data.metrics["quality/ppl"] == m["quality/ppl"]

    # --force-stage recomputes that stage (and later ones) only
    assert run_cli(tiny_workdir, "run", str(recipe), "--force-stage", "evaluate") == 0
    third = capsys.readouterr().out
    assert "stage quantize: cache hit" in third and "stage evaluate: computed" in third

    # --force recomputes everything, to the same result (seeded calibration, deterministic evaluation)
    assert run_cli(tiny_workdir, "run", str(recipe), "--force") == 0
    assert "0/2 stages from cache" in capsys.readouterr().out
    _, _, children = runs(tiny_workdir["mlruns"], "fast")
    assert children[-1].data.metrics["quality/ppl"] == pytest.approx(m["quality/ppl"], rel=1e-6)

    # secrets from the environment never reach params, tags or artifacts
    stored = [tiny_workdir["mlruns"] / "mlflow.db", *sorted((tiny_workdir["mlruns"] / "artifacts").rglob("*"))]
    assert not any(SECRET.encode() in p.read_bytes() for p in stored if p.is_file())


def test_bnb_recipe_end_to_end(tiny_workdir, tmp_path):
    assert run_cli(tiny_workdir, "run", str(fast_recipe(tmp_path, "bnb"))) == 0
    _, _, (quant, evaluate) = runs(tiny_workdir["mlruns"], "fast")
    assert quant.data.metrics["quantize/roundtrip_max_logit_diff"] < 1e-4
    assert abs(evaluate.data.metrics["quality/ppl_delta_pct"]) < 5


def test_stage_failure_exits_1_names_the_stage_and_marks_runs_failed(tiny_workdir, tmp_path, capsys):
    recipe = fast_recipe(tmp_path, "bnb", eval_seq_len=4096)  # valid recipe; the model's context is 512
    assert run_cli(tiny_workdir, "run", str(recipe)) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # libraries may print notices before it
    assert last_line.startswith("error: stage 'evaluate' (evaluate) failed: ValueError: perplexity.seq_len 4096 exceeds")
    _, (parent,), (quant, evaluate) = runs(tiny_workdir["mlruns"], "fast")
    assert (parent.info.status, quant.info.status, evaluate.info.status) == ("FAILED", "FINISHED", "FAILED")
    (log_file,) = (tiny_workdir["cache"] / "logs").glob("*-fast.log")
    assert "Traceback" in log_file.read_text(), "the log keeps the full traceback"
    stages = tiny_workdir["cache"] / "stages"
    assert len([p for p in stages.iterdir() if p.is_dir() and not p.name.endswith(".tmp")]) == 1, "quantize kept"


def test_kill_minus_9_mid_stage_then_the_same_command_resumes(tiny_workdir, tmp_path):
    recipe = fast_recipe(tmp_path)
    stages = tiny_workdir["cache"] / "stages"
    command = [sys.executable, "-m", "llmopt.cli", "run", str(recipe), "--cache-dir", str(tiny_workdir["cache"]),
               "--mlruns", str(tiny_workdir["mlruns"]), "--no-progress"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not list(stages.glob("*.tmp")):
        time.sleep(0.05)
    assert list(stages.glob("*.tmp")), "the quantize stage never started"
    time.sleep(1.0)  # well inside GPTQ calibration
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = [p for p in stages.iterdir() if (p / "artifact.json").is_file()]
    assert committed == [], "a killed stage must leave nothing a later run trusts"

    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stage quantize: computed" in done.stdout
    assert not list(stages.glob("*.tmp"))
    _, parents, _ = runs(tiny_workdir["mlruns"], "fast")
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"], "the killed run is closed, not left RUNNING"


def test_make_validate_all_shipped_recipes_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "llmopt.cli", "validate"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok  ") == len(list(RECIPES.glob("*.yaml")))


def test_a_hub_model_that_cannot_be_fetched_exits_1_naming_it(workdir, tmp_path, capsys):
    """The real hub path, offline: a clear line, and the run recorded as FAILED rather than a traceback."""
    recipe = tmp_path / "hub.yaml"
    recipe.write_text("name: hub\nmodel: {id: example-org/not-cached-anywhere}\nstages:\n"
                      "  - {stage: quantize, method: bnb, bits: 8}\n")
    assert run_cli(workdir, "run", str(recipe)) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: base model example-org/not-cached-anywhere could not be loaded: ")
    _, (parent,), children = runs(workdir["mlruns"], "hub")
    assert parent.info.status == "FAILED" and children == []


def test_local_tasks_paired_with_the_base_and_a_failed_gate_marks_the_run(tiny_workdir, tmp_path, capsys):
    """lm-eval tasks for the quantized and the base model under the same settings; recovery is
    their ratio; a gate that fails leaves the run FINISHED, exit 0, and marked."""
    recipe = fast_recipe(tmp_path)
    tasks = ROOT / "eval" / "tasks"
    recipe.write_text(recipe.read_text() + (
        f"    local_tasks: [{tasks / 'tiny_sums'}, {tasks / 'tiny_stories_rolling'}]\n    limit: 40\n    log_samples: 3\n"
        "    gates: {min_recovery: 0.5, max_ppl_delta_pct: 5, metrics: {tiny_sums/acc: {min: 0.999}}}\n"))
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    out = capsys.readouterr().out
    assert "tiny_sums/acc" in out and "gates (evaluate): FAILED: quality/tiny_sums/acc=" in out

    client, (parent,), (_, evaluate) = runs(tiny_workdir["mlruns"], "fast")
    assert parent.info.status == evaluate.info.status == "FINISHED"
    m = evaluate.data.metrics
    for task_metric in ("tiny_sums/acc", "tiny_sums_gen/exact_match_first_number", "tiny_stories_rolling/bits_per_byte"):
        name = f"quality/{task_metric}"
        higher = not task_metric.endswith("bits_per_byte")
        ratio = m[name] / m[f"{name}_base"] if higher else m[f"{name}_base"] / m[name]
        assert m[f"{name}_recovery"] == pytest.approx(ratio), name
    assert m["quality/tiny_sums/acc"] < 0.999 and m["gates/passed"] == 0 and parent.data.metrics["gates/passed"] == 0
    failed = evaluate.data.tags["llmopt.gates"]
    assert failed.startswith("failed: quality/tiny_sums/acc=") and "min_recovery" not in failed
    assert parent.data.tags["llmopt.gates"] == failed
    params = evaluate.data.params
    assert params["limit"] == "40" and params["num_fewshot"] == "0" and params["resolved.add_bos_token"] in ("True", "False")
    files = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert "quality.md" in files
    candidate = {a.path for a in client.list_artifacts(evaluate.info.run_id, "candidate")}
    assert {"candidate/lm_eval_results.json", "candidate/report.json"} <= candidate
    samples = client.list_artifacts(evaluate.info.run_id, "candidate/samples")
    assert {a.path.rsplit("/", 1)[1] for a in samples} == {"tiny_sums.jsonl", "tiny_sums_gen.jsonl",
                                                          "tiny_stories_rolling.jsonl"}

    # a gate judges the cached result: a looser threshold re-judges it without evaluating again
    recipe.write_text(recipe.read_text().replace("min: 0.999", "min: 0.5"))
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    out = capsys.readouterr().out
    assert "stage evaluate: cache hit" in out and "gates (evaluate): passed" in out


def test_another_llmopt_version_or_stage_code_is_a_cache_miss(tiny_workdir, tmp_path, monkeypatch, capsys):
    """The key holds llmopt's version and its stage's source digest: a fix to the perplexity code
    does not bring back the old numbers as a hit."""
    import json
    from importlib import metadata

    from llmopt import runner
    from llmopt.cache import stage_code

    recipe = tmp_path / "ppl.yaml"
    recipe.write_text(f"name: ppl\nmodel: {{embedded: tiny-llama}}\nstages:\n  - stage: evaluate\n    perplexity:\n"
                      f"      dataset: {{path: {DATA / 'validation.jsonl'}}}\n      seq_len: 64\n      stride: 64\n"
                      "      max_samples: 8\n      batch_size: 8\n")
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    assert "stage evaluate: computed" in capsys.readouterr().out
    (entry,) = [p for p in (tiny_workdir["cache"] / "stages").iterdir() if (p / "artifact.json").is_file()]
    record = json.loads((entry / "artifact.json").read_text())
    assert record["code"] == {"llmopt": metadata.version("llmopt"), "sources": stage_code("llmopt.stages.evaluate")["sources"]}
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    assert "stage evaluate: cache hit" in capsys.readouterr().out
    for change in ({"llmopt": "9.9.9"}, {"sources": "0" * 24}):
        monkeypatch.setattr(runner, "stage_code", lambda module, change=change: {**stage_code(module), **change})
        assert run_cli(tiny_workdir, "run", str(recipe)) == 0
        assert "stage evaluate: computed" in capsys.readouterr().out, change
    monkeypatch.undo()
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    assert "stage evaluate: cache hit" in capsys.readouterr().out
