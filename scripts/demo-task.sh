#!/usr/bin/env bash
# examples/sample-task.json pointed at the development services the environment names
# (.fem-dev/env: FEM_TEST_REGISTRY, FEM_TEST_GIT_BASE_URL, FEM_TEST_UPLOAD_URL), on stdout.
# The sample names the default ports; services.sh moves them with FEMDEV_*_PORT, and
# scripts/demo.sh submits this instead of the sample as it is (issue 31).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${FEM_TEST_REGISTRY:?source .fem-dev/env first}" "${FEM_TEST_GIT_BASE_URL:?}" "${FEM_TEST_UPLOAD_URL:?}"
sed -e "s|\"127\\.0\\.0\\.1:5000/|\"$FEM_TEST_REGISTRY/|g" \
    -e "s|\"git://127\\.0\\.0\\.1:9418/|\"$FEM_TEST_GIT_BASE_URL/|g" \
    -e "s|\"http://127\\.0\\.0\\.1:8089/|\"$FEM_TEST_UPLOAD_URL/|g" \
    "$ROOT/examples/sample-task.json"
