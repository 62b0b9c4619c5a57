//! `drover jobs`, `drover watch JOB` and `drover cancel JOB`: recent jobs, following one to its
//! end, stopping one.

use drover_proto::v1;
use serde_json::Value;

use super::Ctx;
use crate::render::{List, Render, line};
use crate::{CliError, output, watch};

/// `drover jobs [--app A] [--limit N]`: recent jobs, newest first.
pub async fn list(ctx: &mut Ctx, app: Option<String>, limit: u32) -> Result<(), CliError> {
    let jobs = ctx
        .api
        .list_jobs(v1::ListJobsRequest {
            app: app.unwrap_or_default(),
            limit,
        })
        .await
        .map_err(ctx.err())?
        .into_inner()
        .jobs;
    ctx.show(&List {
        items: &jobs,
        json: output::job_json,
        table: output::jobs_table,
    })
}

/// `drover watch JOB`: its events so far, then live, in the format `--json` and the terminal
/// choose; the exit code is how it ended.
pub async fn watch(ctx: &mut Ctx, job: String) -> Result<(), CliError> {
    let mode = watch::Mode::pick(ctx.format);
    watch::follow(&mut ctx.api, &ctx.addr, &job, mode).await
}

/// What a cancel request did.
struct Cancelled(v1::CancelJobResponse);

impl Render for Cancelled {
    fn text(&self, _now_ms: i64) -> String {
        line(output::cancel_text(&self.0))
    }
    fn json(&self) -> Value {
        output::cancel_json(&self.0)
    }
}

/// `drover cancel JOB`.
pub async fn cancel(ctx: &mut Ctx, job: String) -> Result<(), CliError> {
    let answer = ctx
        .api
        .cancel_job(v1::CancelJobRequest { id: job })
        .await
        .map_err(ctx.err())?
        .into_inner();
    ctx.show(&Cancelled(answer))
}
