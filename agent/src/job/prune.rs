//! The prune job kind: validate → lock → retention (the keep rule is
//! `drover_model::backup::retention`).

use crate::backup::{prune_step, validate};
use crate::job::step::{Failure, JobCtx, Outcome, RecoveryError, Report, outcome_of, take_lock};
use crate::store::JobRecord;
use drover_model::jobevent::Payload;

/// Runs a prune to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(prune_job(ctx, job, report).await)
}

/// After a crash: reported interrupted (`crate::backup::converge`).
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    crate::backup::converge(ctx, job, Vec::new()).await;
    Ok(())
}

async fn prune_job(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let spec = validate(ctx, job, report).await?;
    let _lock = take_lock(ctx, job, report).await?;
    let dry_run = job.backup.as_ref().is_some_and(|b| b.dry_run);
    let lines = prune_step(ctx, job, report, &spec, dry_run).await?;
    let gone = lines.iter().filter(|l| !l.keep).count();
    let mut out = Outcome::succeeded("", "");
    out.summary = if dry_run {
        format!("dry run: {gone} cop(ies) of {} would be deleted", spec.name)
    } else {
        format!("{gone} cop(ies) of {} deleted", spec.name)
    };
    out.payload = Some(Payload::Prune(lines));
    Ok(out)
}
