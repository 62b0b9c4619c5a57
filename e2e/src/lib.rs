//! Test harness for end-to-end tests: a real controller and real agents in this process, over
//! mTLS on 127.0.0.1 with certificates made at test time; a TCP proxy that can cut or freeze
//! connections; paths to the built binaries for tests that run the real programs; a scripted
//! agent session for tests of the controller's side of jobs; local webhook and SMTP receivers
//! (`notify.rs`).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_agent::store::NewEvent;
use drover_agent::{Agent, AgentConfig, AgentStatus, Outbox};
use drover_controller::operators::admin_bundle_dir;
use drover_controller::shared::Shared;
use drover_controller::{Controller, ControllerConfig};
use drover_identity::files::Bundle;
use drover_identity::tls::{ClientCert, Trust, channel, client_config};
use drover_proto::v1;
use tokio::io::AsyncWriteExt;

pub mod backups;
pub mod deploys;
pub mod hostagent;
pub mod notify;
pub mod pg;
pub mod s3;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use drover_proto::v1::operator_service_client::OperatorServiceClient;
pub use tonic::transport::Channel;

/// Logs to the test output when `RUST_LOG` is set; installs the crypto provider.
pub fn init() {
    drover_identity::tls::install_crypto_provider();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

/// Polls `check` every 50 ms until it yields `Some`, or panics naming `what` after `patience`.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {patience:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A controller running in this process.
pub struct TestController {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), drover_controller::ControllerError>>,
}

/// Test-friendly timings: fast heartbeats and short suspect/down windows.
pub fn fast_controller_config(data_dir: &Path) -> ControllerConfig {
    ControllerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data_dir.to_path_buf(),
        heartbeat_interval: Duration::from_secs(1),
        suspect_after: Duration::from_secs(3),
        down_after: Duration::from_secs(6),
        // Tests fire schedules and evaluate alerts with explicit times (`Scheduler::tick`,
        // `Alerting::tick`), never the wall clock.
        scheduler_tick: Duration::ZERO,
        alerts_every: Duration::ZERO,
        source: "test".into(),
        ..ControllerConfig::default()
    }
}

impl TestController {
    /// Starts a controller on `config.listen` (port 0 picks a free one).
    pub async fn start(config: ControllerConfig) -> TestController {
        let data_dir = config.data_dir.clone();
        // A controller stopped in this process may still have connection tasks winding down
        // that hold its store's file lock for a moment: a restart on the same data dir waits
        // for them (bounded) instead of failing with "could not acquire lock".
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let controller = loop {
            match Controller::open(config.clone()) {
                Ok(controller) => break controller,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("open controller: {e:?}"),
            }
        };
        let shared = controller.shared();
        let listener = TcpListener::bind(config.listen)
            .await
            .expect("bind controller");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(controller.serve(listener, shutdown.clone()));
        TestController {
            addr,
            data_dir,
            shared,
            shutdown,
            task,
        }
    }

    /// Stops the controller and waits until it has released its store.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("controller stops within 10s");
        result.expect("controller task").expect("controller serve");
        drop(self.shared);
    }

    pub fn admin_dir(&self) -> PathBuf {
        admin_bundle_dir(&self.data_dir)
    }

    /// A one-time enrollment token for `host`.
    pub async fn token(&self, host: &str) -> String {
        self.token_with_labels(host, BTreeMap::new()).await
    }

    /// A one-time enrollment token for `host` that gives it `labels`.
    pub async fn token_with_labels(&self, host: &str, labels: BTreeMap<String, String>) -> String {
        let (token, _) =
            drover_controller::operator::issue_token(&self.shared, host, labels, None, "test")
                .await
                .expect("issue token");
        token.encode()
    }

    /// Waits until the controller has stored `host`'s events up to `seq`.
    pub async fn wait_stored(&self, host: &str, seq: u64) {
        let shared = self.shared.clone();
        eventually(
            &format!("{host}'s events up to {seq} stored"),
            Duration::from_secs(30),
            || {
                let shared = shared.clone();
                async move { (shared.store.last_event_seq(host).ok()? >= seq).then_some(()) }
            },
        )
        .await;
    }

    /// `host`'s stored events of job `job_id`, in order.
    pub fn job_events(
        &self,
        host: &str,
        job_id: &str,
    ) -> Vec<drover_controller::store::EventRecord> {
        self.shared
            .store
            .events(host, 0, usize::MAX)
            .expect("read events")
            .into_iter()
            .filter(|e| e.job_id == job_id)
            .collect()
    }

    /// Waits until `host` reported job `job_id` finished; returns its `job.finished` event.
    pub async fn wait_job(
        &self,
        host: &str,
        job_id: &str,
        patience: Duration,
    ) -> drover_controller::store::EventRecord {
        eventually(&format!("job {job_id} finished"), patience, || async {
            self.job_events(host, job_id)
                .into_iter()
                .find(|e| e.kind == drover_model::jobevent::FINISHED)
        })
        .await
    }

    /// An operator API client with the identity in `dir`.
    pub fn operator(&self, dir: &Path) -> OperatorServiceClient<Channel> {
        operator_client(
            &self.addr.to_string(),
            &Bundle::load(dir).expect("identity bundle"),
        )
    }

    /// Issues a viewer identity named `name` through the operator API (key made here).
    pub async fn viewer(&self, name: &str) -> Bundle {
        let (key_pem, csr_pem) = drover_identity::pki::new_key_and_csr(name).expect("key and CSR");
        let issued = self
            .admin()
            .create_operator(v1::CreateOperatorRequest {
                name: name.to_string(),
                role: "viewer".into(),
                csr_pem,
            })
            .await
            .expect("create viewer")
            .into_inner();
        Bundle {
            ca_pem: issued.ca_pem,
            cert_pem: issued.cert_pem,
            key_pem,
        }
    }

    /// An operator API client with the admin bundle.
    pub fn admin(&self) -> OperatorServiceClient<Channel> {
        self.operator(&self.admin_dir())
    }

    /// Applies a backup target as the admin; panics when refused.
    pub async fn apply_target(&self, target_toml: &str) -> v1::ApplyBackupTargetResponse {
        self.admin()
            .apply_backup_target(v1::ApplyBackupTargetRequest {
                target_toml: target_toml.to_string(),
                source: "test.toml".into(),
            })
            .await
            .expect("apply the backup target")
            .into_inner()
    }

    /// Starts a validation of `target`'s newest backup as the admin; returns its job id.
    pub async fn start_verify(&self, target: &str) -> String {
        let jobs = self
            .admin()
            .verify(v1::VerifyRequest {
                target: target.into(),
                all: false,
                host: String::new(),
            })
            .await
            .expect("verify")
            .into_inner()
            .jobs;
        assert_eq!(jobs.len(), 1);
        jobs[0].id.clone()
    }

    /// Applies the example app spec, `examples/api.toml` (app `api`, which declares backup
    /// target `api-db`), as the admin.
    pub async fn apply_example_app(&self) {
        let spec = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/api.toml"),
        )
        .expect("read examples/api.toml");
        self.admin()
            .apply_app(v1::ApplyAppRequest {
                spec_toml: spec,
                source: "api.toml".into(),
            })
            .await
            .expect("apply the example app");
    }

    /// Runs the `drover` binary as the admin: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = drover_cli(&self.addr.to_string(), &self.admin_dir(), args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `drover ARGS` (with `--json` among them) as the admin; panics unless it exits 0
    /// with JSON.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "drover {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("drover {args:?}: {e}: {out}"))
    }

    /// Host info as the operator API reports it.
    pub async fn host(&self, name: &str) -> Option<v1::HostInfo> {
        self.admin()
            .get_host(v1::GetHostRequest {
                name: name.to_string(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }
}

/// An operator client for any bundle.
pub fn operator_client(addr: &str, bundle: &Bundle) -> OperatorServiceClient<Channel> {
    let config = client_config(
        &Trust::Ca(bundle.ca_pem.clone()),
        Some(&ClientCert {
            cert_pem: bundle.cert_pem.clone(),
            key_pem: bundle.key_pem.clone(),
        }),
    )
    .expect("client config");
    OperatorServiceClient::new(channel(addr, config, Duration::from_secs(5)).expect("channel"))
}

/// An agent running in this process.
pub struct TestAgent {
    pub host: String,
    pub data_dir: PathBuf,
    pub status: watch::Receiver<AgentStatus>,
    pub outbox: Outbox,
    pub jobs: drover_agent::jobs::JobQueue,
    /// The parts the agent's watchdog checks.
    pub liveness: drover_daemon::Liveness,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), drover_agent::AgentError>>,
}

/// Test-friendly agent timings.
pub fn fast_agent_config(data_dir: &Path, controller: &str) -> AgentConfig {
    AgentConfig {
        controller: controller.to_string(),
        data_dir: data_dir.to_path_buf(),
        heartbeat_interval: Duration::from_secs(1),
        health_interval: Duration::from_secs(5),
        health_sample_interval: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(2),
        secrets_dir: data_dir.join("secrets"),
        lock_lease: Duration::from_secs(5),
        source: "test".into(),
        ..AgentConfig::default()
    }
}

impl TestAgent {
    /// Enrolls a new agent for `host` in `data_dir` with a fresh token, then starts it
    /// talking to `connect_to` (the controller, or a proxy in front of it).
    pub async fn enroll_and_start(
        controller: &TestController,
        host: &str,
        data_dir: &Path,
        connect_to: &str,
    ) -> TestAgent {
        let token = controller.token(host).await;
        drover_agent::enroll::enroll(&controller.addr.to_string(), &token, data_dir)
            .await
            .expect("enroll");
        TestAgent::start(fast_agent_config(data_dir, connect_to)).await
    }

    pub async fn start(config: AgentConfig) -> TestAgent {
        let data_dir = config.data_dir.clone();
        let agent = Agent::open(config).expect("open agent");
        let host = agent.host().to_string();
        let status = agent.status();
        let outbox = agent.outbox();
        let jobs = agent.jobs();
        let liveness = agent.liveness();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        TestAgent {
            host,
            data_dir,
            status,
            outbox,
            jobs,
            liveness,
            shutdown,
            task,
        }
    }

    pub async fn wait_connected(&mut self) {
        tokio::time::timeout(
            Duration::from_secs(20),
            self.status.wait_for(|s| s.connected),
        )
        .await
        .expect("agent connects within 20s")
        .expect("agent status");
    }

    pub async fn record(&self, message: &str) -> u64 {
        self.outbox
            .record(NewEvent {
                job_id: "test-job".into(),
                kind: "test".into(),
                message: message.to_string(),
                fields: BTreeMap::new(),
                payload: None,
            })
            .await
            .expect("record event")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("agent stops within 10s")
            .expect("agent task")
            .expect("agent run");
    }
}

/// A TCP proxy on 127.0.0.1 in front of the controller: `cut()` drops every live connection
/// (a network blip), `freeze()` stops forwarding bytes without closing anything (a silent
/// host), `retarget()` follows a restarted controller.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    generation: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
    shutdown: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let (generation, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let (t, g, f, s) = (
            target.clone(),
            generation.clone(),
            frozen.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let to = *t.lock().unwrap();
                let mut gen_rx = g.subscribe();
                let start_gen = *gen_rx.borrow();
                let frozen_rx = f.subscribe();
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pipe = async {
                        tokio::join!(
                            copy(cr, sw, frozen_rx.clone()),
                            copy(sr, cw, frozen_rx.clone())
                        );
                    };
                    tokio::select! {
                        _ = pipe => {}
                        _ = s.cancelled() => {}
                        _ = gen_rx.wait_for(|g| *g != start_gen) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            target,
            generation,
            frozen,
            shutdown,
        }
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // While frozen, hold the bytes: the peer sees silence, not a closed connection.
        if frozen.wait_for(|f| !*f).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Path of a workspace binary (built by `cargo build --workspace` / `cargo test --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> (drover-bench) ->
    // target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Whether the Docker Engine answers. Under `CI=true` a missing Engine fails the test that
/// asked; elsewhere the test prints why it skips and returns.
pub fn docker_available(test: &str) -> bool {
    let ok = std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: the Docker Engine is not reachable, and CI needs it");
        }
        eprintln!("skipping {test}: the Docker Engine is not reachable");
    }
    ok
}

/// Makes sure the test app images exist (`scripts/testapp-image.sh`, idempotent) and returns
/// the image name for `tag`.
pub fn testapp_image(tag: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/testapp-image.sh"))
        .arg(tag)
        .status()
        .expect("run scripts/testapp-image.sh");
    assert!(status.success(), "scripts/testapp-image.sh {tag} failed");
    format!("drover-testapp:{tag}")
}

/// A container removed when dropped.
pub struct Container {
    pub id: String,
}

impl Container {
    /// `docker run -d` with `args` before the image; publishes container port 8080 on
    /// 127.0.0.1 at a free port.
    pub fn run(image: &str, args: &[&str]) -> Container {
        let out = std::process::Command::new("docker")
            .args(["run", "-d", "-p", "127.0.0.1::8080"])
            .args(args)
            .arg(image)
            .output()
            .expect("docker run");
        assert!(
            out.status.success(),
            "docker run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container {
            id: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }

    /// The host address of the container's port 8080.
    pub fn addr(&self) -> SocketAddr {
        let out = std::process::Command::new("docker")
            .args(["port", &self.id, "8080/tcp"])
            .output()
            .expect("docker port");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no published port for {}: {text}", self.id))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.id])
            .output();
    }
}

/// A minimal HTTP/1.0 request over a fresh connection: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::AsyncReadExt;
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs the real `drover` CLI against `addr` with the identity in `identity` (its own HOME,
/// so the user's ~/.config/drover stays out of the test).
pub fn drover_cli(addr: &str, identity: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("drover"))
        .args(args)
        .env("DROVER_CONTROLLER", addr)
        .env("DROVER_IDENTITY", identity)
        .env("HOME", identity)
        .output()
        .expect("run drover")
}

/// Opens a WebSocket to `ws://{addr}/ws`, sends `text` and asserts it comes back.
pub async fn assert_ws_echo(addr: SocketAddr, text: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("WebSocket upgrade");
    ws.send(Message::text(text)).await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an echo within 5s")
        .expect("a message")
        .expect("a good message");
    assert_eq!(echoed, Message::text(text));
}

/// An agent session driven by the test itself over real mTLS, with a real enrolled agent
/// certificate: it says Hello, sends the job events the test scripts (numbered like the
/// agent's outbox), and collects the commands the controller sends. A test of the controller,
/// not of the agent.
pub struct ScriptedAgent {
    pub host: String,
    /// The controller's `Welcome.acked_seq`: the highest event seq it holds for this host.
    pub welcome_seq: u64,
    seq: u64,
    tx: tokio::sync::mpsc::Sender<v1::AgentMessage>,
    rx: tonic::Streaming<v1::ControllerMessage>,
    commands: std::collections::VecDeque<v1::Command>,
    cancels: std::collections::VecDeque<v1::Cancel>,
    acked: u64,
}

/// How long a scripted agent waits for the controller.
const SCRIPT_PATIENCE: Duration = Duration::from_secs(10);

impl ScriptedAgent {
    /// Enrolls `host` with a token carrying `labels` (key made in `dir`, as `drover-agent
    /// enroll` does) and returns its identity.
    pub async fn enroll(
        controller: &TestController,
        host: &str,
        labels: &[(&str, &str)],
        dir: &Path,
    ) -> Bundle {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let token = controller.token_with_labels(host, labels).await;
        drover_agent::enroll::enroll(&controller.addr.to_string(), &token, dir)
            .await
            .expect("enroll");
        Bundle::load(&dir.join("identity")).expect("agent identity")
    }

    /// Opens a session as `host`: Hello, then waits for Welcome. Event numbering continues
    /// after what the controller already holds.
    pub async fn connect(addr: &str, bundle: &Bundle, host: &str) -> ScriptedAgent {
        let config = client_config(
            &Trust::Ca(bundle.ca_pem.clone()),
            Some(&ClientCert {
                cert_pem: bundle.cert_pem.clone(),
                key_pem: bundle.key_pem.clone(),
            }),
        )
        .expect("client config");
        let mut client = v1::agent_service_client::AgentServiceClient::new(
            channel(addr, config, Duration::from_secs(5)).expect("channel"),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
                host: host.to_string(),
                agent_version: "scripted".into(),
                ..Default::default()
            })),
        })
        .await
        .expect("queue Hello");
        let mut stream = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("open session")
            .into_inner();
        let first = tokio::time::timeout(SCRIPT_PATIENCE, stream.message())
            .await
            .expect("Welcome within 10s")
            .expect("session stream");
        let Some(v1::ControllerMessage {
            msg: Some(v1::controller_message::Msg::Welcome(welcome)),
        }) = first
        else {
            panic!("expected Welcome first, got {first:?}");
        };
        ScriptedAgent {
            host: host.to_string(),
            welcome_seq: welcome.acked_seq,
            seq: welcome.acked_seq,
            tx,
            rx: stream,
            commands: Default::default(),
            cancels: Default::default(),
            acked: welcome.acked_seq,
        }
    }

    /// Reads one message from the controller, keeping commands and acks.
    async fn read(&mut self) -> v1::controller_message::Msg {
        use v1::controller_message::Msg;
        let msg = tokio::time::timeout(SCRIPT_PATIENCE, self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("{}: the controller said nothing for 10s", self.host))
            .unwrap_or_else(|s| panic!("{}: session broke: {s:?}", self.host))
            .unwrap_or_else(|| panic!("{}: session ended", self.host))
            .msg
            .unwrap_or_else(|| panic!("{}: empty message", self.host));
        match &msg {
            Msg::Command(c) => self.commands.push_back(c.clone()),
            Msg::Cancel(c) => self.cancels.push_back(c.clone()),
            Msg::Ack(a) => self.acked = self.acked.max(a.upto_seq),
            _ => {}
        }
        msg
    }

    /// The next command the controller sends (or sent already).
    pub async fn next_command(&mut self) -> v1::Command {
        loop {
            if let Some(c) = self.commands.pop_front() {
                return c;
            }
            self.read().await;
        }
    }

    /// The next `Cancel` the controller sends (or sent already).
    pub async fn next_cancel(&mut self) -> v1::Cancel {
        loop {
            if let Some(c) = self.cancels.pop_front() {
                return c;
            }
            self.read().await;
        }
    }

    /// How many `Cancel`s arrived and were not taken yet.
    pub fn cancels_seen(&self) -> usize {
        self.cancels.len()
    }

    /// Asserts that no command is waiting: a heartbeat's reply comes back with none before it
    /// (the controller sends due commands before it reads anything from a new session, and
    /// dispatches before it acknowledges the event that made a command due).
    pub async fn assert_no_command(&mut self) {
        use v1::controller_message::Msg;
        self.send_msg(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {
            sent_unix_ms: drover_controller::server::now_ms(),
        }))
        .await;
        loop {
            if let Some(c) = self.commands.front() {
                panic!("{}: unexpected command {c:?}", self.host);
            }
            if let Msg::HeartbeatAck(_) = self.read().await {
                break;
            }
        }
        if let Some(c) = self.commands.front() {
            panic!("{}: unexpected command {c:?}", self.host);
        }
    }

    async fn send_msg(&mut self, msg: v1::agent_message::Msg) {
        self.tx
            .send(v1::AgentMessage { msg: Some(msg) })
            .await
            .expect("session open");
    }

    /// Sends the next event (`kind` from `drover_model::jobevent`) and waits until the
    /// controller acknowledges it (stored and flushed). Returns its seq.
    pub async fn event(
        &mut self,
        job_id: &str,
        kind: &str,
        message: &str,
        fields: &[(&str, &str)],
    ) -> u64 {
        let fields = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.event_with(job_id, kind, message, fields).await
    }

    /// [`ScriptedAgent::event`] with a ready field map.
    pub async fn event_with(
        &mut self,
        job_id: &str,
        kind: &str,
        message: &str,
        fields: BTreeMap<String, String>,
    ) -> u64 {
        self.event_carrying(job_id, kind, message, fields, None)
            .await
    }

    /// The event of `payload`'s kind that carries it, with the fields that name what it is
    /// about, as the agent sends `app.releases`, `backup.catalog` and `backup.verification`.
    pub async fn send_payload(
        &mut self,
        job_id: &str,
        payload: drover_model::jobevent::Payload,
    ) -> u64 {
        let (kind, fields) = (payload.event_kind(), payload.fields());
        self.event_carrying(job_id, kind, "", fields, Some(payload))
            .await
    }

    /// `app.releases` of `app` carrying `releases`, as the agent sends it after a deploy.
    pub async fn send_releases(
        &mut self,
        app: &str,
        releases: &[drover_model::jobevent::Release],
    ) -> u64 {
        let releases = releases.to_vec();
        let app = app.to_string();
        self.send_payload(
            "",
            drover_model::jobevent::Payload::Releases { app, releases },
        )
        .await
    }

    /// `backup.catalog` of `target` under `job_id`, carrying `backups`.
    pub async fn send_catalog(
        &mut self,
        job_id: &str,
        target: &str,
        backups: &[drover_model::backup::catalog::Backup],
    ) -> u64 {
        let (target, backups) = (target.to_string(), backups.to_vec());
        self.send_payload(
            job_id,
            drover_model::jobevent::Payload::Catalog { target, backups },
        )
        .await
    }

    /// `backup.verification` under `job_id`, carrying `v`.
    pub async fn send_verification(
        &mut self,
        job_id: &str,
        v: &drover_model::backup::catalog::Verification,
    ) -> u64 {
        let payload = drover_model::jobevent::Payload::Verification(Box::new(v.clone()));
        self.send_payload(job_id, payload).await
    }

    /// An event that carries a typed record, as the agent sends `app.releases`,
    /// `backup.catalog` and `backup.verification`: the kind's scalar fields (`app`, `target`)
    /// beside the payload.
    pub async fn event_carrying(
        &mut self,
        job_id: &str,
        kind: &str,
        message: &str,
        fields: BTreeMap<String, String>,
        payload: Option<drover_model::jobevent::Payload>,
    ) -> u64 {
        let wire = payload.as_ref().map(drover_proto::payload::to_proto);
        self.event_wire(job_id, kind, message, fields, wire).await
    }

    /// An event with a payload as it goes on the wire, which may be one no agent would send.
    pub async fn event_wire(
        &mut self,
        job_id: &str,
        kind: &str,
        message: &str,
        fields: BTreeMap<String, String>,
        payload: Option<v1::job_event::Payload>,
    ) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        self.send_msg(v1::agent_message::Msg::Event(v1::JobEvent {
            seq,
            job_id: job_id.to_string(),
            at_unix_ms: drover_controller::server::now_ms(),
            kind: kind.to_string(),
            message: message.to_string(),
            fields: fields.into_iter().collect(),
            host: String::new(),
            payload,
        }))
        .await;
        while self.acked < seq {
            self.read().await;
        }
        seq
    }

    /// Starts and finishes job `id` as the agent would, with `result` (`succeeded`,
    /// `failed`, `rolled_back`, …).
    pub async fn finish_job(&mut self, id: &str, result: &str) {
        use drover_model::jobevent::{self, field};
        self.event(id, jobevent::STARTED, "", &[]).await;
        self.event(id, jobevent::FINISHED, "", &[(field::RESULT, result)])
            .await;
    }

    /// Reads until the controller ends the session: `Err` with the status it ended it with,
    /// `Ok` for a plain end of stream.
    pub async fn ended(mut self) -> Result<(), tonic::Status> {
        loop {
            let next = tokio::time::timeout(SCRIPT_PATIENCE, self.rx.message())
                .await
                .unwrap_or_else(|_| panic!("{}: the session did not end within 10s", self.host));
            match next {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
    }

    /// Ends the session (the agent goes away).
    pub fn close(self) {
        drop(self);
    }
}
