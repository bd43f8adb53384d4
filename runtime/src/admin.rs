//! The plain-HTTP admin port both servers run beside their gRPC listener:
//! `GET /metrics` (Prometheus text, from prometheus-client) and `GET /healthz`.
//!
//! It serves what the server's [`Observed`] implementation returns and nothing else:
//! no request reaches the server's own logic, so the port holds no card data and no
//! key material. Keep it on loopback or a monitoring network all the same. A scraper
//! needs one short connection at a time: at most [`MAX_CONNECTIONS`] are served at
//! once (more are closed at once), each gets [`HEADER_TIMEOUT`] to send its request
//! and [`CONNECTION_TIMEOUT`] in all, and none is kept alive.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tonic::Code;

use crate::shutdown::Shutdown;

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a connection has to send its request headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Time a connection may last.
pub const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the admin endpoint asks the server at each request.
pub trait Observed: Send + Sync + 'static {
    /// Refreshes the gauges and returns the metrics (text exposition format).
    fn metrics(&self) -> String;
    /// `(serving, detail)`: not serving is 503; serving but degraded is 200 with detail.
    fn health(&self) -> (bool, String);
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

/// The RPC series both servers export: `<prefix>_rpc_calls_total{method,code}` and
/// `<prefix>_rpc_seconds{method}`.
#[derive(Debug)]
pub struct RpcMetrics {
    calls: prometheus_client::metrics::family::Family<
        CallLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    latency: prometheus_client::metrics::family::Family<
        MethodLabels,
        prometheus_client::metrics::histogram::Histogram,
    >,
}

fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    // 100 µs to about 13 s.
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
    )
}

impl RpcMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            calls: Default::default(),
            latency: prometheus_client::metrics::family::Family::new_with_constructor(
                latency_histogram as fn() -> prometheus_client::metrics::histogram::Histogram,
            ),
        };
        registry.register(
            "rpc_calls",
            "RPCs answered, by method and status code",
            metrics.calls.clone(),
        );
        registry.register(
            "rpc_seconds",
            "RPC latency in seconds, by method",
            metrics.latency.clone(),
        );
        metrics
    }

    /// Counts one answered call (code "ok" or the gRPC code's name) and its latency.
    pub fn call(&self, method: &'static str, code: Code, elapsed: std::time::Duration) {
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
        let code = match code {
            Code::Ok => "ok",
            code => code_name(code),
        };
        self.calls.get_or_create(&CallLabels { method, code }).inc();
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, server: Arc<dyn Observed>, shutdown: Shutdown) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin port accept failed");
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(max = MAX_CONNECTIONS, "admin port busy: connection closed");
            continue;
        };
        // Small answers, written whole: nothing to gain from Nagle's delay.
        let _ = stream.set_nodelay(true);
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let server = Arc::clone(&server);
                async move { Ok::<_, Infallible>(answer(&request, server.as_ref())) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

fn answer(request: &Request<Incoming>, server: &dyn Observed) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/metrics") => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            server.metrics(),
        ),
        ("GET", "/healthz") => {
            let (serving, detail) = server.health();
            let status = if serving {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "text/plain; charset=utf-8", format!("{detail}\n"))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
    }
}

/// The canonical name of a gRPC status code (`PERMISSION_DENIED`), for metric labels
/// and audit outcomes.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
