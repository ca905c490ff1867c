"""The local lm-eval tasks under eval/tasks/: small, offline, and meaningful for the embedded model.

They are built from the same story generator the embedded model was trained on, from a split it
never saw (`tasks`, stories 7000-7399), with a seeded RNG, so the files are identical on every
machine; `write_tasks` writes them and a test checks that the shipped files are what it writes.

- `tiny_sums` (multiple choice, loglikelihood): "... Ben had 3 red apples and found 4 more, so Ben
  had" -> which of four numbers follows (the sum, and three near misses). Chance is 25%.
- `tiny_sums_gen` (generation, exact match): the same prompts, greedy decoding, the first number
  generated against the sum.
- `tiny_stories_rolling` (rolling loglikelihood): whole stories; word/byte perplexity and bits
  per byte, the lm-eval counterpart of the perplexity stage.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
N_SUMS = 200
N_STORIES = 100


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
    for path in write_tasks():
        print(path)
