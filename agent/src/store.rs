//! The agent's durable state in sled: the event outbox, deploy locks, jobs and their progress,
//! each app's release table, and a few markers. The only module of the agent that knows it is
//! sled.
//!
//! Every write that must survive a crash is flushed before the caller is told it happened.
//! Events get consecutive sequence numbers starting at 1; they stay in the outbox until the
//! controller acknowledges them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::lock::{Decision, Lease, decide};
use drover_model::backup::catalog::Backup;
pub use drover_model::jobevent::JobKind;
use drover_model::jobevent::{Payload, Release};

const SCHEMA_VERSION: u64 = 1;
const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_LAST_SEQ: &[u8] = b"last_seq";
const KEY_ACKED: &[u8] = b"acked_seq";
const KEY_LAST_COMMAND: &[u8] = b"last_command_id";
/// Job records kept; older finished ones are forgotten.
const KEEP_JOBS: usize = 500;

/// Errors of the agent store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("agent store: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "agent store holds schema version {found}, this agent understands {SCHEMA_VERSION}; upgrade the agent"
    )]
    Schema { found: u64 },
    #[error("agent store: corrupt record: {0}")]
    Corrupt(String),
}

/// A job event as the agent records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub job_id: String,
    pub at_unix_ms: i64,
    pub kind: String,
    pub message: String,
    /// Scalars only; a record travels as `payload`. Events stored by agents before payloads
    /// may hold it as JSON here: they are sent as they are, and the controller reads them.
    pub fields: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
}

/// An event before it has a sequence number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewEvent {
    pub job_id: String,
    pub kind: String,
    pub message: String,
    pub fields: BTreeMap<String, String>,
    pub payload: Option<Payload>,
}

/// A job as the agent keeps it: the command, then its progress, written before each step acts
/// so a restart knows how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub app: String,
    /// Deploy: the version to deploy. Rollback: the version asked for, empty for "previous".
    pub version: String,
    /// Deploy: the app spec (TOML) to deploy with, and its revision at the controller.
    pub spec_toml: String,
    pub spec_revision: u64,
    pub skip_backup: bool,
    pub wait_lock: bool,
    /// Deploy: skip the spec's migration (a fleet release runs it on its first host only).
    #[serde(default)]
    pub skip_migration: bool,
    /// Deploy: leave the previous web container running after the switch (a fleet release's
    /// `keep_previous`; a retire job stops it).
    #[serde(default)]
    pub keep_previous: bool,
    pub requested_by: String,
    pub accepted_unix_ms: i64,
    /// The step started last.
    pub step: String,
    pub finished: bool,
    /// The release this job brings up (a deploy's new one, a rollback's target), once known.
    pub release: String,
    /// The release that was live when the job began, if any.
    pub previous: String,
    /// Whether traffic moved to `release` (committed together with the release table).
    pub switched: bool,
    /// Backup, restore and prune jobs (and a deploy's pre-deploy backup): the target and what
    /// to do with it.
    #[serde(default)]
    pub backup: Option<BackupJob>,
}

/// The backup part of a job. `app` of the job names the target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupJob {
    /// The target's spec (TOML) as applied when the job was asked for.
    pub target_toml: String,
    /// manual | scheduled | pre_deploy
    pub trigger: String,
    /// Restore: which backup, which part, where to.
    pub backup_id: String,
    pub part: String,
    pub to_database: String,
    pub to_dir: String,
    pub confirmed: bool,
    pub identity_file: String,
    /// Prune: only say what would go.
    pub dry_run: bool,
}

impl JobRecord {
    /// The record of a job cancelled before its command reached this agent: finished, so the
    /// command, if it comes later, is ignored like any job id already known.
    pub fn cancelled_unstarted(id: &str, by: &str, now_ms: i64) -> JobRecord {
        JobRecord {
            id: id.to_string(),
            kind: JobKind::Deploy,
            app: String::new(),
            version: String::new(),
            spec_toml: String::new(),
            spec_revision: 0,
            skip_backup: false,
            wait_lock: false,
            skip_migration: false,
            keep_previous: false,
            requested_by: by.to_string(),
            accepted_unix_ms: now_ms,
            step: String::new(),
            finished: true,
            release: String::new(),
            previous: String::new(),
            switched: false,
            backup: None,
        }
    }

    /// The lock the job holds: the app's deploy lock, or `backup:<target>`.
    pub fn lock_key(&self) -> String {
        if self.kind.is_backup() {
            format!("backup:{}", self.app)
        } else {
            self.app.clone()
        }
    }
}

/// The agent's sled database.
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    outbox: sled::Tree,
    locks: sled::Tree,
    jobs: sled::Tree,
    releases: sled::Tree,
    backups: sled::Tree,
    // Serialises sequence assignment so numbers stay consecutive.
    last_seq: Mutex<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn u64_of(v: Option<sled::IVec>) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(bytes) => bytes
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("counter is not 8 bytes".into())),
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    /// Makes every write so far durable. sled 0.34's `flush_async` deadlocks when several
    /// callers await it at once (spacejam/sled#1308), so the blocking flush runs on the
    /// blocking pool instead.
    async fn flush_durable(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task failed: {e}")))??;
        Ok(())
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.display().to_string(),
                source,
            })?;
        let meta = db.open_tree("meta")?;
        let outbox = db.open_tree("outbox")?;
        let locks = db.open_tree("locks")?;
        let jobs = db.open_tree("jobs")?;
        let releases = db.open_tree("releases")?;
        let backups = db.open_tree("backups")?;
        match u64_of(meta.get(KEY_SCHEMA)?)? {
            0 => {
                meta.insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            SCHEMA_VERSION => {}
            found => return Err(StoreError::Schema { found }),
        }
        let last_seq = u64_of(meta.get(KEY_LAST_SEQ)?)?;
        Ok(Store {
            db,
            meta,
            outbox,
            locks,
            jobs,
            releases,
            backups,
            last_seq: Mutex::new(last_seq),
        })
    }

    /// Records an event durably (flushed) and returns it with its sequence number.
    pub async fn append(&self, new: NewEvent, at_unix_ms: i64) -> Result<Event, StoreError> {
        let event = {
            let mut last = self.last_seq.lock().unwrap_or_else(|e| e.into_inner());
            let seq = *last + 1;
            let event = Event {
                seq,
                job_id: new.job_id,
                at_unix_ms,
                kind: new.kind,
                message: new.message,
                fields: new.fields,
                payload: new.payload,
            };
            let bytes =
                serde_json::to_vec(&event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            use sled::Transactional;
            (&self.meta, &self.outbox)
                .transaction(|(meta, outbox)| {
                    outbox.insert(&seq.to_be_bytes(), bytes.as_slice())?;
                    meta.insert(KEY_LAST_SEQ, &seq.to_be_bytes())?;
                    Ok(())
                })
                .map_err(|e: sled::transaction::TransactionError<()>| match e {
                    sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                    sled::transaction::TransactionError::Abort(()) => {
                        StoreError::Corrupt("transaction aborted".into())
                    }
                })?;
            *last = seq;
            event
        };
        self.flush_durable().await?;
        Ok(event)
    }

    /// Events not yet acknowledged with a sequence above `after`, oldest first, at most `limit`.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let start = (after + 1).to_be_bytes();
        self.outbox
            .range(start..)
            .take(limit)
            .map(|item| {
                let (_, v) = item?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// Deletes every event up to and including `upto`: the controller has stored them.
    pub async fn ack(&self, upto: u64) -> Result<(), StoreError> {
        let acked = self.acked_seq()?;
        if upto <= acked {
            return Ok(());
        }
        let end = (upto + 1).to_be_bytes();
        let mut batch = sled::Batch::default();
        for item in self.outbox.range(..end) {
            let (k, _) = item?;
            batch.remove(k);
        }
        self.outbox.apply_batch(batch)?;
        self.meta.insert(KEY_ACKED, &upto.to_be_bytes())?;
        self.flush_durable().await?;
        Ok(())
    }

    /// The highest sequence the controller has acknowledged.
    pub fn acked_seq(&self) -> Result<u64, StoreError> {
        u64_of(self.meta.get(KEY_ACKED)?)
    }

    /// The highest sequence assigned so far.
    pub fn last_seq(&self) -> u64 {
        *self.last_seq.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next sequence number at least `seq + 1`. Used when the controller already
    /// holds events up to `seq` (this host's store was wiped or restored from an old copy), so
    /// new events are not mistaken for duplicates and dropped.
    pub async fn advance_seq(&self, seq: u64) -> Result<(), StoreError> {
        {
            let mut last = self.last_seq.lock().unwrap_or_else(|e| e.into_inner());
            if *last >= seq {
                return Ok(());
            }
            self.meta.insert(KEY_LAST_SEQ, &seq.to_be_bytes())?;
            *last = seq;
        }
        self.flush_durable().await?;
        Ok(())
    }

    /// Takes or renews `app`'s deploy lock for `holder` (compare-and-swap, flushed), or says
    /// who holds it. See [`crate::lock::decide`].
    pub async fn lock(
        &self,
        app: &str,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Decision, StoreError> {
        loop {
            let old = self.locks.get(app)?;
            let existing: Option<Lease> = old
                .as_ref()
                .map(|v| serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string())))
                .transpose()?;
            let decision = decide(existing.as_ref(), app, holder, now_ms, lease_ms);
            let Decision::Grant(lease) = &decision else {
                return Ok(decision);
            };
            let new = serde_json::to_vec(lease).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if self.locks.compare_and_swap(app, old, Some(new))?.is_ok() {
                self.flush_durable().await?;
                return Ok(decision);
            }
        }
    }

    /// Releases `app`'s lock if `holder` holds it.
    pub async fn unlock(&self, app: &str, holder: &str) -> Result<(), StoreError> {
        if let Some(old) = self.locks.get(app)? {
            let lease: Lease =
                serde_json::from_slice(&old).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if lease.holder == holder {
                let _ = self.locks.compare_and_swap(app, Some(old), None::<&[u8]>)?;
                self.flush_durable().await?;
            }
        }
        Ok(())
    }

    /// Forgets the oldest finished jobs beyond [`KEEP_JOBS`] (their events went to the
    /// controller long ago; only ids of recent jobs are needed to recognise a resent command).
    fn trim_jobs(&self) -> Result<(), StoreError> {
        if self.jobs.len() <= KEEP_JOBS {
            return Ok(());
        }
        let mut finished: Vec<(i64, sled::IVec)> = Vec::new();
        for item in self.jobs.iter() {
            let (key, value) = item?;
            let job: JobRecord = from_json(&value)?;
            if job.finished {
                finished.push((job.accepted_unix_ms, key));
            }
        }
        finished.sort_by_key(|(at, _)| *at);
        let excess = self.jobs.len().saturating_sub(KEEP_JOBS);
        for (_, key) in finished.into_iter().take(excess) {
            self.jobs.remove(key)?;
        }
        Ok(())
    }

    /// Stores a newly received job (flushed) unless its id is already known. Returns whether
    /// it was new: a command sent again after a reconnect is recognised and ignored.
    pub async fn accept_job(&self, job: &JobRecord) -> Result<bool, StoreError> {
        let bytes = to_json(job)?;
        let inserted = self
            .jobs
            .compare_and_swap(job.id.as_bytes(), None::<&[u8]>, Some(bytes))?
            .is_ok();
        if inserted {
            self.trim_jobs()?;
            self.flush_durable().await?;
        }
        Ok(inserted)
    }

    /// Records a job's progress (flushed).
    pub async fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.jobs.insert(job.id.as_bytes(), to_json(job)?)?;
        self.flush_durable().await
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.jobs.get(id)?.map(|v| from_json(&v)).transpose()
    }

    /// Jobs taken but not finished: after a restart, the ones a crash interrupted.
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.jobs.iter() {
            let job: JobRecord = from_json(&item?.1)?;
            if !job.finished {
                out.push(job);
            }
        }
        out.sort_by_key(|j| j.accepted_unix_ms);
        Ok(out)
    }

    /// An app's release table on this host (empty if it was never deployed here).
    pub fn releases(&self, app: &str) -> Result<Vec<Release>, StoreError> {
        Ok(self
            .releases
            .get(app)?
            .map(|v| from_json(&v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Apps with a release table.
    pub fn release_apps(&self) -> Result<Vec<String>, StoreError> {
        self.releases
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    /// Replaces an app's release table (flushed).
    pub async fn put_releases(&self, app: &str, releases: &[Release]) -> Result<(), StoreError> {
        self.releases.insert(app, to_json(&releases)?)?;
        self.flush_durable().await
    }

    /// A target's backup catalog on this host, newest first.
    pub fn backups(&self, target: &str) -> Result<Vec<Backup>, StoreError> {
        let mut out: Vec<Backup> = Vec::new();
        for item in self.backups.scan_prefix(format!("{target}\0")) {
            out.push(from_json(&item?.1)?);
        }
        out.sort_by(|a, b| {
            b.started_unix_ms
                .cmp(&a.started_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        Ok(out)
    }

    /// The backup with this id, of any target.
    pub fn backup(&self, target: &str, id: &str) -> Result<Option<Backup>, StoreError> {
        self.backups
            .get(format!("{target}\0{id}"))?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Records (or updates) a backup in the catalog, flushed.
    pub async fn put_backup(&self, backup: &Backup) -> Result<(), StoreError> {
        self.backups.insert(
            format!("{}\0{}", backup.target, backup.id),
            to_json(backup)?,
        )?;
        self.flush_durable().await
    }

    /// Forgets a backup (both its copies are gone), flushed.
    pub async fn remove_backup(&self, target: &str, id: &str) -> Result<(), StoreError> {
        self.backups.remove(format!("{target}\0{id}"))?;
        self.flush_durable().await
    }

    /// Writes a job's progress and its app's release table as one (a switch of traffic is
    /// both at once: a crash sees either neither or both), flushed.
    pub async fn commit(&self, job: &JobRecord, releases: &[Release]) -> Result<(), StoreError> {
        let job_bytes = to_json(job)?;
        let table = to_json(&releases)?;
        use sled::Transactional;
        (&self.jobs, &self.releases)
            .transaction(|(jobs, rels)| {
                jobs.insert(job.id.as_bytes(), job_bytes.as_slice())?;
                rels.insert(job.app.as_bytes(), table.as_slice())?;
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => {
                    StoreError::Corrupt("transaction aborted".into())
                }
            })?;
        self.flush_durable().await
    }

    /// How many events wait for acknowledgement.
    pub fn pending_count(&self) -> usize {
        self.outbox.len()
    }

    pub fn last_command_id(&self) -> Result<String, StoreError> {
        Ok(self
            .meta
            .get(KEY_LAST_COMMAND)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default())
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

    #[test]
    fn an_outbox_event_stored_before_payloads_still_reads() {
        let old = r#"{"seq":7,"job_id":"j","at_unix_ms":1,"kind":"app.releases","message":"","fields":{"app":"api","releases":"[]"}}"#;
        let e: Event = serde_json::from_str(old).unwrap();
        assert_eq!((e.seq, e.payload), (7, None));
        assert_eq!(e.fields["releases"], "[]");
    }

    fn ev(n: u32) -> NewEvent {
        NewEvent {
            job_id: "job".into(),
            kind: "test".into(),
            message: format!("event {n}"),
            fields: BTreeMap::new(),
            payload: None,
        }
    }

    #[tokio::test]
    async fn events_survive_reopen_until_acked() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            for n in 1..=5 {
                assert_eq!(store.append(ev(n), 0).await.unwrap().seq, u64::from(n));
            }
            store.ack(2).await.unwrap();
        }
        let store = reopen(tmp.path());
        assert_eq!(store.acked_seq().unwrap(), 2);
        assert_eq!(store.last_seq(), 5);
        let pending = store
            .pending_after(store.acked_seq().unwrap(), 100)
            .unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(pending[0].message, "event 3");
        // Numbering continues after a restart; an old ack changes nothing.
        assert_eq!(store.append(ev(6), 0).await.unwrap().seq, 6);
        store.ack(1).await.unwrap();
        assert_eq!(store.pending_count(), 4);
        assert_eq!(store.pending_after(4, 1).unwrap()[0].seq, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_distinct_consecutive_numbers() {
        // Concurrent flushes must all finish (see flush_durable).
        let tmp = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(tmp.path()).unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { store.append(ev(n), 0).await.unwrap().seq })
            })
            .collect();
        let all = futures::future::join_all(tasks);
        let mut seqs: Vec<u64> = tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .expect("200 concurrent appends finish within 30s")
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
        assert_eq!(store.pending_count(), 200);
    }

    #[tokio::test]
    async fn deploy_locks_survive_a_restart_and_expire_by_lease() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            assert!(matches!(
                store.lock("api", "job-1", 1_000, 60_000).await.unwrap(),
                Decision::Grant(_)
            ));
        }
        // The agent "crashed"; after a restart the lock is still held...
        let store = reopen(tmp.path());
        match store.lock("api", "job-2", 2_000, 60_000).await.unwrap() {
            Decision::Held(lease) => assert_eq!(
                (lease.holder.as_str(), lease.since_unix_ms),
                ("job-1", 1_000)
            ),
            other => panic!("{other:?}"),
        }
        // ...other apps are independent...
        assert!(matches!(
            store.lock("web", "job-2", 2_000, 60_000).await.unwrap(),
            Decision::Grant(_)
        ));
        // ...and once the lease runs out, the next deploy takes it.
        assert!(matches!(
            store.lock("api", "job-2", 61_001, 60_000).await.unwrap(),
            Decision::Grant(_)
        ));
        store.unlock("api", "job-1").await.unwrap(); // not the holder any more: no effect
        assert!(matches!(
            store.lock("api", "job-3", 61_002, 60_000).await.unwrap(),
            Decision::Held(_)
        ));
        store.unlock("api", "job-2").await.unwrap();
        assert!(matches!(
            store.lock("api", "job-3", 61_003, 60_000).await.unwrap(),
            Decision::Grant(_)
        ));
    }

    #[tokio::test]
    async fn jobs_are_taken_once_and_old_finished_ones_are_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let job = |n: usize| JobRecord {
            id: format!("job-{n}"),
            kind: JobKind::Deploy,
            app: "api".into(),
            version: "v1.0.0".into(),
            spec_toml: String::new(),
            spec_revision: 1,
            skip_backup: false,
            wait_lock: false,
            skip_migration: false,
            keep_previous: false,
            requested_by: "alice".into(),
            accepted_unix_ms: n as i64,
            step: String::new(),
            finished: n != 0,
            release: String::new(),
            previous: String::new(),
            switched: false,
            backup: None,
        };
        assert!(store.accept_job(&job(0)).await.unwrap());
        assert!(
            !store.accept_job(&job(0)).await.unwrap(),
            "a resent command is recognised"
        );
        for n in 1..=KEEP_JOBS + 10 {
            assert!(store.accept_job(&job(n)).await.unwrap());
        }
        assert!(
            store.job("job-0").unwrap().is_some(),
            "an unfinished job is never forgotten"
        );
        assert!(
            store.job("job-1").unwrap().is_none(),
            "the oldest finished ones go"
        );
        assert_eq!(store.unfinished_jobs().unwrap().len(), 1);
        assert!(
            store
                .job(&format!("job-{}", KEEP_JOBS + 10))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let db = sled::open(tmp.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(KEY_SCHEMA, &9u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("schema version 9"), "{err}");
    }
}
