#!/usr/bin/env bash
# `make h2load-check`: an independent check of vault-bench's figures with h2load
# (nghttp2), against a running stack (`make run`, or the one `make bench` starts).
#
#   scripts/h2load-check.sh [--config .dev/vaultctl.toml] [--admin 127.0.0.1:9464]
#                           [--secs 10] [--json FILE]
#
# What it does, in order:
#  1. installs h2load and nghttp (Debian nghttp2-client) and socat when missing;
#  2. writes the gRPC-framed request bodies with `vault-bench --write-h2load-body`: a
#     Tokenize of Visa's published test card 4242424242424242 and an empty
#     grpc.health.v1 HealthCheckRequest (the echo scenario's call);
#  3. makes one Tokenize with nghttp straight to the vault, with the client
#     certificate, and shows the response's :status and its grpc-status trailer;
#  4. runs vault-bench tokenize and echo at 4 connections x 16 calls in flight;
#  5. runs h2load at the same concurrency (-c 4 -m 16): Tokenize with a fixed number
#     of requests N (N = what vault-bench did in --secs, so it runs about as long;
#     after a separate warm-up run), and Health/Check for --secs after a 2 s warm-up
#     (-D, --warm-up-time). h2load counts HTTP/2 status 200 as success, but gRPC puts
#     its status in the trailers (a refused call is HTTP 200 too), so the script reads
#     the vault's tokenvault_rpc_calls_total{method="Tokenize"} counters on the admin
#     port before and after the Tokenize run, and fails unless exactly N more calls
#     were answered "ok" and no other code appeared. (Another client tokenizing on the
#     same vault meanwhile breaks the check. Health checks are not in those counters;
#     step 3 shows their path answers grpc-status 0.)
#
# Why a relay: the vault accepts only mutually authenticated TLS, and h2load has no
# option for a client certificate (h2load --help: no --cert/--key, unlike nghttp; see
# nghttp2 issue 1479). So h2load speaks cleartext HTTP/2 (h2c) to a socat relay on
# 127.0.0.1, which opens one mutual-TLS connection to the vault per h2load connection
# (4), verifies the vault's certificate against the stack's CA, and copies bytes both
# ways. h2load's figures are therefore vault + relay: every byte crosses one more
# process and two more socket hops, on the same cores as the vault. The Health/Check
# run through the same relay shows the ceiling of that path: where h2load's echo
# is far below vault-bench's echo, the relay (not the vault) limits h2load.
set -euo pipefail

config=".dev/vaultctl.toml"
admin="127.0.0.1:9464"
secs="${H2LOAD_SECS:-10}"
json=""
connections="${H2LOAD_CONNECTIONS:-4}"
streams="${H2LOAD_STREAMS:-16}"
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --admin) admin="$2"; shift 2 ;;
    --secs) secs="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# 1. Tools.
missing=()
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v nghttp >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  "$(dirname "$0")/apt-install.sh" "${missing[@]}"
fi

if [ -n "${VAULT_BENCH:-}" ]; then
  bench="$VAULT_BENCH"
else
  echo "==> building vault-bench (release)"
  cargo build --release --locked --bin vault-bench
  bench="${CARGO_TARGET_DIR:-target}/release/vault-bench"
fi

# The endpoint and the client identity, from the vaultctl config (paths are relative
# to the config's directory).
eval "$(python3 - "$config" <<'EOF'
import shlex, sys, tomllib
from pathlib import Path
from urllib.parse import urlsplit
path = Path(sys.argv[1])
conf = tomllib.loads(path.read_text())
url = urlsplit(conf["vault_endpoint"])
base = path.parent
for name, value in [("vault_host", url.hostname), ("vault_port", url.port or 443),
                    ("ca", base / conf["ca_file"]), ("cert", base / conf["cert_file"]),
                    ("key", base / conf["key_file"])]:
    print(f"{name}={shlex.quote(str(value))}")
EOF
)"

work="$(mktemp -d)"
cleanup() {
  if [ -n "${relay_pid:-}" ]; then
    # socat forks one child per connection; stop those (by parent id), then the relay.
    pkill -TERM -P "$relay_pid" 2>/dev/null || true
    kill -TERM "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# 2. Request bodies.
"$bench" --scenario tokenize --write-h2load-body "$work/tokenize.bin"
"$bench" --scenario echo --write-h2load-body "$work/echo.bin"
grpc_headers=(-H 'content-type: application/grpc' -H 'te: trailers')
tokenize_path=/tokenvault.vault.v1.Vault/Tokenize
echo_path=/grpc.health.v1.Health/Check

# 3. One call with nghttp, which does take a client certificate. SSL_CERT_FILE makes
# OpenSSL verify the vault against the stack's CA (nghttp has no --cacert; it only warns
# on a failed verification, so a warning fails the check here). Only status lines are
# shown: the body holds the token and the card's last four.
echo "==> one Tokenize with nghttp, straight to https://$vault_host:$vault_port (mutual TLS)"
SSL_CERT_FILE="$ca" nghttp -v --cert "$cert" --key "$key" "${grpc_headers[@]}" \
  -d "$work/tokenize.bin" "https://$vault_host:$vault_port$tokenize_path" > "$work/nghttp.txt" 2>&1 || true
grep -a -E 'WARNING|recv \(stream_id=[0-9]+\) (:status|grpc-status|grpc-message)' "$work/nghttp.txt" \
  | sed 's/^/    /' || true
if grep -a -q WARNING "$work/nghttp.txt" || ! grep -a -q 'grpc-status: 0$' "$work/nghttp.txt"; then
  echo "error: the nghttp call did not verify or did not answer grpc-status 0" >&2
  exit 1
fi

metrics() { curl -sf "http://$admin/metrics" > "$1"; }

# 4. vault-bench at the same concurrency, straight to the vault.
for scenario in tokenize echo; do
  echo "==> vault-bench $scenario, $connections connections x $streams in flight, $secs s"
  "$bench" --config "$config" --scenario "$scenario" --connections "$connections" \
    --in-flight "$streams" --duration "$secs" --warmup 2 --json "$work/vault-bench-$scenario.json"
done

# 5. h2load through the relay.
relay_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
socat TCP-LISTEN:"$relay_port",bind=127.0.0.1,reuseaddr,fork \
  OPENSSL:"$vault_host:$vault_port",cert="$cert",key="$key",cafile="$ca",verify=1 \
  2> "$work/relay.log" &
relay_pid=$!
for _ in $(seq 1 50); do
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', $relay_port), 1)" 2>/dev/null; then break; fi
  sleep 0.1
done

h2load_run() { # name path body h2load-options...
  local name="$1" path="$2" body="$3"
  shift 3
  h2load -c "$connections" -m "$streams" "$@" -d "$body" "${grpc_headers[@]}" \
    --log-file "$work/h2load-$name.log" "http://127.0.0.1:$relay_port$path" > "$work/h2load-$name.txt"
  grep -E '^(finished in|requests:|status codes:|time for request:)' "$work/h2load-$name.txt" | sed 's/^/    /'
}
requests_for() { # vault-bench report: calls it made in $secs, at least 1000
  python3 -c "import json, sys; print(max(1000, round(json.load(open(sys.argv[1]))['calls_per_sec'] * $secs)))" "$1"
}

echo "==> h2load warm-up (through the relay; not counted)"
h2load_run warmup "$tokenize_path" "$work/tokenize.bin" -n 2000 > /dev/null
metrics "$work/metrics-before.txt"
n_tokenize="$(requests_for "$work/vault-bench-tokenize.json")"
echo "==> h2load Tokenize, -c $connections -m $streams -n $n_tokenize, through the relay"
h2load_run tokenize "$tokenize_path" "$work/tokenize.bin" -n "$n_tokenize"
metrics "$work/metrics-after.txt"
echo "==> h2load Health/Check, -c $connections -m $streams -D $secs --warm-up-time 2, through the relay"
h2load_run echo "$echo_path" "$work/echo.bin" -D "$secs" --warm-up-time 2

# Summary, the gRPC status check, and the JSON for docs/BENCHMARKS.md.
python3 - "$work" "$n_tokenize" "$connections" "$streams" "$(h2load --version | head -1)" "${json:-}" <<'EOF'
import json, re, sys
from pathlib import Path

work, n_tokenize, connections, streams, version, out = sys.argv[1:7]
work, n_tokenize = Path(work), int(n_tokenize)


def h2load(name):
    text = (work / f"h2load-{name}.txt").read_text()
    # req/s is h2load's own figure (over the measured time, without --warm-up-time).
    finished = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
    micros = sorted(int(line.split("\t")[2]) for line in (work / f"h2load-{name}.log").read_text().splitlines() if line)
    pct = lambda q: micros[min(len(micros) - 1, int(q * len(micros)))] / 1000 if micros else 0.0
    return {
        "requests": int(counts[1]), "succeeded": int(counts[4]), "failed": int(counts[5]),
        "errored": int(counts[6]), "timeout": int(counts[7]),
        "req_per_sec": float(finished[1]),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999),
                       "max": micros[-1] / 1000 if micros else 0.0},
    }


def tokenize_calls(name):
    calls = {}
    for line in (work / name).read_text().splitlines():
        m = re.match(r'tokenvault_rpc_calls_total\{method="Tokenize",code="([^"]+)"\} (\d+)', line)
        if m:
            calls[m[1]] = int(m[2])
    return calls


before, after = tokenize_calls("metrics-before.txt"), tokenize_calls("metrics-after.txt")
delta = {code: after.get(code, 0) - before.get(code, 0) for code in set(before) | set(after)}
delta = {code: n for code, n in delta.items() if n}
bench = {s: json.loads((work / f"vault-bench-{s}.json").read_text()) for s in ("tokenize", "echo")}
result = {
    "h2load_version": version,
    "connections": int(connections),
    "streams_per_connection": int(streams),
    "path": "h2load -> h2c -> socat relay (127.0.0.1) -> mutual TLS -> vault",
    "tokenize": h2load("tokenize"),
    "echo": h2load("echo"),
    "vault_bench": {s: {"calls_per_sec": r["calls_per_sec"], "latency_ms": r["latency_ms"],
                        "errors": r["errors"]} for s, r in bench.items()},
    "grpc_status_check": {"requests": n_tokenize, "tokenize_calls_by_code": delta,
                          "ok": delta == {"ok": n_tokenize}},
}

rows = [("vault-bench", "direct", "Tokenize", bench["tokenize"]["calls_per_sec"], bench["tokenize"]["latency_ms"]),
        ("h2load", "relay", "Tokenize", result["tokenize"]["req_per_sec"], result["tokenize"]["latency_ms"]),
        ("vault-bench", "direct", "Health/Check", bench["echo"]["calls_per_sec"], bench["echo"]["latency_ms"]),
        ("h2load", "relay", "Health/Check", result["echo"]["req_per_sec"], result["echo"]["latency_ms"])]
print(f"\n{version}, {connections} connections x {streams} streams; h2load goes through a socat relay (h2c -> mutual TLS)")
print(f"{'tool':<12} {'path':<7} {'call':<13} {'calls/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
for tool, path, call, rate, l in rows:
    print(f"{tool:<12} {path:<7} {call:<13} {rate:>9,.0f} {l['p50']:>8.2f} {l['p90']:>8.2f} {l['p99']:>8.2f} {l['max']:>8.2f}")
ratio = result["tokenize"]["req_per_sec"] / max(bench["tokenize"]["calls_per_sec"], 1e-9)
print(f"h2load Tokenize / vault-bench Tokenize: {ratio:.2f}")
check = result["grpc_status_check"]
print(f"gRPC status (vault metrics, Tokenize during the h2load run): {delta or 'none'}; "
      f"expected {{'ok': {n_tokenize}}}: {'pass' if check['ok'] else 'FAIL'}")
if out:
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
sys.exit(0 if check["ok"] and result["tokenize"]["succeeded"] == n_tokenize else 1)
EOF
