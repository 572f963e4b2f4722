#!/usr/bin/env bash
# The Flower test image 127.0.0.1:5000/fem/flower:1.13.1-<hash> (issue 29's federated-learning
# session): Debian's python3.11 and the libraries it needs (apt-get download + dpkg -x, no
# install on this machine), busybox-static for a shell, flwr 1.13.1 and its dependencies
# from PyPI (pip install --target, wheels only), and the session's server and client
# (tests/support/flower/; <hash> is of them and this script, so a change makes a new image).
# Built once: when the registry has the tag and it imports flwr it
# is only pulled into the engine if missing; otherwise (re)built. Downloads are kept in
# .fem-dev/cache/flower/; the root filesystem is assembled outside .fem-dev (services.sh
# start clears .fem-dev/tmp.*).
#
# usage: scripts/flower_image.sh        (prints the image reference)
# Called by `scripts/services.sh flower-image`; the registry must be up (services.sh start).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=$ROOT/.fem-dev
CACHE=$STATE/cache/flower
LOGS=$STATE/logs
REGISTRY=127.0.0.1:${FEMDEV_REGISTRY_PORT:-5000}
REPO=fem/flower
FLWR=1.13.1
TAG=$FLWR-$(cat "$ROOT"/tests/support/flower/*.py "${BASH_SOURCE[0]}" | sha256sum | cut -c1-10)
IMAGE=$REGISTRY/$REPO:$TAG
# The project's pip (scripts/bootstrap.sh's .venv, or PIP=: the tests pass their own).
PIP=${PIP:-$ROOT/.venv/bin/pip}
# Debian's python3.11 and what it links; dpkg, perl, tar and mime files are not needed.
PACKAGES=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libstdc++6 busybox-static)
SKIP='^(dpkg|install-info|perl|perl-base|perl-modules-.*|libperl.*|tar|mailcap|mime-support|libdb5\.3|libgdbm-compat4)$'
MANIFEST_ACCEPT='application/vnd.docker.distribution.manifest.v2+json'
export NO_PROXY='127.0.0.1,localhost' no_proxy='127.0.0.1,localhost'

die() {
  echo "flower_image.sh: $*" >&2
  exit 1
}

in_registry() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "Accept: $MANIFEST_ACCEPT" \
    "http://$REGISTRY/v2/$REPO/manifests/$TAG" | grep -q '^200$'
}

works() { docker run --rm --network none "$IMAGE" python3 -c 'import flwr' >/dev/null 2>&1; }

if in_registry; then
  docker pull -q "$IMAGE" >/dev/null 2>&1 || true
  if works; then
    echo "$IMAGE"
    exit 0
  fi
fi

[[ -x $PIP ]] || die "$PIP is not there: run scripts/bootstrap.sh, or set PIP"
mkdir -p "$CACHE/debs" "$CACHE/pip" "$LOGS"
log=$LOGS/flower-image.log
: >"$log"
mapfile -t debs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${PACKAGES[@]}" 2>/dev/null |
  grep -v '^[ <]' | sort -u | grep -Ev "$SKIP")
((${#debs[@]} > 5)) || die "apt-cache found no packages (run apt-get update)"
(cd "$CACHE/debs" && apt-get download "${debs[@]}" >>"$log" 2>&1) ||
  { tail -20 "$log" >&2; die "apt-get download failed"; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fem-flower-image.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
rootfs=$tmp/rootfs
mkdir -p "$rootfs"
for name in "${debs[@]}"; do
  deb=$(ls -t "$CACHE/debs/${name}"_*.deb 2>/dev/null | head -1)
  [[ -n $deb ]] || die "no downloaded .deb for $name"
  dpkg -x "$deb" "$rootfs"
done
mkdir -p "$rootfs/bin" "$rootfs/usr/bin" "$rootfs/etc" "$rootfs/opt/fem-flower"
ln -sf /bin/busybox "$rootfs/bin/sh"
ln -sf python3.11 "$rootfs/usr/bin/python3"
# merged /usr: Debian's libraries land in /lib and /usr/lib alike
[[ -e $rootfs/lib64 ]] || ln -s usr/lib64 "$rootfs/lib64"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
mkdir -m 1777 -p "$rootfs/tmp"

"$PIP" install --quiet --no-compile --only-binary=:all: --cache-dir "$CACHE/pip" \
  --target "$rootfs/opt/fem-flower/site" "flwr==$FLWR" >>"$log" 2>&1 ||
  { tail -20 "$log" >&2; die "pip install flwr==$FLWR failed"; }
install -m 0644 "$ROOT"/tests/support/flower/*.py "$rootfs/opt/fem-flower/"
[[ -x $rootfs/usr/bin/python3.11 && -d $rootfs/opt/fem-flower/site/flwr ]] ||
  die "the root filesystem is incomplete (was $tmp removed while building?)"

tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$rootfs" -cf "$tmp/rootfs.tar" .
docker import \
  --change 'ENV PATH=/usr/bin:/bin' \
  --change 'ENV PYTHONPATH=/opt/fem-flower/site' \
  --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
  --change 'CMD ["python3"]' \
  --change 'LABEL org.opencontainers.image.title=fem-flower' \
  "$tmp/rootfs.tar" "$IMAGE" >>"$log" 2>&1 || { tail -20 "$log" >&2; die "docker import failed"; }
docker push "$IMAGE" >>"$log" 2>&1 || { tail -20 "$log" >&2; die "docker push $IMAGE failed"; }
works || die "$IMAGE was built but cannot import flwr"
echo "$IMAGE"
