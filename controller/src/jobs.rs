//! Deploy and rollback jobs as the controller tracks them, and how each event an agent reports
//! changes one. Pure functions of the job and the event: no I/O, no clock, no wire types.
//!
//! A job has one target per host; which run when is `rollout`'s decision (today: one after
//! another). The first target is dispatched when the job is created; a target that succeeds
//! dispatches the next one; a target that ends any other way skips the rest. The agent owns the truth: the controller only follows the
//! events (`drover_model::jobevent`) it is sent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use drover_model::job::JobCommand;
pub use drover_model::jobevent::JobKind;
use drover_model::jobevent::{self, JobResult, Payload, field, status};

use crate::rollout::{self, Rollout, Standing};

/// A job event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub host: String,
    pub seq: u64,
    pub job_id: String,
    pub at_unix_ms: i64,
    pub kind: String,
    pub message: String,
    /// Scalars only: a record the event carries is in `payload`.
    pub fields: BTreeMap<String, String>,
    pub received_unix_ms: i64,
    /// The typed record (release table, catalog, validation, prune lines), if it carried one
    /// that reads. Absent in events stored before payloads, which kept it in `fields`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
}

/// Where one host's part of a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Not started by the agent (its command may have been sent: see `dispatched`).
    Queued,
    Running,
    Succeeded,
    Failed,
    RolledBack,
    Interrupted,
    /// An operator cancelled the job: the agent stopped this part at a safe point, or (not
    /// dispatched yet) it never ran.
    Cancelled,
    /// An earlier target did not succeed, so this one never ran.
    Skipped,
}

impl TargetState {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Queued => "queued",
            TargetState::Running => "running",
            TargetState::Succeeded => "succeeded",
            TargetState::Failed => "failed",
            TargetState::RolledBack => "rolled_back",
            TargetState::Interrupted => "interrupted",
            TargetState::Cancelled => "cancelled",
            TargetState::Skipped => "skipped",
        }
    }

    pub fn is_finished(self) -> bool {
        !matches!(self, TargetState::Queued | TargetState::Running)
    }

    fn from_result(result: JobResult) -> TargetState {
        match result {
            JobResult::Succeeded => TargetState::Succeeded,
            JobResult::Failed => TargetState::Failed,
            JobResult::RolledBack => TargetState::RolledBack,
            JobResult::Interrupted => TargetState::Interrupted,
            JobResult::Cancelled => TargetState::Cancelled,
        }
    }

    /// How bad an ending is, for the job's overall state (higher is worse).
    fn severity(self) -> u8 {
        match self {
            TargetState::Queued | TargetState::Running | TargetState::Succeeded => 0,
            TargetState::Skipped => 1,
            TargetState::RolledBack => 2,
            TargetState::Cancelled => 3,
            TargetState::Failed => 4,
            TargetState::Interrupted => 5,
        }
    }
}

/// A job's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    RolledBack,
    Interrupted,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::RolledBack => "rolled_back",
            JobState::Interrupted => "interrupted",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// An operator's request to cancel a job (`drover cancel`), kept with the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub by: String,
    /// Controller clock.
    pub at_unix_ms: i64,
}

/// One host's part of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub host: String,
    pub state: TargetState,
    /// Its turn came: its command is (re)sent to the host until the agent reports
    /// `job.started`.
    pub dispatched: bool,
    /// The step running now, or the one that failed.
    pub step: String,
    /// The last progress line, or why it failed.
    pub message: String,
    /// Agent clock.
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    /// Tail of the container's logs, for a failure.
    pub logs: String,
    /// `locked` when another job holds the app's lock on the host.
    pub code: String,
}

/// A deploy or rollback, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub app: String,
    /// The version asked for; for a rollback, empty means "the previous release".
    pub version: String,
    pub requested_by: String,
    /// Controller clock.
    pub created_unix_ms: i64,
    /// Controller clock, when the last event that finished the job was received; 0 before.
    pub finished_unix_ms: i64,
    pub command: JobCommand,
    /// In the order they run.
    pub targets: Vec<Target>,
    /// Set once an operator asked to cancel it: `Cancel` goes to every host whose part was
    /// dispatched and is unfinished, on each new session too, until that part ends.
    #[serde(default)]
    pub cancel: Option<CancelRequest>,
}

/// What happened to a job, for `drover watch`: an event of it, or its new state.
#[derive(Debug, Clone)]
pub enum JobUpdate {
    Event(EventRecord),
    Job(Box<JobRecord>),
}

impl JobUpdate {
    pub fn job_id(&self) -> &str {
        match self {
            JobUpdate::Event(e) => &e.job_id,
            JobUpdate::Job(j) => &j.id,
        }
    }
}

/// A readable id that sorts by creation time: `deploy-20261123-142233-3f2a` (UTC).
pub fn job_id(kind: JobKind, now_ms: i64, suffix: u16) -> String {
    format!(
        "{}-{}-{suffix:04x}",
        kind.as_str(),
        jobevent::id_stamp(now_ms)
    )
}

impl JobRecord {
    /// A new job on `hosts` (in that order), its first target dispatched.
    pub fn new(
        id: String,
        created_unix_ms: i64,
        command: JobCommand,
        hosts: &[String],
    ) -> JobRecord {
        let mut job = JobRecord {
            id,
            kind: command.kind(),
            app: command.subject().to_string(),
            version: command.version().to_string(),
            requested_by: command.requested_by().to_string(),
            created_unix_ms,
            finished_unix_ms: 0,
            targets: hosts
                .iter()
                .map(|host| Target {
                    host: host.clone(),
                    state: TargetState::Queued,
                    dispatched: false,
                    step: String::new(),
                    message: String::new(),
                    started_unix_ms: 0,
                    finished_unix_ms: 0,
                    logs: String::new(),
                    code: String::new(),
                })
                .collect(),
            command,
            cancel: None,
        };
        job.roll_on();
        job
    }

    /// Dispatches the targets whose turn came and skips those that will never run, as the
    /// job's rollout says (`rollout::next`; one host after another).
    fn roll_on(&mut self) {
        let standings: Vec<Standing> = self
            .targets
            .iter()
            .map(|t| match (t.state, t.dispatched) {
                (TargetState::Queued, false) => Standing::Waiting,
                (state, _) if !state.is_finished() => Standing::InFlight,
                (TargetState::Succeeded | TargetState::Skipped, _) => Standing::Done,
                _ => Standing::Failed,
            })
            .collect();
        let next = rollout::next(Rollout::SEQUENTIAL, &standings);
        for i in next.dispatch {
            self.targets[i].dispatched = true;
        }
        for i in next.skip {
            self.targets[i].state = TargetState::Skipped;
        }
    }

    /// Still running while any target is queued or running (queued while none has started);
    /// then the worst ending of its targets: interrupted, failed, rolled back, succeeded.
    pub fn state(&self) -> JobState {
        let unfinished = self.targets.iter().any(|t| !t.state.is_finished());
        if unfinished {
            let started = self.targets.iter().any(|t| t.state != TargetState::Queued);
            return if started {
                JobState::Running
            } else {
                JobState::Queued
            };
        }
        let worst = self
            .targets
            .iter()
            .map(|t| t.state)
            .max_by_key(|s| s.severity())
            .unwrap_or(TargetState::Failed);
        match worst {
            TargetState::Succeeded => JobState::Succeeded,
            TargetState::RolledBack => JobState::RolledBack,
            TargetState::Interrupted => JobState::Interrupted,
            TargetState::Cancelled => JobState::Cancelled,
            // Skipped alone cannot happen (the first target always runs); count it as failed.
            _ => JobState::Failed,
        }
    }

    /// Whether the command for `host` is due: its turn came, the agent has not started it, and
    /// nobody cancelled the job (then only `Cancel` is sent).
    pub fn awaits_start_on(&self, host: &str) -> bool {
        self.cancel.is_none()
            && self
                .targets
                .iter()
                .any(|t| t.host == host && t.dispatched && t.state == TargetState::Queued)
    }

    /// Whether `host` is owed a `Cancel`: the job was cancelled and the host's part was
    /// dispatched and has not ended.
    pub fn cancel_due_on(&self, host: &str) -> bool {
        self.cancel.is_some()
            && self
                .targets
                .iter()
                .any(|t| t.host == host && t.dispatched && !t.state.is_finished())
    }

    /// The target that decides how the job ended: the first that did not succeed.
    pub fn failed_target(&self) -> Option<&Target> {
        self.targets.iter().find(|t| {
            t.state.is_finished()
                && t.state != TargetState::Succeeded
                && t.state != TargetState::Skipped
        })
    }
}

fn field<'a>(event: &'a EventRecord, name: &str) -> &'a str {
    event.fields.get(name).map(String::as_str).unwrap_or("")
}

/// Applies one event of `job` (reported by `event.host`) to the job. Returns whether anything
/// changed. Events for a host that is no target, for a finished or skipped target, and of
/// kinds that are not job progress (`app.releases`, unknown kinds) change nothing.
///
/// - `job.started`: queued → running (`started` = the event's time).
/// - `job.step`: `step`; a step that starts clears the progress message.
/// - `job.progress`: the message (and `step`, when given).
/// - `job.finished`: the target ends with `result` (an unknown result counts as failed);
///   `step`, `error` (else the message), `logs`, `code`. Success dispatches the next queued
///   target; any other ending skips every queued target after it.
///
/// A step, progress or finish for a still-queued target starts it first. When the last target
/// ends, the job's `finished_unix_ms` is the event's receive time (controller clock).
pub fn apply_event(job: &mut JobRecord, event: &EventRecord) -> bool {
    let Some(index) = job.targets.iter().position(|t| t.host == event.host) else {
        return false;
    };
    if job.targets[index].state.is_finished() {
        return false;
    }
    let before = job.clone();
    let kind = event.kind.as_str();
    if !matches!(
        kind,
        jobevent::STARTED | jobevent::STEP | jobevent::PROGRESS | jobevent::FINISHED
    ) {
        return false;
    }
    let target = &mut job.targets[index];
    // Whatever the agent says about a target means it holds the command.
    target.dispatched = true;
    if target.state == TargetState::Queued {
        target.state = TargetState::Running;
    }
    if target.started_unix_ms == 0 {
        target.started_unix_ms = event.at_unix_ms;
    }
    let step = field(event, field::STEP);
    match kind {
        jobevent::STEP => {
            if !step.is_empty() {
                target.step = step.to_string();
            }
            if field(event, field::STATUS) == status::STARTED {
                target.message.clear();
            }
        }
        jobevent::PROGRESS => {
            if !step.is_empty() {
                target.step = step.to_string();
            }
            target.message = event.message.clone();
        }
        jobevent::FINISHED => {
            let result = field(event, field::RESULT);
            let error = field(event, field::ERROR);
            target.state = match JobResult::parse(result) {
                Some(r) => TargetState::from_result(r),
                None => TargetState::Failed,
            };
            if !step.is_empty() {
                target.step = step.to_string();
            }
            target.message = if !error.is_empty() {
                error.to_string()
            } else if JobResult::parse(result).is_none() {
                format!("the agent reported an unknown result {result:?}")
            } else {
                event.message.clone()
            };
            target.logs = field(event, field::LOGS).to_string();
            target.code = field(event, field::CODE).to_string();
            target.finished_unix_ms = event.at_unix_ms;
            job.roll_on();
        }
        _ => {} // job.started: done above
    }
    if job.finished_unix_ms == 0 && job.state().is_finished() {
        job.finished_unix_ms = event.received_unix_ms;
    }
    *job != before
}

/// What a cancel request did to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// The job had already ended, in this state; nothing changed.
    AlreadyFinished(JobState),
    /// Recorded: targets not dispatched yet are cancelled (they never run); `tell` are the
    /// hosts whose part runs (or was sent) and must be sent `Cancel`.
    Requested { tell: Vec<String> },
}

/// Records a cancel of `job` by `by` at `now_ms` (controller clock). Pure. A second request
/// keeps the first one's author and time, and tells the hosts again.
pub fn request_cancel(job: &mut JobRecord, by: &str, now_ms: i64) -> Cancelled {
    let state = job.state();
    if state.is_finished() {
        return Cancelled::AlreadyFinished(state);
    }
    if job.cancel.is_none() {
        job.cancel = Some(CancelRequest {
            by: by.to_string(),
            at_unix_ms: now_ms,
        });
    }
    let who = job
        .cancel
        .as_ref()
        .map(|c| c.by.clone())
        .unwrap_or_default();
    let mut tell = Vec::new();
    for t in &mut job.targets {
        if t.state.is_finished() {
            continue;
        }
        if t.dispatched {
            tell.push(t.host.clone());
        } else {
            t.state = TargetState::Cancelled;
            t.message = format!("cancelled by {who} before its turn");
        }
    }
    if job.finished_unix_ms == 0 && job.state().is_finished() {
        job.finished_unix_ms = now_ms;
    }
    Cancelled::Requested { tell }
}

/// Hosts whose target became dispatched between `before` and `after`: their command is due.
pub fn newly_dispatched(before: &JobRecord, after: &JobRecord) -> Vec<String> {
    after
        .targets
        .iter()
        .filter(|t| {
            !before
                .targets
                .iter()
                .any(|b| b.host == t.host && b.dispatched)
        })
        .filter(|t| t.dispatched && t.state == TargetState::Queued)
        .map(|t| t.host.clone())
        .collect()
}

/// Whether some target changed state (the moments `drover watch` is sent the job again).
pub fn targets_changed(before: &JobRecord, after: &JobRecord) -> bool {
    before.targets.len() != after.targets.len()
        || before
            .targets
            .iter()
            .zip(&after.targets)
            .any(|(b, a)| b.state != a.state)
}

/// The job's events in the order they happened: target by target (they run one after
/// another), each host's events by sequence number.
pub fn replay_order(job: &JobRecord, mut events: Vec<EventRecord>) -> Vec<EventRecord> {
    let rank = |host: &str| {
        job.targets
            .iter()
            .position(|t| t.host == host)
            .unwrap_or(usize::MAX)
    };
    events.sort_by_key(|e| (rank(&e.host), e.seq));
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn job(hosts: &[&str]) -> JobRecord {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        JobRecord::new(
            "deploy-1".into(),
            1_000,
            JobCommand::Deploy {
                app: "api".into(),
                version: "v1.0.0".into(),
                spec_toml: String::new(),
                spec_revision: 1,
                skip_backup: false,
                wait_lock: false,
                requested_by: "alice".into(),
                backup_target_toml: String::new(),
                skip_migration: false,
                keep_previous: false,
            },
            &hosts,
        )
    }

    fn ev(host: &str, seq: u64, kind: &str, message: &str, fields: &[(&str, &str)]) -> EventRecord {
        EventRecord {
            host: host.into(),
            seq,
            job_id: "deploy-1".into(),
            at_unix_ms: 10_000 + seq as i64,
            kind: kind.into(),
            message: message.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            received_unix_ms: 20_000 + seq as i64,
            payload: None,
        }
    }

    fn finished(host: &str, seq: u64, result: &str) -> EventRecord {
        ev(
            host,
            seq,
            jobevent::FINISHED,
            "done",
            &[(field::RESULT, result)],
        )
    }

    fn states(job: &JobRecord) -> Vec<(&str, bool)> {
        job.targets
            .iter()
            .map(|t| (t.state.as_str(), t.dispatched))
            .collect()
    }

    #[test]
    fn a_cancel_stops_the_running_host_and_the_rest_never_run() {
        let mut j = job(&["a", "b", "c"]);
        assert!(apply_event(&mut j, &ev("a", 1, jobevent::STARTED, "", &[])));
        assert_eq!(
            request_cancel(&mut j, "bob", 5_000),
            Cancelled::Requested {
                tell: vec!["a".into()]
            }
        );
        assert_eq!(
            states(&j),
            [
                ("running", true),
                ("cancelled", false),
                ("cancelled", false)
            ]
        );
        assert_eq!(
            j.state(),
            JobState::Running,
            "a still runs until its agent says so"
        );
        assert!(j.cancel_due_on("a") && !j.cancel_due_on("b"));
        // A second request tells the host again and keeps the first author.
        assert_eq!(
            request_cancel(&mut j, "carol", 6_000),
            Cancelled::Requested {
                tell: vec!["a".into()]
            }
        );
        assert_eq!(j.cancel.as_ref().unwrap().by, "bob");
        // The agent reports the cancel: the job ends cancelled, nothing else is dispatched.
        assert!(apply_event(&mut j, &finished("a", 2, "cancelled")));
        assert_eq!(j.state(), JobState::Cancelled);
        assert!(!j.cancel_due_on("a"));
        assert_eq!(j.finished_unix_ms, 20_002);
        assert_eq!(
            request_cancel(&mut j, "bob", 7_000),
            Cancelled::AlreadyFinished(JobState::Cancelled)
        );
    }

    #[test]
    fn a_cancel_after_the_last_safe_point_leaves_a_success_and_the_job_cancelled() {
        // a succeeds anyway (the cancel came after its watch window); b never ran.
        let mut j = job(&["a", "b"]);
        request_cancel(&mut j, "bob", 5_000);
        assert!(
            !j.awaits_start_on("a"),
            "a cancelled job's command is not sent again"
        );
        assert!(j.cancel_due_on("a"));
        apply_event(&mut j, &finished("a", 1, "succeeded"));
        assert_eq!(states(&j), [("succeeded", true), ("cancelled", false)]);
        assert_eq!(j.state(), JobState::Cancelled);
        // A failure is worse than a cancel; an older controller's jobs decode without one.
        let mut j = job(&["a", "b"]);
        request_cancel(&mut j, "bob", 5_000);
        apply_event(&mut j, &finished("a", 1, "failed"));
        assert_eq!(j.state(), JobState::Failed);
        let mut value = serde_json::to_value(job(&["a"])).unwrap();
        value.as_object_mut().unwrap().remove("cancel");
        let old: JobRecord = serde_json::from_value(value).unwrap();
        assert_eq!(old.cancel, None);
    }

    #[test]
    fn a_new_job_dispatches_only_its_first_target() {
        let j = job(&["a", "b"]);
        assert_eq!(states(&j), vec![("queued", true), ("queued", false)]);
        assert_eq!(j.state(), JobState::Queued);
        assert!(j.awaits_start_on("a") && !j.awaits_start_on("b"));
    }

    #[test]
    fn the_event_table() {
        // (kind, fields, message) applied to a fresh running target -> (state, step, message)
        let mut j = job(&["a"]);
        assert!(apply_event(
            &mut j,
            &ev("a", 1, jobevent::STARTED, "took it", &[])
        ));
        let t = &j.targets[0];
        assert_eq!((t.state, t.started_unix_ms), (TargetState::Running, 10_001));
        assert_eq!(j.state(), JobState::Running);
        assert!(!j.awaits_start_on("a"), "started: no more resends");

        apply_event(
            &mut j,
            &ev(
                "a",
                2,
                jobevent::STEP,
                "",
                &[(field::STEP, "image"), (field::STATUS, status::STARTED)],
            ),
        );
        assert_eq!(j.targets[0].step, "image");
        apply_event(
            &mut j,
            &ev(
                "a",
                3,
                jobevent::PROGRESS,
                "pulled 3 layers",
                &[(field::STEP, "image")],
            ),
        );
        assert_eq!(j.targets[0].message, "pulled 3 layers");
        apply_event(
            &mut j,
            &ev(
                "a",
                4,
                jobevent::STEP,
                "",
                &[(field::STEP, "health"), (field::STATUS, status::STARTED)],
            ),
        );
        assert_eq!(
            (j.targets[0].step.as_str(), j.targets[0].message.as_str()),
            ("health", ""),
            "a new step clears the last step's progress line"
        );
        // Releases and unknown kinds change nothing.
        assert!(!apply_event(
            &mut j,
            &ev("a", 5, jobevent::RELEASES, "", &[])
        ));
        assert!(!apply_event(&mut j, &ev("a", 6, "job.mystery", "", &[])));
        // Another host's event is not this job's business.
        assert!(!apply_event(
            &mut j,
            &ev("zz", 7, jobevent::STARTED, "", &[])
        ));

        let failed = ev(
            "a",
            8,
            jobevent::FINISHED,
            "deploy failed",
            &[
                (field::RESULT, "failed"),
                (field::STEP, "health"),
                (field::ERROR, "GET /healthz answered 500 five times"),
                (field::LOGS, "panic: no database"),
                (field::CODE, ""),
            ],
        );
        assert!(apply_event(&mut j, &failed));
        let t = &j.targets[0];
        assert_eq!(t.state, TargetState::Failed);
        assert_eq!(t.step, "health");
        assert_eq!(t.message, "GET /healthz answered 500 five times");
        assert_eq!(t.logs, "panic: no database");
        assert_eq!(t.finished_unix_ms, 10_008);
        assert_eq!(j.state(), JobState::Failed);
        assert_eq!(j.finished_unix_ms, 20_008, "controller clock");
        // A finished target does not move again.
        assert!(!apply_event(&mut j, &finished("a", 9, "succeeded")));
        assert_eq!(j.state(), JobState::Failed);
    }

    #[test]
    fn results_map_to_target_states_and_codes_are_kept() {
        for (result, state, job_state) in [
            ("succeeded", TargetState::Succeeded, JobState::Succeeded),
            ("failed", TargetState::Failed, JobState::Failed),
            ("rolled_back", TargetState::RolledBack, JobState::RolledBack),
            (
                "interrupted",
                TargetState::Interrupted,
                JobState::Interrupted,
            ),
            ("exploded", TargetState::Failed, JobState::Failed),
        ] {
            let mut j = job(&["a"]);
            apply_event(&mut j, &finished("a", 1, result));
            assert_eq!(j.targets[0].state, state, "{result}");
            assert_eq!(j.state(), job_state, "{result}");
        }
        let mut j = job(&["a"]);
        apply_event(
            &mut j,
            &ev(
                "a",
                1,
                jobevent::FINISHED,
                "",
                &[
                    (field::RESULT, "failed"),
                    (field::STEP, "lock"),
                    (field::CODE, jobevent::CODE_LOCKED),
                    (field::ERROR, "held by deploy-x since 14:00"),
                ],
            ),
        );
        assert_eq!(j.targets[0].code, "locked");
        assert_eq!(j.targets[0].started_unix_ms, 10_001, "a finish starts it");
        let mut j = job(&["a"]);
        apply_event(&mut j, &finished("a", 1, "exploded"));
        assert!(j.targets[0].message.contains("unknown result"));
    }

    #[test]
    fn targets_run_in_turn_and_a_failure_skips_the_rest() {
        let mut j = job(&["a", "b", "c"]);
        let before = j.clone();
        apply_event(&mut j, &ev("a", 1, jobevent::STARTED, "", &[]));
        assert!(newly_dispatched(&before, &j).is_empty());
        assert!(targets_changed(&before, &j));
        let before = j.clone();
        apply_event(&mut j, &finished("a", 2, "succeeded"));
        assert_eq!(newly_dispatched(&before, &j), vec!["b"]);
        assert_eq!(
            states(&j),
            vec![("succeeded", true), ("queued", true), ("queued", false)]
        );
        assert_eq!(j.state(), JobState::Running);
        assert!(j.awaits_start_on("b"));
        apply_event(&mut j, &ev("b", 1, jobevent::STARTED, "", &[]));
        let before = j.clone();
        apply_event(&mut j, &finished("b", 2, "rolled_back"));
        assert!(newly_dispatched(&before, &j).is_empty());
        assert_eq!(
            states(&j),
            vec![
                ("succeeded", true),
                ("rolled_back", true),
                ("skipped", false)
            ]
        );
        assert_eq!(j.state(), JobState::RolledBack);
        assert_eq!(j.failed_target().unwrap().host, "b");
        // A skipped target ignores whatever arrives for it.
        assert!(!apply_event(
            &mut j,
            &ev("c", 1, jobevent::STARTED, "", &[])
        ));
    }

    #[test]
    fn the_worst_ending_wins() {
        let mut j = job(&["a", "b"]);
        j.targets[0].state = TargetState::Succeeded;
        j.targets[1].state = TargetState::Running;
        assert_eq!(j.state(), JobState::Running);
        j.targets[1].state = TargetState::Succeeded;
        assert_eq!(j.state(), JobState::Succeeded);
        j.targets[0].state = TargetState::RolledBack;
        j.targets[1].state = TargetState::Failed;
        assert_eq!(j.state(), JobState::Failed);
        j.targets[0].state = TargetState::Interrupted;
        assert_eq!(j.state(), JobState::Interrupted);
        j.targets[0].state = TargetState::Skipped;
        j.targets[1].state = TargetState::Skipped;
        assert_eq!(j.state(), JobState::Failed);
    }

    #[test]
    fn replay_follows_the_target_order() {
        let j = job(&["web-2", "web-1"]);
        let events = vec![
            ev("web-1", 7, jobevent::STARTED, "", &[]),
            ev("web-2", 4, jobevent::FINISHED, "", &[]),
            ev("web-2", 3, jobevent::STARTED, "", &[]),
        ];
        let order: Vec<(String, u64)> = replay_order(&j, events)
            .into_iter()
            .map(|e| (e.host, e.seq))
            .collect();
        assert_eq!(
            order,
            vec![
                ("web-2".into(), 3),
                ("web-2".into(), 4),
                ("web-1".into(), 7)
            ]
        );
    }

    #[test]
    fn ids_sort_by_time_and_read_as_utc() {
        // 2026-11-23T14:22:33Z
        let id = job_id(JobKind::Deploy, 1_795_443_753_000, 0x3f2a);
        assert_eq!(id, "deploy-20261123-142233-3f2a");
        assert_eq!(
            job_id(JobKind::Rollback, 1_795_443_753_000, 1),
            "rollback-20261123-142233-0001"
        );
    }
}
