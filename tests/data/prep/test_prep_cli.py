"""``parallax prep`` argument handling: exit 2 with a clear message on bad config or input,
--on-error skip vs fail, --config with flag overrides, --overwrite; registered in ``parallax``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallax.data.prep.cli import prep_main
from tests.data.prep import prep_fakes
from tests.data.prep.prep_fakes import DOCS_PER_FILE, write_corpus

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    prep_fakes.install(monkeypatch)
    write_corpus(tmp_path / "corpus")
    with open(tmp_path / "corpus" / "c.jsonl", "a") as f:
        f.write("{not json\n")
    return tmp_path / "corpus"


def test_on_error_skip_reports_and_fail_exits_2(corpus: Path, tmp_path: Path, capsys) -> None:
    assert prep_main(["--input", str(corpus), "--out", str(tmp_path / "skip"), "--format", "tokens,jsonl"]) == 0
    out = capsys.readouterr().out
    assert f"1 read error(s) skipped, e.g. {corpus / 'c.jsonl'}, line {DOCS_PER_FILE + 1}" in out
    assert "gopher_quality" in out and (tmp_path / "skip" / "documents").is_dir()
    assert f"train on it with: parallax train --data {tmp_path / 'skip'}" in out
    assert prep_main(["--input", str(corpus), "--out", str(tmp_path / "fail"), "--on-error", "fail"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parallax prep: error: ") and f"c.jsonl, line {DOCS_PER_FILE + 1}" in err
    assert not (tmp_path / "fail" / "prep.json").exists()


def test_config_file_flags_override_and_overwrite(corpus: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "prep.toml"
    config.write_text(f'input = "{corpus}"\nsamples = 3\n[gopher_quality]\nmin_words = 5\n')
    out = tmp_path / "out"
    assert prep_main(["--config", str(config), "--out", str(out), "--samples", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["stages"][1]["removed"]) == 2  # --samples beat the file's 3
    config.write_text(f'input = "{corpus}"\n[gopher_quality]\nmin_words = 6\n')
    capsys.readouterr()
    assert prep_main(["--config", str(config), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert prep_main(["--config", str(config), "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--out", "o"], "--input is required"),
    (["--input", "x"], "--out is required"),
    (["--input", "x", "--out", "o", "--workers", "0"], "workers must be an integer >= 1; got 0"),
    (["--input", "x", "--out", "o", "--format", "tokens,csv"], "format must be"),
    (["--input", "x", "--out", "o", "--config", "missing.toml"], "config missing.toml: cannot read"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert prep_main(argv) == 2
    assert message in capsys.readouterr().err


def test_nothing_kept_says_so_instead_of_suggesting_training(corpus: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "strict.toml"
    config.write_text("[gopher_quality]\nmin_words = 100000\n")
    assert prep_main(["--input", str(corpus), "--out", str(tmp_path / "none"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "no document was kept" in out and "train on it" not in out


def test_missing_input_exits_2(corpus: Path, tmp_path: Path, capsys) -> None:
    assert prep_main(["--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "parallax prep: error:" in capsys.readouterr().err


def test_registered_in_parallax_command() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "parallax", "prep", "--help"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: parallax prep" in done.stdout and "--executor {local,ray}" in done.stdout


def test_real_readers_on_error_skip_vs_fail(tmp_path: Path, capsys) -> None:
    from parallax.data.prep.noisy import write_noisy_corpus

    corpus = tmp_path / "corpus"
    write_noisy_corpus(corpus, n_docs=60, files=2, seed=0)
    (corpus / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    assert prep_main(["--input", str(corpus), "--out", str(tmp_path / "skip")]) == 0
    report = json.loads((tmp_path / "skip" / "report.json").read_text())
    assert len(report["read_errors"]) == 1 and report["read_errors"][0]["path"].endswith("broken.jsonl.gz")
    assert "1 read error(s) skipped" in capsys.readouterr().out
    assert prep_main(["--input", str(corpus), "--out", str(tmp_path / "fail"), "--on-error", "fail"]) == 2
    assert "broken.jsonl.gz" in capsys.readouterr().err


def test_demo(tmp_path: Path, monkeypatch, capsys) -> None:
    from parallax.data.prep import cli

    monkeypatch.setattr(cli, "DEMO_DOCS", 120)
    monkeypatch.chdir(tmp_path)
    assert prep_main(["--demo"]) == 0
    out = capsys.readouterr().out
    assert "minhash_dedup" in out and "parallax train --data prep-demo" in out
    assert json.loads((tmp_path / "prep-demo" / "prep.json").read_text())["complete"] is True
    assert prep_main(["--demo"]) == 0  # again: a new temporary input, the earlier demo output is replaced
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("x")
    assert prep_main(["--demo", "--out", "elsewhere"]) == 2  # other files: --overwrite still needed
    assert "--overwrite" in capsys.readouterr().err
