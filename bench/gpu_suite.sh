#!/usr/bin/env bash
# GPU suite, one call on one H100/H200 (budget: under 8 minutes):
#   1. build parallax._C with its CUDA kernels (sm_90 for the card at hand),
#   2. run the test suite on the GPU (CUDA tests run there; nothing is skipped for want of a GPU),
#   3. run the GPU benchmarks (AdamW on CUDA vs torch foreach/fused, with the bandwidth floor),
#   4. print one summary table last.
# Results go to $OUT (the device tool's folder) or bench/results/; copy the .jsonl files back
# into bench/results/ and name the card in the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_suite.log"
: > "$LOG"
status=()

step() {  # step NAME COMMAND...: run, tee into the log, remember pass/fail and seconds
  local name=$1
  shift
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  if "$@" 2>&1 | tee -a "$LOG"; then
    status+=("$name|ok|$((SECONDS - t0))")
  else
    status+=("$name|FAILED|$((SECONDS - t0))")
  fi
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$LOG" || exit 1

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
step extension "$PY" -c "import parallax, json; info = parallax.build_info(); print(json.dumps(info)); assert info.get('cuda'), info"
step tests "$PY" -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/gpu_tests.xml" tests
export PARALLAX_BENCH_RESULTS=$RESULTS
step bench-adamw "$PY" -m bench adamw --device cuda --budget 2
step bench-train "$PY" -m bench train --device cuda --cases tiny,small --steps 40

echo
echo "== GPU suite summary ($("$PY" -c "import torch; print(torch.cuda.get_device_name())"))"
"$PY" - "$RESULTS" "${status[@]}" <<'EOF'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
print(f"{'step':<12} {'result':<7} {'seconds':>7}")
for item in sys.argv[2:]:
    name, result, seconds = item.split("|")
    print(f"{name:<12} {result:<7} {seconds:>7}")
xml = results / "gpu_tests.xml"
if xml.exists():
    import xml.etree.ElementTree as ET
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    print("tests: " + ", ".join(f"{k} {suite.get(k)}" for k in ("tests", "failures", "errors", "skipped")))
for name in ("adamw", "train"):
    path = results / f"{name}.jsonl"
    if not path.exists():
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    run = rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run]
    print(f"\n{name} (run {run}):")
    for r in rows:
        if name == "adamw":
            print(f"  {r['mode']:<11} {r['layout']:<6} {r['params'] / 1e6:>6.1f}M {r['provider']:<14} "
                  f"{r['median_ms']:>8.3f} ms  {r.get('speedup_vs_fused', float('nan')):>5.2f}x fused  "
                  f"{r.get('x_floor', float('nan')):>5.2f}x floor")
        else:
            print(f"  {r['model']:<6} {r['provider']:<15} {r['median_ms']:>8.1f} ms/step  {r['vs_plain']:>6.3f}x plain")
EOF
