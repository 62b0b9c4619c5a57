//! Deploys and rollbacks, step by step, on the real Docker Engine, each step an event.
//!
//! Deploy: validate → lock → backup → image → migrate → start → health → smoke → switch →
//! drain and watch (side by side) → stop_old → prune. Rollback: lock → locate → start → health
//! → switch → drain → stop_old. Until `switch`, the live release is never touched: a failure
//! removes what the job created and leaves the old version serving. `switch` moves traffic in
//! one atomic proxy swap, committed to the store together with the release table. The watch
//! window starts at the switch, while the old release drains; a breach swaps back to the old
//! release (kept running until the window closes and its drain ends) within a second, even in
//! the middle of its drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::apps::Reserved;
use crate::docker::{ContainerInfo, ContainerSpec, DockerError};
use crate::httpcheck::{self, CheckError};
use crate::jobs::{JobCtx, LockKeeper, Outcome, Report};
use crate::lock::Decision;
use crate::proxy::{Proxy, StatsSnapshot, Upstream};
use crate::store::{BackupJob, JobKind, JobRecord};
use crate::{secrets, unix_ms};
use drover_model::appspec::{AppSpec, HealthCheck, SmokeProbe, Watch, check_version};
use drover_model::backup::catalog::Trigger;
use drover_model::backup::target::TargetSpec;
use drover_model::jobevent::{CODE_LOCKED, JobResult, Release, ReleaseState, field};
use drover_model::releases;

/// Container labels: which app, release and role a container belongs to.
pub const LABEL_APP: &str = "drover.app";
pub const LABEL_RELEASE: &str = "drover.release";
pub const LABEL_ROLE: &str = "drover.role";
pub const LABEL_VERSION: &str = "drover.version";

/// The web role's name in a release's containers.
pub const WEB: &str = "web";

/// A migration may run this long.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Lines of a container's log attached to a failure.
const LOG_LINES: usize = 30;
/// The watch window judges ratios and latency only over at least this many requests.
pub const WATCH_MIN_REQUESTS: u64 = 20;
/// How often the watch window looks at the counters (a breach switches back within this).
const WATCH_TICK: Duration = Duration::from_millis(100);
/// Workers must still run this long after start to count as started.
const WORKER_SETTLE: Duration = Duration::from_secs(1);

/// A step that failed: the job's outcome says so.
pub(crate) struct Failure {
    pub step: &'static str,
    pub error: String,
    pub logs: String,
    pub code: String,
}

pub(crate) fn fail(step: &'static str, error: impl Into<String>) -> Failure {
    Failure {
        step,
        error: error.into(),
        logs: String::new(),
        code: String::new(),
    }
}

impl Failure {
    fn with_logs(mut self, logs: String) -> Failure {
        self.logs = logs;
        self
    }
}

/// Docker names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The container name of `role` in a release: readable in `docker ps`, unique per release.
pub fn container_name(app: &str, role: &str, version: &str, release_id: &str) -> String {
    let suffix = release_id
        .rsplit('-')
        .next()
        .filter(|s| s.len() >= 4)
        .unwrap_or(release_id);
    sanitize(&format!("drover-{app}-{role}-{version}-{suffix}"))
}

/// Whether the post-deploy watch window has been breached by the new release's traffic: the
/// reason, or None. Pure: judged only over at least [`WATCH_MIN_REQUESTS`] requests.
pub fn watch_breach(stats: &StatsSnapshot, watch: &Watch) -> Option<String> {
    if stats.requests < WATCH_MIN_REQUESTS {
        return None;
    }
    let ratio = stats.ratio_5xx();
    if ratio > watch.max_5xx_ratio {
        return Some(format!(
            "{:.1}% of {} requests answered 5xx (limit {:.1}%)",
            ratio * 100.0,
            stats.requests,
            watch.max_5xx_ratio * 100.0
        ));
    }
    let limit = watch.max_p95_latency.as_millis() as u64;
    if stats.p95_ms > limit {
        return Some(format!(
            "p95 latency {} ms over {} requests (limit {limit} ms)",
            stats.p95_ms, stats.requests
        ));
    }
    None
}

/// Runs a job to its outcome. Never panics on bad input; every failure is an outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    let result = match job.kind {
        JobKind::Deploy => deploy(ctx, job, report).await,
        JobKind::Rollback => rollback(ctx, job, report).await,
        JobKind::Backup | JobKind::Restore | JobKind::Prune | JobKind::Verify => {
            return crate::backup::run(ctx, job, report).await;
        }
    };
    outcome_of(result)
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

/// The env of the app's containers: the spec's env plus the host's secrets.
fn app_env(ctx: &JobCtx, spec: &AppSpec) -> Result<BTreeMap<String, String>, String> {
    let mut env = spec.env.clone();
    env.extend(secrets::load(&ctx.secrets_dir, spec)?);
    Ok(env)
}

/// The container spec of `role` in `release`; `image` may be `repo:tag` or an image ID.
pub fn container_spec(
    spec: &AppSpec,
    release: &Release,
    role: &str,
    image: &str,
    env: &BTreeMap<String, String>,
) -> ContainerSpec {
    let command = spec
        .workers
        .iter()
        .find(|w| w.name == role)
        .map(|w| w.command.clone())
        .unwrap_or_default();
    ContainerSpec {
        name: release.containers.get(role).cloned().unwrap_or_default(),
        image: image.to_string(),
        command,
        env: env.clone(),
        labels: BTreeMap::from([
            (LABEL_APP.to_string(), spec.name.clone()),
            (LABEL_RELEASE.to_string(), release.id.clone()),
            (LABEL_ROLE.to_string(), role.to_string()),
            (LABEL_VERSION.to_string(), release.version.clone()),
        ]),
        publish: (role == WEB)
            .then(|| spec.web.as_ref().map(|w| w.port))
            .flatten(),
        binds: spec.volumes.clone(),
        networks: spec.networks.clone(),
    }
}

/// The last lines of a container's output, for a failure report; empty if unreadable.
async fn logs_of(ctx: &JobCtx, name: &str) -> String {
    ctx.docker
        .logs_tail(name, LOG_LINES)
        .await
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// Where the proxy reaches a web container: its published port on 127.0.0.1.
fn web_addr(info: &ContainerInfo) -> Option<SocketAddr> {
    info.host_port
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
}

/// Waits for the web container to answer its health check: during `start_period` failures do
/// not count; then `retries` tries `interval` apart. A try that finds nothing listening yet is
/// repeated quickly within the interval, so a fast app passes as soon as it listens. A container
/// that exits fails at once, with its logs.
pub(crate) async fn wait_healthy(
    ctx: &JobCtx,
    report: &Report<'_>,
    step: &'static str,
    name: &str,
    addr: SocketAddr,
    h: &HealthCheck,
) -> Result<(), Failure> {
    let exited = |info: Option<ContainerInfo>| -> Option<String> {
        match info {
            None => Some(format!("container {name} is gone")),
            Some(i) if !i.running => Some(format!(
                "container {name} exited with code {}",
                i.exit_code.unwrap_or(-1)
            )),
            Some(_) => None,
        }
    };
    let started = Instant::now();
    let mut next_inspect = started;
    while started.elapsed() < h.start_period {
        if let Ok(answer) = httpcheck::get(addr, &h.path, h.timeout).await
            && httpcheck::healthy(&answer)
        {
            return Ok(());
        }
        // Failures do not count yet, but a container that exited will not start.
        if Instant::now() >= next_inspect {
            next_inspect = Instant::now() + Duration::from_secs(1);
            if let Some(why) = exited(ctx.docker.inspect(name).await.ok().flatten()) {
                return Err(fail(step, why).with_logs(logs_of(ctx, name).await));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut last = String::new();
    for attempt in 1..=h.retries {
        let tried = Instant::now();
        let verdict = loop {
            match httpcheck::get(addr, &h.path, h.timeout).await {
                Ok(answer) if httpcheck::healthy(&answer) => return Ok(()),
                Ok(answer) => {
                    break format!(
                        "{} answered {}: {}",
                        h.path,
                        answer.status,
                        answer.body.lines().next().unwrap_or("").trim()
                    );
                }
                Err(CheckError::NotListening(_)) if tried.elapsed() < h.interval => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => break format!("{}: {e}", h.path),
            }
        };
        last = verdict;
        let info = ctx.docker.inspect(name).await.ok().flatten();
        if let Some(why) = exited(info) {
            return Err(fail(step, why).with_logs(logs_of(ctx, name).await));
        }
        report
            .progress(
                step,
                format!("health check {attempt}/{} failed: {last}", h.retries),
            )
            .await;
        if attempt < h.retries {
            tokio::time::sleep(h.interval.saturating_sub(tried.elapsed())).await;
        }
    }
    Err(fail(
        step,
        format!("the health check failed {} times; last: {last}", h.retries),
    )
    .with_logs(logs_of(ctx, name).await))
}

/// The health step: the web container passes its health check, then every worker still runs a
/// moment after starting. Returns when the web container first answered healthy (Unix ms).
async fn health_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    spec: &AppSpec,
    release: &Release,
    addr: Option<SocketAddr>,
) -> Result<i64, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "health",
        format!("checking {}", spec.health.path),
    )
    .await?;
    if let (Some(addr), Some(name)) = (addr, release.containers.get(WEB)) {
        let checks = wait_healthy(ctx, report, "health", name, addr, &spec.health);
        unless_cancelled(ctx, job, "health", checks).await?;
    }
    let healthy_at = unix_ms();
    workers_settled(ctx, "health", release).await?;
    let at = BTreeMap::from([(field::HEALTHY_AT_MS.to_string(), healthy_at.to_string())]);
    report.step_done("health", since, "healthy", at).await;
    Ok(healthy_at)
}

/// Checks that every worker container still runs a moment after starting.
async fn workers_settled(
    ctx: &JobCtx,
    step: &'static str,
    release: &Release,
) -> Result<(), Failure> {
    let workers: Vec<&String> = release
        .containers
        .iter()
        .filter(|(role, _)| role.as_str() != WEB)
        .map(|(_, name)| name)
        .collect();
    if workers.is_empty() {
        return Ok(());
    }
    tokio::time::sleep(WORKER_SETTLE).await;
    for name in workers {
        match ctx.docker.inspect(name).await {
            Ok(Some(info)) if info.running => {}
            Ok(info) => {
                return Err(fail(
                    step,
                    format!(
                        "worker container {name} exited with code {}",
                        info.and_then(|i| i.exit_code).unwrap_or(-1)
                    ),
                )
                .with_logs(logs_of(ctx, name).await));
            }
            Err(e) => return Err(fail(step, e.to_string())),
        }
    }
    Ok(())
}

/// Runs the smoke checks against the new web container before it gets traffic.
async fn smoke(report: &Report<'_>, spec: &AppSpec, addr: SocketAddr) -> Result<(), Failure> {
    let timeout = spec.health.timeout;
    for check in &spec.smoke {
        let path = &check.path;
        match check.probe() {
            SmokeProbe::Http {
                status,
                body_contains,
            } => {
                let answer = httpcheck::get(addr, path, timeout)
                    .await
                    .map_err(|e| fail("smoke", format!("smoke check {path}: {e}")))?;
                httpcheck::smoke_verdict(&answer, status, body_contains)
                    .map_err(|e| fail("smoke", format!("smoke check {path} {e}")))?;
                report
                    .progress("smoke", format!("{path} answered {}", answer.status))
                    .await;
            }
            SmokeProbe::WebSocket { send, expect } => {
                let what = format!("smoke check {path} (WebSocket, sent {send:?})");
                let answer = httpcheck::websocket(addr, path, send, timeout)
                    .await
                    .map_err(|e| fail("smoke", format!("{what}: {e}")))?;
                httpcheck::websocket_verdict(&answer, expect)
                    .map_err(|e| fail("smoke", format!("{what}: {e}")))?;
                report
                    .progress(
                        "smoke",
                        format!("{path} (WebSocket) answered {:?}", clip(&answer, 80)),
                    )
                    .await;
            }
        }
    }
    Ok(())
}

/// At most `n` characters of `s`.
fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Removes a release's containers (whatever state they are in); returns those that existed.
async fn remove_containers(ctx: &JobCtx, release: &Release) -> Vec<String> {
    let mut removed = Vec::new();
    for name in release.containers.values() {
        match ctx.docker.remove(name).await {
            Ok(true) => removed.push(name.clone()),
            Ok(false) => {}
            Err(e) => warn!(container = %name, error = %e, "cannot remove container"),
        }
    }
    removed
}

/// Stops the given roles' containers of a release (kept for rollback).
async fn stop_roles(ctx: &JobCtx, release: &Release, web: bool, timeout: Duration) {
    for (role, name) in &release.containers {
        if (role == WEB) != web {
            continue;
        }
        match ctx.docker.stop(name, timeout).await {
            Ok(()) | Err(DockerError::NoSuchContainer(_)) => {}
            Err(e) => warn!(container = %name, error = %e, "cannot stop container"),
        }
    }
}

/// Sets the release table entry `id` to `state` (and `result` when given).
fn set_state(table: &mut [Release], id: &str, state: ReleaseState, result: Option<JobResult>) {
    if let Some(r) = table.iter_mut().find(|r| r.id == id) {
        r.state = state;
        if result.is_some() {
            r.result = result;
        }
        if r.finished_unix_ms == 0 && result.is_some() {
            r.finished_unix_ms = unix_ms();
        }
    }
}

fn find<'a>(table: &'a [Release], id: &str) -> Option<&'a Release> {
    table.iter().find(|r| r.id == id)
}

/// What a deploy has created so far, so a failure can undo exactly that.
struct Made {
    release: Option<Release>,
    reserved: Option<Reserved>,
}

async fn deploy(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let mut made = Made {
        release: None,
        reserved: None,
    };
    let result = deploy_steps(ctx, job, report, &mut made).await;
    if let Err(f) = &result
        && let Some(release) = made.release.take()
    {
        // Nothing moved yet: remove what this deploy created; the live release is untouched.
        let removed = remove_containers(ctx, &release).await;
        if !removed.is_empty() {
            report
                .progress(
                    f.step,
                    format!("removed the new containers: {}", removed.join(", ")),
                )
                .await;
        }
        if let Ok(mut table) = ctx.store.releases(&job.app) {
            set_state(
                &mut table,
                &release.id,
                ReleaseState::Failed,
                Some(JobResult::Failed),
            );
            if let Err(e) = ctx.store.commit(job, &table).await {
                warn!(job = %job.id, error = %e, "cannot record the failed release");
            }
        }
    }
    result
}

async fn deploy_steps(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    made: &mut Made,
) -> Result<Outcome, Failure> {
    // validate
    let since = begin(
        ctx,
        job,
        report,
        "validate",
        format!("checking {} {}", job.app, job.version),
    )
    .await?;
    let source = format!("app {} (revision {})", job.app, job.spec_revision);
    let spec =
        AppSpec::from_toml(&job.spec_toml, &source).map_err(|e| fail("validate", e.to_string()))?;
    check_version(&spec, &job.version).map_err(|e| fail("validate", e))?;
    let env = app_env(ctx, &spec).map_err(|e| fail("validate", e))?;
    report
        .step_done(
            "validate",
            since,
            "spec, version and secrets are valid",
            BTreeMap::new(),
        )
        .await;

    let _lock = take_lock(ctx, job, report).await?;

    let since = begin(ctx, job, report, "backup", "pre-deploy backup".into()).await?;
    if job.skip_backup {
        report
            .step_skipped("backup", "skipped on request (--skip-backup)")
            .await;
    } else if let Some(target) = &spec.pre_deploy_backup {
        // The target the controller sent, else the one declared in the spec itself.
        let target_spec = match (&job.backup, spec.backups.iter().find(|b| b.name == *target)) {
            (Some(b), _) => b.target_toml.clone(),
            (None, Some(embedded)) => toml::to_string(embedded).unwrap_or_default(),
            (None, None) => String::new(),
        };
        let target_spec = match TargetSpec::from_toml(
            &target_spec,
            &format!("backup target {target}"),
        ) {
            Ok(t) if t.name == *target => t,
            Ok(t) => {
                return Err(fail(
                    "backup",
                    format!(
                        "the deploy carries backup target {} but the spec names {target}",
                        t.name
                    ),
                ));
            }
            Err(e) => {
                report.step_failed("backup", since, e.to_string()).await;
                return Err(fail(
                    "backup",
                    format!(
                        "the pre-deploy backup target {target} is not usable: {e} (drover backup-target apply FILE, or deploy with --skip-backup)"
                    ),
                ));
            }
        };
        let taken = crate::backup::take(
            ctx,
            job,
            report,
            &target_spec,
            Trigger::PreDeploy,
            None,
            Some("backup"),
        )
        .await;
        match taken {
            Ok(backup) => {
                report
                    .step_done(
                        "backup",
                        since,
                        format!("backup {} of {target} taken", backup.id),
                        BTreeMap::new(),
                    )
                    .await;
                crate::backup::report_catalog(ctx, target, &job.id).await;
            }
            Err(f) => {
                report.step_failed("backup", since, f.error.clone()).await;
                return Err(f);
            }
        }
    } else {
        report
            .step_skipped("backup", "the spec names no pre_deploy_backup")
            .await;
    }

    // The release is recorded before anything is created, so a crash finds its containers.
    let mut table = ctx
        .store
        .releases(&job.app)
        .map_err(|e| fail("image", e.to_string()))?;
    let previous = releases::live(&table).cloned();
    let image = format!("{}:{}", spec.image, job.version);
    let mut roles: Vec<String> = spec.workers.iter().map(|w| w.name.clone()).collect();
    if spec.web.is_some() {
        roles.insert(0, WEB.to_string());
    }
    let release = Release {
        id: job.id.clone(),
        app: job.app.clone(),
        version: job.version.clone(),
        image: image.clone(),
        image_id: String::new(),
        job_id: job.id.clone(),
        requested_by: job.requested_by.clone(),
        started_unix_ms: unix_ms(),
        finished_unix_ms: 0,
        result: None,
        state: ReleaseState::Deploying,
        spec_toml: job.spec_toml.clone(),
        containers: roles
            .iter()
            .map(|role| {
                (
                    role.clone(),
                    container_name(&job.app, role, &job.version, &job.id),
                )
            })
            .collect(),
    };
    table.push(release.clone());
    releases::trim_history(&mut table);
    job.release = release.id.clone();
    job.previous = previous.as_ref().map(|p| p.id.clone()).unwrap_or_default();
    ctx.store
        .commit(job, &table)
        .await
        .map_err(|e| fail("image", e.to_string()))?;
    made.release = Some(release.clone());

    // image
    let since = begin(ctx, job, report, "image", format!("looking for {image}")).await?;
    let image_id = match ctx
        .docker
        .image_id(&image)
        .await
        .map_err(|e| fail("image", e.to_string()))?
    {
        Some(id) => id,
        None => {
            report
                .progress("image", format!("{image} is not on this host; pulling it"))
                .await;
            ctx.docker.pull(&image).await.map_err(|e| {
                fail(
                    "image",
                    format!("image {image} is not present on this host and pulling it failed: {e}"),
                )
            })?;
            ctx.docker
                .image_id(&image)
                .await
                .map_err(|e| fail("image", e.to_string()))?
                .ok_or_else(|| {
                    fail(
                        "image",
                        format!("image {image} is still missing after the pull"),
                    )
                })?
        }
    };
    if let Some(r) = table.iter_mut().find(|r| r.id == release.id) {
        r.image_id = image_id.clone();
    }
    ctx.store
        .commit(job, &table)
        .await
        .map_err(|e| fail("image", e.to_string()))?;
    report
        .step_done(
            "image",
            since,
            format!("{image} is {}", short_id(&image_id)),
            BTreeMap::from([("image_id".to_string(), image_id.clone())]),
        )
        .await;

    // migrate
    if spec.migrate.is_empty() {
        report
            .step_skipped("migrate", "the spec has no migration command")
            .await;
    } else {
        let since = begin(
            ctx,
            job,
            report,
            "migrate",
            format!("running {}", spec.migrate.join(" ")),
        )
        .await?;
        let mut once = container_spec(&spec, &release, "migrate", &image, &env);
        once.name = container_name(&job.app, "migrate", &job.version, &job.id);
        once.command = spec.migrate.clone();
        once.publish = None;
        let (code, logs) = ctx
            .docker
            .run_to_completion(&once, MIGRATE_TIMEOUT)
            .await
            .map_err(|e| fail("migrate", e.to_string()))?;
        if code != 0 {
            report
                .step_failed("migrate", since, format!("exited with code {code}"))
                .await;
            return Err(fail(
                "migrate",
                format!(
                    "the migration `{}` exited with code {code}",
                    spec.migrate.join(" ")
                ),
            )
            .with_logs(logs.trim_end().to_string()));
        }
        report
            .step_done("migrate", since, "migration done", BTreeMap::new())
            .await;
    }

    // start
    let since = begin(
        ctx,
        job,
        report,
        "start",
        format!("starting {}", roles.join(", ")),
    )
    .await?;
    // The public address is taken under the app's lock, before anything is created.
    if let Some(web) = &spec.web {
        made.reserved = Some(
            ctx.apps
                .reserve(&spec.name, web.listen)
                .await
                .map_err(|e| fail("start", e))?,
        );
    }
    let mut addr = None;
    for role in &roles {
        let info = ctx
            .docker
            .create_and_start(&container_spec(&spec, &release, role, &image, &env))
            .await
            .map_err(|e| fail("start", e.to_string()))?;
        if role == WEB {
            addr = Some(web_addr(&info).ok_or_else(|| {
                fail(
                    "start",
                    format!("container {} has no published port", info.name),
                )
            })?);
        }
    }
    report
        .step_done(
            "start",
            since,
            format!(
                "started {}",
                release
                    .containers
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            BTreeMap::new(),
        )
        .await;

    let healthy_at = health_step(ctx, job, report, &spec, &release, addr).await?;

    // smoke
    match addr {
        Some(addr) if !spec.smoke.is_empty() => {
            let since = begin(
                ctx,
                job,
                report,
                "smoke",
                format!("{} smoke check(s)", spec.smoke.len()),
            )
            .await?;
            smoke(report, &spec, addr).await?;
            report
                .step_done("smoke", since, "smoke checks passed", BTreeMap::new())
                .await;
        }
        _ => report.step_skipped("smoke", "no smoke checks").await,
    }

    // switch: from here on the new release serves; failures no longer remove it.
    let switched = switch_step(
        ctx,
        job,
        report,
        &mut table,
        &release,
        previous.as_ref(),
        (addr, made.reserved.take()),
        &spec,
    )
    .await?;
    made.release = None;
    let (proxy, new_upstream, old_upstream) = (switched.proxy, switched.new, switched.old);
    // drain and watch, side by side: the new release is watched from the switch on while the
    // old one finishes its requests; it keeps running, ready to serve again, until both end.
    let drain_since = match &old_upstream {
        Some(old) => Some(begin(ctx, job, report, "drain", drain_message(old)).await?),
        None => {
            report.step_skipped("drain", "nothing served before").await;
            None
        }
    };
    let since = begin(
        ctx,
        job,
        report,
        "watch",
        format!("watching {} for {:?}", job.version, spec.watch.window),
    )
    .await?;
    let token = ctx.cancels.token(&job.id);
    let drain = async {
        match &old_upstream {
            Some(old) => Some(old.drain(spec.drain_timeout).await),
            None => None,
        }
    };
    let window = watch(ctx, &spec, &release, new_upstream.as_deref());
    tokio::pin!(drain, window);
    let mut draining = drain_since.is_some();
    let watched = loop {
        tokio::select! {
            drained = &mut drain, if draining => {
                draining = false;
                if let (Some(drained), Some(at)) = (drained, drain_since) {
                    let message = drained.describe(spec.drain_timeout);
                    report.step_done("drain", at, message, BTreeMap::new()).await;
                    // Back to the step still running (the controller shows the latest one).
                    report
                        .progress("watch", format!("drain over; still watching {}", job.version))
                        .await;
                }
            }
            breach = &mut window => break breach,
            // A cancel in the window is a breach the operator called: switch back the same way
            // (the runner reports it `cancelled`).
            _ = token.cancelled() => break Some(cancelled(ctx, job, "watch").error),
        }
    };
    if let Some(breach) = watched {
        let Some(prev) = &previous else {
            report.step_failed("watch", since, breach.clone()).await;
            return Err(fail(
                "watch",
                format!(
                    "{breach}; there is no earlier release to switch back to, so {} keeps serving",
                    job.version
                ),
            ));
        };
        // Switch back at once: the old web container is still running (its drain, if not over,
        // ends here: it serves again).
        if let (Some(p), Some(old)) = (&proxy, &old_upstream) {
            p.switch(old.clone());
        }
        if let (true, Some(at)) = (draining, drain_since) {
            report
                .step_done(
                    "drain",
                    at,
                    format!("cut short: {} serves again", prev.version),
                    BTreeMap::new(),
                )
                .await;
        }
        for (role, name) in &prev.containers {
            if role != WEB
                && let Err(e) = ctx.docker.start(name).await
            {
                warn!(container = %name, error = %e, "cannot restart an old worker");
            }
        }
        set_state(&mut table, &prev.id, ReleaseState::Live, None);
        set_state(
            &mut table,
            &release.id,
            ReleaseState::Failed,
            Some(JobResult::RolledBack),
        );
        job.switched = false;
        ctx.store
            .commit(job, &table)
            .await
            .map_err(|e| fail("watch", e.to_string()))?;
        report
            .step_failed(
                "watch",
                since,
                format!("{breach}; switched back to {}", prev.version),
            )
            .await;
        if let Some(up) = &new_upstream {
            let drained = up.drain(spec.drain_timeout).await;
            if !drained.finished() {
                report
                    .progress(
                        "watch",
                        format!("{}: {}", job.version, drained.describe(spec.drain_timeout)),
                    )
                    .await;
            }
        }
        let logs = match release.containers.get(WEB) {
            Some(name) => logs_of(ctx, name).await,
            None => String::new(),
        };
        remove_containers(ctx, &release).await;
        return Ok(Outcome {
            result: JobResult::RolledBack,
            step: "watch".into(),
            error: breach,
            logs,
            ..Outcome::succeeded(&prev.version, &job.version)
        });
    }
    report
        .step_done("watch", since, "no breach", BTreeMap::new())
        .await;
    if draining {
        let drained = drain.await;
        if let (Some(drained), Some(at)) = (drained, drain_since) {
            let message = drained.describe(spec.drain_timeout);
            report
                .step_done("drain", at, message, BTreeMap::new())
                .await;
        }
    }

    stop_old_step(ctx, job, report, previous.as_ref(), spec.stop_timeout).await?;

    // prune
    let since = begin(
        ctx,
        job,
        report,
        "prune",
        format!("keeping {} release(s)", spec.keep_releases),
    )
    .await?;
    set_state(
        &mut table,
        &release.id,
        ReleaseState::Live,
        Some(JobResult::Succeeded),
    );
    let pruned = prune(ctx, &mut table, spec.keep_releases as usize).await;
    ctx.store
        .commit(job, &table)
        .await
        .map_err(|e| fail("prune", e.to_string()))?;
    report
        .step_done(
            "prune",
            since,
            if pruned.is_empty() {
                "nothing to prune".to_string()
            } else {
                format!("removed {}", pruned.join(", "))
            },
            BTreeMap::new(),
        )
        .await;

    let mut outcome = Outcome::succeeded(
        &job.version,
        previous.as_ref().map(|p| p.version.as_str()).unwrap_or(""),
    );
    if let Some(first) = new_upstream
        .as_ref()
        .and_then(|u| u.first_request_unix_ms())
    {
        outcome.extra.insert(
            "first_request_after_healthy_ms".into(),
            (first - healthy_at).max(0).to_string(),
        );
    }
    Ok(outcome)
}

/// What moving traffic leaves behind: the app's proxy (to switch back), and the new and old
/// upstreams. All `None` for a worker-only app.
struct Switched {
    proxy: Option<Proxy>,
    new: Option<Arc<Upstream>>,
    old: Option<Arc<Upstream>>,
}

/// The switch step: commits `release` live (and `previous` kept) together with the job in one
/// transaction, makes the new containers restart with the host, swaps the app's proxy to the
/// new web container in one atomic step, and stops the previous release's workers.
#[allow(clippy::too_many_arguments)]
async fn switch_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    table: &mut [Release],
    release: &Release,
    previous: Option<&Release>,
    (addr, reserved): (Option<SocketAddr>, Option<Reserved>),
    spec: &AppSpec,
) -> Result<Switched, Failure> {
    let since = begin(ctx, job, report, "switch", "moving traffic".into()).await?;
    set_state(table, &release.id, ReleaseState::Live, None);
    if let Some(p) = previous {
        set_state(table, &p.id, ReleaseState::Kept, None);
    }
    job.switched = true;
    ctx.store
        .commit(job, table)
        .await
        .map_err(|e| fail("switch", e.to_string()))?;
    pause_point("switch:committed").await;
    for name in release.containers.values() {
        if let Err(e) = ctx.docker.set_restart(name, true).await {
            warn!(container = %name, error = %e, "cannot set the restart policy");
        }
    }
    let mut switched = Switched {
        proxy: None,
        new: addr.map(|a| Upstream::new(a, &release.version)),
        old: None,
    };
    if let (Some(up), Some(reserved)) = (&switched.new, reserved) {
        let proxy = match reserved {
            serving @ Reserved::Serving(_) => {
                let proxy = ctx.apps.install(&job.app, serving, &ctx.shutdown);
                switched.old = proxy.switch(up.clone());
                proxy
            }
            // A first deploy or a new address: the new proxy serves the new release from its
            // first connection (never "no release is live").
            bound => ctx
                .apps
                .install_serving(&job.app, bound, Some(up.clone()), &ctx.shutdown),
        };
        switched.proxy = Some(proxy);
    }
    if let Some(p) = previous {
        stop_roles(ctx, p, false, spec.stop_timeout).await;
    }
    let serves = spec
        .web
        .as_ref()
        .map(|w| w.listen.to_string())
        .unwrap_or_else(|| "(workers)".into());
    report
        .step_done(
            "switch",
            since,
            format!("{} serves {serves}", release.version),
            BTreeMap::new(),
        )
        .await;
    Ok(switched)
}

/// What the drain waits for, as its start line: the requests in flight and the upgraded
/// connections (WebSockets) open on the old release, named.
fn drain_message(old: &Upstream) -> String {
    let open = old.upgraded();
    let mut message = format!(
        "letting {} finish its requests ({} in flight",
        old.release,
        old.inflight()
    );
    if !open.is_empty() {
        message.push_str(&format!(
            "; {} upgraded connection(s) open: {}",
            open.len(),
            crate::proxy::name_some(&open)
        ));
    }
    message.push(')');
    message
}

/// The drain step: in-flight requests and upgraded connections on the old upstream finish (up
/// to `timeout`; WebSockets still open then get a close frame, 1001).
async fn drain_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    old: Option<&Upstream>,
    timeout: Duration,
) -> Result<(), Failure> {
    let Some(old) = old else {
        report.step_skipped("drain", "nothing served before").await;
        return Ok(());
    };
    let since = begin(ctx, job, report, "drain", drain_message(old)).await?;
    let message = old.drain(timeout).await.describe(timeout);
    report
        .step_done("drain", since, message, BTreeMap::new())
        .await;
    Ok(())
}

/// The stop_old step: the previous release's web container stops (kept for rollback).
async fn stop_old_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    previous: Option<&Release>,
    timeout: Duration,
) -> Result<(), Failure> {
    let Some(p) = previous else {
        report
            .step_skipped("stop_old", "nothing served before")
            .await;
        return Ok(());
    };
    let message = format!("stopping {} (kept for rollback)", p.version);
    let since = begin(ctx, job, report, "stop_old", message).await?;
    stop_roles(ctx, p, true, timeout).await;
    report
        .step_done(
            "stop_old",
            since,
            format!("{} stopped", p.version),
            BTreeMap::new(),
        )
        .await;
    Ok(())
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// Watches the new release for the window: its traffic (5xx ratio, p95 latency) and its
/// containers. Returns the breach, if any.
async fn watch(
    ctx: &JobCtx,
    spec: &AppSpec,
    release: &Release,
    upstream: Option<&Upstream>,
) -> Option<String> {
    let deadline = Instant::now() + spec.watch.window;
    let mut next_container_check = Instant::now();
    while Instant::now() < deadline {
        if let Some(up) = upstream
            && let Some(breach) = watch_breach(&up.stats.snapshot(), &spec.watch)
        {
            return Some(breach);
        }
        if Instant::now() >= next_container_check {
            next_container_check = Instant::now() + Duration::from_secs(1);
            for name in release.containers.values() {
                if let Ok(Some(info)) = ctx.docker.inspect(name).await
                    && !info.running
                {
                    return Some(format!(
                        "container {name} exited with code {}",
                        info.exit_code.unwrap_or(-1)
                    ));
                }
            }
        }
        tokio::time::sleep(WATCH_TICK.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
    None
}

/// Removes the containers of releases beyond the kept ones (never the live one or the rollback
/// target), and untags their image when no live or kept release uses it. Returns what went.
pub(crate) async fn prune(ctx: &JobCtx, table: &mut [Release], keep: usize) -> Vec<String> {
    let mut pruned = Vec::new();
    for id in releases::to_prune(table, keep) {
        let Some(r) = find(table, &id).cloned() else {
            continue;
        };
        remove_containers(ctx, &r).await;
        set_state(table, &id, ReleaseState::Removed, None);
        let in_use = table.iter().any(|o| {
            o.image == r.image
                && matches!(
                    o.state,
                    ReleaseState::Live | ReleaseState::Kept | ReleaseState::Deploying
                )
        });
        if !in_use {
            match ctx.docker.remove_image(&r.image).await {
                Ok(_) => {}
                Err(e) => warn!(image = %r.image, error = %e, "cannot remove an old image"),
            }
        }
        pruned.push(r.version.clone());
    }
    pruned
}

async fn rollback(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let _lock = take_lock(ctx, job, report).await?;

    // locate
    let since = begin(
        ctx,
        job,
        report,
        "locate",
        "finding the release to go back to".into(),
    )
    .await?;
    let mut table = ctx
        .store
        .releases(&job.app)
        .map_err(|e| fail("locate", e.to_string()))?;
    let to = (!job.version.is_empty()).then_some(job.version.as_str());
    let Some(target) = releases::rollback_target(&table, to).cloned() else {
        let why = match to {
            Some(v) => format!(
                "no release of {} with version {v} on this host can serve again (drover releases {})",
                job.app, job.app
            ),
            None => format!(
                "no earlier release of {} on this host to roll back to (drover releases {})",
                job.app, job.app
            ),
        };
        return Err(fail("locate", why));
    };
    let live = releases::live(&table).cloned();
    job.release = target.id.clone();
    job.previous = live.as_ref().map(|l| l.id.clone()).unwrap_or_default();
    ctx.store
        .put_job(job)
        .await
        .map_err(|e| fail("locate", e.to_string()))?;
    let spec = AppSpec::from_toml(
        &target.spec_toml,
        &format!("release {} of {}", target.version, job.app),
    )
    .map_err(|e| fail("locate", e.to_string()))?;
    let env = app_env(ctx, &spec).map_err(|e| fail("locate", e))?;
    let reserved = match &spec.web {
        Some(web) => Some(
            ctx.apps
                .reserve(&spec.name, web.listen)
                .await
                .map_err(|e| fail("locate", e))?,
        ),
        None => None,
    };
    report
        .step_done(
            "locate",
            since,
            format!(
                "{} ({}), {}",
                target.version,
                short_id(&target.image_id),
                target.state.as_str()
            ),
            BTreeMap::new(),
        )
        .await;

    let started = rollback_bring_up(ctx, job, report, &spec, &target, &env).await;
    let addr = match started {
        Ok(addr) => addr,
        Err(f) => {
            // Back to how it was: kept containers stopped, recreated ones removed.
            if target.state == ReleaseState::Removed {
                remove_containers(ctx, &target).await;
            } else {
                stop_roles(ctx, &target, true, spec.stop_timeout).await;
                stop_roles(ctx, &target, false, spec.stop_timeout).await;
            }
            return Err(f);
        }
    };

    let switched = switch_step(
        ctx,
        job,
        report,
        &mut table,
        &target,
        live.as_ref(),
        (addr, reserved),
        &spec,
    )
    .await?;
    drain_step(
        ctx,
        job,
        report,
        switched.old.as_deref(),
        spec.drain_timeout,
    )
    .await?;
    stop_old_step(ctx, job, report, live.as_ref(), spec.stop_timeout).await?;
    Ok(Outcome::succeeded(
        &target.version,
        live.as_ref().map(|l| l.version.as_str()).unwrap_or(""),
    ))
}

/// Starts (or recreates from its image ID) a rollback target's containers and health-gates
/// them. Returns the web address, if the app has a web role.
async fn rollback_bring_up(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    spec: &AppSpec,
    target: &Release,
    env: &BTreeMap<String, String>,
) -> Result<Option<SocketAddr>, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "start",
        format!("starting {}", target.version),
    )
    .await?;
    let mut addr = None;
    let mut how = Vec::new();
    for (role, name) in &target.containers {
        let info = match ctx
            .docker
            .inspect(name)
            .await
            .map_err(|e| fail("start", e.to_string()))?
        {
            Some(_) => {
                ctx.docker
                    .start(name)
                    .await
                    .map_err(|e| fail("start", e.to_string()))?;
                how.push(format!("started {name}"));
                ctx.docker
                    .inspect(name)
                    .await
                    .map_err(|e| fail("start", e.to_string()))?
            }
            None => {
                let image = if ctx
                    .docker
                    .image_id(&target.image_id)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    target.image_id.clone()
                } else {
                    return Err(fail(
                        "start",
                        format!(
                            "container {name} was pruned and its image {} ({}) is no longer on this host; deploy {} again instead",
                            target.image,
                            short_id(&target.image_id),
                            target.version
                        ),
                    ));
                };
                let info = ctx
                    .docker
                    .create_and_start(&container_spec(spec, target, role, &image, env))
                    .await
                    .map_err(|e| fail("start", e.to_string()))?;
                how.push(format!(
                    "recreated {name} from {}",
                    short_id(&target.image_id)
                ));
                Some(info)
            }
        };
        if role == WEB {
            addr = info.as_ref().and_then(web_addr);
            if addr.is_none() {
                return Err(fail(
                    "start",
                    format!("container {name} has no published port"),
                ));
            }
        }
    }
    report
        .step_done("start", since, how.join(", "), BTreeMap::new())
        .await;
    health_step(ctx, job, report, spec, target, addr).await?;
    Ok(addr)
}

/// The command as a job record, ready for the store.
pub fn job_from_command(cmd: &drover_proto::v1::Command, now_ms: i64) -> Option<JobRecord> {
    use drover_proto::v1::command::Job;
    let base = |kind, app: &str, version: &str, requested_by: &str, wait_lock| JobRecord {
        id: cmd.job_id.clone(),
        kind,
        app: app.to_string(),
        version: version.to_string(),
        spec_toml: String::new(),
        spec_revision: 0,
        skip_backup: false,
        wait_lock,
        requested_by: requested_by.to_string(),
        accepted_unix_ms: now_ms,
        step: String::new(),
        finished: false,
        release: String::new(),
        previous: String::new(),
        switched: false,
        backup: None,
    };
    match cmd.job.as_ref()? {
        Job::Deploy(d) => Some(JobRecord {
            spec_toml: d.spec_toml.clone(),
            spec_revision: d.spec_revision,
            skip_backup: d.skip_backup,
            backup: (!d.backup_target_toml.is_empty()).then(|| BackupJob {
                target_toml: d.backup_target_toml.clone(),
                trigger: "pre_deploy".into(),
                ..BackupJob::default()
            }),
            ..base(
                JobKind::Deploy,
                &d.app,
                &d.version,
                &d.requested_by,
                d.wait_lock,
            )
        }),
        Job::Rollback(r) => Some(base(
            JobKind::Rollback,
            &r.app,
            &r.to_version,
            &r.requested_by,
            r.wait_lock,
        )),
        Job::Backup(b) => Some(JobRecord {
            backup: Some(BackupJob {
                target_toml: b.target_toml.clone(),
                trigger: b.trigger.clone(),
                ..BackupJob::default()
            }),
            ..base(JobKind::Backup, &b.target, "", &b.requested_by, false)
        }),
        Job::Verify(v) => Some(JobRecord {
            backup: Some(BackupJob {
                target_toml: v.target_toml.clone(),
                identity_file: v.identity_file.clone(),
                ..BackupJob::default()
            }),
            ..base(JobKind::Verify, &v.target, "", &v.requested_by, false)
        }),
        Job::Restore(r) => Some(JobRecord {
            backup: Some(BackupJob {
                target_toml: r.target_toml.clone(),
                backup_id: r.backup_id.clone(),
                part: r.part.clone(),
                to_database: r.to_database.clone(),
                to_dir: r.to_dir.clone(),
                confirmed: r.confirmed,
                identity_file: r.identity_file.clone(),
                ..BackupJob::default()
            }),
            ..base(
                JobKind::Restore,
                &r.target,
                &r.backup_id,
                &r.requested_by,
                false,
            )
        }),
        Job::Prune(p) => Some(JobRecord {
            backup: Some(BackupJob {
                target_toml: p.target_toml.clone(),
                dry_run: p.dry_run,
                ..BackupJob::default()
            }),
            ..base(JobKind::Prune, &p.target, "", &p.requested_by, false)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_are_readable_unique_and_valid() {
        assert_eq!(
            container_name("api", "web", "v1.2.3", "deploy-20261123-142233-3f2a"),
            "drover-api-web-v1.2.3-3f2a"
        );
        assert_eq!(
            container_name("api", "bot", "v1.0.0+b7", "x"),
            "drover-api-bot-v1.0.0-b7-x"
        );
    }

    #[test]
    fn the_watch_window_judges_only_enough_traffic() {
        let watch = Watch {
            window: Duration::from_secs(60),
            max_5xx_ratio: 0.05,
            max_p95_latency: Duration::from_millis(500),
        };
        let snap = |requests, status_5xx, p95_ms| StatsSnapshot {
            requests,
            status_5xx,
            p95_ms,
        };
        assert_eq!(
            watch_breach(&snap(10, 10, 9000), &watch),
            None,
            "too few requests to judge"
        );
        assert_eq!(
            watch_breach(&snap(100, 5, 500), &watch),
            None,
            "at the limits"
        );
        let b = watch_breach(&snap(100, 6, 10), &watch).unwrap();
        assert!(
            b.contains("6.0% of 100 requests answered 5xx (limit 5.0%)"),
            "{b}"
        );
        let b = watch_breach(&snap(100, 0, 750), &watch).unwrap();
        assert!(b.contains("p95 latency 750 ms"), "{b}");
    }
}
