//! `drover verify TARGET | --all` and `drover verify history [TARGET]`: validating the newest
//! backups, and past validations.

use clap::Subcommand;
use drover_proto::v1;

use super::{Ctx, attach};
use crate::render::List;
use crate::{CliError, output};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct VerifyArgs {
    #[command(subcommand)]
    pub history: Option<VerifyCommand>,
    /// The target whose newest backup to validate.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub target: Option<String>,
    /// Every target, one job each, followed in turn.
    #[arg(long)]
    pub all: bool,
    /// Where; default: the host holding the newest backup.
    #[arg(long)]
    pub host: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum VerifyCommand {
    /// Past validations, newest first: time, target, backup, result, failed checks, durations.
    History { target: Option<String> },
}

pub async fn run(ctx: &mut Ctx, a: VerifyArgs) -> Result<(), CliError> {
    if let Some(VerifyCommand::History { target }) = a.history {
        let found = ctx
            .api
            .list_verifications(v1::ListVerificationsRequest {
                target: target.unwrap_or_default(),
                limit: 0,
            })
            .await
            .map_err(ctx.err())?
            .into_inner()
            .verifications;
        return ctx.show(&List {
            items: &found,
            json: output::verification_json,
            table: output::verifications_table,
        });
    }
    let jobs = ctx
        .api
        .verify(v1::VerifyRequest {
            target: a.target.unwrap_or_default(),
            all: a.all,
            host: a.host.unwrap_or_default(),
        })
        .await
        .map_err(ctx.err())?
        .into_inner()
        .jobs;
    // Each job followed to its end; the exit code is the first failure's.
    let mut first_error = None;
    for job in &jobs {
        if let Err(e) = attach(ctx, job, false).await
            && first_error.is_none()
        {
            first_error = Some(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
