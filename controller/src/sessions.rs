//! AgentService: one long-lived stream per agent. Heartbeats, health reports and job events
//! come in; Welcome, acks, heartbeat replies, commands and renewed certificates go out.
//!
//! Events are persisted (flushed) before they are acknowledged, and de-duplicated by
//! (host, seq), so an agent that replays after a reconnect never produces a second copy. A new
//! event moves its job on (`jobs::apply_event`, in the same store transaction); once the batch
//! is flushed, watchers hear of it and the next target's command is sent. A new session is
//! first sent every command due on its host that its agent has not started. A backup catalog
//! or validation an event carries is kept only when `provenance` allows it (the job was sent
//! to this host and works on that target); a refused one is logged and its event stored
//! stripped and acknowledged.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_identity::Identity;
use drover_model::backup::catalog;
use drover_model::jobevent::Payload;
use drover_proto::v1;
use drover_proto::v1::agent_message::Msg as In;
use drover_proto::v1::controller_message::Msg as Out;
use futures::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::authorize;
use crate::convert;
use crate::jobs::{self, JobRecord, JobUpdate};
use crate::provenance;
pub use crate::registry::{Outbound, Registry};
use crate::shared::{Shared, now_ms};
use crate::store::{Carried, EventRecord, Ingested, JobChange};

/// How long an agent has to say Hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Events taken in one persist-then-ack round.
const MAX_BATCH: usize = 256;

pub type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ControllerMessage, Status>> + Send>>;

fn out(msg: Out) -> Result<v1::ControllerMessage, Status> {
    Ok(v1::ControllerMessage { msg: Some(msg) })
}

/// The AgentService implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let shared = self.shared.clone();
        let caller = authorize(&request, &shared.store)?;
        let Identity::Agent { host } = caller.identity else {
            return Err(Status::permission_denied("not an agent certificate"));
        };
        let record = shared.store.host(&host).map_err(internal)?.ok_or_else(|| {
            Status::permission_denied(format!("host {host} is not enrolled here"))
        })?;
        if record.revoked_unix_ms.is_some() {
            return Err(Status::permission_denied(format!(
                "host {host} was revoked; enroll it again with a new token"
            )));
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(v1::AgentMessage {
                msg: Some(In::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => return Err(Status::invalid_argument("a session must start with Hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
        };
        if hello.host != host {
            return Err(Status::permission_denied(format!(
                "this certificate is for host {host}, but Hello says {}",
                hello.host
            )));
        }
        let now = now_ms();
        if !hello.labels.is_empty() {
            // An older agent still sends its `[labels]`: a host never chooses its own.
            debug!(host = %host, "ignoring the labels in Hello: a host's labels come from its enrollment token");
        }
        shared
            .store
            .update_host(&host, |h| {
                h.agent_version = hello.agent_version.clone();
                h.last_seen_unix_ms = now;
                // The certificate this host really uses, which re-enrollment also accepts.
                h.session_serial = caller.serial.clone();
            })
            .map_err(internal)?;
        let acked_seq = shared.store.last_event_seq(&host).map_err(internal)?;
        info!(host = %host, version = %hello.agent_version, acked_seq, "agent session opened");

        let (tx, rx) = mpsc::channel(64);
        let heartbeat_interval_secs = shared.config.heartbeat_interval.as_secs().max(1) as u32;
        tx.send(out(Out::Welcome(v1::Welcome {
            acked_seq,
            heartbeat_interval_secs,
        })))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;
        // Registered once Welcome is queued, so a command sent to this host comes after it.
        let (session_id, cancel) = shared.registry.register(&host, now, tx.clone());
        // The drive loop runs in its own task so the handler returns the response stream now.
        tokio::spawn(drive(shared, host, session_id, cancel, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn internal(err: impl std::fmt::Display) -> Status {
    Status::internal(err.to_string())
}

async fn drive(
    shared: Arc<Shared>,
    host: String,
    session_id: u64,
    cancel: CancellationToken,
    mut inbound: Streaming<v1::AgentMessage>,
    tx: Outbound,
) {
    if let Err(err) = resend_commands(&shared, &host, &tx).await {
        warn!(host = %host, error = %err, "could not send the host its pending commands");
    }
    let end = loop {
        let first = tokio::select! {
            // Shutdown first: it also closes every session's token.
            biased;
            _ = shared.shutdown.cancelled() => break Some(shutting_down()),
            _ = cancel.cancelled() => break closing_status(&shared, &host),
            msg = inbound.message() => msg,
        };
        let first = match first {
            Ok(Some(msg)) => msg,
            Ok(None) => break None,
            Err(status) => {
                info!(host = %host, error = %status.message(), "agent stream broke");
                break None;
            }
        };
        // Take whatever else is already waiting, so events are persisted and acknowledged in
        // batches: one flush per batch rather than one per event.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match inbound.message().now_or_never() {
                Some(Ok(Some(msg))) => batch.push(msg),
                _ => break,
            }
        }
        match handle_batch(&shared, &host, batch, &tx).await {
            Ok(()) => {}
            Err(status) => break Some(status),
        }
    };
    shared.registry.unregister(&host, session_id);
    let now = now_ms();
    let _ = shared
        .store
        .update_host(&host, |h| h.last_seen_unix_ms = now);
    if let Some(status) = end {
        info!(host = %host, reason = %status.message(), "closing agent session");
        let _ = tx.send(Err(status)).await;
    } else {
        info!(host = %host, "agent session closed");
    }
}

/// What a session is told when the controller stops.
fn shutting_down() -> Status {
    Status::unavailable("the controller is shutting down; the agent reconnects when it is back")
}

/// Why a session's token was cancelled: the host revoked, the controller shutting down (its
/// shutdown closes every session), or a newer session of the same host.
fn closing_status(shared: &Shared, host: &str) -> Option<Status> {
    if shared.shutdown.is_cancelled() {
        return Some(shutting_down());
    }
    let revoked = shared
        .store
        .host(host)
        .ok()
        .flatten()
        .is_some_and(|h| h.revoked_unix_ms.is_some());
    Some(if revoked {
        Status::permission_denied(format!("host {host} was revoked"))
    } else {
        Status::aborted("a newer session of this host replaced this one")
    })
}

async fn handle_batch(
    shared: &Shared,
    host: &str,
    batch: Vec<v1::AgentMessage>,
    tx: &Outbound,
) -> Result<(), Status> {
    let now = now_ms();
    shared.registry.touch(host, now);
    let mut highest_event: Option<u64> = None;
    let mut replies = Vec::new();
    // Told to watchers and agents only once the batch is durable.
    let mut updates: Vec<JobUpdate> = Vec::new();
    let mut dispatches: Vec<(JobRecord, String)> = Vec::new();
    for msg in batch {
        match msg.msg {
            Some(In::Heartbeat(hb)) => replies.push(Out::HeartbeatAck(v1::HeartbeatAck {
                agent_sent_unix_ms: hb.sent_unix_ms,
                controller_unix_ms: now_ms(),
            })),
            Some(In::Health(report)) => {
                let snapshot = convert::health_from_proto(&report);
                shared
                    .store
                    .update_host(host, |h| {
                        h.agent_version = snapshot.agent_version.clone();
                        h.cert_not_after_unix = snapshot.cert_not_after_unix;
                        h.last_seen_unix_ms = now;
                        h.health = Some(snapshot.clone());
                    })
                    .map_err(internal)?;
            }
            Some(In::Event(event)) => {
                if !event.host.is_empty() && event.host != host {
                    warn!(host = %host, claimed = %event.host, "agent sent an event as another host");
                    return Err(Status::permission_denied(format!(
                        "this certificate is for host {host}; it may not send events as host {}",
                        event.host
                    )));
                }
                if event.seq == 0 {
                    return Err(Status::invalid_argument(
                        "event sequence numbers start at 1",
                    ));
                }
                let (record, unread) = convert::event_from_proto(host, &event, now);
                ingest(shared, record, unread, &mut updates, &mut dispatches)?;
                highest_event = Some(highest_event.unwrap_or(0).max(event.seq));
            }
            Some(In::Renew(renew)) => {
                let identity = Identity::Agent {
                    host: host.to_string(),
                };
                let issued = shared
                    .ca
                    .sign_csr(&renew.csr_pem, &identity, shared.config.agent_cert_ttl)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                shared
                    .store
                    .update_host(host, |h| {
                        h.serials.push(issued.serial.clone());
                        h.cert_not_after_unix = issued.not_after_unix;
                    })
                    .map_err(internal)?;
                shared.store.flush().await.map_err(internal)?;
                info!(host = %host, serial = %issued.serial, "agent certificate renewed");
                replies.push(Out::Renew(v1::RenewResponse {
                    cert_pem: issued.cert_pem,
                }));
            }
            Some(In::Hello(_)) => {
                return Err(Status::invalid_argument("Hello may only be sent once"));
            }
            None => {}
        }
    }
    if let Some(seq) = highest_event {
        // Durable first, acknowledged second.
        shared.store.flush().await.map_err(internal)?;
        let upto = shared
            .store
            .last_event_seq(host)
            .map_err(internal)?
            .max(seq);
        replies.push(Out::Ack(v1::Ack { upto_seq: upto }));
    }
    for update in updates {
        // No watcher is no error.
        let _ = shared.job_updates.send(update);
    }
    for (job, target) in dispatches {
        let sent = send_command(shared, &job, &target);
        info!(job = %job.id, host = %target, sent, "next target's turn");
    }
    for reply in replies {
        if tx.send(out(reply)).await.is_err() {
            return Err(Status::cancelled("agent went away"));
        }
    }
    Ok(())
}

/// Stores one event with its effects (its job's new state, the release table it carries) and
/// collects what to tell once the batch is flushed: watcher updates, commands now due.
fn ingest(
    shared: &Shared,
    mut record: EventRecord,
    unread: Option<convert::UnreadPayload>,
    updates: &mut Vec<JobUpdate>,
    dispatches: &mut Vec<(JobRecord, String)>,
) -> Result<(), Status> {
    let host = record.host.clone();
    if let Some(why) = unread {
        warn!(host = %host, seq = record.seq, kind = %provenance::excerpt(&record.kind), error = %provenance::excerpt(&why.to_string()), "record the event carried not kept");
    }
    // The host's own records: every backup and validation in them is the reporting host's.
    match record.payload.as_mut() {
        Some(Payload::Catalog { backups, .. }) => {
            backups.iter_mut().for_each(|b| b.host = host.clone())
        }
        Some(Payload::Verification(v)) => v.host = host.clone(),
        _ => {}
    }
    // A backup record is kept only from the host its job was sent to (see `provenance`).
    let target = field_of(&record, catalog::field::TARGET);
    let job = || match record.job_id.as_str() {
        "" => Ok(None),
        id => shared.store.job(id).map_err(internal),
    };
    let refusal = match &record.payload {
        Some(Payload::Catalog { backups, .. }) => {
            provenance::check_catalog(&host, &record.job_id, &target, backups, job()?.as_ref())
                .err()
        }
        Some(Payload::Verification(v)) => {
            provenance::check_verification(&host, &record.job_id, &target, v, job()?.as_ref()).err()
        }
        _ => None,
    };
    let record = match refusal {
        None => record,
        Some(refusal) => {
            warn!(
                host = %host,
                seq = record.seq,
                kind = %record.kind,
                job = %provenance::excerpt(&record.job_id),
                reason = %refusal,
                "backup record refused: not kept"
            );
            refused(record, &refusal)
        }
    };
    // What the event carries is stored with it, in one transaction.
    let carried = match &record.payload {
        Some(Payload::Releases { app, releases }) if !app.is_empty() => {
            Some(Carried::Releases(app, releases))
        }
        Some(Payload::Catalog { backups, .. }) => Some(Carried::Catalog(&target, backups)),
        Some(Payload::Verification(v)) => Some(Carried::Verification(v)),
        _ => None,
    };
    let ingested = shared
        .store
        .ingest_event(&record, carried, |job| jobs::apply_event(job, &record))
        .map_err(internal)?;
    let JobChange { before, after } = match ingested {
        Ingested::Duplicate => {
            tracing::debug!(host = %host, seq = record.seq, "duplicate event ignored");
            return Ok(());
        }
        Ingested::Stored { job: None } => return Ok(()),
        Ingested::Stored { job: Some(change) } => *change,
    };
    updates.push(JobUpdate::Event(record));
    if jobs::targets_changed(&before, &after) {
        let state = after.state();
        if state.is_finished() {
            info!(job = %after.id, app = %after.app, state = state.as_str(), "job finished");
        }
        updates.push(JobUpdate::Job(Box::new(after.clone())));
    }
    for next in jobs::newly_dispatched(&before, &after) {
        dispatches.push((after.clone(), next));
    }
    Ok(())
}

fn field_of(record: &EventRecord, name: &str) -> String {
    record.fields.get(name).cloned().unwrap_or_default()
}

/// What is stored of an event whose backup record was refused: the event (so its seq is
/// taken and acknowledged) without the record, outside any job, saying why.
fn refused(mut record: EventRecord, refusal: &provenance::Refusal) -> EventRecord {
    let claimed_job = std::mem::take(&mut record.job_id);
    let target = record.fields.get(catalog::field::TARGET).cloned();
    record.fields.clear();
    record.payload = None;
    record.fields.insert("refused".into(), refusal.to_string());
    if !claimed_job.is_empty() {
        record
            .fields
            .insert("claimed_job".into(), provenance::excerpt(&claimed_job));
    }
    if let Some(t) = target {
        record
            .fields
            .insert(catalog::field::TARGET.into(), provenance::excerpt(&t));
    }
    record.message = format!("{} refused: {refusal}", record.kind);
    record
}

/// Sends `job`'s command to `host` if its session is open. Returns whether it was handed to
/// the session (it is sent again on the host's next session until the agent starts it).
pub fn send_command(shared: &Shared, job: &JobRecord, host: &str) -> bool {
    let Some(tx) = shared.registry.sender(host) else {
        return false;
    };
    let msg = out(Out::Command(convert::command_to_proto(job)));
    match tx.try_send(msg) {
        Ok(()) => true,
        // A busy session: hand it over without holding up the caller.
        Err(mpsc::error::TrySendError::Full(msg)) => {
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Sends `Cancel` for `job` to `host` if its session is open. Returns whether it was handed
/// to the session (it is sent again on the host's next session until the host's part ends).
pub fn send_cancel(shared: &Shared, job: &JobRecord, host: &str) -> bool {
    let Some(tx) = shared.registry.sender(host) else {
        return false;
    };
    let msg = out(Out::Cancel(convert::cancel_to_proto(job)));
    match tx.try_send(msg) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(msg)) => {
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// On a new session: every command whose turn came on this host and that its agent has not
/// started, and a `Cancel` for every cancelled job whose part on this host has not ended. The
/// agent ignores a job id it already knows, and a cancel of a job that ended, so sending
/// either twice is harmless.
async fn resend_commands(shared: &Shared, host: &str, tx: &Outbound) -> Result<(), ResendError> {
    let open = shared.store.open_jobs()?;
    for job in &open {
        let msg = if job.awaits_start_on(host) {
            info!(host = %host, job = %job.id, "sending the command of a job not started yet");
            Out::Command(convert::command_to_proto(job))
        } else if job.cancel_due_on(host) {
            info!(host = %host, job = %job.id, "sending the cancel of a job not ended yet");
            Out::Cancel(convert::cancel_to_proto(job))
        } else {
            continue;
        };
        tx.send(out(msg)).await.map_err(|_| ResendError::Closed)?;
    }
    Ok(())
}

/// Why a new session's pending commands were not all sent (they go again on the next one).
#[derive(Debug, thiserror::Error)]
enum ResendError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the session closed")]
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_session_closes_the_old_one() {
        let registry = Registry::default();
        let (tx, _rx) = mpsc::channel(1);
        let (id1, t1) = registry.register("h", 1, tx.clone());
        let (id2, t2) = registry.register("h", 2, tx);
        assert!(t1.is_cancelled() && !t2.is_cancelled());
        registry.unregister("h", id1); // the old session's teardown must not drop the new one
        assert_eq!(registry.seen("h"), (Some(2), true));
        registry.unregister("h", id2);
        assert_eq!(registry.seen("h"), (Some(2), false));
        assert!(!registry.close("h"));
    }
}
