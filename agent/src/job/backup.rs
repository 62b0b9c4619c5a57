//! The backup job kind: validate → lock → check → dump → store → upload → catalog → retention
//! (`crate::backup::take` does the byte work; a pre-deploy backup calls it too).

use crate::backup::{prune_step, take, validate};
use crate::job::step::{Failure, JobCtx, Outcome, RecoveryError, Report, outcome_of, take_lock};
use crate::store::JobRecord;
use drover_model::backup::catalog::{self, Trigger};
use drover_model::units::human_bytes;

/// Runs a backup to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(backup_job(ctx, job, report).await)
}

/// After a crash: its partial files go (`crate::backup::converge`).
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    crate::backup::converge(ctx, job, Vec::new()).await;
    Ok(())
}

async fn backup_job(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let spec = validate(ctx, job, report).await?;
    let _lock = take_lock(ctx, job, report).await?;
    let trigger = Trigger::parse(
        job.backup
            .as_ref()
            .map(|b| b.trigger.as_str())
            .unwrap_or(""),
    );
    let backup = take(ctx, job, report, &spec, trigger, None, None).await?;
    prune_step(ctx, job, report, &spec, false).await?;
    let mut out = Outcome::succeeded("", "");
    out.summary = format!(
        "backup {} of {}: {} stored from {} ({:.1}×){}",
        backup.id,
        spec.name,
        human_bytes(backup.size()),
        human_bytes(backup.source_bytes()),
        backup.ratio(),
        if backup.is_remote() {
            format!(", uploaded to {}", backup.remote)
        } else {
            String::new()
        }
    );
    out.extra
        .insert(catalog::field::BACKUP_ID.into(), backup.id.clone());
    Ok(out)
}
