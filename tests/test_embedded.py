"""The embedded default: its shipped data is exactly what the generator makes, its tokenizer reloads
through AutoTokenizer unchanged, and building it is cached."""

from __future__ import annotations

from conftest import DATA
from llmopt.embedded import EMBEDDED_MODELS, stories, write_corpus
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


def test_the_embedded_model_is_built_once_and_keyed_by_its_spec(embedded_cache):
    key, artifact = resolve_base(ModelSpec(embedded="tiny-llama"), embedded_cache, progress=False)
    assert key == f"embedded:{EMBEDDED_MODELS['tiny-llama'].key()}"
    assert artifact.path == embedded_cache / "embedded" / EMBEDDED_MODELS["tiny-llama"].key()
    assert (artifact.path / "model.safetensors").is_file() and not list(artifact.path.glob("*.bin"))
