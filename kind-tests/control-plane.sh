#!/usr/bin/env bash
# A real local control plane for Ferry's tests: etcd and kube-apiserver on loopback, no kubelet.
#
# Usage: kind-tests/control-plane.sh COMMAND [ARGS]
#   install                             build the pinned etcd, etcdctl, kube-apiserver and kubectl
#                                       from kind-tests/tools/{etcd,k8s} (once; cached by version;
#                                       see tools/install.sh)
#   start [DIR] [--parent-pid PID] [--rm]
#                                       start etcd and kube-apiserver with state in DIR and wait
#                                       until both are ready; with --parent-pid, a watchdog stops
#                                       them (and with --rm deletes DIR) once process PID exits
#   stop [DIR] [--rm]                   stop both and wait until they have exited
#   env [DIR]                           print `export KUBECONFIG=... FERRY_ETCD_ENDPOINTS=...` lines
#   status [DIR]                        print what runs; exit status 0 only when both are ready
#
# DIR defaults to ${FERRY_CP_DIR:-$PWD/.cache/control-plane}. Binaries are cached in
# ${FERRY_TOOLS_DIR:-$HOME/.cache/ferry/tools}/<name>-<version>/; the versions come from the
# go.mod files in kind-tests/tools/ (the single source of truth). FERRY_CP_START_TIMEOUT
# (seconds, default 60) bounds each readiness wait.
#
# After `start`, DIR holds kubeconfig, state.env (KEY=VALUE lines read by the Rust test
# support), pki/ (CA, serving, admin client and service-account keys), etcd/ (data),
# *.log and *.pid.
set -euo pipefail

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
TOOLS_SRC=$(dirname "$SCRIPT")/tools
TOOLS_DIR=${FERRY_TOOLS_DIR:-$HOME/.cache/ferry/tools}
START_TIMEOUT=${FERRY_CP_START_TIMEOUT:-60}

log() { printf 'control-plane: %s\n' "$*" >&2; }
die() { log "error: $*" && exit 1; }

# modver GOMOD MODULE: the version of MODULE that GOMOD requires.
modver() {
	awk -v m="$2" '
		$1 == "require" && $2 == m { print $3; exit }
		$1 == "require" && $2 == "(" { inreq = 1; next }
		inreq && $1 == ")" { inreq = 0; next }
		inreq && $1 == m { print $2; exit }
	' "$1"
}

K8S_VERSION=$(modver "$TOOLS_SRC/k8s/go.mod" k8s.io/kubernetes)
ETCD_VERSION=$(modver "$TOOLS_SRC/etcd/go.mod" go.etcd.io/etcd/server/v3)
[[ -n $K8S_VERSION && -n $ETCD_VERSION ]] || die "cannot read the pinned versions from $TOOLS_SRC/*/go.mod"
K8S_BIN=$TOOLS_DIR/kubernetes-$K8S_VERSION
ETCD_BIN=$TOOLS_DIR/etcd-$ETCD_VERSION

now_ms() { echo $(($(date +%s%N) / 1000000)); }
elapsed() { # elapsed START_MS: seconds since START_MS with one decimal
	local ms=$(($(now_ms) - $1))
	printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100))
}

# ---------------------------------------------------------------- install

cmd_install() {
	# shellcheck source=tools/install.sh
	source "$TOOLS_SRC/install.sh"
	install_all "$@"
}

# ---------------------------------------------------------------- processes

# alive PID: the process exists and is not a zombie.
alive() {
	local state
	state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
	[[ -n $state && $state != Z ]]
}

# owned PID DIR: PID is one of ours for DIR (guards against a reused pid).
owned() {
	local cmdline
	cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
	[[ $cmdline == *"$2"* ]]
}

# wait_until TIMEOUT PID WHAT CMD...: poll CMD until it succeeds. Returns 2 when PID exits
# first and 1 when TIMEOUT seconds pass first.
wait_until() {
	local timeout=$1 pid=$2 what=$3 deadline
	shift 3
	deadline=$(($(now_ms) + timeout * 1000))
	until "$@" >/dev/null 2>&1; do
		alive "$pid" || return 2
		(($(now_ms) < deadline)) || {
			log "$what is not ready after ${timeout}s"
			return 1
		}
		sleep 0.1
	done
}

# wait_gone TIMEOUT PID: poll until PID has exited; 1 on timeout.
wait_gone() {
	local deadline=$(($(now_ms) + $1 * 1000))
	while alive "$2"; do
		(($(now_ms) < deadline)) || return 1
		sleep 0.05
	done
}

# stop_pidfile DIR NAME: stop the process in DIR/NAME.pid (TERM, then KILL after 10 s).
stop_pidfile() {
	local file=$1/$2.pid pid
	[[ -f $file ]] || return 0
	pid=$(<"$file")
	if [[ -n $pid && $pid != "$$" ]] && alive "$pid" && owned "$pid" "$1"; then
		if [[ $2 == watchdog ]]; then
			kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
		else
			kill -TERM "$pid" 2>/dev/null || true
		fi
		if ! wait_gone 10 "$pid"; then
			log "$2 (pid $pid) ignored SIGTERM for 10s; killing it"
			kill -KILL "$pid" 2>/dev/null || true
			wait_gone 5 "$pid" || die "$2 (pid $pid) does not exit"
		fi
	fi
	rm -f "$file"
}

show_log() {
	log "last lines of $1:"
	tail -n "${2:-25}" "$1" >&2 || true
}

# pick_ports N: N distinct TCP ports that no socket uses, below the ephemeral range.
pick_ports() {
	local used p n=0 picked=" "
	used=$(awk 'NR > 1 { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u)
	for _ in $(seq 1 500); do
		p=$((20000 + RANDOM % 12000))
		[[ $picked == *" $p "* ]] && continue
		grep -qx "$(printf '%04X' "$p")" <<<"$used" && continue
		picked+="$p "
		n=$((n + 1))
		((n == $1)) && {
			echo "$picked"
			return 0
		}
	done
	die "no free loopback ports"
}

# ---------------------------------------------------------------- start

make_pki() {
	local pki=$1
	[[ -f $pki/admin.crt ]] && return 0
	mkdir -p "$pki"
	chmod 700 "$pki"
	(
		cd "$pki"
		# issue NAME SUBJECT EXTENSIONS: an EC P-256 key and a certificate signed by the CA.
		issue() {
			openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
				-keyout "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
			printf '%s\n' "basicConstraints=critical,CA:FALSE" "$3" >"$1.ext"
			openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 12)" \
				-days 3650 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
			rm -f "$1.csr" "$1.ext"
		}
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
			-keyout ca.key -out ca.crt -subj "/CN=ferry-test-ca" 2>/dev/null
		issue apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
			"keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
			"subjectAltName=IP:127.0.0.1,DNS:localhost")"
		issue admin "/O=system:masters/CN=ferry-admin" "$(printf '%s\n' \
			"keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth")"
		openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key 2>/dev/null
		openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
		chmod 600 ./*.key
	) || die "could not make certificates in $pki"
}

write_kubeconfig() { # write_kubeconfig DIR SERVER_URL
	local pki=$1/pki
	cat >"$1/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferry-local
  cluster:
    server: $2
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: ferry-admin
  user:
    client-certificate-data: $(base64 -w0 "$pki/admin.crt")
    client-key-data: $(base64 -w0 "$pki/admin.key")
contexts:
- name: ferry-local
  context:
    cluster: ferry-local
    user: ferry-admin
    namespace: default
current-context: ferry-local
EOF
	chmod 600 "$1/kubeconfig.tmp"
	mv -f "$1/kubeconfig.tmp" "$1/kubeconfig"
}

etcd_healthy() {
	local out
	out=$(curl -fsS --max-time 2 "$1/health") && [[ $out == *'"health":"true"'* ]]
}

apiserver_ready() { # apiserver_ready DIR URL
	local out
	out=$(curl -fsS --max-time 2 --cacert "$1/pki/ca.crt" --cert "$1/pki/admin.crt" --key "$1/pki/admin.key" \
		"$2/readyz") && [[ $out == ok ]]
}

# launch DIR NAME CMD...: run CMD in its own session, logging to DIR/NAME.log; sets LAUNCHED.
launch() {
	local dir=$1 name=$2
	shift 2
	setsid "$@" </dev/null >>"$dir/$name.log" 2>&1 &
	LAUNCHED=$!
	echo "$LAUNCHED" >"$dir/$name.pid"
}

# start_one NAME LOG_LINES LAUNCH_FN READY_FN: LAUNCH_FN picks free ports and launches NAME;
# wait until READY_FN succeeds. When a port was taken meanwhile, retry with other ports.
start_one() {
	local name=$1 lines=$2 attempt rc
	for attempt in 1 2 3; do
		: >"$DIR/$name.log"
		"$3"
		rc=0
		wait_until "$START_TIMEOUT" "$LAUNCHED" "$name" "$4" || rc=$?
		((rc == 0)) && return 0
		if ((rc == 2 && attempt < 3)) && grep -q 'address already in use' "$DIR/$name.log"; then
			log "$name: a port was taken meanwhile; retrying with other ports"
			continue
		fi
		((rc == 2)) && log "$name exited during start"
		show_log "$DIR/$name.log" "$lines"
		stop_pidfile "$DIR" "$name"
		return 1
	done
}

launch_etcd() { # sets ETCD_URL
	local cport pport
	read -r cport pport <<<"$(pick_ports 2)"
	ETCD_URL=http://127.0.0.1:$cport
	launch "$DIR" etcd "$ETCD_BIN/etcd" --name=ferry --data-dir="$DIR/etcd" \
		--listen-client-urls="$ETCD_URL" --advertise-client-urls="$ETCD_URL" \
		--listen-peer-urls="http://127.0.0.1:$pport" --initial-advertise-peer-urls="http://127.0.0.1:$pport" \
		--initial-cluster="ferry=http://127.0.0.1:$pport" --initial-cluster-state=new \
		--log-level=warn
}
etcd_ready() { etcd_healthy "$ETCD_URL"; }

launch_apiserver() { # sets APISERVER_URL
	local port pki=$DIR/pki
	port=$(pick_ports 1)
	port=${port// /}
	APISERVER_URL=https://127.0.0.1:$port
	# Flags after controller-runtime's envtest: no ServiceAccount admission (no controller
	# makes default service accounts), privileged pods allowed, RBAC with the admin in
	# system:masters, a service-account issuer of its own. No endpoint reconciler: the
	# `kubernetes` Service cannot point at a loopback address (there is no pod network).
	launch "$DIR" kube-apiserver "$K8S_BIN/kube-apiserver" \
		--etcd-servers="$ETCD_URL" \
		--cert-dir="$DIR/apiserver-certs" \
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" \
		--tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
		--client-ca-file="$pki/ca.crt" \
		--authorization-mode=RBAC \
		--service-cluster-ip-range=10.0.0.0/24 \
		--service-account-issuer="$APISERVER_URL" \
		--service-account-key-file="$pki/sa.pub" \
		--service-account-signing-key-file="$pki/sa.key" \
		--disable-admission-plugins=ServiceAccount \
		--allow-privileged=true \
		--endpoint-reconciler-type=none \
		--profiling=false
}
apiserver_up() { apiserver_ready "$DIR" "$APISERVER_URL"; }

running() { # running DIR: etcd or kube-apiserver of DIR is alive
	local name pid
	for name in etcd kube-apiserver; do
		[[ -f $1/$name.pid ]] || continue
		pid=$(<"$1/$name.pid")
		alive "$pid" && owned "$pid" "$1" && return 0
	done
	return 1
}

default_dir() { echo "${FERRY_CP_DIR:-$PWD/.cache/control-plane}"; }

cmd_start() {
	local dir="" parent="" rm="" t0 etcd_version kube_version
	while (($#)); do
		case $1 in
		--parent-pid) parent=${2:?--parent-pid needs a pid}; shift 2 ;;
		--rm) rm=--rm; shift ;;
		-*) die "start: unknown option $1" ;;
		*) [[ -z $dir ]] || die "start: one DIR only"; dir=$1; shift ;;
		esac
	done
	t0=$(now_ms)
	dir=${dir:-$(default_dir)}
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	running "$dir" && die "a control plane already runs in $dir (stop it first: $0 stop $dir)"
	[[ -x $ETCD_BIN/etcd && -x $K8S_BIN/kube-apiserver ]] || die "binaries missing: run $SCRIPT install"
	rm -f "$dir/state.env"

	DIR=$dir
	make_pki "$dir/pki"
	start_one etcd 25 launch_etcd etcd_ready || die "etcd did not start (log: $dir/etcd.log)"
	if ! start_one kube-apiserver 40 launch_apiserver apiserver_up; then
		stop_pidfile "$dir" etcd
		die "kube-apiserver did not start (log: $dir/kube-apiserver.log)"
	fi
	write_kubeconfig "$dir" "$APISERVER_URL"

	etcd_version=$(curl -fsS "$ETCD_URL/version" | sed -n 's/.*"etcdserver":"\([^"]*\)".*/\1/p')
	kube_version=$(curl -fsS --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
		"$APISERVER_URL/version" | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
	cat >"$dir/state.env.tmp" <<EOF
FERRY_CP_DIR=$dir
KUBECONFIG=$dir/kubeconfig
FERRY_ETCD_ENDPOINTS=$ETCD_URL
FERRY_APISERVER_URL=$APISERVER_URL
FERRY_ETCD_VERSION=$etcd_version
FERRY_KUBE_VERSION=$kube_version
FERRY_ETCD_BIN=$ETCD_BIN
FERRY_KUBE_BIN=$K8S_BIN
EOF
	mv -f "$dir/state.env.tmp" "$dir/state.env"

	if [[ -n $parent ]]; then
		# The watchdog: once the parent (a test process) exits, stop everything. `tail --pid`
		# polls the parent; the watchdog runs in its own session so `stop` can end it.
		# shellcheck disable=SC2016 # expanded by the watchdog's bash
		setsid bash -c 'tail --pid="$1" -s 0.5 -f /dev/null; exec "$2" stop "$3" ${4:+"$4"}' \
			control-plane-watchdog "$parent" "$SCRIPT" "$dir" "$rm" \
			</dev/null >>"$dir/watchdog.log" 2>&1 &
		echo $! >"$dir/watchdog.pid"
	fi
	echo "started etcd $etcd_version on $ETCD_URL, kube-apiserver $kube_version on $APISERVER_URL in $(elapsed "$t0")"
	echo "kubeconfig: $dir/kubeconfig"
}

# ---------------------------------------------------------------- stop, env, status

cmd_stop() {
	local dir="" rm="" t0
	while (($#)); do
		case $1 in
		--rm) rm=1; shift ;;
		-*) die "stop: unknown option $1" ;;
		*) dir=$1; shift ;;
		esac
	done
	t0=$(now_ms)
	dir=${dir:-$(default_dir)}
	[[ -d $dir ]] || { log "nothing in $dir"; return 0; }
	dir=$(cd "$dir" && pwd)
	stop_pidfile "$dir" kube-apiserver
	stop_pidfile "$dir" etcd
	stop_pidfile "$dir" watchdog
	rm -f "$dir/state.env"
	if [[ -n $rm ]]; then
		rm -rf "$dir"
		echo "stopped and removed $dir in $(elapsed "$t0")"
	else
		echo "stopped the control plane in $dir in $(elapsed "$t0")"
	fi
}

cmd_env() {
	local dir=${1:-$(default_dir)} key value
	[[ -f $dir/state.env ]] || die "no control plane runs in $dir (start one: $SCRIPT start $dir)"
	while IFS='=' read -r key value; do
		case $key in
		KUBECONFIG | FERRY_APISERVER_URL) printf 'export %s=%q\n' "$key" "$value" ;;
		FERRY_ETCD_ENDPOINTS) printf 'export %s=%q ETCDCTL_ENDPOINTS=%q\n' "$key" "$value" "$value" ;;
		esac
	done <"$dir/state.env"
	# shellcheck disable=SC2016 # $PATH is for the shell that evals this
	printf 'export PATH=%q:%q:"$PATH"\n' "$K8S_BIN" "$ETCD_BIN"
}

cmd_status() {
	local dir=${1:-$(default_dir)} ok=0 name pid url
	[[ -d $dir ]] || {
		echo "not running (no $dir)"
		return 1
	}
	dir=$(cd "$dir" && pwd)
	for name in etcd kube-apiserver watchdog; do
		pid=$(cat "$dir/$name.pid" 2>/dev/null || true)
		if [[ -n $pid ]] && alive "$pid" && owned "$pid" "$dir"; then
			echo "$name: running (pid $pid)"
		else
			echo "$name: not running"
			[[ $name == watchdog ]] || ok=1
		fi
	done
	if [[ -f $dir/state.env ]]; then
		url=$(sed -n 's/^FERRY_ETCD_ENDPOINTS=//p' "$dir/state.env")
		if etcd_healthy "$url"; then echo "etcd $url: healthy"; else echo "etcd $url: unhealthy"; ok=1; fi
		url=$(sed -n 's/^FERRY_APISERVER_URL=//p' "$dir/state.env")
		if apiserver_ready "$dir" "$url"; then echo "kube-apiserver $url: ready"; else echo "kube-apiserver $url: not ready"; ok=1; fi
	else
		ok=1
	fi
	return "$ok"
}

case ${1:-} in
install) shift; cmd_install "$@" ;;
start) shift; cmd_start "$@" ;;
stop) shift; cmd_stop "$@" ;;
env) shift; cmd_env "$@" ;;
status) shift; cmd_status "$@" ;;
*)
	sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
