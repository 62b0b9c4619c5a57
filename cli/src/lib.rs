//! The operator CLI, `drover`: argument parsing, one function per command, and the one place
//! that maps an error to an exit code.

pub mod client;
pub mod output;
pub mod watch;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use drover_identity::files::Bundle;
use drover_identity::pki::new_key_and_csr;
use drover_proto::v1;
use serde_json::Value;

use drover_model::units::now_ms;

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List hosts with connection state and health.
    Hosts {
        #[arg(long)]
        json: bool,
    },
    /// Show one host in detail (or every host, without HOST).
    Status {
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
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
    Deploy {
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
        #[arg(long)]
        json: bool,
    },
    /// Go back to APP's previous release (or --to VERSION) where it is live.
    Rollback {
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
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends (its events so far, then live); exit code as for deploy.
    Watch {
        job: String,
        /// One JSON object per line: each event, then the finished job.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running job at its next safe point on each host (admin). A deploy before the
    /// switch removes what it made; in the watch window it switches back. Hosts not reached
    /// yet never run it. A finished job is left alone (exit 0).
    Cancel {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Recent deploy and rollback jobs, newest first.
    Jobs {
        #[arg(long)]
        app: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// An app's releases on each host: which one is live, which one a rollback goes to.
    Releases {
        app: String,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        json: bool,
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
    Restore {
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
        #[arg(long)]
        json: bool,
    },
    /// Job events a host has reported, oldest first.
    Events {
        host: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show who this identity is to the controller.
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// Schedules: recurring backups and verifications, one-off deploys.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Open alerts (stale backups and validations, hosts down, expiring certificates, failed
    /// jobs); resolved ones too with --all.
    Alerts {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule.
    #[command(subcommand)]
    Add(ScheduleAdd),
    /// Every schedule with its next 3 run times and its last run.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule (a running job goes on).
    Rm { id: String },
    /// Stop a schedule from firing until it is resumed.
    Pause { id: String },
    /// Let a paused schedule fire again (missed times: one catch-up run).
    Resume { id: String },
}

#[derive(Debug, clap::Args)]
pub struct RecurringArgs {
    /// The backup target.
    target: String,
    /// 5-field cron expression: minute hour day-of-month month day-of-week.
    #[arg(long)]
    cron: String,
    /// IANA time zone of the expression (Europe/Berlin); default UTC.
    #[arg(long)]
    tz: Option<String>,
    /// Fire up to this much later (15m), the same offset every time.
    #[arg(long, value_parser = drover_model::units::parse_duration)]
    jitter: Option<std::time::Duration>,
    /// Run on this host; default: as `drover backup run` chooses.
    #[arg(long)]
    host: Option<String>,
    /// The schedule's id; default TARGET-KIND.
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleAdd {
    /// Back up TARGET on a cron schedule.
    Backup(RecurringArgs),
    /// Validate TARGET's newest backup on a cron schedule.
    Verify(RecurringArgs),
    /// Deploy VERSION of APP once, at a given time.
    Deploy {
        app: String,
        version: String,
        /// RFC 3339 (2026-05-01T22:00:00Z) or from now (+30m).
        #[arg(long, value_parser = parse_at)]
        at: i64,
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// A time given as RFC 3339 or as `+DURATION` from now, in Unix ms.
pub fn parse_at(text: &str) -> Result<i64, String> {
    parse_at_from(text, now_ms())
}

/// [`parse_at`] with the current time passed in.
pub fn parse_at_from(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('+') {
        let d = drover_model::units::parse_duration(rest)?;
        return Ok(now_ms + d.as_millis() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!("invalid time {text:?}: {e} (use RFC 3339, 2026-05-01T22:00:00Z, or +30m)")
        })
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time enrollment token bound to a host name.
    Create {
        #[arg(long)]
        host: String,
        /// Label for the host, k=v (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Lifetime (e.g. 15m, 2h; at least 1m, at most 168h); default from the controller's
        /// config.
        #[arg(long, value_parser = drover_model::units::parse_duration)]
        ttl: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// List enrollment tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused token by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Issue an operator identity; the key is made here and never sent.
    Create {
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        /// Directory to write ca.pem, cert.pem and key.pem (0600) into.
        #[arg(long)]
        out: PathBuf,
    },
    /// List every operator certificate issued: name, role, serial, issued, expires, state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Refuse every certificate of operator NAME from now on, across restarts.
    Revoke {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Validate an app spec (TOML) and store it as the app's new revision.
    Apply {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List applied apps.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print an app's current spec.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupTargetCommand {
    /// Validate a backup target (TOML) and store it as its new revision.
    Apply {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List applied backup targets.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print a target's current spec.
    Show { name: String },
    /// Retire a target: it and its backup/verify schedules go; its backups stay where they
    /// are (apply the target again to restore from them).
    Rm {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

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
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VerifyCommand {
    /// Past validations, newest first: time, target, backup, result, failed checks, durations.
    History {
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

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
        #[arg(long)]
        json: bool,
    },
    /// Backups, newest first: time, size, ratio, hash, where stored, verified.
    List {
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One backup's manifest.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Apply TARGET's retention now (--dry-run: only show what would go, from the controller's
    /// catalog: no job, no lock, allowed for viewers).
    Prune {
        target: String,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Close a host's session now and refuse its certificates from now on.
    Revoke {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not k=v")),
    }
}

fn print_json(value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// After a deploy or rollback was accepted: print the job (`--detach`) or follow it.
async fn attach(
    api: &mut v1::operator_service_client::OperatorServiceClient<tonic::transport::Channel>,
    addr: &str,
    job: &v1::JobInfo,
    detach: bool,
    json: bool,
) -> Result<(), CliError> {
    if detach {
        if json {
            return print_json(&output::job_json(job));
        }
        println!("{}", job.id);
        let _ = writeln!(
            std::io::stderr(),
            "{}; follow it with `drover watch {}`",
            watch::render_header(job),
            job.id
        );
        return Ok(());
    }
    watch::follow(api, addr, &job.id, watch::Mode::pick(json)).await
}

/// A spec file's text; a file that cannot be read is an invalid request (exit 65).
fn read_file(file: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(file)
        .map_err(|e| CliError::Invalid(format!("cannot read {}: {e}", file.display())))
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

/// Runs one `drover` command.
/// An AddSchedule request for a recurring backup or verify schedule, checked here first so a
/// bad expression or zone is reported without a round trip.
fn recurring_request(
    kind: &str,
    a: RecurringArgs,
) -> Result<(v1::AddScheduleRequest, bool), CliError> {
    drover_model::schedule::parse_cron(&a.cron).map_err(|e| CliError::Invalid(e.to_string()))?;
    let tz = a.tz.unwrap_or_default();
    drover_model::schedule::parse_tz(&tz).map_err(|e| CliError::Invalid(e.to_string()))?;
    Ok((
        v1::AddScheduleRequest {
            id: a.id.unwrap_or_default(),
            kind: kind.into(),
            target: a.target,
            hosts: a.host.into_iter().collect(),
            cron: a.cron,
            tz,
            jitter_secs: a.jitter.map(|d| d.as_secs()).unwrap_or(0),
            ..Default::default()
        },
        a.json,
    ))
}

fn print_schedule(s: &v1::ScheduleInfo, json: bool, now: i64) -> Result<(), CliError> {
    if json {
        return print_json(&output::schedule_json(s));
    }
    let next = s
        .next_runs_unix_ms
        .first()
        .map(|t| output::when(*t, now))
        .unwrap_or_else(|| "none".into());
    println!(
        "schedule {} ({} {}) stored; next run {next}",
        s.id, s.kind, s.target
    );
    Ok(())
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "drover", &mut std::io::stdout());
        return Ok(());
    }
    let controller = client::resolve_controller(cli.controller.as_deref());
    let identity = client::resolve_identity(cli.identity.as_deref())?;
    let client = client::connect(&controller, &identity)?;
    let mut api = client.api.clone();
    let addr = client.controller.clone();
    let err = |s: tonic::Status| client::rpc_error(&addr, s);
    let now = now_ms();
    match cli.command {
        Command::Completions { .. } => Ok(()),
        Command::Hosts { json } => {
            let hosts = api
                .list_hosts(v1::ListHostsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .hosts;
            if json {
                print_json(&Value::Array(hosts.iter().map(output::host_json).collect()))
            } else {
                println!("{}", output::hosts_table(&hosts, now));
                Ok(())
            }
        }
        Command::Status {
            host: Some(name),
            json,
        } => {
            let host = api
                .get_host(v1::GetHostRequest { name })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&output::host_json(&host))
            } else {
                println!("{}", output::host_detail(&host, now));
                Ok(())
            }
        }
        Command::Status { host: None, json } => {
            let who = api
                .who_am_i(v1::WhoAmIRequest {})
                .await
                .map_err(err)?
                .into_inner();
            let hosts = api
                .list_hosts(v1::ListHostsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .hosts;
            if json {
                print_json(&serde_json::json!({
                    "controller": addr,
                    "operator": {"name": who.name, "role": who.role},
                    "hosts": hosts.iter().map(output::host_json).collect::<Vec<_>>(),
                }))
            } else {
                println!("controller {addr} (you are {} / {})\n", who.name, who.role);
                println!("{}", output::hosts_table(&hosts, now));
                Ok(())
            }
        }
        Command::Token(TokenCommand::Create {
            host,
            labels,
            ttl,
            json,
        }) => {
            // 0 on the wire means "the controller's default": a zero (or sub-second) --ttl
            // would silently become that, so it is refused here; the controller checks the
            // bounds of any other value.
            if ttl.is_some_and(|d| d.as_secs() == 0) {
                return Err(CliError::Invalid(
                    "--ttl must be at least 1m (and at most 168h): a token that expires at once cannot be used".into(),
                ));
            }
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let resp = api
                .create_token(v1::CreateTokenRequest {
                    host: host.clone(),
                    labels: labels.into_iter().collect(),
                    ttl_secs: ttl.map(|d| d.as_secs()).unwrap_or(0),
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "token": resp.token,
                    "id": resp.id,
                    "host": host,
                    "expires_at": output::rfc3339_ms(resp.expires_unix_ms),
                }))
            } else {
                println!("{}", resp.token);
                let _ = writeln!(
                    std::io::stderr(),
                    "token {} for host {host}, works once, expires {}.\non the host: drover-agent enroll --controller {addr} --token <the line above>",
                    resp.id,
                    output::expires_in(resp.expires_unix_ms / 1000, now)
                );
                Ok(())
            }
        }
        Command::Token(TokenCommand::List { json }) => {
            let tokens = api
                .list_tokens(v1::ListTokensRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .tokens;
            if json {
                print_json(&Value::Array(
                    tokens.iter().map(output::token_json).collect(),
                ))
            } else {
                println!("{}", output::tokens_table(&tokens, now));
                Ok(())
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            api.revoke_token(v1::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(err)?;
            println!("token {id} revoked");
            Ok(())
        }
        Command::Operator(OperatorCommand::Create { name, role, out }) => {
            if Bundle::exists(&out) {
                return Err(CliError::Invalid(format!(
                    "{} already holds an identity; choose another --out directory",
                    out.display()
                )));
            }
            let (key_pem, csr_pem) =
                new_key_and_csr(&name).map_err(|e| CliError::Other(e.to_string()))?;
            let resp = api
                .create_operator(v1::CreateOperatorRequest {
                    name: name.clone(),
                    role: role.clone(),
                    csr_pem,
                })
                .await
                .map_err(err)?
                .into_inner();
            let expires = drover_identity::pki::CertInfo::from_pem(&resp.cert_pem)
                .map(|c| output::expires_in(c.not_after_unix, now))
                .unwrap_or_default();
            Bundle {
                ca_pem: resp.ca_pem,
                cert_pem: resp.cert_pem,
                key_pem,
            }
            .save(&out)
            .map_err(|e| CliError::Other(e.to_string()))?;
            println!(
                "operator {name} ({role}) written to {}; the certificate expires {expires}",
                out.display()
            );
            Ok(())
        }
        Command::Operator(OperatorCommand::List { json }) => {
            let operators = api
                .list_operators(v1::ListOperatorsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .operators;
            if json {
                print_json(&Value::Array(
                    operators.iter().map(output::operator_json).collect(),
                ))
            } else {
                println!("{}", output::operators_table(&operators, now));
                Ok(())
            }
        }
        Command::Operator(OperatorCommand::Revoke { name, json }) => {
            let resp = api
                .revoke_operator(v1::RevokeOperatorRequest { name: name.clone() })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "operator": name,
                    "certificates_revoked": resp.certificates_revoked,
                }))
            } else {
                println!(
                    "operator {name} revoked: {} recorded certificate(s), and any older one of that name, refused from now on",
                    resp.certificates_revoked
                );
                if resp.certificates_revoked == 0 {
                    let _ = writeln!(
                        std::io::stderr(),
                        "no certificate was recorded for {name}: check the name with `drover operator list`"
                    );
                }
                Ok(())
            }
        }
        Command::Host(HostCommand::Revoke { name, json }) => {
            let resp = api
                .revoke_host(v1::RevokeHostRequest { name: name.clone() })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "host": name,
                    "certificates_revoked": resp.certificates_revoked,
                    "session_closed": resp.session_closed,
                }))
            } else {
                println!(
                    "host {name} revoked: {} certificate(s) refused from now on{}",
                    resp.certificates_revoked,
                    if resp.session_closed {
                        ", session closed"
                    } else {
                        ""
                    }
                );
                Ok(())
            }
        }
        Command::App(AppCommand::Apply { file, json }) => {
            let spec_toml = read_file(&file)?;
            let resp = api
                .apply_app(v1::ApplyAppRequest {
                    spec_toml,
                    source: file.display().to_string(),
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(
                    &serde_json::json!({"name": resp.name, "revision": resp.revision, "changed": resp.changed}),
                )
            } else {
                if resp.changed {
                    println!("app {} applied: revision {}", resp.name, resp.revision);
                } else {
                    println!("app {} unchanged (revision {})", resp.name, resp.revision);
                }
                Ok(())
            }
        }
        Command::App(AppCommand::List { json }) => {
            let apps = api
                .list_apps(v1::ListAppsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .apps;
            if json {
                print_json(&Value::Array(apps.iter().map(output::app_json).collect()))
            } else {
                println!("{}", output::apps_table(&apps, now));
                Ok(())
            }
        }
        Command::App(AppCommand::Show { name, json }) => {
            let app = api
                .get_app(v1::GetAppRequest { name })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&output::app_json(&app))
            } else {
                println!(
                    "# app {} revision {}, applied {} by {}",
                    app.name,
                    app.revision,
                    output::ago(app.updated_unix_ms, now),
                    app.updated_by
                );
                let privileges = output::app_privileges(&app);
                if !privileges.is_empty() {
                    println!(
                        "# allowed beyond a plain container: {}",
                        privileges.join("; ")
                    );
                }
                print!("{}", app.spec_toml);
                Ok(())
            }
        }
        Command::Deploy {
            app,
            version,
            hosts,
            labels,
            skip_backup,
            wait,
            detach,
            at,
            json,
        } => {
            let job = api
                .deploy(v1::DeployRequest {
                    app,
                    version,
                    hosts,
                    labels: labels.into_iter().collect(),
                    skip_backup,
                    wait_lock: wait,
                    at_unix_ms: at.unwrap_or(0),
                })
                .await
                .map_err(err)?
                .into_inner();
            if let Some(schedule) = &job.scheduled {
                return print_schedule(schedule, json, now);
            }
            attach(&mut api, &addr, &job, detach, json).await
        }
        Command::Schedule(ScheduleCommand::Add(add)) => {
            let (req, json) = match add {
                ScheduleAdd::Backup(a) => recurring_request("backup", a)?,
                ScheduleAdd::Verify(a) => recurring_request("verify", a)?,
                ScheduleAdd::Deploy {
                    app,
                    version,
                    at,
                    hosts,
                    id,
                    json,
                } => (
                    v1::AddScheduleRequest {
                        id: id.unwrap_or_default(),
                        kind: "deploy".into(),
                        target: app,
                        version,
                        hosts,
                        at_unix_ms: at,
                        ..Default::default()
                    },
                    json,
                ),
            };
            let schedule = api.add_schedule(req).await.map_err(err)?.into_inner();
            print_schedule(&schedule, json, now)
        }
        Command::Alerts { all, json } => {
            let alerts = api
                .list_alerts(v1::ListAlertsRequest { all })
                .await
                .map_err(err)?
                .into_inner()
                .alerts;
            if json {
                print_json(&Value::Array(
                    alerts.iter().map(output::alert_json).collect(),
                ))
            } else {
                println!("{}", output::alerts_table(&alerts, now));
                Ok(())
            }
        }
        Command::Schedule(ScheduleCommand::List { json }) => {
            let schedules = api
                .list_schedules(v1::ListSchedulesRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .schedules;
            if json {
                print_json(&Value::Array(
                    schedules.iter().map(output::schedule_json).collect(),
                ))
            } else {
                println!("{}", output::schedules_table(&schedules, now));
                Ok(())
            }
        }
        Command::Schedule(ScheduleCommand::Rm { id }) => {
            api.remove_schedule(v1::RemoveScheduleRequest { id: id.clone() })
                .await
                .map_err(err)?;
            println!("schedule {id} removed");
            Ok(())
        }
        Command::Schedule(ScheduleCommand::Pause { id }) => {
            api.pause_schedule(v1::PauseScheduleRequest { id: id.clone() })
                .await
                .map_err(err)?;
            println!("schedule {id} paused");
            Ok(())
        }
        Command::Schedule(ScheduleCommand::Resume { id }) => {
            let s = api
                .resume_schedule(v1::ResumeScheduleRequest { id: id.clone() })
                .await
                .map_err(err)?
                .into_inner();
            println!(
                "schedule {id} resumed; next run {}",
                s.next_runs_unix_ms
                    .first()
                    .map(|t| output::when(*t, now))
                    .unwrap_or_else(|| "none".into())
            );
            Ok(())
        }
        Command::Rollback {
            app,
            to,
            hosts,
            labels,
            wait,
            detach,
            json,
        } => {
            let job = api
                .rollback(v1::RollbackRequest {
                    app,
                    to_version: to.unwrap_or_default(),
                    hosts,
                    labels: labels.into_iter().collect(),
                    wait_lock: wait,
                })
                .await
                .map_err(err)?
                .into_inner();
            attach(&mut api, &addr, &job, detach, json).await
        }
        Command::Watch { job, json } => {
            watch::follow(&mut api, &addr, &job, watch::Mode::pick(json)).await
        }
        Command::Cancel { job, json } => {
            let answer = api
                .cancel_job(v1::CancelJobRequest { id: job.clone() })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&output::cancel_json(&answer))
            } else {
                println!("{}", output::cancel_text(&answer));
                Ok(())
            }
        }
        Command::Jobs { app, limit, json } => {
            let jobs = api
                .list_jobs(v1::ListJobsRequest {
                    app: app.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(err)?
                .into_inner()
                .jobs;
            if json {
                print_json(&Value::Array(jobs.iter().map(output::job_json).collect()))
            } else {
                println!("{}", output::jobs_table(&jobs, now));
                Ok(())
            }
        }
        Command::Releases { app, host, json } => {
            let releases = api
                .list_releases(v1::ListReleasesRequest {
                    app: app.clone(),
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner()
                .releases;
            if json {
                print_json(&Value::Array(
                    releases.iter().map(output::release_json).collect(),
                ))
            } else {
                println!("{}", output::releases_table(&releases, &app, now));
                Ok(())
            }
        }
        Command::BackupTarget(BackupTargetCommand::Apply { file, json }) => {
            let target_toml = read_file(&file)?;
            let resp = api
                .apply_backup_target(v1::ApplyBackupTargetRequest {
                    target_toml,
                    source: file.display().to_string(),
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "name": resp.name,
                    "revision": resp.revision,
                    "changed": resp.changed,
                    "schedule_changes": resp.schedule_changes,
                }))
            } else {
                let what = if resp.changed { "applied" } else { "unchanged" };
                println!(
                    "backup target {} {what}: revision {}",
                    resp.name, resp.revision
                );
                for change in &resp.schedule_changes {
                    println!("  schedule {change}");
                }
                Ok(())
            }
        }
        Command::BackupTarget(BackupTargetCommand::Rm { name, json }) => {
            let resp = api
                .remove_backup_target(v1::RemoveBackupTargetRequest { name })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "name": resp.name,
                    "removed_schedules": resp.removed_schedules,
                    "backups_kept": resp.backups_kept,
                }))
            } else {
                println!("backup target {} removed", resp.name);
                if !resp.removed_schedules.is_empty() {
                    println!("  schedules removed: {}", resp.removed_schedules.join(", "));
                }
                if resp.backups_kept > 0 {
                    println!(
                        "  its {} backup(s) stay on their hosts and in S3; `drover backup-target apply` \
                         the same target again to restore from them",
                        resp.backups_kept
                    );
                }
                Ok(())
            }
        }
        Command::BackupTarget(BackupTargetCommand::List { json }) => {
            let targets = api
                .list_backup_targets(v1::ListBackupTargetsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .targets;
            if json {
                print_json(&Value::Array(
                    targets.iter().map(output::target_json).collect(),
                ))
            } else {
                println!("{}", output::targets_table(&targets, now));
                Ok(())
            }
        }
        Command::BackupTarget(BackupTargetCommand::Show { name }) => {
            let targets = api
                .list_backup_targets(v1::ListBackupTargetsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .targets;
            let t = targets.iter().find(|t| t.name == name).ok_or_else(|| {
                CliError::NotFound(format!(
                    "unknown backup target {name}; `drover backup-target list` shows them"
                ))
            })?;
            println!(
                "# backup target {} revision {}, applied {} by {}",
                t.name,
                t.revision,
                output::ago(t.updated_unix_ms, now),
                t.updated_by
            );
            print!("{}", t.target_toml);
            Ok(())
        }
        Command::Backup(BackupCommand::Run {
            target,
            host,
            detach,
            json,
        }) => {
            let job = api
                .run_backup(v1::RunBackupRequest {
                    target,
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner();
            attach(&mut api, &addr, &job, detach, json).await
        }
        Command::Verify(VerifyArgs {
            history: Some(VerifyCommand::History { target, json }),
            ..
        }) => {
            let found = api
                .list_verifications(v1::ListVerificationsRequest {
                    target: target.unwrap_or_default(),
                    limit: 0,
                })
                .await
                .map_err(err)?
                .into_inner()
                .verifications;
            if json {
                print_json(&Value::Array(
                    found.iter().map(output::verification_json).collect(),
                ))
            } else {
                println!("{}", output::verifications_table(&found, now));
                Ok(())
            }
        }
        Command::Verify(VerifyArgs {
            history: None,
            target,
            all,
            host,
            json,
        }) => {
            let jobs = api
                .verify(v1::VerifyRequest {
                    target: target.unwrap_or_default(),
                    all,
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner()
                .jobs;
            // Each job followed to its end; the exit code is the first failure's.
            let mut first_error = None;
            for job in &jobs {
                if let Err(e) = attach(&mut api, &addr, job, false, json).await
                    && first_error.is_none()
                {
                    first_error = Some(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        }
        Command::Backup(BackupCommand::List { target, json }) => {
            let backups = api
                .list_backups(v1::ListBackupsRequest {
                    target: target.unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner()
                .backups;
            if json {
                print_json(&Value::Array(
                    backups.iter().map(output::backup_json).collect(),
                ))
            } else {
                println!("{}", output::backups_table(&backups, now));
                Ok(())
            }
        }
        Command::Backup(BackupCommand::Show { id, json }) => {
            let backup = api
                .get_backup(v1::GetBackupRequest { id })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&output::backup_json(&backup))
            } else {
                println!("{}", output::backup_detail(&backup, now));
                Ok(())
            }
        }
        Command::Backup(BackupCommand::Prune {
            target,
            host,
            dry_run,
            json,
        }) if dry_run => {
            // Answered from the controller's catalog: no job, no lock, so a viewer may ask.
            let plan = api
                .plan_prune(v1::PlanPruneRequest {
                    target,
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&output::prune_plan_json(&plan))
            } else {
                println!("{}", output::prune_plan_text(&plan, now));
                Ok(())
            }
        }
        Command::Backup(BackupCommand::Prune {
            target,
            host,
            dry_run: _,
            json,
        }) => {
            let job = api
                .prune_backups(v1::PruneBackupsRequest {
                    target,
                    host: host.unwrap_or_default(),
                    dry_run: false,
                })
                .await
                .map_err(err)?
                .into_inner();
            attach(&mut api, &addr, &job, false, json).await
        }
        Command::Restore {
            target,
            backup,
            to,
            to_dir,
            database,
            yes,
            identity_file,
            detach,
            json,
        } => {
            let confirmed = match &to {
                Some(db) if !yes => confirm(&format!(
                    "Restore backup {backup} into database {db}? If {db} exists, its current state is backed up first and then replaced. [y/N] "
                ))?,
                _ => yes,
            };
            let job = api
                .restore(v1::RestoreRequest {
                    target,
                    backup_id: backup,
                    part: database.unwrap_or_default(),
                    to_database: to.unwrap_or_default(),
                    to_dir: to_dir.unwrap_or_default(),
                    confirmed,
                    identity_file: identity_file.unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner();
            attach(&mut api, &addr, &job, detach, json).await
        }
        Command::Events {
            host,
            after,
            limit,
            json,
        } => {
            let events = api
                .list_events(v1::ListEventsRequest {
                    host,
                    after_seq: after,
                    limit,
                })
                .await
                .map_err(err)?
                .into_inner()
                .events;
            if json {
                print_json(&Value::Array(
                    events.iter().map(output::event_json).collect(),
                ))
            } else {
                for e in &events {
                    println!(
                        "{:>6}  {}  {}  {}  {}",
                        e.seq,
                        output::rfc3339_ms(e.at_unix_ms).as_str().unwrap_or("-"),
                        e.job_id,
                        e.kind,
                        e.message
                    );
                }
                Ok(())
            }
        }
        Command::Whoami { json } => {
            let who = api
                .who_am_i(v1::WhoAmIRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(
                    &serde_json::json!({"name": who.name, "role": who.role, "controller": addr, "identity": identity.value}),
                )
            } else {
                println!(
                    "{} ({}) at {addr}, identity {}",
                    who.name,
                    who.role,
                    identity.value.display()
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_times() {
        let now = 1_750_000_000_000;
        assert_eq!(parse_at_from("+30m", now), Ok(now + 30 * 60 * 1000));
        assert_eq!(
            parse_at_from("2026-05-01T22:00:00Z", now),
            Ok(1_777_672_800_000)
        );
        assert_eq!(
            parse_at_from("2026-05-02T00:00:00+02:00", now),
            Ok(1_777_672_800_000)
        );
        let err = parse_at_from("tomorrow", now).unwrap_err();
        assert!(err.contains("tomorrow") && err.contains("+30m"), "{err}");
        assert!(parse_at_from("+soon", now).is_err());
    }
}
