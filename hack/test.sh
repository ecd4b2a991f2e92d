#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run lint, types and tests.
#   bash hack/test.sh            # everything
#   bash hack/test.sh -k engine  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv .venv
fi
echo "==> installing tidegate and test dependencies"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

for tool in curl git; do
    if ! command -v "$tool" >/dev/null; then
        echo "==> installing $tool"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool"
    fi
done

if [ -x hack/control-plane/build.sh ] || [ -f hack/control-plane/build.sh ]; then
    echo "==> test control plane (kube-apiserver, etcd, kubectl, helm): build or reuse the cache"
    bash hack/control-plane/build.sh
fi

echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
.venv/bin/pytest "$@"
