"""The embedded default model: a small Llama trained here, offline, on a generated corpus.

It exists so that `make recipe=tiny-int4` runs on a fresh machine with no hub access and still
reports perplexity deltas that mean something: the model has learned the corpus (its perplexity
is far below the uniform baseline), so quantization error shows up as a real degradation.

The corpus is short stories generated from templates by a seeded RNG: names that recur within a
story, agreement of pronouns, and small sums ("3 apples and 4 more, so 7 apples") give a model
structure to learn. The same generator writes the data files under eval/data/tiny-stories/,
and a test checks that the shipped files are exactly what it produces.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

NAMES = [
    ("Anna", "she", "her"), ("Ben", "he", "his"), ("Cara", "she", "her"), ("Dan", "he", "his"),
    ("Eva", "she", "her"), ("Finn", "he", "his"), ("Gina", "she", "her"), ("Hugo", "he", "his"),
    ("Iris", "she", "her"), ("Jack", "he", "his"), ("Lena", "she", "her"), ("Max", "he", "his"),
    ("Nora", "she", "her"), ("Omar", "he", "his"), ("Pia", "she", "her"), ("Sam", "he", "his"),
]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "horse", "duck", "frog"]
ADJECTIVES = ["small", "happy", "quiet", "brave", "old", "clever", "sleepy", "friendly"]
PLACES = ["park", "river", "garden", "market", "forest", "beach", "school", "farm"]
THINGS = ["apples", "stones", "books", "shells", "flowers", "coins", "cards", "eggs"]
COLORS = ["red", "blue", "green", "yellow", "white", "brown"]
FEELINGS = ["happy", "tired", "proud", "surprised", "calm", "excited"]
SPLITS = {"train": (0, 6000), "calibration": (6000, 6400), "validation": (6400, 6800), "tasks": (7000, 7400)}


def _story(rng: random.Random) -> str:
    name, subj, poss = rng.choice(NAMES)
    friend, _, _ = rng.choice([n for n in NAMES if n[0] != name])
    animal, adj, place = rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(PLACES)
    thing, color = rng.choice(THINGS), rng.choice(COLORS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    sentences = [
        f"{name} had a {adj} {animal}.",
        f"One day, {name} and {poss} {animal} went to the {place}.",
        f"At the {place}, {subj} met {friend}.",
        f"{friend} had {a} {color} {thing} and found {b} more, so {friend} had {a + b} {color} {thing}.",
        f"{name} asked for one, and {friend} gave {name} one of the {thing}.",
        f"Now {friend} had {a + b - 1} {thing} left.",
        f"The {animal} was {rng.choice(FEELINGS)}, and {name} was {rng.choice(FEELINGS)} too.",
        f"In the evening, {name} went home with {poss} {animal}.",
    ]
    keep = [s for i, s in enumerate(sentences) if i in (0, 1, 3, 7) or rng.random() < 0.7]
    return " ".join(keep)


def stories(split: str) -> list[str]:
    """The stories of one split, identical on every machine (seeded per story index)."""
    start, stop = SPLITS[split]
    return [_story(random.Random(1000003 * i + 17)) for i in range(start, stop)]


def write_corpus(dest: Path, splits: tuple[str, ...] = ("calibration", "validation")) -> list[Path]:
    """Write splits as JSON-lines files with a `text` field; returns the paths. The repository ships
    calibration and validation (the model trains on `train`, generated in memory)."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in splits:
        path = dest / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories(split)))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Everything that decides the embedded model's weights; its hash is the model's cache key."""

    vocab_size: int = 1024
    # Deep and narrow on purpose: quantization error compounds with depth, so 4-bit rounding costs
    # this model measurably more than it costs a shallow one of the same size.
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 700
    learning_rate: float = 4e-3
    weight_decay: float = 0.0
    seed: int = 0
    version: int = 2  # bump when the corpus or the training loop changes

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return "tiny-llama-" + hashlib.sha256(blob).hexdigest()[:16]


EMBEDDED_MODELS = {"tiny-llama": TinyLlamaSpec()}
CONTEXT = 512  # max_position_embeddings of the embedded model (trained on 128-token windows)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def build_tiny_llama(spec: TinyLlamaSpec, out: Path, progress: bool = True) -> dict:
    """Train the tiny model on the train split and save it (safetensors) with its tokenizer."""
    import torch
    from llmopt.data import token_stream
    from llmopt.progress import progress_bar
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    texts = stories("train")
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    ids = token_stream(tokenizer, texts)  # the same packing evaluation and distillation use
    n_windows = len(ids) // spec.seq_len
    data = torch.tensor(ids[: n_windows * spec.seq_len]).view(n_windows, spec.seq_len)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.learning_rate, total_steps=spec.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    with progress_bar(total=spec.steps, description="training embedded tiny-llama", enabled=progress) as advance:
        for _ in range(spec.steps):
            batch = data[torch.randint(0, n_windows, (spec.batch_size,), generator=generator)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            advance(loss=f"{loss.item():.3f}")
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {"spec": asdict(spec), "final_train_loss": loss.item(), "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "llmopt_embedded.json").write_text(json.dumps(info, indent=2))
    tmp.rename(out)
    return info
