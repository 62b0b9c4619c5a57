//! `drover cancel` and secret redaction, through the real `drover` binary, a real controller
//! and a real agent on the real Docker Engine: a deploy cancelled in its health step and in
//! its watch window (the old release serves throughout, the lock is free after), a backup
//! cancelled mid-stream (no partial file left), cancels of finished and unknown jobs; and a
//! failing migration that prints its `DATABASE_URL`, whose log tail reaches `drover` and the
//! controller's store without the secret.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use drover_e2e::deploys::{AppGuard, Load, app_containers, spec, test_repo};
use drover_e2e::{
    TestAgent, TestController, docker_available, fast_controller_config, free_port, http, init,
};
use serde_json::Value;

/// Runs `drover ARGS` as the admin on a blocking thread (the in-process daemons keep
/// working): (exit code, stdout, stderr).
async fn drover(controller: &TestController, args: &[&str]) -> (i32, String, String) {
    let (addr, identity) = (controller.addr.to_string(), controller.admin_dir());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = drover_e2e::drover_cli(&addr, &identity, &args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn version_at(addr: SocketAddr) -> String {
    match http(addr, "GET", "/").await {
        Ok((200, body)) => body.trim().trim_start_matches("version=").to_string(),
        other => format!("{other:?}"),
    }
}

/// Waits (bounded) until the job's first target is running `step`.
async fn wait_for_step(controller: &TestController, job: &str, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record = controller.shared.store.job(job).unwrap().expect("the job");
        let t = &record.targets[0];
        if t.step == step && !t.state.is_finished() {
            return;
        }
        assert!(
            !t.state.is_finished() && Instant::now() < deadline,
            "job {job} never ran {step}: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every file under `dir` (recursively) that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

fn write_secrets(agent_dir: &Path, app: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let dir = agent_dir.join("secrets");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{app}.env"));
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_a_failing_migration_prints_never_leaves_the_host() {
    if !docker_available("a_secret_a_failing_migration_prints_never_leaves_the_host") {
        return;
    }
    init();
    let app = "leaky";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let agent_dir = dir.path().join("a");
    let addr = controller.addr.to_string();
    let mut agent = TestAgent::enroll_and_start(&controller, "leak-host", &agent_dir, &addr).await;
    agent.wait_connected().await;

    // The password holds characters a URL must encode; every form of it contains this.
    let needle = "s3cr3t-pw";
    let url = "postgresql://shop:Zq9%2Fs3cr3t-pw%40x@db.internal:5432/shop";
    write_secrets(&agent_dir, app, &format!("DATABASE_URL={url}\n"));
    let spec_file = dir.path().join("leaky.toml");
    std::fs::write(
        &spec_file,
        spec(
            app,
            &repo,
            listen,
            "migrate = [\"echo-env\"]\n[env]\nECHO_ENV = \"DATABASE_URL\"\n\
             [secrets.DATABASE_URL]\nmin_length = 16\n",
        ),
    )
    .unwrap();
    let (code, _, err) = drover(&controller, &["app", "apply", spec_file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = drover(&controller, &["deploy", app, "v1.0.0"]).await;
    let shown = format!("{out}{err}");
    assert_eq!(code, 1, "the migration fails: {shown}");
    assert!(
        shown.contains("Could not parse SQLAlchemy URL from string '[redacted:DATABASE_URL]'"),
        "the log tail is shown, the secret cut out: {shown}"
    );
    assert!(
        shown.contains("while connecting to [redacted:DATABASE_URL]"),
        "the percent-encoded form too: {shown}"
    );
    assert!(!shown.contains(needle), "the secret leaked: {shown}");

    let jobs = controller.cli_json(&["jobs", "--json"]);
    let id = jobs[0]["id"].as_str().unwrap().to_string();
    let (code, out, err) = drover(&controller, &["watch", &id, "--json"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(out.contains("[redacted:DATABASE_URL]"), "{out}");
    assert!(
        !out.contains(needle) && !err.contains(needle),
        "leaked: {out}{err}"
    );

    agent.stop().await;
    controller.stop().await;
    // Neither the controller's store nor the agent's (its outbox) ever held it.
    let stored = files_holding(&dir.path().join("c"), needle.as_bytes());
    assert!(
        stored.is_empty(),
        "the controller stored the secret: {stored:?}"
    );
    let stored = files_holding(&agent_dir.join("store"), needle.as_bytes());
    assert!(
        stored.is_empty(),
        "the agent's store holds the secret: {stored:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drover_cancel_stops_a_deploy_in_health_and_in_the_watch_window() {
    if !docker_available("drover_cancel_stops_a_deploy_in_health_and_in_the_watch_window") {
        return;
    }
    init();
    let app = "cancelme";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let addr = controller.addr.to_string();
    let mut agent =
        TestAgent::enroll_and_start(&controller, "cancel-host", &dir.path().join("a"), &addr).await;
    agent.wait_connected().await;
    let spec_file = dir.path().join("cancelme.toml");
    let apply = |extra: &str, window: &str, retries: u32| {
        let text = spec(app, &repo, listen, extra)
            .replace("window = \"1s\"", &format!("window = \"{window}\""))
            .replace("retries = 5", &format!("retries = {retries}"));
        std::fs::write(&spec_file, text).unwrap();
        let file = spec_file.to_str().unwrap().to_string();
        let controller = &controller;
        async move {
            let (code, _, err) = drover(controller, &["app", "apply", &file]).await;
            assert_eq!(code, 0, "{err}");
        }
    };
    let detach = |version: &'static str| {
        let controller = &controller;
        async move {
            let (code, out, err) = drover(controller, &["deploy", app, version, "--detach"]).await;
            assert_eq!(code, 0, "{err}");
            out.trim().to_string()
        }
    };

    apply("", "1s", 5).await;
    let (code, _, err) = drover(&controller, &["deploy", app, "v1.0.0"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(version_at(listen).await, "v1.0.0");
    let load = Load::start(listen, 2);

    // 1. Held in its health step (a check that never passes, 200 tries): cancelled there.
    apply("[env]\nFAIL_HEALTH = \"1\"\n", "1s", 200).await;
    let job = detach("v1.1.0").await;
    wait_for_step(&controller, &job, "health").await;
    let (code, out, err) = drover(&controller, &["cancel", &job]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("cancel of job {job} requested")),
        "{out}"
    );
    let (code, out, err) = drover(&controller, &["watch", &job]).await;
    assert_eq!(code, 5, "a cancelled job exits 5: {out}{err}");
    assert!(
        err.contains("was cancelled by admin on cancel-host at step health"),
        "{err}"
    );
    let (code, out, _) = drover(&controller, &["watch", &job, "--json"]).await;
    assert_eq!(code, 5);
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "cancelled", "{last}");
    assert_eq!(last["cancel_requested_by"], "admin", "{last}");
    assert_eq!(version_at(listen).await, "v1.0.0", "the old release serves");
    let left: Vec<String> = app_containers(app).into_iter().map(|(n, _)| n).collect();
    assert!(
        left.iter().all(|n| n.contains("v1.0.0")),
        "the cancelled deploy's containers are gone: {left:?}"
    );

    // 2. In its watch window: switched back, like a breach.
    apply("", "120s", 5).await;
    let job = detach("v1.1.0").await;
    wait_for_step(&controller, &job, "watch").await;
    assert_eq!(
        version_at(listen).await,
        "v1.1.0",
        "the new release took over"
    );
    let (code, _, err) = drover(&controller, &["cancel", &job, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = drover(&controller, &["watch", &job]).await;
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("at step watch"), "{err}");
    assert_eq!(version_at(listen).await, "v1.0.0", "switched back");

    // The lock is free: the next deploy runs at once.
    apply("", "1s", 5).await;
    let (code, out, err) = drover(&controller, &["deploy", app, "v1.1.0"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(version_at(listen).await, "v1.1.0");
    let (ok, failed, failures) = load.finish().await;
    assert!(ok > 0);
    assert_eq!(failed, 0, "no request failed throughout: {failures:?}");

    // A finished job: said so, exit 0, nothing changed. An unknown one: exit 68.
    let (code, out, err) = drover(&controller, &["cancel", &job]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("already finished (cancelled)"), "{out}");
    let (code, _, err) = drover(&controller, &["cancel", "deploy-20000101-000000-0000"]).await;
    assert_eq!(code, 68, "{err}");
    assert!(err.contains("unknown job"), "{err}");

    agent.stop().await;
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_cancelled_mid_stream_leaves_no_partial_file() {
    if !docker_available("a_backup_cancelled_mid_stream_leaves_no_partial_file") {
        return;
    }
    init();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let agent_dir = dir.path().join("a");
    let addr = controller.addr.to_string();
    let mut agent = TestAgent::enroll_and_start(&controller, "bk-host", &agent_dir, &addr).await;
    agent.wait_connected().await;
    // 256 MiB that do not compress (a sparse file would be stored as a sparse tar entry):
    // long enough to stream (debug build) that the cancel lands mid-dump.
    let src = dir.path().join("files");
    std::fs::create_dir_all(&src).unwrap();
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 268435456 /dev/urandom > {}",
            src.join("big.bin").display()
        ))
        .status()
        .unwrap();
    assert!(made.success());
    controller
        .apply_target(&format!(
            "name = \"bigfiles\"\nhost = \"bk-host\"\n[path]\ndir = \"{}\"\n",
            src.display()
        ))
        .await;

    let (code, out, err) = drover(&controller, &["backup", "run", "bigfiles", "--detach"]).await;
    assert_eq!(code, 0, "{err}");
    let job = out.trim().to_string();
    // Mid-dump: the first progress line of bytes read.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record = controller.shared.store.job(&job).unwrap().unwrap();
        let t = &record.targets[0];
        if t.step == "dump" && t.message.contains("read") {
            break;
        }
        assert!(
            !t.state.is_finished() && Instant::now() < deadline,
            "the dump never showed progress: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _, err) = drover(&controller, &["cancel", &job]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = drover(&controller, &["watch", &job]).await;
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("at step dump"), "{err}");

    let left: Vec<String> = std::fs::read_dir(agent_dir.join("backups/bigfiles"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "nothing of the cancelled backup is left: {left:?}"
    );
    let listed = controller.cli_json(&["backup", "list", "bigfiles", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");

    agent.stop().await;
    controller.stop().await;
}
