//! The controller's durable state in sled: hosts, enrollment tokens, revoked certificates and
//! every job event. The only module of the controller that knows it is sled.
//!
//! Writes that a peer is told about (an ack, an issued certificate, a used token) are flushed
//! first. Events are keyed by (host, seq) so a replayed event is recognised and dropped.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

const SCHEMA_VERSION: u64 = 1;
const KEY_SCHEMA: &[u8] = b"schema_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "controller store {path}: {source} (is another drover-controller using this data dir?)"
    )]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("controller store: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "controller store holds schema version {found}, this controller understands {SCHEMA_VERSION}; upgrade the controller"
    )]
    Schema { found: u64 },
    #[error("controller store: corrupt record: {0}")]
    Corrupt(String),
}

/// One check of a health report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub name: String,
    pub status: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub mount: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// The last health report of a host, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthSnapshot {
    pub status: String,
    pub checks: Vec<CheckRecord>,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub disks: Vec<DiskRecord>,
    pub uptime_secs: u64,
    pub docker_reachable: bool,
    pub docker_version: String,
    pub containers_running: u32,
    pub containers_total: u32,
    pub agent_version: String,
    pub cert_not_after_unix: i64,
    pub clock_offset_ms: i64,
    pub collected_unix_ms: i64,
}

/// A host the controller knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_unix_ms: i64,
    pub agent_version: String,
    pub last_seen_unix_ms: i64,
    pub health: Option<HealthSnapshot>,
    pub revoked_unix_ms: Option<i64>,
    /// Serial numbers of every certificate issued to this host.
    pub serials: Vec<String>,
    pub cert_not_after_unix: i64,
}

/// An enrollment token. Only the hash of its secret is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_hash: String,
    pub host: String,
    pub labels: BTreeMap<String, String>,
    pub created_unix_ms: i64,
    pub expires_unix_ms: i64,
    pub created_by: String,
    pub used_unix_ms: Option<i64>,
    pub revoked: bool,
}

/// A job event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub host: String,
    pub seq: u64,
    pub job_id: String,
    pub at_unix_ms: i64,
    pub kind: String,
    pub message: String,
    pub fields: BTreeMap<String, String>,
    pub received_unix_ms: i64,
}

/// An app spec as applied: the text is kept as written, with a revision per change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    pub revision: u64,
    pub spec_toml: String,
    pub updated_unix_ms: i64,
    pub updated_by: String,
}

/// What happened to an event offered to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    Duplicate,
}

pub struct Store {
    db: sled::Db,
    hosts: sled::Tree,
    tokens: sled::Tree,
    revoked: sled::Tree,
    events: sled::Tree,
    event_seq: sled::Tree,
    apps: sled::Tree,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn event_key(host: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(host.len() + 9);
    key.extend_from_slice(host.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

impl Store {
    /// Makes every write so far durable. sled 0.34's `flush_async` deadlocks when several
    /// callers await it at once (spacejam/sled#1308), so the blocking flush runs on the
    /// blocking pool instead.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task failed: {e}")))??;
        Ok(())
    }

    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.display().to_string(),
                source,
            })?;
        let meta = db.open_tree("meta")?;
        match meta.get(KEY_SCHEMA)? {
            None => {
                meta.insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("schema version".into()))?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema { found });
                }
            }
        }
        Ok(Store {
            hosts: db.open_tree("hosts")?,
            tokens: db.open_tree("tokens")?,
            revoked: db.open_tree("revoked_serials")?,
            events: db.open_tree("events")?,
            event_seq: db.open_tree("event_seq")?,
            apps: db.open_tree("apps")?,
            db,
        })
    }

    // --- hosts -------------------------------------------------------------------------------

    pub fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        self.hosts.get(name)?.map(|v| decode(&v)).transpose()
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.hosts.iter().map(|item| decode(&item?.1)).collect()
    }

    pub fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.hosts.insert(host.name.as_bytes(), encode(host)?)?;
        Ok(())
    }

    /// Reads, changes and writes a host record; returns the new record, or None if unknown.
    pub fn update_host(
        &self,
        name: &str,
        change: impl Fn(&mut HostRecord),
    ) -> Result<Option<HostRecord>, StoreError> {
        let mut result = None;
        self.hosts.fetch_and_update(name, |old| {
            let mut host: HostRecord = old.and_then(|v| decode(v).ok())?;
            change(&mut host);
            let bytes = encode(&host).ok();
            result = Some(host);
            bytes
        })?;
        Ok(result)
    }

    // --- apps --------------------------------------------------------------------------------

    pub fn app(&self, name: &str) -> Result<Option<AppRecord>, StoreError> {
        self.apps.get(name)?.map(|v| decode(&v)).transpose()
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.apps.iter().map(|item| decode(&item?.1)).collect()
    }

    /// Stores `spec_toml` as the app's spec: a new revision if the text changed, nothing if
    /// not. Compare-and-swap, so two concurrent applies get distinct revisions.
    /// Returns the record and whether it changed. Not yet durable: flush before answering.
    pub fn apply_app(
        &self,
        name: &str,
        spec_toml: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<(AppRecord, bool), StoreError> {
        loop {
            let old_bytes = self.apps.get(name)?;
            let old: Option<AppRecord> = old_bytes.as_ref().map(|v| decode(v)).transpose()?;
            if let Some(old) = &old
                && old.spec_toml == spec_toml
            {
                return Ok((old.clone(), false));
            }
            let new = AppRecord {
                name: name.to_string(),
                revision: old.map(|o| o.revision + 1).unwrap_or(1),
                spec_toml: spec_toml.to_string(),
                updated_unix_ms: now_ms,
                updated_by: by.to_string(),
            };
            if self
                .apps
                .compare_and_swap(name, old_bytes, Some(encode(&new)?))?
                .is_ok()
            {
                return Ok((new, true));
            }
        }
    }

    // --- revocation --------------------------------------------------------------------------

    pub fn revoke_serials(&self, host: &str, serials: &[String]) -> Result<(), StoreError> {
        for serial in serials {
            self.revoked.insert(serial.as_bytes(), host.as_bytes())?;
        }
        Ok(())
    }

    pub fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        Ok(self.revoked.contains_key(serial.as_bytes())?)
    }

    // --- tokens ------------------------------------------------------------------------------

    pub fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.tokens
            .insert(token.secret_hash.as_bytes(), encode(token)?)?;
        Ok(())
    }

    pub fn token(&self, secret_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens
            .get(secret_hash)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.tokens.iter().map(|item| decode(&item?.1)).collect()
    }

    /// Marks a token used if, and only if, nobody did so first (compare-and-swap), so a token
    /// raced by two enrollments works once.
    pub fn consume_token(&self, token: &TokenRecord, now_ms: i64) -> Result<bool, StoreError> {
        let old = encode(token)?;
        let mut used = token.clone();
        used.used_unix_ms = Some(now_ms);
        let swapped = self.tokens.compare_and_swap(
            token.secret_hash.as_bytes(),
            Some(old),
            Some(encode(&used)?),
        )?;
        Ok(swapped.is_ok())
    }

    // --- events ------------------------------------------------------------------------------

    /// The highest event sequence stored for `host`.
    pub fn last_event_seq(&self, host: &str) -> Result<u64, StoreError> {
        Ok(self
            .event_seq
            .get(host)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Stores an event unless one with the same (host, seq) or a later seq is already stored.
    /// Not yet durable: call [`Store::flush`] before acknowledging.
    pub fn append_event(&self, event: &EventRecord) -> Result<Appended, StoreError> {
        use sled::Transactional;
        let key = event_key(&event.host, event.seq);
        let value = encode(event)?;
        // The check and the insert are one transaction, so two sessions of one host racing
        // (an old one not yet torn down) cannot both store the same seq.
        (&self.events, &self.event_seq)
            .transaction(|(events, seqs)| {
                let last = seqs
                    .get(event.host.as_bytes())?
                    .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                    .unwrap_or(0);
                if event.seq <= last {
                    return Ok(Appended::Duplicate);
                }
                events.insert(key.as_slice(), value.as_slice())?;
                seqs.insert(event.host.as_bytes(), &event.seq.to_be_bytes())?;
                Ok(Appended::Stored)
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => {
                    StoreError::Corrupt("transaction aborted".into())
                }
            })
    }

    /// Events of `host` after `after_seq`, oldest first.
    pub fn events(
        &self,
        host: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let start = event_key(host, after_seq.saturating_add(1));
        let end = event_key(host, u64::MAX);
        let mut out: Vec<EventRecord> = Vec::new();
        for item in self.events.range(start..=end).take(limit) {
            out.push(decode(&item?.1)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(host: &str, seq: u64) -> EventRecord {
        EventRecord {
            host: host.into(),
            seq,
            job_id: "j".into(),
            at_unix_ms: 0,
            kind: "k".into(),
            message: format!("m{seq}"),
            fields: BTreeMap::new(),
            received_unix_ms: 0,
        }
    }

    #[tokio::test]
    async fn events_dedupe_by_host_and_seq_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            assert_eq!(
                store.append_event(&event("a", 1)).unwrap(),
                Appended::Stored
            );
            assert_eq!(
                store.append_event(&event("a", 2)).unwrap(),
                Appended::Stored
            );
            assert_eq!(
                store.append_event(&event("a", 2)).unwrap(),
                Appended::Duplicate
            );
            assert_eq!(
                store.append_event(&event("ab", 1)).unwrap(),
                Appended::Stored
            );
            store.flush().await.unwrap();
        }
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(
            store.append_event(&event("a", 1)).unwrap(),
            Appended::Duplicate
        );
        assert_eq!(store.last_event_seq("a").unwrap(), 2);
        let seqs: Vec<u64> = store
            .events("a", 0, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2], "host 'ab' does not leak into host 'a'");
        assert_eq!(store.events("a", 1, 10).unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_flushes_all_complete() {
        // Concurrent flushes must all finish. (sled's own flush_async did not, in release
        // builds with 32+ concurrent callers: spacejam/sled#1308, found by the fleet benchmark.)
        let tmp = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(tmp.path()).unwrap());
        let tasks: Vec<_> = (1..=200u64)
            .map(|seq| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .append_event(&event(&format!("h{}", seq % 7), seq))
                        .unwrap();
                    store.flush().await.unwrap();
                })
            })
            .collect();
        let all = futures::future::join_all(tasks);
        tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .expect("200 concurrent flushes finish within 30s");
    }

    #[test]
    fn a_token_is_consumed_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let token = TokenRecord {
            id: "id".into(),
            secret_hash: "hash".into(),
            host: "h".into(),
            labels: BTreeMap::new(),
            created_unix_ms: 0,
            expires_unix_ms: 10,
            created_by: "admin".into(),
            used_unix_ms: None,
            revoked: false,
        };
        store.put_token(&token).unwrap();
        assert!(store.consume_token(&token, 5).unwrap());
        assert!(!store.consume_token(&token, 6).unwrap());
        assert_eq!(store.token("hash").unwrap().unwrap().used_unix_ms, Some(5));
    }
}
