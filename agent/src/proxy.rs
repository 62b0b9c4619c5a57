//! The built-in HTTP reverse proxy that owns a web app's public address, so a deploy can move
//! traffic from one container to another without a dropped request.
//!
//! Requests go to the current upstream; [`Proxy::switch`] replaces it in one atomic swap and
//! returns the old one, whose in-flight requests finish ([`Upstream::drain`]). WebSocket
//! upgrades pass through. X-Forwarded-For and X-Forwarded-Proto are set. Each upstream counts
//! responses by status class and keeps a latency histogram, which feed the post-deploy watch
//! window and the host's health report.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
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
}

impl Upstream {
    pub fn new(addr: SocketAddr, release: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            addr,
            release: release.to_string(),
            stats: Stats::default(),
            inflight: AtomicU64::new(0),
            first_request_unix_ms: AtomicI64::new(0),
        })
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

    /// Waits until no request is in flight on this upstream, or `timeout` passes. Returns
    /// whether it drained.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.inflight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
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
            upgrade(req, upstream.addr).await
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

/// Passes an upgrade (WebSocket) through: the request goes to the upstream on its own
/// connection; on 101 both upgraded connections are spliced together.
async fn upgrade(mut req: Request<Incoming>, addr: SocketAddr) -> Result<Response<Body>, String> {
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
        tokio::spawn(async move {
            if let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) {
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(upstream),
                )
                .await;
            }
        });
    }
    Ok(response.map(|b| b.boxed()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
