//! Validation of a target's newest backup on this host (`drover verify`), run as a job: each
//! check is a step of the job with its evidence, and the whole is one
//! [`catalog::Verification`] sent as `backup.verification`.
//!
//! Checks, in order: `exists` (a newest backup in the catalog), `age` (within `[verify]
//! max_age`), `hash_local` and `hash_remote` (the stored bytes match the manifest), `decompress`
//! (the whole stream decrypts and decompresses to as many bytes as the dump produced),
//! `pg_list` (`pg_restore --list` reads the table of contents), `restore` (a real restore into
//! a scratch: a throw-away container from the source container's image, or a scratch database
//! `drover_verify_<job>_<n>` on the source's server), `sanity` (every table of the manifest is
//! there, row counts within `row_tolerance`), `scratch_removed`, `disk` (free space on the
//! backup directory). A check that cannot apply is skipped; the backup passes only when no
//! check failed, and then its `verified_unix_ms` is set in the catalog.
//!
//! The decisions (age, row counts, disk) are pure functions with unit tests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::backup::{
    Cleanup, check_read_back, conn_of, object_key, pipeline, remote_of, target_dir, validate,
};
use crate::job::step::{
    Failure, JobCtx, Outcome, RecoveryError, Report, fail, outcome_of, take_lock,
};
use crate::postgres::{self, Conn, RestoreOpts, TableFact};
use crate::release::{LABEL_HOST, owns};
use crate::store::JobRecord;
use crate::unix_ms;
use drover_model::backup::catalog::{self, Backup, Check, CheckResult, Table, Verification};
use drover_model::backup::target::{PostgresSource, TargetSpec};
use drover_model::jobevent::Payload;
use drover_model::units::human_bytes;

/// Label of every scratch container, so recovery can find one a crash left behind.
pub const LABEL_SCRATCH: &str = "drover.scratch";
/// Which agent made it (its backups directory): recovery removes only its own (with the host
/// label, `release::LABEL_HOST`, that several agents on one Engine tell theirs apart by).
pub const LABEL_SCRATCH_OWNER: &str = "drover.scratch.owner";
/// How long a scratch container may take to accept connections.
const SCRATCH_READY: Duration = Duration::from_secs(120);

/// Runs a verify job to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(verify_job(ctx, job, report).await)
}

/// After a crash: the scratch databases of the job go, then `crate::backup::converge`.
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    let mut did = Vec::new();
    if let Some(swept) = sweep_scratch_databases(ctx, &job).await {
        did.push(swept);
    }
    crate::backup::converge(ctx, job, did).await;
    Ok(())
}

/// A verify job: the checks, the `backup.verification` event, the catalog mark.
async fn verify_job(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let spec = validate(ctx, job, report).await?;
    let _lock = take_lock(ctx, job, report).await?;
    let started = unix_ms();
    let mut checks = Checks {
        report,
        list: Vec::new(),
        first_failed: None,
        cancels: &ctx.cancels,
        job_id: job.id.clone(),
        copy: String::new(),
        local_corrupt: String::new(),
    };
    let newest = run_checks(ctx, job, &mut checks, &spec).await;
    let verification = Verification {
        job_id: job.id.clone(),
        target: spec.name.clone(),
        host: String::new(),
        backup_id: newest.as_ref().map(|b| b.id.clone()).unwrap_or_default(),
        started_unix_ms: started,
        finished_unix_ms: unix_ms(),
        checks: checks.list.clone(),
        copy: checks.copy.clone(),
        local_corrupt: checks.local_corrupt.clone(),
    };
    let passed = verification.passed();
    if passed && let Some(mut backup) = newest.clone() {
        backup.verified_unix_ms = verification.finished_unix_ms;
        // Every copy matched the manifest: an earlier corrupt mark no longer holds.
        backup.local_corrupt.clear();
        if let Err(e) = ctx.store.put_backup(&backup).await {
            warn!(backup = %backup.id, error = %e, "cannot mark the backup verified");
        }
    }
    report
        .carrying(
            format!(
                "verification of {}: {}",
                spec.name,
                if passed { "passed" } else { "failed" }
            ),
            Payload::Verification(Box::new(verification.clone())),
        )
        .await;
    match checks.first_failed {
        None => {
            let mut out = Outcome::succeeded("", "");
            let counted = |r| verification.checks.iter().filter(|c| c.result == r).count();
            out.summary = format!(
                "backup {} of {} passed: {} checks passed, {} skipped",
                verification.backup_id,
                spec.name,
                counted(CheckResult::Passed),
                counted(CheckResult::Skipped)
            );
            out.extra.insert(
                catalog::field::BACKUP_ID.into(),
                verification.backup_id.clone(),
            );
            Ok(out)
        }
        Some((step, error)) => {
            let failed = verification.failed_checks();
            let others: Vec<&str> = failed.into_iter().filter(|n| *n != step).collect();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!(" (also failed: {})", others.join(", "))
            };
            let content = if verification.copy == "remote" && !verification.local_corrupt.is_empty()
            {
                let passed: Vec<&str> = verification
                    .checks
                    .iter()
                    .filter(|c| c.result == CheckResult::Passed)
                    .map(|c| c.name.as_str())
                    .filter(|n| ["decompress", "pg_list", "restore", "sanity"].contains(n))
                    .collect();
                format!(
                    "; the local copy is {}: the checks ran on the S3 copy (passed: {})",
                    verification.local_corrupt,
                    if passed.is_empty() {
                        "none".to_string()
                    } else {
                        passed.join(", ")
                    }
                )
            } else {
                String::new()
            };
            Err(fail(step, format!("{error}{also}{content}")))
        }
    }
}

/// The evidence of a check that passed: words and numbers.
struct Evidence {
    message: String,
    fields: BTreeMap<String, String>,
}

fn evidence<const N: usize>(message: String, fields: [(&str, String); N]) -> Evidence {
    Evidence {
        message,
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

/// The checks so far, reported as steps of the job as they end.
struct Checks<'a, 'r> {
    report: &'a Report<'r>,
    list: Vec<Check>,
    first_failed: Option<(&'static str, String)>,
    /// Where a cancel of the job shows (`jobs::Cancels`), and its id.
    cancels: &'a crate::job::step::Cancels,
    job_id: String,
    /// The copy the content checks read: `local`, `remote`, or empty (none).
    copy: String,
    /// What is wrong with the local copy when it failed its hash check.
    local_corrupt: String,
}

impl Checks<'_, '_> {
    /// Starts a check: recorded as the job's step (best effort: a check never stops on the
    /// agent's own store, the outcome is reported either way).
    async fn start(
        &self,
        ctx: &JobCtx,
        job: &mut JobRecord,
        name: &'static str,
        message: String,
    ) -> Instant {
        job.step = name.to_string();
        if let Err(e) = ctx.store.put_job(job).await {
            warn!(job = %job.id, error = %e, "cannot record the verify step");
        }
        self.report.step_started(name, message).await;
        Instant::now()
    }

    /// Ends a check; returns whether it passed. Once the job is cancelled, every check but
    /// the scratch's removal fails, so the checks that depend on it are skipped and the job
    /// ends `cancelled`.
    async fn end(
        &mut self,
        name: &'static str,
        since: Instant,
        result: Result<Evidence, impl std::fmt::Display>,
    ) -> bool {
        let result = result.map_err(|e| e.to_string());
        let result = match self.cancels.cancelled_by(&self.job_id) {
            Some(by) if name != "scratch_removed" => Err(match result {
                Ok(_) => format!("cancelled by {by}"),
                Err(e) => format!("cancelled by {by} ({e})"),
            }),
            _ => result,
        };
        let duration_ms = since.elapsed().as_millis() as i64;
        match result {
            Ok(ev) => {
                self.report
                    .step_done(name, since, ev.message.clone(), ev.fields.clone())
                    .await;
                self.list.push(Check {
                    name: name.into(),
                    result: CheckResult::Passed,
                    message: ev.message,
                    duration_ms,
                    evidence: ev.fields,
                });
                true
            }
            Err(error) => {
                self.report.step_failed(name, since, error.clone()).await;
                if self.first_failed.is_none() {
                    self.first_failed = Some((name, error.clone()));
                }
                self.list.push(Check {
                    name: name.into(),
                    result: CheckResult::Failed,
                    message: error,
                    duration_ms,
                    evidence: BTreeMap::new(),
                });
                false
            }
        }
    }

    async fn skip(&mut self, name: &'static str, why: impl Into<String>) {
        let why = why.into();
        self.report.step_skipped(name, why.clone()).await;
        self.list.push(Check {
            name: name.into(),
            result: CheckResult::Skipped,
            message: why,
            duration_ms: 0,
            evidence: BTreeMap::new(),
        });
    }
}

/// Runs every check; returns the backup they were about.
async fn run_checks(
    ctx: &JobCtx,
    job: &mut JobRecord,
    checks: &mut Checks<'_, '_>,
    spec: &TargetSpec,
) -> Option<Backup> {
    // exists
    let since = checks
        .start(
            ctx,
            job,
            "exists",
            format!("finding the newest backup of {}", spec.name),
        )
        .await;
    let found = ctx
        .store
        .backups(&spec.name)
        .map_err(|e| e.to_string())
        .and_then(|all| {
            let count = all.len();
            newest(all)
                .map(|b| (b, count))
                .ok_or_else(|| format!("no backup of {} on this host", spec.name))
        });
    let backup = match found {
        Ok((b, count)) => {
            let ev = evidence(
                format!(
                    "newest of {count} backup(s): {} ({}{}{})",
                    b.id,
                    human_bytes(b.size()),
                    if b.is_local() { ", local" } else { "" },
                    if b.is_remote() { ", remote" } else { "" }
                ),
                [
                    ("backup_id", b.id.clone()),
                    ("backups", count.to_string()),
                    ("size_bytes", b.size().to_string()),
                ],
            );
            checks.end("exists", since, Ok::<_, String>(ev)).await;
            Some(b)
        }
        Err(e) => {
            checks.end("exists", since, Err(e)).await;
            None
        }
    };
    let Some(mut backup) = backup else {
        for name in [
            "age",
            "hash_local",
            "hash_remote",
            "decompress",
            "pg_list",
            "restore",
            "sanity",
        ] {
            checks.skip(name, "no backup to check").await;
        }
        disk_check_step(ctx, job, checks, spec).await;
        return None;
    };

    // age
    let since = checks
        .start(ctx, job, "age", format!("age of {}", backup.id))
        .await;
    let max_age = spec.verify.max_age();
    // Catalogs written before the start time was recorded have 0 there: use the end.
    let taken = if backup.started_unix_ms > 0 {
        backup.started_unix_ms
    } else {
        backup.finished_unix_ms
    };
    let result = age_check(unix_ms(), taken, max_age)
        .map_err(|e| e.to_string())
        .map(|age| {
            evidence(
                format!(
                    "{} old, within {}",
                    humantime::format_duration(Duration::from_secs(age.as_secs())),
                    spec.verify.max_age
                ),
                [
                    ("age_ms", age.as_millis().to_string()),
                    ("max_age_ms", max_age.as_millis().to_string()),
                ],
            )
        });
    checks.end("age", since, result).await;

    // hash_local
    let mut files: Option<Vec<PathBuf>> = None;
    // What is wrong with the local copy when its bytes are not the manifest's.
    let mut local_fault: Option<String> = None;
    if backup.is_local() {
        let since = checks
            .start(
                ctx,
                job,
                "hash_local",
                format!("hashing {}", backup.local_dir),
            )
            .await;
        let dir = PathBuf::from(&backup.local_dir);
        let parts = backup.parts.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            let mut bytes = 0u64;
            let mut paths = Vec::new();
            for part in &parts {
                let path = dir.join(&part.file);
                bytes += pipeline::verify_hash(&path, &part.sha256).map_err(|e| {
                    let fault = matches!(
                        e,
                        pipeline::PipelineError::HashMismatch { .. }
                            | pipeline::PipelineError::Missing { .. }
                    )
                    .then(|| crate::backup::copy_fault(&e));
                    (format!("{}: {e}", part.file), fault)
                })?;
                paths.push(path);
            }
            Ok::<_, (String, Option<String>)>((bytes, paths))
        })
        .await
        .map_err(|e| (e.to_string(), None))
        .and_then(|r| r)
        .map_err(|(message, fault)| {
            local_fault = fault;
            message
        });
        let result = hashed.map(|(bytes, paths)| {
            let rate = rate(bytes, since);
            files = Some(paths);
            evidence(
                format!(
                    "{} part(s), {} hashed at {}/s: SHA-256 matches the manifest",
                    backup.parts.len(),
                    human_bytes(bytes),
                    human_bytes(rate)
                ),
                [
                    ("bytes", bytes.to_string()),
                    ("parts", backup.parts.len().to_string()),
                ],
            )
        });
        checks.end("hash_local", since, result).await;
    } else {
        checks.skip("hash_local", "no local copy").await;
    }

    // hash_remote
    let mut remote_ok = false;
    if backup.is_remote() {
        let since = checks
            .start(
                ctx,
                job,
                "hash_remote",
                format!("reading back {}", backup.remote),
            )
            .await;
        let result = read_back_all(spec, &backup)
            .await
            .map_err(|e| e.to_string());
        remote_ok = result.is_ok();
        checks.end("hash_remote", since, result).await;
    } else {
        checks.skip("hash_remote", "no remote copy").await;
    }

    // A local copy whose bytes are not the manifest's is marked so in the catalog (the
    // validation fails: `backup list` no longer calls it verified).
    if let Some(fault) = &local_fault {
        let mut marked = backup.clone();
        marked.mark_local_corrupt(fault);
        match ctx.store.put_backup(&marked).await {
            Ok(()) => backup = marked,
            Err(e) => warn!(backup = %backup.id, error = %e, "cannot mark the local copy corrupt"),
        }
        checks.local_corrupt = fault.clone();
    }

    // The copy the content checks read: the local one if it matched, else the remote one
    // (whether the local copy is gone or corrupt).
    let mut _fetched = Cleanup(None);
    if files.is_some() {
        checks.copy = "local".into();
    } else if remote_ok {
        match fetch(ctx, spec, &backup).await {
            Ok((dir, paths)) => {
                _fetched = Cleanup(Some(dir));
                files = Some(paths);
                checks.copy = "remote".into();
            }
            Err(e) => warn!(backup = %backup.id, error = %e, "cannot fetch the remote copy"),
        }
    }
    let Some(files) = files else {
        for name in ["decompress", "pg_list", "restore", "sanity"] {
            checks.skip(name, "no copy that matches the manifest").await;
        }
        disk_check_step(ctx, job, checks, spec).await;
        return Some(backup);
    };

    // decompress
    let which = match (checks.copy.as_str(), &local_fault) {
        ("local", _) => "the local copy".to_string(),
        (_, Some(fault)) => format!("the S3 copy {} (the local copy is {fault})", backup.remote),
        _ => format!("the S3 copy {} (no local copy)", backup.remote),
    };
    let since = checks
        .start(
            ctx,
            job,
            "decompress",
            format!("decompressing every part of {which}"),
        )
        .await;
    let identity = identity_of(job, spec, &backup);
    let result = match &identity {
        Err(e) => Err(e.to_string()),
        Ok(identity) => decompress_all(&backup, &files, identity.clone(), since)
            .await
            .map_err(|e| e.to_string()),
    };
    let result = result.map(|mut ev| {
        ev.message = format!("{which}: {}", ev.message);
        ev.fields.insert("copy".into(), checks.copy.clone());
        ev
    });
    let decompressed = checks.end("decompress", since, result).await;

    let pg = spec.postgres();
    match (pg, decompressed, identity) {
        (None, _, _) => {
            for name in ["pg_list", "restore", "sanity"] {
                checks.skip(name, "not a PostgreSQL target").await;
            }
        }
        (Some(_), false, _) | (Some(_), _, Err(_)) => {
            for name in ["pg_list", "restore", "sanity"] {
                checks.skip(name, "the backup did not decompress").await;
            }
        }
        (Some(pg), true, Ok(identity)) => {
            let since = checks
                .start(
                    ctx,
                    job,
                    "pg_list",
                    "pg_restore --list of every part".into(),
                )
                .await;
            let result = list_all(&backup, &files, identity.clone()).await;
            let listed = checks.end("pg_list", since, result).await;
            if listed {
                test_restore(ctx, job, checks, spec, pg, &backup, &files, identity).await;
            } else {
                for name in ["restore", "sanity"] {
                    checks.skip(name, "pg_restore --list failed").await;
                }
            }
        }
    }
    disk_check_step(ctx, job, checks, spec).await;
    Some(backup)
}

/// The newest backup with a copy left.
fn newest(all: Vec<Backup>) -> Option<Backup> {
    all.into_iter()
        .filter(|b| b.is_local() || b.is_remote())
        .max_by_key(|b| (b.started_unix_ms, b.id.clone()))
}

fn rate(bytes: u64, since: Instant) -> u64 {
    (bytes as f64 / since.elapsed().as_secs_f64().max(0.001)) as u64
}

/// The age identity for an encrypted backup: the job's file, else the target's.
fn identity_of(
    job: &JobRecord,
    spec: &TargetSpec,
    backup: &Backup,
) -> Result<Option<String>, CheckError> {
    if backup.recipients.is_empty() {
        return Ok(None);
    }
    let from_job = job
        .backup
        .as_ref()
        .map(|b| b.identity_file.clone())
        .filter(|f| !f.is_empty())
        .map(PathBuf::from);
    let Some(file) = from_job.or_else(|| spec.verify.identity_file.clone()) else {
        return Err(CheckError::NoIdentity(backup.id.clone()));
    };
    Ok(Some(crate::backup::read_identity_file(&file)?))
}

async fn read_back_all(spec: &TargetSpec, backup: &Backup) -> Result<Evidence, ReadBackError> {
    let remote = remote_of(spec)
        .map_err(ReadBackError::Remote)?
        .ok_or(ReadBackError::NoS3)?;
    let mut bytes = 0;
    for part in &backup.parts {
        let key = object_key(&spec.name, &backup.id, &part.file);
        let (size, sha) = remote
            .read_back(&key)
            .await
            .map_err(|err| ReadBackError::Read {
                file: part.file.clone(),
                err,
            })?;
        check_read_back(&key, part, size, &sha)?;
        bytes += size;
    }
    Ok(evidence(
        format!(
            "{} read back from {}: SHA-256 matches the manifest",
            human_bytes(bytes),
            backup.remote
        ),
        [("bytes", bytes.to_string())],
    ))
}

/// Why the remote copy could not be read back whole.
#[derive(Debug, thiserror::Error)]
enum ReadBackError {
    #[error(transparent)]
    Remote(crate::objectstore::ObjectStoreError),
    #[error("the target no longer has [storage.s3]")]
    NoS3,
    #[error("read-back of {file}: {err}")]
    Read {
        file: String,
        err: crate::objectstore::ObjectStoreError,
    },
    #[error(transparent)]
    Mismatch(#[from] crate::backup::ReadBackMismatch),
}

/// Downloads every part of the remote copy into `<id>.fetch.partial/`.
async fn fetch(
    ctx: &JobCtx,
    spec: &TargetSpec,
    backup: &Backup,
) -> Result<(PathBuf, Vec<PathBuf>), crate::backup::FetchError> {
    let parts: Vec<&drover_model::backup::catalog::Part> = backup.parts.iter().collect();
    let (mut guard, paths) = crate::backup::fetch_remote(ctx, spec, backup, &parts).await?;
    // The caller removes it once the checks are done.
    let dir = guard.0.take().unwrap_or_default();
    Ok((dir, paths))
}

/// Counts what it is given and keeps nothing.
struct Counting(u64);

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn decompress_all(
    backup: &Backup,
    files: &[PathBuf],
    identity: Option<String>,
    since: Instant,
) -> Result<Evidence, CheckError> {
    let parts = backup.parts.clone();
    let files = files.to_vec();
    let (stored, plain) = tokio::task::spawn_blocking(move || {
        let (mut stored, mut plain) = (0u64, 0u64);
        for (part, file) in parts.iter().zip(&files) {
            let mut sink = Counting(0);
            let stats = pipeline::read(
                file,
                &part.sha256,
                identity.as_deref(),
                &mut sink,
                &mut |_, _| {},
            )
            .map_err(|source| CheckError::Read {
                file: part.file.clone(),
                source,
            })?;
            if stats.plain_bytes != part.source_bytes {
                return Err(CheckError::Size {
                    file: part.file.clone(),
                    plain: stats.plain_bytes,
                    source_bytes: part.source_bytes,
                });
            }
            stored += stats.stored_bytes;
            plain += stats.plain_bytes;
        }
        Ok((stored, plain))
    })
    .await??;
    Ok(evidence(
        format!(
            "{} {} to {} at {}/s, as many bytes as the dump produced",
            human_bytes(stored),
            if backup.recipients.is_empty() {
                "decompressed"
            } else {
                "decrypted and decompressed"
            },
            human_bytes(plain),
            human_bytes(rate(plain, since))
        ),
        [
            ("stored_bytes", stored.to_string()),
            ("plain_bytes", plain.to_string()),
        ],
    ))
}

/// `pg_restore --list` of each part, fed through the pipeline.
async fn list_all(
    backup: &Backup,
    files: &[PathBuf],
    identity: Option<String>,
) -> Result<Evidence, CheckError> {
    let parts = backup.parts.clone();
    let files = files.to_vec();
    let entries = tokio::task::spawn_blocking(move || {
        let mut entries = 0usize;
        for (part, file) in parts.iter().zip(&files) {
            let (mut reader, mut writer) = std::io::pipe().map_err(CheckError::Pipe)?;
            let (file, sha, identity) = (file.clone(), part.sha256.clone(), identity.clone());
            // pg_restore stops reading after the table of contents: the feeder's broken pipe
            // is expected and ignored.
            let feeder = std::thread::spawn(move || {
                let _ = pipeline::read(
                    &file,
                    &sha,
                    identity.as_deref(),
                    &mut writer,
                    &mut |_, _| {},
                );
            });
            let listed = postgres::list_host(&mut reader);
            drop(reader);
            let _ = feeder.join();
            let listed = listed.map_err(|source| CheckError::Postgres {
                part: part.file.clone(),
                source: Box::new(source),
            })?;
            // A database without tables dumps to an archive whose listing is empty (pg_restore
            // read its header, so it is an archive); one with tables never does.
            if listed.is_empty() && !part.tables.is_empty() {
                return Err(CheckError::EmptyList {
                    file: part.file.clone(),
                    tables: part.tables.len(),
                });
            }
            entries += listed.len();
        }
        Ok(entries)
    })
    .await??;
    Ok(evidence(
        format!("the table of contents lists {entries} entries"),
        [("entries", entries.to_string())],
    ))
}

/// Where the test restore goes.
enum Scratch {
    /// A throw-away container from the source's image; each part restored into a database of
    /// its own name.
    Container { name: String, conn: Conn },
    /// Scratch databases on the source's own server, named `<prefix><part index>`.
    Databases { conn: Conn, prefix: String },
}

#[allow(clippy::too_many_arguments)]
async fn test_restore(
    ctx: &JobCtx,
    job: &mut JobRecord,
    checks: &mut Checks<'_, '_>,
    spec: &TargetSpec,
    pg: &PostgresSource,
    backup: &Backup,
    files: &[PathBuf],
    identity: Option<String>,
) {
    let source = conn_of(pg);
    let on_server = scratch_on_server(spec, pg);
    let since = checks
        .start(
            ctx,
            job,
            "restore",
            if on_server {
                "restoring into a scratch database on the source's server".into()
            } else {
                "starting a throw-away PostgreSQL container from the source's image".into()
            },
        )
        .await;
    let scratch = match (&pg.container, on_server) {
        (Some(container), false) => {
            let name = format!(
                "drover-verify-{}-{}-{:08x}",
                ctx.host,
                spec.name,
                rand::random::<u32>()
            );
            match start_scratch(ctx, container, &name, &pg.user).await {
                Ok(conn) => Scratch::Container { name, conn },
                Err(e) => {
                    let _ = ctx.docker.remove_with_volumes(&name).await;
                    checks.end("restore", since, Err(e.to_string())).await;
                    checks.skip("sanity", "no test restore").await;
                    return;
                }
            }
        }
        _ => Scratch::Databases {
            conn: source,
            prefix: scratch_prefix(&ctx.host, &job.id),
        },
    };
    let mut made: Vec<String> = Vec::new();
    let restored = restore_parts(
        ctx,
        &job.id,
        &scratch,
        backup,
        files,
        identity,
        &mut made,
        checks.report,
        since,
    )
    .await;
    let restored_ok = checks.end("restore", since, restored).await;

    if restored_ok {
        let since = checks
            .start(
                ctx,
                job,
                "sanity",
                "counting the restored tables' rows".into(),
            )
            .await;
        let result = sanity(ctx, &scratch, backup, &made, spec.verify.row_tolerance).await;
        checks.end("sanity", since, result).await;
    } else {
        checks.skip("sanity", "the test restore failed").await;
    }

    let since = checks
        .start(ctx, job, "scratch_removed", "removing the scratch".into())
        .await;
    let result = remove_scratch(ctx, &scratch, &made).await;
    checks.end("scratch_removed", since, result).await;
}

/// Starts the scratch container and waits until its server answers.
async fn start_scratch(
    ctx: &JobCtx,
    source: &str,
    name: &str,
    user: &str,
) -> Result<Conn, ScratchError> {
    let labels = BTreeMap::from([
        (LABEL_SCRATCH.to_string(), "1".to_string()),
        (
            LABEL_SCRATCH_OWNER.to_string(),
            ctx.backups_dir.display().to_string(),
        ),
        (LABEL_HOST.to_string(), ctx.host.clone()),
    ]);
    ctx.docker
        .run_scratch_like(source, name, &labels)
        .await
        .map_err(|err| ScratchError::Start {
            source_container: source.to_string(),
            err,
        })?;
    let conn = Conn::Container {
        container: name.to_string(),
        user: user.to_string(),
    };
    let deadline = Instant::now() + SCRATCH_READY;
    while !postgres::answers(&ctx.docker, &conn).await {
        if Instant::now() >= deadline {
            let logs = ctx.docker.logs_tail(name, 20).await.unwrap_or_default();
            return Err(ScratchError::NotReady {
                name: name.to_string(),
                logs,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(conn)
}

/// The scratch container did not start, or its server never answered.
#[derive(Debug, thiserror::Error)]
enum ScratchError {
    #[error("cannot start a scratch container from {source_container}'s image: {err}")]
    Start {
        source_container: String,
        err: crate::docker::DockerError,
    },
    #[error(
        "the scratch container {name} did not accept connections within {}s: {logs}",
        SCRATCH_READY.as_secs()
    )]
    NotReady { name: String, logs: String },
}

#[allow(clippy::too_many_arguments)]
async fn restore_parts(
    ctx: &JobCtx,
    job_id: &str,
    scratch: &Scratch,
    backup: &Backup,
    files: &[PathBuf],
    identity: Option<String>,
    made: &mut Vec<String>,
    report: &Report<'_>,
    since: Instant,
) -> Result<Evidence, CheckError> {
    let (conn, place) = match scratch {
        Scratch::Container { name, conn } => (conn, format!("container {name}")),
        Scratch::Databases { conn, .. } => (conn, "the source's server".to_string()),
    };
    let mut bytes = 0u64;
    for (index, (part, file)) in backup.parts.iter().zip(files).enumerate() {
        let database = match scratch {
            Scratch::Container { .. } => part.name.clone(),
            Scratch::Databases { prefix, .. } => format!("{prefix}{index}"),
        };
        postgres::create_database(&ctx.docker, conn, &database).await?;
        made.push(database.clone());
        crate::job::step::pause_point("verify:scratch_made").await;
        report
            .progress(
                "restore",
                format!("restoring {} into {database} in {place}", part.name),
            )
            .await;
        // The source's owners and grants are kept (no --no-owner): a role the scratch lacks
        // fails the restore, as it would fail a real one on a new server.
        let opts = RestoreOpts {
            clean: false,
            single_transaction: true,
            no_owner: false,
        };
        let sink = postgres::restore(&ctx.docker, conn, &database, &opts).await?;
        let (file, sha, identity) = (file.clone(), part.sha256.clone(), identity.clone());
        let name = part.name.clone();
        let token = ctx.cancels.token(job_id);
        let stats = tokio::task::spawn_blocking(move || {
            let mut sink = sink;
            // A cancel stops the restore at its next write; the scratch is removed after.
            let mut guarded = crate::job::step::CancelIo {
                inner: &mut sink,
                token,
            };
            let read = pipeline::read(
                &file,
                &sha,
                identity.as_deref(),
                &mut guarded,
                &mut |_, _| {},
            );
            let finished = sink.finish();
            match (read, finished) {
                (Ok(stats), Ok(())) => Ok(stats),
                (_, Err(source)) => Err(CheckError::Postgres {
                    part: name,
                    source: Box::new(source),
                }),
                (Err(source), Ok(())) => Err(CheckError::Read { file: name, source }),
            }
        })
        .await??;
        bytes += stats.plain_bytes;
    }
    Ok(evidence(
        format!(
            "{} part(s), {} of archive restored into {place} at {}/s",
            backup.parts.len(),
            human_bytes(bytes),
            human_bytes(rate(bytes, since))
        ),
        [
            ("archive_bytes", bytes.to_string()),
            ("databases", made.join(",")),
        ],
    ))
}

async fn sanity(
    ctx: &JobCtx,
    scratch: &Scratch,
    backup: &Backup,
    made: &[String],
    tolerance: f64,
) -> Result<Evidence, CheckError> {
    let conn = match scratch {
        Scratch::Container { conn, .. } | Scratch::Databases { conn, .. } => conn,
    };
    let (mut tables, mut rows) = (0usize, 0i64);
    for (part, database) in backup.parts.iter().zip(made) {
        let counted = postgres::row_counts(&ctx.docker, conn, database).await?;
        let (t, r) = compare_tables(&part.tables, &counted, tolerance).map_err(|source| {
            CheckError::Tables {
                part: part.name.clone(),
                source,
            }
        })?;
        tables += t;
        rows += r;
    }
    Ok(evidence(
        format!(
            "{tables} table(s) of the manifest present, {rows} rows, counts within {:.0} % of the manifest",
            tolerance * 100.0
        ),
        [("tables", tables.to_string()), ("rows", rows.to_string())],
    ))
}

async fn remove_scratch(
    ctx: &JobCtx,
    scratch: &Scratch,
    made: &[String],
) -> Result<Evidence, CheckError> {
    match scratch {
        Scratch::Container { name, .. } => {
            ctx.docker.remove_with_volumes(name).await?;
            match ctx.docker.inspect(name).await {
                Ok(None) => Ok(evidence(
                    format!("container {name} removed"),
                    [("container", name.clone())],
                )),
                Ok(Some(_)) => Err(CheckError::StillThere(name.clone())),
                Err(e) => Err(e.into()),
            }
        }
        Scratch::Databases { conn, .. } => {
            let mut errors = Vec::new();
            for db in made {
                match postgres::drop_database(&ctx.docker, conn, db).await {
                    Ok(()) => {}
                    Err(e) => errors.push((db.clone(), e)),
                }
            }
            if errors.is_empty() {
                Ok(evidence(
                    format!("scratch database(s) {} dropped", made.join(", ")),
                    [("databases", made.join(","))],
                ))
            } else {
                Err(CheckError::NotDropped(errors))
            }
        }
    }
}

async fn disk_check_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    checks: &mut Checks<'_, '_>,
    spec: &TargetSpec,
) {
    let dir = target_dir(ctx, spec);
    let since = checks
        .start(ctx, job, "disk", format!("free space on {}", dir.display()))
        .await;
    let result = disk_space(&dir)
        .map_err(|e| e.to_string())
        .and_then(|(free, total)| {
            disk_ok(
                free,
                total,
                spec.verify.min_free_fraction,
                spec.verify.min_free_bytes,
            )
            .map_err(|e| e.to_string())
            .map(|message| {
                evidence(
                    message,
                    [
                        ("free_bytes", free.to_string()),
                        ("total_bytes", total.to_string()),
                    ],
                )
            })
        });
    checks.end("disk", since, result).await;
}

/// Free (to unprivileged users) and total bytes of the file system holding `dir` (or its
/// nearest existing parent).
fn disk_space(dir: &Path) -> Result<(u64, u64), DiskSpaceError> {
    let mut at = dir;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    let stat = rustix::fs::statvfs(at).map_err(|err| DiskSpaceError {
        path: at.to_path_buf(),
        err,
    })?;
    Ok((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}

/// The file system holding a directory cannot be asked for its space.
#[derive(Debug, thiserror::Error)]
#[error("{}: {err}", path.display())]
struct DiskSpaceError {
    path: PathBuf,
    err: rustix::io::Errno,
}

/// Whether the test restore goes into scratch databases on the source's own server (the
/// default for `url` sources) rather than a throw-away container.
fn scratch_on_server(spec: &TargetSpec, pg: &PostgresSource) -> bool {
    spec.verify
        .scratch_database
        .unwrap_or(pg.container.is_none())
}

/// The name prefix of a validation job's scratch databases on `host`: `drover_verify_` and 10
/// hex digits of the SHA-256 of the host and the job id, so recovery can find exactly that
/// job's databases, and the agents of one job on several hosts using one server never drop
/// each other's.
pub fn scratch_prefix(host: &str, job_id: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(format!("{host}\n{job_id}").as_bytes()));
    format!("drover_verify_{}_", &digest[..10])
}

/// Drops the scratch databases an interrupted validation job left on its URL target's server
/// (on start); what it did, for the job's final report.
pub async fn sweep_scratch_databases(ctx: &JobCtx, job: &JobRecord) -> Option<String> {
    let spec = crate::backup::spec_of(job).ok()?;
    let pg = spec.postgres()?;
    if !scratch_on_server(&spec, pg) {
        // A scratch container: `sweep_scratch` removes it.
        return None;
    }
    let conn = conn_of(pg);
    let prefix = scratch_prefix(&ctx.host, &job.id);
    let found = match postgres::databases_with_prefix(&ctx.docker, &conn, &prefix).await {
        Ok(found) => found,
        Err(e) => {
            warn!(job = %job.id, error = %e, "cannot list scratch databases left by a crash");
            return Some(format!("could not look for its scratch databases: {e}"));
        }
    };
    if found.is_empty() {
        return None;
    }
    let mut dropped = Vec::new();
    for db in &found {
        match postgres::drop_database(&ctx.docker, &conn, db).await {
            Ok(()) => dropped.push(db.clone()),
            Err(e) => warn!(database = %db, error = %e, "cannot drop a scratch database"),
        }
    }
    tracing::info!(job = %job.id, databases = ?dropped, "dropped scratch databases left by a crash");
    Some(if dropped.len() == found.len() {
        format!("dropped scratch database(s) {}", dropped.join(", "))
    } else {
        format!(
            "dropped {} of the scratch databases {}; drop the rest by hand",
            dropped.len(),
            found.join(", ")
        )
    })
}

/// Removes scratch containers of this agent a crash left behind (on start): those with its
/// backups directory as their owner and its host (or none: made before the host label).
pub async fn sweep_scratch(ctx: &JobCtx) {
    let owner = ctx.backups_dir.display().to_string();
    match ctx.docker.list_labelled(LABEL_SCRATCH_OWNER, &owner).await {
        Ok(found) => {
            for c in found.into_iter().filter(|c| owns(&c.labels, &ctx.host)) {
                match ctx.docker.remove_with_volumes(&c.name).await {
                    Ok(()) => {
                        tracing::info!(container = %c.name, "removed a scratch container left by a crash")
                    }
                    Err(e) => {
                        warn!(container = %c.name, error = %e, "cannot remove a scratch container")
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot list scratch containers"),
    }
}

// --- the decisions ----------------------------------------------------------------------------

/// How old a backup started at `started_ms` is at `now_ms`, if within `max_age`.
pub fn age_check(now_ms: i64, started_ms: i64, max_age: Duration) -> Result<Duration, TooOld> {
    let age = Duration::from_millis((now_ms - started_ms).max(0) as u64);
    if age <= max_age {
        Ok(age)
    } else {
        Err(TooOld { age, max_age })
    }
}

/// The newest backup is older than the target allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the newest backup is {} old, older than [verify] max_age = {}",
    humantime::format_duration(Duration::from_secs(age.as_secs())),
    humantime::format_duration(*max_age)
)]
pub struct TooOld {
    pub age: Duration,
    pub max_age: Duration,
}

/// Whether `restored` (exact counts) has every table of `manifest`, each with a row count
/// within `tolerance` of the manifest's estimate (an estimate of -1 or 0 means "unknown": only
/// presence is checked). Returns the tables checked and the rows counted.
pub fn compare_tables(
    manifest: &[Table],
    restored: &[TableFact],
    tolerance: f64,
) -> Result<(usize, i64), TablesDiffer> {
    let mut missing = Vec::new();
    let mut off = Vec::new();
    let mut rows = 0i64;
    for t in manifest {
        let Some(found) = restored
            .iter()
            .find(|r| r.schema == t.schema && r.name == t.name)
        else {
            missing.push(format!("{}.{}", t.schema, t.name));
            continue;
        };
        rows += found.row_estimate;
        if t.rows > 0 && !within(found.row_estimate, t.rows, tolerance) {
            off.push(format!(
                "{}.{} has {} rows, the manifest estimates {}",
                t.schema, t.name, found.row_estimate, t.rows
            ));
        }
    }
    if missing.is_empty() && off.is_empty() {
        Ok((manifest.len(), rows))
    } else {
        Err(TablesDiffer {
            missing,
            off,
            tolerance,
        })
    }
}

/// The restored tables are not what the manifest recorded: some are missing, or their row
/// counts are further from the estimate than the tolerance.
#[derive(Debug, Clone, PartialEq)]
pub struct TablesDiffer {
    /// `schema.name` of each table the restore lacks.
    pub missing: Vec<String>,
    /// One line per table whose count is off.
    pub off: Vec<String>,
    pub tolerance: f64,
}

impl std::fmt::Display for TablesDiffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut problems = Vec::new();
        if !self.missing.is_empty() {
            problems.push(format!("missing table(s): {}", self.missing.join(", ")));
        }
        if !self.off.is_empty() {
            problems.push(format!(
                "row counts off by more than {:.0} %: {}",
                self.tolerance * 100.0,
                self.off.join("; ")
            ));
        }
        f.write_str(&problems.join("; "))
    }
}

impl std::error::Error for TablesDiffer {}

impl From<postgres::PgError> for CheckError {
    fn from(e: postgres::PgError) -> CheckError {
        CheckError::Database(Box::new(e))
    }
}

/// Why a check of a validation failed; its message is the check's.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error(
        "backup {0} is encrypted; name the age identity in the target: [verify] identity_file = \"/etc/drover/age.key\""
    )]
    NoIdentity(String),
    #[error(transparent)]
    Identity(#[from] crate::backup::IdentityFileError),
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: pipeline::PipelineError,
    },
    #[error(
        "{file}: decompressed to {plain} bytes, the manifest says the source produced {source_bytes}"
    )]
    Size {
        file: String,
        plain: u64,
        source_bytes: u64,
    },
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot make a pipe: {0}")]
    Pipe(std::io::Error),
    #[error("{part}: {source}")]
    Postgres {
        part: String,
        source: Box<postgres::PgError>,
    },
    #[error(transparent)]
    Database(Box<postgres::PgError>),
    #[error("{file}: the archive lists no entries, and the manifest has {tables} table(s)")]
    EmptyList { file: String, tables: usize },
    #[error("{part}: {source}")]
    Tables { part: String, source: TablesDiffer },
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    #[error("container {0} is still there")]
    StillThere(String),
    #[error("{}", .0.iter().map(|(db, e)| format!("{db}: {e}")).collect::<Vec<_>>().join("; "))]
    NotDropped(Vec<(String, postgres::PgError)>),
}

fn within(count: i64, estimate: i64, tolerance: f64) -> bool {
    let diff = (count - estimate).abs() as f64;
    diff <= estimate as f64 * tolerance
}

/// Whether `free` bytes of `total` are enough: at least `min_fraction` of the disk and at
/// least `min_bytes`.
pub fn disk_ok(
    free: u64,
    total: u64,
    min_fraction: f64,
    min_bytes: u64,
) -> Result<String, LowDisk> {
    let disk = DiskFacts {
        free,
        total,
        min_fraction,
        min_bytes,
    };
    if disk.fraction() >= min_fraction && free >= min_bytes {
        Ok(disk.to_string())
    } else {
        Err(LowDisk(disk))
    }
}

/// Free and total bytes of a disk and the floor they are held to; shown as the check's
/// evidence, or its error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskFacts {
    pub free: u64,
    pub total: u64,
    pub min_fraction: f64,
    pub min_bytes: u64,
}

impl DiskFacts {
    fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.free as f64 / self.total as f64
        }
    }
}

impl std::fmt::Display for DiskFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} free of {} ({:.1} %); the floor is {:.0} % and {}",
            human_bytes(self.free),
            human_bytes(self.total),
            self.fraction() * 100.0,
            self.min_fraction * 100.0,
            human_bytes(self.min_bytes)
        )
    }
}

/// Less free disk than the floor.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("not enough free disk: {0}")]
pub struct LowDisk(pub DiskFacts);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_prefixes_are_per_job_and_valid_names() {
        let a = scratch_prefix("db-1", "verify-20261123-201338-87a6");
        assert_eq!(a, scratch_prefix("db-1", "verify-20261123-201338-87a6"));
        assert_ne!(a, scratch_prefix("db-1", "verify-20261123-201338-87a7"));
        // One job on two hosts that verify against one server.
        assert_ne!(a, scratch_prefix("db-2", "verify-20261123-201338-87a6"));
        assert!(a.starts_with("drover_verify_") && a.ends_with('_'), "{a}");
        assert_eq!(a.len(), "drover_verify_".len() + 11);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }

    fn table(name: &str, rows: i64) -> Table {
        Table {
            schema: "public".into(),
            name: name.into(),
            rows,
        }
    }

    fn fact(name: &str, rows: i64) -> TableFact {
        TableFact {
            schema: "public".into(),
            name: name.into(),
            row_estimate: rows,
        }
    }

    #[test]
    fn row_counts_must_be_within_the_tolerance_and_unknown_estimates_only_need_the_table() {
        let manifest = [table("items", 1000), table("fresh", -1), table("empty", 0)];
        let good = [fact("items", 1090), fact("fresh", 5), fact("empty", 3)];
        assert_eq!(compare_tables(&manifest, &good, 0.1), Ok((3, 1098)));
        let off = [fact("items", 1101), fact("fresh", 5), fact("empty", 0)];
        let err = compare_tables(&manifest, &off, 0.1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("public.items has 1101 rows"), "{err}");
        let low = [fact("items", 899), fact("fresh", 0), fact("empty", 0)];
        assert!(compare_tables(&manifest, &low, 0.1).is_err());
        let missing = [fact("items", 1000), fact("empty", 0)];
        let err = compare_tables(&manifest, &missing, 0.1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing table(s): public.fresh"), "{err}");
        // Extra tables in the restore are fine; a tolerance of 0 wants the estimate exactly.
        let extra = [
            fact("items", 1000),
            fact("fresh", 0),
            fact("empty", 0),
            fact("x", 1),
        ];
        assert!(compare_tables(&manifest, &extra, 0.0).is_ok());
    }

    #[test]
    fn the_disk_needs_both_the_fraction_and_the_bytes() {
        const GIB: u64 = 1 << 30;
        assert!(disk_ok(20 * GIB, 100 * GIB, 0.1, GIB).is_ok());
        assert!(disk_ok(10 * GIB, 100 * GIB, 0.1, GIB).is_ok());
        let low = disk_ok(9 * GIB, 100 * GIB, 0.1, GIB)
            .unwrap_err()
            .to_string();
        assert!(low.contains("not enough free disk"), "{low}");
        // A small disk can be 50 % free and still below the byte floor.
        assert!(disk_ok(GIB / 2, GIB, 0.1, GIB).is_err());
        assert!(disk_ok(0, 0, 0.1, 0).is_err());
    }

    #[test]
    fn a_backup_older_than_max_age_fails() {
        let day = Duration::from_secs(86_400);
        let now = 10 * 86_400_000;
        assert!(age_check(now, now - 86_400_000, 2 * day).is_ok());
        assert!(age_check(now, now - 2 * 86_400_000, 2 * day).is_ok());
        let old = age_check(now, now - 2 * 86_400_000 - 1000, 2 * day)
            .unwrap_err()
            .to_string();
        assert!(old.contains("older than [verify] max_age = 2days"), "{old}");
        // A clock that went backwards counts as age zero, not a failure.
        assert_eq!(age_check(now, now + 5000, day), Ok(Duration::ZERO));
    }
}
