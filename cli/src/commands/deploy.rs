//! `drover deploy`, `drover rollback` and `drover releases`: putting a version of an app live,
//! going back, and what each host keeps.

use drover_proto::v1;
use serde_json::Value;

use super::schedule::Stored;
use super::{Ctx, attach, parse_at, parse_label};
use crate::CliError;
use crate::output;
use crate::render::{Render, line};

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    app: String,
    version: String,
    /// A host to deploy to (repeatable); default: where APP is live, or the only host.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Every host with this label, k=v (repeatable: all must match).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Do not take the spec's pre-deploy backup.
    #[arg(long)]
    skip_backup: bool,
    /// Wait for another job's lock on the app instead of failing (exit 75).
    #[arg(long)]
    wait: bool,
    /// Print the job id and return at once instead of following the job.
    #[arg(long)]
    detach: bool,
    /// Deploy later, once: RFC 3339 (2026-05-01T22:00:00Z) or from now (+30m). Stores a
    /// one-off schedule (`drover schedule list`) instead of starting a job.
    #[arg(long, value_parser = parse_at)]
    at: Option<i64>,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    app: String,
    /// A kept release's version; default: the release live before the current one.
    #[arg(long)]
    to: Option<String>,
    #[arg(long = "host")]
    hosts: Vec<String>,
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Wait for another job's lock on the app instead of failing (exit 75).
    #[arg(long)]
    wait: bool,
    #[arg(long)]
    detach: bool,
}

/// `drover deploy`: a job followed (or detached), or with `--at` the one-off schedule stored.
pub async fn deploy(ctx: &mut Ctx, a: DeployArgs) -> Result<(), CliError> {
    let mut job = ctx
        .api
        .deploy(v1::DeployRequest {
            app: a.app,
            version: a.version,
            hosts: a.hosts,
            labels: a.labels.into_iter().collect(),
            skip_backup: a.skip_backup,
            wait_lock: a.wait,
            at_unix_ms: a.at.unwrap_or(0),
        })
        .await
        .map_err(ctx.err())?
        .into_inner();
    if let Some(schedule) = job.scheduled.take() {
        return ctx.show(&Stored(schedule));
    }
    attach(ctx, &job, a.detach).await
}

/// `drover rollback`: the job going back, followed (or detached).
pub async fn rollback(ctx: &mut Ctx, a: RollbackArgs) -> Result<(), CliError> {
    let job = ctx
        .api
        .rollback(v1::RollbackRequest {
            app: a.app,
            to_version: a.to.unwrap_or_default(),
            hosts: a.hosts,
            labels: a.labels.into_iter().collect(),
            wait_lock: a.wait,
        })
        .await
        .map_err(ctx.err())?
        .into_inner();
    if ctx.format == crate::render::Format::Text {
        for warning in &job.warnings {
            eprintln!("warning: {warning}");
        }
    }
    attach(ctx, &job, a.detach).await
}

/// An app's releases on each host (the table names the app when there are none).
struct Releases {
    app: String,
    releases: Vec<v1::ReleaseInfo>,
}

impl Render for Releases {
    fn text(&self, now_ms: i64) -> String {
        line(output::releases_table(&self.releases, &self.app, now_ms))
    }
    fn json(&self) -> Value {
        Value::Array(self.releases.iter().map(output::release_json).collect())
    }
}

/// `drover releases APP [--host H]`.
pub async fn releases(ctx: &mut Ctx, app: String, host: Option<String>) -> Result<(), CliError> {
    let releases = ctx
        .api
        .list_releases(v1::ListReleasesRequest {
            app: app.clone(),
            host: host.unwrap_or_default(),
        })
        .await
        .map_err(ctx.err())?
        .into_inner()
        .releases;
    ctx.show(&Releases { app, releases })
}
