#!/usr/bin/env bash
# Build the tidegate container image here, without Docker and without a container registry.
#
# Why: the chart and the operator's Deployments name this image; the tests run them as real
# containers (tests/podrunner.py), so the image must be built on the test machine. No
# registry is reachable here, but Debian's packages and the Python package index are:
#   1. tools: mmdebstrap, buildah, podman, runc from Debian's packages (when missing);
#   2. base:  a Debian bookworm root filesystem with python3 (mmdebstrap --variant=minbase),
#             imported with `podman import` as localhost/tidegate-base:<key>;
#   3. image: `buildah bud` of the repository's Dockerfile on that base (BASE_IMAGE build
#             arg), host network, the host's CA bundle mounted read-only so pip in the build
#             trusts the same package index as the host;
#   4. smoke: the image runs read-only, as uid 65532, with no capabilities, and
#             `tidegate --version` prints the project's version.
#
# Everything lives under ${TIDEGATE_IMAGE_CACHE:-$HOME/.cache/tidegate/image}, including
# the container storage (podman/buildah --root), so nothing else on the machine is touched.
# Both steps are keyed by their inputs: the base by its recipe (rebuilt only when that
# changes, or with TIDEGATE_IMAGE_REFRESH_BASE=1), the image by the Dockerfile, the lock,
# pyproject.toml and the source tree. With --layers, a source-only change reuses the cached
# dependency layer and rebuilds only the application layer (seconds, not minutes).
#
# Usage: bash hack/image.sh               build (or reuse) and smoke-test; logs on stderr
#        bash hack/image.sh --print-env   the same, then print on stdout what the tests use:
#            TIDEGATE_IMAGE=localhost/tidegate:<key>  and the podman storage flags
# Fails loudly, naming the failing step and the tail of its log.
set -Eeuo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${TIDEGATE_IMAGE_CACHE:-$HOME/.cache/tidegate/image}"
STORE="$CACHE/containers"          # podman/buildah --root (images, layers)
# --runroot and --tmpdir: per-boot state on tmpfs, one per storage (two stores must never
# share one: a second cache, e.g. a cold-run measurement, gets its own).
RUNROOT="/run/tidegate-image"
if [[ "$CACHE" != "$HOME/.cache/tidegate/image" ]]; then
    RUNROOT="$RUNROOT-$(printf '%s' "$CACHE" | sha256sum | cut -c1-8)"
fi
LOGS="$CACHE/logs"
RUNTIME=/usr/sbin/runc             # crun fails on this machine's cgroups
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
HOST_CA=/etc/ssl/certs/ca-certificates.crt
# Bump when the way the base or the image is made changes: the keys change with it.
RECIPE=1
# The sandbox cannot raise rlimits: containers get explicit ones.
ULIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
STORE_FLAGS=(--root "$STORE" --runroot "$RUNROOT/storage")

STEP="setup"
CURRENT_LOG=""
log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
REPORTED=0
on_error() {
    local rc=$?
    (( BASH_SUBSHELL == 0 && ! REPORTED )) || exit "$rc"
    REPORTED=1
    log "FAILED at step: $STEP (exit $rc)"
    if [[ -n "$CURRENT_LOG" && -f "$CURRENT_LOG" ]]; then
        log "last lines of $CURRENT_LOG:"
        tail -n 40 "$CURRENT_LOG" >&2
    fi
    exit "$rc"
}
trap on_error ERR

# run LOGNAME CMD...: run a step's command with its output in $LOGS/LOGNAME.log
run() {
    local name=$1; shift
    CURRENT_LOG="$LOGS/$name.log"
    "$@" >"$CURRENT_LOG" 2>&1
    CURRENT_LOG=""
}

podman_() { podman "${STORE_FLAGS[@]}" --tmpdir "$RUNROOT/libpod" --runtime "$RUNTIME" "$@"; }
buildah_() { buildah "${STORE_FLAGS[@]}" "$@"; }

print_env=0
case "${1:-}" in
    "") ;;
    --print-env) print_env=1 ;;
    *) echo "usage: $0 [--print-env]" >&2; exit 2 ;;
esac

mkdir -p "$CACHE" "$LOGS" "$STORE" "$RUNROOT"
# One build at a time (hack/test.sh and a test session may both get here).
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------- 1. tools
STEP="install tools (mmdebstrap buildah podman runc)"
missing=()
for tool in mmdebstrap buildah podman catatonit; do
    command -v "$tool" >/dev/null || [[ -x /usr/libexec/podman/$tool ]] || missing+=("$tool")
done
[[ -x "$RUNTIME" ]] || missing+=(runc)
if (( ${#missing[@]} )); then
    log "installing ${missing[*]} from Debian's packages"
    run apt-update apt-get update -qq
    run apt-install env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The store is a cache: one left by an older layout (another runroot) is started afresh.
STEP="container storage ($STORE)"
if ! podman_ images >"$LOGS/storage.log" 2>&1; then
    if grep -q "mismatch" "$LOGS/storage.log"; then
        log "container storage was made with other settings; starting it afresh"
        rm -rf "$STORE" "$CACHE/built"
        mkdir -p "$STORE"
    fi
    run storage podman_ images
fi

# ---------------------------------------------------------------- 2. base
STEP="base root filesystem (mmdebstrap $SUITE)"
base_key=$(printf 'recipe=%s suite=%s variant=minbase include=%s\n' \
    "$RECIPE" "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-16)
BASE_IMAGE="localhost/tidegate-base:$base_key"
base_tar="$CACHE/base/$base_key/base.tar"
if [[ "${TIDEGATE_IMAGE_REFRESH_BASE:-0}" == 1 ]]; then
    rm -f "$base_tar"
    podman_ rmi --force "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if ! podman_ image exists "$BASE_IMAGE"; then
    if [[ ! -s "$base_tar" ]]; then
        log "building the base root filesystem ($SUITE, minbase + $BASE_PACKAGES; a few minutes)"
        mkdir -p "$(dirname "$base_tar")"
        # The host's own apt sources (no mirror named here); mmdebstrap pastes a file
        # argument into the new system's sources.
        sources=/etc/apt/sources.list.d/debian.sources
        [[ -s "$sources" ]] || sources=/etc/apt/sources.list
        run mmdebstrap mmdebstrap --variant=minbase --include="$BASE_PACKAGES" \
            "$SUITE" "${base_tar%.tar}.partial.tar" "$sources" </dev/null
        mv "${base_tar%.tar}.partial.tar" "$base_tar"
    fi
    STEP="base image (podman import)"
    log "importing $BASE_IMAGE"
    run podman-import podman_ import \
        --change "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV=LANG=C.UTF-8" \
        "$base_tar" "$BASE_IMAGE"
fi

# ---------------------------------------------------------------- 3. image
STEP="image inputs"
cd "$ROOT_DIR"
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)
[[ -n "$VERSION" ]] || { log "no version in pyproject.toml"; false; }
# Key: everything the Dockerfile copies (by content and path) plus the base and the recipe.
image_key=$(
    {
        printf 'recipe=%s base=%s version=%s\n' "$RECIPE" "$base_key" "$VERSION"
        find Dockerfile .dockerignore requirements.lock pyproject.toml README.md \
            src gateway operator -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
            ! -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum
        find src -type l -printf '%p -> %l\n' | sort
    } | sha256sum | cut -c1-16
)
IMAGE="localhost/tidegate:$image_key"
stamp="$CACHE/built/$image_key.ok"

if [[ -f "$stamp" ]] && podman_ image exists "$IMAGE"; then
    log "reusing $IMAGE (inputs unchanged)"
else
    STEP="image build (buildah bud)"
    [[ -s "$HOST_CA" ]] || { log "no CA bundle at $HOST_CA"; false; }
    log "building $IMAGE from the Dockerfile on $BASE_IMAGE"
    started=$(date +%s)
    run buildah-bud buildah_ bud --runtime "$RUNTIME" --network host --layers \
        "${ULIMITS[@]}" \
        --volume "$HOST_CA:$HOST_CA:ro" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION" \
        --tag "$IMAGE" --tag "localhost/tidegate:$VERSION" \
        --file Dockerfile .
    log "built in $(( $(date +%s) - started )) s"

    # ------------------------------------------------------------ 4. smoke
    STEP="image smoke test (read-only, uid 65532, no capabilities, tidegate --version)"
    CURRENT_LOG="$LOGS/smoke.log"
    out=$(podman_ run --rm --network none "${ULIMITS[@]}" --read-only --read-only-tmpfs=false \
        --cap-drop ALL --security-opt no-new-privileges --user 65532:65532 \
        "$IMAGE" --version 2>"$CURRENT_LOG")
    if [[ "$out" != "tidegate $VERSION" ]]; then
        log "tidegate --version printed '$out', expected 'tidegate $VERSION'"
        false
    fi
    who=$(podman_ run --rm --network none "${ULIMITS[@]}" --read-only --read-only-tmpfs=false \
        --cap-drop ALL --user 65532:65532 --entrypoint python3 \
        "$IMAGE" -c 'import getpass; print(getpass.getuser())' 2>"$CURRENT_LOG")
    if [[ "$who" != "tidegate" ]]; then
        log "uid 65532 has no passwd entry (getpass printed '$who')"
        false
    fi
    CURRENT_LOG=""
    mkdir -p "$CACHE/built"
    touch "$stamp"
    log "smoke test passed: $out, user $who"

    # Keep the three newest builds' tags; older ones only fill the disk.
    STEP="prune old images"
    mapfile -t old < <(ls -1t "$CACHE/built" | tail -n +4)
    for ok in "${old[@]}"; do
        podman_ rmi "localhost/tidegate:${ok%.ok}" >/dev/null 2>&1 || true
        rm -f "$CACHE/built/$ok"
    done
fi

if (( print_env )); then
    printf 'TIDEGATE_IMAGE=%s\n' "$IMAGE"
    printf 'TIDEGATE_IMAGE_VERSION=%s\n' "$VERSION"
    printf 'TIDEGATE_PODMAN_ROOT=%s\n' "$STORE"
    printf 'TIDEGATE_PODMAN_RUNROOT=%s\n' "$RUNROOT/storage"
    printf 'TIDEGATE_PODMAN_TMPDIR=%s\n' "$RUNROOT/libpod"
    printf 'TIDEGATE_PODMAN_RUNTIME=%s\n' "$RUNTIME"
fi
