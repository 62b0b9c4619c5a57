//! The controller port: its own accept loop in front of the gRPC services, so that nobody can
//! hold the controller's memory or file descriptors without a certificate.
//!
//! A connection is counted against `[connections] max` and `max_per_ip` (an IPv4 address or
//! an IPv6 /64) from accept; its TLS handshake must finish within `handshake_timeout`. A
//! session without a client certificate then also takes an unauthenticated slot (`max_unauth‑
//! enticated`, `max_unauthenticated_per_ip`), may only call Enrollment, gets small HTTP/2
//! windows and few streams, and is closed after `unauthenticated_lifetime`. Every connection is
//! closed when its first request's headers do not arrive within `first_request_timeout`, and
//! once no request has been open on it for `idle_timeout` (an agent's session is one long
//! request, so a connected agent is never idle). A request a connection's certificate may not
//! make is refused from its headers, before any of its body is read. At start the caps are
//! lowered to fit RLIMIT_NOFILE ([`fit_to_nofile`]); on shutdown every connection gets a
//! graceful close and whatever is still open after the grace period is cut.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use drover_identity::Identity;
use drover_identity::pki::CertInfo;
use hyper::body::{Body as HttpBody, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::auth::{self, Access};
use crate::config::ConnectionsConfig;
use crate::enrollment::{LogWindow, Verdict};

/// File descriptors kept for everything but client connections (the store, logs, outgoing
/// webhook and SMTP connections, the listener, an accept that is refused at once).
pub const FD_RESERVE: u64 = 128;
/// The fewest client connections the controller starts with.
pub const MIN_CONNECTIONS: u64 = 64;
/// How long a connection being closed (idle, too old, unauthenticated) has to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// How long to wait after a failed accept (out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The largest message each service takes: Enrollment carries a CSR and a token; operator
/// requests carry at most an app spec or a backup target; an agent's events carry log tails,
/// release tables and backup catalogs.
pub const ENROLLMENT_MAX_MESSAGE: usize = 64 * 1024;
pub const OPERATOR_MAX_MESSAGE: usize = 1024 * 1024;
pub const SESSION_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// The caps and timeouts in force: `[connections]` fitted to the file descriptor limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max: usize,
    pub max_per_ip: usize,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_ip: usize,
    pub handshake_timeout: Duration,
    pub first_request_timeout: Duration,
    pub idle_timeout: Duration,
    pub unauthenticated_lifetime: Duration,
}

/// The open-file limit leaves no room for even [`MIN_CONNECTIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the file descriptor limit (RLIMIT_NOFILE) is {nofile}, too low for the controller: it needs at least {}; raise LimitNOFILE in the unit (or `ulimit -n`)",
    MIN_CONNECTIONS + FD_RESERVE
)]
pub struct NofileTooLow {
    pub nofile: u64,
}

/// The pure rule: the configured caps, lowered so that every connection fits under `nofile`
/// (the soft RLIMIT_NOFILE) with [`FD_RESERVE`] descriptors to spare. Returns the limits and,
/// when something was lowered, a sentence saying so; an error when even [`MIN_CONNECTIONS`]
/// do not fit.
pub fn fit_to_nofile(
    config: &ConnectionsConfig,
    nofile: u64,
) -> Result<(Limits, Option<String>), NofileTooLow> {
    let room = nofile.saturating_sub(FD_RESERVE);
    if room < MIN_CONNECTIONS {
        return Err(NofileTooLow { nofile });
    }
    let max = config.max.min(room);
    let note = (max < config.max).then(|| {
        format!(
            "[connections] max = {} does not fit the file descriptor limit (RLIMIT_NOFILE) of {nofile}: serving at most {max} connections; raise LimitNOFILE to allow more",
            config.max
        )
    });
    let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok((
        Limits {
            max: to_usize(max),
            max_per_ip: to_usize(config.max_per_ip.min(max)),
            max_unauthenticated: to_usize(config.max_unauthenticated.min(max)),
            max_unauthenticated_per_ip: to_usize(config.max_unauthenticated_per_ip.min(max)),
            handshake_timeout: config.handshake_timeout,
            first_request_timeout: config.first_request_timeout,
            idle_timeout: config.idle_timeout,
            unauthenticated_lifetime: config.unauthenticated_lifetime,
        },
        note,
    ))
}

/// Whom connections from `ip` are counted with: an IPv4 address (an IPv4-mapped IPv6 address
/// is one), or the /64 of an IPv6 address (one host or LAN usually has a whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
    }
}

/// Why a connection was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerSource,
}

/// Connections held, in total and per source, against two caps. The pure part of the slots.
#[derive(Debug, Default)]
pub struct Counter {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl Counter {
    /// Takes a slot for `source` unless a cap is reached.
    pub fn take(&mut self, source: IpAddr, max: usize, max_per: usize) -> Result<(), Refusal> {
        if self.total >= max {
            return Err(Refusal::Total);
        }
        let held = self.per_source.entry(source).or_default();
        if *held >= max_per {
            return Err(Refusal::PerSource);
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    pub fn give_back(&mut self, source: IpAddr) {
        if let Some(held) = self.per_source.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                self.per_source.remove(&source);
            }
            self.total -= 1;
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn of(&self, source: IpAddr) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }
}

/// A shared [`Counter`] with its caps.
#[derive(Debug)]
struct Pool {
    what: &'static str,
    max: usize,
    max_per: usize,
    counter: Mutex<Counter>,
    refusals: Mutex<LogWindow>,
}

impl Pool {
    fn new(what: &'static str, max: usize, max_per: usize) -> Arc<Pool> {
        Arc::new(Pool {
            what,
            max,
            max_per,
            counter: Mutex::default(),
            refusals: Mutex::default(),
        })
    }

    fn take(self: &Arc<Pool>, source: IpAddr) -> Result<Slot, Refusal> {
        let mut counter = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        counter.take(source, self.max, self.max_per)?;
        Ok(Slot {
            pool: self.clone(),
            source,
        })
    }

    /// Logs a refused connection, at most a few lines a minute.
    fn log_refusal(&self, peer: SocketAddr, refusal: Refusal) {
        let verdict = match self.refusals.lock() {
            Ok(mut window) => window.admit(crate::shared::now_ms(), &peer.to_string()),
            Err(_) => return,
        };
        let cap = match refusal {
            Refusal::Total => format!("{} ({})", self.max, self.what),
            Refusal::PerSource => format!("{} ({} per source)", self.max_per, self.what),
        };
        match verdict {
            Verdict::Log { unlogged, sources } => {
                if unlogged > 0 {
                    warn!(refused = unlogged, sources = ?sources, "connections refused at a cap and not logged in the last minute (rate limit)");
                }
                warn!(source = %peer, cap = %cap, "connection refused: too many connections; see [connections] in the controller config");
            }
            Verdict::LimitReached => warn!(
                source = %peer, cap = %cap,
                "connection refused: too many connections; further refusals this minute are counted, not logged"
            ),
            Verdict::Quiet => {}
        }
    }
}

/// One connection's place in a [`Pool`], given back when dropped.
#[derive(Debug)]
struct Slot {
    pool: Arc<Pool>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counter = self.pool.counter.lock().unwrap_or_else(|e| e.into_inner());
        counter.give_back(self.source);
    }
}

/// Who is on the other end of a connection, from its client certificate (checked against the
/// CA by the handshake; revocation is checked per request by `auth::caller`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// No client certificate, or one without a Drover identity.
    Unauthenticated,
    Authenticated(Identity),
}

impl Peer {
    fn from_certs(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Peer {
        certs
            .and_then(|certs| certs.first())
            .and_then(|leaf| CertInfo::from_der(leaf).ok())
            .and_then(|info| info.identity)
            .map_or(Peer::Unauthenticated, Peer::Authenticated)
    }
}

/// The pure rule, applied to a request's headers before its body is read: may `peer` call
/// `path`? By the authorization table, `auth::RPCS`: Enrollment is open to all; every other
/// RPC needs a certificate that permits its entry (the agent service, an operator, an admin).
/// Paths not in the table are the router's to answer ("unimplemented") once a certificate is
/// shown.
pub fn admit(peer: &Peer, path: &str) -> Result<(), Status> {
    let access = auth::access_of(path);
    if access == Some(Access::Open) {
        return Ok(());
    }
    let identity = match peer {
        Peer::Authenticated(identity) => identity,
        Peer::Unauthenticated => {
            return Err(Status::unauthenticated(format!(
                "{}; a connection without one may only call Enrollment",
                auth::NO_CLIENT_CERT
            )));
        }
    };
    match access {
        Some(Access::Only(need)) => auth::permits(identity, need).map_err(Status::from),
        _ => Ok(()),
    }
}

/// HTTP/2 settings by who is connected: small before authentication, enough for the largest
/// message after. The most a connection buffers is about streams x the message size of its
/// service plus the connection window.
fn http2_builder(peer: &Peer) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let (streams, stream_window, conn_window, send_buf, header_list) = match peer {
        Peer::Unauthenticated => (2, 64 * 1024, 64 * 1024, 64 * 1024, 8 * 1024),
        Peer::Authenticated(Identity::Agent { .. }) => {
            (8, 1024 * 1024, 2 * 1024 * 1024, 400 * 1024, 16 * 1024)
        }
        Peer::Authenticated(Identity::Operator { .. }) => {
            (32, 1024 * 1024, 2 * 1024 * 1024, 400 * 1024, 16 * 1024)
        }
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(streams)
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(conn_window)
        .adaptive_window(false)
        .max_frame_size(16 * 1024)
        .max_header_list_size(header_list)
        .max_send_buf_size(send_buf)
        .max_pending_accept_reset_streams(16)
        .max_local_error_reset_streams(64)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// Open requests on a connection and how many were ever started, for the idle timer.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    open: usize,
    started: u64,
}

#[derive(Debug, Clone)]
struct Activity(Arc<watch::Sender<Load>>);

impl Activity {
    fn start(&self) -> Busy {
        self.0.send_modify(|l| {
            l.open += 1;
            l.started += 1;
        });
        Busy(self.clone())
    }
}

/// Held while a request (its response body included) is open.
#[derive(Debug)]
struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.send_modify(|l| l.open -= 1);
    }
}

/// Resolves when the connection has had no open request for `idle` (or, before its first
/// request, for `first`).
async fn idle(mut load: watch::Receiver<Load>, first: Duration, idle: Duration) {
    let mut limit = first;
    loop {
        let (open, seen) = {
            let l = load.borrow_and_update();
            (l.open, l.started)
        };
        if open > 0 {
            // The borrow the wait returns is dropped with the condition: it must not live
            // across an await.
            if load.wait_for(|l| l.open == 0).await.is_err() {
                return std::future::pending().await;
            }
            limit = idle;
            continue;
        }
        let woke = tokio::time::timeout(limit, load.wait_for(|l| l.open > 0 || l.started != seen))
            .await
            .map(|r| r.is_ok());
        match woke {
            Err(_) => return,
            Ok(false) => return std::future::pending().await,
            Ok(true) => limit = idle,
        }
    }
}

/// A response body that keeps its request counted as open until it is finished or dropped.
struct Counted {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Counted {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;

/// The services as one connection sees them: requests its peer may not make are answered at
/// once; the others get the connection's info (peer certificates, remote address) for
/// `Request::peer_certs` and `Request::remote_addr`, and count as activity.
#[derive(Clone)]
struct ConnService {
    routes: Routes,
    peer: Arc<Peer>,
    info: ConnectInfo,
    activity: Activity,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = hyper::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        let busy = self.activity.start();
        if let Err(status) = admit(&self.peer, request.uri().path()) {
            debug!(path = %request.uri().path(), code = ?status.code(), "request refused from its headers");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        request.extensions_mut().insert(self.info.clone());
        let path = auth::RpcPath(request.uri().path().to_string());
        request.extensions_mut().insert(path);
        let routes = self.routes.clone();
        Box::pin(async move {
            let response = routes.oneshot(request.map(Body::new)).await?;
            Ok(response.map(|inner| Body::new(Counted { inner, _busy: busy })))
        })
    }
}

/// What every connection task shares.
struct Port {
    acceptor: TlsAcceptor,
    routes: Routes,
    limits: Limits,
    unauthenticated: Arc<Pool>,
    shutdown: CancellationToken,
    cut: CancellationToken,
}

/// Serves `routes` on `listener` with TLS from `tls` until `shutdown` fires; then closes every
/// connection gracefully, cuts what is still open after `grace`, and returns once every
/// connection task has ended. The accept loop beats `beat` every few seconds, so a loop that
/// hangs stops the watchdog's pings.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    routes: Routes,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
    beat: drover_daemon::Heartbeat,
) {
    let all = Pool::new("connections", limits.max, limits.max_per_ip);
    let port = Arc::new(Port {
        acceptor: TlsAcceptor::from(tls),
        routes,
        unauthenticated: Pool::new(
            "connections without a client certificate",
            limits.max_unauthenticated,
            limits.max_unauthenticated_per_ip,
        ),
        limits,
        shutdown: shutdown.clone(),
        cut: CancellationToken::new(),
    });
    let tasks = TaskTracker::new();
    let mut accept_errors = LogWindow::default();
    let mut beat_tick = drover_daemon::beat_ticker();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = beat_tick.tick() => {
                beat.beat();
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors (EMFILE) or an aborted connection: wait a moment
                // rather than spin.
                if accept_errors.admit(crate::shared::now_ms(), "accept") != Verdict::Quiet {
                    warn!(error = %err, "could not accept a connection");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let slot = match all.take(source_of(peer.ip())) {
            Ok(slot) => slot,
            Err(refusal) => {
                all.log_refusal(peer, refusal);
                drop(tcp);
                continue;
            }
        };
        tasks.spawn(connection(port.clone(), tcp, peer, slot));
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(
            open = tasks.len(),
            "connections still open after the grace period; closing them"
        );
        port.cut.cancel();
        tasks.wait().await;
    }
}

/// One connection, from its handshake to its close.
async fn connection(port: Arc<Port>, tcp: TcpStream, remote: SocketAddr, _slot: Slot) {
    let _ = tcp.set_nodelay(true);
    let limits = &port.limits;
    let handshake = tokio::select! {
        _ = port.shutdown.cancelled() => return,
        r = tokio::time::timeout(limits.handshake_timeout, port.acceptor.accept(tcp)) => r,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            debug!(source = %remote, error = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(source = %remote, timeout = ?limits.handshake_timeout, "TLS handshake not finished in time; closing");
            return;
        }
    };
    let peer = Peer::from_certs(tls.get_ref().1.peer_certificates());
    let _unauthenticated_slot = match peer {
        Peer::Unauthenticated => match port.unauthenticated.take(source_of(remote.ip())) {
            Ok(slot) => Some(slot),
            Err(refusal) => {
                port.unauthenticated.log_refusal(remote, refusal);
                return;
            }
        },
        Peer::Authenticated(_) => None,
    };
    let info = tls.connect_info();
    let (load, load_rx) = watch::channel(Load::default());
    let service = ConnService {
        routes: port.routes.clone(),
        peer: Arc::new(peer.clone()),
        info,
        activity: Activity(Arc::new(load)),
    };
    let builder = http2_builder(&peer);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let idle = idle(load_rx, limits.first_request_timeout, limits.idle_timeout);
    tokio::pin!(idle);
    let lifetime = async {
        match peer {
            Peer::Unauthenticated => tokio::time::sleep(limits.unauthenticated_lifetime).await,
            Peer::Authenticated(_) => std::future::pending().await,
        }
    };
    tokio::pin!(lifetime);
    // Once a graceful close has begun, the connection gets CLOSE_GRACE to finish (on shutdown,
    // the server's own grace period and then `cut`).
    let mut closing = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let cut_at = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let reason = tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    debug!(source = %remote, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = port.cut.cancelled() => return,
            _ = cut_at => {
                debug!(source = %remote, "connection did not close in time; cutting it");
                return;
            }
            _ = &mut idle, if !closing => Closing::Idle,
            _ = &mut lifetime, if !closing => Closing::Lifetime,
            _ = port.shutdown.cancelled(), if !closing => Closing::Shutdown,
        };
        debug!(source = %remote, reason = reason.as_str(), "closing connection");
        conn.as_mut().graceful_shutdown();
        closing = true;
        if reason != Closing::Shutdown {
            deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
        }
    }
}

/// Why the controller closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Idle,
    Lifetime,
    Shutdown,
}

impl Closing {
    fn as_str(self) -> &'static str {
        match self {
            Closing::Idle => "idle",
            Closing::Lifetime => "a connection without a client certificate reached its lifetime",
            Closing::Shutdown => "controller shutting down",
        }
    }
}

/// Logs the limits in force at start.
pub fn log_limits(limits: &Limits, nofile: u64, note: Option<&str>) {
    if let Some(note) = note {
        warn!("{note}");
    }
    info!(
        nofile,
        max = limits.max,
        max_per_ip = limits.max_per_ip,
        max_unauthenticated = limits.max_unauthenticated,
        max_unauthenticated_per_ip = limits.max_unauthenticated_per_ip,
        "connection limits"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_identity::Role;

    #[test]
    fn caps_are_lowered_to_fit_the_file_descriptor_limit() {
        let config = ConnectionsConfig::default();
        let (limits, note) = fit_to_nofile(&config, 65_536).unwrap();
        assert_eq!(limits.max, 16_384);
        assert_eq!(limits.max_per_ip, 1024);
        assert!(note.is_none());
        // The old unit's default soft limit: every cap fits, and the log says so.
        let (limits, note) = fit_to_nofile(&config, 1024).unwrap();
        assert_eq!(limits.max, 1024 - FD_RESERVE as usize);
        assert_eq!(limits.max_per_ip, 1024 - FD_RESERVE as usize);
        assert_eq!(limits.max_unauthenticated, 512);
        assert_eq!(limits.max_unauthenticated_per_ip, 64);
        let note = note.unwrap();
        assert!(
            note.contains("RLIMIT_NOFILE") && note.contains("LimitNOFILE"),
            "{note}"
        );
        let (limits, _) = fit_to_nofile(&config, 300).unwrap();
        assert_eq!(limits.max_unauthenticated, 172);
        let err = fit_to_nofile(&config, 150).unwrap_err().to_string();
        assert!(err.contains("150") && err.contains("LimitNOFILE"), "{err}");
        assert!(fit_to_nofile(&config, u64::MAX).is_ok());
    }

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(source_of(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_of(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb:cccc:dddd:eeee".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(a), source_of(b));
        assert_eq!(source_of(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(source_of(a), source_of(c));
    }

    #[test]
    fn the_counter_holds_both_caps_and_gives_slots_back() {
        let mut c = Counter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(c.take(a, 3, 2), Ok(()));
        assert_eq!(c.take(a, 3, 2), Ok(()));
        assert_eq!(c.take(a, 3, 2), Err(Refusal::PerSource));
        assert_eq!(c.take(b, 3, 2), Ok(()));
        assert_eq!(c.take(b, 3, 2), Err(Refusal::Total));
        assert_eq!((c.total(), c.of(a), c.of(b)), (3, 2, 1));
        c.give_back(a);
        assert_eq!(c.take(b, 3, 2), Ok(()));
        c.give_back(a);
        c.give_back(b);
        c.give_back(b);
        assert_eq!((c.total(), c.of(a), c.of(b)), (0, 0, 0));
        // A source never counted gives nothing back.
        c.give_back(a);
        assert_eq!(c.total(), 0);
    }

    #[test]
    fn a_connection_without_a_certificate_may_only_enroll() {
        let none = Peer::Unauthenticated;
        let agent = Peer::Authenticated(Identity::Agent {
            host: "web-1".into(),
        });
        let viewer = Peer::Authenticated(Identity::Operator {
            name: "vic".into(),
            role: Role::Viewer,
        });
        let enroll = "/drover.v1.Enrollment/Enroll";
        let session = "/drover.v1.AgentService/Session";
        let hosts = "/drover.v1.OperatorService/ListHosts";
        assert!(admit(&none, enroll).is_ok());
        assert!(admit(&none, "/drover.v1.Enrollment/Reenroll").is_ok());
        for path in [session, hosts, "/other.Service/X", "/", ""] {
            let status = admit(&none, path).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{path}");
            assert!(
                status.message().contains("no client certificate")
                    && status.message().contains("Enrollment"),
                "{}",
                status.message()
            );
        }
        assert!(admit(&agent, session).is_ok());
        assert!(admit(&agent, enroll).is_ok());
        let status = admit(&agent, hosts).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status
                .message()
                .contains("agent web-1 may not call the operator API")
        );
        assert!(admit(&viewer, hosts).is_ok());
        assert_eq!(
            admit(&viewer, session).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // Unknown services are the router's to answer.
        assert!(admit(&viewer, "/other.Service/X").is_ok());
    }

    #[tokio::test]
    async fn idle_counts_from_the_last_open_request() {
        let ms = Duration::from_millis;
        let within = |elapsed: Duration, expected: Duration| {
            assert!(
                elapsed >= expected && elapsed < expected + ms(1500),
                "{elapsed:?}, expected {expected:?}"
            );
        };
        let (tx, rx) = watch::channel(Load::default());
        let activity = Activity(Arc::new(tx));
        // No request at all: the first-request timeout.
        let started = tokio::time::Instant::now();
        idle(rx.clone(), ms(200), ms(1000)).await;
        within(started.elapsed(), ms(200));
        // A request open for 1.5 s, then 1 s idle.
        let started = tokio::time::Instant::now();
        let busy = activity.start();
        let waiter = tokio::spawn(idle(rx.clone(), ms(200), ms(1000)));
        tokio::time::sleep(ms(1500)).await;
        assert!(!waiter.is_finished());
        drop(busy);
        waiter.await.unwrap();
        within(started.elapsed(), ms(2500));
        // A request that started and ended between two looks still counts.
        let started = tokio::time::Instant::now();
        let waiter = tokio::spawn(idle(rx, ms(200), ms(1000)));
        tokio::time::sleep(ms(100)).await;
        drop(activity.start());
        waiter.await.unwrap();
        within(started.elapsed(), ms(1100));
    }
}
