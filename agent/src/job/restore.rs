//! The restore job kind: validate → lock → locate (hash checked, fetched from S3 when the local
//! copy is gone) → emergency_backup (of a live database, through `crate::backup::take`) →
//! restore. A failed database restore puts the database back as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::backup::{
    Cleanup, conn_of, copy_fault, files, pipeline, read_identity_file, step_failed, take, validate,
    with_progress,
};
use crate::job::step::{
    Failure, JobCtx, Outcome, RecoveryError, Report, begin, fail, outcome_of, take_lock,
};
use crate::postgres::{self, Conn, RestoreOpts};
use crate::store::JobRecord;
use drover_model::backup::catalog::{self, Backup, Part, Trigger};
use drover_model::backup::target::{self, TargetSpec};
use drover_model::units::human_bytes;

/// Runs a restore to its outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    outcome_of(restore_job(ctx, job, report).await)
}

/// After a crash: a restore into PostgreSQL that had not committed was rolled back by it.
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    let mut did = Vec::new();
    if job.step == "restore" {
        did.push("a restore that had not committed was rolled back by PostgreSQL".into());
    }
    crate::backup::converge(ctx, job, did).await;
    Ok(())
}

async fn restore_job(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<Outcome, Failure> {
    let spec = validate(ctx, job, report).await?;
    let request = job.backup.clone().unwrap_or_default();
    let _lock = take_lock(ctx, job, report).await?;

    // locate: the backup, its part, a copy whose hash matches the manifest.
    let since = begin(
        ctx,
        job,
        report,
        "locate",
        format!("finding backup {}", request.backup_id),
    )
    .await?;
    let located = locate(ctx, &spec, &request).await;
    let Located {
        backup,
        part,
        file,
        fetched,
        copy,
    } = match located {
        Ok(v) => v,
        Err(e) => return Err(step_failed(report, "locate", since, e).await),
    };
    // The fetched copy (from S3) is removed whatever happens next.
    let _cleanup = Cleanup(fetched.clone());
    let identity = if backup.recipients.is_empty() {
        None
    } else if request.identity_file.is_empty() {
        return Err(step_failed(
            report,
            "locate",
            since,
            format!(
                "backup {} is encrypted; pass --identity-file PATH (a file on this host holding the age identity)",
                backup.id
            ),
        )
        .await);
    } else {
        match read_identity_file(Path::new(&request.identity_file)) {
            Ok(text) => Some(text),
            Err(e) => return Err(step_failed(report, "locate", since, e).await),
        }
    };
    report
        .step_done(
            "locate",
            since,
            format!(
                "{} part {} ({}): {}",
                backup.id,
                part.name,
                human_bytes(part.size),
                copy.located()
            ),
            BTreeMap::new(),
        )
        .await;

    let summary = if !request.to_dir.is_empty() {
        restore_files(job, ctx, report, &part, &file, identity, &request.to_dir).await?
    } else {
        let pg = spec.postgres().ok_or_else(|| {
            fail(
                "validate",
                "only PostgreSQL targets restore into a database; use --to-dir",
            )
        })?;
        restore_database(
            ctx, job, report, &spec, pg, &backup, &part, &file, identity, &request,
        )
        .await?
    };
    let mut out = Outcome::succeeded("", "");
    out.summary = format!("{summary}; {}", copy.restored_from());
    out.extra
        .insert(catalog::field::BACKUP_ID.into(), backup.id.clone());
    Ok(out)
}

/// What `locate` found.
struct Located {
    backup: Backup,
    part: Part,
    /// A local file with the part, its hash checked.
    file: PathBuf,
    /// The folder of a copy fetched from S3, to remove afterwards.
    fetched: Option<PathBuf>,
    copy: CopyUsed,
}

/// The backup, the part to restore, a local file with it (hash checked), the folder of a
/// copy fetched from S3 (to remove afterwards) and which copy it is. A local copy that fails
/// its hash check is marked corrupt in the catalog; a fetched copy that fails its own is
/// removed before the error returns.
async fn locate(
    ctx: &JobCtx,
    spec: &TargetSpec,
    request: &crate::store::BackupJob,
) -> Result<Located, LocateError> {
    let mut backup = ctx
        .store
        .backup(&spec.name, &request.backup_id)?
        .ok_or_else(|| LocateError::NoBackup {
            id: request.backup_id.clone(),
            target: spec.name.clone(),
        })?;
    let part = backup
        .part((!request.part.is_empty()).then_some(request.part.as_str()))?
        .clone();
    let mut local_state = "gone".to_string();
    if backup.is_local() {
        let file = Path::new(&backup.local_dir).join(&part.file);
        let (f, sha) = (file.clone(), part.sha256.clone());
        let checked = tokio::task::spawn_blocking(move || pipeline::verify_hash(&f, &sha)).await?;
        match checked {
            Ok(_) => {
                let dir = backup.local_dir.clone();
                return Ok(Located {
                    backup,
                    part,
                    file,
                    fetched: None,
                    copy: CopyUsed::Local { dir },
                });
            }
            Err(e) => {
                local_state = copy_fault(&e);
                warn!(file = %file.display(), error = %e, "the local copy is unusable");
                if matches!(
                    e,
                    pipeline::PipelineError::HashMismatch { .. }
                        | pipeline::PipelineError::Missing { .. }
                ) {
                    backup.mark_local_corrupt(&local_state);
                    if let Err(err) = ctx.store.put_backup(&backup).await {
                        warn!(backup = %backup.id, error = %err, "cannot mark the local copy corrupt");
                    }
                }
                if !backup.is_remote() {
                    return Err(LocateError::LocalOnly {
                        id: backup.id.clone(),
                        source: e,
                    });
                }
            }
        }
    }
    if !backup.is_remote() {
        return Err(LocateError::NoCopy(backup.id.clone()));
    }
    // Removed on every way out but success.
    let (mut guard, files) = crate::backup::fetch_remote(ctx, spec, &backup, &[&part]).await?;
    let dir = guard.0.clone().unwrap_or_default();
    let file = files.into_iter().next().unwrap_or_default();
    let (f, sha) = (file.clone(), part.sha256.clone());
    tokio::task::spawn_blocking(move || pipeline::verify_hash(&f, &sha))
        .await?
        .map_err(|source| LocateError::BothUnusable {
            local: local_state.clone(),
            source,
        })?;
    guard.0 = None;
    let url = format!("{}{}", backup.remote, part.file);
    Ok(Located {
        backup,
        part,
        file,
        fetched: Some(dir),
        copy: CopyUsed::Remote {
            url,
            local: local_state,
        },
    })
}

/// Why no usable copy of the backup was found; the `locate` step reports it.
#[derive(Debug, thiserror::Error)]
enum LocateError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("no backup {id} of {target} on this host (drover backup list {target})")]
    NoBackup { id: String, target: String },
    #[error(transparent)]
    Part(#[from] catalog::PartError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    #[error("the local copy is unusable: {source}; backup {id} has no S3 copy")]
    LocalOnly {
        id: String,
        source: pipeline::PipelineError,
    },
    #[error("backup {0} has no copy left")]
    NoCopy(String),
    #[error(transparent)]
    Fetch(#[from] crate::backup::FetchError),
    #[error("the local copy is {local}, and the remote copy is unusable: {source}")]
    BothUnusable {
        local: String,
        source: pipeline::PipelineError,
    },
}

/// Which stored copy a restore reads, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyUsed {
    /// The local copy, its hash matching the manifest (`dir`: its folder).
    Local { dir: String },
    /// The S3 copy (`url` of the file), because the local copy is `local` (`corrupt (sha256
    /// mismatch)`, `gone`, ...).
    Remote { url: String, local: String },
}

impl CopyUsed {
    /// The `locate` step's words.
    pub fn located(&self) -> String {
        match self {
            CopyUsed::Local { dir } => {
                format!("the local copy in {dir} matches the manifest (sha256)")
            }
            CopyUsed::Remote { url, local } => format!(
                "local copy {local}; the S3 copy {url} matches the manifest (sha256) and is used"
            ),
        }
    }

    /// The restore's summary: which copy it came from and why.
    pub fn restored_from(&self) -> String {
        match self {
            CopyUsed::Local { dir } => format!("restored from the local copy in {dir}"),
            CopyUsed::Remote { url, local } => {
                format!("local copy {local}, restored from S3 copy {url}")
            }
        }
    }
}

async fn restore_files(
    job: &mut JobRecord,
    ctx: &JobCtx,
    report: &Report<'_>,
    part: &Part,
    file: &Path,
    identity: Option<String>,
    to_dir: &str,
) -> Result<String, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "restore",
        format!("unpacking into {to_dir}"),
    )
    .await?;
    let dest = PathBuf::from(to_dir);
    let untar = match files::Untar::start(&dest) {
        Ok(u) => u,
        Err(e) => return Err(step_failed(report, "restore", since, e.to_string()).await),
    };
    let (file, sha) = (file.to_path_buf(), part.sha256.clone());
    let done = with_progress(report, "restore", part.name.clone(), move |tick| {
        let mut untar = untar;
        let read = pipeline::read(&file, &sha, identity.as_deref(), &mut untar, tick)
            .map_err(|e| e.to_string());
        let finished = untar.finish().map_err(|e| format!("unpacking: {e}"));
        read.and_then(|stats| finished.map(|()| stats))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match done {
        Ok(stats) => {
            let message = format!("{} unpacked into {to_dir}", human_bytes(stats.plain_bytes));
            report
                .step_done("restore", since, message.clone(), BTreeMap::new())
                .await;
            Ok(message)
        }
        Err(e) => Err(step_failed(report, "restore", since, e).await),
    }
}

#[allow(clippy::too_many_arguments)]
async fn restore_database(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    spec: &TargetSpec,
    pg: &target::PostgresSource,
    backup: &Backup,
    part: &Part,
    file: &Path,
    identity: Option<String>,
    request: &crate::store::BackupJob,
) -> Result<String, Failure> {
    let conn = conn_of(pg);
    let database = request.to_database.clone();
    let since = begin(
        ctx,
        job,
        report,
        "emergency_backup",
        format!("checking whether {database} exists"),
    )
    .await?;
    let exists = match postgres::database_exists(&ctx.docker, &conn, &database).await {
        Ok(e) => e,
        Err(e) => return Err(step_failed(report, "emergency_backup", since, e.to_string()).await),
    };
    let mut emergency = None;
    if exists {
        if !request.confirmed {
            return Err(step_failed(
                report,
                "emergency_backup",
                since,
                format!(
                    "database {database} exists; restoring replaces its contents. Confirm with --yes (its current state is backed up first)"
                ),
            )
            .await);
        }
        let taken = take(
            ctx,
            job,
            report,
            spec,
            Trigger::Emergency,
            Some(&database),
            Some("emergency_backup"),
        )
        .await?;
        report
            .step_done(
                "emergency_backup",
                since,
                format!(
                    "the current state of {database} is backup {} ({})",
                    taken.id,
                    human_bytes(taken.size())
                ),
                BTreeMap::new(),
            )
            .await;
        emergency = Some(taken.id);
    } else {
        report
            .step_skipped(
                "emergency_backup",
                format!("{database} does not exist yet; nothing to protect"),
            )
            .await;
    }

    let since = begin(
        ctx,
        job,
        report,
        "restore",
        format!("restoring {} part {} into {database}", backup.id, part.name),
    )
    .await?;
    if !exists && let Err(e) = postgres::create_database(&ctx.docker, &conn, &database).await {
        return Err(step_failed(report, "restore", since, e.to_string()).await);
    }
    let opts = RestoreOpts {
        clean: exists,
        single_transaction: true,
        no_owner: false,
    };
    let sink = match postgres::restore(&ctx.docker, &conn, &database, &opts).await {
        Ok(s) => s,
        Err(e) => {
            let hint = undo_restore(ctx, &conn, &database, exists).await;
            return Err(step_failed(report, "restore", since, format!("{e}{hint}")).await);
        }
    };
    let (file, sha) = (file.to_path_buf(), part.sha256.clone());
    let done = with_progress(report, "restore", database.clone(), move |tick| {
        let mut sink = sink;
        let read = pipeline::read(&file, &sha, identity.as_deref(), &mut sink, tick)
            .map_err(|e| e.to_string());
        let finished = sink.finish().map_err(|e| e.to_string());
        match (read, finished) {
            (Ok(stats), Ok(())) => Ok(stats),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e),
        }
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match done {
        Ok(stats) => {
            let message = format!(
                "{} restored into {database} ({} of archive){}",
                backup.id,
                human_bytes(stats.plain_bytes),
                emergency
                    .map(|id| format!("; its previous state is backup {id}"))
                    .unwrap_or_default()
            );
            report
                .step_done("restore", since, message.clone(), BTreeMap::new())
                .await;
            Ok(message)
        }
        Err(e) => {
            let hint = undo_restore(ctx, &conn, &database, exists).await;
            Err(step_failed(report, "restore", since, format!("{e}{hint}")).await)
        }
    }
}

/// After a failed restore, leaves the target as it was: a database that existed is unchanged
/// (the restore ran in one transaction); one the restore created is dropped. Returns the
/// words for the error.
async fn undo_restore(ctx: &JobCtx, conn: &Conn, database: &str, existed: bool) -> String {
    if existed {
        return "; the restore ran in one transaction, so the database is unchanged".into();
    }
    match postgres::drop_database(&ctx.docker, conn, database).await {
        Ok(()) => format!("; the database {database} it had created was dropped"),
        Err(e) => {
            warn!(database, error = %e, "cannot drop the database a failed restore created");
            format!(
                "; the database {database} it had created could not be dropped ({e}): drop it by hand"
            )
        }
    }
}
