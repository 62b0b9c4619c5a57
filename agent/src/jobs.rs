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
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::health::AppFacts;
use crate::job::step::{JobCtx, Outcome, Report, finish};
use crate::store::{JobKind, JobRecord};
use crate::{recovery, unix_ms};
use drover_model::jobevent::{self, JobResult, field};

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
/// recovery converges them, exactly as after a crash. `beat` is beaten from the loop that takes
/// commands, from its first turn (recovery, which may rightly take long, is not watched).
pub async fn run(
    ctx: Arc<JobCtx>,
    mut rx: mpsc::UnboundedReceiver<Work>,
    beat: drover_daemon::Heartbeat,
) {
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
    let mut beat_tick = drover_daemon::beat_ticker();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = beat_tick.tick() => beat.beat(),
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
    if let Err(err) = crate::job::converge(ctx, job).await {
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
    let mut outcome = crate::job::run(ctx, &mut job, &report).await;
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
}
