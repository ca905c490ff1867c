"""`transformers-eager`: `model.generate` with the dynamic cache."""

from __future__ import annotations

import time

from llmopt.eval.bench import REQUEST_METRICS, TOKEN_METRICS, Sample, _left_padded, _on_host_clock, sync
from llmopt.eval.runtimes import Runtime


class EagerRuntime(Runtime):
    """`generate` with the dynamic cache, greedy, EOS suppressed until the forced length."""

    name = "transformers-eager"
    summary = "transformers `generate`, dynamic KV cache (CPU or CUDA)"
    measures = REQUEST_METRICS + TOKEN_METRICS

    def __init__(self, model, device: str):
        self.model, self.device = model, device

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
