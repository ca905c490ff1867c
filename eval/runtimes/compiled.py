"""`transformers-compiled`: a static KV cache, the prefill run eagerly, and a one-token decode step
compiled with `torch.compile(mode="reduce-overhead")` (CUDA graphs) in a lean loop, so the decode has
no per-token Python overhead beyond one graph replay. CUDA only.

The eager prefill costs TTFT: a 7B's at batch 1 was 25-52 ms for the same bf16 model in three H200
runs (kernel launches from Python). Compiling the prefill too was tried (session 8): its tokens
matched `generate` on an H200 (the cache must then be made eagerly, `early_initialization`, or the
decode graph finds the prefill graph's cache tensors overwritten), but a 7B benchmark with it (AWQ
candidate and bf16 base, batches 1/8/32) did not finish in 350 s where the eager-prefill one took
264 s, and its timings were never compared: it stays eager until they are."""

from __future__ import annotations

import time

from llmopt.eval.bench import REQUEST_METRICS, TOKEN_METRICS, Sample, _left_padded, _on_host_clock, sync
from llmopt.eval.runtimes import Runtime


class CompiledRuntime(Runtime):
    """Static cache; eager prefill; compiled one-token decode step (CUDA graphs) in a lean loop,
    timed with CUDA events recorded after each step (one synchronisation at the end)."""

    name = "transformers-compiled"
    summary = "static KV cache, compiled decode step with CUDA graphs (CUDA only)"
    measures = REQUEST_METRICS + TOKEN_METRICS
    cuda_only = True

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
        self.tokens = tokens[:, :, 0].t()  # [bs, out]: the last run's greedy tokens (what the tests compare)
        return Sample(started, _on_host_clock(events[0], events[1:], ended), tokens.shape[0])
