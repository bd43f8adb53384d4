#!/usr/bin/env bash
# `make bench`: starts the stack (release build, fresh data directory), preloads
# records, runs the standard scenarios with vault-bench, and writes docs/BENCHMARKS.md
# and docs/benchmarks.svg (throughput and p99 against calls in flight).
#
# Uses the dev stack's fixed ports (7443, 8443, 9443, admin 9464): stop `make run` first.
# BENCH_SECS (default 10) sets each scenario's measured duration. echo-64 is the
# transport baseline (gRPC health check, same channel and concurrency as
# tokenize-64). BENCH_H2LOAD=0 skips the independent h2load check
# (scripts/h2load-check.sh), which otherwise runs after the RocksDB scenarios against
# the same stack.
#
# Then, unless BENCH_POSTGRES=0, the vault on PostgreSQL: the pgcluster binary starts a
# throwaway primary (TLS on loopback, fsync and synchronous_commit on, no standby), the
# first stack is stopped, and a second one starts with fresh directories on the same
# ports with its vault on that database (devstack --postgres-*). The same scenarios
# (not echo: no storage in it) go to pg-<name>.json; BENCHMARKS.md puts them beside
# RocksDB's.
#
# Last, unless BENCH_IMPORT=0, the import scenario (issue 21): IMPORT_BENCH_ROWS rows
# (default 1,000,000) encrypted with gpg and imported through vaultctl (make
# import-bench runs it alone), to import.json.
set -euo pipefail

secs="${BENCH_SECS:-10}"
target="${CARGO_TARGET_DIR:-target}"
bin="$target/release"
work="$(mktemp -d)"
results="$work/results"
mkdir -p "$results"
stack_pid=""
pg_pid=""

stop_stack() {
  # devstack stops its services on Ctrl-C (SIGINT) and waits for them.
  if [ -n "$stack_pid" ]; then
    kill -INT "$stack_pid" 2>/dev/null || true
    wait "$stack_pid" 2>/dev/null || true
    stack_pid=""
  fi
}

stop_pgcluster() {
  # pgcluster stops the cluster and removes its directory when its stdin (fd 7) closes.
  if [ -n "$pg_pid" ]; then
    exec 7>&-
    wait "$pg_pid" 2>/dev/null || true
    pg_pid=""
  fi
}

cleanup() {
  stop_stack
  # Anything left is stopped by path ($work/stack and $work/stack-pg).
  pkill -f "$work/stack" 2>/dev/null || true
  stop_pgcluster
  rm -rf "$work"
}
trap cleanup EXIT

start_stack() { # dir [devstack options]
  stack_dir="$1"
  shift
  echo "==> starting the stack in $stack_dir"
  "$bin/devstack" --dir "$stack_dir" "$@" --init-only > "$stack_dir.log" 2>&1 7>&-
  # One identity brings 3 to 4 million synthetic cards in a run. Over the guessing
  # detector's default day-long window (or even 10 minutes) that fills the fullest
  # buckets (first six, last four) past their limit, and the detector refuses the
  # identity, as it should. The bench counts over one minute instead: the same work
  # per call, no refusals.
  printf '\n[guessing]\nwindow_secs = 60\n' >> "$stack_dir/vault-server.toml"
  # 7>&-: pgcluster's stdin stays open in this script only, so that it ends with it.
  "$bin/devstack" --dir "$stack_dir" "$@" >> "$stack_dir.log" 2>&1 7>&- &
  stack_pid=$!
  for _ in $(seq 1 120); do
    if "$bin/vaultctl" --config "$stack_dir/vaultctl.toml" health >/dev/null 2>&1; then break; fi
    if ! kill -0 "$stack_pid" 2>/dev/null; then
      tail -n 40 "$stack_dir.log" >&2
      echo "error: the stack in $stack_dir stopped while starting (above: the end of its log)" >&2
      exit 1
    fi
    sleep 0.5
  done
  "$bin/vaultctl" --config "$stack_dir/vaultctl.toml" health
  local vault_pid
  vault_pid="$(pgrep -f "vault-server --config $stack_dir/vault-server.toml" | head -1 || true)"
  pid_args=()
  if [ -n "$vault_pid" ]; then pid_args=(--server-pid "$vault_pid"); fi
}

# The second stack reuses the first one's ports: wait until nothing listens on them.
wait_ports_free() {
  local port
  for port in 7443 8443 9443 9464 9465; do
    for _ in $(seq 1 40); do
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue 2; fi
      sleep 0.25
    done
    echo "error: port $port is still in use after the first stack stopped" >&2
    exit 1
  done
}

run() { # name scenario connections in_flight (- for open loop) [more vault-bench flags]
  echo "==> $1"
  local concurrency=(--in-flight "$4")
  if [ "$4" = - ]; then concurrency=(); fi
  "$bin/vault-bench" --config "$stack_dir/vaultctl.toml" --scenario "$2" \
    --connections "$3" "${concurrency[@]}" --duration "$secs" --warmup 2 \
    "${pid_args[@]}" --json "$results/$1.json" "${@:5}"
}

scenarios() { # result name prefix: "" (RocksDB) or "pg-"
  local p="$1" inflight connections
  run "${p}preload" tokenize-batch 2 4
  for inflight in 1 8 32 64 128; do
    connections=$(( inflight < 4 ? 1 : 4 ))
    run "${p}tokenize-$inflight" tokenize "$connections" $(( inflight / connections ))
  done
  # The transport baseline at tokenize-64's concurrency (4 connections x 16); it does
  # not touch storage, so once is enough.
  if [ -z "$p" ]; then run echo-64 echo 4 16; fi
  # Sealed intake at tokenize-64's concurrency, the cards sealed before the run (more
  # than the run can use at 30,000 calls/s).
  run "${p}tokenize-sealed-64" tokenize-sealed 4 16 --sealed-cards $(( (secs + 2) * 30000 ))
  run "${p}info-64" info 4 16
  run "${p}batch-8" tokenize-batch 4 2
  # Batches of 1,000 cards, one and two calls in flight (the hot-path issue's fast path).
  run "${p}batch1000-1" tokenize-batch 1 1 --batch-size 1000
  run "${p}batch1000-2" tokenize-batch 2 1 --batch-size 1000
  run "${p}forward-16" forward 4 4
  # forward-16's baseline: the same charge sent by the client straight to the sandbox.
  if [ -z "$p" ]; then run forward-direct-16 forward-direct 4 4; fi
  run "${p}mix-64" mix 4 16
  # Open loop at 0.8 x this run's closed-loop tokenize-64: does the vault keep a
  # schedule it can sustain, and with what latency?
  local rate
  rate=$(python3 -c 'import json, sys; print(max(1, int(0.8 * json.load(open(sys.argv[1]))["calls_per_sec"])))' \
    "$results/${p}tokenize-64.json")
  run "${p}tokenize-open" tokenize 4 - --rate "$rate"
}

echo "==> building release binaries"
cargo build --release --locked --bin devstack --bin keyservice --bin vault-server --bin vaultctl --bin sandbox-processor --bin vault-bench
if [ "${BENCH_POSTGRES:-1}" != 0 ]; then
  # On its own: built together, its dependencies' features (nix's "user") would be
  # unified into the servers' and change the binaries under test.
  cargo build --release --locked -p pgcluster --bin pgcluster
fi

start_stack "$work/stack"
scenarios ""

if [ "${BENCH_H2LOAD:-1}" != 0 ]; then
  echo "==> h2load check"
  VAULT_BENCH="$bin/vault-bench" scripts/h2load-check.sh --config "$work/stack/vaultctl.toml" \
    --admin 127.0.0.1:9464 --secs "$secs" --json "$results/h2load.json" \
    || echo "warning: the h2load check failed (see above); docs/BENCHMARKS.md says so" >&2
fi

if [ "${BENCH_POSTGRES:-1}" != 0 ]; then
  echo "==> stopping the RocksDB stack"
  stop_stack
  wait_ports_free

  echo "==> starting a throwaway PostgreSQL primary (pgcluster)"
  # Its one JSON line (connection, files, server version and settings) is kept beside
  # the results for the report. Its stdin is a FIFO this script holds open as fd 7.
  mkfifo "$work/pgcluster.stdin"
  "$bin/pgcluster" < "$work/pgcluster.stdin" > "$results/postgres.json" 2> "$work/pgcluster.log" &
  pg_pid=$!
  exec 7> "$work/pgcluster.stdin"
  pg_field() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
      "$results/postgres.json" "$1"
  }
  until pg_field port >/dev/null 2>&1; do
    if ! kill -0 "$pg_pid" 2>/dev/null; then
      cat "$work/pgcluster.log" >&2
      echo "error: pgcluster could not start PostgreSQL (above); BENCH_POSTGRES=0 skips it" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "PostgreSQL $(pg_field server_version) on port $(pg_field port)"

  start_stack "$work/stack-pg" \
    --postgres-conninfo "$(pg_field conninfo)" \
    --postgres-password-file "$(pg_field password_file)" \
    --postgres-ca-file "$(pg_field ca_file)"
  scenarios pg-
  stop_stack
  stop_pgcluster
fi

if [ "${BENCH_IMPORT:-1}" != 0 ]; then
  # Last, with every stack stopped: the test starts its own keyservice and vault from
  # the release binaries built above.
  echo "==> import scenario: ${IMPORT_BENCH_ROWS:-1000000} rows (tests/e2e/import_binaries.rs)"
  IMPORT_BENCH_ROWS="${IMPORT_BENCH_ROWS:-1000000}" IMPORT_BENCH_JSON="$results/import.json" \
    cargo test --release --locked -p integration-tests --test e2e import_rate -- --ignored --nocapture \
    || echo "warning: the import scenario failed (see above); docs/BENCHMARKS.md says so" >&2
fi

echo "==> writing docs/BENCHMARKS.md and docs/benchmarks.svg"
python3 scripts/bench_report.py "$results" docs/BENCHMARKS.md docs/benchmarks.svg "$secs"
