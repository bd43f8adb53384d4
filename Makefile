# The two commands of the README:
#   make run    the dev stack (keyservice + vault-server, development CA) in the foreground
#   make test   every test
#   make crash-test   the long crash test (kill -9 under load, CRASH_CYCLES cycles)
# Both install missing system packages first and build RocksDB's C++ only once.

SHELL := /bin/bash
CACHE_DIR ?= $(HOME)/.cache/tokenvault
ROCKSDB_VERSION := $(shell sed -n '/^name = "librocksdb-sys"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' Cargo.lock)
# RocksDB is linked from a static library built once per version (see
# scripts/build-rocksdb.sh), never recompiled by a change in the Rust dependency graph.
export ROCKSDB_LIB_DIR ?= $(CACHE_DIR)/librocksdb-$(ROCKSDB_VERSION)
export ROCKSDB_STATIC := 1

.PHONY: run test crash-test build lint deps rocksdb

run: build
	cargo run --locked --quiet -p devstack -- --dir .dev

test: build
	cargo test --locked --workspace

# kill -9 the vault (and now and then the keyservice) under concurrent load,
# CRASH_CYCLES times (default 50); every acknowledged token must survive.
crash-test: build
	cargo test --locked -p integration-tests --test e2e acknowledged_tokens_survive_kill_9_long -- --ignored --nocapture

build: rocksdb
	cargo build --locked --bins

lint: rocksdb
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings

deps:
	@scripts/install-deps.sh

rocksdb: deps
	@scripts/build-rocksdb.sh "$(ROCKSDB_LIB_DIR)"
