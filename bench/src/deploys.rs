//! `drover-bench deploys`: zero-downtime deploys under load, against the seeds' way of
//! deploying, in one run with the same app and the same load.
//!
//! The real `drover-controller` and `drover-agent` run as processes; the real `drover` CLI
//! deploys. A paced load (keep-alive HTTP/1.1, as a reverse proxy in front would send it) runs
//! through the agent's proxy during N deploys alternating two versions, then M rollbacks. Then
//! the same load runs against a container published with `docker run -p` while the same N
//! deploys are done as `docker stop old; docker rm old; docker run new` plus a health poll.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::realhost::{RealHost, drover};
use crate::{Report, free_port, median, percentile};

/// Options of `drover-bench deploys`.
#[derive(Debug)]
pub struct DeployOpts {
    pub deploys: usize,
    pub rollbacks: usize,
    pub rate: u32,
    pub watch: Duration,
    pub bin_dir: PathBuf,
}

/// Counts of a paced load.
#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

/// A paced, open-loop HTTP load: `rate` requests a second whatever the answers take.
struct Load {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr, rate: u32) -> Load {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        let (c, s, f) = (counts.clone(), stop.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let uri: hyper::Uri = format!("http://{addr}/").parse().expect("uri");
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let (client, uri, c, f) = (client.clone(), uri.clone(), c.clone(), f.clone());
                c.sent.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let result = tokio::time::timeout(Duration::from_secs(10), async {
                        let response = client.get(uri).await.map_err(|e| format!("{e:?}"))?;
                        let status = response.status();
                        response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(status)
                    })
                    .await;
                    match result {
                        Ok(Ok(status)) if status.is_success() => {
                            c.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            c.failed.fetch_add(1, Ordering::Relaxed);
                            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                            if f.len() < 5 {
                                f.push(format!("{other:?}"));
                            }
                        }
                    }
                });
            }
        });
        Load {
            counts,
            stop,
            failures,
            task,
        }
    }

    /// Stops sending, lets answers in flight arrive, returns (sent, ok, failed, first failures).
    async fn finish(self) -> (u64, u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c = &self.counts;
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        (
            c.sent.load(Ordering::Relaxed),
            c.ok.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
            failures,
        )
    }
}

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The `job.finished` fields in a `drover deploy --json` output.
fn finished_fields(ndjson: &str) -> Option<Value> {
    ndjson
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["kind"] == "job.finished")
        .map(|v| v["fields"].clone())
}

async fn wait_http_ok(addr: SocketAddr, path: &str, patience: Duration) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(answer) = drover_agent::httpcheck::get(addr, path, Duration::from_secs(1)).await
            && drover_agent::httpcheck::healthy(&answer)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr}{path} did not answer within {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn deploys(o: DeployOpts) -> Result<Report> {
    for tag in ["v1.0.0", "v1.1.0"] {
        docker(&["image", "inspect", &format!("drover-testapp:{tag}")])
            .context("the test app images are missing: run scripts/testapp-image.sh first")?;
        docker(&[
            "tag",
            &format!("drover-testapp:{tag}"),
            &format!("drover-bench:{tag}"),
        ])?;
    }
    let tmp = tempfile::tempdir()?;
    let host = RealHost::start(
        &o.bin_dir,
        tmp.path(),
        &format!(
            "secrets_dir = \"{}\"\n",
            tmp.path().join("secrets").display()
        ),
    )
    .await?;
    let (addr, admin, drover_bin) = (
        host.addr.clone(),
        host.admin.clone(),
        host.drover_bin.clone(),
    );
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let spec = tmp.path().join("bench.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"bench\"\nimage = \"drover-bench\"\n[web]\nport = 8080\nlisten = \"{listen}\"\n\
             [watch]\nwindow = \"{}ms\"\n",
            o.watch.as_millis()
        ),
    )?;
    let spec_s = spec.to_str().context("path is not UTF-8")?;
    // The agent needs a moment to connect.
    let deadline = Instant::now() + Duration::from_secs(30);
    while drover(&drover_bin, &addr, &admin, &["app", "apply", spec_s])
        .await
        .is_err()
        || drover(
            &drover_bin,
            &addr,
            &admin,
            &["deploy", "bench", "v1.0.0", "--host", "bench"],
        )
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!(
                "the first deploy did not succeed within 30s; see {}",
                tmp.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "drover: first deploy done; {} deploys under {} req/s",
        o.deploys, o.rate
    );

    // --- drover: deploys and rollbacks under load ------------------------------------------
    let versions = ["v1.1.0", "v1.0.0"];
    let load = Load::start(listen, o.rate);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut deploy_ms = Vec::new();
    let mut first_request_ms = Vec::new();
    for i in 0..o.deploys {
        let v = versions[i % 2];
        let (took, _, out) = drover(
            &drover_bin,
            &addr,
            &admin,
            &["deploy", "bench", v, "--host", "bench", "--json"],
        )
        .await?;
        deploy_ms.push(ms(took));
        if let Some(f) = finished_fields(&out)
            && let Some(gap) = f["first_request_after_healthy_ms"]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
        {
            first_request_ms.push(gap);
        }
    }
    let mut rollback_ms = Vec::new();
    for i in 0..o.rollbacks {
        // Deploy the other version, then roll back to the one before it.
        let v = versions[(o.deploys + i) % 2];
        drover(
            &drover_bin,
            &addr,
            &admin,
            &["deploy", "bench", v, "--host", "bench", "--json"],
        )
        .await?;
        let (took, _, _) = drover(
            &drover_bin,
            &addr,
            &admin,
            &["rollback", "bench", "--host", "bench", "--json"],
        )
        .await?;
        rollback_ms.push(ms(took));
    }
    let (sent, ok, failed, failures) = load.finish().await;
    eprintln!("drover: {sent} requests, {failed} failed");

    // --- the seeds' way: docker stop old; docker rm old; docker run new ---------------------
    let port = free_port()?;
    let seed_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let publish = format!("127.0.0.1:{port}:8080");
    let name = |i: usize| format!("drover-bench-seed-{}-{i}", std::process::id());
    docker(&[
        "run",
        "-d",
        "--name",
        &name(0),
        "-p",
        &publish,
        "drover-bench:v1.0.0",
    ])?;
    wait_http_ok(seed_addr, "/healthz", Duration::from_secs(30)).await?;
    let seed_load = Load::start(seed_addr, o.rate);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seed_ms = Vec::new();
    let mut seed_result = Ok(());
    for i in 0..o.deploys {
        let v = versions[i % 2];
        let started = Instant::now();
        let step = async {
            docker(&["stop", &name(i)])?;
            docker(&["rm", &name(i)])?;
            docker(&[
                "run",
                "-d",
                "--name",
                &name(i + 1),
                "-p",
                &publish,
                &format!("drover-bench:{v}"),
            ])?;
            // The seeds' health check: a curl loop until the new container answers.
            wait_http_ok(seed_addr, "/healthz", Duration::from_secs(30)).await
        };
        if let Err(e) = step.await {
            seed_result = Err(e);
            break;
        }
        seed_ms.push(ms(started.elapsed()));
    }
    let (seed_sent, seed_ok, seed_failed, seed_failures) = seed_load.finish().await;
    for i in 0..=o.deploys {
        let _ = docker(&["rm", "-f", &name(i)]);
    }
    seed_result?;
    let _ = Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=drover.app=bench"])
        .output()
        .map(|out| {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(String::from)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .arg("rm")
                    .arg("-f")
                    .args(&ids)
                    .output();
            }
        });

    let summary = format!(
        "{n} deploys alternating v1.1.0/v1.0.0 under {rate} req/s (keep-alive), watch window {watch:?}\n\
         \n\
         measure                                   drover        stop-then-start   goal\n\
         requests sent                             {sent:<13} {seed_sent:<17} -\n\
         failed requests                           {failed:<13} {seed_failed:<17} 0\n\
         unserved time per deploy (ms, failed/rate) {down:<12.0} {seed_down:<17.0} 0\n\
         deploy command to done, p50 (ms)          {d50:<13.0} {s50:<17.0} <= 3000\n\
         deploy command to done, p95 (ms)          {d95:<13.0} {s95:<17.0} -\n\
         healthy -> first request served, p50 (ms) {f50:<13.0} -                 <= 250\n\
         healthy -> first request served, p95 (ms) {f95:<13.0} -                 -\n\
         rollback command to done, p50 (ms)        {r50:<13.0} -                 <= 2000\n\
         rollback command to done, p95 (ms)        {r95:<13.0} -                 -\n\
         drover failures: {failures:?}\nstop-then-start failures (first 5): {seed_failures:?}",
        n = o.deploys,
        rate = o.rate,
        watch = o.watch,
        down = failed as f64 * 1000.0 / f64::from(o.rate) / o.deploys.max(1) as f64,
        seed_down = seed_failed as f64 * 1000.0 / f64::from(o.rate) / o.deploys.max(1) as f64,
        d50 = median(&deploy_ms),
        d95 = percentile(&deploy_ms, 95.0),
        s50 = median(&seed_ms),
        s95 = percentile(&seed_ms, 95.0),
        f50 = median(&first_request_ms),
        f95 = percentile(&first_request_ms, 95.0),
        r50 = median(&rollback_ms),
        r95 = percentile(&rollback_ms, 95.0),
    );
    let json = json!({
        "deploys": o.deploys,
        "rollbacks": o.rollbacks,
        "rate": o.rate,
        "watch_ms": o.watch.as_millis() as u64,
        "drover": {
            "sent": sent, "ok": ok, "failed": failed,
            "deploy_ms": deploy_ms, "first_request_after_healthy_ms": first_request_ms,
            "rollback_ms": rollback_ms,
        },
        "stop_then_start": {
            "sent": seed_sent, "ok": seed_ok, "failed": seed_failed, "deploy_ms": seed_ms,
        },
    });
    Ok(Report { summary, json })
}
