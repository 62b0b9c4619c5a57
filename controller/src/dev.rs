//! `drover-controller dev`: a controller and an enrolled local agent in one process, all state
//! under one directory (default `./.drover-dev`), for trying Drover on one machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use drover_agent::{Agent, AgentConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::ControllerConfig;
use crate::server::{Controller, admin_bundle_dir};

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
    #[error(transparent)]
    Agent(#[from] drover_agent::AgentError),
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

/// Runs the dev environment until `shutdown`. `redactor`: the secrets the agent's jobs learn,
/// shared with the process's log writer (`daemon::init_logging_redacted`).
pub async fn run(
    dir: &Path,
    listen: SocketAddr,
    shutdown: CancellationToken,
    redactor: drover_agent::redact::Redactor,
) -> Result<(), DevError> {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(dir)
    };
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

    let host = local_host_name();
    let agent_paths = drover_agent::enroll::Paths::new(&agent_dir);
    if !drover_identity::files::Bundle::exists(&agent_paths.identity_dir) {
        let mut labels = BTreeMap::new();
        labels.insert("env".to_string(), "dev".to_string());
        let (token, _) = crate::operator::issue_token(&shared, &host, labels, None, "dev")
            .await
            .map_err(|s| DevError::Token(s.message().to_string()))?;
        drover_agent::enroll::enroll(&addr.to_string(), &token.encode(), &agent_dir).await?;
        info!(host = %host, "local agent enrolled");
    }
    let agent = Agent::open(AgentConfig {
        controller: addr.to_string(),
        data_dir: agent_dir.clone(),
        secrets_dir: agent_dir.join("secrets"),
        source: "drover-controller dev".into(),
        ..AgentConfig::default()
    })?
    .with_redactor(redactor);
    let agent_host = agent.host().to_string();
    let mut status = agent.status();
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    // Print the commands once the agent is connected, so the first `drover hosts` shows it.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        status.wait_for(|s| s.connected),
    )
    .await;

    let identity = relative(&admin_bundle_dir(&controller_dir));
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
        state = relative(&dir),
    );
    let _ = agent_task.await;
    match server.await {
        Ok(result) => result?,
        Err(err) => tracing::warn!(error = %err, "controller task ended abnormally"),
    }
    Ok(())
}

fn relative(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    match path.strip_prefix(&cwd) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => PathBuf::from(path).display().to_string(),
    }
}
