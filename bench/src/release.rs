//! `drover-bench release`: the real controller drives a fleet release of the example app across
//! N simulated agents (the fleet benchmark's enrolled hosts and mTLS sessions). Each agent
//! reports v1 live and a healthy host on connect, and answers a deploy command the way a real
//! agent does (job.started and the first steps at once, the rest after a fixed deploy delay,
//! then job.finished and the new release table). Measures the release's wall time, the
//! controller's CPU and memory during it, and its own overhead per wave transition: from the
//! moment the wave's last host has been healthy for `min_healthy` after its deploy ended to the
//! first deploy command of the next wave arriving at an agent (and, since a wave's commands go
//! out one job at a time, to its last).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use drover_identity::files::Bundle;
use drover_model::jobevent::{self, JobResult, Payload, ReleaseState, field, status};
use drover_proto::v1;
use drover_proto::v1::agent_message::Msg as Out;
use drover_proto::v1::controller_message::Msg as In;
use serde_json::json;
use tokio::sync::mpsc;

use crate::{
    Report, SimArgs, SimController, agent_tls, cpu_secs, enroll_measured, median, open_session,
    operator, rss_kib, source_addr, start_sim_controller, status_kib,
};

/// The app released: the documented example spec, applied as is.
const SPEC: &str = include_str!("../../examples/api.toml");
const APP: &str = "api";
const FROM: &str = "v1.0.0";
const TO: &str = "v2.0.0";

/// What `drover-bench release` takes.
#[derive(Debug, clap::Args)]
pub struct ReleaseOpts {
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Waves of equal share: 10 gives 10%,20%,…,100%.
    #[arg(long, default_value_t = 10)]
    pub waves: usize,
    /// How long each simulated deploy takes, from its command to job.finished.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub deploy_delay: Duration,
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub min_healthy: Duration,
    /// Hosts deploying at once in a wave; 0: a whole wave (at most the [release] bound).
    #[arg(long, default_value_t = 0)]
    pub max_parallel: u32,
    /// Pause between "all connected" and the release.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub settle: Duration,
    #[command(flatten)]
    pub sim: SimArgs,
}

/// Unix time in milliseconds, with a fraction: the controller's timestamps are on the same
/// clock (same machine).
fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// What one simulated agent saw and did.
#[derive(Debug, Default)]
struct Log {
    /// Each deploy command: its job id and when it arrived.
    deploys: Vec<(String, f64)>,
    /// Each pull command's job id (the release pulls before its first wave).
    pulls: Vec<String>,
    /// Any other command or cancel (none expected).
    others: usize,
    /// When its deploy's job.finished was sent.
    ended_ms: Option<f64>,
    live: String,
    error: String,
}

/// What the simulated agents share with the measuring code.
struct Sim {
    /// Agents connected and with their v1 release table acknowledged.
    ready: AtomicUsize,
    /// Deploys answered with job.finished.
    ended: AtomicUsize,
    /// Sessions that broke (a failed run).
    broken: AtomicUsize,
    logs: Vec<Mutex<Log>>,
    deploy_delay: Duration,
}

/// One simulated agent's session: numbering of its events and how it reports.
struct Agent {
    tx: mpsc::Sender<v1::AgentMessage>,
    seq: u64,
    /// The app's release table on this host, as the agent would keep it.
    table: Vec<jobevent::Release>,
}

fn release_record(
    version: &str,
    job_id: &str,
    at_ms: i64,
    state: ReleaseState,
) -> jobevent::Release {
    let suffix = job_id.rsplit('-').next().unwrap_or("0");
    let containers = ["web", "bot"]
        .iter()
        .map(|role| {
            (
                role.to_string(),
                format!("drover-{APP}-{role}-{version}-{suffix}"),
            )
        })
        .collect();
    jobevent::Release {
        id: job_id.to_string(),
        app: APP.into(),
        version: version.into(),
        image: format!("ghcr.example/acme/api:{version}"),
        image_id: format!("sha256:{:0>64}", version.replace('.', "")),
        job_id: job_id.to_string(),
        requested_by: "admin".into(),
        started_unix_ms: at_ms,
        finished_unix_ms: at_ms,
        result: Some(JobResult::Succeeded),
        state,
        spec_toml: SPEC.to_string(),
        containers,
    }
}

impl Agent {
    async fn send(&self, msg: Out) -> Result<()> {
        self.tx
            .send(v1::AgentMessage { msg: Some(msg) })
            .await
            .context("the session's queue closed")
    }

    /// The next event, numbered after the last; not waited for (the agent's outbox streams
    /// events and reads the acknowledgements as they come).
    async fn event(
        &mut self,
        job_id: &str,
        kind: &str,
        message: String,
        fields: &[(&str, String)],
        payload: Option<Payload>,
    ) -> Result<u64> {
        self.seq += 1;
        let event = v1::JobEvent {
            seq: self.seq,
            job_id: job_id.to_string(),
            at_unix_ms: crate::now_ms(),
            kind: kind.to_string(),
            message,
            fields: fields
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            host: String::new(),
            payload: payload.as_ref().map(drover_proto::payload::to_proto),
        };
        self.send(Out::Event(event)).await?;
        Ok(self.seq)
    }

    async fn step(&mut self, job_id: &str, step: &str, state: &str, took_ms: u64) -> Result<()> {
        let mut fields = vec![
            (field::STEP, step.to_string()),
            (field::STATUS, state.to_string()),
        ];
        if state != status::STARTED {
            fields.push((field::DURATION_MS, took_ms.to_string()));
        }
        self.event(
            job_id,
            jobevent::STEP,
            format!("{step} {state}"),
            &fields,
            None,
        )
        .await
        .map(|_| ())
    }

    /// `app.releases` with the whole table, as the agent sends it after a job (under its id).
    async fn releases(&mut self, job_id: &str) -> Result<u64> {
        let payload = Payload::Releases {
            app: APP.into(),
            releases: self.table.clone(),
        };
        let fields = [(field::APP, APP.to_string())];
        let message = format!("{} release(s) of {APP}", self.table.len());
        self.event(job_id, jobevent::RELEASES, message, &fields, Some(payload))
            .await
    }

    /// A health report as the agent sends it every 30 s: healthy, the app's live release
    /// running.
    async fn health(&self) -> Result<()> {
        let live = self
            .table
            .iter()
            .find(|r| r.state == ReleaseState::Live)
            .map(|r| r.version.clone())
            .unwrap_or_default();
        let report = v1::HealthReport {
            status: v1::CheckStatus::Healthy as i32,
            agent_version: "bench".into(),
            collected_unix_ms: crate::now_ms(),
            docker_reachable: true,
            containers_running: 2,
            containers_total: 2,
            apps: vec![v1::AppStatus {
                app: APP.into(),
                version: live,
                running: true,
                listen: "0.0.0.0:8080".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        self.send(Out::Health(report)).await
    }

    /// What the agent reports as a deploy starts: the job taken, the steps before the health
    /// check (the backup skipped, as asked), the health check begun.
    async fn deploy_begins(&mut self, job_id: &str, requested_by: &str) -> Result<()> {
        let fields = [
            (field::JOB_KIND, "deploy".to_string()),
            (field::APP, APP.to_string()),
            (field::VERSION, TO.to_string()),
            (field::REQUESTED_BY, requested_by.to_string()),
        ];
        self.event(job_id, jobevent::STARTED, String::new(), &fields, None)
            .await?;
        for step in ["validate", "lock", "image", "start"] {
            self.step(job_id, step, status::STARTED, 0).await?;
            self.step(job_id, step, status::DONE, 1).await?;
            if step == "lock" {
                self.step(job_id, "backup", status::STARTED, 0).await?;
                self.step(job_id, "backup", status::SKIPPED, 0).await?;
            }
        }
        self.step(job_id, "health", status::STARTED, 0).await
    }

    /// A pull before the first wave, answered at once: the image is already here, as after a
    /// pull that took no time (the benchmark measures the controller, not the download).
    async fn pull_done(&mut self, job_id: &str, requested_by: &str) -> Result<()> {
        let fields = [
            (field::JOB_KIND, "pull".to_string()),
            (field::APP, APP.to_string()),
            (field::VERSION, TO.to_string()),
            (field::REQUESTED_BY, requested_by.to_string()),
        ];
        self.event(job_id, jobevent::STARTED, String::new(), &fields, None)
            .await?;
        for step in ["validate", "image"] {
            self.step(job_id, step, status::STARTED, 0).await?;
            self.step(job_id, step, status::DONE, 1).await?;
        }
        let fields = [(field::RESULT, JobResult::Succeeded.as_str().to_string())];
        self.event(
            job_id,
            jobevent::FINISHED,
            format!("{APP}:{TO} is on this host"),
            &fields,
            None,
        )
        .await
        .map(|_| ())
    }

    /// What it reports once the new release is healthy: the switch, the old release stopped,
    /// job.finished succeeded, then the new table (v2 live, v1 kept).
    async fn deploy_ends(&mut self, job_id: &str, took: Duration) -> Result<()> {
        let took_ms = took.as_millis() as u64;
        self.step(job_id, "health", status::DONE, took_ms).await?;
        for step in ["switch", "stop_old"] {
            self.step(job_id, step, status::STARTED, 0).await?;
            self.step(job_id, step, status::DONE, 1).await?;
        }
        let now = crate::now_ms();
        for r in &mut self.table {
            if r.state == ReleaseState::Live {
                r.state = ReleaseState::Kept;
            }
        }
        self.table
            .push(release_record(TO, job_id, now, ReleaseState::Live));
        let fields = [
            (field::RESULT, JobResult::Succeeded.as_str().to_string()),
            (field::LIVE_VERSION, TO.to_string()),
            (field::PREVIOUS_VERSION, FROM.to_string()),
            (field::DURATION_MS, took_ms.to_string()),
        ];
        self.event(
            job_id,
            jobevent::FINISHED,
            format!("deploy {APP}: {TO} is live"),
            &fields,
            None,
        )
        .await?;
        self.releases(job_id).await.map(|_| ())
    }
}

async fn next_message(
    inbound: &mut tonic::Streaming<v1::ControllerMessage>,
) -> Result<v1::controller_message::Msg> {
    inbound
        .message()
        .await
        .context("reading the session")?
        .and_then(|m| m.msg)
        .context("the controller ended the session")
}

/// One simulated agent for the whole run; an error is recorded and counted as broken.
async fn release_agent(
    addr: String,
    idx: usize,
    host: String,
    bundle: Bundle,
    sim: Arc<Sim>,
    source: std::net::IpAddr,
) {
    if let Err(e) = run_agent(&addr, idx, &host, &bundle, &sim, source).await {
        sim.logs[idx].lock().unwrap().error = format!("{e:#}");
        sim.broken.fetch_add(1, Ordering::SeqCst);
    }
}

async fn run_agent(
    addr: &str,
    idx: usize,
    host: &str,
    bundle: &Bundle,
    sim: &Sim,
    source: std::net::IpAddr,
) -> Result<()> {
    let (tx, mut inbound) = open_session(addr, host, agent_tls(bundle)?, source, 1024).await?;
    let welcome = match next_message(&mut inbound).await? {
        In::Welcome(w) => w,
        other => bail!("expected Welcome first, got {other:?}"),
    };
    let mut agent = Agent {
        tx,
        seq: welcome.acked_seq,
        table: vec![release_record(
            FROM,
            &format!("deploy-{FROM}"),
            crate::now_ms() - 86_400_000,
            ReleaseState::Live,
        )],
    };
    // On connect a real agent's outbox holds its last table; its first health report follows.
    let seq = agent.releases("").await?;
    agent.health().await?;
    loop {
        if let In::Ack(a) = next_message(&mut inbound).await?
            && a.upto_seq >= seq
        {
            break;
        }
    }
    sim.logs[idx].lock().unwrap().live = FROM.into();
    sim.ready.fetch_add(1, Ordering::SeqCst);

    // Random phases spread the fleet's heartbeats (5 s) and health reports (30 s).
    let start = tokio::time::Instant::now();
    let mut heartbeat = tokio::time::interval_at(
        start + Duration::from_millis(rand::random::<u64>() % 5_000),
        Duration::from_secs(5),
    );
    let mut report = tokio::time::interval_at(
        start + Duration::from_millis(rand::random::<u64>() % 30_000),
        Duration::from_secs(30),
    );
    // The deploy under way: its job id, when it began, when it is done.
    let mut running: Option<(String, Instant, tokio::time::Instant)> = None;
    loop {
        let due = running.as_ref().map(|(_, _, at)| *at);
        tokio::select! {
            _ = heartbeat.tick() => {
                agent.send(Out::Heartbeat(v1::Heartbeat { sent_unix_ms: crate::now_ms() })).await?;
            }
            _ = report.tick() => agent.health().await?,
            _ = tokio::time::sleep_until(due.unwrap_or(start)), if due.is_some() => {
                let (job_id, began, _) = running.take().context("no deploy under way")?;
                let ended = unix_ms();
                agent.deploy_ends(&job_id, began.elapsed()).await?;
                {
                    let mut log = sim.logs[idx].lock().unwrap();
                    log.ended_ms = Some(ended);
                    log.live = TO.into();
                }
                sim.ended.fetch_add(1, Ordering::SeqCst);
            }
            msg = next_message(&mut inbound) => match msg? {
                In::Command(c) => {
                    let at = unix_ms();
                    if let Some(v1::command::Job::Pull(p)) = &c.job {
                        let first = {
                            let mut log = sim.logs[idx].lock().unwrap();
                            let first = !log.pulls.contains(&c.job_id);
                            log.pulls.push(c.job_id.clone());
                            first
                        };
                        if first {
                            agent.pull_done(&c.job_id, &p.requested_by).await?;
                        }
                        continue;
                    }
                    let Some(v1::command::Job::Deploy(d)) = &c.job else {
                        sim.logs[idx].lock().unwrap().others += 1;
                        continue;
                    };
                    let first = {
                        let mut log = sim.logs[idx].lock().unwrap();
                        let first = !log.deploys.iter().any(|(id, _)| *id == c.job_id);
                        log.deploys.push((c.job_id.clone(), at));
                        first
                    };
                    // A real agent ignores a job id it already knows; a second job would be
                    // refused as locked while one runs. Either shows in the deploy count.
                    if first && running.is_none() && d.version == TO {
                        agent.deploy_begins(&c.job_id, &d.requested_by).await?;
                        running = Some((
                            c.job_id.clone(),
                            Instant::now(),
                            tokio::time::Instant::now() + sim.deploy_delay,
                        ));
                    }
                }
                In::Cancel(_) => sim.logs[idx].lock().unwrap().others += 1,
                _ => {}
            }
        }
    }
}

/// Samples the controller's RSS and CPU every `every` until `stop`.
async fn sample(
    pid: u32,
    every: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<(f64, u64, f64)> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = &mut stop => return out,
            _ = tick.tick() => {
                if let (Ok(rss), Ok(cpu)) = (rss_kib(pid), cpu_secs(pid)) {
                    out.push((t0.elapsed().as_secs_f64(), rss, cpu));
                }
            }
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The waves as `--waves` text: `10%,20%,…,100%` for 10.
fn waves_text(waves: usize) -> String {
    (1..=waves)
        .map(|w| format!("{}%", (w * 100).div_ceil(waves)))
        .collect::<Vec<_>>()
        .join(",")
}

/// One wave as the agents saw it (times in Unix ms).
#[derive(Debug, Clone)]
struct Wave {
    hosts: usize,
    first_command_ms: f64,
    last_command_ms: f64,
    last_end_ms: f64,
    /// The controller's time its last host passed `min_healthy`.
    last_passed_ms: f64,
}

pub async fn release(o: ReleaseOpts) -> Result<Report> {
    let n = o.agents;
    if o.waves == 0 || o.waves > drover_model::waves::MAX_WAVES {
        bail!(
            "--waves {}: from 1 to {}",
            o.waves,
            drover_model::waves::MAX_WAVES
        );
    }
    // `_dir` holds the data dir (and the log) until the end.
    let SimController {
        tmp: _dir,
        addr,
        admin,
        mut controller,
        ..
    } = start_sim_controller(&o.sim, n, "controller.log").await?;
    let pid = controller.pid();
    let mut api = operator(&addr, &admin)?;
    api.apply_app(v1::ApplyAppRequest {
        spec_toml: SPEC.into(),
        source: "examples/api.toml".into(),
    })
    .await
    .context("applying examples/api.toml")?;

    let (fleet, enroll_secs, rss_enrolled) = enroll_measured(&o.sim, &addr, &admin, pid, n).await?;
    eprintln!(
        "controller pid {pid}: enrolled {n} hosts in {enroll_secs:.2}s; RSS {rss_enrolled} KiB"
    );

    let hosts: Vec<String> = fleet.iter().map(|(h, _)| h.clone()).collect();
    let sim = Arc::new(Sim {
        ready: AtomicUsize::new(0),
        ended: AtomicUsize::new(0),
        broken: AtomicUsize::new(0),
        logs: (0..n).map(|_| Mutex::new(Log::default())).collect(),
        deploy_delay: o.deploy_delay,
    });
    let mut tasks = Vec::new();
    for (idx, (host, bundle)) in fleet.into_iter().enumerate() {
        tasks.push(tokio::spawn(release_agent(
            addr.clone(),
            idx,
            host,
            bundle,
            sim.clone(),
            source_addr(idx, o.sim.source_addrs),
        )));
    }
    let deadline = Instant::now() + o.sim.patience;
    while sim.ready.load(Ordering::SeqCst) < n {
        check_broken(&sim, &hosts)?;
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} agents ready within {:?}",
                sim.ready.load(Ordering::SeqCst),
                o.sim.patience
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "all {n} agents connected with {APP} {FROM} live; settling {:?}",
        o.settle
    );
    tokio::time::sleep(o.settle).await;
    let rss_before = rss_kib(pid)?;

    // The release: every wave's hosts at once unless asked otherwise.
    let per_wave = n.div_ceil(o.waves) as u64;
    let max_parallel = match o.max_parallel {
        0 => per_wave.min(drover_model::waves::MAX_PARALLEL) as u32,
        m => m,
    };
    let waves = waves_text(o.waves);
    let load_before = loadavg();
    let me = std::process::id();
    let (cpu0, bench_cpu0) = (cpu_secs(pid)?, cpu_secs(me)?);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample(pid, Duration::from_millis(250), stopped));
    let t0 = Instant::now();
    let started_ms = unix_ms();
    let info = api
        .start_release(v1::StartReleaseRequest {
            app: APP.into(),
            version: TO.into(),
            waves: waves.clone(),
            max_parallel,
            min_healthy_ms: o.min_healthy.as_millis() as u64,
            min_healthy_set: true,
            skip_backup: true,
            ..Default::default()
        })
        .await
        .context("StartRelease")?
        .into_inner();
    let id = info.id.clone();
    eprintln!(
        "release {id}: {} hosts in {} waves ({waves}), max_parallel {max_parallel}, deploy delay {:?}, min_healthy {:?}",
        info.hosts.len(),
        info.waves,
        o.deploy_delay,
        o.min_healthy
    );

    // Every agent answers its deploy; then the controller sees the last wave pass.
    let budget = o.sim.patience
        + (o.deploy_delay + o.min_healthy + Duration::from_secs(5)) * (o.waves as u32 + 1);
    let deadline = t0 + budget;
    while sim.ended.load(Ordering::SeqCst) < n {
        check_broken(&sim, &hosts)?;
        if Instant::now() > deadline {
            let now = api
                .get_release(v1::GetReleaseRequest { id: id.clone() })
                .await?
                .into_inner();
            bail!(
                "only {} of {n} deploys ended within {budget:?}; the release is {} in wave {} ({}); {}",
                sim.ended.load(Ordering::SeqCst),
                now.state,
                now.wave + 1,
                now.why,
                controller.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fin = loop {
        let now = api
            .get_release(v1::GetReleaseRequest { id: id.clone() })
            .await?
            .into_inner();
        if now.finished_unix_ms > 0 {
            break now;
        }
        if Instant::now() > deadline {
            bail!(
                "the release is still {} after every deploy ended",
                now.state
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid)? - cpu0;
    let bench_cpu = cpu_secs(me)? - bench_cpu0;
    let _ = stop.send(());
    let samples = sampler.await?;
    let load_after = loadavg();
    let hwm = status_kib(pid, "VmHWM")?;
    let rss_end = rss_kib(pid)?;
    let bench_rss = rss_kib(me)?;
    for t in &tasks {
        t.abort();
    }
    check_broken(&sim, &hosts)?;
    let (stop_took, _) = controller.terminate()?;

    // Outcome: every host on v2, each deployed once.
    let logs: Vec<Log> = sim
        .logs
        .iter()
        .map(|l| std::mem::take(&mut *l.lock().unwrap()))
        .collect();
    let on_v2 = logs.iter().filter(|l| l.live == TO).count();
    let twice: Vec<&str> = hosts
        .iter()
        .zip(&logs)
        .filter(|(_, l)| l.deploys.len() != 1)
        .map(|(h, _)| h.as_str())
        .collect();
    let others: usize = logs.iter().map(|l| l.others).sum();
    let pulled_once = logs.iter().filter(|l| l.pulls.len() == 1).count();
    let passed = fin.hosts.iter().filter(|h| h.state == "passed").count();
    let live_v2 = fin.hosts.iter().filter(|h| h.live_version == TO).count();

    // Per wave, from the agents' clocks and the controller's passed times.
    let index: std::collections::HashMap<&str, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.as_str(), i))
        .collect();
    let mut waves_seen: Vec<Wave> = Vec::new();
    for w in 0..fin.waves as usize {
        let members: Vec<(&v1::FleetReleaseHost, &Log)> = fin
            .hosts
            .iter()
            .filter(|h| h.wave as usize == w)
            .filter_map(|h| index.get(h.host.as_str()).map(|&i| (h, &logs[i])))
            .collect();
        let firsts: Vec<f64> = members
            .iter()
            .filter_map(|(_, l)| l.deploys.first().map(|d| d.1))
            .collect();
        let ends: Vec<f64> = members.iter().filter_map(|(_, l)| l.ended_ms).collect();
        waves_seen.push(Wave {
            hosts: members.len(),
            first_command_ms: firsts.iter().copied().fold(f64::MAX, f64::min),
            last_command_ms: firsts.iter().copied().fold(0.0, f64::max),
            last_end_ms: ends.iter().copied().fold(0.0, f64::max),
            last_passed_ms: members
                .iter()
                .map(|(h, _)| h.passed_unix_ms as f64)
                .fold(0.0, f64::max),
        });
    }
    let min_healthy_ms = o.min_healthy.as_secs_f64() * 1000.0;
    // Transition w -> w+1: overhead, of which until the controller marked the wave passed
    // (its tick, the job events' ingest) and after (the next wave's jobs started and sent).
    let mut overhead = Vec::new();
    let mut to_passed = Vec::new();
    let mut to_command = Vec::new();
    // Until the next wave's last host has its command: the whole wave under way.
    let mut to_last = Vec::new();
    for pair in waves_seen.windows(2) {
        let healthy_done = pair[0].last_end_ms + min_healthy_ms;
        overhead.push(pair[1].first_command_ms - healthy_done);
        to_last.push(pair[1].last_command_ms - healthy_done);
        to_passed.push(pair[0].last_passed_ms - healthy_done);
        to_command.push(pair[1].first_command_ms - pair[0].last_passed_ms);
    }
    // Within a wave: first to last command arrival (each host is sent its own job, one after
    // another). The first wave is left out: its migration host deploys alone first.
    let fan_out: Vec<f64> = waves_seen
        .iter()
        .skip(1)
        .map(|w| w.last_command_ms - w.first_command_ms)
        .collect();
    let wave_details: Vec<serde_json::Value> = waves_seen
        .iter()
        .map(|w| {
            json!({
                "hosts": w.hosts,
                "first_command_unix_ms": w.first_command_ms,
                "last_command_unix_ms": w.last_command_ms,
                "last_end_unix_ms": w.last_end_ms,
                "last_passed_unix_ms": w.last_passed_ms,
            })
        })
        .collect();
    let max = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    let rss: Vec<f64> = samples.iter().map(|s| s.1 as f64).collect();
    let rss_peak = rss.iter().copied().fold(0.0, f64::max);
    let cpu_pct = cpu / wall * 100.0;
    let controller_wall = (fin.finished_unix_ms - fin.created_unix_ms) as f64 / 1000.0;
    // Each wave's deploy and min_healthy, and the first wave's migration host deploying alone
    // before the rest of its wave.
    let floor = o.waves as f64 * (o.deploy_delay.as_secs_f64() + o.min_healthy.as_secs_f64())
        + o.deploy_delay.as_secs_f64();
    // Within the first wave: the migration host's deploy end to the rest's first command (the
    // driver wakes on the job's end, no min_healthy in between).
    let migration_host = fin.hosts.iter().find(|h| h.migrates);
    let after_migration = migration_host
        .and_then(|m| index.get(m.host.as_str()))
        .and_then(|&i| logs[i].ended_ms)
        .map(|end| {
            fin.hosts
                .iter()
                .filter(|h| h.wave == 0 && !h.migrates)
                .filter_map(|h| index.get(h.host.as_str()))
                .filter_map(|&i| logs[i].deploys.first().map(|d| d.1))
                .fold(f64::MAX, f64::min)
                - end
        })
        .unwrap_or(0.0);
    let goal = 100.0;
    let ok = fin.state == "succeeded"
        && on_v2 == n
        && live_v2 == n
        && twice.is_empty()
        && pulled_once == n;
    let summary = format!(
        "release: {n} simulated agents, {} waves ({waves}), max_parallel {max_parallel}, deploy delay {:?}, min_healthy {:?}\n\
         \x20 release {} {}: {passed} of {n} hosts passed, {on_v2} agents on {TO} ({live_v2} as the controller sees it), \
         {} host(s) without exactly one deploy, {pulled_once} pulled once (all at once, before wave 1), {others} other commands\n\
         \x20 release wall time (StartRelease to finished)  {wall:>8.2} s  (controller's own record {controller_wall:.2} s; \
         floor of {} x (delay + min_healthy) + delay = {floor:.1} s)\n\
         \x20 overhead per wave transition, median / max   {:>8.1} / {:.1} ms  (goal <= {goal} ms: {})\n\
         \x20   of which until the wave was marked passed  {:>8.1} / {:.1} ms\n\
         \x20   then to the next wave's first command       {:>8.1} / {:.1} ms\n\
         \x20 to the next wave's last command, median / max {:>8.1} / {:.1} ms\n\
         \x20 first wave: migration host's end to the rest's first command {after_migration:.1} ms\n\
         \x20 commands of one wave, first to last, median  {:>8.1} ms (max {:.1}; waves 2 on)\n\
         \x20 controller CPU over the release              {cpu:>8.2} s  ({cpu_pct:.1} % of one core)\n\
         \x20 controller RSS: enrolled {:.1} MiB, connected before {:.1} MiB, during median {:.1} / peak {:.1} MiB \
         (VmHWM {:.1}), after {:.1} MiB\n\
         \x20 bench process: CPU {:.1} % of one core, RSS {:.1} MiB; load average {load_before} before, {load_after} after; \
         controller exit after SIGTERM {:.2} s",
        fin.waves,
        o.deploy_delay,
        o.min_healthy,
        id,
        fin.state,
        twice.len(),
        o.waves,
        median(&overhead),
        max(&overhead),
        if max(&overhead) <= goal {
            "met"
        } else {
            "MISSED"
        },
        median(&to_passed),
        max(&to_passed),
        median(&to_command),
        max(&to_command),
        median(&to_last),
        max(&to_last),
        median(&fan_out),
        max(&fan_out),
        rss_enrolled as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        median(&rss) / 1024.0,
        rss_peak / 1024.0,
        hwm as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        bench_cpu / wall * 100.0,
        bench_rss as f64 / 1024.0,
        stop_took.as_secs_f64(),
    );
    let mut json = json!({
        "benchmark": "release",
        "agents": n,
        "waves": fin.waves,
        "waves_text": waves,
        "max_parallel": max_parallel,
        "deploy_delay_ms": o.deploy_delay.as_millis() as u64,
        "min_healthy_ms": o.min_healthy.as_millis() as u64,
        "release_id": id,
        "state": fin.state,
        "ok": ok,
        "hosts_passed": passed,
        "agents_on_new_version": on_v2,
        "controller_live_on_new_version": live_v2,
        "hosts_without_exactly_one_deploy": twice,
        "other_commands": others,
        "hosts_pulled_once": pulled_once,
        "wall_secs": wall,
        "controller_wall_secs": controller_wall,
        "floor_secs": floor,
        "started_unix_ms": started_ms,
    });
    // Two objects: one json! this long exceeds the macro's recursion limit.
    let more = json!({
        "transition_overhead_ms": overhead,
        "transition_overhead_median_ms": median(&overhead),
        "transition_overhead_max_ms": max(&overhead),
        "transition_to_passed_ms": to_passed,
        "transition_passed_to_command_ms": to_command,
        "transition_to_last_command_ms": to_last,
        "transition_to_last_command_median_ms": median(&to_last),
        "wave_fan_out_ms": fan_out,
        "migration_end_to_rest_of_wave_ms": after_migration,
        "wave_details": wave_details,
        "controller_cpu_secs": cpu,
        "controller_cpu_percent_of_one_core": cpu_pct,
        "controller_rss_enrolled_kib": rss_enrolled,
        "controller_rss_before_kib": rss_before,
        "controller_rss_median_kib": median(&rss),
        "controller_rss_peak_sampled_kib": rss_peak,
        "controller_rss_vmhwm_kib": hwm,
        "controller_rss_after_kib": rss_end,
        "samples": samples.iter().map(|(t, r, c)| json!([t, r, c])).collect::<Vec<_>>(),
        "bench_cpu_percent_of_one_core": bench_cpu / wall * 100.0,
        "bench_rss_kib": bench_rss,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "enroll_secs": enroll_secs,
        "controller_sigterm_exit_secs": stop_took.as_secs_f64(),
        "goals": { "transition_overhead_ms_max": goal, "met": max(&overhead) <= goal },
    });
    if let (Some(all), serde_json::Value::Object(more)) = (json.as_object_mut(), more) {
        all.extend(more);
    }
    if !ok {
        bail!("the release did not end as it should:\n{summary}");
    }
    Ok(Report { summary, json })
}

/// Fails the run when a simulated agent's session broke, naming the first few.
fn check_broken(sim: &Sim, hosts: &[String]) -> Result<()> {
    if sim.broken.load(Ordering::SeqCst) == 0 {
        return Ok(());
    }
    let broken: Vec<String> = sim
        .logs
        .iter()
        .zip(hosts)
        .filter_map(|(l, h)| {
            let l = l.lock().unwrap();
            (!l.error.is_empty()).then(|| format!("{h}: {}", l.error))
        })
        .take(5)
        .collect();
    bail!(
        "{} simulated agent session(s) broke: {}",
        sim.broken.load(Ordering::SeqCst),
        broken.join("; ")
    )
}
