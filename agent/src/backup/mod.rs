//! Backups, restores and retention of a target, run as jobs by the agent.
//!
//! Backup: validate → lock → check (free disk, credentials, the source answers) → dump (each
//! part streamed source → zstd → age → sha256 → `.partial`, fsync, rename) → store (manifest,
//! the backup's folder renamed into place) → upload (each part, read back and compared, the
//! manifest last) → catalog → retention. A failure names its stage and leaves nothing
//! half-written: the `.partial` folder is removed, uploaded objects of the failed backup are
//! deleted. Restore: validate → lock → locate (hash checked, fetched from S3 when the local
//! copy is gone) → emergency_backup (of a live database) → restore. Prune: validate → lock →
//! retention.
//!
//! Submodules: `target` (the spec), `catalog` (the records), `pipeline` (the byte stream),
//! `files` (tar of a directory), `retention` (the pure keep rule), `verify` (validation of
//! the newest backup: hashes, decompression, a test restore into a scratch database).

pub mod files;
pub mod pipeline;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::job::step::{Failure, JobCtx, Outcome, Report, begin, fail, finish};
use crate::objectstore::{ObjectStoreError, Remote, S3Config};
use crate::postgres::{self, Conn};
use crate::store::JobRecord;
use crate::unix_ms;
use drover_model::backup::catalog::{Backup, Part, PruneLine, Table, Trigger};
use drover_model::backup::target::{self, SourceKind, TargetSpec};
use drover_model::backup::{catalog, retention};
use drover_model::config::ConfigError;
use drover_model::jobevent::{JobResult, field};
use drover_model::units::human_bytes;

/// The manifest's name inside a backup's folder (and the last object uploaded).
pub const MANIFEST: &str = "manifest.json";
/// How often a running backup or restore reports its bytes.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The job's target spec, validated again on this host.
pub(crate) fn spec_of(job: &JobRecord) -> Result<TargetSpec, ConfigError> {
    let toml = job
        .backup
        .as_ref()
        .map(|b| b.target_toml.as_str())
        .unwrap_or("");
    TargetSpec::from_toml(toml, &format!("backup target {}", job.app))
}

pub(crate) async fn validate(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
) -> Result<TargetSpec, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "validate",
        format!("checking target {}", job.app),
    )
    .await?;
    match spec_of(job) {
        Ok(spec) => {
            report
                .step_done("validate", since, "the target is valid", BTreeMap::new())
                .await;
            Ok(spec)
        }
        Err(e) => Err(step_failed(report, "validate", since, e).await),
    }
}

/// Reports a failed step and returns the failure.
pub(crate) async fn step_failed(
    report: &Report<'_>,
    step: &'static str,
    since: Instant,
    error: impl std::fmt::Display,
) -> Failure {
    let error = error.to_string();
    report.step_failed(step, since, error.clone()).await;
    fail(step, error)
}

// --- where things are -------------------------------------------------------------------------

/// The target's local folder: `<storage.dir or the agent's backups dir>/<target>`.
pub fn target_dir(ctx: &JobCtx, spec: &TargetSpec) -> PathBuf {
    spec.storage
        .dir
        .clone()
        .unwrap_or_else(|| ctx.backups_dir.clone())
        .join(&spec.name)
}

pub(crate) fn s3_config(spec: &TargetSpec) -> Option<S3Config> {
    spec.storage.s3.as_ref().map(|s3| S3Config {
        endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
        prefix: s3.prefix.clone(),
        region: s3.region.clone(),
        credentials_file: s3.credentials_file.clone(),
    })
}

pub(crate) fn remote_of(spec: &TargetSpec) -> Result<Option<Remote>, ObjectStoreError> {
    match s3_config(spec) {
        None => Ok(None),
        Some(cfg) => Remote::open(&cfg).map(Some),
    }
}

/// Object key of a file of a backup (under the storage's prefix).
pub(crate) fn object_key(target: &str, id: &str, file: &str) -> String {
    format!("{target}/{id}/{file}")
}

pub(crate) fn remote_url(spec: &TargetSpec, id: &str) -> String {
    match &spec.storage.s3 {
        Some(s3) => {
            let prefix = s3.prefix.trim_matches('/');
            let prefix = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            };
            format!("s3://{}/{prefix}{}/{id}/", s3.bucket, spec.name)
        }
        None => String::new(),
    }
}

pub(crate) fn conn_of(pg: &target::PostgresSource) -> Conn {
    match (&pg.container, &pg.url) {
        (Some(container), _) => Conn::Container {
            container: container.clone(),
            user: pg.user.clone(),
        },
        (None, url) => Conn::Host {
            url: url.clone().unwrap_or_default(),
            password_file: pg.password_file.clone(),
        },
    }
}

/// Creates a directory (and parents) readable only by the agent's user.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Removes `<id>.partial` folders a crash or a failure left in the target's folder.
pub(crate) fn sweep_partial_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "partial") {
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => removed.push(path),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot remove a partial backup")
                }
            }
        }
    }
    removed
}

pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

// --- progress ---------------------------------------------------------------------------------

/// The blocking task of a byte-moving step panicked or was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("the {step} task failed: {source}")]
pub(crate) struct TaskFailed {
    step: &'static str,
    source: tokio::task::JoinError,
}

/// Runs blocking byte-moving `work` on the blocking pool while reporting its bytes about once
/// a second as `job.progress` lines of `step` (`label: 1.2 GiB read, 420 MiB stored, 95 MiB/s`).
pub(crate) async fn with_progress<T: Send + 'static>(
    report: &Report<'_>,
    step: &'static str,
    label: String,
    work: impl FnOnce(&mut dyn FnMut(u64, u64)) -> T + Send + 'static,
) -> Result<T, TaskFailed> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, u64)>();
    let handle = tokio::task::spawn_blocking(move || {
        let mut last = Instant::now();
        let mut tick = |source: u64, stored: u64| {
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                let _ = tx.send((source, stored));
            }
        };
        work(&mut tick)
    });
    tokio::pin!(handle);
    let started = Instant::now();
    loop {
        tokio::select! {
            done = &mut handle => return done.map_err(|source| TaskFailed { step, source }),
            Some((source, stored)) = rx.recv() => {
                let rate = (source as f64 / started.elapsed().as_secs_f64().max(0.001)) as u64;
                let message = format!(
                    "{label}: {} read, {} stored, {}/s",
                    human_bytes(source),
                    human_bytes(stored),
                    human_bytes(rate)
                );
                report
                    .event(
                        drover_model::jobevent::PROGRESS,
                        message,
                        BTreeMap::from([
                            (field::STEP.to_string(), step.to_string()),
                            (catalog::field::SOURCE_BYTES.to_string(), source.to_string()),
                            (catalog::field::STORED_BYTES.to_string(), stored.to_string()),
                            (catalog::field::RATE.to_string(), rate.to_string()),
                        ]),
                    )
                    .await;
            }
        }
    }
}

// --- backup -----------------------------------------------------------------------------------

/// How `take` reports its stages: as the job's own steps, or (inside a deploy's `backup` step
/// or a restore's `emergency_backup`) as progress lines of that one step.
pub(crate) struct Stages<'a, 'r> {
    report: &'a Report<'r>,
    outer: Option<&'static str>,
}

impl Stages<'_, '_> {
    async fn start(
        &self,
        ctx: &JobCtx,
        job: &mut JobRecord,
        step: &'static str,
        message: String,
    ) -> Result<Instant, Failure> {
        match self.outer {
            None => begin(ctx, job, self.report, step, message).await,
            Some(outer) => {
                self.report.progress(outer, message).await;
                Ok(Instant::now())
            }
        }
    }

    async fn done(&self, step: &'static str, since: Instant, message: String) {
        match self.outer {
            None => {
                self.report
                    .step_done(step, since, message, BTreeMap::new())
                    .await
            }
            Some(outer) => self.report.progress(outer, message).await,
        }
    }

    async fn failed(
        &self,
        step: &'static str,
        since: Instant,
        error: impl std::fmt::Display,
    ) -> Failure {
        match self.outer {
            None => step_failed(self.report, step, since, error).await,
            Some(outer) => fail(outer, format!("{step}: {error}")),
        }
    }

    fn step(&self, step: &'static str) -> &'static str {
        self.outer.unwrap_or(step)
    }
}

/// What one part's source is.
pub(crate) enum Source {
    Postgres {
        conn: Conn,
        database: String,
        options: Vec<String>,
    },
    Files {
        dir: PathBuf,
        exclude: Vec<String>,
    },
}

/// Takes one backup of `spec` (all its parts, or only `database` for an emergency backup),
/// stores it, uploads it when S3 is configured, and records it in the catalog. `outer`: the
/// step it runs inside (pre-deploy, emergency), else its stages are steps of the job.
pub(crate) async fn take(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    spec: &TargetSpec,
    trigger: Trigger,
    database: Option<&str>,
    outer: Option<&'static str>,
) -> Result<Backup, Failure> {
    let stages = Stages { report, outer };
    let started_ms = unix_ms();
    let id = catalog::backup_id(&spec.name, started_ms, rand::random());
    let dir = target_dir(ctx, spec);
    let partial = dir.join(format!("{id}.partial"));
    let result = take_into(
        ctx, job, &stages, spec, trigger, database, &id, &partial, started_ms,
    )
    .await;
    if result.is_err() {
        if partial.exists()
            && let Err(e) = std::fs::remove_dir_all(&partial)
        {
            warn!(path = %partial.display(), error = %e, "cannot remove a failed backup's files");
        }
    } else {
        info!(backup = %id, target = %spec.name, "backup stored");
    }
    let mut backup = result?;
    backup.started_unix_ms = started_ms;
    Ok(backup)
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn take_into(
    ctx: &JobCtx,
    job: &mut JobRecord,
    stages: &Stages<'_, '_>,
    spec: &TargetSpec,
    trigger: Trigger,
    database: Option<&str>,
    id: &str,
    partial: &Path,
    started_ms: i64,
) -> Result<Backup, Failure> {
    // check: where it goes, that there is room, that the source and the storage answer.
    let since = stages
        .start(
            ctx,
            job,
            "check",
            format!("checking disk space and the source of {}", spec.name),
        )
        .await?;
    let dir = target_dir(ctx, spec);
    let checked = check(ctx, spec, database, &dir).await;
    let (sources, facts, remote, estimate) = match checked {
        Ok(v) => v,
        Err(e) => return Err(stages.failed("check", since, e).await),
    };
    stages
        .done(
            "check",
            since,
            format!(
                "{} part(s), about {} to read; room on {}",
                sources.len(),
                human_bytes(estimate),
                dir.display()
            ),
        )
        .await;

    // dump: every part through the pipeline into `<id>.partial/`.
    let since = stages
        .start(
            ctx,
            job,
            "dump",
            format!("streaming {} into {}", spec.name, partial.display()),
        )
        .await?;
    if let Err(e) = private_dir(partial) {
        return Err(stages
            .failed("dump", since, format!("{}: {e}", partial.display()))
            .await);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let encode = pipeline::Encode {
        zstd_level: spec.compression.effective_level(cores),
        zstd_threads: spec.compression.effective_threads(cores),
        recipients: spec.encryption.recipients.clone(),
    };
    let suffix = if spec.encryption.recipients.is_empty() {
        ".zst"
    } else {
        ".zst.age"
    };
    let mut parts = Vec::new();
    for (name, source) in sources {
        let file = match source {
            Source::Postgres { .. } => format!("{name}.dump{suffix}"),
            Source::Files { .. } => format!("{name}.tar{suffix}"),
        };
        let reader: Box<dyn Read + Send> = match open_source(ctx, &source).await {
            // A cancel stops the stream at its next read; the failure path removes `.partial`.
            Ok(r) => Box::new(crate::job::step::CancelIo {
                inner: r,
                token: ctx.cancels.token(&job.id),
            }),
            Err(e) => return Err(stages.failed("dump", since, format!("{name}: {e}")).await),
        };
        let (dir_owned, file_owned, encode) = (partial.to_path_buf(), file.clone(), encode.clone());
        let written = with_progress(
            stages.report,
            stages.step("dump"),
            name.clone(),
            move |tick| {
                let mut reader = reader;
                pipeline::write(&mut reader, &dir_owned, &file_owned, &encode, tick)
            },
        )
        .await;
        let written = match written {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => return Err(stages.failed("dump", since, format!("{name}: {e}")).await),
            Err(e) => return Err(stages.failed("dump", since, e.to_string()).await),
        };
        let pg = facts.get(&name);
        parts.push(Part {
            name: name.clone(),
            file,
            size: written.size,
            sha256: written.sha256,
            source_bytes: written.source_bytes,
            pg_dump_version: pg.map(|f| f.pg_dump_version.clone()).unwrap_or_default(),
            server_version: pg.map(|f| f.server_version.clone()).unwrap_or_default(),
            tables: pg
                .map(|f| {
                    f.tables
                        .iter()
                        .map(|t| Table {
                            schema: t.schema.clone(),
                            name: t.name.clone(),
                            rows: t.row_estimate,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    let stored: u64 = parts.iter().map(|p| p.size).sum();
    let read: u64 = parts.iter().map(|p| p.source_bytes).sum();
    stages
        .done(
            "dump",
            since,
            format!("{} read, {} stored", human_bytes(read), human_bytes(stored)),
        )
        .await;

    // store: the manifest, then the folder renamed into place.
    let since = stages
        .start(ctx, job, "store", "writing the manifest".into())
        .await?;
    let final_dir = dir.join(id);
    let mut backup = Backup {
        id: id.to_string(),
        target: spec.name.clone(),
        host: ctx.host.clone(),
        kind: spec.kind().as_str().into(),
        trigger,
        job_id: job.id.clone(),
        requested_by: job.requested_by.clone(),
        // Recorded in the manifest and the catalog (retention and validation read it).
        started_unix_ms: started_ms,
        finished_unix_ms: 0,
        parts,
        compression: format!("zstd-{}", encode.zstd_level),
        recipients: spec.encryption.recipients.clone(),
        release: live_release(ctx, spec),
        local_dir: final_dir.display().to_string(),
        remote: String::new(),
        verified_unix_ms: 0,
        local_corrupt: String::new(),
        extra: BTreeMap::new(),
    };
    if let Err(e) = write_manifest(partial, &backup)
        .and_then(|()| std::fs::rename(partial, &final_dir))
        .and_then(|()| fsync_dir(&dir))
    {
        return Err(stages
            .failed("store", since, format!("{}: {e}", final_dir.display()))
            .await);
    }
    stages
        .done("store", since, format!("stored in {}", final_dir.display()))
        .await;

    // upload: each part, read back and compared; the manifest last.
    if let Some(remote) = &remote {
        let since = stages
            .start(
                ctx,
                job,
                "upload",
                format!("uploading to {}", remote_url(spec, id)),
            )
            .await?;
        match upload(stages, remote, spec, &backup, &final_dir).await {
            Ok(()) => {
                backup.remote = remote_url(spec, id);
                backup.verified_unix_ms = unix_ms();
                stages
                    .done(
                        "upload",
                        since,
                        format!(
                            "uploaded and read back: {} matches the manifest",
                            backup.remote
                        ),
                    )
                    .await;
            }
            Err(e) => {
                delete_remote(remote, &spec.name, id).await;
                backup.finished_unix_ms = unix_ms();
                // The local copy is good: it stays in the catalog, and the job still fails.
                let _ = ctx.store.put_backup(&backup).await;
                return Err(stages
                    .failed("upload", since, format!("{e}; the local copy {id} is kept"))
                    .await);
            }
        }
    }

    // catalog.
    let since = stages
        .start(ctx, job, "catalog", "recording the backup".into())
        .await?;
    backup.finished_unix_ms = unix_ms();
    if let Err(e) = write_manifest(&final_dir, &backup).and_then(|()| fsync_dir(&final_dir)) {
        return Err(stages
            .failed("catalog", since, format!("{}: {e}", final_dir.display()))
            .await);
    }
    if let Err(e) = ctx.store.put_backup(&backup).await {
        return Err(stages.failed("catalog", since, e.to_string()).await);
    }
    stages
        .done("catalog", since, format!("backup {id} recorded"))
        .await;
    Ok(backup)
}

type Checked = (
    Vec<(String, Source)>,
    BTreeMap<String, postgres::Facts>,
    Option<Remote>,
    u64,
);

/// The parts to read, what PostgreSQL says about each database, the remote storage, and the
/// estimated bytes; fails when the disk is too full or a source or the storage is unusable.
pub(crate) async fn check(
    ctx: &JobCtx,
    spec: &TargetSpec,
    database: Option<&str>,
    dir: &Path,
) -> Result<Checked, BackupError> {
    private_dir(dir).map_err(|source| BackupError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    for path in sweep_partial_dirs(dir) {
        info!(path = %path.display(), "removed a partial backup left by an earlier run");
    }
    // Credentials are checked before anything is read.
    let remote = remote_of(spec)?;
    let mut sources = Vec::new();
    let mut facts = BTreeMap::new();
    let mut estimate = 0u64;
    match spec.kind() {
        SourceKind::Postgres => {
            let pg = spec
                .postgres()
                .ok_or(BackupError::NoSource("no [postgres] source"))?;
            let conn = conn_of(pg);
            let databases: Vec<String> = match database {
                Some(db) => vec![db.to_string()],
                None => pg.databases.clone(),
            };
            for db in databases {
                let f = postgres::facts(&ctx.docker, &conn, &db).await?;
                estimate += f.size_bytes;
                facts.insert(db.clone(), f);
                sources.push((
                    db.clone(),
                    Source::Postgres {
                        conn: conn.clone(),
                        database: db,
                        options: pg.options.clone(),
                    },
                ));
            }
        }
        SourceKind::Volume | SourceKind::Path => {
            let (dir, exclude) = match &spec.source {
                target::Source::Volume(v) => {
                    let mount = ctx
                        .docker
                        .volume_mountpoint(&v.name)
                        .await?
                        .ok_or_else(|| BackupError::NoVolume(v.name.clone()))?;
                    (PathBuf::from(mount), Vec::new())
                }
                target::Source::Path(p) => (p.dir.clone(), p.exclude.clone()),
                target::Source::Postgres(_) => {
                    return Err(BackupError::NoSource("no [volume] or [path] source"));
                }
            };
            let excluded = files::excludes(&exclude)?;
            let (d, ex) = (dir.clone(), excluded.clone());
            estimate = tokio::task::spawn_blocking(move || files::tree_size(&d, &ex))
                .await?
                .map_err(|source| BackupError::Read {
                    path: dir.clone(),
                    source,
                })?;
            sources.push(("files".into(), Source::Files { dir, exclude }));
        }
    }
    let free = pipeline::free_bytes(dir).map_err(|source| BackupError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    pipeline::disk_check(free, estimate)?;
    Ok((sources, facts, remote, estimate))
}

pub(crate) async fn open_source(
    ctx: &JobCtx,
    source: &Source,
) -> Result<Box<dyn Read + Send>, BackupError> {
    match source {
        Source::Postgres {
            conn,
            database,
            options,
        } => {
            let dump = postgres::dump(&ctx.docker, conn, database, options).await?;
            Ok(Box::new(dump))
        }
        Source::Files { dir, exclude } => {
            let excluded = files::excludes(exclude)?;
            let tar = files::TarSource::start(dir.clone(), excluded).map_err(|source| {
                BackupError::Archive {
                    path: dir.clone(),
                    source,
                }
            })?;
            Ok(Box::new(tar))
        }
    }
}

/// `app version` of the target's app, when it names one and it is live here.
pub(crate) fn live_release(ctx: &JobCtx, spec: &TargetSpec) -> String {
    let Some(app) = &spec.app else {
        return String::new();
    };
    match ctx.store.releases(app) {
        Ok(table) => drover_model::releases::live(&table)
            .map(|r| format!("{app} {}", r.version))
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

pub(crate) fn write_manifest(dir: &Path, backup: &Backup) -> std::io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_vec_pretty(backup).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{MANIFEST}.partial"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(MANIFEST))
}

pub(crate) async fn upload(
    stages: &Stages<'_, '_>,
    remote: &Remote,
    spec: &TargetSpec,
    backup: &Backup,
    dir: &Path,
) -> Result<(), BackupError> {
    for part in &backup.parts {
        let key = object_key(&spec.name, &backup.id, &part.file);
        let local = dir.join(&part.file);
        let mut tick = |_sent: u64| {};
        remote
            .upload_file(&local, &key, &mut tick)
            .await
            .map_err(|source| BackupError::Upload {
                file: part.file.clone(),
                source,
            })?;
        let (size, sha) = remote
            .read_back(&key)
            .await
            .map_err(|source| BackupError::ReadBack {
                file: part.file.clone(),
                source,
            })?;
        check_read_back(&key, part, size, &sha)?;
        stages
            .report
            .progress(
                stages.step("upload"),
                format!(
                    "{} uploaded and read back ({})",
                    part.file,
                    human_bytes(size)
                ),
            )
            .await;
    }
    let mut manifest = backup.clone();
    manifest.remote = remote_url(spec, &backup.id);
    let bytes = serde_json::to_vec_pretty(&manifest)?;
    remote
        .put_bytes(&object_key(&spec.name, &backup.id, MANIFEST), bytes)
        .await
        .map_err(BackupError::ManifestUpload)
}

/// Why a backup's work failed; its step reports the message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackupError {
    #[error("{}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Remote(#[from] ObjectStoreError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Postgres(#[from] postgres::PgError),
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    #[error("Docker volume {0} does not exist on this host (docker volume ls)")]
    NoVolume(String),
    #[error("{0}")]
    NoSource(&'static str),
    #[error(transparent)]
    Exclude(#[from] files::ExcludeError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] pipeline::DiskShort),
    #[error("cannot archive {}: {source}", path.display())]
    Archive {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upload of {file}: {source}")]
    Upload {
        file: String,
        source: ObjectStoreError,
    },
    #[error("read-back of {file}: {source}")]
    ReadBack {
        file: String,
        source: ObjectStoreError,
    },
    #[error(transparent)]
    Mismatch(#[from] ReadBackMismatch),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("upload of the manifest: {0}")]
    ManifestUpload(ObjectStoreError),
    #[error("cannot delete {}: {source}", path.display())]
    Delete {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether what S3 gave back is what was written: the same size and SHA-256 as the manifest.
pub fn check_read_back(
    key: &str,
    part: &Part,
    size: u64,
    sha256: &str,
) -> Result<(), ReadBackMismatch> {
    if size == part.size && sha256 == part.sha256 {
        Ok(())
    } else {
        Err(ReadBackMismatch {
            key: key.to_string(),
            size,
            sha256: sha256.to_string(),
            manifest_size: part.size,
            manifest_sha256: part.sha256.clone(),
        })
    }
}

/// What S3 gave back differs from the manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "read-back mismatch for {key}: stored {size} bytes with sha256 {sha256}, the manifest says {manifest_size} bytes with sha256 {manifest_sha256}"
)]
pub struct ReadBackMismatch {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub manifest_size: u64,
    pub manifest_sha256: String,
}

/// Deletes every object of a backup (best effort: a failure is logged).
pub(crate) async fn delete_remote(remote: &Remote, target: &str, id: &str) {
    let prefix = format!("{target}/{id}/");
    match remote.list(&prefix).await {
        Ok(keys) => {
            for (key, _) in keys {
                if let Err(e) = remote.delete(&key).await {
                    warn!(key, error = %e, "cannot delete an object of a failed or pruned backup");
                }
            }
        }
        Err(e) => warn!(prefix, error = %e, "cannot list the objects of a backup"),
    }
}

// --- retention --------------------------------------------------------------------------------

/// Applies the target's retention (local and remote copies separately) and reports each
/// decision.
pub(crate) async fn prune_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    spec: &TargetSpec,
    dry_run: bool,
) -> Result<Vec<PruneLine>, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "retention",
        format!(
            "{} the retention of {}",
            if dry_run { "evaluating" } else { "applying" },
            spec.name
        ),
    )
    .await?;
    match apply_retention(ctx, spec, dry_run).await {
        Ok(lines) => {
            let gone: Vec<String> = lines
                .iter()
                .filter(|l| !l.keep)
                .map(|l| format!("{} ({})", l.id, l.copy))
                .collect();
            let message = match (gone.is_empty(), dry_run) {
                (true, _) => "nothing to delete".to_string(),
                (false, true) => format!("would delete {}", gone.join(", ")),
                (false, false) => format!("deleted {}", gone.join(", ")),
            };
            report
                .step_done("retention", since, message, BTreeMap::new())
                .await;
            Ok(lines)
        }
        Err(e) => Err(step_failed(report, "retention", since, e).await),
    }
}

pub(crate) async fn apply_retention(
    ctx: &JobCtx,
    spec: &TargetSpec,
    dry_run: bool,
) -> Result<Vec<PruneLine>, BackupError> {
    let mut all = ctx.store.backups(&spec.name)?;
    let out = retention::plan(&spec.retention.local(), &spec.retention.remote(), &all);
    if dry_run {
        return Ok(out);
    }
    let store = if out.iter().any(|l| !l.keep && l.copy == "remote") {
        remote_of(spec)?
    } else {
        None
    };
    for line in out.iter().filter(|l| !l.keep) {
        let Some(backup) = all.iter_mut().find(|b| b.id == line.id) else {
            continue;
        };
        if line.copy == "local" {
            let dir = PathBuf::from(&backup.local_dir);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|source| BackupError::Delete {
                    path: dir.clone(),
                    source,
                })?;
            }
            backup.local_dir.clear();
        } else if let Some(remote) = &store {
            delete_remote(remote, &spec.name, &backup.id).await;
            backup.remote.clear();
        }
        if backup.is_local() || backup.is_remote() {
            ctx.store.put_backup(backup).await?;
        } else {
            ctx.store.remove_backup(&spec.name, &backup.id).await?;
        }
    }
    Ok(out)
}

// --- restore ----------------------------------------------------------------------------------

/// Reads an age identity file (the format `age-keygen` writes) and checks that it holds at
/// least one identity, before anything is touched.
pub(crate) fn read_identity_file(path: &Path) -> Result<String, IdentityFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| IdentityFileError::Read {
        path: path.to_path_buf(),
        err: e,
    })?;
    pipeline::parse_identities(&text).map_err(|e| IdentityFileError::Parse {
        path: path.to_path_buf(),
        err: Box::new(e),
    })?;
    Ok(text)
}

/// An age identity file that cannot be read or holds no identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityFileError {
    #[error("cannot read the identity file {}: {err}", path.display())]
    Read { path: PathBuf, err: std::io::Error },
    #[error("the identity file {}: {err}", path.display())]
    Parse {
        path: PathBuf,
        err: Box<pipeline::PipelineError>,
    },
}

/// What is wrong with a stored copy, in a few words: `corrupt (sha256 mismatch)`, `missing`.
pub fn copy_fault(err: &pipeline::PipelineError) -> String {
    match err {
        pipeline::PipelineError::HashMismatch { .. } => "corrupt (sha256 mismatch)".into(),
        pipeline::PipelineError::Missing { .. } => "missing".into(),
        other => format!("unreadable ({other})"),
    }
}

/// Removes a fetched copy when dropped.
pub(crate) struct Cleanup(pub(crate) Option<PathBuf>);

/// Why a backup's S3 copy could not be fetched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error(transparent)]
    Remote(#[from] ObjectStoreError),
    #[error("the target no longer has [storage.s3]")]
    NoS3,
    #[error("{}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("download: {0}")]
    Download(ObjectStoreError),
}

/// Downloads `parts` of `backup`'s S3 copy into `<id>.fetch.partial/` beside its local
/// copies: the folder (removed when the returned guard drops, unless the caller takes it
/// out) and each part's file.
pub(crate) async fn fetch_remote(
    ctx: &JobCtx,
    spec: &TargetSpec,
    backup: &Backup,
    parts: &[&Part],
) -> Result<(Cleanup, Vec<PathBuf>), FetchError> {
    let remote = remote_of(spec)?.ok_or(FetchError::NoS3)?;
    let dir = target_dir(ctx, spec).join(format!("{}.fetch.partial", backup.id));
    private_dir(&dir).map_err(|source| FetchError::Dir {
        path: dir.clone(),
        source,
    })?;
    let guard = Cleanup(Some(dir.clone()));
    let mut paths = Vec::new();
    for part in parts {
        let file = dir.join(&part.file);
        remote
            .download_to(&object_key(&spec.name, &backup.id, &part.file), &file)
            .await
            .map_err(FetchError::Download)?;
        paths.push(file);
    }
    Ok((guard, paths))
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// --- recovery ---------------------------------------------------------------------------------

/// On start, for a backup-kind job a crash interrupted: remove its partial files and report it
/// `interrupted`, with what its kind did about it first (`did`).
pub async fn converge(ctx: &JobCtx, mut job: JobRecord, mut did: Vec<String>) {
    let report = Report::new(&ctx.outbox, &job.id);
    if let Ok(spec) = spec_of(&job) {
        let removed = sweep_partial_dirs(&target_dir(ctx, &spec));
        if !removed.is_empty() {
            did.insert(
                0,
                format!("removed {} partial backup file(s)", removed.len()),
            );
        }
    }
    let step = if job.step.is_empty() {
        "validate".to_string()
    } else {
        job.step.clone()
    };
    let message = crate::job::step::interrupted_message(&step, &did);
    let outcome = Outcome {
        result: JobResult::Interrupted,
        step,
        error: message,
        ..Outcome::failed("", "")
    };
    finish(ctx, &mut job, &report, outcome, Duration::ZERO).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part() -> Part {
        Part {
            name: "shop".into(),
            file: "shop.dump.zst".into(),
            size: 10,
            sha256: "ab".repeat(32),
            source_bytes: 30,
            pg_dump_version: String::new(),
            server_version: String::new(),
            tables: Vec::new(),
        }
    }

    #[test]
    fn a_read_back_must_match_the_manifest_in_size_and_hash() {
        let p = part();
        assert!(check_read_back("k", &p, 10, &p.sha256).is_ok());
        let short = check_read_back("k", &p, 9, &p.sha256)
            .unwrap_err()
            .to_string();
        assert!(short.contains("read-back mismatch for k"), "{short}");
        let other = check_read_back("k", &p, 10, &"cd".repeat(32))
            .unwrap_err()
            .to_string();
        assert!(other.contains(&"cd".repeat(32)), "{other}");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
