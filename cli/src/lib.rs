//! The operator CLI, `drover`: the command line (`Cli`), which command runs
//! ([`run`], the commands themselves are in `commands/`), and the one place that maps an error
//! to an exit code.

pub mod client;
pub mod commands;
pub mod output;
pub mod render;
pub mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use commands::app::AppCommand;
use commands::backup::BackupCommand;
use commands::backup_target::BackupTargetCommand;
use commands::deploy::{DeployArgs, RollbackArgs};
use commands::hosts::HostCommand;
use commands::operator::OperatorCommand;
use commands::release::ReleaseArgs;
use commands::restore::RestoreArgs;
use commands::schedule::ScheduleCommand;
use commands::token::TokenCommand;
use commands::verify::VerifyArgs;
use commands::{Ctx, alerts, app, backup, backup_target, deploy, hosts, jobs, operator, restore};
use commands::{release, schedule, token, verify, whoami};
use render::Format;

/// Exit codes (also in README.md). Following sysexits.h where one fits.
pub mod exit {
    pub const OK: i32 = 0;
    /// Also: the job failed.
    pub const FAILURE: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The job's watch window tripped and traffic went back to the old release.
    pub const ROLLED_BACK: i32 = 3;
    /// The agent stopped during the job; it converged to one serving release on restart.
    pub const INTERRUPTED: i32 = 4;
    /// An operator cancelled the job (`drover cancel`); what it made was undone.
    pub const CANCELLED: i32 = 5;
    /// The controller refused the request as invalid (EX_DATAERR).
    pub const INVALID: i32 = 65;
    /// Unknown host, token or other named thing (EX_NOHOST).
    pub const NOT_FOUND: i32 = 68;
    /// The controller cannot be reached (EX_UNAVAILABLE).
    pub const UNREACHABLE: i32 = 69;
    /// Refused: not authenticated, wrong role, revoked or foreign certificate (EX_NOPERM).
    pub const PERMISSION_DENIED: i32 = 77;
    /// Another job holds the app's lock on a host; try again or use --wait (EX_TEMPFAIL).
    pub const LOCKED: i32 = 75;
    /// No usable identity bundle or config (EX_CONFIG).
    pub const NO_IDENTITY: i32 = 78;
}

/// Everything that can go wrong in a `drover` command, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NoIdentity(String),
    #[error("{0}")]
    Other(String),
    /// A job that did not succeed, with the exit code its ending maps to.
    #[error("{message}")]
    Job { code: i32, message: String },
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Invalid(_) => exit::INVALID,
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::Unreachable(_) => exit::UNREACHABLE,
            CliError::PermissionDenied(_) => exit::PERMISSION_DENIED,
            CliError::NoIdentity(_) => exit::NO_IDENTITY,
            CliError::Other(_) => exit::FAILURE,
            CliError::Job { code, .. } => *code,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Operate a Drover fleet: hosts, health, deploys and rollbacks, enrollment tokens, operators"
)]
pub struct Cli {
    /// Controller address (host:port).
    #[arg(long, global = true, env = "DROVER_CONTROLLER")]
    pub controller: Option<String>,
    /// Directory with ca.pem, cert.pem, key.pem of an operator identity.
    #[arg(long, global = true, env = "DROVER_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// Print JSON instead of text; a followed job (watch, deploy, ...): one JSON object per
    /// line, each event, then the finished job. Commands without JSON output refuse it.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List hosts with connection state and health.
    Hosts,
    /// Show one host in detail (or every host, without HOST).
    Status { host: Option<String> },
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Operator identities.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Hosts.
    #[command(subcommand)]
    Host(HostCommand),
    /// App specs (how each app is deployed).
    #[command(subcommand)]
    App(AppCommand),
    /// Deploy VERSION of APP: one host after another, a failure stops the rest.
    Deploy(DeployArgs),
    /// Go back to APP's previous release (or --to VERSION) where it is live.
    Rollback(RollbackArgs),
    /// Release VERSION of APP to many hosts in waves gated on health, halted and reverted
    /// past a failure budget; or `release status|list|pause|resume|abort`.
    Release(ReleaseArgs),
    /// Follow a job until it ends (its events so far, then live); exit code as for deploy.
    Watch { job: String },
    /// Stop a running job at its next safe point on each host (admin). A deploy before the
    /// switch removes what it made; in the watch window it switches back. Hosts not reached
    /// yet never run it. A finished job is left alone (exit 0).
    Cancel { job: String },
    /// Recent deploy and rollback jobs, newest first.
    Jobs {
        #[arg(long)]
        app: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// An app's releases on each host: which one is live, which one a rollback goes to.
    Releases {
        app: String,
        #[arg(long)]
        host: Option<String>,
    },
    /// Backup targets (what to back up, where to, how many to keep).
    #[command(subcommand, name = "backup-target")]
    BackupTarget(BackupTargetCommand),
    /// Backups: take one now, list them, show one, apply retention.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Validate TARGET's newest backup (or every target's with --all): hashes, decompression,
    /// pg_restore --list, a test restore into a scratch, row counts; `verify history` lists
    /// past validations.
    Verify(VerifyArgs),
    /// Restore a backup into a database (after an emergency backup of it) or an empty directory.
    Restore(RestoreArgs),
    /// Job events a host has reported, oldest first.
    Events {
        host: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show who this identity is to the controller.
    Whoami,
    /// Schedules: recurring backups and verifications, one-off deploys.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Open alerts (stale backups and validations, hosts down, expiring certificates, failed
    /// jobs); resolved ones too with --all.
    Alerts {
        #[arg(long)]
        all: bool,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

impl Command {
    /// The commands without JSON output, by name; they refuse `--json` (exit 2, as when the flag
    /// was each command's own and these had none) before doing anything.
    fn without_json(&self) -> Option<&'static str> {
        match self {
            Command::Token(TokenCommand::Revoke { .. }) => Some("token revoke"),
            Command::Operator(OperatorCommand::Create { .. }) => Some("operator create"),
            Command::BackupTarget(BackupTargetCommand::Show { .. }) => Some("backup-target show"),
            Command::Schedule(ScheduleCommand::Rm { .. }) => Some("schedule rm"),
            Command::Schedule(ScheduleCommand::Pause { .. }) => Some("schedule pause"),
            Command::Schedule(ScheduleCommand::Resume { .. }) => Some("schedule resume"),
            Command::Completions { .. } => Some("completions"),
            _ => None,
        }
    }
}

/// Runs one `drover` command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    if cli.json
        && let Some(name) = cli.command.without_json()
    {
        return Err(CliError::Usage(format!(
            "`drover {name}` has no JSON output; run it without --json"
        )));
    }
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "drover", &mut std::io::stdout());
        return Ok(());
    }
    let format = if cli.json { Format::Json } else { Format::Text };
    let ctx = &mut Ctx::connect(cli.controller.as_deref(), cli.identity.as_deref(), format)?;
    match cli.command {
        Command::Completions { .. } => Ok(()),
        Command::Hosts => hosts::list(ctx).await,
        Command::Status { host } => hosts::status(ctx, host).await,
        Command::Host(command) => hosts::run(ctx, command).await,
        Command::Events { host, after, limit } => hosts::events(ctx, host, after, limit).await,
        Command::Token(command) => token::run(ctx, command).await,
        Command::Operator(command) => operator::run(ctx, command).await,
        Command::Whoami => whoami::run(ctx).await,
        Command::App(command) => app::run(ctx, command).await,
        Command::Deploy(args) => deploy::deploy(ctx, args).await,
        Command::Rollback(args) => deploy::rollback(ctx, args).await,
        Command::Release(args) => release::run(ctx, args).await,
        Command::Releases { app, host } => deploy::releases(ctx, app, host).await,
        Command::Jobs { app, limit } => jobs::list(ctx, app, limit).await,
        Command::Watch { job } => jobs::watch(ctx, job).await,
        Command::Cancel { job } => jobs::cancel(ctx, job).await,
        Command::BackupTarget(command) => backup_target::run(ctx, command).await,
        Command::Backup(command) => backup::run(ctx, command).await,
        Command::Verify(args) => verify::run(ctx, args).await,
        Command::Restore(args) => restore::run(ctx, args).await,
        Command::Schedule(command) => schedule::run(ctx, command).await,
        Command::Alerts { all } => alerts::list(ctx, all).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("drover {args:?}: {e}"))
    }

    #[test]
    fn json_is_one_flag_anywhere_on_the_line() {
        for args in [
            &["hosts", "--json"][..],
            &["--json", "hosts"],
            &["backup", "list", "site", "--json"],
            &["backup", "--json", "list", "site"],
            &["verify", "history", "files", "--json"],
            &["verify", "site", "--json"],
            &["jobs", "--json", "--limit", "10"],
            &["deploy", "api", "v1", "--detach", "--json"],
            &[
                "schedule",
                "add",
                "backup",
                "site",
                "--cron",
                "0 2 * * *",
                "--json",
            ],
        ] {
            assert!(parse(args).json, "{args:?}");
        }
        assert!(!parse(&["hosts"]).json);
    }

    #[test]
    fn commands_without_json_output_refuse_the_flag_before_anything() {
        for args in [
            &["token", "revoke", "t1", "--json"][..],
            &["schedule", "pause", "s", "--json"],
            &["backup-target", "show", "site", "--json"],
            &["completions", "bash", "--json"],
            &[
                "operator",
                "create",
                "bob",
                "--role",
                "viewer",
                "--out",
                "/nonexistent",
                "--json",
            ],
        ] {
            let err = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(run(parse(args)))
                .unwrap_err();
            assert_eq!(err.exit_code(), exit::USAGE, "{args:?}: {err}");
            assert!(err.to_string().contains("no JSON output"), "{err}");
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
