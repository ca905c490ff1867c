"""The shipped evaluation data: a real-language corpus and local lm-eval tasks, all offline.

Real language (for SmolLM2, the default model), from the prose of Python's own documentation as
every CPython ships it in `pydoc_data/topics.py` (the "Language Reference" topics behind `help()`;
Python Software Foundation License 2.0, see eval/data/python-docs/SOURCE.md). Paragraphs of prose
only (no code blocks, grammar rules or headings), line breaks reflowed; one record per topic. The
topics are assigned to splits by a seeded shuffle of their names:
- `train` (calibration and distillation data, half the topics), `validation` (perplexity, a fifth),
  `tasks` (the docs tasks, the rest) are disjoint topics: held-out text is never used for calibration (a test checks no paragraph
  and no 12-word run is shared).
- `docs_cloze` (multiple choice, loglikelihood): the first part of a held-out sentence, and four
  endings: its own and three endings of other held-out sentences. Chance is 25%.
- `docs_lastword` (completion, loglikelihood): a held-out sentence up to its last word; `acc` is
  whether greedy decoding writes exactly that word (LAMBADA's metric), `perplexity` its perplexity.
- `facts` (multiple choice): statements written by hand (eval/facts.py), four completions each.

topics.py differs between Python versions: the files are written from the one named in SOURCE.md,
and the test that regenerates them runs where that exact file is present.

The tiny tasks (for the tiny test model) come from the same story generator it was trained on,
from a split it never saw (`tasks`, stories 7000-7399), with a seeded RNG.

- `tiny_sums` (multiple choice, loglikelihood): "... Ben had 3 red apples and found 4 more, so Ben
  had" -> which of four numbers follows (the sum, and three near misses). Chance is 25%.
- `tiny_sums_gen` (generation, exact match): the same prompts, greedy decoding, the first number
  generated against the sum.
- `tiny_stories_rolling` (rolling loglikelihood): whole stories; word/byte perplexity and bits
  per byte, the lm-eval counterpart of the perplexity stage.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DOCS_DIR = Path(__file__).resolve().parent / "data" / "python-docs"
N_SUMS = 200
N_STORIES = 100
N_CLOZE = 120
N_LASTWORD = 150
SPLIT_SEED = 20261128
# the topics.py the shipped files were written from (CPython 3.11.7)
TOPICS_SHA256 = "abaa56a64551d8eead1b19cbae3c6db443f99f0cab81df07bed3cb75c0db9346"


# --- the Python-docs corpus -----------------------------------------------------------------------


def topics_file() -> Path:
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__)


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one topic, each reflowed onto one line: indented blocks (code,
    grammar, lists), headings and short fragments are dropped."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.split("\n")
        if any(line.startswith(" ") for line in lines) or set(lines[-1].strip()) <= set("*=-^~"):
            continue
        flat = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines)).strip()
        if len(flat) >= 120 and flat.count('"') <= len(flat) / 25 and not flat.endswith(":"):
            out.append(flat)
    return out


def docs_splits() -> dict[str, list[dict]]:
    """{split: [{"topic", "text"}]}: train 50%, validation 20%, tasks 30% of the topics with prose."""
    import pydoc_data.topics

    topics = [(name, paras) for name in sorted(pydoc_data.topics.topics)
              if (paras := prose_paragraphs(pydoc_data.topics.topics[name]))]
    random.Random(SPLIT_SEED).shuffle(topics)
    n = len(topics)
    cut1, cut2 = round(0.5 * n), round(0.7 * n)
    splits = {"train": topics[:cut1], "validation": topics[cut1:cut2], "tasks": topics[cut2:]}
    # Some topics repeat a paragraph of another (notes shared by `def` and `function`, ...): a held-out
    # paragraph that shares a 12-word run with an earlier split's text is dropped from the held-out one.
    seen: set[tuple[str, ...]] = set()
    out: dict[str, list[dict]] = {}
    for split, chosen in splits.items():
        kept = []
        for name, paras in chosen:
            fresh = [p for p in paras if not word_runs(p) & seen] if split != "train" else paras
            if fresh:
                kept.append({"topic": name, "text": "\n\n".join(fresh)})
        for record in kept:
            seen |= word_runs(record["text"])
        out[split] = kept
    return out


def word_runs(text: str, n: int = 12) -> set[tuple[str, ...]]:
    """Every run of `n` consecutive words: what counts as shared text between splits."""
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _sentences(records: list[dict]) -> list[str]:
    """Whole sentences of plain prose, 10-40 words, from the records' paragraphs."""
    out = []
    for record in records:
        for paragraph in record["text"].split("\n\n"):
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
                words = sentence.split()
                if 8 <= len(words) <= 45 and sentence.endswith(".") and sentence.count('"') <= 2:
                    out.append(sentence)
    return out


def cloze_questions(records: list[dict], n: int = N_CLOZE) -> list[dict]:
    """The first ~60% of a sentence, and four endings: its own and three of other sentences."""
    rng = random.Random(SPLIT_SEED + 1)
    sentences = _sentences(records)
    split = []
    for sentence in sentences:
        words = sentence.split()
        cut = max(5, round(0.6 * len(words)))
        split.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    picked = rng.sample(range(len(split)), min(n, len(split)))
    docs = []
    for i in picked:
        context, ending = split[i]
        others = rng.sample([e for j, (_, e) in enumerate(split) if j != i and e != ending], 3)
        choices = [ending, *others]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "label": choices.index(ending)})
    return docs


def lastword_questions(records: list[dict], n: int = N_LASTWORD) -> list[dict]:
    """A sentence up to its last word, and that word (with its leading space, without the period)."""
    rng = random.Random(SPLIT_SEED + 2)
    docs = []
    for sentence in _sentences(records):
        head, _, last = sentence[:-1].rpartition(" ")
        if last.isalpha() and len(last) >= 3:
            docs.append({"context": head, "target": " " + last})
    return rng.sample(docs, min(n, len(docs)))


def fact_questions() -> list[dict]:
    from llmopt.eval.facts import FACTS

    rng = random.Random(SPLIT_SEED + 3)
    docs = []
    for statement, (right, *wrong) in FACTS:
        choices = [right, *wrong]
        rng.shuffle(choices)
        docs.append({"context": statement, "choices": choices, "label": choices.index(right)})
    return docs


def write_docs(data_dir: Path = DOCS_DIR, tasks_dir: Path = TASKS_DIR) -> list[Path]:
    """Write the corpus splits and the data files of the docs tasks (their YAML is written by hand)."""
    splits = docs_splits()
    files: dict[Path, list[dict]] = {data_dir / f"{name}.jsonl": rows for name, rows in splits.items()}
    files[tasks_dir / "docs" / "cloze.jsonl"] = cloze_questions(splits["tasks"])
    files[tasks_dir / "docs" / "lastword.jsonl"] = lastword_questions(splits["tasks"])
    files[tasks_dir / "facts" / "facts.jsonl"] = fact_questions()
    for path, rows in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return list(files)


def topics_match() -> bool:
    """Whether this Python's topics.py is the one the shipped files were written from."""
    return hashlib.sha256(topics_file().read_bytes()).hexdigest() == TOPICS_SHA256


# --- the tiny tasks ---------------------------------------------------------------------------------


def sum_questions(n: int = N_SUMS) -> list[dict]:
    """Story openings ending in a sum to complete, each with four choices (label: the right one)."""
    from llmopt.embedded import ADJECTIVES, ANIMALS, COLORS, NAMES, PLACES, SPLITS, THINGS

    start = SPLITS["tasks"][0]
    docs = []
    for i in range(n):
        rng = random.Random(1000003 * (start + i) + 29)
        name, subj, poss = rng.choice(NAMES)
        friend = rng.choice([x for x in NAMES if x[0] != name])[0]
        animal, adj, place = rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(PLACES)
        thing, color = rng.choice(THINGS), rng.choice(COLORS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        context = (f"{name} had a {adj} {animal}. One day, {name} and {poss} {animal} went to the {place}. "
                   f"At the {place}, {subj} met {friend}. {friend} had {a} {color} {thing} and found {b} more, "
                   f"so {friend} had")
        answer = a + b
        wrong = [x for x in (answer - 1, answer + 1, a, b, answer + 2, answer - 2) if x > 0 and x != answer]
        choices = [answer, *list(dict.fromkeys(wrong))[:3]]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": [str(c) for c in choices], "label": choices.index(answer),
                     "answer": str(answer)})
    return docs


def write_tasks(dest: Path = TASKS_DIR) -> list[Path]:
    """Write the data files of the local tasks (the YAML files are written by hand)."""
    from llmopt.embedded import stories

    files = {
        dest / "tiny_sums" / "sums.jsonl": sum_questions(),
        dest / "tiny_stories_rolling" / "stories.jsonl": [{"text": t} for t in stories("tasks")[:N_STORIES]],
    }
    for path, rows in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return list(files)


if __name__ == "__main__":
    if not topics_match():
        sys.exit(f"{topics_file()} is not the topics.py the shipped files come from (sha256 {TOPICS_SHA256}); "
                 "writing from it would change the data: update TOPICS_SHA256 and SOURCE.md if that is intended")
    for path in [*write_tasks(), *write_docs()]:
        print(path)
