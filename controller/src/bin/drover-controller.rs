//! `drover-controller`: the control-plane daemon (`run`) and the one-machine dev environment
//! (`dev`). Thin: configuration, logging, signals and systemd; the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drover_controller::{Controller, ControllerConfig};
use drover_daemon::{self as daemon, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "drover-controller",
    version,
    about = "The Drover control plane"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller daemon.
    Run {
        /// TOML config file (see systemd/controller.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides `log_format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Start a controller and an enrolled local agent, state under --dir.
    Dev {
        #[arg(long, default_value = ".drover-dev")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
}

fn main() {
    let args = Args::parse();
    drover_identity::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(args)));
    if let Err(err) = result {
        eprintln!("drover-controller: error: {err:#}");
        let code = match err.downcast_ref::<drover_controller::ControllerError>() {
            Some(drover_controller::ControllerError::Config(_)) => 78,
            _ => 1,
        };
        std::process::exit(code);
    }
}

async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Run {
            config,
            data_dir,
            listen,
            log_format,
        } => {
            let mut cfg = match &config {
                Some(path) => ControllerConfig::from_file(path)
                    .map_err(drover_controller::ControllerError::from)?,
                None => ControllerConfig::default(),
            };
            if let Some(dir) = data_dir {
                cfg.data_dir = dir;
            }
            if let Some(addr) = listen {
                cfg.listen = addr;
            }
            if let Some(format) = log_format {
                cfg.log_format = format;
            }
            daemon::init_logging(cfg.log_format);
            let shutdown = daemon::shutdown_on_signals().context("installing signal handlers")?;
            let listen = cfg.listen;
            let controller = Controller::open(cfg)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| {
                    format!("cannot listen on {listen} (in use? set `listen` or --listen)")
                })?;
            daemon::notify_ready();
            // Pinged while the port's accept loop and the background tasks run and the store
            // takes a write.
            let (liveness, shared) = (controller.liveness(), controller.shared());
            daemon::spawn_watchdog(shutdown.clone(), move || {
                let (check, shared) = (liveness.check().map_err(|e| e.to_string()), shared.clone());
                async move {
                    check?;
                    shared
                        .store
                        .probe_writable(drover_controller::server::now_ms())
                        .await
                        .map_err(|e| format!("the store does not take writes: {e}"))
                }
            });
            let result = controller.serve(listener, shutdown).await;
            daemon::notify_stopping();
            result?;
            Ok(())
        }
        Command::Dev {
            dir,
            listen,
            log_format,
        } => {
            daemon::init_logging(log_format);
            let shutdown = daemon::shutdown_on_signals().context("installing signal handlers")?;
            drover_controller::dev::run(&dir, listen, shutdown).await?;
            Ok(())
        }
    }
}
