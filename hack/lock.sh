#!/usr/bin/env bash
# The image's dependency lock: requirements.lock, every package pinned with its hashes.
#
#   bash hack/lock.sh            # bring the lock in line with pyproject.toml (keeps the
#                                # pins that still satisfy it: no surprise upgrades)
#   bash hack/lock.sh --upgrade  # re-resolve everything to the newest allowed versions
#   bash hack/lock.sh --check    # CI: fail if the lock is not what `bash hack/lock.sh`
#                                # would write (a dependency added to pyproject.toml and
#                                # not locked, a hand edit, a stale hash)
#
# Inputs: pyproject.toml (runtime dependencies + the `operator` extra, i.e. what the image
# runs) and hack/image-build.in (what building the project's own wheel needs). Resolved by
# uv for CPython 3.11 (the image's Python) on every platform (markers kept), from the
# package index the environment configures; the lock itself names no index.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=requirements.lock
UV=${UV:-}
if [[ -z "$UV" ]]; then
    if [[ -x .venv/bin/uv ]]; then UV=.venv/bin/uv; else UV=$(command -v uv || true); fi
fi
[[ -n "$UV" ]] || { echo "lock.sh: FAILED: no uv (pip install uv, or: pip install -e '.[test]')" >&2; exit 1; }

compile() { # $1: output file (its current pins are kept where still valid); rest: extra args
    local out=$1; shift
    "$UV" pip compile --quiet pyproject.toml hack/image-build.in --extra operator \
        --generate-hashes --universal --python-version 3.11 \
        --custom-compile-command "bash hack/lock.sh" -o "$out" "$@"
}

case "${1:-}" in
    "") compile "$LOCK" ;;
    --upgrade) compile "$LOCK" --upgrade ;;
    --check)
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        cp "$LOCK" "$tmp/lock"
        if ! compile "$tmp/lock"; then
            echo "lock.sh: FAILED: could not resolve pyproject.toml's dependencies" >&2
            exit 1
        fi
        if ! diff -u "$LOCK" "$tmp/lock"; then
            echo "lock.sh: FAILED: $LOCK is not current; run: bash hack/lock.sh" >&2
            exit 1
        fi
        echo "lock.sh: $LOCK is current"
        ;;
    *) echo "usage: $0 [--check|--upgrade]" >&2; exit 2 ;;
esac
