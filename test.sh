#!/usr/bin/env bash
# The project's test command, the same on a laptop and in CI (.ci/run calls it):
#   1. build/cache the pinned etcd and Kubernetes binaries (kind-tests/control-plane.sh install)
#   2. cargo fmt --check, 3. cargo clippy -D warnings, 4. cargo test --workspace
# Each phase prints how long it took; a summary follows at the end (also on failure).
# With CI=true, cargo runs --locked (Cargo.lock must be up to date).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

locked=()
if [[ ${CI:-} == true ]]; then
	locked=(--locked)
	# Incremental caches only help a developer's edit loop; in CI they double the disk used.
	export CARGO_INCREMENTAL=0
fi

timings=()
current=""
now_ms() { echo $(($(date +%s%N) / 1000000)); }
summary() {
	local rc=$?
	echo
	echo "==> disk: target $(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1), free $(df -h --output=avail . | tail -1 | tr -d ' ')"
	echo "==> timings"
	printf '    %s\n' "${timings[@]}"
	if ((rc != 0)); then
		echo "==> FAILED in phase: ${current:-setup} (exit $rc)"
	else
		echo "==> all phases passed"
	fi
}
trap summary EXIT

# phase NAME CMD...: run CMD as one timed phase.
phase() {
	local name=$1 t0 ms
	shift
	current=$name
	echo "==> $name: $*"
	t0=$(now_ms)
	"$@"
	ms=$(($(now_ms) - t0))
	timings+=("$(printf '%-8s %4d.%ds' "$name" $((ms / 1000)) $((ms % 1000 / 100)))")
	current=""
}

phase install kind-tests/control-plane.sh install
# Show that the real control plane starts (the tests start their own the same way).
cp_dir=$(mktemp -d)
phase control-plane bash -c "kind-tests/control-plane.sh start '$cp_dir' && kind-tests/control-plane.sh stop '$cp_dir' --rm"
phase fmt cargo fmt --all --check
phase clippy cargo clippy "${locked[@]}" --workspace --all-targets -- -D warnings
phase test cargo test "${locked[@]}" --workspace
