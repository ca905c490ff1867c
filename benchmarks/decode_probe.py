"""Probe (GPU, not a test): where a compiled decode step of a 7B spends the time that is not its
weights' matrix products, and which compile settings shorten it.

On an H200 the compiled runtime decoded the bf16 7B at batch 1 in 4.95 ms a token, 0.66-0.69 of the
copy roofline (issue 14 asks 0.70), and Marlin int4 in 2.69 ms (1.79x, asked 1.8x). The decode-shaped
products alone sum to about 3.7 ms (bf16) and 1.7 ms (int4, `benchmarks/kernels_micro.py`), so about
1 ms a token is neither: norms, rotary embedding, cache writes, attention, and the mask. Shortening it
helps both targets.

Each case names a model and a variant, and optionally a batch size (`@32`; default 1), `bf16:base`,
`int4:coord`, `int4:base@32`, ...: the random 7B in bf16 (as
transformers runs it: the runtime's fusion of dense siblings turned off), `bf16fused` (its q/k/v and
gate/up as one product each, as the compiled runtime now runs every model and the int4 kernels ran
them from the start), or a copy of it rounded to 4 bits, group 128, symmetric (llmopt's `rtn`) and run by Marlin with q/k/v and
gate/up fused, as `kernel: auto` runs the README's int4 case (Marlin is built in the background
meanwhile, into the temporary directory); `int4machete` the same copy on Machete (`kernel: machete`,
Hopper; LLMOPT_MACHETE_LIBRARY names a prebuilt library, or it builds). Each case compiles the
runtime's decode step anew and times its batch (128 tokens in, 256 out, warm-up 1, median TPOT of 3,
CUDA events), all in one process on one card:
- `base`: the committed `transformers-compiled` runtime;
- `coord`: inductor's coordinate-descent tuning of its generated kernels (gpt-fast sets it);
- `nomask`: the decode step gets no attention mask (a batch without padding needs none: the static
  cache's causal mask comes from `cache_position`); tokens are checked against `base`'s;
- `coord-nomask`: both.
After each `base` case, a torch profile of one call (kernels by GPU time).

    python benchmarks/decode_probe.py OUT_DIR [MODEL:VARIANT[@BATCH] ...]
    python benchmarks/decode_probe.py OUT_DIR prefill    (the eager prefill of both models, timed and profiled)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from llmopt.eval.bench import measure, prompts, summarize
from llmopt.eval.runtimes.compiled import CompiledRuntime

VARIANTS = {
    "base": dict(inductor={}, mask=True),
    "coord": dict(inductor={"coordinate_descent_tuning": True}, mask=True),
    "nomask": dict(inductor={}, mask=False),
    "coord-nomask": dict(inductor={"coordinate_descent_tuning": True}, mask=False),
}


class Variant(CompiledRuntime):
    """The committed runtime with inductor settings patched in while it compiles, and optionally no
    mask in the decode step."""

    def __init__(self, model, device: str, inductor: dict, mask: bool, fuse: bool = True):
        super().__init__(model, device, fuse)
        self.inductor, self.mask = inductor, mask

    def prepare(self, batch, output_tokens):
        super().prepare(batch, output_tokens)
        if not self.mask:
            compiled = self.step
            self.step = lambda token, position_ids, cache_position, mask: compiled(token, position_ids,
                                                                                      cache_position, None)

    def run(self, batch, output_tokens, stamped=True):
        with torch._inductor.config.patch(self.inductor):
            return super().run(batch, output_tokens, stamped)


CASES = ["bf16:base", "bf16:coord", "int4:base", "int4:coord", "bf16:coord-nomask", "int4:coord-nomask"]


def int4_copy(model, cache: Path, build, kernel: str = "marlin", device: str = "cuda", group_size: int = 128):
    """A deep copy of `model` rounded to 4 bits (group 128, symmetric) and swapped to Marlin, fused,
    through llmopt's `rtn` fast path (it reads the grid back from the rounded weights)."""
    import copy
    from types import SimpleNamespace

    from llmopt.methods.rtn import Rtn, fake_quantize

    if build is not None:
        build.wait()
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, 4, group_size, True))
    from llmopt.kernels import prepare

    prepare(kernel, cache)
    artifact = SimpleNamespace(info={"kernel_spec": {"bits": 4, "group_size": group_size, "sym": True}})
    quantized, layers = Rtn.fast_path(quantized, artifact, device, kernel)
    print(f"int4: {layers} {kernel} layers", flush=True)
    return quantized


def fused_copy(model):
    """A deep copy of the bf16 `model` whose sibling layers (q/k/v, gate/up) run as one product on their
    stacked weights (`llmopt.kernels.linear.fuse_dense`, which the compiled runtime now applies to every
    model it runs): the same arithmetic, fewer and larger cuBLAS calls. Is the bf16 base's gap to int4
    partly its 7 calls a layer?"""
    import copy

    from llmopt.kernels.linear import fuse_dense

    fused = copy.deepcopy(model)
    fuse_dense(fused)
    return fused


def main(out: Path, names: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cb_mask_probe import random_7b_and_prompts
    from reference_7b import prewarm_marlin

    out.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.gettempdir()) / "decode-probe-cache"
    build = prewarm_marlin(cache, out / "marlin-build.log")
    models = {"bf16": random_7b_and_prompts(1, 1)[0]}
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": {}}
    references: dict = {}
    for case in names or CASES:
        kind, _, rest = case.partition(":")
        name, _, size = rest.partition("@")
        bs = int(size or 1)
        batch = prompts(bs, 128, models["bf16"].config.vocab_size, seed=0)
        if kind not in models:
            models[kind] = (fused_copy(models["bf16"]) if kind == "bf16fused" else
                            int4_copy(models["bf16"], cache, build, kernel="machete" if kind == "int4machete" else "marlin"))
        started = time.perf_counter()
        # `bf16` stays as transformers runs it: the runtime's own fusion is off for it alone
        runtime = Variant(models[kind], "cuda", **VARIANTS[name], fuse=kind != "bf16")
        samples = measure(runtime, batch, 256, warmup=1, repeats=3)
        figures = summarize(samples, bs, 128, 256)
        reference = references.setdefault((kind, bs), runtime.tokens)
        results["cases"][case] = {"tpot_ms": figures["tpot_ms"], "output_tok_s": figures["output_tok_s"],
                                  "ttft_ms": figures["ttft_ms"], "tokens_equal_first": torch.equal(runtime.tokens, reference),
                                  "wall_s": round(time.perf_counter() - started, 1)}
        print(case, json.dumps(results["cases"][case]), flush=True)
        (out / "decode_probe.json").write_text(json.dumps(results, indent=1))
        if name == "base":
            profile(runtime, batch, out / f"decode_profile_{kind}{'' if bs == 1 else f'_bs{bs}'}.txt")


def profile(runtime, batch, path: Path) -> None:
    """Kernels of one timed call by GPU time, and their sum a decode step (255 steps and the prefill)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runtime.run(batch, 256)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total_us = sum(e.self_device_time_total for e in kernels)
    path.write_text(f"GPU kernel time of one call, all kernels: {total_us / 1000:.1f} ms "
                    f"({total_us / 256:.0f} us a token)\n\n{table}\n")
    print(f"profile: {total_us / 1000:.1f} ms of kernels a call; top kernels in {path.name}", flush=True)
    print("\n".join(table.splitlines()[:25]), flush=True)




def prefill_probe(out: Path) -> None:
    """Eager prefill (the compiled runtime's, batch 1, 128 tokens, static cache) of the bf16 7B and its
    Marlin int4 copy: host and GPU milliseconds (medians of 10 after 3 warm-ups), and each one's torch
    profile by host time. In the README's runs int4's TTFT at batch 1 was 47-61 ms against bf16's 26-27."""
    import statistics

    from transformers import StaticCache

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cb_mask_probe import random_7b_and_prompts
    from reference_7b import prewarm_marlin

    out.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.gettempdir()) / "decode-probe-cache"
    build = prewarm_marlin(cache, out / "marlin-build.log")
    bf16 = random_7b_and_prompts(1, 1)[0]
    models = {"bf16": bf16, "int4": int4_copy(bf16, cache, build)}
    ids = torch.tensor(prompts(1, 128, bf16.config.vocab_size, seed=0), device="cuda")
    results: dict = {"gpu": torch.cuda.get_device_name(0), "prefill": {}}
    for kind, model in models.items():
        static = StaticCache(config=model.config, max_cache_len=384)
        positions = torch.arange(128, device="cuda")

        def prefill(model=model, static=static, positions=positions):
            with torch.no_grad():
                static.reset()
                return model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions[None],
                             cache_position=positions, past_key_values=static, use_cache=True).logits

        host, gpu = [], []
        for i in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            began = time.perf_counter()
            start.record()
            prefill()
            end.record()
            launched = time.perf_counter() - began
            torch.cuda.synchronize()
            if i >= 3:
                host.append(launched * 1000)
                gpu.append(start.elapsed_time(end))
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill()
            torch.cuda.synchronize()
        kernels = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
        results["prefill"][kind] = {"host_launch_ms": statistics.median(host), "event_ms": statistics.median(gpu),
                                    "kernel_ms": kernels / 1000}
        print(kind, json.dumps(results["prefill"][kind]), flush=True)
        (out / f"prefill_profile_{kind}.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
        (out / "prefill_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[2:] == ["prefill"]:
        prefill_probe(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
