# The two commands of the README:
#   make run    the dev stack (keyservice + vault-server, development CA) in the foreground
#   make demo-checkout  the dev stack and the sealed intake checkout demo (a merchant page)
#   make test   every test (the end-to-end ones on RocksDB, then again on PostgreSQL)
#   make test-postgres  only the end-to-end tests, with the vault on PostgreSQL
#   make compliance   docs/compliance.md's rows checked against the tests' results
#                     (those of the last `make test`); writes target/compliance/report.md
#   make compliance-update  the same, and refreshes docs/compliance-report.md
#   make crash-test   the long crash test (kill -9 under load, CRASH_CYCLES cycles)
#   make fuzz         every fuzz target for FUZZ_SECS seconds
#   make rewrap-bench the rewrap rate on REWRAP_RECORDS records (release build)
#   make audit-bench  tokenize throughput with and without the audit log (release build)
#   make import-bench an import of IMPORT_BENCH_ROWS gpg-encrypted rows: rate, peak memory
#   make bench        the standard load scenarios and the import; writes docs/BENCHMARKS.md
#   make h2load-check h2load against the running stack (`make run`), compared with vault-bench
#   make fresh-check  by hand, as root: both commands in a new Debian 12 chroot (about an hour)
# Both install missing system packages first and build RocksDB's C++ only once.

SHELL := /bin/bash
CACHE_DIR ?= $(HOME)/.cache/tokenvault
ROCKSDB_VERSION := $(shell sed -n '/^name = "librocksdb-sys"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' Cargo.lock)
# RocksDB is linked from a static library built once per version (see
# scripts/build-rocksdb.sh), never recompiled by a change in the Rust dependency graph.
# ROCKSDB_CACHE_DIR lets CI keep the library while it runs with an empty HOME (.ci/run).
ROCKSDB_CACHE_DIR ?= $(CACHE_DIR)
export ROCKSDB_LIB_DIR ?= $(ROCKSDB_CACHE_DIR)/librocksdb-$(ROCKSDB_VERSION)
export ROCKSDB_STATIC := 1
# The Python tools the tests call by absolute path (scripts/python-requirements.txt),
# in a virtualenv made by scripts/install-deps.sh; never ~/.local or a pyenv shim.
export TOKENVAULT_VENV ?= $(CACHE_DIR)/venv

.PHONY: run demo-checkout test test-workspace test-postgres compliance compliance-update crash-test bench import-bench h2load-check rewrap-bench audit-bench fuzz fresh-check build build-release lint deps rocksdb

# The devstack binary that `build` made, beside the servers it starts: `cargo run -p
# devstack` would resolve features for devstack alone and rebuild about 20 crates first
# (minutes, silently, on a new machine).
run: build
	"$(or $(CARGO_TARGET_DIR),target)/debug/devstack" --dir .dev

# The sealed intake demo (clients/checkout-demo): the dev stack as `make run`, and a
# merchant's checkout page and backend on http://127.0.0.1:8080 (CHECKOUT_DEMO_LISTEN_ADDR)
# whose browser seals the card to the vault; the backend logs the sealed cards it
# relays. Ctrl-C stops both.
demo-checkout: build
	scripts/demo-checkout.sh

test: build
	cd clients/web && npm test --silent
	$(MAKE) --no-print-directory test-workspace
	$(MAKE) --no-print-directory test-postgres

# Each cargo test phase of `make test` runs through scripts/compliance.py, which sets
# the phase's storage engine (TOKENVAULT_TEST_STORAGE), keeps its output in
# COMPLIANCE_DIR/<phase>.log, stamped with the tree, engine, toolchain and exit status
# (also when it fails), and where a test that skips itself leaves a marker
# (COMPLIANCE_DIR/skips/<phase>, integration_tests::skipped): `make compliance` reads
# them instead of running the suite again. The phase's exit status is the command's.
COMPLIANCE_DIR ?= target/compliance
COMPLIANCE := /usr/bin/python3 scripts/compliance.py --dir $(COMPLIANCE_DIR)
define test-phase
	$(COMPLIANCE) run $(1) -- $(2)
endef

# The unit tests of every crate, and the end-to-end tests on RocksDB (whatever
# TOKENVAULT_TEST_STORAGE says in the caller's environment). --no-fail-fast: a failed
# test binary does not keep the others from running (the phase still fails), so the
# compliance report shows every row's result, not "did not run".
test-workspace: build
	$(call test-phase,workspace,cargo test --locked --workspace --no-fail-fast)

# Every end-to-end test again with the vault on PostgreSQL (a throwaway cluster per
# stack) instead of RocksDB; tests about RocksDB's own files, backups and disk say
# they are skipped. About 90 s on 2 cores; part of `make test`.
test-postgres: build
	$(call test-phase,postgres,cargo test --locked -p integration-tests --test e2e)

# The control matrix (docs/compliance.md) against the tests' results: every automated
# row's tests must exist, have run on the engines the row names, and passed without
# skipping themselves. Reuses the logs of the last `make test` of this same tree (runs
# a phase whose log is missing or from another tree first) and runs the `#[ignore]`d
# tests the matrix names. Writes $(COMPLIANCE_DIR)/report.md; fails on any failed row.
compliance: rocksdb
	$(COMPLIANCE) report

# The same, and the committed copy of the report (docs/compliance-report.md) refreshed.
compliance-update: rocksdb
	$(COMPLIANCE) report --update docs/compliance-report.md

# kill -9 the vault (and now and then the keyservice) under concurrent load,
# CRASH_CYCLES times (default 50); every acknowledged token must survive.
crash-test: build
	cargo test --locked -p integration-tests --test e2e acknowledged_tokens_survive_kill_9_long -- --ignored --nocapture

# Loads REWRAP_RECORDS (default 100000) records, rotates the card-data and fingerprint
# keys, and times an unthrottled rewrap of all of them.
REWRAP_RECORDS ?= 100000
rewrap-bench: rocksdb
	REWRAP_RECORDS=$(REWRAP_RECORDS) cargo test --release --locked -p integration-tests --test e2e rewrap_rate -- --ignored --nocapture

# The standard scenarios against a release stack; writes docs/BENCHMARKS.md and
# docs/benchmarks.svg. Stop `make run` first (same ports). BENCH_SECS per scenario.
# Then the same scenarios with the vault on a throwaway PostgreSQL primary (pgcluster
# binary), beside RocksDB's in the report; BENCH_POSTGRES=0 skips them.
bench: rocksdb
	scripts/bench.sh

# An independent check with h2load (installs nghttp2-client and socat when missing):
# Tokenize and the health check at 4 connections x 16 streams against the running dev
# stack (`make run`), beside vault-bench's figures, and every Tokenize's gRPC status
# checked through the vault's metrics. h2load cannot present a client certificate, so
# it goes through a local socat relay that does the mutual TLS: see the script's header.
# H2LOAD_CONFIG and H2LOAD_ADMIN point it at another stack.
H2LOAD_SECS ?= 10
H2LOAD_CONFIG ?= .dev/vaultctl.toml
H2LOAD_ADMIN ?= 127.0.0.1:9464
h2load-check: rocksdb
	scripts/h2load-check.sh --config $(H2LOAD_CONFIG) --admin $(H2LOAD_ADMIN) --secs $(H2LOAD_SECS)

# Tokenize throughput, 1 and 64 calls in flight, with and without the audit log.
AUDIT_BENCH_TOKENS ?= 40000
audit-bench: rocksdb
	AUDIT_BENCH_TOKENS=$(AUDIT_BENCH_TOKENS) cargo test --release --locked -p integration-tests --test e2e audit_cost -- --ignored --nocapture

# The import scenario (issue 21): a file of IMPORT_BENCH_ROWS rows (first six spread
# over issuers like a real portfolio: tests/cards), encrypted with gpg, imported by the
# release binaries through vaultctl; prints rows per second and the vault's peak RSS
# (tests/e2e/import_binaries.rs, import_rate_and_peak_memory).
IMPORT_BENCH_ROWS ?= 1000000
import-bench: rocksdb
	cargo build --release --locked --bins
	IMPORT_BENCH_ROWS=$(IMPORT_BENCH_ROWS) cargo test --release --locked -p integration-tests --test e2e import_rate -- --ignored --nocapture

# Each cargo-fuzz target for FUZZ_SECS seconds (default 60), corpus in fuzz/corpus.
# Runs on the stable toolchain without a sanitizer (--sanitizer none); Rust's own checks
# (bounds, overflow in debug assertions, panics) are what it catches.
FUZZ_SECS ?= 60
FUZZ_TARGETS := record_decode template card_parse mask policy_config idempotency_decode keyring_decode \
  import_rows
fuzz: rocksdb
	@command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version 0.13.2
	cd fuzz && for target in $(FUZZ_TARGETS); do \
	  echo "==> fuzzing $$target for $(FUZZ_SECS) s"; \
	  cargo fuzz run --sanitizer none $$target -- -max_total_time=$(FUZZ_SECS) -print_final_stats=1 || exit 1; \
	done

# The README's two commands on a new machine: a debootstrapped Debian 12 chroot (the CI
# image's packages, no libclang, clang, g++, PostgreSQL, python3-venv), a clone of HEAD,
# `make test` cold, then `make run` and vaultctl against it; the host's Rust toolchain
# bound in read-only, HOME empty. By hand (root, about an hour), not in CI. Transcript in
# FRESH_CHECK_DIR (default /var/tmp/tokenvault-fresh-check); see the script's header.
fresh-check:
	scripts/fresh-check.sh

build: rocksdb
	cargo build --locked --bins

# Release binaries of the three programs (the container image, deploy/Dockerfile).
build-release: rocksdb
	cargo build --release --locked --bin keyservice --bin vault-server --bin vaultctl

# cargo deny (deny.toml): licenses, banned and duplicate crates, sources. Advisories
# need the RustSec database, which these machines cannot fetch: see deny.toml.
CARGO_DENY_VERSION := 0.20.2
CRATES := proto envelope runtime keyservice vault-server vault-client devstack bench \
  deploy/sandbox-processor tests tests/pgcluster clients/checkout-demo
lint: rocksdb
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	@cargo deny --version 2>/dev/null | grep -qx 'cargo-deny $(CARGO_DENY_VERSION)' \
	  || cargo install --locked cargo-deny --version $(CARGO_DENY_VERSION)
	cargo deny --locked check --hide-inclusion-graph licenses bans sources
	# No two modules of a crate depend on each other (scripts/module-cycles.py).
	/usr/bin/python3 scripts/module-cycles.py $(CRATES)
	# Only vault-server's api/ names the types generated from vault.proto.
	/usr/bin/python3 scripts/wire-types.py vault-server
	# The fuzz targets are a workspace of their own; keep them compiling. When a
	# dependency of the main workspace changes, refresh fuzz/Cargo.lock with
	# `cargo check --manifest-path fuzz/Cargo.toml`.
	cargo check --locked --manifest-path fuzz/Cargo.toml --bins

deps:
	@scripts/install-deps.sh

rocksdb: deps
	@scripts/build-rocksdb.sh "$(ROCKSDB_LIB_DIR)"
