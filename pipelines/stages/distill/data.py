"""The training data: blocks of `seq_len` tokens (packed, or one padded record each), the held-out
split, and which blocks each step trains on."""

from __future__ import annotations

from llmopt.data import load_texts, token_stream
from llmopt.recipe import Distill


def make_blocks(cfg: Distill, tokenizer):
    """((train ids, mask), (eval ids, mask)), blocks of `seq_len`: packed from the token stream (mask
    all ones), or one record per block, right-padded (mask 0 on the padding)."""
    import torch

    data = cfg.data

    def blocks(spec):
        texts = load_texts(spec, limit=data.max_samples)
        if data.packing:
            stream = token_stream(tokenizer, texts)
            n = len(stream) // data.seq_len
            ids = torch.tensor(stream[: n * data.seq_len]).view(n, data.seq_len)
            return ids, torch.ones_like(ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = [token_stream(tokenizer, [t])[: data.seq_len] for t in texts]
        ids = torch.tensor([r + [pad] * (data.seq_len - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (data.seq_len - len(r)) for r in rows])
        return ids, mask

    train_ids, train_mask = blocks(data.dataset)
    if data.eval_dataset is not None:
        held_out = blocks(data.eval_dataset)
    else:
        n_eval = max(1, int(len(train_ids) * data.eval_fraction))
        held_out = train_ids[-n_eval:], train_mask[-n_eval:]
        train_ids, train_mask = train_ids[:-n_eval], train_mask[:-n_eval]
    if len(train_ids) < cfg.train.micro_batch_size:
        raise ValueError(f"data: {len(train_ids)} training blocks of {data.seq_len} tokens, fewer than one "
                         f"micro-batch ({cfg.train.micro_batch_size})")
    return (train_ids, train_mask), held_out


def step_rows(n_blocks: int, cfg: Distill, step: int, micro: int, rank: int = 0, world: int = 1):
    """Block indices of rank `rank`'s share of micro-batch (step, micro). The global micro-batch
    (`micro_batch_size` rows per rank) is a slice of a seeded permutation per epoch, so it is a
    function of (seed, step) alone: resume needs no RNG state, and N processes train on the
    same rows as one process with an N times larger micro-batch."""
    import torch

    size = cfg.train.micro_batch_size * world
    position = (step * cfg.train.grad_accum + micro) * size
    epoch, offset = divmod(position, n_blocks // size * size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch))
    share = cfg.train.micro_batch_size
    return order[offset + rank * share : offset + (rank + 1) * share]
