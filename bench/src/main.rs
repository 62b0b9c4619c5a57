//! `drover-bench`: hand-run benchmarks recorded in BENCHMARKS.md. `fleet` runs the real
//! controller binary against N simulated agents (each its own mTLS connection and session, all in
//! this one process); `release` (`release.rs`) has the real controller drive a fleet release
//! across such agents; `agent-idle` watches a real idle agent's memory and CPU; `deploys`
//! (`deploys.rs`) deploys under load with the real programs, beside stop-then-start.

mod backups;
mod deploys;
mod real_release;
mod realhost;
mod release;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use drover_identity::files::Bundle;
use drover_identity::pki::new_key_and_csr;
use drover_identity::tls::{ClientCert, Trust, channel, channel_from, client_config};
use drover_proto::v1;
use drover_proto::v1::agent_message::Msg as Out;
use drover_proto::v1::controller_message::Msg as In;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(
    name = "drover-bench",
    about = "Drover benchmarks, run by hand (see BENCHMARKS.md)"
)]
struct Args {
    /// Print the results as one JSON object on stdout (the summary goes to stderr).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One real controller, N simulated agents: memory per agent, CPU, connect and reconnect.
    Fleet {
        #[arg(long, default_value_t = 2000)]
        agents: usize,
        /// Steady-state measuring window (e.g. 60s, 2m; a bare number is seconds).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        steady: Duration,
        /// Pause between "all connected" and the steady window.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        settle: Duration,
        #[command(flatten)]
        sim: SimArgs,
    },
    /// One real controller drives a fleet release across N simulated agents that answer each
    /// deploy after a fixed delay: wall time, controller CPU and memory, overhead per wave.
    Release(release::ReleaseOpts),
    /// Fleet releases across N real agents on the one Docker Engine: wall time, and the time
    /// from a host's failure to every updated host serving its previous version (needs Docker
    /// and the test app images: scripts/testapp-image.sh).
    RealRelease(real_release::RealReleaseOpts),
    /// Zero-downtime deploys and rollbacks under a paced load, with the real controller, agent
    /// and CLI, beside `docker stop; docker run` with the same app and load (needs Docker and
    /// the test app images: scripts/testapp-image.sh).
    Deploys {
        #[arg(long, default_value_t = 50)]
        deploys: usize,
        #[arg(long, default_value_t = 10)]
        rollbacks: usize,
        /// Requests per second through the proxy (and to the baseline's published port).
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// The app's post-deploy watch window (0s: none; deploy time then excludes it).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        watch: Duration,
        /// Where drover-controller, drover-agent and drover are.
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
    },
    /// A Drover backup of a generated database (realistic content, about 2-3x compressible)
    /// beside pg_dump -Fc -Z0, pg_dump -Fc and pg_dump | gzip; pipeline throughput per core;
    /// restore times (needs PostgreSQL on the host and root to run it as `postgres`).
    Backups {
        /// MiB of text to generate into the table (the database ends up larger).
        #[arg(long, default_value_t = 1100)]
        size_mib: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// zstd level of the Drover backup (the target's `[compression] level`; 0: Drover's
        /// default, by the host's cores).
        #[arg(long, default_value_t = 0)]
        level: i32,
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
    },
    /// A real, idle, enrolled agent with its default configuration: RSS and CPU over a window.
    AgentIdle {
        /// Measuring window (e.g. 600s, 10m; a bare number is seconds).
        #[arg(long, default_value = "600s", value_parser = parse_duration)]
        duration: Duration,
        /// RSS sampling period.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        every: Duration,
        /// Start-up time left out of the window.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        settle: Duration,
        #[arg(long, default_value = "target/release/drover-controller")]
        controller_bin: PathBuf,
        #[arg(long, default_value = "target/release/drover-agent")]
        agent_bin: PathBuf,
    },
}

/// What the benchmarks of simulated agents (`fleet`, `release`) share.
#[derive(Debug, Clone, clap::Args)]
struct SimArgs {
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// How long to wait for all agents to connect, in each phase, before failing (`release`:
    /// also how long beyond the release's expected time).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    patience: Duration,
    #[arg(long, default_value = "target/release/drover-controller")]
    controller_bin: PathBuf,
    /// Loopback source addresses the simulated hosts connect from (127.0.0.1, .2, …), so
    /// that the controller's per-source caps (`[connections] max_per_ip`, 1,024, and
    /// `max_unauthenticated_per_ip`, 64) see a fleet of hosts, not one.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=250))]
    source_addrs: u8,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}")),
    }
}

fn main() {
    let args = Args::parse();
    drover_identity::tls::install_crypto_provider();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| {
            rt.block_on(async {
                match args.command {
                    Cmd::Fleet {
                        agents,
                        steady,
                        settle,
                        sim,
                    } => {
                        fleet(FleetOpts {
                            n: agents,
                            steady,
                            settle,
                            sim,
                        })
                        .await
                    }
                    Cmd::Release(opts) => release::release(opts).await,
                    Cmd::RealRelease(opts) => real_release::real_release(opts).await,
                    Cmd::AgentIdle {
                        duration,
                        every,
                        settle,
                        controller_bin,
                        agent_bin,
                    } => agent_idle(duration, every, settle, &controller_bin, &agent_bin).await,
                    Cmd::Backups {
                        size_mib,
                        runs,
                        level,
                        bin_dir,
                    } => {
                        backups::backups(backups::BackupOpts {
                            size_mib,
                            runs,
                            level,
                            bin_dir,
                        })
                        .await
                    }
                    Cmd::Deploys {
                        deploys,
                        rollbacks,
                        rate,
                        watch,
                        bin_dir,
                    } => {
                        deploys::deploys(deploys::DeployOpts {
                            deploys,
                            rollbacks,
                            rate,
                            watch,
                            bin_dir,
                        })
                        .await
                    }
                }
            })
        });
    match result {
        Ok(report) => {
            if args.json {
                eprintln!("{}", report.summary);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report.json).unwrap_or_default()
                );
            } else {
                println!("{}", report.summary);
            }
        }
        Err(err) => {
            eprintln!("drover-bench: FAILED: {err:#}");
            std::process::exit(1);
        }
    }
}

struct Report {
    summary: String,
    json: serde_json::Value,
}

// --- processes and /proc --------------------------------------------------------------------

/// One field (in KiB) of /proc/<pid>/status, e.g. `VmRSS`.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The sum of fields `from..=to` of /proc/<pid>/stat counted after the ')' (the state,
/// field 3, is index 0), converted from clock ticks to seconds.
fn stat_secs(pid: u32, from: usize, to: usize) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("bad /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let mut ticks = 0.0;
    for field in fields.get(from..=to).context("short /proc/PID/stat")? {
        ticks += field.parse::<f64>()?;
    }
    Ok(ticks / clock_ticks())
}

/// utime + stime of a process (fields 14 and 15), in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    stat_secs(pid, 11, 12)
}

/// utime + stime + cutime + cstime (fields 14-17: the process and its waited-for children), in
/// seconds.
fn cpu_with_children(pid: u32) -> Result<f64> {
    stat_secs(pid, 11, 14)
}

/// A child process, killed if still running when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, args: &[&str], log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it first: cargo build --release --workspace --bins)",
                    bin.display()
                )
            })?;
        Ok(Proc {
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of the process's output, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(15);
        format!(
            "last lines of {}:\n{}",
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// SIGTERM (through kill(1): this workspace has no unsafe code), then waits for the exit.
    fn terminate(&mut self) -> Result<(Duration, ExitStatus)> {
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !sent.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        let status = self.child.wait()?;
        Ok((started.elapsed(), status))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The arguments of `drover-controller run` on `data` and `addr`.
fn run_args<'a>(data: &'a str, addr: &'a str) -> [&'a str; 7] {
    [
        "run",
        "--data-dir",
        data,
        "--listen",
        addr,
        "--log-format",
        "text",
    ]
}

/// [`start_controller`] under `prlimit --nofile=N:N` (util-linux), as `LimitNOFILE=N` runs it.
fn start_controller_with_nofile(
    bin: &Path,
    data: &Path,
    addr: &str,
    log: &Path,
    nofile: u64,
) -> Result<Proc> {
    let data = data.to_str().context("data dir is not UTF-8")?;
    let bin = bin.to_str().context("controller path is not UTF-8")?;
    let limit = format!("--nofile={nofile}:{nofile}");
    let mut args = vec![limit.as_str(), "--", bin];
    args.extend(run_args(data, addr));
    Proc::spawn(Path::new("prlimit"), &args, log)
}

/// The soft "Max open files" of a running process (/proc/PID/limits).
fn nofile_of(pid: u32) -> Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
        .context("no Max open files in /proc/PID/limits")
}

fn start_controller(bin: &Path, data: &Path, addr: &str, log: &Path) -> Result<Proc> {
    let data = data.to_str().context("data dir is not UTF-8")?;
    Proc::spawn(bin, &run_args(data, addr), log)
}

type OperatorClient = v1::operator_service_client::OperatorServiceClient<tonic::transport::Channel>;

fn operator(addr: &str, dir: &Path) -> Result<OperatorClient> {
    let b = Bundle::load(dir)?;
    let config = client_config(
        &Trust::Ca(b.ca_pem),
        Some(&ClientCert {
            cert_pem: b.cert_pem,
            key_pem: b.key_pem,
        }),
    )?;
    Ok(OperatorClient::new(channel(
        addr,
        config,
        Duration::from_secs(5),
    )?))
}

/// Waits until the admin bundle exists and an operator call succeeds.
async fn wait_serving(controller: &mut Proc, addr: &str, admin: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if admin.join("key.pem").exists()
            && let Ok(mut api) = operator(addr, admin)
            && api.who_am_i(v1::WhoAmIRequest {}).await.is_ok()
        {
            return Ok(());
        }
        if let Some(status) = controller.exited() {
            bail!(
                "the controller exited ({status}); {}",
                controller.log_tail()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the controller did not serve within 30s; {}",
                controller.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a plain TCP connect to `addr` succeeds: the listener is bound and accepting.
async fn wait_accepting(controller: &mut Proc, addr: &str) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(Instant::now());
        }
        if let Some(status) = controller.exited() {
            bail!(
                "the controller exited ({status}); {}",
                controller.log_tail()
            );
        }
        if Instant::now() > deadline {
            bail!("the controller did not listen within 30s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile; 0 for an empty slice.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

// --- fleet ----------------------------------------------------------------------------------

struct FleetOpts {
    n: usize,
    steady: Duration,
    settle: Duration,
    sim: SimArgs,
}

/// A controller started for `n` simulated hosts on a fresh data dir, serving.
struct SimController {
    /// Holds the data dir and the logs; removed when dropped.
    tmp: tempfile::TempDir,
    data: PathBuf,
    addr: String,
    /// The admin operator bundle.
    admin: PathBuf,
    controller: Proc,
    /// The unit's `LimitNOFILE=` and the limit the controller runs with (see [`fleet_nofile`]).
    unit: u64,
    nofile: u64,
}

/// Starts `sim.controller_bin` with its output in `log` (in the temp dir) and waits until it
/// serves the admin.
async fn start_sim_controller(sim: &SimArgs, n: usize, log: &str) -> Result<SimController> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("controller");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let admin = data.join("operator/admin");
    let (unit, nofile) = fleet_nofile(n)?;
    let mut controller = start_controller_with_nofile(
        &sim.controller_bin,
        &data,
        &addr,
        &tmp.path().join(log),
        nofile,
    )?;
    wait_serving(&mut controller, &addr, &admin).await?;
    Ok(SimController {
        tmp,
        data,
        addr,
        admin,
        controller,
        unit,
        nofile,
    })
}

/// The loopback address simulated host `idx` connects from.
fn source_addr(idx: usize, addrs: u8) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        0,
        0,
        1 + (idx % addrs as usize) as u8,
    ))
}

/// The unit the controller runs under in production.
const CONTROLLER_UNIT: &str = include_str!("../../systemd/drover-controller.service");

/// `LimitNOFILE=` of a systemd unit.
fn unit_nofile(unit: &str) -> Result<u64> {
    unit.lines()
        .find_map(|l| l.trim().strip_prefix("LimitNOFILE="))
        .context("systemd/drover-controller.service sets no LimitNOFILE")?
        .trim()
        .parse()
        .context("LimitNOFILE= of systemd/drover-controller.service is not a number")
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit and checks there are `need`.
fn raise_own_nofile(need: u64) -> Result<()> {
    let (_, now) = drover_daemon::raise_open_files_limit();
    if now < need {
        bail!(
            "the bench needs {need} file descriptors for its simulated hosts, RLIMIT_NOFILE is {now}: raise `ulimit -n`"
        );
    }
    Ok(())
}

/// The file descriptor limit a controller for `n` simulated hosts runs with: the unit's
/// `LimitNOFILE=` (returned first), or this machine's hard limit when that is smaller (raising
/// a hard limit needs CAP_SYS_RESOURCE, which a container may lack: a stricter limit). Raises
/// this process's own limit for its `n` simulated hosts and some.
fn fleet_nofile(n: usize) -> Result<(u64, u64)> {
    let unit = unit_nofile(CONTROLLER_UNIT)?;
    raise_own_nofile(n as u64 + 512)?;
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    let nofile = unit.min(hard);
    if nofile < unit {
        eprintln!(
            "this machine's hard RLIMIT_NOFILE is {hard}, below the unit's LimitNOFILE={unit}: the controller runs with {nofile}"
        );
    }
    Ok((unit, nofile))
}

/// Enrolls `n` hosts `bench-0001`… through the real Enrollment RPC (a token from the operator
/// API, a fresh key and CSR per host); returns their names and bundles, in order.
async fn enroll_fleet(
    addr: &str,
    admin: &Path,
    n: usize,
    concurrency: usize,
    source_addrs: u8,
) -> Result<Vec<(String, Bundle)>> {
    let api = operator(addr, admin)?;
    let ca_pem = Bundle::load(admin)?.ca_pem;
    let enroll_config = client_config(&Trust::Ca(ca_pem.clone()), None)?;
    let mut results = futures::stream::iter(1..=n)
        .map(|i| {
            let mut api = api.clone();
            let ca_pem = ca_pem.clone();
            let enroll_config = enroll_config.clone();
            let addr = addr.to_string();
            async move {
                let host = format!("bench-{i:04}");
                let token = api
                    .create_token(v1::CreateTokenRequest {
                        host: host.clone(),
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("{host}: CreateToken"))?
                    .into_inner()
                    .token;
                let (key_pem, csr_pem) = new_key_and_csr(&host)?;
                let mut enroll = v1::enrollment_client::EnrollmentClient::new(channel_from(
                    &addr,
                    enroll_config,
                    Duration::from_secs(10),
                    Some(source_addr(i, source_addrs)),
                )?);
                let resp = enroll
                    .enroll(v1::EnrollRequest {
                        token,
                        csr_pem,
                        host: host.clone(),
                        labels: Default::default(),
                    })
                    .await
                    .with_context(|| format!("{host}: Enroll"))?
                    .into_inner();
                anyhow::Ok((
                    i,
                    host,
                    Bundle {
                        ca_pem,
                        cert_pem: resp.cert_pem,
                        key_pem,
                    },
                ))
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    results.sort_by_key(|(i, _, _)| *i);
    Ok(results.into_iter().map(|(_, h, b)| (h, b)).collect())
}

/// [`enroll_fleet`] timed, then the controller's RSS (KiB) 2 s later: enrolled, no sessions.
async fn enroll_measured(
    sim: &SimArgs,
    addr: &str,
    admin: &Path,
    pid: u32,
    n: usize,
) -> Result<(Vec<(String, Bundle)>, f64, u64)> {
    let t = Instant::now();
    let fleet = enroll_fleet(addr, admin, n, sim.enroll_concurrency, sim.source_addrs).await?;
    let secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((fleet, secs, rss_kib(pid)?))
}

/// What the simulated agents have seen, shared with the measuring code.
struct Board {
    base: Instant,
    /// The phase Welcomes are counted for: 1 = cold start, 2 = after the controller restart.
    epoch: AtomicU64,
    /// Per agent: the epoch of its last Welcome.
    seen: Vec<AtomicU64>,
    /// Per epoch: agents welcomed, and the time of the last first-Welcome (ms since `base`).
    welcomed: [AtomicU64; 3],
    last_welcome_ms: [AtomicU64; 3],
    /// Every Welcome, so reconnects in the steady window show.
    sessions: AtomicU64,
    heartbeats: AtomicU64,
    acks: AtomicU64,
    /// While set, heartbeat round trips are recorded (µs).
    measuring: AtomicBool,
    rtts_us: Mutex<Vec<u32>>,
    last_error: Vec<Mutex<String>>,
}

impl Board {
    fn new(n: usize) -> Board {
        Board {
            base: Instant::now(),
            epoch: AtomicU64::new(0),
            seen: (0..n).map(|_| AtomicU64::new(0)).collect(),
            welcomed: Default::default(),
            last_welcome_ms: Default::default(),
            sessions: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            rtts_us: Mutex::new(Vec::new()),
            last_error: (0..n).map(|_| Mutex::new(String::new())).collect(),
        }
    }

    fn welcome(&self, idx: usize) {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let epoch = self.epoch.load(Ordering::SeqCst);
        if self.seen[idx].swap(epoch, Ordering::SeqCst) != epoch {
            let at = self.base.elapsed().as_millis() as u64;
            self.last_welcome_ms[epoch as usize].fetch_max(at, Ordering::SeqCst);
            self.welcomed[epoch as usize].fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Time (since `base`) of the last agent's first Welcome in `epoch`.
    fn last_welcome(&self, epoch: usize) -> Duration {
        Duration::from_millis(self.last_welcome_ms[epoch].load(Ordering::SeqCst))
    }

    /// Waits until every agent has a Welcome in `epoch`; else names the ones that do not.
    async fn wait_all(&self, epoch: usize, hosts: &[String], patience: Duration) -> Result<()> {
        let n = hosts.len() as u64;
        let deadline = Instant::now() + patience;
        while self.welcomed[epoch].load(Ordering::SeqCst) < n {
            if Instant::now() > deadline {
                let missing: Vec<String> = (0..hosts.len())
                    .filter(|&i| self.seen[i].load(Ordering::SeqCst) != epoch as u64)
                    .map(|i| {
                        let err = self.last_error[i].lock().map(|e| e.clone());
                        format!("{} ({})", hosts[i], err.unwrap_or_default())
                    })
                    .collect();
                bail!(
                    "only {} of {n} agents connected within {patience:?}; missing {}: {}",
                    n as usize - missing.len(),
                    missing.len(),
                    missing
                        .iter()
                        .take(10)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

/// The mTLS client configuration of a simulated host with `bundle`'s certificate.
fn agent_tls(bundle: &Bundle) -> Result<rustls::ClientConfig> {
    Ok(client_config(
        &Trust::Ca(bundle.ca_pem.clone()),
        Some(&ClientCert {
            cert_pem: bundle.cert_pem.clone(),
            key_pem: bundle.key_pem.clone(),
        }),
    )?)
}

/// Opens `AgentService.Session` as `host` from `source` with Hello already queued: the queue of
/// what the simulated agent sends (`queue` deep) and what the controller sends it.
async fn open_session(
    addr: &str,
    host: &str,
    config: rustls::ClientConfig,
    source: std::net::IpAddr,
    queue: usize,
) -> Result<(
    mpsc::Sender<v1::AgentMessage>,
    tonic::Streaming<v1::ControllerMessage>,
)> {
    let mut client = v1::agent_service_client::AgentServiceClient::new(channel_from(
        addr,
        config,
        Duration::from_secs(10),
        Some(source),
    )?);
    let (tx, rx) = mpsc::channel(queue);
    tx.send(v1::AgentMessage {
        msg: Some(Out::Hello(v1::Hello {
            host: host.to_string(),
            agent_version: "bench".into(),
            ..Default::default()
        })),
    })
    .await?;
    let inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .context("Session")?
        .into_inner();
    Ok((tx, inbound))
}

/// One simulated agent: its own TLS connection and session, Hello, a heartbeat every 5 s with a
/// random phase, reading everything the controller sends, reconnecting with the agent's backoff.
async fn simulated_agent(
    addr: String,
    idx: usize,
    host: String,
    bundle: Bundle,
    board: Arc<Board>,
    source: std::net::IpAddr,
) {
    let config = match agent_tls(&bundle) {
        Ok(c) => c,
        Err(e) => {
            *board.last_error[idx].lock().unwrap() = e.to_string();
            return;
        }
    };
    let mut attempt = 0u32;
    loop {
        let result = session(
            &addr,
            idx,
            &host,
            config.clone(),
            &board,
            &mut attempt,
            source,
        )
        .await;
        if let Err(e) = result {
            *board.last_error[idx].lock().unwrap() = format!("{e:#}");
        }
        let delay = drover_agent::backoff::delay(
            attempt,
            Duration::from_millis(500),
            Duration::from_secs(60),
            rand::random::<f64>(),
        );
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    addr: &str,
    idx: usize,
    host: &str,
    config: rustls::ClientConfig,
    board: &Board,
    attempt: &mut u32,
    source: std::net::IpAddr,
) -> Result<()> {
    let (tx, mut inbound) = open_session(addr, host, config, source, 8).await?;
    // A random phase spreads the fleet's heartbeats over the interval, as real agents drift.
    let phase = Duration::from_millis(rand::random::<u64>() % 5000);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(5));
    let mut last_sent: Option<(i64, Instant)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let sent = now_ms();
                last_sent = Some((sent, Instant::now()));
                tx.send(v1::AgentMessage {
                    msg: Some(Out::Heartbeat(v1::Heartbeat { sent_unix_ms: sent })),
                })
                .await?;
                board.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            msg = inbound.message() => match msg.context("reading the session")? {
                Some(v1::ControllerMessage { msg: Some(In::Welcome(_)) }) => {
                    *attempt = 0;
                    board.welcome(idx);
                }
                Some(v1::ControllerMessage { msg: Some(In::HeartbeatAck(ack)) }) => {
                    board.acks.fetch_add(1, Ordering::Relaxed);
                    if let Some((sent, at)) = last_sent
                        && sent == ack.agent_sent_unix_ms
                        && board.measuring.load(Ordering::Relaxed)
                    {
                        let us = at.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        board.rtts_us.lock().unwrap().push(us);
                    }
                }
                Some(_) => {}
                None => bail!("the controller ended the session"),
            }
        }
    }
}

async fn fleet(o: FleetOpts) -> Result<Report> {
    let n = o.n;
    let SimController {
        tmp,
        data,
        addr,
        admin,
        mut controller,
        unit,
        nofile,
    } = start_sim_controller(&o.sim, n, "controller-1.log").await?;
    let pid = controller.pid();
    let controller_nofile = nofile_of(pid)?;
    eprintln!(
        "controller pid {pid} serving on {addr} with RLIMIT_NOFILE {controller_nofile} (the unit's LimitNOFILE={unit}); enrolling {n} hosts from {} loopback addresses",
        o.sim.source_addrs
    );

    let (fleet, enroll_secs, rss_baseline) = enroll_measured(&o.sim, &addr, &admin, pid, n).await?;
    eprintln!(
        "enrolled {n} hosts in {enroll_secs:.2}s; controller baseline RSS {rss_baseline} KiB"
    );

    // Cold start: every agent dials at once.
    let hosts: Vec<String> = fleet.iter().map(|(h, _)| h.clone()).collect();
    let board = Arc::new(Board::new(n));
    board.epoch.store(1, Ordering::SeqCst);
    let started = board.base.elapsed();
    for (idx, (host, bundle)) in fleet.into_iter().enumerate() {
        tokio::spawn(simulated_agent(
            addr.clone(),
            idx,
            host,
            bundle,
            board.clone(),
            source_addr(idx, o.sim.source_addrs),
        ));
    }
    if let Err(e) = board.wait_all(1, &hosts, o.sim.patience).await {
        bail!("cold start: {e:#}; {}", controller.log_tail());
    }
    let connect_cold = board.last_welcome(1).saturating_sub(started);
    eprintln!(
        "all {n} connected from cold in {:.2}s; settling {:?}, then steady for {:?}",
        connect_cold.as_secs_f64(),
        o.settle,
        o.steady
    );

    // Steady state.
    tokio::time::sleep(o.settle).await;
    let me = std::process::id();
    let sessions0 = board.sessions.load(Ordering::SeqCst);
    let acks0 = board.acks.load(Ordering::SeqCst);
    let (cpu0, bench_cpu0) = (cpu_secs(pid)?, cpu_secs(me)?);
    let t0 = Instant::now();
    board.measuring.store(true, Ordering::SeqCst);
    let mut rss_samples = vec![rss_kib(pid)? as f64];
    while t0.elapsed() < o.steady {
        let left = o.steady.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
        rss_samples.push(rss_kib(pid)? as f64);
    }
    let window = t0.elapsed().as_secs_f64();
    let cpu_pct = (cpu_secs(pid)? - cpu0) / window * 100.0;
    let bench_cpu_pct = (cpu_secs(me)? - bench_cpu0) / window * 100.0;
    board.measuring.store(false, Ordering::SeqCst);
    let acks = board.acks.load(Ordering::SeqCst) - acks0;
    let reconnects_steady = board.sessions.load(Ordering::SeqCst) - sessions0;
    let rtts: Vec<f64> = board
        .rtts_us
        .lock()
        .unwrap()
        .iter()
        .map(|&us| us as f64 / 1000.0)
        .collect();
    let rss_steady = median(&rss_samples);
    let rss_start = rss_samples[0];
    let rss_end = rss_samples[rss_samples.len() - 1];
    let per_agent_kib = (rss_steady - rss_baseline as f64) / n as f64;
    // RSS keeps creeping up while idle per-connection buffers get touched page by page (see
    // BENCHMARKS.md): the window's end and its slope tell whether it has levelled off.
    let per_agent_end_kib = (rss_end - rss_baseline as f64) / n as f64;
    let growth_kib_per_min = (rss_end - rss_start) / (window / 60.0);
    let bench_rss = rss_kib(me)?;
    // The peak so far: the connect storm or the steady window, whichever was higher.
    let hwm = status_kib(pid, "VmHWM")?;
    let expected_acks = n as f64 * window / 5.0;
    eprintln!(
        "steady: RSS {rss_steady} KiB ({per_agent_kib:.1} KiB per agent), CPU {cpu_pct:.2}% of a \
         core, {acks} heartbeat acks ({:.0}% of the expected {expected_acks:.0}), {reconnects_steady} reconnects",
        acks as f64 / expected_acks * 100.0
    );
    if reconnects_steady > 0 {
        bail!("{reconnects_steady} sessions were re-established during the steady window");
    }

    // Restart: SIGTERM, then the same binary on the same port and data dir.
    let (stop, exit) = controller.terminate()?;
    if !exit.success() {
        bail!(
            "the controller exited with {exit} after SIGTERM; {}",
            controller.log_tail()
        );
    }
    board.epoch.store(2, Ordering::SeqCst);
    let spawned = board.base.elapsed();
    let mut controller = start_controller_with_nofile(
        &o.sim.controller_bin,
        &data,
        &addr,
        &tmp.path().join("controller-2.log"),
        nofile,
    )?;
    let accepting = wait_accepting(&mut controller, &addr).await? - board.base;
    if let Err(e) = board.wait_all(2, &hosts, o.sim.patience).await {
        bail!("after the restart: {e:#}; {}", controller.log_tail());
    }
    let last = board.last_welcome(2);
    let reconnect_from_spawn = last.saturating_sub(spawned);
    let reconnect_from_accept = last.saturating_sub(accepting);
    let rss_after_reconnect = rss_kib(controller.pid())?;
    eprintln!(
        "controller exited {:.2}s after SIGTERM; all {n} reconnected {:.2}s after the new spawn \
         ({:.2}s after it accepted connections)",
        stop.as_secs_f64(),
        reconnect_from_spawn.as_secs_f64(),
        reconnect_from_accept.as_secs_f64()
    );
    let (stop2, _) = controller.terminate()?;

    let kib_per_agent_goal = 64.0;
    let reconnect_goal = 10.0;
    let summary = format!(
        "fleet: {n} simulated agents from {} loopback addresses against one controller with RLIMIT_NOFILE {controller_nofile} ({:?} steady window)\n\
         \x20 enroll all ({} at a time)            {enroll_secs:>9.2} s\n\
         \x20 controller RSS, enrolled, no sessions {:>9.1} MiB\n\
         \x20 controller RSS, steady (median)       {:>9.1} MiB  (start {:.1}, end {:.1}, peak {:.1})\n\
         \x20 controller memory per agent           {per_agent_kib:>9.1} KiB  (goal <= {kib_per_agent_goal}: {}); {per_agent_end_kib:.1} at the window's end\n\
         \x20 controller RSS growth in the window   {growth_kib_per_min:>9.0} KiB/min\n\
         \x20 controller CPU at steady state        {cpu_pct:>9.2} % of one core\n\
         \x20 heartbeat acks in the window          {acks:>9}    ({:.1}% of expected), RTT median {:.2} ms, p99 {:.2} ms\n\
         \x20 connect all from cold                 {:>9.2} s\n\
         \x20 controller exit after SIGTERM         {:>9.2} s\n\
         \x20 reconnect all after restart (spawn)   {:>9.2} s    (goal <= {reconnect_goal}: {})\n\
         \x20 reconnect all after accepting         {:>9.2} s\n\
         \x20 bench process: RSS {:.1} MiB, CPU {bench_cpu_pct:.1} % of one core in the window",
        o.sim.source_addrs,
        o.steady,
        o.sim.enroll_concurrency,
        rss_baseline as f64 / 1024.0,
        rss_steady / 1024.0,
        rss_start / 1024.0,
        rss_end / 1024.0,
        hwm as f64 / 1024.0,
        if per_agent_kib <= kib_per_agent_goal {
            "met"
        } else {
            "MISSED"
        },
        acks as f64 / expected_acks * 100.0,
        median(&rtts),
        percentile(&rtts, 99.0),
        connect_cold.as_secs_f64(),
        stop.as_secs_f64(),
        reconnect_from_spawn.as_secs_f64(),
        if reconnect_from_spawn.as_secs_f64() <= reconnect_goal {
            "met"
        } else {
            "MISSED"
        },
        reconnect_from_accept.as_secs_f64(),
        bench_rss as f64 / 1024.0,
    );
    let json = json!({
        "benchmark": "fleet",
        "agents": n,
        "source_addrs": o.sim.source_addrs,
        "controller_nofile": controller_nofile,
        "unit_limit_nofile": unit,
        "steady_window_secs": window,
        "enroll_all_secs": enroll_secs,
        "enroll_concurrency": o.sim.enroll_concurrency,
        "controller_rss_baseline_kib": rss_baseline,
        "controller_rss_steady_median_kib": rss_steady,
        "controller_rss_steady_start_kib": rss_start,
        "controller_rss_steady_end_kib": rss_end,
        "controller_rss_steady_samples_kib": rss_samples,
        "controller_rss_peak_vmhwm_kib": hwm,
        "controller_kib_per_agent": per_agent_kib,
        "controller_kib_per_agent_window_end": per_agent_end_kib,
        "controller_rss_growth_kib_per_min": growth_kib_per_min,
        "controller_cpu_percent_of_one_core": cpu_pct,
        "heartbeat_acks_in_window": acks,
        "heartbeat_acks_expected": expected_acks,
        "heartbeat_rtt_median_ms": median(&rtts),
        "heartbeat_rtt_p99_ms": percentile(&rtts, 99.0),
        "reconnects_in_window": reconnects_steady,
        "connect_all_cold_secs": connect_cold.as_secs_f64(),
        "controller_sigterm_exit_secs": stop.as_secs_f64(),
        "reconnect_all_from_spawn_secs": reconnect_from_spawn.as_secs_f64(),
        "reconnect_all_from_accepting_secs": reconnect_from_accept.as_secs_f64(),
        "controller_spawn_to_accepting_secs": accepting.saturating_sub(spawned).as_secs_f64(),
        "controller_rss_after_reconnect_kib": rss_after_reconnect,
        "controller_sigterm_exit_second_secs": stop2.as_secs_f64(),
        "bench_rss_kib": bench_rss,
        "bench_cpu_percent_of_one_core": bench_cpu_pct,
        "goals": {
            "kib_per_agent_max": kib_per_agent_goal,
            "kib_per_agent_met": per_agent_kib <= kib_per_agent_goal,
            "reconnect_all_secs_max": reconnect_goal,
            "reconnect_all_met": reconnect_from_spawn.as_secs_f64() <= reconnect_goal,
        },
    });
    Ok(Report { summary, json })
}

// --- agent idle -----------------------------------------------------------------------------

async fn agent_idle(
    duration: Duration,
    every: Duration,
    settle: Duration,
    controller_bin: &Path,
    agent_bin: &Path,
) -> Result<Report> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("controller");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let admin = data.join("operator/admin");
    let mut controller = start_controller(
        controller_bin,
        &data,
        &addr,
        &tmp.path().join("controller.log"),
    )?;
    wait_serving(&mut controller, &addr, &admin).await?;
    let mut api = operator(&addr, &admin)?;
    let host = "idle-1";
    let token = api
        .create_token(v1::CreateTokenRequest {
            host: host.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let agent_dir = tmp.path().join("agent");
    let agent_dir_s = agent_dir.to_str().context("temp dir is not UTF-8")?;
    let enrolled = Command::new(agent_bin)
        .args(["enroll", "--controller", &addr, "--data-dir", agent_dir_s])
        .env("DROVER_TOKEN", &token)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {} enroll", agent_bin.display()))?;
    if !enrolled.success() {
        bail!("drover-agent enroll failed: {enrolled}");
    }
    // Default configuration: no --config file.
    let mut agent = Proc::spawn(
        agent_bin,
        &["run", "--data-dir", agent_dir_s],
        &tmp.path().join("agent.log"),
    )?;
    let pid = agent.pid();
    eprintln!(
        "agent pid {pid} running; settling {settle:?}, then sampling RSS every {every:?} for {duration:?}"
    );
    tokio::time::sleep(settle).await;
    if let Some(status) = agent.exited() {
        bail!("the agent exited ({status}); {}", agent.log_tail());
    }
    let cpu0 = cpu_secs(pid)?;
    let t0 = Instant::now();
    let mut samples = vec![rss_kib(pid)? as f64];
    while t0.elapsed() < duration {
        let left = duration.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(every)).await;
        if let Some(status) = agent.exited() {
            bail!("the agent exited ({status}); {}", agent.log_tail());
        }
        samples.push(rss_kib(pid)? as f64);
    }
    let window = t0.elapsed().as_secs_f64();
    let cpu_pct = (cpu_secs(pid)? - cpu0) / window * 100.0;
    let hwm = status_kib(pid, "VmHWM")?;
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_string()))
        .unwrap_or_default();

    // The agent really did its default work: connected, reporting, Docker probed.
    let info = api
        .get_host(v1::GetHostRequest { name: host.into() })
        .await?
        .into_inner();
    let report = info.last_report.unwrap_or_default();
    if info.state != "connected" || !info.session_open {
        bail!(
            "the agent is not connected at the end (state {}); {}",
            info.state,
            agent.log_tail()
        );
    }
    let report_age_s = (now_ms() - report.collected_unix_ms) as f64 / 1000.0;
    let (stop, _) = agent.terminate()?;

    let max = samples.iter().copied().fold(0.0, f64::max);
    let min = samples.iter().copied().fold(f64::MAX, f64::min);
    let med = median(&samples);
    let goal_mib = 15.0;
    let summary = format!(
        "agent-idle: one real agent, default configuration, {window:.0} s window\n\
         \x20 agent RSS median ({} samples)  {:>7.1} MiB ({med} KiB)  (goal <= {goal_mib} MiB: {})\n\
         \x20 agent RSS min / max              {:>7.1} / {:.1} MiB, peak (VmHWM) {:.1} MiB\n\
         \x20 agent CPU over the window        {cpu_pct:>7.3} % of one core\n\
         \x20 threads {threads}; Docker reachable {} (version {}); last report {report_age_s:.0} s old; \
         exited {:.2}s after SIGTERM",
        samples.len(),
        med / 1024.0,
        if med / 1024.0 <= goal_mib {
            "met"
        } else {
            "MISSED"
        },
        min / 1024.0,
        max / 1024.0,
        hwm as f64 / 1024.0,
        report.docker_reachable,
        report.docker_version,
        stop.as_secs_f64(),
    );
    let json = json!({
        "benchmark": "agent-idle",
        "window_secs": window,
        "samples": samples.len(),
        "agent_rss_median_kib": med,
        "agent_rss_min_kib": min,
        "agent_rss_max_kib": max,
        "agent_rss_peak_vmhwm_kib": hwm,
        "agent_cpu_percent_of_one_core": cpu_pct,
        "agent_threads": threads,
        "docker_reachable": report.docker_reachable,
        "docker_version": report.docker_version,
        "host_state_at_end": info.state,
        "last_report_age_secs": report_age_s,
        "agent_sigterm_exit_secs": stop.as_secs_f64(),
        "goals": { "rss_mib_max": goal_mib, "rss_met": med / 1024.0 <= goal_mib },
    });
    Ok(Report { summary, json })
}
