"""The benchmark runner: command line, environment capture, result files, table/JSON/plot output."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib
import io
import json
import os
import sys
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO

from . import BENCHMARKS

__all__ = ["Context", "main", "load", "list_benchmarks"]


@dataclass
class Context:
    """What a benchmark's ``run`` gets: its options, the device, and a place for notes.

    ``notes`` (e.g. why a provider was skipped, the measured memory bandwidth) go into every
    record written after they are set and are printed below the table.
    """

    name: str
    args: argparse.Namespace
    device: Any  # torch.device
    env: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def log(self, message: str) -> None:
        print(f"[bench {self.name}] {message}", file=sys.stderr, flush=True)

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value

    def skip(self, provider: str, reason: str) -> None:
        """Record and log that ``provider`` is not measured in this run, and why."""
        self.notes.setdefault("skipped", {})[provider] = reason
        self.log(f"skipping {provider}: {reason}")

    def add_version(self, package: str, version: str | None) -> None:
        """Record the version of an extra library a benchmark measured (e.g. deepspeed)."""
        self.env["versions"][package] = version


def list_benchmarks() -> str:
    width = max(len(name) for name in BENCHMARKS)
    lines = ["benchmarks (python -m bench NAME [--quick] [--json] [--plot]):"]
    lines += [f"  {name.ljust(width)}  {description}" for name, (_, description) in sorted(BENCHMARKS.items())]
    return "\n".join(lines)


def load(name: str) -> ModuleType:
    """Import the module of benchmark ``name``."""
    if name not in BENCHMARKS:
        raise KeyError(name)
    return importlib.import_module(BENCHMARKS[name][0], __package__)


def _base_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Run one parallax benchmark.",
                                add_help=add_help)
    p.add_argument("name", nargs="?", help="benchmark to run (omit to list them)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--quick", action="store_true",
                   help="a short run with small sizes (tests, CI); its figures are not comparable with full "
                        "runs, so it saves nothing unless --results-dir or $PARALLAX_BENCH_RESULTS is given")
    p.add_argument("--json", action="store_true", help="print one JSON record per row instead of a table")
    p.add_argument("--plot", action="store_true", help="also write a PNG next to the results file")
    p.add_argument("--results-dir", default=None,
                   help="where <name>.jsonl goes (default: $PARALLAX_BENCH_RESULTS or bench/results)")
    p.add_argument("--no-save", action="store_true", help="do not append to the results file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    return p


@contextlib.contextmanager
def _records_stdout(enabled: bool) -> Iterator[TextIO]:
    """With ``--json``, stdout carries only records: anything else printed (by Python code or by
    C/C++ libraries writing to file descriptor 1) goes to stderr while the benchmark runs."""
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        records = sys.stdout  # a captured stream (pytest): redirect at the Python level only
        with contextlib.redirect_stdout(sys.stderr):
            yield records
        return
    saved = os.dup(out_fd)
    records = os.fdopen(os.dup(saved), "w", buffering=1)
    os.dup2(err_fd, out_fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield records
    finally:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).fflush(None)  # C stdio buffers filled meanwhile belong to stderr too
        records.flush()
        os.dup2(saved, out_fd)
        os.close(saved)
        records.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench [NAME] [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # first pass: which benchmark (its own options are not known yet)
        first, _ = _base_parser(add_help=False).parse_known_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    parser = _base_parser()
    if first.list or first.name is None:
        if any(a in ("-h", "--help") for a in argv):
            parser.print_help()
        print(list_benchmarks())
        return 0
    if first.name not in BENCHMARKS:
        print(f"unknown benchmark {first.name!r}\n{list_benchmarks()}", file=sys.stderr)
        return 2

    module = load(first.name)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser.add_argument_group(f"{first.name} options"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return _run(first.name, module, args)


def _run(name: str, module: ModuleType, args: argparse.Namespace) -> int:
    import torch

    from . import records
    from .table import format_table

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    now = datetime.datetime.now(datetime.timezone.utc)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    path = records.results_dir(args.results_dir) / f"{name}.jsonl"
    ctx = Context(name=name, args=args, device=device, env=records.environment(device))
    ctx.log(f"device {device} ({ctx.env['device']['name']}), {torch.get_num_threads()} threads, run {run_id}")
    load, cores = ctx.env["machine"]["loadavg_1m"], ctx.env["machine"]["usable_cores"] or 1
    if device.type == "cpu" and load is not None and load > 0.5 * cores:
        ctx.log(f"WARNING: the machine is busy (load {load} on {cores} cores); CPU timings will be noisy")
    if ctx.env["git"]["dirty"]:
        ctx.log("WARNING: the source tree has uncommitted changes (recorded as git.dirty): these results "
                "cannot be tied to a revision; commit and re-run before quoting them")
    if args.quick and not args.no_save and args.results_dir is None and not os.environ.get(records.RESULTS_ENV):
        args.no_save = True  # a quick run's figures must not join the tracked results
        ctx.log("quick run: results not saved (give --results-dir to keep them)")

    rows: list[dict[str, Any]] = []
    status = 0
    with _records_stdout(args.json) as out:
        try:
            for row in module.run(ctx):
                record = records.make_record(
                    name, run_id, row, ctx.env, threads=torch.get_num_threads(), notes=dict(ctx.notes)
                )
                if not args.no_save:
                    records.append_record(path, record)
                rows.append(row)
                if args.json:
                    print(json.dumps(record), file=out, flush=True)
        except KeyboardInterrupt:
            ctx.log(f"interrupted after {len(rows)} rows")
            status = 130
        except Exception:
            traceback.print_exc(file=sys.stderr)
            ctx.log(f"failed after {len(rows)} rows; earlier results in {path} are untouched")
            status = 1

    if not args.json:
        if rows:
            columns = module.columns(args) if hasattr(module, "columns") else module.COLUMNS
            print(format_table(rows, columns))
        print(f"threads: {torch.get_num_threads()}, device: {ctx.env['device']['name']}, run: {run_id}")
        for key, value in ctx.notes.items():
            if isinstance(value, dict):
                for sub, text in value.items():
                    print(f"{key}: {sub}: {text}")
            else:
                print(f"{key}: {value}")
    if rows and not args.no_save:
        ctx.log(f"{len(rows)} rows appended to {path}")
    if args.plot and rows:
        if not hasattr(module, "plot"):
            ctx.log("this benchmark has no plot")
        else:
            png = path.with_suffix(".png")
            png.parent.mkdir(parents=True, exist_ok=True)
            module.plot(rows, png)
            ctx.log(f"plot written to {png}")
    return status


def pyplot():
    """matplotlib.pyplot with a file-only backend, imported on first use (for ``plot`` functions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
