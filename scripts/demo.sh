#!/usr/bin/env bash
# The main job, end to end: installs and starts what is missing, writes a demo site config,
# starts `fem-ansible listen` in the background, submits examples/sample-task.json (its URLs
# those of the services: scripts/demo-task.sh) through RabbitMQ as an orchestrator would
# (`fem-ansible submit --wait` prints the events), stops the listener and shows where the
# uploaded outputs are.
# Exit status: that of `fem-ansible submit --wait` (0 = COMPLETED).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEMO=$ROOT/.fem-dev/demo
CONFIG=$DEMO/config.yml
FEM=$ROOT/.venv/bin/fem-ansible

die() {
  echo "demo.sh: $*" >&2
  exit 1
}

scripts/bootstrap.sh
scripts/services.sh start
# Exported: scripts/demo-task.sh, a child process, reads them too.
set -a
# shellcheck source=/dev/null
source "$ROOT/.fem-dev/env"
set +a
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# The sample task, pointed at the services' ports (FEMDEV_*_PORT may have moved them).
TASK=$DEMO/task.json

# A fresh demo node each time: the journal would otherwise answer a re-sent task_id with its
# old result instead of running it again (DESIGN.md §5).
rm -rf "$DEMO"
mkdir -p "$DEMO/work" "$DEMO/datasets/sample"
printf 'sample dataset: line 1\nsample dataset: line 2\n' >"$DEMO/datasets/sample/records.txt"
chmod 0755 "$DEMO" "$DEMO/datasets" "$DEMO/datasets/sample"
chmod 0644 "$DEMO/datasets/sample/records.txt"

cat >"$CONFIG" <<YAML
# written by scripts/demo.sh
node_id: demo
broker:
  url: "amqp://guest:guest@127.0.0.1:5672/%2F"
execution:
  work_dir: "$DEMO/work"
policy:
  images:
    allow: ["$FEM_TEST_REGISTRY/**"]
  sources:
    allow: ["$FEM_TEST_GIT_BASE_URL/**"]
  uploads:
    allow: ["$FEM_TEST_UPLOAD_URL/**"]
  downloads:
    allow: ["$FEM_TEST_UPLOAD_URL/**"]
  datasets:
    sample:
      path: "$DEMO/datasets/sample"
YAML

# Stale messages for node `demo` from an interrupted earlier demo would run first.
rabbitmqctl -q purge_queue fem.tasks.demo >/dev/null 2>&1 || true

scripts/demo-task.sh >"$TASK"

rm -f "$FEM_TEST_UPLOAD_DIR/demo/sample-task-1/"*.tar.gz
"$FEM" listen --config "$CONFIG" >"$DEMO/listener.log" 2>&1 &
listener=$!
stop_listener() {
  if kill -0 "$listener" 2>/dev/null; then
    kill -TERM "$listener" 2>/dev/null || true
    for _ in $(seq 1 150); do
      kill -0 "$listener" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$listener" 2>/dev/null || true
  fi
  wait "$listener" 2>/dev/null || true
}
trap stop_listener EXIT

sleep 1
kill -0 "$listener" 2>/dev/null || {
  tail -n 30 "$DEMO/listener.log" >&2
  die "the listener exited at start (log: $DEMO/listener.log)"
}

echo "submitting $TASK to node 'demo' (listener log: $DEMO/listener.log)"
rc=0
"$FEM" submit "$TASK" --config "$CONFIG" --wait --timeout 600 || rc=$?
stop_listener
trap - EXIT

out=$FEM_TEST_UPLOAD_DIR/demo/sample-task-1
echo
if ((rc == 0)); then
  echo "COMPLETED. Uploaded to $FEM_TEST_UPLOAD_URL/demo/sample-task-1/, stored in $out:"
else
  echo "the task did not complete (exit $rc); listener log: $DEMO/listener.log" >&2
fi
if [[ -f $out/outputs.tar.gz ]]; then
  ls -l "$out"
  echo "--- result.txt from outputs.tar.gz ---"
  tar -xzOf "$out/outputs.tar.gz" --wildcards '*result.txt' 2>/dev/null || tar -tzvf "$out/outputs.tar.gz"
fi
exit "$rc"
