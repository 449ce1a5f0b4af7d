# Sourced by kind-tests/control-plane.sh for `install`: builds the pinned etcd, etcdctl,
# kube-apiserver, kubectl and helm from the Go modules next to this file and caches them by
# version. Uses the variables and helpers that control-plane.sh defines (K8S_VERSION,
# ETCD_VERSION, K8S_BIN, ETCD_BIN, TOOLS_DIR, TOOLS_SRC, modver, log, die, now_ms, elapsed).
# shellcheck shell=bash
# shellcheck disable=SC2154

# helm, for the chart tests: pinned by tools/helm/go.mod, cached in $TOOLS_DIR/helm-<version>/.
HELM_VERSION=$(modver "$TOOLS_SRC/helm/go.mod" helm.sh/helm/v3)
[[ -n $HELM_VERSION ]] || die "cannot read the pinned helm version from $TOOLS_SRC/helm/go.mod"
HELM_BIN=$TOOLS_DIR/helm-$HELM_VERSION

# grpcurl, to check the sidecar's app API through gRPC reflection: pinned by tools/grpcurl/go.mod.
GRPCURL_VERSION=$(modver "$TOOLS_SRC/grpcurl/go.mod" github.com/fullstorydev/grpcurl)
[[ -n $GRPCURL_VERSION ]] || die "cannot read the pinned grpcurl version from $TOOLS_SRC/grpcurl/go.mod"
GRPCURL_BIN=$TOOLS_DIR/grpcurl-$GRPCURL_VERSION

APT_UPDATED=
# ensure_cmd COMMAND PACKAGE [optional]: install the Debian PACKAGE when COMMAND is missing.
ensure_cmd() {
	command -v "$1" >/dev/null 2>&1 && return 0
	[[ -x /usr/sbin/$1 || -x /sbin/$1 ]] && return 0
	if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
		[[ ${3:-} == optional ]] && {
			log "warning: '$1' is missing (Debian package $2); some tests will need it"
			return 0
		}
		die "'$1' is missing: install the Debian package $2"
	fi
	if [[ -z $APT_UPDATED ]]; then
		log "apt-get update"
		apt-get update -qq >&2
		APT_UPDATED=1
	fi
	log "installing $2 (for $1)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
}

# ensure_file FILE PACKAGE: install the Debian PACKAGE when FILE is missing.
ensure_file() {
	[[ -e $1 ]] && return 0
	if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
		die "'$1' is missing: install the Debian package $2"
	fi
	if [[ -z $APT_UPDATED ]]; then
		log "apt-get update"
		apt-get update -qq >&2
		APT_UPDATED=1
	fi
	log "installing $2 (for $1)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
}

# reports LINE CMD...: CMD succeeds and prints LINE. (Not `CMD | grep -q`: with pipefail,
# grep quitting early can make CMD fail with SIGPIPE.)
reports() {
	local line=$1 out
	shift
	out=$("$@" 2>/dev/null) || return 1
	grep -qxF -- "$line" <<<"$out"
}

k8s_ok() {
	[[ -x $K8S_BIN/kube-apiserver && -x $K8S_BIN/kubectl ]] || return 1
	reports "Kubernetes $K8S_VERSION" "$K8S_BIN/kube-apiserver" --version || return 1
	reports "Client Version: $K8S_VERSION" "$K8S_BIN/kubectl" version --client
}

etcd_ok() {
	[[ -x $ETCD_BIN/etcd && -x $ETCD_BIN/etcdctl ]] || return 1
	reports "etcd Version: ${ETCD_VERSION#v}" "$ETCD_BIN/etcd" --version || return 1
	reports "etcdctl version: ${ETCD_VERSION#v}" "$ETCD_BIN/etcdctl" version
}

# go_build MODULE_DIR OUT_DIR LDFLAGS NAME=PACKAGE...: build into a scratch folder, then move
# the binaries into OUT_DIR (a rename: a cached binary is never half written).
go_build() {
	local src=$1 out=$2 ldflags=$3 tmp spec pkgs=() rc=0
	shift 3
	mkdir -p "$out"
	tmp=$(mktemp -d "$TOOLS_DIR/.build.XXXXXX")
	for spec in "$@"; do pkgs+=("${spec#*=}"); done
	# One `go build` for all packages so that they compile and link in parallel.
	(cd "$src" && go build -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}") >&2 || rc=$?
	if ((rc == 0)); then
		for spec in "$@"; do
			# go names a binary after its package path (minus a /vN suffix); rename it.
			local built=${spec#*=}
			built=${built%/v[0-9]*}
			mv -f "$tmp/${built##*/}" "$out/${spec%%=*}" || rc=$?
		done
	fi
	rm -rf "$tmp"
	return "$rc"
}

build_k8s() {
	local major=${K8S_VERSION#v} minor ld="-s -w" pkg
	minor=${major#*.}
	minor=${minor%%.*}
	major=${major%%.*}
	# The version stamp that Kubernetes' own build (hack/lib/version.sh) puts in; without it
	# the binaries report v0.0.0-master. Link-time only, so the compile cache still applies.
	for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
		ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
		ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	done
	go_build "$TOOLS_SRC/k8s" "$K8S_BIN" "$ld" \
		kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl
}

helm_ok() {
	[[ -x $HELM_BIN/helm ]] || return 1
	reports "$HELM_VERSION" "$HELM_BIN/helm" version --template '{{.Version}}'
}

build_helm() {
	local client_go minor ld="-s -w" pkg
	# The stamps of helm's own Makefile: its version, and the Kubernetes version that
	# `helm lint` and `helm template` assume (.Capabilities.KubeVersion), derived from the
	# client-go it is built with (v0.N.x is Kubernetes 1.N); without them helm reports
	# v3.x and assumes Kubernetes 1.20.
	client_go=$(modver "$TOOLS_SRC/helm/go.mod" k8s.io/client-go)
	minor=${client_go#v0.}
	minor=${minor%%.*}
	[[ $minor =~ ^[0-9]+$ ]] || die "cannot read k8s.io/client-go's version from $TOOLS_SRC/helm/go.mod"
	ld+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
	ld+=" -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
	for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
		ld+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
	done
	go_build "$TOOLS_SRC/helm" "$HELM_BIN" "$ld" helm=helm.sh/helm/v3/cmd/helm
}

grpcurl_ok() {
	[[ -x $GRPCURL_BIN/grpcurl ]] || return 1
	[[ $("$GRPCURL_BIN/grpcurl" -version 2>&1) == "grpcurl $GRPCURL_VERSION" ]]
}

build_grpcurl() {
	go_build "$TOOLS_SRC/grpcurl" "$GRPCURL_BIN" "-s -w -X main.version=$GRPCURL_VERSION" \
		grpcurl=github.com/fullstorydev/grpcurl/cmd/grpcurl
}

build_etcd() {
	go_build "$TOOLS_SRC/etcd" "$ETCD_BIN" "-s -w" etcd=go.etcd.io/etcd/server/v3 etcdctl=go.etcd.io/etcd/etcdctl/v3
}

install_all() {
	local t0 t
	t0=$(now_ms)
	ensure_cmd openssl openssl
	ensure_cmd curl curl
	ensure_cmd flock util-linux
	# etcd-client (operator, sidecar) compiles etcd's protos at build time: protoc and
	# Google's well-known .proto files.
	ensure_cmd protoc protobuf-compiler
	ensure_file /usr/include/google/protobuf/descriptor.proto libprotobuf-dev
	ensure_cmd ip iproute2 optional
	ensure_cmd iptables iptables optional
	# The clock-skew test (docs/reliability.md row 14) runs one sidecar under libfaketime (LD_PRELOAD).
	ensure_cmd faketime faketime
	mkdir -p "$TOOLS_DIR"
	exec 9>"$TOOLS_DIR/.install.lock"
	flock 9 # one install at a time (parallel test binaries)
	if ! etcd_ok || ! k8s_ok || ! helm_ok || ! grpcurl_ok; then
		command -v go >/dev/null 2>&1 || die "Go is needed to build etcd, Kubernetes and helm (see $TOOLS_SRC/*/go.mod)"
	fi
	if etcd_ok; then
		log "etcd $ETCD_VERSION: cached in $ETCD_BIN"
	else
		t=$(now_ms)
		log "building etcd and etcdctl $ETCD_VERSION into $ETCD_BIN"
		build_etcd
		etcd_ok || die "the etcd build in $ETCD_BIN does not report version $ETCD_VERSION"
		log "built etcd $ETCD_VERSION in $(elapsed "$t")"
	fi
	if k8s_ok; then
		log "kubernetes $K8S_VERSION: cached in $K8S_BIN"
	else
		t=$(now_ms)
		log "building kube-apiserver and kubectl $K8S_VERSION into $K8S_BIN (minutes on a cold Go cache)"
		build_k8s
		k8s_ok || die "the Kubernetes build in $K8S_BIN does not report version $K8S_VERSION"
		log "built kube-apiserver and kubectl $K8S_VERSION in $(elapsed "$t")"
	fi
	if helm_ok; then
		log "helm $HELM_VERSION: cached in $HELM_BIN"
	else
		t=$(now_ms)
		log "building helm $HELM_VERSION into $HELM_BIN (minutes on a cold Go cache)"
		build_helm
		helm_ok || die "the helm build in $HELM_BIN does not report version $HELM_VERSION"
		log "built helm $HELM_VERSION in $(elapsed "$t")"
	fi
	if grpcurl_ok; then
		log "grpcurl $GRPCURL_VERSION: cached in $GRPCURL_BIN"
	else
		t=$(now_ms)
		log "building grpcurl $GRPCURL_VERSION into $GRPCURL_BIN"
		build_grpcurl
		grpcurl_ok || die "the grpcurl build in $GRPCURL_BIN does not report version $GRPCURL_VERSION"
		log "built grpcurl $GRPCURL_VERSION in $(elapsed "$t")"
	fi
	flock -u 9
	echo "etcd $("$ETCD_BIN/etcd" --version | awk '/^etcd Version:/ {print $3}') $ETCD_BIN/etcd"
	echo "etcdctl $("$ETCD_BIN/etcdctl" version | awk '/^etcdctl version:/ {print $3}') $ETCD_BIN/etcdctl"
	echo "kube-apiserver $("$K8S_BIN/kube-apiserver" --version | awk '{print $2}') $K8S_BIN/kube-apiserver"
	echo "kubectl $("$K8S_BIN/kubectl" version --client | awk '/^Client Version:/ {print $3}') $K8S_BIN/kubectl"
	echo "helm $("$HELM_BIN/helm" version --template '{{.Version}}') $HELM_BIN/helm"
	echo "grpcurl $("$GRPCURL_BIN/grpcurl" -version 2>&1 | awk '{print $2}') $GRPCURL_BIN/grpcurl"
	log "install done in $(elapsed "$t0")"
}
