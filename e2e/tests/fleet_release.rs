//! Fleet releases on the controller's side, over real mTLS: a real controller driving a
//! release across scripted agent sessions (real enrolled agent certificates) that receive the
//! deploy and rollback commands and answer with job events. Proves waves gated on
//! `min_healthy` (the next wave's commands come only after), the migration on the first host
//! only, a failure past the budget reverting every updated host at once, halt without revert,
//! pause, resume and abort recorded with who did them, an offline host timing out, and a
//! controller restart mid-release that resumes it with no host deployed twice; and the real
//! `drover release` command's plan, status and exit codes.

use std::time::Duration;

use drover_controller::config::WebhookConfig;
use drover_controller::scheduler::Scheduler;
use drover_e2e::notify::WebhookReceiver;
use drover_e2e::{
    ScriptedAgent, TestController, drover_cli, eventually, fast_controller_config, init,
};
use drover_identity::files::Bundle;
use drover_model::jobevent::{JobResult, Release, ReleaseState};
use drover_proto::v1;

const APP: &str = "api";

struct Fleet {
    controller: TestController,
    addr: String,
    bundles: Vec<(String, Bundle)>,
    tmp: tempfile::TempDir,
    /// The controller's one webhook: release milestones arrive here as events.
    hook: WebhookReceiver,
}

/// The test controller's config, its webhook at `hook`.
fn config(tmp: &std::path::Path, hook: &WebhookReceiver) -> drover_controller::ControllerConfig {
    let mut config = fast_controller_config(&tmp.join("ctl"));
    config.notify.webhook = vec![WebhookConfig {
        name: Some("ops".into()),
        url: format!("http://{}/ops", hook.addr),
        ..WebhookConfig::default()
    }];
    config
}

fn live(version: &str) -> Release {
    release(version, ReleaseState::Live)
}

fn release(version: &str, state: ReleaseState) -> Release {
    // Newer versions started later (v1.0.0 at 1 s, v2.0.0 at 2 s).
    let started = 1_000 * i64::from(version.as_bytes()[1] - b'0');
    Release {
        id: format!("r-{version}"),
        app: APP.into(),
        version: version.into(),
        image: format!("ghcr.example/acme/api:{version}"),
        image_id: format!("sha256:{version}0123456789abcdef"),
        job_id: format!("deploy-{version}"),
        requested_by: "alice".into(),
        started_unix_ms: started,
        finished_unix_ms: started + 500,
        result: Some(JobResult::Succeeded),
        state,
        spec_toml: String::new(),
        containers: Default::default(),
    }
}

impl Fleet {
    async fn start(hosts: &[&str]) -> Fleet {
        init();
        let tmp = tempfile::tempdir().unwrap();
        let hook = WebhookReceiver::start_ok().await;
        let controller = TestController::start(config(tmp.path(), &hook)).await;
        let addr = controller.addr.to_string();
        // The example app, without keep_previous: these scripted agents answer the commands
        // each test expects, and a retire after each release is not one of them (the real
        // agents of release_agents.rs are retired).
        let example = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/api.toml"),
        )
        .unwrap();
        assert!(example.contains("keep_previous = true"));
        controller
            .admin()
            .apply_app(v1::ApplyAppRequest {
                spec_toml: example.replace("keep_previous = true", "keep_previous = false"),
                source: "api.toml".into(),
            })
            .await
            .unwrap();
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
        for host in hosts {
            let dir = tmp.path().join(host);
            let bundle = ScriptedAgent::enroll(&controller, host, &[("role", "web")], &dir).await;
            bundles.push((host.to_string(), bundle));
        }
        Fleet {
            controller,
            addr,
            bundles,
            tmp,
            hook,
        }
    }

    /// The kinds of the events the webhook got for release `id`, in order.
    async fn events(&self, id: &str, until: &str) -> Vec<String> {
        let key = format!("release:{id}");
        eventually(
            &format!("event {until} of {id}"),
            Duration::from_secs(10),
            || async {
                let kinds: Vec<String> = self
                    .hook
                    .received()
                    .into_iter()
                    .filter(|r| r.body["alert"] == key.as_str() && r.body["status"] == "event")
                    .map(|r| r.body["kind"].as_str().unwrap_or("").to_string())
                    .collect();
                kinds.iter().any(|k| k == until).then_some(kinds)
            },
        )
        .await
    }

    /// Connects `host`, which reports `v1` live.
    async fn connect(&self, host: &str) -> ScriptedAgent {
        let bundle = &self.bundles.iter().find(|(h, _)| h == host).unwrap().1;
        let mut agent = ScriptedAgent::connect(&self.addr, bundle, host).await;
        agent.send_releases(APP, &[live("v1.0.0")]).await;
        agent
    }

    async fn start_release(&self, req: v1::StartReleaseRequest) -> v1::FleetReleaseInfo {
        self.controller
            .admin()
            .start_release(v1::StartReleaseRequest {
                app: APP.into(),
                version: "v2.0.0".into(),
                skip_backup: true,
                ..req
            })
            .await
            .expect("start release")
            .into_inner()
    }

    async fn get(&self, id: &str) -> v1::FleetReleaseInfo {
        self.controller
            .admin()
            .get_release(v1::GetReleaseRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn control(&self, id: &str, control: v1::ReleaseControl) -> v1::FleetReleaseInfo {
        self.controller
            .admin()
            .control_release(v1::ControlReleaseRequest {
                id: id.into(),
                control: control as i32,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn wait_state(&self, id: &str, state: &str) -> v1::FleetReleaseInfo {
        eventually(
            &format!("release {id} {state}"),
            Duration::from_secs(20),
            || async {
                let r = self.get(id).await;
                (r.state == state).then_some(r)
            },
        )
        .await
    }

    /// Runs the real `drover` as the admin, off the runtime's threads.
    async fn drover(&self, args: &[&str]) -> (i32, String, String) {
        let (addr, dir) = (self.addr.clone(), self.controller.admin_dir());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            drover_cli(&addr, &dir, &args)
        })
        .await
        .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn host<'a>(r: &'a v1::FleetReleaseInfo, name: &str) -> &'a v1::FleetReleaseHost {
    r.hosts.iter().find(|h| h.host == name).unwrap()
}

fn states(r: &v1::FleetReleaseInfo) -> Vec<(String, String)> {
    r.hosts
        .iter()
        .map(|h| (h.host.clone(), h.state.clone()))
        .collect()
}

/// The image pull each of `agents` gets first (all at once, before the first wave), answered
/// well.
async fn pulled(agents: &mut [&mut ScriptedAgent]) {
    let mut jobs = Vec::new();
    for agent in agents.iter_mut() {
        jobs.push(next_pull(agent).await);
    }
    for (agent, job) in agents.iter_mut().zip(&jobs) {
        agent.finish_job(job, "succeeded").await;
    }
}

async fn next_pull(agent: &mut ScriptedAgent) -> String {
    let cmd = agent.next_command().await;
    let Some(v1::command::Job::Pull(p)) = cmd.job else {
        panic!("{}: expected a pull, got {cmd:?}", agent.host);
    };
    assert_eq!((p.app.as_str(), p.version.as_str()), (APP, "v2.0.0"));
    assert!(p.spec_toml.contains("image"), "the spec names the image");
    cmd.job_id
}

/// The deploy the controller sends next: (job id, skip_migration).
async fn next_deploy(agent: &mut ScriptedAgent) -> (String, bool) {
    let cmd = agent.next_command().await;
    let Some(v1::command::Job::Deploy(d)) = cmd.job else {
        panic!("{}: expected a deploy, got {cmd:?}", agent.host);
    };
    assert_eq!(d.version, "v2.0.0");
    (cmd.job_id, d.skip_migration)
}

async fn next_rollback(agent: &mut ScriptedAgent) -> (String, String) {
    let cmd = agent.next_command().await;
    let Some(v1::command::Job::Rollback(r)) = cmd.job else {
        panic!("{}: expected a rollback, got {cmd:?}", agent.host);
    };
    (cmd.job_id, r.to_version)
}

/// Ends deploy `job` well, as an agent does: its new release table (v2 live, v1 kept), then
/// `job.finished`.
async fn deployed(agent: &mut ScriptedAgent, job: &str) {
    let table = [
        release("v1.0.0", ReleaseState::Kept),
        release("v2.0.0", ReleaseState::Live),
    ];
    agent.send_releases(APP, &table).await;
    agent.finish_job(job, "succeeded").await;
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_wait_for_min_healthy_and_the_migration_runs_on_the_first_host_only() {
    let fleet = Fleet::start(&["web-1", "web-2", "web-3"]).await;
    let mut a = fleet.connect("web-1").await;
    let mut b = fleet.connect("web-2").await;
    let mut c = fleet.connect("web-3").await;

    // The plan first: `--dry-run` stores and sends nothing.
    let (code, out, err) = fleet
        .drover(&[
            "release",
            APP,
            "v2.0.0",
            "--waves",
            "1,100%",
            "--dry-run",
            "--skip-backup",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wave 1: 1 host(s): web-1"), "{out}");
    assert!(out.contains("wave 2: 2 host(s): web-2, web-3"), "{out}");
    assert!(
        out.contains("migration (if any) runs on web-1 only"),
        "{out}"
    );
    a.assert_no_command().await;

    let min_healthy = Duration::from_secs(2);
    let r = fleet
        .start_release(v1::StartReleaseRequest {
            waves: "1,100%".into(),
            max_parallel: 2,
            min_healthy_ms: ms(min_healthy),
            ..Default::default()
        })
        .await;
    assert_eq!(r.state, "pulling");
    assert_eq!(r.migration_host, "web-1");
    assert_eq!(host(&r, "web-1").before, "v1.0.0");

    // First every host pulls the image, all at once (whatever the waves); no deploy starts
    // before every pull ended well.
    let pulls = [
        next_pull(&mut a).await,
        next_pull(&mut b).await,
        next_pull(&mut c).await,
    ];
    assert_eq!(pulls[2], format!("{}-p2", r.id));
    a.finish_job(&pulls[0], "succeeded").await;
    b.finish_job(&pulls[1], "succeeded").await;
    a.assert_no_command().await;
    let (code, out, err) = fleet.drover(&["release", "status", &r.id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("image pull before wave 1: 2 pulled, 1 pulling, 0 failed"),
        "{out}"
    );
    c.finish_job(&pulls[2], "succeeded").await;

    // Wave 1: web-1 alone, with the migration.
    let (job_a, skip) = next_deploy(&mut a).await;
    assert!(!skip, "the first host runs the migration");
    assert_eq!(job_a, format!("{}-d0", r.id));
    b.assert_no_command().await;
    c.assert_no_command().await;
    deployed(&mut a, &job_a).await;
    let finished_at = std::time::Instant::now();

    // Wave 2 waits for min_healthy after web-1's deploy ended, then both go at once.
    let (job_b, skip_b) = next_deploy(&mut b).await;
    let waited = finished_at.elapsed();
    let (job_c, skip_c) = next_deploy(&mut c).await;
    assert!(
        waited >= min_healthy - Duration::from_millis(300),
        "wave 2 started {waited:?} after wave 1's deploy ended, before min_healthy"
    );
    assert!(skip_b && skip_c, "only the first host runs the migration");
    let mid = fleet.get(&r.id).await;
    assert_eq!(host(&mid, "web-1").state, "passed");
    assert!(mid.migration_ran);
    deployed(&mut b, &job_b).await;
    deployed(&mut c, &job_c).await;

    let done = fleet.wait_state(&r.id, "succeeded").await;
    assert!(done.finished_unix_ms > 0);
    let history: Vec<&str> = done.history.iter().map(|e| e.what.as_str()).collect();
    assert!(history.contains(&"wave 1 of 2 passed"), "{history:?}");
    assert!(
        history.contains(&"succeeded: every wave passed"),
        "{history:?}"
    );
    assert_eq!(done.history[0].by, "admin");
    // Each milestone went to the alert channel as an event, not an alert to resolve.
    assert_eq!(
        fleet.events(&r.id, "release_succeeded").await,
        [
            "release_started",
            "release_wave_passed",
            "release_wave_passed",
            "release_succeeded"
        ]
    );

    // The CLI shows it, in text and as JSON; list has it.
    let (code, out, err) = fleet.drover(&["release", "status", &r.id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("succeeded"), "{out}");
    let (code, out, err) = fleet.drover(&["--json", "release", "list", APP]).await;
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["id"], r.id.as_str());
    assert_eq!(list[0]["migration_ran"], true);
    assert_eq!(list[0]["hosts"].as_array().unwrap().len(), 3);

    // A rollback past the release whose migration ran says so (and runs no down migration).
    let (code, _, err) = fleet
        .drover(&["rollback", APP, "--host", "web-2", "--detach"])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "warning: release {} ran the spec's migration for v2.0.0 (on web-1); rolling web-2 back does not undo it",
            r.id
        )),
        "{err}"
    );

    // One release of an app at a time... and a finished one does not block the next.
    let next = fleet
        .start_release(v1::StartReleaseRequest::default())
        .await;
    let refused = fleet
        .controller
        .admin()
        .start_release(v1::StartReleaseRequest {
            app: APP.into(),
            version: "v3.0.0".into(),
            skip_backup: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains(&next.id), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_past_the_budget_reverts_every_updated_host_at_once() {
    let fleet = Fleet::start(&["web-1", "web-2", "web-3", "web-4"]).await;
    let mut agents = Vec::new();
    for h in ["web-1", "web-2", "web-3", "web-4"] {
        agents.push(fleet.connect(h).await);
    }
    let r = fleet
        .start_release(v1::StartReleaseRequest {
            waves: "1,100%".into(),
            max_parallel: 3,
            min_healthy_set: true,
            ..Default::default()
        })
        .await;
    pulled(&mut agents.iter_mut().collect::<Vec<_>>()).await;
    let (j1, _) = next_deploy(&mut agents[0]).await;
    deployed(&mut agents[0], &j1).await;
    // Wave 2, all three at once: web-2 and web-3 succeed, web-4 fails.
    let (j2, _) = next_deploy(&mut agents[1]).await;
    let (j3, _) = next_deploy(&mut agents[2]).await;
    let (j4, _) = next_deploy(&mut agents[3]).await;
    deployed(&mut agents[1], &j2).await;
    deployed(&mut agents[2], &j3).await;
    agents[3].finish_job(&j4, "failed").await;

    // Every updated host gets its rollback to v1 at once, before any of them ends.
    let mut rollbacks = Vec::new();
    for agent in &mut agents[..3] {
        let (id, to) = next_rollback(agent).await;
        assert_eq!(to, "v1.0.0");
        rollbacks.push(id);
    }
    agents[3].assert_no_command().await;
    let reverting = fleet.get(&r.id).await;
    assert_eq!(reverting.state, "reverting");
    assert_eq!(
        states(&reverting),
        [
            ("web-1".into(), "reverting".into()),
            ("web-2".into(), "reverting".into()),
            ("web-3".into(), "reverting".into()),
            ("web-4".into(), "failed".into()),
        ]
    );
    for (agent, id) in agents.iter_mut().zip(&rollbacks) {
        agent.finish_job(id, "succeeded").await;
    }
    let done = fleet.wait_state(&r.id, "reverted").await;
    assert!(done.why.contains("1 host(s) failed"), "{}", done.why);
    assert_eq!(host(&done, "web-1").state, "reverted");
    assert!(
        done.history.iter().any(|e| e
            .what
            .starts_with("the migration ran with this release; reverting does not undo it")),
        "{:?}",
        done.history
    );
    let events = fleet.events(&r.id, "release_reverted").await;
    assert_eq!(
        events[events.len() - 2..],
        ["release_halted", "release_reverted"]
    );

    // A followed release that reverted exits 3.
    let (code, _, err) = fleet
        .drover(&["release", "status", "--follow", &r.id])
        .await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("reverted"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_without_revert_pause_resume_and_abort_are_recorded() {
    let fleet = Fleet::start(&["web-1", "web-2", "web-3"]).await;
    let mut a = fleet.connect("web-1").await;
    let mut b = fleet.connect("web-2").await;
    let mut c = fleet.connect("web-3").await;
    let r = fleet
        .start_release(v1::StartReleaseRequest {
            waves: "1,2,100%".into(),
            min_healthy_set: true,
            on_failure: "halt".into(),
            ..Default::default()
        })
        .await;
    pulled(&mut [&mut a, &mut b, &mut c]).await;
    let (j1, _) = next_deploy(&mut a).await;
    // Paused while web-1 deploys: its deploy ends and settles, nothing new starts.
    let paused = fleet.control(&r.id, v1::ReleaseControl::Pause).await;
    assert_eq!(paused.state, "paused");
    deployed(&mut a, &j1).await;
    eventually("web-1 passed", Duration::from_secs(10), || async {
        (host(&fleet.get(&r.id).await, "web-1").state == "passed").then_some(())
    })
    .await;
    b.assert_no_command().await;
    let resumed = fleet.control(&r.id, v1::ReleaseControl::Resume).await;
    assert_eq!(resumed.state, "running");
    let (j2, _) = next_deploy(&mut b).await;
    // A failure with on_failure = halt: no rollback, web-3 never starts.
    b.finish_job(&j2, "failed").await;
    let halted = fleet.wait_state(&r.id, "halted").await;
    assert_eq!(host(&halted, "web-1").state, "passed");
    assert_eq!(host(&halted, "web-3").state, "skipped");
    a.assert_no_command().await;
    c.assert_no_command().await;
    // Pausing a halted release is refused; `abort --revert` takes web-1 back.
    let refused = fleet
        .controller
        .admin()
        .control_release(v1::ControlReleaseRequest {
            id: r.id.clone(),
            control: v1::ReleaseControl::Pause as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let (code, _, err) = fleet.drover(&["release", "abort", "--revert", &r.id]).await;
    assert_eq!(code, 0, "{err}");
    let (rj, to) = next_rollback(&mut a).await;
    assert_eq!(to, "v1.0.0");
    a.finish_job(&rj, "succeeded").await;
    let done = fleet.wait_state(&r.id, "reverted").await;
    let by: Vec<(&str, &str)> = done
        .history
        .iter()
        .filter(|e| !e.by.is_empty())
        .map(|e| (e.by.as_str(), e.what.as_str()))
        .collect();
    assert_eq!(
        by.iter().map(|(_, w)| *w).collect::<Vec<_>>(),
        [
            by[0].1,
            "paused by admin",
            "resumed by admin",
            "aborted with revert by admin"
        ],
        "{by:?}"
    );
    assert!(
        by[0]
            .1
            .starts_with("started: api v2.0.0 to 3 host(s) in 3 wave(s)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_host_times_out_and_is_skipped_or_counted() {
    let fleet = Fleet::start(&["web-1", "web-2"]).await;
    let mut a = fleet.connect("web-1").await;
    // web-2 connected once (so it has a release table), then went away.
    fleet.connect("web-2").await.close();
    let r = fleet
        .start_release(v1::StartReleaseRequest {
            min_healthy_set: true,
            host_timeout_ms: 1_000,
            skip_offline: true,
            max_parallel: 2,
            ..Default::default()
        })
        .await;
    // web-2 is away: it gets no pull (it would pull at its own deploy).
    pulled(&mut [&mut a]).await;
    let (j1, _) = next_deploy(&mut a).await;
    deployed(&mut a, &j1).await;
    let done = fleet.wait_state(&r.id, "succeeded").await;
    assert_eq!(host(&done, "web-2").state, "offline");
    assert_eq!(host(&done, "web-2").live_version, "v1.0.0");
    let (code, out, err) = fleet.drover(&["release", "status", &r.id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("v1.0.0 (behind)"), "{out}");

    // Converge while web-2 is away is refused with the reason; once back, `drover hosts`
    // shows it behind and converge deploys the release's version to it alone.
    let (code, _, err) = fleet.drover(&["release", "converge", &r.id]).await;
    assert_ne!(code, 0);
    assert!(err.contains("not connected: web-2"), "{err}");
    let mut b = fleet.connect("web-2").await;
    let (code, out, err) = fleet.drover(&["hosts"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "web-2 is behind: api runs v1.0.0, release {} put v2.0.0",
            r.id
        )),
        "{out}"
    );
    let (code, out, err) = fleet.drover(&["release", "converge", &r.id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("converge by admin: job "), "{out}");
    let (job, skip_migration) = next_deploy(&mut b).await;
    assert!(skip_migration, "the migration ran with the release");
    deployed(&mut b, &job).await;
    eventually(
        "web-2 no longer behind",
        Duration::from_secs(10),
        || async {
            let (_, out, _) = fleet.drover(&["--json", "hosts"]).await;
            let hosts: serde_json::Value = serde_json::from_str(&out).ok()?;
            let web2 = hosts
                .as_array()?
                .iter()
                .find(|h| h["name"] == "web-2")?
                .clone();
            web2["behind"].as_array()?.is_empty().then_some(())
        },
    )
    .await;
    b.close();

    // Without --skip-offline the offline host is a failure past the budget.
    let r = fleet
        .start_release(v1::StartReleaseRequest {
            min_healthy_set: true,
            host_timeout_ms: 1_000,
            on_failure: "halt".into(),
            ..Default::default()
        })
        .await;
    pulled(&mut [&mut a]).await;
    let (j, _) = next_deploy(&mut a).await;
    deployed(&mut a, &j).await;
    let halted = fleet.wait_state(&r.id, "halted").await;
    assert!(halted.why.contains("1 host(s) failed"), "{}", halted.why);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_mid_release_resumes_it_with_no_host_deployed_twice() {
    let fleet = Fleet::start(&["web-1", "web-2"]).await;
    let mut a = fleet.connect("web-1").await;
    let mut b = fleet.connect("web-2").await;
    let r = fleet
        .start_release(v1::StartReleaseRequest {
            min_healthy_set: true,
            ..Default::default()
        })
        .await;
    pulled(&mut [&mut a, &mut b]).await;
    let (j1, _) = next_deploy(&mut a).await;
    a.close();
    b.close();
    // The controller goes down while web-1's deploy runs.
    let Fleet {
        controller,
        addr,
        bundles,
        tmp,
        hook,
    } = fleet;
    let config = drover_controller::ControllerConfig {
        listen: addr.parse().unwrap(),
        ..config(tmp.path(), &hook)
    };
    controller.stop().await;
    let controller = TestController::start(config).await;
    let fleet = Fleet {
        controller,
        addr,
        bundles,
        tmp,
        hook,
    };
    // web-1's deploy finished meanwhile: its agent's outbox replays the events on its next
    // session; the command is not sent again once `job.started` is in.
    let mut a = fleet.connect("web-1").await;
    // The command comes again until `job.started` (same job id: an agent ignores one it knows).
    assert_eq!(a.next_command().await.job_id, j1);
    deployed(&mut a, &j1).await;
    let mut b = fleet.connect("web-2").await;
    let (j2, _) = next_deploy(&mut b).await;
    assert_eq!(j2, format!("{}-d1", r.id));
    deployed(&mut b, &j2).await;
    fleet.wait_state(&r.id, "succeeded").await;
    a.assert_no_command().await;
    let jobs = fleet
        .controller
        .admin()
        .list_jobs(v1::ListJobsRequest {
            app: APP.into(),
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let mut ids: Vec<&str> = jobs
        .iter()
        .filter(|j| j.kind == "deploy")
        .map(|j| j.id.as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, [j1.as_str(), j2.as_str()], "one deploy per host");
    // And one pull per host, before the restart.
    assert_eq!(jobs.iter().filter(|j| j.kind == "pull").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_at_a_time_is_planned_now_kept_as_a_schedule_and_started_by_the_scheduler() {
    let fleet = Fleet::start(&["web-1", "web-2"]).await;
    let mut a = fleet.connect("web-1").await;
    let mut b = fleet.connect("web-2").await;

    // A bad option fails now, not when the time comes; a time in the past is refused.
    let (code, _, err) = fleet
        .drover(&["release", APP, "v2.0.0", "--waves", "2,1", "--at", "+1h"])
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("--waves"), "{err}");
    let (code, _, err) = fleet
        .drover(&["release", APP, "v2.0.0", "--at", "2020-01-01T00:00:00Z"])
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("in the past"), "{err}");
    // A release schedule comes with its options from `drover release` only.
    let refused = fleet
        .controller
        .admin()
        .add_schedule(v1::AddScheduleRequest {
            kind: "release".into(),
            target: APP.into(),
            version: "v2.0.0".into(),
            at_unix_ms: drover_model::units::now_ms() + 3_600_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(refused.message().contains("--at"), "{}", refused.message());

    let (code, out, err) = fleet
        .drover(&[
            "release",
            APP,
            "v2.0.0",
            "--waves",
            "1,100%",
            "--min-healthy",
            "0s",
            "--skip-backup",
            "--at",
            "+1h",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wave 1: 1 host(s): web-1"), "{out}");
    assert!(
        out.contains("schedule api-release-v2.0.0 (release api) stored; next run"),
        "{out}"
    );
    a.assert_no_command().await;
    let (code, out, err) = fleet.drover(&["schedule", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("api-release-v2.0.0"), "{out}");
    let schedule = fleet
        .controller
        .shared
        .store
        .schedules()
        .unwrap()
        .into_iter()
        .find(|s| s.id == "api-release-v2.0.0")
        .unwrap();

    // Its time comes: the scheduler starts the release with the options kept.
    let scheduler = Scheduler::new(fleet.controller.shared.clone());
    let fired = scheduler.tick(schedule.at_unix_ms + 1).await.unwrap();
    // The example app's backup schedule may be due too, depending on the time of day.
    let fired: Vec<_> = fired
        .into_iter()
        .filter(|f| f.schedule == "api-release-v2.0.0")
        .collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].result, "started");
    let id = fired[0].job_id.clone();
    assert!(id.starts_with("release-"), "{id}");
    let r = fleet.get(&id).await;
    assert_eq!(r.waves_text, "1,100%");
    assert_eq!(r.requested_by, "schedule:api-release-v2.0.0");
    pulled(&mut [&mut a, &mut b]).await;
    let (j1, _) = next_deploy(&mut a).await;
    deployed(&mut a, &j1).await;
    let (j2, _) = next_deploy(&mut b).await;
    deployed(&mut b, &j2).await;
    fleet.wait_state(&id, "succeeded").await;
    // A one-off fires once; the schedule shows how the release ended.
    assert!(
        scheduler
            .tick(schedule.at_unix_ms + 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    let schedule = fleet
        .controller
        .shared
        .store
        .schedules()
        .unwrap()
        .into_iter()
        .find(|s| s.id == "api-release-v2.0.0")
        .unwrap();
    assert_eq!(schedule.last_run_job_id, id);
    assert_eq!(schedule.last_result, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_pull_fails_the_release_before_any_host_changes() {
    let fleet = Fleet::start(&["web-1", "web-2"]).await;
    let mut a = fleet.connect("web-1").await;
    let mut b = fleet.connect("web-2").await;
    let r = fleet
        .start_release(v1::StartReleaseRequest {
            waves: "1,100%".into(),
            ..Default::default()
        })
        .await;
    let pa = next_pull(&mut a).await;
    let pb = next_pull(&mut b).await;
    a.finish_job(&pa, "succeeded").await;
    b.finish_job(&pb, "failed").await;
    let halted = fleet.wait_state(&r.id, "halted").await;
    assert!(
        halted
            .why
            .contains("the image could not be pulled, so no host was changed: web-2"),
        "{}",
        halted.why
    );
    assert_eq!(host(&halted, "web-2").pull, "failed");
    assert_eq!(
        states(&halted),
        [
            ("web-1".into(), "skipped".into()),
            ("web-2".into(), "skipped".into())
        ]
    );
    a.assert_no_command().await;
    b.assert_no_command().await;
    let events = fleet.events(&r.id, "release_halted").await;
    assert_eq!(events, ["release_started", "release_halted"]);
}
