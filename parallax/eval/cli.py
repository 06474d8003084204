"""``parallax eval``: score a checkpoint or a Hugging Face directory on task files, or run the
security evaluation (``--suite safety``), print a table (task, metric, value, stderr) and write the
results as JSON; ``--compare a.json b.json`` prints two results files side by side."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["eval_main", "build_parser"]

log = logging.getLogger(__name__)


def build_parser(prog: str = "parallax eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Evaluate a parallax train checkpoint or a Hugging Face model directory on task "
                               "files written in lm-evaluation-harness's YAML vocabulary.",
        epilog="Exit status: 0 done, 2 bad arguments or input (nothing is written then).")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a checkpoint directory or a parallax train run directory")
    source.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory (with its tokenizer)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT-format adapter (LoRA or prefix, e.g. parallax finetune's "
                                                    "OUT/adapter) on the base model; alone: the base it names")
    p.add_argument("--tokenizer", default=None, help="byte or a tokenizer directory (default: the model's)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--tasks", help="comma-separated task files (.yaml)")
    what.add_argument("--suite", help="a built-in evaluation suite: safety (refusal, over-refusal, jailbreaks, "
                                          "bias, canary exposure with --canaries)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default 1234)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--output", help="write the results as JSON to this file (atomically)")
    safety = p.add_argument_group("--suite safety")
    safety.add_argument("--safety-prompts", metavar="HARMFUL.jsonl",
                        help="harmful requests, rows {category, prompt} (default: the shipped set)")
    safety.add_argument("--safety-benign", metavar="BENIGN.jsonl",
                        help="benign look-alike requests, rows {category, prompt} (default: the shipped set)")
    safety.add_argument("--jailbreaks", default=None,
                        help="attack templates: all (default), none, or comma-separated names")
    safety.add_argument("--prompt-format", default=None, help="plain (default: 'Request: ...\\nAnswer:') or chat "
                                                               "(the tokenizer's chat template)")
    safety.add_argument("--max-tokens", type=int, default=None, help="greedy tokens per completion (default 48)")
    safety.add_argument("--bias-pairs", metavar="PAIRS.jsonl",
                        help="paired sentences {category, stereotyped, anti_stereotyped} for the bias share "
                             "(default: the shipped set; 'none' skips the bias section)")
    safety.add_argument("--canaries", metavar="RUN|FILE",
                        help="measure the exposure of the canaries a run was trained with (RUN/canaries.json, "
                             "written by train/finetune --canaries)")
    safety.add_argument("--judge", metavar="DIR", help="a judge model (Hugging Face directory or checkpoint) "
                                                       "whose yes/no refusal verdicts are compared with the rules")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two results files side by side")
    return p


def eval_main(argv: list[str], prog: str = "parallax eval") -> int:
    """Entry point of ``parallax eval``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.compare:
            print(_compare(*(_read_results(p) for p in args.compare), *args.compare))
            return 0
        _check_suite_flags(args)
        if args.suite:
            return _run_suite(args)
        if not args.tasks:
            raise ValueError("--tasks: give one or more task files (comma-separated), or --suite safety")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit: expected a number of documents >= 1, got {args.limit}")
        from parallax.eval.tasks import load_task

        tasks = [load_task(t.strip()) for t in args.tasks.split(",") if t.strip()]  # all checked before the model
        model, tokenizer, source = _load(args)
        from parallax.eval.evaluate import evaluate

        start = time.perf_counter()
        out = evaluate(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                       batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
        out["config"] = {"model": source, "tasks": [str(t.path) for t in tasks], "num_fewshot": args.num_fewshot,
                         "limit": args.limit, "batch_size": args.batch_size, "seed": args.seed,
                         "seconds": round(time.perf_counter() - start, 3), "git": _git_revision()}
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(_table(out["results"]))
    if args.output:
        _write_atomically(Path(args.output), json.dumps(out, indent=2))
    return 0


SUITES = ("safety",)
_SAFETY_FLAGS = ("safety_prompts", "safety_benign", "jailbreaks", "prompt_format", "max_tokens", "judge", "bias_pairs",
                 "canaries")


def _check_suite_flags(args: argparse.Namespace) -> None:
    if args.suite is not None and args.suite not in SUITES:
        raise ValueError(f"--suite: expected one of {', '.join(SUITES)}, got {args.suite!r}")
    if args.suite is None:
        given = [name for name in _SAFETY_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')}: only with --suite safety")
    elif args.num_fewshot is not None or args.limit is not None:
        raise ValueError(f"--{'num-fewshot' if args.num_fewshot is not None else 'limit'}: only with --tasks")


def _run_suite(args: argparse.Namespace) -> int:
    """``--suite safety``: every input checked before the model loads; the table printed, the
    report written to --output."""
    from parallax.eval.lm import ParallaxLM
    from parallax.eval.safety.suite import default_classifier, format_table, report, run_suite

    harmful, benign, config, paths = _safety_inputs(args)
    inputs = _section_inputs(args, paths)
    classifier = default_classifier()
    model, tokenizer, source = _load(args)
    start = time.perf_counter()
    lm = ParallaxLM(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    if config.max_tokens >= lm.max_length:
        raise ValueError(f"--max-tokens: {config.max_tokens} leaves no room for a prompt in the model's "
                         f"{lm.max_length} positions")
    judge = None
    if args.judge is not None:
        from parallax.eval.safety.judge import RefusalJudge

        judge = RefusalJudge.from_dir(args.judge, device=str(lm.device), batch_size=args.batch_size)
    rows = run_suite(lm, harmful, benign, config=config, classifier=classifier, judge=judge, inputs=inputs)
    out = report(rows)
    out["config"] = {"model": source, "suite": args.suite, "judge": args.judge, **paths,
                     "jailbreaks": list(config.jailbreaks), "prompt_format": config.prompt_format,
                     "max_tokens": config.max_tokens, "batch_size": args.batch_size,
                     "seconds": round(time.perf_counter() - start, 3), "git": _git_revision()}
    print(format_table(rows))
    if any(row.skipped for row in rows):
        log.warning("some prompts were skipped (column 'skipped'): with --max-tokens new tokens they do not fit "
                    "the model's context")
    if args.output:
        _write_atomically(Path(args.output), json.dumps(out, indent=2))
    return 0


def _safety_inputs(args: argparse.Namespace) -> tuple[list, list, Any, dict[str, str]]:
    """(harmful prompts, benign prompts, SafetyConfig, the prompt files) from the flags, each bad
    value reported under its flag."""
    from parallax.eval.safety.jailbreak import resolve_jailbreaks
    from parallax.eval.safety.suite import DATA_DIR, PROMPT_FORMATS, SafetyConfig, load_prompts

    defaults = SafetyConfig()
    harmful_path = Path(args.safety_prompts) if args.safety_prompts else DATA_DIR / "harmful.jsonl"
    benign_path = Path(args.safety_benign) if args.safety_benign else DATA_DIR / "benign.jsonl"
    harmful = load_prompts(harmful_path, "--safety-prompts")
    benign = load_prompts(benign_path, "--safety-benign")
    jailbreaks = resolve_jailbreaks(args.jailbreaks) if args.jailbreaks is not None else defaults.jailbreaks
    prompt_format = args.prompt_format or defaults.prompt_format
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"--prompt-format: expected one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    max_tokens = args.max_tokens if args.max_tokens is not None else defaults.max_tokens
    if max_tokens < 1:
        raise ValueError(f"--max-tokens: expected a number of tokens >= 1, got {max_tokens}")
    if args.judge is not None and not Path(args.judge).is_dir():
        raise ValueError(f"--judge: {args.judge} is not a directory (a Hugging Face model or a parallax checkpoint)")
    config = SafetyConfig(prompt_format=prompt_format, max_tokens=max_tokens, jailbreaks=jailbreaks)
    return harmful, benign, config, {"safety_prompts": str(harmful_path), "safety_benign": str(benign_path)}


def _section_inputs(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, object]:
    """The bias pairs (default: the shipped set) and the canaries (``--canaries RUN|FILE``), read
    and checked before the model loads; their files are added to ``paths`` for the report."""
    from parallax.eval.safety.bias import BIAS_PAIRS, load_bias_pairs
    from parallax.eval.safety.canaries import CANARY_FILE, read_canaries

    inputs: dict[str, object] = {}
    if args.bias_pairs != "none":
        path = Path(args.bias_pairs) if args.bias_pairs else BIAS_PAIRS
        if not path.is_file():
            raise ValueError(f"--bias-pairs: {path} is not a file (JSONL rows {{category, stereotyped, "
                             "anti_stereotyped}}, or 'none')")
        try:
            inputs["bias_pairs"] = load_bias_pairs(path)
        except ValueError as exc:
            raise ValueError(f"--bias-pairs: {exc}") from None
        paths["bias_pairs"] = str(path)
    if args.canaries is not None:
        path = Path(args.canaries)
        path = path / CANARY_FILE if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--canaries: {path} is not a file (a run trained with --canaries has "
                             f"RUN/{CANARY_FILE})")
        try:
            inputs["canaries"] = read_canaries(path)
        except ValueError as exc:
            raise ValueError(f"--canaries: {exc}") from None
        paths["canaries"] = str(path)
    return inputs


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    import torch

    from parallax.train.model_source import load_trained

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False")
    device = "cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available() else "cpu"
    model, tokenizer, source = load_trained(args.checkpoint, args.hf, args.adapter, args.tokenizer)
    return model.to(device), tokenizer, source


def _table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<24} {'metric':<18} {'value':>12} {'stderr':>10}"]
    for task, scores in results.items():
        for metric, value in scores.items():
            if not metric.endswith("_stderr"):
                lines.append(f"{task:<24} {metric:<18} {value:>12.4f} {scores.get(metric + '_stderr', 0.0):>10.4f}")
    return "\n".join(lines)


def _compare(a: dict, b: dict, name_a: str, name_b: str) -> str:
    lines = [f"{'task':<24} {'metric':<18} {Path(name_a).name[:14]:>14} {Path(name_b).name[:14]:>14} {'b - a':>10}"]
    for task in sorted(set(a) | set(b)):
        metrics = [m for m in {**a.get(task, {}), **b.get(task, {})} if not m.endswith("_stderr")]
        for metric in metrics:
            va, vb = a.get(task, {}).get(metric), b.get(task, {}).get(metric)
            fmt = lambda v: f"{v:>14.4f}" if v is not None else f"{'-':>14}"  # noqa: E731
            diff = f"{vb - va:>10.4f}" if va is not None and vb is not None else f"{'-':>10}"
            lines.append(f"{task:<24} {metric:<18} {fmt(va)} {fmt(vb)} {diff}")
    return "\n".join(lines)


def _read_results(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--compare: {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"--compare: {path} has no 'results' table (was it written by parallax eval --output?)")
    return data["results"]


def _write_atomically(path: Path, text: str) -> None:
    """Write text to path so that path is either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _git_revision() -> str | None:
    """The source tree's commit, when parallax runs from a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
