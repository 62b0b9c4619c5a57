//! The built-in HTTP reverse proxy that owns a web app's public address, so a deploy can move
//! traffic from one container to another without a dropped request.
//!
//! Requests go to the current upstream; [`Proxy::switch`] replaces it in one atomic swap and
//! returns the old one, whose in-flight requests and upgraded connections finish
//! ([`Upstream::drain`]). WebSocket upgrades pass through (`wsrelay.rs`); a WebSocket still open
//! when the drain times out gets a close frame (1001, going away) from the proxy, not a bare
//! end of stream. X-Forwarded-For and X-Forwarded-Proto are set. Each upstream counts
//! responses by status class and keeps a latency histogram, which feed the post-deploy watch
//! window and the host's health report. Only what the release did counts against it: answers
//! it gave, and requests it could not answer at all; the proxy's own refusals of malformed
//! requests are counted apart ([`Outcome`]).
//!
//! Client connections are bounded ([`ConnLimits`]): a request head must arrive within
//! `header_timeout`, a connection quiet for `idle_timeout` is closed, and each proxy holds at
//! most `max_connections`, all proxies together at most a budget taken from the process's
//! open-file limit, so slow or idle clients cannot take the descriptors backups and Docker
//! calls need. A connection beyond a limit is answered 503 and closed at once.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HOST, HeaderName, HeaderValue, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

type Body = BoxBody<Bytes, hyper::Error>;

/// Upper bounds of the latency histogram buckets, in milliseconds; the last is "slower".
const BUCKETS_MS: [u64; 16] = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    300,
    500,
    750,
    1000,
    2000,
    5000,
    10_000,
    u64::MAX,
];

/// Counters of one upstream.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests the release answered, plus those it could not answer (`unreachable`).
    pub requests: AtomicU64,
    pub status_2xx: AtomicU64,
    pub status_3xx: AtomicU64,
    pub status_4xx: AtomicU64,
    /// 5xx answers from the app, plus the requests it could not answer (`unreachable`).
    pub status_5xx: AtomicU64,
    /// Requests the release gave no answer to (connection refused or reset, closed without an
    /// answer); the proxy answered 502. Counted as failures of the release: only the release
    /// causes them.
    pub unreachable: AtomicU64,
    /// Requests the proxy refused itself as malformed (a body that broke off, a target it
    /// cannot forward, CONNECT). Never the release's doing, so in neither count above.
    pub client_errors: AtomicU64,
    latency: [AtomicU64; BUCKETS_MS.len()],
}

/// How a forwarded request ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The release answered with this status.
    Answered(StatusCode),
    /// The release gave no answer.
    Unreachable,
    /// The client's request was malformed or broke off; the proxy answered it.
    ClientError,
}

impl Outcome {
    /// Who a failed forward is blamed on. Pure: the client's body broke off (or the request
    /// cannot be forwarded at all) → the client; otherwise the release did not answer.
    pub fn of_failure(client_body_failed: bool) -> Outcome {
        if client_body_failed {
            Outcome::ClientError
        } else {
            Outcome::Unreachable
        }
    }
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub status_5xx: u64,
    /// Upper bound of the bucket holding the 95th percentile, in ms (0 with no requests).
    pub p95_ms: u64,
}

impl StatsSnapshot {
    pub fn ratio_5xx(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.status_5xx as f64 / self.requests as f64
        }
    }
}

impl Stats {
    /// Counts one request by how it ended. Only the release's own answers enter the latency
    /// histogram; a malformed request changes nothing the watch window reads.
    pub fn record(&self, outcome: Outcome, elapsed: Duration) {
        let status = match outcome {
            Outcome::Answered(status) => status,
            Outcome::Unreachable => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.status_5xx.fetch_add(1, Ordering::Relaxed);
                self.unreachable.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Outcome::ClientError => {
                self.client_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let class = match status.as_u16() {
            200..=299 => &self.status_2xx,
            300..=399 => &self.status_3xx,
            400..=499 => &self.status_4xx,
            500..=599 => &self.status_5xx,
            _ => &self.status_2xx,
        };
        class.fetch_add(1, Ordering::Relaxed);
        let ms = elapsed.as_millis() as u64;
        let bucket = BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(BUCKETS_MS.len() - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            status_5xx: self.status_5xx.load(Ordering::Relaxed),
            p95_ms: percentile(&counts, 0.95),
        }
    }
}

/// The bucket bound under which `q` of the samples fall. A pure function of the histogram.
pub fn percentile(counts: &[u64], q: f64) -> u64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return BUCKETS_MS[i.min(BUCKETS_MS.len() - 1)];
        }
    }
    BUCKETS_MS[BUCKETS_MS.len() - 1]
}

/// One backend: a container's published address, with its counters.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// Which release it serves, for logs and reports.
    pub release: String,
    pub stats: Stats,
    inflight: AtomicU64,
    /// Wall-clock time (Unix ms) of the first request sent here; 0 before.
    first_request_unix_ms: AtomicI64,
    /// Upgraded connections (WebSockets) open on this upstream.
    upgrades: Mutex<Upgrades>,
}

/// The upgraded connections of an upstream, each described for the drain's report, and the
/// token that tells them to close (replaced once used, so an upstream that serves again after
/// a switch back keeps its new connections).
#[derive(Debug, Default)]
struct Upgrades {
    next: u64,
    open: BTreeMap<u64, String>,
    close: CancellationToken,
}

/// What a drain found: the requests it waited for and the upgraded connections it had to close.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drained {
    /// Requests still in flight when the drain gave up (they end when the old release stops).
    pub requests_left: u64,
    /// Upgraded connections still open at the drain's timeout, closed by the proxy (WebSockets
    /// with a close frame, 1001), as described by [`Upstream::upgraded`].
    pub closed: Vec<String>,
    /// Of those, how many were still open a moment after the close (then cut).
    pub not_closed: u64,
}

/// At most this many upgraded connections are named in a report line; the rest are counted.
const NAMED_UPGRADES: usize = 5;

/// `what` as a short list: the first few named, the rest counted.
pub fn name_some(what: &[String]) -> String {
    let mut out = what
        .iter()
        .take(NAMED_UPGRADES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if what.len() > NAMED_UPGRADES {
        out.push_str(&format!(" and {} more", what.len() - NAMED_UPGRADES));
    }
    out
}

impl Drained {
    /// Whether everything ended by itself within the timeout.
    pub fn finished(&self) -> bool {
        self.requests_left == 0 && self.closed.is_empty()
    }

    /// The drain step's report: what finished, what was closed, what was left. Pure.
    pub fn describe(&self, timeout: Duration) -> String {
        let mut parts = Vec::new();
        if self.closed.is_empty() && self.requests_left == 0 {
            parts.push("in-flight requests finished".to_string());
        }
        if !self.closed.is_empty() {
            parts.push(format!(
                "{} upgraded connection(s) still open after {}: {}; closed by the proxy \
                 (WebSockets with close code 1001, going away)",
                self.closed.len(),
                humantime::format_duration(timeout),
                name_some(&self.closed)
            ));
        }
        if self.not_closed > 0 {
            parts.push(format!(
                "{} of them did not end after the close and were cut",
                self.not_closed
            ));
        }
        if self.requests_left > 0 {
            parts.push(format!(
                "{} request(s) still in flight after {} (cut when the old release stops)",
                self.requests_left,
                humantime::format_duration(timeout)
            ));
        }
        parts.join("; ")
    }
}

/// Keeps an upgraded connection counted while it is open.
struct UpgradeGuard {
    upstream: Arc<Upstream>,
    id: u64,
}

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        self.upstream.lock_upgrades().open.remove(&self.id);
    }
}

impl Upstream {
    pub fn new(addr: SocketAddr, release: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            addr,
            release: release.to_string(),
            stats: Stats::default(),
            inflight: AtomicU64::new(0),
            first_request_unix_ms: AtomicI64::new(0),
            upgrades: Mutex::new(Upgrades::default()),
        })
    }

    fn lock_upgrades(&self) -> std::sync::MutexGuard<'_, Upgrades> {
        self.upgrades.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The upgraded connections open now, described (`WebSocket /path from ip:port`).
    pub fn upgraded(&self) -> Vec<String> {
        self.lock_upgrades().open.values().cloned().collect()
    }

    /// Counts an upgraded connection as open until the guard drops; returns the token that
    /// tells it to close.
    fn open_upgrade(self: &Arc<Self>, what: String) -> (UpgradeGuard, CancellationToken) {
        let mut upgrades = self.lock_upgrades();
        let id = upgrades.next;
        upgrades.next += 1;
        upgrades.open.insert(id, what);
        let close = upgrades.close.clone();
        drop(upgrades);
        let guard = UpgradeGuard {
            upstream: self.clone(),
            id,
        };
        (guard, close)
    }

    /// Tells every upgraded connection open now to close (a WebSocket gets 1001); connections
    /// upgraded later are not affected.
    pub fn close_upgraded(&self) {
        let mut upgrades = self.lock_upgrades();
        upgrades.close.cancel();
        upgrades.close = CancellationToken::new();
    }

    /// When the first request reached this upstream (Unix ms), if one has.
    pub fn first_request_unix_ms(&self) -> Option<i64> {
        match self.first_request_unix_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(at),
        }
    }

    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Waits until no request is in flight and no upgraded connection is open on this
    /// upstream, or `timeout` passes; then closes the upgraded connections still open (a
    /// WebSocket gets a close frame, 1001) and waits a moment for them to end.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        let deadline = Instant::now() + timeout;
        loop {
            let upgraded = self.lock_upgrades().open.len();
            if self.inflight() == 0 && upgraded == 0 {
                return Drained::default();
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let open = self.lock_upgrades().open.clone();
        let mut not_closed = 0;
        if !open.is_empty() {
            self.close_upgraded();
            let until =
                Instant::now() + crate::wsrelay::CLOSE_DEADLINE + Duration::from_millis(500);
            // Only those open at the close count: later ones (after a switch back) were not told.
            loop {
                not_closed = {
                    let upgrades = self.lock_upgrades();
                    open.keys()
                        .filter(|id| upgrades.open.contains_key(id))
                        .count() as u64
                };
                if not_closed == 0 || Instant::now() >= until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Drained {
            requests_left: self.inflight(),
            closed: open.into_values().collect(),
            not_closed,
        }
    }
}

struct InflightGuard(Arc<Upstream>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Limits on the client connections of a proxy (the agent config's `[proxy]` table).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// A request head (request line and headers) must be complete this long after the
    /// connection opened or its previous response ended; hyper closes it otherwise.
    pub header_timeout: Duration,
    /// A connection with no byte read or written for this long is closed (after the request in
    /// progress, if one is).
    pub idle_timeout: Duration,
    /// Open client connections of one proxy at most (upgraded ones included).
    pub max_connections: usize,
    /// Shared by every proxy of the agent: their connections together, kept well under the
    /// process's open-file limit ([`fd_budget`]).
    pub budget: Arc<Semaphore>,
}

impl ConnLimits {
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

    /// Limits with a budget of `budget` connections shared by every proxy built from clones.
    pub fn new(
        header_timeout: Duration,
        idle_timeout: Duration,
        max_connections: usize,
        budget: usize,
    ) -> ConnLimits {
        ConnLimits {
            header_timeout,
            idle_timeout,
            max_connections,
            budget: Arc::new(Semaphore::new(budget.min(Semaphore::MAX_PERMITS))),
        }
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits::new(
            Self::DEFAULT_HEADER_TIMEOUT,
            Self::DEFAULT_IDLE_TIMEOUT,
            Self::DEFAULT_MAX_CONNECTIONS,
            Self::DEFAULT_MAX_CONNECTIONS,
        )
    }
}

/// How many client connections all proxies together may hold, given the process's open-file
/// limit. Pure. A proxied request holds two descriptors (the client's connection and one to
/// the container), so the budget is half of what is left after a reserve of a quarter of the
/// limit (at least 256) for the store, backups, Docker and PostgreSQL calls; never under 16.
pub fn fd_budget(nofile: u64) -> usize {
    let reserve = (nofile / 4).max(256);
    let budget = nofile.saturating_sub(reserve) / 2;
    usize::try_from(budget.max(16)).unwrap_or(usize::MAX)
}

/// A running proxy for one app.
#[derive(Clone)]
pub struct Proxy {
    current: Arc<RwLock<Option<Arc<Upstream>>>>,
    client: Client<HttpConnector, ClientBody>,
    limits: ConnLimits,
    /// This proxy's share of connections (`max_connections` permits).
    connections: Arc<Semaphore>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.upstream().map(|u| u.addr))
            .finish()
    }
}

impl Default for Proxy {
    fn default() -> Self {
        Self::new()
    }
}

impl Proxy {
    /// A proxy with the default [`ConnLimits`].
    pub fn new() -> Proxy {
        Proxy::with_limits(ConnLimits::default())
    }

    pub fn with_limits(limits: ConnLimits) -> Proxy {
        Proxy {
            current: Arc::new(RwLock::new(None)),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http(),
            connections: Arc::new(Semaphore::new(
                limits.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            limits,
        }
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.limits
            .max_connections
            .min(Semaphore::MAX_PERMITS)
            .saturating_sub(self.connections.available_permits())
    }

    /// The upstream serving now.
    pub fn upstream(&self) -> Option<Arc<Upstream>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends every new request to `next` from now on, in one swap; returns the previous
    /// upstream so the caller can drain it (and keep it warm for a switch back).
    pub fn switch(&self, next: Arc<Upstream>) -> Option<Arc<Upstream>> {
        self.current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(next)
    }

    /// A connection's permits: this proxy's and the agent-wide budget's, or None when either
    /// is used up.
    fn admit(&self) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let own = self.connections.clone().try_acquire_owned().ok()?;
        let shared = self.limits.budget.clone().try_acquire_owned().ok()?;
        Some((own, shared))
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        self.serve_beating(listener, shutdown, None).await
    }

    /// [`Proxy::serve`], beating `beat` every few seconds from the accept loop, so a loop that
    /// hangs stops the watchdog's pings.
    pub async fn serve_beating(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
        beat: Option<drover_daemon::Heartbeat>,
    ) {
        let mut beat_tick = drover_daemon::beat_ticker();
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut last_warned: Option<Instant> = None;
        let mut warn_rarely = |what: &str, detail: String| {
            if last_warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                last_warned = Some(Instant::now());
                warn!(listen = %local, "{what}: {detail}");
            }
        };
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = beat_tick.tick(), if beat.is_some() => {
                    if let Some(beat) = &beat {
                        beat.beat();
                    }
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        // Out of descriptors (EMFILE) and the like: pause instead of spinning;
                        // new connections wait in the kernel's backlog meanwhile.
                        warn_rarely("cannot accept connections", err.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(permits) = self.admit() else {
                warn_rarely(
                    "connection limit reached, refusing new connections",
                    format!(
                        "{} open on this app (proxy.max_connections = {}), {} left for all apps",
                        self.open_connections(),
                        self.limits.max_connections,
                        self.limits.budget.available_permits()
                    ),
                );
                refuse(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(proxy.serve_connection(stream, peer, permits));
        }
    }

    /// Serves one client connection until it ends, is upgraded, or breaks a limit.
    async fn serve_connection(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) {
        let idle_timeout = self.limits.idle_timeout;
        let io = CountedIo::new(stream, permits);
        let activity = io.activity.clone();
        // Requests of this connection whose response is not finished.
        let busy = Arc::new(AtomicUsize::new(0));
        let service = {
            let busy = busy.clone();
            let proxy = self.clone();
            hyper::service::service_fn(move |req| {
                let guard = BusyGuard::new(busy.clone());
                let proxy = proxy.clone();
                async move {
                    let response = proxy.forward(req, peer).await?;
                    Ok::<_, Infallible>(response.map(|inner| {
                        TrackedBody {
                            inner,
                            _guard: guard,
                        }
                        .boxed()
                    }))
                }
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout);
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        let check = tokio::time::sleep(idle_timeout);
        tokio::pin!(check);
        let mut closing = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = check.as_mut() => {
                    let quiet = activity.quiet();
                    if quiet < idle_timeout {
                        check.as_mut().reset(tokio::time::Instant::now() + (idle_timeout - quiet));
                        continue;
                    }
                    if busy.load(Ordering::SeqCst) == 0 {
                        // Nothing in progress: dropping the connection closes it.
                        return;
                    }
                    // A request is in progress (a slow upstream): it finishes, then the
                    // connection closes.
                    if !closing {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    check.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
        }
    }

    async fn forward(
        self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let Some(upstream) = self.upstream() else {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "no release is live for this app\n",
            ));
        };
        if req.method() == Method::CONNECT {
            upstream.stats.record(Outcome::ClientError, Duration::ZERO);
            return Ok(plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "this proxy does not tunnel (CONNECT)\n",
            ));
        }
        let body_failed = Arc::new(AtomicBool::new(false));
        let mut req = req.map(|inner| ClientBody {
            inner,
            failed: body_failed.clone(),
        });
        upstream.inflight.fetch_add(1, Ordering::SeqCst);
        if upstream.first_request_unix_ms.load(Ordering::Relaxed) == 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(1);
            let _ = upstream.first_request_unix_ms.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let guard = InflightGuard(upstream.clone());
        let started = Instant::now();
        set_forwarded(&mut req, peer);
        let mut unforwardable = false;
        let result = if req.headers().contains_key(UPGRADE) {
            upgrade(req, &upstream, peer)
                .await
                .map_err(|e| e.to_string())
        } else {
            let target = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let uri = format!("http://{}{target}", upstream.addr).parse::<hyper::Uri>();
            match uri {
                // Only a path goes after the container's address: `OPTIONS *` would make
                // `http://127.0.0.1:port*`, an address that does not exist.
                Ok(_) if !target.starts_with('/') => {
                    unforwardable = true;
                    Err(format!(
                        "cannot forward the request target {target:?}: only a path can be"
                    ))
                }
                Ok(uri) => {
                    *req.uri_mut() = uri;
                    self.client
                        .request(req)
                        .await
                        .map(|r| r.map(|b| b.boxed()))
                        .map_err(|e| e.to_string())
                }
                Err(e) => {
                    unforwardable = true;
                    Err(format!("cannot forward the request target: {e}"))
                }
            }
        };
        let (outcome, response) = match result {
            Ok(response) => (Outcome::Answered(response.status()), response),
            Err(err) => {
                match Outcome::of_failure(unforwardable || body_failed.load(Ordering::Relaxed)) {
                    Outcome::ClientError if unforwardable => (
                        Outcome::ClientError,
                        plain(StatusCode::BAD_REQUEST, &format!("bad request: {err}\n")),
                    ),
                    Outcome::ClientError => (
                        Outcome::ClientError,
                        plain(
                            StatusCode::BAD_REQUEST,
                            "bad request: the request body broke off\n",
                        ),
                    ),
                    outcome => (
                        outcome,
                        plain(
                            StatusCode::BAD_GATEWAY,
                            &format!("upstream {} failed: {err}\n", upstream.addr),
                        ),
                    ),
                }
            }
        };
        upstream.stats.record(outcome, started.elapsed());
        // The guard lives until the response head is out; a streamed body is not counted.
        drop(guard);
        Ok(response)
    }
}

/// Answers a connection beyond a limit with a 503 and closes it, without waiting on it.
fn refuse(stream: TcpStream) {
    const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
        content-type: text/plain\r\ncontent-length: 34\r\nretry-after: 1\r\n\r\n\
        too many connections to this app\r\n";
    let _ = stream.try_write(REFUSAL);
}

/// The client's request body on its way to the container, remembering whether it broke off
/// (the client sent a malformed body or went away): a forward that fails then is the
/// client's doing, not the release's.
pub struct ClientBody {
    inner: Incoming,
    failed: Arc<AtomicBool>,
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.failed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts a connection's requests whose response is not finished.
struct BusyGuard(Arc<AtomicUsize>);

impl BusyGuard {
    fn new(busy: Arc<AtomicUsize>) -> BusyGuard {
        busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard(busy)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its connection counted busy until it is sent (or dropped).
struct TrackedBody {
    inner: Body,
    _guard: BusyGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// When a connection last moved a byte.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened`.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the connection has been quiet.
    fn quiet(&self) -> Duration {
        let now = self.opened.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A client connection holding its permits: they go back when the socket is dropped, which
/// for an upgraded (WebSocket) connection is when the splice ends.
struct CountedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl CountedIo {
    fn new(stream: TcpStream, permits: (OwnedSemaphorePermit, OwnedSemaphorePermit)) -> CountedIo {
        CountedIo {
            stream,
            activity: Arc::new(Activity {
                opened: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
            _permits: permits,
        }
    }
}

impl AsyncRead for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

fn set_forwarded(req: &mut Request<ClientBody>, peer: SocketAddr) {
    let forwarded_for = match req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(existing) => format!("{existing}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    let headers = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
    }
}

/// How an upgraded connection is named in the drain's report: the protocol, the path (never the
/// query, which may carry a token) and the client.
pub fn describe_upgrade(protocol: &str, path: &str, peer: SocketAddr) -> String {
    let clip = |s: &str, n: usize| -> String {
        let mut out: String = s.chars().filter(|c| !c.is_control()).take(n).collect();
        if s.chars().count() > n {
            out.push('…');
        }
        out
    };
    let protocol = if protocol.eq_ignore_ascii_case("websocket") {
        "WebSocket".to_string()
    } else {
        format!("upgrade to {}", clip(protocol, 20))
    };
    format!("{protocol} {} from {peer}", clip(path, 80))
}

/// Why an upgrade did not reach the upstream (the client gets a 502 saying so).
#[derive(Debug, thiserror::Error)]
enum UpgradeError {
    #[error(transparent)]
    Connect(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Passes an upgrade (WebSocket) through: the request goes to the upstream on its own
/// connection; on 101 both upgraded connections are spliced together, counted on the upstream
/// (for the drain) while they last.
async fn upgrade(
    mut req: Request<ClientBody>,
    upstream: &Arc<Upstream>,
    peer: SocketAddr,
) -> Result<Response<Body>, UpgradeError> {
    let addr = upstream.addr;
    let protocol = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let what = describe_upgrade(&protocol, req.uri().path(), peer);
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let mut upstream_req = Request::from_parts(parts, body);
    if !upstream_req.headers().contains_key(HOST)
        && let Ok(host) = HeaderValue::from_str(&addr.to_string())
    {
        upstream_req.headers_mut().insert(HOST, host);
    }
    let mut response = sender.send_request(upstream_req).await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        // Counted from the 101 on, so a drain that starts now already sees it.
        let (guard, close) = upstream.open_upgrade(what);
        let websocket = protocol.eq_ignore_ascii_case("websocket");
        tokio::spawn(async move {
            let _guard = guard;
            if let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) {
                let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                if websocket {
                    crate::wsrelay::splice_websocket(client, upstream, close).await;
                } else {
                    crate::wsrelay::splice_raw(client, upstream, close).await;
                }
            }
        });
    }
    Ok(response.map(|b| b.boxed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    #[test]
    fn drains_are_described_naming_what_was_left() {
        let t = Duration::from_secs(5);
        assert!(Drained::default().finished());
        assert_eq!(
            Drained::default().describe(t),
            "in-flight requests finished"
        );
        let d = Drained {
            requests_left: 2,
            closed: vec!["WebSocket /ws from 127.0.0.1:4000".into()],
            not_closed: 0,
        };
        assert!(!d.finished());
        assert_eq!(
            d.describe(t),
            "1 upgraded connection(s) still open after 5s: WebSocket /ws from 127.0.0.1:4000; \
             closed by the proxy (WebSockets with close code 1001, going away); 2 request(s) \
             still in flight after 5s (cut when the old release stops)"
        );
        let many: Vec<String> = (0..7).map(|i| format!("c{i}")).collect();
        assert_eq!(name_some(&many), "c0, c1, c2, c3, c4 and 2 more");
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        assert_eq!(
            describe_upgrade("websocket", "/chat/room", peer),
            "WebSocket /chat/room from 10.0.0.9:5555"
        );
        let long = describe_upgrade("h2c", &format!("/{}", "a".repeat(200)), peer);
        assert!(
            long.starts_with("upgrade to h2c /aaa") && long.contains('…'),
            "{long}"
        );
    }

    /// A WebSocket echo app on a real socket: what the proxy forwards to.
    async fn echo_app() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(
        ws: &mut tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        text: &str,
    ) {
        ws.send(Message::text(text)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(text));
    }

    /// Issue 11, item 15: a WebSocket counts in the drain, runs until the drain's timeout, then
    /// gets a close frame 1001 (not a bare end of stream); one opened after the close is not
    /// affected.
    #[tokio::test]
    async fn a_websocket_outliving_the_drain_is_closed_with_going_away() {
        let app = echo_app().await;
        let proxy = Proxy::new();
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = listener.local_addr().unwrap();
        tokio::spawn(proxy.clone().serve(listener, shutdown.clone()));
        let up = Upstream::new(app, "v1");
        proxy.switch(up.clone());

        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{front}/ws?token=s3cr3t"))
            .await
            .unwrap();
        echo(&mut ws, "hello").await;
        let open = up.upgraded();
        assert_eq!(open.len(), 1, "{open:?}");
        assert!(
            open[0].starts_with("WebSocket /ws from 127.0.0.1:"),
            "{open:?}"
        );
        assert!(!open[0].contains("s3cr3t"), "never the query: {open:?}");
        assert_eq!(
            up.inflight(),
            0,
            "an upgraded connection is no request in flight"
        );

        let started = Instant::now();
        let drain = tokio::spawn({
            let up = up.clone();
            async move { up.drain(Duration::from_millis(600)).await }
        });
        // Still up during the drain.
        tokio::time::sleep(Duration::from_millis(200)).await;
        echo(&mut ws, "still here").await;
        let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a close within the drain's timeout and a bit");
        let took = started.elapsed();
        match next {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
            }
            other => panic!("expected a close frame 1001, got {other:?}"),
        }
        assert!(took >= Duration::from_millis(600), "closed after {took:?}");
        let drained = drain.await.unwrap();
        assert_eq!(drained.closed, open);
        assert_eq!((drained.not_closed, drained.requests_left), (0, 0));
        assert!(up.upgraded().is_empty());

        // The same upstream serving again (a switch back): new WebSockets are not closed.
        let (mut again, _) = tokio_tungstenite::connect_async(format!("ws://{front}/ws"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo(&mut again, "after").await;
        assert_eq!(up.upgraded().len(), 1);
        shutdown.cancel();
    }

    #[test]
    fn percentiles_from_the_histogram() {
        let mut counts = [0u64; BUCKETS_MS.len()];
        assert_eq!(percentile(&counts, 0.95), 0);
        counts[0] = 94; // <= 1 ms
        counts[6] = 6; // <= 100 ms
        assert_eq!(percentile(&counts, 0.95), 100);
        assert_eq!(percentile(&counts, 0.94), 1);
        let stats = Stats::default();
        for _ in 0..19 {
            stats.record(Outcome::Answered(StatusCode::OK), Duration::from_millis(3));
        }
        stats.record(
            Outcome::Answered(StatusCode::BAD_GATEWAY),
            Duration::from_millis(400),
        );
        let snap = stats.snapshot();
        assert_eq!((snap.requests, snap.status_5xx, snap.p95_ms), (20, 1, 5));
        assert!((snap.ratio_5xx() - 0.05).abs() < 1e-9);
    }

    /// The proxy's own answers to malformed requests used to count as the release's 5xx, so
    /// anyone could force a rollback (issue 11, 7).
    #[test]
    fn only_what_the_release_did_counts_against_it() {
        assert_eq!(Outcome::of_failure(true), Outcome::ClientError);
        assert_eq!(Outcome::of_failure(false), Outcome::Unreachable);
        let stats = Stats::default();
        for _ in 0..1000 {
            stats.record(Outcome::ClientError, Duration::from_millis(1));
        }
        assert_eq!(stats.snapshot(), StatsSnapshot::default());
        assert_eq!(stats.client_errors.load(Ordering::Relaxed), 1000);
        // An unreachable release fails its requests, outside the latency histogram.
        for _ in 0..19 {
            stats.record(
                Outcome::Answered(StatusCode::NOT_FOUND),
                Duration::from_millis(3),
            );
        }
        stats.record(Outcome::Unreachable, Duration::from_secs(9));
        let snap = stats.snapshot();
        assert_eq!((snap.requests, snap.status_5xx, snap.p95_ms), (20, 1, 5));
        assert_eq!(stats.unreachable.load(Ordering::Relaxed), 1);
        assert_eq!(stats.status_4xx.load(Ordering::Relaxed), 19);
    }

    #[test]
    fn the_fd_budget_leaves_a_reserve() {
        // The default soft limit: 384 connections (768 descriptors) of 1024.
        assert_eq!(fd_budget(1024), 384);
        assert_eq!(fd_budget(4096), 1536);
        assert_eq!(fd_budget(524_288), 196_608);
        assert!(2 * fd_budget(20_000) as u64 <= 20_000 * 3 / 4);
        // Absurdly low limits still serve a few connections.
        assert_eq!(fd_budget(0), 16);
        assert_eq!(fd_budget(256), 16);
        assert_eq!(fd_budget(300), 22);
        assert_eq!(fd_budget(u64::MAX) as u64, (u64::MAX - u64::MAX / 4) / 2);
    }
}
