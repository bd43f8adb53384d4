//! What both servers need around their own logic: mutual TLS configuration and the
//! caller's identity, telemetry set-up, shutdown signals, reading secret files, the
//! plain-HTTP admin port (`/metrics`, `/healthz`), the gRPC listener (TCP_NODELAY,
//! optional reflection) and process hardening (no core dumps, memory locked against
//! swapping).
//!
//! Must never depend on storage, key handling or card-data code.

pub mod accept;
pub mod admin;
pub mod grpc;
pub mod harden;
pub mod secret_file;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// An error and its causes on one line, for logs: transport errors (tonic, hyper,
/// reqwest) keep the useful part ("Connection refused", "certificate unknown") a few
/// sources down.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Milliseconds since the Unix epoch, the unit of every stored and audited time (a
/// clock set before 1970 reads as 0).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}
