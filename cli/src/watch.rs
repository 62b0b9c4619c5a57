//! Following a job (`drover watch`, and `drover deploy|rollback` unless `--detach`): the
//! event stream rendered for a terminal, as plain lines, or as NDJSON, and how the job ended
//! as an exit code.

use std::io::Write;

use drover_model::jobevent::{self, field, status};
use drover_proto::v1;
use drover_proto::v1::operator_service_client::OperatorServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::output::{duration_ms, event_json, job_json};
use super::render::Format;
use super::{CliError, exit};

/// How the stream is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Readable progress for a person.
    Terminal,
    /// `HH:MM:SS host step status message`, one line per event.
    Plain,
    /// One JSON object per line: `{"type":"event",...}` per event, `{"type":"job",...}` last.
    Json,
}

impl Mode {
    /// JSON lines with `--json`, else for a terminal or plain lines, as stdout is.
    pub fn pick(format: Format) -> Mode {
        use std::io::IsTerminal;
        if format == Format::Json {
            Mode::Json
        } else if std::io::stdout().is_terminal() {
            Mode::Terminal
        } else {
            Mode::Plain
        }
    }
}

fn get<'a>(e: &'a v1::JobEvent, name: &str) -> &'a str {
    e.fields.get(name).map(String::as_str).unwrap_or("")
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// `HH:MM:SS` (UTC) of a time in ms.
pub fn clock(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    let text = humantime::format_rfc3339_seconds(t).to_string();
    text.get(11..19).unwrap_or("--:--:--").to_string()
}

/// The (step, status, message) of an event, for the plain and terminal renderings.
fn parts(e: &v1::JobEvent) -> (String, String, String) {
    let step = get(e, field::STEP).to_string();
    let mut message = e.message.clone();
    let status = match e.kind.as_str() {
        jobevent::STARTED => "started".to_string(),
        jobevent::STEP => {
            if let Ok(ms) = get(e, field::DURATION_MS).parse::<i64>() {
                let took = duration_ms(ms);
                message = if message.is_empty() {
                    took
                } else {
                    format!("{message} ({took})")
                };
            }
            get(e, field::STATUS).to_string()
        }
        jobevent::PROGRESS => "progress".to_string(),
        jobevent::FINISHED => {
            let error = get(e, field::ERROR);
            if !error.is_empty() {
                message = error.to_string();
            }
            get(e, field::RESULT).to_string()
        }
        jobevent::RELEASES => "releases".to_string(),
        other => other.to_string(),
    };
    (step, status, message)
}

/// One event as shown in `mode`; None when the mode does not show it.
pub fn render_event(mode: Mode, e: &v1::JobEvent) -> Option<String> {
    let (step, status_text, message) = parts(e);
    match mode {
        Mode::Json => {
            let mut value = event_json(e);
            if let Value::Object(map) = &mut value {
                map.insert("type".into(), json!("event"));
            }
            Some(value.to_string())
        }
        Mode::Plain => Some(format!(
            "{} {} {} {} {}",
            clock(e.at_unix_ms),
            or_dash(&e.host),
            or_dash(&step),
            or_dash(&status_text),
            message
        )),
        Mode::Terminal => {
            let host = &e.host;
            let with = |m: &str| {
                if m.is_empty() {
                    String::new()
                } else {
                    format!(": {m}")
                }
            };
            match e.kind.as_str() {
                jobevent::STARTED => Some(format!("{host}  started{}", with(&e.message))),
                jobevent::STEP => {
                    let took = get(e, field::DURATION_MS)
                        .parse::<i64>()
                        .map(|ms| format!(" ({})", duration_ms(ms)))
                        .unwrap_or_default();
                    Some(match get(e, field::STATUS) {
                        status::STARTED => format!("{host}  ▸ {step}"),
                        status::DONE => format!("{host}  ✓ {step}{took}"),
                        status::FAILED => format!("{host}  ✗ {step}{took}{}", with(&e.message)),
                        status::SKIPPED => format!("{host}  - {step} skipped{}", with(&e.message)),
                        other => format!("{host}  {step} {other}{}", with(&e.message)),
                    })
                }
                jobevent::PROGRESS => Some(format!("{host}      {}", e.message)),
                jobevent::FINISHED => Some(format!("{host}  {status_text}{}", with(&message))),
                _ => None,
            }
        }
    }
}

/// The line before the events, for a person.
pub fn render_header(job: &v1::JobInfo) -> String {
    let hosts: Vec<&str> = job.targets.iter().map(|t| t.host.as_str()).collect();
    format!(
        "{} {} {} on {} (job {})",
        job.kind,
        job.app,
        version_text(job),
        hosts.join(", "),
        job.id
    )
}

fn version_text(job: &v1::JobInfo) -> &str {
    if !job.version.is_empty() {
        &job.version
    } else if job.kind == "rollback" {
        "to the previous release"
    } else {
        ""
    }
}

/// The last line(s), once the job has finished.
pub fn render_final(mode: Mode, job: &v1::JobInfo) -> String {
    let took = duration_ms(job.finished_unix_ms - job.created_unix_ms);
    match mode {
        Mode::Json => {
            let mut value = job_json(job);
            if let Value::Object(map) = &mut value {
                map.insert("type".into(), json!("job"));
            }
            value.to_string()
        }
        Mode::Plain => format!(
            "{} - - {} job {} {} {} {} in {took}",
            clock(job.finished_unix_ms),
            job.state,
            job.id,
            job.kind,
            job.app,
            or_dash(&job.version)
        ),
        Mode::Terminal => format!("job {} {} in {took}", job.id, job.state),
    }
}

/// How a finished job maps to the exit of `drover`: Ok when it succeeded, else the error
/// (one line: what failed where and why) with its exit code.
pub fn outcome(job: &v1::JobInfo) -> Result<(), CliError> {
    if job.state == "succeeded" {
        return Ok(());
    }
    let what = format!("{} of {} {}", job.kind, job.app, version_text(job));
    let failed = job.targets.iter().find(|t| {
        matches!(
            t.state.as_str(),
            "failed" | "rolled_back" | "interrupted" | "cancelled"
        )
    });
    let Some(t) = failed else {
        return Err(CliError::Job {
            code: exit::FAILURE,
            message: format!("{what} ended {}", job.state),
        });
    };
    let host = &t.host;
    let reason = or_dash(&t.message);
    let at = if t.step.is_empty() {
        String::new()
    } else {
        format!(" at step {}", t.step)
    };
    let (code, message) = if t.code == jobevent::CODE_LOCKED {
        (
            exit::LOCKED,
            format!(
                "{what} did not start on {host}: another job holds the app's lock ({reason}); use --wait to wait for it"
            ),
        )
    } else {
        match t.state.as_str() {
            "rolled_back" => (
                exit::ROLLED_BACK,
                format!(
                    "{what} was rolled back automatically on {host}{at}: {reason}; the previous release serves"
                ),
            ),
            // A job cancelled on one host and not run on the next says so as a whole.
            _ if job.state == "cancelled" => (
                exit::CANCELLED,
                format!(
                    "{what} was cancelled{} on {host}{at}: {reason}",
                    if job.cancel_requested_by.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", job.cancel_requested_by)
                    }
                ),
            ),
            "interrupted" => (
                exit::INTERRUPTED,
                format!(
                    "{what} was interrupted on {host}{at}: {reason}; `drover releases {}` shows what serves",
                    job.app
                ),
            ),
            _ => (
                exit::FAILURE,
                format!("{what} failed on {host}{at}: {reason}"),
            ),
        }
    };
    Err(CliError::Job { code, message })
}

/// The log tail of the target that failed, for a person (empty when there is none).
pub fn render_logs(job: &v1::JobInfo) -> String {
    let Some(t) = job
        .targets
        .iter()
        .find(|t| !t.logs.trim().is_empty() && t.state != "succeeded")
    else {
        return String::new();
    };
    let mut out = format!("last log lines of {} on {}:\n", job.app, t.host);
    for line in t.logs.trim_end().lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Follows job `id` until it finishes, printing in `mode`; returns how it ended. A broken
/// stream (the controller restarted, the network went) is exit 69 with how to resume.
pub async fn follow(
    api: &mut OperatorServiceClient<Channel>,
    controller: &str,
    id: &str,
    mode: Mode,
) -> Result<(), CliError> {
    let lost = |cause: String| {
        CliError::Unreachable(format!(
            "lost the controller at {controller} while watching job {id} ({cause}); the job goes on: `drover watch {id}`"
        ))
    };
    let mut stream = api
        .watch_job(v1::WatchJobRequest { id: id.to_string() })
        .await
        .map_err(|s| super::client::rpc_error(controller, s))?
        .into_inner();
    let mut last: Option<v1::JobInfo> = None;
    let mut stdout = std::io::stdout();
    loop {
        let msg = match stream.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(status) => return Err(lost(status.message().to_string())),
        };
        if let Some(event) = &msg.event
            && let Some(line) = render_event(mode, event)
        {
            let _ = writeln!(stdout, "{line}");
        }
        if let Some(job) = msg.job {
            if last.is_none() && mode == Mode::Terminal {
                let _ = writeln!(stdout, "{}", render_header(&job));
            }
            last = Some(job);
        }
    }
    let job = match last {
        Some(job) if job.finished_unix_ms > 0 => job,
        _ => return Err(lost("the stream ended before the job did".into())),
    };
    let _ = writeln!(stdout, "{}", render_final(mode, &job));
    if mode != Mode::Json {
        let logs = render_logs(&job);
        if !logs.is_empty() {
            let _ = write!(std::io::stderr(), "{logs}");
        }
    }
    outcome(&job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, message: &str, fields: &[(&str, &str)]) -> v1::JobEvent {
        v1::JobEvent {
            seq: 1,
            job_id: "deploy-1".into(),
            // 14:22:33 UTC
            at_unix_ms: 1_795_443_753_000,
            kind: kind.into(),
            message: message.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host: "web-1".into(),
            payload: None,
        }
    }

    fn job(state: &str, target: v1::JobTarget) -> v1::JobInfo {
        v1::JobInfo {
            id: "deploy-1".into(),
            kind: "deploy".into(),
            app: "api".into(),
            version: "v1.4.2".into(),
            state: state.into(),
            created_unix_ms: 1_000,
            finished_unix_ms: 13_500,
            targets: vec![target],
            ..Default::default()
        }
    }

    fn target(state: &str, step: &str, message: &str, code: &str) -> v1::JobTarget {
        v1::JobTarget {
            host: "web-1".into(),
            state: state.into(),
            step: step.into(),
            message: message.into(),
            code: code.into(),
            ..Default::default()
        }
    }

    #[test]
    fn plain_lines_are_time_host_step_status_message() {
        let step = event(
            jobevent::STEP,
            "",
            &[
                (field::STEP, "image"),
                (field::STATUS, "done"),
                (field::DURATION_MS, "1250"),
            ],
        );
        assert_eq!(
            render_event(Mode::Plain, &step).unwrap(),
            "14:22:33 web-1 image done 1.2s"
        );
        let finished = event(
            jobevent::FINISHED,
            "deploy failed",
            &[
                (field::RESULT, "failed"),
                (field::STEP, "health"),
                (field::ERROR, "GET /healthz: 500"),
            ],
        );
        assert_eq!(
            render_event(Mode::Plain, &finished).unwrap(),
            "14:22:33 web-1 health failed GET /healthz: 500"
        );
        let started = event(jobevent::STARTED, "deploy api v1.4.2", &[]);
        assert_eq!(
            render_event(Mode::Plain, &started).unwrap(),
            "14:22:33 web-1 - started deploy api v1.4.2"
        );
        assert_eq!(
            render_event(Mode::Terminal, &step).unwrap(),
            "web-1  ✓ image (1.2s)"
        );
        assert!(render_event(Mode::Terminal, &event(jobevent::RELEASES, "", &[])).is_none());
        let line = render_event(Mode::Json, &finished).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["kind"], "job.finished");
        assert_eq!(v["fields"]["step"], "health");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn exit_codes_follow_the_ending() {
        let ok = job("succeeded", target("succeeded", "", "", ""));
        assert!(outcome(&ok).is_ok());
        let code = |j: &v1::JobInfo| outcome(j).unwrap_err().exit_code();
        let failed = job(
            "failed",
            target("failed", "health", "GET /healthz: 500", ""),
        );
        assert_eq!(code(&failed), 1);
        assert_eq!(
            outcome(&failed).unwrap_err().to_string(),
            "deploy of api v1.4.2 failed on web-1 at step health: GET /healthz: 500"
        );
        let rolled = job("rolled_back", target("rolled_back", "watch", "5xx 9%", ""));
        assert_eq!(code(&rolled), 3);
        let interrupted = job(
            "interrupted",
            target("interrupted", "switch", "agent restarted", ""),
        );
        assert_eq!(code(&interrupted), 4);
        let mut cancelled = job(
            "cancelled",
            target("cancelled", "health", "cancelled by admin at health", ""),
        );
        cancelled.cancel_requested_by = "admin".into();
        assert_eq!(code(&cancelled), 5);
        assert_eq!(
            outcome(&cancelled).unwrap_err().to_string(),
            "deploy of api v1.4.2 was cancelled by admin on web-1 at step health: cancelled by admin at health"
        );
        let locked = job(
            "failed",
            target(
                "failed",
                "lock",
                "held by deploy-x (alice) since 14:00:02",
                "locked",
            ),
        );
        assert_eq!(code(&locked), 75);
        let message = outcome(&locked).unwrap_err().to_string();
        assert!(
            message.contains("alice") && message.contains("use --wait"),
            "{message}"
        );
    }

    #[test]
    fn the_final_line_and_logs() {
        let mut j = job("failed", target("failed", "health", "500", ""));
        j.targets[0].logs = "boot\npanic: no db\n".into();
        assert_eq!(
            render_final(Mode::Plain, &j),
            "00:00:13 - - failed job deploy-1 deploy api v1.4.2 in 12.5s"
        );
        assert_eq!(
            render_logs(&j),
            "last log lines of api on web-1:\n  boot\n  panic: no db\n"
        );
        let v: Value = serde_json::from_str(&render_final(Mode::Json, &j)).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["state"].as_str()),
            (Some("job"), Some("failed"))
        );
    }
}
