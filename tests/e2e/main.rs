//! End-to-end tests: real servers, real mutual TLS on 127.0.0.1, real RocksDB.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod access;
mod audit;
mod backup;
mod bad_input;
mod bad_input_matrix;
mod bad_input_memory;
mod bench;
mod card_tokens;
mod checkout;
mod crash;
mod deploy;
mod devstack;
mod durability;
mod export;
mod faults;
mod forward;
mod guessing;
mod import;
mod import_binaries;
mod keys;
mod leaks;
mod limits;
mod matrix;
mod metrics;
mod postgres;
mod retention;
mod sealed;
mod startup;
mod tokenize;
mod vaultctl;
mod velocity;
