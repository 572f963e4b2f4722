#!/usr/bin/env bash
# Installs what fem-ansible's tests and demo need on a Debian 12 machine, idempotently:
#   Debian packages (only those missing): docker.io docker-registry busybox-static git
#     openssh-server curl iproute2 util-linux slurm-wlm munge apache2-utils openssl
#     python3-docker systemd podman prometheus
#   .venv (python3.11) with `pip install -e '.[test]'`, redone only when pyproject.toml changed.
# Silent on success; a failure prints the end of the log that tells why.
# FEMDEV_PYTHON=/path/to/python3.11 chooses the interpreter for a new .venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGS=$ROOT/.fem-dev/logs
VENV=$ROOT/.venv
STAMP=$VENV/.fem-bootstrap
mkdir -p "$LOGS" "$ROOT/.fem-dev/run"
# one bootstrap at a time in this checkout (two pip installs into one venv break it)
exec 8>"$ROOT/.fem-dev/run/bootstrap.lock"
flock -w 900 8 || { echo "bootstrap.sh: another bootstrap holds the lock" >&2; exit 1; }

die() {
  echo "bootstrap.sh: $*" >&2
  exit 1
}
show_log() {
  echo "--- last lines of $1 ---" >&2
  tail -n 30 "$1" >&2
  echo "---" >&2
}

# --- Debian packages -------------------------------------------------------------------------

# slurm-wlm and munge: the one-node cluster of the Slurm executor's tests (tests/support/slurm.py).
# apache2-utils (htpasswd) and openssl: the password-protected registry and the TLS broker
# node that tests/test_e2e_security.py starts for itself.
# python3-docker (brings python3-requests): the Docker SDK in Debian's python3, which the
# SSH hosts of tests/test_e2e_hosts.py use as ansible_python_interpreter, as a remote host would.
# systemd: systemd-analyze verifies contrib/fem-ansible.service (tests/test_contrib.py).
# podman: the engine of the podman executor (fem_executor_podman, tests/test_e2e_podman.py).
# prometheus (brings promtool): contrib/prometheus-rules.yml checked and unit-tested, and a
# Prometheus of the test's own querying contrib/grafana-dashboard.json's expressions against
# a running listener (tests/test_e2e_dashboards.py).
APT_PACKAGES=(docker.io docker-registry busybox-static git openssh-server curl iproute2 util-linux
  slurm-wlm munge apache2-utils openssl python3-docker systemd podman prometheus)

missing_packages() { # prints the packages of "$@" that are not installed
  local pkg status
  for pkg in "$@"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || echo "$pkg"
  done
}

apt_updated=false
apt_install() {
  [[ $(id -u) == 0 ]] || die "needs root to install Debian packages: $*"
  local log=$LOGS/apt.log
  export DEBIAN_FRONTEND=noninteractive
  if ! $apt_updated; then
    apt-get update -qq >"$log" 2>&1 || { show_log "$log"; die "apt-get update failed"; }
    apt_updated=true
  fi
  apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1 ||
    { show_log "$log"; die "apt-get install $* failed"; }
}

mapfile -t need < <(missing_packages "${APT_PACKAGES[@]}")
if ((${#need[@]})); then
  apt_install "${need[@]}"
fi

# --- Python virtualenv -----------------------------------------------------------------------

py_ok() { # py_ok PYTHON: runs, and is 3.11 or newer
  "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

find_python() {
  local c
  for c in "${FEMDEV_PYTHON:-}" python3.11 /root/.pyenv/versions/3.11*/bin/python3.11 \
    /usr/local/bin/python3.11 /usr/bin/python3.11; do
    [[ -n $c ]] || continue
    if py_ok "$c"; then
      # the real interpreter, not a pyenv shim
      "$c" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  return 1
}

if ! py_ok "$VENV/bin/python"; then
  python=$(find_python) || {
    apt_install python3.11 python3.11-venv
    python=$(find_python) || die "no usable python3.11 found"
  }
  rm -rf "$VENV"
  "$python" -m venv "$VENV" >"$LOGS/venv.log" 2>&1 || {
    show_log "$LOGS/venv.log"
    die "$python -m venv $VENV failed (Debian: apt-get install python3.11-venv)"
  }
fi

# Reinstall when pyproject.toml (the dependencies) or the interpreter changed, or when the
# editable install is gone.
want=$(cat "$ROOT/pyproject.toml" "$VENV/pyvenv.cfg" | sha256sum | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ $want != "$have" ]] || [[ ! -x $VENV/bin/fem-ansible ]] ||
  ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.distribution("fem-ansible")' \
    >/dev/null 2>&1; then
  log=$LOGS/pip.log
  : >"$log"
  (
    cd "$ROOT"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    "$VENV/bin/python" -m pip install -q -e '.[test]'
  ) >>"$log" 2>&1 || { show_log "$log"; die "pip install -e '.[test]' failed (log: $log)"; }
  echo "$want" >"$STAMP"
fi
