#!/usr/bin/env bash
# Local services for the fem-ansible tests and demo, all on loopback:
#   dockerd (system-wide; started only when /var/run/docker.sock does not answer)
#   docker-registry   127.0.0.1:5000   state in .fem-dev/registry/
#   git daemon        127.0.0.1:9418   serves .fem-dev/git/ (sample.git seeded)
#   upload endpoint   127.0.0.1:8089   tests/support/upload_server.py, files in .fem-dev/uploads/
#   RabbitMQ          127.0.0.1:5672   started with `rabbitmq-server -detached` when down
# and the sample image 127.0.0.1:5000/fem/busybox:1. `.fem-dev/env` describes them.
#
# usage: scripts/services.sh start|stop [--all]|status
#   start   idempotent; waits until every service answers; silent on success
#   stop    stops the registry, git daemon and upload endpoint; with --all also the dockerd
#           that this script started (never a dockerd or RabbitMQ it did not start)
#   status  one line per service; exit 0 when all answer, 3 otherwise
# Ports can be moved with FEMDEV_REGISTRY_PORT, FEMDEV_GIT_PORT, FEMDEV_UPLOAD_PORT.
# A dockerd started here tries overlay2, then vfs; its log is .fem-dev/logs/dockerd.log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=$ROOT/.fem-dev
RUN=$STATE/run
LOGS=$STATE/logs
HOST=127.0.0.1
REGISTRY_PORT=${FEMDEV_REGISTRY_PORT:-5000}
GIT_PORT=${FEMDEV_GIT_PORT:-9418}
UPLOAD_PORT=${FEMDEV_UPLOAD_PORT:-8089}
AMQP_PORT=5672
DOCKER_SOCK=/var/run/docker.sock
REGISTRY=$HOST:$REGISTRY_PORT
IMAGE_REPO=fem/busybox
IMAGE_TAG=1
IMAGE=$REGISTRY/$IMAGE_REPO:$IMAGE_TAG
GIT_URL=git://$HOST:$GIT_PORT/sample.git
UPLOAD_URL=http://$HOST:$UPLOAD_PORT
MANIFEST_ACCEPT='application/vnd.docker.distribution.manifest.v2+json'
export NO_PROXY='127.0.0.1,localhost' no_proxy='127.0.0.1,localhost'

die() {
  echo "services.sh: $*" >&2
  exit 1
}
show_log() { # show_log FILE: the end of a log, for a failure message
  if [[ -s $1 ]]; then
    echo "--- last lines of $1 ---" >&2
    tail -n 25 "$1" >&2
    echo "---" >&2
  fi
}

# --- small probes ----------------------------------------------------------------------------

tcp_open() { timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" 2>/dev/null || true; }
docker_ping() {
  [[ -S $DOCKER_SOCK ]] &&
    [[ $(curl -s --max-time 3 --unix-socket "$DOCKER_SOCK" http://docker/_ping 2>/dev/null) == OK ]]
}
amqp_answers() { # the broker answers the AMQP 0-9-1 header with a Connection.Start frame
  timeout 5 bash -c "exec 3<>/dev/tcp/$HOST/$AMQP_PORT && printf 'AMQP\\x00\\x00\\x09\\x01' >&3 &&
    head -c1 <&3 | od -An -tx1 | grep -q 01" 2>/dev/null
}
registry_answers() { [[ $(http_code "http://$REGISTRY/v2/") == 200 ]]; }
upload_answers() {
  curl -s --max-time 3 "$UPLOAD_URL/_control/health" 2>/dev/null | grep -q fem-upload-server
}
git_answers() { tcp_open "$GIT_PORT"; }
port_pid() { # port_pid PORT: the pid listening on PORT, if ss can tell
  ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2 || true
}
port_owner() { # port_owner PORT: "pid=… cmd" of the listener, for messages
  local pid
  pid=$(port_pid "$1")
  if [[ -n $pid ]]; then
    echo "pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-160)"
  else
    echo "an unknown process"
  fi
}

# our_pid NAME: prints the pid recorded for NAME when that process still runs and is ours
our_pid() {
  local file=$RUN/$1.pid pid
  [[ -s $file && -s $RUN/$1.cmd ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  # guard against pid reuse: the command line must be the one we started
  grep -qF -- "$(<"$RUN/$1.cmd")" <(tr '\0' ' ' <"/proc/$pid/cmdline") 2>/dev/null || return 1
  echo "$pid"
}

# spawn NAME MARKER CMD...: start CMD detached (own session), log to logs/NAME.log
spawn() {
  local name=$1 marker=$2
  shift 2
  : >"$LOGS/$name.log"
  # 9>&-: the daemon must not inherit (and hold) the lock of this script
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$RUN/$name.pid"
  printf '%s' "$marker" >"$RUN/$name.cmd"
}

# wait_for NAME SECONDS PROBE...: until PROBE succeeds; fails early when NAME's process died
wait_for() {
  local name=$1 secs=$2 deadline
  shift 2
  deadline=$((SECONDS + secs))
  until "$@"; do
    # alive, not our_pid: just after spawn the process may not have exec'd its command yet,
    # so its command line is still this script's
    if [[ -s $RUN/$name.pid ]] && ! alive "$(<"$RUN/$name.pid")"; then
      show_log "$LOGS/$name.log"
      die "$name exited during start-up"
    fi
    if ((SECONDS >= deadline)); then
      show_log "$LOGS/$name.log"
      die "$name did not answer within ${secs}s"
    fi
    sleep 0.2
  done
}

alive() { # alive PID: runs and is not a zombie waiting for its (adopting) parent to reap it
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

stop_pid() { # stop_pid NAME: TERM, then KILL after 20 s
  local pid i
  pid=$(our_pid "$1") || {
    rm -f "$RUN/$1.pid" "$RUN/$1.cmd"
    return 0
  }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 200; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$RUN/$1.pid" "$RUN/$1.cmd"
}

need_root() { [[ $(id -u) == 0 ]] || die "$1 needs root (run as root, or start it by hand)"; }
need_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null || die "'$c' not found: run scripts/bootstrap.sh first"
  done
}

# --- services --------------------------------------------------------------------------------

start_dockerd() {
  docker_ping && return 0
  need_root "starting dockerd"
  need_cmd dockerd
  local driver
  # FEMDEV_DOCKER_DRIVERS: the storage drivers to try, in order (a test hook)
  for driver in ${FEMDEV_DOCKER_DRIVERS:-overlay2 vfs}; do
    spawn dockerd "dockerd --bridge=none" \
      dockerd --bridge=none --iptables=false --storage-driver="$driver" \
      --host "unix://$DOCKER_SOCK"
    local deadline=$((SECONDS + 60))
    until docker_ping; do
      our_pid dockerd >/dev/null || break
      ((SECONDS < deadline)) || break
      sleep 0.2
    done
    if docker_ping; then
      echo "$driver" >"$RUN/dockerd.driver"
      return 0
    fi
    echo "services.sh: dockerd with storage driver $driver did not start:" >&2
    grep -v 'level=info' "$LOGS/dockerd.log" | tail -n 8 >&2 || true
    stop_pid dockerd
    cp "$LOGS/dockerd.log" "$LOGS/dockerd-$driver-failed.log" 2>/dev/null || true
  done
  die "dockerd did not start with overlay2 nor vfs (logs in $LOGS)"
}

start_rabbitmq() {
  amqp_answers && return 0
  need_cmd rabbitmq-server
  # -detached returns at once; the node takes a few seconds to listen
  rabbitmq-server -detached >>"$LOGS/rabbitmq-start.log" 2>&1 </dev/null 9>&- ||
    { show_log "$LOGS/rabbitmq-start.log"; die "rabbitmq-server -detached failed"; }
  local deadline=$((SECONDS + 90))
  until amqp_answers; do
    if ((SECONDS >= deadline)); then
      show_log "$LOGS/rabbitmq-start.log"
      show_log "$(ls -t /var/log/rabbitmq/*.log 2>/dev/null | head -n1)"
      die "RabbitMQ did not answer on $HOST:$AMQP_PORT within 90s"
    fi
    sleep 0.5
  done
}

start_registry() {
  if our_pid registry >/dev/null; then
    wait_for registry 30 registry_answers
    return 0
  fi
  if tcp_open "$REGISTRY_PORT"; then
    die "port $REGISTRY_PORT is taken by $(port_owner "$REGISTRY_PORT"), not by this" \
      "checkout's registry (stop it, or set FEMDEV_REGISTRY_PORT)"
  fi
  need_cmd docker-registry
  mkdir -p "$STATE/registry/data"
  cat >"$STATE/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
  fields:
    service: fem-dev-registry
storage:
  filesystem:
    rootdirectory: $STATE/registry/data
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $REGISTRY
  headers:
    X-Content-Type-Options: [nosniff]
EOF
  spawn registry "$STATE/registry/config.yml" docker-registry serve "$STATE/registry/config.yml"
  wait_for registry 30 registry_answers
}

start_git_daemon() {
  mkdir -p "$STATE/git"
  if our_pid git-daemon >/dev/null; then
    wait_for git-daemon 30 git_answers
    return 0
  fi
  if tcp_open "$GIT_PORT"; then
    die "port $GIT_PORT is taken by $(port_owner "$GIT_PORT"), not by this checkout's" \
      "git daemon (stop it, or set FEMDEV_GIT_PORT)"
  fi
  need_cmd git
  local exe
  exe="$(git --exec-path)/git-daemon"
  [[ -x $exe ]] || die "$exe not found (Debian package git)"
  spawn git-daemon "--base-path=$STATE/git" \
    "$exe" --reuseaddr --listen="$HOST" --port="$GIT_PORT" --export-all \
    --base-path="$STATE/git" --informative-errors --verbose
  wait_for git-daemon 30 git_answers
}

python_for_tools() {
  if [[ -x $ROOT/.venv/bin/python ]]; then
    echo "$ROOT/.venv/bin/python"
  else
    command -v python3 || die "no python3"
  fi
}

start_upload() {
  mkdir -p "$STATE/uploads"
  if our_pid upload >/dev/null; then
    wait_for upload 30 upload_answers
    return 0
  fi
  if tcp_open "$UPLOAD_PORT"; then
    die "port $UPLOAD_PORT is taken by $(port_owner "$UPLOAD_PORT"), not by this checkout's" \
      "upload endpoint (stop it, or set FEMDEV_UPLOAD_PORT)"
  fi
  spawn upload "$ROOT/tests/support/upload_server.py" \
    "$(python_for_tools)" "$ROOT/tests/support/upload_server.py" \
    --host "$HOST" --port "$UPLOAD_PORT" --dir "$STATE/uploads"
  wait_for upload 30 upload_answers
}

# --- seed data -------------------------------------------------------------------------------

registry_digest() { # the manifest digest of $IMAGE in the registry, empty when absent
  curl -s -I --max-time 5 -H "Accept: $MANIFEST_ACCEPT" \
    "http://$REGISTRY/v2/$IMAGE_REPO/manifests/$IMAGE_TAG" 2>/dev/null |
    tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }'
}

seed_image() {
  local digest
  digest=$(registry_digest)
  if [[ -z $digest ]]; then
    need_cmd docker
    local busybox=/bin/busybox
    [[ -x $busybox ]] || die "$busybox missing: run scripts/bootstrap.sh (busybox-static)"
    if ldd "$busybox" >/dev/null 2>&1; then
      die "$busybox is dynamically linked: install busybox-static (scripts/bootstrap.sh)"
    fi
    local tmp rootfs applet
    tmp=$(mktemp -d "$STATE/tmp.image.XXXXXX")
    rootfs=$tmp/rootfs
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,home,fem,var/tmp}
    install -m 0755 "$busybox" "$rootfs/bin/busybox"
    # every applet, as a symlink where busybox would install it
    while read -r applet; do
      [[ -n $applet && ! -e $rootfs/$applet && ! -L $rootfs/$applet ]] || continue
      mkdir -p "$rootfs/$(dirname "$applet")"
      ln -s /bin/busybox "$rootfs/$applet"
    done < <("$busybox" --list-full)
    for applet in sh cat echo sleep ls cp mkdir id wc sha256sum tar env true false; do
      [[ -e $rootfs/bin/$applet || -L $rootfs/bin/$applet ]] || ln -s busybox "$rootfs/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n' \
      >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    mkdir -m 1777 "$rootfs/tmp"
    chmod 1777 "$rootfs/var/tmp"
    echo 'fem-busybox' >"$rootfs/etc/hostname"
    tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$rootfs" -cf "$tmp/rootfs.tar" . ||
      die "could not pack the busybox root filesystem"
    docker import \
      --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["sh"]' \
      --change 'LABEL org.opencontainers.image.title=fem-busybox' \
      "$tmp/rootfs.tar" "$IMAGE" >"$LOGS/seed-image.log" 2>&1 ||
      { show_log "$LOGS/seed-image.log"; die "docker import of the sample image failed"; }
    docker push "$IMAGE" >>"$LOGS/seed-image.log" 2>&1 ||
      { show_log "$LOGS/seed-image.log"; die "docker push $IMAGE failed"; }
    rm -rf "$tmp"
    digest=$(registry_digest)
    [[ -n $digest ]] || die "pushed $IMAGE but the registry has no manifest for it"
  elif docker image inspect "$IMAGE" >/dev/null 2>&1 &&
    ! docker image inspect --format '{{join .RepoDigests " "}}' "$IMAGE" | grep -qF "@$digest"; then
    # The engine's tag is another registry's image (another checkout's services seeded their
    # own on this engine): pull this one, or tests see the wrong digest.
    docker pull "$IMAGE" >"$LOGS/seed-image.log" 2>&1 ||
      { show_log "$LOGS/seed-image.log"; die "docker pull $IMAGE failed"; }
  fi
  IMAGE_DIGEST=$digest
}

seed_git() {
  local bare=$STATE/git/sample.git commit
  if ! commit=$(git --git-dir="$bare" rev-parse -q --verify refs/heads/main 2>/dev/null); then
    rm -rf "$bare"
    local tmp
    tmp=$(mktemp -d "$STATE/tmp.git.XXXXXX")
    (
      cd "$tmp"
      # fixed author, committer and dates: the same commit id on every machine
      export GIT_AUTHOR_NAME='fem-ansible tests' GIT_AUTHOR_EMAIL='tests@fem-ansible.invalid'
      export GIT_COMMITTER_NAME='fem-ansible tests' GIT_COMMITTER_EMAIL='tests@fem-ansible.invalid'
      export GIT_AUTHOR_DATE='2024-01-01T00:00:00Z' GIT_COMMITTER_DATE='2024-01-01T00:00:00Z'
      export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
      git init -q -b main .
      printf 'hello from the fem-ansible sample repository\n' >hello.txt
      printf '#!/bin/sh\n# sample entry point: prints the checked-out file\nset -e\necho "run.sh in $(pwd)"\ncat "$(dirname "$0")/hello.txt"\n' >run.sh
      chmod 0755 run.sh
      git add hello.txt run.sh
      git commit -q -m 'Sample repository for fem-ansible tests'
      git tag v1
      git clone -q --bare . "$bare"
    ) >"$LOGS/seed-git.log" 2>&1 || { show_log "$LOGS/seed-git.log"; die "could not create $bare"; }
    rm -rf "$tmp"
    git --git-dir="$bare" config uploadpack.allowAnySHA1InWant true
    git --git-dir="$bare" config uploadpack.allowReachableSHA1InWant true
    commit=$(git --git-dir="$bare" rev-parse refs/heads/main)
  fi
  GIT_COMMIT=$commit
  local remote
  remote=$(GIT_TERMINAL_PROMPT=0 timeout 20 git ls-remote "$GIT_URL" refs/heads/main 2>&1) ||
    { show_log "$LOGS/git-daemon.log"; die "git ls-remote $GIT_URL failed: $remote"; }
  [[ $remote == "$GIT_COMMIT"* ]] || die "git daemon serves $remote, expected $GIT_COMMIT"
}

write_env() {
  local tmp=$STATE/env.tmp.$$
  {
    echo "# written by scripts/services.sh start; read it with tests/support/services.py load_env()"
    echo "# or source it in a shell. fem-ansible ignores these: its config overrides are named"
    echo "# FEM_ANSIBLE_* (FEM_ANSIBLE_A__B sets a.b)."
    printf "%s='%s'\n" \
      FEM_TEST_REGISTRY "$REGISTRY" \
      FEM_TEST_IMAGE "$IMAGE" \
      FEM_TEST_IMAGE_DIGEST "$IMAGE_DIGEST" \
      FEM_TEST_IMAGE_BY_DIGEST "$REGISTRY/$IMAGE_REPO@$IMAGE_DIGEST" \
      FEM_TEST_GIT_URL "$GIT_URL" \
      FEM_TEST_GIT_COMMIT "$GIT_COMMIT" \
      FEM_TEST_GIT_BASE_URL "git://$HOST:$GIT_PORT" \
      FEM_TEST_GIT_DIR "$STATE/git" \
      FEM_TEST_UPLOAD_URL "$UPLOAD_URL" \
      FEM_TEST_UPLOAD_DIR "$STATE/uploads" \
      FEM_TEST_AMQP_URL "amqp://guest:guest@$HOST:$AMQP_PORT/%2F" \
      FEM_TEST_DOCKER_STORAGE_DRIVER "$(docker_driver)"
  } >"$tmp"
  mv -f "$tmp" "$STATE/env"
}

docker_driver() {
  curl -s --max-time 5 --unix-socket "$DOCKER_SOCK" http://docker/info 2>/dev/null |
    grep -o '"Driver":"[^"]*"' | head -n1 | cut -d'"' -f4
}

# --- commands --------------------------------------------------------------------------------

lock() {
  mkdir -p "$RUN" "$LOGS"
  exec 9>"$RUN/lock"
  flock -w 600 9 || die "another services.sh holds $RUN/lock"
}

cmd_start() {
  need_cmd curl setsid flock ss
  lock
  rm -rf "$STATE"/tmp.*
  start_rabbitmq &
  local rabbit_job=$!
  start_dockerd
  start_registry
  start_git_daemon
  start_upload
  seed_image
  seed_git
  wait "$rabbit_job" || exit 1
  write_env
}

cmd_stop() {
  lock
  stop_pid upload
  stop_pid git-daemon
  stop_pid registry
  if [[ ${1:-} == --all ]]; then
    stop_pid dockerd
  fi
}

cmd_status() {
  local ok=0 pid
  line() { printf '%-10s %-8s %s\n' "$1" "$2" "$3"; }
  if docker_ping; then
    pid=$(our_pid dockerd || true)
    line dockerd up "${pid:+pid $pid, started by services.sh; }driver $(docker_driver)"
  else
    line dockerd down ""
    ok=3
  fi
  if amqp_answers; then line rabbitmq up "$HOST:$AMQP_PORT"; else
    line rabbitmq down "$HOST:$AMQP_PORT"
    ok=3
  fi
  local name probe addr port owner
  for name in registry git-daemon upload; do
    case $name in
    registry) probe=registry_answers addr=$REGISTRY port=$REGISTRY_PORT ;;
    git-daemon) probe=git_answers addr=$HOST:$GIT_PORT port=$GIT_PORT ;;
    upload) probe=upload_answers addr=$UPLOAD_URL port=$UPLOAD_PORT ;;
    esac
    pid=$(our_pid "$name" || true)
    # the pid beside the address is the one listening on the port just checked
    owner=$(port_pid "$port")
    if [[ -n $pid ]] && $probe && [[ -z $owner || $owner == "$pid" ]]; then
      line "$name" up "$addr, pid $pid"
    elif [[ -n $owner ]] && $probe; then
      line "$name" up "$addr, pid $owner (not started by services.sh${pid:+; its $name, pid $pid, does not listen on $port})"
    elif [[ -n $pid ]]; then
      line "$name" starting "$addr, pid $pid"
      ok=3
    else
      line "$name" down "$addr"
      ok=3
    fi
  done
  if [[ -s $STATE/env ]]; then echo "env: $STATE/env"; fi
  return $ok
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop "${2:-}" ;;
status) cmd_status ;;
*)
  echo "usage: $0 start|stop [--all]|status" >&2
  exit 2
  ;;
esac
