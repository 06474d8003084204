#!/usr/bin/env bash
# One entry point that sets up everything it needs on a fresh Linux machine with only Python:
#
#   ./run.sh train [flags]   parallax train (default: tiny GPT on the built-in corpus)
#   ./run.sh test  [args]    the whole test suite (pytest args pass through)
#   ./run.sh bench [name]    a microbenchmark (no name: list them)
#   ./run.sh parallax ARGS   any parallax command (generate, plan, ...) in the environment
#   ./run.sh python ARGS     the environment's python (python -m bench ..., a script of yours)
#
# Setup (idempotent, skipped when nothing changed): a virtual environment in .venv (or
# $PARALLAX_VENV); the CPU build of torch when torch is absent and no GPU is present;
# triton, numpy and the cli/test extras; the compiled extension parallax._C.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${PARALLAX_VENV:-.venv}
PYTHON=${PYTHON:-python3}

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    # A machine image that ships torch (a GPU box, often offline) keeps it visible in the venv.
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
      "$PYTHON" -m venv --system-site-packages "$VENV"
    else
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local pip="python -m pip install --disable-pip-version-check -q"
  if ! python -c "import torch" >/dev/null 2>&1; then
    if have_gpu; then
      $pip "torch>=2.11"
    else
      # Never let a dependency pull the multi-GB CUDA build onto a machine without a GPU.
      $pip "torch==2.13.0+cpu" 2>/dev/null || $pip torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  if ! have_gpu && ! python -c "import triton, sys; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) < (3, 8))" >/dev/null 2>&1; then
    # The CPU interpreter needs triton >= 3.8 with numpy >= 2.4 (triton issue #9171).
    $pip "triton>=3.8" numpy
  fi
  local stamp="$VENV/.parallax-build-stamp"
  local digest
  digest=$( (python -c "import torch; print(torch.__version__)"; cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat) | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] || ! python -c "import parallax._C" >/dev/null 2>&1; then
    echo "run.sh: building parallax and its extension (first run, or csrc/ changed) ..." >&2
    $pip "setuptools>=77" ninja  # the build requirements: the build runs in this environment
    $pip --no-build-isolation -e ".[cli,test]"
    echo "$digest" > "$stamp"
  fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  train)
    setup
    exec python -m parallax train "$@"
    ;;
  test)
    setup
    # Triton kernels run on the CPU through Triton's interpreter when there is no GPU.
    have_gpu || export TRITON_INTERPRET=1
    exec python -m pytest -q --durations=30 "$@"
    ;;
  bench)
    setup
    exec python -m parallax bench "$@"
    ;;
  parallax)
    setup
    exec python -m parallax "$@"
    ;;
  python)
    setup
    exec python "$@"
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
