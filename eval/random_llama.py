"""A Llama of a given shape with random bf16 weights, for GPU tests and the 7B benchmarks
(`benchmarks/reference_7b.py`, `benchmarks/serve_7b.py`): real sizes and kernels without
downloading a model."""

from __future__ import annotations

from pathlib import Path


def random_llama(path: Path, device: str = "cuda", **shape) -> Path:
    """A Llama of the given shape with random bf16 weights (seed 0) and the embedded tokenizer,
    saved to `path` unless it is there already; GPU memory is released afterwards.

    Its vocabulary keeps the shape's 32000 rows, but the tokenizer has some 500 tokens (1024 asked of
    2000 stories). The output rows of every id that decodes to no text (past the tokenizer, special,
    or a lone byte of a multi-byte character) are zero, so greedy decoding picks tokens that decode
    to text. Otherwise a server, which streams text deltas, holds them back: on an H200 such a model
    streamed 256 tokens in 2-3 chunks, and the load generator's TTFT and ITL timed chunks, not tokens."""
    import torch
    from llmopt.embedded import stories, train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, **shape)).to(torch.bfloat16)
    tokenizer = train_tokenizer(stories("train")[:2000], 1024)
    silent = torch.ones(model.config.vocab_size, dtype=torch.bool)
    silent[[i for i in range(len(tokenizer)) if visible(tokenizer.decode([i], skip_special_tokens=True))]] = False
    with torch.no_grad():
        model.lm_head.weight[silent.to(model.lm_head.weight.device)] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # later work (the cases, in child processes) needs the GPU
    return path


def visible(text: str) -> bool:
    """Whether a token's text shows: not empty, and not a stray byte of a multi-byte character."""
    return bool(text) and "\ufffd" not in text
