//! The alert rules, pure: given what the controller knows (hosts, backup targets, recent
//! jobs) and `now`, which alert conditions hold; and given the alerts already open, which to
//! open, re-send and resolve. No I/O and no clock: `alerting.rs` feeds them and acts.
//!
//! Staleness is computed here from stored facts, not from failure events, so a dead scheduler
//! or a silent agent still raises an alert: nothing has to report failing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hoststate::HostState;
use crate::jobs::{JobKind, JobState};

/// The backup SLA of a target without `[verify] max_age`.
pub const DEFAULT_BACKUP_SLA: Duration = Duration::from_secs(2 * 24 * 3600);
/// How long a target may go without a passed validation.
pub const VALIDATION_SLA: Duration = Duration::from_secs(8 * 24 * 3600);
/// An agent certificate with less left than this raises `cert_expiring` (agent certificates
/// live 24 h and renew at 40 %, so a healthy agent never gets near it).
pub const CERT_WARNING: Duration = Duration::from_secs(6 * 3600);
/// How often an open alert is sent again by default.
pub const DEFAULT_RESEND: Duration = Duration::from_secs(4 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    BackupStale,
    ValidationStale,
    HostDown,
    CertExpiring,
    JobFailed,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::BackupStale => "backup_stale",
            AlertKind::ValidationStale => "validation_stale",
            AlertKind::HostDown => "host_down",
            AlertKind::CertExpiring => "cert_expiring",
            AlertKind::JobFailed => "job_failed",
        }
    }
}

/// A host as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub name: String,
    pub state: HostState,
    /// When its certificate expires; 0 when unknown.
    pub cert_not_after_unix_ms: i64,
}

/// A backup target as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetFacts {
    pub name: String,
    /// When it was first applied: staleness counts from here while nothing exists.
    pub applied_unix_ms: i64,
    /// Its backup SLA (`[verify] max_age`, else [`DEFAULT_BACKUP_SLA`]).
    pub max_age: Duration,
    /// The newest successful backup that still has a copy, over every host's catalog.
    pub newest_backup_unix_ms: Option<i64>,
    /// The newest passed validation.
    pub newest_passed_validation_unix_ms: Option<i64>,
}

/// A job as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFacts {
    pub id: String,
    pub kind: JobKind,
    /// The app (deploy, rollback) or backup target (backup, verify).
    pub subject: String,
    pub state: JobState,
    pub finished_unix_ms: i64,
    /// The host whose part decided the ending (the first that did not succeed); empty when
    /// unknown.
    pub host: String,
}

/// The job id of a `job_failed` alert, from its key (`job_failed:<job id>`).
pub fn failed_job_id(key: &str) -> Option<&str> {
    key.strip_prefix("job_failed:").filter(|id| !id.is_empty())
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub hosts: Vec<HostFacts>,
    pub targets: Vec<TargetFacts>,
    /// Recent jobs, any order.
    pub jobs: Vec<JobFacts>,
}

/// One alert condition that holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub kind: AlertKind,
    pub subject: String,
    pub message: String,
}

/// An alert as stored (tree `alerts`, by key). Open while `resolved_unix_ms` is 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub key: String,
    pub kind: String,
    pub subject: String,
    pub message: String,
    pub opened_unix_ms: i64,
    /// When a notification last went out for it; 0 when none did yet (sending failed).
    pub last_sent_unix_ms: i64,
    pub resolved_unix_ms: i64,
    /// How many times it was sent as open.
    pub sends: u64,
    /// When its resolution went out; 0 while open or not yet delivered.
    #[serde(default)]
    pub resolve_sent_unix_ms: i64,
    /// The channels (`webhook:<name>`, `email`) still owed the current round's message: the
    /// open notification (or its re-send) while open, the resolution once resolved. Empty
    /// when no round is under way.
    #[serde(default)]
    pub pending: Vec<String>,
}

impl AlertRecord {
    pub fn is_open(&self) -> bool {
        self.resolved_unix_ms == 0
    }

    /// Marks it resolved at `now_ms`: whatever open round was under way is dropped, and the
    /// resolution round starts at the next delivery.
    pub fn resolve(&mut self, now_ms: i64) {
        self.resolved_unix_ms = now_ms;
        self.pending.clear();
    }
}

/// Which message a delivery round carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// The alert is open: first notification or a re-send.
    Open,
    /// The alert resolved.
    Resolution,
}

/// What an alert owes at one tick: the round's message and the channels to try now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub round: Round,
    /// In configured order. Empty when no configured channel is owed it any more: the round
    /// is then complete without a send.
    pub channels: Vec<String>,
}

/// Which channels `alert` must be sent to now, given the `configured` channel ids.
/// `due`: `reconcile` opened it or found its re-send due.
///
/// A round under way (`pending` not empty) goes on with the pending channels that are still
/// configured, whatever `due` says, so a channel that already took the message never gets
/// it twice. Otherwise a round starts, with every configured channel: for an open alert when
/// `due`, for a resolved one while its resolution has not gone out.
pub fn delivery(alert: &AlertRecord, due: bool, configured: &[String]) -> Option<Delivery> {
    let round = if alert.is_open() {
        Round::Open
    } else {
        Round::Resolution
    };
    let channels: Vec<String> = if !alert.pending.is_empty() {
        configured
            .iter()
            .filter(|c| alert.pending.contains(c))
            .cloned()
            .collect()
    } else {
        let starts = match round {
            Round::Open => due,
            Round::Resolution => alert.resolve_sent_unix_ms == 0,
        };
        if !starts {
            return None;
        }
        configured.to_vec()
    };
    Some(Delivery { round, channels })
}

/// Records that `channel` took the round's message: it is owed nothing more.
pub fn mark_delivered(alert: &mut AlertRecord, channel: &str) {
    alert.pending.retain(|c| c != channel);
}

/// Completes `round` when no channel is owed its message any more (open: `last_sent_unix_ms`
/// and `sends`; resolution: `resolve_sent_unix_ms`). True when it did.
pub fn complete_round(alert: &mut AlertRecord, round: Round, now_ms: i64) -> bool {
    if !alert.pending.is_empty() {
        return false;
    }
    match round {
        Round::Open => {
            alert.last_sent_unix_ms = now_ms;
            alert.sends += 1;
        }
        Round::Resolution => alert.resolve_sent_unix_ms = now_ms,
    }
    true
}

/// The first wait before a channel that failed is tried again; it doubles with each failure
/// in a row, up to [`RETRY_MAX`].
pub const RETRY_BASE: Duration = Duration::from_secs(30);
/// The longest wait between tries of a channel that keeps failing.
pub const RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// A channel's failures in a row and when it may be tried again (kept in memory: a restarted
/// controller tries every channel at once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelHealth {
    pub failures: u32,
    pub next_try_unix_ms: i64,
}

/// Whether a channel with `health` may be tried at `now_ms`.
pub fn channel_ready(health: Option<&ChannelHealth>, now_ms: i64) -> bool {
    health.is_none_or(|h| now_ms >= h.next_try_unix_ms)
}

/// `health` after one more failure at `now_ms`: the wait doubles from [`RETRY_BASE`] to at
/// most [`RETRY_MAX`]. Until then the channel is skipped, for every alert (a dead or hung
/// receiver costs one timeout per wait, not one per alert and tick).
pub fn after_failure(health: Option<ChannelHealth>, now_ms: i64) -> ChannelHealth {
    let failures = health.map_or(0, |h| h.failures).saturating_add(1);
    let wait = RETRY_BASE
        .saturating_mul(1u32 << (failures - 1).min(16))
        .min(RETRY_MAX);
    ChannelHealth {
        failures,
        next_try_unix_ms: now_ms.saturating_add(ms(wait)),
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn age_text(ms: i64) -> String {
    humantime::format_duration(Duration::from_secs((ms.max(0) / 1000) as u64)).to_string()
}

/// The conditions that hold at `now_ms`, sorted by key, one per key.
pub fn conditions(snapshot: &Snapshot, now_ms: i64) -> Vec<Condition> {
    let mut out: BTreeMap<String, Condition> = BTreeMap::new();
    // Keyed by kind and `id` (the subject, or a failed job's id), de-duplicated.
    let mut add_keyed = |kind: AlertKind, id: &str, subject: &str, message: String| {
        let key = format!("{}:{id}", kind.as_str());
        out.entry(key.clone()).or_insert(Condition {
            key,
            kind,
            subject: subject.to_string(),
            message,
        });
    };
    let mut add = |kind: AlertKind, subject: &str, message: String| {
        add_keyed(kind, subject, subject, message)
    };
    for host in &snapshot.hosts {
        if host.state == HostState::Down {
            add(
                AlertKind::HostDown,
                &host.name,
                format!("host {} is down (no heartbeat)", host.name),
            );
        }
        if host.state != HostState::Revoked
            && host.cert_not_after_unix_ms > 0
            && host.cert_not_after_unix_ms - now_ms < ms(CERT_WARNING)
        {
            let left = host.cert_not_after_unix_ms - now_ms;
            let message = if left <= 0 {
                format!("the certificate of host {} has expired", host.name)
            } else {
                format!(
                    "the certificate of host {} expires in {}",
                    host.name,
                    age_text(left)
                )
            };
            add(AlertKind::CertExpiring, &host.name, message);
        }
    }
    for t in &snapshot.targets {
        let since = t.newest_backup_unix_ms.unwrap_or(t.applied_unix_ms);
        if now_ms - since > ms(t.max_age) {
            let message = match t.newest_backup_unix_ms {
                Some(at) => format!(
                    "backup target {}: newest backup is {} old (SLA {})",
                    t.name,
                    age_text(now_ms - at),
                    humantime::format_duration(t.max_age)
                ),
                None => format!(
                    "backup target {}: no backup in the {} since it was applied (SLA {})",
                    t.name,
                    age_text(now_ms - t.applied_unix_ms),
                    humantime::format_duration(t.max_age)
                ),
            };
            add(AlertKind::BackupStale, &t.name, message);
        }
        let since = t
            .newest_passed_validation_unix_ms
            .unwrap_or(t.applied_unix_ms);
        if now_ms - since > ms(VALIDATION_SLA) {
            let message = match t.newest_passed_validation_unix_ms {
                Some(at) => format!(
                    "backup target {}: last passed validation {} ago",
                    t.name,
                    age_text(now_ms - at)
                ),
                None => format!(
                    "backup target {}: never passed a validation in the {} since it was applied",
                    t.name,
                    age_text(now_ms - t.applied_unix_ms)
                ),
            };
            add(AlertKind::ValidationStale, &t.name, message);
        }
    }
    // A failed job stays a condition until a later job of the same kind and subject succeeds.
    let mut newest_success: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for j in &snapshot.jobs {
        if j.state == JobState::Succeeded {
            let e = newest_success
                .entry((j.kind.as_str(), j.subject.as_str()))
                .or_insert(i64::MIN);
            *e = (*e).max(j.finished_unix_ms);
        }
    }
    // A removed target's failures are retired with it.
    let targets: BTreeSet<&str> = snapshot.targets.iter().map(|t| t.name.as_str()).collect();
    for j in &snapshot.jobs {
        if matches!(j.kind, JobKind::Backup | JobKind::Verify)
            && !targets.contains(j.subject.as_str())
        {
            continue;
        }
        let what = match (j.kind, j.state) {
            (JobKind::Deploy, JobState::Failed) => "deploy failed",
            (JobKind::Deploy, JobState::RolledBack) => "deploy rolled back",
            (JobKind::Backup, JobState::Failed) => "backup failed",
            (JobKind::Verify, JobState::Failed) => "validation failed",
            _ => continue,
        };
        let cleared = newest_success
            .get(&(j.kind.as_str(), j.subject.as_str()))
            .is_some_and(|&at| at > j.finished_unix_ms);
        if !cleared {
            // Keyed by the job (each failure is its own alert), named by what failed where.
            let on = if j.host.is_empty() {
                String::new()
            } else {
                format!(" on {}", j.host)
            };
            add_keyed(
                AlertKind::JobFailed,
                &j.id,
                &j.subject,
                format!("{what}: {}{on} (job {})", j.subject, j.id),
            );
        }
    }
    out.into_values().collect()
}

/// What to do with alerts at one tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// New conditions without an open alert.
    pub to_open: Vec<Condition>,
    /// Keys of open alerts whose condition holds and whose last completed round is
    /// `resend_every` old (or that never completed one).
    pub to_resend: Vec<String>,
    /// Keys of open alerts whose condition cleared.
    pub to_resolve: Vec<String>,
}

/// Compares the open alerts with the conditions: de-duplicated by key.
pub fn reconcile(
    open_before: &[AlertRecord],
    conditions: &[Condition],
    now_ms: i64,
    resend_every: Duration,
) -> Changes {
    let open: BTreeMap<&str, &AlertRecord> = open_before
        .iter()
        .filter(|a| a.is_open())
        .map(|a| (a.key.as_str(), a))
        .collect();
    let holding: BTreeSet<&str> = conditions.iter().map(|c| c.key.as_str()).collect();
    let mut changes = Changes::default();
    let mut seen = BTreeSet::new();
    for c in conditions {
        if !seen.insert(c.key.as_str()) {
            continue;
        }
        match open.get(c.key.as_str()) {
            None => changes.to_open.push(c.clone()),
            Some(a) => {
                let due = a.last_sent_unix_ms == 0
                    || (!resend_every.is_zero()
                        && now_ms - a.last_sent_unix_ms >= ms(resend_every));
                if due {
                    changes.to_resend.push(c.key.clone());
                }
            }
        }
    }
    for key in open.keys() {
        if !holding.contains(key) {
            changes.to_resolve.push(key.to_string());
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600 * 1000;
    const DAY: i64 = 24 * H;

    fn host(name: &str, state: HostState, cert: i64) -> HostFacts {
        HostFacts {
            name: name.into(),
            state,
            cert_not_after_unix_ms: cert,
        }
    }

    fn target(name: &str, applied: i64, backup: Option<i64>, valid: Option<i64>) -> TargetFacts {
        TargetFacts {
            name: name.into(),
            applied_unix_ms: applied,
            max_age: DEFAULT_BACKUP_SLA,
            newest_backup_unix_ms: backup,
            newest_passed_validation_unix_ms: valid,
        }
    }

    fn job(id: &str, kind: JobKind, subject: &str, state: JobState, at: i64) -> JobFacts {
        JobFacts {
            id: id.into(),
            kind,
            subject: subject.into(),
            state,
            finished_unix_ms: at,
            host: "web-1".into(),
        }
    }

    fn keys(snapshot: &Snapshot, now: i64) -> Vec<String> {
        conditions(snapshot, now)
            .into_iter()
            .map(|c| c.key)
            .collect()
    }

    #[test]
    fn conditions_table() {
        let now = 100 * DAY;
        let far = now + DAY;
        let cases: Vec<(&str, Snapshot, Vec<&str>)> = vec![
            ("nothing", Snapshot::default(), vec![]),
            (
                "healthy fleet",
                Snapshot {
                    hosts: vec![host("web-1", HostState::Connected, far)],
                    targets: vec![target("db", 0, Some(now - H), Some(now - DAY))],
                    jobs: vec![job("j1", JobKind::Backup, "db", JobState::Succeeded, now)],
                },
                vec![],
            ),
            (
                "suspect is not down",
                Snapshot {
                    hosts: vec![host("web-1", HostState::Suspect, far)],
                    ..Snapshot::default()
                },
                vec![],
            ),
            (
                "down host and expiring certificate",
                Snapshot {
                    hosts: vec![host("web-1", HostState::Down, now + 5 * H)],
                    ..Snapshot::default()
                },
                vec!["cert_expiring:web-1", "host_down:web-1"],
            ),
            (
                "6 h left is fine",
                Snapshot {
                    hosts: vec![host("web-1", HostState::Connected, now + 6 * H)],
                    ..Snapshot::default()
                },
                vec![],
            ),
            (
                "revoked hosts raise nothing",
                Snapshot {
                    hosts: vec![host("web-1", HostState::Revoked, now - H)],
                    ..Snapshot::default()
                },
                vec![],
            ),
            (
                "backup just inside the SLA",
                Snapshot {
                    targets: vec![target("db", 0, Some(now - 2 * DAY), Some(now))],
                    ..Snapshot::default()
                },
                vec![],
            ),
            (
                "backup just outside the SLA",
                Snapshot {
                    targets: vec![target("db", 0, Some(now - 2 * DAY - 1), Some(now))],
                    ..Snapshot::default()
                },
                vec!["backup_stale:db"],
            ),
            (
                "no backup yet, applied recently",
                Snapshot {
                    targets: vec![target("db", now - DAY, None, None)],
                    ..Snapshot::default()
                },
                vec![],
            ),
            (
                "no backup ever, applied 3 days ago",
                Snapshot {
                    targets: vec![target("db", now - 3 * DAY, None, Some(now))],
                    ..Snapshot::default()
                },
                vec!["backup_stale:db"],
            ),
            (
                "no validation for 9 days",
                Snapshot {
                    targets: vec![target("db", 0, Some(now), Some(now - 9 * DAY))],
                    ..Snapshot::default()
                },
                vec!["validation_stale:db"],
            ),
            (
                "a longer max_age",
                Snapshot {
                    targets: vec![TargetFacts {
                        max_age: Duration::from_secs(7 * 24 * 3600),
                        ..target("db", 0, Some(now - 3 * DAY), Some(now))
                    }],
                    ..Snapshot::default()
                },
                vec![],
            ),
            (
                "failed jobs of each kind",
                Snapshot {
                    jobs: vec![
                        job("d1", JobKind::Deploy, "api", JobState::Failed, now),
                        job("d2", JobKind::Deploy, "web", JobState::RolledBack, now),
                        job("b1", JobKind::Backup, "db", JobState::Failed, now),
                        job("v1", JobKind::Verify, "db", JobState::Failed, now),
                        job("r1", JobKind::Restore, "db", JobState::Failed, now),
                        job("i1", JobKind::Backup, "db", JobState::Interrupted, now),
                        job("x1", JobKind::Deploy, "api", JobState::Running, 0),
                    ],
                    targets: vec![target("db", now - H, Some(now), Some(now))],
                    ..Snapshot::default()
                },
                vec![
                    "job_failed:b1",
                    "job_failed:d1",
                    "job_failed:d2",
                    "job_failed:v1",
                ],
            ),
            (
                "a later success of the same kind and subject clears a failure",
                Snapshot {
                    jobs: vec![
                        job("b1", JobKind::Backup, "db", JobState::Failed, now - H),
                        job("b2", JobKind::Backup, "db", JobState::Succeeded, now),
                        job("b3", JobKind::Backup, "other", JobState::Failed, now - H),
                        job("v1", JobKind::Verify, "other", JobState::Failed, now - H),
                        job(
                            "v0",
                            JobKind::Verify,
                            "other",
                            JobState::Succeeded,
                            now - DAY,
                        ),
                    ],
                    targets: vec![
                        target("db", now - H, Some(now), Some(now)),
                        target("other", now - H, Some(now), Some(now)),
                    ],
                    ..Snapshot::default()
                },
                vec!["job_failed:b3", "job_failed:v1"],
            ),
            (
                "a removed target's failed backups and validations are retired with it",
                Snapshot {
                    jobs: vec![
                        job("b1", JobKind::Backup, "gone", JobState::Failed, now),
                        job("v1", JobKind::Verify, "gone", JobState::Failed, now),
                        job("d1", JobKind::Deploy, "api", JobState::Failed, now),
                    ],
                    ..Snapshot::default()
                },
                vec!["job_failed:d1"],
            ),
            (
                "an agent that went silent: no job ever failed, yet the backup goes stale and \
                 the host goes down",
                Snapshot {
                    hosts: vec![host("db-1", HostState::Down, now + 20 * H)],
                    targets: vec![target("db", 0, Some(now - 3 * DAY), Some(now - 3 * DAY))],
                    jobs: vec![job(
                        "b1",
                        JobKind::Backup,
                        "db",
                        JobState::Succeeded,
                        now - 3 * DAY,
                    )],
                },
                vec!["backup_stale:db", "host_down:db-1"],
            ),
        ];
        for (name, snapshot, want) in cases {
            assert_eq!(keys(&snapshot, now), want, "{name}");
        }
    }

    #[test]
    fn a_failed_job_alert_names_the_target_and_the_host() {
        let now = 100 * DAY;
        let snapshot = Snapshot {
            jobs: vec![
                job(
                    "backup-1",
                    JobKind::Backup,
                    "shop-db",
                    JobState::Failed,
                    now,
                ),
                JobFacts {
                    host: String::new(),
                    ..job(
                        "deploy-1",
                        JobKind::Deploy,
                        "api",
                        JobState::RolledBack,
                        now,
                    )
                },
            ],
            targets: vec![target("shop-db", now - H, Some(now), Some(now))],
            ..Snapshot::default()
        };
        let found = conditions(&snapshot, now);
        let backup = found
            .iter()
            .find(|c| c.key == "job_failed:backup-1")
            .unwrap();
        assert_eq!(backup.subject, "shop-db");
        assert_eq!(
            backup.message,
            "backup failed: shop-db on web-1 (job backup-1)"
        );
        let deploy = found
            .iter()
            .find(|c| c.key == "job_failed:deploy-1")
            .unwrap();
        assert_eq!(deploy.subject, "api");
        assert_eq!(deploy.message, "deploy rolled back: api (job deploy-1)");
        assert_eq!(failed_job_id(&backup.key), Some("backup-1"));
        assert_eq!(failed_job_id("host_down:web-1"), None);
    }

    fn rec(key: &str, sent: i64, resolved: i64) -> AlertRecord {
        AlertRecord {
            key: key.into(),
            opened_unix_ms: 1,
            last_sent_unix_ms: sent,
            resolved_unix_ms: resolved,
            sends: 1,
            ..AlertRecord::default()
        }
    }

    fn cond(key: &str) -> Condition {
        Condition {
            key: key.into(),
            kind: AlertKind::HostDown,
            subject: "x".into(),
            message: "m".into(),
        }
    }

    #[test]
    fn reconcile_table() {
        let now = 10 * DAY;
        let every = DEFAULT_RESEND;
        let cases: Vec<(&str, Vec<AlertRecord>, Vec<Condition>, Changes)> = vec![
            ("nothing", vec![], vec![], Changes::default()),
            (
                "a new condition opens once, duplicates folded",
                vec![],
                vec![cond("a"), cond("a")],
                Changes {
                    to_open: vec![cond("a")],
                    ..Changes::default()
                },
            ),
            (
                "open and recently sent: nothing",
                vec![rec("a", now - H, 0)],
                vec![cond("a")],
                Changes::default(),
            ),
            (
                "open and sent 4 h ago: re-send",
                vec![rec("a", now - 4 * H, 0)],
                vec![cond("a")],
                Changes {
                    to_resend: vec!["a".into()],
                    ..Changes::default()
                },
            ),
            (
                "open but never sent (delivery failed): send again",
                vec![rec("a", 0, 0)],
                vec![cond("a")],
                Changes {
                    to_resend: vec!["a".into()],
                    ..Changes::default()
                },
            ),
            (
                "condition cleared: resolve",
                vec![rec("a", now - H, 0)],
                vec![],
                Changes {
                    to_resolve: vec!["a".into()],
                    ..Changes::default()
                },
            ),
            (
                "a resolved alert whose condition comes back opens again",
                vec![rec("a", now - H, now - 1)],
                vec![cond("a")],
                Changes {
                    to_open: vec![cond("a")],
                    ..Changes::default()
                },
            ),
        ];
        for (name, open, conds, want) in cases {
            assert_eq!(reconcile(&open, &conds, now, every), want, "{name}");
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn delivery_table() {
        let all = ids(&["webhook:a", "webhook:b", "email"]);
        let open = |pending: &[&str]| AlertRecord {
            pending: ids(pending),
            ..rec("k", 0, 0)
        };
        let resolved = |pending: &[&str], sent: i64| AlertRecord {
            pending: ids(pending),
            resolve_sent_unix_ms: sent,
            ..rec("k", 5, 7)
        };
        let some = |round, channels: &[&str]| {
            Some(Delivery {
                round,
                channels: ids(channels),
            })
        };
        // (name, alert, due, configured channels, what to deliver)
        type Case = (
            &'static str,
            AlertRecord,
            bool,
            Vec<String>,
            Option<Delivery>,
        );
        let cases: Vec<Case> = vec![
            (
                "opened or re-send due: every channel",
                open(&[]),
                true,
                all.clone(),
                some(Round::Open, &["webhook:a", "webhook:b", "email"]),
            ),
            (
                "open, not due, nothing pending",
                open(&[]),
                false,
                all.clone(),
                None,
            ),
            (
                "a round under way: only the pending channels, due or not",
                open(&["webhook:b"]),
                false,
                all.clone(),
                some(Round::Open, &["webhook:b"]),
            ),
            (
                "a re-send falling due while a round is under way does not restart it",
                open(&["email"]),
                true,
                all.clone(),
                some(Round::Open, &["email"]),
            ),
            (
                "pending channels no longer configured are dropped, in configured order",
                open(&["email", "webhook:gone", "webhook:a"]),
                false,
                all.clone(),
                some(Round::Open, &["webhook:a", "email"]),
            ),
            (
                "only removed channels pending: the round completes without a send",
                open(&["webhook:gone"]),
                false,
                all.clone(),
                some(Round::Open, &[]),
            ),
            (
                "no channel at all: the round completes at once",
                open(&[]),
                true,
                vec![],
                some(Round::Open, &[]),
            ),
            (
                "resolved, resolution not sent: every channel",
                resolved(&[], 0),
                false,
                all.clone(),
                some(Round::Resolution, &["webhook:a", "webhook:b", "email"]),
            ),
            (
                "resolution under way: the pending ones",
                resolved(&["webhook:a"], 0),
                false,
                all.clone(),
                some(Round::Resolution, &["webhook:a"]),
            ),
            (
                "resolution delivered: nothing",
                resolved(&[], 9),
                true,
                all.clone(),
                None,
            ),
        ];
        for (name, alert, due, configured, want) in cases {
            assert_eq!(delivery(&alert, due, &configured), want, "{name}");
        }
    }

    #[test]
    fn rounds_complete_when_no_channel_is_owed() {
        let now = 10 * DAY;
        // First round: one of two channels fails.
        let mut a = rec("k", 0, 0);
        a.sends = 0;
        let d = delivery(&a, true, &ids(&["webhook:a", "webhook:b"])).unwrap();
        a.pending = d.channels.clone();
        mark_delivered(&mut a, "webhook:a");
        assert!(!complete_round(&mut a, d.round, now));
        assert_eq!(
            (a.pending.clone(), a.last_sent_unix_ms, a.sends),
            (ids(&["webhook:b"]), 0, 0)
        );
        // Next tick: only the failed one is tried, and the round completes.
        let d = delivery(&a, true, &ids(&["webhook:a", "webhook:b"])).unwrap();
        assert_eq!(d.channels, ids(&["webhook:b"]));
        mark_delivered(&mut a, "webhook:b");
        assert!(complete_round(&mut a, d.round, now + 1));
        assert_eq!((a.last_sent_unix_ms, a.sends), (now + 1, 1));
        assert_eq!(delivery(&a, false, &ids(&["webhook:a", "webhook:b"])), None);
        // Resolving drops an open round under way and owes every channel the resolution.
        a.pending = ids(&["webhook:b"]);
        a.resolve(now + 2);
        let d = delivery(&a, false, &ids(&["webhook:a", "webhook:b"])).unwrap();
        assert_eq!(d.round, Round::Resolution);
        assert_eq!(d.channels, ids(&["webhook:a", "webhook:b"]));
        a.pending = d.channels;
        mark_delivered(&mut a, "webhook:a");
        mark_delivered(&mut a, "webhook:b");
        assert!(complete_round(&mut a, Round::Resolution, now + 3));
        assert_eq!((a.resolve_sent_unix_ms, a.sends), (now + 3, 1));
    }

    #[test]
    fn records_without_pending_still_load() {
        let old = r#"{"key":"k","kind":"host_down","subject":"x","message":"m",
            "opened_unix_ms":1,"last_sent_unix_ms":0,"resolved_unix_ms":0,"sends":0}"#;
        let a: AlertRecord = serde_json::from_str(old).unwrap();
        assert!(a.pending.is_empty());
        // Never delivered before the upgrade: reconcile finds it due, every channel gets it.
        assert_eq!(
            delivery(&a, true, &ids(&["email"])).unwrap().channels,
            ids(&["email"])
        );
    }

    #[test]
    fn a_failing_channel_waits_longer_each_time_up_to_fifteen_minutes() {
        assert!(channel_ready(None, 0));
        let mut health = None;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let h = after_failure(health, 1_000);
            assert!(!channel_ready(Some(&h), 1_000));
            assert!(channel_ready(Some(&h), h.next_try_unix_ms));
            waits.push((h.next_try_unix_ms - 1_000) / 1000);
            health = Some(h);
        }
        assert_eq!(waits, [30, 60, 120, 240, 480, 900, 900, 900]);
        let many = ChannelHealth {
            failures: u32::MAX,
            next_try_unix_ms: 0,
        };
        assert_eq!(after_failure(Some(many), 0).next_try_unix_ms, 900_000);
    }
}
