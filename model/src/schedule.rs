//! The pure scheduling rules: cron expressions with a time zone, the next fire times, jitter,
//! and whether a schedule is due now. No I/O, no clock: every time is passed in (Unix ms).
//!
//! The rules (see ARCHITECTURE.md, "Scheduler"):
//! - A schedule is never due while paused, nor while its last run is still running (no
//!   overlapping runs of one schedule).
//! - However many fire times passed since its last run (controller downtime, a long run), a
//!   schedule is due for exactly one run, which records how many fire times it covers.
//! - Jitter adds a fixed offset in `[0, jitter)`, derived from the schedule's id, to every fire
//!   time, so one schedule always fires at the same minute and many schedules spread out.
//! - Daylight saving time follows croner: a wall-clock time skipped by a spring-forward change
//!   fires at the first valid time after the gap (02:30 → 03:00 in Europe/Berlin), and a time
//!   that occurs twice in a fall-back change fires once, at its first occurrence.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use sha2::{Digest, Sha256};

/// How many missed fire times a catch-up run counts at most (the count is a report, and a
/// `* * * * *` schedule after a year down would otherwise walk half a million times).
pub const MAX_COUNTED_MISSES: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "bad cron expression {expr:?}: {reason} (5 fields: minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\")"
    )]
    Cron { expr: String, reason: String },
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Berlin or UTC")]
    Zone(String),
    #[error("jitter must be below one day, got {0}s")]
    Jitter(u64),
}

/// When a schedule fires.
#[derive(Debug, Clone)]
pub enum When {
    /// Every time the cron expression matches, in `tz`.
    Cron {
        expr: String,
        cron: Box<Cron>,
        tz: Tz,
    },
    /// Once, at this time.
    Once { at_unix_ms: i64 },
}

/// A schedule as the rules see it.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub id: String,
    pub when: When,
    pub jitter: Duration,
    pub paused: bool,
    /// Fire times at or before this are not due (a new schedule does not catch up on the past).
    pub created_unix_ms: i64,
}

/// A run that is due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueRun {
    /// The latest fire time it stands for (jitter included).
    pub scheduled_unix_ms: i64,
    /// How many fire times it stands for: 1 normally, more after downtime or a long run
    /// (at most [`MAX_COUNTED_MISSES`]).
    pub covers: u64,
}

/// Parses a 5-field cron expression (minute hour day-of-month month day-of-week). Names
/// (`MON`, `JAN`), ranges, steps, lists and `L` (last day of the month) are accepted.
pub fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    let error = |reason: String| ScheduleError::Cron {
        expr: expr.to_string(),
        reason,
    };
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(error(format!("it has {fields} fields, not 5")));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| error(e.to_string()))
}

/// Parses an IANA time zone name; empty means UTC.
pub fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| ScheduleError::Zone(name.to_string()))
}

impl Schedule {
    /// A recurring schedule. `tz` empty means UTC.
    pub fn cron(
        id: &str,
        expr: &str,
        tz: &str,
        jitter: Duration,
        paused: bool,
        created_unix_ms: i64,
    ) -> Result<Schedule, ScheduleError> {
        if jitter >= Duration::from_secs(24 * 3600) {
            return Err(ScheduleError::Jitter(jitter.as_secs()));
        }
        Ok(Schedule {
            id: id.to_string(),
            when: When::Cron {
                expr: expr.to_string(),
                cron: Box::new(parse_cron(expr)?),
                tz: parse_tz(tz)?,
            },
            jitter,
            paused,
            created_unix_ms,
        })
    }

    /// A one-off schedule (no jitter).
    pub fn once(id: &str, at_unix_ms: i64, paused: bool, created_unix_ms: i64) -> Schedule {
        Schedule {
            id: id.to_string(),
            when: When::Once { at_unix_ms },
            jitter: Duration::ZERO,
            paused,
            created_unix_ms,
        }
    }

    /// This schedule's fixed jitter offset in ms.
    pub fn offset_ms(&self) -> i64 {
        jitter_offset_ms(&self.id, self.jitter)
    }
}

/// A deterministic offset in `[0, jitter)` from the schedule id: the first 8 bytes of its
/// SHA-256 (stable across builds and Rust versions, unlike `DefaultHasher`).
pub fn jitter_offset_ms(id: &str, jitter: Duration) -> i64 {
    let span = jitter.as_millis() as u64;
    if span == 0 {
        return 0;
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // Whole seconds, so shown times stay readable.
    let secs = span.div_ceil(1000).max(1);
    ((u64::from_be_bytes(first) % secs) * 1000).min(span.saturating_sub(1)) as i64
}

/// A Unix ms time as UTC, cut to the whole second: croner works in seconds and would carry
/// the milliseconds of its start into what it finds.
fn to_utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms.div_euclid(1000) * 1000)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The next cron match strictly after `after_ms` (no jitter), in Unix ms.
fn next_match(cron: &Cron, tz: Tz, after_ms: i64) -> Option<i64> {
    let start = to_utc(after_ms).with_timezone(&tz);
    cron.find_next_occurrence(&start, false)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The latest cron match at or before `at_ms` (no jitter), in Unix ms.
fn previous_match(cron: &Cron, tz: Tz, at_ms: i64) -> Option<i64> {
    let start = to_utc(at_ms).with_timezone(&tz);
    cron.find_previous_occurrence(&start, true)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The next `n` fire times strictly after `after_ms`, jitter included (paused or not: the
/// caller shows them as they would be).
pub fn next_runs(schedule: &Schedule, after_ms: i64, n: usize) -> Vec<i64> {
    match &schedule.when {
        When::Once { at_unix_ms } => {
            if *at_unix_ms > after_ms && n > 0 {
                vec![*at_unix_ms]
            } else {
                Vec::new()
            }
        }
        When::Cron { cron, tz, .. } => {
            let offset = schedule.offset_ms();
            let mut out = Vec::with_capacity(n);
            let mut cursor = after_ms - offset;
            while out.len() < n {
                let Some(next) = next_match(cron, *tz, cursor) else {
                    break;
                };
                out.push(next + offset);
                cursor = next;
            }
            out
        }
    }
}

/// Is a run of `schedule` due at `now_ms`? `last_run_started_ms` is when its last run was
/// fired (None: never); `running` says whether that run is still unfinished.
pub fn due(
    schedule: &Schedule,
    last_run_started_ms: Option<i64>,
    now_ms: i64,
    running: bool,
) -> Option<DueRun> {
    if schedule.paused || running {
        return None;
    }
    match &schedule.when {
        When::Once { at_unix_ms } => (last_run_started_ms.is_none() && now_ms >= *at_unix_ms)
            .then_some(DueRun {
                scheduled_unix_ms: *at_unix_ms,
                covers: 1,
            }),
        When::Cron { cron, tz, .. } => {
            let since = last_run_started_ms
                .unwrap_or(schedule.created_unix_ms)
                .max(schedule.created_unix_ms);
            let offset = schedule.offset_ms();
            let latest = previous_match(cron, *tz, now_ms - offset)? + offset;
            if latest <= since {
                return None;
            }
            // Count the fire times in (since, latest], up to the cap.
            let mut covers = 0;
            let mut cursor = since - offset;
            while covers < MAX_COUNTED_MISSES {
                match next_match(cron, *tz, cursor) {
                    Some(t) if t + offset <= latest => {
                        covers += 1;
                        cursor = t;
                    }
                    _ => break,
                }
            }
            Some(DueRun {
                scheduled_unix_ms: latest,
                covers: covers.max(1),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    const DAY: i64 = 24 * HOUR;

    /// Unix ms of a UTC time written as RFC 3339.
    fn t(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    fn show(ms: i64) -> String {
        to_utc(ms).to_rfc3339()
    }

    fn cron(expr: &str, tz: &str, created: &str) -> Schedule {
        Schedule::cron("s", expr, tz, Duration::ZERO, false, t(created)).unwrap()
    }

    #[test]
    fn next_runs_table() {
        let table: &[(&str, &str, &str, &[&str])] = &[
            // The 31st: months without one are skipped.
            (
                "0 3 31 * *",
                "",
                "2025-01-31T04:00:00Z",
                &[
                    "2025-03-31T03:00:00+00:00",
                    "2025-05-31T03:00:00+00:00",
                    "2025-07-31T03:00:00+00:00",
                ],
            ),
            // L: the last day of every month, February included.
            (
                "0 0 L * *",
                "",
                "2025-01-15T00:00:00Z",
                &[
                    "2025-01-31T00:00:00+00:00",
                    "2025-02-28T00:00:00+00:00",
                    "2025-03-31T00:00:00+00:00",
                ],
            ),
            (
                "0 0 L 2 *",
                "",
                "2027-03-01T00:00:00Z",
                &[
                    "2028-02-29T00:00:00+00:00",
                    "2029-02-28T00:00:00+00:00",
                    "2030-02-28T00:00:00+00:00",
                ],
            ),
            // Feb 29: leap years only.
            (
                "30 12 29 2 *",
                "",
                "2025-01-01T00:00:00Z",
                &[
                    "2028-02-29T12:30:00+00:00",
                    "2032-02-29T12:30:00+00:00",
                    "2036-02-29T12:30:00+00:00",
                ],
            ),
            // The defaults: nightly 02:00 and Sundays 06:00, UTC.
            (
                "0 2 * * *",
                "",
                "2025-06-01T02:00:00Z",
                &[
                    "2025-06-02T02:00:00+00:00",
                    "2025-06-03T02:00:00+00:00",
                    "2025-06-04T02:00:00+00:00",
                ],
            ),
            (
                "0 6 * * 0",
                "",
                "2025-06-01T05:00:00Z",
                &[
                    "2025-06-01T06:00:00+00:00",
                    "2025-06-08T06:00:00+00:00",
                    "2025-06-15T06:00:00+00:00",
                ],
            ),
            // A zone: 02:00 Berlin is 00:00 UTC in summer, 01:00 UTC in winter.
            (
                "0 2 * * *",
                "Europe/Berlin",
                "2025-10-25T12:00:00Z",
                &[
                    // 02:00 happens twice on the fall-back day: the first (CEST) counts.
                    "2025-10-26T00:00:00+00:00",
                    "2025-10-27T01:00:00+00:00",
                    "2025-10-28T01:00:00+00:00",
                ],
            ),
            // Spring forward in Berlin (2025-03-30, 02:00 → 03:00): 02:30 does not exist that
            // day, and the run happens once, at 03:00 CEST (01:00 UTC).
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2025-03-29T12:00:00Z",
                &[
                    "2025-03-30T01:00:00+00:00",
                    "2025-03-31T00:30:00+00:00",
                    "2025-04-01T00:30:00+00:00",
                ],
            ),
            // Fall back in Berlin (2025-10-26, 03:00 → 02:00): 02:30 happens twice that day, and
            // the run happens once, at the first (02:30 CEST, 00:30 UTC).
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2025-10-25T12:00:00Z",
                &[
                    "2025-10-26T00:30:00+00:00",
                    "2025-10-27T01:30:00+00:00",
                    "2025-10-28T01:30:00+00:00",
                ],
            ),
        ];
        for (expr, tz, after, want) in table {
            let s = cron(expr, tz, "2000-01-01T00:00:00Z");
            let got: Vec<String> = next_runs(&s, t(after), 3).into_iter().map(show).collect();
            assert_eq!(&got, want, "{expr} in {tz:?} after {after}");
        }
    }

    #[test]
    fn parse_errors_name_the_expression() {
        let table = [
            ("0 2 * *", "4 fields"),
            ("0 0 2 * * *", "6 fields"),
            ("61 2 * * *", "61 2 * * *"),
            ("0 2 * * FUNDAY", "FUNDAY"),
        ];
        for (expr, want) in table {
            let err = parse_cron(expr).unwrap_err().to_string();
            assert!(err.contains(expr), "{err}");
            assert!(err.contains(want), "{expr}: {err}");
        }
        assert_eq!(
            parse_tz("Mars/Olympus").unwrap_err(),
            ScheduleError::Zone("Mars/Olympus".into())
        );
        assert_eq!(parse_tz("").unwrap(), Tz::UTC);
        assert!(
            Schedule::cron("s", "0 2 * * *", "", Duration::from_secs(86400), false, 0).is_err()
        );
    }

    #[test]
    fn due_table() {
        let nightly = cron("0 2 * * *", "", "2025-06-01T00:00:00Z");
        let mut paused = nightly.clone();
        paused.paused = true;
        let at = t("2025-06-01T12:00:00Z");
        let once = Schedule::once("d", at, false, t("2025-06-01T00:00:00Z"));
        let two = t("2025-06-02T02:00:00Z");
        struct Case<'a> {
            name: &'a str,
            schedule: &'a Schedule,
            last: Option<i64>,
            now: i64,
            running: bool,
            want: Option<DueRun>,
        }
        let due_at = |at: i64, covers: u64| {
            Some(DueRun {
                scheduled_unix_ms: at,
                covers,
            })
        };
        let cases = [
            Case {
                name: "before the first fire time",
                schedule: &nightly,
                last: None,
                now: t("2025-06-01T01:59:59Z"),
                running: false,
                want: None,
            },
            Case {
                name: "at the fire time",
                schedule: &nightly,
                last: None,
                now: t("2025-06-01T02:00:00Z"),
                running: false,
                want: due_at(t("2025-06-01T02:00:00Z"), 1),
            },
            Case {
                name: "a second later (the next tick)",
                schedule: &nightly,
                last: None,
                now: t("2025-06-01T02:00:01Z"),
                running: false,
                want: due_at(t("2025-06-01T02:00:00Z"), 1),
            },
            Case {
                name: "already fired for this time",
                schedule: &nightly,
                last: Some(t("2025-06-01T02:00:01Z")),
                now: t("2025-06-01T09:00:00Z"),
                running: false,
                want: None,
            },
            Case {
                name: "no overlap: the last run is still running",
                schedule: &nightly,
                last: Some(t("2025-06-01T02:00:01Z")),
                now: two + HOUR,
                running: true,
                want: None,
            },
            Case {
                name: "the run finished late: one catch-up for the missed time",
                schedule: &nightly,
                last: Some(t("2025-06-01T02:00:01Z")),
                now: two + HOUR,
                running: false,
                want: due_at(two, 1),
            },
            Case {
                name: "3 days down: one run covering 3 fire times",
                schedule: &nightly,
                last: Some(t("2025-06-01T02:00:01Z")),
                now: t("2025-06-04T09:00:00Z"),
                running: false,
                want: due_at(t("2025-06-04T02:00:00Z"), 3),
            },
            Case {
                name: "paused",
                schedule: &paused,
                last: None,
                now: t("2025-06-04T09:00:00Z"),
                running: false,
                want: None,
            },
            Case {
                name: "a new schedule does not catch up on the past",
                schedule: &cron("0 2 * * *", "", "2025-06-01T03:00:00Z"),
                last: None,
                now: t("2025-06-01T09:00:00Z"),
                running: false,
                want: None,
            },
            Case {
                name: "one-off before its time",
                schedule: &once,
                last: None,
                now: at - 1,
                running: false,
                want: None,
            },
            Case {
                name: "one-off at its time",
                schedule: &once,
                last: None,
                now: at,
                running: false,
                want: due_at(at, 1),
            },
            Case {
                name: "one-off late (controller was down)",
                schedule: &once,
                last: None,
                now: at + 3 * DAY,
                running: false,
                want: due_at(at, 1),
            },
            Case {
                name: "one-off fired already",
                schedule: &once,
                last: Some(at + 10),
                now: at + DAY,
                running: false,
                want: None,
            },
        ];
        for case in cases {
            assert_eq!(
                due(case.schedule, case.last, case.now, case.running),
                case.want,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn catch_up_after_downtime_is_one_run_counting_the_misses() {
        let every_minute = cron("* * * * *", "", "2025-06-01T00:00:00Z");
        let last = t("2025-06-01T00:00:00Z");
        let run = due(&every_minute, Some(last), last + 3 * DAY, false).unwrap();
        assert_eq!(run.covers, 3 * 24 * 60);
        assert_eq!(run.scheduled_unix_ms, last + 3 * DAY);
        // The next tick, after recording that run: nothing.
        assert_eq!(
            due(
                &every_minute,
                Some(last + 3 * DAY),
                last + 3 * DAY + 999,
                false
            ),
            None
        );
        // A year down: still one run; the count stops at the cap.
        let run = due(&every_minute, Some(last), last + 365 * DAY, false).unwrap();
        assert_eq!(run.covers, MAX_COUNTED_MISSES);
    }

    #[test]
    fn dst_days_run_once() {
        // Over the spring-forward and fall-back days in Berlin, a 02:30 schedule ticked every
        // minute fires exactly once per day.
        for day in ["2025-03-30", "2025-10-26"] {
            let start = t(&format!("{day}T00:00:00+01:00")) - 2 * HOUR;
            let s = cron("30 2 * * *", "Europe/Berlin", "2025-01-01T00:00:00Z");
            let mut last = Some(start);
            let mut fired = Vec::new();
            let mut now = start;
            while now < start + 24 * HOUR {
                if let Some(run) = due(&s, last, now, false) {
                    assert_eq!(run.covers, 1, "{day}");
                    fired.push(show(now));
                    last = Some(now);
                }
                now += MIN;
            }
            assert_eq!(fired.len(), 1, "{day}: {fired:?}");
        }
    }

    #[test]
    fn jitter_is_bounded_and_stable() {
        let jitter = Duration::from_secs(15 * 60);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let id = format!("target-{i}-backup");
            let offset = jitter_offset_ms(&id, jitter);
            assert!(
                (0..jitter.as_millis() as i64).contains(&offset),
                "{id}: {offset}"
            );
            assert_eq!(offset, jitter_offset_ms(&id, jitter), "stable");
            assert_eq!(offset % 1000, 0, "whole seconds");
            seen.insert(offset);
        }
        assert!(
            seen.len() > 100,
            "spread out: {} distinct offsets",
            seen.len()
        );
        assert_eq!(jitter_offset_ms("x", Duration::ZERO), 0);

        // Every fire time moves by the same offset, and `due` agrees with `next_runs`.
        let s = Schedule::cron("shop-db-backup", "0 2 * * *", "", jitter, false, 0).unwrap();
        let offset = s.offset_ms();
        let runs = next_runs(&s, t("2025-06-01T00:00:00Z"), 3);
        assert_eq!(runs[0], t("2025-06-01T02:00:00Z") + offset);
        assert_eq!(runs[1] - runs[0], DAY);
        let last = Some(t("2025-05-31T12:00:00Z"));
        assert_eq!(due(&s, last, runs[0] - 1, false), None);
        assert_eq!(
            due(&s, last, runs[0], false),
            Some(DueRun {
                scheduled_unix_ms: runs[0],
                covers: 1
            })
        );
    }
}
