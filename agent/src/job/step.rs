//! The step machinery every job kind uses: the context a job touches (`JobCtx`), its report
//! into the outbox (`Report`), its outcome (`Outcome`), a step's failure (`Failure`), `begin`
//! (the step guard: recorded and flushed before it acts, the safe point of cancellation),
//! `take_lock` and the `LockKeeper` that renews it, the cancellation tokens (`Cancels`,
//! `unless_cancelled`, `CancelIo`), the crash-test hook `pause_point`, and `finish`, which
//! ends a job (runner and recovery alike). No job kind lives here, and this module imports
//! none.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apps::Apps;
use crate::docker::{DockerClient, DockerError};
use crate::lock::Decision;
use crate::redact::Redactor;
use crate::store::{JobRecord, NewEvent, Store, StoreError};
use crate::{Outbox, unix_ms};
use drover_model::config::ConfigError;
use drover_model::jobevent::{self, CODE_LOCKED, JobResult, Payload, field, status};

/// Everything a job touches.
#[derive(Debug)]
pub struct JobCtx {
    /// This host's name, as enrolled (recorded in each backup's manifest).
    pub host: String,
    pub store: Arc<Store>,
    pub outbox: Outbox,
    pub docker: DockerClient,
    pub apps: Apps,
    pub secrets_dir: PathBuf,
    /// Private registry credentials (`crate::registry`), read at each pull.
    pub registry_auth: PathBuf,
    /// The agent's shutdown: proxies live until it fires.
    pub shutdown: CancellationToken,
    /// Where backups go when a target names no `storage.dir` (`<data dir>/backups`).
    pub backups_dir: PathBuf,
    /// How long a deploy lock lives without renewal (renewed at a third of it while held).
    pub lock_lease: Duration,
    /// The secrets the agent knows (the outbox's and the log writer's).
    pub redactor: Redactor,
    /// The running jobs' cancellation tokens.
    pub cancels: Cancels,
}

/// Who asked to cancel a running job, by job id: a job checks its own at each safe point.
/// Separate from the agent's shutdown, which leaves jobs for the next start's recovery.
#[derive(Debug, Default)]
pub struct Cancels {
    running: Mutex<HashMap<String, (CancellationToken, String)>>,
}

impl Cancels {
    pub(crate) fn register(&self, job_id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        if let Ok(mut map) = self.running.lock() {
            map.insert(job_id.to_string(), (token.clone(), String::new()));
        }
        token
    }

    pub(crate) fn remove(&self, job_id: &str) {
        if let Ok(mut map) = self.running.lock() {
            map.remove(job_id);
        }
    }

    /// Cancels a running job; false when none by that id runs here.
    pub(crate) fn cancel(&self, job_id: &str, by: &str) -> bool {
        let Ok(mut map) = self.running.lock() else {
            return false;
        };
        match map.get_mut(job_id) {
            Some((token, who)) => {
                if who.is_empty() {
                    *who = by.to_string();
                }
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// The job's token (a never-cancelled one for a job not run by the runner, e.g. recovery).
    pub fn token(&self, job_id: &str) -> CancellationToken {
        self.running
            .lock()
            .ok()
            .and_then(|map| map.get(job_id).map(|(t, _)| t.clone()))
            .unwrap_or_default()
    }

    /// Who cancelled the job, once it was.
    pub fn cancelled_by(&self, job_id: &str) -> Option<String> {
        let map = self.running.lock().ok()?;
        let (token, who) = map.get(job_id)?;
        token.is_cancelled().then(|| who.clone())
    }
}

/// How a job ended, for `job.finished`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: JobResult,
    /// The step that failed (or was running when interrupted).
    pub step: String,
    pub error: String,
    pub logs: String,
    pub code: String,
    pub live_version: String,
    pub previous_version: String,
    pub extra: BTreeMap<String, String>,
    /// A record `job.finished` carries (a prune's lines).
    pub payload: Option<Payload>,
    /// The `job.finished` line of a success, when the job kind's default does not fit.
    pub summary: String,
}

impl Outcome {
    pub fn succeeded(live: &str, previous: &str) -> Outcome {
        Outcome {
            result: JobResult::Succeeded,
            step: String::new(),
            error: String::new(),
            logs: String::new(),
            code: String::new(),
            live_version: live.to_string(),
            previous_version: previous.to_string(),
            extra: BTreeMap::new(),
            payload: None,
            summary: String::new(),
        }
    }

    pub fn failed(step: &str, error: impl Into<String>) -> Outcome {
        Outcome {
            result: JobResult::Failed,
            step: step.to_string(),
            error: error.into(),
            ..Outcome::succeeded("", "")
        }
    }
}

/// Ends a job: marks it finished, releases its lock, reports `job.finished` and the app's
/// release table. Used by the runner and by recovery.
pub async fn finish(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    outcome: Outcome,
    took: Duration,
) {
    job.finished = true;
    if let Err(err) = ctx.store.put_job(job).await {
        error!(job = %job.id, error = %err, "cannot record the job as finished");
    }
    if let Err(err) = ctx.store.unlock(&job.lock_key(), &job.id).await {
        warn!(job = %job.id, error = %err, "cannot release the deploy lock (it expires by lease)");
    }
    let mut fields = outcome.extra.clone();
    for (key, value) in [
        (field::RESULT, outcome.result.as_str().to_string()),
        (field::STEP, outcome.step.clone()),
        (field::ERROR, outcome.error.clone()),
        (field::LOGS, outcome.logs.clone()),
        (field::CODE, outcome.code.clone()),
        (field::LIVE_VERSION, outcome.live_version.clone()),
        (field::PREVIOUS_VERSION, outcome.previous_version.clone()),
        (field::DURATION_MS, took.as_millis().to_string()),
    ] {
        if !value.is_empty() {
            fields.insert(key.to_string(), value);
        }
    }
    let message = match outcome.result {
        JobResult::Succeeded if !outcome.summary.is_empty() => outcome.summary.clone(),
        JobResult::Succeeded => format!(
            "{} {}: {} is live",
            job.kind.as_str(),
            job.app,
            outcome.live_version
        ),
        JobResult::RolledBack => format!(
            "rolled back automatically: {}; {} is live",
            outcome.error, outcome.live_version
        ),
        JobResult::Cancelled => format!(
            "{} {} {} at {}: {}",
            job.kind.as_str(),
            job.app,
            outcome.result.as_str(),
            if outcome.step.is_empty() {
                "start"
            } else {
                &outcome.step
            },
            outcome.error
        ),
        _ => format!(
            "{} failed at {}: {}",
            job.kind.as_str(),
            outcome.step,
            outcome.error
        ),
    };
    // The message may quote a failing app's output: the log line is redacted like the event.
    let logged = ctx.redactor.redact(&message);
    info!(job = %job.id, result = outcome.result.as_str(), took_ms = took.as_millis() as u64, "{logged}");
    report
        .with_payload(jobevent::FINISHED, message, fields, outcome.payload)
        .await;
    if job.kind.is_backup() {
        crate::job::step::report_catalog(ctx, &job.app, &job.id).await;
    } else {
        report_releases(ctx, &job.app, &job.id).await;
    }
}

/// Sends an app's release table as `app.releases` (under `job_id`).
pub async fn report_releases(ctx: &JobCtx, app: &str, job_id: &str) {
    match ctx.store.releases(app) {
        Ok(releases) => {
            Report::new(&ctx.outbox, job_id)
                .carrying(
                    format!("{} release(s) of {app}", releases.len()),
                    Payload::Releases {
                        app: app.to_string(),
                        releases,
                    },
                )
                .await
        }
        Err(err) => error!(app, error = %err, "cannot read the release table"),
    }
}

/// Writes one job's events into the outbox.
#[derive(Debug)]
pub struct Report<'a> {
    outbox: &'a Outbox,
    job_id: String,
}

impl<'a> Report<'a> {
    pub fn new(outbox: &'a Outbox, job_id: &str) -> Report<'a> {
        Report {
            outbox,
            job_id: job_id.to_string(),
        }
    }

    /// Records an event. The outbox is the agent's own disk: if it fails, the job goes on
    /// and the failure is logged (the job's state is in the store either way).
    pub async fn event(&self, kind: &str, message: String, fields: BTreeMap<String, String>) {
        self.with_payload(kind, message, fields, None).await
    }

    /// Records the event of `payload`'s kind that carries it, with the fields that name what
    /// it is about ([`Payload::fields`]).
    pub async fn carrying(&self, message: String, payload: Payload) {
        let (kind, fields) = (payload.event_kind(), payload.fields());
        self.with_payload(kind, message, fields, Some(payload))
            .await
    }

    /// Records an event that carries a typed record beside its scalar fields.
    pub async fn with_payload(
        &self,
        kind: &str,
        message: String,
        fields: BTreeMap<String, String>,
        payload: Option<Payload>,
    ) {
        let event = NewEvent {
            job_id: self.job_id.clone(),
            kind: kind.to_string(),
            message,
            fields,
            payload,
        };
        if let Err(err) = self.outbox.record(event).await {
            error!(job = %self.job_id, kind, error = %err, "cannot record a job event");
        }
    }

    fn step_fields(step: &str, state: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (field::STEP.to_string(), step.to_string()),
            (field::STATUS.to_string(), state.to_string()),
        ])
    }

    pub async fn step_started(&self, step: &str, message: impl Into<String>) {
        self.event(
            jobevent::STEP,
            message.into(),
            Self::step_fields(step, status::STARTED),
        )
        .await;
    }

    /// A step ended well; `extra` adds fields.
    pub async fn step_done(
        &self,
        step: &str,
        since: Instant,
        message: impl Into<String>,
        extra: BTreeMap<String, String>,
    ) {
        let mut fields = Self::step_fields(step, status::DONE);
        fields.insert(
            field::DURATION_MS.into(),
            since.elapsed().as_millis().to_string(),
        );
        fields.extend(extra);
        self.event(jobevent::STEP, message.into(), fields).await;
    }

    pub async fn step_failed(&self, step: &str, since: Instant, message: impl Into<String>) {
        let mut fields = Self::step_fields(step, status::FAILED);
        fields.insert(
            field::DURATION_MS.into(),
            since.elapsed().as_millis().to_string(),
        );
        self.event(jobevent::STEP, message.into(), fields).await;
    }

    pub async fn step_skipped(&self, step: &str, why: impl Into<String>) {
        self.event(
            jobevent::STEP,
            why.into(),
            Self::step_fields(step, status::SKIPPED),
        )
        .await;
    }

    pub async fn progress(&self, step: &str, message: impl Into<String>) {
        self.event(
            jobevent::PROGRESS,
            message.into(),
            BTreeMap::from([(field::STEP.to_string(), step.to_string())]),
        )
        .await;
    }
}

/// Renews a held deploy lock until dropped.
#[derive(Debug)]
pub struct LockKeeper {
    stop: CancellationToken,
}

impl LockKeeper {
    pub fn start(store: Arc<Store>, app: &str, holder: &str, lease: Duration) -> LockKeeper {
        let stop = CancellationToken::new();
        let (app, holder, token) = (app.to_string(), holder.to_string(), stop.clone());
        tokio::spawn(async move {
            let every = lease / 3;
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(err) = store
                    .lock(&app, &holder, unix_ms(), lease.as_millis() as i64)
                    .await
                {
                    warn!(app, error = %err, "cannot renew the deploy lock");
                }
            }
        });
        LockKeeper { stop }
    }
}

impl Drop for LockKeeper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A byte source that fails once its job is cancelled, so a blocking pipeline (a backup's
/// dump, a test restore) stops at its next read or write and cleans up through its failure
/// path (`.partial` files removed, `pg_dump` killed on drop).
pub struct CancelIo<T> {
    pub inner: T,
    pub token: CancellationToken,
}

impl<T> CancelIo<T> {
    fn check(&self) -> std::io::Result<()> {
        if self.token.is_cancelled() {
            Err(std::io::Error::other("the job was cancelled"))
        } else {
            Ok(())
        }
    }
}

impl<T: std::io::Read> std::io::Read for CancelIo<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.read(buf)
    }
}

impl<T: std::io::Write> std::io::Write for CancelIo<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A step that failed: the job's outcome says so.
pub(crate) struct Failure {
    pub step: &'static str,
    pub error: String,
    pub logs: String,
    pub code: String,
}

pub(crate) fn fail(step: &'static str, error: impl std::fmt::Display) -> Failure {
    Failure {
        step,
        error: error.to_string(),
        logs: String::new(),
        code: String::new(),
    }
}

impl Failure {
    pub(crate) fn with_logs(mut self, logs: String) -> Failure {
        self.logs = logs;
        self
    }
}

/// A step's failure as the job's outcome.
pub(crate) fn outcome_of(result: Result<Outcome, Failure>) -> Outcome {
    match result {
        Ok(outcome) => outcome,
        Err(f) => Outcome {
            logs: f.logs,
            code: f.code,
            ..Outcome::failed(f.step, f.error)
        },
    }
}

/// Crash-test hook: with `DROVER_AGENT_PAUSE_AT=<point>` in its environment, the agent stops
/// at that point of every job and waits there forever, so a test can kill the process at a
/// known place. Points: each step's name (just after the step is recorded as started, before
/// it acts), `switch:committed` (traffic committed in the store, proxy not yet swapped) and
/// `verify:scratch_made` (a validation's scratch database created, nothing restored yet).
pub(crate) async fn pause_point(point: &str) {
    static PAUSE_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let pause = PAUSE_AT.get_or_init(|| std::env::var("DROVER_AGENT_PAUSE_AT").ok());
    if pause.as_deref() == Some(point) {
        warn!(point, "paused by DROVER_AGENT_PAUSE_AT (a crash-test hook)");
        std::future::pending::<()>().await;
    }
}

/// A cancel noticed at `step`: the job fails there and undoes what it made, and the runner
/// reports it `cancelled` (`jobs::cancelled_outcome`).
pub(crate) fn cancelled(ctx: &JobCtx, job: &JobRecord, step: &'static str) -> Failure {
    let by = ctx.cancels.cancelled_by(&job.id).unwrap_or_default();
    fail(step, format!("cancelled by {by} at {step}"))
}

/// Runs `work` unless the job is cancelled first: a wait that may be dropped half-way (HTTP
/// checks, sleeps, waiting for a lock), never one that changes the host.
pub(crate) async fn unless_cancelled<T>(
    ctx: &JobCtx,
    job: &JobRecord,
    step: &'static str,
    work: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let token = ctx.cancels.token(&job.id);
    tokio::select! {
        result = work => result,
        _ = token.cancelled() => Err(cancelled(ctx, job, step)),
    }
}

/// Records the step as started in the job (flushed first: a crash knows how far it got) and as
/// an event. The safe point of cancellation: before traffic moved (`switched`), a cancelled job
/// stops here, before the step acts.
pub(crate) async fn begin(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    step: &'static str,
    message: String,
) -> Result<Instant, Failure> {
    if !job.switched && ctx.cancels.token(&job.id).is_cancelled() {
        return Err(cancelled(ctx, job, step));
    }
    job.step = step.to_string();
    ctx.store
        .put_job(job)
        .await
        .map_err(|e| fail(step, format!("cannot record progress: {e}")))?;
    report.step_started(step, message).await;
    if job.switched {
        pause_point(step).await;
    } else {
        unless_cancelled(ctx, job, step, async {
            pause_point(step).await;
            Ok(())
        })
        .await?;
    }
    Ok(Instant::now())
}

/// Takes the app's deploy lock for this job, waiting for it if asked to.
pub(crate) async fn take_lock(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<LockKeeper, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "lock",
        format!("locking {}", job.lock_key()),
    )
    .await?;
    unless_cancelled(ctx, job, "lock", wait_lock(ctx, job, report, since)).await
}

/// Takes the lock, or waits for it (`wait_lock`) until it is granted.
async fn wait_lock(
    ctx: &JobCtx,
    job: &JobRecord,
    report: &Report<'_>,
    since: Instant,
) -> Result<LockKeeper, Failure> {
    let lease = ctx.lock_lease.as_millis() as i64;
    let mut last_said = None::<Instant>;
    loop {
        let decision = ctx
            .store
            .lock(&job.lock_key(), &job.id, unix_ms(), lease)
            .await
            .map_err(|e| fail("lock", e.to_string()))?;
        match decision {
            Decision::Grant(_) => {
                report
                    .step_done("lock", since, "lock taken", BTreeMap::new())
                    .await;
                return Ok(LockKeeper::start(
                    ctx.store.clone(),
                    &job.lock_key(),
                    &job.id,
                    ctx.lock_lease,
                ));
            }
            Decision::Held(held) => {
                let holder = match ctx.store.job(&held.holder) {
                    Ok(Some(other)) => format!(
                        "job {} ({} {} asked by {})",
                        other.id,
                        other.kind.as_str(),
                        if other.version.is_empty() {
                            "previous"
                        } else {
                            &other.version
                        },
                        other.requested_by
                    ),
                    _ => format!("job {}", held.holder),
                };
                let when = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(held.since_unix_ms.max(0) as u64),
                );
                let text = format!("{} is locked by {holder} since {when}", job.lock_key());
                if !job.wait_lock {
                    report.step_failed("lock", since, text.clone()).await;
                    return Err(Failure {
                        code: CODE_LOCKED.into(),
                        ..fail("lock", format!("{text}; try again later or use --wait"))
                    });
                }
                if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    report.progress("lock", format!("waiting: {text}")).await;
                    last_said = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Sends a target's catalog as `backup.catalog` (under `job_id`).
pub async fn report_catalog(ctx: &JobCtx, target: &str, job_id: &str) {
    match ctx.store.backups(target) {
        Ok(backups) => {
            Report::new(&ctx.outbox, job_id)
                .carrying(
                    format!("{} backup(s) of {target}", backups.len()),
                    Payload::Catalog {
                        target: target.to_string(),
                        backups,
                    },
                )
                .await
        }
        Err(err) => warn!(target, error = %err, "cannot read the backup catalog"),
    }
}

/// Why recovery could not converge a job or an app: it is retried (and the next start tries
/// again); nothing is left half-done meanwhile.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// A release's stored spec no longer parses.
    #[error(transparent)]
    Spec(#[from] ConfigError),
    /// The host's secrets for a release's app cannot be read.
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// A container recovery started or made is gone again.
    #[error("container {0} vanished")]
    Vanished(String),
    /// The release does not serve: why.
    #[error("{0}")]
    Unhealthy(String),
}

/// Reports a job a crash interrupted as `interrupted` at the step it was in, with nothing to
/// undo (kinds that change nothing a crash could leave half-done: pull, retire).
pub async fn report_interrupted(ctx: &JobCtx, mut job: JobRecord) {
    let report = Report::new(&ctx.outbox, &job.id);
    let step = if job.step.is_empty() {
        "validate".to_string()
    } else {
        job.step.clone()
    };
    let outcome = Outcome {
        result: JobResult::Interrupted,
        error: interrupted_message(&step, &[]),
        step,
        ..Outcome::failed("", "")
    };
    finish(ctx, &mut job, &report, outcome, Duration::ZERO).await;
}

/// The error of a job the agent's stop interrupted: the step, then what the agent did about it
/// on restart (each a clause of its own). Pure.
pub fn interrupted_message(step: &str, did: &[String]) -> String {
    if did.is_empty() {
        format!("the agent stopped during step {step}")
    } else {
        format!(
            "the agent stopped during step {step}; on restart: {}",
            did.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interrupted_message_reads_as_sentences() {
        assert_eq!(
            interrupted_message("watch", &[]),
            "the agent stopped during step watch"
        );
        assert_eq!(
            interrupted_message(
                "watch",
                &[
                    "traffic had moved to v1.1.0, which is healthy and keeps serving".into(),
                    "v1.0.0 was stopped".into()
                ]
            ),
            "the agent stopped during step watch; on restart: traffic had moved to v1.1.0, \
             which is healthy and keeps serving; v1.0.0 was stopped"
        );
    }

    #[test]
    fn cancels_reach_only_running_jobs_and_remember_who() {
        let cancels = Cancels::default();
        assert!(!cancels.cancel("j1", "bob"), "nothing runs");
        let token = cancels.register("j1");
        assert_eq!(cancels.cancelled_by("j1"), None);
        assert!(cancels.cancel("j1", "bob"));
        assert!(cancels.cancel("j1", "carol"));
        assert!(token.is_cancelled() && cancels.token("j1").is_cancelled());
        assert_eq!(cancels.cancelled_by("j1").as_deref(), Some("bob"));
        cancels.remove("j1");
        assert!(!cancels.token("j1").is_cancelled());
    }
}
