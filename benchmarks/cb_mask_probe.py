"""Probe (GPU, not a test): does the size of transformers' continuous-batching buffers set its step time?

With sdpa's paged attention the batching IO holds an attention mask of max_batch_tokens x (KV pages +
max_batch_tokens) elements; with async batching that mask lives in pinned host memory and is copied
whole to the GPU every step (transformers 5.17, `ContinuousBatchingIOs._transfer_inputs`). For a 7B
on an H200 the auto-sized cache gave 8192 x 181k bf16 elements, about 3 GB a step. This script runs
`generate_batch` on a random 7B (bf16, no HTTP server) with the auto-sized buffers and with small
ones, async and not, (512 batch tokens, 128 blocks of 256), 1, 8 and 32 requests of 128 tokens in, 128 out, and prints
the wall time per decoding step of each (second of two runs; the first captures the CUDA graphs).

    python benchmarks/cb_mask_probe.py OUT.json [CONFIG ...]

Further configurations (named on the command line) tune the small async one: `-compile1` adds
transformers' default compile level 1 (inductor, dynamic shapes, on the varlen path), `-nocudnn`
turns off cuDNN's SDPA backend for the run (benchmarks/cb_step_profile.py found cuDNN's masked
attention at ~57 us a layer for 16 queries over 2k keys).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "auto-async": dict(use_cuda_graph=True, use_async_batching=True, kv_padding_interval_size=2048,
                       q_padding_interval_size=16),
    "small-async": dict(use_cuda_graph=True, use_async_batching=True, kv_padding_interval_size=2048,
                        q_padding_interval_size=16, num_blocks=128, max_batch_tokens=512),
    "auto-sync": dict(use_cuda_graph=True, use_async_batching=False, kv_padding_interval_size=2048,
                      q_padding_interval_size=16),
    "small-sync": dict(use_cuda_graph=True, use_async_batching=False, kv_padding_interval_size=2048,
                       q_padding_interval_size=16, num_blocks=128, max_batch_tokens=512),
}
CONFIGS["small-async-compile1"] = {**CONFIGS["small-async"], "default_compile_level": 1}
CONFIGS["small-async-nocudnn"] = {**CONFIGS["small-async"], "cudnn_sdp": False}
CONFIGS["small-async-compile1-nocudnn"] = {**CONFIGS["small-async-compile1"], "cudnn_sdp": False}


def random_7b_and_prompts(n: int, steps: int) -> tuple[LlamaForCausalLM, GenerationConfig, list[list[int]]]:
    """A Llama-shaped 7B with random bf16 weights on the GPU (seed 0; in memory, no tokenizer: the probes
    read tokens, not text), a greedy config forcing `steps` new tokens, and `n` prompts of 128 tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=-1, pad_token_id=0)
    return model, gen, torch.randint(100, 31000, (n, 128)).tolist()


def main(out: str, names: list[str]) -> None:
    model, gen, prompts = random_7b_and_prompts(32, 128)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name in names or ["auto-async", "small-async", "auto-sync", "small-sync"]:
        options = dict(CONFIGS[name])
        torch.backends.cuda.enable_cudnn_sdp(options.pop("cudnn_sdp", True))
        row = {}
        for n in (1, 8, 32):
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                started = time.perf_counter()
                cb = ContinuousBatchingConfig(**options)  # transformers resolves auto settings in place
                done = model.generate_batch(prompts[:n], generation_config=gen, continuous_batching_config=cb)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            tokens = sum(len(o.generated_tokens) for o in done.values())
            row[f"n{n}"] = {"wall_s": times, "tokens": tokens, "ms_per_step": 1000 * times[-1] / 128,
                            "tok_s": tokens / times[-1]}
            row[f"n{n}"]["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            print(name, n, row[f"n{n}"], flush=True)
        row["resolved"] = {k: getattr(cb, k) for k in ("num_blocks", "max_batch_tokens", "use_async_batching", "block_size")
                           if hasattr(cb, k)}
        results[name] = row
        torch.cuda.empty_cache()
        with open(out, "w") as f:  # after each configuration: a call that runs out of time keeps what finished
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
