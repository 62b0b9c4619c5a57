//! kill -9 of a real `drover-agent` process at every step of a deploy: after a restart the
//! agent converges to exactly one serving version (the old one, or the new one once traffic had
//! moved and it is healthy), removes the job's orphan containers, releases the lock and
//! reports the job `interrupted` with what it did. And kill -9 in the middle of a validation's
//! test restore into a scratch database on a real PostgreSQL server: the restarted agent drops
//! that database and reports what it did.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_agent::jobevent::{self, field};
use drover_e2e::deploys::{AppGuard, app_containers, spec, test_repo};
use drover_e2e::pg::HostPg;
use drover_e2e::{
    TestController, bin, docker_available, eventually, fast_controller_config, free_port, http,
    init,
};
use drover_proto::v1;

/// A `drover-agent run` process, killed with SIGKILL when dropped.
struct AgentProcess(Child);

impl AgentProcess {
    fn start(config: &Path, data_dir: &Path, pause_at: Option<&str>, log: &Path) -> AgentProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(bin("drover-agent"));
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
}

impl Setup {
    /// A controller and a `drover-agent` for `host` enrolled with the real binary into
    /// `dir/agent`, its config written with test timings (not started yet).
    async fn enroll(dir: &Path, host: &str) -> Setup {
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
                 reconnect_max = \"2s\"\nlock_lease = \"3s\"\nsecrets_dir = \"{}\"\n",
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
        }
    }

    async fn deploy(&self, version: &str) -> String {
        self.controller
            .admin()
            .deploy(v1::DeployRequest {
                app: "crash".into(),
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
        let agent = AgentProcess::start(&self.config, &self.data, pause_at, &self.log);
        eventually(
            "the agent's new session",
            Duration::from_secs(30),
            || async {
                let h = self.controller.host(&self.host).await?;
                (h.session_open && h.last_seen_unix_ms > since).then_some(())
            },
        )
        .await;
        agent
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
        // Every container left belongs to a live or kept release: no orphans.
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
            .map(|r| drover_agent::deploy::container_name(app, "web", &r.version, &r.id))
            .collect();
        wanted.sort();
        let names: Vec<String> = containers.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            names, wanted,
            "{point}: containers vs releases {releases:?}"
        );
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
    let prefix = drover_agent::backup::verify::scratch_prefix(&job);
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
