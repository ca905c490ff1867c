"""Registry: promotion gates, registration with a model card and content-hash dedupe, aliases,
`llmopt promote`, `llmopt pull` with checksum verification, `llmopt compare`, concurrent
promotions, a real `mlflow server` on localhost, and bad input."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import RECIPES, run_cli, seed_cache
from llmopt import registry
from llmopt.cli import main
from llmopt.recipe import load_recipe

IMPOSSIBLE = '    - "quality/tiny_sums/acc_recovery >= 1.5"\n'


def _recipe(tmp_path: Path, name: str, gates: str, alias: str = "production") -> Path:
    """tiny-int4 (the same stages, so the same cached outputs) under another name and promote block."""
    text = (RECIPES / "tiny-int4.yaml").read_text().replace("../eval", str(RECIPES.parent / "eval"))
    text = text.replace("name: tiny-int4\n", f"name: {name}\n")
    head = text[:text.index("promote:")]
    path = tmp_path / f"{name}.yaml"
    path.write_text(head + f"promote:\n  model_name: tiny-llama-int4\n  alias: {alias}\n  gates:\n{gates}")
    return path


def _client(workdir) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{workdir['mlruns'] / 'mlflow.db'}")


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_int4_stages):
    """tiny-int4 (gates pass) then a sibling recipe with an impossible gate, into one store."""
    work = tmp_path_factory.mktemp("registry")
    dirs = {"cache": work / "cache", "mlruns": work / "mlruns", "tmp": work}
    seed_cache(dirs["cache"], tiny_int4_stages)
    assert run_cli(dirs, "run", str(RECIPES / "tiny-int4.yaml")) == 0
    assert run_cli(dirs, "run", str(_recipe(work, "tiny-int4-strict", IMPOSSIBLE))) == 0
    return dirs


def test_passing_gates_move_the_alias_and_a_failing_gate_gives_candidate(registered, capsys):
    client = _client(registered)
    model = client.get_registered_model("tiny-llama-int4")
    assert model.aliases == {"production": 1, "candidate": 2}
    first, second = client.get_model_version("tiny-llama-int4", "1"), client.get_model_version("tiny-llama-int4", "2")
    assert first.tags["llmopt.gates_passed"] == "true" and second.tags["llmopt.gates_passed"] == "false"
    assert any("FAIL: quality/tiny_sums/acc_recovery" in line for line in json.loads(second.tags["llmopt.gates"]))
    assert first.tags["llmopt.recipe"] == "tiny-int4" and first.tags["llmopt.base_model"] == "embedded:tiny-llama"
    assert first.tags["llmopt.lineage"] == "embedded:tiny-llama -> quantize (gptq 4-bit)"
    keys = json.loads(first.tags["llmopt.cache_keys"])
    assert set(keys) == {"quantize", "evaluate", "benchmark"}
    parent = client.get_run(second.run_id)
    assert parent.data.tags["llmopt.alias"] == "candidate"
    recovery = parent.data.metrics["quality/tiny_sums/acc_recovery"]
    assert f"quality/tiny_sums/acc_recovery = {recovery:.6g} NOT >= 1.5" in parent.data.tags["llmopt.promotion_gates"]


def test_same_weights_are_uploaded_once(registered):
    client = _client(registered)
    first, second = client.get_model_version("tiny-llama-int4", "1"), client.get_model_version("tiny-llama-int4", "2")
    assert first.tags["llmopt.content_sha256"] == second.tags["llmopt.content_sha256"]
    assert second.source == first.source, "the second version points at the first upload"
    uploads = list((registered["mlruns"] / "artifacts").rglob("registry/*/model/model.safetensors"))
    assert len(uploads) == 1


def test_the_model_card_says_what_was_done(registered, tmp_path):
    assert main(["pull", "tiny-llama-int4@production", "--dest", str(tmp_path / "p"), "--mlruns",
                 str(registered["mlruns"])]) == 0
    card = (tmp_path / "p" / registry.CARD).read_text()
    assert "Lineage: embedded:tiny-llama -> quantize (gptq 4-bit)" in card
    from llmopt.embedded import EMBEDDED_MODELS

    version = _client(registered).get_model_version("tiny-llama-int4", "1")
    revision = EMBEDDED_MODELS["tiny-llama"].revision(registered["cache"])
    assert version.tags["llmopt.base_revision"] == revision and revision.startswith("sha256:")
    assert (f"Base model: {EMBEDDED_MODELS['tiny-llama'].upstream}, revision `{revision}`; license Apache-2.0"
            in card.splitlines())
    row = next(line for line in card.splitlines() if line.startswith("| tiny_sums/acc |"))
    base, optimized, stderr, recovery = (float(c) for c in row.strip("|").split("|")[1:5])
    assert recovery == pytest.approx(optimized / base, rel=1e-3) and 0 < stderr < 0.1
    assert "| 1 | " in card and "pass: quality/ppl_delta_pct" in card
    assert "AutoModelForCausalLM.from_pretrained('model'" in card and "torch:" in card


def test_pull_verifies_every_file_and_refuses_a_tampered_one(registered, tmp_path, capsys, monkeypatch):
    store = ["--mlruns", str(registered["mlruns"])]
    dest = tmp_path / "pulled"
    assert main(["pull", "tiny-llama-int4@production", "--dest", str(dest), *store]) == 0
    manifest = json.loads((dest / registry.PACKAGE_MANIFEST).read_text())
    assert "model/model.safetensors" in manifest["files"] and registry.CARD in manifest["files"]
    assert registry.verify_package(dest) == []
    # the same files through plain MLflow, as a serving team would
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registered['mlruns'] / 'mlflow.db'}")  # registry too
    plain = mlflow.artifacts.download_artifacts("models:/tiny-llama-int4@production", dst_path=str(tmp_path / "plain"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert registry.verify_package(Path(plain)) == []
    # tamper with the stored weights: the pull refuses and leaves the destination alone
    (stored,) = (registered["mlruns"] / "artifacts").rglob("registry/*/model/model.safetensors")
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        fresh = tmp_path / "fresh"
        assert main(["pull", "tiny-llama-int4@production", "--dest", str(fresh), *store]) == 1
        out = capsys.readouterr().out
        assert "REFUSED" in out and "model/model.safetensors: sha256 does not match" in out
        assert not fresh.exists() or not any(fresh.iterdir())
    finally:
        stored.write_bytes(original)


@pytest.mark.parametrize(("args", "words"), [
    (["pull", "nope@production"], "no registered model named 'nope'"),
    (["pull", "tiny-llama-int4@staging"], "has no alias 'staging' (aliases: candidate, production)"),
    (["promote", "tiny-llama-int4", "1", "--alias", "bad alias!"], "--alias: alias 'bad alias!'"),
    (["promote", "tiny-llama-int4", "9", "--alias", "staging"], "has no version '9'"),
    (["promote", "tiny-llama-int4", "2", "--alias", "staging", "--force"], "--force needs --reason"),
])
def test_bad_registry_commands_exit_2(args, words, registered, tmp_path, capsys):
    assert main([*args, *(["--dest", str(tmp_path / "d")] if args[0] == "pull" else []),
                 "--mlruns", str(registered["mlruns"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not (tmp_path / "d").exists()


def test_promote_refuses_the_reserved_candidate_alias(registered, capsys):
    client = _client(registered)
    before = client.get_registered_model("tiny-llama-int4").aliases
    assert main(["promote", "tiny-llama-int4", "1", "--alias", "candidate", "--mlruns", str(registered["mlruns"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --alias: alias 'candidate' is what a version that fails its gates gets; promote to another alias"
    assert client.get_registered_model("tiny-llama-int4").aliases == before and before["candidate"] == 2


def test_a_warm_rerun_reuses_its_version_and_says_so(registered, tmp_path, capsys):
    """The same recipe twice into one store, every stage a hit: one version, the second run reuses it."""
    dirs = {"cache": registered["cache"], "mlruns": tmp_path / "mlruns", "tmp": tmp_path}
    assert run_cli(dirs, "run", str(RECIPES / "tiny-int4.yaml")) == 0
    first = " ".join(capsys.readouterr().out.split())
    assert run_cli(dirs, "run", str(RECIPES / "tiny-int4.yaml")) == 0
    second = " ".join(capsys.readouterr().out.split())
    assert "registered tiny-llama-int4 version 1, alias production" in first and "reused" not in first
    assert "3/3 stages from cache" in second
    assert "registered tiny-llama-int4 version 1, alias production (reused version 1: same content (sha256 " in second
    assert "and gates, no new version)" in second
    client = _client(dirs)
    (version,) = client.search_model_versions("name = 'tiny-llama-int4'")
    assert str(version.version) == "1" and client.get_registered_model("tiny-llama-int4").aliases == {"production": 1}
    found = client.search_runs([client.get_experiment_by_name("tiny-int4").experiment_id],
                               order_by=["attributes.start_time ASC"])
    one, two = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert version.run_id == one.info.run_id and version.tags["llmopt.last_run_id"] == two.info.run_id
    assert version.tags["llmopt.registrations"] == "2"
    assert one.data.tags["llmopt.registration"] == "new version"
    assert two.data.tags["llmopt.registration"].startswith("reused version 1: same content (sha256 ")
    assert two.data.tags["llmopt.registered"] == "tiny-llama-int4/1" and two.data.tags["llmopt.alias"] == "production"
    assert len(list((dirs["mlruns"] / "artifacts").rglob("registry/*/model/model.safetensors"))) == 1
    # the same weights under other gates (the fixture's strict sibling) get a version of their own, and say why
    store = _client(registered)
    strict = store.get_run(store.get_model_version("tiny-llama-int4", "2").run_id)
    assert strict.data.tags["llmopt.registration"] == ("new version: same content as version 1 (not uploaded again), "
                                                       "but this recipe's gates differ from that version's")
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    store = ["--mlruns", str(registered["mlruns"])]
    assert main(["pull", "tiny-llama-int4@production", "--dest", str(dest), *store]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err and (dest / "keep.txt").is_file()
    assert main(["pull", "tiny-llama-int4@production", "--dest", str(dest), "--overwrite", *store]) == 0
    assert not (dest / "keep.txt").exists() and (dest / registry.CARD).is_file()


def test_promote_rechecks_gates_and_records_a_forced_move(registered, capsys):
    store = ["--mlruns", str(registered["mlruns"])]
    client = _client(registered)
    assert main(["promote", "tiny-llama-int4", "2", "--alias", "staging", *store]) == 1
    assert "fails its gates" in capsys.readouterr().out
    assert "staging" not in client.get_registered_model("tiny-llama-int4").aliases
    assert main(["promote", "tiny-llama-int4", "1", "--alias", "staging", *store]) == 0
    assert client.get_registered_model("tiny-llama-int4").aliases["staging"] == 1
    assert main(["promote", "tiny-llama-int4", "2", "--alias", "staging", "--force", "--reason", "demo", *store]) == 0
    assert client.get_registered_model("tiny-llama-int4").aliases["staging"] == 2
    forced = json.loads(client.get_model_version("tiny-llama-int4", "2").tags["llmopt.forced_promotion"])
    assert forced["reason"] == "demo" and forced["alias"] == "staging" and forced["failed_gates"]


def test_compare_table_and_pareto_plot(registered, tmp_path, capsys):
    assert main(["compare", "tiny-int4", "tiny-int4-strict", "--out", str(tmp_path / "c"), "--mlruns",
                 str(registered["mlruns"])]) == 0
    table = (tmp_path / "c" / "compare.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| tiny-int4")]
    assert len(rows) == 2 and "TPOT ms" in table[0] and "weights GB" in table[0]
    assert (tmp_path / "c" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", "no-such-recipe", "--mlruns", str(registered["mlruns"])]) == 2


def test_pareto_front():
    from llmopt.compare import pareto_front

    # (latency, quality): b beats c on both; a is fastest; d is best quality
    assert pareto_front([(1.0, 0.90), (2.0, 0.95), (3.0, 0.94), (4.0, 0.99)]) == [0, 1, 3]


def test_every_metric_a_run_logs_is_known_before_it_runs(registered):
    """The validation list of metric names matches what tiny-int4's stages really log."""
    client = _client(registered)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("tiny-int4").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    names, prefixes = registry.known_metrics(load_recipe(RECIPES / "tiny-int4.yaml"))
    logged = {k for k in parent.data.metrics if not k.startswith("time/")}
    assert logged and logged <= names, sorted(logged - names)


@pytest.mark.parametrize(("promote", "words"), [
    ('  model_name: m\n  gates: ["quality/tiny_sums/acc_recovry >= 0.9"]\n',
     "no stage of this recipe logs 'quality/tiny_sums/acc_recovry'; did you mean 'quality/tiny_sums/acc_recovery'?"),
    ('  model_name: m\n  gates: ["bench/tpot_ms/bs8 <= 0.8 * base"]\n', "no stage of this recipe logs 'bench/tpot_ms/bs8'"),
    ('  model_name: m\n  gates: ["quality/ppl less than 3"]\n', "write `metric >= number`"),
    ("  model_name: m\n  alias: prod/uction\n", "promote.alias: alias 'prod/uction'"),
    ("  model_name: m\n  alias: candidate\n", "is what a version that fails its gates gets"),
])
def test_bad_promote_block_exit_2_nothing_written(promote, words, workdir, tmp_path, capsys):
    text = (RECIPES / "tiny-int4.yaml").read_text().replace("../eval", str(RECIPES.parent / "eval"))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text[:text.index("promote:")] + "promote:\n" + promote)
    assert run_cli(workdir, "run", str(recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(recipe) in err and words in err, err
    assert "(known: " in err or "alias" in err or "write" in err
    assert not workdir["mlruns"].exists() and not workdir["cache"].exists()


def test_p50_names_the_median():
    assert registry.Gate.parse("bench/tpot_ms_p50/bs1 <= 0.8 * base").metric == "bench/tpot_ms/bs1"


# --- concurrent promotions ---------------------------------------------------------------------------


def _promote_in_process(mlruns: str, artifact: str, tag: str, go) -> None:
    from llmopt.recipe import Promote
    from llmopt.tracking import Tracker

    tracker = Tracker(Path(mlruns))
    experiment = tracker.experiment("concurrent")
    with tracker.run(experiment, f"run-{tag}", {"llmopt.recipe": "concurrent"}) as run_id:
        tracker.log(run_id, metrics={"quality/ppl_delta_pct": 0.5})
        go.wait()
        promote = Promote(model_name="shared", alias="production", gates=["quality/ppl_delta_pct <= 1"])
        registry.register(tracker, promote, run_id, Path(artifact), {"quality/ppl_delta_pct": 0.5}, f"card {tag}",
                          {"llmopt.recipe": tag}, registry.content_digest(Path(artifact)))


def test_a_registry_write_that_lost_a_race_is_tried_again_and_other_errors_are_not(monkeypatch):
    """Two promotions at once: MLflow reads, then inserts, so the second insert of an alias (or a version
    number) fails its UNIQUE constraint (seen in CI: `registered_model_aliases`); tried again, it reads
    the first writer's row. A lock is retried too; any other error is raised at once."""
    from llmopt.registry import store
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    failures = [MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.workspace, "
                                "registered_model_aliases.name, registered_model_aliases.alias"),
                MlflowException("(sqlite3.OperationalError) database is locked")]
    calls = []

    def write():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "done"

    assert store._retry(write) == "done" and len(calls) == 3

    def missing():
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no model")

    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        store._retry(missing)
    assert len(calls) == 4, "not retried"


def test_two_concurrent_promotions_leave_a_consistent_state(tmp_path):
    mlruns = tmp_path / "mlruns"
    from llmopt.tracking import Tracker

    Tracker(mlruns).experiment("concurrent")  # the store exists before both writers start
    artifacts = []
    for tag in ("a", "b"):
        folder = tmp_path / tag
        folder.mkdir()
        (folder / "weights.bin").write_bytes(os.urandom(4096))
        artifacts.append(folder)
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    workers = [ctx.Process(target=_promote_in_process, args=(str(mlruns), str(a), a.name, go)) for a in artifacts]
    for w in workers:
        w.start()
    time.sleep(3)
    go.set()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    client = mlflow.MlflowClient(f"sqlite:///{mlruns / 'mlflow.db'}")
    versions = {str(v.version): v for v in client.search_model_versions("name = 'shared'")}
    assert sorted(versions) == ["1", "2"]
    assert str(client.get_registered_model("shared").aliases["production"]) in versions
    for version in versions.values():  # each version's package is complete and its own
        local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / f"dl{version.version}"),
                                                         tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}"))
        assert registry.verify_package(local) == []
        assert (local / registry.CARD).read_text() == f"card {version.tags['llmopt.recipe']}"


# --- a real tracking server -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """`mlflow server` with artifact proxying on a free port, stopped by its process group's PID."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as server_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=server_log, start_new_session=True)
        try:
            for _ in range(120):
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            else:
                raise AssertionError("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            yield uri
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


def test_everything_against_a_real_tracking_server(server, tiny_int4_workdir, tmp_path, monkeypatch, capsys):
    tiny_workdir = tiny_int4_workdir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    recipe = _recipe(tmp_path, "tiny-int4-remote", '    - "quality/ppl_delta_pct <= 2.0"\n')
    cache = ["--cache-dir", str(tiny_workdir["cache"]), "--no-progress"]
    assert main(["run", str(recipe), *cache]) == 0
    client = mlflow.MlflowClient(server)
    assert {k: str(v) for k, v in client.get_registered_model("tiny-llama-int4").aliases.items()} == {"production": "1"}
    version = client.get_model_version("tiny-llama-int4", "1")
    assert version.source.startswith("mlflow-artifacts:"), "artifacts go through the server's proxy"
    assert not (tiny_workdir["mlruns"]).exists(), "nothing went to a local store"
    assert main(["pull", "tiny-llama-int4@production", "--dest", str(tmp_path / "pulled")]) == 0
    assert registry.verify_package(tmp_path / "pulled") == []
    stages = client.search_runs([client.get_experiment_by_name("tiny-int4-remote").experiment_id],
                                "tags.`llmopt.stage` = 'evaluate'")
    assert stages and stages[0].data.metrics["quality/ppl"] > 1


def test_an_unreachable_server_is_a_clear_error_before_any_work(tiny_workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    recipe = _recipe(tmp_path, "tiny-int4-offline", '    - "quality/ppl_delta_pct <= 2.0"\n')
    before = sorted(p.name for p in tiny_workdir["cache"].iterdir())
    assert main(["run", str(recipe), "--cache-dir", str(tiny_workdir["cache"]), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "MLflow tracking server http://127.0.0.1:" in err and "is unreachable" in err and err.count("\n") == 0
    assert sorted(p.name for p in tiny_workdir["cache"].iterdir()) == before, "nothing computed"
    assert main(["pull", "tiny-llama-int4@production", "--dest", str(tmp_path / "x")]) == 2
