//! The Drover agent: the daemon on each host.
//!
//! It enrolls once with a one-time token (`enroll`), then keeps one mTLS session to the
//! controller (`session`): heartbeats, health reports (`health`, `docker`), job events from
//! the durable outbox (`store`), certificate renewal. See ARCHITECTURE.md for the map.

pub mod apps;
pub mod backoff;
pub mod backup;
pub mod config;
pub mod convert;
pub mod docker;
pub mod enroll;
pub mod error;
pub mod health;
pub mod httpcheck;
pub mod job;
pub mod jobs;
pub mod lock;
pub mod objectstore;
pub mod postgres;
pub mod proxy;
pub mod recovery;
pub mod redact;
pub mod registry;
pub mod release;
pub mod secrets;
mod session;
pub mod store;
pub mod wsrelay;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::AgentConfig;
pub use error::AgentError;

use enroll::{Enrollment, Paths};
use health::{HostFacts, Status};
use store::{NewEvent, Store};

/// Wall-clock time in Unix milliseconds.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the agent is doing, for the daemon's watchdog, `dev` and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStatus {
    pub connected: bool,
    /// Sessions established since start.
    pub sessions: u64,
    /// Certificates renewed over a live session since start.
    pub renewals: u64,
    /// Expired certificates replaced by re-enrollment (the enrolled key) since start.
    pub reenrollments: u64,
    pub cert_not_after_unix: i64,
    pub acked_seq: u64,
    pub clock_offset_ms: Option<i64>,
    pub health: Option<Status>,
    pub last_error: String,
}

/// Where job code records events: stored and flushed first, sent after, deleted once the
/// controller acknowledges them. The one door through which job text leaves the host: every
/// message and field is redacted here (`redact`), before it is stored.
#[derive(Clone, Debug)]
pub struct Outbox {
    store: Arc<Store>,
    notify: Arc<Notify>,
    redactor: redact::Redactor,
}

impl Outbox {
    /// An outbox over `store` that redacts what `redactor` knows.
    pub fn new(store: Arc<Store>, redactor: redact::Redactor) -> Outbox {
        Outbox {
            store,
            notify: Arc::new(Notify::new()),
            redactor,
        }
    }

    /// Records an event durably (its secrets cut out) and returns its sequence number.
    pub async fn record(&self, mut event: NewEvent) -> Result<u64, AgentError> {
        self.redactor
            .redact_event(&mut event.message, &mut event.fields);
        if let Some(payload) = event.payload.as_mut() {
            self.redactor.redact_payload(payload);
        }
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let stored = self.store.append(event, at).await?;
        self.notify.notify_one();
        Ok(stored.seq)
    }

    /// Events recorded but not yet acknowledged by the controller.
    pub fn pending(&self) -> usize {
        self.store.pending_count()
    }
}

/// An enrolled agent, ready to run.
pub struct Agent {
    config: AgentConfig,
    paths: Paths,
    enrollment: Enrollment,
    store: Arc<Store>,
    notify: Arc<Notify>,
    status: watch::Sender<AgentStatus>,
    queue: jobs::JobQueue,
    commands: tokio::sync::mpsc::UnboundedReceiver<jobs::Work>,
    redactor: redact::Redactor,
    liveness: drover_daemon::Liveness,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host", &self.enrollment.host)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the agent's state under `config.data_dir`. Fails with a clear error when the host
    /// is not enrolled.
    pub fn open(config: AgentConfig) -> Result<Agent, AgentError> {
        config.validate()?;
        let paths = Paths::new(&config.data_dir);
        let enrollment = Enrollment::load(&paths)?;
        drover_identity::files::Bundle::recover(&paths.identity_dir)?;
        if !drover_identity::files::Bundle::exists(&paths.identity_dir) {
            return Err(AgentError::NotEnrolled(
                paths.identity_dir.join("cert.pem").display().to_string(),
            ));
        }
        let store = Arc::new(Store::open(&paths.store_dir)?);
        let (status, _) = watch::channel(AgentStatus::default());
        let (queue, commands) = jobs::JobQueue::new();
        Ok(Agent {
            config,
            paths,
            enrollment,
            store,
            notify: Arc::new(Notify::new()),
            status,
            queue,
            commands,
            redactor: redact::Redactor::default(),
            liveness: drover_daemon::Liveness::default(),
        })
    }

    /// Shares `redactor` (the one the daemon's log writer uses) instead of a fresh one, so
    /// the secrets jobs learn are cut out of log lines too.
    pub fn with_redactor(mut self, redactor: redact::Redactor) -> Agent {
        self.redactor = redactor;
        self
    }

    pub fn host(&self) -> &str {
        &self.enrollment.host
    }

    pub fn outbox(&self) -> Outbox {
        Outbox {
            store: self.store.clone(),
            notify: self.notify.clone(),
            redactor: self.redactor.clone(),
        }
    }

    /// Where jobs are submitted (the session does, for the controller's commands).
    pub fn jobs(&self) -> jobs::JobQueue {
        self.queue.clone()
    }

    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// The parts the daemon's watchdog checks: the session loop, the job runner, the health
    /// sampler and each app proxy's accept loop, registered by [`Agent::run`].
    pub fn liveness(&self) -> drover_daemon::Liveness {
        self.liveness.clone()
    }

    /// Runs until `shutdown` is cancelled: the job runner (which first converges what a crash
    /// interrupted and brings the app proxies back), the health sampler and the controller
    /// session. Ends early, with the error, when the session can never come back (an expired
    /// certificate the controller will not renew): everything stops as on a shutdown.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        info!(host = %self.enrollment.host, version = env!("CARGO_PKG_VERSION"), "agent starting");
        // One stop for every task: the caller's shutdown, or a session that cannot continue.
        let shutdown = shutdown.child_token();
        // Read once: the proxies' connection budget comes from it, so slow clients cannot
        // take the descriptors backups and Docker calls need.
        let (before, nofile) = drover_daemon::raise_open_files_limit();
        let budget = proxy::fd_budget(nofile);
        info!(
            limit = nofile,
            raised_from = before,
            proxy_connections = budget,
            "open-file limit"
        );
        let jobs_ctx = Arc::new(job::step::JobCtx {
            host: self.enrollment.host.clone(),
            store: self.store.clone(),
            outbox: self.outbox(),
            redactor: self.redactor.clone(),
            cancels: job::step::Cancels::default(),
            docker: docker::connect(&self.config.docker_socket),
            apps: apps::Apps::new(self.config.proxy.limits(budget))
                .with_listen_ip(self.config.proxy.listen_ip)
                .with_liveness(self.liveness.clone()),
            secrets_dir: self.config.secrets_dir.clone(),
            registry_auth: self.config.registry_auth.clone(),
            backups_dir: self.config.data_dir.join("backups"),
            shutdown: shutdown.clone(),
            lock_lease: self.config.lock_lease,
        });
        // Watched for silence too: its loop beats while it waits for commands (jobs run in
        // tasks of their own, so a long job never holds the loop).
        let runner_part = self
            .liveness
            .part_with_heartbeat("job runner", drover_daemon::max_silence());
        let runner_beat = runner_part.heartbeat();
        let runner = tokio::spawn(drover_daemon::tracked(
            runner_part,
            jobs::run(jobs_ctx.clone(), self.commands, runner_beat),
        ));
        let (facts_tx, facts_rx) = watch::channel(None::<HostFacts>);
        let sampler = tokio::spawn(drover_daemon::tracked(
            self.liveness.part("health sampler"),
            sample_health(
                jobs_ctx.clone(),
                self.config.health_sample_interval,
                facts_tx,
                shutdown.clone(),
            ),
        ));
        // Watched for silence too: every wait in a session is bounded (`session::WAIT_LIMIT`)
        // and the loop beats while it waits, backoff included.
        let session_part = self
            .liveness
            .part_with_heartbeat("controller session loop", drover_daemon::max_silence());
        let ctx = session::SessionCtx {
            config: self.config,
            paths: self.paths,
            enrollment: self.enrollment,
            store: self.store,
            notify: self.notify,
            status: self.status,
            facts: facts_rx,
            jobs: self.queue,
            beat: session_part.heartbeat(),
        };
        let result =
            drover_daemon::tracked(session_part, session::run(ctx, shutdown.clone())).await;
        shutdown.cancel();
        for (name, task) in [("health sampler", sampler), ("job runner", runner)] {
            if let Err(err) = task.await {
                warn!(error = %err, "{name} ended abnormally");
            }
        }
        info!("agent stopped");
        result
    }
}

/// Samples host facts every `every` and publishes them; the session decides what to send.
async fn sample_health(
    jobs: Arc<job::step::JobCtx>,
    every: std::time::Duration,
    facts: watch::Sender<Option<HostFacts>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut sample = match tokio::task::spawn_blocking(health::collect_host).await {
            Ok(sample) => sample,
            Err(err) => {
                warn!(error = %err, "collecting host facts failed");
                continue;
            }
        };
        sample.docker = jobs.docker.probe().await;
        if sample.docker.reachable {
            sample.apps = jobs::app_facts(&jobs).await;
        }
        facts.send_replace(Some(sample));
    }
}
