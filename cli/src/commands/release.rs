//! `drover release`: a version of an app to many hosts in waves (`drover release APP VERSION`),
//! its plan (`--dry-run`), following it live, and `release status|list|pause|resume|abort`.

use std::time::Duration;

use drover_model::units::{ago, parse_duration};
use drover_proto::v1;
use serde_json::{Value, json};

use super::schedule::Stored;
use super::{Ctx, parse_at, parse_label};
use crate::render::{Format, Render, line};
use crate::{CliError, exit, output};

/// How often a followed release is read again.
const POLL: Duration = Duration::from_millis(700);

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReleaseArgs {
    #[command(subcommand)]
    command: Option<ReleaseCommand>,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The app (its spec applied with `drover app apply`).
    #[arg(required = true)]
    app: Option<String>,
    /// The version (image tag) to release.
    #[arg(required = true)]
    version: Option<String>,
    /// A host to release to (repeatable); default: where APP is live, or the only host.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Every host with this label, k=v (repeatable: all must match).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Hosts reached after each wave: counts or shares, growing, e.g. 1,25%,100%
    /// (default: the spec's [release] waves, else 100%).
    #[arg(long)]
    waves: Option<String>,
    /// This host goes first, alone.
    #[arg(long)]
    canary: Option<String>,
    /// Hosts deploying at once within a wave (default 1).
    #[arg(long)]
    max_parallel: Option<u32>,
    /// How long a deployed host must stay healthy to pass (default 10s).
    #[arg(long, value_parser = parse_duration)]
    min_healthy: Option<Duration>,
    /// A wave not passed within this fails the release (default 10m).
    #[arg(long, value_parser = parse_duration)]
    progress_deadline: Option<Duration>,
    /// How long a host that is down when its wave comes is waited for (default 5m).
    #[arg(long, value_parser = parse_duration)]
    host_timeout: Option<Duration>,
    /// What a failure past the budget does: revert (every updated host goes back, at once)
    /// or halt (no new host starts).
    #[arg(long, value_parser = ["revert", "halt"])]
    on_failure: Option<String>,
    /// Failures allowed before it halts: a count (2) or a share (10%); default 0.
    #[arg(long)]
    max_failures: Option<String>,
    /// A host still down after --host-timeout is skipped instead of counted as a failure.
    #[arg(long)]
    skip_offline: bool,
    /// Do not take the spec's pre-deploy backup on each host.
    #[arg(long)]
    skip_backup: bool,
    /// Print the plan (hosts per wave, in order) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the release id and return at once instead of following it.
    #[arg(long)]
    detach: bool,
    /// Start later, once: RFC 3339 (2026-05-01T22:00:00Z) or from now (+30m). The plan is
    /// checked now and a one-off schedule stored (`drover schedule list`); the hosts and waves
    /// are chosen again when it starts.
    #[arg(long, value_parser = parse_at, conflicts_with = "dry_run")]
    at: Option<i64>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReleaseCommand {
    /// A release's waves and hosts: state, versions, durations, health; --follow until it ends.
    Status {
        id: String,
        #[arg(long)]
        follow: bool,
    },
    /// Releases, newest first (only APP's when given).
    List { app: Option<String> },
    /// Start no new host; deploys under way finish and settle (admin).
    Pause { id: String },
    /// Go on from where it was paused, with the wave's deadline time left (admin).
    Resume { id: String },
    /// Stop it: no new host starts; with --revert every updated host goes back (admin).
    Abort {
        id: String,
        #[arg(long)]
        revert: bool,
    },
    /// Deploy a succeeded release's version to its hosts that are behind (they were offline,
    /// or changed since), without the migration; the job is in its history (admin).
    Converge { id: String },
}

fn ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub async fn run(ctx: &mut Ctx, args: ReleaseArgs) -> Result<(), CliError> {
    match args.command {
        None => start(ctx, args.start).await,
        Some(ReleaseCommand::Status { id, follow }) => {
            let release = get(ctx, &id).await?;
            if follow {
                follow_release(ctx, release).await
            } else {
                ctx.show(&Status(release))
            }
        }
        Some(ReleaseCommand::List { app }) => {
            let releases = ctx
                .api
                .list_fleet_releases(v1::ListFleetReleasesRequest {
                    app: app.unwrap_or_default(),
                })
                .await
                .map_err(ctx.err())?
                .into_inner()
                .releases;
            ctx.show(&List(releases))
        }
        Some(ReleaseCommand::Pause { id }) => control(ctx, id, v1::ReleaseControl::Pause).await,
        Some(ReleaseCommand::Resume { id }) => control(ctx, id, v1::ReleaseControl::Resume).await,
        Some(ReleaseCommand::Converge { id }) => {
            control(ctx, id, v1::ReleaseControl::Converge).await
        }
        Some(ReleaseCommand::Abort { id, revert }) => {
            let what = if revert {
                v1::ReleaseControl::AbortRevert
            } else {
                v1::ReleaseControl::Abort
            };
            control(ctx, id, what).await
        }
    }
}

async fn start(ctx: &mut Ctx, a: StartArgs) -> Result<(), CliError> {
    let release = ctx
        .api
        .start_release(v1::StartReleaseRequest {
            app: a.app.unwrap_or_default(),
            version: a.version.unwrap_or_default(),
            hosts: a.hosts,
            labels: a.labels.into_iter().collect(),
            waves: a.waves.unwrap_or_default(),
            canary: a.canary.unwrap_or_default(),
            max_parallel: a.max_parallel.unwrap_or(0),
            min_healthy_ms: ms(a.min_healthy),
            min_healthy_set: a.min_healthy.is_some(),
            progress_deadline_ms: ms(a.progress_deadline),
            host_timeout_ms: ms(a.host_timeout),
            host_timeout_set: a.host_timeout.is_some(),
            on_failure: a.on_failure.unwrap_or_default(),
            max_failures: a.max_failures.unwrap_or_default(),
            skip_offline: a.skip_offline,
            skip_backup: a.skip_backup,
            dry_run: a.dry_run,
            at_unix_ms: a.at.unwrap_or(0),
        })
        .await
        .map_err(ctx.err())?
        .into_inner();
    if release.scheduled.is_some() {
        return ctx.show(&Scheduled(release));
    }
    if a.dry_run || a.detach {
        return ctx.show(&Plan(release));
    }
    if ctx.format == Format::Text {
        print!("{}", plan_text(&release));
    }
    follow_release(ctx, release).await
}

async fn get(ctx: &mut Ctx, id: &str) -> Result<v1::FleetReleaseInfo, CliError> {
    Ok(ctx
        .api
        .get_release(v1::GetReleaseRequest { id: id.to_string() })
        .await
        .map_err(ctx.err())?
        .into_inner())
}

async fn control(ctx: &mut Ctx, id: String, what: v1::ReleaseControl) -> Result<(), CliError> {
    let release = ctx
        .api
        .control_release(v1::ControlReleaseRequest {
            id,
            control: what as i32,
        })
        .await
        .map_err(ctx.err())?
        .into_inner();
    ctx.show(&Status(release))
}

/// Prints what changes (history lines, host states) until the release ends; the exit code
/// says how it ended. With `--json`: the release as one JSON object per line at each change.
async fn follow_release(ctx: &mut Ctx, mut release: v1::FleetReleaseInfo) -> Result<(), CliError> {
    let mut seen_history = 0;
    let mut seen_hosts: Vec<String> = Vec::new();
    loop {
        let hosts: Vec<String> = release
            .hosts
            .iter()
            .map(|h| format!("{}={}", h.host, h.state))
            .collect();
        let changed = hosts != seen_hosts || release.history.len() != seen_history;
        match ctx.format {
            Format::Json if changed => println!("{}", release_json(&release)),
            Format::Json => {}
            Format::Text => {
                for e in release.history.iter().skip(seen_history) {
                    println!("{}  {}", at_text(e.at_unix_ms), e.what);
                }
                for h in &release.hosts {
                    let now = format!("{}={}", h.host, h.state);
                    if !seen_hosts.contains(&now) {
                        println!(
                            "  {:<20} wave {:<3} {}{}",
                            h.host,
                            h.wave + 1,
                            h.state,
                            why(h)
                        );
                    }
                }
            }
        }
        seen_history = release.history.len();
        seen_hosts = hosts;
        if finished(&release.state) {
            return ended(&release);
        }
        tokio::time::sleep(POLL).await;
        release = get(ctx, &release.id.clone()).await?;
    }
}

/// A release's time as RFC 3339 text.
fn at_text(ms: i64) -> String {
    output::rfc3339_ms(ms).as_str().unwrap_or("").to_string()
}

/// The release succeeded but this host does not run its version (it was offline and
/// skipped, or changed since).
fn behind(r: &v1::FleetReleaseInfo, h: &v1::FleetReleaseHost) -> bool {
    r.state == "succeeded" && h.live_version != r.version
}

fn finished(state: &str) -> bool {
    matches!(state, "succeeded" | "halted" | "reverted")
}

/// The exit of a followed release: 0 when it succeeded, 1 when it halted, 3 when reverted.
fn ended(r: &v1::FleetReleaseInfo) -> Result<(), CliError> {
    match r.state.as_str() {
        "succeeded" => Ok(()),
        "reverted" => Err(CliError::Job {
            code: exit::ROLLED_BACK,
            message: format!("release {} reverted: {}", r.id, r.why),
        }),
        _ => Err(CliError::Job {
            code: exit::FAILURE,
            message: format!(
                "release {} halted: {}; `drover release abort --revert {}` takes the updated hosts back",
                r.id, r.why, r.id
            ),
        }),
    }
}

fn why(h: &v1::FleetReleaseHost) -> String {
    if h.why.is_empty() {
        String::new()
    } else {
        format!(" ({})", h.why)
    }
}

/// The plan: hosts per wave, in order, and the policy.
fn plan_text(r: &v1::FleetReleaseInfo) -> String {
    let mut out = String::new();
    let head = if r.scheduled.is_some() {
        format!(
            "plan for {} {} as it would run now (scheduled: hosts and waves are chosen again when it starts)",
            r.app, r.version,
        )
    } else if r.dry_run {
        format!(
            "plan for {} {} (dry run: nothing changes)",
            r.app, r.version
        )
    } else {
        format!("release {}: {} {}", r.id, r.app, r.version)
    };
    out.push_str(&line(head));
    for w in 0..r.waves {
        let hosts: Vec<&str> = r
            .hosts
            .iter()
            .filter(|h| h.wave == w)
            .map(|h| h.host.as_str())
            .collect();
        out.push_str(&line(format!(
            "  wave {}: {} host(s): {}",
            w + 1,
            hosts.len(),
            hosts.join(", ")
        )));
    }
    out.push_str(&line(format!(
        "  waves {}, max-parallel {}, min-healthy {}, progress-deadline {}, host-timeout {}, on-failure {}, max-failures {}{}",
        r.waves_text,
        r.max_parallel,
        output::duration_ms(r.min_healthy_ms),
        output::duration_ms(r.progress_deadline_ms),
        output::duration_ms(r.host_timeout_ms),
        r.on_failure,
        r.max_failures,
        if r.skip_offline { ", skip-offline" } else { "" }
    )));
    if !r.migration_host.is_empty() {
        out.push_str(&line(format!(
            "  the spec's migration (if any) runs on {} only",
            r.migration_host
        )));
    }
    out
}

fn release_json(r: &v1::FleetReleaseInfo) -> Value {
    json!({
        "id": r.id,
        "app": r.app,
        "version": r.version,
        "state": r.state,
        "why": r.why,
        "wave": r.wave + 1,
        "waves": r.waves,
        "dry_run": r.dry_run,
        "requested_by": r.requested_by,
        "created": output::rfc3339_ms(r.created_unix_ms),
        "finished": (r.finished_unix_ms > 0).then(|| output::rfc3339_ms(r.finished_unix_ms)),
        "migration_host": r.migration_host,
        "migration_ran": r.migration_ran,
        "policy": {
            "waves": r.waves_text,
            "canary": r.canary,
            "max_parallel": r.max_parallel,
            "min_healthy_ms": r.min_healthy_ms,
            "progress_deadline_ms": r.progress_deadline_ms,
            "host_timeout_ms": r.host_timeout_ms,
            "on_failure": r.on_failure,
            "max_failures": r.max_failures,
            "skip_offline": r.skip_offline,
        },
        "hosts": r.hosts.iter().map(|h| json!({
            "host": h.host,
            "wave": h.wave + 1,
            "state": h.state,
            "before": h.before,
            "live_version": h.live_version,
            "behind": behind(r, h),
            "job_id": h.job_id,
            "why": h.why,
            "connected": h.connected,
            "migrates": h.migrates,
            "pull": h.pull,
            "pull_why": h.pull_why,
            "pull_progress": h.pull_progress,
            "healthy_since": (h.healthy_since_unix_ms > 0).then(|| output::rfc3339_ms(h.healthy_since_unix_ms)),
        })).collect::<Vec<_>>(),
        "history": r.history.iter().map(|e| json!({
            "at": output::rfc3339_ms(e.at_unix_ms),
            "by": e.by,
            "what": e.what,
        })).collect::<Vec<_>>(),
    })
}

/// A plan (dry run) or a detached start.
struct Plan(v1::FleetReleaseInfo);

impl Render for Plan {
    fn text(&self, _now_ms: i64) -> String {
        plan_text(&self.0)
    }
    fn notes(&self, _now_ms: i64) -> String {
        if self.0.dry_run {
            String::new()
        } else {
            line(format!(
                "follow it with `drover release status --follow {}`",
                self.0.id
            ))
        }
    }
    fn json(&self) -> Value {
        release_json(&self.0)
    }
}

/// A release stored for later: the plan as of now, then the schedule that starts it.
struct Scheduled(v1::FleetReleaseInfo);

impl Render for Scheduled {
    fn text(&self, now_ms: i64) -> String {
        let mut out = plan_text(&self.0);
        if let Some(s) = &self.0.scheduled {
            out.push_str(&Stored(s.clone()).text(now_ms));
        }
        out
    }
    fn json(&self) -> Value {
        let mut v = release_json(&self.0);
        if let Some(s) = &self.0.scheduled {
            v["scheduled"] = output::schedule_json(s);
        }
        v
    }
}

/// One release in detail.
struct Status(v1::FleetReleaseInfo);

impl Render for Status {
    fn text(&self, now_ms: i64) -> String {
        let r = &self.0;
        let mut out = String::new();
        let state = if r.why.is_empty() {
            r.state.clone()
        } else {
            format!("{} ({})", r.state, r.why)
        };
        out.push_str(&line(format!(
            "release {}: {} {} by {}, {}, wave {} of {}",
            r.id,
            r.app,
            r.version,
            r.requested_by,
            state,
            r.wave + 1,
            r.waves
        )));
        if !r.migration_host.is_empty() {
            out.push_str(&line(format!(
                "  migration host {}: {}",
                r.migration_host,
                if r.migration_ran {
                    "its deploy (with the spec's migration, if any) went through"
                } else {
                    "not yet through"
                }
            )));
        }
        let pulls = |state: &str| r.hosts.iter().filter(|h| h.pull == state).count();
        if r.hosts.iter().any(|h| !h.pull.is_empty()) {
            out.push_str(&line(format!(
                "  image pull before wave 1: {} pulled, {} pulling, {} failed, {} not connected (they pull at their deploy)",
                pulls("pulled"),
                pulls("pulling"),
                pulls("failed"),
                pulls("skipped")
            )));
        }
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING);
        t.set_header([
            "WAVE", "HOST", "STATE", "PULL", "BEFORE", "LIVE", "SINCE", "WHY",
        ]);
        for h in &r.hosts {
            let since = [
                h.passed_unix_ms,
                h.healthy_since_unix_ms,
                h.deployed_unix_ms,
                h.deploy_started_unix_ms,
            ]
            .into_iter()
            .find(|t| *t > 0)
            .map_or("-".to_string(), |t| ago(t, now_ms));
            let live = if h.live_version.is_empty() {
                "-".to_string()
            } else if behind(r, h) {
                format!("{} (behind)", h.live_version)
            } else {
                h.live_version.clone()
            };
            t.add_row([
                (h.wave + 1).to_string(),
                h.host.clone(),
                h.state.clone(),
                if h.pull.is_empty() {
                    "-".into()
                } else {
                    h.pull.clone()
                },
                if h.before.is_empty() {
                    "-".into()
                } else {
                    h.before.clone()
                },
                live,
                since,
                if !h.why.is_empty() {
                    h.why.clone()
                } else if !h.pull_why.is_empty() {
                    format!("pull: {}", h.pull_why)
                } else if !h.pull_progress.is_empty() {
                    h.pull_progress.clone()
                } else {
                    "-".into()
                },
            ]);
        }
        out.push_str(&line(t));
        out.push_str(&line("history:"));
        for e in &r.history {
            out.push_str(&line(format!("  {}  {}", at_text(e.at_unix_ms), e.what)));
        }
        out
    }
    fn json(&self) -> Value {
        release_json(&self.0)
    }
}

/// Releases, newest first.
struct List(Vec<v1::FleetReleaseInfo>);

impl Render for List {
    fn text(&self, now_ms: i64) -> String {
        if self.0.is_empty() {
            return line("no releases yet: `drover release APP VERSION` starts one");
        }
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING);
        t.set_header(["ID", "APP", "VERSION", "STATE", "HOSTS", "BY", "STARTED"]);
        for r in &self.0 {
            let passed = r.hosts.iter().filter(|h| h.state == "passed").count();
            t.add_row([
                r.id.clone(),
                r.app.clone(),
                r.version.clone(),
                r.state.clone(),
                format!("{passed}/{} passed", r.hosts.len()),
                r.requested_by.clone(),
                ago(r.created_unix_ms, now_ms),
            ]);
        }
        line(t)
    }
    fn json(&self) -> Value {
        Value::Array(self.0.iter().map(release_json).collect())
    }
}
