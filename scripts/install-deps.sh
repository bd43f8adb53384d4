#!/usr/bin/env bash
# Installs the system packages the build needs when they are missing: libclang (for
# RocksDB's Rust bindings), a C++ compiler (for RocksDB itself), systemd-analyze
# (for the unit checks) and the PostgreSQL server programs (for the PostgreSQL engine's
# tests and make bench). Installs with
# apt-get when running as root or with passwordless sudo; otherwise says exactly what
# to install.
set -euo pipefail

missing=()
if ! ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  missing+=(clang libclang-dev)
fi
if ! command -v c++ >/dev/null 2>&1; then
  missing+=(g++)
fi
# systemd-analyze checks the hardened units in deploy/systemd (make test).
if ! command -v systemd-analyze >/dev/null 2>&1; then
  missing+=(systemd)
fi
# The PostgreSQL storage engine's tests and `make bench` start throwaway clusters with
# the server programs (initdb, pg_ctl, pg_basebackup: tests/pgcluster); they do not use
# the system service the package sets up.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
# kubernetes-validate (PyPI) checks the manifests in deploy/k8s against the
# Kubernetes schemas (make test).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "==> Installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet --user kubernetes-validate 2>/dev/null \
    || python3 -m pip install --quiet kubernetes-validate \
    || echo "warning: kubernetes-validate is missing (the manifest test needs it): python3 -m pip install kubernetes-validate" >&2
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "==> Installing missing system packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "error: missing system packages: ${missing[*]}" >&2
  echo "install them with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get here; install the equivalents of: ${missing[*]}" >&2
  exit 1
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}"
