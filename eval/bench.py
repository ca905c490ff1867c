"""Latency and throughput of text generation, measured honestly.

One measurement = one batch of requests generated to a forced length (EOS ignored, verified on
the outputs). Each timed call is preceded by a device synchronisation and every per-token
timestamp marks the point the device produced the token: a CUDA event recorded in the stream
after each step (in the compiled loop, and from a logits-processor hook inside `generate`), read after
the one synchronisation at the end, so timing adds no synchronisation per token. Warm-up calls
(compilation, CUDA graph capture, allocator growth) run before the timed ones, with the same
shapes.

The runtimes are one module each in llmopt.eval.runtimes (transformers-eager, transformers-compiled,
trtllm); this module holds what they share: the sample, the prompts, the clock, the statistics.

Each runtime declares the metrics it measures (`measures`): `REQUEST_METRICS` (whole-call times and
throughput) always, `TOKEN_METRICS` (TTFT, ITL, TPOT) only where it sees each token arrive. Only the
declared ones are computed and reported; the roofline needs a measured TPOT (`reported_metrics`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# what `summarize` computes: from the time each whole call took, and from the time each token arrived
REQUEST_METRICS = ("e2e_ms", "e2e_ms_p90", "e2e_ms_p99", "output_tok_s", "total_tok_s", "requests_s", "e2e_spread_pct")
TOKEN_METRICS = ("ttft_ms", "ttft_ms_p90", "ttft_ms_p99", "itl_ms", "itl_ms_p90", "itl_ms_p99", "tpot_ms")
# what the benchmark stage adds per batch: from a measured TPOT, on CUDA, with a price, on the first batch
FROM_TPOT = ("decode_bandwidth_gb_s", "roofline_fraction")
ALWAYS = ("usd_per_1m_output_tokens", "peak_allocated_gb", "peak_reserved_gb", "energy_j_per_output_token", "power_w",
          "overhead_pct")


def reported_metrics(measures: tuple[str, ...]) -> tuple[str, ...]:
    """The per-batch metric names a runtime with these `measures` can report (`bench/<name>/bs<n>`)."""
    return (*measures, *(FROM_TPOT if "tpot_ms" in measures else ()), *ALWAYS)


@dataclass
class Sample:
    """One timed call: when it started, when each new token existed, and the tokens."""

    started: float
    stamps: list[float]  # seconds since `started`, one per generated token (one, the end, for a call timed whole)
    new_tokens: int  # generated per request (checked against the forced length)
    extra: dict = field(default_factory=dict)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def prompts(batch: int, input_tokens, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (seeded), `input_tokens` long or drawn from {mean, stdev} (at least 1)."""
    import random

    rng = random.Random(seed * 1_000_003 + batch)
    lengths = [input_tokens if isinstance(input_tokens, int)
               else max(1, round(rng.gauss(input_tokens.mean, input_tokens.stdev))) for _ in range(batch)]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def _left_padded(batch: list[list[int]], pad: int, device: str):
    import torch

    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    return ids, mask


def _on_host_clock(origin, events, ended: float) -> list[float]:
    """Seconds of each CUDA event after `origin` (timed on the device), shifted onto the host's
    clock so that the last one falls at `ended` (seconds since the call started, after the sync)."""
    offsets = [origin.elapsed_time(e) / 1000 for e in events]
    return [o + ended - offsets[-1] for o in offsets]


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100): numpy's default method."""
    import numpy as np

    return float(np.percentile(values, q))


def summarize(samples: list[Sample], batch: int, input_tokens: int, output_tokens: int,
              measures: tuple[str, ...] = REQUEST_METRICS + TOKEN_METRICS) -> dict[str, float]:
    """Per-batch metrics from the timed samples: medians over repeats, p90/p99 where a metric is a
    distribution (TTFT, end-to-end over repeats; inter-token latency over every token of every repeat).
    Only the `measures` the runtime declares; ITL and TPOT need two tokens or more (one token has no decode)."""
    unknown = set(measures) - set(REQUEST_METRICS + TOKEN_METRICS)
    if unknown or not set(REQUEST_METRICS) <= set(measures):
        raise ValueError(f"a runtime measures at least {REQUEST_METRICS}, of {TOKEN_METRICS}; got {measures}")
    if set(measures) & set(TOKEN_METRICS) and any(len(s.stamps) != output_tokens for s in samples):
        raise ValueError(f"per-token metrics need one stamp per token: {[len(s.stamps) for s in samples]} stamps "
                         f"for {output_tokens} tokens")
    e2e = [s.stamps[-1] for s in samples]
    distributions = [("e2e_ms", e2e)]
    if "ttft_ms" in measures:
        distributions.insert(0, ("ttft_ms", [s.stamps[0] for s in samples]))
    if "itl_ms" in measures and output_tokens > 1:
        distributions.append(("itl_ms", [b - a for s in samples for a, b in zip(s.stamps, s.stamps[1:], strict=False)]))
    out: dict[str, float] = {}
    for name, values in distributions:
        out[name] = statistics.median(values) * 1000
        out[f"{name}_p90"] = percentile(values, 90) * 1000
        out[f"{name}_p99"] = percentile(values, 99) * 1000
    if "tpot_ms" in measures and output_tokens > 1:
        out["tpot_ms"] = statistics.median((s.stamps[-1] - s.stamps[0]) / (output_tokens - 1) for s in samples) * 1000
    median_e2e = statistics.median(e2e)
    out["output_tok_s"] = batch * output_tokens / median_e2e
    out["total_tok_s"] = batch * (input_tokens + output_tokens) / median_e2e
    out["requests_s"] = batch / median_e2e
    out["e2e_spread_pct"] = 100 * (max(e2e) - min(e2e)) / median_e2e
    energy = [s.extra["energy_j"] for s in samples if "energy_j" in s.extra]
    if len(energy) == len(samples):
        out["energy_j_per_output_token"] = statistics.median(energy) / (batch * output_tokens)
        out["power_w"] = statistics.median(j / s.stamps[-1] for j, s in zip(energy, samples, strict=True))
    return out


def measure(runtime, batch: list[list[int]], output_tokens: int, warmup: int, repeats: int,
            on_call: Callable[[], None] = lambda: None, gpu=None,
            after_warmup: Callable[[], None] = lambda: None) -> list[Sample]:
    """Warm-up calls, then `after_warmup()`, then `repeats` timed calls; each call's output length is
    checked. With an NVML `gpu`, each timed sample carries the joules the board drew during it
    (`extra["energy_j"]`)."""
    runtime.prepare(batch, output_tokens)
    for _ in range(warmup):
        runtime.run(batch, output_tokens)
        on_call()
    after_warmup()
    samples = []
    for _ in range(repeats):
        before = gpu.energy_j() if gpu is not None else None
        sample = runtime.run(batch, output_tokens)  # returns after the device is synchronised
        after = gpu.energy_j() if gpu is not None else None
        if sample.new_tokens != output_tokens:
            raise RuntimeError(f"{runtime.name} generated {sample.new_tokens} tokens, not the forced {output_tokens}")
        if before is not None and after is not None:
            sample.extra["energy_j"] = after - before
        samples.append(sample)
        on_call()
    return samples


def bare_loop(runtime, batch: list[list[int]], output_tokens: int, repeats: int, device: str) -> float:
    """Median seconds of the same calls timed with nothing but a synchronisation around them: the
    reference for the measurement's own overhead."""
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        runtime.run(batch, output_tokens, stamped=False)
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# --- memory and bandwidth -----------------------------------------------------------------------


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a decoder's attention cache."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, heads, head_dim


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Keys and values of one token over all layers: 2 x layers x kv heads x head dim x bytes."""
    layers, heads, head_dim = kv_shape(config)
    return 2 * layers * heads * head_dim * dtype_bytes


def copy_bandwidth(device: str, size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), median of `repeats`."""
    import torch

    n = size_bytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - started)
    return 2 * n * 4 / statistics.median(times)
