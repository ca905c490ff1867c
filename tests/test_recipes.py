"""Recipe validation: every shipped recipe is valid; every kind of bad input gets one clear line, exit 2,
and nothing written (no cache entry, no MLflow store)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, RECIPES, run_cli
from llmopt.cli import main
from llmopt.errors import RecipeError
from llmopt.methods.gptq import GptqQuantize
from llmopt.recipe import QUANTIZE_METHODS, find_recipe, load_recipe

CALIB = DATA / "calibration.jsonl"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    recipe = load_recipe(path)
    assert recipe.name == path.stem, "a recipe's name is its file name, so `make recipe=NAME` finds it"
    assert f"ok  {path}" in capsys.readouterr().out


def test_relative_paths_resolve_against_the_recipe_folder():
    recipe = load_recipe(RECIPES / "tiny-int4.yaml")
    assert recipe.stages[0].calibration.dataset.path == CALIB.resolve()


GPTQ_HEAD = """name: bad
model: {embedded: tiny-llama}
stages:
  - stage: quantize
    method: gptq
    bits: 4
"""

BAD = {
    # name: (recipe text, expected line, field path, words the message must contain)
    "unknown stage": ("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: prune\n",
                      4, "stages[0].stage", "unknown stage 'prune'; expected one of: distill, quantize, evaluate"),
    "unknown method": ("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n    method: awq\n",
                       5, "stages[0].method", "unknown method 'awq'; expected one of: " + ", ".join(QUANTIZE_METHODS)),
    "bits 3": ("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n    method: bnb\n    bits: 3\n",
               6, "stages[0].bits", "Input should be 4 or 8 (got 3)"),
    "misspelled key": (GPTQ_HEAD + f"    gruop_size: 64\n    calibration: {{dataset: {{path: {CALIB}}}}}\n",
                       7, "stages[0].gruop_size", "did you mean `group_size`?"),
    "negative num_samples": (GPTQ_HEAD + f"    calibration:\n      dataset: {{path: {CALIB}}}\n      num_samples: -5\n",
                             9, "stages[0].calibration.num_samples", "greater than 0 (got -5)"),
    "desc_act wrongly typed": (GPTQ_HEAD + f"    desc_act: 'yes'\n    calibration: {{dataset: {{path: {CALIB}}}}}\n",
                               7, "stages[0].desc_act", "valid boolean (got 'yes')"),
    "missing local model": ("name: bad\nmodel: {path: /nonexistent/model}\nstages:\n  - stage: quantize\n"
                            "    method: bnb\n    bits: 8\n",
                            2, "model", "/nonexistent/model does not exist"),
    "empty calibration file": (GPTQ_HEAD + "    calibration: {dataset: {path: empty.txt}}\n",
                               7, "stages[0].calibration.dataset", "empty.txt is empty"),
    "unreadable calibration file": (GPTQ_HEAD + "    calibration: {dataset: {path: latin1.txt}}\n",
                                    7, "stages[0].calibration.dataset", "cannot read"),
    "calibration file missing": (GPTQ_HEAD + "    calibration: {dataset: {path: nope.jsonl}}\n",
                                 7, "stages[0].calibration.dataset", "nope.jsonl does not exist"),
    "text field missing": (GPTQ_HEAD + f"    calibration: {{dataset: {{path: {CALIB}, text_field: body}}}}\n",
                           7, "stages[0].calibration.dataset", "no string field 'body'"),
    "bnb 8-bit with a 4-bit option": ("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n"
                                      "    method: bnb\n    bits: 8\n    quant_type: nf4\n",
                                      4, "stages[0]", "quant_type only apply to bits: 4"),
    "stride above seq_len": ("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: evaluate\n"
                             f"    perplexity: {{dataset: {{path: {CALIB}}}, seq_len: 64, stride: 128}}\n",
                             5, "stages[0].perplexity", "stride (128) must not exceed seq_len (64)"),
    "two quantize stages": ("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n"
                            "  - {stage: quantize, method: bnb, bits: 8}\n"
                            "  - {stage: quantize, method: rtn, name: again}\n",
                            3, "stages", "keep one `quantize` stage"),
}


@pytest.fixture
def bad_recipe(tmp_path):
    def write(text: str) -> Path:
        (tmp_path / "empty.txt").write_text("  \n")
        (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        return path

    return write


@pytest.mark.parametrize("case", sorted(BAD), ids=str)
def test_bad_recipe_one_line_exit_2_nothing_written(case, bad_recipe, workdir, capsys):
    text, line, field, words = BAD[case]
    path = bad_recipe(text)
    assert run_cli(workdir, "run", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got: {err}"
    assert err.startswith(f"error: {path}:{line}: {field}: "), err
    assert words in err
    assert not workdir["mlruns"].exists(), "an invalid recipe must not create an MLflow store"
    assert not (workdir["cache"] / "stages").exists(), "an invalid recipe must not write cache entries"


def test_yaml_syntax_error_names_line_and_column(bad_recipe, capsys):
    path = bad_recipe("name: bad\nmodel: {embedded: tiny-llama\nstages:\n  - stage: quantize\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}:3:7: YAML syntax error: expected ',' or '}}', but got ':'"


def test_nonexistent_recipe_name_lists_the_available_ones():
    with pytest.raises(RecipeError, match=r"no recipe named 'tiny-int5'.*available: .*tiny-int4"):
        find_recipe("tiny-int5", RECIPES)


def test_unknown_force_stage_is_bad_input(workdir, capsys):
    assert run_cli(workdir, "run", str(RECIPES / "tiny-int4.yaml"), "--force-stage", "quantise") == 2
    err = capsys.readouterr().err
    assert "--force-stage 'quantise' is not a stage of this recipe (stages: quantize, evaluate, benchmark)" in err
    assert not workdir["mlruns"].exists()


def test_cli_exit_code_and_no_traceback_in_a_real_process(tmp_path):
    """The console script itself: exit status 2 and one line, no Python traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmopt.cli", "run", "no-such-recipe", "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, cwd=RECIPES.parent,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no recipe named 'no-such-recipe'")
    assert not (tmp_path / "c").exists()


def test_group_size_must_be_positive_or_minus_one():
    base = {"stage": "quantize", "method": "gptq", "bits": 4, "calibration": {"dataset": {"path": str(CALIB)}}}
    assert GptqQuantize.model_validate({**base, "group_size": -1}).group_size == -1
    with pytest.raises(ValueError, match="group_size must be a positive"):
        GptqQuantize.model_validate({**base, "group_size": 0})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_recipe_for_another_machine_validates_with_a_note_but_does_not_run_here(bad_recipe, workdir, capsys):
    path = bad_recipe("name: gpu\nmodel: {embedded: tiny-llama}\ndevice: cuda\n"
                      "stages:\n  - stage: quantize\n    method: rtn\n    bits: 4\n")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"ok  {path}" in out and "not runnable on this machine: device: cuda is asked for" in out
    assert run_cli(workdir, "run", str(path)) == 2
    assert capsys.readouterr().err.strip() == (f"error: {path}: device: cuda is asked for, but this machine has no "
                                               "CUDA device (use auto or cpu)")
    assert not workdir["mlruns"].exists() and not workdir["cache"].exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_validate_notes_a_gpu_recipe_and_a_hub_model_it_cannot_get_offline(bad_recipe, monkeypatch, capsys):
    """Valid (exit 0), with a note each: the shipped 13B recipes ask for CUDA; a hub model that is
    not in the local cache cannot be had with HF_HUB_OFFLINE set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = bad_recipe("name: hub\nmodel: {id: example-org/not-cached-anywhere}\nstages:\n"
                      "  - {stage: quantize, method: bnb, bits: 8}\n")
    gpu = RECIPES / "llama13b-nf4.yaml"
    assert main(["validate", str(path), str(gpu)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"ok  {path}  (hub: quantize)",
                       "    not runnable on this machine: model: example-org/not-cached-anywhere@main is not in the local "
                       "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; run where the hub is reachable, "
                       "or fill the cache first"]
    assert out[2:4] == [f"ok  {gpu}  (llama13b-nf4: quantize -> evaluate)",
                        "    not runnable on this machine: device: cuda is asked for, but this machine has no CUDA device "
                        "(use auto or cpu)"]
    # online, the model would be downloaded: no note (and validate asks the hub nothing)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok  {path}  (hub: quantize)"]


def test_a_misspelled_recipe_name_suggests_the_close_one():
    """`make recipe=tiny-in4`: the closest recipe names first."""
    with pytest.raises(RecipeError, match=r"^no recipe named 'tiny-in4': \S+ does not exist; did you mean tiny-int4(, \S+)*\? "
                                          r"\(available: .*\)$"):
        find_recipe("tiny-in4", RECIPES)
    with pytest.raises(RecipeError) as far_off:
        find_recipe("quantize-everything", RECIPES)
    assert "did you mean" not in str(far_off.value)


def test_a_bare_recipe_file_name_is_the_recipes_folders_file(tmp_path, monkeypatch, capsys):
    """`llmopt run tiny-int4.yaml` from a folder without that file runs recipes/tiny-int4.yaml (a
    recipe's name is its file name) and says which file it uses; a file there comes first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMOPT_RECIPES_DIR", str(RECIPES))
    assert find_recipe("tiny-int4.yaml") == RECIPES / "tiny-int4.yaml"
    assert main(["validate", "tiny-int4.yaml"]) == 0
    assert capsys.readouterr().out.startswith(f"ok  {RECIPES / 'tiny-int4.yaml'}  (tiny-int4: ")
    with pytest.raises(RecipeError, match=rf"^recipe file tiny-in4.yaml does not exist; did you mean "
                                          rf"{re.escape(str(RECIPES / 'tiny-int4.yaml'))}(, \S+)*\?$"):
        find_recipe("tiny-in4.yaml")
    with pytest.raises(RecipeError, match=r"^recipe file elsewhere/tiny-int4.yaml does not exist$"):
        find_recipe("elsewhere/tiny-int4.yaml")  # a path with a folder is taken as written
    (tmp_path / "tiny-int4.yaml").write_text((RECIPES / "tiny-nf4.yaml").read_text())
    assert find_recipe("tiny-int4.yaml") == Path("tiny-int4.yaml")


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"llmopt {metadata.version('llmopt')}\n"


def test_every_schema_error_is_reported_at_once_each_with_its_line(bad_recipe, capsys):
    path = bad_recipe("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n    method: gptq\n"
                      "    bits: 3\n    group_sise: 32\n    calibration: {dataset: {embedded: tiny-stories}}\n"
                      "  - stage: evaluate\n    perplexity: {dataset: {embedded: tiny-stories}, seq_len: 0}\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}:6: stages[0].bits: Input should be 4 or 8 (got 3)",
        f"error: {path}:7: stages[0].group_sise: unknown key (misspelled?); did you mean `group_size`?",
        f"error: {path}:10: stages[1].perplexity.seq_len: Input should be greater than 0 (got 0)",
    ]


def test_validate_imports_no_torch_lm_eval_transformers_or_mlflow():
    """`llmopt validate` over every shipped recipe, in a fresh process: the schema, the checks and
    the machine's GPUs (NVML) without the heavy libraries, which is what keeps it under a second
    (measured in the README with `python -X importtime`; no wall-clock bound in a unit test)."""
    code = ("import sys\nfrom llmopt.cli import main\nassert main(['validate']) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'mlflow', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=RECIPES.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"


def test_the_method_union_holds_every_method_module():
    """`method:` accepts exactly the modules of llmopt.methods, each declaring its own schema."""
    import pkgutil

    import llmopt.methods

    modules = {m.name for m in pkgutil.iter_modules(llmopt.methods.__path__)}
    assert {"bnb", "gptq", "modelopt", "rtn"} <= set(QUANTIZE_METHODS)
    assert set(QUANTIZE_METHODS) == modules, "one module per method, named as the recipe names it"
