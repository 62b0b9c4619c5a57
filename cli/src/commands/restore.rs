//! `drover restore TARGET --backup ID (--to DB | --to-dir DIR)`: a backup restored into a
//! database (after asking, and after an emergency backup of it) or an empty directory.

use std::io::Write;

use drover_proto::v1;

use super::{Ctx, attach};
use crate::CliError;

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    target: String,
    /// The backup's id (`drover backup list TARGET`).
    #[arg(long)]
    backup: String,
    /// Restore into this database (created if missing; replaced after confirmation).
    #[arg(
        long = "to",
        conflicts_with = "to_dir",
        required_unless_present = "to_dir"
    )]
    to: Option<String>,
    /// Unpack files into this directory on the host (absent or empty).
    #[arg(long)]
    to_dir: Option<String>,
    /// Which database of the backup, when it holds several.
    #[arg(long)]
    database: Option<String>,
    /// Replace a live database without asking.
    #[arg(long)]
    yes: bool,
    /// For an encrypted backup: a file on the host holding the age identity.
    #[arg(long)]
    identity_file: Option<String>,
    #[arg(long)]
    detach: bool,
}

/// Asks a yes/no question on the terminal. Without a terminal the answer is no: the agent
/// then refuses to replace a live database (say --yes).
fn confirm(question: &str) -> Result<bool, CliError> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| CliError::Other(format!("cannot read the answer: {e}")))?;
    let yes = matches!(answer.trim(), "y" | "Y" | "yes");
    if !yes {
        return Err(CliError::Usage("restore cancelled".into()));
    }
    Ok(true)
}

pub async fn run(ctx: &mut Ctx, a: RestoreArgs) -> Result<(), CliError> {
    let confirmed = match &a.to {
        Some(db) if !a.yes => confirm(&format!(
            "Restore backup {} into database {db}? If {db} exists, its current state is backed up first and then replaced. [y/N] ",
            a.backup
        ))?,
        _ => a.yes,
    };
    let job = ctx
        .api
        .restore(v1::RestoreRequest {
            target: a.target,
            backup_id: a.backup,
            part: a.database.unwrap_or_default(),
            to_database: a.to.unwrap_or_default(),
            to_dir: a.to_dir.unwrap_or_default(),
            confirmed,
            identity_file: a.identity_file.unwrap_or_default(),
        })
        .await
        .map_err(ctx.err())?
        .into_inner();
    attach(ctx, &job, a.detach).await
}
