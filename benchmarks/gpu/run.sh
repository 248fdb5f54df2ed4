#!/usr/bin/env bash
# The one GPU validation command, for a fresh offline H100 machine (torch 2.11 + CUDA 13.0,
# triton 3.6, nvcc 13.0, ninja, pytest, pytest-xdist, pytest-timeout preinstalled; nothing
# installable). Steps, each under its own time limit, none able to stop the ones after it:
#
#   environment  nvidia-smi, versions, CUDA headers (environment.py; room for a
#                first, cold import of torch)                                          20 s
#   build        pip install --no-build-isolation --no-deps -e . (MAX_JOBS=16,
#                TORCH_CUDA_ARCH_LIST=9.0)                                            120 s
#   smoke        every CUDA / Triton op against the reference at small and
#                ResNet-18 sizes (fp32, bf16, one fp64 case); CUDA graphs (inner,
#                simulation) and bf16 autocast on SmallCNN against eager, with
#                CUDA_LAUNCH_BLOCKING=1                       (smoke.py)               75 s
#   tests        the test files that parametrize over backends, cuda / triton
#                cases, pytest -n 8 --timeout 60                                       60 s
#   e2e          the quick small-CNN end-to-end benchmark (benchmarks/run.py e2e)     45 s
#
# 320 s of step limits plus 10 s for the summaries: at most 330 s in all. Time a step leaves
# unused goes to the next one. The output folder ($OUT when set, else the first argument, else
# benchmarks/results/gpu-<date>) receives at most 6 files, today 4:
#
#   summary.json   environment, every step's and every check's verdict (passed, failed,
#                  timed_out, skipped) with its error text, timings  (summarize.py)
#   ops.json       every smoke comparison with its errors and tolerances
#   e2e.json       the e2e benchmark's records
#   logs.tar.gz    every step's log
#
# Logs go to a temporary folder; summary.json and logs.tar.gz are rewritten after every step and
# on exit (trap), so a run killed from outside keeps what finished. Exit status: 0 when no check
# failed or timed out, 1 otherwise (the script itself never stops early).
#
#   bash benchmarks/gpu/run.sh [OUT_DIR]
#   bash benchmarks/gpu/run.sh --dry-run [OUT_DIR]
#
# --dry-run runs the same plumbing on a CPU machine in about 2 minutes (limit 290 s): no build
# (pip install --dry-run), the smoke on the cpu and interpreted Triton backends at tiny sizes,
# a few GPU-test cases without xdist when it is missing, the smallest CPU e2e case.
# tests/test_gpu_script.py runs it. PYTHON picks the interpreter (default python3; in a dry run
# .venv/bin/python when present).
set -uo pipefail

dry_run=0
out_arg=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help)
      sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "run.sh: unknown option $arg (expected --dry-run, --help or an output folder)" >&2
      exit 2
      ;;
    *) out_arg="$arg" ;;
  esac
done

cd "$(dirname "$0")/../.." || exit 2
root="$(pwd)"
out="${OUT:-${out_arg:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
logs="$(mktemp -d "${TMPDIR:-/tmp}/sophon-gpu-run.XXXXXX")" || exit 2
started_epoch="$(date +%s)"

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ "$dry_run" = 1 ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi

export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# The tree itself is importable in every step, so a failed build still leaves the pure-Python
# package (reference and Triton backends) for the smoke, the tests and the e2e to report on.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ "$dry_run" = 1 ]; then
  mode=dry-run
  budget=290
  # CPU only, even on a GPU machine; Triton kernels run under the interpreter.
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  nominal_environment=20 nominal_build=30 nominal_smoke=110 nominal_tests=60 nominal_e2e=60
else
  mode=gpu
  budget=330
  unset TRITON_INTERPRET
  nominal_environment=20 nominal_build=120 nominal_smoke=75 nominal_tests=60 nominal_e2e=45
fi
reserve=10 # seconds kept for the summaries and the archive
deadline=$((SECONDS + budget - reserve))
slack=0
limit=0
overall=0

finalize() { # finalize [--final]: archive the logs, then summary.json (which lists the files)
  tar -czf "$out/logs.tar.gz.tmp" -C "$logs" . 2>/dev/null && mv -f "$out/logs.tar.gz.tmp" "$out/logs.tar.gz"
  if ! "$PY" benchmarks/gpu/summarize.py --logs "$logs" --out "$out" --mode "$mode" \
    --started "$started_epoch" --budget "$budget" "$@" >>"$logs/summarize.log" 2>&1; then
    # No Python to summarise with: the steps' verdicts in plain JSON, by hand.
    {
      printf '{"schema": 1, "mode": "%s", "verdict": "failed", "error": "summarize.py failed: see logs.tar.gz summarize.log", "steps": [' "$mode"
      sep=""
      while IFS=$'\t' read -r name verdict rc seconds lim _; do
        printf '%s{"name": "%s", "verdict": "%s", "rc": "%s", "seconds": "%s", "limit_s": "%s"}' \
          "$sep" "$name" "$verdict" "$rc" "$seconds" "$lim"
        sep=", "
      done <"$logs/steps.tsv"
      printf ']}\n'
    } >"$out/summary.json"
    overall=1
  fi
}

# shellcheck disable=SC2317 # reached through the trap
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  finalize --final
  [ "$(cat "$logs/verdict" 2>/dev/null)" = passed ] || overall=1
  [ "$rc" -ne 0 ] && overall=1
  tail -n 45 "$logs/summarize.log" 2>/dev/null
  echo "results in $out (every step's log in logs.tar.gz)"
  rm -rf "$logs"
  exit "$overall"
}
trap on_exit EXIT
trap 'exit 1' INT TERM

record() { # record NAME VERDICT RC SECONDS LIMIT REASON CMD...
  local name="$1" verdict="$2" rc="$3" seconds="$4" lim="$5" reason="$6"
  shift 6
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$verdict" "$rc" "$seconds" "$lim" "$*" \
    "$(printf '%s' "$reason" | tr '\t\n' '  ')" >>"$logs/steps.tsv"
}

plan_step() { # plan_step NAME NOMINAL: sets $limit; records a skip and fails when no time is left
  local name="$1" nominal="$2" left=$((deadline - SECONDS))
  limit=$((nominal + slack))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    record "$name" skipped "" 0 "$limit" "the ${budget} s budget was used up before this step" "-"
    echo "== $name: skipped (budget used up)"
    finalize
    return 1
  fi
  return 0
}

run_step() { # run_step NAME CMD...: under $limit seconds, logged to $logs/NAME.log, never fatal
  local name="$1"
  shift
  echo "== $name (limit ${limit}s): $*"
  local t0 t1 rc verdict reason=""
  t0="$(date +%s.%N)"
  local s0=$SECONDS
  timeout -k 5 "$limit" "$@" >"$logs/$name.log" 2>&1 </dev/null
  rc=$?
  t1="$(date +%s.%N)"
  case "$rc" in
    0) verdict=passed ;;
    124 | 137)
      verdict=timed_out
      reason="killed at the step's ${limit} s limit; log tail: $(tail -c 1500 "$logs/$name.log")"
      ;;
    *) verdict=failed ;;
  esac
  slack=$((limit - (SECONDS - s0)))
  [ "$slack" -lt 0 ] && slack=0
  local seconds
  seconds="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
  echo "   $verdict (exit $rc) in ${seconds}s"
  tail -n 12 "$logs/$name.log" | sed 's/^/   | /'
  record "$name" "$verdict" "$rc" "$seconds" "$limit" "$reason" "$@"
  [ "$verdict" = passed ] || overall=1
  finalize
}

echo "sophon_fast GPU validation ($mode): python $PY, output $out, budget ${budget}s"

# 1. Environment.
env_args=(--out "$logs/environment.json")
[ "$dry_run" = 1 ] && env_args+=(--dry-run)
if plan_step environment "$nominal_environment"; then
  run_step environment "$PY" benchmarks/gpu/environment.py "${env_args[@]}"
fi

# 2. Build. No network: no dependency resolution and no index (torch is already there). CUDA
# headers found only in pip's nvidia-* packages are put on CPATH (environment.py lists them).
build=("$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .)
[ "$dry_run" = 1 ] && build+=(--dry-run) # metadata only: the dry run uses the installed build
include_dirs="$("$PY" -c 'import json, sys; print(":".join(json.load(open(sys.argv[1]))["info"].get("cuda_include_dirs", [])))' \
  "$logs/environment.json" 2>/dev/null)"
[ -n "$include_dirs" ] && build=(env CPATH="${include_dirs}${CPATH:+:$CPATH}" "${build[@]}")
if plan_step build "$nominal_build"; then
  run_step build "${build[@]}"
fi

# 3. Smoke: its own budget ends 8 s before the step's limit, so it writes every verdict itself.
smoke=("$PY" benchmarks/gpu/smoke.py --out "$out/ops.json" --logdir "$logs/smoke")
[ "$dry_run" = 1 ] && smoke+=(--dry-run)
if plan_step smoke "$nominal_smoke"; then
  run_step smoke env CUDA_LAUNCH_BLOCKING=1 "${smoke[@]}" --budget $((limit - 8))
fi

# 4. GPU tests: the files that parametrize over backends (tests/_backends.py), their cuda and
# triton cases (plus backend discovery and the device checks); no -x, so every failure shows.
mapfile -t test_files < <(grep -l "backend_params" tests/test_*.py)
tests=("$PY" -m pytest -p no:cacheprovider -v -rfEs --junitxml="$logs/tests.xml" tests/test_backend.py "${test_files[@]}")
if [ "$dry_run" = 1 ]; then
  # A few interpreted-Triton cases: the plumbing, not the coverage (CI runs the whole suite).
  tests+=(-k "triton and 1023 and float32 or test_backend")
  workers=2
else
  tests+=(-k "cuda or triton or backend or devices")
  workers=8
fi
if "$PY" -c "import xdist" 2>/dev/null; then
  tests+=(-n "$workers")
else
  echo "pytest-xdist is not installed: the tests run in one process" | tee -a "$logs/notes.log"
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  tests+=(--timeout 60)
else
  echo "pytest-timeout is not installed: no per-test time limit" | tee -a "$logs/notes.log"
fi
if plan_step tests "$nominal_tests"; then
  run_step tests "${tests[@]}"
fi

# 5. Quick e2e: the small CNN only (SOPHON_E2E_CASES selects by name; on CUDA the quick case is
# order 2, K=5, eager / whole simulation captured / reference; on the CPU order 1, K=5).
if [ "$dry_run" = 1 ]; then
  e2e_device=cpu e2e_cases="small_cnn k5 b150 o1"
else
  e2e_device=cuda e2e_cases="small_cnn"
fi
if plan_step e2e "$nominal_e2e"; then
  run_step e2e env SOPHON_E2E_CASES="$e2e_cases" "$PY" benchmarks/run.py e2e --quick \
    --device "$e2e_device" --json "$out/e2e.json" --no-csv
fi

echo "done in $((SECONDS))s; root $root"
exit "$overall"
