"""Text records for calibration and evaluation: a local file or a hub dataset, one list of strings.

How a file becomes records: a `.jsonl` line or a `.json` list item is one record (its `text_field`);
a `.txt` file is a document, split into records only at blank lines (paragraphs), with the line
breaks inside a paragraph kept. Records are then joined into one token stream with EOS between
them, so a record boundary must be a real boundary of the text: splitting a `.txt` file at every
line put an end-of-sequence token at each line break (on a held-out model, perplexity read 143
where the model's true figure was about 30, and GPTQ calibrated on that stream lost to RTN).
"""

from __future__ import annotations

import json
import random
import re

from llmopt.recipe import DatasetSpec


def load_texts(spec: DatasetSpec, limit: int | None = None) -> list[str]:
    """Non-empty text records in file order; `limit` keeps the first N."""
    if spec.path is not None:
        texts = _local_texts(spec)
    elif spec.embedded is not None:
        from llmopt.embedded import stories

        texts = stories(spec.split)
    else:
        import datasets

        ds = datasets.load_dataset(spec.hub, spec.config, split=spec.split)
        if spec.text_field not in ds.column_names:
            raise ValueError(f"dataset {spec.hub} has no column {spec.text_field!r} (columns: {ds.column_names})")
        texts = ds[spec.text_field]
    texts = [t for t in texts if t.strip()]
    return texts[:limit] if limit is not None else texts


def _local_texts(spec: DatasetSpec) -> list[str]:
    text = spec.path.read_text(encoding="utf-8")
    if spec.path.suffix == ".txt":
        return txt_records(text)
    if spec.path.suffix == ".jsonl":
        return [json.loads(line)[spec.text_field] for line in text.splitlines() if line.strip()]
    return [record[spec.text_field] for record in json.loads(text)]


def txt_records(text: str) -> list[str]:
    """A text document's paragraphs: split at blank lines (whitespace-only lines count as blank),
    each keeping its own line breaks."""
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if p.strip()]


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """All records as one token stream: BOS first (if the tokenizer has one), EOS between records."""
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids


def calibration_windows(tokenizer, texts: list[str], num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets of the token stream."""
    stream = token_stream(tokenizer, texts)
    if len(stream) < seq_len:
        raise ValueError(f"calibration data has {len(stream)} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(stream) - seq_len + 1) for _ in range(num_samples)]
    return [stream[s : s + seq_len] for s in starts]
