//! The release engine, pure: a release as stored, one input (a host's deploy ended, its health
//! or connection changed, an operator paused or aborted, or time passed) and the time, give the
//! release's next state and what to do now (deploy to a host, roll one back, cancel a deploy,
//! tell the alert channels). It does no I/O: the driver stores the new state, flushes, and only
//! then acts, so a controller that restarts resumes from the stored state and sends nothing
//! twice (each action names a job id derived from the release, which an agent ignores when it
//! already knows it).
//!
//! The rules:
//! - A release made with [`pull_first`] first asks every connected host to pull the image
//!   (all at once); the first wave starts when every pull ended well. A host that cannot pull
//!   halts the release before any host changed; a pull still running at `progress_deadline`
//!   does too. A host not connected then pulls at its own deploy.
//! - Waves run in order. Within the running wave, hosts start deploying while fewer than
//!   `max_parallel` are deploying; a host that is not connected waits, up to `host_timeout`,
//!   then is `offline` (a failure, or skipped with `skip_offline`).
//! - A host whose deploy succeeded (the agent's post-deploy watch window included) then has to
//!   stay healthy for `min_healthy`; it fails if its health turns bad, and its clock restarts
//!   if its agent disconnects. The next wave starts only once every host of this one passed or
//!   ended within the failure budget. A wave not done within `progress_deadline` fails.
//! - The first host of the first wave runs the spec's migration; no other host does. If that
//!   host fails, the release halts whatever the budget: the others' version needs it.
//! - When failures exceed the budget, or a wave misses its deadline, the release halts: no new
//!   host starts. With `on_failure = revert` (or `abort --revert`) deploys in flight are
//!   cancelled and every host already updated rolls back to what it ran before, all at once.

use serde::{Deserialize, Serialize};

pub use drover_model::waves::{Budget, OnFailure};

/// How a release proceeds; checked when the release is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Hosts deploying at once within a wave (at least 1).
    pub max_parallel: u32,
    pub min_healthy_ms: i64,
    pub progress_deadline_ms: i64,
    pub host_timeout_ms: i64,
    pub on_failure: OnFailure,
    pub max_failures: Budget,
    /// An offline host is skipped instead of counted as a failure.
    pub skip_offline: bool,
    /// Each updated host keeps its previous web container running (not routed) until the
    /// release ends, so a revert is a switch; the release then retires it (`Action::Retire`).
    /// Absent in releases stored before it: false.
    #[serde(default)]
    pub keep_previous: bool,
}

/// Where one host of a release stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum HostPhase {
    /// Its wave has not started.
    Pending,
    /// Its wave started while it was not connected (since then).
    WaitingOnline {
        since_ms: i64,
    },
    /// Its turn came but the wave has no room yet (`max_parallel`).
    Queued,
    /// Its deploy job was sent.
    Deploying {
        job_id: String,
        started_ms: i64,
    },
    /// Deployed; healthy since `healthy_since_ms` (none while it is not seen healthy).
    Settling {
        deployed_ms: i64,
        healthy_since_ms: Option<i64>,
    },
    /// Deployed and stayed healthy for `min_healthy`.
    Passed {
        at_ms: i64,
    },
    Failed {
        why: String,
    },
    /// Deployed, then its health turned bad before `min_healthy`: a failure that runs the new
    /// version (a revert takes it back).
    Unhealthy {
        why: String,
    },
    /// Not connected for `host_timeout` when its turn came.
    Offline {
        at_ms: i64,
    },
    /// Never deployed: the release halted first, or it was offline with `skip_offline`.
    Skipped {
        why: String,
    },
    /// Being rolled back to `before` (a revert).
    Reverting {
        job_id: String,
    },
    Reverted,
    /// The revert did not end well; the host runs whatever it runs (see its jobs).
    RevertFailed {
        why: String,
    },
}

impl HostPhase {
    pub fn as_str(&self) -> &'static str {
        match self {
            HostPhase::Pending => "pending",
            HostPhase::WaitingOnline { .. } => "waiting_online",
            HostPhase::Queued => "queued",
            HostPhase::Deploying { .. } => "deploying",
            HostPhase::Settling { .. } => "settling",
            HostPhase::Passed { .. } => "passed",
            HostPhase::Failed { .. } => "failed",
            HostPhase::Unhealthy { .. } => "unhealthy",
            HostPhase::Offline { .. } => "offline",
            HostPhase::Skipped { .. } => "skipped",
            HostPhase::Reverting { .. } => "reverting",
            HostPhase::Reverted => "reverted",
            HostPhase::RevertFailed { .. } => "revert_failed",
        }
    }

    /// Its deploy went through (it runs the new version unless reverted since).
    fn updated(&self) -> bool {
        matches!(
            self,
            HostPhase::Settling { .. } | HostPhase::Passed { .. } | HostPhase::Unhealthy { .. }
        )
    }

    /// Counts against the failure budget.
    fn failed(&self, skip_offline: bool) -> bool {
        match self {
            HostPhase::Failed { .. } | HostPhase::Unhealthy { .. } => true,
            HostPhase::Offline { .. } => !skip_offline,
            _ => false,
        }
    }

    /// Its part of the wave is over (passed, or ended without passing).
    fn settled(&self) -> bool {
        matches!(
            self,
            HostPhase::Passed { .. }
                | HostPhase::Failed { .. }
                | HostPhase::Unhealthy { .. }
                | HostPhase::Offline { .. }
                | HostPhase::Skipped { .. }
        )
    }
}

/// Where one host's image pull stands (the pull before the first wave).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Pull {
    /// Not asked: the release has no pull phase, or it has not begun.
    #[default]
    NotAsked,
    Pulling {
        job_id: String,
    },
    Pulled,
    Failed {
        why: String,
    },
    /// Not connected when the pulls were sent: it pulls at its own deploy.
    Skipped,
}

impl Pull {
    pub fn as_str(&self) -> &'static str {
        match self {
            Pull::NotAsked => "",
            Pull::Pulling { .. } => "pulling",
            Pull::Pulled => "pulled",
            Pull::Failed { .. } => "failed",
            Pull::Skipped => "skipped",
        }
    }
}

/// One host of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRelease {
    pub host: String,
    /// Index into the release's waves.
    pub wave: usize,
    pub phase: HostPhase,
    /// The version it ran when the release was created; a revert goes back to it. Empty when
    /// the app was not live there.
    pub before: String,
    /// Connected to the controller, as last seen.
    pub connected: bool,
    /// This host runs the spec's migration (the first host of the first wave).
    pub migrates: bool,
    /// Its image pull before the first wave.
    #[serde(default)]
    pub pull: Pull,
    /// The release asked it to stop the previous release it kept running (`keep_previous`).
    #[serde(default)]
    pub retired: bool,
}

/// Where a release stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Phase {
    /// Every connected host pulls the image; the first wave starts when all have it.
    Pulling { deadline_ms: i64 },
    /// Wave `wave` runs; it fails if not done by `deadline_ms`.
    Running { wave: usize, deadline_ms: i64 },
    /// Paused by an operator in wave `wave`, with `left_ms` of its deadline left.
    Paused { wave: usize, left_ms: i64 },
    /// Halted; updated hosts are being rolled back.
    Reverting { why: String },
    /// Every wave passed.
    Succeeded,
    /// Halted without revert: the updated hosts keep the new version.
    Halted { why: String },
    /// Halted and every updated host was rolled back (or its rollback failed: see the hosts).
    Reverted { why: String },
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Pulling { .. } => "pulling",
            Phase::Running { .. } => "running",
            Phase::Paused { .. } => "paused",
            Phase::Reverting { .. } => "reverting",
            Phase::Succeeded => "succeeded",
            Phase::Halted { .. } => "halted",
            Phase::Reverted { .. } => "reverted",
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Halted { .. } | Phase::Reverted { .. }
        )
    }
}

/// A release as the engine sees it (the driver keeps the rest: app, version, who asked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: String,
    pub version: String,
    pub waves: usize,
    pub policy: Policy,
    pub phase: Phase,
    pub hosts: Vec<HostRelease>,
    /// Whether the migration host's deploy succeeded (its migration ran).
    pub migration_ran: bool,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed: deadlines, timeouts and `min_healthy` are checked.
    Tick,
    Connected {
        host: String,
        up: bool,
    },
    /// The host's health as its agent reports it (checks and the app's containers).
    Health {
        host: String,
        healthy: bool,
    },
    /// A job the release sent ended on `host`.
    JobEnded {
        host: String,
        job_id: String,
        ok: bool,
        why: String,
    },
    Pause,
    Resume,
    Abort {
        revert: bool,
    },
}

/// What the driver does now, after storing the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make the image present on a host (before the first wave).
    Pull { host: String, job_id: String },
    Deploy {
        host: String,
        job_id: String,
        migrate: bool,
    },
    /// Stop the previous release a deploy kept running: the release ended, or halted, with
    /// this host on the new version.
    Retire { host: String, job_id: String },
    /// Cancel a deploy in flight (a revert does not wait for it).
    Cancel { host: String, job_id: String },
    Rollback {
        host: String,
        job_id: String,
        to_version: String,
    },
    /// A milestone for the alert channels.
    Tell(Milestone),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Milestone {
    Started,
    WavePassed { wave: usize },
    Halted { why: String },
    Reverted { why: String },
    Succeeded,
}

/// A release created at `now_ms` over `waves` (hosts per wave, in order): every host pending,
/// the first wave running. `before` gives each host's version before; `connected` whether it
/// is connected now. Call [`step`] with [`Input::Tick`] to get the first actions.
pub fn new_release(
    id: &str,
    version: &str,
    waves: &[Vec<String>],
    policy: Policy,
    before: impl Fn(&str) -> String,
    connected: impl Fn(&str) -> bool,
    now_ms: i64,
) -> Release {
    let mut hosts = Vec::new();
    for (w, wave) in waves.iter().enumerate() {
        for host in wave {
            hosts.push(HostRelease {
                host: host.clone(),
                wave: w,
                phase: HostPhase::Pending,
                before: before(host),
                connected: connected(host),
                migrates: hosts.is_empty(),
                pull: Pull::NotAsked,
                retired: false,
            });
        }
    }
    Release {
        id: id.to_string(),
        version: version.to_string(),
        waves: waves.len(),
        policy,
        phase: Phase::Running {
            wave: 0,
            deadline_ms: now_ms + policy.progress_deadline_ms,
        },
        hosts,
        migration_ran: false,
    }
}

/// The release, with every connected host pulling the image before its first wave starts
/// (within `progress_deadline` from `now_ms`).
pub fn pull_first(mut release: Release, now_ms: i64) -> Release {
    release.phase = Phase::Pulling {
        deadline_ms: now_ms + release.policy.progress_deadline_ms,
    };
    release
}

/// The job id of host `index`'s pull (`p`), deploy (`d`), rollback (`r`) or retire (`x`) in
/// release `id`.
pub fn job_id(id: &str, kind: char, index: usize) -> String {
    format!("{id}-{kind}{index}")
}

/// The release after `input` at `now_ms`, and what to do now.
pub fn step(release: &Release, input: &Input, now_ms: i64) -> (Release, Vec<Action>) {
    let mut r = release.clone();
    let mut actions = Vec::new();
    // A halted release still hears how its deploys in flight end (and may be reverted).
    if matches!(r.phase, Phase::Succeeded | Phase::Reverted { .. }) {
        return (r, actions);
    }
    let started = matches!(
        r.phase,
        Phase::Running { wave: 0, .. } | Phase::Pulling { .. }
    ) && r
        .hosts
        .iter()
        .all(|h| h.phase == HostPhase::Pending && h.pull == Pull::NotAsked);
    apply(&mut r, input, now_ms, &mut actions);
    if started && matches!(r.phase, Phase::Running { .. } | Phase::Pulling { .. }) {
        actions.insert(0, Action::Tell(Milestone::Started));
    }
    advance(&mut r, now_ms, &mut actions);
    (r, actions)
}

/// The input's direct effect on the release.
fn apply(r: &mut Release, input: &Input, now_ms: i64, actions: &mut Vec<Action>) {
    match input {
        Input::Tick => {}
        Input::Connected { host, up } => {
            if let Some(h) = r.hosts.iter_mut().find(|h| &h.host == host) {
                h.connected = *up;
                if let HostPhase::Settling {
                    healthy_since_ms, ..
                } = &mut h.phase
                    && !*up
                {
                    *healthy_since_ms = None;
                }
            }
        }
        Input::Health { host, healthy } => {
            if let Some(h) = r.hosts.iter_mut().find(|h| &h.host == host)
                && let HostPhase::Settling {
                    healthy_since_ms, ..
                } = &mut h.phase
            {
                if *healthy {
                    healthy_since_ms.get_or_insert(now_ms);
                } else {
                    h.phase = HostPhase::Unhealthy {
                        why: "unhealthy after its deploy, before min_healthy passed".into(),
                    };
                }
            }
        }
        Input::JobEnded {
            host,
            job_id,
            ok,
            why,
        } => job_ended(r, host, job_id, *ok, why, now_ms),
        Input::Pause => {
            if let Phase::Running { wave, deadline_ms } = r.phase {
                r.phase = Phase::Paused {
                    wave,
                    left_ms: (deadline_ms - now_ms).max(0),
                };
            }
        }
        Input::Resume => {
            if let Phase::Paused { wave, left_ms } = r.phase {
                r.phase = Phase::Running {
                    wave,
                    deadline_ms: now_ms + left_ms,
                };
            }
        }
        Input::Abort { revert } => match &r.phase {
            // Nothing changed yet: there is nothing to revert.
            Phase::Pulling { .. } => halt(r, "aborted by an operator".into(), false, actions),
            Phase::Running { .. } | Phase::Paused { .. } => {
                halt(r, "aborted by an operator".into(), *revert, actions);
            }
            // `abort --revert` of a halted release takes its updated hosts back.
            Phase::Halted { why } if *revert => {
                r.phase = Phase::Reverting {
                    why: format!("{why}; reverted by an operator"),
                };
            }
            _ => {}
        },
    }
}

/// A deploy that ends during a revert is rolled back by `advance` if it went through; if it
/// did not, the old release still serves.
fn job_ended(r: &mut Release, host: &str, job: &str, ok: bool, why: &str, now_ms: i64) {
    let Some(h) = r.hosts.iter_mut().find(|h| h.host == host) else {
        return;
    };
    if let Pull::Pulling { job_id } = &h.pull
        && job_id == job
    {
        h.pull = if ok {
            Pull::Pulled
        } else {
            Pull::Failed {
                why: why.to_string(),
            }
        };
        return;
    }
    match &h.phase {
        HostPhase::Deploying { job_id, .. } if job_id == job => {
            if ok && h.migrates {
                r.migration_ran = true;
            }
            h.phase = if ok {
                HostPhase::Settling {
                    deployed_ms: now_ms,
                    healthy_since_ms: h.connected.then_some(now_ms),
                }
            } else {
                HostPhase::Failed {
                    why: why.to_string(),
                }
            };
        }
        HostPhase::Reverting { job_id } if job_id == job => {
            h.phase = if ok {
                HostPhase::Reverted
            } else {
                HostPhase::RevertFailed {
                    why: why.to_string(),
                }
            };
        }
        // An end of a job this host is not waiting for (a replay, a stale job): ignored.
        _ => {}
    }
}

/// Stops the release: no host starts from now on. With `revert`, deploys in flight are
/// cancelled and the updated hosts are rolled back by `advance`.
fn halt(r: &mut Release, why: String, revert: bool, actions: &mut Vec<Action>) {
    for h in &mut r.hosts {
        if matches!(
            h.phase,
            HostPhase::Pending | HostPhase::Queued | HostPhase::WaitingOnline { .. }
        ) {
            h.phase = HostPhase::Skipped {
                why: "the release halted before its turn".into(),
            };
        }
    }
    actions.push(Action::Tell(Milestone::Halted { why: why.clone() }));
    if revert {
        for h in &r.hosts {
            if let HostPhase::Deploying { job_id, .. } = &h.phase {
                actions.push(Action::Cancel {
                    host: h.host.clone(),
                    job_id: job_id.clone(),
                });
            }
        }
        r.phase = Phase::Reverting { why };
    } else {
        r.phase = Phase::Halted { why };
    }
}

/// Moves the release on from where `apply` left it, as far as it can go at `now_ms`.
fn advance(r: &mut Release, now_ms: i64, actions: &mut Vec<Action>) {
    match r.phase.clone() {
        Phase::Pulling { deadline_ms } => pull_images(r, deadline_ms, now_ms, actions),
        Phase::Running { wave, deadline_ms } => run_wave(r, wave, deadline_ms, now_ms, actions),
        Phase::Paused { .. } => {
            // Deploys in flight go on; hosts that are deployed settle; nothing new starts.
            settle(r, now_ms);
        }
        Phase::Reverting { why } => revert(r, why, actions),
        // Halted: deploys in flight still end and settle, nothing starts.
        Phase::Halted { .. } => settle(r, now_ms),
        Phase::Succeeded | Phase::Reverted { .. } => {}
    }
    if matches!(
        r.phase,
        Phase::Succeeded | Phase::Halted { .. } | Phase::Reverted { .. }
    ) {
        retire(r, actions);
    }
}

/// Once the release can no longer revert by itself (it succeeded, halted or reverted), every
/// host left on the new version stops the previous web container its deploy kept running. A
/// deploy that ends after a halt is retired when it ends. A host reverted needs none: its
/// rollback stopped the new release.
fn retire(r: &mut Release, actions: &mut Vec<Action>) {
    if !r.policy.keep_previous {
        return;
    }
    for (i, h) in r.hosts.iter_mut().enumerate() {
        if h.retired || !h.phase.updated() || h.before.is_empty() {
            continue;
        }
        actions.push(Action::Retire {
            host: h.host.clone(),
            job_id: job_id(&r.id, 'x', i),
        });
        h.retired = true;
    }
}

/// The pulls: sent to every connected host not asked yet; any failure, or a pull still
/// running at the deadline, halts the release (nothing changed, so nothing is reverted);
/// once every pull ended well the first wave starts.
fn pull_images(r: &mut Release, deadline_ms: i64, now_ms: i64, actions: &mut Vec<Action>) {
    for (i, h) in r.hosts.iter_mut().enumerate() {
        if h.pull != Pull::NotAsked {
            continue;
        }
        if h.connected {
            let job_id = job_id(&r.id, 'p', i);
            actions.push(Action::Pull {
                host: h.host.clone(),
                job_id: job_id.clone(),
            });
            h.pull = Pull::Pulling { job_id };
        } else {
            h.pull = Pull::Skipped;
        }
    }
    let failed: Vec<String> = r
        .hosts
        .iter()
        .filter_map(|h| match &h.pull {
            Pull::Failed { why } => Some(format!("{}: {why}", h.host)),
            _ => None,
        })
        .collect();
    let pulling: Vec<&str> = r
        .hosts
        .iter()
        .filter(|h| matches!(h.pull, Pull::Pulling { .. }))
        .map(|h| h.host.as_str())
        .collect();
    let why = if !failed.is_empty() {
        Some(format!(
            "the image could not be pulled, so no host was changed: {}",
            failed.join("; ")
        ))
    } else if !pulling.is_empty() && now_ms >= deadline_ms {
        Some(format!(
            "the image pull did not finish within the progress deadline ({} s) on {}; no host was changed",
            r.policy.progress_deadline_ms / 1000,
            pulling.join(", ")
        ))
    } else {
        None
    };
    if let Some(why) = why {
        halt(r, why, false, actions);
        return;
    }
    if pulling.is_empty() {
        let deadline_ms = now_ms + r.policy.progress_deadline_ms;
        r.phase = Phase::Running {
            wave: 0,
            deadline_ms,
        };
        run_wave(r, 0, deadline_ms, now_ms, actions);
    }
}

/// Hosts deployed and healthy for `min_healthy` pass.
fn settle(r: &mut Release, now_ms: i64) {
    let min = r.policy.min_healthy_ms;
    for h in &mut r.hosts {
        if let HostPhase::Settling {
            healthy_since_ms: Some(since),
            ..
        } = h.phase
            && now_ms - since >= min
        {
            h.phase = HostPhase::Passed { at_ms: now_ms };
        }
    }
}

fn run_wave(
    r: &mut Release,
    wave: usize,
    deadline_ms: i64,
    now_ms: i64,
    actions: &mut Vec<Action>,
) {
    settle(r, now_ms);
    let policy = r.policy;
    // The wave's hosts whose turn came: waiting on their connection, or queued.
    for h in r.hosts.iter_mut().filter(|h| h.wave == wave) {
        match h.phase {
            HostPhase::Pending => {
                h.phase = if h.connected {
                    HostPhase::Queued
                } else {
                    HostPhase::WaitingOnline { since_ms: now_ms }
                };
            }
            HostPhase::WaitingOnline { since_ms } => {
                if h.connected {
                    h.phase = HostPhase::Queued;
                } else if now_ms - since_ms >= policy.host_timeout_ms {
                    h.phase = HostPhase::Offline { at_ms: now_ms };
                }
            }
            // Went away while queued: it waits for its agent again.
            HostPhase::Queued if !h.connected => {
                h.phase = HostPhase::WaitingOnline { since_ms: now_ms };
            }
            _ => {}
        }
    }
    // Failures beyond the budget, a failed migration host, or a missed deadline halt it.
    let failures = r
        .hosts
        .iter()
        .filter(|h| h.phase.failed(policy.skip_offline))
        .count();
    let budget = policy.max_failures.of(r.hosts.len());
    // The migration host ended without its deploy going through (offline counts, skipped or
    // not): the others cannot run without the migration.
    let migration_failed = r.hosts.iter().any(|h| {
        h.migrates
            && matches!(
                h.phase,
                HostPhase::Failed { .. }
                    | HostPhase::Unhealthy { .. }
                    | HostPhase::Offline { .. }
                    | HostPhase::Skipped { .. }
            )
    });
    let wave_hosts = || r.hosts.iter().filter(|h| h.wave == wave);
    let wave_done = wave_hosts().all(|h| h.phase.settled());
    let why = if migration_failed {
        Some(format!(
            "the migration host {} failed; no other host runs without its migration",
            r.hosts.iter().find(|h| h.migrates).map_or("", |h| &h.host)
        ))
    } else if failures > budget {
        Some(format!(
            "{failures} host(s) failed, more than the {budget} allowed (max_failures)"
        ))
    } else if !wave_done && now_ms >= deadline_ms {
        Some(format!(
            "wave {} did not pass within its progress deadline ({} s)",
            wave + 1,
            policy.progress_deadline_ms / 1000
        ))
    } else {
        None
    };
    if let Some(why) = why {
        // Hosts deployed but not yet proven count as updated: a revert takes them back.
        halt(r, why, policy.on_failure == OnFailure::Revert, actions);
        advance(r, now_ms, actions);
        return;
    }
    if wave_done {
        actions.push(Action::Tell(Milestone::WavePassed { wave }));
        if wave + 1 >= r.waves {
            r.phase = Phase::Succeeded;
            actions.push(Action::Tell(Milestone::Succeeded));
            return;
        }
        r.phase = Phase::Running {
            wave: wave + 1,
            deadline_ms: now_ms + policy.progress_deadline_ms,
        };
        run_wave(
            r,
            wave + 1,
            now_ms + policy.progress_deadline_ms,
            now_ms,
            actions,
        );
        return;
    }
    // Room in the wave: queued hosts start, in order. The migration host goes alone first.
    let deploying = r
        .hosts
        .iter()
        .filter(|h| matches!(h.phase, HostPhase::Deploying { .. }))
        .count();
    let migration_pending = r
        .hosts
        .iter()
        .any(|h| h.migrates && !h.phase.updated() && !h.phase.settled());
    let mut room = (policy.max_parallel.max(1) as usize).saturating_sub(deploying);
    for (i, h) in r.hosts.iter_mut().enumerate() {
        if room == 0 {
            break;
        }
        if h.wave != wave || h.phase != HostPhase::Queued {
            continue;
        }
        if migration_pending && !h.migrates {
            break;
        }
        let job_id = job_id(&r.id, 'd', i);
        actions.push(Action::Deploy {
            host: h.host.clone(),
            job_id: job_id.clone(),
            migrate: h.migrates,
        });
        h.phase = HostPhase::Deploying {
            job_id,
            started_ms: now_ms,
        };
        room -= 1;
    }
}

/// During a revert: every updated host is rolled back to what it ran before, all at once;
/// once none is deploying or reverting, the release is reverted.
fn revert(r: &mut Release, why: String, actions: &mut Vec<Action>) {
    for (i, h) in r.hosts.iter_mut().enumerate() {
        if !h.phase.updated() {
            continue;
        }
        if h.before.is_empty() {
            h.phase = HostPhase::RevertFailed {
                why: "the app ran no release here before this one: nothing to go back to".into(),
            };
            continue;
        }
        let job_id = job_id(&r.id, 'r', i);
        actions.push(Action::Rollback {
            host: h.host.clone(),
            job_id: job_id.clone(),
            to_version: h.before.clone(),
        });
        h.phase = HostPhase::Reverting { job_id };
    }
    let busy = r.hosts.iter().any(|h| {
        matches!(
            h.phase,
            HostPhase::Deploying { .. } | HostPhase::Reverting { .. }
        )
    });
    if !busy {
        actions.push(Action::Tell(Milestone::Reverted { why: why.clone() }));
        r.phase = Phase::Reverted { why };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    fn policy() -> Policy {
        Policy {
            max_parallel: 2,
            min_healthy_ms: 10 * S,
            progress_deadline_ms: 600 * S,
            host_timeout_ms: 60 * S,
            on_failure: OnFailure::Revert,
            max_failures: Budget::Hosts(0),
            skip_offline: false,
            keep_previous: false,
        }
    }

    fn names(wave: &[&str]) -> Vec<String> {
        wave.iter().map(|h| h.to_string()).collect()
    }

    /// A release of v2 over `waves`, every host on v1 and connected except `offline`.
    fn release(waves: &[&[&str]], policy: Policy, offline: &[&str]) -> Release {
        let waves: Vec<Vec<String>> = waves.iter().map(|w| names(w)).collect();
        new_release(
            "rel-1",
            "v2",
            &waves,
            policy,
            |_| "v1".to_string(),
            |h| !offline.contains(&h),
            0,
        )
    }

    /// Drives a release through inputs, keeping every action.
    struct Run {
        r: Release,
        actions: Vec<Action>,
    }

    impl Run {
        fn new(r: Release) -> Run {
            let mut run = Run {
                r,
                actions: Vec::new(),
            };
            run.at(0, Input::Tick);
            run
        }

        /// Feeds `input` at `t` and returns this step's actions.
        fn at(&mut self, t: i64, input: Input) -> Vec<Action> {
            let (r, actions) = step(&self.r, &input, t);
            // The engine is a function of the stored state: the same step again gives the
            // same answer (what a controller restarted between store and act relies on).
            assert_eq!(step(&self.r, &input, t), (r.clone(), actions.clone()));
            self.r = r;
            self.actions.extend(actions.clone());
            actions
        }

        fn ended(&mut self, t: i64, host: &str, ok: bool) -> Vec<Action> {
            let job_id = match &self.host(host).phase {
                HostPhase::Deploying { job_id, .. } | HostPhase::Reverting { job_id } => {
                    job_id.clone()
                }
                other => panic!("{host} runs no job: {other:?}"),
            };
            self.at(
                t,
                Input::JobEnded {
                    host: host.into(),
                    job_id,
                    ok,
                    why: if ok {
                        String::new()
                    } else {
                        "health check failed".into()
                    },
                },
            )
        }

        fn host(&self, host: &str) -> &HostRelease {
            self.r.hosts.iter().find(|h| h.host == host).unwrap()
        }

        fn phases(&self) -> Vec<(&str, &str)> {
            self.r
                .hosts
                .iter()
                .map(|h| (h.host.as_str(), h.phase.as_str()))
                .collect()
        }
    }

    fn deploys(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deploy { host, .. } => Some(host.as_str()),
                _ => None,
            })
            .collect()
    }

    fn rollbacks(actions: &[Action]) -> Vec<(&str, &str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Rollback {
                    host, to_version, ..
                } => Some((host.as_str(), to_version.as_str())),
                _ => None,
            })
            .collect()
    }

    fn pulls(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Pull { host, .. } => Some(host.as_str()),
                _ => None,
            })
            .collect()
    }

    fn pulled(run: &mut Run, t: i64, host: &str, ok: bool) -> Vec<Action> {
        let Pull::Pulling { job_id } = run.host(host).pull.clone() else {
            panic!("{host} pulls nothing: {:?}", run.host(host).pull);
        };
        run.at(
            t,
            Input::JobEnded {
                host: host.into(),
                job_id,
                ok,
                why: if ok {
                    String::new()
                } else {
                    "manifest unknown".into()
                },
            },
        )
    }

    #[test]
    fn every_connected_host_pulls_at_once_before_the_first_wave() {
        let r = pull_first(release(&[&["a"], &["b", "c"]], policy(), &["c"]), 0);
        let mut run = Run::new(r);
        // All connected hosts at once, whatever max_parallel and the waves; c is offline.
        assert_eq!(pulls(&run.actions), ["a", "b"]);
        assert_eq!(job_id("rel-1", 'p', 0), "rel-1-p0");
        assert_eq!(run.host("c").pull, Pull::Skipped);
        assert_eq!(told(&run.actions), [&Milestone::Started]);
        assert!(deploys(&run.actions).is_empty());
        assert!(
            deploys(&pulled(&mut run, S, "a", true)).is_empty(),
            "b still pulls"
        );
        assert_eq!(run.r.phase.as_str(), "pulling");
        let next = pulled(&mut run, 2 * S, "b", true);
        assert_eq!(deploys(&next), ["a"], "the first wave starts");
        assert_eq!(
            run.r.phase,
            Phase::Running {
                wave: 0,
                deadline_ms: 2 * S + 600 * S
            }
        );
        // Started is told once, not again when the first wave begins.
        assert_eq!(told(&run.actions), [&Milestone::Started]);
        // A replayed end of the pull changes nothing.
        let again = run.at(
            3 * S,
            Input::JobEnded {
                host: "a".into(),
                job_id: "rel-1-p0".into(),
                ok: false,
                why: "late".into(),
            },
        );
        assert!(again.is_empty());
        assert_eq!(run.host("a").pull, Pull::Pulled);
    }

    #[test]
    fn a_host_that_cannot_pull_halts_the_release_before_any_host_changes() {
        let r = pull_first(release(&[&["a"], &["b"]], policy(), &[]), 0);
        let mut run = Run::new(r);
        let halted = pulled(&mut run, S, "b", false);
        assert!(deploys(&halted).is_empty());
        assert!(rollbacks(&halted).is_empty());
        let Phase::Halted { why } = &run.r.phase else {
            panic!("halted: {:?}", run.r.phase);
        };
        assert!(
            why.contains("b: manifest unknown") && why.contains("no host was changed"),
            "{why}"
        );
        assert_eq!(run.phases(), [("a", "skipped"), ("b", "skipped")]);
        // a's pull still ends; nothing starts.
        assert!(deploys(&pulled(&mut run, 2 * S, "a", true)).is_empty());
    }

    #[test]
    fn a_pull_past_the_deadline_halts_and_an_abort_while_pulling_reverts_nothing() {
        let r = pull_first(release(&[&["a", "b"]], policy(), &[]), 0);
        let mut run = Run::new(r);
        pulled(&mut run, S, "a", true);
        run.at(599 * S, Input::Tick);
        assert_eq!(run.r.phase.as_str(), "pulling");
        run.at(600 * S, Input::Tick);
        let Phase::Halted { why } = &run.r.phase else {
            panic!("halted: {:?}", run.r.phase);
        };
        assert!(
            why.contains("did not finish within the progress deadline (600 s) on b"),
            "{why}"
        );

        let r = pull_first(release(&[&["a", "b"]], policy(), &[]), 0);
        let mut run = Run::new(r);
        let out = run.at(S, Input::Abort { revert: true });
        assert!(rollbacks(&out).is_empty());
        assert_eq!(run.r.phase.as_str(), "halted");
    }

    fn told(actions: &[Action]) -> Vec<&Milestone> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Tell(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn waves_start_only_once_the_wave_before_stayed_healthy() {
        let mut run = Run::new(release(&[&["a"], &["b", "c", "d"]], policy(), &[]));
        // The first host alone, with the migration.
        assert_eq!(
            run.actions,
            [
                Action::Tell(Milestone::Started),
                Action::Deploy {
                    host: "a".into(),
                    job_id: "rel-1-d0".into(),
                    migrate: true
                }
            ]
        );
        assert!(run.ended(5 * S, "a", true).is_empty());
        assert!(run.r.migration_ran);
        // Deployed, not yet healthy for 10 s: wave 2 waits.
        assert!(run.at(14 * S, Input::Tick).is_empty());
        let next = run.at(15 * S, Input::Tick);
        assert_eq!(told(&next), [&Milestone::WavePassed { wave: 0 }]);
        // Two at a time (max_parallel), no migration.
        assert_eq!(deploys(&next), ["b", "c"]);
        assert!(
            next.iter()
                .all(|a| !matches!(a, Action::Deploy { migrate: true, .. }))
        );
        assert!(deploys(&run.ended(20 * S, "b", true)).eq(&["d"]));
        run.ended(21 * S, "c", true);
        run.ended(22 * S, "d", true);
        assert!(told(&run.at(31 * S, Input::Tick)).is_empty());
        let last = run.at(32 * S, Input::Tick);
        assert_eq!(
            told(&last),
            [&Milestone::WavePassed { wave: 1 }, &Milestone::Succeeded]
        );
        assert_eq!(run.r.phase, Phase::Succeeded);
        // Every host deployed exactly once.
        let mut all = deploys(&run.actions);
        all.sort();
        assert_eq!(all, ["a", "b", "c", "d"]);
        // A finished release hears nothing more.
        assert!(run.at(40 * S, Input::Abort { revert: true }).is_empty());
    }

    #[test]
    fn a_failure_past_the_budget_reverts_every_updated_host_at_once() {
        let mut run = Run::new(release(&[&["a"], &["b", "c"], &["d"]], policy(), &[]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        run.ended(12 * S, "b", true);
        // c fails: b (deployed) and a (passed) go back to v1 together; d never starts.
        let now = run.ended(13 * S, "c", false);
        assert_eq!(rollbacks(&now), [("a", "v1"), ("b", "v1")]);
        assert_eq!(
            told(&now),
            [&Milestone::Halted {
                why: "1 host(s) failed, more than the 0 allowed (max_failures)".into()
            }]
        );
        assert_eq!(
            run.phases(),
            [
                ("a", "reverting"),
                ("b", "reverting"),
                ("c", "failed"),
                ("d", "skipped")
            ]
        );
        assert!(run.ended(14 * S, "a", true).is_empty());
        let done = run.ended(15 * S, "b", true);
        assert!(matches!(told(&done)[..], [Milestone::Reverted { .. }]));
        assert!(matches!(run.r.phase, Phase::Reverted { .. }));
        assert_eq!(deploys(&run.actions), ["a", "b", "c"]);
    }

    #[test]
    fn halt_without_revert_leaves_the_updated_hosts_and_starts_no_other() {
        let p = Policy {
            on_failure: OnFailure::Halt,
            ..policy()
        };
        let mut run = Run::new(release(&[&["a"], &["b", "c"], &["d"]], p, &[]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        let now = run.ended(12 * S, "b", false);
        assert!(rollbacks(&now).is_empty());
        assert!(matches!(run.r.phase, Phase::Halted { .. }));
        // c was in flight: it finishes and settles, nothing else starts.
        assert!(run.ended(13 * S, "c", true).is_empty());
        run.at(30 * S, Input::Tick);
        assert_eq!(
            run.phases(),
            [
                ("a", "passed"),
                ("b", "failed"),
                ("c", "passed"),
                ("d", "skipped")
            ]
        );
        // An operator can still take the updated hosts back.
        let now = run.at(40 * S, Input::Abort { revert: true });
        assert_eq!(rollbacks(&now), [("a", "v1"), ("c", "v1")]);
    }

    fn retired(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Retire { host, job_id } => {
                    assert!(job_id.ends_with(&format!("-x{}", &job_id[job_id.len() - 1..])));
                    Some(host.as_str())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_release_that_keeps_the_previous_release_running_retires_it_once_it_cannot_revert() {
        let keep = Policy {
            keep_previous: true,
            ..policy()
        };
        // Succeeded: every host is retired once, at the end, and not before.
        let mut run = Run::new(release(&[&["a"], &["b"]], keep, &[]));
        run.ended(S, "a", true);
        assert!(retired(&run.at(11 * S, Input::Tick)).is_empty());
        let now = run.ended(12 * S, "b", true);
        assert!(retired(&now).is_empty(), "b has not passed yet: {now:?}");
        let now = run.at(22 * S, Input::Tick);
        assert_eq!(run.r.phase, Phase::Succeeded);
        assert_eq!(retired(&now), ["a", "b"]);
        assert!(retired(&run.at(30 * S, Input::Tick)).is_empty());

        // Reverted: the rollbacks stop the new release; nothing to retire.
        let mut run = Run::new(release(&[&["a"], &["b"]], keep, &[]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        run.ended(12 * S, "b", false);
        run.ended(13 * S, "a", true);
        assert!(matches!(run.r.phase, Phase::Reverted { .. }));
        assert!(retired(&run.actions).is_empty());

        // Halted without revert: the updated hosts at once, a deploy in flight when it ends.
        let halt = Policy {
            on_failure: OnFailure::Halt,
            ..keep
        };
        let mut run = Run::new(release(&[&["a"], &["b", "c"]], halt, &[]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        let now = run.ended(12 * S, "b", false);
        assert!(matches!(run.r.phase, Phase::Halted { .. }));
        assert_eq!(retired(&now), ["a"]);
        assert_eq!(retired(&run.ended(13 * S, "c", true)), ["c"]);
        assert!(retired(&run.at(30 * S, Input::Tick)).is_empty());

        // Without keep_previous nothing is ever retired.
        let mut run = Run::new(release(&[&["a"]], policy(), &[]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        assert_eq!(run.r.phase, Phase::Succeeded);
        assert!(retired(&run.actions).is_empty());
    }

    #[test]
    fn failures_within_the_budget_let_the_wave_pass() {
        let p = Policy {
            max_failures: Budget::Hosts(1),
            ..policy()
        };
        let mut run = Run::new(release(&[&["a"], &["b", "c"], &["d", "e"]], p, &[]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        run.ended(12 * S, "b", false);
        run.ended(12 * S, "c", true);
        let next = run.at(22 * S, Input::Tick);
        assert_eq!(deploys(&next), ["d", "e"]);
        // A second failure is one too many.
        let now = run.ended(23 * S, "d", false);
        assert!(matches!(told(&now)[..], [Milestone::Halted { .. }]));
        assert_eq!(
            now.iter()
                .filter(|a| matches!(a, Action::Cancel { host, .. } if host == "e"))
                .count(),
            1,
            "the deploy in flight is cancelled: {now:?}"
        );
        assert_eq!(rollbacks(&now), [("a", "v1"), ("c", "v1")]);
        // e's deploy went through before the cancel: it is taken back too.
        let late = run.ended(24 * S, "e", true);
        assert_eq!(rollbacks(&late), [("e", "v1")]);
    }

    #[test]
    fn the_migration_host_failing_halts_whatever_the_budget() {
        let p = Policy {
            max_failures: Budget::Hosts(5),
            ..policy()
        };
        let mut run = Run::new(release(&[&["a", "b"]], p, &[]));
        // b waits for a's migration even though the wave has room for two.
        assert_eq!(deploys(&run.actions), ["a"]);
        let now = run.ended(S, "a", false);
        assert!(deploys(&now).is_empty());
        let why = "the migration host a failed; no other host runs without its migration";
        // Nothing was updated, so the revert is over at once.
        assert_eq!(
            told(&now),
            [
                &Milestone::Halted { why: why.into() },
                &Milestone::Reverted { why: why.into() }
            ]
        );
        assert_eq!(run.phases(), [("a", "failed"), ("b", "skipped")]);
        assert!(!run.r.migration_ran);
    }

    #[test]
    fn an_offline_host_waits_then_counts_as_failed_or_is_skipped() {
        let mut run = Run::new(release(&[&["a"], &["b", "c"]], policy(), &["c"]));
        run.ended(S, "a", true);
        let next = run.at(11 * S, Input::Tick);
        assert_eq!(deploys(&next), ["b"]);
        assert_eq!(run.host("c").phase.as_str(), "waiting_online");
        // Back within host_timeout: it deploys.
        let back = run.at(
            30 * S,
            Input::Connected {
                host: "c".into(),
                up: true,
            },
        );
        assert_eq!(deploys(&back), ["c"]);

        // Never back: offline after 60 s, a failure.
        let mut run = Run::new(release(&[&["a"], &["b", "c"]], policy(), &["c"]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        run.ended(12 * S, "b", true);
        assert!(told(&run.at(70 * S, Input::Tick)).is_empty());
        let now = run.at(71 * S, Input::Tick);
        assert!(matches!(told(&now)[..], [Milestone::Halted { .. }]));
        assert_eq!(run.host("c").phase.as_str(), "offline");

        // With skip_offline the wave passes without it.
        let p = Policy {
            skip_offline: true,
            ..policy()
        };
        let mut run = Run::new(release(&[&["a"], &["b", "c"]], p, &["c"]));
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        run.ended(12 * S, "b", true);
        run.at(71 * S, Input::Tick);
        assert_eq!(run.r.phase, Phase::Succeeded);
        assert_eq!(run.host("c").phase.as_str(), "offline");

        // Queued behind another host, then gone: it waits for its agent again, and is not
        // sent a deploy it cannot receive.
        let one = Policy {
            max_parallel: 1,
            ..policy()
        };
        let mut run = Run::new(release(&[&["a"], &["b", "c"]], one, &[]));
        run.ended(S, "a", true);
        assert_eq!(deploys(&run.at(11 * S, Input::Tick)), ["b"]);
        assert_eq!(run.host("c").phase.as_str(), "queued");
        let gone = Input::Connected {
            host: "c".into(),
            up: false,
        };
        run.at(12 * S, gone);
        assert_eq!(run.host("c").phase.as_str(), "waiting_online");
        assert!(deploys(&run.ended(13 * S, "b", true)).is_empty());
        let back = Input::Connected {
            host: "c".into(),
            up: true,
        };
        assert_eq!(deploys(&run.at(14 * S, back)), ["c"]);
    }

    #[test]
    fn unhealthy_after_deploy_fails_and_a_disconnect_restarts_the_clock() {
        let mut run = Run::new(release(&[&["a"], &["b"]], policy(), &[]));
        run.ended(S, "a", true);
        run.at(
            5 * S,
            Input::Connected {
                host: "a".into(),
                up: false,
            },
        );
        run.at(
            6 * S,
            Input::Connected {
                host: "a".into(),
                up: true,
            },
        );
        run.at(
            6 * S,
            Input::Health {
                host: "a".into(),
                healthy: true,
            },
        );
        // Healthy since 6 s, not 1 s: nothing at 11 s, wave 2 at 16 s.
        assert!(deploys(&run.at(11 * S, Input::Tick)).is_empty());
        assert_eq!(deploys(&run.at(16 * S, Input::Tick)), ["b"]);
        run.ended(17 * S, "b", true);
        let now = run.at(
            18 * S,
            Input::Health {
                host: "b".into(),
                healthy: false,
            },
        );
        assert_eq!(run.host("b").phase.as_str(), "reverting");
        assert_eq!(rollbacks(&now), [("a", "v1"), ("b", "v1")]);
    }

    #[test]
    fn a_wave_past_its_deadline_fails() {
        let mut run = Run::new(release(&[&["a"]], policy(), &[]));
        assert!(told(&run.at(599 * S, Input::Tick)).is_empty());
        let now = run.at(600 * S, Input::Tick);
        assert_eq!(
            told(&now),
            [&Milestone::Halted {
                why: "wave 1 did not pass within its progress deadline (600 s)".into()
            }]
        );
        assert_eq!(
            now.iter()
                .filter(|a| matches!(a, Action::Cancel { .. }))
                .count(),
            1
        );
    }

    #[test]
    fn a_paused_release_starts_nothing_and_keeps_its_deadline() {
        let mut run = Run::new(release(&[&["a"], &["b"]], policy(), &[]));
        run.at(100 * S, Input::Pause);
        run.ended(101 * S, "a", true);
        // a settles while paused, but b does not start.
        assert!(deploys(&run.at(200 * S, Input::Tick)).is_empty());
        assert_eq!(run.host("a").phase.as_str(), "passed");
        // 500 s of the deadline were left when it paused.
        assert_eq!(
            run.r.phase,
            Phase::Paused {
                wave: 0,
                left_ms: 500 * S
            }
        );
        let now = run.at(1000 * S, Input::Resume);
        assert_eq!(deploys(&now), ["b"]);
        assert_eq!(
            run.r.phase,
            Phase::Running {
                wave: 1,
                deadline_ms: 1600 * S
            }
        );
    }

    #[test]
    fn replayed_and_stale_job_ends_change_nothing() {
        let mut run = Run::new(release(&[&["a"], &["b"]], policy(), &[]));
        let before = run.r.clone();
        let stale = run.at(
            S,
            Input::JobEnded {
                host: "a".into(),
                job_id: "rel-0-d0".into(),
                ok: true,
                why: String::new(),
            },
        );
        assert!(stale.is_empty());
        assert_eq!(run.r, before);
        run.ended(2 * S, "a", true);
        let settled = run.r.clone();
        // The same end replayed after a controller restart: a no-op.
        run.at(
            2 * S,
            Input::JobEnded {
                host: "a".into(),
                job_id: "rel-1-d0".into(),
                ok: true,
                why: String::new(),
            },
        );
        assert_eq!(run.r, settled);
        // Ticks never send a host its deploy again.
        for t in [3, 4, 5] {
            assert!(deploys(&run.at(t * S, Input::Tick)).is_empty());
        }
    }

    #[test]
    fn a_host_that_ran_nothing_before_cannot_be_reverted_and_says_why() {
        let waves = vec![names(&["a"]), names(&["b"])];
        let r = new_release(
            "rel-2",
            "v2",
            &waves,
            policy(),
            |h| if h == "a" { String::new() } else { "v1".into() },
            |_| true,
            0,
        );
        let mut run = Run::new(r);
        run.ended(S, "a", true);
        run.at(11 * S, Input::Tick);
        let now = run.ended(12 * S, "b", false);
        assert!(rollbacks(&now).is_empty());
        assert!(matches!(run.r.phase, Phase::Reverted { .. }));
        assert_eq!(
            run.host("a").phase,
            HostPhase::RevertFailed {
                why: "the app ran no release here before this one: nothing to go back to".into()
            }
        );
    }
}
