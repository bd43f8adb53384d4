#!/usr/bin/env bash
# Builds RocksDB's C++ static library once per librocksdb-sys version and caches it
# outside the checkout (about 10-20 minutes on 2 cores). Every other build links it via
# ROCKSDB_LIB_DIR + ROCKSDB_STATIC, so a change to the Rust dependency graph (which can
# rebuild librocksdb-sys's build script) never recompiles RocksDB.
#
# Usage: scripts/build-rocksdb.sh LIB_DIR   (the Makefile passes its ROCKSDB_LIB_DIR)
set -euo pipefail

lib_dir=${1:?usage: $0 LIB_DIR}
if [ -f "$lib_dir/librocksdb.a" ]; then
  exit 0
fi

echo "==> Building RocksDB once into $lib_dir (10-20 minutes on 2 cores; cached afterwards)"
build_dir="$lib_dir.build"
mkdir -p "$build_dir"
# The one build that compiles RocksDB itself: without the variables that skip it.
env -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC \
  cargo build --locked -p librocksdb-sys --target-dir "$build_dir"
built=$(ls -t "$build_dir"/debug/build/librocksdb-sys-*/out/librocksdb.a | head -n 1)
mkdir -p "$lib_dir"
cp "$built" "$lib_dir/librocksdb.a.tmp"
mv "$lib_dir/librocksdb.a.tmp" "$lib_dir/librocksdb.a"
rm -rf "$build_dir"
echo "==> RocksDB library cached: $lib_dir/librocksdb.a"
