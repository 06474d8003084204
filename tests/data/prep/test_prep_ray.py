"""The Ray executor on a local Ray instance with 2 workers (started once for this module): ordered
results, errors raised in the driver, and the whole pipeline giving byte-identical output to the local
executor (dedup included: every band task sees the keys of all shards)."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import pytest
import ray

from parallax.data.errors import DataError
from parallax.data.prep.config import PrepConfig
from parallax.data.prep.executors import RayExecutor
from parallax.data.prep.pipeline import run_prep

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # Workers import parallax (and these tests' helpers) from this checkout, like the driver.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise DataError("item 3 is bad")
    return x * x


def _slow_unless_three(marks: Path, x: int) -> int:
    if x == 3:
        raise DataError("item 3 is bad")
    time.sleep(0.3)
    (marks / str(x)).touch()
    return x


def test_map_ordered_and_errors_reach_the_driver(tmp_path: Path) -> None:
    executor = RayExecutor(workers=2)
    assert executor.map(_fail_on_three, [5, 4, 2, 1, 0]) == [25, 16, 4, 1, 0]
    with pytest.raises(DataError, match="item 3 is bad"):
        executor.map(_fail_on_three, [1, 3, 2])
    # After an error every other task has finished (none cancelled: cancelling a task as it completes
    # aborted the whole driver process in Ray 2.60, and none may still be writing once map returns).
    for _ in range(3):
        with pytest.raises(DataError, match="item 3 is bad"):
            executor.map(functools.partial(_slow_unless_three, tmp_path), [3, 1, 2, 4])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "4"]
        for p in tmp_path.iterdir():
            p.unlink()
    executor.close()
    assert ray.is_initialized()  # a session it did not start is left running


def _tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("report.json", "report.html")}


def test_pipeline_same_output_as_local(tmp_path: Path) -> None:
    from parallax.data.prep.noisy import write_noisy_corpus

    write_noisy_corpus(tmp_path / "noisy", n_docs=200, files=4, seed=0)
    common = {"input": str(tmp_path / "noisy"), "format": ("tokens", "jsonl")}
    local = run_prep(PrepConfig(out=str(tmp_path / "local"), **common))
    on_ray = run_prep(PrepConfig(out=str(tmp_path / "ray"), executor="ray", workers=2, **common))
    assert on_ray.executor == "ray" and local.docs_kept == on_ray.docs_kept > 0
    assert on_ray.stage("minhash_dedup").docs_removed > 0  # duplicates across shards were found on Ray
    counts = [[(s.name, s.docs_in, s.docs_out, s.bytes_out, s.counts) for s in r.stages] for r in (local, on_ray)]
    assert counts[0] == counts[1]
    assert _tree(tmp_path / "local") == _tree(tmp_path / "ray")
    assert json.loads((tmp_path / "ray" / "prep.json").read_text())["complete"] is True
