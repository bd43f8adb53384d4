#!/usr/bin/env bash
# Installs what the build and the tests need when it is missing, checking for the thing
# itself rather than for a package name:
#   - libclang, under a file name clang-sys (RocksDB's bindings) loads: libclang.so,
#     libclang.so.*, libclang-N.so or libclang-N.so.*. Debian images ship
#     libclang-cpp.so.14, which is a different library and does not count;
#   - a C++ compiler (RocksDB itself);
#   - systemd-analyze (the unit checks), PostgreSQL's initdb (throwaway clusters for the
#     PostgreSQL engine's tests and make bench);
#   - Debian's python3 with venv, and in a virtualenv of our own under the cache
#     directory the Python tools the tests call by absolute path (kubernetes-validate,
#     grpcio and its tools and reflection client: scripts/python-requirements.txt).
#     Never `pip install --user` (~/.local/bin is not on PATH, and Debian's python3
#     refuses it) and never a pyenv shim;
#   - for the browser end-to-end test (tests/e2e/checkout.rs) and the checkout demo:
#     Debian's chromium and its chromedriver, gcore (gdb) for the test's core dump of
#     the merchant backend, node and npm, and the browser sealer's npm packages in
#     clients/web/node_modules (`npm ci`, exactly as package-lock.json pins them).
# System packages are installed by scripts/apt-install.sh (apt-get as root or with
# passwordless sudo; otherwise it says exactly what to install).
#
# Usage: scripts/install-deps.sh              install what is missing
#        scripts/install-deps.sh --check      report what is missing, install nothing
#                                             (exit 1 if anything is)
# Environment: TOKENVAULT_VENV      the virtualenv (default ~/.cache/tokenvault/venv)
#              LIBCLANG_SEARCH_DIRS colon-separated directories to look for libclang
#                                   in, instead of the usual ones (for the check's test)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv=${TOKENVAULT_VENV:-$HOME/.cache/tokenvault/venv}
requirements="$here/python-requirements.txt"
web="$here/../clients/web"
check_only=false
if [ "${1:-}" = "--check" ]; then
  check_only=true
fi

# The directories clang-sys searches on Linux, in its order: LIBCLANG_PATH, what
# llvm-config reports, then the system library directories and every /usr/lib/llvm-*.
libclang_dirs() {
  if [ -n "${LIBCLANG_SEARCH_DIRS:-}" ]; then
    tr ':' '\n' <<<"$LIBCLANG_SEARCH_DIRS"
    return
  fi
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    echo "$LIBCLANG_PATH"
  fi
  if command -v llvm-config >/dev/null 2>&1; then
    llvm-config --libdir 2>/dev/null || true
  fi
  echo "/usr/lib/$(uname -m)-linux-gnu"
  echo /usr/lib64
  echo /usr/lib
  echo /usr/local/lib
  ls -d /usr/lib/llvm-*/lib 2>/dev/null || true
}

has_libclang() {
  local dir file
  while IFS= read -r dir; do
    [ -n "$dir" ] || continue
    # libclang-[0-9]* keeps libclang-cpp.so.* out: it is not the C API bindgen needs.
    for file in "$dir"/libclang.so "$dir"/libclang.so.* "$dir"/libclang-[0-9]*.so \
      "$dir"/libclang-[0-9]*.so.*; do
      if [ -e "$file" ]; then
        return 0
      fi
    done
  done < <(libclang_dirs)
  return 1
}

# The virtualenv is current when it was made from this very requirements file.
venv_current() {
  [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.txt"
}

# clients/web/node_modules is current when `npm ci` made it from this very lock file
# (the copy is written after a successful `npm ci`).
node_modules_current() {
  [ -d "$web/node_modules/@hpke/core" ] \
    && cmp -s "$web/package-lock.json" "$web/node_modules/.tokenvault-package-lock.json"
}

missing=()
if ! has_libclang; then
  echo "libclang: missing (no libclang.so, libclang.so.*, libclang-N.so or libclang-N.so.* in $(libclang_dirs | paste -sd' '))"
  missing+=(clang libclang-dev)
fi
if ! command -v c++ >/dev/null 2>&1; then
  echo "c++: missing"
  missing+=(g++)
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "systemd-analyze: missing"
  missing+=(systemd)
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "initdb (PostgreSQL server programs): missing"
  missing+=(postgresql)
fi
# Debian's own interpreter, by absolute path: a pyenv or other python3 earlier on PATH
# may not exist on the next machine.
if ! /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "python3 with venv (/usr/bin/python3): missing"
  missing+=(python3-venv)
fi

# Debian's own browser and driver, by the names tests/e2e/checkout.rs runs them.
if [ ! -x /usr/bin/chromium ]; then
  echo "chromium (/usr/bin/chromium): missing"
  missing+=(chromium)
fi
if [ ! -x /usr/bin/chromedriver ]; then
  echo "chromedriver (/usr/bin/chromedriver): missing"
  missing+=(chromium-driver)
fi
# Debian's GnuPG (2.2 on Debian 12), by the path tests/e2e/import.rs runs it: the
# import tests encrypt their files with it, as a sending party would.
if [ ! -x /usr/bin/gpg ]; then
  echo "gpg (/usr/bin/gpg): missing"
  missing+=(gnupg)
fi
if ! command -v gcore >/dev/null 2>&1; then
  echo "gcore: missing"
  missing+=(gdb)
fi
# Debian 12's nodejs (18) has no npm of its own; NodeSource's nodejs includes it.
if ! command -v node >/dev/null 2>&1; then
  echo "node: missing"
  missing+=(nodejs)
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm: missing"
  missing+=(npm)
fi

if $check_only; then
  status=0
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing system packages: ${missing[*]}"
    status=1
  fi
  if ! venv_current; then
    echo "python virtualenv $venv: missing or older than $requirements"
    status=1
  fi
  if ! node_modules_current; then
    echo "clients/web/node_modules: missing or older than clients/web/package-lock.json (npm ci)"
    status=1
  fi
  exit $status
fi

if [ ${#missing[@]} -gt 0 ]; then
  "$here/apt-install.sh" "${missing[@]}"
  if ! has_libclang; then
    echo "error: libclang still not found after installing ${missing[*]}" >&2
    exit 1
  fi
fi

if ! venv_current; then
  echo "==> Creating the Python virtualenv for the tests' tools in $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi

if ! node_modules_current; then
  echo "==> Installing the browser sealer's npm packages (npm ci in clients/web)"
  rm -f "$web/node_modules/.tokenvault-package-lock.json"
  (cd "$web" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$web/package-lock.json" "$web/node_modules/.tokenvault-package-lock.json"
fi
