//! Fleet releases on three real `drover-agent` processes, each with its own data dir and proxy
//! address (127.0.0.2-4), on the one Docker Engine, driven by a real controller. Proves: the
//! second wave starts only once the first wave's host stayed healthy for `min_healthy`; the
//! spec's migration runs exactly once per release (counted in a mounted file); a host that
//! fails in wave 2 halts the release and every updated host goes back to its previous version
//! while load runs through every proxy with no failed request; an offline host (its agent
//! stopped) is skipped, shows as behind once back, and `converge` brings it to the version
//! without the migration; a halt without revert leaves the updated hosts and rolls nothing
//! back, and `abort --revert` of it does; pause holds the next wave past `min_healthy`,
//! resume starts it, abort halts it; and a real `drover-controller` process killed with SIGKILL while a
//! host deploys resumes the release after its restart, each host deployed once.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_e2e::deploys::{AppGuard, Load, app_containers, test_repo};
use drover_e2e::hostagent::{HostAgent, deploy, version_at};
use drover_e2e::{
    TestController, bin, docker_available, drover_cli, eventually, fast_controller_config,
    free_port, init,
};
use drover_proto::v1;

const APP: &str = "fleet";

/// The app: its migration appends its version to `<mig>/log`; the host's secret FAIL_HEALTH
/// decides whether a new container's health check passes (1: it fails).
fn fleet_spec(app: &str, repo: &str, listen: SocketAddr, mig: &Path) -> String {
    format!(
        "name = \"{app}\"\nimage = \"{repo}\"\ndrain_timeout = \"2s\"\nstop_timeout = \"2s\"\n\
         allow_host_mounts = true\nvolumes = [\"{}:/mig\"]\nmigrate = [\"migrate\"]\n\
         [env]\nMIGRATE_LOG = \"/mig/log\"\n\
         [secrets.FAIL_HEALTH]\nmin_length = 1\n\
         [web]\nport = 8080\nlisten = \"{listen}\"\n\
         [health]\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nretries = 5\n\
         [watch]\nwindow = \"1s\"\nmax_5xx_ratio = 0.05\nmax_p95_latency = \"1s\"\n",
        mig.display()
    )
}

/// Writes the host's secrets file for the app (mode 0600).
fn secrets(app: &str, agent: &HostAgent, fail_health: bool) {
    let dir = agent.config.parent().unwrap().join("secrets");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{app}.env"));
    std::fs::write(
        &path,
        format!("FAIL_HEALTH={}\n", if fail_health { 1 } else { 0 }),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// How many times the migration ran for `version`.
fn migrations(mig: &Path, version: &str) -> usize {
    std::fs::read_to_string(mig.join("log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim() == version)
        .count()
}

async fn get(controller: &TestController, id: &str) -> v1::FleetReleaseInfo {
    controller
        .admin()
        .get_release(v1::GetReleaseRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn wait_state(controller: &TestController, id: &str, state: &str) -> v1::FleetReleaseInfo {
    eventually(
        &format!("release {id} {state}"),
        Duration::from_secs(180),
        || async {
            let r = get(controller, id).await;
            (r.state == state).then_some(r)
        },
    )
    .await
}

/// Starts a release of `req.app` (APP when empty), without the pre-deploy backup.
async fn start(controller: &TestController, req: v1::StartReleaseRequest) -> String {
    let app = if req.app.is_empty() {
        APP.to_string()
    } else {
        req.app.clone()
    };
    controller
        .admin()
        .start_release(v1::StartReleaseRequest {
            app,
            skip_backup: true,
            ..req
        })
        .await
        .expect("start the release")
        .into_inner()
        .id
}

fn host<'a>(r: &'a v1::FleetReleaseInfo, name: &str) -> &'a v1::FleetReleaseHost {
    r.hosts.iter().find(|h| h.host == name).unwrap()
}

/// The app's containers running on `host` (its agent names them `drover-<host>-...`).
fn running_on(host: &str) -> Vec<String> {
    running_of(APP, host)
}

fn running_of(app: &str, host: &str) -> Vec<String> {
    app_containers(app)
        .into_iter()
        .filter(|(name, state)| name.starts_with(&format!("drover-{host}-")) && state == "running")
        .map(|(name, _)| name)
        .collect()
}

/// Once the release retired them, each host runs one web container: the new release's.
/// `hosts`: the release's hosts with their index in it.
async fn retired(controller: &TestController, app: &str, id: &str, hosts: &[(usize, &HostAgent)]) {
    for (i, agent) in hosts {
        let job = format!("{id}-x{i}");
        let ended = controller
            .wait_job(&agent.host, &job, Duration::from_secs(60))
            .await;
        assert_eq!(
            ended.fields.get("result").map(String::as_str),
            Some("succeeded"),
            "{job} on {}: {ended:?}",
            agent.host
        );
        let left = running_of(app, &agent.host);
        assert_eq!(left.len(), 1, "{}: {left:?}", agent.host);
    }
}

/// Controls a release as the admin operator.
async fn control(controller: &TestController, id: &str, control: v1::ReleaseControl) {
    controller
        .admin()
        .control_release(v1::ControlReleaseRequest {
            id: id.into(),
            control: control as i32,
        })
        .await
        .unwrap_or_else(|e| panic!("{control:?} {id}: {e}"));
}

/// Three real agents serving `app` at v1.0.0: the controller, the agents, the app's public
/// port and the migration log directory (in `dir`).
struct Three {
    controller: TestController,
    agents: Vec<HostAgent>,
    port: u16,
    mig: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn three_agents(app: &str, hosts: [(&str, &str); 3]) -> Three {
    let repo = test_repo(app, &["v1.0.0", "v1.1.0", "v2.0.0"]);
    let port = free_port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mig = dir.path().join("mig");
    std::fs::create_dir_all(&mig).unwrap();
    // The migration container writes as its own user.
    std::fs::set_permissions(&mig, std::fs::Permissions::from_mode(0o777)).unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let mut agents = Vec::new();
    for (name, ip) in hosts {
        let mut agent = HostAgent::enroll(&controller, dir.path(), name, ip).await;
        secrets(app, &agent, false);
        agent.start(&controller).await;
        agents.push(agent);
    }
    controller
        .admin()
        .apply_app(v1::ApplyAppRequest {
            spec_toml: fleet_spec(app, &repo, listen, &mig),
            source: format!("{app}.toml"),
        })
        .await
        .expect("apply the app");
    let all: Vec<&HostAgent> = agents.iter().collect();
    deploy(&controller, app, "v1.0.0", &all).await;
    Three {
        controller,
        agents,
        port,
        mig,
        _dir: dir,
    }
}

// Multi-threaded: the in-process controller keeps serving while this thread waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_agents_release_in_waves_revert_under_load_and_converge() {
    if !docker_available("three_real_agents_release_in_waves_revert_under_load_and_converge") {
        return;
    }
    init();
    let _guard = AppGuard(APP.into());
    let Three {
        controller,
        mut agents,
        port,
        mig,
        _dir,
    } = three_agents(
        APP,
        [
            ("fleet-a", "127.0.0.2"),
            ("fleet-b", "127.0.0.3"),
            ("fleet-c", "127.0.0.4"),
        ],
    )
    .await;
    let all: Vec<&HostAgent> = agents.iter().collect();
    let names: Vec<String> = agents.iter().map(|a| a.host.clone()).collect();

    // 1. Waves gated on health: wave 2 starts only after fleet-a stayed healthy for
    //    min_healthy; the migration runs once, on fleet-a.
    let min_healthy = Duration::from_secs(3);
    let id = start(
        &controller,
        v1::StartReleaseRequest {
            version: "v1.1.0".into(),
            hosts: names.clone(),
            waves: "1,100%".into(),
            max_parallel: 2,
            min_healthy_ms: min_healthy.as_millis() as u64,
            ..Default::default()
        },
    )
    .await;
    // Watched as it runs: when a wave-2 host first moves, fleet-a has passed, and it passed
    // min_healthy after its deploy ended.
    let deployed = std::sync::atomic::AtomicI64::new(0);
    // fleet-a's containers running while wave 2 deploys: its v1.0.0 web kept for a revert.
    let kept_a = std::sync::atomic::AtomicUsize::new(0);
    let done = eventually("the release succeeds", Duration::from_secs(180), || async {
        let r = get(&controller, &id).await;
        let a = host(&r, "fleet-a");
        if a.deployed_unix_ms > 0 {
            deployed.store(a.deployed_unix_ms, std::sync::atomic::Ordering::Relaxed);
        }
        let moved = ["fleet-b", "fleet-c"]
            .iter()
            .any(|h| !matches!(host(&r, h).state.as_str(), "pending" | "queued"));
        if moved && !matches!(r.state.as_str(), "succeeded") {
            assert_eq!(
                a.state, "passed",
                "wave 2 moved before fleet-a passed: {r:?}"
            );
            if r.state == "running" {
                kept_a.fetch_max(
                    running_on("fleet-a").len(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
        (r.state == "succeeded").then_some(r)
    })
    .await;
    let a = host(&done, "fleet-a");
    let deployed_a = deployed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(deployed_a > 0, "fleet-a was seen settling");
    assert!(
        a.passed_unix_ms - deployed_a >= min_healthy.as_millis() as i64 - 300,
        "fleet-a passed {} ms after its deploy ended, before min_healthy",
        a.passed_unix_ms - deployed_a
    );
    assert!(
        done.history.iter().any(|e| e.what == "wave 1 of 2 passed")
            && done.history.iter().any(|e| e.what == "wave 2 of 2 passed"),
        "{:?}",
        done.history
    );
    assert_eq!(migrations(&mig, "v1.1.0"), 1, "the migration ran once");
    for agent in &agents {
        assert_eq!(
            version_at(agent.public(port)).await.as_deref(),
            Some("v1.1.0")
        );
    }
    // Each host kept v1.0.0's web container running while the release could revert; the
    // release retired it once it succeeded.
    assert_eq!(
        kept_a.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "fleet-a ran v1.0.0 and v1.1.0 while wave 2 deployed"
    );
    retired(
        &controller,
        APP,
        &id,
        &all.iter().copied().enumerate().collect::<Vec<_>>(),
    )
    .await;

    // 2. fleet-c cannot pass its health check: wave 2 fails, the release halts and fleet-a and
    //    fleet-b go back to v1.1.0, all while load runs through every proxy.
    secrets(APP, &agents[2], true);
    let loads: Vec<Load> = agents
        .iter()
        .map(|a| Load::start(a.public(port), 2))
        .collect();
    let id = start(
        &controller,
        v1::StartReleaseRequest {
            version: "v2.0.0".into(),
            hosts: names.clone(),
            waves: "1,100%".into(),
            max_parallel: 2,
            min_healthy_ms: 1_000,
            on_failure: "revert".into(),
            ..Default::default()
        },
    )
    .await;
    let reverted = wait_state(&controller, &id, "reverted").await;
    let reverted_at = Instant::now();
    assert!(reverted.why.contains("failed"), "{}", reverted.why);
    assert_eq!(host(&reverted, "fleet-a").state, "reverted");
    assert_eq!(host(&reverted, "fleet-c").state, "failed");
    let b_state = host(&reverted, "fleet-b").state.clone();
    assert!(
        b_state == "reverted" || b_state == "failed",
        "fleet-b was updated then reverted, or its deploy was cancelled: {b_state}: {:?}",
        host(&reverted, "fleet-b")
    );
    for agent in &agents {
        assert_eq!(
            version_at(agent.public(port)).await.as_deref(),
            Some("v1.1.0"),
            "{} serves its previous version",
            agent.host
        );
    }
    // The rollbacks switched to v1.1.0's web container the deploys kept running, and stopped
    // v2.0.0's: one web container each.
    for agent in &agents {
        let left = running_on(&agent.host);
        assert_eq!(left.len(), 1, "{}: {left:?}", agent.host);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (agent, load) in agents.iter().zip(loads) {
        let (ok, failed, first) = load.finish().await;
        assert!(ok > 0, "{}: no request answered", agent.host);
        assert_eq!(failed, 0, "{}: failed requests: {first:?}", agent.host);
    }
    assert_eq!(migrations(&mig, "v2.0.0"), 1, "the migration ran once");
    assert!(
        reverted
            .history
            .iter()
            .any(|e| e.what.starts_with("the migration ran with this release")),
        "{:?}",
        reverted.history
    );
    eprintln!(
        "revert: the release reverted {:?} after it was seen reverted",
        reverted_at.elapsed()
    );

    // 3. fleet-c's agent is stopped: it is skipped after host_timeout; once back it is behind,
    //    and converge deploys v2.0.0 to it without the migration.
    secrets(APP, &agents[2], false);
    agents[2].kill9();
    eventually("fleet-c seen gone", Duration::from_secs(30), || async {
        let h = controller.host("fleet-c").await?;
        (!h.session_open).then_some(())
    })
    .await;
    let id = start(
        &controller,
        v1::StartReleaseRequest {
            version: "v2.0.0".into(),
            hosts: names.clone(),
            waves: "100%".into(),
            max_parallel: 2,
            min_healthy_set: true,
            host_timeout_ms: 2_000,
            host_timeout_set: true,
            skip_offline: true,
            ..Default::default()
        },
    )
    .await;
    let done = wait_state(&controller, &id, "succeeded").await;
    assert_eq!(host(&done, "fleet-c").state, "offline");
    assert_eq!(migrations(&mig, "v2.0.0"), 2, "once more, for this release");
    agents[2].start(&controller).await;
    let behind = eventually("fleet-c behind", Duration::from_secs(30), || async {
        let h = controller.host("fleet-c").await?;
        h.behind.first().cloned()
    })
    .await;
    assert_eq!(
        (
            behind.desired_version.as_str(),
            behind.live_version.as_str()
        ),
        ("v2.0.0", "v1.1.0")
    );
    assert_eq!(behind.release_id, id);
    controller
        .admin()
        .control_release(v1::ControlReleaseRequest {
            id: id.clone(),
            control: v1::ReleaseControl::Converge as i32,
        })
        .await
        .expect("converge");
    eventually("fleet-c on v2.0.0", Duration::from_secs(90), || async {
        (version_at(agents[2].public(port)).await.as_deref() == Some("v2.0.0")).then_some(())
    })
    .await;
    assert_eq!(migrations(&mig, "v2.0.0"), 2, "converge runs no migration");
    eventually(
        "fleet-c no longer behind",
        Duration::from_secs(30),
        || async {
            let h = controller.host("fleet-c").await?;
            h.behind.is_empty().then_some(())
        },
    )
    .await;
}

// Multi-threaded: the in-process controller keeps serving while this thread waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_agents_halt_without_revert_pause_resume_and_abort() {
    if !docker_available("three_real_agents_halt_without_revert_pause_resume_and_abort") {
        return;
    }
    init();
    let app = "fleetctl";
    let _guard = AppGuard(app.into());
    let Three {
        controller,
        agents,
        port,
        mig,
        _dir,
    } = three_agents(
        app,
        [
            ("ctl-a", "127.0.0.7"),
            ("ctl-b", "127.0.0.8"),
            ("ctl-c", "127.0.0.9"),
        ],
    )
    .await;
    let names: Vec<String> = agents.iter().map(|a| a.host.clone()).collect();
    let serving = |i: usize| version_at(agents[i].public(port));
    let index =
        |r: &v1::FleetReleaseInfo, name: &str| r.hosts.iter().position(|h| h.host == name).unwrap();
    let by_operator = |r: &v1::FleetReleaseInfo, what: &str| {
        r.history
            .iter()
            .any(|e| !e.by.is_empty() && e.what.starts_with(&format!("{what} by ")))
    };

    // 1. Halt without revert: ctl-b fails its health check in wave 2 (one host at a time):
    //    the release halts, ctl-a keeps v1.1.0, ctl-c never starts, nothing is rolled back.
    secrets(app, &agents[1], true);
    let id = start(
        &controller,
        v1::StartReleaseRequest {
            app: app.into(),
            version: "v1.1.0".into(),
            hosts: names.clone(),
            waves: "1,100%".into(),
            max_parallel: 1,
            min_healthy_ms: 1_000,
            on_failure: "halt".into(),
            ..Default::default()
        },
    )
    .await;
    let halted = wait_state(&controller, &id, "halted").await;
    assert!(halted.why.contains("failed"), "{}", halted.why);
    assert_eq!(host(&halted, "ctl-a").state, "passed");
    assert_eq!(host(&halted, "ctl-b").state, "failed");
    assert_eq!(host(&halted, "ctl-c").state, "skipped");
    assert_eq!(serving(0).await.as_deref(), Some("v1.1.0"));
    assert_eq!(serving(1).await.as_deref(), Some("v1.0.0"));
    assert_eq!(serving(2).await.as_deref(), Some("v1.0.0"));
    for (i, agent) in agents.iter().enumerate() {
        assert!(
            controller
                .job_events(
                    &agent.host,
                    &format!("{id}-r{}", index(&halted, &agent.host))
                )
                .is_empty(),
            "{}: a halt without revert rolls nothing back",
            names[i]
        );
    }
    // Halted: it cannot revert by itself, so ctl-a stops the v1.0.0 it kept running.
    retired(
        &controller,
        app,
        &id,
        &[(index(&halted, "ctl-a"), &agents[0])],
    )
    .await;

    // 2. `abort --revert` of the halted release takes ctl-a back.
    control(&controller, &id, v1::ReleaseControl::AbortRevert).await;
    let reverted = wait_state(&controller, &id, "reverted").await;
    assert_eq!(host(&reverted, "ctl-a").state, "reverted");
    assert_eq!(serving(0).await.as_deref(), Some("v1.0.0"));
    assert!(
        by_operator(&reverted, "aborted with revert"),
        "{:?}",
        reverted.history
    );
    secrets(app, &agents[1], false);

    // 3. Pause once ctl-a has deployed: it settles and passes, but wave 2 does not start
    //    while paused; resume starts it; abort during wave 2 halts with ctl-c never started.
    let min_healthy = Duration::from_secs(2);
    let id = start(
        &controller,
        v1::StartReleaseRequest {
            app: app.into(),
            version: "v2.0.0".into(),
            hosts: names.clone(),
            waves: "1,2,100%".into(),
            max_parallel: 1,
            min_healthy_ms: min_healthy.as_millis() as u64,
            ..Default::default()
        },
    )
    .await;
    eventually("ctl-a deployed", Duration::from_secs(120), || async {
        let r = get(&controller, &id).await;
        (host(&r, "ctl-a").state == "settling").then_some(())
    })
    .await;
    control(&controller, &id, v1::ReleaseControl::Pause).await;
    wait_state(&controller, &id, "paused").await;
    tokio::time::sleep(min_healthy + Duration::from_secs(3)).await;
    let paused = get(&controller, &id).await;
    assert_eq!(paused.state, "paused");
    assert_eq!(host(&paused, "ctl-a").state, "passed", "{paused:?}");
    assert_eq!(host(&paused, "ctl-b").state, "pending", "{paused:?}");
    assert_eq!(host(&paused, "ctl-c").state, "pending", "{paused:?}");
    assert_eq!(serving(1).await.as_deref(), Some("v1.0.0"));
    control(&controller, &id, v1::ReleaseControl::Resume).await;
    eventually("ctl-b deployed", Duration::from_secs(120), || async {
        let r = get(&controller, &id).await;
        (host(&r, "ctl-b").state == "settling").then_some(())
    })
    .await;
    control(&controller, &id, v1::ReleaseControl::Abort).await;
    let aborted = wait_state(&controller, &id, "halted").await;
    assert!(aborted.why.contains("aborted"), "{}", aborted.why);
    assert_eq!(host(&aborted, "ctl-c").state, "skipped");
    assert_eq!(serving(0).await.as_deref(), Some("v2.0.0"));
    assert_eq!(serving(1).await.as_deref(), Some("v2.0.0"));
    assert_eq!(serving(2).await.as_deref(), Some("v1.0.0"));
    for what in ["paused", "resumed", "aborted"] {
        assert!(by_operator(&aborted, what), "{what}: {:?}", aborted.history);
    }
    retired(
        &controller,
        app,
        &id,
        &[
            (index(&aborted, "ctl-a"), &agents[0]),
            (index(&aborted, "ctl-b"), &agents[1]),
        ],
    )
    .await;
    assert_eq!(migrations(&mig, "v2.0.0"), 1, "the migration ran once");
}

/// Runs the real `drover` against the controller process; its output as JSON (exit 0 asserted).
fn cli_json(addr: &str, admin: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = drover_cli(addr, admin, &all);
    assert!(
        out.status.success(),
        "drover {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Polls `check` every 200 ms for up to `patience`.
fn wait_for<T>(what: &str, patience: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `drover-controller run --config FILE`, its log appended to `log`.
fn controller_process(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin("drover-controller"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start drover-controller")
}

/// Kills the controller process with SIGKILL when dropped (pass or fail).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// Multi-threaded: the agents are processes; this thread only waits on them and the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_controller_resumes_the_release_and_deploys_no_host_twice() {
    if !docker_available("a_sigkilled_controller_resumes_the_release_and_deploys_no_host_twice") {
        return;
    }
    init();
    let app = "fleetkill";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let port = free_port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!("listen = \"{addr}\"\ndata_dir = \"{}\"\n", data.display()),
    )
    .unwrap();
    let log = dir.path().join("controller.log");
    let mut controller = Killed(controller_process(&config, &log));
    let admin = data.join("operator/admin");
    let serving =
        || admin.join("key.pem").exists() && drover_cli(&addr, &admin, &["hosts"]).status.success();
    wait_for("the controller serves", Duration::from_secs(30), || {
        serving().then_some(())
    });

    let mut agents = Vec::new();
    for (host, ip) in [("kill-a", "127.0.0.5"), ("kill-b", "127.0.0.6")] {
        let out = drover_cli(
            &addr,
            &admin,
            &["token", "create", "--host", host, "--ttl", "10m"],
        );
        assert!(out.status.success());
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut agent = HostAgent::enroll_at(&addr, &token, dir.path(), host, ip, "");
        agent.spawn();
        agents.push(agent);
    }
    wait_for("both agents connected", Duration::from_secs(30), || {
        let hosts = cli_json(&addr, &admin, &["hosts"]);
        let open = hosts
            .as_array()?
            .iter()
            .filter(|h| h["session_open"] == true);
        (open.count() == 2).then_some(())
    });
    let spec_file = dir.path().join("app.toml");
    std::fs::write(
        &spec_file,
        drover_e2e::deploys::spec(app, &repo, listen, "drain_timeout = \"1s\"\n")
            .replace("drain_timeout = \"5s\"\n", ""),
    )
    .unwrap();
    cli_json(
        &addr,
        &admin,
        &["app", "apply", spec_file.to_str().unwrap()],
    );
    let out = drover_cli(
        &addr,
        &admin,
        &[
            "deploy", app, "v1.0.0", "--host", "kill-a", "--host", "kill-b",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let started = cli_json(
        &addr,
        &admin,
        &[
            "release",
            app,
            "v1.1.0",
            "--host",
            "kill-a",
            "--host",
            "kill-b",
            "--waves",
            "1,100%",
            "--min-healthy",
            "2s",
            "--skip-backup",
            "--detach",
        ],
    );
    let id = started["id"].as_str().unwrap().to_string();
    let state_of = |r: &serde_json::Value, host: &str| -> String {
        r["hosts"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["host"] == host))
            .and_then(|h| h["state"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    // The controller is killed while kill-a deploys; kill-a's deploy ends while it is down.
    wait_for("kill-a deploying", Duration::from_secs(60), || {
        let r = cli_json(&addr, &admin, &["release", "status", &id]);
        (state_of(&r, "kill-a") == "deploying").then_some(())
    });
    Command::new("kill")
        .args(["-KILL", &controller.0.id().to_string()])
        .status()
        .unwrap();
    let _ = controller.0.wait();
    std::thread::sleep(Duration::from_secs(6));
    controller = Killed(controller_process(&config, &log));
    wait_for(
        "the controller serves again",
        Duration::from_secs(30),
        || serving().then_some(()),
    );
    let done = wait_for("the release succeeds", Duration::from_secs(120), || {
        let r = cli_json(&addr, &admin, &["release", "status", &id]);
        (r["state"] == "succeeded").then_some(r)
    });
    assert_eq!(state_of(&done, "kill-a"), "passed");
    assert_eq!(state_of(&done, "kill-b"), "passed");
    let jobs = cli_json(&addr, &admin, &["jobs", "--app", app, "--limit", "50"]);
    let deploys: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "deploy" && j["id"].as_str().unwrap_or("").starts_with(&id))
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(deploys.len(), 2, "one deploy per host: {deploys:?}");
    for agent in &agents {
        assert_eq!(
            version_at(agent.public(port)).await.as_deref(),
            Some("v1.1.0"),
            "{}",
            agent.host
        );
        // The agent's own release table: v1.1.0 was deployed there once.
        let table = cli_json(&addr, &admin, &["releases", app, "--host", &agent.host]);
        let of_v11 = table
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["version"] == "v1.1.0")
            .count();
        assert_eq!(of_v11, 1, "{}: {table}", agent.host);
    }
    drop(controller);
}
