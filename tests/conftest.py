"""Shared fixtures. No network: the embedded model is trained here once per test session."""

from __future__ import annotations

import os
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
    """A cache root holding the trained embedded tiny-llama (about a minute on 2 cores, once)."""
    from llmopt.models import resolve_base
    from llmopt.recipe import ModelSpec

    root = tmp_path_factory.mktemp("embedded-cache")
    resolve_base(ModelSpec(embedded="tiny-llama"), root, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_model(embedded_cache) -> Path:
    (path,) = (embedded_cache / "embedded").iterdir()
    return path


@pytest.fixture
def workdir(tmp_path) -> dict[str, Path]:
    """Where a run may write: a stage cache and an MLflow store, both absent until something writes."""
    return {"cache": tmp_path / "cache", "mlruns": tmp_path / "mlruns", "tmp": tmp_path}


@pytest.fixture
def tiny_workdir(workdir, embedded_cache) -> dict[str, Path]:
    """A fresh stage cache and MLflow store that share the already-trained embedded model."""
    workdir["cache"].mkdir()
    (workdir["cache"] / "embedded").symlink_to(embedded_cache / "embedded")
    return workdir


def run_cli(workdir: dict[str, Path], *args: str) -> int:
    from llmopt.cli import main

    return main([*args, "--cache-dir", str(workdir["cache"]), "--mlruns", str(workdir["mlruns"]), "--no-progress"])
