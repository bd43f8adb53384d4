#!/usr/bin/env bash
# `make bench`: starts the stack (release build, fresh data directory), preloads
# records, runs the standard scenarios with vault-bench, and writes docs/BENCHMARKS.md
# and docs/benchmarks.svg (throughput and p99 against calls in flight).
#
# Uses the dev stack's fixed ports (7443, 8443, 9443, admin 9464): stop `make run` first.
# BENCH_SECS (default 10) sets each scenario's measured duration. echo-64 is the
# transport baseline (gRPC health check, same channel and concurrency as
# tokenize-64). BENCH_H2LOAD=0 skips the independent h2load check
# (scripts/h2load-check.sh), which otherwise runs last against the same stack.
set -euo pipefail

secs="${BENCH_SECS:-10}"
target="${CARGO_TARGET_DIR:-target}"
bin="$target/release"
work="$(mktemp -d)"
results="$work/results"
mkdir -p "$results"
cleanup() {
  # devstack stops its services on Ctrl-C (SIGINT); anything left is stopped by path.
  if [ -n "${stack_pid:-}" ]; then kill -INT "$stack_pid" 2>/dev/null || true; wait "$stack_pid" 2>/dev/null || true; fi
  pkill -f "$work/stack" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> building release binaries"
cargo build --release --locked --bin devstack --bin keyservice --bin vault-server --bin vaultctl --bin sandbox-processor --bin vault-bench

echo "==> starting the stack in $work/stack"
"$bin/devstack" --dir "$work/stack" > "$work/stack.log" 2>&1 &
stack_pid=$!
for _ in $(seq 1 120); do
  if "$bin/vaultctl" --config "$work/stack/vaultctl.toml" health >/dev/null 2>&1; then break; fi
  sleep 0.5
done
"$bin/vaultctl" --config "$work/stack/vaultctl.toml" health
vault_pid="$(pgrep -f "vault-server --config $work/stack/vault-server.toml" | head -1 || true)"
pid_args=()
if [ -n "$vault_pid" ]; then pid_args=(--server-pid "$vault_pid"); fi

run() { # name scenario connections in_flight
  echo "==> $1"
  "$bin/vault-bench" --config "$work/stack/vaultctl.toml" --scenario "$2" \
    --connections "$3" --in-flight "$4" --duration "$secs" --warmup 2 \
    "${pid_args[@]}" --json "$results/$1.json"
}

run preload tokenize-batch 2 4
for inflight in 1 8 32 64 128; do
  connections=$(( inflight < 4 ? 1 : 4 ))
  run "tokenize-$inflight" tokenize "$connections" $(( inflight / connections ))
done
# The transport baseline at tokenize-64's concurrency (4 connections x 16).
run echo-64 echo 4 16
run info-64 info 4 16
run batch-8 tokenize-batch 4 2
run forward-16 forward 4 4
run mix-64 mix 4 16

if [ "${BENCH_H2LOAD:-1}" != 0 ]; then
  echo "==> h2load check"
  VAULT_BENCH="$bin/vault-bench" scripts/h2load-check.sh --config "$work/stack/vaultctl.toml" \
    --admin 127.0.0.1:9464 --secs "$secs" --json "$results/h2load.json" \
    || echo "warning: the h2load check failed (see above); docs/BENCHMARKS.md says so" >&2
fi

echo "==> writing docs/BENCHMARKS.md and docs/benchmarks.svg"
python3 scripts/bench_report.py "$results" docs/BENCHMARKS.md docs/benchmarks.svg "$secs"
