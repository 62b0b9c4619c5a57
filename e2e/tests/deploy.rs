//! Deploys and rollbacks executed by a real agent on the real Docker Engine, reported to a real
//! controller: zero failed requests across a switch, every failure leaving the old version
//! serving with the new containers removed, automatic switch-back on a watch breach, manual
//! rollback (to a kept container, and recreated from its image after pruning), the per-app
//! lock, worker roles and WebSockets through the proxy: watched from the switch, during the
//! drain; a WebSocket on the old release closed with 1001 at the drain's timeout; WebSocket
//! smoke checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use drover_controller::store::EventRecord;
use drover_e2e::deploys::{
    AppGuard, Load, app_containers, deploy_job, rollback_job, spec, test_repo,
};
use drover_e2e::{
    TestAgent, TestController, assert_ws_echo, docker_available, eventually,
    fast_controller_config, free_port, http, init,
};
use drover_model::jobevent::{self, Payload, field};

struct Fixture {
    controller: TestController,
    agent: TestAgent,
    _dir: tempfile::TempDir,
}

async fn fixture(host: &str) -> Fixture {
    init();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let addr = controller.addr.to_string();
    let mut agent =
        TestAgent::enroll_and_start(&controller, host, &dir.path().join("a"), &addr).await;
    agent.wait_connected().await;
    Fixture {
        controller,
        agent,
        _dir: dir,
    }
}

impl Fixture {
    /// Submits a job and waits for its `job.finished`; returns it with all the job's events.
    async fn run(&self, job: drover_agent::store::JobRecord) -> (EventRecord, Vec<EventRecord>) {
        let id = job.id.clone();
        self.agent.jobs.submit(job);
        let finished = self
            .controller
            .wait_job(&self.agent.host, &id, Duration::from_secs(90))
            .await;
        (finished, self.controller.job_events(&self.agent.host, &id))
    }
}

fn get<'a>(e: &'a EventRecord, key: &str) -> &'a str {
    e.fields.get(key).map(String::as_str).unwrap_or("")
}

fn steps(events: &[EventRecord]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == jobevent::STEP && get(e, field::STATUS) != "started")
        .map(|e| format!("{}:{}", get(e, field::STEP), get(e, field::STATUS)))
        .collect()
}

async fn version_at(addr: SocketAddr) -> String {
    match http(addr, "GET", "/").await {
        Ok((200, body)) => body.trim().trim_start_matches("version=").to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn deploys_switch_with_no_failed_request_and_roll_back_on_demand() {
    if !docker_available("deploys_switch_with_no_failed_request_and_roll_back_on_demand") {
        return;
    }
    let app = "zdt";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let spec = spec(app, &repo, listen, "");
    let f = fixture("deploy-host").await;

    // First deploy: nothing served before.
    let (done, events) = f
        .run(deploy_job("deploy-1-aaaa", app, "v1.0.0", &spec))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    assert_eq!(
        steps(&events),
        [
            "validate:done",
            "lock:done",
            "backup:skipped",
            "image:done",
            "migrate:skipped",
            "start:done",
            "health:done",
            "smoke:skipped",
            "switch:done",
            "drain:skipped",
            "watch:done",
            "stop_old:skipped",
            "prune:done"
        ]
    );
    assert_eq!(version_at(listen).await, "v1.0.0");
    assert_ws_echo(listen, "hello through the proxy").await;

    // Upgrade under steady load: not one failed request.
    let load = Load::start(listen, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (done, _) = f
        .run(deploy_job("deploy-2-bbbb", app, "v1.1.0", &spec))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    assert_eq!(get(&done, field::PREVIOUS_VERSION), "v1.0.0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed, failures) = load.finish().await;
    assert_eq!(failed, 0, "failed requests across the switch: {failures:?}");
    assert!(ok > 50, "the load ran: {ok}");
    assert_eq!(version_at(listen).await, "v1.1.0");
    // The old release is kept, stopped, for rollback.
    assert_eq!(
        app_containers(app),
        [
            (
                "drover-deploy-host-zdt-web-v1.0.0-aaaa".to_string(),
                "exited".to_string()
            ),
            (
                "drover-deploy-host-zdt-web-v1.1.0-bbbb".to_string(),
                "running".to_string()
            ),
        ]
    );

    // Manual rollback starts the kept container, health-gates it and switches, under load.
    let load = Load::start(listen, 4);
    let started = Instant::now();
    let (done, events) = f.run(rollback_job("rollback-3-cccc", app, "")).await;
    let took = started.elapsed();
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    assert_eq!(get(&done, field::LIVE_VERSION), "v1.0.0");
    let (_, failed, failures) = load.finish().await;
    assert_eq!(
        failed, 0,
        "failed requests across the rollback: {failures:?}"
    );
    assert_eq!(version_at(listen).await, "v1.0.0");
    assert!(took < Duration::from_secs(10), "rollback took {took:?}");
    assert_eq!(
        steps(&events),
        [
            "lock:done",
            "locate:done",
            "start:done",
            "health:done",
            "switch:done",
            "drain:done",
            "stop_old:done"
        ]
    );

    // The release table went to the controller: v1.0.0 live, v1.1.0 kept.
    let tables: Vec<EventRecord> = f
        .controller
        .job_events(&f.agent.host, "rollback-3-cccc")
        .into_iter()
        .filter(|e| e.kind == jobevent::RELEASES)
        .collect();
    let Some(Payload::Releases {
        releases: table, ..
    }) = tables.last().unwrap().payload.clone()
    else {
        panic!("app.releases without its table: {tables:?}")
    };
    let states: BTreeMap<&str, &str> = table
        .iter()
        .map(|r| (r.version.as_str(), r.state.as_str()))
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([("v1.0.0", "live"), ("v1.1.0", "kept")])
    );
    // No earlier release than v1.0.0: a further rollback is refused and changes nothing.
    let (done, _) = f.run(rollback_job("rollback-4-dddd", app, "")).await;
    assert_eq!(get(&done, field::RESULT), "failed");
    assert_eq!(get(&done, field::STEP), "locate");
    assert!(
        get(&done, field::ERROR).contains("no earlier release"),
        "{done:?}"
    );
    assert_eq!(version_at(listen).await, "v1.0.0");
}

#[tokio::test]
async fn every_failure_names_its_step_removes_the_new_containers_and_keeps_the_old_serving() {
    if !docker_available(
        "every_failure_names_its_step_removes_the_new_containers_and_keeps_the_old_serving",
    ) {
        return;
    }
    let app = "fails";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let f = fixture("fail-host").await;
    let (done, _) = f
        .run(deploy_job(
            "deploy-0-base",
            app,
            "v1.0.0",
            &spec(app, &repo, listen, ""),
        ))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    let live = app_containers(app);
    let load = Load::start(listen, 2);

    // (version, spec additions, failing step, what the error says, what the logs say)
    let cases = [
        (
            "v9.9.9",
            "",
            "image",
            "is not present on this host and pulling it failed",
            "",
        ),
        (
            "v1.1.0",
            "migrate = [\"migrate\"]\n[env]\nMIGRATE_EXIT = \"7\"\n",
            "migrate",
            "exited with code 7",
            "relation \"users\" already exists",
        ),
        (
            "v1.1.0",
            "[env]\nEXIT_AFTER_MS = \"100\"\nSTART_DELAY_MS = \"5000\"\n",
            "health",
            "exited with code 3",
            "exiting as told by EXIT_AFTER_MS",
        ),
        (
            "v1.1.0",
            "[env]\nFAIL_HEALTH = \"1\"\n",
            "health",
            "the health check failed 5 times; last: /healthz answered 503",
            "listening on port 8080",
        ),
        (
            "v1.1.0",
            "[env]\nFAIL_SMOKE = \"1\"\n[[smoke]]\npath = \"/smoke\"\nbody_contains = \"ok\"\n",
            "smoke",
            "smoke check /smoke answered 500 (expected 200)",
            "",
        ),
        (
            "v1.1.0",
            "[secrets.SECRET_KEY]\nmin_length = 32\n",
            "validate",
            "secret SECRET_KEY is not set on this host",
            "",
        ),
        (
            "v1.1.0",
            "pre_deploy_backup = \"db\"\n",
            "backup",
            "deploy with --skip-backup",
            "",
        ),
        ("1.1", "", "validate", "does not match", ""),
    ];
    for (n, (version, extra, step, error, logs)) in cases.into_iter().enumerate() {
        let id = format!("deploy-{n}-f{n:03}");
        let (done, events) = f
            .run(deploy_job(
                &id,
                app,
                version,
                &spec(app, &repo, listen, extra),
            ))
            .await;
        assert_eq!(get(&done, field::RESULT), "failed", "case {step}: {done:?}");
        assert_eq!(get(&done, field::STEP), step, "{done:?}");
        assert!(
            get(&done, field::ERROR).contains(error),
            "case {step}: {done:?}"
        );
        assert!(
            get(&done, field::LOGS).contains(logs),
            "case {step} logs: {done:?}"
        );
        assert!(
            events.iter().all(|e| get(e, field::STEP) != "switch"),
            "case {step}: traffic never moved"
        );
        // Said only when this deploy had created containers (issue 11, item 14).
        let said_removed = events.iter().any(|e| {
            e.kind == jobevent::PROGRESS && e.message.starts_with("removed the new containers")
        });
        assert_eq!(
            said_removed,
            matches!(step, "health" | "smoke"),
            "case {step}: {:?}",
            events.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
        assert_eq!(
            app_containers(app),
            live,
            "case {step}: only the old release is left"
        );
        assert_eq!(
            version_at(listen).await,
            "v1.0.0",
            "case {step}: the old version serves"
        );
    }
    let (ok, failed, failures) = load.finish().await;
    assert_eq!(
        failed, 0,
        "no request failed during the failed deploys: {failures:?}"
    );
    assert!(ok > 0);
}

#[tokio::test]
async fn a_watch_window_breach_switches_back_within_a_second() {
    if !docker_available("a_watch_window_breach_switches_back_within_a_second") {
        return;
    }
    let app = "breach";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let f = fixture("breach-host").await;
    let (done, _) = f
        .run(deploy_job(
            "deploy-1-good",
            app,
            "v1.0.0",
            &spec(app, &repo, listen, ""),
        ))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    let before = app_containers(app);

    // v1.1.0 passes health and smoke but answers 5xx to real traffic.
    let bad = spec(app, &repo, listen, "[env]\nERROR_RATE = \"1.0\"\n")
        .replace("window = \"1s\"", "window = \"20s\"");
    let load = Load::start(listen, 4);
    let (done, events) = f
        .run(deploy_job("deploy-2-bad0", app, "v1.1.0", &bad))
        .await;
    assert_eq!(get(&done, field::RESULT), "rolled_back", "{done:?}");
    assert_eq!(get(&done, field::STEP), "watch");
    assert!(
        get(&done, field::ERROR).contains("answered 5xx"),
        "{done:?}"
    );
    assert_eq!(get(&done, field::LIVE_VERSION), "v1.0.0");
    assert!(
        events.iter().any(|e| e.kind == jobevent::STEP
            && get(e, field::STEP) == "watch"
            && e.message.contains("switched back to v1.0.0")),
        "{events:?}"
    );
    let span = load
        .failure_span()
        .expect("the bad release answered some 5xx");
    let (_, failed, _) = load.finish().await;
    assert!(
        span < Duration::from_secs(1),
        "5xx were served for {span:?} ({failed} requests) before the switch back"
    );
    assert_eq!(version_at(listen).await, "v1.0.0");
    assert_eq!(
        app_containers(app),
        before,
        "the bad release's containers are gone"
    );
}

#[tokio::test]
async fn one_deploy_per_app_at_a_time_and_wait_takes_the_lock_when_free() {
    if !docker_available("one_deploy_per_app_at_a_time_and_wait_takes_the_lock_when_free") {
        return;
    }
    let app = "locked";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let f = fixture("lock-host").await;
    // A deploy whose watch window holds the lock for 4 s.
    let slow = spec(app, &repo, listen, "").replace("window = \"1s\"", "window = \"4s\"");
    f.agent
        .jobs
        .submit(deploy_job("deploy-1-hold", app, "v1.0.0", &slow));
    eventually(
        "the first deploy holds the lock",
        Duration::from_secs(30),
        || async {
            f.controller
                .job_events(&f.agent.host, "deploy-1-hold")
                .iter()
                .any(|e| get(e, field::STEP) == "lock" && get(e, field::STATUS) == "done")
                .then_some(())
        },
    )
    .await;

    // A second deploy of the same app is told who holds it since when, at once.
    let (done, _) = f
        .run(deploy_job(
            "deploy-2-busy",
            app,
            "v1.1.0",
            &spec(app, &repo, listen, ""),
        ))
        .await;
    assert_eq!(get(&done, field::RESULT), "failed", "{done:?}");
    assert_eq!(get(&done, field::CODE), jobevent::CODE_LOCKED);
    let error = get(&done, field::ERROR);
    assert!(
        error.contains(
            "locked is locked by job deploy-1-hold (deploy v1.0.0 asked by tester) since 20"
        ),
        "{error}"
    );
    assert!(error.contains("--wait"), "{error}");

    // With --wait it waits its turn, then deploys.
    let mut waiting = deploy_job(
        "deploy-3-wait",
        app,
        "v1.1.0",
        &spec(app, &repo, listen, ""),
    );
    waiting.wait_lock = true;
    let (done, events) = f.run(waiting).await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    assert!(
        events
            .iter()
            .any(|e| e.kind == jobevent::PROGRESS && e.message.starts_with("waiting: ")),
        "it said it was waiting"
    );
    let first = f
        .controller
        .wait_job(&f.agent.host, "deploy-1-hold", Duration::from_secs(5))
        .await;
    assert_eq!(get(&first, field::RESULT), "succeeded");
    assert!(first.at_unix_ms <= done.at_unix_ms);
    assert_eq!(version_at(listen).await, "v1.1.0");
}

#[tokio::test]
async fn worker_roles_are_swapped_and_a_dying_worker_fails_the_deploy() {
    if !docker_available("worker_roles_are_swapped_and_a_dying_worker_fails_the_deploy") {
        return;
    }
    let app = "workers";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let with_bot = |extra: &str| {
        spec(
            app,
            &repo,
            listen,
            &format!("[[workers]]\nname = \"bot\"\ncommand = [\"worker\"]\n{extra}"),
        )
    };
    let f = fixture("worker-host").await;
    let (done, _) = f
        .run(deploy_job("deploy-1-w100", app, "v1.0.0", &with_bot("")))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    let (done, _) = f
        .run(deploy_job("deploy-2-w110", app, "v1.1.0", &with_bot("")))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    let states: BTreeMap<String, String> = app_containers(app).into_iter().collect();
    assert_eq!(
        states,
        BTreeMap::from([
            (
                "drover-worker-host-workers-bot-v1.0.0-w100".into(),
                "exited".into()
            ),
            (
                "drover-worker-host-workers-bot-v1.1.0-w110".into(),
                "running".into()
            ),
            (
                "drover-worker-host-workers-web-v1.0.0-w100".into(),
                "exited".into()
            ),
            (
                "drover-worker-host-workers-web-v1.1.0-w110".into(),
                "running".into()
            ),
        ])
    );

    // A worker that dies right after starting fails the deploy; the running worker stays.
    let dying = with_bot("[env]\nWORKER_EXIT_AFTER_MS = \"100\"\n");
    let (done, _) = f
        .run(deploy_job("deploy-3-wdie", app, "v1.0.0", &dying))
        .await;
    assert_eq!(get(&done, field::RESULT), "failed", "{done:?}");
    assert_eq!(get(&done, field::STEP), "health");
    assert!(
        get(&done, field::ERROR).contains(
            "worker container drover-worker-host-workers-bot-v1.0.0-wdie exited with code 4"
        ),
        "{done:?}"
    );
    assert!(
        get(&done, field::LOGS).contains("WORKER_EXIT_AFTER_MS"),
        "{done:?}"
    );
    let after: BTreeMap<String, String> = app_containers(app).into_iter().collect();
    assert_eq!(after, states, "the failed release left nothing behind");

    // A worker-only app: no proxy, workers swapped.
    let bots = "bots";
    let _guard2 = AppGuard(bots.into());
    let repo = test_repo(bots, &["v1.0.0", "v1.1.0"]);
    let only = format!(
        "name = \"{bots}\"\nimage = \"{repo}\"\nstop_timeout = \"1s\"\n\
         [[workers]]\nname = \"bot\"\ncommand = [\"worker\"]\n[watch]\nwindow = \"1s\"\n"
    );
    for (n, v) in ["v1.0.0", "v1.1.0"].into_iter().enumerate() {
        let (done, _) = f
            .run(deploy_job(&format!("deploy-{n}-b{n:03}"), bots, v, &only))
            .await;
        assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    }
    assert_eq!(
        app_containers(bots),
        [
            (
                "drover-worker-host-bots-bot-v1.0.0-b000".to_string(),
                "exited".to_string()
            ),
            (
                "drover-worker-host-bots-bot-v1.1.0-b001".to_string(),
                "running".to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn pruning_keeps_the_rollback_target_and_a_pruned_release_is_recreated_from_its_image() {
    if !docker_available(
        "pruning_keeps_the_rollback_target_and_a_pruned_release_is_recreated_from_its_image",
    ) {
        return;
    }
    let app = "prune";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0", "v2.0.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let spec = spec(app, &repo, listen, "keep_releases = 2");
    let f = fixture("prune-host").await;
    for (n, v) in ["v1.0.0", "v1.1.0", "v2.0.0"].into_iter().enumerate() {
        let (done, _) = f
            .run(deploy_job(&format!("deploy-{n}-p{n:03}"), app, v, &spec))
            .await;
        assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    }
    // v2.0.0 live, v1.1.0 kept (the rollback target), v1.0.0 pruned and its tag removed.
    assert_eq!(
        app_containers(app),
        [
            (
                "drover-prune-host-prune-web-v1.1.0-p001".to_string(),
                "exited".to_string()
            ),
            (
                "drover-prune-host-prune-web-v2.0.0-p002".to_string(),
                "running".to_string()
            ),
        ]
    );
    let tag = std::process::Command::new("docker")
        .args(["image", "inspect", &format!("{repo}:v1.0.0")])
        .output()
        .unwrap();
    assert!(!tag.status.success(), "the pruned release's tag is removed");

    // Rolling back to the pruned v1.0.0 recreates it from the recorded image ID.
    let (done, events) = f.run(rollback_job("rollback-3-p003", app, "v1.0.0")).await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    assert!(
        events.iter().any(|e| get(e, field::STEP) == "start"
            && e.message
                .contains("recreated drover-prune-host-prune-web-v1.0.0-p000 from")),
        "{events:?}"
    );
    assert_eq!(version_at(listen).await, "v1.0.0");
    // A version never deployed here is refused.
    let (done, _) = f.run(rollback_job("rollback-4-p004", app, "v0.1.0")).await;
    assert_eq!(get(&done, field::STEP), "locate");
    assert!(
        get(&done, field::ERROR).contains("no release of prune with version v0.1.0"),
        "{done:?}"
    );
}

/// Issue 11, item 12: the watch window runs from the switch, in parallel with the drain. With a
/// slow request (6 s) held on the old release and the new release answering 5xx, traffic goes
/// back within a second of the breach, while the old release is still draining (before the slow
/// request ends), not after the drain; the slow request completes on the old release.
#[tokio::test]
async fn a_breach_during_the_drain_switches_back_at_once() {
    if !docker_available("a_breach_during_the_drain_switches_back_at_once") {
        return;
    }
    let app = "middrain";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let long_drain = |extra: &str| {
        spec(app, &repo, listen, extra)
            .replace("drain_timeout = \"5s\"", "drain_timeout = \"20s\"")
            .replace("window = \"1s\"", "window = \"20s\"")
    };
    let f = fixture("middrain-host").await;
    let (done, _) = f
        .run(deploy_job("deploy-1-good", app, "v1.0.0", &long_drain("")))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    let before = app_containers(app);

    // A slow request on v1.0.0, in flight across the switch.
    let slow = tokio::spawn(async move {
        let answer = http(listen, "GET", "/slow?ms=6000").await;
        (answer, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let load = Load::start(listen, 4);
    let started = Instant::now();
    let (done, events) = f
        .run(deploy_job(
            "deploy-2-bad0",
            app,
            "v1.1.0",
            &long_drain("[env]\nERROR_RATE = \"1.0\"\n"),
        ))
        .await;
    let job_took = started.elapsed();
    let window = load.failure_window();
    let (_, failed, _) = load.finish().await;
    assert_eq!(get(&done, field::RESULT), "rolled_back", "{done:?}");
    assert_eq!(get(&done, field::STEP), "watch");
    assert!(
        get(&done, field::ERROR).contains("answered 5xx"),
        "{done:?}"
    );
    let (first, last) = window.expect("the bad release answered some 5xx");
    eprintln!(
        "measured: 5xx served for {:?} ({failed} failed requests), the job took {job_took:?}",
        last - first
    );
    assert!(
        last - first < Duration::from_secs(1),
        "5xx were served for {:?} ({failed} requests) before the switch back",
        last - first
    );
    let (answer, slow_ended) = slow.await.unwrap();
    assert_eq!(
        answer.unwrap(),
        (200, "slow 6000ms version=v1.0.0\n".to_string()),
        "the slow request finished on the old release"
    );
    assert!(
        slow_ended > last,
        "the switch back came while the old release was still draining, not after: the last \
         5xx {:?} after the slow request ended",
        last - slow_ended
    );
    let drain: Vec<&EventRecord> = events
        .iter()
        .filter(|e| get(e, field::STEP) == "drain")
        .collect();
    assert!(
        !drain[0].message.contains("(0 in flight"),
        "the drain started with the slow request in flight: {:?}",
        drain[0].message
    );
    assert!(
        drain.iter().any(|e| get(e, field::STATUS) == "done"
            && e.message.contains("cut short: v1.0.0 serves again")),
        "{drain:?}"
    );
    assert!(
        job_took < Duration::from_secs(30),
        "the job took {job_took:?}"
    );
    assert_eq!(version_at(listen).await, "v1.0.0");
    assert_eq!(app_containers(app), before, "the bad release is gone");
}

/// What a WebSocket client saw until its connection ended: the close frame's code (None for a
/// bare end of stream) and when.
async fn ws_until_closed(listen: SocketAddr) -> (Option<u16>, u64, std::time::SystemTime) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{listen}/ws"))
        .await
        .expect("WebSocket upgrade");
    let mut echoes = 0u64;
    loop {
        let text = format!("ping {echoes}");
        if ws.send(Message::text(text.clone())).await.is_err() {
            return (None, echoes, std::time::SystemTime::now());
        }
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(got)))) => {
                assert_eq!(got.as_str(), text);
                echoes += 1;
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (
                    frame.map(|f| u16::from(f.code)),
                    echoes,
                    std::time::SystemTime::now(),
                );
            }
            Ok(other) => {
                eprintln!("the WebSocket ended with {other:?}");
                return (None, echoes, std::time::SystemTime::now());
            }
            Err(_) => panic!("the WebSocket neither answered nor closed in 30 s"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 11, item 15: a WebSocket open on the old release stays up across the deploy until
/// drain_timeout (5 s), then the client gets a close frame 1001 (not a bare end of stream), and
/// the drain's lines name the WebSocket.
#[tokio::test]
async fn a_websocket_on_the_old_release_runs_until_the_drain_timeout_then_gets_1001() {
    if !docker_available(
        "a_websocket_on_the_old_release_runs_until_the_drain_timeout_then_gets_1001",
    ) {
        return;
    }
    let app = "wsdrain";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let spec = spec(app, &repo, listen, "");
    let f = fixture("wsdrain-host").await;
    let (done, _) = f
        .run(deploy_job("deploy-1-ws10", app, "v1.0.0", &spec))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");

    let client = tokio::spawn(ws_until_closed(listen));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (done, events) = f
        .run(deploy_job("deploy-2-ws11", app, "v1.1.0", &spec))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    let (code, echoes, closed_at) = client.await.unwrap();
    assert_eq!(
        code,
        Some(1001),
        "a close frame 1001, not a bare end of stream"
    );
    let switched = events
        .iter()
        .find(|e| get(e, field::STEP) == "switch" && get(e, field::STATUS) == "done")
        .expect("the switch");
    let open_for = closed_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - switched.at_unix_ms;
    eprintln!("measured: the WebSocket got 1001 {open_for} ms after the switch, {echoes} echoes");
    assert!(
        (4_800..9_000).contains(&open_for),
        "the WebSocket was closed {open_for} ms after the switch (drain_timeout 5 s)"
    );
    assert!(
        echoes > 20,
        "it kept answering during the drain: {echoes} echoes"
    );
    let drain: Vec<&EventRecord> = events
        .iter()
        .filter(|e| get(e, field::STEP) == "drain")
        .collect();
    assert!(
        drain[0]
            .message
            .contains("1 upgraded connection(s) open: WebSocket /ws from 127.0.0.1:"),
        "the drain's first line names the WebSocket: {:?}",
        drain[0].message
    );
    let finished = drain
        .iter()
        .find(|e| get(e, field::STATUS) == "done")
        .expect("the drain ends");
    assert!(
        finished
            .message
            .contains("1 upgraded connection(s) still open after 5s: WebSocket /ws")
            && finished.message.contains("close code 1001"),
        "{:?}",
        finished.message
    );
    assert!(
        !finished.message.contains("in-flight requests finished"),
        "{:?}",
        finished.message
    );
    // New WebSockets go to the new release.
    assert_ws_echo(listen, "on v1.1.0").await;
    assert_eq!(version_at(listen).await, "v1.1.0");
}

/// Issue 11, item 15: a `[[smoke]]` WebSocket check passes against the test app's echo and
/// fails the deploy, naming the check, against a release that does not answer or answers
/// something else; the old release keeps serving.
#[tokio::test]
async fn a_websocket_smoke_check_passes_on_an_echo_and_fails_clearly_otherwise() {
    if !docker_available("a_websocket_smoke_check_passes_on_an_echo_and_fails_clearly_otherwise") {
        return;
    }
    let app = "wssmoke";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ws_smoke = |expect: &str, env: &str| {
        spec(
            app,
            &repo,
            listen,
            &format!(
                "[[smoke]]\npath = \"/ws\"\nwebsocket_send = \"ping\"\nwebsocket_expect = \"{expect}\"\n{env}"
            ),
        )
    };
    let f = fixture("wssmoke-host").await;
    let (done, events) = f
        .run(deploy_job(
            "deploy-1-s100",
            app,
            "v1.0.0",
            &ws_smoke("ping", ""),
        ))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    assert!(
        events
            .iter()
            .any(|e| get(e, field::STEP) == "smoke"
                && e.message == "/ws (WebSocket) answered \"ping\""),
        "{events:?}"
    );
    let live = app_containers(app);

    let cases = [
        (
            "deploy-2-s110",
            ws_smoke("ping", "[env]\nWS_SILENT = \"1\"\n"),
            "smoke check /ws (WebSocket, sent \"ping\"): no answer to the message within 1s",
        ),
        (
            "deploy-3-s111",
            ws_smoke("pong", ""),
            "smoke check /ws (WebSocket, sent \"ping\"): the answer does not contain \"pong\": ping",
        ),
    ];
    for (id, spec, error) in cases {
        let (done, _) = f.run(deploy_job(id, app, "v1.1.0", &spec)).await;
        assert_eq!(get(&done, field::RESULT), "failed", "{done:?}");
        assert_eq!(get(&done, field::STEP), "smoke", "{done:?}");
        assert!(get(&done, field::ERROR).contains(error), "{done:?}");
        assert_eq!(version_at(listen).await, "v1.0.0");
        assert_eq!(app_containers(app), live, "the failed release is removed");
    }
}

/// Issue 11, item 15: a slow starter passes within its health `start_period` (failures then do
/// not count) where it fails without one, and a container that exits during the start period
/// fails the deploy at once, not at the end of the period.
#[tokio::test]
async fn a_slow_starter_passes_within_its_start_period_and_an_exit_in_it_fails_at_once() {
    if !docker_available(
        "a_slow_starter_passes_within_its_start_period_and_an_exit_in_it_fails_at_once",
    ) {
        return;
    }
    let app = "slowstart";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let slow = |env: &str, start_period: &str| {
        spec(app, &repo, listen, &format!("[env]\n{env}\n")).replace(
            "retries = 5",
            &format!("retries = 2\nstart_period = \"{start_period}\""),
        )
    };
    let f = fixture("slowstart-host").await;
    let (done, _) = f
        .run(deploy_job(
            "deploy-1-ss00",
            app,
            "v1.0.0",
            &slow("START_DELAY_MS = \"2500\"", "0s"),
        ))
        .await;
    assert_eq!(get(&done, field::RESULT), "failed", "{done:?}");
    assert_eq!(get(&done, field::STEP), "health", "{done:?}");

    let started = Instant::now();
    let (done, _) = f
        .run(deploy_job(
            "deploy-2-ss01",
            app,
            "v1.0.0",
            &slow("START_DELAY_MS = \"2500\"", "20s"),
        ))
        .await;
    assert_eq!(get(&done, field::RESULT), "succeeded", "{done:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "it passed as soon as it answered, not at the end of the period: {:?}",
        started.elapsed()
    );
    assert_eq!(version_at(listen).await, "v1.0.0");

    let started = Instant::now();
    let (done, _) = f
        .run(deploy_job(
            "deploy-3-ss02",
            app,
            "v1.1.0",
            &slow("START_DELAY_MS = \"60000\"\nEXIT_AFTER_MS = \"300\"", "60s"),
        ))
        .await;
    let took = started.elapsed();
    assert_eq!(get(&done, field::RESULT), "failed", "{done:?}");
    assert_eq!(get(&done, field::STEP), "health", "{done:?}");
    assert!(
        get(&done, field::ERROR).contains("exited with code 3"),
        "{done:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "an exit in the start period fails at once: {took:?}"
    );
    assert_eq!(version_at(listen).await, "v1.0.0");
}
