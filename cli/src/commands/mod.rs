//! The `drover` commands, one file per noun, and what they share: the connection and output
//! format ([`Ctx`]), following or printing a job that was started ([`attach`]), and the
//! argument parsers.

pub mod alerts;
pub mod app;
pub mod backup;
pub mod backup_target;
pub mod deploy;
pub mod hosts;
pub mod jobs;
pub mod operator;
pub mod release;
pub mod restore;
pub mod schedule;
pub mod token;
pub mod verify;
pub mod whoami;

use std::path::PathBuf;

use drover_proto::v1;
use drover_proto::v1::operator_service_client::OperatorServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

use drover_model::units::now_ms;

use super::render::{Format, Render, line};
use super::{CliError, client, output, watch};

/// What every command runs with: the controller's API, where it is, who we are, the time the
/// command started, and how results are printed.
pub struct Ctx {
    pub api: OperatorServiceClient<Channel>,
    /// The controller's address, for messages.
    pub addr: String,
    /// The identity bundle's directory.
    pub identity: PathBuf,
    /// When the command started (Unix ms), for "5m ago".
    pub now: i64,
    pub format: Format,
}

impl Ctx {
    /// Resolves the controller and identity (flags, environment, config, defaults) and connects.
    pub fn connect(
        controller: Option<&str>,
        identity: Option<&std::path::Path>,
        format: Format,
    ) -> Result<Ctx, CliError> {
        let controller = client::resolve_controller(controller);
        let identity = client::resolve_identity(identity)?;
        let client = client::connect(&controller, &identity)?;
        Ok(Ctx {
            api: client.api,
            addr: client.controller,
            identity: identity.value,
            now: now_ms(),
            format,
        })
    }

    /// Maps a failed call to the error saying what to do.
    pub fn err(&self) -> impl Fn(tonic::Status) -> CliError + use<> {
        let addr = self.addr.clone();
        move |status| client::rpc_error(&addr, status)
    }

    /// Prints a command's result in the chosen format.
    pub fn show(&self, result: &impl Render) -> Result<(), CliError> {
        self.format.print(result, self.now)
    }

    /// Prints the text of a command that has no JSON output, exactly (those commands refuse
    /// `--json` before they run).
    pub fn say(&self, text: &str) -> Result<(), CliError> {
        print!("{text}");
        Ok(())
    }
}

/// A job started with `--detach`: its id on stdout and how to follow it on stderr, or the job
/// as JSON.
struct Detached<'a>(&'a v1::JobInfo);

impl Render for Detached<'_> {
    fn text(&self, _now_ms: i64) -> String {
        line(&self.0.id)
    }
    fn notes(&self, _now_ms: i64) -> String {
        line(format!(
            "{}; follow it with `drover watch {}`",
            watch::render_header(self.0),
            self.0.id
        ))
    }
    fn json(&self) -> Value {
        output::job_json(self.0)
    }
}

/// After a job was accepted (deploy, rollback, backup, restore, ...): print it (`--detach`) or
/// follow it to its end, with the exit code of how it ended.
pub async fn attach(ctx: &mut Ctx, job: &v1::JobInfo, detach: bool) -> Result<(), CliError> {
    if detach {
        return ctx.show(&Detached(job));
    }
    watch::follow(
        &mut ctx.api,
        &ctx.addr,
        &job.id,
        watch::Mode::pick(ctx.format),
    )
    .await
}

/// A spec file's text; a file that cannot be read is an invalid request (exit 65).
pub fn read_file(file: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(file)
        .map_err(|e| CliError::Invalid(format!("cannot read {}: {e}", file.display())))
}

/// A `--label k=v`.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(LabelError(s.to_string())),
    }
}

/// A `--label` that is not `k=v`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {0:?} is not k=v")]
pub struct LabelError(pub String);

/// A time given as RFC 3339 or as `+DURATION` from now, in Unix ms.
pub fn parse_at(text: &str) -> Result<i64, AtError> {
    parse_at_from(text, now_ms())
}

/// [`parse_at`] with the current time passed in.
pub fn parse_at_from(text: &str, now_ms: i64) -> Result<i64, AtError> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('+') {
        let d = drover_model::units::parse_duration(rest)?;
        return Ok(now_ms + d.as_millis() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|err| AtError::Time {
            text: text.to_string(),
            err,
        })
}

/// A time [`parse_at`] cannot read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AtError {
    #[error(transparent)]
    Duration(#[from] drover_model::units::DurationError),
    #[error("invalid time {text:?}: {err} (use RFC 3339, 2026-05-01T22:00:00Z, or +30m)")]
    Time {
        text: String,
        err: chrono::ParseError,
    },
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
        let err = parse_at_from("tomorrow", now).unwrap_err().to_string();
        assert!(err.contains("tomorrow") && err.contains("+30m"), "{err}");
        assert!(parse_at_from("+soon", now).is_err());
    }

    #[test]
    fn labels_are_k_equals_v() {
        assert_eq!(parse_label("env=prod"), Ok(("env".into(), "prod".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_label("=prod").is_err());
        assert!(parse_label("prod").is_err());
    }

    #[test]
    fn a_detached_job_is_its_id_with_a_hint_or_its_json() {
        let job = v1::JobInfo {
            id: "deploy-1".into(),
            kind: "deploy".into(),
            app: "api".into(),
            version: "v1".into(),
            ..Default::default()
        };
        let d = Detached(&job);
        assert_eq!(d.text(0), "deploy-1\n");
        assert_eq!(
            d.notes(0),
            "deploy api v1 on  (job deploy-1); follow it with `drover watch deploy-1`\n"
        );
        assert_eq!(d.json()["id"], "deploy-1");
    }
}
