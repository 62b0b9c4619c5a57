//! Backup targets: the TOML that says what to back up (a PostgreSQL database, a Docker volume,
//! a host directory), where the files go (a local directory, optionally S3-compatible storage),
//! how they are compressed and encrypted, and how many are kept. Parsed and validated with
//! errors that name the file, the key and what is wrong; pure, so the controller validates at
//! `drover backup-target apply` and the agent again before each job.
//!
//! ```toml
//! name = "shop-db"
//! host = "web-1"                 # optional: where it runs (else --host, labels, or the only host)
//! app = "shop"                   # optional: the app whose live release is recorded
//! [postgres]
//! container = "shop-db"          # pg_dump through the Docker exec API, or url = "postgresql://…"
//! databases = ["shop"]
//! [storage.s3]
//! endpoint = "https://s3.example.net"
//! bucket = "backups"
//! credentials_file = "/etc/drover/s3.toml"
//! [encryption]
//! recipients = ["age1…"]
//! [retention]
//! keep_last = 7
//! daily = 7
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backup::retention::Policy;
use crate::config::{ConfigError, check_count, check_duration, parse_toml, read_toml_file};
use crate::names::check_name;

/// A validated backup target.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "TargetToml", into = "TargetToml")]
pub struct TargetSpec {
    pub name: String,
    /// The host it runs on, when fixed.
    pub host: Option<String>,
    /// Hosts with all these labels (when `host` is not set).
    pub labels: BTreeMap<String, String>,
    /// The app whose live release is recorded in each manifest.
    pub app: Option<String>,
    /// What it backs up.
    pub source: Source,
    pub storage: Storage,
    pub compression: Compression,
    pub encryption: Encryption,
    pub retention: Retention,
    pub verify: VerifySpec,
    pub schedule: ScheduleSpec,
}

/// What a target backs up: exactly one source, written as its `[postgres]`, `[volume]` or
/// `[path]` table.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Postgres(PostgresSource),
    Volume(VolumeSource),
    Path(PathSource),
}

/// A target as it is written: the source is whichever of three tables is there.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TargetToml {
    name: String,
    /// The host it runs on, when fixed.
    #[serde(default)]
    host: Option<String>,
    /// Hosts with all these labels (when `host` is not set).
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// The app whose live release is recorded in each manifest.
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    postgres: Option<PostgresSource>,
    #[serde(default)]
    volume: Option<VolumeSource>,
    #[serde(default)]
    path: Option<PathSource>,
    #[serde(default)]
    storage: Storage,
    #[serde(default)]
    compression: Compression,
    #[serde(default)]
    encryption: Encryption,
    #[serde(default)]
    retention: Retention,
    #[serde(default)]
    verify: VerifySpec,
    #[serde(default, skip_serializing_if = "ScheduleSpec::is_default")]
    schedule: ScheduleSpec,
}

/// What a target without a source, or with several, is told.
pub const ONE_SOURCE: &str = "declare exactly one source table: `postgres`, `volume` or `path` ([postgres], [volume] or [path])";

/// A target that declares no source table, or several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", ONE_SOURCE)]
pub struct OneSourceError;

impl TryFrom<TargetToml> for TargetSpec {
    type Error = OneSourceError;

    fn try_from(t: TargetToml) -> Result<TargetSpec, OneSourceError> {
        let source = match (t.postgres, t.volume, t.path) {
            (Some(pg), None, None) => Source::Postgres(pg),
            (None, Some(v), None) => Source::Volume(v),
            (None, None, Some(p)) => Source::Path(p),
            _ => return Err(OneSourceError),
        };
        Ok(TargetSpec {
            name: t.name,
            host: t.host,
            labels: t.labels,
            app: t.app,
            source,
            storage: t.storage,
            compression: t.compression,
            encryption: t.encryption,
            retention: t.retention,
            verify: t.verify,
            schedule: t.schedule,
        })
    }
}

impl From<TargetSpec> for TargetToml {
    fn from(t: TargetSpec) -> TargetToml {
        let (postgres, volume, path) = match t.source {
            Source::Postgres(pg) => (Some(pg), None, None),
            Source::Volume(v) => (None, Some(v), None),
            Source::Path(p) => (None, None, Some(p)),
        };
        TargetToml {
            name: t.name,
            host: t.host,
            labels: t.labels,
            app: t.app,
            storage: t.storage,
            compression: t.compression,
            encryption: t.encryption,
            retention: t.retention,
            verify: t.verify,
            schedule: t.schedule,
            postgres,
            volume,
            path,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
    /// Run `pg_dump` inside this container (Docker exec API).
    #[serde(default)]
    pub container: Option<String>,
    /// The OS user the tools run as inside the container.
    #[serde(default = "default_pg_user")]
    pub user: String,
    /// Or run the host's `pg_dump` against this libpq URL (no password in it: use
    /// `password_file`).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    pub databases: Vec<String>,
    /// Extra `pg_dump` options, e.g. `--exclude-table=audit_log`.
    #[serde(default)]
    pub options: Vec<String>,
}

fn default_pg_user() -> String {
    "postgres".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSource {
    /// The Docker volume's name.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathSource {
    pub dir: PathBuf,
    /// Glob patterns relative to `dir` (`*.tmp`, `cache/**`).
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// Local directory; empty: `<agent data dir>/backups`. Each target gets a folder in it.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub s3: Option<S3Storage>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Storage {
    pub endpoint: String,
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// A TOML file on the host with `access_key_id` and `secret_access_key`, mode 0600.
    /// The keys never leave the host.
    pub credentials_file: PathBuf,
}

fn default_region() -> String {
    "us-east-1".into()
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compression {
    /// zstd level, 1-19; 0 (the default) picks by the host's cores: 1 on up to 2 cores, where
    /// the dump competes with the database for CPU, else 3.
    pub level: i32,
    /// zstd worker threads; 0 = one per core, up to 4.
    pub threads: u32,
}

impl Compression {
    /// The zstd level to use on a machine with `cores` cores.
    pub fn effective_level(&self, cores: usize) -> i32 {
        match self.level {
            0 if cores <= 2 => 1,
            0 => 3,
            n => n,
        }
    }

    /// The thread count to use on a machine with `cores` cores.
    pub fn effective_threads(&self, cores: usize) -> u32 {
        match self.threads {
            0 => (cores.clamp(1, 4)) as u32,
            n => n,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// age recipients (`age1…` public keys). No private key is needed on the host.
    #[serde(default)]
    pub recipients: Vec<String>,
}

/// How `drover verify` judges the target's newest backup (`[verify]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifySpec {
    /// The oldest the newest backup may be (humantime: `2d`, `36h`).
    pub max_age: String,
    /// A file on the host with the age identity, for encrypted backups.
    pub identity_file: Option<PathBuf>,
    /// How far a restored table's row count may be from the manifest's estimate (0.1: 10 %).
    pub row_tolerance: f64,
    /// Test-restore into a scratch database `drover_verify_<job>_<n>` on the source's own server
    /// instead of a throw-away container. Default: true for `url` sources, false for
    /// `container` sources (which get a container from the same image).
    pub scratch_database: Option<bool>,
    /// Free space the backup directory must keep: at least this fraction of the disk …
    pub min_free_fraction: f64,
    /// … and at least this many bytes.
    pub min_free_bytes: u64,
}

impl Default for VerifySpec {
    fn default() -> Self {
        VerifySpec {
            max_age: "2d".into(),
            identity_file: None,
            row_tolerance: 0.1,
            scratch_database: None,
            min_free_fraction: 0.1,
            min_free_bytes: 1 << 30,
        }
    }
}

impl VerifySpec {
    /// `max_age` parsed (validated at load, so the default stands in only for a bad value).
    pub fn max_age(&self) -> std::time::Duration {
        humantime::parse_duration(self.max_age.trim())
            .unwrap_or(std::time::Duration::from_secs(2 * 86_400))
    }
}

/// When the controller runs this target's backups and validations (`[schedule]`). Each key
/// left out keeps the controller's default (nightly backup at 02:00 with up to 15 minutes of
/// jitter, validation on Sundays at 06:00, in UTC); `"off"` means no such schedule. The cron
/// expressions and the zone are checked by the controller, which owns the scheduler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSpec {
    /// 5-field cron expression of the backup, or `"off"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// 5-field cron expression of the validation, or `"off"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// IANA zone both expressions are read in (default UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The backup's spread (humantime, `"15m"`; `"0s"` for none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
}

impl ScheduleSpec {
    pub fn is_default(&self) -> bool {
        *self == ScheduleSpec::default()
    }

    /// `jitter` parsed (validated at load).
    pub fn jitter(&self) -> Option<std::time::Duration> {
        self.jitter
            .as_deref()
            .and_then(|j| humantime::parse_duration(j.trim()).ok())
    }
}

/// Retention, applied after each successful backup: local copies by `[retention]`, remote
/// copies by `[retention.remote]` when given (else the same rule).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    pub keep_last: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub remote: Option<Policy>,
}

impl Default for Retention {
    /// The last 3, a week of dailies, 4 weeklies, 6 monthlies.
    fn default() -> Self {
        Retention {
            keep_last: 3,
            daily: 7,
            weekly: 4,
            monthly: 6,
            remote: None,
        }
    }
}

impl Retention {
    pub fn local(&self) -> Policy {
        Policy {
            keep_last: self.keep_last,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
        }
    }

    pub fn remote(&self) -> Policy {
        self.remote.unwrap_or_else(|| self.local())
    }
}

/// What a target backs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Postgres,
    Volume,
    Path,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Postgres => "postgres",
            SourceKind::Volume => "volume",
            SourceKind::Path => "path",
        }
    }
}

/// A PostgreSQL identifier we accept as a database name (no quoting games).
fn valid_database(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl TargetSpec {
    pub fn from_file(path: &Path) -> Result<TargetSpec, ConfigError> {
        let spec: TargetSpec = read_toml_file(path)?;
        spec.validate(&path.display().to_string())?;
        Ok(spec)
    }

    pub fn from_toml(text: &str, source: &str) -> Result<TargetSpec, ConfigError> {
        let spec: TargetSpec = parse_toml(text, source)?;
        spec.validate(source)?;
        Ok(spec)
    }

    pub fn kind(&self) -> SourceKind {
        match self.source {
            Source::Postgres(_) => SourceKind::Postgres,
            Source::Volume(_) => SourceKind::Volume,
            Source::Path(_) => SourceKind::Path,
        }
    }

    /// The PostgreSQL source, when the target backs up databases.
    pub fn postgres(&self) -> Option<&PostgresSource> {
        match &self.source {
            Source::Postgres(pg) => Some(pg),
            Source::Volume(_) | Source::Path(_) => None,
        }
    }

    /// The parts one backup of this target has: a database each, or `files`.
    pub fn parts(&self) -> Vec<String> {
        match &self.source {
            Source::Postgres(pg) => pg.databases.clone(),
            Source::Volume(_) | Source::Path(_) => vec!["files".into()],
        }
    }

    /// Checks everything serde cannot; the error names `source` and the key.
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| ConfigError::Invalid {
            path: source.to_string(),
            key,
            message,
        };
        check_name(&self.name).map_err(|m| bad("name", m.to_string()))?;
        if self.host.is_some() && !self.labels.is_empty() {
            return Err(bad("labels", "give either host or labels, not both".into()));
        }
        if let Source::Postgres(pg) = &self.source {
            match (&pg.container, &pg.url) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(bad(
                        "postgres.container",
                        "give either container (pg_dump through docker exec) or url (the host's pg_dump)".into(),
                    ));
                }
                (Some(c), None) if c.trim().is_empty() => {
                    return Err(bad("postgres.container", "is empty".into()));
                }
                (None, Some(url)) => {
                    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
                        return Err(bad(
                            "postgres.url",
                            "must be a postgresql:// URL (without the database name)".into(),
                        ));
                    }
                    if url_has_password(url) {
                        return Err(bad(
                            "postgres.url",
                            "holds a password; put it in password_file (mode 0600) instead".into(),
                        ));
                    }
                }
                _ => {}
            }
            if pg.password_file.is_some() && pg.url.is_none() {
                return Err(bad(
                    "postgres.password_file",
                    "only applies with url (the container path runs as a local user)".into(),
                ));
            }
            if pg.databases.is_empty() {
                return Err(bad(
                    "postgres.databases",
                    "name at least one database".into(),
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for db in &pg.databases {
                if !valid_database(db) || !seen.insert(db) {
                    return Err(bad(
                        "postgres.databases",
                        format!("{db:?} is not a valid, unique database name"),
                    ));
                }
            }
            check_pg_dump_options(&pg.options)
                .map_err(|m| bad("postgres.options", m.to_string()))?;
        }
        for (key, expr) in [
            ("schedule.backup", &self.schedule.backup),
            ("schedule.verify", &self.schedule.verify),
        ] {
            if expr.as_deref().is_some_and(|e| e.trim().is_empty()) {
                return Err(bad(
                    key,
                    "is empty: give a cron expression (\"0 2 * * *\") or \"off\"".into(),
                ));
            }
        }
        if let Some(jitter) = &self.schedule.jitter
            && humantime::parse_duration(jitter.trim())
                .map_or(true, |j| j >= std::time::Duration::from_secs(86_400))
        {
            return Err(bad(
                "schedule.jitter",
                format!("{jitter:?} is not a duration below one day (e.g. \"15m\", \"0s\")"),
            ));
        }
        match humantime::parse_duration(self.verify.max_age.trim()) {
            Err(_) => {
                return Err(bad(
                    "verify.max_age",
                    format!(
                        "{:?} is not a duration (e.g. \"2d\", \"36h\")",
                        self.verify.max_age
                    ),
                ));
            }
            Ok(age) => check_duration(
                age,
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(366 * 86_400),
            )
            .map_err(|m| bad("verify.max_age", m.to_string()))?,
        }
        for (key, value, max) in [
            ("retention.keep_last", self.retention.keep_last, 10_000),
            ("retention.daily", self.retention.daily, 3660),
            ("retention.weekly", self.retention.weekly, 520),
            ("retention.monthly", self.retention.monthly, 1200),
        ] {
            check_count(value.into(), 0, max).map_err(|m| bad(key, m.to_string()))?;
        }
        if let Some(remote) = &self.retention.remote {
            for (key, value, max) in [
                ("retention.remote.keep_last", remote.keep_last, 10_000),
                ("retention.remote.daily", remote.daily, 3660),
                ("retention.remote.weekly", remote.weekly, 520),
                ("retention.remote.monthly", remote.monthly, 1200),
            ] {
                check_count(value.into(), 0, max).map_err(|m| bad(key, m.to_string()))?;
            }
        }
        if !(0.0..=10.0).contains(&self.verify.row_tolerance) {
            return Err(bad(
                "verify.row_tolerance",
                "must be between 0 and 10 (0.1 means 10 %)".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.verify.min_free_fraction) {
            return Err(bad(
                "verify.min_free_fraction",
                "must be at least 0 and below 1 (0.1 means 10 %)".into(),
            ));
        }
        if let Source::Volume(v) = &self.source
            && (v.name.is_empty() || v.name.contains('/'))
        {
            return Err(bad(
                "volume.name",
                format!("{:?} is not a Docker volume name", v.name),
            ));
        }
        if let Source::Path(p) = &self.source {
            if !p.dir.is_absolute() {
                return Err(bad(
                    "path.dir",
                    format!("{} must be an absolute path", p.dir.display()),
                ));
            }
            for pattern in &p.exclude {
                globset::Glob::new(pattern)
                    .map_err(|e| bad("path.exclude", format!("{pattern:?}: {e}")))?;
            }
        }
        if let Some(dir) = &self.storage.dir
            && !dir.is_absolute()
        {
            return Err(bad(
                "storage.dir",
                format!("{} must be an absolute path", dir.display()),
            ));
        }
        if let Some(s3) = &self.storage.s3 {
            if !(s3.endpoint.starts_with("https://") || s3.endpoint.starts_with("http://")) {
                return Err(bad(
                    "storage.s3.endpoint",
                    format!("{:?} must be an https:// URL", s3.endpoint),
                ));
            }
            if s3.bucket.is_empty() {
                return Err(bad("storage.s3.bucket", "is empty".into()));
            }
            if !s3.credentials_file.is_absolute() {
                return Err(bad(
                    "storage.s3.credentials_file",
                    "must be an absolute path to a file on the host".into(),
                ));
            }
        }
        if !(0..=19).contains(&self.compression.level) {
            return Err(bad(
                "compression.level",
                format!(
                    "{} is not a zstd level (1-19, or 0 to pick by the host's cores)",
                    self.compression.level
                ),
            ));
        }
        if self.compression.threads > 64 {
            return Err(bad(
                "compression.threads",
                format!("{} threads is too many", self.compression.threads),
            ));
        }
        for r in &self.encryption.recipients {
            if r.starts_with("AGE-SECRET-KEY") {
                return Err(bad(
                    "encryption.recipients",
                    "holds a private key; give the public key (age1…), and keep the private key off the host".into(),
                ));
            }
            if !is_age_recipient(r) {
                return Err(bad(
                    "encryption.recipients",
                    format!("{r:?} is not an age public key (age1…)"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `text` is an age X25519 public key: bech32 with the prefix `age` over 32 bytes
/// (what `age::x25519::Recipient` parses; the agent parses it again when it encrypts).
pub fn is_age_recipient(text: &str) -> bool {
    use bech32::FromBase32;
    match bech32::decode(text) {
        Ok((hrp, data, bech32::Variant::Bech32)) if hrp == "age" => {
            Vec::<u8>::from_base32(&data).is_ok_and(|key| key.len() == 32)
        }
        _ => false,
    }
}

/// `pg_dump` options a target may add, by their exact long or short name, and whether each
/// takes a value. An allow-list, not a deny-list: `getopt` accepts abbreviations
/// (`--fil=` is `--file=`), attached values (`-f/tmp/x`) and grouped flags (`-Oxf x`), so
/// anything not named here exactly is refused. The format, output, database and compression
/// are Drover's (a custom-format archive on stdout, compressed by the pipeline).
const PG_DUMP_OPTIONS: &[(&str, bool)] = &[
    ("-a", false),
    ("--data-only", false),
    ("-s", false),
    ("--schema-only", false),
    ("-b", false),
    ("--blobs", false),
    ("--large-objects", false),
    ("-B", false),
    ("--no-blobs", false),
    ("--no-large-objects", false),
    ("-O", false),
    ("--no-owner", false),
    ("-x", false),
    ("--no-privileges", false),
    ("--no-acl", false),
    ("--no-comments", false),
    ("--no-publications", false),
    ("--no-subscriptions", false),
    ("--no-security-labels", false),
    ("--no-tablespaces", false),
    ("--no-toast-compression", false),
    ("--no-table-access-method", false),
    ("--no-unlogged-table-data", false),
    ("--quote-all-identifiers", false),
    ("--serializable-deferrable", false),
    ("--strict-names", false),
    ("--enable-row-security", false),
    ("--load-via-partition-root", false),
    ("--inserts", false),
    ("--column-inserts", false),
    ("--attribute-inserts", false),
    ("-n", true),
    ("--schema", true),
    ("-N", true),
    ("--exclude-schema", true),
    ("-t", true),
    ("--table", true),
    ("-T", true),
    ("--exclude-table", true),
    ("--table-and-children", true),
    ("--exclude-table-and-children", true),
    ("--exclude-table-data", true),
    ("--exclude-table-data-and-children", true),
    ("-e", true),
    ("--extension", true),
    ("--exclude-extension", true),
    ("--section", true),
    ("--lock-wait-timeout", true),
    ("--snapshot", true),
    ("--role", true),
    ("--rows-per-insert", true),
    ("--extra-float-digits", true),
];

/// Checks a target's extra `pg_dump` options against [`PG_DUMP_OPTIONS`]: each element is
/// one option (`--exclude-table=audit`, `--exclude-table`, `-n`, `-npublic`), and an option
/// that takes a value may take it from the next element.
pub fn check_pg_dump_options(options: &[String]) -> Result<(), PgDumpOptionError> {
    use PgDumpOptionError as E;
    if options.len() > 64 {
        return Err(E::TooMany(options.len()));
    }
    let mut expect_value = false;
    for option in options {
        if option.contains('\0') || option.len() > 1024 {
            return Err(E::Oversized);
        }
        if expect_value {
            expect_value = false;
            continue;
        }
        let (name, attached) = if option.starts_with("--") {
            match option.split_once('=') {
                Some((n, _)) => (n, true),
                None => (option.as_str(), false),
            }
        } else if option.starts_with('-') && option.len() > 2 {
            // A short option with its value attached (`-npublic`); grouped flags are refused
            // below because the name is then not a value-taking option.
            (&option[..2], true)
        } else {
            (option.as_str(), false)
        };
        let Some(&(_, takes_value)) = PG_DUMP_OPTIONS.iter().find(|(n, _)| *n == name) else {
            return Err(E::NotAllowed(option.clone()));
        };
        match (takes_value, attached) {
            (false, true) if option.starts_with("--") => {
                let name = name.to_string();
                return Err(E::TakesNoValue {
                    option: option.clone(),
                    name,
                });
            }
            (false, true) => {
                return Err(E::Grouped(option.clone()));
            }
            (true, false) => expect_value = true,
            _ => {}
        }
    }
    if expect_value {
        let last = options.last().cloned().unwrap_or_default();
        return Err(E::NeedsValue(last));
    }
    Ok(())
}

/// An extra `pg_dump` option [`check_pg_dump_options`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgDumpOptionError {
    #[error("{0} options is too many (at most 64)")]
    TooMany(usize),
    #[error("an option holds a NUL or is longer than 1024 bytes")]
    Oversized,
    #[error(
        "{0:?} is not an option Drover passes to pg_dump; the format, the output, the database and compression are Drover's, and abbreviations are refused (allowed: --no-owner, --exclude-table=NAME, -n SCHEMA, ...)"
    )]
    NotAllowed(String),
    #[error("{option:?}: {name} takes no value")]
    TakesNoValue { option: String, name: String },
    #[error("{0:?}: give each short option on its own (grouped options are refused)")]
    Grouped(String),
    #[error("{0:?} needs a value (the next element, or {0}=VALUE)")]
    NeedsValue(String),
}

/// Whether a libpq URL carries a password (`user:secret@`).
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: &str = "name = \"shop-db\"\n[postgres]\ncontainer = \"db\"\ndatabases = [\"shop\"]\n";

    #[test]
    fn the_example_targets_parse() {
        for file in [
            "../examples/backup-postgres.toml",
            "../examples/backup-files.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let spec = TargetSpec::from_file(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(!spec.parts().is_empty());
        }
    }

    #[test]
    fn verify_defaults_are_the_documented_ones() {
        let v = TargetSpec::from_toml(PG, "t.toml").unwrap().verify;
        assert_eq!(v.max_age(), std::time::Duration::from_secs(2 * 86_400));
        assert_eq!(v.identity_file, None);
        assert_eq!(v.row_tolerance, 0.1);
        assert_eq!(v.scratch_database, None);
        assert_eq!(
            (v.min_free_fraction, v.min_free_bytes),
            (0.1, 1_073_741_824)
        );
    }

    #[test]
    fn retention_keys_left_out_keep_their_defaults_and_remote_ones_are_zero() {
        let policy = |k, d, w, m| Policy {
            keep_last: k,
            daily: d,
            weekly: w,
            monthly: m,
        };
        let spec = TargetSpec::from_toml(PG, "t.toml").unwrap();
        assert_eq!(spec.retention.local(), policy(3, 7, 4, 6));
        let text = format!("{PG}[retention]\nkeep_last = 1\n");
        let spec = TargetSpec::from_toml(&text, "t.toml").unwrap();
        assert_eq!(spec.retention.local(), policy(1, 7, 4, 6));
        assert_eq!(spec.retention.remote(), policy(1, 7, 4, 6));
        let text = format!("{PG}[retention]\nkeep_last = 1\n[retention.remote]\nmonthly = 12\n");
        let spec = TargetSpec::from_toml(&text, "t.toml").unwrap();
        assert_eq!(spec.retention.remote(), policy(0, 0, 0, 12));
    }

    #[test]
    fn defaults_pick_the_zstd_level_by_cores_and_keep_a_week_of_dailies() {
        let spec = TargetSpec::from_toml(PG, "t.toml").unwrap();
        assert_eq!(spec.kind(), SourceKind::Postgres);
        assert_eq!(spec.compression.level, 0);
        assert_eq!(spec.compression.effective_level(2), 1);
        assert_eq!(spec.compression.effective_level(8), 3);
        assert_eq!(spec.compression.effective_threads(2), 2);
        assert_eq!(spec.compression.effective_threads(32), 4);
        assert_eq!(spec.retention.local().keep_last, 3);
        assert_eq!(spec.retention.remote(), spec.retention.local());
        assert_eq!(spec.parts(), vec!["shop".to_string()]);
    }

    #[test]
    fn invalid_targets_name_the_file_and_key() {
        let cases: &[(&str, &str)] = &[
            ("name = \"Shop\"\n[path]\ndir = \"/srv\"\n", "`name`"),
            ("name = \"s\"\n", "`postgres`"),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\n[volume]\nname = \"v\"\n",
                "exactly one source",
            ),
            ("name = \"s\"\n[path]\ndir = \"srv\"\n", "`path.dir`"),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\nexclude = [\"a[\"]\n",
                "`path.exclude`",
            ),
            (
                "name = \"s\"\n[postgres]\ndatabases = [\"a\"]\n",
                "either container",
            ),
            (
                "name = \"s\"\n[postgres]\nurl = \"postgresql://u:hunter2@h/\"\ndatabases = [\"a\"]\n",
                "password_file",
            ),
            (
                "name = \"s\"\n[postgres]\ncontainer = \"db\"\ndatabases = []\n",
                "`postgres.databases`",
            ),
            (
                "name = \"s\"\n[postgres]\ncontainer = \"db\"\ndatabases = [\"a\"]\noptions = [\"--format=p\"]\n",
                "`postgres.options`",
            ),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\n[compression]\nlevel = 30\n",
                "`compression.level`",
            ),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\n[encryption]\nrecipients = [\"nope\"]\n",
                "not an age public key",
            ),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\n[storage.s3]\nendpoint = \"s3.example\"\nbucket = \"b\"\ncredentials_file = \"/etc/c\"\n",
                "`storage.s3.endpoint`",
            ),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\nsurprise = 1\n",
                "surprise",
            ),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\n[schedule]\nbackup = \" \"\n",
                "`schedule.backup`",
            ),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\n[schedule]\njitter = \"2d\"\n",
                "`schedule.jitter`",
            ),
            (
                "name = \"s\"\n[path]\ndir = \"/srv\"\n[schedule]\nevery = \"1h\"\n",
                "every",
            ),
        ];
        for (text, expected) in cases {
            let err = TargetSpec::from_toml(text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("t.toml"), "{err}");
            assert!(err.contains(expected), "{text}\n→ {err}\nwanted {expected}");
        }
        // The password itself is never echoed back.
        let err = TargetSpec::from_toml(cases[6].0, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    /// The options that slipped past the old forbidden list (issue 11, item 10), and bounds.
    #[test]
    fn pg_dump_options_are_an_allow_list_and_counts_are_bounded() {
        let opts = |list: &[&str]| {
            check_pg_dump_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        for bad in [
            &["-f/tmp/x"][..],
            &["--fil=/tmp/x"],
            &["-Fp"],
            &["--dbn=other"],
            &["--file", "/tmp/x"],
            &["-Z9"],
            &["-Ox"],
            &["--no-owner=yes"],
            &["--"],
            &["-W"],
            &["--exclude-table"],
            &["--filter=/etc/shadow"],
        ] {
            assert!(opts(bad).is_err(), "{bad:?} was accepted");
        }
        for good in [
            &["--no-owner", "-x"][..],
            &["--exclude-table=audit_log"],
            &["--exclude-table", "audit_log", "-n", "public"],
            &["-npublic", "--lock-wait-timeout=5s"],
        ] {
            assert!(opts(good).is_ok(), "{good:?}: {:?}", opts(good));
        }
        let err = TargetSpec::from_toml(
            "name = \"s\"\n[postgres]\ncontainer = \"db\"\ndatabases = [\"a\"]\noptions = [\"--fil=/tmp/x\"]\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`postgres.options`") && err.contains("abbreviations"),
            "{err}"
        );
        let base = "name = \"s\"\n[path]\ndir = \"/srv\"\n";
        for (extra, key) in [
            (
                "[retention]\nkeep_last = 4294967295\n",
                "`retention.keep_last`",
            ),
            (
                "[retention.remote]\ndaily = 100000\n",
                "`retention.remote.daily`",
            ),
            ("[verify]\nmax_age = \"100000000y\"\n", "`verify.max_age`"),
            ("[verify]\nmax_age = \"0s\"\n", "`verify.max_age`"),
        ] {
            let err = TargetSpec::from_toml(&format!("{base}{extra}"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("out of range"), "{err}");
        }
    }

    #[test]
    fn a_schedule_table_is_kept_and_left_out_when_default() {
        let text = format!(
            "{PG}[schedule]\nbackup = \"30 3 * * *\"\nverify = \"off\"\ntimezone = \"Europe/Berlin\"\njitter = \"5m\"\n"
        );
        let spec = TargetSpec::from_toml(&text, "t.toml").unwrap();
        assert_eq!(spec.schedule.backup.as_deref(), Some("30 3 * * *"));
        assert_eq!(spec.schedule.verify.as_deref(), Some("off"));
        assert_eq!(
            spec.schedule.jitter(),
            Some(std::time::Duration::from_secs(300))
        );
        // Round trip (an app spec's [[backups]] are stored as TOML written back).
        let again = TargetSpec::from_toml(&toml::to_string(&spec).unwrap(), "t.toml").unwrap();
        assert_eq!(again, spec);
        let plain = TargetSpec::from_toml(PG, "t.toml").unwrap();
        assert!(!toml::to_string(&plain).unwrap().contains("schedule"));
    }

    #[test]
    fn urls_with_and_without_passwords() {
        assert!(url_has_password("postgresql://u:p@h:5432/"));
        assert!(!url_has_password("postgresql://u@h:5432/"));
        assert!(!url_has_password("postgresql://h:5432/"));
        assert!(!url_has_password("postgresql:///?host=/run/postgresql"));
    }
}
