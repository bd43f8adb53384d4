#!/usr/bin/env bash
# Compares two builds of the stack on this machine, back to back: for each of ROUNDS
# rounds, each build's stack is started fresh (devstack, RocksDB) and runs echo-64,
# tokenize-64, info-64 and forward-16 as `make bench` does. Prints every run's calls/s
# and the median over the rounds of tokenize-64/echo-64, info-64/echo-64 and
# forward-16 (calls/s), per build. Ratios to echo cancel most of the machine's noise.
#
# Usage: scripts/bench-compare.sh BEFORE_BIN_DIR AFTER_BIN_DIR
#   each directory holds release builds of devstack, keyservice, vault-server,
#   vaultctl, sandbox-processor and vault-bench (e.g. copies of target/release).
# ROUNDS (default 3) and BENCH_SECS (default 10) set the length. Uses the dev stack's
# fixed ports: stop `make run` first.
set -euo pipefail

before="$1"
after="$2"
rounds="${ROUNDS:-3}"
secs="${BENCH_SECS:-10}"
work="$(mktemp -d)"
stack_pid=""

stop_stack() {
  if [ -n "$stack_pid" ]; then
    kill -INT "$stack_pid" 2>/dev/null || true
    wait "$stack_pid" 2>/dev/null || true
    stack_pid=""
  fi
}
trap 'stop_stack; rm -rf "$work"' EXIT

run_build() { # label bin_dir round
  local label="$1" bin="$2" round="$3" dir="$work/$1-$3"
  "$bin/devstack" --dir "$dir" > "$dir.log" 2>&1 &
  stack_pid=$!
  for _ in $(seq 1 120); do
    if "$bin/vaultctl" --config "$dir/vaultctl.toml" health >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  "$bin/vaultctl" --config "$dir/vaultctl.toml" health >/dev/null
  local scenario
  for scenario in "echo-64 echo 4 16" "tokenize-64 tokenize 4 16" "info-64 info 4 16" \
    "forward-16 forward 4 4"; do
    set -- $scenario
    "$bin/vault-bench" --config "$dir/vaultctl.toml" --scenario "$2" --connections "$3" \
      --in-flight "$4" --duration "$secs" --warmup 2 \
      --json "$work/results/$label-$round-$1.json" > /dev/null 2> "$dir-$1.progress" \
      || { cat "$dir-$1.progress" >&2; exit 1; }
  done
  stop_stack
  # The next stack reuses the ports.
  sleep 2
}

mkdir -p "$work/results"
for round in $(seq 1 "$rounds"); do
  echo "==> round $round of $rounds" >&2
  # Alternate which build goes first, so that neither always meets a warmer machine.
  if [ $((round % 2)) = 1 ]; then order="before after"; else order="after before"; fi
  for label in $order; do
    if [ "$label" = before ]; then run_build before "$before" "$round"; else run_build after "$after" "$round"; fi
  done
done

/usr/bin/python3 - "$work/results" "$rounds" <<'PY'
import json, statistics, sys
from pathlib import Path
results, rounds = Path(sys.argv[1]), int(sys.argv[2])
def rate(label, r, name):
    return json.loads((results / f"{label}-{r}-{name}.json").read_text())["calls_per_sec"]
print("| build | round | echo-64 | tokenize-64 | info-64 | forward-16 | tokenize/echo | info/echo |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
medians = {}
for label in ("before", "after"):
    rows = []
    for r in range(1, rounds + 1):
        e, t, i, f = (rate(label, r, n) for n in ("echo-64", "tokenize-64", "info-64", "forward-16"))
        rows.append((t / e, i / e, f))
        print(f"| {label} | {r} | {e:,.0f} | {t:,.0f} | {i:,.0f} | {f:,.0f} | {t/e:.3f} | {i/e:.3f} |")
    medians[label] = [statistics.median(col) for col in zip(*rows)]
print()
print("| median | tokenize-64/echo-64 | info-64/echo-64 | forward-16 calls/s |")
print("| --- | ---: | ---: | ---: |")
for label, (t, i, f) in medians.items():
    print(f"| {label} | {t:.3f} | {i:.3f} | {f:,.0f} |")
b, a = medians["before"], medians["after"]
print()
print("after / before: " + ", ".join(f"{name} {y / x:.3f}" for name, x, y in
      zip(("tokenize/echo", "info/echo", "forward-16"), b, a)))
PY
