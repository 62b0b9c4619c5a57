//! Starting jobs: the one path the operator RPCs and the scheduler both take, so a scheduled run
//! goes through the same checks as an operator's. Domain arguments in, a stored and dispatched
//! `JobRecord` or a typed `LaunchError` out; no wire types here (the RPC layer maps the error
//! to a status once, in `operator.rs`).
//!
//! Each kind: check what the job names (app and version, backup target, backup), choose its
//! hosts (`selection`: by name, by labels, else where the app is live or the target's backups
//! are), build the one `JobCommand`, then `start`: the job is stored (flushed) and its first
//! targets' commands sent, as `rollout` says.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_model::appspec::{AppSpec, check_version};
use drover_model::backup::catalog::Backup;
use drover_model::backup::target::TargetSpec;
use drover_model::releases;
use tracing::info;

use crate::jobs::{self, JobCommand, JobKind, JobRecord, JobUpdate, job_id};
use crate::selection::{Candidate, SelectError, require_connected, select_hosts};
use crate::sessions::{send_cancel, send_command};
use crate::shared::{Shared, now_ms};
use crate::store::AppRecord;

/// Why a job could not start. Each message names the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// What the job names does not exist (app, target, backup, host).
    #[error("{0}")]
    NotFound(String),
    /// It exists, but the job cannot run now (no earlier release, no connected agent, a
    /// stored spec that no longer validates).
    #[error("{0}")]
    Precondition(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error("{0}")]
    Internal(String),
}

fn store_error(err: impl std::fmt::Display) -> LaunchError {
    LaunchError::Internal(err.to_string())
}

impl From<SelectError> for LaunchError {
    fn from(err: SelectError) -> LaunchError {
        let message = err.to_string();
        match err {
            SelectError::UnknownHost(_) => LaunchError::NotFound(message),
            SelectError::Revoked(_) | SelectError::NotConnected { .. } | SelectError::NoHosts => {
                LaunchError::Precondition(message)
            }
            SelectError::Both | SelectError::NoLabelMatch(_) | SelectError::NameThem { .. } => {
                LaunchError::Invalid(message)
            }
        }
    }
}

/// Where a job runs when the operator names hosts: by name or by labels (at most one of them).
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    pub names: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// A deploy of `app` at `version`.
#[derive(Debug, Clone, Default)]
pub struct DeployArgs {
    pub app: String,
    pub version: String,
    pub hosts: Hosts,
    pub skip_backup: bool,
    pub wait_lock: bool,
    /// Skip the spec's migration (a fleet release's hosts after its first).
    pub skip_migration: bool,
    /// Keep the previous web container running after the switch (a fleet release's
    /// `keep_previous`, until it retires it).
    pub keep_previous: bool,
}

/// A rollback of `app` to `to_version` (empty: the release live before the current one).
#[derive(Debug, Clone, Default)]
pub struct RollbackArgs {
    pub app: String,
    pub to_version: String,
    pub hosts: Hosts,
    pub wait_lock: bool,
}

/// A restore of one backup (or one part of it) into a database or a directory.
#[derive(Debug, Clone, Default)]
pub struct RestoreArgs {
    pub target: String,
    pub backup_id: String,
    pub part: String,
    pub to_database: String,
    pub to_dir: String,
    pub confirmed: bool,
    pub identity_file: String,
}

/// What a cancel did: the job after it, and which hosts were told now or will be on their
/// next session.
#[derive(Debug, Clone)]
pub struct CancelOutcome {
    pub job: JobRecord,
    pub already_finished: bool,
    pub told: Vec<String>,
    pub pending: Vec<String>,
}

/// Starts jobs for one controller.
#[derive(Debug, Clone)]
pub struct Launcher {
    shared: Arc<Shared>,
}

impl Launcher {
    pub fn new(shared: Arc<Shared>) -> Launcher {
        Launcher { shared }
    }

    /// A deploy job. `id`: the scheduler's pre-recorded job id.
    pub async fn deploy(
        &self,
        args: DeployArgs,
        by: &str,
        id: Option<String>,
    ) -> Result<JobRecord, LaunchError> {
        let (app, spec) = self.deployable(&args.app, &args.version)?;
        let hosts = self.choose_hosts(&app.name, &args.hosts, "deploy")?;
        let backup_target_toml = match (&spec.pre_deploy_backup, args.skip_backup) {
            (Some(target), false) => self
                .shared
                .store
                .backup_target(target)
                .map_err(store_error)?
                .map(|t| t.spec_toml)
                .ok_or_else(|| {
                    LaunchError::Precondition(format!(
                        "{} asks for a pre-deploy backup of {target}, but no backup target {target} is applied; `drover backup-target apply FILE`, or deploy with --skip-backup",
                        app.name
                    ))
                })?,
            _ => String::new(),
        };
        let command = JobCommand::Deploy {
            app: app.name.clone(),
            version: args.version,
            spec_toml: app.spec_toml.clone(),
            spec_revision: app.revision,
            skip_backup: args.skip_backup,
            wait_lock: args.wait_lock,
            requested_by: by.to_string(),
            backup_target_toml,
            skip_migration: args.skip_migration,
            keep_previous: args.keep_previous,
        };
        self.start(JobKind::Deploy, command, hosts, id).await
    }

    /// A retire job: `host` stops the previous release of `app` that a fleet release's deploy
    /// kept running (under the release's derived job id `id`).
    pub async fn retire(
        &self,
        app: &str,
        host: &str,
        by: &str,
        id: Option<String>,
    ) -> Result<JobRecord, LaunchError> {
        let hosts = self.choose_hosts(
            app,
            &Hosts {
                names: vec![host.to_string()],
                ..Hosts::default()
            },
            "retire",
        )?;
        let command = JobCommand::Retire {
            app: app.to_string(),
            requested_by: by.to_string(),
        };
        self.start(JobKind::Retire, command, hosts, id).await
    }

    /// A pull job: `app`'s image at `version` made present on `host` (a fleet release's first
    /// step, under its derived job id `id`).
    pub async fn pull(
        &self,
        app: &str,
        version: &str,
        host: &str,
        by: &str,
        id: Option<String>,
    ) -> Result<JobRecord, LaunchError> {
        let (app, _) = self.deployable(app, version)?;
        let hosts = self.choose_hosts(
            &app.name,
            &Hosts {
                names: vec![host.to_string()],
                ..Hosts::default()
            },
            "pull",
        )?;
        let command = JobCommand::Pull {
            app: app.name.clone(),
            version: version.to_string(),
            spec_toml: app.spec_toml.clone(),
            requested_by: by.to_string(),
        };
        self.start(JobKind::Pull, command, hosts, id).await
    }

    /// A rollback job; refused unless every chosen host has a release to go back to. `id`: a
    /// fleet release's derived job id.
    pub async fn rollback(
        &self,
        args: RollbackArgs,
        by: &str,
        id: Option<String>,
    ) -> Result<JobRecord, LaunchError> {
        let app = self.known_app(&args.app)?;
        let hosts = self.choose_hosts(&app.name, &args.hosts, "rollback")?;
        let to = (!args.to_version.is_empty()).then_some(args.to_version.as_str());
        for host in &hosts {
            let table = self
                .shared
                .store
                .releases(&app.name, host)
                .map_err(store_error)?;
            if releases::rollback_target(&table, to).is_none() {
                let name = &app.name;
                return Err(LaunchError::Precondition(match to {
                    None => format!(
                        "no earlier release of {name} on {host} to roll back to (drover releases {name})"
                    ),
                    Some(v) => format!(
                        "no kept release of version {v} of {name} on {host} to roll back to (drover releases {name})"
                    ),
                }));
            }
        }
        let command = JobCommand::Rollback {
            app: app.name.clone(),
            to_version: args.to_version,
            wait_lock: args.wait_lock,
            requested_by: by.to_string(),
        };
        self.start(JobKind::Rollback, command, hosts, id).await
    }

    /// A backup job on `target` (on `host` when given). `trigger`: manual | scheduled.
    pub async fn backup(
        &self,
        target: &str,
        host: &str,
        trigger: &str,
        by: &str,
        id: Option<String>,
    ) -> Result<JobRecord, LaunchError> {
        let (record, spec) = self.known_target(target)?;
        let hosts = self.target_hosts(&spec, host)?;
        let command = JobCommand::Backup {
            target: spec.name.clone(),
            target_toml: record.spec_toml,
            trigger: trigger.to_string(),
            requested_by: by.to_string(),
        };
        self.start(JobKind::Backup, command, hosts, id).await
    }

    /// A prune job on `target` (a dry run changes nothing but still takes the target's lock).
    pub async fn prune(
        &self,
        target: &str,
        host: &str,
        dry_run: bool,
        by: &str,
    ) -> Result<JobRecord, LaunchError> {
        let (record, spec) = self.known_target(target)?;
        let hosts = self.target_hosts(&spec, host)?;
        let command = JobCommand::Prune {
            target: spec.name.clone(),
            target_toml: record.spec_toml,
            dry_run,
            requested_by: by.to_string(),
        };
        self.start(JobKind::Prune, command, hosts, None).await
    }

    /// A restore job, on the host that holds the backup.
    pub async fn restore(&self, args: RestoreArgs, by: &str) -> Result<JobRecord, LaunchError> {
        let (record, spec) = self.known_target(&args.target)?;
        let (host, backup) = self.known_backup(&args.backup_id)?;
        if backup.target != spec.name {
            return Err(LaunchError::Invalid(format!(
                "backup {} is of target {}, not {}",
                backup.id, backup.target, spec.name
            )));
        }
        match (args.to_database.is_empty(), args.to_dir.is_empty()) {
            (true, true) | (false, false) => {
                return Err(LaunchError::Invalid(
                    "say where to restore: --to DATABASE or --to-dir DIR (one of them)".into(),
                ));
            }
            (false, true) if spec.postgres().is_none() => {
                return Err(LaunchError::Invalid(format!(
                    "{} backs up files; restore them with --to-dir DIR",
                    spec.name
                )));
            }
            (true, false) if !args.to_dir.starts_with('/') => {
                return Err(LaunchError::Invalid(
                    "--to-dir must be an absolute path on the host".into(),
                ));
            }
            _ => {}
        }
        backup
            .part((!args.part.is_empty()).then_some(args.part.as_str()))
            .map_err(|e| LaunchError::Invalid(e.to_string()))?;
        let hosts = self.choose_among(&spec.name, &[host], &BTreeMap::new(), &[], "restore")?;
        let command = JobCommand::Restore {
            target: spec.name.clone(),
            target_toml: record.spec_toml,
            backup_id: backup.id.clone(),
            part: args.part,
            to_database: args.to_database,
            to_dir: args.to_dir,
            confirmed: args.confirmed,
            identity_file: args.identity_file,
            requested_by: by.to_string(),
        };
        self.start(JobKind::Restore, command, hosts, None).await
    }

    /// A verify job on `target` (on `host` when given, else where its newest backup is). `id`:
    /// the scheduler's pre-recorded job id.
    pub async fn verify(
        &self,
        target: &str,
        host: &str,
        by: &str,
        id: Option<String>,
    ) -> Result<JobRecord, LaunchError> {
        let mut jobs = self.verify_all(&[target.to_string()], host, by, id).await?;
        jobs.pop()
            .ok_or_else(|| LaunchError::Internal("no verify job was started".into()))
    }

    /// A verify job on each of `targets`; every target is checked before any job starts, so a
    /// bad one starts none.
    pub async fn verify_all(
        &self,
        targets: &[String],
        host: &str,
        by: &str,
        id: Option<String>,
    ) -> Result<Vec<JobRecord>, LaunchError> {
        let mut planned = Vec::new();
        for name in targets {
            let (record, spec) = self.known_target(name)?;
            let hosts = self.verify_host(&spec, host)?;
            planned.push((record, spec, hosts));
        }
        let mut jobs = Vec::new();
        for (record, spec, hosts) in planned {
            let command = JobCommand::Verify {
                target: spec.name.clone(),
                target_toml: record.spec_toml,
                requested_by: by.to_string(),
                identity_file: String::new(),
            };
            jobs.push(
                self.start(JobKind::Verify, command, hosts, id.clone())
                    .await?,
            );
        }
        Ok(jobs)
    }

    // --- what a job names ---------------------------------------------------------------------

    pub fn known_app(&self, name: &str) -> Result<AppRecord, LaunchError> {
        self.shared
            .store
            .app(name)
            .map_err(store_error)?
            .ok_or_else(|| {
                LaunchError::NotFound(format!(
                    "unknown app {name}; `drover app list` shows the applied ones, `drover app apply FILE` adds one"
                ))
            })
    }

    /// The app and its spec, when `version` may be deployed.
    pub fn deployable(
        &self,
        app: &str,
        version: &str,
    ) -> Result<(AppRecord, AppSpec), LaunchError> {
        let app = self.known_app(app)?;
        let source = format!("app {} revision {}", app.name, app.revision);
        let spec = AppSpec::from_toml(&app.spec_toml, &source).map_err(|e| {
            LaunchError::Precondition(format!(
                "the stored spec no longer validates: {e}; apply a fixed one (`drover app apply FILE`)"
            ))
        })?;
        check_version(&spec, version)
            .map_err(|e| LaunchError::Invalid(format!("{}: {e}", app.name)))?;
        Ok((app, spec))
    }

    pub fn known_target(&self, name: &str) -> Result<(AppRecord, TargetSpec), LaunchError> {
        let record = self
            .shared
            .store
            .backup_target(name)
            .map_err(store_error)?
            .ok_or_else(|| {
                LaunchError::NotFound(format!(
                    "unknown backup target {name}; `drover backup-target list` shows the applied ones, `drover backup-target apply FILE` adds one"
                ))
            })?;
        let source = format!("backup target {name} revision {}", record.revision);
        let spec = TargetSpec::from_toml(&record.spec_toml, &source).map_err(|e| {
            LaunchError::Precondition(format!(
                "the stored target no longer validates: {e}; apply a fixed one"
            ))
        })?;
        Ok((record, spec))
    }

    /// The backup with this id and the host that holds it.
    pub fn known_backup(&self, id: &str) -> Result<(String, Backup), LaunchError> {
        for target in self.shared.store.backup_targets().map_err(store_error)? {
            for (host, table) in self
                .shared
                .store
                .target_backups(&target.name)
                .map_err(store_error)?
            {
                if let Some(b) = table.into_iter().find(|b| b.id == id) {
                    return Ok((host, b));
                }
            }
        }
        Err(LaunchError::NotFound(format!(
            "unknown backup {id}; `drover backup list` shows them"
        )))
    }

    // --- where a job runs ---------------------------------------------------------------------

    /// Where a job on a backup target runs: `host` when given, else the target's `host` or
    /// `labels`, else the hosts that hold backups of it, else the only host.
    pub fn target_hosts(&self, spec: &TargetSpec, host: &str) -> Result<Vec<String>, LaunchError> {
        let names: Vec<String> = if !host.is_empty() {
            vec![host.to_string()]
        } else {
            spec.host.iter().cloned().collect()
        };
        let labels = if names.is_empty() {
            spec.labels.clone()
        } else {
            BTreeMap::new()
        };
        let holding: Vec<String> = self
            .shared
            .store
            .target_backups(&spec.name)
            .map_err(store_error)?
            .into_iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(h, _)| h)
            .collect();
        self.choose_among(&spec.name, &names, &labels, &holding, "back up")
    }

    /// Where a verify job runs: `host` when given, else the host holding the target's newest
    /// backup, else where its backups run (the first such host).
    fn verify_host(&self, spec: &TargetSpec, host: &str) -> Result<Vec<String>, LaunchError> {
        if host.is_empty() {
            let catalogs = self
                .shared
                .store
                .target_backups(&spec.name)
                .map_err(store_error)?;
            if let Some(holder) = newest_holder(&catalogs) {
                return self.choose_among(&spec.name, &[holder], &BTreeMap::new(), &[], "verify");
            }
        }
        let mut hosts = self.target_hosts(spec, host)?;
        hosts.truncate(1);
        Ok(hosts)
    }

    /// The hosts a fleet release of `app` goes to (see `selection`): connected or not (a host
    /// that is down when its wave comes is waited for), none revoked.
    pub fn release_hosts(&self, app: &str, hosts: &Hosts) -> Result<Vec<String>, LaunchError> {
        let (inventory, live_on) = self.inventory(app)?;
        Ok(select_hosts(
            &inventory,
            app,
            &hosts.names,
            &hosts.labels,
            &live_on,
        )?)
    }

    /// Records a cancel of job `id` (durable), tells the watchers, then sends `Cancel` to the
    /// hosts whose part runs; the job's other hosts never get their command.
    pub async fn cancel(&self, id: &str, by: &str) -> Result<CancelOutcome, LaunchError> {
        let shared = &self.shared;
        let now = now_ms();
        let (job, outcome) = shared
            .store
            .update_job(id, |job| jobs::request_cancel(job, by, now))
            .map_err(store_error)?
            .ok_or_else(|| {
                LaunchError::NotFound(format!(
                    "unknown job {id}; `drover jobs` lists the recent ones"
                ))
            })?;
        let tell = match outcome {
            jobs::Cancelled::AlreadyFinished(state) => {
                info!(job = %id, by, state = state.as_str(), "cancel of a finished job: nothing to do");
                return Ok(CancelOutcome {
                    job,
                    already_finished: true,
                    told: Vec::new(),
                    pending: Vec::new(),
                });
            }
            jobs::Cancelled::Requested { tell } => tell,
        };
        shared.store.flush().await.map_err(store_error)?;
        let _ = shared
            .job_updates
            .send(JobUpdate::Job(Box::new(job.clone())));
        let (mut told, mut pending) = (Vec::new(), Vec::new());
        for host in tell {
            if send_cancel(shared, &job, &host) {
                told.push(host);
            } else {
                pending.push(host);
            }
        }
        info!(job = %id, by, told = ?told, pending = ?pending, "job cancel requested");
        Ok(CancelOutcome {
            job,
            already_finished: false,
            told,
            pending,
        })
    }

    /// The hosts a job on `app` runs on (see `selection`), each with its agent connected now.
    fn choose_hosts(
        &self,
        app: &str,
        hosts: &Hosts,
        what: &'static str,
    ) -> Result<Vec<String>, LaunchError> {
        // Where the app is live matters only when neither names nor labels choose: a fleet
        // release starts one single-host job per host, which must not read every table.
        let live_on = if hosts.names.is_empty() && hosts.labels.is_empty() {
            self.live_on(app)?
        } else {
            Vec::new()
        };
        self.choose_among(app, &hosts.names, &hosts.labels, &live_on, what)
    }

    /// The hosts where `app` is live, per the stored release tables.
    fn live_on(&self, app: &str) -> Result<Vec<String>, LaunchError> {
        Ok(self
            .shared
            .store
            .app_releases(app)
            .map_err(store_error)?
            .into_iter()
            .filter(|(_, table)| releases::live(table).is_some())
            .map(|(host, _)| host)
            .collect())
    }

    /// Every host as a selection candidate, and the hosts where `app` is live.
    fn inventory(&self, app: &str) -> Result<(Vec<Candidate>, Vec<String>), LaunchError> {
        Ok((self.candidates(&[])?, self.live_on(app)?))
    }

    /// The hosts as selection candidates: those named in `only` (an unknown name is left out,
    /// for the selection to name), or every host when `only` is empty.
    fn candidates(&self, only: &[String]) -> Result<Vec<Candidate>, LaunchError> {
        let now = now_ms();
        let mut inventory = Vec::new();
        let store = &self.shared.store;
        let records = if only.is_empty() {
            store.hosts().map_err(store_error)?
        } else {
            let mut named = Vec::new();
            for name in only {
                named.extend(store.host(name).map_err(store_error)?);
            }
            named
        };
        for h in records {
            let view = self.shared.host_view(&h, now);
            inventory.push(Candidate {
                name: h.name.clone(),
                labels: h.labels.clone(),
                revoked: h.revoked_unix_ms.is_some(),
                session_open: view.session_open,
                state: view.state.as_str().to_string(),
                last_seen_unix_ms: view.last_seen_unix_ms,
            });
        }
        Ok(inventory)
    }

    /// The hosts a job on `subject` runs on: by name, by labels, else those in `live_on`, else
    /// the only host; each with its agent connected now.
    fn choose_among(
        &self,
        subject: &str,
        names: &[String],
        labels: &BTreeMap<String, String>,
        live_on: &[String],
        what: &'static str,
    ) -> Result<Vec<String>, LaunchError> {
        let inventory = self.candidates(names)?;
        let hosts = select_hosts(&inventory, subject, names, labels, live_on)?;
        require_connected(&inventory, &hosts, what, now_ms())?;
        Ok(hosts)
    }

    // --- start ----------------------------------------------------------------------------------

    /// Creates the job (durable), then sends the commands of the targets whose turn it is. Runs
    /// in its own task so a caller that goes away half-way leaves no job stored but never sent.
    /// With `id` (the scheduler's, recorded before), the job gets that id or is not created.
    async fn start(
        &self,
        kind: JobKind,
        command: JobCommand,
        hosts: Vec<String>,
        id: Option<String>,
    ) -> Result<JobRecord, LaunchError> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let now = now_ms();
            let mut job = None;
            let tries = if id.is_some() { 1 } else { 8 };
            for _ in 0..tries {
                let candidate_id = id
                    .clone()
                    .unwrap_or_else(|| job_id(kind, now, rand::random()));
                let candidate = JobRecord::new(candidate_id, now, command.clone(), &hosts);
                if shared.store.create_job(&candidate).map_err(store_error)? {
                    job = Some(candidate);
                    break;
                }
            }
            let job = job.ok_or_else(|| LaunchError::Internal("could not find a free job id".into()))?;
            shared.store.flush().await.map_err(store_error)?;
            let mut sent = Vec::new();
            for target in job.targets.iter().filter(|t| t.dispatched) {
                if send_command(&shared, &job, &target.host) {
                    sent.push(target.host.clone());
                }
            }
            info!(job = %job.id, app = %job.app, version = %job.version, by = %job.requested_by, hosts = ?hosts, sent = ?sent, "job created");
            Ok(job)
        })
        .await
        .map_err(|e| LaunchError::Internal(format!("job task failed: {e}")))?
    }
}

/// The host whose catalog holds the newest backup (with a copy left) of a target.
pub fn newest_holder(catalogs: &[(String, Vec<Backup>)]) -> Option<String> {
    catalogs
        .iter()
        .flat_map(|(host, table)| table.iter().map(move |b| (host, b)))
        .filter(|(_, b)| b.is_local() || b.is_remote())
        .max_by_key(|(_, b)| (b.started_unix_ms, b.id.clone()))
        .map(|(host, _)| host.clone())
}
