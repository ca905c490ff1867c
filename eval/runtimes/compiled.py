"""`transformers-compiled`: a static KV cache, the prefill replayed as a CUDA graph of the eager
model, and a one-token decode step compiled with `torch.compile(mode="reduce-overhead")` (CUDA
graphs) in a lean loop, so the decode has no per-token Python overhead beyond one graph replay. CUDA
only.

The prefill was run eagerly until 2026-11-29, and its TTFT was launch overhead: on an H200 a 7B's
prefill (batch 1, 128 tokens) took 24 ms of host time for 8 ms of kernels in bf16, and 45 ms for 10
in int4 (benchmarks/decode_probe.py). Compiling it was tried (session 8): its tokens matched
`generate` on an H200, but a 7B benchmark with it (AWQ candidate and bf16 base, batches 1/8/32) did
not finish in 350 s where the eager-prefill one took 264 s: compiling costs a minute a shape. So the
prefill is now the eager model captured once per batch shape in a `torch.cuda.CUDAGraph` (the cost
of one more eager call), then replayed. A captured call may not synchronise with the host, and
transformers, given a 2D mask, tests it on the host to decide whether it can skip the mask; so the
runtime makes the 4D mask itself, before the clock, with transformers' own `create_causal_mask`
(`prefill_inputs`), and the model, given a 4D mask, uses it as it is."""

from __future__ import annotations

import functools
import logging
import time

from llmopt.eval.bench import REQUEST_METRICS, TOKEN_METRICS, Sample, _left_padded, _on_host_clock, sync
from llmopt.eval.runtimes import Runtime

log = logging.getLogger("llmopt")


class CompiledRuntime(Runtime):
    """Static cache; the prefill a CUDA graph of the eager model; a compiled one-token decode step
    (CUDA graphs) in a lean loop, timed with CUDA events recorded after each step (one
    synchronisation at the end)."""

    name = "transformers-compiled"
    summary = "static KV cache, compiled decode step with CUDA graphs (CUDA only)"
    measures = REQUEST_METRICS + TOKEN_METRICS
    cuda_only = True

    def __init__(self, model, device: str, fuse: bool = True):
        if not device.startswith("cuda"):
            raise ValueError("transformers-compiled needs CUDA (CUDA graphs)")
        from llmopt.kernels.linear import fuse_dense

        # dense q/k/v and gate/up as one product each (in place), as serving stacks run them and as the
        # quantized kernels already do: a bf16 base is not handicapped by 7 calls a layer against their 4
        self.fused_groups = fuse_dense(model) if fuse else 0
        self.model, self.device = model, device
        self._shape = None

    def tags(self) -> dict[str, str]:
        return {"fused_dense_groups": str(self.fused_groups)}

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
        self.prefill = None  # captured on this shape's first run

    def run(self, batch: list[list[int]], output_tokens: int, stamped: bool = True) -> Sample:
        import torch

        bs, width, out = self._shape
        pad = self.model.config.pad_token_id or 0
        ids, prompt_mask = _left_padded(batch, pad, self.device)
        with torch.no_grad():
            self.cache.reset()
            inputs, capturable = prefill_inputs(self.model, self.cache, ids, prompt_mask)
            if self.prefill is None:
                self.prefill = (PrefillGraph if capturable else EagerPrefill)(self.model, self.cache, inputs)
                self.cache.reset()
            self.prefill.load(inputs)
        mask = torch.ones(bs, width + out, dtype=torch.long, device=self.device)
        mask[:, :width] = prompt_mask
        lengths = prompt_mask.sum(-1, keepdim=True)
        decode_positions = [lengths + i for i in range(out)]  # made before the clock starts
        cache_positions = [torch.tensor([width + i], device=self.device) for i in range(out)]
        tokens = torch.empty(out, bs, 1, dtype=torch.long, device=self.device)  # step i's input is tokens[i - 1]
        events = [torch.cuda.Event(enable_timing=True) for _ in range(out + 1)]
        sync(self.device)
        started = time.perf_counter()
        events[0].record()
        with torch.no_grad():  # not inference_mode: the static cache's tensors are reset in place between calls
            tokens[0] = self.prefill.replay()
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


@functools.cache
def _eager_prefill_warning(attention: str) -> None:
    log.warning("attention %r: no single 4D causal mask, so the compiled runtime's prefill runs eagerly, not as a "
                "CUDA graph (its TTFT then includes the prefill's kernel launches from Python)", attention)


def prefill_inputs(model, cache, ids, prompt_mask) -> tuple[dict, bool]:
    """The prefill's keyword arguments for a left-padded batch, and whether a CUDA graph can capture
    the call. Capturable: the attention mask is the one the model would make from `prompt_mask`
    (transformers' `create_causal_mask` over `cache`, freshly reset), but always made, as a 4D tensor:
    transformers skips a mask it can prove causal by testing the 2D mask on the host, which a CUDA
    graph cannot capture; given a 4D mask, the model makes none. Not capturable (the 2D mask, and a
    warning, once): an attention implementation that makes no 4D mask (flash attention takes the 2D
    one), or a model with sliding-window layers."""
    import torch
    from transformers.masking_utils import create_causal_mask

    inputs = {"input_ids": ids, "attention_mask": prompt_mask, "position_ids": (prompt_mask.cumsum(-1) - 1).clamp(min=0),
              "cache_position": torch.arange(ids.shape[1], device=ids.device)}
    text = model.config.get_text_config()
    if getattr(text, "sliding_window", None) or "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        # the model makes a sliding-window mask (or one per layer type) that one causal mask would replace
        _eager_prefill_warning(f"{model.config._attn_implementation}, with a sliding window")
        return inputs, False
    mask = create_causal_mask(config=model.config, inputs_embeds=model.get_input_embeddings()(ids),
                              attention_mask=prompt_mask, past_key_values=cache, position_ids=inputs["position_ids"],
                              allow_is_causal_skip=False)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        _eager_prefill_warning(model.config._attn_implementation)
        return inputs, False
    return {**inputs, "attention_mask": mask}, True


def first_tokens(model, cache, inputs: dict):
    """The prefill: `inputs` through the model into `cache`, the last token's logits only; each row's
    greedy first token."""
    logits = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


class EagerPrefill:
    """The prefill as a plain eager call (`PrefillGraph`'s interface), where it cannot be captured."""

    def __init__(self, model, cache, inputs: dict):
        self.model, self.cache, self.inputs = model, cache, inputs

    def load(self, inputs: dict) -> None:
        self.inputs = inputs

    def replay(self):
        return first_tokens(self.model, self.cache, self.inputs)


class PrefillGraph:
    """One batch shape's prefill (`first_tokens`) captured in a CUDA graph: a replay launches its ~1000
    kernels at once. Its inputs are static buffers that `load` fills; it writes the static cache in
    place, as the eager call does."""

    def __init__(self, model, cache, inputs: dict):
        import torch

        self.model, self.cache = model, cache
        self.inputs = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()  # warm-up off the capturing stream, as torch's graph capture asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                cache.reset()  # each call writes the prompt's slots from the start: a second would overrun a short cache
                first_tokens(model, cache, self.inputs)  # the first also allocates the static cache, outside the graph's pool
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.first = first_tokens(model, cache, self.inputs)

    def load(self, inputs: dict) -> None:
        for name, value in inputs.items():
            self.inputs[name].copy_(value)

    def replay(self):
        """Run the captured prefill (after `load` and a cache reset); the first new token of each row."""
        self.graph.replay()
        return self.first
