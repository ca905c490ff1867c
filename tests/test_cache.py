"""The content-addressed cache: atomic commit, resume after a crash, keys that change when they must."""

from __future__ import annotations

import json

import pytest
from llmopt.cache import Artifact, Cache, code_sources, directory_digest, source_digest, stage_code, stage_key


def _produce(files: dict[str, str], calls: list):
    def produce(out):
        calls.append(out)
        for name, text in files.items():
            (out / name).write_text(text)
        return Artifact(out, "report", {"quality/ppl": 2.5}, {"format": "x"})

    return produce


def test_build_commits_then_lookup_hits(tmp_path):
    cache, calls = Cache(tmp_path), []
    built = cache.build("k1", {"stage": "evaluate"}, _produce({"report.json": "{}"}, calls))
    assert not built.hit and built.artifact.path == tmp_path / "stages" / "k1"
    assert (built.artifact.path / "report.json").is_file()
    record = json.loads((built.artifact.path / "artifact.json").read_text())
    assert record["key"] == "k1" and record["artifact"]["metrics"] == {"quality/ppl": 2.5}
    again = cache.build("k1", {}, _produce({}, calls))
    assert again.hit and len(calls) == 1, "a committed entry is never rebuilt"
    assert cache.lookup("k1").artifact.info == {"format": "x"}


def test_a_crash_mid_stage_leaves_nothing_that_counts(tmp_path):
    cache = Cache(tmp_path)

    def crash(out):
        (out / "model.safetensors").write_text("half written")
        raise MemoryError("killed")

    with pytest.raises(MemoryError):
        cache.build("k1", {}, crash)
    assert cache.lookup("k1") is None
    assert not (tmp_path / "stages" / "k1").exists()
    # the next run discards the leftover and builds a complete entry
    built = cache.build("k1", {}, _produce({"ok": "1"}, []))
    assert sorted(p.name for p in built.artifact.path.iterdir()) == ["artifact.json", "ok"]
    assert not (tmp_path / "stages" / "k1.tmp").exists()


def test_a_directory_without_record_is_not_a_hit(tmp_path):
    cache = Cache(tmp_path)
    (tmp_path / "stages" / "k1").mkdir(parents=True)
    (tmp_path / "stages" / "k1" / "model.safetensors").write_text("from a run killed during rename")
    assert cache.lookup("k1") is None
    built = cache.build("k1", {}, _produce({"fresh": "1"}, []))
    assert not built.hit and not (built.artifact.path / "model.safetensors").exists()


def test_stage_must_write_into_its_own_directory(tmp_path):
    with pytest.raises(RuntimeError, match="not to"):
        Cache(tmp_path).build("k1", {}, lambda out: Artifact(tmp_path, "report"))


def test_key_changes_with_everything_that_decides_the_output():
    args = dict(parent="root", stage="quantize", config={"bits": 4}, libraries={"torch": "2.13"}, hardware="cpu",
                code={"llmopt": "0.1.0", "sources": "a" * 24})
    key = stage_key(**args)
    assert key == stage_key(**{**args, "code": dict(args["code"])})
    for change in ({"parent": "other"}, {"config": {"bits": 8}}, {"libraries": {"torch": "2.11"}},
                   {"hardware": "NVIDIA H100"}, {"code": {"llmopt": "0.1.1", "sources": "a" * 24}},
                   {"code": {"llmopt": "0.1.0", "sources": "b" * 24}}):
        assert stage_key(**{**args, **change}) != key, change


def test_stage_code_is_llmopt_version_and_the_sources_a_stage_imports():
    from importlib import metadata

    code = stage_code("llmopt.stages.evaluate")
    assert code == {"llmopt": metadata.version("llmopt"), "sources": source_digest("llmopt.stages.evaluate")}
    assert stage_code("llmopt.stages.evaluate") == code, "stable within a process"
    evaluate = code_sources("llmopt.stages.evaluate")
    assert {"llmopt.stages.evaluate", "llmopt.eval.perplexity", "llmopt.eval.harness", "llmopt.models"} <= set(evaluate)
    assert evaluate["llmopt.eval.perplexity"].name == "perplexity.py" and evaluate["llmopt.eval.perplexity"].is_file()
    assert {"llmopt.stages.benchmark", "llmopt.eval.bench"} <= set(code_sources("llmopt.stages.benchmark"))
    quantize = code_sources("llmopt.stages.quantize")
    assert "llmopt.stages.quantize" in quantize and "llmopt.eval.perplexity" not in quantize
    assert not {"llmopt.cache", "llmopt.tracking", "llmopt.recipe", "llmopt.registry"} & (set(evaluate) | set(quantize))
    assert stage_code("llmopt.stages.quantize")["sources"] != code["sources"]


def test_source_digest_follows_the_code_a_stage_imports_and_nothing_else(tmp_path, monkeypatch):
    """A stand-in package: its stage imports eval.perplexity at the top and progress inside a function."""
    pkg = tmp_path / "fakeopt"
    for folder in (pkg, pkg / "stages", pkg / "eval"):
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").write_text("")
    (pkg / "stages" / "evaluate.py").write_text("from fakeopt.eval import perplexity\n\n\ndef run():\n"
                                                "    from fakeopt.progress import bar\n")
    (pkg / "eval" / "perplexity.py").write_text("WINDOW = 128\n")
    (pkg / "eval" / "bench.py").write_text("RUNS = 1\n")
    (pkg / "progress.py").write_text("bar = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = "fakeopt.stages.evaluate"
    assert sorted(code_sources(module)) == ["fakeopt.eval", "fakeopt.eval.perplexity", module]
    first = source_digest(module)
    (pkg / "eval" / "bench.py").write_text("RUNS = 2\n")  # not imported by the stage
    (pkg / "progress.py").write_text("bar = repr\n")  # shows progress only
    source_digest.cache_clear()
    assert source_digest(module) == first
    (pkg / "eval" / "perplexity.py").write_text("WINDOW = 256\n")
    assert source_digest(module) == first, "hashed once per process"
    source_digest.cache_clear()
    assert source_digest(module) != first
    source_digest.cache_clear()


def test_directory_digest_follows_content_and_uses_the_memo(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    memo = tmp_path / "memo.json"
    first = directory_digest(model, memo)
    assert directory_digest(model, memo) == first
    assert len(json.loads(memo.read_text())) == 2
    (model / "model.safetensors").write_bytes(b"\1" * 1000)
    assert directory_digest(model, memo) != first


def test_a_stage_key_covers_every_self_registering_module():
    """Methods and runtimes are imported by listing their package (llmopt.plugins), not by name: the
    quantize and benchmark stages' source digests must still cover each of them."""
    import pkgutil

    import llmopt.eval.runtimes
    import llmopt.methods

    for stage, package in (("llmopt.stages.quantize", llmopt.methods), ("llmopt.stages.benchmark", llmopt.eval.runtimes)):
        expected = {f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)}
        assert expected and expected <= set(code_sources(stage)), stage
