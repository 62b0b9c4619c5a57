//! The pull job kind: validate → image. A fleet release asks every host for its image before
//! the first wave, so a wave's time is the switch, not the download, and a host that cannot
//! pull fails the release before any host changes. It takes no lock and changes nothing but
//! the host's images: an image already present is left as it is.

use std::collections::BTreeMap;

use crate::job::step::{
    Failure, JobCtx, Outcome, RecoveryError, Report, begin, fail, outcome_of, report_interrupted,
};
use crate::release::{ensure_image, short_id};
use crate::store::JobRecord;
use drover_model::appspec::{AppSpec, check_version};

/// Runs a pull to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(pull_job(ctx, job, report).await)
}

/// After a crash: nothing to undo (a half-pulled image is the Engine's to clean up); reported
/// interrupted, and the release that asked for it decides.
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    report_interrupted(ctx, job).await;
    Ok(())
}

async fn pull_job(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "validate",
        format!("checking {} {}", job.app, job.version),
    )
    .await?;
    let source = format!("app {}", job.app);
    let spec =
        AppSpec::from_toml(&job.spec_toml, &source).map_err(|e| fail("validate", e.to_string()))?;
    check_version(&spec, &job.version).map_err(|e| fail("validate", e))?;
    report
        .step_done(
            "validate",
            since,
            "spec and version are valid",
            BTreeMap::new(),
        )
        .await;

    let image = format!("{}:{}", spec.image, job.version);
    let since = begin(ctx, job, report, "image", format!("looking for {image}")).await?;
    let image_id = ensure_image(ctx, report, "image", &image).await?;
    report
        .step_done(
            "image",
            since,
            format!("{image} is {}", short_id(&image_id)),
            BTreeMap::from([("image_id".to_string(), image_id.clone())]),
        )
        .await;
    let mut out = Outcome::succeeded("", "");
    out.summary = format!("{image} is on this host ({})", short_id(&image_id));
    Ok(out)
}
