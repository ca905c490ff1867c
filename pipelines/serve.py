"""`python -m llmopt.serve SPEC.json`: `transformers serve` (OpenAI-compatible, continuous batching
with a paged KV cache) hosting a model that llmopt loaded, so that a quantized artifact serves on
the same fast kernels the benchmark measured (llmopt.kernels), not on the format library's reload.

It is transformers' own server (its app, handlers and continuous-batching manager), with three
additions made in this process only:
- the model comes from `llmopt.kernels.load_accelerated` (load, then the fast kernel; the spec names the
  artifact, device, dtype and kernel), pinned as the server's one model;
- `/v1/completions` accepts `ignore_eos` (load generators force the output length with it; stock
  `transformers serve` rejects the field with 422);
- `GET /llmopt/stats`: the paged KV cache (blocks, block size, bytes reserved, peak blocks in use,
  sampled every 20 ms), the process's peak GPU memory, the weights' bytes as served (after the
  kernel packed them), and the CUDA graphs continuous batching has captured so far, with the host
  seconds they took (one per padded step shape, captured when a step first meets it: a capture
  inside a timed load point lands in that point's latency tails).

The spec (written by the benchmark stage) is JSON: {"artifact": {"path", "kind", "info"}, "device",
"dtype", "trust_remote_code", "kernel", "cache_root", "model_name", "host", "port", "options"}, where
options are `transformers serve`'s own (continuous_batching, compile, attn_implementation) and the
fields of its ContinuousBatchingConfig as `cb_<field>` (block_size, use_cuda_graph, and those its
command line lacks: q/kv_padding_interval_size, use_async_batching, default_compile_level, ...).
`/llmopt/stats` also reports the batching config as resolved (what auto-detection chose).
It exits on SIGTERM or SIGINT, stopping the batching thread first.

A spec with `"engine": "llmopt"` serves the model with llmopt's own engine instead (llmopt.engine:
rows of a static cache, the compiled runtime's decode step, every CUDA graph captured at start-up;
`engine_options`: slots, max_prompt_tokens, max_new_tokens), behind the same endpoints.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time
from pathlib import Path


class _Stats:
    """The paged cache's size and its peak use, polled while the server runs."""

    def __init__(self, serve):
        self.serve, self.peak_used_blocks = serve, 0
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _manager(self):
        return getattr(getattr(self.serve._generation_state, "_cb_manager", None), "_cb", None)

    def _cache(self):
        return getattr(getattr(self._manager(), "batch_processor", None), "cache", None)

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            cache = self._cache()
            if cache is not None:
                self.peak_used_blocks = max(self.peak_used_blocks, cache.num_blocks - cache.get_num_free_blocks())

    def report(self) -> dict:
        import torch

        out: dict = {}
        cache = self._cache()
        if cache is not None:
            reserved = sum(t.numel() * t.element_size() for t in [*cache.key_cache, *cache.value_cache])
            out.update({"kv_blocks": cache.num_blocks, "kv_block_size": cache.block_size, "kv_bytes_reserved": reserved,
                        "kv_blocks_used_peak": self.peak_used_blocks,
                        "kv_bytes_used_peak": reserved * self.peak_used_blocks / max(cache.num_blocks, 1)})
        config = getattr(self._manager(), "continuous_batching_config", None)
        if config is not None:  # as resolved: what auto-detection chose (CUDA graphs, async batching, paddings)
            fields = ("block_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch", "use_cuda_graph",
                      "use_async_batching", "q_padding_interval_size", "kv_padding_interval_size",
                      "default_compile_level", "max_blocks_per_request", "scheduler_type")
            out["batching"] = {k: getattr(config, k, None) for k in fields}
        if torch.cuda.is_available():
            out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out


class _Graphs:
    """The CUDA graphs transformers' continuous batching captured, and the host seconds the captures
    took (its ModelRunner._capture_graph, wrapped: one call a new padded step shape)."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        self._lock = threading.Lock()

    def watch(self) -> bool:
        """Count every capture from now on in this process; False where this transformers has no
        capture step to wrap (nothing is then reported)."""
        try:
            from transformers.generation.continuous_batching.model_runner import ModelRunner
        except ImportError:
            return False
        capture = getattr(ModelRunner, "_capture_graph", None)
        if capture is None:
            return False

        @functools.wraps(capture)
        def counted(runner, *args, **kwargs):
            started = time.perf_counter()
            result = capture(runner, *args, **kwargs)
            with self._lock:
                self.count += 1
                self.seconds += time.perf_counter() - started
            return result

        ModelRunner._capture_graph = counted
        return True

    def report(self) -> dict:
        with self._lock:
            return {"graphs_captured": self.count, "graph_capture_s": self.seconds}


def _patch_transformers(model, tokenizer) -> None:
    """Pin llmopt's model in transformers' model manager and accept `ignore_eos` on completions."""
    from transformers.cli.serving import completion, model_manager

    class LlmoptModelManager(model_manager.ModelManager):
        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            return model

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return tokenizer

    class Params(completion.TransformersTextCompletionCreateParams, total=False):
        ignore_eos: bool

    class LlmoptCompletionHandler(completion.CompletionHandler):
        _valid_params_class = Params

        def _build_generation_config(self, body, model_generation_config, use_cb=False):
            config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
            if body.get("ignore_eos"):
                config.min_new_tokens = config.max_new_tokens
                if use_cb:  # the batching manager takes eos per request; -1 matches no token
                    config.eos_token_id = -1
            return config

    model_manager.ModelManager = LlmoptModelManager
    completion.CompletionHandler = LlmoptCompletionHandler


def _serve_engine(spec: dict, model, tokenizer, applied) -> int:
    """llmopt.engine behind the same API and stats; dense q/k/v and gate/up stacked first, as the
    compiled runtime runs a model (the quantized kernels already are)."""
    import torch
    from llmopt import engine
    from llmopt.kernels.linear import fuse_dense
    from llmopt.models import in_memory_bytes

    fused = fuse_dense(model)

    def extra() -> dict:
        # the weights as now held: dense_prefill_tokens auto drops the codes it kept where no prefill runs dense
        figures = {"kernel": applied.tag(), "weights_bytes": in_memory_bytes(model), "fused_dense_groups": fused}
        if torch.cuda.is_available():
            figures.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                           peak_reserved_bytes=torch.cuda.max_memory_reserved())
        return figures

    return engine.serve(spec, model, tokenizer, extra)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from llmopt import kernels
    from llmopt.cache import Artifact
    from llmopt.models import in_memory_bytes, load_tokenizer

    artifact = Artifact(Path(spec["artifact"]["path"]), spec["artifact"]["kind"], {}, spec["artifact"]["info"])
    started = time.perf_counter()
    model, applied = kernels.load_accelerated(artifact, spec["device"], spec["dtype"], spec.get("trust_remote_code", False),
                                              spec.get("kernel", "auto"), spec["cache_root"],
                                              spec.get("engine_options", {}).get("dense_prefill_tokens", 0))
    weights = in_memory_bytes(model)  # as served: packed by the kernel (an RTN artifact is stored dequantized)
    tokenizer = load_tokenizer(artifact.path, spec.get("trust_remote_code", False))  # every artifact keeps its tokenizer
    print(f"llmopt.serve: model loaded in {time.perf_counter() - started:.1f} s; kernel {applied.tag()}", flush=True)
    if spec.get("engine") == "llmopt":
        return _serve_engine(spec, model, tokenizer, applied)
    _patch_transformers(model, tokenizer)
    from transformers.cli.serve import Serve

    options = dict(spec.get("options", {}))
    batching = {k.removeprefix("cb_"): options.pop(k) for k in list(options) if k.startswith("cb_")}
    serve = Serve(force_model=spec["model_name"], device=spec["device"], host=spec.get("host", "127.0.0.1"),
                  port=int(spec["port"]), non_blocking=True, log_level="warning", **options)
    if batching:  # the whole config, not only the fields Serve's command line takes (read when the first request comes)
        from transformers import ContinuousBatchingConfig

        if not hasattr(serve._generation_state, "_cb_config"):  # a transformers other than 5.17's layout: never ignore them
            raise RuntimeError(f"llmopt.serve: this transformers serve keeps no _cb_config; cannot apply {sorted(batching)}")
        serve._generation_state._cb_config = ContinuousBatchingConfig(**batching)
    stats, graphs = _Stats(serve), _Graphs()
    watched = graphs.watch()
    app = serve.server.config.app
    app.add_api_route("/llmopt/stats", lambda: {**stats.report(), **(graphs.report() if watched else {}),
                                                "kernel": applied.tag(), "weights_bytes": weights}, methods=["GET"])

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    while not stopping.wait(0.5):
        if not serve._thread.is_alive():  # uvicorn stopped by itself (a port taken meanwhile, ...)
            print("llmopt.serve: the HTTP server stopped", file=sys.stderr, flush=True)
            serve.kill_server()
            return 1
    stats._stop.set()
    serve.kill_server()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
