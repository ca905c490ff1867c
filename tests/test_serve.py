"""runtime: server (llmopt.eval.runtimes.server, llmopt.serve): the shipped tiny Llama through
`transformers serve` and GuideLLM at 2 load points on CPU (the mechanics: the figures mean nothing
on a CPU), the SLA headline, and the bad input: refused at validation (exit 2, nothing written) or
an exit 1 naming the server log, never a process left behind.

The failing servers here are small Python commands (labelled as such): they test llmopt's process
handling, not any real server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import RECIPES, run_cli
from llmopt.eval.runtimes.server import Server, ServerError, headline, meets

HEAD = "name: serve-bad\nmodel: {embedded: tiny-llama}\ndevice: cpu\nstages:\n  - stage: benchmark\n    runtime: server\n"
LOAD = "    load: {points: [1], requests: 2}\n    input_tokens: 8\n    output_tokens: 4\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is not serving anything
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _serve_processes(name: str = "llmopt.serve") -> list[str]:
    found = subprocess.run(["pgrep", "-af", name], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


def _benchmark_run(workdir: dict[str, Path], experiment: str):
    """The MLflow client of a run's store and the run's one benchmark-stage run."""
    client = mlflow.MlflowClient(f"sqlite:///{workdir['mlruns'] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                "tags.`llmopt.stage` = 'benchmark'")
    return client, run


def test_tiny_model_served_under_load_candidate_beside_base(tiny_workdir):
    """tiny-serve: RTN 4-bit (on int4pack) and its base, each behind `transformers serve` with continuous
    batching, 12 requests at 1 and 4 concurrent streams; forced output lengths, percentiles in order,
    KV-cache figures, the SLA headline, the raw GuideLLM output in MLflow, no server left."""
    assert run_cli(tiny_workdir, "run", str(RECIPES / "tiny-serve.yaml")) == 0
    client, run = _benchmark_run(tiny_workdir, "tiny-serve")
    m = run.data.metrics
    for suffix in ("", "_base"):
        for point in ("c1", "c4"):
            assert m[f"serve/requests/{point}{suffix}"] == 12 and m[f"serve/errors/{point}{suffix}"] == 0
            # 16 output tokens per request (ignore_eos honoured by llmopt's host of transformers serve)
            tokens_per_request = m[f"serve/output_tok_s/{point}{suffix}"] / m[f"serve/requests_s/{point}{suffix}"]
            assert tokens_per_request == pytest.approx(16, rel=1e-6)
            for latency in ("ttft_ms", "itl_ms", "e2e_ms"):
                p50, p90, p99 = (m[f"serve/{latency}_{p}/{point}{suffix}"] for p in ("p50", "p90", "p99"))
                assert 0 < p50 <= p90 <= p99
            assert m[f"serve/e2e_ms_p50/{point}{suffix}"] > m[f"serve/ttft_ms_p50/{point}{suffix}"]
            # a trained model's tokens decode to text: streamed one by one, so TTFT and ITL are per token
            assert m[f"serve/tokens_per_chunk/{point}{suffix}"] <= 1.5
            # llmopt.serve reports its CUDA graph captures (none on CPU), so one warm-up round was enough
            assert (m[f"serve/graph_captures/{point}{suffix}"], m[f"serve/warmup_rounds/{point}{suffix}"]) == (0, 1)
            assert m[f"serve/graph_capture_s/{point}{suffix}"] == 0
        assert (m[f"serve/graphs_captured{suffix}"], m[f"serve/graph_capture_s{suffix}"]) == (0, 0)
        assert m[f"serve/kv_blocks{suffix}"] > 0 and 1 <= m[f"serve/kv_blocks_used_peak{suffix}"] <= m[f"serve/kv_blocks{suffix}"]
        # the headline is the highest load meeting the SLA (both do here: the bounds are loose on purpose)
        assert m[f"serve/load_at_sla{suffix}"] == 4
        assert m[f"serve/tok_s_at_sla{suffix}"] == m[f"serve/output_tok_s/c4{suffix}"]
        assert m[f"serve/usd_per_1m_output_tokens_at_sla{suffix}"] == pytest.approx(
            2.5 / 3600 / m[f"serve/tok_s_at_sla{suffix}"] * 1e6)
    assert run.data.tags["env.kernel"] == "int4pack"  # the candidate served on its fast kernel
    # the recipe's batching settings, as each server's batching manager resolved them (candidate and base)
    reports = [json.loads(r.read_text()) for r in tiny_workdir["cache"].glob("stages/*/report.json")]
    batching = [r["server_stats"]["batching"] for r in reports if "server_stats" in r]
    assert len(batching) == 2
    for resolved in batching:
        assert (resolved["max_requests_per_batch"], resolved["kv_padding_interval_size"]) == (4, 512), resolved
        assert resolved["use_cuda_graph"] == [False, False]  # no CUDA here: graphs are off whatever the recipe says
        # the buffers the recipe left unset, sized to its load (tune_batching): 4 streams of up to 32+4x4
        # prompt and 16 output tokens take a block of 256 each, plus a quarter spare; 512 tokens a step
        assert (resolved["num_blocks"], resolved["max_batch_tokens"]) == (5, 512), resolved
    # warm-up before each point: its concurrency (warmup: 1) in requests of the same workload, apart from the timed files
    from llmopt.eval.runtimes.server import read_point

    for point, streams in (("c1", 2), ("c4", 4)):  # at least 2 (WARMUP_MIN_REQUESTS)
        found = sorted(tiny_workdir["cache"].glob(f"stages/*/load/warmup/{point}.json"))
        assert len(found) == 2, found  # the candidate's and the base's
        for warm in found:
            raw = json.loads(warm.read_text())
            assert raw["benchmarks"][0]["config"]["constraints"]["max_requests"]["args"]["count"] == streams
            # GuideLLM 0.8.1 may lose a run's last completion from its figures (server.lost_requests)
            assert streams - 1 <= read_point(raw)["requests"] <= streams and read_point(raw)["errors"] == 0
    assert m["serve/warmup_s"] > 0 and m["serve/warmup_s_base"] > 0
    # RTN is stored dequantized (as big as its base on disk); served, int4pack holds its linear layers in 4 bits
    assert m["memory/weights_gb"] == pytest.approx(m["memory/weights_gb_base"], rel=0.01)
    assert m["serve/weights_gb_in_memory"] < 0.6 * m["serve/weights_gb_in_memory_base"]
    logged = {a.path for role in ("candidate", "base") for a in client.list_artifacts(run.info.run_id, f"{role}/load")}
    assert logged == {f"{role}/load/{p}.json" for role in ("candidate", "base") for p in ("c1", "c4")}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/throughput_vs_p99_latency.png"}
    assert not _serve_processes() and not _serve_processes("llmopt.eval.runtimes.loadgen")
    (log_file,) = (tiny_workdir["cache"] / "logs").glob("*-tiny-serve.log")
    said = [line for line in log_file.read_text().splitlines() if " load c4: " in line]
    assert len(said) == 2 and f"{m['serve/output_tok_s/c4']:.1f} output tok/s, 12 requests" in said[0], said
    # promoted on the serving gates; the model card carries the table under load
    from llmopt import registry
    from llmopt.cli import main

    assert main(["pull", "tiny-llama-rtn4-served@production", "--dest", str(tiny_workdir["tmp"] / "p"), "--mlruns",
                 str(tiny_workdir["mlruns"])]) == 0
    card = (tiny_workdir["tmp"] / "p" / registry.CARD).read_text().splitlines()
    assert "## Under serving load (`runtime: server`): optimized (base)" in card
    row = next(line for line in card if line.startswith("| c4 |"))
    assert f"{m['serve/output_tok_s/c4']:.4g} ({m['serve/output_tok_s/c4_base']:.4g})" in row


def test_the_headline_is_the_highest_load_that_meets_the_sla():
    def row(tok_s, ttft, errors=0.0, requests=10.0):
        return {"output_tok_s": tok_s, "requests_s": tok_s / 100, "ttft_ms_p99": ttft, "itl_ms_p99": 10.0,
                "requests": requests, "error_rate": errors / (requests + errors) if requests + errors else 1.0}

    sla = {"p99_ttft_ms": 500}
    points = [(1, row(100, 50)), (4, row(350, 300)), (16, row(900, 800)), (8, row(600, 450, errors=1))]
    assert not meets(points[3][1], sla), "errors fail a point unless the SLA allows an error rate"
    assert meets(points[3][1], {**sla, "error_rate": 0.1})
    best = headline(points, sla, 2.0)
    assert (best["load_at_sla"], best["tok_s_at_sla"], best["points_meeting_sla"]) == (4, 350, 2)
    assert best["usd_per_1m_output_tokens_at_sla"] == pytest.approx(2.0 / 3600 / 350 * 1e6)
    nothing = headline([(1, row(0, 0, requests=0))], sla, 2.0)
    assert nothing["tok_s_at_sla"] == 0 and nothing["load_at_sla"] == 0 and "usd_per_1m_output_tokens_at_sla" not in nothing


def _free_port_held():
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


ENGINE = """name: tiny-engine
model: {embedded: tiny-llama}
device: cpu
stages:
  - stage: quantize
    method: rtn
    bits: 4
    group_size: 32
  - stage: benchmark
    runtime: server
    kernel: int4pack
    input_tokens: {mean: 32, stdev: 4}
    output_tokens: 16
    warmup: 1
    load: {profile: concurrent, points: [1, 3], requests: 9}
    sla: {p99_ttft_ms: 5000, p99_itl_ms: 1000}
    server: {engine: llmopt, dense_prefill_tokens: 48}
"""


def test_engine_llmopt_serves_candidate_and_base_under_the_same_load(tiny_workdir, tmp_path):
    """server: {engine: llmopt}: llmopt's own continuous batching (rows of a static cache) behind the same
    API, load generator and figures: every request completes with its 16 tokens, streamed one a chunk;
    the rows (the sweep's 3 streams) are reported as the KV cache, and nothing is captured while serving.
    With dense_prefill_tokens, the candidate's server runs its long prefills dense (its kernel tag says so)."""
    recipe = tmp_path / "engine.yaml"
    recipe.write_text(ENGINE)
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    _, run = _benchmark_run(tiny_workdir, "tiny-engine")
    m = run.data.metrics
    for suffix in ("", "_base"):
        for point in ("c1", "c3"):
            assert m[f"serve/requests/{point}{suffix}"] == 9 and m[f"serve/errors/{point}{suffix}"] == 0
            tokens_per_request = m[f"serve/output_tok_s/{point}{suffix}"] / m[f"serve/requests_s/{point}{suffix}"]
            assert tokens_per_request == pytest.approx(16, rel=1e-6)
            assert m[f"serve/tokens_per_chunk/{point}{suffix}"] <= 1.5
            assert m[f"serve/graph_captures/{point}{suffix}"] == 0
        # one request at a time: each of the 9 makes its first token in its prefill, then 15 decode steps;
        # 3 at a time share steps. Prompts (32 +- 4 tokens and BOS) pad to 32 or 64: some padding, less than a
        # 33-token prompt's 64/33
        assert m[f"serve/decode_steps/c1{suffix}"] == 9 * 15 and 45 <= m[f"serve/decode_steps/c3{suffix}"] < 9 * 15
        assert 1.0 < m[f"serve/prefill_padding/c1{suffix}"] < 64 / 33 and m[f"serve/idle_ms_between_steps/c3{suffix}"] > 0
        # the engine's time in decode steps and in prefills, within the point's: one loop runs them one after another
        for point, requests in (("c1", 9), ("c3", 9)):
            steps_s = m[f"serve/decode_step_ms/{point}{suffix}"] * m[f"serve/decode_steps/{point}{suffix}"] / 1000
            prefill_s = m[f"serve/prefill_s/{point}{suffix}"]
            assert steps_s > 0 and prefill_s > 0
            assert steps_s + prefill_s < requests / m[f"serve/requests_s/{point}{suffix}"]
        assert m[f"serve/prefill_ms_per_1k_tokens/c1{suffix}"] > 0
        # 3 rows of 64 prompt (32 + 4 x 4, plus BOS, padded to 32) + 16 output tokens, in whole blocks of 64
        # keys: 128; all 3 in use at c3
        assert (m[f"serve/kv_blocks{suffix}"], m[f"serve/kv_block_size{suffix}"]) == (3, 128)
        assert m[f"serve/kv_blocks_used_peak{suffix}"] == 3
    assert m["serve/weights_gb_in_memory"] < 0.6 * m["serve/weights_gb_in_memory_base"], "served on int4pack"
    reports = [json.loads(r.read_text()) for r in tiny_workdir["cache"].glob("stages/*/report.json")]
    engines = [r["server_stats"]["engine"] for r in reports if "server_stats" in r]
    assert len(engines) == 2 and all(e["name"] == "llmopt" and e["slots"] == 3 for e in engines), engines
    # prefills of 48 rows or more (a 64-wide prompt) ran the candidate's int4 weights dense; the bf16 base has none
    kernels = sorted(r["server_stats"]["kernel"] for r in reports if "server_stats" in r)
    assert kernels[0].startswith("int4pack (products of 48+ rows dense") and kernels[1].startswith("none"), kernels
    assert not _serve_processes() and not _serve_processes("llmopt.eval.runtimes.loadgen")
    # dense_prefill_tokens reaches quantized layers only, and the base runs without it: the same sweep without it
    # serves the candidate anew and finds the base's measurement in the cache (one new report, the same figures)
    without = tmp_path / "engine-without.yaml"
    without.write_text(ENGINE.replace("name: tiny-engine", "name: tiny-engine-without").replace(", dense_prefill_tokens: 48", ""))
    assert run_cli(tiny_workdir, "run", str(without)) == 0
    _, again = _benchmark_run(tiny_workdir, "tiny-engine-without")
    assert again.data.metrics["serve/output_tok_s/c3_base"] == m["serve/output_tok_s/c3_base"]
    served = [json.loads(r.read_text()) for r in tiny_workdir["cache"].glob("stages/*/report.json")]
    tags = [r["server_stats"]["kernel"] for r in served if "server_stats" in r]
    assert len(served) == len(reports) + 1 and len(tags) == 3, tags
    assert sum(t.startswith("int4pack") and "dense" not in t for t in tags) == 1, tags


BAD = {
    "unknown SLA metric": (LOAD + "    sla: {p99_ttft: 500}\n", "stages[0]",
                           "sla: unknown metric 'p99_ttft'; did you mean 'p99_ttft_ms'?"),
    "no load": ("", "stages[0]", "load: runtime: server needs a load sweep"),
    "static batches": (LOAD + "    batch_sizes: [1, 8]\n", "stages[0]", "batch_sizes: static-batch settings mean nothing"),
    "SLA on another runtime": (None, "stages[0]", "sla: for runtime: server only"),
    "command not on PATH": (LOAD + "    server: {command: [no-such-server-xyz, --port, '{port}']}\n", "stages[0].server.command",
                            "'no-such-server-xyz' is not on this machine's PATH"),
    "port in use": (LOAD + "    server: {port: PORT}\n", "stages[0].server.port", "is already in use"),
    "tuning another server": (LOAD + "    server: {command: [python3], compile: true}\n", "stages[0]",
                              "compile: transformers serve options, and `command` runs another server"),
    "compile under continuous batching": (LOAD + "    server: {compile: true}\n", "stages[0]",
                                          "compile: transformers serve's compile (a static cache) does not apply"),
    "buffer sizing for another server": (LOAD + "    server: {command: [python3], tune_batching: false}\n",
                                         "stages[0]", "tune_batching: transformers serve options"),
    "batching options for another server": (LOAD + "    server: {command: [python3], cb_use_async_batching: true}\n",
                                            "stages[0]", "cb_use_async_batching: transformers serve options"),
    "compile level out of range": (LOAD + "    server: {cb_default_compile_level: 4}\n",
                                   "stages[0].server.cb_default_compile_level", "less than or equal to 3"),
    "transformers serve options for engine llmopt": (LOAD + "    server: {engine: llmopt, cb_use_cuda_graph: true}\n",
                                                     "stages[0]", "cb_use_cuda_graph: transformers serve options, and "
                                                                  "engine: llmopt is llmopt's own server"),
    "slots for transformers serve": (LOAD + "    server: {slots: 8}\n", "stages[0]", "slots: an engine: llmopt setting"),
    "engine llmopt at a request rate without slots": (
        "    load: {profile: poisson, points: [2], requests: 4}\n    server: {engine: llmopt}\n", "stages[0]",
        "server.slots: engine llmopt reserves a row of its cache per request served at once; a poisson rate"),
    "dense prefill for transformers serve": (LOAD + "    server: {dense_prefill_tokens: 512}\n", "stages[0]",
                                             "dense_prefill_tokens: an engine: llmopt setting"),
    "dense prefill within the decode steps' rows": (
        LOAD + "    server: {engine: llmopt, dense_prefill_tokens: 1}\n", "stages[0]",
        "server.dense_prefill_tokens: 1 must exceed the engine's 1 rows"),
    "dense prefill within the slots": (LOAD + "    server: {engine: llmopt, slots: 8, dense_prefill_tokens: 8}\n",
                                       "stages[0]", "dense_prefill_tokens: 8 must exceed slots (8)"),
    "dense prefill neither a row count nor auto": (LOAD + "    server: {engine: llmopt, dense_prefill_tokens: fast}\n",
                                                   "stages[0].server.dense_prefill_tokens", "'auto'"),
    "cb options without continuous batching": (LOAD + "    server: {continuous_batching: false, cb_use_cuda_graph: true}\n",
                                               "stages[0]", "cb_use_cuda_graph: continuous-batching options"),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=str)
def test_bad_server_input_exit_2_nothing_written(case, workdir, tmp_path, capsys):
    body, field, words = BAD[case]
    held = _free_port_held()
    try:
        text = (HEAD + body.replace("PORT", str(held.getsockname()[1])) if body is not None else
                HEAD.replace("runtime: server", "runtime: transformers-eager") + "    sla: {p99_ttft_ms: 5}\n")
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(text)
        assert run_cli(workdir, "run", str(recipe)) == 2
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err and words in err and str(recipe) in err, err
    assert not workdir["mlruns"].exists() and not workdir["cache"].exists()


def _fake_server(tmp_path: Path, body: str) -> list[str]:
    """A stand-in server (not a real one): a Python command that records its pid, then does `body`."""
    script = tmp_path / "fake_server.py"
    script.write_text(f"import os, sys, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n{body}\n")
    return [sys.executable, str(script)]


@pytest.mark.parametrize("case", ["exits", "never healthy"])
def test_a_server_that_cannot_serve_exit_1_names_its_log_and_leaves_nothing(case, tiny_workdir, tmp_path, capsys):
    body = "print('fake server: bad flag --xyz', flush=True); sys.exit(3)" if case == "exits" else "time.sleep(600)"
    command = ", ".join(f"'{part}'" for part in _fake_server(tmp_path, body))
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(HEAD + LOAD + f"    server: {{command: [{command}], startup_timeout_s: 3}}\n")
    assert run_cli(tiny_workdir, "run", str(recipe)) == 1
    err = capsys.readouterr().err
    words = ("exited with code 3 before its health check passed: fake server: bad flag --xyz" if case == "exits"
             else "health check (http://127.0.0.1:")
    assert words in err and "server log: " in err and "server.log" in err, err
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_a_server_that_fails_every_request_exit_1_with_its_error(tiny_workdir, tmp_path, capsys):
    """A stand-in server (not a real one) that is healthy but answers every completion with HTTP 500:
    the warm-up finds it, the error names GuideLLM's message and the server log, no process is left."""
    body = ("import http.server\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
            "    def do_POST(self):\n"
            "        self.send_response(500); self.end_headers(); self.wfile.write(b'{\"error\": \"fake: out of blocks\"}')\n"
            "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()")
    command = ", ".join(f"'{part}'" for part in _fake_server(tmp_path, body))
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(HEAD + LOAD + f"    warmup: 1\n    server: {{command: [{command}, '{{port}}'], startup_timeout_s: 30}}\n")
    assert run_cli(tiny_workdir, "run", str(recipe)) == 1
    err = capsys.readouterr().err
    assert "every warm-up request at c1 failed: " in err and "500" in err and "server log: " in err, err
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_ctrl_c_stops_the_server(tmp_path):
    """SIGINT to `llmopt run` while its server starts: the server's process group is stopped too."""
    command = ", ".join(f"'{part}'" for part in _fake_server(tmp_path, "time.sleep(600)"))
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(HEAD + LOAD + f"    server: {{command: [{command}], startup_timeout_s: 300}}\n")
    # as from a terminal: SIGINT at its default even where this test runs with SIGINT ignored (a job
    # started with `&` by a shell without job control inherits SIG_IGN, and Python then keeps ignoring it)
    run = subprocess.Popen([sys.executable, "-m", "llmopt.cli", "run", str(recipe), "--cache-dir", str(tmp_path / "cache"),
                            "--mlruns", str(tmp_path / "mlruns"), "--no-progress"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    server_pid = int((tmp_path / "pid").read_text())
    run.send_signal(signal.SIGINT)
    assert run.wait(60) != 0
    assert not _alive(server_pid)


def test_server_class_refuses_a_port_in_use_and_stops_by_process_group(tmp_path):
    held = _free_port_held()
    port = held.getsockname()[1]
    try:
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            Server(["true"], "127.0.0.1", port, tmp_path / "server.log", "/health", 5).__enter__()
    finally:
        held.close()
    # a healthy stand-in that starts a child of its own: stopping the server stops its whole group
    script = tmp_path / "healthy.py"
    script.write_text(
        "import http.server, os, subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(tmp_path / 'child')!r}, 'w').write(str(child.pid))\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
        f"http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    from llmopt.eval.runtimes.server import free_port

    port = free_port("127.0.0.1")
    with Server([sys.executable, str(script), str(port)], "127.0.0.1", port, tmp_path / "server.log", "/health", 30) as s:
        pid, child = s.process.pid, int((tmp_path / "child").read_text())
        assert s.get("/llmopt/stats") == {} and s.startup_s > 0
    assert not _alive(pid) and not _alive(child)


def test_stopping_a_group_outlasts_its_leader_and_kills_a_child_that_ignores_sigterm(tmp_path):
    """The leader exits on SIGTERM at once; its child ignores SIGTERM: stop_group returns only once
    the child is gone too (SIGKILL after the grace), not when the leader has exited."""
    from llmopt.eval.runtimes.server import group_running, stop_group

    script = tmp_path / "leader.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, sys, time; signal.signal(signal.SIGTERM, "
        "signal.SIG_IGN); open(sys.argv[1], \"w\").write(\"ready\"); time.sleep(600)', sys.argv[1]])\n"
        "time.sleep(600)\n")
    ready = tmp_path / "ready"
    leader = subprocess.Popen([sys.executable, str(script), str(ready)], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat") if p.parent.name != str(leader.pid)
                    and _group_of(p) == leader.pid]
        assert group_running(leader.pid) and _alive(child)
        stop_group(leader, 1.0)
        assert leader.poll() is not None and not _alive(child) and not group_running(leader.pid)
    finally:  # nothing left behind by a failure either
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)


def _group_of(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rpartition(")")[2].split()[2])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.parametrize("gate, code", [("serve/tok_s_at_sla >= 1.5 * base", 0), ("serve/output_tok_s/c1 >= 1.0 * base", 0),
                                        ("serve/tok_s_at_slaa >= 1.5 * base", 2), ("serve/output_tok_s/c2 >= 1.0 * base", 2)])
def test_promotion_gates_on_serving_metrics(gate, code, tmp_path, capsys):
    from llmopt.cli import main

    recipe = tmp_path / "gated.yaml"
    recipe.write_text(HEAD + LOAD + f"promote:\n  model_name: tiny-served\n  gates: [\"{gate}\"]\n")
    assert main(["validate", str(recipe)]) == code
    if code:
        err = capsys.readouterr().err
        assert "promote.gates" in err and "no stage of this recipe logs" in err, err


def test_compiled_serves_the_bundles_own_command_on_our_port(tmp_path):
    """`server: {command: compiled}`: the compile stage's trtllm-serve line (manifest.json), moved to
    llmopt's host and port; the base model (an HF checkpoint) through trtllm-serve's PyTorch backend.
    Command lines only: TensorRT-LLM is not installed here."""
    from llmopt.eval.runtimes.server import compiled_serve_command

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(
        '{"commands": {"serve": ["trtllm-serve", "checkpoint", "--host", "0.0.0.0", "--port", "8000", "--backend", "pytorch"]}}')
    assert compiled_serve_command(bundle, "127.0.0.1", 4321) == ["trtllm-serve", "checkpoint", "--host", "127.0.0.1",
                                                                 "--port", "4321", "--backend", "pytorch"]
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    assert compiled_serve_command(base, "127.0.0.1", 4321)[:4] == ["trtllm-serve", str(base), "--backend", "pytorch"]
    with pytest.raises(ServerError, match="needs a compile stage's bundle with a serve command"):
        compiled_serve_command(tmp_path, "127.0.0.1", 4321)


@pytest.mark.parametrize("stages, field, words", [
    ("", "stages[0].server.command", "no compile stage comes before"),
    ("  - stage: compile\n    target: trtllm\n    gpu: H100\n    max_input_len: 256\n    max_seq_len: 512\n",
     "stages[1].server.command", "trtllm-serve, which is not on"),
])
def test_compiled_needs_a_compile_stage_and_trtllm_serve(stages, field, words, workdir, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    body = HEAD.replace("  - stage: benchmark\n", stages + "  - stage: benchmark\n")
    recipe.write_text(body + LOAD + "    server: {command: compiled}\n")
    assert run_cli(workdir, "run", str(recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err and words in err, err
    assert not workdir["mlruns"].exists() and not workdir["cache"].exists()


def test_a_point_counts_cancelled_requests_apart_from_errors():
    """GuideLLM cancels the requests still running when a point's duration ends (`incomplete`): they are
    not the server's errors; the tokens they streamed inside the window count in the output rate."""
    from llmopt.eval.runtimes.server import read_point

    percentiles = {"successful": {"percentiles": {"p50": 1.0, "p90": 2.0, "p99": 3.0}}}
    raw = {"benchmarks": [{
        "scheduler_metrics": {"requests_made": {"successful": 6, "errored": 2, "incomplete": 4},
                              "measure_start_time": 100.0, "measure_end_time": 110.0},
        "metrics": {"output_token_count": {"successful": {"total_sum": 600}, "incomplete": {"total_sum": 40}},
                    "request_concurrency": {"successful": {"mean": 4.0}},
                    "time_to_first_token_ms": percentiles, "inter_token_latency_ms": percentiles,
                    "request_latency": percentiles}}]}
    row = read_point(raw)
    assert (row["requests"], row["errors"], row["incomplete"]) == (6, 2, 4)
    assert row["error_rate"] == pytest.approx(2 / 8)
    assert row["requests_s"] == pytest.approx(0.6) and row["output_tok_s"] == pytest.approx(64)
    assert row["e2e_ms_p99"] == pytest.approx(3000) and row["ttft_ms_p50"] == pytest.approx(1.0)
    assert "tokens_per_chunk" not in row  # a GuideLLM that does not count streamed chunks: nothing invented
    raw["benchmarks"][0]["metrics"]["output_tokens_per_iteration"] = {"successful": {"median": 51.0}}
    assert read_point(raw)["tokens_per_chunk"] == 51.0


@pytest.mark.parametrize("per_chunk, said", [(51.0, True), (1.0, False)])
def test_a_point_streamed_in_chunks_of_many_tokens_says_its_ttft_and_itl_are_per_chunk(per_chunk, said, caplog):
    """On an H200 a random-weight 7B (its tokenizer some 500 tokens, its vocabulary 32000) streamed 256 tokens in
    2-3 chunks: GuideLLM's TTFT waited for the first visible text and its ITL spread one chunk over 255 tokens."""
    import logging
    from types import SimpleNamespace

    from llmopt.eval.runtimes.server import finish_point

    row = {"requests": 8, "errors": 0, "incomplete": 0, "error": None, "output_tok_s": 500.0, "requests_s": 2.0,
           "error_rate": 0.0, "ttft_ms_p99": 100.0, "e2e_ms_p99": 3000.0, "tokens_per_chunk": per_chunk}
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        out = finish_point(dict(row), "c8", SimpleNamespace(gpu_hourly_usd=None, sla={"p99_ttft_ms": 500}))
    assert ("load c8: the server streamed 51.0 tokens per chunk (median), so TTFT and ITL time chunks" in caplog.text) is said
    # a TTFT bound cannot be checked on chunk timings: the point does not meet it; an e2e bound still can be
    assert out["meets_sla"] == (0.0 if said else 1.0)
    assert meets(row, {"p99_e2e_ms": 4000}) and not meets(row, {"p99_e2e_ms": 2000})


@pytest.mark.parametrize("completed", [2, 0])
def test_a_point_with_errors_and_a_short_window_is_reported_and_said(completed, caplog):
    """A point with failed requests, and one whose window cut off more requests than completed: cost
    and SLA verdict added, both said in the log (on an H200 this path crashed a 7B sweep), the error
    text kept out of the metrics."""
    import logging
    from types import SimpleNamespace

    from llmopt.eval.runtimes.server import finish_point

    cfg = SimpleNamespace(gpu_hourly_usd=3.6, sla={"p99_ttft_ms": 500})
    row = {"requests": completed, "errors": 1, "incomplete": 5, "error": "HTTP 500: boom", "output_tok_s": 250.0,
           "requests_s": 0.2, "error_rate": 1 / (completed + 1), "ttft_ms_p99": 100.0, "e2e_ms_p50": 4000.0 if completed else 0.0}
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        out = finish_point(row, "c8", cfg)
    assert "error" not in out and out["meets_sla"] == 0.0  # an error fails the point when the SLA allows none
    assert out["usd_per_1m_output_tokens"] == pytest.approx(3.6 / 3600 / 250 * 1e6)
    said = caplog.text
    assert "load c8: 1 requests failed; the first: HTTP 500: boom" in said
    assert f"5 requests were cut off at the end of the point and {completed} completed" in said
    assert ("e2e p50 4.0 s" if completed else "no request completed") in said


def test_a_points_graph_captures_are_counted_and_timed_between_two_snapshots(caplog):
    """What a timed window captured, from the server's cumulative count and seconds read before and
    after it; said with its seconds, which a reviewer weighs a missed TTFT bound against."""
    import logging
    from types import SimpleNamespace

    from llmopt.eval.runtimes.server import capture_snapshot, finish_point, graphs_captured, window_captures

    class Stats:
        def __init__(self, stats):
            self.stats = stats

        def get(self, path):
            assert path == "/llmopt/stats"
            return self.stats

    before = capture_snapshot(Stats({"graphs_captured": 40, "graph_capture_s": 6.25, "kv_blocks": 5}))
    after = capture_snapshot(Stats({"graphs_captured": 45, "graph_capture_s": 7.0}))
    assert (before, graphs_captured(Stats({"graphs_captured": 45}))) == ((40, 6.25), 45)
    counted = window_captures(before, after)
    assert counted == {"graph_captures": 5.0, "graph_capture_s": pytest.approx(0.75)}
    for silent in ({}, None, {"kv_blocks": 5}):  # a server that does not report captures (vllm, trtllm-serve)
        assert capture_snapshot(Stats(silent)) is None and graphs_captured(Stats(silent)) is None
    row = {"requests": 8, "errors": 0, "incomplete": 0, "error": None, "output_tok_s": 500.0, "requests_s": 2.0,
           "error_rate": 0.0, "ttft_ms_p99": 900.0, **counted}
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        finish_point(row, "c8", SimpleNamespace(gpu_hourly_usd=None, sla={"p99_ttft_ms": 500}))
    assert "load c8: the server captured 5 CUDA graphs (0.75 s) during the timed window" in caplog.text


def test_warm_up_runs_each_load_points_concurrency_on_prompts_of_its_own():
    from types import SimpleNamespace

    from llmopt.eval.runtimes.server import extra_warmup_seeds, point_seeds, warmup_requests

    cfg = SimpleNamespace(warmup=2, seed=7, load=SimpleNamespace(points=[1, 8, 64], warmup_max_rounds=5))
    assert [warmup_requests(cfg, v) for v in (1, 8, 64, 0.5, 2.5, 1000)] == [2, 16, 128, 2, 6, 512]
    # one round at one stream is still two requests (GuideLLM fails a one-request run whose completion it lost);
    # no warm-up is none
    assert [warmup_requests(SimpleNamespace(warmup=w), 1) for w in (1, 0)] == [2, 0]
    assert warmup_requests(SimpleNamespace(warmup=1), 3) == 3
    seeds = point_seeds(cfg)
    assert len(seeds) == 3 and len({s for pair in seeds for s in pair}) == 6, "every run draws prompts of its own"
    assert seeds[0][1] == 7, "the recipe's seed draws the first point's prompts"
    extra = [extra_warmup_seeds(cfg, i) for i in range(3)]
    assert all(len(e) == 3 for e in extra), "rounds 3 to 5 after the first run's 2"
    every = [s for pair in seeds for s in pair] + [s for e in extra for s in e]
    assert len(set(every)) == len(every) == 15, "the extra warm-up rounds draw prompts of their own too"


class _CapturingServer:
    """Stands in for a server that reports its CUDA graph captures (`graphs_captured`), or not (None)."""

    def __init__(self, per_run: list[int] | None):
        self.per_run, self.count, self.runs, self.log = per_run, 0, [], Path("server.log")

    def get(self, path):
        assert path == "/llmopt/stats"
        return {} if self.per_run is None else {"graphs_captured": self.count}

    def generate(self, cfg, server, generator, model_name, tokenizer, value, out, name, seed, requests=None):
        self.runs.append((name, seed, requests))
        if self.per_run is not None:
            self.count += self.per_run[len(self.runs) - 1]
        return {"requests": float(requests or 64), "error": None}


@pytest.mark.parametrize("per_run, warmup, rounds, warned", [
    ([3, 2, 0, 0], 1, 3, False),  # captures stop in the third round: no more
    ([5, 5, 5, 5], 1, 4, True),  # still capturing at warmup_max_rounds: stop there, and say so
    ([4, 0], 2, 3, False),  # warmup: 2 is one run of two rounds, then rounds of one
    ([0], 1, 1, False),  # nothing captured: the first run was enough
    (None, 1, 1, False),  # a server that does not report captures (vllm, trtllm-serve): warmup rounds only
])
def test_warm_up_runs_rounds_while_the_server_still_captures_cuda_graphs(per_run, warmup, rounds, warned, monkeypatch,
                                                                         caplog):
    from types import SimpleNamespace

    from llmopt.eval.runtimes import server as runtime

    cfg = SimpleNamespace(warmup=warmup, seed=0, load=SimpleNamespace(points=[8], warmup_max_rounds=4))
    fake = _CapturingServer(per_run)
    monkeypatch.setattr(runtime, "_generate", fake.generate)
    seeds = [100, *runtime.extra_warmup_seeds(cfg, 0)]
    with caplog.at_level("INFO", logger="llmopt"):
        assert runtime._warm_up(cfg, fake, None, "m", Path("."), 8, Path("."), "c8", seeds) == rounds
    names = ["warmup/c8"] + [f"warmup/c8-{warmup + k}" for k in range(1, len(fake.runs))]
    assert [r[0] for r in fake.runs] == names
    # the first run: `warmup` rounds of 8 streams; later runs: the point's own workload (None: its requests or
    # duration), whose steady state mixes prefill and decode in steps a burst of 8 does not make
    assert [r[2] for r in fake.runs] == [8 * warmup] + [None] * (len(fake.runs) - 1)
    assert [r[1] for r in fake.runs] == seeds[:len(fake.runs)]
    assert ("still captured 5 CUDA graphs after 4 rounds" in caplog.text) == warned


class _LosingLoadGenerator:
    """Stands in for GuideLLM runs whose figures lack `lost[i]` of the point's requests on run i (its
    shutdown race drops the last completion), beside a server with engine counters."""

    def __init__(self, lost: list[int], requests: int):
        self.lost, self.total, self.runs, self.steps = lost, requests, [], 0

    def get(self, path):
        assert path == "/llmopt/stats"
        return {"engine": {"steps": self.steps, "idle_s": 0.0, "idle_steps": 0, "prefill_tokens": 0,
                           "prefill_padded_tokens": 0, "decode_s": 0.0, "prefill_s": 0.0}}

    def generate(self, cfg, server, generator, model_name, tokenizer, value, out, name, seed, requests=None):
        kept = self.total - self.lost[len(self.runs)]
        self.runs.append((name, seed, requests))
        self.steps += 10 * len(self.runs)  # each run's decode steps: 10, then 20, then 30
        return {"requests": float(kept - 1), "errors": 1.0, "incomplete": 0.0, "output_tok_s": float(kept), "error": None}


@pytest.mark.parametrize("lost, runs, warned", [
    ([0], 1, ""),  # every request accounted for: one run
    ([1, 0], 2, "running the point again"),  # the tiny-serve CI failure (11 of 12): rerun, the second is whole
    ([1, 2, 1], 3, "kept after 3 runs"),  # still short after LOST_UPDATE_RETRIES reruns: kept, and said
])
def test_a_point_whose_figures_lost_a_request_runs_again_on_fresh_prompts(lost, runs, warned, monkeypatch, caplog):
    """GuideLLM 0.8.1 can lose a run's last completion (CI, 2026-12-06: the server logged 12 POSTs, the
    report 11): the point's window then has that request's time without its tokens. Counted requests,
    errors and cut-off requests short of load.requests rerun the point on prompts of its own; the
    figures kept (engine counters included) are the last run's."""
    from types import SimpleNamespace

    from llmopt.eval.runtimes import server as runtime

    cfg = SimpleNamespace(warmup=1, seed=0, load=SimpleNamespace(points=[1, 4], warmup_max_rounds=3, requests=12,
                                                                 duration_s=None))
    fake = _LosingLoadGenerator(lost, 12)
    monkeypatch.setattr(runtime, "_generate", fake.generate)
    seeds = [cfg.seed + 1, *runtime.retry_seeds(cfg, 1)]
    with caplog.at_level("WARNING", logger="llmopt"):
        row = runtime._timed_point(cfg, fake, None, "m", Path("."), 4, Path("."), "c4", seeds)
    assert [r[1] for r in fake.runs] == seeds[:runs] and all(r[2] is None for r in fake.runs)
    assert row["retries"] == runs - 1 and row["requests"] == 12 - lost[runs - 1] - 1
    assert row["decode_steps"] == 10 * runs, "the window is the kept run's alone"
    assert (warned in caplog.text) and (("lack" in caplog.text) == bool(warned))
    every = [s for pair in runtime.point_seeds(cfg) for s in pair] + runtime.extra_warmup_seeds(cfg, 0) \
        + runtime.extra_warmup_seeds(cfg, 1) + runtime.retry_seeds(cfg, 0) + runtime.retry_seeds(cfg, 1)
    assert len(set(every)) == len(every), "a rerun draws prompts no other run of the sweep sent"
    # a duration-bound point's count is the window's: nothing is lost there, nothing rerun
    for bound in ({"requests": None, "duration_s": 30.0}, {"requests": 12, "duration_s": 30.0}):
        assert runtime.lost_requests(SimpleNamespace(load=SimpleNamespace(**bound)),
                                     {"requests": 3.0, "errors": 0.0, "incomplete": 1.0}) == 0


@pytest.mark.parametrize("streams, reported, errors, fails", [
    (1, 1, 0, False),  # two sent at one stream (WARMUP_MIN_REQUESTS), one in GuideLLM's figures: its lost last completion
    (1, 0, 2, True),  # both failed
    (1, 0, 0, True),  # two sent and none reported: more than a lost last completion
    (4, 0, 0, True),  # four sent and none reported
])
def test_a_warm_up_fails_only_when_its_requests_did(streams, reported, errors, fails, monkeypatch):
    from types import SimpleNamespace

    from llmopt.eval.runtimes import server as runtime

    cfg = SimpleNamespace(warmup=1, seed=0, load=SimpleNamespace(points=[streams], warmup_max_rounds=1))
    row = {"requests": float(reported), "errors": float(errors), "incomplete": 0.0, "error": "HTTP 500" if errors else None}
    monkeypatch.setattr(runtime, "_generate", lambda *args, **kwargs: dict(row))
    server = SimpleNamespace(get=lambda path: {}, log=Path("server.log"))
    if fails:
        with pytest.raises(runtime.ServerError, match=f"every warm-up request at c{streams} failed"):
            runtime._warm_up(cfg, server, None, "m", Path("."), streams, Path("."), f"c{streams}", [1])
    else:
        assert runtime._warm_up(cfg, server, None, "m", Path("."), streams, Path("."), f"c{streams}", [1]) == 1


def test_batching_is_tuned_for_the_load_and_device_unless_the_recipe_sets_it():
    from llmopt.eval.runtimes.server import CUDA_BATCHING, tuned_batching
    from llmopt.recipe import Benchmark

    def stage(server=None, profile="concurrent", points=(1, 8, 32, 64)):
        return Benchmark(stage="benchmark", runtime="server", input_tokens={"mean": 128, "stdev": 32}, output_tokens=256,
                         load={"profile": profile, "points": list(points), "requests": 8}, server=server)

    # 64 streams of up to 128+4x32 prompt and 256 output tokens: 2 blocks of 256 each, a quarter spare
    assert tuned_batching(stage(), "cpu") == {"cb_num_blocks": 160, "cb_max_batch_tokens": 512}
    assert tuned_batching(stage({"cb_block_size": 128}), "cpu")["cb_num_blocks"] == 320
    # a rate point's concurrency is the server's: plan for 256 streams
    assert tuned_batching(stage(profile="poisson", points=(0.5, 4)), "cpu")["cb_num_blocks"] == 640
    # on CUDA also graphs, padded, double-buffered (the H200 sweep's sized preset)
    assert tuned_batching(stage(), "cuda:0") == {"cb_num_blocks": 160, "cb_max_batch_tokens": 512, **CUDA_BATCHING}
    assert CUDA_BATCHING["cb_use_cuda_graph"] is True
    # what the recipe sets stays; opting out, or another server, gets nothing
    kept = tuned_batching(stage({"cb_num_blocks": 1000, "cb_use_cuda_graph": False}), "cuda")
    assert "cb_num_blocks" not in kept and "cb_use_cuda_graph" not in kept and kept["cb_max_batch_tokens"] == 512
    assert tuned_batching(stage({"tune_batching": False}), "cuda") == {}
    assert tuned_batching(stage({"command": ["vllm", "serve", "{model}"]}), "cuda") == {}
    assert tuned_batching(stage({"continuous_batching": False}), "cuda") == {}


def test_engine_options_carry_the_rows_the_workload_and_dense_prefill():
    """What the engine is started with (the server spec's engine_options): its rows (slots, or the
    sweep's most concurrent streams), the longest prompt (+1 for BOS) and output, and the dense-prefill
    threshold only where the recipe sets one."""
    from llmopt.recipe import Benchmark

    def stage(**server):
        return Benchmark(stage="benchmark", runtime="server", input_tokens={"mean": 128, "stdev": 32}, output_tokens=256,
                         load={"points": [1, 8, 32], "requests": 8}, server={"engine": "llmopt", **server})

    cfg = stage()
    assert cfg.serving.engine_options(cfg) == {"slots": 32, "max_prompt_tokens": 128 + 4 * 32 + 1, "max_new_tokens": 256}
    cfg = stage(slots=40, dense_prefill_tokens=512)
    assert cfg.serving.engine_options(cfg) == {"slots": 40, "max_prompt_tokens": 257, "max_new_tokens": 256,
                                                "dense_prefill_tokens": 512}
    cfg = stage(dense_prefill_tokens="auto")  # no row count to exceed: the engine times each prefill shape
    assert cfg.serving.engine_options(cfg)["dense_prefill_tokens"] == "auto"
    assert cfg.on_base().serving.dense_prefill_tokens is None, "the base runs without it"
    named = Benchmark(stage="benchmark", runtime="server", kernel="machete", input_tokens=32, output_tokens=8,
                      load={"points": [1], "requests": 2}, server={"engine": "llmopt", "dense_prefill_tokens": "auto"})
    base = named.on_base()
    assert (base.kernel, base.serving.dense_prefill_tokens) == ("auto", None), "the base takes neither"
    assert (named.kernel, named.serving.dense_prefill_tokens) == ("machete", "auto"), "the candidate keeps both"
    assert stage().on_base() == stage(), "nothing to drop: the same stage"


@pytest.mark.parametrize("handled", [False, True], ids=["without the handler", "with it"])
def test_the_load_generators_workers_end_with_it_when_llmopt_dies(handled):
    """llmopt's death reaches the load generator as a SIGTERM to it alone (PR_SET_PDEATHSIG); its handler
    passes it to its process group, where GuideLLM's workers are. A sleeping child stands in for a
    worker; without the handler it outlives its parent (the control: what the handler prevents)."""
    script = ("import subprocess, sys, time\n"
              "from llmopt.eval.runtimes import loadgen\n"
              + ("loadgen.stop_with_group_on_sigterm()\n" if handled else "")
              + "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(worker.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = int(parent.stdout.readline())
    try:
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(10) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(worker) is not handled
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie awaiting its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_load_generator_process_runs_one_run_after_another_and_says_each_status(tmp_path):
    """GuideLLM in one process for a sweep: a run that fails (here a usage error) is its status and its
    log, the next run still runs, the process ends with its input; if it dies, a run says so."""
    from llmopt.eval.runtimes.server import LoadGenerator

    with LoadGenerator(tmp_path / "loadgen.log") as generator:
        assert generator.run(["run", "--no-such-option"], tmp_path / "bad.log") == 2
        assert generator.run(["run", "--help"], tmp_path / "help.log") == 0
        process = generator.process
    assert "Usage: guidellm run" in (bad := (tmp_path / "bad.log").read_text()) and "No such option '--no-such-option'" in bad
    assert "--profile" in (tmp_path / "help.log").read_text()  # each run's output in its own log
    assert process.returncode == 0, (tmp_path / "loadgen.log").read_text()

    with LoadGenerator(tmp_path / "loadgen2.log") as generator:
        generator.process.kill()
        generator.process.wait()
        assert generator.run(["run", "--help"], tmp_path / "dead.log") == 1
    assert "the load generator's process exited" in (tmp_path / "dead.log").read_text()

    # an error (or Ctrl-C) in llmopt stops it, in its own process group, by SIGTERM (or its input's end),
    # never needing the SIGKILL that follows the grace period; nothing is left
    with pytest.raises(KeyboardInterrupt), LoadGenerator(tmp_path / "loadgen3.log") as generator:
        assert os.getpgid(generator.process.pid) == generator.process.pid
        raise KeyboardInterrupt
    assert generator.process.returncode in (0, -signal.SIGTERM), generator.process.returncode
    assert not _serve_processes("llmopt.eval.runtimes.loadgen")


def test_the_server_counts_and_times_each_cuda_graph_capture(monkeypatch):
    """llmopt.serve wraps transformers' capture step (here a stand-in: capturing needs CUDA) and
    reports the captures and their seconds, from then on, in this process."""
    from llmopt import serve
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    calls = []
    monkeypatch.setattr(ModelRunner, "_capture_graph", lambda runner, *args: (calls.append(args), time.sleep(0.05))[0])
    graphs = serve._Graphs()
    assert graphs.report() == {"graphs_captured": 0, "graph_capture_s": 0.0}
    assert graphs.watch()
    ModelRunner._capture_graph(object(), "forward", "stream")
    ModelRunner._capture_graph(object(), "forward", "stream")
    report = graphs.report()
    assert calls == [("forward", "stream")] * 2, "the capture itself still runs, with its arguments"
    assert report["graphs_captured"] == 2 and 0.1 <= report["graph_capture_s"] < 5


@pytest.mark.parametrize("counts, sla, said", [
    ([5, 32, 64], {"p99_ttft_ms": 500}, True),
    ([120, 400], {"p99_ttft_ms": 500}, False),  # enough requests for a p99
    ([5, 32], {"p90_ttft_ms": 500}, False),  # no p99 bound
    ([5, 32], {}, False),
])
def test_a_p99_bound_over_few_requests_is_said(counts, sla, said, caplog):
    from llmopt.eval.runtimes.server import few_for_p99

    rows = [(float(i), {"requests": float(n)}) for i, n in enumerate(counts)]
    with caplog.at_level("WARNING", logger="llmopt"):
        assert few_for_p99(rows, sla) == said
    assert ("the points completed 5/32/64 requests" in caplog.text) == (counts == [5, 32, 64])


@pytest.mark.parametrize("reported, expected", [({"serve/peak_allocated_gb": 32.27}, 32.27), ({}, None)])
def test_a_server_run_reports_the_servers_peak_gpu_memory_as_its_peak(reported, expected, tmp_path):
    """The model's GPU memory is the server process's: `memory/peak_gpu_gb` (what `llmopt compare` shows
    as peak GPU GB) is the server's peak where it reports one (llmopt.serve), and absent where it does
    not (another server), never the benchmark process's own 0 GB."""
    from types import SimpleNamespace

    from llmopt.cache import Artifact
    from llmopt.stages import StageContext
    from llmopt.stages.benchmark import _serve

    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"x" * 1000)
    kind = SimpleNamespace(sweep=lambda *_: ({"serve/output_tok_s/c1": 10.0, **reported},
                                             {"kernel": "none", "server_command": ["python", "-m", "llmopt.serve"]}))
    cfg = SimpleNamespace(runtime="server", load=SimpleNamespace(points=[1]))
    artifact = _serve(kind, cfg, Artifact(tmp_path / "model", "hf-checkpoint"), tmp_path / "out",
                      StageContext("cpu", "float32", False, progress=False))
    assert artifact.metrics.get("memory/peak_gpu_gb") == expected
    assert artifact.metrics["memory/weights_gb"] == 1e-6
