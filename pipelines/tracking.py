"""MLflow tracking: one parent run per recipe execution, one nested run per stage.

With `llmopt.registry.store`, the only module that imports mlflow (tests/test_imports.py checks).
Default store: `sqlite:///mlruns/mlflow.db` with artifacts under `mlruns/artifacts` (MLflow 3.13+
refuses the old `./mlruns` file store); `MLFLOW_TRACKING_URI` points it at a real server instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MLRUNS_DIR_ENV = "LLMOPT_MLRUNS_DIR"
LOCAL_UI = "http://127.0.0.1:5000"  # `make ui`
# An experiment of runs and models, not of GenAI traces: what MLflow UIs that read the kind from
# the experiment take it from (3.17's does not: see experiment_url)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def default_mlruns_dir() -> Path:
    return Path(os.environ.get(MLRUNS_DIR_ENV, "mlruns"))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"calibration.num_samples": "128", ...} for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """ConnectionError naming the server when an http(s) tracking URI does not answer /health."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({problem}); start it, or unset "
                          "MLFLOW_TRACKING_URI to use the local store")


class Tracker:
    def __init__(self, mlruns_dir: Path | None = None):
        """A local store in `mlruns_dir` if given, else `MLFLOW_TRACKING_URI` if set, else ./mlruns.

        Uses its own client and never mlflow's global tracking URI (setting that also exports
        MLFLOW_TRACKING_URI, which would redirect every later run in the process)."""
        import mlflow

        for noisy in ("mlflow", "alembic"):  # schema-migration chatter on every new store
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if mlruns_dir is None and os.environ.get("MLFLOW_TRACKING_URI"):
            self.uri = os.environ["MLFLOW_TRACKING_URI"]
            self.artifact_root = None  # the server decides
        else:
            local = (mlruns_dir or default_mlruns_dir()).resolve()
            local.mkdir(parents=True, exist_ok=True)
            self.uri = f"sqlite:///{local / 'mlflow.db'}"
            self.artifact_root = (local / "artifacts").as_uri()
        self.client = mlflow.MlflowClient(self.uri)

    def experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=self.artifact_root, tags=EXPERIMENT_TAGS)

    def close_orphans(self, experiment_id: str) -> list[str]:
        """Mark runs of this host left RUNNING by a killed process as KILLED."""
        host = socket.gethostname()
        runs = self.client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
        orphans = [
            r.info.run_id for r in runs
            if r.data.tags.get("llmopt.host") == host and not _alive(int(r.data.tags.get("llmopt.pid", "0")))
        ]
        for run_id in orphans:
            self.client.set_terminated(run_id, status="KILLED")
        return orphans

    @contextmanager
    def run(self, experiment_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED if the block raises (the exception propagates)."""
        tags = {**tags, "llmopt.host": socket.gethostname(), "llmopt.pid": str(os.getpid())}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def log(self, run_id: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
            tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = _now_ms()
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, v[:6000]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_history(self, run_id: str, rows: list[dict[str, float]]) -> None:
        """Curves: each row is {"step": N, metric: value, ...}."""
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(k, float(v), now, int(row["step"])) for row in rows for k, v in row.items() if k != "step"]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def log_file(self, run_id: str, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_bytes(self, run_id: str, data: bytes, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), str(Path(name).parent) if "/" in name else None)

    def run_url_hint(self, run_id: str, experiment_id: str) -> str:
        if self.uri.startswith("sqlite:"):
            return f"make ui, then {experiment_url(LOCAL_UI, experiment_id)} (run {run_id})"
        return f"{experiment_url(self.uri, experiment_id)} (run {run_id})"


def experiment_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow's UI. MLflow 3.17 opens an experiment on its GenAI
    overview unless the URL (or the browser's remembered sidebar switch) picks the machine-learning
    workflow; its UI reads no experiment tag for that (`mlflow.experimentKind` is ignored)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
