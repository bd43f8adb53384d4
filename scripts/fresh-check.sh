#!/usr/bin/env bash
# `make fresh-check`: the README's two commands on what looks like a new CI machine, run
# by hand (root, about an hour cold; not part of CI). It catches what `make test` on a
# used machine cannot: an install step that is missing because this machine, or its home
# directory, already has the thing.
#
#  1. A Debian 12 (bookworm) base image, debootstrapped once (a few minutes) and kept as
#     a tarball in the check's directory: minbase plus gcc, make, git, ca-certificates,
#     curl, python3 (without python3-venv), procps and libclang-cpp14. Like the image CI
#     uses, it has libclang-cpp.so.14 but no libclang (libclang-dev, libclang1-14), and
#     no clang, g++, postgresql, systemd or python3-venv: scripts/install-deps.sh must
#     add those. Like a container image, it has an empty apt package list and a
#     policy-rc.d that keeps installed services (PostgreSQL) from starting.
#  2. Every run unpacks a pristine copy of it, so nothing an earlier run installed
#     survives, and checks that libclang-cpp.so.14 is there and libclang is not. It adds
#     what any machine on this network has: the host's local CAs
#     (/usr/local/share/ca-certificates, e.g. an egress proxy's) and its host name in
#     /etc/hosts.
#  3. Mounts proc, sysfs (read-only), /dev, /dev/pts, /dev/shm, copies resolv.conf, and
#     binds the host's Rust toolchain read-only: RUSTUP_HOME at /opt/rustup (each
#     toolchain from where it really is: a linked toolchain's absolute symlink would
#     dangle) and CARGO_HOME/bin (the rustup proxies) at /opt/cargo-bin. Inside,
#     HOME=/root and CARGO_HOME=/root/.cargo start empty (crates are downloaded anew).
#  4. Clones the committed HEAD of this repository into /root/tokenvault, runs
#     `make test` there (under nice/ionice, timed), then `make run` in the background:
#     once devstack says the stack is up, `vaultctl tokenize` (must print a tok_ token)
#     and `vaultctl health`, then SIGINT, as Ctrl-C would, and it must stop cleanly.
#
# Everything goes to $FRESH_CHECK_DIR/transcript-<UTC time>.log; the last line is
# "fresh-check: PASSED" or "fresh-check: FAILED at <step>" (non-zero exit).
#
# The whole script runs in a mount namespace of its own: its mounts are invisible to
# the host and vanish with it, even if it is killed. It also unmounts them on exit
# (trap), and never deletes a directory that has anything mounted under it. The last
# run's chroot is kept for inspection until the next run replaces it.
#
# Environment:
#   FRESH_CHECK_DIR         where everything lives (default /var/tmp/tokenvault-fresh-check):
#                           base-bookworm.tar, chroot/, transcript-*.log
#   FRESH_CHECK_ROCKSDB_LIB an already built RocksDB library directory (holding
#                           librocksdb.a) to copy into the chroot's
#                           ~/.cache/tokenvault/librocksdb-<version>, skipping the cold
#                           RocksDB build on a re-run (default: none, cold)
#   FRESH_CHECK_MIRROR      Debian mirror (default http://deb.debian.org/debian)
#   FRESH_CHECK_REBUILD_BASE=1  debootstrap the base image again
#   RUSTUP_HOME, CARGO_HOME the host's toolchain (default /root/.rustup, /root/.cargo)
#
# The command lines for the chroot are single-quoted on purpose (expanded inside):
# shellcheck disable=SC2016
set -euo pipefail

# A private mount namespace first: nothing mounted below can leak into the host's.
if [ -z "${FRESH_CHECK_IN_NAMESPACE:-}" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "fresh-check: must run as root (debootstrap, chroot, mounts)" >&2
    exit 1
  fi
  exec unshare --mount --propagation private env FRESH_CHECK_IN_NAMESPACE=1 "$0" "$@"
fi

repo_dir=$(cd "$(dirname "$0")/.." && pwd)
work_dir=${FRESH_CHECK_DIR:-/var/tmp/tokenvault-fresh-check}
mirror=${FRESH_CHECK_MIRROR:-http://deb.debian.org/debian}
rocksdb_lib=${FRESH_CHECK_ROCKSDB_LIB:-}
host_rustup=${RUSTUP_HOME:-/root/.rustup}
host_cargo_bin=${CARGO_HOME:-/root/.cargo}/bin
suite=bookworm
base_packages=gcc,make,git,ca-certificates,curl,python3,procps,libclang-cpp14
# What install-deps.sh has to install itself: none of them may be in the base image.
absent_packages=(clang libclang-dev libclang1-14 g++ postgresql systemd python3-venv)
chroot_path=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mkdir -p "$work_dir"
work_dir=$(cd "$work_dir" && pwd -P)
base_tar=$work_dir/base-$suite.tar
base_conf=$base_tar.conf
chroot_dir=$work_dir/chroot
stamp=$(date -u +%Y%m%dT%H%M%SZ)
transcript=$work_dir/transcript-$stamp.log
run_log=$work_dir/make-run-$stamp.log

exec 9>"$work_dir/lock"
if ! flock -n 9; then
  echo "fresh-check: another fresh-check is running (lock $work_dir/lock)" >&2
  exit 1
fi

# tee -i: a Ctrl-C must not take the transcript down before the final line.
exec > >(tee -i -a "$transcript") 2>&1

step=setup
passed=false
mounts=()          # mount points, in the order mounted
run_pid=""
tail_pid=""

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
begin() {
  step=$1
  echo
  echo "==> [$(now)] $step"
}
die() {
  echo "error: $*" >&2
  exit 1
}

# Mounted at or under $1, in this namespace?
has_mounts_under() {
  findmnt -rn -o TARGET | awk -v d="$1" '$0 == d || index($0, d "/") == 1 { found = 1 } END { exit !found }'
}

# rm -rf, but never through a mount: refuses when anything is mounted under the tree
# (a /dev bind mount under rm -rf empties the host's /dev), and --one-file-system.
remove_tree() {
  local dir=$1
  [ -e "$dir" ] || return 0
  case "$dir" in
    "$work_dir"/*) ;;
    *) die "refusing to delete $dir: not under $work_dir" ;;
  esac
  if has_mounts_under "$dir"; then
    findmnt -rn -o TARGET | grep -F "$dir" >&2 || true
    die "refusing to delete $dir: something is still mounted under it"
  fi
  rm -rf --one-file-system "$dir"
}

do_mount() {
  local target=${*: -1}
  mount "$@"
  mounts+=("$target")
}

# proc, sysfs, /dev, /dev/pts, /dev/shm and resolv.conf for the chroot at $1.
mount_system() {
  local root=$1
  mkdir -p "$root/proc" "$root/sys" "$root/dev"
  do_mount -t proc proc "$root/proc"
  do_mount -t sysfs -o ro sysfs "$root/sys"
  # No mkdir under $root/dev from here on: that is the host's /dev.
  do_mount --bind /dev "$root/dev"
  do_mount --bind /dev/pts "$root/dev/pts"
  do_mount --bind /dev/shm "$root/dev/shm"
  rm -f "$root/etc/resolv.conf"
  cat /etc/resolv.conf >"$root/etc/resolv.conf"
}

bind_read_only() {
  local source=$1 target=$2
  mkdir -p "$target"
  do_mount --bind "$source" "$target"
  mount -o remount,bind,ro "$target"
}

# The host's RUSTUP_HOME, read-only at $1. A toolchain may be a symlink to an absolute
# path under the host's RUSTUP_HOME (`rustup toolchain link`, or 1.95.0 -> stable),
# which would dangle in the chroot; so $1 is a read-only tmpfs with RUSTUP_HOME's files
# and each toolchain bound (read-only) from where its symlink really points.
mount_rustup_home() {
  local target=$1 entry name
  mkdir -p "$target"
  do_mount -t tmpfs -o mode=755 tmpfs "$target"
  find "$host_rustup" -mindepth 1 -maxdepth 1 -type f -exec cp -p {} "$target/" \;
  mkdir "$target/toolchains"
  for entry in "$host_rustup"/toolchains/*; do
    name=$(basename "$entry")
    bind_read_only "$(readlink -f "$entry")" "$target/toolchains/$name"
    if [ -L "$entry" ]; then
      echo "toolchain $name: a symlink on the host, bound from $(readlink -f "$entry")"
    fi
  done
  mount -o remount,ro "$target"
}

unmount_all() {
  local i target
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    target=${mounts[i]}
    if mountpoint -q "$target"; then
      umount "$target" 2>/dev/null || umount -l "$target" || echo "warning: could not unmount $target"
    fi
  done
  mounts=()
}

# Processes whose root is the chroot: whatever the run left behind (all started here).
chroot_pids() {
  local proc root
  for proc in /proc/[0-9]*; do
    root=$(readlink "$proc/root" 2>/dev/null) || continue
    if [ "$root" = "$chroot_dir" ]; then
      echo "${proc#/proc/}"
    fi
  done
}

# Is a compiler (rustc, a build script, cc, the linker) running in the chroot?
compiler_running() {
  local pid comm
  for pid in $(chroot_pids); do
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
    case "$comm" in
      rustc | build-script-* | cc | c++ | cc1 | cc1plus | as | ld | collect2) return 0 ;;
    esac
  done
  return 1
}

kill_chroot_processes() {
  local pids i
  pids=$(chroot_pids)
  [ -n "$pids" ] || return 0
  echo "stopping processes left in the chroot: $(echo "$pids" | paste -sd' ')"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do
    pids=$(chroot_pids)
    [ -n "$pids" ] || return 0
    sleep 0.5
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  sleep 1
}

finish() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then
    kill -INT -- "-$run_pid" 2>/dev/null
    sleep 5
  fi
  if [ -n "$tail_pid" ]; then
    kill "$tail_pid" 2>/dev/null
    wait "$tail_pid" 2>/dev/null
  fi
  kill_chroot_processes
  unmount_all
  if has_mounts_under "$chroot_dir"; then
    echo "warning: still mounted under $chroot_dir:"
    findmnt -rn -o TARGET | grep -F "$chroot_dir"
  fi
  echo
  echo "[$(now)] transcript: $transcript"
  if [ "$status" -eq 0 ] && $passed; then
    echo "fresh-check: PASSED"
    exit 0
  fi
  echo "fresh-check: FAILED at $step"
  [ "$status" -ne 0 ] || status=1
  exit "$status"
}
trap finish EXIT
trap 'echo "interrupted"; exit 130' INT
trap 'echo "terminated"; exit 143' TERM

check_absent_packages() {
  local package
  for package in "${absent_packages[@]}"; do
    if chroot "$1" dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
      die "the image has $package installed; install-deps.sh must install it"
    fi
  done
}

# A fresh machine's root environment, and nothing from ours.
chroot_env=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb PATH="$chroot_path"
  RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo RUSTUP_AUTO_INSTALL=0 CARGO_TERM_COLOR=never)
# Runs a bash command line in the chroot as root in that environment.
in_chroot() {
  chroot "$chroot_dir" /usr/bin/env -i "${chroot_env[@]}" /bin/bash -c "$1"
}

echo "fresh-check started $(now) on $(hostname) ($(nproc) cores, $(uname -r))"
echo "directory: $work_dir"
echo "transcript: $transcript"

begin "find the commit"
commit=$(git -C "$repo_dir" rev-parse HEAD)
echo "repository: $repo_dir"
echo "commit: $(git -C "$repo_dir" log -1 --format='%H %cI %s' "$commit" | cut -c1-200)"
if [ -n "$(git -C "$repo_dir" status --porcelain --untracked-files=no)" ]; then
  echo "(the host checkout has uncommitted changes; they are not tested: only HEAD is)"
fi

begin "check the host's Rust toolchain"
[ -d "$host_rustup/toolchains" ] || die "no Rust toolchains in RUSTUP_HOME=$host_rustup"
[ -x "$host_cargo_bin/cargo" ] || die "no cargo proxy in $host_cargo_bin"
echo "RUSTUP_HOME=$host_rustup: $(find "$host_rustup/toolchains" -mindepth 1 -maxdepth 1 -printf '%f ')"
echo "rustup proxies: $host_cargo_bin"
if [ -n "$rocksdb_lib" ]; then
  [ -f "$rocksdb_lib/librocksdb.a" ] || die "FRESH_CHECK_ROCKSDB_LIB=$rocksdb_lib has no librocksdb.a"
fi

want_conf="suite=$suite mirror=$mirror variant=minbase include=$base_packages policy-rc.d=101 lists=empty"
if [ "${FRESH_CHECK_REBUILD_BASE:-}" = 1 ] || [ ! -f "$base_tar" ] \
  || [ "$(cat "$base_conf" 2>/dev/null)" != "$want_conf" ]; then
  begin "debootstrap the base image (once)"
  build_dir=$work_dir/base.build
  remove_tree "$build_dir"
  rm -f "$base_tar" "$base_conf"
  debootstrap --variant=minbase --include="$base_packages" "$suite" "$build_dir" "$mirror"
  # A CI machine's sources: the release, its updates and the security archive.
  rm -f "$build_dir/etc/apt/sources.list"
  cat >"$build_dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # As in a container image: installed services are not started.
  printf '#!/bin/sh\nexit 101\n' >"$build_dir/usr/sbin/policy-rc.d"
  chmod 755 "$build_dir/usr/sbin/policy-rc.d"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$build_dir/etc/hosts"
  echo fresh-check >"$build_dir/etc/hostname"
  mount_system "$build_dir"
  chroot "$build_dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    /bin/sh -c 'apt-get update -qq && apt-get upgrade -y -qq && apt-get clean'
  unmount_all
  # Like a container image: no package lists until the first apt-get update.
  find "$build_dir/var/lib/apt/lists" -type f -delete
  : >"$build_dir/etc/resolv.conf"
  check_absent_packages "$build_dir"
  tar --numeric-owner -cpf "$base_tar.tmp" -C "$build_dir" .
  mv "$base_tar.tmp" "$base_tar"
  echo "$want_conf" >"$base_conf"
  remove_tree "$build_dir"
  echo "base image: $base_tar ($(du -h "$base_tar" | cut -f1))"
else
  echo
  echo "base image: $base_tar (debootstrapped $(date -u -r "$base_tar" +%Y-%m-%dT%H:%M:%SZ); FRESH_CHECK_REBUILD_BASE=1 to make it again)"
fi

begin "unpack a pristine chroot"
remove_tree "$chroot_dir"
mkdir "$chroot_dir"
tar --numeric-owner -xpf "$base_tar" -C "$chroot_dir"
echo "chroot: $chroot_dir ($(chroot "$chroot_dir" dpkg-query -W | wc -l) packages)"

begin "this machine's local settings"
# A fresh machine on this network trusts the same site CAs (an egress proxy's, a
# package mirror's): the host's /usr/local/share/ca-certificates, added the Debian way.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$chroot_dir/usr/local/share/ca-certificates/"
  for cert in "$chroot_dir"/usr/local/share/ca-certificates/*.crt; do
    echo "local CA: /usr/local/share/ca-certificates/$(basename "$cert"):" \
      "$(openssl x509 -noout -subject -in "$cert" 2>/dev/null || echo '?')"
  done
  chroot "$chroot_dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin update-ca-certificates
else
  echo "no local CAs in /usr/local/share/ca-certificates"
fi
# The host name is the host's (same UTS namespace): resolvable, as on an installed machine.
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
  "$(hostname)" >"$chroot_dir/etc/hosts"
echo "/etc/hosts: localhost, $(hostname)"

begin "check the image's libclang"
libclang_cpp=$chroot_dir/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
[ -e "$libclang_cpp" ] || die "no /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 in the image"
echo "present: /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 -> $(readlink "$libclang_cpp")"
found=$(find "$chroot_dir" -xdev \( -name 'libclang.so*' -o -name 'libclang-1*.so*' \) -printf '/%P\n')
if [ -n "$found" ]; then
  echo "$found"
  die "the image has libclang already; install-deps.sh would not be tested"
fi
echo "absent: libclang.so*, libclang-1*.so* (nowhere in the image)"
check_absent_packages "$chroot_dir"
echo "not installed: ${absent_packages[*]}"

begin "mount"
mount_system "$chroot_dir"
mount_rustup_home "$chroot_dir/opt/rustup"
bind_read_only "$host_cargo_bin" "$chroot_dir/opt/cargo-bin"
findmnt -rn -o TARGET,FSTYPE,OPTIONS | grep -F "$chroot_dir" | sed "s|$chroot_dir|<chroot>|"

begin "clone the repository"
git clone --quiet --no-hardlinks --no-checkout "$repo_dir" "$chroot_dir/root/tokenvault"
git -C "$chroot_dir/root/tokenvault" checkout --quiet --detach "$commit"
echo "/root/tokenvault at $(git -C "$chroot_dir/root/tokenvault" rev-parse HEAD)"

begin "check the toolchain in the chroot"
in_chroot 'set -e; echo "PATH=$PATH"; echo "HOME=$HOME: $(ls -A "$HOME" | paste -sd" ")"
  cargo --version; cd /root/tokenvault && cargo --version && rustc --version'

rocksdb_version=$(sed -n '/^name = "librocksdb-sys"$/{n;s/^version = "\(.*\)"$/\1/p;}' \
  "$chroot_dir/root/tokenvault/Cargo.lock")
if [ -n "$rocksdb_lib" ]; then
  begin "copy the prebuilt RocksDB library"
  dest=$chroot_dir/root/.cache/tokenvault/librocksdb-$rocksdb_version
  mkdir -p "$dest"
  cp -a "$rocksdb_lib/." "$dest/"
  echo "FRESH_CHECK_ROCKSDB_LIB used: $rocksdb_lib copied to /root/.cache/tokenvault/librocksdb-$rocksdb_version"
  echo "(RocksDB's C++ is NOT built cold in this run)"
else
  echo
  echo "RocksDB: cold (librocksdb-$rocksdb_version is built from source by make test)"
fi

begin "make test"
started=$(date +%s)
echo "# cd /root/tokenvault && time make test   (under nice -n 19 ionice -c3)"
if ! nice -n 19 ionice -c3 chroot "$chroot_dir" /usr/bin/env -i "${chroot_env[@]}" \
  /bin/bash -c 'cd /root/tokenvault && time make test'; then
  echo "make test failed after $(($(date +%s) - started)) s"
  exit 1
fi
elapsed=$(($(date +%s) - started))
echo "make test wall time: $((elapsed / 60)) min $((elapsed % 60)) s ($([ -n "$rocksdb_lib" ] && echo "prebuilt RocksDB" || echo cold))"

begin "make run"
# In a process group of its own (job control), with SIGINT's default handling even if
# this script was started with it ignored (in the background), so that SIGINT to the
# group is what Ctrl-C in its terminal would do. Its output goes to a file (a pipe could
# break when the group gets SIGINT), shown live.
run_started=$(date +%s)
set -m
env --default-signal=INT chroot "$chroot_dir" /usr/bin/env -i "${chroot_env[@]}" \
  /bin/bash -c 'cd /root/tokenvault && exec make run' >"$run_log" 2>&1 </dev/null &
run_pid=$!
set +m
tail -n +1 -f "$run_log" &
tail_pid=$!
# 120 s for the stack to come up, counted from when make run stops compiling: right
# after `make test`, `cargo run -p devstack` may rebuild crates (features unified for
# one package instead of the workspace), silently (--quiet). The compile time is shown.
echo "make run: pid $run_pid; waiting for \"Dev stack is up\" (120 s at most once nothing compiles)"
deadline=$((run_started + 120))
compiling=0 # seconds
last=$run_started
said=0
until grep -q 'Dev stack is up' "$run_log" 2>/dev/null; do
  if ! kill -0 "$run_pid" 2>/dev/null; then
    die "make run exited before the stack was up"
  fi
  t=$(date +%s)
  if compiler_running; then
    compiling=$((compiling + t - last))
    deadline=$((t + 120))
    if [ $((t - said)) -ge 60 ]; then
      echo "[$(now)] make run is compiling"
      said=$t
    fi
  fi
  last=$t
  if [ "$t" -ge "$deadline" ]; then
    die "the stack was not up within 120 s (after $compiling s of compiling)"
  fi
  if [ "$(date +%s)" -ge $((run_started + 1800)) ]; then
    die "the stack was not up within 30 min"
  fi
  sleep 1
done
echo "[$(now)] the stack is up, $(($(date +%s) - run_started)) s after make run started" \
  "(about $compiling s of it compiling)"
target_dir=$(in_chroot 'cd /root/tokenvault && cargo metadata --offline --locked --no-deps --format-version 1 \
  | python3 -c "import json, sys; print(json.load(sys.stdin)[\"target_directory\"])"')
rebuilt=$(find "$chroot_dir$target_dir/debug/deps" -name '*.rlib' -newermt "@$run_started" -printf '%f\n' \
  | sed 's/^lib//; s/-[0-9a-f]*\.rlib$//' | sort | paste -sd' ')
if [ -n "$rebuilt" ]; then
  echo "make run compiled crates that make test had built: $rebuilt"
fi

begin "vaultctl tokenize and health"
vaultctl=$target_dir/debug/vaultctl
echo "# cd /root/tokenvault && echo 4242424242424242 | $vaultctl tokenize --exp 12/2030"
token=$(in_chroot "cd /root/tokenvault && echo 4242424242424242 | '$vaultctl' tokenize --exp 12/2030")
echo "$token"
case "$token" in
  tok_*) echo "(tokenize printed a token)" ;;
  *) die "tokenize did not print a tok_ token" ;;
esac
echo "# cd /root/tokenvault && $vaultctl health"
in_chroot "cd /root/tokenvault && '$vaultctl' health"

begin "stop make run (SIGINT)"
kill -INT -- "-$run_pid"
deadline=$(($(date +%s) + 60))
while kill -0 "$run_pid" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || die "make run did not stop within 60 s of SIGINT"
  sleep 1
done
run_status=0
wait "$run_pid" || run_status=$?
run_pid=""
sleep 1
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
tail_pid=""
echo "make run exited with status $run_status"
grep -q 'devstack: interrupted; stopping' "$run_log" || die "devstack did not report a clean stop"
sleep 1
left=$(chroot_pids)
if [ -n "$left" ]; then
  ps -o pid,args -p "$(echo "$left" | paste -sd,)" || true
  die "processes still running in the chroot after make run stopped"
fi
echo "make run stopped cleanly; no process left in the chroot"

step="done"
passed=true
