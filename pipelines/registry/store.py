"""The MLflow side of the registry: registering a package as a model version, moving aliases,
re-checking gates on promotion, resolving and pulling a version back. The one module of the
registry that imports mlflow, inside the functions that use it, so that gate checks stay light.

Packages are keyed by the artifact's content hash: the same weights registered twice are uploaded
once (the second version points at the first upload), and registered under the same gates with
the same verdict they reuse their version instead of making one. Aliases move only after the package is
uploaded and the version exists, one `set_registered_model_alias` call each.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.registry.gates import Gate, judge
from llmopt.registry.package import check_destination, install_verified, staging_folder, write_package

CANDIDATE = "candidate"
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,254}$")  # MLflow's alias charset; `latest` and v<N> are reserved


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise ValueError(f"alias {alias!r}: use letters, digits, '-' and '_', starting with a letter "
                         "('latest' and v<number> are reserved by MLflow)")
    return alias


def check_promotion_alias(alias: str) -> str:
    """An alias a recipe or `llmopt promote` may move: valid, and not the reserved `candidate`."""
    if alias == CANDIDATE:
        raise ValueError(f"alias {CANDIDATE!r} is what a version that fails its gates gets; promote to another alias")
    return check_alias(alias)


# --- registration -------------------------------------------------------------------------------------


@dataclass
class Registration:
    name: str
    version: str
    alias: str  # the alias this version got: the recipe's, or `candidate`
    failed: list[str]
    reused_upload: bool
    reused_version: bool = False  # the same content under the same gates, with the same verdict: no new version
    note: str = ""  # why a version was reused, or why the same content got a new one; empty for new content


# what a registry write can meet when another process writes at the same moment; the write failed
# whole (its transaction rolled back), so it is tried again
RACES = ("locked",  # SQLite refuses a writer while another holds the lock
         # MLflow reads, then inserts (the next version number, a new alias): two writers can insert the
         # same row; the second attempt reads the first writer's row and updates it, or takes the next number
         "unique constraint failed")


def _retry(call, attempts: int = 8):
    """`call()`, tried again (with a growing pause) while it fails on a race with another writer."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as e:
            if not any(race in str(e).lower() for race in RACES) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def register(tracker, promote, run_id: str, artifact: Path, metrics: dict[str, float], card: str, tags: dict[str, str],
             digest: str) -> Registration:
    """Upload the package (once per content), create the version with its tags, then move the
    alias: the recipe's when every gate passes, else `candidate`. A version that already holds this
    content under the same gates with the same verdict (a warm re-run) is reused: it gets this run
    as `llmopt.last_run_id` and the alias, and no new version is made."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    gates = [Gate.parse(g) for g in promote.gates]
    lines, failed = judge(gates, metrics)
    try:
        _retry(lambda: client.create_registered_model(promote.model_name, description=promote.description))
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    existing = sorted((v for v in _retry(lambda: client.search_model_versions(f"name = '{promote.model_name}'"))
                       if v.tags.get("llmopt.content_sha256") == digest), key=lambda v: int(v.version))
    alias = promote.alias if not failed else CANDIDATE
    passed = str(not failed).lower()
    same = [v for v in existing if _gate_specs(v) == promote.gates and v.tags.get("llmopt.gates_passed") == passed]
    if same:  # a warm re-run: the version that holds this content under these gates, with this verdict
        version = same[-1]
        registrations = int(version.tags.get("llmopt.registrations", "1")) + 1
        _retry(lambda: client.set_model_version_tag(promote.model_name, version.version, "llmopt.last_run_id", run_id))
        _retry(lambda: client.set_model_version_tag(promote.model_name, version.version, "llmopt.registrations",
                                                    str(registrations)))
        _retry(lambda: client.set_registered_model_alias(promote.model_name, alias, version.version))
        note = f"reused version {version.version}: same content (sha256 {digest[:12]}) and gates, no new version"
        return Registration(promote.model_name, str(version.version), alias, failed, True, True, note)
    note = ""
    if existing:  # the same weights judged by other gates, or judged otherwise now: a version of its own
        newest = existing[-1]
        why = ("this recipe's gates differ from that version's" if _gate_specs(newest) != promote.gates else
               f"its gates {'passed' if newest.tags.get('llmopt.gates_passed') == 'true' else 'failed'} there and "
               f"{'pass' if not failed else 'fail'} with this run's metrics")
        note = f"new version: same content as version {newest.version} (not uploaded again), but {why}"
    reused = bool(existing)
    if existing:
        source = existing[0].source  # the same weights: no second upload
    else:
        folder = f"registry/{digest[:16]}"
        with tempfile.TemporaryDirectory() as tmp:
            write_package(artifact, card, Path(tmp), {"model_name": promote.model_name, "content_sha256": digest,
                                                      "run_id": run_id})
            client.log_artifacts(run_id, tmp, folder)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{folder}"
    version_tags = {**tags, "llmopt.content_sha256": digest, "llmopt.gate_specs": json.dumps(promote.gates),
                    "llmopt.gates": json.dumps(lines), "llmopt.gates_passed": str(not failed).lower()}
    version = _retry(lambda: client.create_model_version(promote.model_name, source, run_id=run_id, tags=version_tags))
    for _ in range(100):  # file and SQLite stores are READY at once; a remote registry may take a moment
        if client.get_model_version(promote.model_name, version.version).status == "READY":
            break
        time.sleep(0.1)
    _retry(lambda: client.set_registered_model_alias(promote.model_name, alias, version.version))
    return Registration(promote.model_name, str(version.version), alias, failed, reused, False, note)


def _gate_specs(version) -> list[str] | None:
    return json.loads(version.tags["llmopt.gate_specs"]) if "llmopt.gate_specs" in version.tags else None


def promote_version(tracker, name: str, version: str, alias: str, force: bool, reason: str | None) -> list[str]:
    """Re-check a version's gates against its run's metrics and move `alias` to it; with `force`,
    move it anyway and record the reason on the version. Returns the failing gates (empty: passed)."""
    client = tracker.client
    mv = client.get_model_version(name, version)
    specs = json.loads(mv.tags.get("llmopt.gate_specs", "[]"))
    metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    _, failed = judge([Gate.parse(s) for s in specs], metrics)
    if failed and not force:
        return failed
    if force:
        client.set_model_version_tag(name, version, "llmopt.forced_promotion",
                                     json.dumps({"alias": alias, "reason": reason, "failed_gates": failed}))
    _retry(lambda: client.set_registered_model_alias(name, alias, version))
    return failed if force else []


def resolve(tracker, ref: str):
    """`NAME@ALIAS` or `NAME/VERSION` -> the model version (ValueError naming what is missing)."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    if "@" in ref:
        name, alias = ref.split("@", 1)
        getter = lambda: client.get_model_version_by_alias(name, alias)  # noqa: E731
        missing = f"model {name!r} has no alias {alias!r}"
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        getter = lambda: client.get_model_version(name, version)  # noqa: E731
        missing = f"model {name!r} has no version {version!r}"
    else:
        raise ValueError(f"{ref!r}: name a version as NAME@ALIAS or NAME/VERSION")
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"no registered model named {name!r}") from None
    try:
        return getter()
    except MlflowException:
        aliases = sorted(client.get_registered_model(name).aliases)
        raise ValueError(f"{missing} (aliases: {', '.join(aliases) or 'none'})") from None


def pull(tracker, ref: str, dest: Path, overwrite: bool) -> tuple[Any, list[str]]:
    """Download a version's package into `dest` and check every sha256. A damaged download is
    left in a temporary folder and reported; `dest` receives only a verified package."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    check_destination(dest, overwrite)
    mv = resolve(tracker, ref)
    staging = staging_folder(dest)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(staging),
                                                     tracking_uri=tracker.uri))
    return mv, install_verified(local, staging, dest)
