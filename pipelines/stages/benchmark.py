"""The benchmark stage: latency, throughput, memory, bandwidth roofline and cost of one model.
The runner calls it for the candidate and the base model (cached per hardware) and `pair` puts
them side by side, with plots.

Metric names: `bench/<metric>/bs<N>` per batch size, `memory/...` for the model, and
`bench/bandwidth_*` for the device. Timing is done by llmopt.eval.bench (warm-up outside the
timed region, device synchronisation, forced output length, medians over repeats).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

from llmopt import kernels
from llmopt.cache import Artifact, Cache
from llmopt.eval import bench, nvml, runtimes
from llmopt.export import trtllm
from llmopt.models import in_memory_bytes, weights_bytes
from llmopt.recipe import Benchmark
from llmopt.stages import Paired, StageContext
from llmopt.tables import beside_base

log = logging.getLogger("llmopt")
BANDWIDTH = "device-bandwidth"  # <cache root>/device-bandwidth.json: bytes/s per device and torch version


def run(cfg: Benchmark, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    import torch
    from llmopt.progress import progress_bar

    torch.manual_seed(cfg.seed)
    kind = runtimes.get(cfg.runtime)
    if kind.load_sweep:
        return _serve(kind, cfg, src, out, ctx)
    model, applied = None, kernels.Applied("none", "the runtime loads the model itself")
    started = time.perf_counter()
    if kind.loads_model:
        model, applied = kernels.load_accelerated(src, ctx.device, ctx.dtype, ctx.trust_remote_code, cfg.kernel,
                                                  ctx.cache_dir())
        # the run log shows where a long benchmark is, with or without the progress bars
        log.info("benchmark: %s loaded in %.1f s, kernel %s", src.path.name, time.perf_counter() - started, applied.tag())
    # the LLM API loads a bundle's checkpoint/ (or engine/ with tokenizer/), or an HF checkpoint (the base model)
    found = trtllm.loadable(src.path) if model is None else None
    config = model.config if model is not None else _config(found.config)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and cfg.longest_input + cfg.output_tokens > context:  # a hub model: not known before
        raise ValueError(f"output_tokens: {cfg.output_tokens} output after {cfg.longest_input} input tokens exceed "
                         f"the model's context of {context} tokens")
    runtime = kind.open(model, src.path, ctx.device, src.info)
    stored = weights_bytes(src.path) if found is None else sum(f.stat().st_size for f in found.weights)
    dtype_bytes = torch.finfo(torch_dtype_of(model)).bits // 8 if model is not None else 2
    kv_per_token = bench.kv_bytes_per_token(config, dtype_bytes)
    bandwidth = device_bandwidth(ctx)
    metrics: dict[str, float] = {
        "memory/weights_gb": stored / 1e9,
        "memory/kv_bytes_per_token": float(kv_per_token),
        "bench/bandwidth_measured_gb_s": bandwidth / 1e9,
        **applied.metrics(),
    }
    budget = cfg.memory_budget_gb * 1e9 if cfg.memory_budget_gb else (
        torch.cuda.get_device_properties(0).total_memory if ctx.device.startswith("cuda") else None)
    if budget is not None:
        metrics["memory/budget_gb"] = budget / 1e9
        metrics["memory/kv_tokens_in_budget"] = float(max(0, budget - stored) // kv_per_token)
    # only what the runtime measures is reported: a runtime that times whole calls has no TTFT, TPOT or roofline
    report = {"runtime": cfg.runtime, "kernel": applied.tag(), "device": ctx.device, "measures": list(runtime.measures),
              "not_measured": [n for n in bench.TOKEN_METRICS if n not in runtime.measures], "batches": {}}
    in_memory = in_memory_bytes(model) if model is not None else stored
    gpu = nvml.open_gpu(ctx.device)  # power and energy where the driver counts them
    with progress_bar(len(cfg.batch_sizes), f"benchmark {cfg.runtime}", enabled=ctx.progress) as advance:
        for index, bs in enumerate(cfg.batch_sizes):
            batch = bench.prompts(bs, cfg.input_tokens, config.vocab_size, cfg.seed)
            mean_in = sum(len(p) for p in batch) / bs
            if ctx.device.startswith("cuda"):
                torch.cuda.empty_cache()

            def steady_state():
                # the peak of serving, not of compiling: counted from warm-up, a 7B's peak on an H200 stood
                # 3.6-7.3 GB above its weights at batch 1, bf16 and quantized alike (compilation, graph capture)
                if ctx.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()

            started = time.perf_counter()
            samples = bench.measure(runtime, batch, cfg.output_tokens, cfg.warmup, cfg.repeats, gpu=gpu,
                                    after_warmup=steady_state)
            row = bench.summarize(samples, bs, round(mean_in), cfg.output_tokens, runtime.measures)
            if ctx.device.startswith("cuda"):
                row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
                row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
            if row.get("tpot_ms", 0.0) > 0:  # a measured decode step (none for one output token)
                # bytes one decode step reads: the weights, and the KV cache of every request so far (mean context)
                step_bytes = in_memory + bs * (mean_in + cfg.output_tokens / 2) * kv_per_token
                row["decode_bandwidth_gb_s"] = step_bytes / (row["tpot_ms"] / 1000) / 1e9
                row["roofline_fraction"] = row["decode_bandwidth_gb_s"] * 1e9 / bandwidth
            if cfg.gpu_hourly_usd is not None:
                row["usd_per_1m_output_tokens"] = cfg.gpu_hourly_usd / 3600 / row["output_tok_s"] * 1e6
            if index == 0:  # trtllm: streamed (timed) against one plain `generate` (bare)
                bare = bench.bare_loop(runtime, batch, cfg.output_tokens, cfg.repeats, ctx.device)
                row["overhead_pct"] = 100 * (row["e2e_ms"] / 1000 / bare - 1)
            report["batches"][bs] = {**row, "samples_s": [s.stamps[-1] for s in samples]}
            log.info("benchmark %s batch %d: %.1f output tok/s (warm-up and %d repeats in %.1f s)", cfg.runtime, bs,
                     row["output_tok_s"], cfg.repeats, time.perf_counter() - started)
            metrics.update({f"bench/{name}/bs{bs}": value for name, value in row.items()})
            advance()
    runtime_tags = runtime.tags()
    del runtime, model
    if kind.cuda_only and kind.loads_model:
        torch._dynamo.reset()  # compiled graphs hold the model and their CUDA graph pools
    # the runtime and the model sit in reference cycles: the runner collects after every stage
    # (llmopt.runner.release_memory) before the next measurement (the base model's) starts
    report["metrics"] = metrics
    report["environment"] = environment(ctx.device)
    report["runtime_tags"] = runtime_tags
    (out / "report.json").write_text(json.dumps(report, indent=1))
    environment_tags = {**report["environment"], "runtime": cfg.runtime, "kernel": applied.tag(), **runtime_tags}
    return Artifact(out, "report", metrics, {"batch_sizes": cfg.batch_sizes, "environment": environment_tags})


def _serve(kind, cfg: Benchmark, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    """runtime: server: the model behind a server under a load sweep (llmopt.eval.runtimes.server)."""
    metrics, report = kind.sweep(cfg, src, out, ctx)
    metrics["memory/weights_gb"] = weights_bytes(src.path) / 1e9
    if "serve/peak_allocated_gb" in metrics:  # the model's GPU memory is the server's (this process holds none)
        metrics["memory/peak_gpu_gb"] = metrics["serve/peak_allocated_gb"]
    report["metrics"] = metrics
    report["environment"] = environment(ctx.device)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    environment_tags = {**report["environment"], "runtime": cfg.runtime, "kernel": report["kernel"],
                        "server": " ".join(report["server_command"][:4])}
    return Artifact(out, "report", metrics, {"load_points": cfg.load.points, "environment": environment_tags})


def torch_dtype_of(model):
    """The dtype activations and the KV cache use (the first floating parameter's, or bf16 for a
    model whose weights are all packed integers)."""
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.bfloat16


def _config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def device_bandwidth(ctx: StageContext) -> float:
    """Measured copy bandwidth of this device (bytes/s), measured once per device and torch
    version and kept under the cache root."""
    import torch
    from llmopt.models import hardware_name

    key = f"{hardware_name(ctx.device.split(':')[0])}|torch {torch.__version__}"
    size = 1 << 30 if ctx.device.startswith("cuda") else 1 << 28
    return Cache(ctx.cache_dir()).remembered(BANDWIDTH, key, lambda: bench.copy_bandwidth(ctx.device, size))


def environment(device: str) -> dict[str, str]:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "device": device,
           # CPU figures depend on it: the tiny Llama decoded 1.5x faster at batch 1 on one thread than on two
           "cpu_threads": str(torch.get_num_threads())}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
        env["driver"] = nvml.driver_version() or "unknown (NVML not found)"
    return env


# --- candidate beside base ----------------------------------------------------------------------


def pair(cfg: Benchmark, candidate: Artifact, base: Artifact) -> Paired:
    c, b = candidate.metrics, base.metrics
    if runtimes.get(cfg.runtime).load_sweep:
        return _pair_serve(cfg, c, b)
    metrics = dict(c)
    for name in c:
        if name.startswith("bench/") and "/bs" in name and name in b:
            metrics[f"{name}_base"] = b[name]
    metrics["memory/weights_gb_base"] = b["memory/weights_gb"]
    latencies = [n for n in ("e2e_ms", "ttft_ms", "tpot_ms") if any(f"bench/{n}/bs{bs}" in c for bs in cfg.batch_sizes)]
    files = {"plots/latency_vs_batch.png": _plot(cfg, c, b, latencies, "latency (ms)"),
             "plots/throughput_vs_batch.png": _plot(cfg, c, b, ["output_tok_s"], "output tokens/s"),
             "benchmark.md": table(cfg, metrics).encode()}
    return Paired(metrics, [], files)


def _plot(cfg: Benchmark, c: dict, b: dict, names: list[str], ylabel: str) -> bytes:
    from llmopt.plots import figure, png

    fig, ax = figure()
    for name in names:
        for label, source, style in (("candidate", c, "-o"), ("base", b, "--s")):
            ys = [source.get(f"bench/{name}/bs{bs}") for bs in cfg.batch_sizes]
            ax.plot(cfg.batch_sizes, ys, style, label=f"{name} {label}")
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{cfg.runtime}: {cfg.output_tokens} output tokens")
    ax.legend(fontsize=7)
    return png(fig, ax)


def table(cfg: Benchmark, metrics: dict[str, float]) -> str:
    """Markdown, one row per batch size: candidate (base) for the figures people compare."""
    shown = [("output_tok_s", "{:.1f}"), ("ttft_ms", "{:.1f}"), ("tpot_ms", "{:.2f}"), ("e2e_ms", "{:.0f}"),
             ("roofline_fraction", "{:.2f}"), ("peak_allocated_gb", "{:.2f}"), ("usd_per_1m_output_tokens", "{:.3f}"),
             ("energy_j_per_output_token", "{:.3f}")]
    shown = [(n, f) for n, f in shown if any(f"bench/{n}/bs{bs}" in metrics for bs in cfg.batch_sizes)]
    lines = beside_base(metrics, "batch", [(str(bs), f"bench/{{}}/bs{bs}") for bs in cfg.batch_sizes], shown)
    return "\n".join(lines) + "\n"


# --- runtime: server, candidate beside base ----------------------------------------------------------


def _pair_serve(cfg: Benchmark, c: dict, b: dict) -> Paired:
    from llmopt.eval.runtimes.server import point_label

    metrics = dict(c)
    metrics.update({f"{name}_base": value for name, value in b.items() if name.startswith("serve/")})
    metrics["memory/weights_gb_base"] = b["memory/weights_gb"]
    labels = [point_label(cfg.load.profile, v) for v in cfg.load.points]
    files = {"plots/throughput_vs_p99_latency.png": _plot_serve(cfg, c, b, labels),
             "serve.md": serve_table(cfg, metrics).encode()}
    return Paired(metrics, [], files)


def _plot_serve(cfg: Benchmark, c: dict, b: dict, labels: list[str]) -> bytes:
    """Output tokens/s against p99 TTFT and p99 ITL, one point per load, candidate and base, with the SLA's bounds."""
    from llmopt.plots import figure, png

    fig, axes = figure(10, 4, ncols=2)
    for ax, (latency, sla_name) in zip(axes, (("ttft_ms_p99", "p99_ttft_ms"), ("itl_ms_p99", "p99_itl_ms")), strict=True):
        for label, source, style in (("candidate", c, "-o"), ("base", b, "--s")):
            points = [(source.get(f"serve/{latency}/{p}"), source.get(f"serve/output_tok_s/{p}")) for p in labels]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], style, label=label)
        bound = cfg.sla.get(sla_name)
        if bound is not None:
            ax.axvline(bound, color="grey", linestyle=":", label=f"SLA {bound:g} ms")
        ax.set_xlabel(f"{latency.replace('_ms_p99', '').upper()} p99 (ms)")
        ax.set_ylabel("output tokens/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"server under {cfg.load.profile} load {', '.join(labels)}")
    return png(fig, axes)


def serve_table(cfg: Benchmark, metrics: dict[str, float]) -> str:
    """Markdown, one row per load point, candidate (base); then the headline at the SLA."""
    from llmopt.eval.runtimes.server import point_label

    shown = [("requests_s", "{:.2f}"), ("output_tok_s", "{:.1f}"), ("ttft_ms_p99", "{:.1f}"), ("itl_ms_p99", "{:.2f}"),
             ("e2e_ms_p99", "{:.0f}"), ("error_rate", "{:.3f}"), ("usd_per_1m_output_tokens", "{:.3f}"), ("meets_sla", "{:.0f}")]
    labels = [point_label(cfg.load.profile, v) for v in cfg.load.points]
    shown = [(n, f) for n, f in shown if any(f"serve/{n}/{p}" in metrics for p in labels)]
    lines = beside_base(metrics, "load", [(p, f"serve/{{}}/{p}") for p in labels], shown)
    sla = ", ".join(f"{k} <= {v:g}" for k, v in cfg.sla.items()) or "none (every point with no errors meets it)"
    lines += ["", f"SLA: {sla}"]
    for name in ("load_at_sla", "tok_s_at_sla", "usd_per_1m_output_tokens_at_sla"):
        if f"serve/{name}" in metrics:
            base = metrics.get(f"serve/{name}_base")
            lines.append(f"- {name}: {metrics[f'serve/{name}']:.4g}" + (f" (base {base:.4g})" if base is not None else ""))
    return "\n".join(lines) + "\n"
