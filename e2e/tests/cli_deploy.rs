//! The whole path, as an operator uses it: the real `drover` binary asks a real controller,
//! which sends the job to a real agent, which deploys on the real Docker Engine; the CLI follows
//! the job live and exits by how it ended (0, 1, 3, 75), and `rollback`, `releases`, `jobs`
//! and `watch` report what happened.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use drover_e2e::deploys::{AppGuard, Load, spec, test_repo};
use drover_e2e::{
    TestAgent, TestController, docker_available, drover_cli, fast_controller_config, free_port,
    http, init,
};
use serde_json::Value;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `drover` on a blocking thread, so the in-process controller and agent keep working.
async fn drover(addr: &str, identity: &Path, args: &[&str]) -> Output {
    let (addr, identity) = (addr.to_string(), identity.to_path_buf());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        drover_cli(&addr, &identity, &args)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drover_deploy_rollback_releases_jobs_and_watch_on_the_real_engine() {
    if !docker_available("drover_deploy_rollback_releases_jobs_and_watch_on_the_real_engine") {
        return;
    }
    init();
    let app = "cli";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let addr = controller.addr.to_string();
    let mut agent =
        TestAgent::enroll_and_start(&controller, "cli-host", &dir.path().join("a"), &addr).await;
    agent.wait_connected().await;
    let admin = controller.admin_dir();
    let spec_file = dir.path().join("cli.toml");
    let apply = |extra: &str, window: &str| {
        let text = spec(app, &repo, listen, extra)
            .replace("window = \"1s\"", &format!("window = \"{window}\""));
        std::fs::write(&spec_file, text).unwrap();
    };

    apply("", "1s");
    let out = drover(
        &addr,
        &admin,
        &["app", "apply", spec_file.to_str().unwrap()],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));

    // A first deploy, followed live as plain lines (not a terminal), exit 0.
    let out = drover(&addr, &admin, &["deploy", app, "v1.0.0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let shown = text(&out);
    for step in ["validate", "image", "health", "switch", "watch", "prune"] {
        assert!(shown.contains(step), "{step} is shown: {shown}");
    }
    assert_eq!(version_at(listen).await, "v1.0.0");

    // The next one as NDJSON: events, then the finished job.
    let out = drover(&addr, &admin, &["deploy", app, "v1.1.0", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "job", "{last}");
    assert_eq!(last["state"], "succeeded", "{last}");
    assert!(lines.iter().any(|l| l["type"] == "event"));
    assert_eq!(version_at(listen).await, "v1.1.0");

    // A failing deploy: exit 1, the failing step, the reason and the container's logs.
    apply("[env]\nFAIL_HEALTH = \"1\"\n", "1s");
    drover(
        &addr,
        &admin,
        &["app", "apply", spec_file.to_str().unwrap()],
    )
    .await;
    let out = drover(&addr, &admin, &["deploy", app, "v1.0.0"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("health"), "{shown}");
    assert!(shown.contains("answered 503"), "{shown}");
    assert!(
        shown.contains("listening on port 8080"),
        "the log tail is shown: {shown}"
    );
    assert_eq!(
        version_at(listen).await,
        "v1.1.0",
        "the old version kept serving"
    );

    // A release that answers 5xx under real traffic: switched back, exit 3.
    apply("[env]\nERROR_RATE = \"1.0\"\n", "20s");
    drover(
        &addr,
        &admin,
        &["app", "apply", spec_file.to_str().unwrap()],
    )
    .await;
    let load = Load::start(listen, 4);
    let out = drover(&addr, &admin, &["deploy", app, "v1.0.0"]).await;
    load.finish().await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("answered 5xx"), "{}", text(&out));
    assert_eq!(version_at(listen).await, "v1.1.0");

    // The lock: a deploy in its watch window holds it; a second one exits 75 naming it.
    apply("", "4s");
    drover(
        &addr,
        &admin,
        &["app", "apply", spec_file.to_str().unwrap()],
    )
    .await;
    let out = drover(
        &addr,
        &admin,
        &["deploy", app, "v1.0.0", "--detach", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let holder: Value = serde_json::from_slice(&out.stdout).unwrap();
    let holder_id = holder["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = drover(&addr, &admin, &["deploy", app, "v1.0.0"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("locked by job {holder_id}")),
        "{}",
        text(&out)
    );
    let out = drover(&addr, &admin, &["watch", &holder_id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(version_at(listen).await, "v1.0.0");

    // Rollback: back to v1.1.0 in seconds.
    let out = drover(&addr, &admin, &["rollback", app]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(version_at(listen).await, "v1.1.0");

    // The records: releases with the live one and the rollback target, jobs with who and how.
    let out = drover(&addr, &admin, &["releases", app, "--json"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let releases: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let live: Vec<&Value> = releases.iter().filter(|r| r["live"] == true).collect();
    assert_eq!(live.len(), 1, "{releases:?}");
    assert_eq!(live[0]["version"], "v1.1.0");
    assert!(
        releases.iter().any(|r| r["state"] == "failed"),
        "failed attempts are listed"
    );
    let out = drover(&addr, &admin, &["jobs", "--json"]).await;
    let jobs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(jobs.len() >= 6, "{jobs:?}");
    let states: Vec<&str> = jobs.iter().filter_map(|j| j["state"].as_str()).collect();
    for state in ["succeeded", "failed", "rolled_back"] {
        assert!(states.contains(&state), "{state} in {states:?}");
    }
    assert!(
        jobs.iter().all(|j| j["requested_by"] == "admin"),
        "{jobs:?}"
    );
    agent.stop().await;
}
