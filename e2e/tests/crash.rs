//! kill -9 of a real `drover-agent` process at every step of a deploy: after a restart the
//! agent converges to exactly one serving version (the old one, or the new one once traffic had
//! moved and it is healthy), removes the job's orphan containers, releases the lock and
//! reports the job `interrupted` with what it did. And kill -9 in the middle of a validation's
//! test restore into a scratch database on a real PostgreSQL server: the restarted agent drops
//! that database and reports what it did. Around restarts of the real agent: requests through
//! the app's port never meet a proxy with nothing live, the port answers again quickly, and an
//! interrupted deploy leaves no more than `keep_releases`. And 1,100 slowloris connections on
//! a proxy port of a real agent with the usual soft open-file limit of 1024.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_e2e::deploys::{AppGuard, app_containers, spec, test_repo};
use drover_e2e::pg::HostPg;
use drover_e2e::{
    TestController, bin, docker_available, eventually, fast_controller_config, free_port, http,
    init,
};
use drover_model::jobevent::{self, field};
use drover_proto::v1;

/// A `drover-agent run` process, killed with SIGKILL when dropped.
struct AgentProcess(Child);

impl AgentProcess {
    /// Starts `drover-agent run`; with `nofile` ("soft:hard") under that open-file limit
    /// (`prlimit` execs the agent, so the pid is the agent's).
    fn start(
        config: &Path,
        data_dir: &Path,
        pause_at: Option<&str>,
        log: &Path,
        nofile: Option<&str>,
    ) -> AgentProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = match nofile {
            Some(limits) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={limits}"))
                    .arg("--")
                    .arg(bin("drover-agent"));
                c
            }
            None => Command::new(bin("drover-agent")),
        };
        cmd.args(["run", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(point) = pause_at {
            cmd.env("DROVER_AGENT_PAUSE_AT", point);
        }
        AgentProcess(cmd.spawn().expect("start drover-agent"))
    }

    fn kill9(mut self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn version_at(addr: SocketAddr) -> Option<String> {
    match http(addr, "GET", "/").await {
        Ok((200, body)) => Some(body.trim().trim_start_matches("version=").to_string()),
        _ => None,
    }
}

struct Setup {
    controller: TestController,
    host: String,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// The agent's open-file limit ("soft:hard"), when not the test's own.
    nofile: Option<&'static str>,
}

impl Setup {
    /// A controller and a `drover-agent` for `host` enrolled with the real binary into
    /// `dir/agent`, its config written with test timings (not started yet).
    async fn enroll(dir: &Path, host: &str) -> Setup {
        Setup::enroll_with(dir, host, "").await
    }

    /// Like [`Setup::enroll`], with `extra` appended to the agent's config.
    async fn enroll_with(dir: &Path, host: &str, extra: &str) -> Setup {
        let controller = TestController::start(fast_controller_config(&dir.join("c"))).await;
        let data = dir.join("agent");
        let token = controller.token(host).await;
        let out = Command::new(bin("drover-agent"))
            .args([
                "enroll",
                "--controller",
                &controller.addr.to_string(),
                "--data-dir",
            ])
            .arg(&data)
            .env("DROVER_TOKEN", &token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "heartbeat_interval = \"1s\"\nhealth_interval = \"2s\"\nhealth_sample_interval = \"1s\"\n\
                 reconnect_max = \"2s\"\nlock_lease = \"3s\"\nsecrets_dir = \"{}\"\n{extra}",
                dir.join("secrets").display()
            ),
        )
        .unwrap();
        Setup {
            controller,
            host: host.to_string(),
            config,
            data,
            log: dir.join("agent.log"),
            nofile: None,
        }
    }

    async fn apply(&self, spec_toml: String) {
        self.controller
            .admin()
            .apply_app(v1::ApplyAppRequest {
                spec_toml,
                source: "app.toml".into(),
            })
            .await
            .expect("apply the app");
    }

    async fn deploy(&self, version: &str) -> String {
        self.deploy_app("crash", version).await
    }

    async fn deploy_app(&self, app: &str, version: &str) -> String {
        self.controller
            .admin()
            .deploy(v1::DeployRequest {
                app: app.into(),
                version: version.into(),
                hosts: vec![self.host.clone()],
                ..Default::default()
            })
            .await
            .expect("deploy accepted")
            .into_inner()
            .id
    }

    async fn finished(&self, job: &str) -> drover_controller::store::EventRecord {
        self.controller
            .wait_job(&self.host, job, Duration::from_secs(90))
            .await
    }

    fn started(&self, job: &str, step: &str) -> bool {
        self.controller.job_events(&self.host, job).iter().any(|e| {
            e.kind == jobevent::STEP
                && e.fields.get(field::STEP).map(String::as_str) == Some(step)
                && e.fields.get(field::STATUS).map(String::as_str) == Some("started")
        })
    }

    /// Starts the agent and waits until its new session is up.
    async fn agent(&self, pause_at: Option<&str>) -> AgentProcess {
        let since = drover_agent::unix_ms();
        let agent = self.spawn(pause_at);
        self.wait_session(since).await;
        agent
    }

    /// Starts the agent without waiting for anything.
    fn spawn(&self, pause_at: Option<&str>) -> AgentProcess {
        AgentProcess::start(&self.config, &self.data, pause_at, &self.log, self.nofile)
    }

    /// Waits until a session opened after `since` (Unix ms) is up.
    async fn wait_session(&self, since: i64) {
        eventually(
            "the agent's new session",
            Duration::from_secs(30),
            || async {
                let h = self.controller.host(&self.host).await?;
                (h.session_open && h.last_seen_unix_ms > since).then_some(())
            },
        )
        .await;
    }
}

// Multi-threaded: the in-process controller keeps serving while this thread waits on the
// real programs it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_every_step_converges_to_one_serving_version() {
    if !docker_available("kill_9_at_every_step_converges_to_one_serving_version") {
        return;
    }
    init();
    let app = "crash";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::enroll(dir.path(), "crash-host").await;
    let the_spec = spec(
        app,
        &repo,
        listen,
        "migrate = [\"migrate\"]\n[[smoke]]\npath = \"/smoke\"\nbody_contains = \"ok\"\n",
    )
    .replace("window = \"1s\"", "window = \"2s\"");
    setup
        .controller
        .admin()
        .apply_app(v1::ApplyAppRequest {
            spec_toml: the_spec,
            source: "crash.toml".into(),
        })
        .await
        .expect("apply the app");

    let agent = setup.agent(None).await;
    let job = setup.deploy("v1.0.0").await;
    let done = setup.finished(&job).await;
    assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");
    agent.kill9();
    let mut live = "v1.0.0".to_string();

    // Each point, and whether traffic had moved to the new version when the process died.
    let points = [
        ("validate", false),
        ("lock", false),
        ("backup", false),
        ("image", false),
        ("migrate", false),
        ("start", false),
        ("health", false),
        ("smoke", false),
        ("switch", false),
        ("switch:committed", true),
        ("drain", true),
        ("watch", true),
        ("stop_old", true),
        ("prune", true),
    ];
    for (point, moved) in points {
        let next = if live == "v1.0.0" { "v1.1.0" } else { "v1.0.0" };
        let paused = setup.agent(Some(point)).await;
        let job = setup.deploy(next).await;
        let step = point.split(':').next().unwrap();
        eventually(
            &format!("the deploy reaches {point}"),
            Duration::from_secs(60),
            || async { setup.started(&job, step).then_some(()) },
        )
        .await;
        // The pause follows the step's event by a moment (switch:committed by a commit).
        tokio::time::sleep(Duration::from_millis(300)).await;
        paused.kill9();

        let agent = setup.agent(None).await;
        let done = setup.finished(&job).await;
        assert_eq!(
            done.fields[field::RESULT],
            "interrupted",
            "{point}: {done:?}"
        );
        assert_eq!(done.fields[field::STEP], step, "{point}: {done:?}");
        assert!(
            done.message
                .contains(&format!("the agent stopped during step {step}")),
            "{point}: {}",
            done.message
        );
        let want = if moved { next } else { live.as_str() }.to_string();
        assert_eq!(done.fields[field::LIVE_VERSION], want, "{point}: {done:?}");
        let serving = eventually(
            &format!("{point}: {want} serves on {listen}"),
            Duration::from_secs(30),
            || async { version_at(listen).await.filter(|v| *v == want) },
        )
        .await;
        assert_eq!(serving, want);
        // Exactly one web container runs; nothing of a failed release is left.
        let containers = app_containers(app);
        let running: Vec<&(String, String)> =
            containers.iter().filter(|(_, s)| s == "running").collect();
        assert_eq!(running.len(), 1, "{point}: {containers:?}");
        assert!(running[0].0.contains(&want), "{point}: {containers:?}");
        // Every container left belongs to a live or kept release: no orphans. The release
        // table recovery's sweep changes (pruning beyond keep_releases) reaches the controller
        // in an event of its own, just after the job's end: allow it a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let releases = setup
                .controller
                .admin()
                .list_releases(v1::ListReleasesRequest {
                    app: app.into(),
                    host: setup.host.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .releases;
            let mut wanted: Vec<String> = releases
                .iter()
                .filter(|r| r.state == "live" || r.state == "kept")
                .map(|r| {
                    drover_agent::release::container_name(
                        &setup.host,
                        app,
                        "web",
                        &r.version,
                        &r.id,
                    )
                })
                .collect();
            wanted.sort();
            let names: Vec<String> = app_containers(app).into_iter().map(|(n, _)| n).collect();
            if names == wanted {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{point}: containers {names:?} vs releases {releases:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        agent.kill9();
        live = want;
    }

    // The lock is free and the host healthy: a plain deploy still works.
    let _agent = setup.agent(None).await;
    let next = if live == "v1.0.0" { "v1.1.0" } else { "v1.0.0" };
    let job = setup.deploy(next).await;
    let done = setup.finished(&job).await;
    assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_test_restore_leaves_no_scratch_database() {
    let Some(pg) = HostPg::start() else { return };
    init();
    pg.create_db("shop");
    pg.psql(
        "shop",
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items SELECT i, md5(i::text) FROM generate_series(1, 20000) i;
         ANALYZE;",
    );
    let scratch_dbs = || {
        pg.psql(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname LIKE 'drover\\_verify\\_%' ORDER BY 1",
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::enroll(dir.path(), "db-host").await;
    setup
        .controller
        .apply_target(&format!(
            "name = \"shop-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n\
             [verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\n",
            pg.url
        ))
        .await;
    let agent = setup.agent(None).await;
    let backup = setup
        .controller
        .admin()
        .run_backup(v1::RunBackupRequest {
            target: "shop-db".into(),
            host: String::new(),
        })
        .await
        .expect("backup accepted")
        .into_inner();
    let done = setup.finished(&backup.id).await;
    assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");
    agent.kill9();

    // Killed right after the scratch database was made.
    let paused = setup.agent(Some("verify:scratch_made")).await;
    let jobs = setup
        .controller
        .admin()
        .verify(v1::VerifyRequest {
            target: "shop-db".into(),
            ..Default::default()
        })
        .await
        .expect("verify accepted")
        .into_inner()
        .jobs;
    let job = jobs[0].id.clone();
    let prefix = drover_agent::job::verify::scratch_prefix(&setup.host, &job);
    let left = eventually(
        "the scratch database exists",
        Duration::from_secs(60),
        || async { Some(scratch_dbs()).filter(|dbs| !dbs.is_empty()) },
    )
    .await;
    assert_eq!(left, format!("{prefix}0"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    paused.kill9();
    assert_eq!(
        scratch_dbs(),
        format!("{prefix}0"),
        "still there after the kill"
    );

    // The restarted agent drops it and says so.
    let _agent = setup.agent(None).await;
    let done = setup.finished(&job).await;
    assert_eq!(done.fields[field::RESULT], "interrupted", "{done:?}");
    assert_eq!(done.fields[field::STEP], "restore", "{done:?}");
    assert!(
        done.message
            .contains(&format!("dropped scratch database(s) {prefix}0")),
        "{}",
        done.message
    );
    assert_eq!(scratch_dbs(), "", "no scratch database left");
}

/// What one request through the app's port got, as a short label.
async fn answer_at(addr: SocketAddr) -> String {
    match tokio::time::timeout(Duration::from_secs(5), http(addr, "GET", "/")).await {
        Ok(Ok((200, _))) => "200".into(),
        Ok(Ok((503, body))) if body.contains("no release is live") => {
            "503 no release is live".into()
        }
        Ok(Ok((status, _))) => status.to_string(),
        Ok(Err(_)) => "no answer".into(),
        Err(_) => "no answer within 5s".into(),
    }
}

/// Right after a restart the proxy used to answer 503 "no release is live" for a live app, and
/// the port came back only 1.1-3.5 s after the restart (issue 11, 13). Steady load across five
/// kill -9 + restarts; prints the port-unanswered time (kill to the first 200) of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_load_never_answer_no_release_is_live() {
    if !docker_available("restarts_under_load_never_answer_no_release_is_live") {
        return;
    }
    init();
    let app = "restart";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::enroll(dir.path(), "restart-host").await;
    setup.apply(spec(app, &repo, listen, "")).await;
    let mut agent = setup.agent(None).await;
    let job = setup.deploy_app(app, "v1.0.0").await;
    let done = setup.finished(&job).await;
    assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, answers) = (stop.clone(), answers.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let label = answer_at(listen).await;
                    *answers.lock().unwrap().entry(label).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();

    let mut gaps = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let since = drover_agent::unix_ms();
        let killed = Instant::now();
        agent.kill9();
        agent = setup.spawn(None);
        let gap = loop {
            if answer_at(listen).await == "200" {
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "the port never answered again"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        gaps.push(gap);
        setup.wait_session(since).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    gaps.sort();
    eprintln!(
        "port unanswered across kill -9 + restart: median {:?}, all {gaps:?}; answers {answers:?}",
        gaps[gaps.len() / 2]
    );
    assert_eq!(
        answers.get("503 no release is live"),
        None,
        "a restarted agent answered for a live app that nothing was live: {answers:?}"
    );
    assert!(
        answers.get("200").copied().unwrap_or(0) > 100,
        "{answers:?}"
    );
    assert!(
        gaps[gaps.len() / 2] < Duration::from_secs(1),
        "the port answers within a second of a restart: {gaps:?}"
    );
}

/// A deploy interrupted after its switch never reached its prune step, so the host kept more
/// stopped releases than `keep_releases` until the next deploy (issue 11, 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_deploy_leaves_no_more_than_keep_releases() {
    if !docker_available("an_interrupted_deploy_leaves_no_more_than_keep_releases") {
        return;
    }
    init();
    let app = "keep";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0", "v2.0.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::enroll(dir.path(), "keep-host").await;
    // Slow stoppers: stopping the previous release during recovery takes stop_timeout (2 s),
    // one of the slow steps the port must not wait for.
    setup
        .apply(
            spec(
                app,
                &repo,
                listen,
                "keep_releases = 2\n[env]\nIGNORE_SIGTERM = \"1\"\n",
            )
            .replace("window = \"1s\"", "window = \"3s\""),
        )
        .await;
    let agent = setup.agent(None).await;
    for version in ["v1.0.0", "v1.1.0"] {
        let job = setup.deploy_app(app, version).await;
        let done = setup.finished(&job).await;
        assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");
    }
    assert_eq!(app_containers(app).len(), 2);
    agent.kill9();

    // Killed in the watch window of a third deploy: traffic had moved.
    let paused = setup.agent(Some("watch")).await;
    let job = setup.deploy_app(app, "v2.0.0").await;
    eventually(
        "the deploy reaches watch",
        Duration::from_secs(60),
        || async { setup.started(&job, "watch").then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    paused.kill9();
    assert_eq!(
        app_containers(app).len(),
        3,
        "three releases before recovery"
    );

    // The port answers before recovery has stopped the previous release.
    let since = drover_agent::unix_ms();
    let restarted = Instant::now();
    let _agent = setup.spawn(None);
    let gap = loop {
        if answer_at(listen).await == "200" {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "never answered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("port unanswered after kill -9 + restart, previous release stopping slowly: {gap:?}");
    assert!(
        gap < Duration::from_secs(1),
        "the port answered {gap:?} after the restart, behind recovery's slow steps"
    );
    setup.wait_session(since).await;
    let done = setup.finished(&job).await;
    assert_eq!(done.fields[field::RESULT], "interrupted", "{done:?}");
    assert_eq!(done.fields[field::LIVE_VERSION], "v2.0.0", "{done:?}");
    let containers = eventually(
        "recovery prunes beyond keep_releases",
        Duration::from_secs(30),
        || async { Some(app_containers(app)).filter(|c| c.len() <= 2) },
    )
    .await;
    assert!(
        containers
            .iter()
            .any(|(n, s)| n.contains("v2.0.0") && s == "running")
            && containers.iter().any(|(n, _)| n.contains("v1.1.0")),
        "the live release and the rollback target stay: {containers:?}"
    );
    // The agent reports its pruned table after it removed the containers: the controller's
    // copy follows.
    let controller = &setup.controller;
    let host = setup.host.clone();
    eventually(
        "the controller's table has v1.0.0 removed",
        Duration::from_secs(30),
        || async {
            let releases = controller
                .admin()
                .list_releases(v1::ListReleasesRequest {
                    app: app.into(),
                    host: host.clone(),
                })
                .await
                .ok()?
                .into_inner()
                .releases;
            releases
                .iter()
                .any(|r| r.version == "v1.0.0" && r.state == "removed")
                .then_some(())
        },
    )
    .await;
}

/// 1,100 slowloris connections on a proxy port used to stop the app answering, fail backups
/// ("Too many open files") and make health blame memory and Docker (issue 11, 2). The agent
/// runs with the usual soft limit of 1024 open files (hard 4096).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_a_proxy_port_leaves_the_app_backups_and_health_working() {
    if !docker_available("slowloris_on_a_proxy_port_leaves_the_app_backups_and_health_working") {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init();
    let app = "loris";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::enroll_with(
        dir.path(),
        "loris-host",
        "[proxy]\nheader_timeout = \"20s\"\nidle_timeout = \"20s\"\n",
    )
    .await;
    setup.nofile = Some("1024:4096");
    setup.apply(spec(app, &repo, listen, "")).await;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    for i in 0..50 {
        std::fs::write(files.join(format!("f{i}.txt")), vec![b'x'; 10_000]).unwrap();
    }
    setup
        .controller
        .apply_target(&format!(
            "name = \"loris-files\"\n[path]\ndir = \"{}\"\n",
            files.display()
        ))
        .await;
    let _agent = setup.agent(None).await;
    let job = setup.deploy_app(app, "v1.0.0").await;
    let done = setup.finished(&job).await;
    assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");

    // 1,100 connections, each with half a request head, then silence.
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..1100 {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    // Opening them takes a while on a loaded machine: health is judged from a sample taken
    // after the last one opened.
    let opened_ms = drover_agent::unix_ms();

    // The app still answers through the proxy.
    for _ in 0..20 {
        assert_eq!(answer_at(listen).await, "200");
    }
    // A backup still works (it needs files, a store and Docker).
    let backup = setup
        .controller
        .admin()
        .run_backup(v1::RunBackupRequest {
            target: "loris-files".into(),
            host: String::new(),
        })
        .await
        .expect("backup accepted")
        .into_inner();
    let done = setup.finished(&backup.id).await;
    assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");
    // Health, sampled while the connections are open, blames nothing and counts them.
    let report = eventually(
        "a health report sampled after the connections opened",
        Duration::from_secs(15),
        || async {
            let h = setup.controller.host(&setup.host).await?;
            let r = h.last_report?;
            (r.collected_unix_ms > opened_ms + 1000).then_some(r)
        },
    )
    .await;
    let check = |name: &str| {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name} check: {report:?}"))
            .clone()
    };
    for name in ["memory", "docker"] {
        let c = check(name);
        assert_eq!(
            c.status,
            v1::CheckStatus::Healthy as i32,
            "{name}: {}",
            c.reason
        );
    }
    let fds = check("fds");
    assert_eq!(
        fds.status,
        v1::CheckStatus::Healthy as i32,
        "{}",
        fds.reason
    );
    let open: u64 = fds
        .reason
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        open > 1100,
        "the slow connections are counted: {}",
        fds.reason
    );
    assert!(
        fds.reason.contains("limit 4096"),
        "the soft limit was raised to the hard one: {}",
        fds.reason
    );
    assert!(
        opened.elapsed() < Duration::from_secs(18),
        "checked before the header timeout: {:?}",
        opened.elapsed()
    );

    // The header timeout (20 s) closes every slow connection, not before.
    let mut buf = [0u8; 64];
    for s in &mut slow {
        let left = (opened + Duration::from_secs(30)).saturating_duration_since(Instant::now());
        let closed = matches!(
            tokio::time::timeout(left, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
        assert!(closed, "a slow connection outlived the header timeout");
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(19) && took < Duration::from_secs(30),
        "closed at the header timeout: {took:?}"
    );
    assert_eq!(answer_at(listen).await, "200");
}
