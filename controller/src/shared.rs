//! The state every service shares (`Shared`: config, store, CA, session registry, job
//! updates, the shutdown token) and the small helpers they all use (`now_ms`, `every`). Below
//! the services and the server: it imports none of them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_identity::pki::Ca;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::ControllerConfig;
use crate::hoststate::{HostState, host_state};
use crate::jobs::JobUpdate;
use crate::registry::Registry;
use crate::store::{HostRecord, Store};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs `tick` every `every` (a late tick is skipped, not caught up) until `shutdown` fires:
/// the loop of the scheduler and alert tasks.
pub async fn every<F, Fut>(every: Duration, shutdown: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        tick().await;
    }
}

/// State shared by every RPC handler.
#[derive(Debug)]
pub struct Shared {
    pub config: ControllerConfig,
    pub store: Store,
    pub ca: Ca,
    pub registry: Registry,
    /// Every change to a job, after it is stored, for `WatchJob` streams.
    pub job_updates: broadcast::Sender<JobUpdate>,
    pub shutdown: CancellationToken,
    /// Held by a scheduler tick, so two ticks (the task's and a test's) never race.
    pub scheduler_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held by an alert tick, likewise.
    pub alerting_lock: Arc<tokio::sync::Mutex<()>>,
    /// Events (release milestones) for the alert channels, delivered in order by one task
    /// (`notify::deliver_events`); bounded, so a dead channel cannot pile them up.
    pub events: tokio::sync::mpsc::Sender<crate::alerts::AlertRecord>,
    /// Held by whoever steps a fleet release (the driver's tick, an operator's start or
    /// control), so a release is never stepped from two stored states at once.
    pub release_lock: Arc<tokio::sync::Mutex<()>>,
}

/// What the controller knows of a host's session now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostView {
    pub state: HostState,
    /// The newer of the stored and the live session's last-seen time (0: never).
    pub last_seen_unix_ms: i64,
    pub session_open: bool,
}

impl Shared {
    /// `h`'s state at `now_ms`: connected, suspect or down from its silence, or revoked.
    pub fn host_view(&self, h: &HostRecord, now_ms: i64) -> HostView {
        let (seen, open) = self.registry.seen(&h.name);
        let last_seen = seen.unwrap_or(0).max(h.last_seen_unix_ms);
        let silence =
            (last_seen > 0).then(|| Duration::from_millis((now_ms - last_seen).max(0) as u64));
        HostView {
            state: host_state(
                h.revoked_unix_ms.is_some(),
                silence,
                self.config.suspect_after,
                self.config.down_after,
            ),
            last_seen_unix_ms: last_seen,
            session_open: open,
        }
    }
}
