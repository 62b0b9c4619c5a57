//! Host health: facts collected from /proc, statvfs and the Docker Engine, and the pure
//! function that turns facts into healthy/degraded/unhealthy checks.

use std::time::Duration;

use serde::Deserialize;

use drover_model::config::duration_str;

/// Limits that decide when a check is degraded or unhealthy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    pub disk_degraded_free_percent: f64,
    pub disk_unhealthy_free_percent: f64,
    pub disk_min_free_bytes: u64,
    pub memory_degraded_available_percent: f64,
    pub memory_unhealthy_available_percent: f64,
    pub load_degraded_per_cpu: f64,
    pub load_unhealthy_per_cpu: f64,
    #[serde(with = "duration_str")]
    pub cert_degraded_before_expiry: Duration,
    #[serde(with = "duration_str")]
    pub clock_degraded_offset: Duration,
    #[serde(with = "duration_str")]
    pub clock_unhealthy_offset: Duration,
    /// Open descriptors as a percentage of the agent's open-file limit.
    pub fds_degraded_percent: f64,
    pub fds_unhealthy_percent: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            disk_degraded_free_percent: 10.0,
            disk_unhealthy_free_percent: 5.0,
            disk_min_free_bytes: 1 << 30,
            memory_degraded_available_percent: 10.0,
            memory_unhealthy_available_percent: 5.0,
            load_degraded_per_cpu: 2.0,
            load_unhealthy_per_cpu: 4.0,
            cert_degraded_before_expiry: Duration::from_secs(2 * 3600),
            clock_degraded_offset: Duration::from_secs(1),
            clock_unhealthy_offset: Duration::from_secs(30),
            fds_degraded_percent: 80.0,
            fds_unhealthy_percent: 95.0,
        }
    }
}

impl Thresholds {
    /// Checks the limits are coherent; the error names the `health.` key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let pct = |key, v: f64| {
            if (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err((key, format!("{v} is not a percentage (0-100)")))
            }
        };
        pct(
            "health.disk_degraded_free_percent",
            self.disk_degraded_free_percent,
        )?;
        pct(
            "health.disk_unhealthy_free_percent",
            self.disk_unhealthy_free_percent,
        )?;
        pct(
            "health.memory_degraded_available_percent",
            self.memory_degraded_available_percent,
        )?;
        pct(
            "health.memory_unhealthy_available_percent",
            self.memory_unhealthy_available_percent,
        )?;
        pct("health.fds_degraded_percent", self.fds_degraded_percent)?;
        pct("health.fds_unhealthy_percent", self.fds_unhealthy_percent)?;
        if self.fds_unhealthy_percent < self.fds_degraded_percent {
            return Err((
                "health.fds_unhealthy_percent",
                "must be at least fds_degraded_percent".into(),
            ));
        }
        if self.disk_unhealthy_free_percent > self.disk_degraded_free_percent {
            return Err((
                "health.disk_unhealthy_free_percent",
                "must not exceed disk_degraded_free_percent".into(),
            ));
        }
        if self.memory_unhealthy_available_percent > self.memory_degraded_available_percent {
            return Err((
                "health.memory_unhealthy_available_percent",
                "must not exceed memory_degraded_available_percent".into(),
            ));
        }
        if !self.load_degraded_per_cpu.is_finite() || self.load_degraded_per_cpu <= 0.0 {
            return Err((
                "health.load_degraded_per_cpu",
                format!("{} must be a number above 0", self.load_degraded_per_cpu),
            ));
        }
        if self.load_unhealthy_per_cpu.is_nan()
            || self.load_unhealthy_per_cpu < self.load_degraded_per_cpu
        {
            return Err((
                "health.load_unhealthy_per_cpu",
                "must be at least load_degraded_per_cpu".into(),
            ));
        }
        // A zero limit would call every measured offset degraded.
        if self.clock_degraded_offset.is_zero() {
            return Err(("health.clock_degraded_offset", "must be above 0".into()));
        }
        if self.clock_unhealthy_offset < self.clock_degraded_offset {
            return Err((
                "health.clock_unhealthy_offset",
                "must be at least clock_degraded_offset".into(),
            ));
        }
        let day = Duration::from_secs(86_400);
        for (key, value, max) in [
            (
                "health.cert_degraded_before_expiry",
                self.cert_degraded_before_expiry,
                365 * day,
            ),
            (
                "health.clock_degraded_offset",
                self.clock_degraded_offset,
                day,
            ),
            (
                "health.clock_unhealthy_offset",
                self.clock_unhealthy_offset,
                day,
            ),
        ] {
            drover_model::config::check_duration(value, Duration::ZERO, max)
                .map_err(|m| (key, m.to_string()))?;
        }
        Ok(())
    }
}

/// How bad a check is. Ordered: `Unhealthy` is the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Status {
    #[default]
    Healthy,
    Degraded,
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// One health check with its verdict and a short reason with the numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Disk {
    pub mount: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DockerFacts {
    pub reachable: bool,
    pub version: String,
    pub error: String,
    /// The probe failed because this process could not open a descriptor (EMFILE/ENFILE),
    /// not because of the Engine.
    pub out_of_fds: bool,
    pub containers_running: u32,
    pub containers_total: u32,
}

/// Everything health is decided from. The session fills the agent-side fields (version,
/// certificate, clock offset, now); `collect_host` fills the rest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostFacts {
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub cpus: u32,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub disks: Vec<Disk>,
    pub uptime_secs: u64,
    pub docker: DockerFacts,
    pub agent_version: String,
    pub cert_not_after_unix: Option<i64>,
    pub clock_offset_ms: Option<i64>,
    pub now_unix: i64,
    /// Apps with a live release here.
    pub apps: Vec<AppFacts>,
    /// The agent's open descriptors and its open-file limit (0: not measured).
    pub fds_open: u64,
    pub fds_limit: u64,
    /// A file this sample needed could not be opened: too many open files (EMFILE/ENFILE).
    pub out_of_fds: bool,
}

/// An app with a live release on this host, and its proxy's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppFacts {
    pub app: String,
    pub version: String,
    /// Whether every container of the live release runs.
    pub running: bool,
    /// The web role's public address; empty for worker-only apps.
    pub listen: String,
    pub requests: u64,
    pub status_5xx: u64,
    pub p95_ms: u64,
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn check(name: &str, status: Status, reason: String) -> Check {
    Check {
        name: name.to_string(),
        status,
        reason,
    }
}

/// Rule for one disk: free below `disk_unhealthy_free_percent` is unhealthy; free below
/// `disk_degraded_free_percent` or below `disk_min_free_bytes` is degraded.
fn disk_status(d: &Disk, t: &Thresholds) -> Status {
    let free = percent(d.free_bytes, d.total_bytes);
    if free < t.disk_unhealthy_free_percent {
        Status::Unhealthy
    } else if free < t.disk_degraded_free_percent || d.free_bytes < t.disk_min_free_bytes {
        Status::Degraded
    } else {
        Status::Healthy
    }
}

/// Turns facts into checks, in a stable order. Percent limits trip when the value falls
/// below them; load, clock and certificate limits trip when the value reaches them.
/// - `disk`: per mount, free below `disk_unhealthy_free_percent` is unhealthy; free below
///   `disk_degraded_free_percent` or below `disk_min_free_bytes` is degraded (a small disk
///   never reaches the byte limit's percentage, so bytes alone do not make it unhealthy). The
///   worst mount decides; no mount at all is degraded.
/// - `memory`: MemAvailable as a percentage of MemTotal; an unknown total is degraded.
/// - `load`: 5-minute load average per CPU.
/// - `docker`: an unreachable Engine is unhealthy, with the probe's error as the reason.
/// - `certificate`: none or expired is unhealthy; expiring within
///   `cert_degraded_before_expiry` is degraded (renewal should have happened by then).
/// - `clock`: the absolute offset from the controller; not measured yet is healthy.
/// - `fds`: the agent's open descriptors against its open-file limit, reaching
///   `fds_unhealthy_percent` / `fds_degraded_percent`; a file that could not be opened for
///   lack of descriptors (EMFILE) is unhealthy. Then `memory` and `docker` do not blame the
///   host or the Engine: an unreadable /proc/meminfo or a failed probe for that reason is
///   degraded and names fd exhaustion.
/// - `apps` (only with deployed apps): a live release with a container not running is
///   unhealthy.
pub fn evaluate(facts: &HostFacts, t: &Thresholds) -> Vec<Check> {
    let mut checks = Vec::with_capacity(6);

    let worst_disk =
        facts
            .disks
            .iter()
            .map(|d| (disk_status(d, t), d))
            .max_by(|(sa, da), (sb, db)| {
                sa.cmp(sb).then(
                    percent(db.free_bytes, db.total_bytes)
                        .partial_cmp(&percent(da.free_bytes, da.total_bytes))
                        .unwrap_or(std::cmp::Ordering::Equal),
                )
            });
    checks.push(match worst_disk {
        None => check(
            "disk",
            Status::Degraded,
            "no local file systems found".into(),
        ),
        Some((status, d)) => check(
            "disk",
            status,
            format!(
                "{}: {} free of {} ({:.1}%){}",
                d.mount,
                gib(d.free_bytes),
                gib(d.total_bytes),
                percent(d.free_bytes, d.total_bytes),
                if facts.disks.len() > 1 {
                    format!(", worst of {} mounts", facts.disks.len())
                } else {
                    String::new()
                }
            ),
        ),
    });

    let avail = percent(facts.mem_available_bytes, facts.mem_total_bytes);
    let mem_status = if facts.mem_total_bytes == 0 {
        Status::Degraded
    } else if avail < t.memory_unhealthy_available_percent {
        Status::Unhealthy
    } else if avail < t.memory_degraded_available_percent {
        Status::Degraded
    } else {
        Status::Healthy
    };
    checks.push(check(
        "memory",
        mem_status,
        if facts.mem_total_bytes == 0 && facts.out_of_fds {
            format!("memory size unknown: /proc/meminfo could not be opened, {OUT_OF_FDS}")
        } else if facts.mem_total_bytes == 0 {
            "memory size unknown (/proc/meminfo unreadable)".to_string()
        } else {
            format!(
                "{} available of {} ({avail:.1}%)",
                gib(facts.mem_available_bytes),
                gib(facts.mem_total_bytes)
            )
        },
    ));

    let per_cpu = facts.load5 / f64::from(facts.cpus.max(1));
    let load_status = if per_cpu >= t.load_unhealthy_per_cpu {
        Status::Unhealthy
    } else if per_cpu >= t.load_degraded_per_cpu {
        Status::Degraded
    } else {
        Status::Healthy
    };
    checks.push(check(
        "load",
        load_status,
        format!(
            "load {:.2} {:.2} {:.2} on {} CPUs ({per_cpu:.2} per CPU over 5 min)",
            facts.load1,
            facts.load5,
            facts.load15,
            facts.cpus.max(1)
        ),
    ));

    checks.push(if facts.docker.reachable {
        check(
            "docker",
            Status::Healthy,
            format!(
                "Docker Engine {}: {} running of {} containers",
                facts.docker.version,
                facts.docker.containers_running,
                facts.docker.containers_total
            ),
        )
    } else if facts.docker.out_of_fds {
        // The Engine may be fine: this process could not open a socket to ask it.
        check(
            "docker",
            Status::Degraded,
            format!(
                "not probed: the agent could not open a connection to the Engine, {OUT_OF_FDS}"
            ),
        )
    } else {
        let why = if facts.docker.error.is_empty() {
            "not probed yet".to_string()
        } else {
            facts.docker.error.clone()
        };
        check("docker", Status::Unhealthy, why)
    });

    checks.push(match facts.cert_not_after_unix {
        None => check("certificate", Status::Unhealthy, "no certificate".into()),
        Some(not_after) => {
            let left = not_after - facts.now_unix;
            if left <= 0 {
                check(
                    "certificate",
                    Status::Unhealthy,
                    format!("expired {}s ago", -left),
                )
            } else if left < t.cert_degraded_before_expiry.as_secs() as i64 {
                check(
                    "certificate",
                    Status::Degraded,
                    format!("expires in {left}s and has not been renewed"),
                )
            } else {
                check(
                    "certificate",
                    Status::Healthy,
                    format!("expires in {}h {}m", left / 3600, left % 3600 / 60),
                )
            }
        }
    });

    checks.push(match facts.clock_offset_ms {
        None => check(
            "clock",
            Status::Healthy,
            "offset from the controller not measured yet".into(),
        ),
        Some(offset) => {
            let abs = offset.unsigned_abs();
            let status = if abs >= t.clock_unhealthy_offset.as_millis() as u64 {
                Status::Unhealthy
            } else if abs >= t.clock_degraded_offset.as_millis() as u64 {
                Status::Degraded
            } else {
                Status::Healthy
            };
            check(
                "clock",
                status,
                format!("{offset} ms from the controller's clock"),
            )
        }
    });

    checks.push(fds_check(facts, t));

    // Only on hosts with deployed apps, so a fresh host's checks stay the same.
    if !facts.apps.is_empty() {
        let down: Vec<String> = facts
            .apps
            .iter()
            .filter(|a| !a.running)
            .map(|a| format!("{} {}", a.app, a.version))
            .collect();
        checks.push(if down.is_empty() {
            // Versions in the reason: a deploy changes the check, so a report goes out at once.
            let live: Vec<String> = facts
                .apps
                .iter()
                .map(|a| format!("{} {}", a.app, a.version))
                .collect();
            check(
                "apps",
                Status::Healthy,
                format!("live and running: {}", live.join(", ")),
            )
        } else {
            check(
                "apps",
                Status::Unhealthy,
                format!("not running: {}", down.join(", ")),
            )
        });
    }
    checks
}

/// What the memory and docker checks say when the real cause is descriptor exhaustion.
const OUT_OF_FDS: &str = "too many open files (see the fds check)";

/// Rule for `fds`: the agent's open descriptors as a percentage of its open-file limit.
fn fds_check(facts: &HostFacts, t: &Thresholds) -> Check {
    if facts.fds_limit == 0 {
        return if facts.out_of_fds {
            check(
                "fds",
                Status::Unhealthy,
                "too many open files: the agent cannot open /proc/self/fd (EMFILE); slow or idle clients may hold them: see [proxy] in agent.toml".into(),
            )
        } else {
            check("fds", Status::Healthy, "open files not measured".into())
        };
    }
    let used = percent(facts.fds_open, facts.fds_limit);
    let status = if facts.out_of_fds || used >= t.fds_unhealthy_percent {
        Status::Unhealthy
    } else if used >= t.fds_degraded_percent {
        Status::Degraded
    } else {
        Status::Healthy
    };
    let mut reason = format!(
        "{} open files of the agent's limit {} ({used:.1}%)",
        facts.fds_open, facts.fds_limit
    );
    if facts.out_of_fds {
        reason.push_str("; too many open files: a file could not be opened (EMFILE)");
    }
    check("fds", status, reason)
}

/// The host's status: the worst check (healthy when there are none).
pub fn overall(checks: &[Check]) -> Status {
    checks
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(Status::Healthy)
}

/// Whether a report is due now: a check appeared, disappeared or changed status. Reasons whose
/// numbers move do not count.
pub fn changed(prev: &[Check], next: &[Check]) -> bool {
    prev.len() != next.len()
        || prev
            .iter()
            .zip(next)
            .any(|(a, b)| a.name != b.name || a.status != b.status)
}

/// `/proc/loadavg` → (1, 5, 15 minute load).
pub fn parse_loadavg(text: &str) -> Option<(f64, f64, f64)> {
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// `/proc/meminfo` → (MemTotal, MemAvailable) in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// `/proc/uptime` → whole seconds.
pub fn parse_uptime(text: &str) -> Option<u64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .map(|s| s as u64)
}

/// File systems that hold data worth watching; pseudo, memory and container layers are not.
const REAL_FS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "vfat", "exfat", "jfs", "reiserfs",
    "bcachefs",
];

/// `/proc/self/mounts` → mount points of real file systems, one per device (the first seen).
pub fn parse_mounts(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(device), Some(mount), Some(fs)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if REAL_FS.contains(&fs) && seen.insert(device.to_string()) {
            out.push(unescape_mount(mount));
        }
    }
    out
}

/// The kernel writes space, tab, newline and backslash in mount points as octal (`\040`).
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d[0] <= b'3' && d.iter().all(|c| (b'0'..=b'7').contains(c))
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn disk_usage(mount: &str) -> Option<Disk> {
    let st = rustix::fs::statvfs(mount).ok()?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    (total > 0).then(|| Disk {
        mount: mount.to_string(),
        total_bytes: total,
        free_bytes: free,
    })
}

/// Reads this Linux host's load, memory, uptime, CPUs and disks. Blocking (file reads and
/// statvfs): call it from `spawn_blocking`.
pub fn collect_host() -> HostFacts {
    let out_of_fds = std::cell::Cell::new(false);
    let read = |p: &str| match std::fs::read_to_string(p) {
        Ok(text) => text,
        Err(e) => {
            out_of_fds.set(out_of_fds.get() || is_out_of_fds(&e));
            String::new()
        }
    };
    let (load1, load5, load15) = parse_loadavg(&read("/proc/loadavg")).unwrap_or_default();
    let (mem_total_bytes, mem_available_bytes) =
        parse_meminfo(&read("/proc/meminfo")).unwrap_or_default();
    let limit = drover_daemon::open_files_limit();
    let (fds_open, fds_limit) = match count_open_fds() {
        Ok(open) => (open, limit),
        Err(e) if is_out_of_fds(&e) => {
            out_of_fds.set(true);
            (limit, limit)
        }
        Err(_) => (0, 0),
    };
    let mut mounts = parse_mounts(&read("/proc/self/mounts"));
    if mounts.is_empty() {
        // In a container the root is often overlay: watch it rather than nothing.
        mounts.push("/".to_string());
    }
    HostFacts {
        load1,
        load5,
        load15,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        mem_total_bytes,
        mem_available_bytes,
        disks: mounts.iter().filter_map(|m| disk_usage(m)).collect(),
        uptime_secs: parse_uptime(&read("/proc/uptime")).unwrap_or_default(),
        fds_open,
        fds_limit,
        out_of_fds: out_of_fds.get(),
        ..HostFacts::default()
    }
}

/// Whether an I/O error means this process (EMFILE) or the system (ENFILE) ran out of file
/// descriptors.
pub fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == libc::EMFILE || code == libc::ENFILE)
}

/// This process's open descriptors, from /proc/self/fd (the directory's own one not counted).
fn count_open_fds() -> std::io::Result<u64> {
    let mut n = 0u64;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        entry?;
        n += 1;
    }
    Ok(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            load1: 0.5,
            load5: 0.5,
            load15: 0.5,
            cpus: 2,
            mem_total_bytes: 8 << 30,
            mem_available_bytes: 4 << 30,
            disks: vec![Disk {
                mount: "/".into(),
                total_bytes: 100 << 30,
                free_bytes: 50 << 30,
            }],
            uptime_secs: 100,
            docker: DockerFacts {
                reachable: true,
                version: "28.2.2".into(),
                ..Default::default()
            },
            agent_version: "0.1.0".into(),
            cert_not_after_unix: Some(1_000_000 + 86_400),
            clock_offset_ms: Some(3),
            now_unix: 1_000_000,
            apps: Vec::new(),
            fds_open: 40,
            fds_limit: 1024,
            out_of_fds: false,
        }
    }

    fn status_of(f: &HostFacts, name: &str) -> Status {
        evaluate(f, &Thresholds::default())
            .into_iter()
            .find(|c| c.name == name)
            .unwrap()
            .status
    }

    #[test]
    fn apps_are_checked_only_where_deployed_and_a_stopped_live_release_is_unhealthy() {
        let mut f = facts();
        assert!(
            evaluate(&f, &Thresholds::default())
                .iter()
                .all(|c| c.name != "apps")
        );
        f.apps = vec![
            AppFacts {
                app: "api".into(),
                version: "v1.2.0".into(),
                running: true,
                ..AppFacts::default()
            },
            AppFacts {
                app: "bot".into(),
                version: "v3.0.0".into(),
                running: true,
                ..AppFacts::default()
            },
        ];
        let c = evaluate(&f, &Thresholds::default()).pop().unwrap();
        assert_eq!(
            (c.name.as_str(), c.status, c.reason.as_str()),
            (
                "apps",
                Status::Healthy,
                "live and running: api v1.2.0, bot v3.0.0"
            )
        );
        f.apps[1].running = false;
        let c = evaluate(&f, &Thresholds::default()).pop().unwrap();
        assert_eq!(
            (c.status, c.reason.as_str()),
            (Status::Unhealthy, "not running: bot v3.0.0")
        );
        assert_eq!(
            overall(&evaluate(&f, &Thresholds::default())),
            Status::Unhealthy
        );
    }

    #[test]
    fn a_healthy_host_has_seven_healthy_checks_in_order() {
        let checks = evaluate(&facts(), &Thresholds::default());
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "disk",
                "memory",
                "load",
                "docker",
                "certificate",
                "clock",
                "fds"
            ]
        );
        assert_eq!(
            checks[6].reason,
            "40 open files of the agent's limit 1024 (3.9%)"
        );
        assert_eq!(overall(&checks), Status::Healthy);
        assert!(
            checks[0]
                .reason
                .contains("50.0 GiB free of 100.0 GiB (50.0%)"),
            "{}",
            checks[0].reason
        );
    }

    #[test]
    fn each_check_at_its_boundaries() {
        use Status::*;
        let disk = |free_gib: u64, total_gib: u64| {
            let mut f = facts();
            f.disks = vec![Disk {
                mount: "/".into(),
                total_bytes: total_gib << 30,
                free_bytes: free_gib << 30,
            }];
            status_of(&f, "disk")
        };
        assert_eq!(disk(10, 100), Healthy);
        assert_eq!(disk(9, 100), Degraded);
        assert_eq!(disk(5, 100), Degraded);
        assert_eq!(disk(4, 100), Unhealthy);
        assert_eq!(disk(0, 8), Unhealthy);
        let mut small = facts();
        small.disks = vec![Disk {
            mount: "/boot".into(),
            total_bytes: 2 << 30,
            free_bytes: 900 << 20,
        }];
        assert_eq!(
            status_of(&small, "disk"),
            Degraded,
            "under 1 GiB free is degraded even at 44%"
        );
        let mut two = facts();
        two.disks.push(Disk {
            mount: "/var".into(),
            total_bytes: 100 << 30,
            free_bytes: 3 << 30,
        });
        let c = &evaluate(&two, &Thresholds::default())[0];
        assert_eq!(
            (c.status, c.reason.starts_with("/var")),
            (Unhealthy, true),
            "the worst mount decides"
        );

        let mem = |avail_pct: u64| {
            let mut f = facts();
            f.mem_total_bytes = 100 << 20;
            f.mem_available_bytes = avail_pct << 20;
            status_of(&f, "memory")
        };
        assert_eq!(
            (mem(10), mem(9), mem(5), mem(4)),
            (Healthy, Degraded, Degraded, Unhealthy)
        );
        let mut unknown = facts();
        unknown.mem_total_bytes = 0;
        unknown.mem_available_bytes = 0;
        let c = evaluate(&unknown, &Thresholds::default()).remove(1);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (Degraded, "memory size unknown (/proc/meminfo unreadable)")
        );
        let mut none = facts();
        none.disks.clear();
        assert_eq!(status_of(&none, "disk"), Degraded);

        let load = |l5: f64| {
            let mut f = facts();
            f.load5 = l5;
            status_of(&f, "load")
        };
        assert_eq!(
            (load(3.9), load(4.0), load(7.9), load(8.0)),
            (Healthy, Degraded, Degraded, Unhealthy)
        );

        let mut f = facts();
        f.docker = DockerFacts {
            reachable: false,
            error: "cannot reach Docker Engine".into(),
            ..Default::default()
        };
        let c = evaluate(&f, &Thresholds::default()).remove(3);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (Unhealthy, "cannot reach Docker Engine")
        );

        let cert = |left: Option<i64>| {
            let mut f = facts();
            f.cert_not_after_unix = left.map(|l| f.now_unix + l);
            status_of(&f, "certificate")
        };
        assert_eq!(
            (
                cert(None),
                cert(Some(0)),
                cert(Some(7199)),
                cert(Some(7200))
            ),
            (Unhealthy, Unhealthy, Degraded, Healthy)
        );

        let clock = |ms: Option<i64>| {
            let mut f = facts();
            f.clock_offset_ms = ms;
            status_of(&f, "clock")
        };
        assert_eq!(
            (
                clock(None),
                clock(Some(-999)),
                clock(Some(-1000)),
                clock(Some(29_999)),
                clock(Some(30_000))
            ),
            (Healthy, Healthy, Degraded, Degraded, Unhealthy)
        );
    }

    /// 1,100 slowloris connections used to make health report memory and docker unhealthy;
    /// the cause, descriptor exhaustion, was not named (issue 11, 2).
    #[test]
    fn fd_exhaustion_is_named_as_such_and_not_blamed_on_memory_or_docker() {
        use Status::*;
        let fds = |open: u64, limit: u64| {
            let mut f = facts();
            f.fds_open = open;
            f.fds_limit = limit;
            status_of(&f, "fds")
        };
        assert_eq!(
            (
                fds(799, 1000),
                fds(800, 1000),
                fds(949, 1000),
                fds(950, 1000)
            ),
            (Healthy, Degraded, Degraded, Unhealthy)
        );
        assert_eq!(fds(0, 0), Healthy, "not measured");

        // What the agent saw under the attack: every open() failed with EMFILE.
        let mut f = facts();
        f.fds_open = 1024;
        f.fds_limit = 1024;
        f.out_of_fds = true;
        f.mem_total_bytes = 0;
        f.mem_available_bytes = 0;
        f.docker = DockerFacts {
            reachable: false,
            error: "cannot reach Docker Engine at unix:///var/run/docker.sock: client error (Connect): Too many open files (os error 24) (the agent has too many open files)".into(),
            out_of_fds: true,
            ..Default::default()
        };
        let checks = evaluate(&f, &Thresholds::default());
        let get = |name: &str| checks.iter().find(|c| c.name == name).unwrap().clone();
        let fd = get("fds");
        assert_eq!(fd.status, Unhealthy);
        assert!(fd.reason.contains("too many open files"), "{}", fd.reason);
        assert!(
            fd.reason
                .starts_with("1024 open files of the agent's limit 1024 (100.0%)")
        );
        let mem = get("memory");
        assert_eq!(mem.status, Degraded);
        assert_eq!(
            mem.reason,
            "memory size unknown: /proc/meminfo could not be opened, too many open files (see the fds check)"
        );
        let docker = get("docker");
        assert_eq!(docker.status, Degraded);
        assert!(
            docker
                .reason
                .ends_with("too many open files (see the fds check)"),
            "{}",
            docker.reason
        );
        assert_eq!(overall(&checks), Unhealthy);

        // Out of descriptors before even /proc/self/fd could be read.
        let mut blind = facts();
        blind.fds_limit = 0;
        blind.out_of_fds = true;
        let c = evaluate(&blind, &Thresholds::default()).remove(6);
        assert_eq!(c.status, Unhealthy);
        assert!(c.reason.starts_with("too many open files"), "{}", c.reason);

        // A Docker that is really down is still unhealthy.
        let mut down = facts();
        down.docker.reachable = false;
        down.docker.error = "connection refused".into();
        assert_eq!(status_of(&down, "docker"), Unhealthy);
    }

    #[test]
    fn overall_is_the_worst_and_changes_ignore_moving_numbers() {
        let mut f = facts();
        let before = evaluate(&f, &Thresholds::default());
        f.load1 = 1.7;
        f.disks[0].free_bytes -= 1 << 20;
        let after = evaluate(&f, &Thresholds::default());
        assert_ne!(before, after);
        assert!(!changed(&before, &after));
        f.docker.reachable = false;
        let broken = evaluate(&f, &Thresholds::default());
        assert!(changed(&after, &broken));
        assert_eq!(overall(&broken), Status::Unhealthy);
        assert!(changed(&[], &broken));
        assert_eq!(overall(&[]), Status::Healthy);
    }

    #[test]
    fn proc_parsers() {
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/467 12345\n"),
            Some((0.52, 0.58, 0.59))
        );
        assert_eq!(parse_loadavg("garbage"), None);
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   12288000 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Some((24_576_000 * 1024, 12_288_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_uptime("12345.67 2345.00\n"), Some(12345));
        let mounts = "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n\
                      /dev/vda /etc/hosts ext4 rw 0 0\n/dev/vdb /srv/my\\040data xfs rw 0 0\n\
                      overlay /var/lib/docker/x overlay rw 0 0\n\
                      /dev/vdc /mnt/a\\134b\\011c\\777 btrfs rw 0 0\n";
        assert_eq!(
            parse_mounts(mounts),
            ["/", "/srv/my data", "/mnt/a\\b\tc\\777"]
        );
    }

    #[test]
    fn thresholds_validate_with_the_key() {
        assert!(Thresholds::default().validate().is_ok());
        let t = Thresholds {
            disk_unhealthy_free_percent: 20.0,
            ..Thresholds::default()
        };
        assert_eq!(
            t.validate().unwrap_err().0,
            "health.disk_unhealthy_free_percent"
        );
        let t = Thresholds {
            memory_degraded_available_percent: 120.0,
            ..Thresholds::default()
        };
        assert_eq!(
            t.validate().unwrap_err().0,
            "health.memory_degraded_available_percent"
        );
        let t = Thresholds {
            load_unhealthy_per_cpu: 1.0,
            ..Thresholds::default()
        };
        assert_eq!(t.validate().unwrap_err().0, "health.load_unhealthy_per_cpu");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let t = Thresholds {
                load_degraded_per_cpu: bad,
                ..Thresholds::default()
            };
            assert_eq!(t.validate().unwrap_err().0, "health.load_degraded_per_cpu");
        }
        let t = Thresholds {
            load_unhealthy_per_cpu: f64::NAN,
            ..Thresholds::default()
        };
        assert_eq!(t.validate().unwrap_err().0, "health.load_unhealthy_per_cpu");
        let t = Thresholds {
            clock_degraded_offset: Duration::ZERO,
            ..Thresholds::default()
        };
        assert_eq!(t.validate().unwrap_err().0, "health.clock_degraded_offset");
        let t = Thresholds {
            clock_unhealthy_offset: Duration::from_millis(500),
            ..Thresholds::default()
        };
        assert_eq!(t.validate().unwrap_err().0, "health.clock_unhealthy_offset");
        let t = Thresholds {
            disk_degraded_free_percent: -1.0,
            ..Thresholds::default()
        };
        assert_eq!(
            t.validate().unwrap_err().0,
            "health.disk_degraded_free_percent"
        );
        let t = Thresholds {
            fds_unhealthy_percent: 70.0,
            ..Thresholds::default()
        };
        assert_eq!(t.validate().unwrap_err().0, "health.fds_unhealthy_percent");
        let t = Thresholds {
            fds_degraded_percent: 101.0,
            ..Thresholds::default()
        };
        assert_eq!(t.validate().unwrap_err().0, "health.fds_degraded_percent");
        // Equal limits are allowed: no degraded band.
        let t = Thresholds {
            memory_unhealthy_available_percent: 10.0,
            ..Thresholds::default()
        };
        assert!(t.validate().is_ok());
    }

    #[test]
    fn this_machine_reports_cpus_memory_and_a_disk() {
        let f = collect_host();
        assert!(f.cpus > 0 && f.mem_total_bytes > 0 && f.uptime_secs > 0);
        assert!(
            f.fds_open > 2 && f.fds_open < f.fds_limit && !f.out_of_fds,
            "{f:?}"
        );
        assert!(!f.disks.is_empty() && f.disks.iter().all(|d| d.total_bytes >= d.free_bytes));
    }
}
