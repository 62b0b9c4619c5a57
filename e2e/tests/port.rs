//! The controller port under attack (issue 11, items 1, 2 and 20), against the real
//! `drover-controller` binary in its own process, over real sockets: connections without a
//! client certificate cannot buffer memory or hold file descriptors, slow and idle connections
//! are closed while an agent's session is not, a request the certificate may not make is
//! refused from its headers, and SIGTERM tells sessions the controller is shutting down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drover_e2e::{ScriptedAgent, bin, eventually, free_port, operator_client};
use drover_identity::files::Bundle;
use drover_identity::tls::{ClientCert, Trust, client_config};
use drover_proto::v1;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The controller's memory must stay under this through the attack.
const RSS_LIMIT_KIB: u64 = 150 * 1024;
/// Sessions without a certificate held open at once: more than the old unit's 1,024 file
/// descriptors (the report's 1,010 was already enough there, beside the controller's own).
const ATTACK_SESSIONS: usize = 1100;
/// The message each attacking stream announces and never finishes (~3.8 MiB).
const ATTACK_MESSAGE: usize = 3_984_588;

/// The real controller binary, run with `prlimit` when a file descriptor limit is given.
struct RealController {
    child: Child,
    addr: String,
    admin: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RealController {
    async fn start(connections: &str, nofile: Option<u64>) -> RealController {
        drover_e2e::init();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("controller.toml");
        let mut text = format!(
            "listen = \"{addr}\"\ndata_dir = \"{}\"\nheartbeat_interval = \"1s\"\n\
             suspect_after = \"3s\"\ndown_after = \"6s\"\n",
            data.display()
        );
        if !connections.is_empty() {
            text.push_str(&format!("[connections]\n{connections}\n"));
        }
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join("controller.log");
        let mut command = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(bin("drover-controller"));
                c
            }
            None => Command::new(bin("drover-controller")),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&config)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start drover-controller (and prlimit, from util-linux)");
        let mut controller = RealController {
            child,
            addr,
            admin: data.join("operator/admin"),
            log,
            _dir: dir,
        };
        controller.wait_serving().await;
        controller
    }

    async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the controller exited ({status}): {}", self.log_text());
            }
            if self.admin.join("key.pem").exists()
                && let Ok(bundle) = Bundle::load(&self.admin)
                && operator_client(&self.addr, &bundle)
                    .who_am_i(v1::WhoAmIRequest {})
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the controller did not serve within 30s: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn admin_bundle(&self) -> Bundle {
        Bundle::load(&self.admin).expect("admin bundle")
    }

    fn ca_pem(&self) -> String {
        self.admin_bundle().ca_pem
    }

    /// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Enrolls `host` with a token from the operator API; returns its identity bundle.
    async fn enroll(&self, host: &str, dir: &Path) -> Bundle {
        let token = operator_client(&self.addr, &self.admin_bundle())
            .create_token(v1::CreateTokenRequest {
                host: host.to_string(),
                ..Default::default()
            })
            .await
            .expect("create token")
            .into_inner()
            .token;
        drover_agent::enroll::enroll(&self.addr, &token, dir)
            .await
            .expect("enroll");
        Bundle::load(&dir.join("identity")).expect("agent identity")
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 15s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RealController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enough file descriptors for this test process's own side of the connections.
fn raise_own_nofile() {
    let (_, now) = drover_daemon::raise_open_files_limit();
    assert!(
        now >= 4096,
        "this test needs 4096 file descriptors (RLIMIT_NOFILE is {now}): raise `ulimit -n`"
    );
}

/// A TLS connection to the controller, with the client certificate in `cert` if any.
async fn tls(
    addr: &str,
    ca_pem: &str,
    cert: Option<&Bundle>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let cert = cert.map(|b| ClientCert {
        cert_pem: b.cert_pem.clone(),
        key_pem: b.key_pem.clone(),
    });
    let config = client_config(&Trust::Ca(ca_pem.to_string()), cert.as_ref()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(drover_identity::CONTROLLER_SERVER_NAME)
        .unwrap()
        .to_owned();
    connector.connect(name, tcp).await
}

/// An HTTP/2 connection over `tls`, driven by its own task (which ends when the connection
/// does).
async fn h2(
    tls: TlsStream<TcpStream>,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://drover-controller{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// The 5-byte gRPC prefix of an uncompressed message of `len` bytes.
fn prefix(len: usize) -> Bytes {
    let mut p = vec![0u8];
    p.extend_from_slice(&(len as u32).to_be_bytes());
    Bytes::from(p)
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Opens a stream to `path` announcing a message of `len` bytes and sends all of it but the
/// last byte, as fast as flow control lets it; returns once it is sent or the controller
/// refused or reset the stream (the stream is then left open, unfinished).
async fn unfinished_message(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    len: usize,
) -> (
    usize,
    Option<h2::client::ResponseFuture>,
    Option<h2::SendStream<Bytes>>,
) {
    let Ok(mut ready) = send.clone().ready().await else {
        return (0, None, None);
    };
    let Ok((response, mut body)) = ready.send_request(grpc_request(path), false) else {
        return (0, None, None);
    };
    if body.send_data(prefix(len), false).is_err() {
        return (0, Some(response), None);
    }
    let mut sent = 0;
    while sent < len - 1 {
        body.reserve_capacity((len - 1 - sent).min(ZEROS.len()));
        let capacity = match futures::future::poll_fn(|cx| body.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            _ => break,
        };
        let n = capacity.min(len - 1 - sent);
        if n == 0 {
            continue;
        }
        if body
            .send_data(Bytes::from_static(&ZEROS[..n]), false)
            .is_err()
        {
            break;
        }
        sent += n;
    }
    (sent, Some(response), Some(body))
}

/// Item 1: three TLS connections without a client certificate, each opening 100 streams with
/// unfinished 3.8 MiB messages (to Enrollment and to the operator API), took the controller
/// from 21 MB to 1.2 GB. Now its peak RSS stays under 150 MB and the connections are closed
/// after the unauthenticated lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_streams_cannot_exhaust_memory() {
    let controller = RealController::start("unauthenticated_lifetime = \"5s\"", None).await;
    let before = controller.status_kib("VmRSS");
    let ca = controller.ca_pem();
    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut connections = Vec::new();
    let mut attackers = Vec::new();
    for c in 0..3 {
        let stream = tls(&controller.addr, &ca, None)
            .await
            .expect("TLS without a certificate");
        let (send, conn) = h2(stream).await;
        connections.push(conn);
        // The attacker that stays longest keeps to the server's stream limit, so wait for its
        // SETTINGS: streams opened before them are refused, and a client refused that often is
        // rightly cut at once (which made this test end early under load, measuring nothing).
        let settled = Instant::now();
        while send.current_max_send_streams() > 2 {
            assert!(
                settled.elapsed() < Duration::from_secs(5),
                "no SETTINGS from the controller within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for s in 0..100 {
            let mut send = send.clone();
            let sent = sent.clone();
            let path = if (c + s) % 2 == 0 {
                "/drover.v1.Enrollment/Enroll"
            } else {
                "/drover.v1.OperatorService/ApplyApp"
            };
            attackers.push(tokio::spawn(async move {
                let (n, response, body) = unfinished_message(&mut send, path, ATTACK_MESSAGE).await;
                sent.fetch_add(n, Ordering::SeqCst);
                // Held, unfinished, for as long as the controller lets it.
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop((response, body));
            }));
        }
    }
    // Watch the controller's peak memory while the attack runs.
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(20) {
        peak = controller.status_kib("VmHWM");
        assert!(
            peak < RSS_LIMIT_KIB,
            "the controller's RSS reached {peak} KiB (from {before} KiB) with {} attack bytes sent",
            sent.load(Ordering::SeqCst)
        );
        if connections.iter().all(|c| c.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connections without a certificate are closed after their 5 s life (plus the close
    // grace), attack or not.
    for conn in connections {
        let left = Duration::from_secs(20).saturating_sub(started.elapsed());
        tokio::time::timeout(left, conn)
            .await
            .expect("the controller closes unauthenticated connections after their lifetime")
            .unwrap();
    }
    let closed_after = started.elapsed();
    assert!(closed_after >= Duration::from_secs(4), "{closed_after:?}");
    peak = peak.max(controller.status_kib("VmHWM"));
    eprintln!(
        "RSS {before} KiB before, peak {peak} KiB; {} attack bytes accepted; closed after {closed_after:?}",
        sent.load(Ordering::SeqCst)
    );
    for a in attackers {
        a.abort();
    }
    assert!(peak < RSS_LIMIT_KIB);
    // And the controller still serves.
    operator_client(&controller.addr, &controller.admin_bundle())
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect("the controller still answers");
}

/// Runs `drover ARGS` as the admin, killed after `patience`: (exit code, stderr, time taken).
fn cli_within(
    controller: &RealController,
    args: &[&str],
    patience: Duration,
) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(bin("drover"))
        .args(args)
        .env("DROVER_CONTROLLER", &controller.addr)
        .env("DROVER_IDENTITY", &controller.admin)
        .env("HOME", &controller.admin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return (status.code(), err, started.elapsed());
        }
        if started.elapsed() > patience {
            let _ = child.kill();
            let _ = child.wait();
            return (None, "killed: no answer".into(), started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Item 2: 1,010 TLS sessions without a certificate, held open, made the CLI time out (the
/// controller ran out of file descriptors). With 1,100 of them under the old unit's limit of
/// 1,024 descriptors (before the fix: "cannot reach the controller … deadline has elapsed"), the
/// caps now fit, the sessions beyond the per-source cap are closed at once, and the CLI answers
/// promptly — from the same address as the attacker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_sessions_without_a_certificate_leave_the_cli_working() {
    raise_own_nofile();
    let controller = RealController::start("", Some(1024)).await;
    let ca = Arc::new(controller.ca_pem());
    let addr = controller.addr.clone();
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let sessions = futures::future::join_all((0..ATTACK_SESSIONS).map(|i| {
        let (ca, addr, opened, closed) = (ca.clone(), addr.clone(), opened.clone(), closed.clone());
        async move {
            // Spread over a second, as a client opening them in a loop would.
            tokio::time::sleep(Duration::from_millis(i as u64)).await;
            let Ok(Ok(mut stream)) =
                tokio::time::timeout(Duration::from_secs(10), tls(&addr, &ca, None)).await
            else {
                return;
            };
            opened.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Held until the controller closes it.
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            });
        }
    }));
    tokio::time::timeout(Duration::from_secs(60), sessions)
        .await
        .expect("the attack's handshakes end");
    let (code, err, took) = cli_within(&controller, &["hosts"], Duration::from_secs(20));
    eprintln!(
        "{} sessions opened, {} closed by the controller; `drover hosts` took {took:?}",
        opened.load(Ordering::SeqCst),
        closed.load(Ordering::SeqCst)
    );
    assert_eq!(code, Some(0), "drover hosts: {err}");
    assert!(took < Duration::from_secs(5), "drover hosts took {took:?}");
    // At most the per-source cap of sessions without a certificate stays open.
    let held = opened.load(Ordering::SeqCst) - closed.load(Ordering::SeqCst);
    assert!(
        held <= 64,
        "{held} sessions without a certificate still open"
    );
    let log = controller.log_text();
    assert!(
        log.contains("connection refused: too many connections"),
        "refusals are logged"
    );
    assert!(
        log.contains("does not fit the file descriptor limit"),
        "the controller says it lowered its caps: {log}"
    );
}

/// Item 2: a connection that never finishes its TLS handshake is closed after
/// `handshake_timeout`; one that finishes it but never sends a request, after
/// `first_request_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_and_silent_connections_are_closed() {
    let controller = RealController::start(
        "handshake_timeout = \"2s\"\nfirst_request_timeout = \"3s\"",
        None,
    )
    .await;
    // TCP only, not a byte sent.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(&controller.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(15), tcp.read(&mut buf))
        .await
        .expect("a connection without a handshake is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "closed after {took:?}, handshake_timeout is 2s"
    );

    // A finished handshake (with the admin certificate), then silence: no HTTP/2 preface.
    let started = Instant::now();
    let mut stream = tls(
        &controller.addr,
        &controller.ca_pem(),
        Some(&controller.admin_bundle()),
    )
    .await
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a connection without a request is closed");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2800) && took < Duration::from_secs(8),
        "closed after {took:?}, first_request_timeout is 3s"
    );
}

/// Reads a whole unary response: (grpc-status, grpc-message, body bytes).
async fn response_status(response: h2::client::ResponseFuture) -> (String, String, usize) {
    let response = response.await.expect("response headers");
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut len = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("response body");
        len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    let all: http::HeaderMap = headers
        .into_iter()
        .chain(trailers)
        .filter_map(|(k, v)| Some((k?, v)))
        .collect();
    let status = tonic::Status::from_header_map(&all).expect("a grpc-status");
    (
        (status.code() as i32).to_string(),
        status.message().to_string(),
        len,
    )
}

/// Item 2: a connection with no request open is closed after `idle_timeout`, but an agent's
/// session (heartbeats, then a silence longer than the timeout) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_agent_sessions_are_not() {
    let controller = RealController::start("idle_timeout = \"3s\"", None).await;
    let tmp = tempfile::tempdir().unwrap();
    let bundle = controller.enroll("web-1", tmp.path()).await;
    let mut agent = ScriptedAgent::connect(&controller.addr, &bundle, "web-1").await;

    // An operator connection: one WhoAmI, then nothing.
    let stream = tls(
        &controller.addr,
        &controller.ca_pem(),
        Some(&controller.admin_bundle()),
    )
    .await
    .unwrap();
    let (send, conn) = h2(stream).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut body) = send
        .send_request(grpc_request("/drover.v1.OperatorService/WhoAmI"), false)
        .unwrap();
    body.send_data(prefix(0), true).unwrap();
    let (code, message, _) = response_status(response).await;
    assert_eq!(code, "0", "WhoAmI: {message}");
    let answered = Instant::now();

    // Meanwhile the agent heartbeats every second for three idle timeouts.
    let heartbeats = async {
        while answered.elapsed() < Duration::from_secs(9) {
            agent.assert_no_command().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let (closed, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(15), conn),
        heartbeats
    );
    closed
        .expect("the idle operator connection is closed")
        .unwrap();
    drop(send);
    // (Measured from the answer: the close came after the idle timeout, not before.)
    let idle_for = Instant::now() - answered;
    assert!(idle_for >= Duration::from_millis(2800), "{idle_for:?}");
    // Then the session is silent for twice the timeout, and still answers.
    tokio::time::sleep(Duration::from_secs(6)).await;
    agent.assert_no_command().await;
}

/// Item 1 and 2: a request the connection's certificate may not make is refused from its
/// headers, with a status naming why, while its announced 3.8 MiB body has not arrived; an
/// enrollment message larger than Enrollment needs is refused from its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_refused_from_their_headers() {
    let controller = RealController::start("", None).await;
    let ca = controller.ca_pem();
    let tmp = tempfile::tempdir().unwrap();
    let agent = controller.enroll("web-1", tmp.path()).await;
    for (cert, path, code, needle) in [
        (
            None,
            "/drover.v1.OperatorService/ListHosts",
            "16",
            "no client certificate",
        ),
        (
            None,
            "/drover.v1.AgentService/Session",
            "16",
            "may only call Enrollment",
        ),
        (
            Some(&agent),
            "/drover.v1.OperatorService/ApplyApp",
            "7",
            "agent web-1 may not call the operator API",
        ),
        (
            None,
            "/drover.v1.Enrollment/Enroll",
            "11",
            "message length too large",
        ),
    ] {
        let stream = tls(&controller.addr, &ca, cert).await.unwrap();
        let (send, _conn) = h2(stream).await;
        let mut send = send.ready().await.unwrap();
        let (response, mut body) = send.send_request(grpc_request(path), false).unwrap();
        body.send_data(prefix(ATTACK_MESSAGE), false).unwrap();
        let (got, message, _) =
            tokio::time::timeout(Duration::from_secs(5), response_status(response))
                .await
                .unwrap_or_else(|_| panic!("{path}: no answer before the body was sent"));
        assert_eq!(got, code, "{path}: {message}");
        assert!(message.contains(needle), "{path}: {message}");
        drop(body);
    }
    // Through the ordinary client: a clear status.
    let config = client_config(&Trust::Ca(ca.clone()), None).unwrap();
    let channel =
        drover_identity::tls::channel(&controller.addr, config, Duration::from_secs(5)).unwrap();
    let status = drover_e2e::OperatorServiceClient::new(channel)
        .list_hosts(v1::ListHostsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("no client certificate")
            && status.message().contains("drover --identity"),
        "{}",
        status.message()
    );
}

/// Item 20: on SIGTERM every session is told the controller is shutting down, not that "a
/// newer session of this host replaced this one"; the log says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_sessions_the_controller_is_shutting_down() {
    let mut controller = RealController::start("", None).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for i in 1..=4 {
        let host = format!("web-{i}");
        let bundle = controller.enroll(&host, &tmp.path().join(&host)).await;
        agents.push(ScriptedAgent::connect(&controller.addr, &bundle, &host).await);
    }
    let admin = operator_client(&controller.addr, &controller.admin_bundle());
    eventually("4 sessions open", Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            let hosts = admin
                .list_hosts(v1::ListHostsRequest::default())
                .await
                .ok()?
                .into_inner()
                .hosts;
            (hosts.iter().filter(|h| h.session_open).count() == 4).then_some(())
        }
    })
    .await;
    let status = controller.terminate();
    assert!(status.success(), "exit {status}");
    for agent in agents {
        let host = agent.host.clone();
        let end = agent
            .ended()
            .await
            .expect_err("the session ends with a status");
        assert_eq!(end.code(), tonic::Code::Unavailable, "{host}: {end:?}");
        assert!(
            end.message().contains("shutting down"),
            "{host}: {}",
            end.message()
        );
    }
    let log = controller.log_text();
    assert!(!log.contains("newer session"), "{log}");
    assert!(log.contains("the controller is shutting down"), "{log}");
}
