//! The agent's job runner: takes deploy and rollback commands from the session, stores each
//! (flushed) before it says `job.started`, runs it (`deploy`), and reports every step through
//! the durable outbox. On start it first converges whatever a crash interrupted (`recovery`) and
//! brings the app proxies back, then takes commands. Jobs of different apps run at once; one
//! app's jobs are serialised by its deploy lock.
//!
//! Cancellation: the controller's `Cancel{job_id}` cancels that job's token (`Cancels`). Each
//! job kind stops at its next safe point (`deploy::begin` before the switch, the waits of the
//! lock, health and smoke steps, the watch window, a backup's byte stream) and undoes what it
//! made through its ordinary failure path; the runner reports such an ending `cancelled`.
//! A cancel for a job this agent never received is recorded, so its command, should it come
//! later, is ignored, and the job is reported `cancelled` at once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apps::Apps;
use crate::docker::DockerClient;
use crate::health::AppFacts;
use crate::redact::Redactor;
use crate::store::{JobKind, JobRecord, NewEvent, Store};
use crate::{Outbox, deploy, recovery, unix_ms};
use drover_model::jobevent::{self, JobResult, field, status};

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
    fn register(&self, job_id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        if let Ok(mut map) = self.running.lock() {
            map.insert(job_id.to_string(), (token.clone(), String::new()));
        }
        token
    }

    fn remove(&self, job_id: &str) {
        if let Ok(mut map) = self.running.lock() {
            map.remove(job_id);
        }
    }

    /// Cancels a running job; false when none by that id runs here.
    fn cancel(&self, job_id: &str, by: &str) -> bool {
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

/// What the session hands the runner, in the order the controller sent it.
#[derive(Debug)]
pub enum Work {
    Run(Box<JobRecord>),
    Cancel { job_id: String, by: String },
}

/// Where the session hands commands to the runner.
#[derive(Debug, Clone)]
pub struct JobQueue {
    tx: mpsc::UnboundedSender<Work>,
}

impl JobQueue {
    pub fn new() -> (JobQueue, mpsc::UnboundedReceiver<Work>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (JobQueue { tx }, rx)
    }

    /// Hands a job to the runner. Never blocks the session.
    pub fn submit(&self, job: JobRecord) {
        if self.tx.send(Work::Run(Box::new(job))).is_err() {
            warn!("the job runner has stopped; command dropped (the controller sends it again)");
        }
    }

    /// Asks the runner to cancel a job. Never blocks the session.
    pub fn cancel(&self, job_id: &str, by: &str) {
        let work = Work::Cancel {
            job_id: job_id.to_string(),
            by: by.to_string(),
        };
        if self.tx.send(work).is_err() {
            warn!(job = %job_id, "the job runner has stopped; cancel dropped (the controller sends it again)");
        }
    }
}

/// Runs until `shutdown`: recovery first (retried until the Docker Engine answers), then every
/// submitted job. On shutdown, running jobs are dropped where they are: the next start's
/// recovery converges them, exactly as after a crash.
pub async fn run(ctx: Arc<JobCtx>, mut rx: mpsc::UnboundedReceiver<Work>) {
    let mut attempt = 0u32;
    loop {
        match recovery::recover(&ctx).await {
            Ok(()) => break,
            Err(err) => {
                attempt += 1;
                if attempt == 1 || attempt.is_multiple_of(12) {
                    error!(error = %err, "cannot converge this host's apps yet; retrying every 5s");
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    let mut running = JoinSet::new();
    // Which job each task runs, so a task that panicked still ends its job.
    let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                match done {
                    Ok((id, ())) => {
                        tasks.remove(&id);
                    }
                    Err(err) => {
                        let job_id = tasks.remove(&err.id()).unwrap_or_default();
                        error!(job = %job_id, error = %err, "a job task ended abnormally");
                        if err.is_panic() && !job_id.is_empty() {
                            end_after_panic(&ctx, &job_id, panic_text(err.into_panic())).await;
                        }
                    }
                }
            }
            work = rx.recv() => {
                let job = match work {
                    None => break,
                    Some(Work::Run(job)) => *job,
                    Some(Work::Cancel { job_id, by }) => {
                        cancel(&ctx, &job_id, &by).await;
                        continue;
                    }
                };
                match ctx.store.accept_job(&job).await {
                    Ok(true) => {
                        let ctx = ctx.clone();
                        // Registered before the task runs, so a cancel right behind the
                        // command finds it.
                        let token = ctx.cancels.register(&job.id);
                        let job_id = job.id.clone();
                        let task = running.spawn(async move {
                            run_job(&ctx, job, token).await;
                        });
                        tasks.insert(task.id(), job_id);
                    }
                    Ok(false) => {
                        info!(job = %job.id, "job already known; command ignored");
                    }
                    Err(err) => error!(job = %job.id, error = %err, "cannot store the job; the controller will send it again"),
                }
            }
        }
    }
    running.abort_all();
}

/// The text of a panic's payload.
fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Ends a job whose task panicked (a bug) the way the next start would after a crash
/// (`recovery::converge`: one serving release, the job's containers gone, its lock released,
/// reported `interrupted`), so it does not stay "running" with its app locked until the agent
/// restarts.
async fn end_after_panic(ctx: &JobCtx, job_id: &str, why: String) {
    ctx.cancels.remove(job_id);
    let job = match ctx.store.job(job_id) {
        Ok(Some(job)) if !job.finished => job,
        Ok(_) => return,
        Err(err) => {
            error!(job = %job_id, error = %err, "cannot read the job that panicked");
            return;
        }
    };
    Report::new(&ctx.outbox, job_id)
        .progress(
            &job.step,
            format!("the agent hit a bug in this job ({why}); converging as after a crash"),
        )
        .await;
    if let Err(err) = recovery::converge(ctx, job).await {
        error!(job = %job_id, error = %err, "cannot converge the job that panicked; the next start will");
    }
}

/// A cancel from the controller: a running job's token is cancelled; a finished one is left
/// as it ended (its `job.finished` is in the outbox); an unknown one is recorded as finished,
/// so its command is ignored if it comes later, and reported `cancelled`.
async fn cancel(ctx: &JobCtx, job_id: &str, by: &str) {
    if ctx.cancels.cancel(job_id, by) {
        info!(job = %job_id, by, "job cancelled; it stops at its next safe point");
        return;
    }
    match ctx.store.job(job_id) {
        Ok(Some(job)) if job.finished => {
            info!(job = %job_id, "cancel of a job that already finished; nothing to do");
        }
        Ok(Some(_)) => {
            // Known, unfinished, not running: recovery has it (it ends `interrupted`).
            info!(job = %job_id, "cancel of a job being converged after a restart; it ends as recovery decides");
        }
        Ok(None) => {
            let tombstone = JobRecord::cancelled_unstarted(job_id, by, unix_ms());
            match ctx.store.accept_job(&tombstone).await {
                Ok(_) => {
                    info!(job = %job_id, by, "cancelled before its command arrived");
                    let fields = BTreeMap::from([
                        (
                            field::RESULT.to_string(),
                            JobResult::Cancelled.as_str().to_string(),
                        ),
                        (
                            field::ERROR.to_string(),
                            format!("cancelled by {by} before it started"),
                        ),
                    ]);
                    Report::new(&ctx.outbox, job_id)
                        .event(
                            jobevent::FINISHED,
                            format!("cancelled by {by} before it started on this host"),
                            fields,
                        )
                        .await;
                }
                Err(err) => {
                    error!(job = %job_id, error = %err, "cannot record the cancel; the controller sends it again")
                }
            }
        }
        Err(err) => error!(job = %job_id, error = %err, "cannot read the job to cancel"),
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

async fn run_job(ctx: &JobCtx, mut job: JobRecord, token: CancellationToken) {
    let started = Instant::now();
    // Before the first event: whatever the job prints from here on is redacted.
    ctx.redactor.learn_job(&ctx.secrets_dir, &job);
    let report = Report::new(&ctx.outbox, &job.id);
    info!(job = %job.id, kind = job.kind.as_str(), app = %job.app, version = %job.version, by = %job.requested_by, "job started");
    report
        .event(
            jobevent::STARTED,
            started_message(job.kind, &job.app, &job.version, &job.requested_by),
            BTreeMap::from([
                (field::JOB_KIND.into(), job.kind.as_str().into()),
                (field::APP.into(), job.app.clone()),
                (field::VERSION.into(), job.version.clone()),
                (field::REQUESTED_BY.into(), job.requested_by.clone()),
            ]),
        )
        .await;
    let mut outcome = deploy::run(ctx, &mut job, &report).await;
    if token.is_cancelled() {
        outcome = cancelled_outcome(outcome, ctx.cancels.cancelled_by(&job.id));
    }
    finish(ctx, &mut job, &report, outcome, started.elapsed()).await;
    ctx.cancels.remove(&job.id);
}

/// The `job.started` line: what runs on what, and who asked. Only a rollback without a version
/// goes to "the previous release"; a backup job names no version at all.
pub fn started_message(kind: JobKind, app: &str, version: &str, requested_by: &str) -> String {
    let what = match (kind, version.is_empty()) {
        (JobKind::Rollback, true) => format!("rollback {app} to the previous release"),
        (JobKind::Rollback, false) => format!("rollback {app} to {version}"),
        (JobKind::Restore, false) => format!("restore {app} from backup {version}"),
        (kind, true) => format!("{} {app}", kind.as_str()),
        (kind, false) => format!("{} {app} {version}", kind.as_str()),
    };
    format!("{what} asked by {requested_by}")
}

/// A job's outcome once it was cancelled: a failure (the step that noticed the cancel, or
/// one that failed meanwhile, after which the job undid its work as usual) or a switch back
/// in the watch window ends `cancelled`; a job that got past its last safe point keeps its
/// result (success) and says the cancel came too late.
pub fn cancelled_outcome(mut outcome: Outcome, by: Option<String>) -> Outcome {
    let by = by
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "an operator".into());
    match outcome.result {
        JobResult::Failed | JobResult::RolledBack => {
            outcome.result = JobResult::Cancelled;
            if !outcome.error.contains("cancelled by") {
                outcome.error = format!("cancelled by {by} ({})", outcome.error);
            }
            outcome.code.clear();
        }
        JobResult::Succeeded => {
            outcome.extra.insert(
                "cancel".into(),
                format!("cancel by {by} came after the last safe point"),
            );
        }
        JobResult::Cancelled | JobResult::Interrupted => {}
    }
    outcome
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
    report.event(jobevent::FINISHED, message, fields).await;
    if job.kind.is_backup() {
        crate::backup::report_catalog(ctx, &job.app, &job.id).await;
    } else {
        report_releases(ctx, &job.app, &job.id).await;
    }
}

/// Sends an app's release table as `app.releases` (under `job_id`).
pub async fn report_releases(ctx: &JobCtx, app: &str, job_id: &str) {
    match ctx.store.releases(app) {
        Ok(releases) => {
            Report::new(&ctx.outbox, job_id)
                .event(
                    jobevent::RELEASES,
                    format!("{} release(s) of {app}", releases.len()),
                    jobevent::releases_fields(app, &releases),
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
        let event = NewEvent {
            job_id: self.job_id.clone(),
            kind: kind.to_string(),
            message,
            fields,
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

/// Apps with a live release, whether their containers run, and their proxy's counters: for
/// the health report.
pub async fn app_facts(ctx: &JobCtx) -> Vec<AppFacts> {
    let traffic = ctx.apps.traffic();
    let mut out = Vec::new();
    for app in ctx.store.release_apps().unwrap_or_default() {
        let Ok(table) = ctx.store.releases(&app) else {
            continue;
        };
        let Some(live) = drover_model::releases::live(&table) else {
            continue;
        };
        let mut running = true;
        for name in live.containers.values() {
            running &= matches!(ctx.docker.inspect(name).await, Ok(Some(info)) if info.running);
        }
        let mut facts = AppFacts {
            app: app.clone(),
            version: live.version.clone(),
            running,
            ..AppFacts::default()
        };
        if let Some(t) = traffic.get(&app) {
            facts.listen = t.listen.to_string();
            facts.requests = t.stats.requests;
            facts.status_5xx = t.stats.status_5xx;
            facts.p95_ms = t.stats.p95_ms;
        }
        out.push(facts);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_started_line_names_a_version_only_where_there_is_one() {
        let cases = [
            (JobKind::Deploy, "api", "v2", "deploy api v2 asked by ops"),
            (
                JobKind::Rollback,
                "api",
                "",
                "rollback api to the previous release asked by ops",
            ),
            (
                JobKind::Rollback,
                "api",
                "v1",
                "rollback api to v1 asked by ops",
            ),
            (JobKind::Backup, "t1", "", "backup t1 asked by ops"),
            (JobKind::Prune, "t1", "", "prune t1 asked by ops"),
            (JobKind::Verify, "t1", "", "verify t1 asked by ops"),
            (
                JobKind::Restore,
                "t1",
                "t1-20261123-180102-3f2a",
                "restore t1 from backup t1-20261123-180102-3f2a asked by ops",
            ),
        ];
        for (kind, app, version, want) in cases {
            assert_eq!(started_message(kind, app, version, "ops"), want);
        }
    }

    #[test]
    fn a_cancelled_job_ends_cancelled_unless_it_got_past_its_last_safe_point() {
        let failed = Outcome {
            code: "locked".into(),
            ..Outcome::failed("health", "the health check failed 3 times")
        };
        let out = cancelled_outcome(failed, Some("bob".into()));
        assert_eq!(out.result, JobResult::Cancelled);
        assert_eq!(out.step, "health");
        assert_eq!(
            out.error,
            "cancelled by bob (the health check failed 3 times)"
        );
        assert!(out.code.is_empty());
        // The step that noticed the cancel says so already.
        let noticed = Outcome::failed("image", "cancelled by bob at image");
        assert_eq!(
            cancelled_outcome(noticed, Some("bob".into())).error,
            "cancelled by bob at image"
        );
        // A switch-back in the watch window is the cancel's doing.
        let back = Outcome {
            result: JobResult::RolledBack,
            ..Outcome::failed("watch", "cancelled by bob at watch")
        };
        assert_eq!(cancelled_outcome(back, None).result, JobResult::Cancelled);
        // Past the watch window: the deploy is done; it says the cancel came too late.
        let done = cancelled_outcome(Outcome::succeeded("v2", "v1"), Some("bob".into()));
        assert_eq!(done.result, JobResult::Succeeded);
        assert!(done.extra["cancel"].contains("after the last safe point"));
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
