"""The benchmark stage: runtime, workload, repeats, price."""

from __future__ import annotations

from typing import Literal

from llmopt.eval import runtimes
from llmopt.kernels import CHOICES as KERNEL_CHOICES
from llmopt.schema import Strict
from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

RUNTIMES = tuple(runtimes.discover())


class TokenDistribution(Strict):
    mean: PositiveInt
    stdev: float = Field(ge=0)


class ServerSpec(Strict):
    """`runtime: server`: which server, and how it is tuned. Without `command`, llmopt hosts the model
    in `transformers serve` (llmopt.serve) with these options; with one (a list: program and
    arguments, `{model}` `{port}` `{host}` `{model_name}` filled in), that server runs instead."""

    # `compiled`: the `trtllm-serve` command the compile stage wrote for its bundle (manifest.json)
    command: list[str] | Literal["compiled"] | None = Field(None, min_length=1)
    # which server llmopt hosts the model in (without `command`): `transformers` (transformers serve:
    # continuous batching over a paged KV cache) or `llmopt` (llmopt.engine: continuous batching over
    # rows of a static cache with the compiled runtime's decode step, every CUDA graph captured at start)
    engine: Literal["transformers", "llmopt"] = "transformers"
    # engine llmopt: rows of the static cache, the most requests served at once (default: the sweep's
    # most concurrent streams; a rate profile must say)
    slots: PositiveInt | None = None
    # engine llmopt: products of at least this many token rows (a prefill's batch x width) run on the
    # quantized weights dequantized one layer at a time through the dense matrix product, where a
    # weight-only kernel computes slower (Marlin's prefill on an H100: 50.1 against bf16's 30.5 ms for
    # 8 x 128 tokens); costs a second copy of the codes (0.5 byte a 4-bit weight); decode steps keep
    # the kernel, so it must exceed `slots`. Integer kernels only (FP8 runs its own product). Off by default.
    # `auto`: the engine captures each prefill shape (batch x width) both ways at start-up, times both on
    # this GPU, and keeps the faster; where no shape is faster dense, the copy is dropped
    dense_prefill_tokens: PositiveInt | Literal["auto"] | None = None
    model_name: str | None = None  # what requests name; default: "llmopt", or {model} for a command
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)  # default: a free port
    health_path: str = "/health"
    startup_timeout_s: PositiveFloat = 600
    # transformers serve's own options (llmopt.serve)
    continuous_batching: bool = True
    compile: bool = False
    attn_implementation: str | None = None
    cb_block_size: PositiveInt | None = None
    cb_num_blocks: PositiveInt | None = None
    cb_max_batch_tokens: PositiveInt | None = None
    cb_max_memory_percent: float | None = Field(None, gt=0, le=1)
    cb_use_cuda_graph: bool | None = None
    # continuous batching's own settings that the `transformers serve` command line does not expose
    # (llmopt.serve sets them on its ContinuousBatchingConfig): with sdpa's paged attention (which
    # needs a mask) CUDA graphs pad the batch's query tokens and its KV read to these intervals
    # (transformers' defaults: 64 and 16384 tokens, so one lone request attends over 16384 keys a step)
    cb_q_padding_interval_size: PositiveInt | None = None
    cb_kv_padding_interval_size: PositiveInt | None = None
    cb_use_async_batching: bool | None = None  # double-buffered inputs: the CPU prepares step n+1 during step n
    cb_default_compile_level: int | None = Field(None, ge=0, le=3)  # torch.compile of the step (1-3: longer warm-up)
    cb_max_requests_per_batch: PositiveInt | None = None
    # llmopt's own: choose the cb_* settings the recipe leaves unset for its load and device
    # (eval/runtimes/server.py, tuned_batching), rather than take transformers' defaults:
    # - the paged KV cache (cb_num_blocks) and the step's token budget (cb_max_batch_tokens) sized to
    #   the load, not to fill the GPU. With sdpa's paged attention the step's mask is max_batch_tokens
    #   x (KV pages + max_batch_tokens): auto-sized for a 7B on an H200 that is ~3 GB, and a decoding
    #   step took 139 ms with async batching, 45 ms without, against 20 ms with small buffers;
    # - on CUDA, the step as CUDA graphs, padded to 16 query and 2048 KV tokens, double-buffered: a
    #   7B step took 97 ms without graphs (benchmarks/results/serve_7b_h200/: cb_*_probe, sized-*)
    tune_batching: bool = True

    @staticmethod
    def is_transformers_serve_option(name: str) -> bool:
        """Whether a field is one of `transformers serve`'s own (llmopt.serve passes it on: the cb_*
        ones become its ContinuousBatchingConfig, the others go to `transformers serve` as they are)."""
        return name in ("continuous_batching", "compile", "attn_implementation") or name.startswith("cb_")

    @field_validator("dense_prefill_tokens", mode="before")
    @classmethod
    def _rows_or_auto(cls, value):
        # one message, not the union's two (an integer's and the literal's)
        if value is not None and value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"a positive number of token rows or 'auto', not {value!r}")
        return value

    def engine_options(self, cfg) -> dict[str, int | str]:
        """engine llmopt's sizes for the stage `cfg`: its rows, and the longest prompt (one token more:
        a tokenizer may add BOS to the load generator's prompt) and output of the recipe's workload."""
        streams = self.slots or int(max(cfg.load.points))
        options = {"slots": streams, "max_prompt_tokens": cfg.longest_input + 1, "max_new_tokens": cfg.longest_output}
        return options | ({"dense_prefill_tokens": self.dense_prefill_tokens} if self.dense_prefill_tokens else {})

    def transformers_serve_options(self) -> dict:
        """The options llmopt.serve gives `transformers serve`: those the recipe set, or that have a default."""
        return {k: v for k, v in self.model_dump().items() if self.is_transformers_serve_option(k) and v is not None}

    @model_validator(mode="after")
    def _options_for_the_default_server(self) -> ServerSpec:
        if self.command is not None and ({"engine", "slots", "dense_prefill_tokens"} & self.model_fields_set):
            raise ValueError("engine, slots, dense_prefill_tokens: llmopt's own servers' options, and `command` runs "
                             "another server")
        if self.dense_prefill_tokens is not None and self.engine != "llmopt":
            raise ValueError("dense_prefill_tokens: an engine: llmopt setting")
        if isinstance(self.dense_prefill_tokens, int) and self.slots is not None and self.dense_prefill_tokens <= self.slots:
            raise ValueError(f"dense_prefill_tokens: {self.dense_prefill_tokens} must exceed slots ({self.slots}): a decode "
                             "step of that many rows would run dense instead of on the kernel")
        if self.engine == "llmopt":
            theirs = sorted(k for k in self.model_fields_set
                            if self.is_transformers_serve_option(k) or k == "tune_batching")
            if theirs:
                raise ValueError(f"{', '.join(theirs)}: transformers serve options, and engine: llmopt is llmopt's own "
                                 "server (its settings: slots, dense_prefill_tokens)")
        elif "slots" in self.model_fields_set:
            raise ValueError("slots: an engine: llmopt setting (transformers serve sizes its paged cache with cb_num_blocks)")
        if self.command is not None:
            tuned = sorted(k for k in self.model_fields_set - {"continuous_batching"}
                           if self.is_transformers_serve_option(k) or k == "tune_batching")
            if tuned or "continuous_batching" in self.model_fields_set:
                raise ValueError(f"{', '.join(tuned or ['continuous_batching'])}: transformers serve options, and "
                                 "`command` runs another server; set that server's options in its command")
        # options that would be silently ignored (transformers 5.17: `compile` sets a static cache, a path
        # continuous batching does not take; the cb_* options configure continuous batching only)
        if self.continuous_batching and self.compile:
            raise ValueError("compile: transformers serve's compile (a static cache) does not apply with continuous "
                             "batching; for continuous batching use cb_use_cuda_graph, or set continuous_batching: false")
        cb = [k for k in self.model_fields_set if k.startswith("cb_") and getattr(self, k) is not None]
        if not self.continuous_batching and cb:
            raise ValueError(f"{', '.join(sorted(cb))}: continuous-batching options, and continuous_batching is false")
        return self


class LoadSpec(Strict):
    """The load generator's sweep (GuideLLM): concurrent streams, or a request rate (constant or
    Poisson arrivals), at each of `points`; each point runs `requests` requests or for `duration_s`."""

    profile: Literal["concurrent", "constant", "poisson"] = "concurrent"
    points: list[PositiveFloat] = Field(min_length=1)
    requests: PositiveInt | None = 64
    duration_s: PositiveFloat | None = None
    # warm-up before each point: the stage's `warmup` rounds (a round: the point's concurrency in requests),
    # then, on a server that reports its CUDA graph captures (llmopt.serve), while the last run still
    # captured graphs, one run of the point's own workload (`requests` or `duration_s`: its steady state),
    # up to this many rounds in all: a capture in the timed window lands in its TTFT and ITL tails
    # (0.1-1.2 s each for a 7B on an H200)
    warmup_max_rounds: PositiveInt = 4

    @model_validator(mode="after")
    def _points(self) -> LoadSpec:
        if self.profile == "concurrent" and any(v != int(v) for v in self.points):
            raise ValueError(f"points: concurrent streams are whole numbers, not {self.points}")
        if len(set(self.points)) != len(self.points):
            raise ValueError("points must be distinct")
        if self.requests is None and self.duration_s is None:
            raise ValueError("requests or duration_s: each load point needs an end")
        return self

    @field_validator("points")
    @classmethod
    def _sorted(cls, values: list[float]) -> list[float]:
        return sorted(values)


class Benchmark(Strict):
    """Latency, throughput, memory, roofline and cost of the current model and of the base model,
    with the same runtime, workload and hardware."""

    stage: Literal["benchmark"]
    name: str = "benchmark"
    runtime: Literal[RUNTIMES] = "transformers-eager"  # one module each: llmopt.eval.runtimes
    # decode kernel for a quantized model (llmopt.kernels): auto = the fastest that runs its format here
    kernel: Literal[KERNEL_CHOICES] = "auto"
    batch_sizes: list[int] = Field([1], min_length=1)
    input_tokens: PositiveInt | TokenDistribution = 128
    output_tokens: PositiveInt | TokenDistribution = 128  # a distribution for runtime: server only
    warmup: int = Field(2, ge=0)
    repeats: PositiveInt = 5
    gpu_hourly_usd: float | None = None  # cost per 1M output tokens when given
    memory_budget_gb: float | None = Field(None, gt=0)  # for "cached tokens that fit"; default: the GPU's memory
    seed: int = 0
    # runtime: server (llmopt.eval.runtimes.server)
    server: ServerSpec | None = None
    load: LoadSpec | None = None
    sla: dict[str, float] = Field(default_factory=dict)  # upper bounds, e.g. {p99_ttft_ms: 500, p99_itl_ms: 50}

    @property
    def longest_output(self) -> int:
        if isinstance(self.output_tokens, int):
            return self.output_tokens
        return round(self.output_tokens.mean + 4 * self.output_tokens.stdev)

    @model_validator(mode="after")
    def _server_fields(self) -> Benchmark:
        from llmopt.eval.runtimes.server import SLA_METRICS

        if self.runtime != "server":
            given = [k for k in ("server", "load", "sla") if k in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: for runtime: server only (this stage runs {self.runtime})")
            if not isinstance(self.output_tokens, int):
                raise ValueError(f"output_tokens: {self.runtime} forces one output length; a distribution is for "
                                 "runtime: server")
            return self
        if self.load is None:
            raise ValueError("load: runtime: server needs a load sweep, e.g. load: {points: [1, 4, 16], requests: 64}")
        static = [k for k in ("batch_sizes", "repeats", "memory_budget_gb") if k in self.model_fields_set]
        if static:
            raise ValueError(f"{', '.join(static)}: static-batch settings mean nothing to runtime: server; its load is "
                             "`load` (points, requests or duration_s)")
        if self.serving.engine == "llmopt" and self.load.profile != "concurrent" and self.serving.slots is None:
            raise ValueError(f"server.slots: engine llmopt reserves a row of its cache per request served at once; a "
                             f"{self.load.profile} rate does not bound them, so give slots")
        dense, rows = self.serving.dense_prefill_tokens, self.serving.slots or int(max(self.load.points))
        if isinstance(dense, int) and dense <= rows:
            raise ValueError(f"server.dense_prefill_tokens: {dense} must exceed the engine's {rows} rows (slots, or the "
                             "sweep's most concurrent streams): a decode step of that many rows would run dense")
        for name, bound in self.sla.items():
            if name not in SLA_METRICS:
                import difflib

                close = difflib.get_close_matches(name, SLA_METRICS, n=1)
                raise ValueError(f"sla: unknown metric {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                 + f" (known: {', '.join(SLA_METRICS)})")
            if bound < 0 or (bound == 0 and name != "error_rate"):
                raise ValueError(f"sla: {name}: {bound} is not a positive bound")
        return self

    def on_base(self) -> Benchmark:
        """The stage as it runs on the base model: `kernel` and `server.dense_prefill_tokens` change only
        quantized layers, so the base runs, and is cached, with `kernel: auto` and without dense prefill
        (a sweep of one candidate kernel and one of another share one base measurement). A base that is
        itself quantized (a GPTQ checkpoint as the recipe's model) is then served on `auto`'s kernel,
        without dense prefill."""
        update = {}
        if self.kernel != "auto":
            update["kernel"] = "auto"
        if self.server is not None and self.server.dense_prefill_tokens is not None:
            update["server"] = self.server.model_copy(update={"dense_prefill_tokens": None})
        return self.model_copy(update=update) if update else self

    @property
    def serving(self) -> ServerSpec:
        """The server settings (the defaults when the recipe names none)."""
        return self.server or ServerSpec()

    @property
    def longest_input(self) -> int:
        """The longest prompt to plan for: fixed, or the distribution's mean + 4 standard deviations."""
        if isinstance(self.input_tokens, int):
            return self.input_tokens
        return round(self.input_tokens.mean + 4 * self.input_tokens.stdev)

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, values: list[int]) -> list[int]:
        for v in values:
            if v < 1:
                raise ValueError(f"batch size {v}: every batch size must be at least 1")
        if len(set(values)) != len(values):
            raise ValueError("batch sizes must be distinct")
        return sorted(values)

    @field_validator("gpu_hourly_usd")
    @classmethod
    def _price(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"gpu_hourly_usd: {v} is negative; a price per GPU hour is >= 0")
        return v
