//! Deploys and rollbacks executed by a real agent on the real Docker Engine, reported to a real
//! controller: zero failed requests across a switch, every failure leaving the old version
//! serving with the new containers removed, automatic switch-back on a watch breach, manual
//! rollback (to a kept container, and recreated from its image after pruning), the per-app
//! lock, worker roles and WebSockets through the proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use drover_agent::jobevent::{self, field};
use drover_controller::store::EventRecord;
use drover_e2e::deploys::{
    AppGuard, Load, app_containers, deploy_job, rollback_job, spec, test_repo,
};
use drover_e2e::{
    TestAgent, TestController, assert_ws_echo, docker_available, fast_controller_config, free_port,
    http, init,
};

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
                "drover-zdt-web-v1.0.0-aaaa".to_string(),
                "exited".to_string()
            ),
            (
                "drover-zdt-web-v1.1.0-bbbb".to_string(),
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
    let table = jobevent::parse_releases(&tables.last().unwrap().fields).unwrap();
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
