//! Helpers for deploy tests on the real Docker Engine: per-test image repositories (so pruning
//! in one test never untags another test's images), app specs, a steady HTTP load, and the
//! removal of every container a test's apps left behind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::{http, testapp_image};

/// Tags the test app images `drover-testapp:<tag>` as `drover-t-<test>:<tag>` for each tag and
/// returns the repository `drover-t-<test>`.
pub fn test_repo(test: &str, tags: &[&str]) -> String {
    let repo = format!("drover-t-{test}");
    for tag in tags {
        let base = testapp_image(tag);
        let out = std::process::Command::new("docker")
            .args(["tag", &base, &format!("{repo}:{tag}")])
            .output()
            .expect("docker tag");
        assert!(
            out.status.success(),
            "docker tag: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    repo
}

/// A minimal spec for the test app: web on container port 8080, public on `listen`, fast
/// health checks and a short watch window; `extra` is appended verbatim (TOML).
pub fn spec(app: &str, repo: &str, listen: SocketAddr, extra: &str) -> String {
    format!(
        "name = \"{app}\"\nimage = \"{repo}\"\ndrain_timeout = \"5s\"\nstop_timeout = \"2s\"\n\
         {extra}\n\
         [web]\nport = 8080\nlisten = \"{listen}\"\n\
         [health]\npath = \"/healthz\"\ninterval = \"300ms\"\ntimeout = \"1s\"\nretries = 5\n\
         [watch]\nwindow = \"1s\"\nmax_5xx_ratio = 0.05\nmax_p95_latency = \"1s\"\n"
    )
}

/// Removes every container labelled as belonging to `app` (after a test, pass or fail).
pub fn remove_app_containers(app: &str) {
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=drover.app={app}")])
        .output()
        .expect("docker ps");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

/// Names of `app`'s containers with their state (`running`, `exited`...), sorted by name.
pub fn app_containers(app: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=drover.app={app}"),
            "--format",
            "{{.Names}} {{.State}}",
        ])
        .output()
        .expect("docker ps");
    let mut list: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    list.sort();
    list
}

/// Removes an app's containers when dropped.
pub struct AppGuard(pub String);

impl Drop for AppGuard {
    fn drop(&mut self) {
        remove_app_containers(&self.0);
    }
}

/// A steady HTTP load on `addr` from `clients` tasks, counting answers by version and failures.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    window: Arc<std::sync::Mutex<Option<(std::time::Instant, std::time::Instant)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let window = Arc::new(std::sync::Mutex::new(None));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed, failures, window) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    failures.clone(),
                    window.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match http(addr, "GET", "/").await {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let now = std::time::Instant::now();
                                let mut w = window.lock().unwrap();
                                *w = Some(w.map_or((now, now), |(first, _)| (first, now)));
                                drop(w);
                                let mut f = failures.lock().unwrap();
                                if f.len() < 5 {
                                    f.push(format!("{other:?}"));
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            failures,
            window,
            tasks,
        }
    }

    /// Time from the first failed request to the last one, if any failed.
    pub fn failure_span(&self) -> Option<Duration> {
        self.window.lock().unwrap().map(|(a, b)| b - a)
    }

    /// When the first and the last failed request ended, if any failed.
    pub fn failure_window(&self) -> Option<(std::time::Instant, std::time::Instant)> {
        *self.window.lock().unwrap()
    }

    /// Stops the clients; returns (ok, failed, the first failures).
    pub async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let failures = self.failures.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            failures,
        )
    }
}

/// A deploy job as the agent's session would submit it for a controller command.
pub fn deploy_job(
    id: &str,
    app: &str,
    version: &str,
    spec_toml: &str,
) -> drover_agent::store::JobRecord {
    drover_agent::store::JobRecord {
        id: id.to_string(),
        kind: drover_agent::store::JobKind::Deploy,
        app: app.to_string(),
        version: version.to_string(),
        spec_toml: spec_toml.to_string(),
        spec_revision: 1,
        skip_backup: false,
        wait_lock: false,
        skip_migration: false,
        keep_previous: false,
        requested_by: "tester".into(),
        accepted_unix_ms: drover_agent::unix_ms(),
        step: String::new(),
        finished: false,
        release: String::new(),
        previous: String::new(),
        switched: false,
        backup: None,
    }
}

/// A rollback job (`to` empty: the previous release).
pub fn rollback_job(id: &str, app: &str, to: &str) -> drover_agent::store::JobRecord {
    drover_agent::store::JobRecord {
        kind: drover_agent::store::JobKind::Rollback,
        spec_toml: String::new(),
        ..deploy_job(id, app, to, "")
    }
}
