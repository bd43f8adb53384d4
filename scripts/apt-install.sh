#!/usr/bin/env bash
# Installs Debian packages with apt-get, as root or with passwordless sudo; otherwise
# fails with the exact command to run. Used by install-deps.sh and h2load-check.sh.
#
# Usage: scripts/apt-install.sh PACKAGE...
set -euo pipefail

echo "==> Installing missing system packages: $*"
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "error: missing system packages: $*" >&2
  echo "install them with:  sudo apt-get update && sudo apt-get install -y $*" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get here; install the equivalents of: $*" >&2
  exit 1
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@"
