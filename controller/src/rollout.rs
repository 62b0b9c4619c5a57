//! Which of a job's targets run next: a pure function of where each target stands and the
//! job's rollout policy. Today every job rolls out one host after another
//! (`Rollout::SEQUENTIAL`) and a target that does not succeed skips the ones not started yet;
//! waves, parallelism and failure budgets (fleet releases) are further policies of the same
//! function. It knows nothing of jobs: `jobs.rs` says where each target stands and applies
//! the answer.

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

/// Where one target stands, for the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not dispatched yet: its turn has not come.
    Waiting,
    /// Dispatched (its host has or is being sent the command) and not finished.
    InFlight,
    /// Succeeded, or skipped (which is no failure of its own).
    Done,
    /// Ended any other way: failed, rolled back, interrupted, cancelled.
    Failed,
}

/// What to do to the targets now, by index into the job's targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Next {
    /// Targets whose command is due now (their turn came).
    pub dispatch: Vec<usize>,
    /// Targets that will never run, because an earlier one did not succeed.
    pub skip: Vec<usize>,
}

/// The next moves of a rollout. Waiting targets are dispatched, in order, while fewer than
/// `max_parallel` are in flight; once any target failed, every waiting target is skipped
/// instead. Targets in flight are never skipped: their host has the command and reports how
/// it ends.
pub fn next(rollout: Rollout, targets: &[Standing]) -> Next {
    let waiting = targets
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == Standing::Waiting)
        .map(|(i, _)| i);
    if targets.contains(&Standing::Failed) {
        return Next {
            dispatch: Vec::new(),
            skip: waiting.collect(),
        };
    }
    let in_flight = targets.iter().filter(|s| **s == Standing::InFlight).count();
    let room = rollout.max_parallel.max(1).saturating_sub(in_flight);
    Next {
        dispatch: waiting.take(room).collect(),
        skip: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Standing::*;

    #[test]
    fn one_host_after_another_and_a_failure_skips_the_rest() {
        let seq = Rollout::SEQUENTIAL;
        // (where each target stands, to dispatch, to skip)
        type Case<'a> = (&'a [Standing], &'a [usize], &'a [usize]);
        let cases: &[Case] = &[
            // A new job: the first target.
            (&[Waiting, Waiting, Waiting], &[0], &[]),
            // The first runs (or was sent): nothing more.
            (&[InFlight, Waiting, Waiting], &[], &[]),
            // The first succeeded: the second.
            (&[Done, Waiting, Waiting], &[1], &[]),
            // The second failed: the third is skipped.
            (&[Done, Failed, Waiting], &[], &[2]),
            (&[Failed, Waiting, Waiting], &[], &[1, 2]),
            // All ended: nothing to do.
            (&[Failed, Failed], &[], &[]),
            (&[Done, Done], &[], &[]),
            (&[], &[], &[]),
        ];
        for (targets, dispatch, skip) in cases {
            assert_eq!(
                next(seq, targets),
                Next {
                    dispatch: dispatch.to_vec(),
                    skip: skip.to_vec()
                },
                "{targets:?}"
            );
        }
    }

    #[test]
    fn parallel_rollouts_fill_their_room_and_never_skip_a_target_in_flight() {
        let two = Rollout { max_parallel: 2 };
        assert_eq!(next(two, &[Waiting, Waiting, Waiting]).dispatch, [0, 1]);
        assert_eq!(next(two, &[Done, InFlight, Waiting]).dispatch, [2]);
        // A failure while another is in flight: the in-flight one finishes, the rest skip.
        assert_eq!(
            next(two, &[Failed, InFlight, Waiting]),
            Next {
                dispatch: vec![],
                skip: vec![2]
            }
        );
        // max_parallel 0 is read as 1.
        assert_eq!(
            next(Rollout { max_parallel: 0 }, &[Waiting, Waiting]).dispatch,
            [0]
        );
    }
}
