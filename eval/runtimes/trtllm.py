"""`trtllm`: the TensorRT-LLM LLM API, where `tensorrt_llm` is importable: every request of the batch
streamed at once (`generate_async(..., streaming=True)`), each token timed on the host clock when it
reaches this process (client-side times: they include the executor's hand-off, not device events)."""

from __future__ import annotations

import time

from llmopt.eval.bench import REQUEST_METRICS, TOKEN_METRICS, Sample
from llmopt.eval.runtimes import Runtime


class TrtllmRuntime(Runtime):
    """TensorRT-LLM's LLM API on a bundle's model (`llmopt.export.trtllm.loadable`: checkpoint/, or
    engine/ with tokenizer/) or an HF checkpoint. A timed call submits every request of the batch with
    `generate_async(..., streaming=True)` and reads the host clock each time a request's output grows
    (`outputs[0].token_ids` is cumulative; one update may bring several tokens): a token's stamp is
    when the last request of the batch had it, as the runtimes above stamp a batch's step. A bare
    call (`stamped=False`) is one non-streaming `generate` of the batch."""

    name = "trtllm"
    summary = "TensorRT-LLM's LLM API, streamed (CUDA only; needs tensorrt_llm)"
    measures = REQUEST_METRICS + TOKEN_METRICS
    cuda_only = True
    libraries = ("tensorrt_llm",)
    loads_model = False  # the LLM API loads a bundle's checkpoint/ (or engine/ with tokenizer/), or an HF checkpoint

    @classmethod
    def open(cls, model, path, device: str, info: dict) -> TrtllmRuntime:
        return cls(path, device)

    def __init__(self, path, device: str):
        import asyncio
        from pathlib import Path

        from llmopt.export.trtllm import loadable
        from tensorrt_llm import LLM

        found = loadable(Path(path))
        self.llm = LLM(model=str(found.model), **({"tokenizer": str(found.tokenizer)} if found.tokenizer else {}))
        self.loop = asyncio.new_event_loop()  # one loop for every call: the requests' result queues live on it

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
