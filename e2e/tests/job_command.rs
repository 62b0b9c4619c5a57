//! The one `JobCommand` type crosses the wire intact: every kind, with every field set, goes
//! through the controller's `command_to_proto` and comes back equal from
//! `drover_proto::command::from_proto`, which the agent reads commands with, so a field added
//! to one side and forgotten on the other fails here.

use drover_model::job::JobCommand;

fn every_kind() -> Vec<JobCommand> {
    let s = |v: &str| v.to_string();
    vec![
        JobCommand::Deploy {
            app: s("api"),
            version: s("v1.2.3"),
            spec_toml: s("name = \"api\"\n"),
            spec_revision: 7,
            skip_backup: true,
            wait_lock: true,
            requested_by: s("alice"),
            backup_target_toml: s("name = \"api-db\"\n"),
            skip_migration: true,
            keep_previous: true,
        },
        JobCommand::Rollback {
            app: s("api"),
            to_version: s("v1.2.2"),
            wait_lock: true,
            requested_by: s("bob"),
        },
        JobCommand::Backup {
            target: s("api-db"),
            target_toml: s("name = \"api-db\"\n"),
            trigger: s("scheduled"),
            requested_by: s("schedule:api-db-backup"),
        },
        JobCommand::Restore {
            target: s("api-db"),
            target_toml: s("name = \"api-db\"\n"),
            backup_id: s("20261202T010203Z-abcd"),
            part: s("shop"),
            to_database: s("shop_restored"),
            to_dir: s(""),
            confirmed: true,
            identity_file: s("/etc/drover/age.key"),
            requested_by: s("alice"),
        },
        JobCommand::Prune {
            target: s("api-db"),
            target_toml: s("name = \"api-db\"\n"),
            dry_run: true,
            requested_by: s("alice"),
        },
        JobCommand::Verify {
            target: s("api-db"),
            target_toml: s("name = \"api-db\"\n"),
            requested_by: s("schedule:api-db-verify"),
            identity_file: s("/etc/drover/age.key"),
        },
        JobCommand::Pull {
            app: s("api"),
            version: s("v1.4.2"),
            spec_toml: s("name = \"api\"\n"),
            requested_by: s("alice (release release-1)"),
        },
        JobCommand::Retire {
            app: s("api"),
            requested_by: s("alice (release release-1)"),
        },
    ]
}

#[test]
fn every_job_command_crosses_the_wire_unchanged() {
    for command in every_kind() {
        let job = drover_controller::jobs::JobRecord::new(
            "j-1".into(),
            1_000,
            command.clone(),
            &["web-1".to_string()],
        );
        let wire = drover_controller::convert::command_to_proto(&job);
        assert_eq!(wire.job_id, "j-1");
        assert_eq!(wire.kind, command.kind().as_str());
        let back = drover_proto::command::from_proto(&wire);
        assert_eq!(back.as_ref(), Some(&command), "{command:?}");
        let record = drover_agent::convert::job_from_command(&wire, 2_000).unwrap();
        assert_eq!(
            (
                record.id.as_str(),
                record.kind,
                record.app.as_str(),
                record.version.as_str(),
                record.requested_by.as_str(),
            ),
            (
                "j-1",
                command.kind(),
                command.subject(),
                command.version(),
                command.requested_by(),
            )
        );
        assert_eq!(record.accepted_unix_ms, 2_000);
    }
}

#[test]
fn a_command_without_a_job_is_not_a_job() {
    let wire = drover_proto::v1::Command {
        job_id: "j-2".into(),
        ..Default::default()
    };
    assert_eq!(drover_proto::command::from_proto(&wire), None);
}
