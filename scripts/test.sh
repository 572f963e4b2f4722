#!/usr/bin/env bash
# Runs the tests: installs what is missing (bootstrap.sh), starts the local services
# (services.sh), then ruff, ansible-lint (when roles/ has content) and pytest.
# Arguments go to pytest: scripts/test.sh -k upload -x
# Exits non-zero when any step fails (pytest's "no tests collected" included).
# FEMDEV_TEST_TIMEOUT: seconds a pytest phase may take (default 2700: a hung test fails the
# run, while a slow machine, where the parallel phase has taken 18 minutes, still passes).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOGS=$ROOT/.fem-dev/logs
mkdir -p "$LOGS"
t0=$SECONDS
summary=()
failed=0

note() { summary+=("$(printf '%-13s %-8s %s' "$1" "$2" "$3")"); }

# run_step NAME CMD...: runs CMD (its output shown), records its outcome and time
run_step() {
  local name=$1 t=$SECONDS rc=0
  shift
  "$@" || rc=$?
  if ((rc == 0)); then
    note "$name" ok "$((SECONDS - t))s"
  else
    note "$name" FAILED "exit $rc, $((SECONDS - t))s"
    failed=1
  fi
  return 0
}

print_summary() {
  echo
  echo "== scripts/test.sh summary ($((SECONDS - t0))s)"
  printf '   %s\n' "${summary[@]}"
  # The pytest phases' closing lines, then their sum as the line that tells what ran.
  if [[ -s $PYTEST_OUT ]]; then
    grep -E '^=* ?[0-9]+ (passed|failed|error)|no tests ran' "$PYTEST_OUT" || true
    local passed failed_n
    # (grep finds nothing when nothing failed: not an error under pipefail)
    passed=$({ grep -Eo '[0-9]+ passed' "$PYTEST_OUT" || true; } | awk '{s+=$1} END {print s+0}')
    failed_n=$({ grep -Eo '[0-9]+ (failed|errors?)' "$PYTEST_OUT" || true; } |
      awk '{s+=$1} END {print s+0}')
    echo "tests: $passed passed, $failed_n failed"
  fi
}

PYTEST_OUT=$LOGS/pytest.$$.out
trap 'rm -f "$PYTEST_OUT"' EXIT
t=$SECONDS
scripts/bootstrap.sh || { echo "test.sh: bootstrap failed" >&2; exit 1; }
note bootstrap ok "$((SECONDS - t))s"
t=$SECONDS
scripts/services.sh start || { echo "test.sh: services failed to start" >&2; exit 1; }
note services ok "$((SECONDS - t))s"

export PATH=$ROOT/.venv/bin:$PATH
# The tests talk to loopback only; keep any proxy out of the way.
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

run_step ruff ruff check --quiet .

if [[ -n $(find roles -mindepth 1 -not -name '.gitkeep' -print -quit 2>/dev/null) ]]; then
  run_step ansible-lint timeout 600 ansible-lint --offline -q
else
  note ansible-lint skipped "roles/ is empty"
fi

# Two phases: most tests in parallel workers, then alone the ones that stop RabbitMQ (they
# would break every other test's connection) and the ones that assert an issue's time
# bound (timed: measured without the load of the parallel workers). Both closing lines go
# to the summary.
pytest_step() {
  set -o pipefail
  timeout --signal=INT --kill-after=60 "${FEMDEV_TEST_TIMEOUT:-2700}" \
    pytest -q -p no:cacheprovider "$@" 2>&1 | tee -a "$PYTEST_OUT"
}
if (($# == 0)); then
  run_step pytest pytest_step -n "${FEMDEV_TEST_WORKERS:-3}" -m "not serial and not timed"
  run_step pytest-serial pytest_step -m "serial or timed"
else
  run_step pytest pytest_step "$@"
fi

# The benchmark in quick mode, so that it keeps working (it asserts nothing on speed).
if (($# == 0)); then
  run_step bench timeout 1800 python bench/run.py --quick
fi

print_summary
exit $failed
