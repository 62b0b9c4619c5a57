//! `drover-controller dev`: a controller and an enrolled local agent with one command, all state
//! under one directory (default `./.drover-dev`), for trying Drover on one machine. The
//! controller runs in this process; the agent is the `drover-agent` binary next to this one,
//! run as a child (enrolled with a token the first time) and stopped with SIGTERM on Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::ControllerConfig;
use crate::operators::admin_bundle_dir;
use crate::server::Controller;

/// Errors of the dev environment, each naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(
        "cannot listen on {addr}: {source} (is another controller running? pick another with --listen)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Controller(#[from] crate::ControllerError),
    #[error(
        "the local agent binary {0} is missing: build all three binaries (`cargo build --release --bins`)"
    )]
    AgentMissing(PathBuf),
    #[error("cannot start the local agent {path}: {source}")]
    AgentSpawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("enrolling the local agent failed ({0}); its error is printed above")]
    Enroll(ExitStatus),
    #[error("the local agent exited ({0}); its error is printed above")]
    AgentExited(ExitStatus),
    #[error("writing the local agent's config {path}: {source}")]
    AgentConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the enrollment token: {0}")]
    Token(String),
}

/// This machine's host name made into a valid Drover name.
pub fn local_host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned
        .trim_start_matches(['-', '.', '_'])
        .chars()
        .take(63)
        .collect::<String>();
    if drover_identity::validate_name(&cleaned).is_ok() {
        cleaned
    } else {
        "dev-host".to_string()
    }
}

fn drover_command() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("drover")))
        .filter(|p| p.exists())
        .map(|p| {
            let cwd = std::env::current_dir().unwrap_or_default();
            match p.strip_prefix(&cwd) {
                Ok(rel) => format!("./{}", rel.display()),
                Err(_) => p.display().to_string(),
            }
        })
        .unwrap_or_else(|| "drover".to_string())
}

/// The `drover-agent` binary beside this program.
fn agent_binary() -> Result<PathBuf, DevError> {
    let exe = std::env::current_exe().unwrap_or_default();
    let path = exe
        .parent()
        .map(|d| d.join("drover-agent"))
        .unwrap_or_else(|| PathBuf::from("drover-agent"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(DevError::AgentMissing(path))
    }
}

/// The dev agent's config file: this controller, state and secrets under the dev directory.
fn agent_config(controller: SocketAddr, agent_dir: &Path) -> String {
    let quoted = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    format!(
        "# Written by `drover-controller dev` at each start.\n\
         controller = \"{controller}\"\n\
         data_dir = {}\n\
         secrets_dir = {}\n",
        quoted(agent_dir),
        quoted(&agent_dir.join("secrets")),
    )
}

/// Runs the dev environment until `shutdown`: the controller here, the agent as a child that
/// gets SIGTERM when `shutdown` fires. The agent's own exit ends the environment with an error.
pub async fn run(
    dir: &Path,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), DevError> {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(dir)
    };
    let agent_bin = agent_binary()?;
    let controller_dir = dir.join("controller");
    let agent_dir = dir.join("agent");
    let config = ControllerConfig {
        listen,
        data_dir: controller_dir.clone(),
        source: "drover-controller dev".into(),
        ..ControllerConfig::default()
    };
    let controller = Controller::open(config)?;
    let shared = controller.shared();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| DevError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| DevError::Bind {
        addr: listen,
        source,
    })?;
    let server = tokio::spawn(controller.serve(listener, shutdown.clone()));
    let result = run_agent(
        &shared,
        &agent_bin,
        addr,
        &dir,
        &agent_dir,
        shutdown.clone(),
    )
    .await;
    // However the agent ended, the controller stops too.
    shutdown.cancel();
    match server.await {
        Ok(served) => served?,
        Err(err) => tracing::warn!(error = %err, "controller task ended abnormally"),
    }
    result
}

/// Enrolls the agent the first time, runs it, prints what to try once it is connected, and
/// waits for `shutdown` (then stops it) or for its exit.
async fn run_agent(
    shared: &crate::shared::Shared,
    agent_bin: &Path,
    addr: SocketAddr,
    dir: &Path,
    agent_dir: &Path,
    shutdown: CancellationToken,
) -> Result<(), DevError> {
    let spawn = |cmd: &mut Command| {
        cmd.kill_on_drop(true)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| DevError::AgentSpawn {
                path: agent_bin.to_path_buf(),
                source,
            })
    };
    let identity_dir = agent_dir.join("identity");
    if !drover_identity::files::Bundle::exists(&identity_dir) {
        let host = local_host_name();
        let mut labels = BTreeMap::new();
        labels.insert("env".to_string(), "dev".to_string());
        let (token, _) = crate::operator::issue_token(shared, &host, labels, None, "dev")
            .await
            .map_err(|s| DevError::Token(s.message().to_string()))?;
        // The token goes through the environment, not the command line `ps` shows.
        let status = spawn(
            Command::new(agent_bin)
                .args(["enroll", "--controller", &addr.to_string(), "--data-dir"])
                .arg(agent_dir)
                .env("DROVER_TOKEN", token.encode())
                .stdout(Stdio::null()),
        )?
        .wait()
        .await
        .map_err(|source| DevError::AgentSpawn {
            path: agent_bin.to_path_buf(),
            source,
        })?;
        if !status.success() {
            return Err(DevError::Enroll(status));
        }
        info!(host = %host, "local agent enrolled");
    }
    let config_path = agent_dir.join("agent.toml");
    std::fs::write(&config_path, agent_config(addr, agent_dir)).map_err(|source| {
        DevError::AgentConfig {
            path: config_path.clone(),
            source,
        }
    })?;
    let mut agent = spawn(
        Command::new(agent_bin)
            .args(["run", "--config"])
            .arg(&config_path),
    )?;
    let agent_host = enrolled_host(agent_dir).unwrap_or_else(local_host_name);
    // Print the commands once the agent is connected, so the first `drover hosts` shows it.
    let connected = shared.registry.wait_connected(&agent_host);
    tokio::select! {
        _ = tokio::time::timeout(Duration::from_secs(10), connected) => {}
        exited = agent.wait() => return exited_on_its_own(exited, agent_bin, &shutdown).await,
        _ = shutdown.cancelled() => return stop(agent).await,
    }
    print_welcome(addr, &agent_host, dir);
    tokio::select! {
        exited = agent.wait() => exited_on_its_own(exited, agent_bin, &shutdown).await,
        _ = shutdown.cancelled() => stop(agent).await,
    }
}

/// The agent ended before it was told to. Ctrl-C on a terminal signals the agent and this
/// process at once, so an exit within a second of our own shutdown is that, not a failure.
async fn exited_on_its_own(
    exited: std::io::Result<ExitStatus>,
    agent_bin: &Path,
    shutdown: &CancellationToken,
) -> Result<(), DevError> {
    if tokio::time::timeout(Duration::from_secs(1), shutdown.cancelled())
        .await
        .is_ok()
    {
        return Ok(());
    }
    Err(exit_error(exited, agent_bin))
}

/// The host name the agent enrolled as (from its `enrollment.toml`).
fn enrolled_host(agent_dir: &Path) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Enrollment {
        host: String,
    }
    let text = std::fs::read_to_string(agent_dir.join("enrollment.toml")).ok()?;
    toml::from_str::<Enrollment>(&text).ok().map(|e| e.host)
}

fn exit_error(exited: std::io::Result<ExitStatus>, agent_bin: &Path) -> DevError {
    match exited {
        Ok(status) => DevError::AgentExited(status),
        Err(source) => DevError::AgentSpawn {
            path: agent_bin.to_path_buf(),
            source,
        },
    }
}

/// Stops the agent the way systemd does: SIGTERM, then SIGKILL after 20 s.
async fn stop(mut agent: Child) -> Result<(), DevError> {
    if let Some(pid) = agent
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    match tokio::time::timeout(Duration::from_secs(20), agent.wait()).await {
        Ok(_) => Ok(()),
        Err(_) => {
            tracing::warn!("the local agent did not stop within 20 s of SIGTERM; killing it");
            let _ = agent.kill().await;
            Ok(())
        }
    }
}

fn print_welcome(addr: SocketAddr, agent_host: &str, dir: &Path) {
    let identity = relative(&admin_bundle_dir(&dir.join("controller")));
    let drover = drover_command();
    println!(
        "Drover dev environment: controller on {addr}, agent {agent_host} enrolled and connected.\n\
         State lives in {state}. Ctrl-C stops both.\n\n\
         In another terminal:\n  \
         export DROVER_CONTROLLER={addr} DROVER_IDENTITY={identity}\n  \
         {drover} hosts\n  \
         {drover} status {agent_host}\n  \
         {drover} hosts --json\n  \
         {drover} token create --host web-2 --label role=web\n  \
         {drover} token list\n  \
         {drover} operator create alice --role viewer --out ./alice\n\n         To try a zero-downtime deploy (demo images, built locally, no registry):\n           scripts/testapp-image.sh\n           {drover} app apply examples/hello.toml\n           {drover} deploy hello v1.0.0 && curl 127.0.0.1:8088/\n           {drover} deploy hello v1.1.0\n           {drover} rollback hello\n           {drover} releases hello\n",
        state = relative(dir),
    );
}

fn relative(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    match path.strip_prefix(&cwd) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => PathBuf::from(path).display().to_string(),
    }
}
