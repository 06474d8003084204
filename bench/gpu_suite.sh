#!/usr/bin/env bash
# GPU suite, one call on one H100/H200, sized to a 15-minute lease (default budget 420 s of steps):
#   1. build parallax._C with its CUDA kernels (sm_90 for the card at hand),
#   2. run the tests that exercise CUDA (every test file that mentions it: the Triton kernels
#      compiled, not interpreted, the CUDA extension ops, ZeRO/precision on one NCCL rank, the
#      inference engine, LoRA, compression, alignment, tensor-parallel checks),
#   3. run the GPU benchmarks in order of what they decide (kernels, train, paged_attention,
#      attention, adamw, offload, compress, serve), each under its own time limit,
#   4. print one summary table last, then exit non-zero, naming the failed steps, if any failed.
# No step runs past the budget: a step's limit is cut to what is left, and steps with under 20 s
# left are reported as "skipped" (and count as failed: the last line names every step that did not pass).
# Results: the .jsonl rows go to $PARALLAX_BENCH_RESULTS (default bench/results/); on the device
# tool, where $OUT is set, they are packed into $OUT/results.tgz beside gpu_suite.log and
# gpu_tests.xml (the tool returns at most 8 files): unpack, append to bench/results/ and name the
# card in the commit.
#
#   GPU_SUITE_BUDGET=420    seconds all steps together may take
#   GPU_SUITE_STEPS=a,b     run only these steps (names as in the summary)
#   GPU_SUITE_TESTS="..."   pytest selection for the tests step (default: the CUDA test files)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGDIR=${OUT:-bench/results}
if [ -n "${OUT:-}" ] && [ -z "${PARALLAX_BENCH_RESULTS:-}" ]; then
  PARALLAX_BENCH_RESULTS=$(mktemp -d)
fi
RESULTS=${PARALLAX_BENCH_RESULTS:-bench/results}
export PARALLAX_BENCH_RESULTS=$RESULTS
mkdir -p "$RESULTS" "$LOGDIR"
LOG="$LOGDIR/gpu_suite.log"
: > "$LOG"
BUDGET=${GPU_SUITE_BUDGET:-420}
ONLY=${GPU_SUITE_STEPS:-}
START=$SECONDS
status=()

pack() {
  if [ -n "${OUT:-}" ] && [ "$RESULTS" != "$OUT" ]; then
    tar czf "$OUT/results.tgz" -C "$RESULTS" . 2>/dev/null
  fi
}
trap pack EXIT

step() {  # step NAME TIMEOUT COMMAND...: run under a time limit, tee into the log, remember the outcome
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    status+=("$name|skipped|0")
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left  # no step runs past the budget
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s, at $((SECONDS - START))s): $*" | tee -a "$LOG"
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"  # SIGINT: pytest and bench write what they have
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    status+=("$name|ok|$((SECONDS - t0))")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status+=("$name|TIMEOUT|$((SECONDS - t0))")
  else
    status+=("$name|FAILED|$((SECONDS - t0))")
  fi
}

"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$LOG" || exit 1

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build 300 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
step extension 60 "$PY" -c "import parallax, json; info = parallax.build_info(); print(json.dumps(info)); assert info.get('cuda'), info"

# The CPU-only suites (gloo ranks, interpreter) already run in CI; here the files that touch CUDA
# (their CPU cases come along: they are cheap next to compiling the Triton kernels). Triton's
# on-disk cache shares compiled kernels between the xdist workers; two intra-op threads each
# keeps 8 workers within 16 cores.
if [ -z "${GPU_SUITE_TESTS:-}" ]; then
  GPU_SUITE_TESTS=$(grep -rlE "cuda|CUDA" tests --include='test_*.py' | sort | grep -vE \
    'test_cuda_sources_compile|test_triton_kernels_compile|test_paged_attention_cpu|test_plan\.py|test_packaging|test_harness|tests/eval/|tests/serve/' | tr '\n' ' ')
fi
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
TIMEOUT_ARG=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG=(--timeout 150)
# shellcheck disable=SC2086
OMP_NUM_THREADS=2 step tests 240 "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
  ${TIMEOUT_ARG[@]+"${TIMEOUT_ARG[@]}"} --continue-on-collection-errors --durations=15 -rfE -v \
  --junitxml="$LOGDIR/gpu_tests.xml" $GPU_SUITE_TESTS

# fused kernels vs their PyTorch composition and Liger-Kernel (where installed); the linear +
# cross-entropy goal at a 128k vocabulary and 8k tokens; int8/int4 weight-only matmuls at decode
# batches vs bf16 F.linear (issue 14's goals); SGMV vs the per-adapter loop
step bench-kernels 90 "$PY" -m bench kernels --device cuda --budget 0.2
# parallax train on a Llama-family preset (fused kernels) vs transformers' LlamaForCausalLM
if "$PY" -c "import transformers" 2>/dev/null; then
  step bench-train-llama 75 "$PY" -m bench train --device cuda --family llama --steps 20
fi
# decode batch 1/8/64 x context 512/4k/16k, GQA 32/8, D 128, and prefill of 512 new tokens after
# a 4k/16k cached prefix (paged_attention_varlen vs gather + flash)
step bench-paged 60 "$PY" -m bench paged_attention --device cuda --budget 0.2
# bf16, 16k tokens, seqlens 512-16k, D 64/128, causal and not, autotuned
step bench-attention 75 "$PY" -m bench attention --device cuda --budget 0.1
step bench-adamw 45 "$PY" -m bench adamw --device cuda --budget 0.5
step bench-train 45 "$PY" -m bench train --device cuda --cases tiny,small --steps 20
step bench-offload 40 "$PY" -m bench offload --device cuda --steps 6
# every compression method on a briefly trained tiny GPT, generation through the int8/int4 kernels
step bench-compress 60 "$PY" -m bench compress --device cuda --quick
# the engine on CUDA (paged kernels; HF baselines where transformers is installed)
step bench-serve 60 "$PY" -m bench serve --device cuda --requests 64

echo
echo "== GPU suite summary ($("$PY" -c "import torch; print(torch.cuda.get_device_name())"), $((SECONDS - START)) s)" | tee -a "$LOG"
"$PY" - "$RESULTS" "$LOGDIR" "${status[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
results, logdir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def num(x, spec):
    return "-" if x is None else format(x, spec)
for name in ("kernels", "train", "paged_attention", "attention", "adamw", "offload", "compress", "serve"):
    path = results / f"{name}.jsonl"
    if not path.exists():
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(f"\n{name}: {len(rows)} rows")
    for r in rows:
        keep = {k: v for k, v in r.items() if isinstance(v, (int, float, str)) and k not in (
            "timestamp", "run_id", "benchmark", "threads")}
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())[:160])
print()
print(f"{'step':<18} {'result':<8} {'seconds':>7}")
for item in sys.argv[3:]:
    name, result, seconds = item.split("|")
    print(f"{name:<18} {result:<8} {seconds:>7}")
xml = logdir / "gpu_tests.xml"
if xml.exists():
    import xml.etree.ElementTree as ET
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    print("tests: " + ", ".join(f"{k} {suite.get(k)}" for k in ("tests", "failures", "errors", "skipped")))
    failed = 0
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        failed += bad is not None
        if bad is not None and failed <= 40:
            print(f"  FAILED {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:160]}")
EOF

failed=()
for item in "${status[@]}"; do
  [[ $item != *"|ok|"* ]] && failed+=("${item%%|*}")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_suite: FAILED steps: ${failed[*]}" | tee -a "$LOG"
  exit 1
fi
echo "gpu_suite: all ${#status[@]} steps passed" | tee -a "$LOG"
