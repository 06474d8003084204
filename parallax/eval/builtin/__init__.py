"""Built-in evaluation tasks, generated from the built-in corpus and shipped with parallax.

``load_task("pydoc_cloze")`` loads one by name; README.md in this folder says how each was made.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent
BUILTIN_TASKS: tuple[str, ...] = ("pydoc_perplexity", "pydoc_cloze", "pydoc_qa", "pydoc_title")


def builtin_task_path(name: str) -> Path:
    """The YAML file of built-in task ``name``; a ValueError listing the names otherwise."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"task: {name!r} is not a built-in task; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_DIR / f"{name}.yaml"
