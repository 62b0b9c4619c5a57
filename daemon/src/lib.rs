//! Process plumbing shared by the two daemons (`drover-agent` and `drover-controller`): logging
//! set-up, the one shutdown signal, the open-file limit, systemd notifications, and the
//! watchdog's check of the parts that must keep running ([`Liveness`]).

use std::time::{Duration, Instant};

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

/// How often a part registered with a heartbeat beats while it waits for work.
pub const BEAT_EVERY: Duration = Duration::from_secs(5);

/// The ticker a waiting loop beats from: every [`BEAT_EVERY`], late ticks delayed rather than
/// bunched up.
pub fn beat_ticker() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(BEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// How long a part registered with a heartbeat may stay silent before it counts as hung: a
/// minute, and never less than twice the systemd watchdog's interval (so one slow tick never
/// costs a restart). Many beats fit in it ([`BEAT_EVERY`]).
pub fn max_silence() -> Duration {
    let mut usec = 0u64;
    let watchdog = if sd_notify::watchdog_enabled(false, &mut usec) {
        Duration::from_micros(usec)
    } else {
        Duration::ZERO
    };
    Duration::from_secs(60).max(watchdog * 2)
}

/// The long-lived parts of a daemon (loops and tasks), for the watchdog: each registers a
/// [`Part`] and finishes it when it ends on purpose; a part dropped unfinished (its task
/// panicked or returned early) counts as stopped. A part registered with a heartbeat
/// ([`Liveness::part_with_heartbeat`]) also counts as stopped, as hung, once it has not beaten
/// for its maximum silence; it is watched from its first beat, so a loop beats only where it
/// idles (waiting for work), never across work that may rightly take long.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    parts: std::sync::Arc<std::sync::Mutex<LivenessParts>>,
}

#[derive(Debug, Default)]
struct LivenessParts {
    next: u64,
    parts: std::collections::BTreeMap<u64, PartState>,
}

/// What the watchdog's rule knows of one registered part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartState {
    pub name: String,
    /// False once the part was dropped unfinished.
    pub running: bool,
    /// For a part with a heartbeat: the longest it may stay silent.
    pub max_silence: Option<Duration>,
    /// Its last beat (None before the first).
    pub last_beat: Option<Instant>,
}

impl PartState {
    /// A running part without a heartbeat.
    pub fn running(name: impl Into<String>) -> PartState {
        PartState {
            name: name.into(),
            running: true,
            max_silence: None,
            last_beat: None,
        }
    }
}

/// One registered part; see [`Liveness`].
#[derive(Debug)]
pub struct Part {
    live: Liveness,
    id: u64,
    finished: bool,
}

/// Beats for a part registered with a heartbeat; cheap to clone into the loop that beats.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    live: Liveness,
    id: u64,
}

impl Liveness {
    /// Registers a running part named `name` (e.g. "job runner", "proxy of api").
    pub fn part(&self, name: impl Into<String>) -> Part {
        self.register(PartState::running(name))
    }

    /// Registers a running part that must also beat (see [`Part::heartbeat`]) at least every
    /// `max_silence` once it has beaten the first time.
    pub fn part_with_heartbeat(&self, name: impl Into<String>, max_silence: Duration) -> Part {
        self.register(PartState {
            max_silence: Some(max_silence),
            ..PartState::running(name)
        })
    }

    fn register(&self, state: PartState) -> Part {
        let mut parts = self.lock();
        let id = parts.next;
        parts.next += 1;
        parts.parts.insert(id, state);
        Part {
            live: self.clone(),
            id,
            finished: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LivenessParts> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ok while every registered part runs (and beats, if it must); else the names of those
    /// that stopped.
    pub fn check(&self) -> Result<(), Stopped> {
        let parts = self.lock();
        stopped_parts(parts.parts.values(), Instant::now())
    }
}

impl Part {
    /// The handle the part's loop beats with.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            live: self.live.clone(),
            id: self.id,
        }
    }

    /// The part ended on purpose (shutdown, a proxy replaced): it no longer counts.
    pub fn finish(mut self) {
        self.finished = true;
        self.live.lock().parts.remove(&self.id);
    }
}

impl Heartbeat {
    /// The part is alive now.
    pub fn beat(&self) {
        if let Some(part) = self.live.lock().parts.get_mut(&self.id) {
            part.last_beat = Some(Instant::now());
        }
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(part) = self.live.lock().parts.get_mut(&self.id) {
            part.running = false;
        }
    }
}

/// Runs `work` as `part`: finished when `work` returns, stopped if it panics.
pub async fn tracked<F: std::future::Future>(part: Part, work: F) -> F::Output {
    let out = work.await;
    part.finish();
    out
}

/// The watchdog's rule (pure): Ok when no part stopped or went silent at `now`, else one line
/// naming each that did (a silent one with how long: `job runner: no heartbeat for 95 s`).
pub fn stopped_parts<'a>(
    parts: impl IntoIterator<Item = &'a PartState>,
    now: Instant,
) -> Result<(), Stopped> {
    let stopped: Vec<String> = parts
        .into_iter()
        .filter_map(|part| {
            if !part.running {
                return Some(part.name.clone());
            }
            let (max, last) = (part.max_silence?, part.last_beat?);
            let silent = now.saturating_duration_since(last);
            (silent > max)
                .then(|| format!("{}: no heartbeat for {} s", part.name, silent.as_secs()))
        })
        .collect();
    if stopped.is_empty() {
        Ok(())
    } else {
        Err(Stopped(stopped))
    }
}

/// The parts that stopped, by name: why the watchdog is not pinged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stopped: {}", .0.join(", "))]
pub struct Stopped(pub Vec<String>);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_watchdog_check_names_a_part_whose_task_panicked() {
        let live = Liveness::default();
        assert_eq!(live.check().map_err(|e| e.to_string()), Ok(()));
        let runner = live.part("job runner");
        let proxy = live.part("proxy of api");
        assert_eq!(live.check().map_err(|e| e.to_string()), Ok(()));
        // A part whose task panics is dropped unfinished.
        let task = tokio::spawn(tracked(runner, async { panic!("a bug") }));
        assert!(task.await.is_err());
        assert_eq!(
            live.check().map_err(|e| e.to_string()),
            Err("stopped: job runner".to_string())
        );
        // A part that ends on purpose no longer counts.
        proxy.finish();
        tokio::spawn(tracked(live.part("proxy of web"), async {}))
            .await
            .unwrap();
        assert_eq!(
            live.check().map_err(|e| e.to_string()),
            Err("stopped: job runner".to_string())
        );
        let _session = live.part("session loop");
        drop(live.part("health sampler"));
        assert_eq!(
            live.check().map_err(|e| e.to_string()),
            Err("stopped: job runner, health sampler".to_string())
        );
    }

    fn beating(name: &str, max_s: u64, last: Option<Instant>) -> PartState {
        PartState {
            max_silence: Some(Duration::from_secs(max_s)),
            last_beat: last,
            ..PartState::running(name)
        }
    }

    #[test]
    fn a_part_that_stopped_beating_is_named_with_its_silence() {
        let t0 = Instant::now();
        let parts = [
            beating("job runner", 60, Some(t0)),
            PartState::running("proxy of api"),
        ];
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(stopped_parts(&parts, at(60)), Ok(()));
        assert_eq!(
            stopped_parts(&parts, at(95)).unwrap_err().to_string(),
            "stopped: job runner: no heartbeat for 95 s"
        );
    }

    #[test]
    fn a_part_that_beats_or_has_not_begun_to_is_not_named() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(300);
        let parts = [
            // Beat just now.
            beating("job runner", 60, Some(later - Duration::from_secs(4))),
            // Not watched before its first beat (recovery may take long).
            beating("session loop", 60, None),
        ];
        assert_eq!(stopped_parts(&parts, later), Ok(()));
    }

    #[test]
    fn finished_parts_do_not_count_and_a_dropped_one_does() {
        let live = Liveness::default();
        let runner = live.part_with_heartbeat("job runner", Duration::from_secs(60));
        let beat = runner.heartbeat();
        beat.beat();
        assert_eq!(live.check(), Ok(()));
        runner.finish();
        // A beat after the part ended changes nothing.
        beat.beat();
        assert_eq!(live.check(), Ok(()));
        let t0 = Instant::now();
        let dead = PartState {
            running: false,
            ..beating("controller port", 60, Some(t0))
        };
        assert_eq!(
            stopped_parts([&dead], t0 + Duration::from_secs(1))
                .unwrap_err()
                .to_string(),
            "stopped: controller port"
        );
    }
}
