#!/usr/bin/env bash
# Runs the tests: installs what is missing (bootstrap.sh), starts the local services
# (services.sh), then ruff, ansible-lint (when roles/ has content) and pytest.
# Arguments go to pytest: scripts/test.sh -k upload -x
# Exits non-zero when any step fails (pytest's "no tests collected" included).
# FEMDEV_TEST_TIMEOUT: seconds pytest may take (default 1080).
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
  # pytest's own closing line last, as the line that tells what ran
  if [[ -s $PYTEST_OUT ]]; then
    tail -n 1 "$PYTEST_OUT"
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

pytest_step() {
  set -o pipefail
  timeout --signal=INT --kill-after=60 "${FEMDEV_TEST_TIMEOUT:-1080}" \
    pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$PYTEST_OUT"
}
run_step pytest pytest_step "$@"

print_summary
exit $failed
