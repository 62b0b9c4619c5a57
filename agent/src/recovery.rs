//! What the agent does on start before it takes new jobs: bring the app proxies back first
//! (each bound only once its live upstream is known, so the first request is served), then
//! converge every job a crash (or a kill) interrupted to exactly one serving release, remove
//! orphan containers and releases beyond `keep_releases`, make sure every live release runs,
//! and point each proxy at the release that is live in the end.
//!
//! Several agents may share one Docker Engine: everything here acts on the containers this
//! agent's release tables name, and the orphan sweep removes only containers this agent owns
//! (`release::owns`: labelled with its host, or made before that label existed).
//!
//! The rule for an interrupted job: if traffic had not moved (`switched` is false), the old
//! release keeps serving and whatever the job created is removed; if it had, the new release
//! stays if it passes its health check, else traffic goes back to the old one. The job is then
//! reported `interrupted`, with what was done.

use std::time::Duration;

use tracing::{info, warn};

use crate::apps::Reserved;
use crate::docker::ContainerInfo;
use crate::job::step::{JobCtx, Outcome, Report, finish, report_releases};
use crate::job::step::{RecoveryError, interrupted_message};
use crate::proxy::Upstream;
use crate::release::{self, LABEL_RELEASE, WEB, container_spec};
use crate::secrets;
use crate::store::{JobKind, JobRecord};
use drover_model::appspec::AppSpec;
use drover_model::jobevent::{JobResult, Release, ReleaseState};
use drover_model::releases;

/// Converges interrupted jobs, sweeps every app, restores the proxies. Fails (to be retried)
/// only when the store or the Docker Engine cannot be used.
pub async fn recover(ctx: &JobCtx) -> Result<(), RecoveryError> {
    // Traffic first, before the slow steps below: every app whose live web container still
    // runs (a killed agent leaves them running) serves again at once.
    for app in ctx.store.release_apps()? {
        restore_proxy(ctx, &app).await;
    }
    // The Engine must answer before anything is judged from what it shows.
    ctx.docker.list_labelled(release::LABEL_APP, "-").await?;
    crate::job::verify::sweep_scratch(ctx).await;
    let jobs = ctx.store.unfinished_jobs()?;
    for job in jobs {
        ctx.redactor.learn_job(&ctx.secrets_dir, &job);
        crate::job::converge(ctx, job).await?;
    }
    for app in ctx.store.release_apps()? {
        sweep(ctx, &app).await?;
        restore_proxy(ctx, &app).await;
    }
    Ok(())
}

fn find(table: &[Release], id: &str) -> Option<Release> {
    table.iter().find(|r| r.id == id).cloned()
}

fn set(table: &mut [Release], id: &str, state: ReleaseState, result: Option<JobResult>) {
    if let Some(r) = table.iter_mut().find(|r| r.id == id) {
        r.state = state;
        if result.is_some() {
            r.result = result;
            if r.finished_unix_ms == 0 {
                r.finished_unix_ms = crate::unix_ms();
            }
        }
    }
}

async fn remove_all(ctx: &JobCtx, release: &Release) {
    for name in release.containers.values() {
        if let Err(e) = ctx.docker.remove(name).await {
            warn!(container = %name, error = %e, "cannot remove container");
        }
    }
}

/// Makes every container of `release` run: starts stopped ones, recreates missing ones from
/// the release's image ID. Returns the web container, if any.
async fn ensure_running(
    ctx: &JobCtx,
    release: &Release,
) -> Result<Option<ContainerInfo>, RecoveryError> {
    let spec = AppSpec::from_toml(&release.spec_toml, &format!("release {}", release.version))?;
    let mut web = None;
    for (role, name) in &release.containers {
        let info = match ctx.docker.inspect(name).await? {
            Some(info) if info.running => info,
            Some(_) => {
                ctx.docker.start(name).await?;
                info!(container = %name, "started a stopped container of a live release");
                ctx.docker
                    .inspect(name)
                    .await?
                    .ok_or_else(|| RecoveryError::Vanished(name.clone()))?
            }
            None => {
                let mut env = spec.env.clone();
                env.extend(secrets::load(&ctx.secrets_dir, &spec).map_err(RecoveryError::Secrets)?);
                let info = ctx
                    .docker
                    .create_and_start(&container_spec(
                        &ctx.host,
                        &spec,
                        release,
                        role,
                        &release.image_id,
                        &env,
                    ))
                    .await?;
                let _ = ctx.docker.set_restart(name, true).await;
                info!(container = %name, "recreated a missing container of a live release");
                info
            }
        };
        if role == WEB {
            web = Some(info);
        }
    }
    Ok(web)
}

/// Whether a release serves: its containers run and its web role passes its health check.
async fn healthy(
    ctx: &JobCtx,
    report: &Report<'_>,
    release: &Release,
) -> Result<(), RecoveryError> {
    let spec = AppSpec::from_toml(&release.spec_toml, "release")?;
    let web = ensure_running(ctx, release).await?;
    if let Some(info) = web {
        let addr = info
            .host_port
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
            .ok_or_else(|| {
                RecoveryError::Unhealthy("the web container has no published port".into())
            })?;
        release::wait_healthy(ctx, report, "recover", &info.name, addr, &spec.health)
            .await
            .map_err(|f| RecoveryError::Unhealthy(f.error))?;
    }
    Ok(())
}

/// Converges an interrupted deploy or rollback (the rule in this file's header) and reports it
/// `interrupted`; the release kinds' `converge` (`crate::job`).
pub(crate) async fn converge_release(
    ctx: &JobCtx,
    mut job: JobRecord,
) -> Result<(), RecoveryError> {
    let report = Report::new(&ctx.outbox, &job.id);
    let mut table = ctx.store.releases(&job.app)?;
    let target = find(&table, &job.release);
    let previous = find(&table, &job.previous);
    let step = if job.step.is_empty() {
        "start".to_string()
    } else {
        job.step.clone()
    };
    let mut did = Vec::new();
    match (&target, job.switched) {
        (Some(t), true) => match healthy(ctx, &report, t).await {
            Ok(()) => {
                if let Some(p) = &previous {
                    release::stop_running(ctx, p).await;
                    set(&mut table, &p.id, ReleaseState::Kept, None);
                }
                let result = t.result.or(Some(JobResult::Succeeded));
                set(&mut table, &t.id, ReleaseState::Live, result);
                did.push(format!(
                    "traffic had moved to {}, which is healthy and keeps serving",
                    t.version
                ));
            }
            Err(why) => match &previous {
                Some(p) => {
                    ensure_running(ctx, p).await?;
                    set(&mut table, &p.id, ReleaseState::Live, None);
                    if job.kind == JobKind::Deploy {
                        remove_all(ctx, t).await;
                        set(
                            &mut table,
                            &t.id,
                            ReleaseState::Failed,
                            Some(JobResult::Interrupted),
                        );
                    } else {
                        release::stop_running(ctx, t).await;
                        set(&mut table, &t.id, ReleaseState::Kept, None);
                    }
                    did.push(format!(
                        "traffic had moved to {}, which is not healthy ({why}); back to {}",
                        t.version, p.version
                    ));
                }
                None => did.push(format!(
                    "traffic had moved to {}, which is not healthy ({why}), and there is nothing else to serve",
                    t.version
                )),
            },
        },
        (Some(t), false) => {
            if job.kind == JobKind::Deploy || t.state == ReleaseState::Removed {
                remove_all(ctx, t).await;
                did.push(format!("removed the containers of {}", t.version));
            } else {
                release::stop_running(ctx, t).await;
                did.push(format!("stopped {} again", t.version));
            }
            if job.kind == JobKind::Deploy {
                set(
                    &mut table,
                    &t.id,
                    ReleaseState::Failed,
                    Some(JobResult::Interrupted),
                );
            }
        }
        (None, _) => {}
    }
    if !job.switched || target.is_none() {
        match releases::live(&table).cloned() {
            Some(live) => {
                ensure_running(ctx, &live).await?;
                did.push(format!("{} keeps serving", live.version));
            }
            None => did.push("no release of the app was live".to_string()),
        }
    }
    job.switched = false;
    ctx.store.commit(&job, &table).await?;
    let live = releases::live(&table)
        .map(|r| r.version.clone())
        .unwrap_or_default();
    let message = interrupted_message(&step, &did);
    info!(job = %job.id, "{message}");
    let outcome = Outcome {
        result: JobResult::Interrupted,
        step,
        error: message,
        live_version: live,
        ..Outcome::failed("", "")
    };
    finish(ctx, &mut job, &report, outcome, Duration::ZERO).await;
    Ok(())
}

/// Removes the app's orphan containers (this agent's only: another agent on the same Engine
/// may run the same app, `release::owns`), stops kept releases left running, removes kept
/// releases beyond the live spec's `keep_releases` (an interrupted deploy never reached its
/// prune step), and makes sure the live release runs.
async fn sweep(ctx: &JobCtx, app: &str) -> Result<(), RecoveryError> {
    let mut table = ctx.store.releases(app)?;
    let found = ctx.docker.list_labelled(release::LABEL_APP, app).await?;
    let pairs: Vec<(String, String)> = found
        .iter()
        .filter(|c| release::owns(&c.labels, &ctx.host))
        .map(|c| {
            (
                c.name.clone(),
                c.labels.get(LABEL_RELEASE).cloned().unwrap_or_default(),
            )
        })
        .collect();
    let orphans = releases::orphans(&pairs, &table);
    for name in &orphans {
        match ctx.docker.remove(name).await {
            Ok(true) => info!(app, container = %name, "removed an orphan container"),
            Ok(false) => {}
            Err(e) => warn!(app, container = %name, error = %e, "cannot remove an orphan"),
        }
    }
    for kept in table.iter().filter(|r| r.state == ReleaseState::Kept) {
        release::stop_running(ctx, kept).await;
    }
    let keep = releases::live(&table)
        .and_then(|live| AppSpec::from_toml(&live.spec_toml, "release").ok())
        .map(|spec| spec.keep_releases as usize);
    let mut pruned = Vec::new();
    if let Some(keep) = keep {
        pruned = release::prune(ctx, &mut table, keep).await;
        if !pruned.is_empty() {
            ctx.store.put_releases(app, &table).await?;
            info!(app, keep, removed = %pruned.join(", "), "pruned releases an interrupted deploy left beyond keep_releases");
        }
    }
    if let Some(live) = releases::live(&table)
        && let Err(e) = ensure_running(ctx, live).await
    {
        warn!(app, release = %live.version, error = %e, "the live release cannot be started");
    }
    if !orphans.is_empty() || !pruned.is_empty() {
        report_releases(ctx, app, "recovery").await;
    }
    Ok(())
}

/// Serves the app's live web release on its public address: binds the address with the live
/// container as its upstream, or points the running proxy at it if the live release changed.
/// Does nothing while the live web container does not run (the sweep starts it; this runs again
/// after).
async fn restore_proxy(ctx: &JobCtx, app: &str) {
    let Ok(table) = ctx.store.releases(app) else {
        return;
    };
    let Some(live) = releases::live(&table) else {
        return;
    };
    let Some(name) = live.containers.get(WEB) else {
        return;
    };
    let Ok(spec) = AppSpec::from_toml(&live.spec_toml, "release") else {
        return;
    };
    let Some(web) = spec.web else { return };
    let addr = match ctx.docker.inspect(name).await {
        Ok(Some(info)) if info.running => info
            .host_port
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p))),
        // Not running (yet): the sweep starts it, then this runs again.
        Ok(Some(_)) | Ok(None) | Err(_) => return,
    };
    let Some(addr) = addr else {
        warn!(app, container = %name, "the live web container has no published port; not serving");
        return;
    };
    match ctx.apps.reserve(app, web.listen).await {
        Ok(reserved) => {
            let serving = matches!(reserved, Reserved::Serving(_));
            let upstream = Upstream::new(addr, &live.version);
            ctx.apps
                .install_serving(app, reserved, Some(upstream), &ctx.shutdown);
            if !serving {
                info!(app, listen = %ctx.apps.public_addr(web.listen), release = %live.version, "serving");
            }
        }
        Err(e) => warn!(app, error = %e, "cannot serve the live release"),
    }
}

#[cfg(test)]
mod tests {}
