//! `drover backup run|list|show|prune`: taking a backup now, the catalog, one manifest, and
//! retention.

use clap::Subcommand;
use drover_proto::v1;
use serde_json::Value;

use super::{Ctx, attach};
use crate::render::{List, Render, line};
use crate::{CliError, output};

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up TARGET now, with live bytes and rate.
    Run {
        target: String,
        /// Where; default: the target's host or labels, or where its backups are, or the only host.
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        detach: bool,
    },
    /// Backups, newest first: time, size, ratio, hash, where stored, verified.
    List { target: Option<String> },
    /// One backup's manifest.
    Show { id: String },
    /// Apply TARGET's retention now (--dry-run: only show what would go, from the controller's
    /// catalog: no job, no lock, allowed for viewers).
    Prune {
        target: String,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        dry_run: bool,
    },
}

/// `drover backup show ID`.
struct Shown(v1::BackupInfo);

impl Render for Shown {
    fn text(&self, now_ms: i64) -> String {
        line(output::backup_detail(&self.0, now_ms))
    }
    fn json(&self) -> Value {
        output::backup_json(&self.0)
    }
}

/// `drover backup prune --dry-run`: what retention would keep and delete.
struct Plan(v1::PlanPruneResponse);

impl Render for Plan {
    fn text(&self, now_ms: i64) -> String {
        line(output::prune_plan_text(&self.0, now_ms))
    }
    fn json(&self) -> Value {
        output::prune_plan_json(&self.0)
    }
}

pub async fn run(ctx: &mut Ctx, command: BackupCommand) -> Result<(), CliError> {
    match command {
        BackupCommand::Run {
            target,
            host,
            detach,
        } => {
            let job = ctx
                .api
                .run_backup(v1::RunBackupRequest {
                    target,
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(ctx.err())?
                .into_inner();
            attach(ctx, &job, detach).await
        }
        BackupCommand::List { target } => {
            let backups = ctx
                .api
                .list_backups(v1::ListBackupsRequest {
                    target: target.unwrap_or_default(),
                })
                .await
                .map_err(ctx.err())?
                .into_inner()
                .backups;
            ctx.show(&List {
                items: &backups,
                json: output::backup_json,
                table: output::backups_table,
            })
        }
        BackupCommand::Show { id } => {
            let backup = ctx
                .api
                .get_backup(v1::GetBackupRequest { id })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Shown(backup))
        }
        BackupCommand::Prune {
            target,
            host,
            dry_run: true,
        } => {
            // Answered from the controller's catalog: no job, no lock, so a viewer may ask.
            let plan = ctx
                .api
                .plan_prune(v1::PlanPruneRequest {
                    target,
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Plan(plan))
        }
        BackupCommand::Prune {
            target,
            host,
            dry_run: false,
        } => {
            let job = ctx
                .api
                .prune_backups(v1::PruneBackupsRequest {
                    target,
                    host: host.unwrap_or_default(),
                    dry_run: false,
                })
                .await
                .map_err(ctx.err())?
                .into_inner();
            attach(ctx, &job, false).await
        }
    }
}
