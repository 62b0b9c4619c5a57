//! `drover-bench real-release`: fleet releases across N real `drover-agent` processes on the one
//! Docker Engine (each with its own data dir, its proxy on 127.0.0.(10+i)), driven by a real
//! controller (in process, as the e2e tests run it). Per run: the wall time of a release that
//! succeeds; then a release whose host in the last wave fails its health check, timed from that
//! host's `job.finished` (the agent's clock, this machine) to every updated host answering its
//! previous version through its own proxy (each proxy polled every 10 ms from the release's
//! start), with load on every proxy (failed requests counted).
//! Both revert modes side by side in one run: warm (`[release] keep_previous = true`, the
//! default: the previous web container kept running, a revert is a switch) and cold (it is
//! stopped at each deploy, a revert starts it again).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use drover_e2e::deploys::{AppGuard, Load, test_repo};
use drover_e2e::hostagent::{HostAgent, deploy, version_at};
use drover_e2e::{TestController, fast_controller_config, free_port};
use drover_proto::v1;

use crate::{Report, median};

const APP: &str = "rbench";

/// What `drover-bench real-release` takes.
#[derive(Debug, clap::Args)]
pub struct RealReleaseOpts {
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    #[arg(long, default_value = "1,30%,100%")]
    pub waves: String,
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub min_healthy: Duration,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

fn spec(repo: &str, listen: SocketAddr, keep_previous: bool) -> String {
    format!(
        "name = \"{APP}\"\nimage = \"{repo}\"\ndrain_timeout = \"2s\"\nstop_timeout = \"2s\"\n\
         [secrets.FAIL_HEALTH]\nmin_length = 1\n\
         [web]\nport = 8080\nlisten = \"{listen}\"\n\
         [health]\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nretries = 5\n\
         [watch]\nwindow = \"1s\"\nmax_5xx_ratio = 0.05\nmax_p95_latency = \"1s\"\n\
         [release]\nkeep_previous = {keep_previous}\n"
    )
}

/// The host's secrets file: FAIL_HEALTH=1 makes a new container fail its health check.
fn secrets(agent: &HostAgent, fail: bool) -> Result<()> {
    let dir = agent.config.parent().context("agent home")?.join("secrets");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{APP}.env"));
    std::fs::write(&path, format!("FAIL_HEALTH={}\n", u8::from(fail)))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn unix_ms() -> i64 {
    drover_agent::unix_ms()
}

async fn get(c: &TestController, id: &str) -> Result<v1::FleetReleaseInfo> {
    Ok(c.admin()
        .get_release(v1::GetReleaseRequest { id: id.into() })
        .await?
        .into_inner())
}

/// Starts a release of `version` with the run's waves and `min_healthy`; its id.
async fn start(c: &TestController, o: &RealReleaseOpts, version: &str) -> Result<String> {
    Ok(c.admin()
        .start_release(v1::StartReleaseRequest {
            app: APP.into(),
            version: version.into(),
            waves: o.waves.clone(),
            max_parallel: o.agents as u32,
            min_healthy_ms: o.min_healthy.as_millis() as u64,
            min_healthy_set: true,
            skip_backup: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .id)
}

/// Starts a release of `version` and waits until it is `until`.
async fn release(
    c: &TestController,
    o: &RealReleaseOpts,
    version: &str,
    until: &str,
) -> Result<v1::FleetReleaseInfo> {
    let id = start(c, o, version).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = get(c, &id).await?;
        if r.state == until {
            return Ok(r);
        }
        if r.state != "running" && r.state != "pulling" && r.state != "reverting" {
            let hosts: Vec<String> = r
                .hosts
                .iter()
                .map(|h| format!("{} {} {}", h.host, h.state, h.why))
                .collect();
            bail!(
                "release {id} ended {} ({}), not {until}: {}",
                r.state,
                r.why,
                hosts.join("; ")
            );
        }
        if Instant::now() > deadline {
            bail!("release {id} did not end within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn real_release(o: RealReleaseOpts) -> Result<Report> {
    if o.agents < 3 || o.agents > 50 {
        bail!("--agents {}: from 3 to 50", o.agents);
    }
    let _guard = AppGuard(APP.into());
    let repo = test_repo(APP, &["v1.0.0", "v1.1.0", "v2.0.0"]);
    let port = free_port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse()?;
    let dir = tempfile::tempdir()?;
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let mut agents = Vec::new();
    for i in 0..o.agents {
        let name = format!("rb-{i:02}");
        let ip = format!("127.0.0.{}", 10 + i);
        let mut agent = HostAgent::enroll(&controller, dir.path(), &name, &ip).await;
        secrets(&agent, false)?;
        agent.start(&controller).await;
        agents.push(agent);
    }
    controller
        .admin()
        .apply_app(v1::ApplyAppRequest {
            spec_toml: spec(&repo, listen, true),
            source: "rbench.toml".into(),
        })
        .await?;
    let all: Vec<&HostAgent> = agents.iter().collect();
    deploy(&controller, APP, "v1.0.0", &all).await;
    eprintln!("{} real agents serving v1.0.0 on 127.0.0.10-", o.agents);

    let failing = agents.last().context("no agents")?;
    let mut live = "v1.0.0".to_string();
    let mut modes = Vec::new();
    for warm in [true, false] {
        // The revert's mode is the spec's `[release] keep_previous`.
        controller
            .admin()
            .apply_app(v1::ApplyAppRequest {
                spec_toml: spec(&repo, listen, warm),
                source: "rbench.toml".into(),
            })
            .await?;
        let mode = if warm { "warm" } else { "cold" };
        eprintln!("{mode} revert (keep_previous = {warm}):");
        let m = measure(&controller, &o, &agents, failing, port, &mut live).await?;
        modes.push((mode, m));
    }
    let mut summary = format!(
        "real-release: {} real agents, waves {}, min_healthy {:?}, {} run(s) per mode\n",
        o.agents, o.waves, o.min_healthy, o.runs,
    );
    let mut json_modes = serde_json::Map::new();
    for (mode, m) in &modes {
        summary.push_str(&m.summary(mode));
        json_modes.insert(mode.to_string(), m.json());
    }
    if let [(_, warm), (_, cold)] = &modes[..] {
        summary.push_str(&format!(
            "  cold / warm revert time: {:.1}x\n",
            median(&cold.reverts) / median(&warm.reverts).max(f64::EPSILON)
        ));
    }
    Ok(Report {
        summary,
        json: json!({
            "benchmark": "real-release",
            "agents": o.agents,
            "waves": o.waves,
            "min_healthy_ms": o.min_healthy.as_millis() as u64,
            "modes": json_modes,
        }),
    })
}

/// What the runs of one mode measured.
#[derive(Default)]
struct Measured {
    walls: Vec<f64>,
    controller_walls: Vec<f64>,
    reverts: Vec<f64>,
    // Where a revert's time goes: failure to halt (the controller seeing it), failure to the
    // last rollback's job.started, and the longest rollback job (started to finished).
    to_halt: Vec<f64>,
    to_last_start: Vec<f64>,
    longest: Vec<f64>,
    // Every rollback job's steps: how long each took (ms), across runs.
    steps: BTreeMap<String, Vec<f64>>,
    failed_requests: u64,
}

impl Measured {
    fn summary(&self, mode: &str) -> String {
        format!(
            "  {mode} revert:\n\
             \x20   release wall time, median {:.1} s (runs {:?}; the controller's own record {:?})\n\
             \x20   failure to every updated host serving its previous version, median {:.2} s (runs {:?}; goal <= 5 s)\n\
             \x20     of which failure to halt {:?} s, failure to the last rollback's start {:?} s, longest rollback job {:?} s\n\
             \x20     rollback steps, median ms: {}\n\
             \x20   failed requests through the proxies during the failing releases: {}\n",
            median(&self.walls),
            self.walls,
            self.controller_walls,
            median(&self.reverts),
            self.reverts,
            self.to_halt,
            self.to_last_start,
            self.longest,
            self.steps
                .iter()
                .map(|(step, ms)| format!("{step} {:.0}", median(ms)))
                .collect::<Vec<_>>()
                .join(", "),
            self.failed_requests,
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "wall_secs": self.walls,
            "controller_wall_secs": self.controller_walls,
            "revert_secs": self.reverts,
            "failure_to_halt_secs": self.to_halt,
            "failure_to_last_rollback_start_secs": self.to_last_start,
            "longest_rollback_job_secs": self.longest,
            "failed_requests": self.failed_requests,
            "rollback_step_ms": self.steps,
        })
    }
}

/// `o.runs` times: a release that succeeds (to the version not live), then one whose last
/// host fails in the last wave, timed from that failure to every updated host serving its
/// previous version again.
async fn measure(
    controller: &TestController,
    o: &RealReleaseOpts,
    agents: &[HostAgent],
    failing: &HostAgent,
    port: u16,
    live: &mut String,
) -> Result<Measured> {
    let mut m = Measured::default();
    for run in 0..o.runs {
        // A release that succeeds, to the version not live.
        let next = if live == "v1.0.0" { "v1.1.0" } else { "v1.0.0" };
        let t0 = Instant::now();
        let done = release(controller, o, next, "succeeded").await?;
        let wall = t0.elapsed().as_secs_f64();
        m.walls.push(wall);
        m.controller_walls
            .push((done.finished_unix_ms - done.created_unix_ms) as f64 / 1000.0);
        *live = next.to_string();

        // The last host fails in the last wave: every updated host goes back to `live`.
        secrets(failing, true)?;
        let loads: Vec<Load> = agents
            .iter()
            .map(|a| Load::start(a.public(port), 1))
            .collect();
        // Every proxy watched from now on: when it first answers v2.0.0, and when it answers
        // the previous version again after that.
        let watchers: Vec<Watcher> = agents
            .iter()
            .map(|a| Watcher::start(a.public(port), "v2.0.0", live))
            .collect();
        let id = start(controller, o, "v2.0.0").await?;
        // The failing host's deploy job: its id is derived from the release.
        let index = agents.len() - 1;
        let job = format!("{id}-d{index}");
        let deadline = Instant::now() + Duration::from_secs(600);
        let failed_at = loop {
            let events = controller.job_events(&failing.host, &job);
            if let Some(e) = events
                .iter()
                .find(|e| e.kind == drover_model::jobevent::FINISHED)
            {
                break e.at_unix_ms;
            }
            let r = get(controller, &id).await?;
            // Reverting may be seen a moment before the failing job's end is in its events.
            let ended = matches!(r.state.as_str(), "succeeded" | "halted" | "reverted");
            if ended || Instant::now() > deadline {
                let hosts: Vec<String> = r
                    .hosts
                    .iter()
                    .map(|h| format!("{} {} {}", h.host, h.state, h.why))
                    .collect();
                bail!(
                    "release {id} is {} ({}) and {} did not fail its deploy as planned: {}",
                    r.state,
                    r.why,
                    failing.host,
                    hosts.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Which hosts had been updated: every one but the failing host whose deploy went
        // through, as the release records it once it reverts.
        let mut back = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let reverted = loop {
            let r = get(controller, &id).await?;
            if r.state == "reverted" || r.state == "halted" {
                break r;
            }
            if Instant::now() > deadline {
                bail!("release {id} did not revert within 2 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let updated: Vec<&HostAgent> = agents
            .iter()
            .filter(|a| {
                reverted
                    .hosts
                    .iter()
                    .any(|h| h.host == a.host && h.state == "reverted")
            })
            .collect();
        // When each updated host's proxy answered the previous version again (it may have done
        // so long before the release was seen reverted: its rollback's switch comes before
        // the rollback stops the new containers).
        let mut timelines = Vec::new();
        for w in watchers {
            timelines.push(w.finish().await);
        }
        for (a, (new_at, back_at)) in agents.iter().zip(&timelines) {
            if !updated.iter().any(|u| u.host == a.host) {
                continue;
            }
            match (new_at, back_at) {
                (Some(_), Some(at)) => back.push(*at),
                (Some(_), None) => bail!("{} does not serve {live} again", a.host),
                // Switched and back between two polls: at the latest by now.
                (None, _) => back.push(unix_ms()),
            }
        }
        let all_back = back.iter().copied().max().unwrap_or(failed_at);
        let halted_at = reverted
            .history
            .iter()
            .find(|e| e.what.starts_with("halted"))
            .map_or(failed_at, |e| e.at_unix_ms);
        m.to_halt.push((halted_at - failed_at) as f64 / 1000.0);
        let (mut last_start, mut max_job) = (failed_at, 0i64);
        for (i, a) in agents.iter().enumerate() {
            let events = controller.job_events(&a.host, &format!("{id}-r{i}"));
            let at = |kind: &str| events.iter().find(|e| e.kind == kind).map(|e| e.at_unix_ms);
            if let (Some(s), Some(f)) = (
                at(drover_model::jobevent::STARTED),
                at(drover_model::jobevent::FINISHED),
            ) {
                last_start = last_start.max(s);
                max_job = max_job.max(f - s);
            }
            for (step, ms) in step_durations(&events) {
                m.steps.entry(step).or_default().push(ms);
            }
            // Each rollback on the failure's clock: started, switched, finished.
            let switched = events
                .iter()
                .find(|e| {
                    e.kind == drover_model::jobevent::STEP
                        && e.fields.get("step").map(String::as_str) == Some("switch")
                        && e.fields.get("status").map(String::as_str) == Some("done")
                })
                .map(|e| e.at_unix_ms);
            if let (Some(s), Some(w)) = (at(drover_model::jobevent::STARTED), switched) {
                eprintln!(
                    "  {}: rollback started +{:.2} s, switched +{:.2} s",
                    a.host,
                    (s - failed_at) as f64 / 1000.0,
                    (w - failed_at) as f64 / 1000.0
                );
            }
        }
        m.to_last_start
            .push((last_start - failed_at) as f64 / 1000.0);
        m.longest.push(max_job as f64 / 1000.0);
        let revert = (all_back - failed_at) as f64 / 1000.0;
        m.reverts.push(revert);
        for load in loads {
            let (_, failed, _) = load.finish().await;
            m.failed_requests += failed;
        }
        secrets(failing, false)?;
        eprintln!(
            "run {}: release {wall:.1} s; revert of {} updated host(s) {revert:.2} s after the failure ({})",
            run + 1,
            updated.len(),
            reverted.state
        );
    }
    Ok(m)
}

/// Polls one proxy every 10 ms: when it first answered `new`, and when it answered `old`
/// after that (Unix ms, this machine's clock).
struct Watcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Option<i64>, Option<i64>)>,
}

impl Watcher {
    fn start(addr: SocketAddr, new: &str, old: &str) -> Watcher {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, new, old) = (stop.clone(), new.to_string(), old.to_string());
        let task = tokio::spawn(async move {
            let (mut new_at, mut back_at) = (None, None);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && back_at.is_none() {
                let answer = version_at(addr).await;
                // After the answer: a switch is counted no earlier than it was seen.
                let now = unix_ms();
                match answer {
                    Some(v) if v == new && new_at.is_none() => new_at = Some(now),
                    Some(v) if v == old && new_at.is_some() => back_at = Some(now),
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (new_at, back_at)
        });
        Watcher { stop, task }
    }

    async fn finish(self) -> (Option<i64>, Option<i64>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or((None, None))
    }
}

/// A job's steps that ended (done or failed) and how long each took, in ms.
fn step_durations(events: &[drover_controller::jobs::EventRecord]) -> Vec<(String, f64)> {
    use drover_model::jobevent::{STEP, field};
    events
        .iter()
        .filter(|e| e.kind == STEP)
        .filter_map(|e| {
            let step = e.fields.get(field::STEP)?;
            let ms: f64 = e.fields.get(field::DURATION_MS)?.parse().ok()?;
            Some((step.clone(), ms))
        })
        .collect()
}
