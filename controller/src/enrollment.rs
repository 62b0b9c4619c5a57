//! The Enrollment service: a one-time, host-bound, expiring token and a CSR in; a short-lived
//! agent certificate out. And re-enrollment: an agent whose certificate expired while it could
//! not renew (a controller outage, a host switched off) proves it still holds the enrolled key
//! and gets a fresh certificate, within `reenroll_grace`. Callers need no client certificate
//! here, so every refusal is logged with the caller's address, rate-limited.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_identity::pki::{CertInfo, csr_public_key, unix_now};
use drover_identity::token::EnrollToken;
use drover_identity::{Identity, validate_name};
use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::shared::{Shared, now_ms};
use crate::store::{HostRecord, Store, StoreError};

/// The largest certificate or CSR a re-enrollment may send (ours are under 1 KiB).
const MAX_PEM_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    pub shared: Arc<Shared>,
    refusals: Arc<RefusalLog>,
}

impl EnrollmentApi {
    pub fn new(shared: Arc<Shared>) -> EnrollmentApi {
        EnrollmentApi {
            shared,
            refusals: Arc::default(),
        }
    }

    /// Logs a refused attempt, unless refusals are being rate-limited; returns the status.
    fn refuse(&self, source: &str, host: &str, token: &str, status: Status) -> Status {
        self.refusals
            .log(now_ms(), source, host, token, status.message());
        status
    }
}

fn internal(err: impl std::fmt::Display) -> Status {
    Status::internal(err.to_string())
}

/// The caller's address, for the log.
fn source<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// A host name from the request as it may appear in a log: names that are not valid host
/// names (newlines, escapes, megabytes) are not repeated.
fn loggable_host(host: &str) -> &str {
    if validate_name(host).is_ok() {
        host
    } else {
        "(invalid)"
    }
}

/// A Unix time as RFC 3339 UTC, to the second (the dates in refusals).
pub fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[tonic::async_trait]
impl v1::enrollment_server::Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let shared = &self.shared;
        let source = source(&request);
        let req = request.into_inner();
        let host_for_log = loggable_host(&req.host).to_string();
        let refuse =
            |token: &str, status: Status| self.refuse(&source, &host_for_log, token, status);
        let token = EnrollToken::parse(&req.token)
            .map_err(|e| refuse("", Status::invalid_argument(e.to_string())))?;
        let record = shared
            .store
            .token(&token.secret_hash())
            .map_err(internal)?
            .ok_or_else(|| {
                refuse("", Status::permission_denied(
                    "enrollment token not recognised by this controller; create one with `drover token create --host NAME`",
                ))
            })?;
        let now = now_ms();
        let denied = |why: String| refuse(&record.id, Status::permission_denied(why));
        if record.revoked {
            return Err(denied(format!(
                "enrollment token {} was revoked",
                record.id
            )));
        }
        if record.used_unix_ms.is_some() {
            return Err(denied(format!(
                "enrollment token {} was already used; tokens work once, create a new one",
                record.id
            )));
        }
        if now >= record.expires_unix_ms {
            return Err(denied(format!(
                "enrollment token {} expired; create a new one with `drover token create --host {}`",
                record.id, record.host
            )));
        }
        if req.host != record.host || token.host != record.host {
            return Err(denied(format!(
                "enrollment token {} is for host {}, not {}",
                record.id, record.host, host_for_log
            )));
        }
        let identity = Identity::Agent {
            host: record.host.clone(),
        };
        let issued = shared
            .ca
            .sign_csr(&req.csr_pem, &identity, shared.config.agent_cert_ttl)
            .map_err(|e| refuse(&record.id, Status::invalid_argument(e.to_string())))?;
        // Consume the token only once everything else has worked, and atomically: of two
        // racing enrollments one wins.
        if !shared.store.consume_token(&record, now).map_err(internal)? {
            return Err(denied(format!(
                "enrollment token {} was already used",
                record.id
            )));
        }
        if !req.labels.is_empty() {
            // An agent from before labels came only from tokens: enrolled, its labels not.
            warn!(host = %record.host, "ignoring the labels the host sent at enrollment: a host's labels come from its token (`drover token create --label k=v`)");
        }
        let mut host = shared
            .store
            .host(&record.host)
            .map_err(internal)?
            .unwrap_or_else(|| HostRecord {
                name: record.host.clone(),
                ..HostRecord::default()
            });
        // The token's labels, and only those: a host never chooses its own.
        host.labels = record.labels.clone();
        host.enrolled_unix_ms = now;
        host.revoked_unix_ms = None;
        host.serials.push(issued.serial.clone());
        host.cert_not_after_unix = issued.not_after_unix;
        shared.store.put_host(&host).map_err(internal)?;
        shared.store.flush().await.map_err(internal)?;
        info!(host = %host.name, serial = %issued.serial, token = %record.id, source = %source, "host enrolled");
        Ok(Response::new(v1::EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: shared.ca.cert_pem().to_string(),
        }))
    }

    async fn reenroll(
        &self,
        request: Request<v1::ReenrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let shared = &self.shared;
        let source = source(&request);
        let req = request.into_inner();
        let refuse =
            |host: &str, status: Status| self.refuse(&source, loggable_host(host), "", status);
        if req.cert_pem.len() > MAX_PEM_BYTES || req.csr_pem.len() > MAX_PEM_BYTES {
            return Err(refuse(
                "",
                Status::invalid_argument(format!(
                    "certificate and CSR may be at most {MAX_PEM_BYTES} bytes each"
                )),
            ));
        }
        let cert = shared.ca.verify_issued(&req.cert_pem).map_err(|e| {
            refuse(
                "",
                Status::permission_denied(format!(
                    "{e}; enroll this host with a token from this controller (`drover token create --host NAME`)"
                )),
            )
        })?;
        let host_name = match &cert.identity {
            Some(Identity::Agent { host }) => host.clone(),
            _ => String::new(),
        };
        let record = shared.store.host(&host_name).map_err(internal)?;
        let serial_revoked = shared.store.is_revoked(&cert.serial).map_err(internal)?;
        let host = check_reenroll(
            record.as_ref(),
            &cert,
            serial_revoked,
            unix_now(),
            shared.config.reenroll_grace,
        )
        .map_err(|why| refuse(&host_name, Status::permission_denied(why.to_string())))?;
        // The CSR's signature is checked against the key it carries, and that key must be the
        // certificate's: only the holder of the enrolled private key gets past here.
        let requested = csr_public_key(&req.csr_pem)
            .map_err(|e| refuse(&host, Status::invalid_argument(e.to_string())))?;
        if requested != cert.public_key {
            return Err(refuse(
                &host,
                Status::permission_denied(format!(
                    "the CSR is not signed with the key of host {host}'s certificate; re-enrollment needs the enrolled key, else enroll again with a new token (`drover token create --host {host}`)"
                )),
            ));
        }
        let identity = Identity::Agent { host: host.clone() };
        let issued = shared
            .ca
            .sign_csr(&req.csr_pem, &identity, shared.config.agent_cert_ttl)
            .map_err(|e| refuse(&host, Status::invalid_argument(e.to_string())))?;
        shared
            .store
            .update_host(&host, |h| {
                h.serials.push(issued.serial.clone());
                h.cert_not_after_unix = issued.not_after_unix;
            })
            .map_err(internal)?;
        shared.store.flush().await.map_err(internal)?;
        info!(host = %host, serial = %issued.serial, previous = %cert.serial,
              expired_at = %rfc3339(cert.not_after_unix), source = %source,
              "agent certificate re-issued after it expired");
        Ok(Response::new(v1::EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: shared.ca.cert_pem().to_string(),
        }))
    }
}

/// Why a re-enrollment is refused. Each message says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReenrollRefusal {
    NotAnAgent,
    UnknownHost(String),
    Revoked(String),
    /// Not the host's newest certificate (nor the one it last connected with): a later one
    /// was issued and used, or the host was enrolled again elsewhere.
    Superseded(String),
    PastGrace {
        host: String,
        expired_unix: i64,
        grace: Duration,
    },
}

impl std::fmt::Display for ReenrollRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let again = |host: &str| {
            format!("enroll it again with a new token (`drover token create --host {host}`)")
        };
        match self {
            ReenrollRefusal::NotAnAgent => {
                write!(f, "only agent certificates can be re-enrolled")
            }
            ReenrollRefusal::UnknownHost(host) => write!(
                f,
                "host {host} is not enrolled with this controller; {}",
                again(host)
            ),
            ReenrollRefusal::Revoked(host) => {
                write!(f, "host {host} was revoked; {}", again(host))
            }
            ReenrollRefusal::Superseded(host) => write!(
                f,
                "this is not the newest certificate of host {host} (a later one was issued); {}",
                again(host)
            ),
            ReenrollRefusal::PastGrace {
                host,
                expired_unix,
                grace,
            } if grace.is_zero() => write!(
                f,
                "the certificate of host {host} expired at {} and this controller does not re-enroll expired certificates (reenroll_grace = 0s); {}",
                rfc3339(*expired_unix),
                again(host)
            ),
            ReenrollRefusal::PastGrace {
                host,
                expired_unix,
                grace,
            } => write!(
                f,
                "the certificate of host {host} expired at {}, longer ago than the re-enrollment grace ({}); {}",
                rfc3339(*expired_unix),
                humantime::format_duration(*grace),
                again(host)
            ),
        }
    }
}

/// The pure rule of re-enrollment, for a certificate this CA issued (checked before): an agent
/// identity of a known, non-revoked host; a serial that is not revoked and is the host's
/// newest, or the one its last session used; expired no longer than `grace` ago (a
/// certificate that has not expired passes too: the agent's clock may run ahead). Returns the
/// host. Possession of the key is checked separately (the CSR).
pub fn check_reenroll(
    host: Option<&HostRecord>,
    cert: &CertInfo,
    serial_revoked: bool,
    now_unix: i64,
    grace: Duration,
) -> Result<String, ReenrollRefusal> {
    let Some(Identity::Agent { host: name }) = &cert.identity else {
        return Err(ReenrollRefusal::NotAnAgent);
    };
    let Some(host) = host.filter(|h| &h.name == name) else {
        return Err(ReenrollRefusal::UnknownHost(name.clone()));
    };
    if host.revoked_unix_ms.is_some() || serial_revoked {
        return Err(ReenrollRefusal::Revoked(name.clone()));
    }
    let newest = host.serials.last() == Some(&cert.serial);
    let last_used = !host.session_serial.is_empty() && host.session_serial == cert.serial;
    if !(newest || last_used) {
        return Err(ReenrollRefusal::Superseded(name.clone()));
    }
    let expired_for = now_unix - cert.not_after_unix;
    let grace_secs = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    if expired_for > 0 && (grace.is_zero() || expired_for > grace_secs) {
        return Err(ReenrollRefusal::PastGrace {
            host: name.clone(),
            expired_unix: cert.not_after_unix,
            grace,
        });
    }
    Ok(name.clone())
}

/// At start: host labels come from tokens only (once per store; see
/// [`Store::labels_from_tokens`]).
pub fn settle_labels(store: &Store) -> Result<(), StoreError> {
    let changed = store.labels_from_tokens()?;
    if !changed.is_empty() {
        warn!(hosts = ?changed, "host labels reset to those of each host's enrollment token: labels a host had set for itself are gone");
    }
    Ok(())
}

/// How many refusals are logged per window; the rest are counted.
const LOG_BURST: u32 = 20;
/// The window of [`LOG_BURST`].
const LOG_WINDOW_MS: i64 = 60_000;
/// How much of a refusal's reason is logged.
const MAX_REASON_CHARS: usize = 200;
/// Source addresses kept for the summary of a window's unlogged refusals.
const SUMMARY_SOURCES: usize = 8;

/// Refused enrollment attempts, logged with their source and rate-limited, so that a flood of
/// bad tokens says where it comes from without filling the journal. Never logs a secret: the
/// token appears only as its id (a prefix of the hash of its secret), and only when known.
#[derive(Debug, Default)]
pub struct RefusalLog {
    window: Mutex<LogWindow>,
}

impl RefusalLog {
    fn log(&self, now_ms: i64, source: &str, host: &str, token: &str, reason: &str) {
        // A refusal can quote what the caller sent (a malformed host name): a bounded excerpt.
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        let verdict = match self.window.lock() {
            Ok(mut window) => window.admit(now_ms, source),
            Err(_) => return,
        };
        match verdict {
            Verdict::Log { unlogged, sources } => {
                if unlogged > 0 {
                    warn!(refusals = unlogged, sources = ?sources, "enrollment refusals not logged in the last minute (rate limit)");
                }
                warn!(source = %source, host = %host, token = %token, reason = %reason, "enrollment refused");
            }
            Verdict::LimitReached => warn!(
                source = %source, host = %host, token = %token, reason = %reason,
                "enrollment refused; more than {LOG_BURST} refusals this minute: further ones are counted, not logged, until the minute is over"
            ),
            Verdict::Quiet => {}
        }
    }
}

/// One window of the refusal log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogWindow {
    started_ms: i64,
    logged: u32,
    unlogged: u64,
    sources: BTreeSet<String>,
}

/// What to do with one refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, after a summary of the previous window's unlogged refusals when there were any.
    Log { unlogged: u64, sources: Vec<String> },
    /// Log it, saying that the rest of this window is counted only.
    LimitReached,
    /// Count it.
    Quiet,
}

impl LogWindow {
    /// The pure rule: at most [`LOG_BURST`] lines per [`LOG_WINDOW_MS`], the last of them
    /// saying so; the next window's first line is preceded by how many went unlogged and from
    /// where (a few sources).
    pub fn admit(&mut self, now_ms: i64, source: &str) -> Verdict {
        let mut carried = (0, Vec::new());
        if now_ms - self.started_ms >= LOG_WINDOW_MS || now_ms < self.started_ms {
            carried = (
                self.unlogged,
                std::mem::take(&mut self.sources).into_iter().collect(),
            );
            *self = LogWindow {
                started_ms: now_ms,
                ..LogWindow::default()
            };
        }
        if self.logged < LOG_BURST {
            self.logged += 1;
            if self.logged == LOG_BURST {
                return Verdict::LimitReached;
            }
            return Verdict::Log {
                unlogged: carried.0,
                sources: carried.1,
            };
        }
        self.unlogged += 1;
        if self.sources.len() < SUMMARY_SOURCES {
            // The address without the port: one client's retries count once.
            let addr = source
                .rsplit_once(':')
                .map(|(a, _)| a)
                .unwrap_or(source)
                .to_string();
            self.sources.insert(addr);
        }
        Verdict::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(host: &str, serial: &str, not_after: i64) -> CertInfo {
        CertInfo {
            identity: Some(Identity::Agent { host: host.into() }),
            serial: serial.into(),
            not_before_unix: not_after - 100,
            not_after_unix: not_after,
            public_key: Vec::new(),
        }
    }

    fn host(serials: &[&str]) -> HostRecord {
        HostRecord {
            name: "web-1".into(),
            serials: serials.iter().map(|s| s.to_string()).collect(),
            ..HostRecord::default()
        }
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn reenrollment_takes_the_newest_unrevoked_certificate_within_the_grace() {
        let now = 10_000_000;
        let grace = 30 * DAY;
        let h = host(&["a", "b"]);
        let ok =
            |h: &HostRecord, c: &CertInfo, revoked| check_reenroll(Some(h), c, revoked, now, grace);
        assert_eq!(
            ok(&h, &cert("web-1", "b", now - 3600), false).unwrap(),
            "web-1"
        );
        // Not yet expired (the agent's clock runs ahead): also fine.
        assert!(ok(&h, &cert("web-1", "b", now + 60), false).is_ok());
        // Exactly at the end of the grace: fine; a second later: refused, naming the date.
        let edge = now - grace.as_secs() as i64;
        assert!(ok(&h, &cert("web-1", "b", edge), false).is_ok());
        let err = ok(&h, &cert("web-1", "b", edge - 1), false).unwrap_err();
        assert!(matches!(err, ReenrollRefusal::PastGrace { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("expired at 1970-") && text.contains("30days"),
            "{text}"
        );
        assert!(text.contains("drover token create --host web-1"), "{text}");
        // An older serial: refused, unless it is the one the last session used (the answer
        // to a renewal was lost).
        assert_eq!(
            ok(&h, &cert("web-1", "a", now - 60), false),
            Err(ReenrollRefusal::Superseded("web-1".into()))
        );
        let used = HostRecord {
            session_serial: "a".into(),
            ..h.clone()
        };
        assert!(ok(&used, &cert("web-1", "a", now - 60), false).is_ok());
        assert!(ok(&used, &cert("web-1", "b", now - 60), false).is_ok());
        // Revoked host, revoked serial, unknown host, another host's record, no agent.
        let revoked = HostRecord {
            revoked_unix_ms: Some(1),
            ..h.clone()
        };
        assert_eq!(
            ok(&revoked, &cert("web-1", "b", now - 60), false),
            Err(ReenrollRefusal::Revoked("web-1".into()))
        );
        assert_eq!(
            ok(&h, &cert("web-1", "b", now - 60), true),
            Err(ReenrollRefusal::Revoked("web-1".into()))
        );
        assert_eq!(
            check_reenroll(None, &cert("web-1", "b", now), false, now, grace),
            Err(ReenrollRefusal::UnknownHost("web-1".into()))
        );
        assert_eq!(
            ok(&h, &cert("web-2", "b", now), false),
            Err(ReenrollRefusal::UnknownHost("web-2".into()))
        );
        let operator = CertInfo {
            identity: Some(Identity::Operator {
                name: "web-1".into(),
                role: drover_identity::Role::Admin,
            }),
            ..cert("web-1", "b", now)
        };
        assert_eq!(ok(&h, &operator, false), Err(ReenrollRefusal::NotAnAgent));
        // A grace of 0s turns re-enrollment of expired certificates off.
        let err = check_reenroll(
            Some(&h),
            &cert("web-1", "b", now - 1),
            false,
            now,
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(err.to_string().contains("reenroll_grace = 0s"), "{err}");
    }

    #[test]
    fn the_refusal_log_is_rate_limited_per_minute_and_summarises_what_it_skipped() {
        let mut w = LogWindow::default();
        let t0 = 1_000_000;
        let mut verdicts = Vec::new();
        for i in 0..200 {
            verdicts.push(w.admit(t0 + i, &format!("10.0.0.{}:4{i:03}", i % 3)));
        }
        let logged = verdicts.iter().filter(|v| **v != Verdict::Quiet).count();
        assert_eq!(logged, LOG_BURST as usize);
        assert_eq!(verdicts[LOG_BURST as usize - 1], Verdict::LimitReached);
        assert!(matches!(verdicts[0], Verdict::Log { unlogged: 0, .. }));
        // The next minute starts with the count and the (port-less) sources of the skipped.
        let next = w.admit(t0 + LOG_WINDOW_MS, "10.0.0.9:1");
        assert_eq!(
            next,
            Verdict::Log {
                unlogged: 200 - LOG_BURST as u64,
                sources: vec!["10.0.0.0".into(), "10.0.0.1".into(), "10.0.0.2".into()],
            }
        );
        // And a quiet minute after that carries nothing.
        let later = w.admit(t0 + 3 * LOG_WINDOW_MS, "10.0.0.9:1");
        assert_eq!(
            later,
            Verdict::Log {
                unlogged: 0,
                sources: vec![]
            }
        );
    }
}
