//! The retire job kind: lock → stop_old. A fleet release with `keep_previous` leaves each
//! updated host's previous web container running, not routed, so that its revert is a switch
//! (`deploy` skips its `stop_old` step); once the release can no longer revert it sends this
//! job, which stops every kept release of the app that still runs. Their containers stay, as
//! after any deploy, for `drover rollback`.

use std::collections::BTreeMap;

use crate::job::step::{
    Failure, JobCtx, Outcome, RecoveryError, Report, begin, fail, outcome_of, report_interrupted,
    take_lock,
};
use crate::release::stop_kept;
use crate::store::JobRecord;

/// Runs a retire to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(retire(ctx, job, report).await)
}

/// After a crash: reported interrupted; the agent's recovery stops every kept release at start.
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    report_interrupted(ctx, job).await;
    Ok(())
}

async fn retire(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let _lock = take_lock(ctx, job, report).await?;
    let since = begin(
        ctx,
        job,
        report,
        "stop_old",
        format!("stopping the releases of {} kept running", job.app),
    )
    .await?;
    let table = ctx
        .store
        .releases(&job.app)
        .map_err(|e| fail("stop_old", e.to_string()))?;
    let stopped = stop_kept(ctx, &table, None).await;
    let summary = if stopped.is_empty() {
        format!("no kept release of {} was running", job.app)
    } else {
        format!("{} stopped (kept for rollback)", stopped.join(", "))
    };
    report
        .step_done("stop_old", since, summary.clone(), BTreeMap::new())
        .await;
    let mut out = Outcome::succeeded("", "");
    out.summary = summary;
    Ok(out)
}
