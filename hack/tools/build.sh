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
# promtool is the exception: Debian ships it (package `prometheus`), so it is taken from
# there - downloaded, never installed (no service, no postinst), unpacked into
#   $CACHE_ROOT/promtool-debian/bin/promtool
# which takes seconds where building it from its module took 8-18 minutes on 2 cores.
# A cold build takes ~10 s (kubeconform). Any failure exits non-zero naming the step, with
# the tail of the build log.
#
# The Prometheus Operator's CRDs (for kubeconform on the chart's ServiceMonitor, PodMonitor
# and PrometheusRule) are generated the way that project does it: controller-gen (built
# from its module) over the Go types of its API module, into
#   $CACHE_ROOT/monitoring-crds-<version>/crds/*.yaml
#
# Usage: hack/tools/build.sh [kubeconform|promtool|controller-gen|monitoring-crds ...]
#        (default: all)
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
        controller-gen) echo "$CONTROLLER_TOOLS_MODULE $CONTROLLER_TOOLS_VERSION $CONTROLLER_TOOLS_MODULE/cmd/controller-gen" ;;
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

debian_promtool() { # -> prints the binary's path
    local root="$CACHE_ROOT/promtool-debian"
    local bin="$root/bin/promtool" stamp="$root/bin/.promtool.stamp"
    mkdir -p "$root/bin" "$root/logs"
    STEP="promtool: which Debian prometheus package"
    local version
    version="$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')"
    if [[ -z "$version" || "$version" == "(none)" ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        version="$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')"
    fi
    if [[ -x "$bin" && -f "$stamp" && ( -z "$version" || "$(cat "$stamp")" == "prometheus=$version" ) ]]; then
        log "cached: $bin"
        echo "$bin"
        return 0
    fi
    [[ -n "$version" && "$version" != "(none)" ]] || { log "FAILED at step: $STEP (no candidate)"; exit 1; }
    STEP="promtool: download and unpack Debian prometheus=$version"
    CURRENT_LOG="$root/logs/download.log"
    log "$STEP -> $bin"
    rm -rf "$root/deb" && mkdir -p "$root/deb"
    (cd "$root/deb" && apt-get download "prometheus=$version" && dpkg -x ./prometheus_*.deb x) >"$CURRENT_LOG" 2>&1
    install -m 0755 "$root/deb/x/usr/bin/promtool" "$bin"
    rm -rf "$root/deb"
    "$bin" --version >>"$CURRENT_LOG" 2>&1
    echo "prometheus=$version" >"$stamp"
    CURRENT_LOG=""
    echo "$bin"
}

monitoring_crds() { # -> prints the folder of the generated CRDs
    local controller_gen
    controller_gen="$(build_tool controller-gen)"
    local root="$CACHE_ROOT/monitoring-crds-$MONITORING_APIS_VERSION"
    local out="$root/crds" stamp="$root/.stamp"
    local want="$MONITORING_APIS_MODULE@$MONITORING_APIS_VERSION controller-gen@$CONTROLLER_TOOLS_VERSION recipe=$RECIPE"
    mkdir -p "$root/src" "$root/logs"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && compgen -G "$out/*.yaml" >/dev/null; then
        log "cached: $out"
        echo "$out"
        return 0
    fi
    STEP="monitoring CRDs from $MONITORING_APIS_MODULE@$MONITORING_APIS_VERSION"
    CURRENT_LOG="$root/logs/generate.log"
    log "$STEP -> $out (log: $CURRENT_LOG)"
    printf 'module tidegate.local/tools/monitoring-crds\n\ngo 1.26.0\n\nrequire %s %s\n' \
        "$MONITORING_APIS_MODULE" "$MONITORING_APIS_VERSION" >"$root/src/go.mod"
    printf 'package crds\n\nimport _ "%s/v1"\n' "$MONITORING_APIS_MODULE" >"$root/src/crds.go"
    rm -rf "$out.tmp"
    (cd "$root/src" && go mod tidy && "$controller_gen" crd:crdVersions=v1,allowDangerousTypes=true \
        "paths=$MONITORING_APIS_MODULE/v1" "output:crd:dir=$out.tmp") >"$CURRENT_LOG" 2>&1
    compgen -G "$out.tmp/*servicemonitors.yaml" >/dev/null || { log "FAILED at step: $STEP (no CRDs written)"; exit 1; }
    rm -rf "$out"
    mv "$out.tmp" "$out"
    echo "$want" >"$stamp"
    CURRENT_LOG=""
    echo "$out"
}

TOOLS=("$@")
(( ${#TOOLS[@]} )) || TOOLS=(kubeconform promtool monitoring-crds)
for t in "${TOOLS[@]}"; do
    if [[ "$t" == monitoring-crds ]]; then
        monitoring_crds
    elif [[ "$t" == promtool ]]; then
        debian_promtool
    else
        build_tool "$t"
    fi
done
