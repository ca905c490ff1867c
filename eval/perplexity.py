"""Perplexity with a sliding window: every token is scored once, with up to `seq_len` of context.

Windows of `seq_len` tokens advance by `stride`; in each window only the tokens not scored by the
previous window count, so a smaller stride gives each token more context (and costs more
forward passes). `stride == seq_len` is the usual non-overlapping evaluation.
"""

from __future__ import annotations

import math

from llmopt.eval.backends import Backend


def perplexity(model, token_ids: list[int], seq_len: int, stride: int, batch_size: int = 1,
               progress: bool = True, reference=None) -> dict[str, float]:
    """Perplexity of `model` on `token_ids`; with a `reference` model, also the mean per-token
    KL(reference || model) in nats on the same scored tokens: how far the model's next-token
    distribution moved from the reference's, a direct and more sensitive measure of the damage
    done by quantization than a perplexity difference."""
    import torch
    from llmopt.progress import progress_bar

    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens of evaluation text")
    windows = _windows(len(token_ids), seq_len, stride)
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, device=device)
    total_nll = total_kl = 0.0
    total_tokens = 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with torch.inference_mode(), progress_bar(len(batches), "perplexity", enabled=progress) as advance:
        for batch in batches:
            # Windows of one batch share a length (only the last window may be shorter).
            for group in _same_length(batch):
                inputs = torch.stack([ids[b:e] for b, e, _ in group])
                # a window scores its tokens from its first scored one on; those before are context only
                scored = torch.stack([torch.arange(b, e, device=device) >= first for b, e, first in group])
                logprobs = next_token_logprobs(model(input_ids=inputs).logits)
                nll, count = scored_nll(logprobs, inputs, scored)
                total_nll += nll
                total_tokens += count
                if reference is not None:
                    ref = next_token_logprobs(reference(input_ids=inputs.to(next(reference.parameters()).device)).logits)
                    ref = ref.to(logprobs.device)
                    token_kl = (ref.exp() * (ref - logprobs)).sum(-1)
                    total_kl += token_kl[scored[:, 1:]].double().sum().item()
            advance(ppl=f"{math.exp(total_nll / max(total_tokens, 1)):.3f}")
    if total_tokens != len(token_ids) - 1:
        raise AssertionError(f"scored {total_tokens} tokens, expected {len(token_ids) - 1}")
    nll = total_nll / total_tokens
    result = {"ppl": math.exp(nll), "nll": nll, "tokens": float(total_tokens), "windows": float(len(windows))}
    if reference is not None:
        result["kl"] = total_kl / total_tokens
    return result


def next_token_logprobs(logits):
    """Log-probabilities of the next token: position p of the result predicts token p + 1."""
    import torch

    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def scored_nll(logprobs, ids, scored) -> tuple[float, int]:
    """(summed negative log-likelihood, count) of the tokens of `ids` where `scored` is true, under
    `logprobs` from next_token_logprobs; a row's first token has no prediction and never counts.
    The perplexity over them is exp(nll / count). Also the distill stage's held-out perplexity
    (its padding not scored)."""
    targets = scored[:, 1:].bool()
    token_nll = -logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return token_nll[targets].double().sum().item(), int(targets.sum())


def _windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) per window: every token but the first is scored once.

    The first window scores all its tokens but the first; each later one scores the next
    `stride` tokens (at most seq_len - 1, so the first of them still has a token of context)
    and fills the rest of its `seq_len` with the tokens before them.
    """
    windows: list[tuple[int, int, int]] = []
    scored_up_to = 1
    while scored_up_to < n_tokens:
        new = seq_len - 1 if not windows else min(stride, seq_len - 1)
        end = min(scored_up_to + new, n_tokens)
        windows.append((max(0, end - seq_len), end, scored_up_to))
        scored_up_to = end
    return windows


def _same_length(batch: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    groups: dict[int, list] = {}
    for window in batch:
        groups.setdefault(window[1] - window[0], []).append(window)
    return list(groups.values())


def _metrics(cfg) -> tuple[set[str], set[str]]:
    return {f"quality/{n}" for n in ("ppl", "ppl_base", "ppl_delta_pct", "kl_base", "nll", "eval_tokens")}, set()


BACKEND = Backend("perplexity", lambda cfg: cfg.perplexity is not None, (), _metrics)
