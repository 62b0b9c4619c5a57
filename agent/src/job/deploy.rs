//! The deploy job kind: validate → lock → backup → image → migrate → start → health → smoke →
//! switch → drain and watch (side by side) → stop_old → prune. Until `switch`, the live
//! release is never touched: a failure removes what the job created and leaves the old version
//! serving. `switch` moves traffic in one atomic proxy swap, committed to the store together
//! with the release table. The watch window starts at the switch, while the old release
//! drains; a breach swaps back to the old release (kept running until the window closes and
//! its drain ends) within a second, even in the middle of its drain. The steps both release
//! kinds share are in `crate::release`; the pre-deploy backup is `crate::backup::take`.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::warn;

use crate::apps::Reserved;
use crate::job::step::{
    Failure, JobCtx, Outcome, RecoveryError, Report, begin, cancelled, fail, outcome_of, take_lock,
};
use crate::release::{
    WEB, app_env, container_name, container_spec, drain_message, health_step, logs_of, prune,
    remove_containers, set_state, short_id, smoke, stop_old_step, switch_step, watch, web_addr,
};
use crate::store::JobRecord;
use crate::unix_ms;
use drover_model::appspec::{AppSpec, check_version};
use drover_model::backup::catalog::Trigger;
use drover_model::backup::target::TargetSpec;
use drover_model::jobevent::{JobResult, Release, ReleaseState};
use drover_model::releases;

/// Runs a deploy to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(deploy(ctx, job, report).await)
}

/// After a crash: see `recovery::converge_release`.
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    crate::recovery::converge_release(ctx, job).await
}

/// A migration may run this long.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

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
                crate::job::step::report_catalog(ctx, target, &job.id).await;
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
                    container_name(&ctx.host, &job.app, role, &job.version, &job.id),
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
    let image_id = crate::release::ensure_image(ctx, report, "image", &image).await?;
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
    } else if job.skip_migration {
        report
            .step_skipped(
                "migrate",
                "the release runs its migration on its first host only",
            )
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
        let mut once = container_spec(&ctx.host, &spec, &release, "migrate", &image, &env);
        once.name = container_name(&ctx.host, &job.app, "migrate", &job.version, &job.id);
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
            .create_and_start(&container_spec(
                &ctx.host, &spec, &release, role, &image, &env,
            ))
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

    stop_old_step(
        ctx,
        job,
        report,
        previous.as_ref(),
        spec.stop_timeout,
        job.keep_previous,
    )
    .await?;

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
