"""The `gptq_rtn` method, added as one module (llmopt/methods/gptq_rtn.py) and this test: the recipe
schema, validation, the serving table, the lineage and the loader know it from its declaration."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA
from llmopt import methods
from llmopt.cache import Artifact
from llmopt.data import load_texts, token_stream
from llmopt.eval.perplexity import perplexity
from llmopt.export import support
from llmopt.methods.gptq_rtn import GptqRtnQuantize
from llmopt.models import load_model, load_tokenizer
from llmopt.recipe import DatasetSpec, load_recipe
from llmopt.registry.gates import known_metrics
from llmopt.stages import StageContext, quantize
from llmopt.stages.catalog import STAGES
from llmopt.validate import check_recipe

CPU = StageContext(device="cpu", dtype="float32", trust_remote_code=False, progress=False)


def test_the_recipe_schema_validation_and_tables_know_it_from_its_module(tmp_path):
    recipe_file = tmp_path / "int8.yaml"
    recipe_file.write_text("name: int8\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n    method: gptq_rtn\n"
                           "  - stage: evaluate\n    perplexity: {dataset: {path: %s}}\n" % (DATA / "validation.jsonl"))
    recipe = load_recipe(recipe_file)
    cfg = recipe.stages[0]
    assert isinstance(cfg, GptqRtnQuantize) and (cfg.bits, cfg.group_size) == (8, -1), "int8 per channel by default"
    check_recipe(recipe, recipe_file)
    assert STAGES["quantize"].libraries(cfg) == ("gptqmodel", "optimum")
    assert support.format_of(cfg) == "gptq" and support.check("gptq", "trtllm", 90, "1.2.0").ok
    assert methods.get("gptq_rtn").describe(cfg) == "gptq_rtn 8-bit round-to-nearest"
    assert "memory/compression_ratio" in known_metrics(recipe)[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe_file.read_text().replace("method: gptq_rtn", "method: gptq_rtn\n    bits: 3"))
    with pytest.raises(Exception, match=r"bad.yaml:6: stages\[0\].bits"):
        load_recipe(bad)


@pytest.fixture(scope="module")
def scored(tiny_model, tmp_path_factory) -> dict[str, float]:
    """Perplexity of the base and of int8 / int4 round-to-nearest, each reloaded from its checkpoint."""
    ids = token_stream(load_tokenizer(tiny_model), load_texts(DatasetSpec(path=DATA / "validation.jsonl"), limit=100))
    source = Artifact(tiny_model, "hf-checkpoint")
    models = {"base": (load_model(source, "cpu", "float32"), 1.0)}
    for name, cfg in {"int8": GptqRtnQuantize(stage="quantize", method="gptq_rtn"),
                      "int4": GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32)}.items():
        out = tmp_path_factory.mktemp(name)
        artifact = quantize.run(cfg, source, out, CPU)
        assert artifact.info["format"] == "gptq" and artifact.info["serving_format"] == "gptq"
        assert (out / "quantize_config.json").is_file() and not list(Path(out).glob("*.bin")), "safetensors, GPTQ format"
        models[name] = (load_model(artifact, "cpu", "float32"), artifact.metrics["memory/compression_ratio"])
    return {name: (perplexity(model, ids, seq_len=128, stride=128, batch_size=8, progress=False)["ppl"], ratio)
            for name, (model, ratio) in models.items()}


def test_int8_weight_only_keeps_the_base_quality_and_stores_packed_weights(scored):
    base, int8, int4 = scored["base"][0], scored["int8"][0], scored["int4"][0]
    assert abs(int8 / base - 1) < 0.01, f"int8 per channel moves perplexity {int8 / base - 1:+.2%}"
    assert int4 > int8, "4-bit rounding must cost more than 8-bit"
    # the tiny model is float32 with untied, unquantized embeddings and head: 8-bit linears still
    # shrink the file by more than 2x, 4-bit ones by more
    assert scored["int8"][1] > 2.0 and scored["int4"][1] > scored["int8"][1]
