//! Process plumbing shared by the daemons (the agent here, the controller by depending on this
//! crate): logging set-up, the one shutdown signal, systemd notifications, and the watchdog's
//! check of the parts that must keep running ([`Liveness`]).

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
    init_logging_redacted(format, crate::redact::Redactor::default());
}

/// [`init_logging`], with every secret `redactor` knows cut out of each line (the agent
/// shares it with its jobs).
pub fn init_logging_redacted(format: LogFormat, redactor: crate::redact::Redactor) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::redact::RedactingStderr { redactor });
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

/// Errors reading or validating a daemon's TOML configuration; each names the file (and key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse into the expected shape; `at` is ", line N, key `k`" when
    /// known (one line, no caret drawing).
    #[error("invalid config file {path}{at}: {message}")]
    Parse {
        path: String,
        at: String,
        message: String,
    },
    #[error("invalid config {path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
}

/// Reads a TOML config file; the caller validates what it got.
pub fn read_toml_file<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(&text, &path.display().to_string())
}

/// Parses TOML text; `source` names it in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    source: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let (line, key) = locate(text, e.span(), e.message());
        let mut at = String::new();
        if let Some(line) = line {
            at.push_str(&format!(", line {line}"));
        }
        if let Some(key) = key {
            at.push_str(&format!(", key `{key}`"));
        }
        ConfigError::Parse {
            path: source.to_string(),
            at,
            message: one_line(e.message()),
        }
    })
}

/// toml's message without its trailing newline, on one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where a TOML error is: the 1-based line its span starts on (unless that line is blank or a
/// comment: an error about a whole document or table, such as a missing key, points there)
/// and the dotted key, from the line (`key = …` under the last `[table]` header) or from a
/// key the message names in backticks. A pure function of the text.
pub fn locate(
    text: &str,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> (Option<usize>, Option<String>) {
    let named = message
        .split('`')
        .nth(1)
        .filter(|k| !k.is_empty() && !k.contains(char::is_whitespace))
        .map(str::to_string);
    let Some(span) = span else {
        return (None, named);
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    if line.is_empty() || line.starts_with('#') {
        return (None, named);
    }
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l
            .strip_prefix("[[")
            .and_then(|r| r.split("]]").next())
            .or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()))?;
        Some(inner.trim().to_string())
    };
    if let Some(table) = header(line) {
        return (
            Some(line_no),
            // The error may be about the table itself (`unknown field `connections`` for
            // `[connections]`) or about a key inside it.
            Some(named.map_or(table.clone(), |k| {
                if table == k || table.ends_with(&format!(".{k}")) {
                    table.clone()
                } else {
                    format!("{table}.{k}")
                }
            })),
        );
    }
    let table = text.lines().take(line_no - 1).filter_map(header).last();
    let on_line = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty());
    let key = on_line.or(named).map(|k| match &table {
        Some(t) => format!("{t}.{k}"),
        None => k,
    });
    (Some(line_no), key)
}

/// Parses durations such as `5s`, `15m`, `24h` for config files and flags.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e} (examples: 5s, 15m, 24h)"))
}

/// Checks that a duration from a spec or config lies in `[min, max]`: every one has bounds,
/// so a value like `18446744073709551615s` is refused at validation instead of overflowing a
/// clock later. The message gives the bounds (the caller names the key).
pub fn check_duration(value: Duration, min: Duration, max: Duration) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!(
            "{} is out of range: give a duration from {} to {}",
            human(value),
            human(min),
            human(max)
        ));
    }
    Ok(())
}

/// Checks that a count from a spec or config lies in `[min, max]`.
pub fn check_count(value: u64, min: u64, max: u64) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!(
            "{value} is out of range: give a number from {min} to {max}"
        ));
    }
    Ok(())
}

/// A duration as people write it (`1h 30m`, `500ms`).
pub fn human(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    humantime::format_duration(d).to_string()
}

/// serde helper: a duration written as a string like `30s`.
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default)]
        watch: Option<Watch>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Watch {
        #[serde(with = "duration_str")]
        window: Duration,
    }

    fn err(text: &str) -> String {
        parse_toml::<Doc>(text, "api.toml").unwrap_err().to_string()
    }

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

    #[test]
    fn bounds_name_both_ends() {
        let s = Duration::from_secs;
        assert!(check_duration(s(5), s(1), s(10)).is_ok());
        assert_eq!(
            check_duration(Duration::MAX, s(1), s(3600)).unwrap_err(),
            format!(
                "{} is out of range: give a duration from 1s to 1h",
                humantime::format_duration(Duration::MAX)
            )
        );
        assert_eq!(
            check_duration(Duration::ZERO, s(1), s(60)).unwrap_err(),
            "0s is out of range: give a duration from 1s to 1m"
        );
        assert_eq!(
            check_count(4_294_967_295, 1, 1000).unwrap_err(),
            "4294967295 is out of range: give a number from 1 to 1000"
        );
    }

    #[test]
    fn parse_errors_are_one_line_naming_file_line_and_key() {
        let cases = [
            (
                "# an app\nname = \"api\"\n[watch]\nwindow = \"soon\"\n",
                "invalid config file api.toml, line 4, key `watch.window`: invalid duration \"soon\"",
            ),
            (
                "# an app\nname = \"api\"\nnope = 1\n",
                "invalid config file api.toml, line 3, key `nope`: unknown field `nope`",
            ),
            // A missing key: toml points at the whole document, whose first line is a comment.
            (
                "# an app\n[watch]\nwindow = \"1s\"\n",
                "invalid config file api.toml, key `name`: missing field `name`",
            ),
            (
                "# an app\nname = \"api\"\n[watch]\n",
                "invalid config file api.toml, line 3, key `watch.window`: missing field `window`",
            ),
            (
                "# an app\nname = 3\n",
                "invalid config file api.toml, line 2, key `name`: invalid type: integer `3`",
            ),
            (
                "name = \"api\"\n[watch]\nwindow = \"1s\"\nextra = true\n",
                "invalid config file api.toml, line 4, key `watch.extra`: unknown field `extra`",
            ),
            // An unknown table is named once, not as `extra.extra`.
            (
                "name = \"api\"\n[extra]\nx = 1\n",
                "invalid config file api.toml, line 2, key `extra`: unknown field `extra`",
            ),
            (
                "# an app\nname = \"api\n",
                "invalid config file api.toml, line 2, key `name`: invalid basic string",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "{got}\nwanted {want}");
            assert!(!got.contains('\n') && !got.contains('^'), "{got:?}");
        }
    }
}
