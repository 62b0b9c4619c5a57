//! The release driver: the one task that moves fleet releases on, and the operator's way in
//! (start, pause, resume, abort). Each round reads what the world says about a release's
//! hosts (their sessions, their last health report, the jobs it sent, as the stored job
//! records say, so a job that finished while the controller was down is seen from its
//! replayed events), steps the pure engine with it, stores the new state and flushes, and only
//! then acts: deploy and rollback jobs through `launch`, with ids derived from the release (so
//! a restart that finds a host `deploying` with no job creates that job, and one with a job
//! never creates a second), cancels, milestones. One lock serializes every writer of releases.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use drover_model::jobevent::id_stamp;
use drover_model::releases;
use tracing::{info, warn};

use super::engine::{self, Action, HostPhase, Input, Milestone, Pull};
use super::plan;
use super::record::{self, FleetRelease, Options};
use crate::alerts::AlertRecord;
use crate::jobs::JobState;
use crate::launch::{DeployArgs, Hosts, LaunchError, Launcher, RollbackArgs};
use crate::shared::{Shared, now_ms};

/// How often running releases are looked at.
pub const TICK: Duration = Duration::from_millis(500);

/// A fleet release asked for.
#[derive(Debug, Clone, Default)]
pub struct StartArgs {
    pub app: String,
    pub version: String,
    pub hosts: Hosts,
    pub options: Options,
    pub skip_backup: bool,
    /// Plan only: nothing is stored or sent.
    pub dry_run: bool,
    /// The release's id, made beforehand (by the scheduler); `None`: a new one.
    pub id: Option<String>,
}

/// A new release id: `release-<stamp>-<4 hex>`.
pub fn release_id(now_ms: i64) -> String {
    format!("release-{}-{:04x}", id_stamp(now_ms), rand::random::<u16>())
}

/// What an operator does to a running release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort {
        revert: bool,
    },
    /// Deploy a succeeded release's version to its hosts that are behind.
    Converge,
}

fn store_error(err: impl std::fmt::Display) -> LaunchError {
    LaunchError::Internal(err.to_string())
}

/// Drives the releases of one controller.
#[derive(Debug, Clone)]
pub struct Releases {
    shared: Arc<Shared>,
    launcher: Launcher,
}

impl Releases {
    pub fn new(shared: Arc<Shared>) -> Releases {
        Releases {
            launcher: Launcher::new(shared.clone()),
            shared,
        }
    }

    /// Plans a release and, unless `dry_run`, stores it (flushed) and starts its first wave.
    /// Refused while another release of the app is under way.
    pub async fn start(&self, args: StartArgs, by: &str) -> Result<FleetRelease, LaunchError> {
        let (app, spec) = self.launcher.deployable(&args.app, &args.version)?;
        let hosts = self.launcher.release_hosts(&app.name, &args.hosts)?;
        let (waves_text, reach, policy) = record::resolve(&spec.release, &args.options)
            .map_err(|e| LaunchError::Invalid(e.to_string()))?;
        let waves = plan::plan(&hosts, &reach, args.options.canary.as_deref())
            .map_err(|e| LaunchError::Invalid(e.to_string()))?;
        let store = &self.shared.store;
        let mut before = BTreeMap::new();
        for host in &hosts {
            let table = store.releases(&app.name, host).map_err(store_error)?;
            let live = releases::live(&table).map(|r| r.version.clone());
            before.insert(host.clone(), live.unwrap_or_default());
        }
        let now = now_ms();
        let id = args.id.clone().unwrap_or_else(|| release_id(now));
        // Every connected host gets the image first: a wave's time is then the switch.
        let release = engine::pull_first(
            engine::new_release(
                &id,
                &args.version,
                &waves,
                policy,
                |h| before.get(h).cloned().unwrap_or_default(),
                |h| self.shared.registry.seen(h).1,
                now,
            ),
            now,
        );
        let mut fleet = FleetRelease {
            release,
            app: app.name.clone(),
            requested_by: by.to_string(),
            created_unix_ms: now,
            finished_unix_ms: 0,
            skip_backup: args.skip_backup,
            waves_text,
            canary: args.options.canary.clone().unwrap_or_default(),
            history: Vec::new(),
        };
        fleet.note(
            now,
            by,
            format!(
                "started: {} {} to {} host(s) in {} wave(s)",
                app.name,
                args.version,
                hosts.len(),
                waves.len()
            ),
        );
        if args.dry_run {
            return Ok(fleet);
        }
        let _guard = self.shared.release_lock.lock().await;
        if let Some(other) = store
            .fleet_releases()
            .map_err(store_error)?
            .into_iter()
            .find(|r| r.app == app.name && !r.release.phase.is_finished())
        {
            return Err(LaunchError::Precondition(format!(
                "release {} of {} is {}; wait for it to end, or `drover release abort {}`",
                other.id(),
                app.name,
                other.release.phase.as_str(),
                other.id()
            )));
        }
        if !store.create_fleet_release(&fleet).map_err(store_error)? {
            return Err(LaunchError::Internal(format!(
                "release id {id} is taken; ask again"
            )));
        }
        store.flush().await.map_err(store_error)?;
        info!(release = %id, app = %app.name, version = %args.version, by, hosts = hosts.len(), waves = waves.len(), "release started");
        self.advance(fleet, vec![Input::Tick], Vec::new()).await
    }

    /// Pauses, resumes or aborts release `id` (recorded with `by`), and acts on it at once.
    pub async fn control(
        &self,
        id: &str,
        control: Control,
        by: &str,
    ) -> Result<FleetRelease, LaunchError> {
        let _guard = self.shared.release_lock.lock().await;
        let mut fleet = self.get(id)?;
        if control == Control::Converge {
            return self.converge(fleet, by).await;
        }
        let (input, what) = match control {
            Control::Converge => unreachable!("handled above"),
            Control::Pause => (Input::Pause, "paused"),
            Control::Resume => (Input::Resume, "resumed"),
            Control::Abort { revert: false } => (Input::Abort { revert: false }, "aborted"),
            Control::Abort { revert: true } => {
                (Input::Abort { revert: true }, "aborted with revert")
            }
        };
        let phase = fleet.release.phase.as_str();
        let allowed = match control {
            Control::Converge => false,
            Control::Pause => phase == "running",
            Control::Resume => phase == "paused",
            Control::Abort { revert } => {
                matches!(phase, "pulling" | "running" | "paused") || (revert && phase == "halted")
            }
        };
        if !allowed {
            return Err(LaunchError::Precondition(format!(
                "release {id} is {phase}: it cannot be {what}"
            )));
        }
        fleet.note(now_ms(), by, format!("{what} by {by}"));
        info!(release = %id, by, what, "release control");
        self.advance(fleet, vec![input], Vec::new()).await
    }

    /// One deploy job of a succeeded release's version to its hosts behind it that are
    /// connected now (without the migration: it ran with the release), recorded in its
    /// history. The release's lock is held by the caller.
    async fn converge(
        &self,
        mut fleet: FleetRelease,
        by: &str,
    ) -> Result<FleetRelease, LaunchError> {
        let id = fleet.id().to_string();
        if fleet.release.phase != engine::Phase::Succeeded {
            return Err(LaunchError::Precondition(format!(
                "release {id} is {}: only a succeeded release is converged (start a new release instead)",
                fleet.release.phase.as_str()
            )));
        }
        let store = &self.shared.store;
        let (mut behind, mut away) = (Vec::new(), Vec::new());
        for h in &fleet.release.hosts {
            let table = store.releases(&fleet.app, &h.host).map_err(store_error)?;
            let live = releases::live(&table).map(|r| r.version.as_str());
            if live == Some(fleet.release.version.as_str()) {
                continue;
            }
            if self.shared.registry.seen(&h.host).1 {
                behind.push(h.host.clone());
            } else {
                away.push(h.host.clone());
            }
        }
        if behind.is_empty() {
            return Err(LaunchError::Precondition(if away.is_empty() {
                format!(
                    "no host of release {id} is behind: each runs {}",
                    fleet.release.version
                )
            } else {
                format!(
                    "the hosts behind release {id} are not connected: {}; converge once their agents are back",
                    away.join(", ")
                )
            }));
        }
        let args = DeployArgs {
            app: fleet.app.clone(),
            version: fleet.release.version.clone(),
            hosts: Hosts {
                names: behind.clone(),
                ..Hosts::default()
            },
            skip_backup: fleet.skip_backup,
            wait_lock: false,
            skip_migration: true,
            keep_previous: false,
        };
        let job = self
            .launcher
            .deploy(args, &format!("{by} (converge {id})"), None)
            .await?;
        let mut what = format!(
            "converge by {by}: job {} deploys {} to {}",
            job.id,
            fleet.release.version,
            behind.join(", ")
        );
        if !away.is_empty() {
            what.push_str(&format!(
                "; not connected, left behind: {}",
                away.join(", ")
            ));
        }
        info!(release = %id, by, job = %job.id, hosts = ?behind, "release converge");
        fleet.note(now_ms(), by, what);
        store.put_fleet_release(&fleet).map_err(store_error)?;
        store.flush().await.map_err(store_error)?;
        Ok(fleet)
    }

    pub fn get(&self, id: &str) -> Result<FleetRelease, LaunchError> {
        self.shared
            .store
            .fleet_release(id)
            .map_err(store_error)?
            .ok_or_else(|| {
                LaunchError::NotFound(format!(
                    "unknown release {id}; `drover release list` shows them"
                ))
            })
    }

    /// Every release, newest first; only `app`'s when given.
    pub fn list(&self, app: Option<&str>) -> Result<Vec<FleetRelease>, LaunchError> {
        let mut all = self.shared.store.fleet_releases().map_err(store_error)?;
        all.retain(|r| app.is_none_or(|a| a == r.app));
        all.reverse();
        Ok(all)
    }

    /// One round over every release still under way: observe, step, store, act.
    pub async fn tick(&self) -> Result<(), LaunchError> {
        let _guard = self.shared.release_lock.lock().await;
        for fleet in self.shared.store.fleet_releases().map_err(store_error)? {
            if !under_way(&fleet) {
                continue;
            }
            let (inputs, redo) = self.observe(&fleet)?;
            self.advance(fleet, inputs, redo).await?;
        }
        Ok(())
    }

    /// Ticks every [`TICK`] until `shutdown`, and at once when a job changes.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut updates = self.shared.job_updates.subscribe();
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
                update = updates.recv() => {
                    if matches!(update, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
            }
            if let Err(e) = self.tick().await {
                warn!(error = %e, "release tick failed");
            }
        }
    }

    /// What the world says about `fleet`'s hosts now, as engine inputs (ending with a tick),
    /// and the jobs it stored as sent that do not exist (a restart came between): sent again.
    fn observe(&self, fleet: &FleetRelease) -> Result<(Vec<Input>, Vec<Action>), LaunchError> {
        let store = &self.shared.store;
        let (mut inputs, mut redo) = (Vec::new(), Vec::new());
        for h in &fleet.release.hosts {
            let open = self.shared.registry.seen(&h.host).1;
            if open != h.connected {
                inputs.push(Input::Connected {
                    host: h.host.clone(),
                    up: open,
                });
            }
            if let Pull::Pulling { job_id } = &h.pull {
                match store.job(job_id).map_err(store_error)? {
                    Some(job) if job.state().is_finished() => {
                        inputs.push(ended(&h.host, job_id, &job))
                    }
                    Some(_) => {}
                    None => redo.push(Action::Pull {
                        host: h.host.clone(),
                        job_id: job_id.clone(),
                    }),
                }
            }
            match &h.phase {
                HostPhase::Settling { deployed_ms, .. } if open => {
                    let healthy = store
                        .host(&h.host)
                        .map_err(store_error)?
                        .is_some_and(|r| record::healthy(&r, open, &fleet.app, *deployed_ms));
                    inputs.push(Input::Health {
                        host: h.host.clone(),
                        healthy,
                    });
                }
                HostPhase::Deploying { job_id, .. } | HostPhase::Reverting { job_id } => {
                    match store.job(job_id).map_err(store_error)? {
                        // The agent sends `job.finished` before the release table it made:
                        // a deploy that went through counts once the table says so, so a
                        // revert's rollback is checked against the table with the new release.
                        Some(job)
                            if job.state() == JobState::Succeeded
                                && matches!(h.phase, HostPhase::Deploying { .. })
                                && !self.live_is(
                                    &fleet.app,
                                    &h.host,
                                    &fleet.release.version,
                                )? => {}
                        Some(job) if job.state().is_finished() => {
                            inputs.push(ended(&h.host, job_id, &job))
                        }
                        Some(_) => {}
                        None if matches!(h.phase, HostPhase::Deploying { .. }) => {
                            redo.push(Action::Deploy {
                                host: h.host.clone(),
                                job_id: job_id.clone(),
                                migrate: h.migrates,
                            })
                        }
                        None => redo.push(Action::Rollback {
                            host: h.host.clone(),
                            job_id: job_id.clone(),
                            to_version: h.before.clone(),
                        }),
                    }
                }
                _ => {}
            }
        }
        inputs.push(Input::Tick);
        Ok((inputs, redo))
    }

    /// Whether the controller's copy of `host`'s release table of `app` has `version` live.
    fn live_is(&self, app: &str, host: &str, version: &str) -> Result<bool, LaunchError> {
        let table = self.shared.store.releases(app, host).map_err(store_error)?;
        Ok(releases::live(&table).is_some_and(|r| r.version == version))
    }

    /// Steps `fleet` through `inputs`, stores it (flushed) if it changed, then acts; an action
    /// that fails (a job that could not start) comes back as its job's failed end, stepped the
    /// same way. `redo`: actions of the stored state to carry out first.
    async fn advance(
        &self,
        mut fleet: FleetRelease,
        inputs: Vec<Input>,
        redo: Vec<Action>,
    ) -> Result<FleetRelease, LaunchError> {
        let mut queue: VecDeque<Input> = VecDeque::new();
        for action in redo {
            if let Some(failed) = self.act(&fleet, action).await {
                queue.push_back(failed);
            }
        }
        queue.extend(inputs);
        // Each round's failures feed the next; a release has finitely many jobs to fail.
        for _ in 0..=fleet.release.hosts.len() * 2 + 1 {
            if queue.is_empty() {
                break;
            }
            let now = now_ms();
            let mut next = fleet.release.clone();
            let mut actions = Vec::new();
            for input in queue.drain(..) {
                let (stepped, more) = engine::step(&next, &input, now);
                next = stepped;
                actions.extend(more);
            }
            let mut changed = next != fleet.release;
            let revert_began = matches!(next.phase, engine::Phase::Reverting { .. })
                && !matches!(fleet.release.phase, engine::Phase::Reverting { .. });
            if matches!(fleet.release.phase, engine::Phase::Pulling { .. })
                && matches!(next.phase, engine::Phase::Running { .. })
            {
                let count = |p: fn(&Pull) -> bool| next.hosts.iter().filter(|h| p(&h.pull)).count();
                let pulled = count(|p| *p == Pull::Pulled);
                let skipped = count(|p| *p == Pull::Skipped);
                let mut what = format!("the image is on {pulled} host(s)");
                if skipped > 0 {
                    what.push_str(&format!(
                        "; {skipped} not connected pull it at their deploy"
                    ));
                }
                fleet.note(now, "", what);
            }
            if revert_began && next.migration_ran {
                fleet.note(
                    now,
                    "",
                    "the migration ran with this release; reverting does not undo it (Drover runs no down migration)",
                );
            }
            for action in &actions {
                if let Action::Tell(m) = action {
                    fleet.note(now, "", describe(m, &fleet));
                    changed = true;
                }
            }
            fleet.release = next;
            if fleet.release.phase.is_finished() && fleet.finished_unix_ms == 0 {
                fleet.finished_unix_ms = now;
            }
            if changed {
                self.shared
                    .store
                    .put_fleet_release(&fleet)
                    .map_err(store_error)?;
                self.shared.store.flush().await.map_err(store_error)?;
            }
            for action in actions {
                if let Some(failed) = self.act(&fleet, action).await {
                    queue.push_back(failed);
                }
            }
        }
        Ok(fleet)
    }

    /// Carries out one action of a stored state. A deploy or rollback whose job exists is
    /// already under way (its command is sent again on the host's next session). A job that
    /// cannot start comes back as its failed end.
    async fn act(&self, fleet: &FleetRelease, action: Action) -> Option<Input> {
        let id = fleet.id();
        let by = format!("{} (release {id})", fleet.requested_by);
        let (host, job_id, started) = match action {
            Action::Pull { host, job_id } => {
                if self.job_exists(&job_id) {
                    return None;
                }
                let started = self
                    .launcher
                    .pull(
                        &fleet.app,
                        &fleet.release.version,
                        &host,
                        &by,
                        Some(job_id.clone()),
                    )
                    .await;
                (host, job_id, started)
            }
            Action::Deploy {
                host,
                job_id,
                migrate,
            } => {
                if self.job_exists(&job_id) {
                    return None;
                }
                let args = DeployArgs {
                    app: fleet.app.clone(),
                    version: fleet.release.version.clone(),
                    hosts: Hosts {
                        names: vec![host.clone()],
                        ..Hosts::default()
                    },
                    skip_backup: fleet.skip_backup,
                    // The previous release's retire (or a backup) may hold the app's lock for
                    // a moment; the wave's progress deadline bounds the wait.
                    wait_lock: true,
                    skip_migration: !migrate,
                    // The release's policy says whether its deploys keep the previous web
                    // container running for a warm revert.
                    keep_previous: fleet.release.policy.keep_previous,
                };
                let started = self.launcher.deploy(args, &by, Some(job_id.clone())).await;
                (host, job_id, started)
            }
            Action::Rollback {
                host,
                job_id,
                to_version,
            } => {
                if self.job_exists(&job_id) {
                    return None;
                }
                let args = RollbackArgs {
                    app: fleet.app.clone(),
                    to_version,
                    hosts: Hosts {
                        names: vec![host.clone()],
                        ..Hosts::default()
                    },
                    // A cancelled deploy may still hold the app's lock for a moment.
                    wait_lock: true,
                };
                let started = self
                    .launcher
                    .rollback(args, &by, Some(job_id.clone()))
                    .await;
                (host, job_id, started)
            }
            Action::Retire { host, job_id } => {
                if self.job_exists(&job_id) {
                    return None;
                }
                // Best effort: a host that does not take it stops the previous release at its
                // next deploy of the app or its agent's next start (recovery).
                if let Err(e) = self
                    .launcher
                    .retire(&fleet.app, &host, &by, Some(job_id.clone()))
                    .await
                {
                    warn!(release = %id, host = %host, job = %job_id, error = %e, "the previous release kept running for a revert could not be retired");
                }
                return None;
            }
            Action::Cancel { host, job_id } => {
                if let Err(e) = self.launcher.cancel(&job_id, &by).await {
                    warn!(release = %id, host = %host, job = %job_id, error = %e, "cancel of a release's deploy failed");
                }
                return None;
            }
            Action::Tell(m) => {
                self.tell(fleet, &m);
                return None;
            }
        };
        match started {
            Ok(_) => None,
            Err(e) => {
                warn!(release = %id, host = %host, job = %job_id, error = %e, "a release's job could not start");
                Some(Input::JobEnded {
                    host,
                    job_id,
                    ok: false,
                    why: format!("could not start: {e}"),
                })
            }
        }
    }

    /// Queues a milestone for every alert channel as an event (`notify::deliver_events`; best
    /// effort: a channel that fails is logged, not retried; the release's history keeps it).
    fn tell(&self, fleet: &FleetRelease, m: &Milestone) {
        let what = describe(m, fleet);
        info!(release = %fleet.id(), app = %fleet.app, milestone = %what, "release milestone");
        let event = AlertRecord {
            key: format!("release:{}", fleet.id()),
            kind: format!("release_{}", milestone_kind(m)),
            subject: fleet.app.clone(),
            message: format!(
                "release {} of {} {}: {what}",
                fleet.id(),
                fleet.app,
                fleet.release.version
            ),
            opened_unix_ms: now_ms(),
            ..AlertRecord::default()
        };
        if let Err(e) = self.shared.events.try_send(event) {
            warn!(release = %fleet.id(), error = %e, "release event dropped: the alert channels are behind");
        }
    }

    fn job_exists(&self, id: &str) -> bool {
        matches!(self.shared.store.job(id), Ok(Some(_)))
    }
}

/// Still to be driven: not finished, or halted with jobs in flight.
fn under_way(fleet: &FleetRelease) -> bool {
    !fleet.release.phase.is_finished()
        || fleet.release.hosts.iter().any(|h| {
            matches!(
                h.phase,
                HostPhase::Deploying { .. } | HostPhase::Reverting { .. }
            ) || matches!(h.pull, Pull::Pulling { .. })
        })
}

/// The engine's input for a release's job `job_id` on `host` that finished.
fn ended(host: &str, job_id: &str, job: &crate::jobs::JobRecord) -> Input {
    Input::JobEnded {
        host: host.to_string(),
        job_id: job_id.to_string(),
        ok: job.state() == JobState::Succeeded,
        why: job_why(job),
    }
}

/// Why a job ended as it did, from its first target that did not succeed.
fn job_why(job: &crate::jobs::JobRecord) -> String {
    let state = job.state();
    if state == JobState::Succeeded {
        return String::new();
    }
    job.targets
        .iter()
        .find(|t| !t.message.is_empty())
        .map(|t| {
            if t.step.is_empty() {
                format!("{}: {}", state.as_str(), t.message)
            } else {
                format!("{} at {}: {}", state.as_str(), t.step, t.message)
            }
        })
        .unwrap_or_else(|| state.as_str().to_string())
}

/// A milestone's name in its event's kind (`release_wave_passed`, ...).
fn milestone_kind(m: &Milestone) -> &'static str {
    match m {
        Milestone::Started => "started",
        Milestone::WavePassed { .. } => "wave_passed",
        Milestone::Halted { .. } => "halted",
        Milestone::Reverted { .. } => "reverted",
        Milestone::Succeeded => "succeeded",
    }
}

/// A milestone as one line of the release's history.
pub fn describe(m: &Milestone, fleet: &FleetRelease) -> String {
    match m {
        Milestone::Started => "first wave started".to_string(),
        Milestone::WavePassed { wave } => {
            format!("wave {} of {} passed", wave + 1, fleet.release.waves)
        }
        Milestone::Halted { why } => format!("halted: {why}"),
        Milestone::Reverted { why } => format!("reverted: {why}"),
        Milestone::Succeeded => "succeeded: every wave passed".to_string(),
    }
}
