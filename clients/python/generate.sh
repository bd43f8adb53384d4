#!/usr/bin/env bash
# Generates the Python gRPC stubs of the vault's API from proto/ (grpcio-tools, in the
# virtualenv `make deps` makes; nothing is installed system-wide).
#
# Usage: clients/python/generate.sh [OUT_DIR]   (default: clients/python/generated)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${TOKENVAULT_VENV:-$HOME/.cache/tokenvault/venv}
out=${1:-$here/generated}
if [ ! -x "$venv/bin/python" ]; then
  echo "error: no virtualenv at $venv: run \`make deps\` first" >&2
  exit 1
fi
mkdir -p "$out"
"$venv/bin/python" -m grpc_tools.protoc \
  -I "$repo/proto/proto" \
  --python_out="$out" \
  --grpc_python_out="$out" \
  tokenvault/vault/v1/vault.proto
echo "stubs in $out (tokenvault/vault/v1/vault_pb2*.py)"
