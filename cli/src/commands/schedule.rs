//! `drover schedule add|list|rm|pause|resume`: recurring backups and verifications, one-off
//! deploys (also what `drover deploy --at` prints).

use clap::Subcommand;
use drover_proto::v1;
use serde_json::Value;

use super::{Ctx, parse_at};
use crate::CliError;
use crate::output;
use crate::render::{List, Render, line};

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule.
    #[command(subcommand)]
    Add(ScheduleAdd),
    /// Every schedule with its next 3 run times and its last run.
    List,
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
    },
}

/// A schedule just stored: its id, what it runs and when next, or its JSON.
pub struct Stored(pub v1::ScheduleInfo);

impl Render for Stored {
    fn text(&self, now_ms: i64) -> String {
        let s = &self.0;
        let next = s
            .next_runs_unix_ms
            .first()
            .map(|t| output::when(*t, now_ms))
            .unwrap_or_else(|| "none".into());
        line(format!(
            "schedule {} ({} {}) stored; next run {next}",
            s.id, s.kind, s.target
        ))
    }
    fn json(&self) -> Value {
        output::schedule_json(&self.0)
    }
}

/// An AddSchedule request for a recurring backup or verify schedule, checked here first so a
/// bad expression or zone is reported without a round trip.
fn recurring_request(kind: &str, a: RecurringArgs) -> Result<v1::AddScheduleRequest, CliError> {
    drover_model::schedule::parse_cron(&a.cron).map_err(|e| CliError::Invalid(e.to_string()))?;
    let tz = a.tz.unwrap_or_default();
    drover_model::schedule::parse_tz(&tz).map_err(|e| CliError::Invalid(e.to_string()))?;
    Ok(v1::AddScheduleRequest {
        id: a.id.unwrap_or_default(),
        kind: kind.into(),
        target: a.target,
        hosts: a.host.into_iter().collect(),
        cron: a.cron,
        tz,
        jitter_secs: a.jitter.map(|d| d.as_secs()).unwrap_or(0),
        ..Default::default()
    })
}

pub async fn run(ctx: &mut Ctx, command: ScheduleCommand) -> Result<(), CliError> {
    match command {
        ScheduleCommand::Add(add) => {
            let req = match add {
                ScheduleAdd::Backup(a) => recurring_request("backup", a)?,
                ScheduleAdd::Verify(a) => recurring_request("verify", a)?,
                ScheduleAdd::Deploy {
                    app,
                    version,
                    at,
                    hosts,
                    id,
                } => v1::AddScheduleRequest {
                    id: id.unwrap_or_default(),
                    kind: "deploy".into(),
                    target: app,
                    version,
                    hosts,
                    at_unix_ms: at,
                    ..Default::default()
                },
            };
            let schedule = ctx.api.add_schedule(req).await.map_err(ctx.err())?;
            ctx.show(&Stored(schedule.into_inner()))
        }
        ScheduleCommand::List => {
            let schedules = ctx
                .api
                .list_schedules(v1::ListSchedulesRequest {})
                .await
                .map_err(ctx.err())?
                .into_inner()
                .schedules;
            ctx.show(&List {
                items: &schedules,
                json: output::schedule_json,
                table: output::schedules_table,
            })
        }
        ScheduleCommand::Rm { id } => {
            ctx.api
                .remove_schedule(v1::RemoveScheduleRequest { id: id.clone() })
                .await
                .map_err(ctx.err())?;
            ctx.say(&line(format!("schedule {id} removed")))
        }
        ScheduleCommand::Pause { id } => {
            ctx.api
                .pause_schedule(v1::PauseScheduleRequest { id: id.clone() })
                .await
                .map_err(ctx.err())?;
            ctx.say(&line(format!("schedule {id} paused")))
        }
        ScheduleCommand::Resume { id } => {
            let s = ctx
                .api
                .resume_schedule(v1::ResumeScheduleRequest { id: id.clone() })
                .await
                .map_err(ctx.err())?
                .into_inner();
            let next = s
                .next_runs_unix_ms
                .first()
                .map(|t| output::when(*t, ctx.now))
                .unwrap_or_else(|| "none".into());
            ctx.say(&line(format!("schedule {id} resumed; next run {next}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_schedule_names_its_next_run() {
        let now = 1_777_672_800_000;
        let mut s = v1::ScheduleInfo {
            id: "site-backup".into(),
            kind: "backup".into(),
            target: "site".into(),
            next_runs_unix_ms: vec![now + 3_600_000],
            ..Default::default()
        };
        assert_eq!(
            Stored(s.clone()).text(now),
            "schedule site-backup (backup site) stored; next run 2026-05-01T23:00:00Z (in 1h00m)\n"
        );
        s.next_runs_unix_ms.clear();
        assert!(Stored(s).text(now).ends_with("next run none\n"));
    }

    #[test]
    fn a_bad_cron_or_zone_is_refused_before_any_call() {
        let args = |cron: &str, tz: Option<&str>| RecurringArgs {
            target: "site".into(),
            cron: cron.into(),
            tz: tz.map(str::to_string),
            jitter: None,
            host: None,
            id: None,
        };
        let r = recurring_request("backup", args("0 2 * * *", Some("Europe/Berlin"))).unwrap();
        assert_eq!((r.kind.as_str(), r.target.as_str()), ("backup", "site"));
        assert!(matches!(
            recurring_request("backup", args("not cron", None)),
            Err(CliError::Invalid(_))
        ));
        assert!(matches!(
            recurring_request("verify", args("0 2 * * *", Some("Mars/Olympus"))),
            Err(CliError::Invalid(_))
        ));
    }
}
