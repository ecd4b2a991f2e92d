#!/usr/bin/env bash
# Build the binaries of tidegate's test control plane from published Go modules.
#
# Why: the operator's tests need a *real* kube-apiserver (schema + CEL validation, RBAC,
# resourceVersion conflicts, watches, garbage collection), and this workplace has no
# download site for release binaries, only the Go module proxy. So we compile
# kube-apiserver, kube-controller-manager, kubectl (k8s.io/kubernetes), etcd
# (go.etcd.io/etcd/server/v3) and helm (helm.sh/helm/v3) at the versions pinned in
# versions.env, into a cache outside the repository:
#
#   ${TIDEGATE_CP_CACHE:-$HOME/.cache/tidegate/control-plane}/<CP_VERSION>/bin/<binary>
#
# Each binary gets a stamp file (bin/.<binary>.stamp) naming what it was built from; a
# binary whose stamp matches is reused, so a second run does nothing and takes a second.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces the k8s.io/<staging>
# modules with ./staging/... paths. We generate a tiny wrapper module that requires
# k8s.io/kubernetes and replaces every module of that replace block (read from the
# release's own go.mod) with the published v0.Y.Z of the same release, then `go build`.
#
# Usage: hack/control-plane/build.sh [binary...]   (default: all five)
# Env:   TIDEGATE_CP_CACHE  cache root;  TIDEGATE_CP_JOBS  go build -p (default 2)
set -Eeuo pipefail # -E: the ERR trap also fires inside functions

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/versions.env
source "$HERE/versions.env"

CACHE_ROOT="${TIDEGATE_CP_CACHE:-$HOME/.cache/tidegate/control-plane}"
ROOT="$CACHE_ROOT/$CP_VERSION"
BIN="$ROOT/bin"
SRC="$ROOT/src"
LOGS="$ROOT/logs"
JOBS="${TIDEGATE_CP_JOBS:-2}"

# -mod=mod lets the wrapper modules resolve their go.sum on first build; the build cache
# and module cache (GOCACHE, GOMODCACHE) are the user's usual ones and are reused.
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
GO_BUILD_FLAGS=(-p "$JOBS" -trimpath)
# Bump when the way a binary is built changes (e.g. its -ldflags): stamps then mismatch.
RECIPE=2

STEP="setup"
log() { printf '[control-plane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
on_error() {
    local rc=$?
    (( BASH_SUBSHELL == 0 )) || exit "$rc" # report once, from the main shell
    log "FAILED at step: $STEP (exit $rc)"
    if [[ -n "${CURRENT_LOG:-}" && -f "$CURRENT_LOG" ]]; then
        log "last lines of $CURRENT_LOG:"
        tail -n 40 "$CURRENT_LOG" >&2
    fi
    exit "$rc"
}
trap on_error ERR

command -v go >/dev/null || { log "FAILED at step: setup (no 'go' on PATH; Go >= 1.26 needed)"; exit 1; }
mkdir -p "$BIN" "$SRC" "$LOGS"
# One build at a time per cache (two test sessions may both find a binary missing).
if command -v flock >/dev/null; then
    exec 9>"$ROOT/.build.lock"
    flock -n 9 || { log "waiting for another build.sh on $ROOT"; flock 9; }
fi
GO_VERSION="$(go env GOVERSION)"

gomod_of() { # module@version -> path of its go.mod in the module cache
    local out
    out="$(go mod download -json "$1" 2>&1)" || { printf '%s\n' "$out" >&2; return 1; }
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' <<<"$out"
}

ldflags_for() { # binary -> -ldflags value: stripped, with the version stamps release builds set
    local name=$1 v minor
    case "$name" in
        kube-apiserver|kubectl|kube-controller-manager)
            v="${KUBERNETES_VERSION#v}"; minor="${v#*.}"; minor="${minor%%.*}"
            local pkg flags=""
            for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
                flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1"
                flags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
            done
            printf '%s' "-s -w$flags" ;;
        etcd) printf '%s' "-s -w" ;;
        helm)
            # Like helm's Makefile: the default Kubernetes version of `helm template` is the
            # one of the client-go it is built with (k8s.io/client-go v0.Y.Z -> 1.Y).
            local gomod cg
            gomod="$(gomod_of "helm.sh/helm/v3@$HELM_VERSION")"
            [[ -f "$gomod" ]] || { log "no go.mod for helm.sh/helm/v3@$HELM_VERSION"; exit 1; }
            cg="$(sed -n 's#^[[:space:]]*k8s\.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -n1)"
            [[ -n "$cg" ]] || { log "no k8s.io/client-go requirement in $gomod"; exit 1; }
            printf '%s' "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
            local p
            for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
                printf ' -X %s.k8sVersionMajor=1 -X %s.k8sVersionMinor=%s' "$p" "$p" "$cg"
            done ;;
        *) log "unknown binary: $name"; exit 2 ;;
    esac
}

stamp_for() { # binary -> the text its stamp file must hold
    local name=$1 mod
    case "$name" in
        kube-apiserver|kubectl|kube-controller-manager) mod="k8s.io/kubernetes@$KUBERNETES_VERSION" ;;
        etcd) mod="go.etcd.io/etcd/server/v3@$ETCD_VERSION" ;;
        helm) mod="helm.sh/helm/v3@$HELM_VERSION" ;;
        *) log "unknown binary: $name"; exit 2 ;;
    esac
    printf '%s %s %s recipe=%s\n' "$mod" "$GO_VERSION" "${GO_BUILD_FLAGS[*]}" "$RECIPE"
}

is_fresh() { # binary -> 0 if cached and stamp matches
    local name=$1
    [[ -x "$BIN/$name" && -f "$BIN/.$name.stamp" ]] &&
        [[ "$(cat "$BIN/.$name.stamp")" == "$(stamp_for "$name")" ]]
}

# Write a wrapper module dir; $1 dir, $2 module requirement "path version", rest: extra go.mod lines.
write_wrapper() {
    local dir=$1 req=$2
    shift 2
    mkdir -p "$dir"
    {
        echo "module tidegate.local/controlplane/$(basename "$dir")"
        echo
        echo "go 1.26.0"
        echo
        echo "require $req"
        for line in "$@"; do echo "$line"; done
    } >"$dir/go.mod.new"
    # Keep go.mod/go.sum untouched when unchanged so repeated runs resolve nothing again.
    if ! cmp -s "$dir/go.mod.new" "$dir/go.mod.in" 2>/dev/null; then
        cp "$dir/go.mod.new" "$dir/go.mod"
        cp "$dir/go.mod.new" "$dir/go.mod.in"
        rm -f "$dir/go.sum"
    fi
    rm -f "$dir/go.mod.new"
}

kubernetes_wrapper() {
    local dir="$SRC/kubernetes"
    [[ -n "${KUBE_WRAPPER_READY:-}" ]] && return 0
    STEP="download k8s.io/kubernetes@$KUBERNETES_VERSION go.mod"
    log "$STEP"
    local gomod
    gomod="$(gomod_of "k8s.io/kubernetes@$KUBERNETES_VERSION")"
    [[ -f "$gomod" ]] || { log "FAILED at step: $STEP (no go.mod found)"; exit 1; }
    STEP="generate kubernetes wrapper module"
    local staging_version="v0.${KUBERNETES_VERSION#v1.}"
    local -a replaces=("replace (")
    local mod
    # Every "k8s.io/x => ./staging/src/k8s.io/x" line of the release's replace block.
    while read -r mod; do
        replaces+=("	$mod => $mod $staging_version")
    done < <(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$gomod")
    replaces+=(")")
    (( ${#replaces[@]} > 2 )) || { log "FAILED at step: $STEP (no staging replaces found in $gomod)"; exit 1; }
    log "wrapper replaces $(( ${#replaces[@]} - 2 )) staging modules with $staging_version"
    write_wrapper "$dir" "k8s.io/kubernetes $KUBERNETES_VERSION" "" "${replaces[@]}"
    KUBE_WRAPPER_READY=1
}

build_one() { # binary
    local name=$1 dir pkg
    case "$name" in
        kube-apiserver|kubectl|kube-controller-manager)
            kubernetes_wrapper
            dir="$SRC/kubernetes"; pkg="k8s.io/kubernetes/cmd/$name" ;;
        etcd)
            dir="$SRC/etcd"; pkg="go.etcd.io/etcd/server/v3"
            write_wrapper "$dir" "go.etcd.io/etcd/server/v3 $ETCD_VERSION" ;;
        helm)
            dir="$SRC/helm"; pkg="helm.sh/helm/v3/cmd/helm"
            write_wrapper "$dir" "helm.sh/helm/v3 $HELM_VERSION" ;;
    esac
    STEP="compute -ldflags for $name"
    local started=$SECONDS ldflags
    ldflags="$(ldflags_for "$name")"
    STEP="build $name ($pkg)"
    CURRENT_LOG="$LOGS/$name.log"
    log "$STEP -> $BIN/$name (log: $CURRENT_LOG)"
    # Progress: go build is silent for minutes, so echo a heartbeat while it runs.
    (cd "$dir" && go build "${GO_BUILD_FLAGS[@]}" -ldflags "$ldflags" -o "$BIN/$name.tmp" "$pkg") >"$CURRENT_LOG" 2>&1 &
    local pid=$!
    local next=$(( SECONDS + 30 ))
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( SECONDS >= next )); then
            log "  ... still building $name ($(( SECONDS - started ))s)"
            next=$(( SECONDS + 30 ))
        fi
    done
    wait "$pid" # a failure here triggers on_error with the log tail
    mv -f "$BIN/$name.tmp" "$BIN/$name"
    stamp_for "$name" >"$BIN/.$name.stamp"
    CURRENT_LOG=""
    log "built $name in $(( SECONDS - started ))s ($(du -h "$BIN/$name" | cut -f1))"
}

TARGETS=("$@")
(( ${#TARGETS[@]} )) || TARGETS=(etcd kube-apiserver kubectl helm kube-controller-manager)
total_started=$SECONDS
for t in "${TARGETS[@]}"; do
    if is_fresh "$t"; then
        log "cached: $BIN/$t"
    else
        build_one "$t"
    fi
done
STEP="done"
log "all done in $(( SECONDS - total_started ))s; binaries in $BIN"
echo "$BIN"
