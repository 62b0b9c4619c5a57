//! `drover-agent`: enroll this host once, then run the daemon. Thin: configuration, logging,
//! signals and systemd; the work is in the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drover_agent::{Agent, AgentConfig, AgentError};
use drover_daemon::{self as daemon, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "drover-agent",
    version,
    about = "The Drover agent: runs on every host"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this host with a one-time token from `drover token create`.
    Enroll {
        /// Controller address (host:port).
        #[arg(long)]
        controller: String,
        /// The token line printed by `drover token create`.
        #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, default_value = "/var/lib/drover-agent")]
        data_dir: PathBuf,
        /// Refused: a host's labels come from its token (`drover token create --label k=v`).
        #[arg(long = "label", value_parser = refuse_label, hide = true)]
        labels: Vec<String>,
    },
    /// Run the agent daemon.
    Run {
        /// TOML config file (see systemd/agent.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `log_format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
}

/// A host does not choose its own labels: `--label` is refused (exit 2) saying where they
/// come from, rather than being an unknown flag.
fn refuse_label(_: &str) -> anyhow::Result<String> {
    anyhow::bail!(
        "a host does not choose its own labels: they come from its enrollment token; create the token with them: `drover token create --host NAME --label k=v`"
    )
}

fn main() {
    let args = Args::parse();
    drover_identity::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = runtime
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(args)));
    if let Err(err) = result {
        eprintln!("drover-agent: error: {err:#}");
        let code = match err.downcast_ref::<AgentError>() {
            Some(AgentError::Config(_)) => 78,
            Some(AgentError::NotEnrolled(_)) | Some(AgentError::AlreadyEnrolled { .. }) => 78,
            // Restarting cannot help; the unit's RestartPreventExitStatus=78 keeps it stopped.
            Some(AgentError::ReenrollRefused { .. }) => 78,
            Some(AgentError::Unreachable { .. }) => 69,
            Some(AgentError::Refused { .. }) => 77,
            _ => 1,
        };
        std::process::exit(code);
    }
}

async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Enroll {
            controller,
            token,
            data_dir,
            labels: _,
        } => {
            daemon::init_logging(LogFormat::Text);
            let enrollment = drover_agent::enroll::enroll(&controller, &token, &data_dir).await?;
            println!(
                "enrolled as host {} with the controller at {}; identity stored in {}",
                enrollment.host,
                enrollment.controller,
                data_dir.join("identity").display()
            );
            Ok(())
        }
        Command::Run {
            config,
            data_dir,
            log_format,
        } => {
            let mut cfg = match &config {
                Some(path) => AgentConfig::from_file(path).map_err(AgentError::from)?,
                None => AgentConfig::default(),
            };
            if let Some(dir) = data_dir {
                cfg.data_dir = dir;
            }
            if let Some(format) = log_format {
                cfg.log_format = format;
            }
            // One set of known secrets for the jobs' events and the log lines.
            let redactor = drover_agent::redact::Redactor::default();
            daemon::init_logging_to(
                cfg.log_format,
                drover_agent::redact::RedactingStderr {
                    redactor: redactor.clone(),
                },
            );
            let shutdown = daemon::shutdown_on_signals().context("installing signal handlers")?;
            let agent = Agent::open(cfg)?.with_redactor(redactor);
            daemon::notify_ready();
            // Pinged while the session loop, the job runner, the health sampler and every
            // proxy's accept loop run (and the runtime runs this task).
            let liveness = agent.liveness();
            daemon::spawn_watchdog(shutdown.clone(), move || {
                let check = liveness.check().map_err(|e| e.to_string());
                async move { check }
            });
            let result = agent.run(shutdown).await;
            daemon::notify_stopping();
            result?;
            Ok(())
        }
    }
}
