//! Job kinds and job commands: what an agent is asked to do, the one type the controller
//! stores and sends and the agent receives (each side converts it to and from the wire in its
//! `convert.rs`).

use serde::{Deserialize, Serialize};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Deploy,
    Rollback,
    Backup,
    Restore,
    Prune,
    /// Validation of a target's newest backup.
    Verify,
    /// An app's image made present on the host (a fleet release pulls before its first wave).
    Pull,
    /// The previous release a fleet release's deploy kept running is stopped (kept for
    /// rollback as after any deploy).
    Retire,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Deploy => "deploy",
            JobKind::Rollback => "rollback",
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Prune => "prune",
            JobKind::Verify => "verify",
            JobKind::Pull => "pull",
            JobKind::Retire => "retire",
        }
    }

    /// Backup, restore, prune and verify jobs work on a backup target (named in the job's
    /// `app`).
    pub fn is_backup(self) -> bool {
        matches!(
            self,
            JobKind::Backup | JobKind::Restore | JobKind::Prune | JobKind::Verify
        )
    }
}

/// What an agent is asked to do: the controller stores it in the job and sends it in each
/// target's `Command`; the agent reads it back from that `Command`. One type on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobCommand {
    Deploy {
        app: String,
        version: String,
        spec_toml: String,
        spec_revision: u64,
        skip_backup: bool,
        wait_lock: bool,
        requested_by: String,
        /// The spec's `pre_deploy_backup` target (TOML), when it names one.
        #[serde(default)]
        backup_target_toml: String,
        /// Skip the spec's migration: a fleet release runs it on its first host only.
        #[serde(default)]
        skip_migration: bool,
        /// Leave the previous web container running after the switch, not routed: a fleet
        /// release's revert is then a switch; the release retires it when it ends.
        #[serde(default)]
        keep_previous: bool,
    },
    Rollback {
        app: String,
        /// Empty: the release live before the current one.
        to_version: String,
        wait_lock: bool,
        requested_by: String,
    },
    Backup {
        target: String,
        target_toml: String,
        trigger: String,
        requested_by: String,
    },
    Restore {
        target: String,
        target_toml: String,
        backup_id: String,
        part: String,
        to_database: String,
        to_dir: String,
        confirmed: bool,
        identity_file: String,
        requested_by: String,
    },
    Prune {
        target: String,
        target_toml: String,
        dry_run: bool,
        requested_by: String,
    },
    Verify {
        target: String,
        target_toml: String,
        requested_by: String,
        /// The age identity file on the host that decrypts the backup (empty: the target's).
        #[serde(default)]
        identity_file: String,
    },
    Pull {
        app: String,
        version: String,
        spec_toml: String,
        requested_by: String,
    },
    Retire {
        app: String,
        requested_by: String,
    },
}

impl JobCommand {
    pub fn kind(&self) -> JobKind {
        match self {
            JobCommand::Deploy { .. } => JobKind::Deploy,
            JobCommand::Rollback { .. } => JobKind::Rollback,
            JobCommand::Backup { .. } => JobKind::Backup,
            JobCommand::Restore { .. } => JobKind::Restore,
            JobCommand::Prune { .. } => JobKind::Prune,
            JobCommand::Verify { .. } => JobKind::Verify,
            JobCommand::Pull { .. } => JobKind::Pull,
            JobCommand::Retire { .. } => JobKind::Retire,
        }
    }

    /// What the job is about: the app of a deploy or rollback, else the backup target.
    pub fn subject(&self) -> &str {
        match self {
            JobCommand::Deploy { app, .. }
            | JobCommand::Rollback { app, .. }
            | JobCommand::Pull { app, .. }
            | JobCommand::Retire { app, .. } => app,
            JobCommand::Backup { target, .. }
            | JobCommand::Restore { target, .. }
            | JobCommand::Prune { target, .. }
            | JobCommand::Verify { target, .. } => target,
        }
    }

    /// The version a job names: a deploy's, a rollback's target (empty: the previous
    /// release), a restore's backup id; empty for the other kinds.
    pub fn version(&self) -> &str {
        match self {
            JobCommand::Deploy { version, .. } | JobCommand::Pull { version, .. } => version,
            JobCommand::Rollback { to_version, .. } => to_version,
            JobCommand::Restore { backup_id, .. } => backup_id,
            JobCommand::Backup { .. }
            | JobCommand::Prune { .. }
            | JobCommand::Verify { .. }
            | JobCommand::Retire { .. } => "",
        }
    }

    pub fn requested_by(&self) -> &str {
        match self {
            JobCommand::Deploy { requested_by, .. }
            | JobCommand::Rollback { requested_by, .. }
            | JobCommand::Backup { requested_by, .. }
            | JobCommand::Restore { requested_by, .. }
            | JobCommand::Prune { requested_by, .. }
            | JobCommand::Verify { requested_by, .. }
            | JobCommand::Pull { requested_by, .. }
            | JobCommand::Retire { requested_by, .. } => requested_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verify_stored_before_identity_files_still_reads() {
        let stored =
            r#"{"verify":{"target":"db","target_toml":"name = \"db\"\n","requested_by":"alice"}}"#;
        let command: JobCommand = serde_json::from_str(stored).unwrap();
        assert_eq!(
            command,
            JobCommand::Verify {
                target: "db".into(),
                target_toml: "name = \"db\"\n".into(),
                requested_by: "alice".into(),
                identity_file: String::new(),
            }
        );
        assert_eq!(command.kind(), JobKind::Verify);
        assert_eq!((command.subject(), command.version()), ("db", ""));
    }
}
