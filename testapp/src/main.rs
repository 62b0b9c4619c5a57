//! `drover-testapp`: the HTTP app Drover's deploy tests run in containers (image `FROM scratch`).
//!
//! It reports its version and misbehaves on demand, set by environment variables at start or by
//! `POST /control/<what>` at run time:
//! - `APP_VERSION` (reported by `/` and `/version`), `PORT` (default 8080)
//! - `START_DELAY_MS`: listen only after this long (a slow start)
//! - `FAIL_HEALTH=1`: `/healthz` answers 503; `FAIL_SMOKE=1`: `/smoke` answers 500
//! - `ERROR_RATE` (0.0-1.0): that share of `/` requests answers 500; `LATENCY_MS` delays `/`
//! - `EXIT_AFTER_MS`: the process exits with status 3 after this long
//! - `IGNORE_SIGTERM=1`: SIGTERM is ignored (a slow stopper: `docker stop` waits its grace period)
//! - `/ws`: a WebSocket echo, for tests of upgrades through the proxy (`WS_SILENT=1`: it accepts
//!   the upgrade and messages but never answers); `/headers` lists the request headers it received;
//!   `POST /echo` reads the whole body and answers its length (a body that breaks off never gets
//!   an answer)
//! - `/slow?ms=N`: answers after N ms (at most 10 minutes), for tests of the drain
//! - `POST /control/fail-health|heal|errors-on|errors-off|exit`
//!
//! It exits at once on SIGTERM. With an argument it is not a server: `migrate` prints a line,
//! appends its version to the file `MIGRATE_LOG` names (if set), and exits with `MIGRATE_EXIT`
//! (default 0); `worker` prints a line a second until stopped, or exits with status 4 after
//! `WORKER_EXIT_AFTER_MS`; `echo-env` prints each variable named in `ECHO_ENV` (comma-separated)
//! the way a failing app leaks one (as is, like SQLAlchemy's "Could not parse URL", and
//! percent-encoded) and exits with status 1: for the tests that secrets never leave the host.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

struct App {
    version: String,
    fail_health: AtomicBool,
    fail_smoke: AtomicBool,
    /// Share of `/` requests that fail, in millionths.
    error_ppm: AtomicU64,
    latency: Duration,
    served: AtomicU64,
    ws_silent: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_u64(name: &str) -> u64 {
    env(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

async fn handle(
    app: Arc<App>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = app.served.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let response = match (req.method().clone(), path.as_str()) {
        (_, "/healthz") if app.fail_health.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".into())
        }
        (_, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (_, "/smoke") if app.fail_smoke.load(Ordering::Relaxed) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, "smoke failed\n".into())
        }
        (_, "/smoke") => text(
            StatusCode::OK,
            format!("smoke ok version={}\n", app.version),
        ),
        (_, "/version") => text(StatusCode::OK, format!("{}\n", app.version)),
        (_, "/headers") => {
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            text(StatusCode::OK, lines.join("\n") + "\n")
        }
        (_, "/ws") => websocket(&mut req, app.ws_silent),
        (_, "/slow") => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .min(600_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(
                StatusCode::OK,
                format!("slow {ms}ms version={}\n", app.version),
            )
        }
        (Method::POST, "/echo") => {
            use http_body_util::BodyExt;
            match req.into_body().collect().await {
                Ok(body) => text(
                    StatusCode::OK,
                    format!("read {} bytes\n", body.to_bytes().len()),
                ),
                // The connection from the proxy broke off mid-body: nobody to answer.
                Err(e) => text(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
            }
        }
        (Method::POST, control) if control.starts_with("/control/") => {
            match &control["/control/".len()..] {
                "fail-health" => app.fail_health.store(true, Ordering::Relaxed),
                "heal" => app.fail_health.store(false, Ordering::Relaxed),
                "errors-on" => app.error_ppm.store(1_000_000, Ordering::Relaxed),
                "errors-off" => app.error_ppm.store(0, Ordering::Relaxed),
                "exit" => {
                    tokio::spawn(async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        std::process::exit(3);
                    });
                }
                other => return Ok(text(StatusCode::NOT_FOUND, format!("no control {other}\n"))),
            }
            text(StatusCode::OK, "done\n".into())
        }
        _ => {
            if !app.latency.is_zero() {
                tokio::time::sleep(app.latency).await;
            }
            // Deterministic spread: request n fails when its slot falls under the error share.
            let ppm = app.error_ppm.load(Ordering::Relaxed);
            if (n * 7919 % 1_000_000) < ppm {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("error version={}\n", app.version),
                )
            } else {
                text(StatusCode::OK, format!("version={}\n", app.version))
            }
        }
    };
    Ok(response)
}

/// Answers a WebSocket upgrade and echoes every message on the upgraded connection (or, when
/// `silent`, reads them and never answers).
fn websocket(req: &mut Request<Incoming>, silent: bool) -> Response<Full<Bytes>> {
    let Some(key) = req
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return text(StatusCode::BAD_REQUEST, "not a WebSocket request\n".into());
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && !silent && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut response = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&key) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

/// `migrate` and `worker` modes (see the top of the file).
async fn one_off(mode: &str, version: &str) -> ! {
    match mode {
        "migrate" => {
            let code = env("MIGRATE_EXIT")
                .and_then(|v| v.parse::<i32>().ok())
                .unwrap_or(0);
            println!("migrating to {version}");
            // A count a test can read: one line per migration run, in a mounted file.
            if let Some(path) = env("MIGRATE_LOG") {
                use std::io::Write;
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| writeln!(f, "{version}"));
                if let Err(e) = appended {
                    eprintln!("cannot append to MIGRATE_LOG {path}: {e}");
                    std::process::exit(5);
                }
            }
            if code != 0 {
                eprintln!("migration failed: relation \"users\" already exists");
            }
            std::process::exit(code);
        }
        "worker" => {
            let exit_after = env("WORKER_EXIT_AFTER_MS").and_then(|v| v.parse::<u64>().ok());
            let started = std::time::Instant::now();
            loop {
                println!("worker {version} working");
                if exit_after.is_some_and(|ms| started.elapsed() >= Duration::from_millis(ms)) {
                    eprintln!("worker exiting as told by WORKER_EXIT_AFTER_MS");
                    std::process::exit(4);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        "echo-env" => {
            for name in env("ECHO_ENV").unwrap_or_default().split(',') {
                let value = env(name.trim()).unwrap_or_default();
                eprintln!(
                    "sqlalchemy.exc.ArgumentError: Could not parse SQLAlchemy URL from string '{value}'"
                );
                let encoded: String = value
                    .bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect();
                eprintln!("while connecting to {encoded}");
            }
            std::process::exit(1);
        }
        other => {
            eprintln!("unknown mode {other:?}: use migrate, worker or echo-env");
            std::process::exit(2);
        }
    }
}

/// Exits on SIGTERM, as a well-behaved app does (as PID 1 in a container, a process that does
/// not handle SIGTERM ignores it, and `docker stop` waits out its whole grace period). With
/// `IGNORE_SIGTERM=1` it is such a slow stopper: only the SIGKILL after the grace period ends it.
fn exit_on_sigterm() {
    let ignore = env("IGNORE_SIGTERM").is_some();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            while term.recv().await.is_some() {
                if !ignore {
                    eprintln!("SIGTERM: exiting");
                    std::process::exit(0);
                }
                eprintln!("SIGTERM: ignored (IGNORE_SIGTERM)");
            }
        }
    });
}

#[tokio::main]
async fn main() {
    exit_on_sigterm();
    if let Some(mode) = std::env::args().nth(1) {
        one_off(&mode, &env("APP_VERSION").unwrap_or_else(|| "dev".into())).await;
    }
    let error_rate: f64 = env("ERROR_RATE")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let app = Arc::new(App {
        version: env("APP_VERSION").unwrap_or_else(|| "dev".into()),
        fail_health: AtomicBool::new(env("FAIL_HEALTH").as_deref() == Some("1")),
        fail_smoke: AtomicBool::new(env("FAIL_SMOKE").as_deref() == Some("1")),
        error_ppm: AtomicU64::new((error_rate.clamp(0.0, 1.0) * 1_000_000.0) as u64),
        latency: Duration::from_millis(env_u64("LATENCY_MS")),
        served: AtomicU64::new(0),
        ws_silent: env("WS_SILENT").as_deref() == Some("1"),
    });
    if let Some(ms) = env("EXIT_AFTER_MS").and_then(|v| v.parse::<u64>().ok()) {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!("exiting as told by EXIT_AFTER_MS");
            std::process::exit(3);
        });
    }
    tokio::time::sleep(Duration::from_millis(env_u64("START_DELAY_MS"))).await;
    let port: u16 = env("PORT").and_then(|v| v.parse().ok()).unwrap_or(8080);
    let listener = match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await {
        Ok(l) => l,
        Err(err) => {
            eprintln!("cannot listen on port {port}: {err}");
            std::process::exit(1);
        }
    };
    eprintln!("drover-testapp {} listening on port {port}", app.version);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(app.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}
