"""Varied documents for the quality-filter agreement tests: the built-in corpus (Python's reference
manual topics) plus seeded perturbations of its prose paragraphs that land on every Gopher/C4 rule:
repeated lines, bullets, trailing ellipses, hashes, boilerplate lines, short and long documents."""

from __future__ import annotations

import random
import re

from parallax.data import builtin_documents

_BOILERPLATE = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "Please enable JavaScript to view this page.",
    "We use cookies to improve your experience on our site.",
    "See the privacy policy and the terms of use for details.",
    "The literal x = {1: 2} is a dictionary display.",
    "Citations like this one [1] and this one [edit] are removed.",
)


def varied_documents(n: int = 300, seed: int = 0) -> list[str]:
    """The 79 built-in documents then ``n - 79`` perturbed ones; deterministic for a seed."""
    rng = random.Random(seed)
    docs = builtin_documents()
    paras = []
    for d in docs:
        for p in re.split(r"\n{2,}", d):
            p = p.strip()
            letters = sum(c.isalpha() or c.isspace() for c in p)
            if p and not p.startswith(("*", "=", "-", "+")) and letters > 0.93 * len(p):
                paras.append(p)
    out = list(docs)
    while len(out) < n:
        ps = [rng.choice(paras) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.6:
            ps = [re.sub(r"\s*\n\s*", " ", p) for p in ps]  # unwrap: one line per paragraph
        t = "\n\n".join(ps)
        mode = rng.randrange(12)
        if mode == 1:
            lines = t.split("\n")
            t = "\n".join(lines + rng.choices(lines, k=rng.randint(1, len(lines))))
        elif mode == 2:
            t = "\n".join(("- " if rng.random() < 0.9 else "") + line for line in t.split("\n"))
        elif mode == 3:
            t = "\n".join(line + ("..." if rng.random() < 0.4 else "") for line in t.split("\n"))
        elif mode == 4:
            t = t.replace(" the ", " #the ", rng.randint(1, 30))
        elif mode == 5:
            t += "\n" + rng.choice(_BOILERPLATE)
        elif mode == 6:
            t = " ".join(t.split()[: rng.randint(20, 80)]) + "."
        elif mode == 7:
            t = " ".join([t.split(". ")[0]] * rng.randint(2, 6))
        elif mode == 8:
            t = t.replace(" ", " 12 ", rng.randint(5, 60))
        elif mode == 9:
            t += " " + " ".join(rng.choice(("to be or not", "that is the question", "and so on and so forth"))
                                for _ in range(rng.randint(1, 20)))
        elif mode == 10:
            t = "\n".join(s + "." for s in t.split(". "))
        out.append(t)
    return out
