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

# A step that cannot be done fails the run, naming the step: a run that silently skipped the
# tests on the real API server or in the real image would be green for nothing. A person
# (never CI) may opt out explicitly, and the run then says so on every line that matters:
#   TIDEGATE_SKIP_KUBE=1   no control plane: the tests marked `kube` are skipped
#   TIDEGATE_SKIP_IMAGE=1  no container image: the tests marked `image` are skipped
fail() { echo "==> FAILED at step: $1" >&2; exit 1; }
opted_out() { echo "==> WARNING: $1=1 set by hand: $2 are SKIPPED; this run proves nothing about them" >&2; }

echo "==> dependency lock is current (hack/lock.sh --check)"
bash hack/lock.sh --check || fail "dependency lock (requirements.lock; run: bash hack/lock.sh)"

echo "==> Dockerfile lint (hadolint)"
if [ -x .venv/bin/hadolint ]; then
    .venv/bin/hadolint Dockerfile || fail "hadolint Dockerfile"
else
    fail "hadolint (not installed by pip install -e '.[test]' on this platform)"
fi

if [ "${TIDEGATE_SKIP_KUBE:-}" = 1 ]; then
    opted_out TIDEGATE_SKIP_KUBE "the tests on a real kube-apiserver"
else
    echo "==> test control plane (kube-apiserver, etcd, kubectl, helm): build or reuse the cache"
    # A first build takes 12-28 minutes (Go module downloads included). One retry for a
    # registry hiccup; then the run fails.
    bash hack/control-plane/build.sh \
        || { echo "==> control-plane build failed; retrying once in 20 s" >&2; sleep 20; \
             bash hack/control-plane/build.sh; } \
        || fail "test control plane (hack/control-plane/build.sh; its log names the failing part)"
fi

echo "==> chart tools (kubeconform, promtool, the Prometheus Operator CRDs): build or reuse the cache"
# kubeconform and controller-gen are built from their Go modules (hack/tools/versions.env,
# ~4 minutes cold); promtool is unpacked from Debian's prometheus package (seconds).
# The chart tests need them all: a missing tool fails them, never skips.
bash hack/tools/build.sh \
    || { echo "==> chart tools build failed; retrying once in 20 s" >&2; sleep 20; \
         bash hack/tools/build.sh; } \
    || fail "chart tools (hack/tools/build.sh; its log names the failing part)"

if [ "${TIDEGATE_SKIP_IMAGE:-}" = 1 ]; then
    opted_out TIDEGATE_SKIP_IMAGE "the tests that run the image as containers"
else
    echo "==> container image (hack/image.sh): build or reuse the cache"
    bash hack/image.sh \
        || { echo "==> image build failed; retrying once in 20 s" >&2; sleep 20; bash hack/image.sh; } \
        || fail "container image (hack/image.sh; it names the failing step above)"
fi

echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
.venv/bin/pytest "$@"
