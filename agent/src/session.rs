//! The agent's one session with the controller: connect out over mTLS, say Hello, then
//! heartbeat, report health, replay and stream outbox events, and renew the certificate, until
//! the connection breaks (then reconnect with backoff) or the agent shuts down. A certificate
//! that expired while no session could renew it is re-enrolled (the enrolled key proves who
//! this is) before the next connect.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_identity::files::Bundle;
use drover_identity::pki::{CertInfo, new_key_and_csr, unix_now};
use drover_identity::tls::{ClientCert, Trust, channel, client_config};
use drover_proto::v1;
use drover_proto::v1::agent_message::Msg as Out;
use drover_proto::v1::controller_message::Msg as In;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::convert;
use crate::enroll::{Enrollment, Paths};
use crate::health::{self, Check, HostFacts};
use crate::store::Store;
use crate::{AgentError, AgentStatus, backoff};

/// Events sent but not yet acknowledged, at most. Bounds memory on both sides and keeps the
/// outbound channel from filling while acks are pending.
const SEND_WINDOW: u64 = 256;

/// The longest any one wait of a session may take: re-enrollment, the controller's Welcome, a
/// message handed to the connection. Past it the session is given up and made again, so the
/// loop is never stuck, and the watchdog's heartbeat (beaten at least this often) stays true.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// What a session needs; shared across reconnects.
pub(crate) struct SessionCtx {
    pub config: AgentConfig,
    pub paths: Paths,
    pub enrollment: Enrollment,
    pub store: Arc<Store>,
    pub notify: Arc<Notify>,
    pub status: watch::Sender<AgentStatus>,
    pub facts: watch::Receiver<Option<HostFacts>>,
    pub jobs: crate::jobs::JobQueue,
    /// Beaten while the loop runs (the watchdog's check that it is not hung).
    pub beat: drover_daemon::Heartbeat,
}

impl SessionCtx {
    fn controller(&self) -> &str {
        if self.config.controller.is_empty() {
            &self.enrollment.controller
        } else {
            &self.config.controller
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs sessions until `shutdown`, reconnecting with jittered exponential backoff. Returns an
/// error only when no reconnect can help: the certificate expired and the controller will not
/// renew it ([`AgentError::ReenrollRefused`]).
pub(crate) async fn run(ctx: SessionCtx, shutdown: CancellationToken) -> Result<(), AgentError> {
    let mut attempt: u32 = 0;
    // Set when the controller's TLS refused our certificate as expired although our clock
    // says it is not: re-enroll anyway.
    let mut refused_as_expired = false;
    while !shutdown.is_cancelled() {
        ctx.beat.beat();
        let started = tokio::time::Instant::now();
        let result = session(&ctx, &shutdown, &mut attempt, &mut refused_as_expired).await;
        ctx.status.send_modify(|s| s.connected = false);
        match result {
            Ok(()) => return Ok(()),
            Err(err @ AgentError::ReenrollRefused { .. }) => {
                // Said once, by the caller (the daemon's last line), not here as well.
                ctx.status.send_modify(|s| s.last_error = err.to_string());
                return Err(err);
            }
            Err(err) => {
                refused_as_expired = says_certificate_expired(&err);
                warn!(controller = %ctx.controller(), error = %err, "session to the controller ended");
                ctx.status.send_modify(|s| s.last_error = err.to_string());
            }
        }
        // A session that lived a while resets the backoff; a flapping one keeps growing it.
        if started.elapsed() > Duration::from_secs(30) {
            attempt = 0;
        }
        let delay = backoff::delay(
            attempt,
            Duration::from_millis(500),
            ctx.config.reconnect_max,
            rand::random::<f64>(),
        );
        attempt = attempt.saturating_add(1);
        debug!(
            delay_ms = delay.as_millis() as u64,
            attempt, "reconnecting after backoff"
        );
        // Beating while it waits: a backoff may last up to `reconnect_max` (an hour).
        let wake = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < wake {
            ctx.beat.beat();
            let nap = wake.min(tokio::time::Instant::now() + drover_daemon::BEAT_EVERY);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(nap) => {}
            }
        }
    }
    Ok(())
}

/// `work`, or a timeout after [`WAIT_LIMIT`] saying what did not happen.
async fn within<T>(
    controller: &str,
    what: &str,
    work: impl std::future::Future<Output = Result<T, AgentError>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(WAIT_LIMIT, work).await {
        Ok(r) => r,
        Err(_) => Err(AgentError::Unreachable {
            controller: controller.to_string(),
            message: format!("{what} within {} s", WAIT_LIMIT.as_secs()),
        }),
    }
}

fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whether a failed session says the controller refused our certificate as expired (the TLS
/// alert, under TLS 1.3 seen on the first call).
fn says_certificate_expired(err: &AgentError) -> bool {
    let text = err.to_string();
    text.contains("CertificateExpired") || text.contains("certificate expired")
}

struct Live {
    out: mpsc::Sender<v1::AgentMessage>,
    cert: CertInfo,
    acked: u64,
    sent_upto: u64,
    clock_offset_ms: Option<i64>,
    last_checks: Vec<Check>,
    pending_key: Option<String>,
}

impl Live {
    /// Hands `msg` to the connection; a controller that has not taken this session's
    /// messages for [`WAIT_LIMIT`] ends the session (it is made again).
    async fn send(&self, msg: Out) -> Result<(), AgentError> {
        match tokio::time::timeout(
            WAIT_LIMIT,
            self.out.send(v1::AgentMessage { msg: Some(msg) }),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(AgentError::Rpc {
                code: "Cancelled".into(),
                message: "the session's outbound stream closed".into(),
            }),
            Err(_) => Err(AgentError::Rpc {
                code: "DeadlineExceeded".into(),
                message: format!(
                    "the controller took none of this session's messages for {} s",
                    WAIT_LIMIT.as_secs()
                ),
            }),
        }
    }
}

/// One session: returns Ok on shutdown, Err when the connection ends or fails.
async fn session(
    ctx: &SessionCtx,
    shutdown: &CancellationToken,
    attempt: &mut u32,
    refused_as_expired: &mut bool,
) -> Result<(), AgentError> {
    Bundle::recover(&ctx.paths.identity_dir)?;
    let mut bundle = Bundle::load(&ctx.paths.identity_dir)?;
    let mut cert = CertInfo::from_pem(&bundle.cert_pem)?;
    let controller = ctx.controller().to_string();
    if *refused_as_expired || cert.not_after_unix <= unix_now() {
        // TLS refuses an expired certificate everywhere: a session cannot renew it. The
        // enrolled key can, within the controller's grace.
        info!(controller = %controller, not_after = %rfc3339(cert.not_after_unix),
              "the agent certificate has expired; asking the controller for a new one with the enrolled key");
        let renewed = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = within(&controller, "re-enrollment did not finish",
                       crate::enroll::reenroll(&ctx.paths, &controller)) => r?,
        };
        ctx.beat.beat();
        *refused_as_expired = false;
        info!(
            not_after = %rfc3339(renewed.not_after_unix),
            "agent certificate re-issued after it expired"
        );
        ctx.status.send_modify(|s| s.reenrollments += 1);
        bundle = Bundle::load(&ctx.paths.identity_dir)?;
        cert = renewed;
    }
    let tls = client_config(
        &Trust::Ca(bundle.ca_pem.clone()),
        Some(&ClientCert {
            cert_pem: bundle.cert_pem.clone(),
            key_pem: bundle.key_pem.clone(),
        }),
    )?;
    let mut client = v1::agent_service_client::AgentServiceClient::new(channel(
        &controller,
        tls,
        Duration::from_secs(10),
    )?);

    let (out_tx, out_rx) = mpsc::channel::<v1::AgentMessage>(1024);
    // No labels in Hello: a host's labels come from its enrollment token.
    out_tx
        .send(v1::AgentMessage {
            msg: Some(Out::Hello(v1::Hello {
                host: ctx.enrollment.host.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                last_command_id: ctx.store.last_command_id()?,
                labels: Default::default(),
            })),
        })
        .await
        .ok();
    let connect = async {
        let response = client
            .session(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| AgentError::from_status(&controller, s))?;
        let mut inbound = response.into_inner();
        match inbound.message().await {
            Ok(Some(v1::ControllerMessage {
                msg: Some(In::Welcome(w)),
            })) => Ok((inbound, w)),
            Ok(_) => Err(AgentError::Rpc {
                code: "Internal".into(),
                message: "the controller did not start the session with Welcome".into(),
            }),
            Err(status) => Err(AgentError::from_status(&controller, status)),
        }
    };
    let (mut inbound, welcome) = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = within(&controller, "the controller did not welcome the session", connect) => r?,
    };
    ctx.beat.beat();

    // The controller holds everything up to `acked_seq`: drop it here, and never reuse those
    // numbers even if this host's store is younger than the controller's memory of it.
    ctx.store.advance_seq(welcome.acked_seq).await?;
    ctx.store.ack(welcome.acked_seq).await?;
    let acked = ctx.store.acked_seq()?.max(welcome.acked_seq);
    let heartbeat_every = if welcome.heartbeat_interval_secs > 0 {
        Duration::from_secs(u64::from(welcome.heartbeat_interval_secs))
            .min(ctx.config.heartbeat_interval)
    } else {
        ctx.config.heartbeat_interval
    };
    info!(controller = %controller, host = %ctx.enrollment.host, acked_seq = acked,
          pending = ctx.store.pending_count(), "session established");
    *attempt = 0;
    ctx.status.send_modify(|s| {
        s.connected = true;
        s.sessions += 1;
        s.cert_not_after_unix = cert.not_after_unix;
        s.last_error.clear();
    });

    let mut live = Live {
        out: out_tx,
        cert,
        acked,
        sent_upto: acked,
        clock_offset_ms: None,
        last_checks: Vec::new(),
        pending_key: None,
    };
    let mut facts_rx = ctx.facts.clone();
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    let mut report = tokio::time::interval(ctx.config.health_interval);
    let mut renew_check = tokio::time::interval(Duration::from_secs(1));
    let mut beat = tokio::time::interval(drover_daemon::BEAT_EVERY);
    for tick in [&mut heartbeat, &mut report, &mut renew_check, &mut beat] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    pump_events(ctx, &mut live).await?;

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = beat.tick() => ctx.beat.beat(),
            _ = heartbeat.tick() => {
                live.send(Out::Heartbeat(v1::Heartbeat { sent_unix_ms: now_ms() })).await?;
            }
            _ = report.tick() => {
                let facts = facts_rx.borrow().clone();
                send_health(ctx, &mut live, facts, true).await?;
            }
            changed = facts_rx.changed() => {
                if changed.is_ok() {
                    let facts = facts_rx.borrow_and_update().clone();
                    send_health(ctx, &mut live, facts, false).await?;
                }
            }
            _ = ctx.notify.notified() => pump_events(ctx, &mut live).await?,
            _ = renew_check.tick() => maybe_renew(&mut live).await?,
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return Err(AgentError::Unreachable {
                        controller: controller.clone(),
                        message: "the controller closed the session".into(),
                    }),
                    Err(status) => return Err(AgentError::from_status(&controller, status)),
                };
                handle_inbound(ctx, &mut live, msg).await?;
            }
        }
    }
}

/// Sends outbox events past `sent_upto`, keeping at most SEND_WINDOW unacknowledged.
async fn pump_events(ctx: &SessionCtx, live: &mut Live) -> Result<(), AgentError> {
    loop {
        let room = SEND_WINDOW.saturating_sub(live.sent_upto - live.acked);
        if room == 0 {
            return Ok(());
        }
        let batch = ctx.store.pending_after(live.sent_upto, room as usize)?;
        if batch.is_empty() {
            return Ok(());
        }
        for event in &batch {
            live.send(Out::Event(convert::event_to_proto(event)))
                .await?;
            live.sent_upto = event.seq;
            // A slow controller that keeps taking messages is progress, not a hang.
            ctx.beat.beat();
        }
    }
}

async fn send_health(
    ctx: &SessionCtx,
    live: &mut Live,
    facts: Option<HostFacts>,
    periodic: bool,
) -> Result<(), AgentError> {
    let Some(mut facts) = facts else {
        return Ok(());
    };
    facts.agent_version = env!("CARGO_PKG_VERSION").to_string();
    facts.cert_not_after_unix = Some(live.cert.not_after_unix);
    facts.clock_offset_ms = live.clock_offset_ms;
    facts.now_unix = unix_now();
    let checks = health::evaluate(&facts, &ctx.config.health);
    if !periodic && !health::changed(&live.last_checks, &checks) {
        return Ok(());
    }
    let overall = health::overall(&checks);
    if health::changed(&live.last_checks, &checks) && !live.last_checks.is_empty() {
        info!(status = overall.as_str(), "host health changed");
    }
    ctx.status.send_modify(|s| s.health = Some(overall));
    let msg = convert::health_to_proto(&facts, &checks, overall);
    live.last_checks = checks;
    live.send(Out::Health(msg)).await
}

async fn maybe_renew(live: &mut Live) -> Result<(), AgentError> {
    if live.pending_key.is_some() || unix_now() < live.cert.renew_at_unix() {
        return Ok(());
    }
    let host = match &live.cert.identity {
        Some(drover_identity::Identity::Agent { host }) => host.clone(),
        _ => String::new(),
    };
    let (key_pem, csr_pem) = new_key_and_csr(&host)?;
    info!(
        not_after = live.cert.not_after_unix,
        "renewing the agent certificate"
    );
    live.pending_key = Some(key_pem);
    live.send(Out::Renew(v1::RenewRequest { csr_pem })).await
}

async fn handle_inbound(
    ctx: &SessionCtx,
    live: &mut Live,
    msg: v1::ControllerMessage,
) -> Result<(), AgentError> {
    match msg.msg {
        Some(In::Ack(ack)) => {
            if ack.upto_seq > live.acked {
                ctx.store.ack(ack.upto_seq).await?;
                live.acked = ack.upto_seq;
                ctx.status.send_modify(|s| s.acked_seq = ack.upto_seq);
            }
            pump_events(ctx, live).await?;
        }
        Some(In::HeartbeatAck(hb)) => {
            // NTP-style estimate: the controller's clock at the midpoint of the round trip.
            let now = now_ms();
            let rtt = (now - hb.agent_sent_unix_ms).max(0);
            let offset = hb.controller_unix_ms - (hb.agent_sent_unix_ms + rtt / 2);
            let first = live.clock_offset_ms.is_none();
            live.clock_offset_ms = Some(offset);
            ctx.status.send_modify(|s| s.clock_offset_ms = Some(offset));
            if first {
                // The first measurement completes the report: send it now rather than at the
                // next periodic report.
                let facts = ctx.facts.borrow().clone();
                send_health(ctx, live, facts, true).await?;
            }
        }
        Some(In::Renew(renew)) => {
            let Some(key_pem) = live.pending_key.take() else {
                warn!("ignoring a certificate renewal that was not asked for");
                return Ok(());
            };
            let info = CertInfo::from_pem(&renew.cert_pem)?;
            let current = Bundle::load(&ctx.paths.identity_dir)?;
            // Check the pair before it replaces the working one on disk.
            client_config(
                &Trust::Ca(current.ca_pem.clone()),
                Some(&ClientCert {
                    cert_pem: renew.cert_pem.clone(),
                    key_pem: key_pem.clone(),
                }),
            )?;
            Bundle {
                ca_pem: current.ca_pem,
                cert_pem: renew.cert_pem,
                key_pem,
            }
            .replace(&ctx.paths.identity_dir)?;
            info!(not_after = info.not_after_unix, "agent certificate renewed");
            live.cert = info;
            ctx.status.send_modify(|s| {
                s.renewals += 1;
                s.cert_not_after_unix = live.cert.not_after_unix;
            });
        }
        Some(In::Command(cmd)) => match crate::convert::job_from_command(&cmd, now_ms()) {
            Some(job) => ctx.jobs.submit(job),
            None => {
                warn!(job = %cmd.job_id, kind = %cmd.kind, "a command this agent does not understand; ignored (upgrade the agent)")
            }
        },
        Some(In::Cancel(c)) => ctx.jobs.cancel(&c.job_id, &c.requested_by),
        Some(In::Welcome(_)) | None => {}
    }
    Ok(())
}
