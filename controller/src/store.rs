//! The controller's durable state in sled: hosts, enrollment tokens, revoked certificates,
//! every job event, app specs, deploy and rollback jobs, each host's release table per app,
//! schedules and alerts.
//! The only module of the controller that knows it is sled.
//!
//! Writes that a peer is told about (an ack, an issued certificate, a used token) are flushed
//! first. Events are keyed by (host, seq) so a replayed event is recognised and dropped; a new
//! event, its effect on its job and the release table it carries are stored in one transaction,
//! so an event is never stored without its effect (nor the effect applied twice).

use std::collections::BTreeMap;
use std::path::Path;

use drover_model::backup::catalog::{Backup, Verification};
use drover_model::jobevent::Release;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::alerts::AlertRecord;
pub use crate::jobs::EventRecord;
use crate::jobs::JobRecord;
use crate::release::record::FleetRelease;

const SCHEMA_VERSION: u64 = 1;
const KEY_SCHEMA: &[u8] = b"schema_version";
/// The time of the watchdog's last write (`Store::probe_writable`).
const KEY_WATCHDOG: &[u8] = b"watchdog_probe_unix_ms";

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
    /// Apps live on the host, with their proxy's counters (absent in older records).
    #[serde(default)]
    pub apps: Vec<AppStatusRecord>,
}

/// An app live on a host, from its last health report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatusRecord {
    pub app: String,
    pub version: String,
    pub running: bool,
    pub listen: String,
    pub requests: u64,
    pub status_5xx: u64,
    pub p95_ms: u64,
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
    /// Serial numbers of every certificate issued to this host, oldest first.
    pub serials: Vec<String>,
    pub cert_not_after_unix: i64,
    /// The serial of the certificate that last opened a session: with the newest serial, the
    /// only one re-enrollment accepts (a renewal whose answer was lost leaves the agent with
    /// this one, not the newest).
    #[serde(default)]
    pub session_serial: String,
}

/// An operator certificate the controller issued (recorded since operator revocation exists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorCertRecord {
    pub name: String,
    pub role: String,
    pub serial: String,
    pub issued_unix_ms: i64,
    pub expires_unix_ms: i64,
    /// The operator who asked for it; `controller` for the admin bundle it keeps itself.
    pub created_by: String,
    pub revoked_unix_ms: Option<i64>,
}

/// An operator revoked by name: every certificate of that name issued up to
/// `revoked_unix_ms` is refused, recorded or not (certificates issued before serials were
/// recorded are known only by their name and issue time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRevocation {
    pub name: String,
    pub revoked_unix_ms: i64,
    pub by: String,
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

/// An app spec as applied: the text is kept as written, with a revision per change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    pub revision: u64,
    pub spec_toml: String,
    pub updated_unix_ms: i64,
    pub updated_by: String,
    /// When revision 1 was applied (0 in records from before it was kept: use
    /// `updated_unix_ms`).
    #[serde(default)]
    pub created_unix_ms: i64,
}

impl AppRecord {
    /// When it was first applied, as well as the record knows.
    pub fn created_since(&self) -> i64 {
        if self.created_unix_ms > 0 {
            self.created_unix_ms
        } else {
            self.updated_unix_ms
        }
    }
}

/// What a schedule starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Backup,
    Verify,
    Deploy,
    /// A fleet release started later (`drover release --at`); one-off only.
    Release,
}

impl ScheduleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Backup => "backup",
            ScheduleKind::Verify => "verify",
            ScheduleKind::Deploy => "deploy",
            ScheduleKind::Release => "release",
        }
    }

    pub fn parse(text: &str) -> Option<ScheduleKind> {
        match text {
            "backup" => Some(ScheduleKind::Backup),
            "verify" => Some(ScheduleKind::Verify),
            "deploy" => Some(ScheduleKind::Deploy),
            "release" => Some(ScheduleKind::Release),
            _ => None,
        }
    }
}

/// A schedule: recurring (`cron`) or one-off (`at_unix_ms`), and what it last did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleRecord {
    pub id: String,
    pub kind: Option<ScheduleKind>,
    /// The backup target (backup, verify) or the app (deploy).
    pub target: String,
    /// The version a deploy installs.
    pub version: String,
    /// Where it runs; empty: as the operator RPC would choose.
    pub hosts: Vec<String>,
    /// 5-field cron expression; empty for a one-off.
    pub cron: String,
    /// A one-off's time; 0 for a recurring schedule.
    pub at_unix_ms: i64,
    /// IANA zone of `cron`; empty: UTC.
    pub tz: String,
    pub jitter_secs: u64,
    pub paused: bool,
    pub created_by: String,
    pub created_unix_ms: i64,
    /// When it last fired (controller clock); 0: never.
    pub last_fire_unix_ms: i64,
    /// The job its last fire started (or was about to start); empty if none was started.
    pub last_run_job_id: String,
    /// `started`, the job's final state, or `failed: <why it could not start>`.
    pub last_result: String,
    /// How many fire times the last run covered beyond its own (after downtime).
    pub runs_missed: u64,
    /// Kept by its backup target's `[schedule]` (changed by applying the target, not by
    /// `drover schedule add|rm`).
    pub managed: bool,
    /// A release schedule's labels and options (its hosts by name are in `hosts`).
    #[serde(default)]
    pub release: Option<ScheduledRelease>,
}

/// What `drover release --at` asked for, kept until the release starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledRelease {
    pub labels: std::collections::BTreeMap<String, String>,
    pub options: crate::release::record::Options,
    pub skip_backup: bool,
}

/// What happened to an event offered to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    Duplicate,
}

/// What happened to an event offered to [`Store::ingest_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Already stored (a replay after a reconnect): nothing changed.
    Duplicate,
    /// Stored, with the change to its job when the job is known.
    Stored { job: Option<Box<JobChange>> },
}

/// A job before and after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobChange {
    pub before: JobRecord,
    pub after: JobRecord,
}

pub struct Store {
    db: sled::Db,
    hosts: sled::Tree,
    tokens: sled::Tree,
    /// serial → who it belonged to (`<host>` or `operator/<name>`): refused on every call
    revoked: sled::Tree,
    /// serial → OperatorCertRecord
    operator_certs: sled::Tree,
    /// operator name → OperatorRevocation
    revoked_operators: sled::Tree,
    meta: sled::Tree,
    events: sled::Tree,
    event_seq: sled::Tree,
    apps: sled::Tree,
    /// job id → JobRecord
    jobs: sled::Tree,
    /// created_unix_ms (big-endian) ++ job id → job id: jobs by creation time
    job_order: sled::Tree,
    /// job id → (): unfinished jobs, whose commands may need sending again
    open_jobs: sled::Tree,
    /// job id \0 host \0 seq (big-endian) → EventRecord: each job's events, for replay
    job_events: sled::Tree,
    /// app \0 host → Vec<Release>: the last `app.releases` table the host sent
    releases: sled::Tree,
    /// name → AppRecord of a backup target (same record shape as an app's spec)
    backup_targets: sled::Tree,
    /// target \0 host → Vec<Backup>: the last `backup.catalog` the host sent
    backups: sled::Tree,
    /// target \0 finished_unix_ms (big-endian) \0 job id → Verification: each target's
    /// validation history, kept from the `backup.verification` events
    verifications: sled::Tree,
    /// schedule id → ScheduleRecord
    schedules: sled::Tree,
    /// alert key → AlertRecord (open and resolved)
    alerts: sled::Tree,
    /// release id → FleetRelease: fleet releases, running and finished
    fleet_releases: sled::Tree,
}

/// A table an event carries, stored with it in one transaction.
#[derive(Debug, Clone, Copy)]
pub enum Carried<'a> {
    /// `app.releases`: the app and its release table on the event's host.
    Releases(&'a str, &'a [Release]),
    /// `backup.catalog`: the target and its backups on the event's host.
    Catalog(&'a str, &'a [Backup]),
    /// `backup.verification`: one validation (its `host` is the event's host).
    Verification(&'a Verification),
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

fn job_event_prefix(job_id: &str) -> Vec<u8> {
    let mut key = job_id.as_bytes().to_vec();
    key.push(0);
    key
}

fn job_event_key(job_id: &str, host: &str, seq: u64) -> Vec<u8> {
    let mut key = job_event_prefix(job_id);
    key.extend_from_slice(&event_key(host, seq));
    key
}

fn job_order_key(job: &JobRecord) -> Vec<u8> {
    let mut key = job.created_unix_ms.max(0).to_be_bytes().to_vec();
    key.extend_from_slice(job.id.as_bytes());
    key
}

/// Reads, changes and writes the record under `key`; the new record, or None if unknown.
fn update_record<T: Serialize + DeserializeOwned>(
    tree: &sled::Tree,
    key: &str,
    change: impl Fn(&mut T),
) -> Result<Option<T>, StoreError> {
    let mut result = None;
    tree.fetch_and_update(key, |old| {
        let mut record: T = old.and_then(|v| decode(v).ok())?;
        change(&mut record);
        let bytes = encode(&record).ok();
        result = Some(record);
        bytes
    })?;
    Ok(result)
}

/// The per-host tables (`<name> \0 <host>` keys) of `name` in `tree`, by host name.
fn per_host<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &str,
) -> Result<Vec<(String, T)>, StoreError> {
    let prefix = releases_prefix(name);
    let mut out = Vec::new();
    for item in tree.scan_prefix(&prefix) {
        let (key, value) = item?;
        let host = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        out.push((host, decode(&value)?));
    }
    Ok(out)
}

/// Stores `spec_toml` under `name` in `tree` as a new revision, unless it equals the stored one.
fn apply_spec(
    tree: &sled::Tree,
    name: &str,
    spec_toml: &str,
    by: &str,
    now_ms: i64,
) -> Result<(AppRecord, bool), StoreError> {
    loop {
        let old_bytes = tree.get(name)?;
        let old: Option<AppRecord> = old_bytes.as_ref().map(|v| decode(v)).transpose()?;
        if let Some(old) = &old
            && old.spec_toml == spec_toml
        {
            return Ok((old.clone(), false));
        }
        let new = AppRecord {
            name: name.to_string(),
            revision: old.as_ref().map(|o| o.revision + 1).unwrap_or(1),
            created_unix_ms: old.as_ref().map(|o| o.created_since()).unwrap_or(now_ms),
            spec_toml: spec_toml.to_string(),
            updated_unix_ms: now_ms,
            updated_by: by.to_string(),
        };
        if tree
            .compare_and_swap(name, old_bytes, Some(encode(&new)?))?
            .is_ok()
        {
            return Ok((new, true));
        }
    }
}

fn releases_prefix(app: &str) -> Vec<u8> {
    let mut key = app.as_bytes().to_vec();
    key.push(0);
    key
}

fn releases_key(app: &str, host: &str) -> Vec<u8> {
    let mut key = releases_prefix(app);
    key.extend_from_slice(host.as_bytes());
    key
}

fn verification_key(v: &Verification) -> Vec<u8> {
    let mut key = releases_prefix(&v.target);
    key.extend_from_slice(&v.finished_unix_ms.max(0).to_be_bytes());
    key.push(0);
    key.extend_from_slice(v.job_id.as_bytes());
    key
}

/// Turns a failed sled transaction into a [`StoreError`].
fn transaction_error(e: TransactionError<String>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Sled(e),
        TransactionError::Abort(message) => StoreError::Corrupt(message),
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<String> {
    ConflictableTransactionError::Abort(e.to_string())
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

    /// Writes and flushes a marker: the watchdog's proof that the store still takes writes.
    pub async fn probe_writable(&self, now_ms: i64) -> Result<(), StoreError> {
        self.meta.insert(KEY_WATCHDOG, &now_ms.to_be_bytes())?;
        self.flush().await
    }

    /// [`Store::flush`] for callers outside the runtime (start-up).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
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
            operator_certs: db.open_tree("operator_certs")?,
            revoked_operators: db.open_tree("revoked_operators")?,
            meta,
            events: db.open_tree("events")?,
            event_seq: db.open_tree("event_seq")?,
            apps: db.open_tree("apps")?,
            jobs: db.open_tree("jobs")?,
            job_order: db.open_tree("job_order")?,
            open_jobs: db.open_tree("open_jobs")?,
            job_events: db.open_tree("job_events")?,
            releases: db.open_tree("releases")?,
            backup_targets: db.open_tree("backup_targets")?,
            backups: db.open_tree("backups")?,
            verifications: db.open_tree("verifications")?,
            schedules: db.open_tree("schedules")?,
            alerts: db.open_tree("alerts")?,
            fleet_releases: db.open_tree("fleet_releases")?,
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
        update_record(&self.hosts, name, change)
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
        apply_spec(&self.apps, name, spec_toml, by, now_ms)
    }

    /// Stores a backup target's spec as a new revision unless it is unchanged.
    pub fn apply_backup_target(
        &self,
        name: &str,
        spec_toml: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<(AppRecord, bool), StoreError> {
        apply_spec(&self.backup_targets, name, spec_toml, by, now_ms)
    }

    /// Removes a backup target's record (its catalogs and verification history stay); the
    /// removed record, if it existed. Not yet durable.
    pub fn remove_backup_target(&self, name: &str) -> Result<Option<AppRecord>, StoreError> {
        self.backup_targets
            .remove(name)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn backup_target(&self, name: &str) -> Result<Option<AppRecord>, StoreError> {
        self.backup_targets
            .get(name)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn backup_targets(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.backup_targets
            .iter()
            .map(|item| decode(&item?.1))
            .collect()
    }

    /// Every host's catalog of `target`, by host name.
    pub fn target_backups(&self, target: &str) -> Result<Vec<(String, Vec<Backup>)>, StoreError> {
        per_host(&self.backups, target)
    }

    /// Validations, newest first: of `target` when given, else of every target; at most
    /// `limit`.
    pub fn verifications(
        &self,
        target: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Verification>, StoreError> {
        let mut out: Vec<Verification> = match target {
            Some(t) => self
                .verifications
                .scan_prefix(releases_prefix(t))
                .rev()
                .take(limit)
                .map(|item| decode(&item?.1))
                .collect::<Result<_, _>>()?,
            None => self
                .verifications
                .iter()
                .map(|item| decode(&item?.1))
                .collect::<Result<_, _>>()?,
        };
        out.sort_by_key(|v| std::cmp::Reverse((v.finished_unix_ms, v.job_id.clone())));
        out.truncate(limit);
        Ok(out)
    }

    /// Every backup the controller knows of (all targets, all hosts).
    pub fn all_backups(&self) -> Result<Vec<Backup>, StoreError> {
        let mut out = Vec::new();
        for item in self.backups.iter() {
            let table: Vec<Backup> = decode(&item?.1)?;
            out.extend(table);
        }
        Ok(out)
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

    // --- operator certificates -----------------------------------------------------------------

    /// Records an operator certificate as issued. Not yet durable: flush before handing it out.
    pub fn record_operator_cert(&self, record: &OperatorCertRecord) -> Result<(), StoreError> {
        self.operator_certs
            .insert(record.serial.as_bytes(), encode(record)?)?;
        Ok(())
    }

    /// Every recorded operator certificate, oldest first.
    pub fn operator_certs(&self) -> Result<Vec<OperatorCertRecord>, StoreError> {
        let mut out: Vec<OperatorCertRecord> = self
            .operator_certs
            .iter()
            .map(|item| decode(&item?.1))
            .collect::<Result<_, _>>()?;
        out.sort_by(|a, b| (a.issued_unix_ms, &a.serial).cmp(&(b.issued_unix_ms, &b.serial)));
        Ok(out)
    }

    /// Revokes operator `name`: each of its recorded certificates (their serials join the
    /// revoked set) and, by name, any certificate of it issued up to `now_ms` that was never
    /// recorded. Returns how many recorded certificates were newly revoked. Not yet durable.
    pub fn revoke_operator(&self, name: &str, now_ms: i64, by: &str) -> Result<u32, StoreError> {
        let mut count = 0;
        for mut record in self.operator_certs()? {
            if record.name != name || record.revoked_unix_ms.is_some() {
                continue;
            }
            record.revoked_unix_ms = Some(now_ms);
            self.record_operator_cert(&record)?;
            self.revoked.insert(
                record.serial.as_bytes(),
                format!("operator/{name}").as_bytes(),
            )?;
            count += 1;
        }
        let revocation = OperatorRevocation {
            name: name.to_string(),
            revoked_unix_ms: now_ms,
            by: by.to_string(),
        };
        self.revoked_operators
            .insert(name.as_bytes(), encode(&revocation)?)?;
        Ok(count)
    }

    pub fn operator_revocation(
        &self,
        name: &str,
    ) -> Result<Option<OperatorRevocation>, StoreError> {
        self.revoked_operators
            .get(name)?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Whether an operator certificate that is not in the revoked set must still be refused:
    /// one that was never recorded, of a name revoked at or after it was issued.
    pub fn operator_revoked_by_name(
        &self,
        name: &str,
        serial: &str,
        issued_unix: i64,
    ) -> Result<bool, StoreError> {
        if self.operator_certs.contains_key(serial.as_bytes())? {
            return Ok(false);
        }
        Ok(self
            .operator_revocation(name)?
            .is_some_and(|r| issued_unix.saturating_mul(1000) <= r.revoked_unix_ms))
    }

    // --- labels --------------------------------------------------------------------------------

    /// Once per store: sets each host's labels to those of the token it last enrolled with.
    /// Before, a host's own `[labels]` were merged in at enrollment and at every Hello, so a
    /// host could put itself into any selection; labels now come from tokens only. Returns the
    /// hosts whose labels changed (durable when this returns).
    pub fn labels_from_tokens(&self) -> Result<Vec<String>, StoreError> {
        const MARK: &[u8] = b"host_labels_from_tokens";
        if self.meta.contains_key(MARK)? {
            return Ok(Vec::new());
        }
        let mut newest: BTreeMap<String, TokenRecord> = BTreeMap::new();
        for token in self.tokens()? {
            let Some(used) = token.used_unix_ms else {
                continue;
            };
            let later = newest
                .get(&token.host)
                .is_none_or(|t| t.used_unix_ms.unwrap_or(0) < used);
            if later {
                newest.insert(token.host.clone(), token);
            }
        }
        let mut changed = Vec::new();
        for mut host in self.hosts()? {
            let labels = newest
                .get(&host.name)
                .map(|t| t.labels.clone())
                .unwrap_or_default();
            if host.labels != labels {
                host.labels = labels;
                self.put_host(&host)?;
                changed.push(host.name);
            }
        }
        self.meta.insert(MARK, &[1u8])?;
        self.db.flush()?;
        Ok(changed)
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
        Ok(match self.ingest_event(event, None, |_| false)? {
            Ingested::Duplicate => Appended::Duplicate,
            Ingested::Stored { .. } => Appended::Stored,
        })
    }

    /// Stores a new event with its effects, in one transaction: the event itself (unless one
    /// with the same (host, seq) or a later seq is already stored), the release table it
    /// carries (`releases`: app and table), and, when its job is known, the event in the job's
    /// index and `apply`'s change to the job. `apply` must be pure: a transaction may run it
    /// more than once. Not yet durable: call [`Store::flush`] before acknowledging.
    pub fn ingest_event(
        &self,
        event: &EventRecord,
        carried: Option<Carried<'_>>,
        apply: impl Fn(&mut JobRecord) -> bool,
    ) -> Result<Ingested, StoreError> {
        use sled::Transactional;
        let key = event_key(&event.host, event.seq);
        let value = encode(event)?;
        let (mut table, mut catalog, mut verification) = (None, None, None);
        match carried {
            None => {}
            Some(Carried::Releases(app, t)) => {
                table = Some((releases_key(app, &event.host), encode(&t)?));
            }
            Some(Carried::Catalog(target, b)) => {
                catalog = Some((releases_key(target, &event.host), encode(&b)?));
            }
            Some(Carried::Verification(v)) => {
                verification = Some((verification_key(v), encode(v)?));
            }
        }
        // The check and the inserts are one transaction, so two sessions of one host racing
        // (an old one not yet torn down) cannot both store the same seq.
        (
            &self.events,
            &self.event_seq,
            &self.jobs,
            &self.job_events,
            &self.open_jobs,
            &self.releases,
            &self.backups,
            &self.verifications,
        )
            .transaction(
                |(
                    events,
                    seqs,
                    jobs,
                    job_events,
                    open_jobs,
                    release_tables,
                    catalogs,
                    verifications,
                )| {
                    let last = seqs
                        .get(event.host.as_bytes())?
                        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                        .unwrap_or(0);
                    if event.seq <= last {
                        return Ok(Ingested::Duplicate);
                    }
                    events.insert(key.as_slice(), value.as_slice())?;
                    seqs.insert(event.host.as_bytes(), &event.seq.to_be_bytes())?;
                    if let Some((key, bytes)) = &table {
                        release_tables.insert(key.as_slice(), bytes.as_slice())?;
                    }
                    if let Some((key, bytes)) = &catalog {
                        catalogs.insert(key.as_slice(), bytes.as_slice())?;
                    }
                    if let Some((key, bytes)) = &verification {
                        verifications.insert(key.as_slice(), bytes.as_slice())?;
                    }
                    if event.job_id.is_empty() {
                        return Ok(Ingested::Stored { job: None });
                    }
                    let Some(bytes) = jobs.get(event.job_id.as_bytes())? else {
                        return Ok(Ingested::Stored { job: None });
                    };
                    let before: JobRecord = decode(&bytes).map_err(abort)?;
                    job_events.insert(
                        job_event_key(&event.job_id, &event.host, event.seq),
                        value.as_slice(),
                    )?;
                    let mut after = before.clone();
                    if apply(&mut after) {
                        jobs.insert(event.job_id.as_bytes(), encode(&after).map_err(abort)?)?;
                        if after.state().is_finished() {
                            open_jobs.remove(event.job_id.as_bytes())?;
                        }
                    }
                    Ok(Ingested::Stored {
                        job: Some(Box::new(JobChange { before, after })),
                    })
                },
            )
            .map_err(transaction_error)
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

    // --- jobs --------------------------------------------------------------------------------

    /// Stores a new job (and marks it open). Returns false, storing nothing, if its id is
    /// taken. Not yet durable: flush before sending its command or answering.
    pub fn create_job(&self, job: &JobRecord) -> Result<bool, StoreError> {
        use sled::Transactional;
        let value = encode(job)?;
        let order = job_order_key(job);
        (&self.jobs, &self.job_order, &self.open_jobs)
            .transaction(|(jobs, job_order, open_jobs)| {
                if jobs.get(job.id.as_bytes())?.is_some() {
                    return Ok(false);
                }
                jobs.insert(job.id.as_bytes(), value.as_slice())?;
                job_order.insert(order.as_slice(), job.id.as_bytes())?;
                if !job.state().is_finished() {
                    open_jobs.insert(job.id.as_bytes(), &[])?;
                }
                Ok(true)
            })
            .map_err(transaction_error)
    }

    /// Changes a stored job with `change` (pure: a transaction may run it more than once) in
    /// one transaction with its open mark, and returns its new state; None for an unknown id.
    /// Not yet durable: flush before answering or telling an agent.
    pub fn update_job<T>(
        &self,
        id: &str,
        change: impl Fn(&mut JobRecord) -> T,
    ) -> Result<Option<(JobRecord, T)>, StoreError> {
        use sled::Transactional;
        (&self.jobs, &self.open_jobs)
            .transaction(|(jobs, open_jobs)| {
                let Some(bytes) = jobs.get(id.as_bytes())? else {
                    return Ok(None);
                };
                let mut job: JobRecord = decode(&bytes).map_err(abort)?;
                let before = job.clone();
                let out = change(&mut job);
                if job != before {
                    jobs.insert(id.as_bytes(), encode(&job).map_err(abort)?)?;
                    if job.state().is_finished() {
                        open_jobs.remove(id.as_bytes())?;
                    }
                }
                Ok(Some((job, out)))
            })
            .map_err(transaction_error)
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.jobs.get(id)?.map(|v| decode(&v)).transpose()
    }

    /// Jobs newest first, only `app`'s when given, at most `limit`.
    pub fn jobs(&self, app: Option<&str>, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.job_order.iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (_, id) = item?;
            let Some(bytes) = self.jobs.get(&id)? else {
                continue;
            };
            let job: JobRecord = decode(&bytes)?;
            if app.is_none_or(|a| a == job.app) {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// Unfinished jobs.
    pub fn open_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.open_jobs.iter() {
            let (id, _) = item?;
            if let Some(bytes) = self.jobs.get(&id)? {
                out.push(decode(&bytes)?);
            }
        }
        Ok(out)
    }

    /// Every stored event of a job, by host then seq (see `jobs::replay_order`).
    pub fn job_events(&self, job_id: &str) -> Result<Vec<EventRecord>, StoreError> {
        self.job_events
            .scan_prefix(job_event_prefix(job_id))
            .map(|item| decode(&item?.1))
            .collect()
    }

    // --- schedules ---------------------------------------------------------------------------

    // --- alerts ------------------------------------------------------------------------------

    pub fn alert(&self, key: &str) -> Result<Option<AlertRecord>, StoreError> {
        self.alerts.get(key)?.map(|v| decode(&v)).transpose()
    }

    /// Every stored alert (open and resolved), by key.
    pub fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        self.alerts.iter().map(|item| decode(&item?.1)).collect()
    }

    /// Stores an alert under its key, replacing what was there (not flushed).
    pub fn put_alert(&self, alert: &AlertRecord) -> Result<(), StoreError> {
        self.alerts.insert(alert.key.as_bytes(), encode(alert)?)?;
        Ok(())
    }

    pub fn schedule(&self, id: &str) -> Result<Option<ScheduleRecord>, StoreError> {
        self.schedules.get(id)?.map(|v| decode(&v)).transpose()
    }

    /// Every schedule, by id.
    pub fn schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.schedules.iter().map(|item| decode(&item?.1)).collect()
    }

    /// Stores a new schedule; false, storing nothing, if its id is taken. Not yet durable.
    pub fn add_schedule(&self, record: &ScheduleRecord) -> Result<bool, StoreError> {
        Ok(self
            .schedules
            .compare_and_swap(record.id.as_bytes(), None::<&[u8]>, Some(encode(record)?))?
            .is_ok())
    }

    /// Reads, changes and writes a schedule; the new record, or None if unknown. Not yet
    /// durable.
    pub fn update_schedule(
        &self,
        id: &str,
        change: impl Fn(&mut ScheduleRecord),
    ) -> Result<Option<ScheduleRecord>, StoreError> {
        update_record(&self.schedules, id, change)
    }

    /// Removes a schedule; the removed record, if it existed. Not yet durable.
    pub fn remove_schedule(&self, id: &str) -> Result<Option<ScheduleRecord>, StoreError> {
        self.schedules.remove(id)?.map(|v| decode(&v)).transpose()
    }

    // --- releases ----------------------------------------------------------------------------

    /// The last release table `host` sent for `app` (empty if none).
    pub fn releases(&self, app: &str, host: &str) -> Result<Vec<Release>, StoreError> {
        Ok(self
            .releases
            .get(releases_key(app, host))?
            .map(|v| decode(&v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Every host's release table for `app`, by host name.
    pub fn app_releases(&self, app: &str) -> Result<Vec<(String, Vec<Release>)>, StoreError> {
        per_host(&self.releases, app)
    }

    // --- fleet releases ----------------------------------------------------------------------

    /// Stores a new fleet release; false, storing nothing, if its id is taken. Not yet durable.
    pub fn create_fleet_release(&self, release: &FleetRelease) -> Result<bool, StoreError> {
        Ok(self
            .fleet_releases
            .compare_and_swap(release.id(), None::<&[u8]>, Some(encode(release)?))?
            .is_ok())
    }

    /// Replaces a stored fleet release (the driver's lock serializes its writers). Not yet
    /// durable: flush before acting on it.
    pub fn put_fleet_release(&self, release: &FleetRelease) -> Result<(), StoreError> {
        self.fleet_releases.insert(release.id(), encode(release)?)?;
        Ok(())
    }

    pub fn fleet_release(&self, id: &str) -> Result<Option<FleetRelease>, StoreError> {
        self.fleet_releases.get(id)?.map(|v| decode(&v)).transpose()
    }

    /// Every fleet release, oldest first (ids sort by creation time).
    pub fn fleet_releases(&self) -> Result<Vec<FleetRelease>, StoreError> {
        self.fleet_releases
            .iter()
            .map(|item| decode(&item?.1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store again after it was dropped: sled's background flusher may hold the
    /// directory's lock a moment longer (a restarted process never sees this: the OS drops the
    /// lock with the process).
    fn reopen(path: &std::path::Path) -> Store {
        for _ in 0..100 {
            if let Ok(store) = Store::open(path) {
                return store;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Store::open(path).unwrap()
    }

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
            payload: None,
        }
    }

    #[test]
    fn an_event_stored_before_payloads_still_reads() {
        let old = r#"{"host":"web-1","seq":4,"job_id":"j","at_unix_ms":1,"kind":"app.releases","message":"","fields":{"app":"api","releases":"[]"},"received_unix_ms":2}"#;
        let e: EventRecord = decode(old.as_bytes()).unwrap();
        assert_eq!((e.seq, e.payload), (4, None));
        assert_eq!(e.fields["releases"], "[]");
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
        let store = reopen(tmp.path());
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

    fn job(id: &str, app: &str, created: i64) -> JobRecord {
        JobRecord::new(
            id.into(),
            created,
            crate::jobs::JobCommand::Rollback {
                app: app.into(),
                to_version: String::new(),
                wait_lock: false,
                requested_by: "alice".into(),
            },
            &["a".to_string()],
        )
    }

    #[tokio::test]
    async fn an_event_its_job_change_and_its_release_table_are_stored_together_once() {
        use drover_model::jobevent;
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert!(store.create_job(&job("rollback-2", "api", 2)).unwrap());
        assert!(store.create_job(&job("rollback-1", "web", 1)).unwrap());
        assert!(store.create_job(&job("rollback-3", "api", 3)).unwrap());
        assert!(
            !store.create_job(&job("rollback-3", "api", 9)).unwrap(),
            "id taken"
        );
        let ids = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.jobs(None, 10).unwrap()),
            vec!["rollback-3", "rollback-2", "rollback-1"]
        );
        assert_eq!(ids(store.jobs(Some("api"), 1).unwrap()), vec!["rollback-3"]);
        assert_eq!(store.open_jobs().unwrap().len(), 3);

        let mut finished = event("a", 1);
        finished.job_id = "rollback-2".into();
        finished.kind = jobevent::FINISHED.into();
        finished
            .fields
            .insert(jobevent::field::RESULT.into(), "succeeded".into());
        let apply = |j: &mut JobRecord| crate::jobs::apply_event(j, &finished);
        let Ingested::Stored { job: Some(change) } =
            store.ingest_event(&finished, None, apply).unwrap()
        else {
            panic!("the job is known");
        };
        assert_eq!(change.after.state().as_str(), "succeeded");
        assert_eq!(
            store.ingest_event(&finished, None, apply).unwrap(),
            Ingested::Duplicate
        );
        assert_eq!(
            ids(store.open_jobs().unwrap()),
            vec!["rollback-1", "rollback-3"]
        );
        assert_eq!(
            store.job_events("rollback-2").unwrap(),
            vec![finished.clone()]
        );
        assert!(store.job_events("rollback-3").unwrap().is_empty());

        // A release table, for an event of no known job.
        let release = jobevent::Release {
            id: "r1".into(),
            app: "api".into(),
            version: "v1.0.0".into(),
            image: "acme/api:v1.0.0".into(),
            image_id: "sha256:aa".into(),
            job_id: "x".into(),
            requested_by: "alice".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            result: Some(jobevent::JobResult::Succeeded),
            state: jobevent::ReleaseState::Live,
            spec_toml: String::new(),
            containers: BTreeMap::new(),
        };
        let mut table = event("a", 2);
        table.job_id = "x".into();
        let stored = store
            .ingest_event(
                &table,
                Some(Carried::Releases("api", std::slice::from_ref(&release))),
                |_| true,
            )
            .unwrap();
        assert_eq!(stored, Ingested::Stored { job: None });
        assert_eq!(store.releases("api", "a").unwrap(), vec![release.clone()]);
        assert!(store.releases("api", "b").unwrap().is_empty());
        assert_eq!(
            store.app_releases("api").unwrap(),
            vec![("a".to_string(), vec![release])]
        );
        assert!(
            store.app_releases("ap").unwrap().is_empty(),
            "no prefix leak"
        );
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

    #[tokio::test]
    async fn alerts_are_kept_by_key_across_a_restart_and_targets_remember_their_creation() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            let open = AlertRecord {
                key: "backup_stale:db".into(),
                kind: "backup_stale".into(),
                subject: "db".into(),
                opened_unix_ms: 10,
                ..AlertRecord::default()
            };
            store.put_alert(&open).unwrap();
            store
                .put_alert(&AlertRecord {
                    last_sent_unix_ms: 11,
                    sends: 1,
                    ..open.clone()
                })
                .unwrap();
            store.apply_backup_target("db", "a", "admin", 100).unwrap();
            store.apply_backup_target("db", "b", "admin", 200).unwrap();
            store.flush().await.unwrap();
        }
        let store = reopen(tmp.path());
        let alerts = store.alerts().unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!((alerts[0].sends, alerts[0].last_sent_unix_ms), (1, 11));
        assert!(alerts[0].is_open());
        let target = store.backup_target("db").unwrap().unwrap();
        assert_eq!((target.revision, target.created_since()), (2, 100));
    }
}
