//! The built-in HTTP reverse proxy that owns a web app's public address, so a deploy can move
//! traffic from one container to another without a dropped request.
//!
//! Requests go to the current upstream; [`Proxy::switch`] replaces it in one atomic swap and
//! returns the old one, whose in-flight requests and upgraded connections finish
//! ([`Upstream::drain`]). WebSocket upgrades pass through (`wsrelay.rs`); a WebSocket still open
//! when the drain times out gets a close frame (1001, going away) from the proxy, not a bare
//! end of stream. X-Forwarded-For and X-Forwarded-Proto are set. Each upstream counts
//! responses by status class and keeps a latency histogram, which feed the post-deploy watch
//! window and the host's health report.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HOST, HeaderName, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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
    pub requests: AtomicU64,
    pub status_2xx: AtomicU64,
    pub status_3xx: AtomicU64,
    pub status_4xx: AtomicU64,
    /// 5xx answers from the app, plus 502s when it could not be reached.
    pub status_5xx: AtomicU64,
    latency: [AtomicU64; BUCKETS_MS.len()],
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
    fn record(&self, status: StatusCode, elapsed: Duration) {
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

/// A running proxy for one app.
#[derive(Clone)]
pub struct Proxy {
    current: Arc<RwLock<Option<Arc<Upstream>>>>,
    client: Client<HttpConnector, Incoming>,
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
    pub fn new() -> Proxy {
        Proxy {
            current: Arc::new(RwLock::new(None)),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http(),
        }
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

    /// Serves on `listener` until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req| proxy.clone().forward(req, peer));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    }

    async fn forward(
        self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let Some(upstream) = self.upstream() else {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "no release is live for this app\n",
            ));
        };
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
        let result = if req.headers().contains_key(UPGRADE) {
            upgrade(req, &upstream, peer).await
        } else {
            let uri = format!(
                "http://{}{}",
                upstream.addr,
                req.uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
            );
            match uri.parse() {
                Ok(uri) => {
                    *req.uri_mut() = uri;
                    self.client
                        .request(req)
                        .await
                        .map(|r| r.map(|b| b.boxed()))
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("bad URI: {e}")),
            }
        };
        let response = match result {
            Ok(response) => response,
            Err(err) => plain(
                StatusCode::BAD_GATEWAY,
                &format!("upstream {} failed: {err}\n", upstream.addr),
            ),
        };
        upstream.stats.record(response.status(), started.elapsed());
        // The guard lives until the response head is out; a streamed body is not counted.
        drop(guard);
        Ok(response)
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

fn set_forwarded(req: &mut Request<Incoming>, peer: SocketAddr) {
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

/// Passes an upgrade (WebSocket) through: the request goes to the upstream on its own
/// connection; on 101 both upgraded connections are spliced together, counted on the upstream
/// (for the drain) while they last.
async fn upgrade(
    mut req: Request<Incoming>,
    upstream: &Arc<Upstream>,
    peer: SocketAddr,
) -> Result<Response<Body>, String> {
    let addr = upstream.addr;
    let protocol = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let what = describe_upgrade(&protocol, req.uri().path(), peer);
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn.with_upgrades());
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let mut upstream_req = Request::from_parts(parts, body);
    if !upstream_req.headers().contains_key(HOST)
        && let Ok(host) = HeaderValue::from_str(&addr.to_string())
    {
        upstream_req.headers_mut().insert(HOST, host);
    }
    let mut response = sender
        .send_request(upstream_req)
        .await
        .map_err(|e| e.to_string())?;
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
            stats.record(StatusCode::OK, Duration::from_millis(3));
        }
        stats.record(StatusCode::BAD_GATEWAY, Duration::from_millis(400));
        let snap = stats.snapshot();
        assert_eq!((snap.requests, snap.status_5xx, snap.p95_ms), (20, 1, 5));
        assert!((snap.ratio_5xx() - 0.05).abs() < 1e-9);
    }
}
