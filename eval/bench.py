"""Latency and throughput of text generation, measured honestly.

One measurement = one batch of requests generated to a forced length (EOS ignored, verified on
the outputs). Each timed call is preceded by a device synchronisation and every per-token
timestamp marks the point the device produced the token: a CUDA event recorded in the stream
after each step (in the compiled loop, and from a logits-processor hook inside `generate`), read after
the one synchronisation at the end, so timing adds no synchronisation per token. Warm-up calls
(compilation, CUDA graph capture, allocator growth) run before the timed ones, with the same
shapes.

Runtimes:
- `transformers-eager`: `model.generate` with the dynamic cache.
- `transformers-compiled`: a static KV cache, the prefill run eagerly, and a one-token decode step
  compiled with `torch.compile(mode="reduce-overhead")` (CUDA graphs) in a lean loop, so the
  decode has no per-token Python overhead beyond one graph replay. CUDA only.
- `trtllm`: the TensorRT-LLM LLM API, where `tensorrt_llm` is importable: every request of the batch
  streamed at once (`generate_async(..., streaming=True)`), each token timed on the host clock when it
  reaches this process (client-side times: they include the executor's hand-off, not device events).

Each runtime declares the metrics it measures (`measures`): `REQUEST_METRICS` (whole-call times and
throughput) always, `TOKEN_METRICS` (TTFT, ITL, TPOT) only where it sees each token arrive. Only the
declared ones are computed and reported; the roofline needs a measured TPOT.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RUNTIMES = ("transformers-eager", "transformers-compiled", "trtllm")
CUDA_ONLY = ("transformers-compiled", "trtllm")
# what `summarize` computes: from the time each whole call took, and from the time each token arrived
REQUEST_METRICS = ("e2e_ms", "e2e_ms_p90", "e2e_ms_p99", "output_tok_s", "total_tok_s", "requests_s", "e2e_spread_pct")
TOKEN_METRICS = ("ttft_ms", "ttft_ms_p90", "ttft_ms_p99", "itl_ms", "itl_ms_p90", "itl_ms_p99", "tpot_ms")


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


class EagerRuntime:
    """`generate` with the dynamic cache, greedy, EOS suppressed until the forced length."""

    name = "transformers-eager"
    measures = REQUEST_METRICS + TOKEN_METRICS

    def __init__(self, model, device: str):
        self.model, self.device = model, device

    def prepare(self, batch: list[list[int]], output_tokens: int) -> None:
        pass

    def run(self, batch: list[list[int]], output_tokens: int, stamped: bool = True) -> Sample:
        import torch

        pad = self.model.config.pad_token_id
        pad = pad if pad is not None else 0
        ids, mask = _left_padded(batch, pad, self.device)
        cuda = self.device.startswith("cuda")
        marks: list = []  # per new token: a CUDA event recorded on the stream (no synchronisation), or a host time

        from transformers import LogitsProcessor, LogitsProcessorList

        class Stamp(LogitsProcessor):
            """Called once per new token, after that step's forward, with the scores still on the
            device (a streamer would get them copied to the host: a synchronisation per token)."""

            def __call__(self, input_ids, scores):
                if cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    marks.append(event)
                else:
                    marks.append(time.perf_counter())
                return scores

        sync(self.device)
        started = time.perf_counter()
        if cuda:
            origin = torch.cuda.Event(enable_timing=True)
            origin.record()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=output_tokens, min_new_tokens=output_tokens,
                do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([Stamp()] if stamped else []))
        sync(self.device)
        ended = time.perf_counter() - started
        if not stamped:
            stamps = [ended]
        elif cuda:
            stamps = _on_host_clock(origin, marks, ended)
        else:
            stamps = [m - started for m in marks]
        stamps[-1] = max(stamps[-1], ended)
        return Sample(started, stamps, out.shape[1] - ids.shape[1])


class CompiledRuntime:
    """Static cache; eager prefill; compiled one-token decode step (CUDA graphs) in a lean loop,
    timed with CUDA events recorded after each step (one synchronisation at the end)."""

    name = "transformers-compiled"
    measures = REQUEST_METRICS + TOKEN_METRICS

    def __init__(self, model, device: str):
        if not device.startswith("cuda"):
            raise ValueError("transformers-compiled needs CUDA (CUDA graphs)")
        self.model, self.device = model, device
        self._shape = None

    def prepare(self, batch: list[list[int]], output_tokens: int) -> None:
        """(Re)build the static cache and the compiled step for this batch shape."""
        import torch
        from transformers import StaticCache

        shape = (len(batch), max(len(p) for p in batch), output_tokens)
        if shape == self._shape:
            return
        self._shape = shape
        bs, width, out = shape
        self.cache = StaticCache(config=self.model.config, max_cache_len=width + out)
        model = self.model

        def step(token, position_ids, cache_position, mask):
            logits = model(input_ids=token, position_ids=position_ids, cache_position=cache_position,
                           attention_mask=mask, past_key_values=self.cache, use_cache=True).logits
            return logits[:, -1].argmax(-1, keepdim=True)

        torch._dynamo.reset()
        self.step = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def run(self, batch: list[list[int]], output_tokens: int, stamped: bool = True) -> Sample:
        import torch

        bs, width, out = self._shape
        pad = self.model.config.pad_token_id or 0
        ids, prompt_mask = _left_padded(batch, pad, self.device)
        with torch.no_grad():
            self.cache.reset()
        mask = torch.ones(bs, width + out, dtype=torch.long, device=self.device)
        mask[:, :width] = prompt_mask
        lengths = prompt_mask.sum(-1, keepdim=True)
        prefill_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        decode_positions = [lengths + i for i in range(out)]  # made before the clock starts
        cache_positions = [torch.tensor([width + i], device=self.device) for i in range(out)]
        tokens = torch.empty(out, bs, 1, dtype=torch.long, device=self.device)  # step i's input is tokens[i - 1]
        events = [torch.cuda.Event(enable_timing=True) for _ in range(out + 1)]
        sync(self.device)
        started = time.perf_counter()
        events[0].record()
        with torch.no_grad():  # not inference_mode: the static cache's tensors are reset in place between calls
            logits = self.model(input_ids=ids, attention_mask=mask[:, :width], position_ids=prefill_positions,
                                cache_position=torch.arange(width, device=self.device), past_key_values=self.cache,
                                use_cache=True).logits
            tokens[0] = logits[:, -1].argmax(-1, keepdim=True)
            events[1].record()
            for i in range(1, out):
                # the graph's output buffer is reused by the next replay: copy each token out at once
                torch.compiler.cudagraph_mark_step_begin()
                tokens[i] = self.step(tokens[i - 1], decode_positions[i - 1], cache_positions[i - 1], mask)
                events[i + 1].record()
        sync(self.device)
        ended = time.perf_counter() - started
        return Sample(started, _on_host_clock(events[0], events[1:], ended), tokens.shape[0])


class TrtllmRuntime:
    """TensorRT-LLM's LLM API on a bundle's model (`llmopt.export.trtllm.loadable`: checkpoint/, or
    engine/ with tokenizer/) or an HF checkpoint. A timed call submits every request of the batch with
    `generate_async(..., streaming=True)` and reads the host clock each time a request's output grows
    (`outputs[0].token_ids` is cumulative; one update may bring several tokens): a token's stamp is
    when the last request of the batch had it, as the runtimes above stamp a batch's step. A bare
    call (`stamped=False`) is one non-streaming `generate` of the batch."""

    name = "trtllm"
    measures = REQUEST_METRICS + TOKEN_METRICS

    def __init__(self, path, device: str):
        import asyncio
        from pathlib import Path

        from llmopt.export.trtllm import loadable
        from tensorrt_llm import LLM

        found = loadable(Path(path))
        self.llm = LLM(model=str(found.model), **({"tokenizer": str(found.tokenizer)} if found.tokenizer else {}))
        self.loop = asyncio.new_event_loop()  # one loop for every call: the requests' result queues live on it

    def prepare(self, batch, output_tokens: int) -> None:
        pass

    def run(self, batch: list[list[int]], output_tokens: int, stamped: bool = True) -> Sample:
        import asyncio

        from tensorrt_llm import SamplingParams

        params = SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True, temperature=0)
        prompts = [{"prompt_token_ids": p} for p in batch]
        if not stamped:
            started = time.perf_counter()
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            ended = time.perf_counter() - started
            return Sample(started, [ended], min(len(o.outputs[0].token_ids) for o in outputs))
        arrived: list[list[float]] = [[] for _ in batch]  # per request: when each of its tokens arrived

        async def stream(i: int) -> None:
            async for output in self.llm.generate_async(prompts[i], params, streaming=True):
                now = time.perf_counter() - started
                arrived[i] += [now] * (len(output.outputs[0].token_ids) - len(arrived[i]))

        async def together() -> None:
            await asyncio.gather(*(stream(i) for i in range(len(batch))))

        started = time.perf_counter()
        self.loop.run_until_complete(together())
        ended = time.perf_counter() - started
        produced = min(len(a) for a in arrived)
        stamps = [max(a[k] for a in arrived) for k in range(produced)] or [ended]
        stamps[-1] = max(stamps[-1], ended)
        return Sample(started, stamps, produced)


def make_runtime(name: str, model, path, device: str):
    if name == "transformers-eager":
        return EagerRuntime(model, device)
    if name == "transformers-compiled":
        return CompiledRuntime(model, device)
    return TrtllmRuntime(path, device)


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
            on_call: Callable[[], None] = lambda: None, gpu=None) -> list[Sample]:
    """Warm-up calls, then `repeats` timed calls; each call's output length is checked. With an
    NVML `gpu`, each timed sample carries the joules the board drew during it (`extra["energy_j"]`)."""
    runtime.prepare(batch, output_tokens)
    for _ in range(warmup):
        runtime.run(batch, output_tokens)
        on_call()
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


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Keys and values of one token over all layers: 2 x layers x kv heads x head dim x bytes."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * dtype_bytes


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
