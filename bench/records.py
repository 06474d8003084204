"""Result records: the environment a benchmark ran in, and appending rows to JSONL files.

Every record is one JSON object on one line: ``timestamp``, ``benchmark``, ``run_id``, the
row's own fields at top level, and ``threads``, ``machine``, ``device``, ``versions``, ``git``,
``environ`` (the environment variables that change how code runs) and ``notes``. A record is
serialized completely before the file is opened and written with one ``write`` on a file
opened for appending, so a failing or killed benchmark never leaves a half record behind the
earlier ones.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["RESERVED_KEYS", "environment", "results_dir", "make_record", "append_record", "read_records"]

REPO_ROOT = Path(__file__).resolve().parent.parent
# In a source checkout results live beside the benchmarks (bench/results/, committed); an
# installed wheel (parallax.bench in site-packages) writes to ./bench-results instead.
DEFAULT_RESULTS_DIR = (Path(__file__).resolve().parent / "results" if (REPO_ROOT / ".git").exists()
                       else Path.cwd() / "bench-results")
RESULTS_ENV = "PARALLAX_BENCH_RESULTS"

# Keys the runner owns; a row that uses one of them is a bug in the benchmark.
RESERVED_KEYS = frozenset(
    {"timestamp", "benchmark", "run_id", "threads", "machine", "device", "versions", "git", "environ", "notes"}
)


def results_dir(override: str | os.PathLike | None = None) -> Path:
    """Where results go: ``override``, else $PARALLAX_BENCH_RESULTS, else bench/results/ (source checkout) or ./bench-results."""
    if override is not None:
        return Path(override)
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    return DEFAULT_RESULTS_DIR


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


# Environment variables that change how the measured code runs.
_ENV_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND",
    "THP_MEM_ALLOC_ENABLE", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST", "TRITON_INTERPRET",
)


def _thp() -> str | None:
    """The transparent huge page policy (the bracketed choice), which moves memory bandwidth."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def _loadavg() -> float | None:
    """1-minute load average when the run started: other work on the machine skews timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gb": _ram_gb(),
        "loadavg_1m": _loadavg(),
        "transparent_hugepages": _thp(),
        "platform": platform.platform(),
    }


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "memory_gb": round(props.total_memory / 1e9, 1)}
    return {"type": "cpu", "name": _cpu_model()}


def _dist_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    import numpy

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "numpy": numpy.__version__,
    }
    try:
        import parallax

        out["parallax"] = parallax.__version__
        out["parallax_build"] = parallax.build_info()
    except Exception as exc:  # a broken parallax still gets its benchmarks recorded
        out["parallax"] = None
        out["parallax_build"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def git_revision(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """HEAD commit (None before the first commit or outside git) and whether sources differ from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    # Results written by the benchmarks themselves do not make the tree dirty.
    status = git("status", "--porcelain", "--untracked-files=all", "--", ".", ":(exclude)bench/results")
    return {"revision": rev, "dirty": None if status is None else bool(status)}


def environment(device: torch.device) -> dict[str, Any]:
    """Everything about where and with what a benchmark runs; collected once per run."""
    return {
        "machine": machine(),
        "device": device_info(device),
        "versions": versions(),
        "git": git_revision(),
        "environ": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
    }


def _json_safe(value: Any) -> Any:
    """NaN/inf become None (strict JSON has neither); tensors, paths, dtypes become numbers/strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def make_record(
    benchmark: str, run_id: str, row: dict[str, Any], env: dict[str, Any], *, threads: int, notes: dict[str, Any]
) -> dict[str, Any]:
    clash = RESERVED_KEYS.intersection(row)
    if clash:
        raise ValueError(f"benchmark {benchmark!r} row uses reserved keys {sorted(clash)}")
    record = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "benchmark": benchmark,
        "run_id": run_id,
        **row,
        "threads": threads,
        **env,
        "notes": notes,
    }
    return _json_safe(record)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one JSON line with a single write."""
    line = json.dumps(_json_safe(record), allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = line.encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        # A writer killed mid-line (power loss) must not glue its fragment to this record.
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:  # one write in practice; loop only if the kernel writes short (disk full)
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every well-formed record in a JSONL results file (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
