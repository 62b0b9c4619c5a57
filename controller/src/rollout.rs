//! Which of a job's targets run next: a pure function of the targets' states and the job's
//! rollout policy. Today every job rolls out one host after another (`Rollout::SEQUENTIAL`)
//! and a target that does not succeed skips the ones not started yet; waves, parallelism and
//! failure budgets (fleet releases) are further policies of the same function.

use crate::jobs::{Target, TargetState};

/// How a job's targets proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// At most this many targets dispatched and not finished at once (at least 1).
    pub max_parallel: usize,
}

impl Rollout {
    /// One host after another, in the job's order.
    pub const SEQUENTIAL: Rollout = Rollout { max_parallel: 1 };
}

/// What to do to the targets now, by index into the job's targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Next {
    /// Targets whose command is due now (their turn came).
    pub dispatch: Vec<usize>,
    /// Targets that will never run, because an earlier one did not succeed.
    pub skip: Vec<usize>,
}

/// The next moves of a rollout. A target not yet dispatched is dispatched when fewer than
/// `max_parallel` are in flight (dispatched, not finished), in order; once any target ended
/// other than succeeded (or was skipped or cancelled before), every target not yet dispatched
/// is skipped instead. Targets already dispatched are never skipped: their host has the
/// command and reports how it ends.
pub fn next(rollout: Rollout, targets: &[Target]) -> Next {
    let failed = targets.iter().any(|t| {
        t.state.is_finished()
            && t.state != TargetState::Succeeded
            && t.state != TargetState::Skipped
    });
    let waiting = targets
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.dispatched && t.state == TargetState::Queued)
        .map(|(i, _)| i);
    if failed {
        return Next {
            dispatch: Vec::new(),
            skip: waiting.collect(),
        };
    }
    let in_flight = targets
        .iter()
        .filter(|t| t.dispatched && !t.state.is_finished())
        .count();
    let room = rollout.max_parallel.max(1).saturating_sub(in_flight);
    Next {
        dispatch: waiting.take(room).collect(),
        skip: Vec::new(),
    }
}

/// Applies `next` to the targets: dispatched ones are marked so, skipped ones `skipped`.
pub fn apply(targets: &mut [Target], next: &Next) {
    for &i in &next.dispatch {
        targets[i].dispatched = true;
    }
    for &i in &next.skip {
        targets[i].state = TargetState::Skipped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, state: TargetState, dispatched: bool) -> Target {
        Target {
            host: host.into(),
            state,
            dispatched,
            step: String::new(),
            message: String::new(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            logs: String::new(),
            code: String::new(),
        }
    }

    use TargetState::*;

    #[test]
    fn one_host_after_another_and_a_failure_skips_the_rest() {
        let seq = Rollout::SEQUENTIAL;
        // (each target's state and whether it was dispatched, to dispatch, to skip)
        type Case<'a> = (&'a [(TargetState, bool)], &'a [usize], &'a [usize]);
        let cases: &[Case] = &[
            // A new job: the first target.
            (
                &[(Queued, false), (Queued, false), (Queued, false)],
                &[0],
                &[],
            ),
            // The first runs: nothing more.
            (
                &[(Running, true), (Queued, false), (Queued, false)],
                &[],
                &[],
            ),
            // Sent, not started yet: still in flight.
            (&[(Queued, true), (Queued, false)], &[], &[]),
            // The first succeeded: the second.
            (
                &[(Succeeded, true), (Queued, false), (Queued, false)],
                &[1],
                &[],
            ),
            // The second failed: the third is skipped.
            (
                &[(Succeeded, true), (Failed, true), (Queued, false)],
                &[],
                &[2],
            ),
            (
                &[(RolledBack, true), (Queued, false), (Queued, false)],
                &[],
                &[1, 2],
            ),
            (&[(Interrupted, true), (Queued, false)], &[], &[1]),
            // Cancelled before their turn: nothing left to do.
            (&[(Cancelled, true), (Cancelled, false)], &[], &[]),
            // All done.
            (&[(Succeeded, true), (Succeeded, true)], &[], &[]),
            // Skipped targets do not count as failures of their own (idempotent).
            (&[(Failed, true), (Skipped, false)], &[], &[]),
        ];
        for (states, dispatch, skip) in cases {
            let targets: Vec<Target> = states
                .iter()
                .enumerate()
                .map(|(i, (s, d))| target(&format!("h{i}"), *s, *d))
                .collect();
            assert_eq!(
                next(seq, &targets),
                Next {
                    dispatch: dispatch.to_vec(),
                    skip: skip.to_vec()
                },
                "{states:?}"
            );
        }
    }

    #[test]
    fn parallel_rollouts_fill_their_room_and_never_skip_a_dispatched_target() {
        let two = Rollout { max_parallel: 2 };
        let t = |s, d| target("h", s, d);
        let targets = [t(Queued, false), t(Queued, false), t(Queued, false)];
        assert_eq!(next(two, &targets).dispatch, [0, 1]);
        let targets = [t(Succeeded, true), t(Running, true), t(Queued, false)];
        assert_eq!(next(two, &targets).dispatch, [2]);
        // A failure while another is in flight: the in-flight one finishes, the rest skip.
        let targets = [t(Failed, true), t(Running, true), t(Queued, false)];
        assert_eq!(
            next(two, &targets),
            Next {
                dispatch: vec![],
                skip: vec![2]
            }
        );
        // max_parallel 0 is read as 1.
        let targets = [t(Queued, false), t(Queued, false)];
        assert_eq!(next(Rollout { max_parallel: 0 }, &targets).dispatch, [0]);
    }
}
