"""`server`: the model behind a real OpenAI-compatible server, driven by a standard load generator.

Per model (the candidate, then the base with the same settings):
1. start the server on a free local port (`llmopt.serve`: `transformers serve` with continuous
   batching and a paged KV cache, hosting the model as llmopt loads it, fast kernels included; or
   the recipe's own command: `trtllm-serve`, `vllm serve`, TGI's launcher, ...), in a process group
   of its own that dies with llmopt (Linux: a parent-death signal);
2. wait for its health check; a server that exits, or a health check that never passes, is an
   error naming the server log (exit 1); a port in use is refused before anything starts;
3. run the load generator, GuideLLM (guidellm, kept in one process for the sweep: loadgen), once per
   load point: a fixed number of concurrent streams, or a request rate (constant or Poisson), with
   the recipe's prompt and output length distributions, request count or duration; each point's raw
   JSON is kept. Before each point, a warm-up run of the same workload at that load (`warmup` x its
   concurrency requests) compiles or graph-captures the shapes the point will meet; on a server that
   reports its CUDA graph captures (llmopt.serve), while the last run still captured any, one more
   run of the point's own workload (its duration or request count: the steady state, where
   requests start and finish at different steps), up to `load.warmup_max_rounds` rounds, and the
   captures left in the timed window are counted (`graph_captures`): each lands in the point's
   latency tails. Every run draws
   its own prompts (a seed per run, the same for candidate and base), so that no point is served
   from prefixes an earlier run left in the server's prefix cache;
4. read the server's own figures where it reports them (`llmopt.serve`'s `/llmopt/stats`: paged KV
   blocks and bytes reserved and used, peak GPU memory);
5. stop the server by its process group: SIGTERM, then SIGKILL after 15 s; on failure and on
   Ctrl-C as well (a `finally`).

Why GuideLLM: it speaks the OpenAI HTTP API every one of those servers serves, its concurrent and
rate profiles, synthetic data with length distributions and seeds are exactly a recipe's workload,
it reports TTFT, ITL and end-to-end percentiles per request with the raw samples in one JSON file,
and it installs from PyPI with light dependencies (pure Python, no CUDA). aiperf pulls a much larger
stack; inference-perf is built around Kubernetes deployments.

Metrics (`serve/<metric>/<point>`, the point `c<streams>` or `r<rate>`): `POINT_METRICS`; and the
headline at the recipe's SLA (`HEADLINE`). At module level this imports no torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from llmopt import serve as default_server  # imported so that its code is in this runtime's cache key
from llmopt.eval.runtimes import Runtime, loadgen
from llmopt.isolated import die_with_parent

# bounds an SLA may set (upper bounds): latency percentiles and the error rate
SLA_METRICS = tuple(f"{p}_{m}" for m in ("ttft_ms", "itl_ms", "e2e_ms") for p in ("p50", "p90", "p99")) + ("error_rate",)
POINT_METRICS = ("requests_s", "output_tok_s", "concurrency_mean", "requests", "errors", "incomplete", "error_rate",
                 *(f"{m}_{p}" for m in ("ttft_ms", "itl_ms", "e2e_ms") for p in ("p50", "p90", "p99")),
                 "tokens_per_chunk", "usd_per_1m_output_tokens", "meets_sla", "warmup_rounds",
                 "retries",  # timed reruns after GuideLLM lost a completion (_timed_point)
                 # the next two: servers that report their CUDA graph captures (llmopt.serve)
                 "graph_captures", "graph_capture_s",
                 # engine llmopt's own (window_engine): GPU idle between decode steps, steps, prefill padding, the
                 # GPU's time a decode step and in prefills
                 "idle_ms_between_steps", "decode_steps", "prefill_padding", "decode_step_ms", "prefill_s",
                 "prefill_ms_per_1k_tokens")
HEADLINE = ("load_at_sla", "tok_s_at_sla", "requests_s_at_sla", "usd_per_1m_output_tokens_at_sla", "points_meeting_sla")
SERVER_FIGURES = ("startup_s", "warmup_s", "weights_gb_in_memory", "kv_blocks", "kv_block_size", "kv_gb_reserved",
                  "kv_blocks_used_peak", "kv_gb_used_peak", "peak_allocated_gb", "peak_reserved_gb", "graphs_captured",
                  "graph_capture_s")
STOP_GRACE_S = 15
CHUNKY = 1.5  # tokens per streamed chunk above which a point's TTFT and ITL are not per token (finish_point)
# transformers' paged KV cache block (ContinuousBatchingConfig.block_size's default), and what llmopt
# tunes continuous batching with (tuned_batching)
CB_BLOCK_SIZE = 256
CB_STEP_TOKENS = 512
RATE_STREAMS = 256  # the streams a rate point plans for (its concurrency is the server's, not the recipe's)
CUDA_BATCHING = {"cb_use_cuda_graph": True, "cb_q_padding_interval_size": 16, "cb_kv_padding_interval_size": 2048,
                 "cb_use_async_batching": True}
log = logging.getLogger("llmopt")


class ServerError(RuntimeError):
    """The server could not serve (exit 1); the message names its log."""


def point_label(profile: str, value: float) -> str:
    return f"c{int(value)}" if profile == "concurrent" else f"r{value:g}"


def metric_names(cfg) -> set[str]:
    """Every metric a server benchmark logs (for gates and validation)."""
    points = [point_label(cfg.load.profile, v) for v in cfg.load.points]
    names = {f"serve/{m}/{p}" for m in POINT_METRICS for p in points}
    names |= {f"serve/{m}" for m in (*HEADLINE, *SERVER_FIGURES)}
    return names | {f"{n}_base" for n in names} | {"memory/weights_gb", "memory/weights_gb_base"}


# --- the server process ------------------------------------------------------------------------


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# runs in a server's or the load generator's child before exec: SIGTERM when llmopt dies (they stop
# their own workers on it)
_sigterm_with_parent = functools.partial(die_with_parent, signal.SIGTERM)


def group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. Zombies do not count: an orphan whose parent
    died waits on init to reap it, which may be slow (or, in a container, never come)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: zombies count
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # state, ppid, pgrp, ...
        except OSError:  # gone while read
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group that `process` leads (started with start_new_session), SIGKILL to
    what is left of the group after `grace_s`; returns once none of it runs. The leader's exit is not
    the end: a worker it started may still be handling its SIGTERM (seen in CI: the child of a
    stand-in server running just after the server itself had exited)."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace_s)
    while group_running(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None or group_running(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_by = time.monotonic() + 5  # SIGKILL is delivered, not waited on
        while group_running(process.pid) and time.monotonic() < killed_by:
            time.sleep(0.05)


class Server:
    """A server process: started in its own process group, healthy or an error, always stopped."""

    def __init__(self, command: list[str], host: str, port: int, log: Path, health_path: str, timeout_s: float,
                 env: dict | None = None, cwd: Path | None = None):
        self.command, self.host, self.port, self.log, self.cwd = command, host, port, log, cwd
        self.health_url = f"http://{host}:{port}{health_path}"
        self.timeout_s, self.env = timeout_s, env
        self.process: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> Server:
        if port_in_use(self.host, self.port):
            raise ServerError(f"port {self.port} on {self.host} is already in use; name another server.port or leave it "
                              "out (a free port is chosen)")
        started = time.perf_counter()
        with open(self.log, "ab") as sink:
            try:
                self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, preexec_fn=_sigterm_with_parent, env=self.env,
                                                cwd=self.cwd)
            except FileNotFoundError as e:
                raise ServerError(f"server command {self.command[0]!r} not found ({e.strerror})") from None
        try:
            self._wait_healthy()
        except BaseException:  # a failed start, Ctrl-C included: nothing left behind
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"the server exited with code {code} before its health check passed: {_last_line(self.log)}"
                                  f"; server log: {self.log}")
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(self.health_url, timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.25)
        raise ServerError(f"the server's health check ({self.health_url}) did not pass within {self.timeout_s:g} s; "
                          f"server log: {self.log}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after the grace period; also when the server
        itself has exited, since what it started may not have."""
        if self.process is None:
            return
        stop_group(self.process, STOP_GRACE_S)

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, path: str) -> dict | None:
        """A JSON GET on the server, or None when it has no such route."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=10) as response:
                return json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None


class LoadGenerator:
    """GuideLLM kept in one process for a sweep (llmopt.eval.runtimes.loadgen, which says why): each run
    is sent to it and waited for. It leads a process group of its own (GuideLLM's workers are in it),
    dies with llmopt, ends when its input does, and on an error or Ctrl-C is stopped with its workers."""

    def __init__(self, log: Path):
        self.log = log  # the driver's own output (a crash of it), apart from each run's log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LoadGenerator:
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", loadgen.__name__], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=sink, text=True, start_new_session=True,
                                            preexec_fn=_sigterm_with_parent)
        return self

    def run(self, args: list[str], log: Path) -> int:
        """One GuideLLM run (`args` from `run` on), its output in `log`; its exit status (1 if the
        driver itself died: then `log` says so and names the driver's log)."""
        try:
            self.process.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except BrokenPipeError:
            answer = ""
        if not answer:
            with open(log, "a") as f:
                f.write(f"the load generator's process exited ({self.process.poll()}); its log: {self.log}\n")
            return 1
        return int(json.loads(answer)["exit"])

    def __exit__(self, exc_type, *exc) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # the driver ends when its input does
        if exc_type is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_GRACE_S)
        # what is left of its group: a run under way (after an error), or workers its end left behind
        stop_group(self.process, 5)


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


# --- the load generator -----------------------------------------------------------------------


def _tokens(value, name: str) -> str:
    if isinstance(value, int):
        return f"{name}={value}"
    return f"{name}={value.mean},{name}_stdev={max(round(value.stdev), 0)}"


def guidellm_args(cfg, target: str, model_name: str, tokenizer: Path, value: float, raw: Path, seed: int,
                  requests: int | None = None) -> list[str]:
    """One load point of GuideLLM against `target` (its command line from `run` on): the recipe's
    profile and lengths, the prompts drawn with `seed`, for the recipe's count or duration (or exactly
    `requests`, for a warm-up)."""
    load = cfg.load
    profile = f"kind=concurrent,streams={int(value)}" if load.profile == "concurrent" else f"kind={load.profile},rate={value:g}"
    command = ["run",
               "--backend", f"kind=openai_http,target={target},model={model_name},request_format=/v1/completions",
               "--profile", profile,
               "--data", f"kind=synthetic_text,{_tokens(cfg.input_tokens, 'prompt_tokens')},"
                         f"{_tokens(cfg.output_tokens, 'output_tokens')}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
               "--seed", f"kind=static,value={seed}",
               "--output", f"kind=json,path={raw}", "--disable-console-interactive"]
    if requests is not None:
        return command + ["--constraint", f"kind=max_requests,count={requests}"]
    if load.requests is not None:
        command += ["--constraint", f"kind=max_requests,count={load.requests}"]
    if load.duration_s is not None:
        command += ["--constraint", f"kind=max_duration,seconds={load.duration_s:g}"]
    return command


def point_seeds(cfg) -> list[tuple[int, int]]:
    """(warm-up seed, timed seed) per load point: every run draws prompts of its own, so that no point
    meets prompts an earlier run left in the server's prefix cache (transformers serve and vLLM share
    KV blocks of identical prefixes by default); the candidate and the base get the same ones."""
    return [(run_seed(cfg, 1, i), run_seed(cfg, 0, i)) for i in range(len(cfg.load.points))]


def run_seed(cfg, slot: int, index: int) -> int:
    """The prompts' seed of one GuideLLM run: load point `index`'s run in `slot` (0 the timed run, 1 the
    first warm-up, then the extra warm-ups (extra_warmup_seeds), then the timed reruns (retry_seeds)).
    One seed per (slot, point), so no two runs of a sweep draw the same prompts."""
    return cfg.seed + len(cfg.load.points) * slot + index


WARMUP_MIN_REQUESTS = 2


def warmup_requests(cfg, value: float, rounds: int | None = None) -> int:
    """Warm-up requests before a load point: `warmup` rounds (or `rounds`) of its concurrency (a rate
    point: its rate, rounded up), so that every batch shape the point meets is compiled or
    graph-captured before it is timed (transformers' continuous batching captures a CUDA graph per
    padded shape, when it first appears). At least WARMUP_MIN_REQUESTS: GuideLLM 0.8.1 can lose a run's
    last completion (lost_requests), and a run of one request whose completion it lost fails outright
    ("Cannot compile GenerativeMetrics: No measurement start or end times available"; CI, 2026-12-07,
    the engine's c1 warm-up); of two, one is left."""
    n = min(max(1, math.ceil(value)), 256) * (cfg.warmup if rounds is None else rounds)
    return max(n, WARMUP_MIN_REQUESTS) if n else 0


def extra_warmup_seeds(cfg, index: int) -> list[int]:
    """Seeds of the warm-up rounds after the first run at load point `index` (_warm_up): apart from
    every point's timed and first warm-up seeds (point_seeds), and from each other's."""
    return [run_seed(cfg, 2 + k, index) for k in range(_extra_warmups(cfg))]


def _extra_warmups(cfg) -> int:
    return max(cfg.load.warmup_max_rounds - cfg.warmup, 0)


def capture_snapshot(server) -> tuple[int, float] | None:
    """CUDA graphs the server has captured so far and the seconds they took, where it reports them
    (llmopt.serve), else None."""
    return _captures(server.get("/llmopt/stats") or {})


def _captures(stats: dict) -> tuple[int, float] | None:
    if stats.get("graphs_captured") is None:
        return None
    return int(stats["graphs_captured"]), float(stats.get("graph_capture_s", 0.0))


def graphs_captured(server) -> int | None:
    """CUDA graphs the server has captured so far, where it reports them (llmopt.serve), else None."""
    snapshot = capture_snapshot(server)
    return None if snapshot is None else snapshot[0]


def window_captures(before: tuple[int, float], after: tuple[int, float]) -> dict[str, float]:
    """A point's `graph_captures` and `graph_capture_s`: the captures between two snapshots taken
    around its timed run, and the seconds they took, which its requests waited through (in their
    TTFT or ITL): what a reviewer weighs a missed latency bound against."""
    return {"graph_captures": float(after[0] - before[0]), "graph_capture_s": float(after[1] - before[1])}


ENGINE_COUNTERS = ("idle_s", "idle_steps", "steps", "prefill_tokens", "prefill_padded_tokens", "decode_s", "prefill_s")


def point_snapshot(server) -> tuple[tuple[int, float] | None, dict[str, float] | None]:
    """One read of the server's /llmopt/stats around a point's timed run: its CUDA graph captures so far
    (`capture_snapshot`) and engine llmopt's step counters so far, each None where not reported."""
    stats = server.get("/llmopt/stats") or {}
    return _captures(stats), _engine_counters(stats)


def _engine_counters(stats: dict) -> dict[str, float] | None:
    engine = stats.get("engine")
    if not isinstance(engine, dict) or any(k not in engine for k in ENGINE_COUNTERS):
        return None
    return {k: float(engine[k]) for k in ENGINE_COUNTERS}


def window_engine(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """A point's engine figures between two snapshots around its timed run: the GPU's idle milliseconds
    between two decode steps with no prefill between (the engine launches a step before it reads the
    last one's tokens, so the GPU idles only when the host's turn, its waits for the GIL included,
    outlasts a step), the decode steps, the prefill padding (tokens computed per prompt token), the GPU's
    milliseconds a decode step, its seconds in prefills, and its milliseconds of prefill per 1000 prompt
    tokens (padding included: what a burst of prompts costs in TTFT)."""
    d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
    prompts = d["prefill_tokens"]
    return {"idle_ms_between_steps": 1000 * d["idle_s"] / max(d["idle_steps"], 1), "decode_steps": d["steps"],
            "prefill_padding": d["prefill_padded_tokens"] / prompts if prompts else 1.0,
            "decode_step_ms": 1000 * d["decode_s"] / max(d["steps"], 1), "prefill_s": d["prefill_s"],
            "prefill_ms_per_1k_tokens": 1e6 * d["prefill_s"] / prompts if prompts else 0.0}


def _warm_up(cfg, server, generator, model_name: str, tokenizer: Path, value: float, out: Path, label: str,
             seeds: list[int]) -> int:
    """Warm one load point up: `warmup` rounds of its concurrency in one run, then, on a server that
    reports its CUDA graph captures, while the last run still captured graphs, a run of the point's
    own workload (its duration or request count), up to `load.warmup_max_rounds` rounds in all.
    Why the point's own workload: a round of `concurrency` requests starts them together, so its
    steps are one prefill burst, then decodes; in the timed run requests start and finish at
    different steps, and the padded step shapes (prefill and decode tokens mixed) are others. On an
    H200 (2026-11-29) a 7B's third such round captured 0-2 graphs, and the timed 15 s after it 5-19.
    Each run draws prompts of its own (`seeds`). Returns the rounds run; says when the point is
    timed with the server still capturing."""
    runs = [(f"warmup/{label}", cfg.warmup)] + [(f"warmup/{label}-{cfg.warmup + k + 1}", 1) for k in range(len(seeds) - 1)]
    before, done = graphs_captured(server), 0
    for index, ((name, rounds), seed) in enumerate(zip(runs, seeds, strict=True)):
        # the first run: `warmup` rounds of the concurrency; then the point's own workload (requests=None)
        sent = warmup_requests(cfg, value, rounds) if index == 0 else None
        warm = _generate(cfg, server, generator, model_name, tokenizer, value, out, name, seed, sent)
        # GuideLLM may lose a run's last completion (lost_requests): a warm-up sends at least two, so one is left
        if warm["requests"] == 0:
            raise ServerError(f"every warm-up request at {label} failed: {warm['error'] or 'no request completed'}; "
                              f"server log: {server.log}")
        done += rounds
        after = graphs_captured(server)
        if before is None or after == before:
            return done
        captured, before = after - before, after
        if done < cfg.load.warmup_max_rounds:
            log.info("load %s: warm-up round %d captured %d CUDA graphs: one more run of the point's own workload",
                     label, done, captured)
    log.warning("load %s: the warm-up's last round still captured %d CUDA graphs after %d rounds (load.warmup_max_rounds): "
                "the timed point may meet new step shapes, whose captures land in its TTFT and ITL tails "
                "(serve/graph_captures/%s counts them)", label, captured, done, label)
    return done


def tuned_batching(cfg, device: str) -> dict[str, int | bool]:
    """The continuous-batching settings llmopt.serve gets where the recipe leaves them unset
    (`tune_batching`, on by default; ServerSpec.tune_batching has the measured costs):
    - a paged KV cache that holds the sweep's most concurrent streams at their longest (prompt mean
      + 4 sd, plus the longest output), with a quarter spare, and 512 tokens a step (prefill is
      chunked to that), where transformers would fill the GPU; a rate point plans for RATE_STREAMS;
    - on CUDA, CUDA_BATCHING: the settings of the H200 sweep's `sized` preset, the fastest measured."""
    spec = cfg.serving
    if spec.command is not None or spec.engine != "transformers" or not spec.continuous_batching or not spec.tune_batching:
        return {}
    block = spec.cb_block_size or CB_BLOCK_SIZE
    streams = int(max(cfg.load.points)) if cfg.load.profile == "concurrent" else RATE_STREAMS
    blocks_per_request = math.ceil((cfg.longest_input + cfg.longest_output) / block)
    tuned = {"cb_num_blocks": math.ceil(1.25 * streams * blocks_per_request), "cb_max_batch_tokens": CB_STEP_TOKENS}
    if device.startswith("cuda"):
        tuned.update(CUDA_BATCHING)
    return {k: v for k, v in tuned.items() if getattr(spec, k) is None}


def first_error(raw: dict) -> str | None:
    """The first error message GuideLLM kept for a failed request, if any."""
    errored = raw["benchmarks"][0].get("requests", {}).get("errored") or []
    return next((r["info"]["error"] for r in errored if r.get("info", {}).get("error")), None)


def read_point(raw: dict) -> dict[str, float]:
    """One load point's figures from GuideLLM's JSON: throughput over the measured window, latency
    percentiles over the successful requests, the error rate over the requests that ended. Requests
    still running when a point's duration ran out (GuideLLM's `incomplete`: cancelled by the load
    generator, not failed by the server) are counted apart, not as errors; the tokens they had
    streamed count in the output rate (the server produced them inside the window)."""
    bench = raw["benchmarks"][0]
    metrics, scheduler = bench["metrics"], bench["scheduler_metrics"]
    made = scheduler["requests_made"]
    ok, errored, incomplete = made["successful"], made["errored"], made["incomplete"]
    duration = max(scheduler["measure_end_time"] - scheduler["measure_start_time"], 1e-9)
    ended = ok + errored
    tokens = metrics["output_token_count"]
    row = {"requests": float(ok), "errors": float(errored), "incomplete": float(incomplete),
           "error_rate": errored / ended if ended else 1.0,
           "requests_s": ok / duration,
           # every token streamed in the window, the cut-off requests' included: what the server produced
           "output_tok_s": (tokens["successful"]["total_sum"] + tokens["incomplete"]["total_sum"]) / duration,
           "concurrency_mean": metrics["request_concurrency"]["successful"]["mean"]}
    for name, source, scale in (("ttft_ms", "time_to_first_token_ms", 1), ("itl_ms", "inter_token_latency_ms", 1),
                                ("e2e_ms", "request_latency", 1000)):
        percentiles = metrics[source]["successful"]["percentiles"]
        for p in ("p50", "p90", "p99"):
            row[f"{name}_{p}"] = percentiles[p] * scale
    # output tokens per streamed chunk (median over requests): TTFT and ITL are per chunk, so they are
    # per token only when this is 1 (finish_point says so when it is not)
    per_chunk = metrics.get("output_tokens_per_iteration", {}).get("successful", {}).get("median")
    if per_chunk is not None:
        row["tokens_per_chunk"] = float(per_chunk)
    return row


def meets(row: dict[str, float], sla: dict[str, float]) -> bool:
    """A point meets the SLA when it completed requests, every bound holds, and its error rate is at
    most the SLA's `error_rate` (0 unless given). A bound on TTFT or ITL holds only where they were
    timed per token: not when the server streamed more than CHUNKY tokens a chunk (read_point)."""
    if row["requests"] <= 0 or row["error_rate"] > sla.get("error_rate", 0.0):
        return False
    if row.get("tokens_per_chunk", 1.0) > CHUNKY and any(name.endswith(("ttft_ms", "itl_ms")) for name in sla):
        return False
    return all(row[point_name(name)] <= bound for name, bound in sla.items() if name != "error_rate")


def point_name(sla_name: str) -> str:
    """An SLA bound's name as a load point's metric: `p99_ttft_ms` -> `ttft_ms_p99`."""
    percentile, _, metric = sla_name.partition("_")
    return f"{metric}_{percentile}"


def headline(points: list[tuple[float, dict]], sla: dict[str, float], hourly_usd: float | None) -> dict[str, float]:
    """The highest load that meets the SLA: its load, throughput and cost (0 throughput when none does)."""
    passing = [(value, row) for value, row in points if meets(row, sla)]
    out = {"points_meeting_sla": float(len(passing)), "load_at_sla": 0.0, "tok_s_at_sla": 0.0, "requests_s_at_sla": 0.0}
    if passing:
        value, row = max(passing, key=lambda item: item[0])
        out.update({"load_at_sla": float(value), "tok_s_at_sla": row["output_tok_s"], "requests_s_at_sla": row["requests_s"]})
        if hourly_usd is not None and row["output_tok_s"] > 0:
            out["usd_per_1m_output_tokens_at_sla"] = hourly_usd / 3600 / row["output_tok_s"] * 1e6
    return out


# --- the runtime --------------------------------------------------------------------------------


class ServerRuntime(Runtime):
    name = "server"
    summary = "an OpenAI-compatible server (transformers serve by default) under GuideLLM load"
    measures = ()
    libraries = ("guidellm", "openai")  # openai: what `transformers serve` needs to start
    loads_model = False  # the server process loads it
    load_sweep = True

    @classmethod
    def sweep(cls, cfg, src, out: Path, ctx) -> tuple[dict[str, float], dict]:
        """Serve `src`, run every load point, stop the server; (metrics, report)."""
        from llmopt.progress import progress_bar

        spec = cfg.serving
        host = spec.host
        port = spec.port or free_port(host)
        server_log = out / "server.log"
        if spec.command == "compiled":  # the compile stage's trtllm-serve, run in its bundle
            command, env, cwd = compiled_serve_command(src.path, host, port), None, src.path
            model_name = spec.model_name or command[1]  # trtllm-serve names the model by its path argument
        else:
            model_name = spec.model_name or ("llmopt" if spec.command is None else str(src.path))
            (command, env), cwd = cls.command(cfg, src, out, ctx, host, port, model_name), None
        (out / "load" / "warmup").mkdir(parents=True, exist_ok=True)
        rows: list[tuple[float, dict]] = []
        report: dict = {"server_command": command, "model_name": model_name, "port": port, "points": {}}
        with (Server(command, host, port, server_log, spec.health_path, spec.startup_timeout_s, env, cwd) as server,
              LoadGenerator(out / "load" / "loadgen.log") as generator):
            metrics: dict[str, float] = {"serve/startup_s": server.startup_s, "serve/warmup_s": 0.0}
            with progress_bar(len(cfg.load.points), f"serve load {cfg.load.profile}", enabled=ctx.progress) as advance:
                for index, (value, (warmup_seed, seed)) in enumerate(zip(cfg.load.points, point_seeds(cfg), strict=True)):
                    label = point_label(cfg.load.profile, value)
                    if cfg.warmup:  # the workload's own shapes at this load, on prompts the timed run will not send
                        started = time.perf_counter()
                        rounds = _warm_up(cfg, server, generator, model_name, src.path, value, out, label,
                                          [warmup_seed, *extra_warmup_seeds(cfg, index)])
                        metrics["serve/warmup_s"] += time.perf_counter() - started
                    row = _timed_point(cfg, server, generator, model_name, src.path, value, out, label,
                                       [seed, *retry_seeds(cfg, index)])
                    if cfg.warmup:
                        row["warmup_rounds"] = float(rounds)
                    row = finish_point(row, label, cfg)
                    rows.append((value, row))
                    report["points"][label] = row
                    metrics.update({f"serve/{name}/{label}": v for name, v in row.items()})
                    advance()
            stats = server.get("/llmopt/stats") or {}
        few_for_p99(rows, cfg.sla)
        report["server_stats"] = stats
        for name, key, scale in (("kv_blocks", "kv_blocks", 1), ("kv_block_size", "kv_block_size", 1),
                                 ("kv_gb_reserved", "kv_bytes_reserved", 1e-9), ("kv_blocks_used_peak", "kv_blocks_used_peak", 1),
                                 ("kv_gb_used_peak", "kv_bytes_used_peak", 1e-9),
                                 ("peak_allocated_gb", "peak_allocated_bytes", 1e-9),
                                 ("peak_reserved_gb", "peak_reserved_bytes", 1e-9),
                                 ("weights_gb_in_memory", "weights_bytes", 1e-9),
                                 ("graphs_captured", "graphs_captured", 1), ("graph_capture_s", "graph_capture_s", 1)):
            if key in stats:
                metrics[f"serve/{name}"] = float(stats[key]) * scale
        metrics.update({f"serve/{k}": v for k, v in headline(rows, cfg.sla, cfg.gpu_hourly_usd).items()})
        report["kernel"] = stats.get("kernel", "unknown (the server does not report it)")
        return metrics, report

    @classmethod
    def command(cls, cfg, src, out: Path, ctx, host: str, port: int, model_name: str) -> tuple[list[str], dict | None]:
        """The server's command line: llmopt's host of `transformers serve` (a spec file), or the
        recipe's command with {model}, {port}, {host} and {model_name} filled in."""
        spec = cfg.serving
        if spec.command is not None:
            fill = {"model": str(src.path), "port": str(port), "host": host, "model_name": model_name}
            return [part.format(**fill) for part in spec.command], None
        server: dict = {"engine": spec.engine}
        if spec.engine == "llmopt":
            server["engine_options"] = spec.engine_options(cfg)
            log.info("serve: engine llmopt, %s", ", ".join(f"{k}={v}" for k, v in server["engine_options"].items()))
        else:
            tuned = tuned_batching(cfg, ctx.device)
            if tuned:
                log.info("serve: batching tuned for the load (tune_batching): %s",
                         ", ".join(f"{k}={v}" for k, v in tuned.items()))
            server["options"] = {**spec.transformers_serve_options(), **tuned}
        spec_file = out / "server-spec.json"
        spec_file.write_text(json.dumps({
            "artifact": {"path": str(src.path), "kind": src.kind, "info": src.info}, "device": ctx.device,
            "dtype": ctx.dtype, "trust_remote_code": ctx.trust_remote_code, "kernel": cfg.kernel,
            "cache_root": str(ctx.cache_dir()), "model_name": model_name, "host": host, "port": port, **server,
        }, indent=1, default=str))
        env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}  # the server needs no hub token: never pass it on
        return [sys.executable, "-m", default_server.__name__, str(spec_file)], env


def compiled_serve_command(bundle: Path, host: str, port: int) -> list[str]:
    """The `serve` command a compile stage wrote into its bundle's manifest, on this host and port;
    for the base model (a Hugging Face checkpoint, no bundle), trtllm-serve on that checkpoint with
    its PyTorch backend and default settings."""
    manifest = bundle / "manifest.json"
    if not manifest.is_file() and (bundle / "config.json").is_file():
        return ["trtllm-serve", str(bundle), "--backend", "pytorch", "--host", host, "--port", str(port)]
    commands = json.loads(manifest.read_text()).get("commands", {}) if manifest.is_file() else {}
    if "serve" not in commands:
        raise ServerError(f"server.command: compiled needs a compile stage's bundle with a serve command; {bundle} has no "
                          f"{'manifest.json' if not manifest.is_file() else 'commands.serve in manifest.json'}")
    command = list(commands["serve"])
    for flag, value in (("--host", host), ("--port", str(port))):
        if flag in command:
            command[command.index(flag) + 1] = value
        else:
            command += [flag, value]
    return command


P99_SAMPLES = 100  # completed requests below which a point's p99 is about its slowest request


def few_for_p99(rows: list[tuple[float, dict]], sla: dict[str, float]) -> bool:
    """Say (once a sweep) when the SLA bounds a p99 that some point measured on fewer than
    P99_SAMPLES completed requests: there one slow request decides the verdict."""
    counts = [int(row["requests"]) for _, row in rows]
    if not any(name.startswith("p99_") for name in sla) or min(counts, default=P99_SAMPLES) >= P99_SAMPLES:
        return False
    log.warning("the SLA bounds p99 latencies, and the points completed %s requests: below %d a p99 is about the "
                "slowest request's figure. Give load.requests or a longer load.duration_s for a p99 that stands for one "
                "request in a hundred", "/".join(map(str, counts)), P99_SAMPLES)
    return True


def finish_point(row: dict, label: str, cfg) -> dict:
    """One load point's figures as reported: its cost and SLA verdict added, its first error (if any)
    and a window too short for the server's latency said in the log, the error text taken out."""
    if cfg.gpu_hourly_usd is not None and row["output_tok_s"] > 0:
        row["usd_per_1m_output_tokens"] = cfg.gpu_hourly_usd / 3600 / row["output_tok_s"] * 1e6
    row["meets_sla"] = float(meets(row, cfg.sla))
    log.info("load %s: %.1f output tok/s, %d requests, p99 TTFT %.0f ms, p99 ITL %.1f ms%s", label, row["output_tok_s"],
             row["requests"], row.get("ttft_ms_p99", math.nan), row.get("itl_ms_p99", math.nan),
             ", meets the SLA" if row["meets_sla"] else "")
    if row["errors"]:
        log.warning("load %s: %d requests failed; the first: %s", label, row["errors"], row["error"])
    if row["incomplete"] > row["requests"]:
        e2e = f"e2e p50 {row['e2e_ms_p50'] / 1000:.1f} s" if row["requests"] else "no request completed"
        log.warning("load %s: %d requests were cut off at the end of the point and %d completed: the window is short "
                    "for this server's latency (%s); latency percentiles count completed requests only. Lengthen "
                    "load.duration_s or give load.requests", label, row["incomplete"], row["requests"], e2e)
    if row.get("tokens_per_chunk", 1.0) > CHUNKY:
        log.warning("load %s: the server streamed %.1f tokens per chunk (median), so TTFT and ITL time chunks, not tokens "
                    "(the point cannot meet an SLA on them); output tok/s and e2e latency stay exact. A server streams "
                    "text deltas: tokens that decode to no text (random weights, a tokenizer smaller than the model's "
                    "vocabulary) are held back", label, row["tokens_per_chunk"])
    if row.get("graph_captures", 0) > 0:
        log.warning("load %s: the server captured %d CUDA graphs (%.2f s) during the timed window: their time is in its "
                    "TTFT and ITL tails. Raise warmup or load.warmup_max_rounds", label, row["graph_captures"],
                    row.get("graph_capture_s", 0.0))
    del row["error"]
    return row


LOST_UPDATE_RETRIES = 2  # timed runs of a point after the first, when GuideLLM lost a completion


def retry_seeds(cfg, index: int) -> list[int]:
    """Seeds of a load point's timed reruns (_timed_point): apart from every other run's seeds
    (point_seeds, extra_warmup_seeds), so that a rerun meets no prefix its first try left cached."""
    return [run_seed(cfg, 2 + _extra_warmups(cfg) + k, index) for k in range(LOST_UPDATE_RETRIES)]


def lost_requests(cfg, row: dict) -> int:
    """Requests a count-bound point (load.requests, no duration) sent whose end GuideLLM's figures lack.
    GuideLLM 0.8.1 can drop the last completion of a run: its receive thread sets the shutdown event
    before it queues that update, and the main loop, timing out between the two, stops reading. The
    server served the request (its log shows the POST); the point's window then ends at that request's
    completion, while its token count lacks it: on tiny-serve's 12 requests, 8% too few tok/s."""
    if cfg.load.requests is None or cfg.load.duration_s is not None:
        return 0
    return max(int(cfg.load.requests - (row["requests"] + row["errors"] + row["incomplete"])), 0)


def _timed_point(cfg, server: Server, generator: LoadGenerator, model_name: str, tokenizer: Path, value: float,
                 out: Path, label: str, seeds: list[int]) -> dict:
    """A load point's timed run (_generate), with the server's capture and engine counters around it
    (point_snapshot); run again on fresh prompts (`seeds` after the first) while GuideLLM's figures lack
    requests it sent (lost_requests), up to LOST_UPDATE_RETRIES times. `retries` counts the reruns."""
    for attempt, seed in enumerate(seeds):
        before, engine_before = point_snapshot(server)
        row = _generate(cfg, server, generator, model_name, tokenizer, value, out, label, seed)
        after, engine_after = point_snapshot(server)
        if before is not None:  # a server that reports its CUDA graph captures (llmopt.serve)
            row.update(window_captures(before, after))
        if engine_before is not None:  # engine llmopt
            row.update(window_engine(engine_before, engine_after))
        row["retries"] = float(attempt)
        lost = lost_requests(cfg, row)
        if not lost:
            return row
        more = attempt + 1 < len(seeds)
        log.warning("load %s: GuideLLM's figures lack %d of the %d requests it sent (its last completion lost at "
                    "shutdown: the window would count that request's time without its tokens)%s", label, lost,
                    cfg.load.requests, "; running the point again on fresh prompts" if more else
                    f"; kept after {len(seeds)} runs (serve/retries/{label})")
    return row


def _generate(cfg, server: Server, generator: LoadGenerator, model_name: str, tokenizer: Path, value: float, out: Path,
              name: str, seed: int, requests: int | None = None) -> dict:
    """One GuideLLM run against the server; its figures (read_point) and first error. The raw JSON and
    the log stay in `out/load/<name>.{json,log}`."""
    raw, logfile = out / "load" / f"{name}.json", out / "load" / f"{name}.log"
    target = f"http://{server.host}:{server.port}"
    logfile.unlink(missing_ok=True)
    code = generator.run(guidellm_args(cfg, target, model_name, tokenizer, value, raw, seed, requests), logfile)
    if code != 0 or not raw.exists():
        raise ServerError(f"the load generator failed at {name} (exit {code}): {_last_line(logfile)}; "
                          f"its log: {logfile}; server log: {server.log}")
    if server.process.poll() is not None:
        raise ServerError(f"the server exited with code {server.process.returncode} during load {name}: "
                          f"{_last_line(server.log)}; server log: {server.log}")
    data = json.loads(raw.read_text())
    return {**read_point(data), "error": first_error(data)}
