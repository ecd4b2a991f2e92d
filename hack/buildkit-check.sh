#!/usr/bin/env bash
# Build the Dockerfile with BuildKit too, to show it builds alike with BuildKit and buildah.
#
# Not part of hack/test.sh (a cold run compiles buildkitd, several minutes on 2 cores); run
# it after changing the Dockerfile:   bash hack/buildkit-check.sh
#
# No Docker engine and no registry here, so:
#   1. buildkitd and buildctl are compiled from their Go module (pinned below; a wrapper
#      module carries the exclude directives of BuildKit's own go.mod), cached under
#      ${TIDEGATE_BUILDKIT_CACHE:-$HOME/.cache/tidegate/buildkit}/<version>/bin;
#   2. buildkitd runs as root with its OCI worker on runc, host network, state in a temp dir;
#   3. the base is hack/image.sh's Debian base, plus the host's CA bundle (BuildKit cannot
#      mount a host file into a build the way buildah --volume does, and pip in the build
#      must trust the host's package index), handed to the build as an OCI layout through a
#      named build context - so BASE_IMAGE is the only thing that differs from a default build;
#   4. the result (an OCI archive) is loaded into hack/image.sh's podman store and
#      `tidegate --version` is run in it read-only, as uid 65532, with no capabilities.
# Fails naming the failing step.
set -Eeuo pipefail

BUILDKIT_VERSION=v0.34.2
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${TIDEGATE_BUILDKIT_CACHE:-$HOME/.cache/tidegate/buildkit}/$BUILDKIT_VERSION"
BIN="$CACHE/bin"
STEP=setup
log() { printf '[buildkit %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
REPORTED=0
on_error() {
    local rc=$?
    (( BASH_SUBSHELL == 0 && ! REPORTED )) || exit "$rc"
    REPORTED=1
    log "FAILED at step: $STEP (exit $rc)"
    [[ -f "${WORK:-/nonexistent}/buildkitd.log" ]] && tail -n 20 "$WORK/buildkitd.log" >&2
    exit "$rc"
}
trap on_error ERR

STEP="build buildkitd/buildctl $BUILDKIT_VERSION from the Go module"
if [[ ! -x "$BIN/buildkitd" || ! -x "$BIN/buildctl" ]]; then
    command -v go >/dev/null || { log "no go on PATH"; false; }
    log "compiling buildkitd and buildctl $BUILDKIT_VERSION (several minutes the first time)"
    wrap="$CACHE/wrap"
    mkdir -p "$wrap" "$BIN"
    gomod=$(cd "$wrap" && GOFLAGS=-mod=mod go mod download -json \
        "github.com/moby/buildkit@$BUILDKIT_VERSION" | python3 -c \
        'import json, sys; print(json.load(sys.stdin)["GoMod"])')
    python3 - "$gomod" "$wrap/go.mod" "$BUILDKIT_VERSION" <<'EOF'
import re, sys
src = open(sys.argv[1]).read()
go = re.search(r"^go (\S+)", src, re.M).group(1)
excl = re.search(r"^exclude \(.*?^\)", src, re.S | re.M)
text = f"module buildkitwrap\n\ngo {go}\n\nrequire github.com/moby/buildkit {sys.argv[3]}\n\n"
open(sys.argv[2], "w").write(text + (excl.group(0) + "\n" if excl else ""))
EOF
    (cd "$wrap" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$BIN/" \
        github.com/moby/buildkit/cmd/buildkitd github.com/moby/buildkit/cmd/buildctl)
fi

STEP="the Debian base and the podman store (hack/image.sh)"
eval "$(bash "$ROOT_DIR/hack/image.sh" --print-env | sed 's/^/export /')"
pod() { podman --root "$TIDEGATE_PODMAN_ROOT" --runroot "$TIDEGATE_PODMAN_RUNROOT" \
    --tmpdir "$TIDEGATE_PODMAN_TMPDIR" --runtime "$TIDEGATE_PODMAN_RUNTIME" "$@"; }
base=$(pod images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/tidegate-base:' | head -n1)
[[ -n "$base" ]] || { log "no localhost/tidegate-base image"; false; }

WORK=$(mktemp -d /tmp/tidegate-buildkit.XXXXXX)
cleanup() {
    trap - ERR
    if [[ -n "${BKPID:-}" ]]; then
        kill "$BKPID" 2>/dev/null || true
        wait "$BKPID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

STEP="base with the host CA bundle, as an OCI layout"
ctr=$(buildah --root "$TIDEGATE_PODMAN_ROOT" --runroot "$TIDEGATE_PODMAN_RUNROOT" from "$base")
buildah --root "$TIDEGATE_PODMAN_ROOT" --runroot "$TIDEGATE_PODMAN_RUNROOT" \
    copy "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
buildah --root "$TIDEGATE_PODMAN_ROOT" --runroot "$TIDEGATE_PODMAN_RUNROOT" \
    commit -q "$ctr" localhost/tidegate-base-hostca:buildkit >/dev/null
buildah --root "$TIDEGATE_PODMAN_ROOT" --runroot "$TIDEGATE_PODMAN_RUNROOT" rm "$ctr" >/dev/null
pod save --format oci-dir -o "$WORK/base" localhost/tidegate-base-hostca:buildkit >/dev/null
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
    "$WORK/base/index.json")

STEP="start buildkitd (OCI worker, runc, host network)"
"$BIN/buildkitd" --root "$WORK/state" --addr "unix://$WORK/buildkitd.sock" \
    --oci-worker=true --containerd-worker=false --oci-worker-binary=/usr/sbin/runc \
    --oci-worker-net=host >"$WORK/buildkitd.log" 2>&1 &
BKPID=$!
for _ in $(seq 1 100); do
    "$BIN/buildctl" --addr "unix://$WORK/buildkitd.sock" debug workers >/dev/null 2>&1 && break
    sleep 0.3
done
"$BIN/buildctl" --addr "unix://$WORK/buildkitd.sock" debug workers >/dev/null

STEP="buildctl build (the Dockerfile, BASE_IMAGE from a named context)"
log "building with BuildKit $BUILDKIT_VERSION"
started=$(date +%s)
"$BIN/buildctl" --addr "unix://$WORK/buildkitd.sock" build \
    --frontend dockerfile.v0 \
    --local context="$ROOT_DIR" --local dockerfile="$ROOT_DIR" \
    --oci-layout "base=$WORK/base" \
    --opt build-arg:BASE_IMAGE=tidegate-base-hostca \
    --opt "context:tidegate-base-hostca=oci-layout://base@$digest" \
    --opt build-arg:VERSION="$TIDEGATE_IMAGE_VERSION" \
    --output "type=oci,dest=$WORK/image.tar,name=localhost/tidegate:buildkit" \
    >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; false; }
log "built in $(( $(date +%s) - started )) s"

STEP="smoke test of the BuildKit image (read-only, uid 65532, no capabilities)"
loaded=$(pod load -q -i "$WORK/image.tar" | sed -n 's/^Loaded image[^:]*: *//p' | tail -n1)
out=$(pod run --rm --network none --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --read-only --read-only-tmpfs=false --cap-drop ALL --user 65532:65532 "$loaded" --version)
[[ "$out" == "tidegate $TIDEGATE_IMAGE_VERSION" ]] || { log "--version printed '$out'"; false; }
log "BuildKit image OK: $out ($loaded)"
