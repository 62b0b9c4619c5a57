//! The controller daemon's core: open the data dir (CA, admin bundle, store), then serve the
//! three gRPC services over mTLS on a listener it is given (through `transport`, which owns the
//! connections and their limits), until a shutdown token fires.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_daemon::tracked;
use drover_identity::pki::Ca;
use drover_proto::v1;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing::{info, warn};

use crate::ControllerError;
use crate::alerting::Alerting;
use crate::config::ControllerConfig;
use crate::enrollment::EnrollmentApi;
use crate::hoststate::{HostState, host_state};
use crate::jobs::JobUpdate;
use crate::operator::OperatorApi;
use crate::scheduler::Scheduler;
use crate::sessions::{AgentApi, Registry};
use crate::store::{HostRecord, Store};

/// How long open sessions get to close after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

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

/// How many job updates a slow `WatchJob` stream may fall behind before it re-reads the store.
const JOB_UPDATES_BUFFER: usize = 1024;

/// An opened controller: its state, ready to serve.
#[derive(Debug)]
pub struct Controller {
    shared: Arc<Shared>,
    server_chain_pem: String,
    server_key_pem: String,
    liveness: drover_daemon::Liveness,
}

/// Where the controller keeps things under its data dir.
pub fn admin_bundle_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("operator").join("admin")
}

impl Controller {
    /// Opens the data dir. On first start this creates the CA (key 0600); the admin operator
    /// bundle in `<data-dir>/operator/admin/` is written when missing and renewed when due.
    pub fn open(config: ControllerConfig) -> Result<Controller, ControllerError> {
        config.validate()?;
        drover_identity::files::ensure_private_dir(&config.data_dir)?;
        let (ca, created) = Ca::load_or_create(&config.data_dir.join("ca"))?;
        if created {
            info!(data_dir = %config.data_dir.display(), fingerprint = %ca.fingerprint(), "created a new Drover CA");
        }
        let store = Store::open(&config.data_dir.join("store"))?;
        // The admin bundle is (re)issued when missing, revoked or due, and recorded first.
        if let Some((serial, due)) = crate::operators::ensure_admin_bundle(
            &config.data_dir,
            &ca,
            &store,
            config.operator_cert_ttl,
            drover_identity::pki::unix_now(),
        )? {
            info!(dir = %admin_bundle_dir(&config.data_dir).display(), serial = %serial, reason = due.as_str(), "wrote the admin operator bundle");
        }
        crate::enrollment::settle_labels(&store)?;
        // The server certificate is re-issued at every start and never written to disk.
        let (server_chain_pem, server_key_pem) =
            ca.issue_server(&config.tls_names, Duration::from_secs(365 * 24 * 3600))?;
        Ok(Controller {
            shared: Arc::new(Shared {
                config,
                store,
                ca,
                registry: Registry::default(),
                job_updates: broadcast::channel(JOB_UPDATES_BUFFER).0,
                shutdown: CancellationToken::new(),
                scheduler_lock: Arc::default(),
                alerting_lock: Arc::default(),
            }),
            server_chain_pem,
            server_key_pem,
            liveness: Default::default(),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The parts the daemon's watchdog checks: the accept loop of the port and the scheduler,
    /// alert and admin-bundle tasks, registered by [`Controller::serve`].
    pub fn liveness(&self) -> drover_daemon::Liveness {
        self.liveness.clone()
    }

    /// Serves on `listener` until `shutdown` is cancelled, then closes agent sessions and
    /// returns within [`SHUTDOWN_GRACE`].
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ControllerError> {
        let shared = self.shared.clone();
        let tls = drover_identity::tls::server_config(
            &self.server_chain_pem,
            &self.server_key_pem,
            shared.ca.cert_pem(),
        )
        .map_err(|e| ControllerError::Tls(e.to_string()))?;
        let (_, nofile) = drover_daemon::raise_open_files_limit();
        let (limits, note) = crate::transport::fit_to_nofile(&shared.config.connections, nofile)
            .map_err(ControllerError::Io)?;
        crate::transport::log_limits(&limits, nofile, note.as_deref());
        let addr = listener
            .local_addr()
            .map_err(|e| ControllerError::Io(e.to_string()))?;
        // Each service reads messages of at most the size it needs.
        let routes = Routes::new(
            v1::enrollment_server::EnrollmentServer::new(EnrollmentApi::new(shared.clone()))
                .max_decoding_message_size(crate::transport::ENROLLMENT_MAX_MESSAGE),
        )
        .add_service(
            v1::agent_service_server::AgentServiceServer::new(AgentApi {
                shared: shared.clone(),
            })
            .max_decoding_message_size(crate::transport::SESSION_MAX_MESSAGE),
        )
        .add_service(
            v1::operator_service_server::OperatorServiceServer::new(OperatorApi {
                shared: shared.clone(),
            })
            .max_decoding_message_size(crate::transport::OPERATOR_MAX_MESSAGE),
        )
        .prepare();
        // Targets applied before their `[schedule]` was read (or before an upgrade) get the
        // schedules it asks for.
        let synced = crate::scheduler::sync_all_targets(&shared, now_ms())?;
        if !synced.is_empty() {
            shared.store.flush().await?;
            info!(changes = ?synced, "target schedules synced at start");
        }
        info!(listen = %addr, "controller serving");
        // Background tasks, tracked: they stop on the same token and are joined before the
        // final flush, so no tick is half-way through a write when the store is flushed.
        let mut background = tokio::task::JoinSet::new();
        // The scheduler stops with everything else, on the same token.
        if !shared.config.scheduler_tick.is_zero() {
            background.spawn(tracked(
                self.liveness.part("scheduler"),
                Scheduler::new(shared.clone()).run(
                    now_ms,
                    shared.config.scheduler_tick,
                    shared.shutdown.clone(),
                ),
            ));
        }
        // So does the alert task.
        if !shared.config.alerts_every.is_zero() {
            background.spawn(tracked(
                self.liveness.part("alert task"),
                Alerting::new(shared.clone()).run(
                    now_ms,
                    shared.config.alerts_every,
                    shared.shutdown.clone(),
                ),
            ));
        }
        // And the task that keeps the admin bundle valid.
        background.spawn(tracked(
            self.liveness.part("admin bundle renewal"),
            crate::operators::keep_admin_bundle(shared.clone()),
        ));
        // The one shutdown path: the caller's token ends agent sessions (long-lived streams
        // that would hold a graceful close open forever) and stops the transport, which closes
        // every connection and returns once their tasks are done.
        let signal_shared = shared.clone();
        let sessions_closed = tokio::spawn(async move {
            shutdown.cancelled().await;
            signal_shared.shutdown.cancel();
            signal_shared.registry.close_all();
        });
        tracked(
            self.liveness.part("controller port"),
            crate::transport::serve(
                listener,
                Arc::new(tls),
                routes,
                limits,
                shared.shutdown.clone(),
                SHUTDOWN_GRACE,
            ),
        )
        .await;
        sessions_closed.abort();
        // The transport returned: the token is cancelled, so each task ends after the tick it
        // is in. One that does not within the grace is aborted (and said so).
        shared.shutdown.cancel();
        let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while background.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            warn!(
                left = background.len(),
                "background tasks did not end within the shutdown grace; aborted"
            );
            background.shutdown().await;
        }
        shared.store.flush().await?;
        info!("controller stopped");
        Ok(())
    }
}
