//! Deploys and rollbacks on the controller's side, over real mTLS: a real controller, and
//! scripted agent sessions (real enrolled agent certificates) that receive the commands and
//! answer with the events of `drover_model::jobevent`. Proves dispatch, resending until
//! `job.started` (across reconnects and a controller restart), targets one after another with
//! a failure skipping the rest, WatchJob's replay + live + final job, release flags, the
//! refusals, and the exit codes of the real `drover` binary.

use std::path::PathBuf;
use std::time::Duration;

use drover_e2e::{
    ScriptedAgent, TestController, drover_cli, eventually, fast_controller_config, init,
    operator_client,
};
use drover_identity::files::Bundle;
use drover_model::jobevent::{self, CODE_LOCKED, JobResult, Release, ReleaseState, field, status};
use drover_proto::v1;
use tonic::Code;

const APP: &str = "api";

/// A controller with the example app applied and agents enrolled (not connected).
struct Fleet {
    controller: TestController,
    addr: String,
    bundles: Vec<(String, Bundle)>,
    tmp: tempfile::TempDir,
}

impl Fleet {
    async fn start(hosts: &[(&str, &[(&str, &str)])]) -> Fleet {
        init();
        let tmp = tempfile::tempdir().unwrap();
        let controller =
            TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
        let addr = controller.addr.to_string();
        controller.apply_example_app().await;
        // The example spec's pre-deploy backup target (deploys are refused without it).
        controller
            .admin()
            .apply_backup_target(v1::ApplyBackupTargetRequest {
                target_toml:
                    "name = \"api-db\"\n[postgres]\ncontainer = \"api-db\"\ndatabases = [\"api\"]\n"
                        .into(),
                source: "api-db.toml".into(),
            })
            .await
            .unwrap();
        let mut bundles = Vec::new();
        for (host, labels) in hosts {
            let dir = tmp.path().join(host);
            let bundle = ScriptedAgent::enroll(&controller, host, labels, &dir).await;
            bundles.push((host.to_string(), bundle));
        }
        Fleet {
            controller,
            addr,
            bundles,
            tmp,
        }
    }

    fn bundle(&self, host: &str) -> &Bundle {
        &self.bundles.iter().find(|(h, _)| h == host).unwrap().1
    }

    async fn connect(&self, host: &str) -> ScriptedAgent {
        ScriptedAgent::connect(&self.addr, self.bundle(host), host).await
    }

    fn admin_dir(&self) -> PathBuf {
        self.controller.admin_dir()
    }

    /// Runs the real `drover` with the admin identity, off the runtime's threads.
    async fn drover(&self, args: &[&str]) -> std::process::Output {
        let (addr, dir) = (self.addr.clone(), self.admin_dir());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            drover_cli(
                &addr,
                &dir,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap()
    }

    fn spawn_drover(&self, args: &[&str]) -> tokio::task::JoinHandle<std::process::Output> {
        let (addr, dir) = (self.addr.clone(), self.admin_dir());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            drover_cli(
                &addr,
                &dir,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
    }

    async fn job(&self, id: &str) -> v1::JobInfo {
        self.controller
            .admin()
            .get_job(v1::GetJobRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }
}

fn deploy(version: &str, hosts: &[&str]) -> v1::DeployRequest {
    v1::DeployRequest {
        app: APP.into(),
        version: version.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ..Default::default()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn target_states(job: &v1::JobInfo) -> Vec<(&str, &str)> {
    job.targets
        .iter()
        .map(|t| (t.host.as_str(), t.state.as_str()))
        .collect()
}

/// The agent's side of a deploy that goes well.
async fn run_ok(agent: &mut ScriptedAgent, job_id: &str, version: &str) {
    agent
        .event(
            job_id,
            jobevent::STARTED,
            &format!("deploy {APP} {version}"),
            &[(field::APP, APP), (field::VERSION, version)],
        )
        .await;
    for step in ["validate", "image", "switch"] {
        agent
            .event(
                job_id,
                jobevent::STEP,
                "",
                &[(field::STEP, step), (field::STATUS, status::STARTED)],
            )
            .await;
        agent
            .event(
                job_id,
                jobevent::PROGRESS,
                &format!("{step} going"),
                &[(field::STEP, step)],
            )
            .await;
        agent
            .event(
                job_id,
                jobevent::STEP,
                "",
                &[
                    (field::STEP, step),
                    (field::STATUS, status::DONE),
                    (field::DURATION_MS, "1250"),
                ],
            )
            .await;
    }
    agent
        .event(
            job_id,
            jobevent::FINISHED,
            &format!("{APP} {version} live"),
            &[(field::RESULT, "succeeded"), (field::LIVE_VERSION, version)],
        )
        .await;
}

/// The agent's side of a deploy that fails at the health step.
async fn run_failing(agent: &mut ScriptedAgent, job_id: &str) {
    agent.event(job_id, jobevent::STARTED, "", &[]).await;
    agent
        .event(
            job_id,
            jobevent::STEP,
            "",
            &[(field::STEP, "health"), (field::STATUS, status::STARTED)],
        )
        .await;
    agent
        .event(
            job_id,
            jobevent::STEP,
            "",
            &[
                (field::STEP, "health"),
                (field::STATUS, status::FAILED),
                (field::DURATION_MS, "5000"),
            ],
        )
        .await;
    agent
        .event(
            job_id,
            jobevent::FINISHED,
            "deploy failed",
            &[
                (field::RESULT, "failed"),
                (field::STEP, "health"),
                (field::ERROR, "GET /healthz answered 500 five times"),
                (field::LOGS, "booting\npanic: no database"),
            ],
        )
        .await;
}

fn release(id: &str, version: &str, started: i64, state: ReleaseState, ok: bool) -> Release {
    Release {
        id: id.into(),
        app: APP.into(),
        version: version.into(),
        image: format!("ghcr.example/acme/api:{version}"),
        image_id: format!("sha256:{id}0123456789abcdef"),
        job_id: id.into(),
        requested_by: "alice".into(),
        started_unix_ms: started,
        finished_unix_ms: started + 4_000,
        result: Some(if ok {
            JobResult::Succeeded
        } else {
            JobResult::Failed
        }),
        state,
        spec_toml: String::new(),
        containers: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_are_dispatched_in_turn_resent_until_started_and_a_failure_skips_the_rest() {
    let web: &[(&str, &str)] = &[("role", "web")];
    let fleet = Fleet::start(&[("web-1", web), ("web-2", web), ("db-1", &[("role", "db")])]).await;
    let mut web1 = fleet.connect("web-1").await;
    let mut web2 = fleet.connect("web-2").await;

    let job = fleet
        .controller
        .admin()
        .deploy(v1::DeployRequest {
            app: APP.into(),
            version: "v1.4.2".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(job.id.starts_with("deploy-"), "{}", job.id);
    assert_eq!(
        (
            job.kind.as_str(),
            job.state.as_str(),
            job.requested_by.as_str()
        ),
        ("deploy", "queued", "admin")
    );
    assert_eq!(
        target_states(&job),
        vec![("web-1", "queued"), ("web-2", "queued")]
    );

    // The first target's command, with everything the agent needs.
    let cmd = web1.next_command().await;
    assert_eq!(
        (cmd.job_id.as_str(), cmd.kind.as_str()),
        (job.id.as_str(), "deploy")
    );
    let Some(v1::command::Job::Deploy(d)) = cmd.job else {
        panic!("a deploy command: {cmd:?}");
    };
    assert_eq!((d.app.as_str(), d.version.as_str()), (APP, "v1.4.2"));
    assert_eq!((d.spec_revision, d.requested_by.as_str()), (1, "admin"));
    assert!(d.spec_toml.contains("name = \"api\"") && !d.skip_backup && !d.wait_lock);
    // Not the second target's turn yet.
    web2.assert_no_command().await;

    // Resent on every new session until the agent says job.started...
    web1.close();
    let mut web1 = fleet.connect("web-1").await;
    assert_eq!(web1.next_command().await.job_id, job.id);
    web1.event(&job.id, jobevent::STARTED, "", &[]).await;
    web1.close();
    // ...and not after.
    let mut web1 = fleet.connect("web-1").await;
    web1.assert_no_command().await;
    assert_eq!(fleet.job(&job.id).await.state, "running");

    // web-1 succeeds: web-2's turn.
    run_ok(&mut web1, &job.id, "v1.4.2").await;
    let info = fleet.job(&job.id).await;
    assert_eq!(
        target_states(&info),
        vec![("web-1", "succeeded"), ("web-2", "queued")]
    );
    assert_eq!(web2.next_command().await.job_id, job.id);

    // The job survives a controller restart: web-2's command comes again on its new session.
    web1.close();
    web2.close();
    let Fleet {
        controller,
        addr,
        bundles,
        tmp,
    } = fleet;
    let config = drover_controller::ControllerConfig {
        listen: addr.parse().unwrap(),
        ..fast_controller_config(&tmp.path().join("ctl"))
    };
    controller.stop().await;
    let controller = TestController::start(config).await;
    let fleet = Fleet {
        controller,
        addr,
        bundles,
        tmp,
    };
    let mut web1 = fleet.connect("web-1").await;
    let mut web2 = fleet.connect("web-2").await;
    web1.assert_no_command().await;
    assert_eq!(web2.next_command().await.job_id, job.id);
    run_failing(&mut web2, &job.id).await;
    let info = fleet.job(&job.id).await;
    assert_eq!(info.state, "failed");
    assert!(info.finished_unix_ms >= info.created_unix_ms);
    let t = &info.targets[1];
    assert_eq!(
        (t.state.as_str(), t.step.as_str(), t.message.as_str()),
        ("failed", "health", "GET /healthz answered 500 five times")
    );
    assert_eq!(t.logs, "booting\npanic: no database");

    // A failure on the first host skips the second, which never hears of the job.
    let job2 = fleet
        .controller
        .admin()
        .deploy(deploy("v1.4.3", &["web-1", "web-2"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(web1.next_command().await.job_id, job2.id);
    run_failing(&mut web1, &job2.id).await;
    let info = fleet.job(&job2.id).await;
    assert_eq!(info.state, "failed");
    assert_eq!(
        target_states(&info),
        vec![("web-1", "failed"), ("web-2", "skipped")]
    );
    web2.assert_no_command().await;
    web2.close();
    let mut web2 = fleet.connect("web-2").await;
    web2.assert_no_command().await;

    // Newest first, filtered by app.
    let jobs = fleet
        .controller
        .admin()
        .list_jobs(v1::ListJobsRequest {
            app: APP.into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, vec![job2.id.as_str(), job.id.as_str()]);
    let none = fleet
        .controller
        .admin()
        .list_jobs(v1::ListJobsRequest {
            app: "other".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(none.is_empty());
    web1.close();
    web2.close();
    fleet.controller.stop().await;
}

/// `CancelJob` as the admin.
async fn cancel(
    controller: &TestController,
    id: &str,
) -> Result<v1::CancelJobResponse, tonic::Status> {
    controller
        .admin()
        .cancel_job(v1::CancelJobRequest { id: id.into() })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_stored_sent_to_the_running_host_until_it_ends_and_the_rest_never_run() {
    let web: &[(&str, &str)] = &[("role", "web")];
    let fleet = Fleet::start(&[("web-1", web), ("web-2", web)]).await;
    let mut web1 = fleet.connect("web-1").await;
    let mut web2 = fleet.connect("web-2").await;
    let job = fleet
        .controller
        .admin()
        .deploy(v1::DeployRequest {
            app: APP.into(),
            version: "v1.4.2".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(web1.next_command().await.job_id, job.id);
    web1.event(&job.id, jobevent::STARTED, "", &[]).await;

    let answer = cancel(&fleet.controller, &job.id).await.unwrap();
    assert!(!answer.already_finished);
    assert_eq!(answer.hosts_told, ["web-1"]);
    let info = answer.job.unwrap();
    assert_eq!(
        target_states(&info),
        vec![("web-1", "running"), ("web-2", "cancelled")],
        "web-2's turn never comes"
    );
    assert_eq!(info.cancel_requested_by, "admin");
    let sent = web1.next_cancel().await;
    assert_eq!(
        (sent.job_id.as_str(), sent.requested_by.as_str()),
        (job.id.as_str(), "admin")
    );
    web2.assert_no_command().await;

    // Durable: after a controller restart, web-1's new session gets the Cancel again (and not
    // the command).
    web1.close();
    web2.close();
    let Fleet {
        controller,
        addr,
        bundles,
        tmp,
    } = fleet;
    let config = drover_controller::ControllerConfig {
        listen: addr.parse().unwrap(),
        ..fast_controller_config(&tmp.path().join("ctl"))
    };
    controller.stop().await;
    let controller = TestController::start(config).await;
    let fleet = Fleet {
        controller,
        addr,
        bundles,
        tmp,
    };
    let mut web1 = fleet.connect("web-1").await;
    assert_eq!(web1.next_cancel().await.job_id, job.id);
    web1.assert_no_command().await;

    // The agent stops and says so: the job is cancelled; no more Cancel after that.
    web1.event(
        &job.id,
        jobevent::FINISHED,
        "cancelled",
        &[(field::RESULT, "cancelled"), (field::STEP, "health")],
    )
    .await;
    let info = fleet.job(&job.id).await;
    assert_eq!(info.state, "cancelled");
    assert!(info.finished_unix_ms > 0);
    web1.close();
    let mut web1 = fleet.connect("web-1").await;
    web1.assert_no_command().await;
    assert!(web1.cancels_seen() == 0, "no Cancel once the part ended");

    // A finished job is left alone; an unknown one is NotFound.
    let again = cancel(&fleet.controller, &job.id).await.unwrap();
    assert!(again.already_finished);
    assert_eq!(again.job.unwrap().state, "cancelled");
    let err = cancel(&fleet.controller, "deploy-20000101-000000-0000")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("unknown job"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_the_stored_events_then_follows_live_and_ends_with_the_finished_job() {
    let fleet = Fleet::start(&[("web-1", &[])]).await;
    let mut web1 = fleet.connect("web-1").await;
    // The only host: chosen without naming it.
    let job = fleet
        .controller
        .admin()
        .deploy(deploy("v1.4.2", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(target_states(&job), vec![("web-1", "queued")]);
    web1.next_command().await;
    web1.event(&job.id, jobevent::STARTED, "took it", &[]).await;
    web1.event(
        &job.id,
        jobevent::STEP,
        "",
        &[(field::STEP, "image"), (field::STATUS, status::STARTED)],
    )
    .await;

    let mut stream = fleet
        .controller
        .admin()
        .watch_job(v1::WatchJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a watch message within 10s")
            .expect("watch stream")
    };
    // The job first, then what is stored.
    let first = next().await.unwrap();
    assert_eq!(first.job.unwrap().state, "running");
    let e = next().await.unwrap().event.unwrap();
    assert_eq!(
        (e.kind.as_str(), e.host.as_str()),
        (jobevent::STARTED, "web-1")
    );
    let e = next().await.unwrap().event.unwrap();
    assert_eq!(e.kind, jobevent::STEP);
    let stored_seq = e.seq;

    // Live: each event once, in order, then the finished job, then the end.
    run_ok(&mut web1, &job.id, "v1.4.2").await;
    let mut seqs = Vec::new();
    let mut last_job = None;
    while let Some(msg) = next().await {
        if let Some(e) = msg.event {
            seqs.push(e.seq);
        }
        if let Some(j) = msg.job {
            last_job = Some(j);
        }
    }
    let finished = last_job.expect("a final job");
    assert_eq!(finished.state, "succeeded");
    assert!(finished.finished_unix_ms > 0);
    // run_ok sends started (a duplicate start is ignored by the job, but is an event) + 9 + 1.
    let expected: Vec<u64> = (stored_seq + 1..=stored_seq + 11).collect();
    assert_eq!(seqs, expected, "every live event once, in order");

    // A finished job replays whole and ends.
    let mut stream = fleet
        .controller
        .admin()
        .watch_job(v1::WatchJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    let mut jobs = 0;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        if let Some(e) = msg.event {
            kinds.push(e.kind);
        }
        jobs += usize::from(msg.job.is_some());
    }
    assert_eq!(kinds.len(), 13);
    assert_eq!(kinds.last().unwrap(), jobevent::FINISHED);
    assert_eq!(jobs, 2, "the job first and last");

    // An unknown job is named.
    let status = fleet
        .controller
        .admin()
        .watch_job(v1::WatchJobRequest {
            id: "deploy-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("drover jobs"),
        "{}",
        status.message()
    );
    web1.close();
    fleet.controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_tables_give_the_live_release_the_rollback_target_and_the_default_hosts() {
    let fleet = Fleet::start(&[("web-1", &[]), ("web-2", &[])]).await;
    let mut web1 = fleet.connect("web-1").await;
    let mut web2 = fleet.connect("web-2").await;
    let mut admin = fleet.controller.admin();

    // Live nowhere, two hosts: the operator must say where.
    let status = admin.deploy(deploy("v1.2.0", &[])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("name the hosts: --host NAME or --label k=v"),
        "{}",
        status.message()
    );
    let status = admin
        .rollback(v1::RollbackRequest {
            app: APP.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let table = vec![
        release("r1", "v1.0.0", 1_000, ReleaseState::Kept, true),
        release("r2", "v1.1.0", 2_000, ReleaseState::Failed, false),
        release("r3", "v1.2.0", 3_000, ReleaseState::Live, true),
    ];
    web1.send_releases(APP, &table).await;
    let releases = admin
        .list_releases(v1::ListReleasesRequest {
            app: APP.into(),
            host: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .releases;
    let rows: Vec<(&str, &str, &str, bool, bool)> = releases
        .iter()
        .map(|r| {
            (
                r.host.as_str(),
                r.version.as_str(),
                r.state.as_str(),
                r.live,
                r.rollback_target,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("web-1", "v1.2.0", "live", true, false),
            ("web-1", "v1.1.0", "failed", false, false),
            ("web-1", "v1.0.0", "kept", false, true),
        ]
    );
    assert_eq!(releases[0].result, "succeeded");
    assert_eq!(releases[0].digest, "sha256:r30123456789abcdef");
    assert_eq!(releases[0].deployed_by, "alice");
    let status = admin
        .list_releases(v1::ListReleasesRequest {
            app: "nope".into(),
            host: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let only_web2 = admin
        .list_releases(v1::ListReleasesRequest {
            app: APP.into(),
            host: "web-2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .releases;
    assert!(only_web2.is_empty());

    // A kept release that does not exist, or no earlier release at all: refused, saying so.
    let status = admin
        .rollback(v1::RollbackRequest {
            app: APP.into(),
            to_version: "v1.1.0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("no kept release of version v1.1.0 of api on web-1"),
        "{}",
        status.message()
    );
    let status = admin
        .rollback(v1::RollbackRequest {
            app: APP.into(),
            hosts: vec!["web-2".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "no earlier release of api on web-2 to roll back to (drover releases api)"
    );

    // Without hosts, a rollback goes where the app is live.
    let job = admin
        .rollback(v1::RollbackRequest {
            app: APP.into(),
            wait_lock: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((job.kind.as_str(), job.version.as_str()), ("rollback", ""));
    assert_eq!(target_states(&job), vec![("web-1", "queued")]);
    let cmd = web1.next_command().await;
    assert_eq!(cmd.kind, "rollback");
    let Some(v1::command::Job::Rollback(r)) = cmd.job else {
        panic!("a rollback command: {cmd:?}");
    };
    assert_eq!(
        (
            r.app.as_str(),
            r.to_version.as_str(),
            r.wait_lock,
            r.requested_by.as_str()
        ),
        (APP, "", true, "admin")
    );
    web2.assert_no_command().await;

    // And so does a deploy.
    let job = admin
        .deploy(deploy("v1.3.0", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(target_states(&job), vec![("web-1", "queued")]);
    web1.close();
    web2.close();
    fleet.controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_are_refused_clearly() {
    let fleet = Fleet::start(&[("web-1", &[]), ("db-1", &[])]).await;
    let web1 = fleet.connect("web-1").await;
    let mut admin = fleet.controller.admin();
    let refused =
        async |admin: &mut drover_e2e::OperatorServiceClient<drover_e2e::Channel>,
               req: v1::DeployRequest| { admin.deploy(req).await.unwrap_err() };

    // An agent that is not connected: named, with its state and when it was last seen.
    let s = refused(&mut admin, deploy("v1.4.2", &["web-1", "db-1"])).await;
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("the deploy needs a connected agent")
            && s.message().contains("db-1 is down, last seen never"),
        "{}",
        s.message()
    );
    let s = refused(&mut admin, deploy("v1.4.2", &["web-9"])).await;
    assert_eq!(s.code(), Code::NotFound);
    assert!(
        s.message().contains("unknown host web-9"),
        "{}",
        s.message()
    );
    let s = refused(
        &mut admin,
        v1::DeployRequest {
            app: "nope".into(),
            ..deploy("v1.4.2", &["web-1"])
        },
    )
    .await;
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("unknown app nope"), "{}", s.message());
    let s = refused(&mut admin, deploy("latest", &["web-1"])).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("\"latest\" does not match"),
        "{}",
        s.message()
    );

    // A viewer may read jobs but not deploy.
    let viewer = fleet.controller.viewer("vic").await;
    let mut viewer_api = operator_client(&fleet.addr, &viewer);
    let s = viewer_api
        .deploy(deploy("v1.4.2", &["web-1"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("read-only"), "{}", s.message());
    let s = viewer_api
        .rollback(v1::RollbackRequest {
            app: APP.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    viewer_api
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .expect("a viewer lists jobs");
    let dir = fleet.tmp.path().join("viewer");
    viewer.save(&dir).unwrap();
    let (addr, d) = (fleet.addr.clone(), dir.clone());
    let out = tokio::task::spawn_blocking(move || {
        drover_cli(&addr, &d, &["deploy", APP, "v1.4.2", "--host", "web-1"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));

    // Through the CLI: 65 for a refused request, 68 for an unknown name; nothing was created.
    let out = fleet
        .drover(&["deploy", APP, "v1.4.2", "--host", "db-1"])
        .await;
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    let out = fleet.drover(&["deploy", "nope", "v1.4.2"]).await;
    assert_eq!(out.status.code(), Some(68), "{}", text(&out.stderr));
    let out = fleet.drover(&["jobs", "--json"]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    web1.close();
    fleet.controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drover_binary_follows_jobs_and_exits_by_their_ending() {
    let fleet = Fleet::start(&[("web-1", &[])]).await;
    let mut web1 = fleet.connect("web-1").await;

    // Succeeded: 0, plain lines (stdout is not a terminal).
    let cli = fleet.spawn_drover(&["deploy", APP, "v1.4.2", "--host", "web-1"]);
    let cmd = web1.next_command().await;
    run_ok(&mut web1, &cmd.job_id, "v1.4.2").await;
    let out = cli.await.unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let image_done = lines
        .iter()
        .find(|l| l.contains(" web-1 image done "))
        .unwrap_or_else(|| panic!("no image step line: {stdout}"));
    let words: Vec<&str> = image_done.split(' ').collect();
    assert_eq!(words[0].len(), 8, "HH:MM:SS first: {image_done}");
    assert_eq!(&words[1..], ["web-1", "image", "done", "1.2s"]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("web-1 switch progress switch going")),
        "{stdout}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .contains(&format!("succeeded job {}", cmd.job_id)),
        "{stdout}"
    );

    // Failed: 1, with the step, the error and the log tail.
    let cli = fleet.spawn_drover(&["deploy", APP, "v1.4.3", "--host", "web-1"]);
    let cmd = web1.next_command().await;
    run_failing(&mut web1, &cmd.job_id).await;
    let out = cli.await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "deploy of api v1.4.3 failed on web-1 at step health: GET /healthz answered 500 five times"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("  panic: no database"), "{stderr}");
    let failed_job = cmd.job_id.clone();

    // Locked: 75, saying who holds it and that --wait exists.
    let cli = fleet.spawn_drover(&["deploy", APP, "v1.4.4", "--host", "web-1", "--json"]);
    let cmd = web1.next_command().await;
    web1.event(&cmd.job_id, jobevent::STARTED, "", &[]).await;
    web1.event(
        &cmd.job_id,
        jobevent::FINISHED,
        "",
        &[
            (field::RESULT, "failed"),
            (field::STEP, "lock"),
            (field::CODE, CODE_LOCKED),
            (
                field::ERROR,
                "held by job deploy-20261123-140000-0001 (alice) since 14:00:02",
            ),
        ],
    )
    .await;
    let out = cli.await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("(alice) since 14:00:02") && stderr.contains("use --wait"),
        "{stderr}"
    );
    // --json: one object per line, events then the finished job.
    let objects: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    assert_eq!(objects.len(), 3, "{}", text(&out.stdout));
    assert_eq!(objects[0]["type"], "event");
    assert_eq!(objects[1]["fields"]["code"], "locked");
    assert_eq!(objects[2]["type"], "job");
    assert_eq!(objects[2]["targets"][0]["code"], "locked");

    // --wait is sent as wait_lock; --detach prints the job id and returns.
    let out = fleet
        .drover(&[
            "deploy",
            APP,
            "v1.4.4",
            "--host",
            "web-1",
            "--wait",
            "--detach",
            "--skip-backup",
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let cmd = web1.next_command().await;
    assert_eq!(cmd.job_id, id);
    let Some(v1::command::Job::Deploy(d)) = cmd.job else {
        panic!("a deploy command");
    };
    assert!(d.wait_lock && d.skip_backup);

    // drover watch of a finished job: the same exit code as when it ran.
    let out = fleet.drover(&["watch", &failed_job]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    // Listings are arrays of objects.
    let out = fleet.drover(&["jobs", "--json", "--limit", "10"]).await;
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["queued", "failed", "failed", "succeeded"]);
    let out = fleet.drover(&["jobs"]).await;
    assert!(
        text(&out.stdout).contains(&failed_job),
        "{}",
        text(&out.stdout)
    );
    let table = vec![
        release("r1", "v1.4.2", 1_000, ReleaseState::Kept, true),
        release("r2", "v1.4.3", 2_000, ReleaseState::Live, true),
    ];
    web1.send_releases(APP, &table).await;
    let out = fleet.drover(&["releases", APP, "--json"]).await;
    let releases: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(releases[0]["version"], "v1.4.3");
    assert_eq!(releases[0]["live"], true);
    assert_eq!(releases[1]["rollback_target"], true);
    let out = fleet.drover(&["releases", APP]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("LIVE")
            && stdout.contains("<- rollback target")
            && stdout.contains("r20123456789"),
        "{stdout}"
    );

    // The controller goes away mid-watch: 69, and how to pick the job up again.
    // The release driver also follows job updates: the watch is one more.
    let shared = fleet.controller.shared.clone();
    let before = shared.job_updates.receiver_count();
    let cli = fleet.spawn_drover(&["watch", &id]);
    eventually("drover watch attached", Duration::from_secs(10), || {
        let shared = shared.clone();
        async move { (shared.job_updates.receiver_count() > before).then_some(()) }
    })
    .await;
    web1.close();
    fleet.controller.stop().await;
    let out = cli.await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains(&format!("`drover watch {id}`")), "{stderr}");
}
