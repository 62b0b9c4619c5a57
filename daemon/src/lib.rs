//! Process plumbing shared by the two daemons (`drover-agent` and `drover-controller`): logging
//! set-up, the one shutdown signal, the open-file limit, systemd notifications, and the
//! watchdog's check of the parts that must keep running ([`Liveness`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (ANSI colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Initialises tracing on stderr. `RUST_LOG` overrides the default `info` level.
/// Safe to call more than once (later calls do nothing), which tests rely on.
pub fn init_logging(format: LogFormat) {
    init_logging_to(format, std::io::stderr);
}

/// [`init_logging`], writing each line through `writer` (the agent passes one that cuts the
/// secrets its jobs learn out of every line).
pub fn init_logging_to<W>(format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Returns a token cancelled on the first SIGTERM or SIGINT: the one shutdown path.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
        t.cancel();
    });
    Ok(token)
}

/// The process's open-file limit now (the soft RLIMIT_NOFILE; "unlimited" read as 2^20, the
/// kernel's default ceiling).
pub fn open_files_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does: the soft 1024 is
/// for select(2), which nothing here uses) and returns (the limit before, the limit now).
/// A failure leaves the limit as it was.
pub fn raise_open_files_limit() -> (u64, u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let soft = before.current.unwrap_or(1 << 20);
    let hard = before.maximum.unwrap_or(1 << 20);
    if soft < hard {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: before.maximum,
            },
        );
    }
    (soft, open_files_limit())
}

/// Tells systemd the daemon serves (no-op outside systemd).
pub fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Tells systemd the daemon is stopping (no-op outside systemd).
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Pings the systemd watchdog at half its interval while `healthy` says the daemon works,
/// until shutdown; when it does not, says why once (and again when the reason changes) and
/// stops pinging, so systemd restarts a daemon whose parts stopped. Does nothing when systemd
/// did not ask for a watchdog.
pub fn spawn_watchdog<F, Fut>(
    shutdown: CancellationToken,
    healthy: F,
) -> Option<tokio::task::JoinHandle<()>>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        let mut said = None::<String>;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match healthy().await {
                Ok(()) => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    said = None;
                }
                Err(why) => {
                    if said.as_deref() != Some(why.as_str()) {
                        tracing::error!(reason = %why, "not pinging the systemd watchdog: systemd will restart the daemon");
                        said = Some(why);
                    }
                }
            }
        }
    }))
}

/// The long-lived parts of a daemon (loops and tasks), for the watchdog: each registers a
/// [`Part`] and finishes it when it ends on purpose; a part dropped unfinished (its task
/// panicked or returned early) counts as stopped.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    parts: std::sync::Arc<std::sync::Mutex<LivenessParts>>,
}

#[derive(Debug, Default)]
struct LivenessParts {
    next: u64,
    /// Part id → (name, still running).
    parts: std::collections::BTreeMap<u64, (String, bool)>,
}

/// One registered part; see [`Liveness`].
#[derive(Debug)]
pub struct Part {
    live: Liveness,
    id: u64,
    finished: bool,
}

impl Liveness {
    /// Registers a running part named `name` (e.g. "job runner", "proxy of api").
    pub fn part(&self, name: impl Into<String>) -> Part {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let id = parts.next;
        parts.next += 1;
        parts.parts.insert(id, (name.into(), true));
        Part {
            live: self.clone(),
            id,
            finished: false,
        }
    }

    /// Ok while every registered part runs; else the names of those that stopped.
    pub fn check(&self) -> Result<(), String> {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        stopped_parts(parts.parts.values())
    }
}

impl Part {
    /// The part ended on purpose (shutdown, a proxy replaced): it no longer counts.
    pub fn finish(mut self) {
        self.finished = true;
        let mut parts = self.live.parts.lock().unwrap_or_else(|e| e.into_inner());
        parts.parts.remove(&self.id);
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut parts = self.live.parts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(part) = parts.parts.get_mut(&self.id) {
            part.1 = false;
        }
    }
}

/// Runs `work` as `part`: finished when `work` returns, stopped if it panics.
pub async fn tracked<F: std::future::Future>(part: Part, work: F) -> F::Output {
    let out = work.await;
    part.finish();
    out
}

/// The watchdog's rule (pure): Ok when no part stopped, else one line naming each that did.
pub fn stopped_parts<'a>(
    parts: impl IntoIterator<Item = &'a (String, bool)>,
) -> Result<(), String> {
    let stopped: Vec<&str> = parts
        .into_iter()
        .filter(|(_, running)| !running)
        .map(|(name, _)| name.as_str())
        .collect();
    if stopped.is_empty() {
        Ok(())
    } else {
        Err(format!("stopped: {}", stopped.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_watchdog_check_names_a_part_whose_task_panicked() {
        let live = Liveness::default();
        assert_eq!(live.check(), Ok(()));
        let runner = live.part("job runner");
        let proxy = live.part("proxy of api");
        assert_eq!(live.check(), Ok(()));
        // A part whose task panics is dropped unfinished.
        let task = tokio::spawn(tracked(runner, async { panic!("a bug") }));
        assert!(task.await.is_err());
        assert_eq!(live.check(), Err("stopped: job runner".to_string()));
        // A part that ends on purpose no longer counts.
        proxy.finish();
        tokio::spawn(tracked(live.part("proxy of web"), async {}))
            .await
            .unwrap();
        assert_eq!(live.check(), Err("stopped: job runner".to_string()));
        let _session = live.part("session loop");
        drop(live.part("health sampler"));
        assert_eq!(
            live.check(),
            Err("stopped: job runner, health sampler".to_string())
        );
    }
}
