"""The wheel users install: built with `python -m build --wheel --no-isolation`, it carries the
compiled extension, the reference model as parallax.models and the benchmarks as parallax.bench."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_extension_models_and_bench(tmp_path):
    pytest.importorskip("build", reason="the `build` package (test extra) builds the wheel")
    src = tmp_path / "src"
    # A copy without build outputs, so the wheel is built from the sources alone.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", "dist", "*.so", "*.egg-info",
                                                            ".git", "__pycache__", "out", ".hypothesis"))
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True, env={"PARALLAX_SKIP_CUDA": "1", **_env()})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("parallax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("parallax/_C") and n.endswith(".so") for n in names), names
    for module in ("parallax/models/gpt.py", "parallax/bench/adamw.py", "parallax/cli.py"):
        assert module in names
    # data files the commands read at run time (finetune's default data, the safety sets and suite)
    for data in ("parallax/finetune/demo/train.jsonl", "parallax/finetune/demo/heldout.yaml",
                 "parallax/finetune/safety/train.jsonl", "parallax/finetune/safety/preferences.jsonl",
                 "parallax/eval/safety/data/harmful.jsonl", "parallax/eval/safety/data/bias_pairs.jsonl",
                 "parallax/eval/builtin/pydoc_qa.yaml"):
        assert data in names, data
    assert not any(n.startswith(("models/", "bench/", "tests/")) for n in names), "no top-level packages besides parallax"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    check = (
        "import parallax, parallax.models, parallax.bench, torch;"
        "assert parallax.__file__.startswith(%r), parallax.__file__;"
        "assert parallax.build_info()['extension'], parallax.build_info();"
        "assert parallax.ops.backend('adamw', 'cpu') == 'cpp';"
        "print('ok')" % str(site)
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                         env={**_env(), "PYTHONPATH": str(site)})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _env() -> dict:
    """This environment without PYTHONPATH, so that only the installed wheel can be imported."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
