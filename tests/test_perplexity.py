"""Sliding-window perplexity: every token scored exactly once, and equal to the model's own loss."""

from __future__ import annotations

import math

import pytest
import torch
from llmopt.eval.perplexity import _windows, perplexity


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(10, 4, 4), (10, 4, 2), (3, 8, 8), (1000, 128, 64),
                                                       (1001, 128, 128), (129, 128, 1)])
def test_windows_score_every_token_once_with_context(n, seq_len, stride):
    windows = _windows(n, seq_len, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in windows:
        assert end - begin <= seq_len and begin < first, "each scored token has at least one token of context"


@pytest.fixture(scope="module")
def random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_one_window_equals_the_models_loss(random_llama):
    ids = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = math.exp(random_llama(input_ids=ids[None], labels=ids[None]).loss.item())
    result = perplexity(random_llama, ids.tolist(), seq_len=64, stride=64, progress=False)
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == 59


def test_batching_does_not_change_the_result(random_llama):
    ids = torch.randint(0, 97, (500,), generator=torch.Generator().manual_seed(2)).tolist()
    one = perplexity(random_llama, ids, seq_len=32, stride=16, batch_size=1, progress=False)
    many = perplexity(random_llama, ids, seq_len=32, stride=16, batch_size=7, progress=False)
    assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    assert one["tokens"] == 499


def test_an_untrained_model_is_near_uniform(random_llama):
    ids = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    assert perplexity(random_llama, ids, seq_len=64, stride=64, progress=False)["ppl"] == pytest.approx(97, rel=0.1)
