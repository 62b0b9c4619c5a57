//! Operator identities the controller issues: every certificate is recorded (name, role,
//! serial, issued, expires) so it can be listed and revoked, and the admin bundle in
//! `<data-dir>/operator/admin/` is kept valid by the controller itself (renewed at start and
//! before it expires, swapped as a whole).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drover_identity::files::Bundle;
use drover_identity::pki::{Ca, CertInfo, Issued, fingerprint_pem};
use drover_identity::{Identity, Role};
use tracing::{info, warn};

use crate::ControllerError;
use crate::shared::Shared;
use crate::store::{OperatorCertRecord, Store, StoreError};

/// Where the controller keeps things under its data dir.
pub fn admin_bundle_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("operator").join("admin")
}

/// The name of the operator whose bundle the controller keeps.
pub const ADMIN: &str = "admin";

/// Who issued the admin bundle, in its record.
pub const BY_CONTROLLER: &str = "controller";

/// Records an issued operator certificate. Not yet durable: flush before handing it out.
pub fn record(
    store: &Store,
    name: &str,
    role: Role,
    issued: &Issued,
    by: &str,
    now_ms: i64,
) -> Result<OperatorCertRecord, StoreError> {
    let record = OperatorCertRecord {
        name: name.to_string(),
        role: role.to_string(),
        serial: issued.serial.clone(),
        issued_unix_ms: now_ms,
        expires_unix_ms: issued.not_after_unix.saturating_mul(1000),
        created_by: by.to_string(),
        revoked_unix_ms: None,
    };
    store.record_operator_cert(&record)?;
    Ok(record)
}

/// Why the admin bundle is (re)issued; None: it is fine as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Missing,
    Unreadable,
    /// Its CA is not this controller's (a data dir restored from elsewhere).
    ForeignCa,
    Revoked,
    /// Past 40 % of its life, like agent certificates.
    Renewal,
    /// It outlives what `operator_cert_ttl` allows (a bundle from before the default was cut
    /// from 365 to 30 days).
    TooLong,
}

impl Due {
    pub fn as_str(self) -> &'static str {
        match self {
            Due::Missing => "missing",
            Due::Unreadable => "unreadable",
            Due::ForeignCa => "issued by another CA",
            Due::Revoked => "revoked",
            Due::Renewal => "due for renewal",
            Due::TooLong => "valid longer than operator_cert_ttl",
        }
    }
}

/// The pure rule: should the admin bundle be issued again now?
pub fn admin_bundle_due(
    cert: Option<&CertInfo>,
    same_ca: bool,
    revoked: bool,
    now_unix: i64,
    ttl: Duration,
) -> Option<Due> {
    let Some(cert) = cert else {
        return Some(Due::Unreadable);
    };
    if !same_ca {
        return Some(Due::ForeignCa);
    }
    if revoked {
        return Some(Due::Revoked);
    }
    if now_unix >= cert.renew_at_unix() {
        return Some(Due::Renewal);
    }
    // A minute of slack: a bundle issued a moment ago under the same ttl is not "too long".
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    if cert.not_after_unix - now_unix > ttl_secs.saturating_add(60) {
        return Some(Due::TooLong);
    }
    None
}

/// Issues the admin bundle when it is missing or [`admin_bundle_due`] says so; the new
/// certificate is recorded (flushed) before the bundle is swapped in as a whole. Returns the
/// new serial and why, or None when the bundle was fine.
pub fn ensure_admin_bundle(
    data_dir: &Path,
    ca: &Ca,
    store: &Store,
    ttl: Duration,
    now_unix: i64,
) -> Result<Option<(String, Due)>, ControllerError> {
    let dir = admin_bundle_dir(data_dir);
    Bundle::recover(&dir)?;
    let due = if !Bundle::exists(&dir) {
        Some(Due::Missing)
    } else {
        let bundle = Bundle::load(&dir).ok();
        let cert = bundle
            .as_ref()
            .and_then(|b| CertInfo::from_pem(&b.cert_pem).ok());
        let same_ca = bundle
            .as_ref()
            .and_then(|b| fingerprint_pem(&b.ca_pem).ok())
            .is_some_and(|fp| fp == ca.fingerprint())
            && cert.is_some();
        let revoked = match &cert {
            Some(c) => {
                store.is_revoked(&c.serial)?
                    || store.operator_revoked_by_name(ADMIN, &c.serial, c.issued_unix())?
            }
            None => false,
        };
        admin_bundle_due(cert.as_ref(), same_ca, revoked, now_unix, ttl)
    };
    let Some(due) = due else {
        return Ok(None);
    };
    let identity = Identity::Operator {
        name: ADMIN.into(),
        role: Role::Admin,
    };
    let (issued, key_pem) = ca.issue(&identity, ttl)?;
    record(
        store,
        ADMIN,
        Role::Admin,
        &issued,
        BY_CONTROLLER,
        crate::shared::now_ms(),
    )?;
    store.flush_blocking()?;
    Bundle {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: issued.cert_pem,
        key_pem,
    }
    .replace(&dir)?;
    Ok(Some((issued.serial, due)))
}

/// [`ensure_admin_bundle`] for a running controller, logging what it did.
pub async fn renew_admin_bundle(
    shared: Arc<Shared>,
    now_unix: i64,
) -> Result<Option<(String, Due)>, ControllerError> {
    let task = shared.clone();
    let result = tokio::task::spawn_blocking(move || {
        ensure_admin_bundle(
            &task.config.data_dir,
            &task.ca,
            &task.store,
            task.config.operator_cert_ttl,
            now_unix,
        )
    })
    .await
    .map_err(|e| ControllerError::Io(format!("admin bundle task failed: {e}")))?;
    if let Ok(Some((serial, due))) = &result {
        info!(dir = %admin_bundle_dir(&shared.config.data_dir).display(), serial = %serial, reason = due.as_str(), "admin operator bundle renewed");
    }
    result
}

/// How often a running controller looks at its admin bundle: a twentieth of the certificate's
/// life, between a second and an hour.
pub fn check_every(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// The task that keeps the admin bundle valid while the controller runs; stops on the one
/// shutdown token.
pub async fn keep_admin_bundle(shared: Arc<Shared>) {
    let every = check_every(shared.config.operator_cert_ttl);
    let shutdown = shared.shutdown.clone();
    crate::shared::every(every, shutdown, || {
        let shared = shared.clone();
        async move {
            if let Err(err) = renew_admin_bundle(shared, drover_identity::pki::unix_now()).await {
                warn!(error = %err, "could not renew the admin operator bundle; retrying later");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(issued: i64, life: i64) -> CertInfo {
        CertInfo {
            identity: None,
            serial: "s".into(),
            not_before_unix: issued - drover_identity::pki::CLOCK_SKEW_ALLOWANCE.as_secs() as i64,
            not_after_unix: issued + life,
            public_key: Vec::new(),
        }
    }

    #[test]
    fn the_admin_bundle_is_renewed_at_40_percent_and_when_it_is_wrong() {
        const DAY: i64 = 24 * 3600;
        let ttl = Duration::from_secs(30 * DAY as u64);
        let c = cert(1_000_000, 30 * DAY);
        let due = |now, same_ca, revoked, c: &CertInfo| {
            admin_bundle_due(Some(c), same_ca, revoked, now, ttl)
        };
        assert_eq!(due(1_000_000, true, false, &c), None);
        assert_eq!(due(1_000_000 + 12 * DAY - 1, true, false, &c), None);
        assert_eq!(
            due(1_000_000 + 12 * DAY, true, false, &c),
            Some(Due::Renewal)
        );
        assert_eq!(due(1_000_000, true, true, &c), Some(Due::Revoked));
        assert_eq!(due(1_000_000, false, false, &c), Some(Due::ForeignCa));
        assert_eq!(
            admin_bundle_due(None, true, false, 1_000_000, ttl),
            Some(Due::Unreadable)
        );
        // A 365-day bundle from an older controller: replaced at the first start.
        let old = cert(1_000_000, 365 * DAY);
        assert_eq!(due(1_000_000 + DAY, true, false, &old), Some(Due::TooLong));
        assert_eq!(check_every(ttl), Duration::from_secs(3600));
        assert_eq!(check_every(Duration::from_secs(60)), Duration::from_secs(3));
    }
}
