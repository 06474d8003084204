"""Write the synthetic instruction data of the fine-tuning demo (``python -m parallax.finetune.demo.make_data``).

Three skills, each a prompt/completion pair whose answer is a pure function of the prompt, so
held-out exact match measures whether the model learnt the skill rather than the items (adding
two numbers below 50 was tried and dropped: the 0.8M-parameter demo model reached 0.08 held-out
exact match after 2000 full fine-tuning steps, while reversal and passage QA were above 0.9 after
1000):

* reverse: ``Reverse: kotab`` -> ``batok`` (3-5 lowercase letters);
* uppercase: ``Uppercase: kotab`` -> ``KOTAB`` (3-6 lowercase letters);
* passage QA: ``Passage: Mia has a red kite. Question: What color is the kite?`` -> ``red``
  (a name, a colour and an object drawn from small lists; the question asks for one of the three).

Items are drawn with ``random.Random(0)``; the held-out prompts never occur in the training set.
Every prompt ends with ``\\nAnswer:`` and every completion starts with a space, so the eval task
(``heldout.yaml``: greedy generation until a newline, exact match) scores the model exactly as it
was trained.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Amy", "Jon"]
COLORS = ["red", "blue", "green", "pink", "gray", "gold", "black", "white"]
OBJECTS = ["kite", "ball", "hat", "car", "cup", "box", "bike", "book", "lamp", "coat"]
TRAIN_PER_SKILL = 1200
HELDOUT_PER_SKILL = 50


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    return f"Reverse: {word}", word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"Uppercase: {word}", word.upper()


def _passage_qa(rng: random.Random) -> tuple[str, str]:
    name, color, thing = rng.choice(NAMES), rng.choice(COLORS), rng.choice(OBJECTS)
    question, answer = rng.choice([(f"What color is the {thing}?", color), (f"Who has the {thing}?", name),
                                   (f"What does {name} have?", thing)])
    return f"Passage: {name} has a {color} {thing}. Question: {question}", answer


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "uppercase": _uppercase, "passage_qa": _passage_qa}


def make_rows(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, held-out rows): {"skill", "prompt", "completion"}, disjoint prompts."""
    rng = random.Random(seed)
    heldout: dict[str, dict[str, str]] = {}
    train: dict[str, dict[str, str]] = {}
    for skill, draw in SKILLS.items():
        for target, count in ((heldout, HELDOUT_PER_SKILL), (train, TRAIN_PER_SKILL)):
            made = 0
            while made < count:
                prompt, answer = draw(rng)
                prompt += "\nAnswer:"
                if prompt in heldout or prompt in train:
                    continue
                target[prompt] = {"skill": skill, "prompt": prompt, "completion": " " + answer}
                made += 1
    rows = list(train.values())
    random.Random(seed + 1).shuffle(rows)
    return rows, list(heldout.values())


def main() -> None:
    train, heldout = make_rows()
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
