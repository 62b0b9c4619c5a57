//! `drover backup-target apply|list|show|rm`: what to back up, where to, how many to keep.

use std::path::PathBuf;

use clap::Subcommand;
use drover_proto::v1;
use serde_json::{Value, json};

use super::{Ctx, read_file};
use crate::render::{List, Render, line};
use crate::{CliError, output};

#[derive(Debug, Subcommand)]
pub enum BackupTargetCommand {
    /// Validate a backup target (TOML) and store it as its new revision.
    Apply { file: PathBuf },
    /// List applied backup targets.
    List,
    /// Print a target's current spec.
    Show { name: String },
    /// Retire a target: it and its backup/verify schedules go; its backups stay where they
    /// are (apply the target again to restore from them).
    Rm { name: String },
}

/// What applying stored, and what it did to the schedules the target keeps.
struct Applied(v1::ApplyBackupTargetResponse);

impl Render for Applied {
    fn text(&self, _now_ms: i64) -> String {
        let r = &self.0;
        let what = if r.changed { "applied" } else { "unchanged" };
        let mut out = line(format!(
            "backup target {} {what}: revision {}",
            r.name, r.revision
        ));
        for change in &r.schedule_changes {
            out.push_str(&line(format!("  schedule {change}")));
        }
        out
    }
    fn json(&self) -> Value {
        json!({
            "name": self.0.name,
            "revision": self.0.revision,
            "changed": self.0.changed,
            "schedule_changes": self.0.schedule_changes,
        })
    }
}

/// What retiring removed, and that the backups stay.
struct Removed(v1::RemoveBackupTargetResponse);

impl Render for Removed {
    fn text(&self, _now_ms: i64) -> String {
        let r = &self.0;
        let mut out = line(format!("backup target {} removed", r.name));
        if !r.removed_schedules.is_empty() {
            out.push_str(&line(format!(
                "  schedules removed: {}",
                r.removed_schedules.join(", ")
            )));
        }
        if r.backups_kept > 0 {
            out.push_str(&line(format!(
                "  its {} backup(s) stay on their hosts and in S3; `drover backup-target apply` \
                 the same target again to restore from them",
                r.backups_kept
            )));
        }
        out
    }
    fn json(&self) -> Value {
        json!({
            "name": self.0.name,
            "removed_schedules": self.0.removed_schedules,
            "backups_kept": self.0.backups_kept,
        })
    }
}

async fn targets(ctx: &mut Ctx) -> Result<Vec<v1::BackupTargetInfo>, CliError> {
    Ok(ctx
        .api
        .list_backup_targets(v1::ListBackupTargetsRequest {})
        .await
        .map_err(ctx.err())?
        .into_inner()
        .targets)
}

pub async fn run(ctx: &mut Ctx, command: BackupTargetCommand) -> Result<(), CliError> {
    match command {
        BackupTargetCommand::Apply { file } => {
            let target_toml = read_file(&file)?;
            let resp = ctx
                .api
                .apply_backup_target(v1::ApplyBackupTargetRequest {
                    target_toml,
                    source: file.display().to_string(),
                })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Applied(resp))
        }
        BackupTargetCommand::Rm { name } => {
            let resp = ctx
                .api
                .remove_backup_target(v1::RemoveBackupTargetRequest { name })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Removed(resp))
        }
        BackupTargetCommand::List => {
            let targets = targets(ctx).await?;
            ctx.show(&List {
                items: &targets,
                json: output::target_json,
                table: output::targets_table,
            })
        }
        // No JSON output (`backup-target list --json` has the spec): a header and the TOML.
        BackupTargetCommand::Show { name } => {
            let targets = targets(ctx).await?;
            let t = targets.iter().find(|t| t.name == name).ok_or_else(|| {
                CliError::NotFound(format!(
                    "unknown backup target {name}; `drover backup-target list` shows them"
                ))
            })?;
            let header = format!(
                "# backup target {} revision {}, applied {} by {}",
                t.name,
                t.revision,
                output::ago(t.updated_unix_ms, ctx.now),
                t.updated_by
            );
            ctx.say(&format!("{}{}", line(header), t.target_toml))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_and_rm_say_what_happened_to_the_schedules() {
        let applied = Applied(v1::ApplyBackupTargetResponse {
            name: "site".into(),
            revision: 2,
            changed: true,
            schedule_changes: vec!["added site-backup (0 2 * * *)".into()],
        });
        assert_eq!(
            applied.text(0),
            "backup target site applied: revision 2\n  schedule added site-backup (0 2 * * *)\n"
        );
        let removed = Removed(v1::RemoveBackupTargetResponse {
            name: "site".into(),
            removed_schedules: vec!["site-backup".into(), "site-verify".into()],
            backups_kept: 0,
        });
        assert_eq!(
            removed.text(0),
            "backup target site removed\n  schedules removed: site-backup, site-verify\n"
        );
        assert_eq!(removed.json()["backups_kept"], 0);
    }
}
