//! The servers' own TLS accept loop, with limits. tonic's runs every TLS handshake in an
//! unbounded set and caps nothing, so a peer opening connections that never finish the
//! handshake, or authenticated ones left idle, could take every file descriptor and
//! keep real callers out. Here, per listener:
//!
//! - at most `max_handshakes` handshakes are in progress: a new connection beyond that
//!   closes the oldest one still in its handshake (a real client finishes in
//!   milliseconds; a stalled one is the oldest), and each has `handshake_timeout`;
//! - at most `max_connections` connections are established: a new one beyond that
//!   closes the connection idle the longest, and is refused only if every connection
//!   has a call in flight;
//! - a connection with no call in flight for `idle` is closed.
//!
//! Each accepted socket gets TCP_NODELAY: without it Nagle's algorithm meets the peer's
//! delayed ACKs, and a small response written in two segments waited about 40 ms (every
//! benchmark scenario's p99.9, and the whole time of a TokenizeBatch call). The
//! caller's identity is parsed once per connection from its verified certificate
//! ([`Peer`], in every request's extensions), not once per call.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::shutdown::Shutdown;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_handshakes: 128,
            handshake_timeout: Duration::from_secs(10),
            idle: Duration::from_secs(300),
        }
    }
}

/// Who is at the other end of a connection: in the extensions of every request on it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// From the verified client certificate (see [`crate::tls::identity_of_certificate`]);
    /// `None`: no usable identity (deny).
    pub identity: Option<String>,
    activity: Arc<Activity>,
}

/// The caller's identity from its verified client certificate (see
/// [`crate::tls::identity_of_certificate`]), parsed once per connection. `None` when
/// the connection carries no certificate or it has no identity (deny).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<&str> {
    request.extensions().get::<Peer>()?.identity.as_deref()
}

/// The caller's address.
pub fn peer_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    Some(request.extensions().get::<Peer>()?.addr)
}

impl Peer {
    /// Marks a call in flight on this connection until the guard is dropped.
    fn busy(&self) -> Busy {
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(&self.activity))
    }
}

/// Calls in flight on a connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Release);
    }

    fn idle_since_ms(&self) -> Option<u64> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| self.last_ms.load(Ordering::Acquire))
    }
}

#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The tower layer that counts calls in flight per connection (what "idle" means):
/// `Server::builder().layer(runtime::accept::TrackCallsLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackCallsLayer;

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;

    fn layer(&self, inner: S) -> TrackCalls<S> {
        TrackCalls { inner }
    }
}

/// See [`TrackCallsLayer`].
#[derive(Debug, Clone)]
pub struct TrackCalls<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for TrackCalls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<TrackedBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let busy = request.extensions().get::<Peer>().map(Peer::busy);
        // The clone that was made ready is the one called (tower's rule).
        let mut inner = self.inner.clone();
        std::mem::swap(&mut self.inner, &mut inner);
        let call = inner.call(request);
        // Busy until the answer's body has been sent (a server stream, such as the
        // vaults' key watch, is a call in flight for as long as it lasts).
        Box::pin(async move {
            let answered = call.await?;
            Ok(answered.map(|inner| TrackedBody { inner, busy }))
        })
    }
}

/// A response body that keeps its call counted as in flight until it ends.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    busy: Option<Busy>,
}

impl<B: http_body::Body + Unpin> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connections and handshakes of one listener.
#[derive(Debug)]
struct Table {
    epoch: Instant,
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    next_id: u64,
    /// Handshakes in progress, oldest first (ids grow): dropping the sender stops one.
    handshakes: BTreeMap<u64, oneshot::Sender<()>>,
    connections: HashMap<u64, Established>,
}

#[derive(Debug)]
struct Established {
    activity: Arc<Activity>,
    /// Sending (or dropping) closes the connection.
    close: oneshot::Sender<()>,
}

impl Table {
    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a handshake, stopping the oldest one when `max` are in progress.
    fn start_handshake(&self, max: usize) -> (u64, oneshot::Receiver<()>) {
        let mut entries = self.entries();
        while entries.handshakes.len() >= max.max(1) {
            // Dropping its sender stops it.
            entries.handshakes.pop_first();
        }
        let id = entries.next_id;
        entries.next_id += 1;
        let (stop, stopped) = oneshot::channel();
        entries.handshakes.insert(id, stop);
        (id, stopped)
    }

    fn end_handshake(&self, id: u64) {
        self.entries().handshakes.remove(&id);
    }

    /// Registers an established connection, closing the one idle the longest when
    /// `max` are open; `None` when every one has a call in flight.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Activity>, oneshot::Receiver<()>)> {
        let mut entries = self.entries();
        if entries.connections.len() >= max.max(1) {
            let idlest = entries
                .connections
                .iter()
                .filter_map(|(id, c)| Some((c.activity.idle_since_ms()?, *id)))
                .min()?;
            if let Some(closed) = entries.connections.remove(&idlest.1) {
                let _ = closed.close.send(());
            }
        }
        let activity = Arc::new(Activity {
            epoch: self.epoch,
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        });
        activity.touch();
        let id = entries.next_id;
        entries.next_id += 1;
        let (close, closed) = oneshot::channel();
        entries.connections.insert(
            id,
            Established {
                activity: Arc::clone(&activity),
                close,
            },
        );
        Some((id, activity, closed))
    }

    fn remove(&self, id: u64) {
        self.entries().connections.remove(&id);
    }

    /// Closes every connection with no call in flight for `idle`.
    fn close_idle(&self, idle: Duration) -> usize {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle = idle.as_millis() as u64;
        let mut entries = self.entries();
        let before = entries.connections.len();
        entries.connections.retain(|_, c| {
            c.activity
                .idle_since_ms()
                .is_none_or(|since| now.saturating_sub(since) < idle)
        });
        before - entries.connections.len()
    }
}

/// An established connection, as tonic serves it.
#[derive(Debug)]
pub struct Conn {
    io: TlsStream<TcpStream>,
    peer: Peer,
    id: u64,
    table: Arc<Table>,
    closed: oneshot::Receiver<()>,
    closing: bool,
    /// Whether the first write since the last flush has yielded once already (see
    /// `poll_write`).
    yielded: bool,
}

impl Conn {
    /// Whether the table closed this connection (idle, or the idlest at the cap): then
    /// reads end and writes fail, and the HTTP/2 server lets the connection go.
    fn closing(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closing && Pin::new(&mut self.closed).poll(cx).is_ready() {
            self.closing = true;
        }
        self.closing
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.remove(self.id);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.closing(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.closing(cx) {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into()));
        }
        // The first write after a flush waits one turn of the scheduler. Each answer
        // finishes in its own task, which wakes the connection's task; tokio runs a
        // task woken that way next, so without the wait every answer would go out as
        // its own TLS record and system call. A task that wakes itself goes to the
        // back of the queue instead: the answers finished meanwhile (a whole group
        // commit's) are buffered by then and leave together.
        if !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if flushed.is_ready() {
            this.yielded = false;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The accept loop of a listener, running.
#[derive(Debug)]
pub struct Listening(tokio::task::JoinHandle<()>);

impl Listening {
    /// Waits until the listener is closed (after `shutdown`): a server restarted on the
    /// same port right after finds it free.
    pub async fn closed(self) {
        let _ = self.0.await;
    }

    /// Closes the listener now (the server failed before any shutdown).
    pub fn abort(self) {
        self.0.abort();
    }
}

/// Accepts on `listener` until `shutdown`: the established connections, for tonic's
/// `serve_with_incoming_shutdown`, and the loop (see [`Listening::closed`]).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    shutdown: Shutdown,
) -> (ReceiverStream<std::io::Result<Conn>>, Listening) {
    let (sender, receiver) = mpsc::channel(64);
    let table = Arc::new(Table {
        epoch: Instant::now(),
        inner: Mutex::new(Entries::default()),
    });
    tokio::spawn(close_idle(
        Arc::clone(&table),
        limits.idle,
        shutdown.clone(),
    ));
    let accepting = tokio::spawn(accept(
        listener,
        TlsAcceptor::from(tls),
        limits,
        table,
        sender,
        shutdown,
    ));
    (ReceiverStream::new(receiver), Listening(accepting))
}

/// Closes idle connections every so often; at shutdown, stops the handshakes in
/// progress and closes every connection as soon as it has no call in flight (a peer
/// that never sends a request would otherwise hold a graceful shutdown forever).
async fn close_idle(table: Arc<Table>, idle: Duration, shutdown: Shutdown) {
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let closed = table.close_idle(idle);
                if closed > 0 {
                    tracing::debug!(closed, "idle connections closed");
                }
            }
            () = &mut stop => break,
        }
    }
    table.entries().handshakes.clear();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    loop {
        table.close_idle(Duration::ZERO);
        if table.entries().connections.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            // Streams that never end by themselves (a health watch) would hold the
            // shutdown forever.
            let mut entries = table.entries();
            tracing::warn!(
                connections = entries.connections.len(),
                "shutting down: closing connections still busy after the grace period"
            );
            for (_, connection) in entries.connections.drain() {
                let _ = connection.close.send(());
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a shutdown waits for calls in flight before closing their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Limits,
    table: Arc<Table>,
    sender: mpsc::Sender<std::io::Result<Conn>>,
    shutdown: Shutdown,
) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close first.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut stop => return,
            () = sender.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (id, stopped) = table.start_handshake(limits.max_handshakes);
        let (acceptor, table, sender) = (acceptor.clone(), Arc::clone(&table), sender.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
            let tls = tokio::select! {
                done = handshake => done,
                // Stopped for a newer one (or the listener is gone).
                _ = stopped => return,
            };
            table.end_handshake(id);
            let Ok(Ok(io)) = tls else {
                return;
            };
            let identity = io
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| crate::tls::identity_of_certificate(leaf.as_ref()));
            let Some((id, activity, closed)) = table.admit(limits.max_connections) else {
                tracing::warn!(
                    max = limits.max_connections,
                    "connection refused: every connection has a call in flight"
                );
                return;
            };
            let conn = Conn {
                io,
                peer: Peer {
                    addr,
                    identity,
                    activity,
                },
                id,
                table,
                closed,
                closing: false,
                yielded: false,
            };
            let _ = sender.send(Ok(conn)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            epoch: Instant::now(),
            inner: Mutex::new(Entries::default()),
        }
    }

    #[test]
    fn the_oldest_handshake_makes_way_for_a_new_one() {
        let table = table();
        let (_, mut first) = table.start_handshake(2);
        let (second_id, mut second) = table.start_handshake(2);
        let (_, mut third) = table.start_handshake(2);
        assert!(
            first
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(second.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        table.end_handshake(second_id);
        assert_eq!(table.entries().handshakes.len(), 1);
        assert_eq!(third.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    }

    fn busy(activity: Arc<Activity>) -> Busy {
        Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            identity: None,
            activity,
        }
        .busy()
    }

    #[test]
    fn at_the_cap_the_idlest_connection_goes_and_busy_ones_stay() {
        let table = table();
        let (_, first, mut first_closed) = table.admit(2).unwrap();
        let first_busy = busy(first);
        let (_, _, mut idle_closed) = table.admit(2).unwrap();
        // Full: the idle one makes way, the busy one stays.
        let (_, third, mut third_closed) = table.admit(2).unwrap();
        assert_eq!(idle_closed.try_recv(), Ok(()));
        assert_eq!(
            first_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        // With every connection busy, a new one is refused.
        let third_busy = busy(third);
        assert!(table.admit(2).is_none());
        assert_eq!(table.close_idle(Duration::ZERO), 0, "busy is never idle");
        drop((first_busy, third_busy));
        assert_eq!(
            third_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(table.close_idle(Duration::from_secs(60)), 0);
        assert_eq!(table.close_idle(Duration::ZERO), 2);
        assert!(table.entries().connections.is_empty());
    }
}
