"""A Llama of a given shape with random bf16 weights, for GPU tests and the reference benchmark
(`benchmarks/reference_7b.py`): real sizes and kernels without downloading a model."""

from __future__ import annotations

from pathlib import Path


def random_llama(path: Path, **shape) -> Path:
    """A Llama of the given shape with random bf16 weights (seed 0) and the embedded tokenizer,
    saved to `path` unless it is there already; GPU memory is released afterwards."""
    import torch
    from llmopt.embedded import stories, train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, **shape)).to(torch.bfloat16)
    model.save_pretrained(path)
    train_tokenizer(stories("train")[:2000], 1024).save_pretrained(path)
    del model
    torch.cuda.empty_cache()  # later work (the cases, in child processes) needs the GPU
    return path
