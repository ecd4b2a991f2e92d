#!/usr/bin/env bash
# Build the chart-checking tools from their published Go modules, cached by version.
#
# Why: the chart tests run kubeconform -strict on the rendered manifests and promtool on the
# alerting rules and dashboard queries (a real PromQL parser and rule evaluator, not string
# checks). This workplace has no download site for release binaries, only the Go module
# proxy, so, like hack/control-plane/build.sh, we compile them at the versions pinned in
# versions.env:
#
#   ${TIDEGATE_TOOLS_CACHE:-$HOME/.cache/tidegate/tools}/<tool>-<version>/bin/<tool>
#
# A binary whose stamp (bin/.<tool>.stamp) matches is reused: a second run takes a second.
# A cold build takes ~10 s (kubeconform) and ~8-18 min (promtool, 2 cores). Any failure
# exits non-zero naming the step, with the tail of the build log.
#
# Usage: hack/tools/build.sh [kubeconform|promtool ...]   (default: both)
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/versions.env
source "$HERE/versions.env"

CACHE_ROOT="${TIDEGATE_TOOLS_CACHE:-$HOME/.cache/tidegate/tools}"
JOBS="${TIDEGATE_CP_JOBS:-2}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
RECIPE=1
STEP="setup"
CURRENT_LOG=""

log() { printf '[tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
on_error() {
    local rc=$?
    (( BASH_SUBSHELL == 0 )) || exit "$rc"
    log "FAILED at step: $STEP (exit $rc)"
    if [[ -n "$CURRENT_LOG" && -f "$CURRENT_LOG" ]]; then
        log "last lines of $CURRENT_LOG:"
        tail -n 40 "$CURRENT_LOG" >&2
    fi
    exit "$rc"
}
trap on_error ERR

command -v go >/dev/null || { log "FAILED at step: setup (no 'go' on PATH)"; exit 1; }
GO_VERSION="$(go env GOVERSION)"

spec_of() { # tool -> "module version package"
    case "$1" in
        kubeconform) echo "$KUBECONFORM_MODULE $KUBECONFORM_VERSION $KUBECONFORM_MODULE/cmd/kubeconform" ;;
        promtool) echo "$PROMETHEUS_MODULE $PROMETHEUS_VERSION $PROMETHEUS_MODULE/cmd/promtool" ;;
        *) log "unknown tool: $1"; exit 2 ;;
    esac
}

build_tool() { # tool -> prints the binary's path
    local tool=$1 module version pkg
    read -r module version pkg <<<"$(spec_of "$tool")"
    local root="$CACHE_ROOT/$tool-$version"
    local bin="$root/bin/$tool" stamp="$root/bin/.$tool.stamp"
    local want="$module@$version $GO_VERSION recipe=$RECIPE"
    mkdir -p "$root/bin" "$root/src" "$root/logs"
    exec 8>"$root/.build.lock"
    if command -v flock >/dev/null; then
        flock -n 8 || { log "waiting for another build of $tool"; flock 8; }
    fi
    if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "cached: $bin"
        echo "$bin"
        return 0
    fi
    STEP="wrapper module for $module@$version"
    local src="$root/src"
    if [[ ! -f "$src/go.mod" ]] || ! grep -q "require $module $version" "$src/go.mod"; then
        printf 'module tidegate.local/tools/%s\n\ngo 1.26.0\n\nrequire %s %s\n' \
            "$tool" "$module" "$version" >"$src/go.mod"
        rm -f "$src/go.sum"
    fi
    STEP="build $tool ($pkg@$version)"
    CURRENT_LOG="$root/logs/build.log"
    log "$STEP -> $bin (log: $CURRENT_LOG)"
    local started=$SECONDS
    (cd "$src" && go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$bin.tmp" "$pkg") >"$CURRENT_LOG" 2>&1
    mv -f "$bin.tmp" "$bin"
    echo "$want" >"$stamp"
    CURRENT_LOG=""
    log "built $tool in $(( SECONDS - started ))s"
    echo "$bin"
}

TOOLS=("$@")
(( ${#TOOLS[@]} )) || TOOLS=(kubeconform promtool)
for t in "${TOOLS[@]}"; do
    build_tool "$t"
done
