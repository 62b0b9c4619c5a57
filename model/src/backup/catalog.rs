//! The backup catalog's records: one [`Backup`] per run of a target on a host, with its parts
//! (a dumped database each, or the files), where the copies are, and whether they were read
//! back. The agent keeps them in its store and reports a target's whole catalog to the
//! controller as `backup.catalog` after every job that changed it; the manifest written next
//! to the files is the same record. Shared by both sides, like `jobevent::Release`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A target's catalog on this host: `target`, and the catalog as
/// [`crate::jobevent::Payload::Catalog`].
pub const CATALOG: &str = "backup.catalog";
/// The result of a validation of a target's newest backup: `target`, and the record as
/// [`crate::jobevent::Payload::Verification`]. The controller keeps each as the target's history.
pub const VERIFICATION: &str = "backup.verification";
/// Live bytes of a running backup or restore: `step`, `source_bytes`, `stored_bytes`,
/// `rate_bytes_per_sec`.
pub const BYTES: &str = "backup.bytes";

pub mod field {
    pub const TARGET: &str = "target";
    /// Legacy: the JSON array of [`super::Backup`] in `backup.catalog`.
    pub const BACKUPS: &str = "backups";
    pub const BACKUP_ID: &str = "backup_id";
    pub const SOURCE_BYTES: &str = "source_bytes";
    pub const STORED_BYTES: &str = "stored_bytes";
    pub const RATE: &str = "rate_bytes_per_sec";
    /// Legacy (see `jobevent::legacy_payload`): a prune's lines as JSON in `job.finished`.
    pub const PRUNE: &str = "prune";
    /// Legacy: the JSON of a [`super::Verification`] in `backup.verification`.
    pub const VERIFICATION: &str = "verification";
}

/// Why a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Manual,
    PreDeploy,
    /// Taken of a database right before a restore overwrote it.
    Emergency,
    Scheduled,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::PreDeploy => "pre_deploy",
            Trigger::Emergency => "emergency",
            Trigger::Scheduled => "scheduled",
        }
    }

    pub fn parse(s: &str) -> Trigger {
        match s {
            "pre_deploy" => Trigger::PreDeploy,
            "emergency" => Trigger::Emergency,
            "scheduled" => Trigger::Scheduled,
            _ => Trigger::Manual,
        }
    }
}

/// A table in a dumped database, with the planner's row estimate when the dump ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub rows: i64,
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// The database, or `files`.
    pub name: String,
    /// File name inside the backup's folder (and object key suffix).
    pub file: String,
    /// Bytes stored (compressed, encrypted).
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// Bytes the source produced (the dump or the tar stream).
    pub source_bytes: u64,
    /// PostgreSQL only: `pg_dump --version`, the server's version, tables.
    #[serde(default)]
    pub pg_dump_version: String,
    #[serde(default)]
    pub server_version: String,
    #[serde(default)]
    pub tables: Vec<Table>,
}

/// One backup of a target on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// `<target>-<UTC stamp>-<4 hex>`: unique, sorts by time.
    pub id: String,
    pub target: String,
    pub host: String,
    /// `postgres`, `volume` or `path`.
    pub kind: String,
    pub trigger: Trigger,
    pub job_id: String,
    pub requested_by: String,
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    pub parts: Vec<Part>,
    /// `zstd-<level>`.
    pub compression: String,
    /// age recipients it is encrypted to; empty when not encrypted.
    pub recipients: Vec<String>,
    /// The app's release live when it was taken (`app version`), if the target names an app.
    #[serde(default)]
    pub release: String,
    /// The local copy's folder, while it exists.
    #[serde(default)]
    pub local_dir: String,
    /// `s3://bucket/prefix/target/id/`, while the remote copy exists.
    #[serde(default)]
    pub remote: String,
    /// When the stored copies were last read back and matched the manifest (0: never, or a
    /// copy was found corrupt since).
    #[serde(default)]
    pub verified_unix_ms: i64,
    /// Why the local copy is known to be corrupt (`sha256 mismatch`), found by a restore or a
    /// validation that then used the remote copy; empty while it is not known to be. Absent
    /// in records written before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local_corrupt: String,
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

impl Backup {
    pub fn size(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }

    pub fn source_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.source_bytes).sum()
    }

    /// Source bytes per stored byte (2.5 means the stored copy is 2.5× smaller).
    pub fn ratio(&self) -> f64 {
        let size = self.size();
        if size == 0 {
            0.0
        } else {
            self.source_bytes() as f64 / size as f64
        }
    }

    pub fn is_local(&self) -> bool {
        !self.local_dir.is_empty()
    }

    pub fn is_remote(&self) -> bool {
        !self.remote.is_empty()
    }

    /// Records that the local copy failed its hash check (`why`, e.g. `sha256 mismatch`): it
    /// is no longer called verified until a validation passes again.
    pub fn mark_local_corrupt(&mut self, why: &str) {
        self.local_corrupt = why.to_string();
        self.verified_unix_ms = 0;
    }

    /// The part to restore: the named one, or the only one.
    pub fn part(&self, name: Option<&str>) -> Result<&Part, PartError> {
        match name {
            Some(n) => self
                .parts
                .iter()
                .find(|p| p.name == n)
                .ok_or_else(|| PartError::NoSuch {
                    backup: self.id.clone(),
                    name: n.to_string(),
                    names: self.part_names(),
                }),
            None if self.parts.len() == 1 => Ok(&self.parts[0]),
            None => Err(PartError::Several {
                backup: self.id.clone(),
                names: self.part_names(),
            }),
        }
    }

    fn part_names(&self) -> String {
        self.parts
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A backup has no such part, or several and none was named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    #[error("backup {backup} has no part {name:?} (it has {names})")]
    NoSuch {
        backup: String,
        name: String,
        names: String,
    },
    #[error("backup {backup} has several parts ({names}); say which with --database")]
    Several { backup: String, names: String },
}

/// What a prune did (or would do) to one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneLine {
    pub id: String,
    /// `local` or `remote`.
    pub copy: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// How one check of a validation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    Passed,
    Failed,
    /// Does not apply (no remote copy, not a database) or could not run after an earlier
    /// failure.
    Skipped,
}

impl CheckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Passed => "passed",
            CheckResult::Failed => "failed",
            CheckResult::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<CheckResult> {
        Some(match s {
            "passed" => CheckResult::Passed,
            "failed" => CheckResult::Failed,
            "skipped" => CheckResult::Skipped,
            _ => return None,
        })
    }
}

/// One check of a validation, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// `exists`, `age`, `hash_local`, `hash_remote`, `decompress`, `pg_list`, `restore`,
    /// `sanity`, `scratch_removed`, `disk`.
    pub name: String,
    pub result: CheckResult,
    /// The evidence in words, or why it failed.
    pub message: String,
    pub duration_ms: i64,
    /// The numbers behind the message (bytes, counts, ages).
    #[serde(default)]
    pub evidence: BTreeMap<String, String>,
}

/// One validation of a target's newest backup on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The verify job's id.
    pub job_id: String,
    pub target: String,
    pub host: String,
    /// Empty when there was no backup to check.
    pub backup_id: String,
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    pub checks: Vec<Check>,
    /// The copy the content checks (decompress, pg_list, restore, sanity) read: `local`,
    /// `remote`, or empty when none matched the manifest. Absent in older records.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub copy: String,
    /// Why the local copy failed its hash check (`corrupt (sha256 mismatch)`), if it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local_corrupt: String,
}

impl Verification {
    /// A backup passes only when no check failed (and there was one to check).
    pub fn passed(&self) -> bool {
        !self.backup_id.is_empty() && self.checks.iter().all(|c| c.result != CheckResult::Failed)
    }

    pub fn failed_checks(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.result == CheckResult::Failed)
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// A backup id: `<target>-YYYYMMDD-HHMMSS-<4 hex>` (UTC).
pub fn backup_id(target: &str, now_ms: i64, suffix: u16) -> String {
    format!(
        "{target}-{}-{suffix:04x}",
        crate::jobevent::id_stamp(now_ms)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_without_local_corrupt_parse_and_a_corrupt_mark_unverifies() {
        let old = r#"{"id":"t-1","target":"t","host":"h","kind":"path","trigger":"manual","job_id":"j","requested_by":"","started_unix_ms":1,"finished_unix_ms":2,"parts":[],"compression":"zstd-3","recipients":[],"local_dir":"/x","verified_unix_ms":5}"#;
        let mut b: Backup = serde_json::from_str(old).unwrap();
        assert!(b.local_corrupt.is_empty());
        assert!(!serde_json::to_string(&b).unwrap().contains("local_corrupt"));
        b.mark_local_corrupt("sha256 mismatch");
        assert_eq!(b.verified_unix_ms, 0);
        let again: Backup = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(again.local_corrupt, "sha256 mismatch");
    }

    #[test]
    fn ids_sort_by_time_and_carry_the_target() {
        let a = backup_id("shop-db", 1_763_900_000_000, 0xffff);
        let b = backup_id("shop-db", 1_763_900_001_000, 0);
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("shop-db-2025"), "{a}");
    }

    #[test]
    fn the_part_to_restore_is_named_or_the_only_one() {
        let part = |name: &str| Part {
            name: name.into(),
            file: format!("{name}.dump.zst"),
            size: 10,
            sha256: String::new(),
            source_bytes: 25,
            pg_dump_version: String::new(),
            server_version: String::new(),
            tables: vec![],
        };
        let mut b = Backup {
            id: "x".into(),
            target: "t".into(),
            host: "h".into(),
            kind: "postgres".into(),
            trigger: Trigger::Manual,
            job_id: String::new(),
            requested_by: String::new(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            parts: vec![part("shop")],
            compression: "zstd-3".into(),
            recipients: vec![],
            release: String::new(),
            local_dir: String::new(),
            remote: String::new(),
            verified_unix_ms: 0,
            local_corrupt: String::new(),
            extra: BTreeMap::new(),
        };
        assert_eq!(b.part(None).unwrap().name, "shop");
        assert!((b.ratio() - 2.5).abs() < 1e-9);
        b.parts.push(part("crm"));
        assert!(b.part(None).unwrap_err().to_string().contains("--database"));
        assert_eq!(b.part(Some("crm")).unwrap().name, "crm");
        assert!(
            b.part(Some("x"))
                .unwrap_err()
                .to_string()
                .contains("shop, crm")
        );
    }
}
