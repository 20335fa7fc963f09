#!/usr/bin/env bash
# Builds the test environment's binaries from their Go modules, only when missing.
#
#   testenv/build.sh etcd|kube-apiserver|toxiproxy|lockgate-go|faketime|all
#
# Binaries are cached outside the repository, keyed by version, in
# $LOCKGATE_TESTENV_CACHE (default ~/.cache/lockgate-testenv), and linked into
# target/testenv/bin. A failed build leaves no binary behind. `faketime` is not
# built: it is Debian's package, installed with apt-get when missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
TOXIPROXY_VERSION=${TOXIPROXY_VERSION:-v2.5.0}
cache=${LOCKGATE_TESTENV_CACHE:-$HOME/.cache/lockgate-testenv}
bindir=$repo/target/testenv/bin

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { printf 'testenv: %s\n' "$*" >&2; }
die() { printf 'testenv: error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "the Go toolchain is needed to build the test environment (go not on PATH)"

# link NAME CACHED: expose a cached binary as target/testenv/bin/NAME.
link() {
  mkdir -p "$bindir"
  ln -sfn "$2" "$bindir/$1"
}

build_etcd() {
  local out=$cache/etcd-$ETCD_VERSION/etcd
  if [[ ! -x $out ]]; then
    log "building etcd $ETCD_VERSION (about a minute, once per machine)"
    local work
    work=$(mktemp -d)
    cat >"$work/main.go" <<'EOF'
// Command etcd is etcd's server, built from its Go module for the lockgate test environment.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    (cd "$work" && go mod init lockgate-testenv/etcd >/dev/null 2>&1 &&
      go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 &&
      go mod tidy >/dev/null 2>&1 &&
      go build -trimpath -o "$work/etcd" .) || die "etcd $ETCD_VERSION build failed (work dir $work)"
    mkdir -p "$(dirname "$out")"
    mv "$work/etcd" "$out.tmp" && mv "$out.tmp" "$out"
    rm -rf "$work"
  fi
  link etcd "$out"
}

build_kube_apiserver() {
  local out=$cache/kube-apiserver-$KUBE_VERSION/kube-apiserver
  if [[ ! -x $out ]]; then
    log "building kube-apiserver $KUBE_VERSION (several minutes, once per machine)"
    local work modfile minor
    work=$(mktemp -d)
    modfile=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [[ -f $modfile ]] || die "cannot download k8s.io/kubernetes@$KUBE_VERSION"
    # The staging modules are replaced by ./staging paths in Kubernetes' own go.mod,
    # which a dependent module ignores: replace each with its published tag.
    local staging_tag=v0.${KUBE_VERSION#v1.}
    {
      echo "module lockgate-testenv/kube-apiserver"
      echo
      echo "go 1.26.0"
      echo
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo
      echo "replace ("
      sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\t\1 => \1 '"$staging_tag"'#p' "$modfile"
      echo ")"
    } >"$work/go.mod"
    cat >"$work/tools.go" <<'EOF'
//go:build tools

// Package tools keeps k8s.io/kubernetes required by this wrapper module.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
EOF
    minor=${KUBE_VERSION#v1.}
    minor=${minor%%.*}
    (cd "$work" && go mod tidy -e >/dev/null 2>"$work/tidy.log" &&
      go build -trimpath \
        -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
        -o "$work/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver) ||
      die "kube-apiserver $KUBE_VERSION build failed (work dir $work; see $work/tidy.log)"
    mkdir -p "$(dirname "$out")"
    mv "$work/kube-apiserver" "$out.tmp" && mv "$out.tmp" "$out"
    rm -rf "$work"
  fi
  link kube-apiserver "$out"
}

build_toxiproxy() {
  local out=$cache/toxiproxy-$TOXIPROXY_VERSION/toxiproxy-server
  if [[ ! -x $out ]]; then
    log "building toxiproxy-server $TOXIPROXY_VERSION (seconds to a minute, once per machine)"
    local work
    work=$(mktemp -d)
    # Its module has no replace directives, so `go install pkg@version` builds the server with
    # toxiproxy's own go.sum; the main package is cmd/server.
    GOBIN=$work go install -trimpath \
      -ldflags "-s -w -X github.com/Shopify/toxiproxy/v2.Version=$TOXIPROXY_VERSION" \
      "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION" >"$work/build.log" 2>&1 ||
      die "toxiproxy $TOXIPROXY_VERSION build failed (see $work/build.log)"
    mkdir -p "$(dirname "$out")"
    mv "$work/server" "$out.tmp" && mv "$out.tmp" "$out"
    rm -rf "$work"
  fi
  link toxiproxy-server "$out"
}

# The Go lockgate peers: one source tree (testenv/go-peer), two module files. go.mod requires
# the version werf v2 uses (the default peer); go.v0.1.1.mod (with its go.v0.1.1.sum) the one
# older werf and nelm releases pin, built with the tag lockgate_v01 for the few calls that
# differ. Each binary is cached by its lockgate version and a hash of the whole source tree.
build_lockgate_go() {
  local src=$here/go-peer
  local key
  key=$(cd "$src" && cat go.mod go.sum go.*.mod go.*.sum ./*.go | sha256sum | cut -c1-16)
  build_peer "$key" go.mod "" lockgate-go
  build_peer "$key" go.v0.1.1.mod lockgate_v01 lockgate-go-v0.1.1
}

# build_peer KEY MODFILE TAGS LINKNAME
build_peer() {
  local key=$1 modfile=$2 tags=$3 name=$4 src=$here/go-peer version
  version=$(sed -n 's#^[[:space:]]*\(require[[:space:]]*\)\{0,1\}github\.com/werf/lockgate \(v[^[:space:]]*\).*#\2#p' "$src/$modfile")
  [[ -n $version ]] || die "$src/$modfile requires no github.com/werf/lockgate"
  local out=$cache/lockgate-go-$version-$key/lockgate-go
  if [[ ! -x $out ]]; then
    log "building the Go lockgate peer ($version)"
    mkdir -p "$(dirname "$out")"
    (cd "$src" && go build -trimpath -modfile="$modfile" -tags="$tags" -o "$out.tmp" .) ||
      die "Go lockgate peer $version build failed"
    [[ $("$out.tmp" version) == "$version" ]] ||
      die "the Go lockgate peer built from $modfile reports $("$out.tmp" version), not $version"
    mv "$out.tmp" "$out"
  fi
  link "$name" "$out"
}

# libfaketime, to run Rust processes with a skewed clock (Go binaries ignore it).
ensure_faketime() {
  command -v faketime >/dev/null && return 0
  log "installing faketime (Debian package) with apt-get"
  command -v apt-get >/dev/null || die "faketime is missing and there is no apt-get to install it"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; } >&2 ||
    die "apt-get install faketime failed"
  command -v faketime >/dev/null || die "faketime is still not on PATH after installing it"
}

case ${1:-all} in
  etcd) build_etcd ;;
  kube-apiserver) build_kube_apiserver ;;
  toxiproxy) build_toxiproxy ;;
  lockgate-go) build_lockgate_go ;;
  faketime) ensure_faketime ;;
  all) build_etcd; build_kube_apiserver; build_toxiproxy; build_lockgate_go; ensure_faketime ;;
  *) die "usage: testenv/build.sh etcd|kube-apiserver|toxiproxy|lockgate-go|faketime|all" ;;
esac
