//! The alert task: every tick it reads a snapshot from the store, asks the pure rules in
//! `alerts` which conditions hold and what changed, stores the changes (flushed) and only
//! then sends notifications through `notify`. Time comes in as an argument: production ticks
//! with the wall clock every `alerts_every`, tests call [`Alerting::tick`] with chosen times.
//!
//! Delivery is per channel (`webhook:<name>`, `email`): a round (the open message, a re-send,
//! the resolution) owes every configured channel the message; each tick tries only the
//! channels still in the alert's `pending` list, a success removes one, and the round is
//! complete when none is left. A channel that failed is logged and skipped, for every alert,
//! until its wait is over (30 s, doubling with each failure in a row, at most 15 min:
//! `alerts::after_failure`), and the channels that already took the message do not get it
//! twice. Which channels to
//! try is decided by the pure `alerts::delivery`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_model::backup::target::TargetSpec;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::alerts::{
    self, AlertKind, AlertRecord, ChannelHealth, HostFacts, JobFacts, Round, Snapshot, TargetFacts,
};
use crate::hoststate::host_state;
use crate::notify::{Notifier, Status};
use crate::shared::Shared;
use crate::store::StoreError;

/// How many of the newest jobs the rules look at.
pub const RECENT_JOBS: usize = 500;
/// How many validations per target are read for the newest passed one.
const RECENT_VALIDATIONS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum AlertingError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    pub opened: Vec<String>,
    pub resent: Vec<String>,
    pub resolved: Vec<String>,
    /// Channel deliveries that failed (retried once the channel's wait is over).
    pub failed_sends: usize,
    /// Channel deliveries not tried because the channel is waiting after failures.
    pub deferred_sends: usize,
}

/// Raises and resolves alerts. Cheap to clone; clones share one lock, so ticks never race.
#[derive(Debug, Clone)]
pub struct Alerting {
    shared: Arc<Shared>,
    notifier: Notifier,
    lock: Arc<Mutex<()>>,
    /// Channels that failed lately, by id (see `alerts::after_failure`).
    health: Arc<std::sync::Mutex<BTreeMap<String, ChannelHealth>>>,
}

impl Alerting {
    pub fn new(shared: Arc<Shared>) -> Alerting {
        let notifier = Notifier::new(&shared.config.notify);
        let lock = shared.alerting_lock.clone();
        Alerting {
            shared,
            notifier,
            lock,
            health: Arc::default(),
        }
    }

    fn health(&self, channel: &str) -> Option<ChannelHealth> {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.get(channel).copied()
    }

    fn set_health(&self, channel: &str, value: Option<ChannelHealth>) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match value {
            Some(h) => health.insert(channel.to_string(), h),
            None => health.remove(channel),
        };
    }

    /// What the rules see at `now_ms`, given the `stored` alerts (an open `job_failed`
    /// alert's job is always included).
    pub fn snapshot(&self, now_ms: i64, stored: &[AlertRecord]) -> Result<Snapshot, StoreError> {
        let shared = &self.shared;
        let config = &shared.config;
        let mut snapshot = Snapshot::default();
        for h in shared.store.hosts()? {
            let (seen, _) = shared.registry.seen(&h.name);
            let last_seen = seen.unwrap_or(0).max(h.last_seen_unix_ms);
            let silence =
                (last_seen > 0).then(|| Duration::from_millis((now_ms - last_seen).max(0) as u64));
            snapshot.hosts.push(HostFacts {
                state: host_state(
                    h.revoked_unix_ms.is_some(),
                    silence,
                    config.suspect_after,
                    config.down_after,
                ),
                cert_not_after_unix_ms: h.cert_not_after_unix.saturating_mul(1000),
                name: h.name,
            });
        }
        for t in shared.store.backup_targets()? {
            let max_age = TargetSpec::from_toml(&t.spec_toml, &t.name)
                .map(|s| s.verify.max_age())
                .unwrap_or(alerts::DEFAULT_BACKUP_SLA);
            let newest_backup_unix_ms = shared
                .store
                .target_backups(&t.name)?
                .into_iter()
                .flat_map(|(_, table)| table)
                .filter(|b| !b.local_dir.is_empty() || !b.remote.is_empty())
                .map(|b| b.finished_unix_ms)
                .max();
            let newest_passed_validation_unix_ms = shared
                .store
                .verifications(Some(&t.name), RECENT_VALIDATIONS)?
                .into_iter()
                .filter(|v| v.passed())
                .map(|v| v.finished_unix_ms)
                .max();
            snapshot.targets.push(TargetFacts {
                applied_unix_ms: t.created_since(),
                max_age,
                newest_backup_unix_ms,
                newest_passed_validation_unix_ms,
                name: t.name,
            });
        }
        // The newest jobs, and the failed job of every open `job_failed` alert however old:
        // a failure pushed out of the window by newer jobs stays open until a later success
        // of its kind and subject.
        let mut jobs = shared.store.jobs(None, RECENT_JOBS)?;
        let seen: std::collections::BTreeSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
        for a in stored {
            // The job id is in the key (older alerts also had it as their subject).
            if a.is_open()
                && a.kind == AlertKind::JobFailed.as_str()
                && let Some(id) = alerts::failed_job_id(&a.key)
                && !seen.contains(id)
                && let Some(job) = shared.store.job(id)?
            {
                jobs.push(job);
            }
        }
        for j in jobs {
            let state = j.state();
            if state.is_finished() {
                snapshot.jobs.push(JobFacts {
                    host: j
                        .failed_target()
                        .map(|t| t.host.clone())
                        .unwrap_or_default(),
                    state,
                    kind: j.kind,
                    subject: j.app,
                    finished_unix_ms: j.finished_unix_ms,
                    id: j.id,
                });
            }
        }
        Ok(snapshot)
    }

    /// One evaluation at `now_ms`.
    pub async fn tick(&self, now_ms: i64) -> Result<TickReport, AlertingError> {
        let _one_at_a_time = self.lock.lock().await;
        let store = &self.shared.store;
        let stored = store.alerts()?;
        let conditions = alerts::conditions(&self.snapshot(now_ms, &stored)?, now_ms);
        let changes = alerts::reconcile(
            &stored,
            &conditions,
            now_ms,
            self.shared.config.alert_resend,
        );
        let mut report = TickReport::default();

        // Stored and flushed before anything is sent.
        for c in &changes.to_open {
            store.put_alert(&AlertRecord {
                key: c.key.clone(),
                kind: c.kind.as_str().to_string(),
                subject: c.subject.clone(),
                message: c.message.clone(),
                opened_unix_ms: now_ms,
                ..AlertRecord::default()
            })?;
            info!(alert = %c.key, message = %c.message, "alert opened");
            report.opened.push(c.key.clone());
        }
        for key in &changes.to_resolve {
            if let Some(mut a) = store.alert(key)? {
                a.resolve(now_ms);
                store.put_alert(&a)?;
                info!(alert = %key, "alert resolved");
                report.resolved.push(key.clone());
            }
        }
        // A condition's message may change while it holds (the backup grows older).
        for c in &conditions {
            if let Some(mut a) = store.alert(&c.key)?
                && a.is_open()
                && a.message != c.message
            {
                a.message = c.message.clone();
                store.put_alert(&a)?;
            }
        }
        store.flush().await?;

        // Opened now or re-send due; rounds under way and undelivered resolutions go on too.
        let due: std::collections::BTreeSet<&str> = changes
            .to_open
            .iter()
            .map(|c| c.key.as_str())
            .chain(changes.to_resend.iter().map(String::as_str))
            .collect();
        let channels = self.notifier.channels();
        for mut a in store.alerts()? {
            let Some(delivery) = alerts::delivery(&a, due.contains(a.key.as_str()), &channels)
            else {
                continue;
            };
            let status = match delivery.round {
                Round::Open => Status::Open,
                Round::Resolution => Status::Resolved,
            };
            a.pending = delivery.channels.clone();
            for channel in &delivery.channels {
                if !alerts::channel_ready(self.health(channel).as_ref(), now_ms) {
                    report.deferred_sends += 1;
                    continue;
                }
                match self.notifier.send_to(channel, &a, status).await {
                    Ok(()) => {
                        self.set_health(channel, None);
                        alerts::mark_delivered(&mut a, channel);
                        store.put_alert(&a)?;
                    }
                    Err(e) => {
                        let health = alerts::after_failure(self.health(channel), now_ms);
                        self.set_health(channel, Some(health));
                        let wait =
                            Duration::from_millis((health.next_try_unix_ms - now_ms).max(0) as u64);
                        warn!(alert = %a.key, channel = %channel, status = status.as_str(), error = %e,
                            failures = health.failures, retry_in = %humantime::format_duration(wait),
                            "alert notification failed; the channel is tried again later");
                        report.failed_sends += 1;
                    }
                }
            }
            let resend = a.sends > 0;
            if alerts::complete_round(&mut a, delivery.round, now_ms)
                && delivery.round == Round::Open
                && resend
            {
                report.resent.push(a.key.clone());
            }
            store.put_alert(&a)?;
        }
        store.flush().await?;
        Ok(report)
    }

    /// Ticks every `every` with `clock()` until `shutdown` fires.
    pub async fn run(
        self,
        clock: impl Fn() -> i64 + Send + 'static,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let cut_short = shutdown.clone();
        crate::shared::every(every, shutdown, || async {
            // The shutdown token also cuts a tick short (its sends have timeouts anyway).
            tokio::select! {
                _ = cut_short.cancelled() => {}
                result = self.tick(clock()) => {
                    if let Err(e) = result {
                        warn!(error = %e, "alert tick failed");
                    }
                }
            }
        })
        .await;
    }
}
