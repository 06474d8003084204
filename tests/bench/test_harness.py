"""The benchmark harness: listing, result records, --json, --plot, failure safety, adamw --quick."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bench
from bench import records
from bench.table import Column, format_table
from bench.timing import interleave, quantile

ROOT = Path(__file__).resolve().parents[2]
FAKE = "_parallax_fake_benchmark"

FAKE_SOURCE = textwrap.dedent(
    """
    from bench.table import Column

    COLUMNS = [Column("size", "size [elements]", "d"), Column("ms", "time [ms]", ".3f")]

    def add_arguments(parser):
        parser.add_argument("--fail-after", type=int, default=None)

    def run(ctx):
        ctx.note("answer", 42)
        for i in range(3):
            if ctx.args.fail_after is not None and i >= ctx.args.fail_after:
                raise RuntimeError("boom")
            print("noise on stdout")  # must not end up among --json records
            yield {"size": 10 ** i, "ms": 0.5 * i, "label": f"row{i}"}

    def plot(rows, path):
        from bench.runner import pyplot

        plt = pyplot()
        fig, ax = plt.subplots()
        ax.plot([r["size"] for r in rows], [r["ms"] for r in rows])
        fig.savefig(path)
        plt.close(fig)
    """
)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Register a tiny benchmark and send results to a temporary directory."""
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{FAKE}.py").write_text(FAKE_SOURCE)
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delitem(sys.modules, FAKE, raising=False)
    monkeypatch.setitem(bench.BENCHMARKS, "fake", (FAKE, "a fake benchmark for the harness tests"))
    results = tmp_path / "results"
    monkeypatch.setenv(records.RESULTS_ENV, str(results))
    return results / "fake.jsonl"


def test_listing_names_every_benchmark(capsys):
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    for name, (_, description) in bench.BENCHMARKS.items():
        assert name in out and description in out
    assert bench.main(["--list"]) == 0
    assert "adamw" in capsys.readouterr().out


def test_listing_imports_no_benchmark_or_torch():
    code = "import sys, bench; bench.main([]); assert 'torch' not in sys.modules, 'listing imported torch'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_registered_modules_exist_and_do_not_shadow_the_harness():
    harness = {"runner", "timing", "table", "records"}
    for name, (module, _) in bench.BENCHMARKS.items():
        assert name not in harness
        assert importlib.util.find_spec(module, bench.__name__) is not None, module


def test_unknown_benchmark_is_an_error(capsys):
    assert bench.main(["no-such-benchmark"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_run_writes_well_formed_records(fake, capsys):
    assert bench.main(["fake"]) == 0
    out = capsys.readouterr().out
    assert "size [elements]" in out and "time [ms]" in out and "answer: 42" in out
    rows = [json.loads(line) for line in fake.read_text().splitlines()]
    assert [r["size"] for r in rows] == [1, 10, 100]
    assert [r["label"] for r in rows] == ["row0", "row1", "row2"]
    for r in rows:
        assert r["benchmark"] == "fake" and r["run_id"] == rows[0]["run_id"]
        assert r["timestamp"] and isinstance(r["threads"], int) and r["threads"] >= 1
        assert {"hostname", "cpu", "cores", "ram_gb"} <= set(r["machine"])
        assert r["device"]["type"] in ("cpu", "cuda") and r["device"]["name"]
        assert {"python", "torch", "triton", "numpy", "parallax", "parallax_build"} <= set(r["versions"])
        assert {"revision", "dirty"} <= set(r["git"])
        assert isinstance(r["environ"], dict)
        assert r["notes"]["answer"] == 42
    assert bench.main(["fake"]) == 0  # a second run appends
    assert len(records.read_records(fake)) == 6


def test_json_output_is_one_record_per_row(fake, capfd):
    assert bench.main(["fake", "--json", "--no-save"]) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert [json.loads(line)["size"] for line in lines] == [1, 10, 100]
    assert "noise on stdout" in err
    assert not fake.exists()


def test_plot_writes_a_png(fake):
    assert bench.main(["fake", "--plot"]) == 0
    assert fake.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_benchmark_keeps_earlier_results(fake, capsys):
    assert bench.main(["fake"]) == 0
    before = fake.read_bytes()
    assert bench.main(["fake", "--fail-after", "1"]) == 1
    assert "boom" in capsys.readouterr().err
    after = fake.read_bytes()
    assert after.startswith(before)
    rows = [json.loads(line) for line in after.decode().splitlines()]  # every line is a whole record
    assert [r["size"] for r in rows] == [1, 10, 100, 1]


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "x.jsonl"
    records.append_record(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "trunc')  # a writer killed mid-record
    records.append_record(path, {"a": 3, "nan": float("nan")})
    assert [r["a"] for r in records.read_records(path)] == [1, 3]


def test_reserved_keys_are_rejected():
    with pytest.raises(ValueError, match="reserved"):
        records.make_record("b", "r", {"machine": 1}, {}, threads=1, notes={})


def test_interleave_round_robin_and_quantiles():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    timings = interleave(fns, warmup=1, repeat=4)
    assert {k: t.n for k, t in timings.items()} == {"a": 4, "b": 4, "c": 4}
    assert calls[:3] == ["a", "b", "c"]  # warmup
    assert calls[3:9] == ["a", "b", "c", "b", "c", "a"]  # starting provider rotates each round
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)


def test_table_aligns_columns_and_shows_units():
    cols = [Column("name", "name"), Column("t", "time [ms]", ".2f"), Column("n", "params [M]", ".1f", scale=1e-6)]
    text = format_table([{"name": "a", "t": 1.0, "n": 2_000_000}, {"name": "long", "t": 10.5}], cols)
    lines = text.splitlines()
    assert lines[0].startswith("name") and "time [ms]" in lines[0] and "params [M]" in lines[0]
    end = lines[0].index("time [ms]") + len("time [ms]")  # numbers are right-aligned under it
    assert lines[2].index("1.00") + len("1.00") == end and lines[3].index("10.50") + len("10.50") == end
    assert "2.0" in lines[2]  # 2e6 params shown in millions
    assert lines[3].rstrip().endswith("-")  # missing value


def test_adamw_quick_end_to_end(tmp_path):
    env = dict(os.environ, **{records.RESULTS_ENV: str(tmp_path)})
    done = subprocess.run(
        [sys.executable, "-m", "bench", "adamw", "--quick", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows and len(records.read_records(tmp_path / "adamw.jsonl")) == len(rows)
    from bench import adamw

    skipped = rows[-1]["notes"].get("skipped", {})
    expected = {"torch-foreach", "torch-fused"}
    try:
        from parallax.optim import AdamW  # noqa: F401

        expected.add("parallax")
    except ImportError:
        pass
    for provider in adamw.PROVIDERS:
        measured = {r["mode"] for r in rows if r["provider"] == provider}
        if provider in expected:
            assert measured == set(adamw.MODES), (provider, skipped)
        else:
            assert measured == set(adamw.MODES) or provider in skipped, provider
    for r in rows:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["floor_ms"] > 0 and r["stream_gbps"] > 0
        assert r["max_diff"] is not None and r["max_diff"] < 1e-4, (r["mode"], r["provider"], r["max_diff"])


def test_train_benchmark_runs_both_loops_on_the_same_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "train", "--quick", "--json", "--cases", "tiny", "--steps", "12",
         "--results-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert {r["provider"] for r in rows} == {"parallax train", "plain PyTorch"}
    for r in rows:
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["loss_diff"] < 1e-4, "both loops must do the same training"


@pytest.mark.parametrize("dirty", [True, False])
def test_a_dirty_tree_is_recorded_and_warned_about(fake, capsys, monkeypatch, dirty):
    monkeypatch.setattr(records, "git_revision", lambda: {"revision": "abc", "dirty": dirty})
    assert bench.main(["fake"]) == 0
    assert ("WARNING: the source tree has uncommitted changes" in capsys.readouterr().err) == dirty
    assert all(r["git"]["dirty"] is dirty for r in records.read_records(fake))


def test_git_revision_sees_uncommitted_changes_but_not_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    assert records.git_revision(tmp_path)["dirty"] is False
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "x.jsonl").write_text("{}\n")
    assert records.git_revision(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert records.git_revision(tmp_path)["dirty"] is True


def test_quick_runs_save_nothing_unless_a_results_dir_is_given(fake, monkeypatch, tmp_path):
    monkeypatch.delenv(records.RESULTS_ENV)
    default = tmp_path / "default"
    monkeypatch.setattr(records, "DEFAULT_RESULTS_DIR", default)
    assert bench.main(["fake", "--quick"]) == 0
    assert not default.exists()
    assert bench.main(["fake"]) == 0
    assert len(records.read_records(default / "fake.jsonl")) == 3
    assert bench.main(["fake", "--quick", "--results-dir", str(tmp_path / "kept")]) == 0
    assert len(records.read_records(tmp_path / "kept" / "fake.jsonl")) == 3
