//! The controller daemon's core: open the data dir (CA, admin bundle, store), then serve the
//! three gRPC services over mTLS on a listener it is given (through `transport`, which owns the
//! connections and their limits), until a shutdown token fires.

use std::sync::Arc;
use std::time::Duration;

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
use crate::operator::OperatorApi;
use crate::operators::admin_bundle_dir;
use crate::scheduler::Scheduler;
use crate::sessions::{AgentApi, Registry};
pub use crate::shared::{Shared, every, now_ms};
use crate::store::Store;

/// How long open sessions get to close after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How many job updates a slow `WatchJob` stream may fall behind before it re-reads the store.
const JOB_UPDATES_BUFFER: usize = 1024;

/// An opened controller: its state, ready to serve.
#[derive(Debug)]
pub struct Controller {
    shared: Arc<Shared>,
    /// The other end of `Shared::events`, taken by `serve`.
    events: tokio::sync::mpsc::Receiver<crate::alerts::AlertRecord>,
    server_chain_pem: String,
    server_key_pem: String,
    liveness: drover_daemon::Liveness,
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
        let (events, events_rx) = tokio::sync::mpsc::channel(crate::notify::EVENTS_BUFFER);
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
                release_lock: Arc::default(),
                events,
            }),
            events: events_rx,
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
            .map_err(|e| ControllerError::Io(e.to_string()))?;
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
        // And the release driver.
        background.spawn(tracked(
            self.liveness.part("release driver"),
            crate::release::driver::Releases::new(shared.clone()).run(shared.shutdown.clone()),
        ));
        // And the one sender of events to the alert channels.
        background.spawn(crate::notify::deliver_events(
            crate::notify::Notifier::new(&shared.config.notify),
            self.events,
            shared.shutdown.clone(),
        ));
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
        // Watched for silence too: the accept loop beats between connections.
        let port_part = self
            .liveness
            .part_with_heartbeat("controller port", drover_daemon::max_silence());
        let port_beat = port_part.heartbeat();
        tracked(
            port_part,
            crate::transport::serve(
                listener,
                Arc::new(tls),
                routes,
                limits,
                shared.shutdown.clone(),
                SHUTDOWN_GRACE,
                port_beat,
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
