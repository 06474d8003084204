"""``parallax prep``: clean a text corpus into token shards that ``parallax train --data DIR`` reads."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

__all__ = ["prep_main", "build_parser"]

DEMO_OUT = "prep-demo"
DEMO_DOCS = 1000  # ~2.4 MB of text: a few seconds on one worker
DEMO_FILES = 4


def build_parser(prog: str = "parallax prep") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Read raw text (txt, JSONL, Parquet; gzip/zstd; files, directories, globs), filter "
        "it (normalisation, language, Gopher quality and repetition, C4, toxic words), remove exact and near "
        "duplicates (MinHash LSH) across all files, scrub personal data, and write token shards, kept documents, "
        "samples and a report (JSON, HTML) to --out. An interrupted run resumes when rerun with the same "
        "arguments.", epilog="Exit status: 0 done, 2 bad arguments, config or input, 130 interrupted.")
    parser.add_argument("--input", help="a file, a directory (searched recursively) or a glob pattern")
    parser.add_argument("--out", help=f"output directory (default with --demo: ./{DEMO_OUT})")
    parser.add_argument("--config", help="a prep.toml / .json: run options and one table per stage "
                                         "([gopher_quality] min_doc_words = 50, [toxic] enabled = false, ...); "
                                         "flags override it")
    parser.add_argument("--tokenizer", help="'byte' (default) or a tokenizer directory")
    parser.add_argument("--executor", choices=("local", "ray"),
                        help="local processes (default) or Ray tasks (on a multi-node cluster, --out must be on a "
                             "filesystem every node mounts at the same path)")
    parser.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local one)")
    parser.add_argument("--workers", type=int, help="worker processes / Ray CPUs (default 1)")
    parser.add_argument("--format", help="comma-separated: tokens (tokens.bin, default), jsonl (documents/)")
    parser.add_argument("--text-field", help="JSONL / Parquet field holding the text (default: text)")
    parser.add_argument("--on-error", choices=("skip", "fail"),
                        help="unreadable input: skip it and report it (default) or stop")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="allow --out to hold another run's output or other files (only prep's own "
                             "files are replaced)")
    parser.add_argument("--samples", type=int, help="removed examples per stage in the report (default 20)")
    parser.add_argument("--demo", action="store_true",
                        help="run on a generated noisy corpus (the built-in text with planted duplicates, PII "
                             "and junk) and show the report")
    return parser


def prep_main(argv: list[str], prog: str = "parallax prep") -> int:
    """Entry point of ``parallax prep``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from parallax.data.errors import DataError
    from parallax.data.prep.config import PrepConfig, load_prep_config
    from parallax.data.prep.pipeline import run_prep

    flags = {"input": args.input, "out": args.out, "tokenizer": args.tokenizer, "executor": args.executor,
             "ray_address": args.ray_address, "workers": args.workers, "format": args.format,
             "text_field": args.text_field, "on_error": args.on_error, "overwrite": args.overwrite,
             "samples": args.samples}
    try:
        with tempfile.TemporaryDirectory(prefix="parallax-prep-demo-") as demo_dir:
            if args.demo:
                if args.input is not None:
                    raise ValueError("--demo generates its own input; drop --input")
                from parallax.data.prep.noisy import write_noisy_corpus

                write_noisy_corpus(Path(demo_dir), n_docs=DEMO_DOCS, files=DEMO_FILES, seed=0)
                flags["input"] = demo_dir
                flags["out"] = args.out or DEMO_OUT
                # The demo's input is new each time (a fresh temporary directory): replacing an earlier
                # demo's output is expected; other files in --out still need --overwrite.
                if (Path(flags["out"]) / "prep.json").exists() and flags["overwrite"] is None:
                    flags["overwrite"] = True
            if args.config is not None:
                config = load_prep_config(args.config, **flags)
            else:
                if flags["out"] is None:
                    raise ValueError("--out is required (the output directory)")
                config = PrepConfig(**{k: v for k, v in flags.items() if v is not None})
            if config.input is None:
                raise ValueError("--input is required (a file, a directory or a glob pattern), or --demo")
            report = run_prep(config)
    except (DataError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(report.table())
    hint = f"; train on it with: parallax train --data {config.out}" if report.docs_kept else "; no document was kept"
    print(f"\noutput in {config.out}/ (report.html, samples/){hint}")
    return 0
