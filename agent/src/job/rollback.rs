//! The rollback job kind: lock → locate → start → health → switch → drain → stop_old. The
//! release it goes back to is `drover_model::releases::rollback_target`; the steps both
//! release kinds share are in `crate::release`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::job::step::{
    Failure, JobCtx, Outcome, RecoveryError, Report, begin, fail, outcome_of, take_lock,
};
use crate::release::{
    WEB, app_env, container_spec, drain_step, health_step, remove_containers, short_id,
    stop_old_step, stop_roles, switch_step, web_addr,
};
use crate::store::JobRecord;
use drover_model::appspec::AppSpec;
use drover_model::jobevent::{Release, ReleaseState};
use drover_model::releases;

/// Runs a rollback to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(rollback(ctx, job, report).await)
}

/// After a crash: see `recovery::converge_release`.
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    crate::recovery::converge_release(ctx, job).await
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
    stop_old_step(ctx, job, report, live.as_ref(), spec.stop_timeout, false).await?;
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
                    .create_and_start(&container_spec(&ctx.host, spec, target, role, &image, env))
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
