//! `drover-bench-agents`: benchmarks recorded in BENCHMARKS.md. `fleet` runs the real controller
//! binary against N simulated agents (each its own mTLS connection, in this one process);
//! `agent-idle` watches a real idle agent's memory and CPU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use drover_identity::files::Bundle;
use drover_identity::pki::new_key_and_csr;
use drover_identity::tls::{ClientCert, Trust, channel, client_config};
use drover_proto::v1;
use drover_proto::v1::agent_message::Msg as Out;
use drover_proto::v1::controller_message::Msg as In;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(
    name = "drover-bench-agents",
    about = "Drover benchmarks (see BENCHMARKS.md)"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One controller, N simulated agents: memory per agent, CPU, connect and reconnect times.
    Fleet {
        #[arg(long, default_value_t = 2000)]
        agents: usize,
        /// Steady-state window, seconds.
        #[arg(long, default_value_t = 60)]
        steady: u64,
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
    },
    /// A real idle agent: RSS and CPU over a window.
    AgentIdle {
        /// Window, seconds.
        #[arg(long, default_value_t = 600)]
        duration: u64,
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    drover_identity::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        match args.command {
            Cmd::Fleet {
                agents,
                steady,
                bin_dir,
            } => fleet(agents, steady, &bin_dir).await,
            Cmd::AgentIdle { duration, bin_dir } => agent_idle(duration, &bin_dir).await,
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

// --- process measurements -------------------------------------------------------------------

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s on Linux).
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the ')' field 3 (state) is index 0, so utime (14) is index 11, stime (15) index 12.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &mut Child) -> Result<Duration> {
    let started = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(started.elapsed())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_controller(bin_dir: &Path, data: &Path, addr: &str) -> Result<Proc> {
    let child = Command::new(bin_dir.join("drover-controller"))
        .args(["run", "--listen", addr, "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {}/drover-controller (cargo build --release --workspace --bins)",
                bin_dir.display()
            )
        })?;
    Ok(Proc(child))
}

fn operator(
    addr: &str,
    dir: &Path,
) -> Result<v1::operator_service_client::OperatorServiceClient<tonic::transport::Channel>> {
    let b = Bundle::load(dir)?;
    let config = client_config(
        &Trust::Ca(b.ca_pem),
        Some(&ClientCert {
            cert_pem: b.cert_pem,
            key_pem: b.key_pem,
        }),
    )?;
    Ok(v1::operator_service_client::OperatorServiceClient::new(
        channel(addr, config, Duration::from_secs(5))?,
    ))
}

async fn wait_serving(addr: &str, admin: &Path) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if admin.join("key.pem").exists()
            && let Ok(mut api) = operator(addr, admin)
            && api.who_am_i(v1::WhoAmIRequest {}).await.is_ok()
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("the controller did not serve within 30s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

// --- fleet ----------------------------------------------------------------------------------

/// Enrolls `n` hosts through the real Enrollment RPC; returns their bundles.
async fn enroll_fleet(addr: &str, admin: &Path, n: usize) -> Result<Vec<(String, Bundle)>> {
    let api = operator(addr, admin)?;
    let ca_pem = Bundle::load(admin)?.ca_pem;
    let results = futures::stream::iter(0..n)
        .map(|i| {
            let mut api = api.clone();
            let ca_pem = ca_pem.clone();
            let addr = addr.to_string();
            async move {
                let host = format!("bench-{i:05}");
                let token = api
                    .create_token(v1::CreateTokenRequest {
                        host: host.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .token;
                let (key_pem, csr_pem) = new_key_and_csr(&host)?;
                let config = client_config(&Trust::Ca(ca_pem.clone()), None)?;
                let mut enroll = v1::enrollment_client::EnrollmentClient::new(channel(
                    &addr,
                    config,
                    Duration::from_secs(10),
                )?);
                let resp = enroll
                    .enroll(v1::EnrollRequest {
                        token,
                        csr_pem,
                        host: host.clone(),
                        labels: Default::default(),
                    })
                    .await?
                    .into_inner();
                anyhow::Ok((
                    host,
                    Bundle {
                        ca_pem,
                        cert_pem: resp.cert_pem,
                        key_pem,
                    },
                ))
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

/// One simulated agent: session, Hello, heartbeats every 5 s, reconnect with the agent's backoff.
async fn simulated_agent(addr: String, host: String, bundle: Bundle, welcomes: Arc<AtomicU64>) {
    let config = match client_config(
        &Trust::Ca(bundle.ca_pem.clone()),
        Some(&ClientCert {
            cert_pem: bundle.cert_pem.clone(),
            key_pem: bundle.key_pem.clone(),
        }),
    ) {
        Ok(c) => c,
        Err(e) => return eprintln!("{host}: {e}"),
    };
    let mut attempt = 0u32;
    loop {
        let result: Result<()> = async {
            let mut client = v1::agent_service_client::AgentServiceClient::new(channel(&addr, config.clone(), Duration::from_secs(10))?);
            let (tx, rx) = mpsc::channel(8);
            tx.send(v1::AgentMessage { msg: Some(Out::Hello(v1::Hello { host: host.clone(), agent_version: "bench".into(), ..Default::default() })) }).await?;
            let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
            // A random phase spreads the fleet's heartbeats over the 5 s interval.
            let phase = Duration::from_millis(rand::random::<u64>() % 5000);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        tx.send(v1::AgentMessage { msg: Some(Out::Heartbeat(v1::Heartbeat { sent_unix_ms: now_ms() })) }).await?;
                    }
                    msg = inbound.message() => match msg? {
                        Some(v1::ControllerMessage { msg: Some(In::Welcome(_)) }) => {
                            attempt = 0;
                            welcomes.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(_) => {}
                        None => bail!("session closed"),
                    }
                }
            }
        }
        .await;
        let _ = result;
        let delay = drover_agent::backoff::delay(
            attempt,
            Duration::from_millis(500),
            Duration::from_secs(60),
            rand::random(),
        );
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

async fn wait_count(counter: &AtomicU64, target: u64, patience: Duration) -> Result<Instant> {
    let deadline = Instant::now() + patience;
    while counter.load(Ordering::SeqCst) < target {
        if Instant::now() > deadline {
            bail!(
                "only {} of {target} sessions after {patience:?}",
                counter.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Instant::now())
}

async fn fleet(n: usize, steady: u64, bin_dir: &Path) -> Result<serde_json::Value> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("controller");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let admin = data.join("operator/admin");
    let mut controller = start_controller(bin_dir, &data, &addr)?;
    wait_serving(&addr, &admin).await?;
    let started = Instant::now();
    let fleet = enroll_fleet(&addr, &admin, n).await?;
    let enroll_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = controller.0.id();
    let rss_baseline = rss_kib(pid)?;
    eprintln!("enrolled {n} hosts in {enroll_secs:.1}s; controller RSS {rss_baseline} KiB");

    let welcomes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    for (host, bundle) in fleet {
        tokio::spawn(simulated_agent(
            addr.clone(),
            host,
            bundle,
            welcomes.clone(),
        ));
    }
    let connected = wait_count(&welcomes, n as u64, Duration::from_secs(120)).await?;
    let connect_secs = (connected - started).as_secs_f64();
    eprintln!("all {n} connected from cold in {connect_secs:.2}s; steady state for {steady}s");

    // Let start-up allocations settle, then measure a steady window.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu0 = cpu_secs(pid)?;
    let t0 = Instant::now();
    let mut rss_samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(steady) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        rss_samples.push(rss_kib(pid)? as f64);
    }
    let cpu_percent = (cpu_secs(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss_steady = median(rss_samples);
    let per_agent_kib = (rss_steady - rss_baseline as f64) / n as f64;
    let bench_rss = rss_kib(std::process::id())?;
    eprintln!(
        "steady: RSS {rss_steady} KiB ({per_agent_kib:.1} KiB per agent), CPU {cpu_percent:.2}% of a core"
    );

    let stop = sigterm(&mut controller.0)?;
    let before = welcomes.load(Ordering::SeqCst);
    let restarted_at = Instant::now();
    let _controller = start_controller(bin_dir, &data, &addr)?;
    let serving = wait_serving(&addr, &admin).await?;
    let done = wait_count(&welcomes, before + n as u64, Duration::from_secs(120)).await?;
    let reconnect_secs = (done - restarted_at).as_secs_f64();
    let reconnect_from_serving = (done - serving).as_secs_f64();
    eprintln!(
        "controller stopped in {:.2}s; all {n} reconnected {reconnect_secs:.2}s after the restart",
        stop.as_secs_f64()
    );

    Ok(serde_json::json!({
        "agents": n,
        "enroll_all_secs": enroll_secs,
        "controller_rss_baseline_kib": rss_baseline,
        "controller_rss_steady_kib": rss_steady,
        "controller_kib_per_agent": per_agent_kib,
        "controller_cpu_percent_of_one_core": cpu_percent,
        "connect_all_cold_secs": connect_secs,
        "controller_sigterm_exit_secs": stop.as_secs_f64(),
        "reconnect_all_after_restart_secs": reconnect_secs,
        "reconnect_all_after_serving_secs": reconnect_from_serving,
        "bench_process_rss_kib": bench_rss,
        "steady_window_secs": steady,
    }))
}

// --- agent idle -----------------------------------------------------------------------------

async fn agent_idle(duration: u64, bin_dir: &Path) -> Result<serde_json::Value> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("controller");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let admin = data.join("operator/admin");
    let _controller = start_controller(bin_dir, &data, &addr)?;
    wait_serving(&addr, &admin).await?;
    let token = operator(&addr, &admin)?
        .create_token(v1::CreateTokenRequest {
            host: "idle-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let agent_dir = tmp.path().join("agent");
    let status = Command::new(bin_dir.join("drover-agent"))
        .args(["enroll", "--controller", &addr, "--data-dir"])
        .arg(&agent_dir)
        .env("DROVER_TOKEN", &token)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("enrollment failed");
    }
    let agent = Proc(
        Command::new(bin_dir.join("drover-agent"))
            .args(["run", "--data-dir"])
            .arg(&agent_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = agent.0.id();
    // Past start-up: connected, first reports sent.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu0 = cpu_secs(pid)?;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(duration) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        samples.push(rss_kib(pid)? as f64);
    }
    let cpu_percent = (cpu_secs(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let max = samples.iter().copied().fold(0.0, f64::max);
    Ok(serde_json::json!({
        "window_secs": duration,
        "agent_rss_median_kib": median(samples),
        "agent_rss_max_kib": max,
        "agent_cpu_percent_of_one_core": cpu_percent,
    }))
}
