//! What both servers need around their own logic: mutual TLS configuration and the
//! caller's identity, telemetry set-up, shutdown signals, and reading secret files.
//!
//! Must never depend on storage, key handling or card-data code.

pub mod secret_file;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
