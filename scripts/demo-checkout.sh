#!/usr/bin/env bash
# `make demo-checkout`: the dev stack (devstack in .dev, as `make run`) and the sealed
# intake demo's merchant backend (clients/checkout-demo) beside it, acting as the dev
# stack's `checkout` identity (tenant `checkout`, permission `tokenize`). Open the URL
# it prints, pay with 4242 4242 4242 4242, and watch the backend's request log: sealed
# cards only. Ctrl-C stops both.
#
# Environment: CHECKOUT_DEMO_LISTEN_ADDR  the page's address (default 127.0.0.1:8080)
#              CARGO_TARGET_DIR           where `make build` put the binaries
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${CARGO_TARGET_DIR:-target}/debug"
dir=.dev
listen=${CHECKOUT_DEMO_LISTEN_ADDR:-127.0.0.1:8080}
for program in devstack checkout-demo; do
  if [ ! -x "$bin/$program" ]; then
    echo "error: $bin/$program is missing: run \`make build\` first" >&2
    exit 1
  fi
done

devstack_pid=
demo_pid=
stop() {
  trap - INT TERM
  # Background jobs of a script ignore the terminal's Ctrl-C: pass it on. devstack
  # stops its services itself on SIGINT.
  [ -n "$demo_pid" ] && kill -TERM "$demo_pid" 2>/dev/null || true
  [ -n "$devstack_pid" ] && kill -INT "$devstack_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap 'stop; exit 130' INT TERM
trap stop EXIT

"$bin/devstack" --dir "$dir" &
devstack_pid=$!

# devstack writes the CA certificate last: then the checkout identity's files exist.
for _ in $(seq 1 300); do
  [ -e "$dir/ca.pem" ] && break
  kill -0 "$devstack_pid" 2>/dev/null || exit 1
  sleep 0.2
done
if [ ! -e "$dir/checkout.key" ]; then
  echo "error: $dir has no checkout identity (made by an older devstack): move it away for a fresh one" >&2
  exit 1
fi

"$bin/checkout-demo" --listen-addr "$listen" --vault-endpoint https://localhost:8443 \
  --ca-file "$dir/ca.pem" --cert-file "$dir/checkout.pem" --key-file "$dir/checkout.key" \
  --web-dir clients/web > >(sed -u 's/^/[checkout-demo] /') 2>&1 &
demo_pid=$!

echo
echo "  Checkout demo: http://$listen/  (test card 4242 4242 4242 4242, any future expiry)"
echo "  Ctrl-C stops the demo and the dev stack."
echo

# Until either stops (or Ctrl-C).
wait -n
