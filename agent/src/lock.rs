//! One deploy per app per host at a time: a lock with a lease, kept in the agent's store so it
//! survives a crash, and expiring by itself when its holder stops renewing it (a crashed
//! agent's lock does not block the next deploy forever). The decision is a pure function.

use serde::{Deserialize, Serialize};

/// A held lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub app: String,
    /// Who holds it: the job id (and through it the operator).
    pub holder: String,
    pub since_unix_ms: i64,
    pub expires_unix_ms: i64,
}

/// What to do with a lock request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take it (free, expired, or already ours: then it is renewed).
    Grant(Lease),
    /// Someone else holds it; tell the requester who and since when.
    Held(Lease),
}

/// Decides a request by `holder` for `app` at `now`, given the stored lease if any.
pub fn decide(
    existing: Option<&Lease>,
    app: &str,
    holder: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Decision {
    match existing {
        Some(lease) if lease.holder != holder && lease.expires_unix_ms > now_ms => {
            Decision::Held(lease.clone())
        }
        Some(lease) if lease.holder == holder && lease.expires_unix_ms > now_ms => {
            Decision::Grant(Lease {
                expires_unix_ms: now_ms + lease_ms,
                ..lease.clone()
            })
        }
        _ => Decision::Grant(Lease {
            app: app.to_string(),
            holder: holder.to_string(),
            since_unix_ms: now_ms,
            expires_unix_ms: now_ms + lease_ms,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, since: i64, expires: i64) -> Lease {
        Lease {
            app: "api".into(),
            holder: holder.into(),
            since_unix_ms: since,
            expires_unix_ms: expires,
        }
    }

    #[test]
    fn the_lock_table() {
        // Free: granted for one lease.
        assert_eq!(
            decide(None, "api", "job-1", 100, 50),
            Decision::Grant(lease("job-1", 100, 150))
        );
        // Held by another, unexpired: refused, saying who and since when.
        let held = lease("job-1", 100, 150);
        assert_eq!(
            decide(Some(&held), "api", "job-2", 120, 50),
            Decision::Held(held.clone())
        );
        // The holder renews: same start, later expiry.
        assert_eq!(
            decide(Some(&held), "api", "job-1", 140, 50),
            Decision::Grant(lease("job-1", 100, 190))
        );
        // Expired (its agent crashed and never renewed): anyone takes it, anew.
        assert_eq!(
            decide(Some(&held), "api", "job-2", 150, 50),
            Decision::Grant(lease("job-2", 150, 200))
        );
        assert_eq!(
            decide(Some(&held), "api", "job-1", 151, 50),
            Decision::Grant(lease("job-1", 151, 201))
        );
    }
}
