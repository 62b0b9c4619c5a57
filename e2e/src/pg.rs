//! PostgreSQL for the backup tests, never mocked: a throw-away cluster on the host (Debian's
//! packages, run as user `postgres` from a temp dir on a free loopback port) and throw-away
//! containers of the `drover-postgres:15` image (`scripts/postgres-image.sh`).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a fresh server may take to accept connections.
const READY_PATIENCE: Duration = Duration::from_secs(60);

/// A PostgreSQL cluster of the host's binaries in a temp dir, listening on 127.0.0.1:`port`
/// with trust authentication for `postgres`. Dropping it stops the server and removes the dir.
pub struct HostPg {
    pub port: u16,
    /// `postgresql://postgres@127.0.0.1:PORT/`
    pub url: String,
    pub bin: PathBuf,
    dir: TempDir,
    data: PathBuf,
    uid: u32,
    gid: u32,
    server: Child,
}

impl HostPg {
    /// Starts a cluster, or says why it cannot and returns None (under `CI=true` it panics
    /// instead: CI never skips silently).
    pub fn start() -> Option<HostPg> {
        let (bin, uid, gid) = match host_prerequisites() {
            Ok(found) => found,
            Err(reason) => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("PostgreSQL on the host is needed in CI: {reason}");
                }
                eprintln!("skipping: {reason}");
                return None;
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("drover-pg-")
            .tempdir()
            .expect("temp dir");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
        let data = dir.path().join("data");
        let out = Command::new(bin.join("initdb"))
            .args(["-D", path_str(&data), "-U", "postgres", "-A", "trust"])
            .args([
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ])
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Another process may take the free port before the server binds it: try another.
        for _ in 0..3 {
            let port = crate::free_port();
            match spawn_server(&bin, &data, dir.path(), port, uid, gid) {
                Ok(server) => {
                    return Some(HostPg {
                        port,
                        url: format!("postgresql://postgres@127.0.0.1:{port}/"),
                        bin,
                        dir,
                        data,
                        uid,
                        gid,
                        server,
                    });
                }
                Err(log) if log.contains("could not bind") => continue,
                Err(log) => panic!("postgres did not start:\n{log}"),
            }
        }
        panic!("postgres could not bind a free port three times");
    }

    /// Runs `sql` in `db` as `postgres`; panics on failure. Unaligned tuples, one per line.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", db, "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql in {db} failed: {}\n{sql}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    pub fn create_db(&self, db: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\""));
    }

    /// Every row of `table` as JSON text, sorted: equal lists mean equal contents.
    pub fn table_contents(&self, db: &str, table: &str) -> Vec<String> {
        lines(&self.psql(db, &contents_sql(table)))
    }

    /// Makes `role` a login role that must give `password` (SCRAM) over 127.0.0.1; the other
    /// roles keep trust authentication.
    pub fn require_password(&self, role: &str, password: &str) {
        self.psql(
            "postgres",
            &format!("CREATE ROLE \"{role}\" LOGIN SUPERUSER PASSWORD '{password}'"),
        );
        let hba = self.data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        let line = format!("host all {role} 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, format!("{line}{old}")).expect("write pg_hba.conf");
        self.psql("postgres", "SELECT pg_reload_conf()");
        // The reload is asynchronous: wait until the role is asked for its password.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new(self.bin.join("psql"))
                .args(["-X", "-w", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", role, "-d", "postgres", "-c", "SELECT 1"])
                .env_remove("PGPASSWORD")
                .output()
                .expect("run psql");
            if !out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pg_hba.conf reload not seen after 10s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for HostPg {
    fn drop(&mut self) {
        let _ = Command::new(self.bin.join("pg_ctl"))
            .args(["-D", path_str(&self.data), "stop", "-m", "immediate", "-w"])
            .current_dir(self.dir.path())
            .uid(self.uid)
            .gid(self.gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.server.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Starts the server on `port` and waits until it accepts connections; Err(its log) if it
/// exits first.
fn spawn_server(
    bin: &Path,
    data: &Path,
    dir: &Path,
    port: u16,
    uid: u32,
    gid: u32,
) -> Result<Child, String> {
    let log = dir.join("server.log");
    let log_file = std::fs::File::create(&log).expect("server log");
    let mut server = Command::new(bin.join("postgres"))
        .args(["-D", path_str(data), "-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", &format!("unix_socket_directories={}", dir.display())])
        .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
        .args(["-c", "synchronous_commit=off"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .uid(uid)
        .gid(gid)
        .spawn()
        .expect("start postgres");
    let deadline = Instant::now() + READY_PATIENCE;
    loop {
        if server.try_wait().expect("poll postgres").is_some() {
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ready {
            return Ok(server);
        }
        if Instant::now() >= deadline {
            let _ = server.kill();
            let _ = server.wait();
            panic!("postgres not ready after {READY_PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The newest `/usr/lib/postgresql/*/bin` with a server, and the `postgres` user's IDs; we
/// must be root (to run the server as `postgres`) or `postgres` itself.
fn host_prerequisites() -> Result<(PathBuf, u32, u32), String> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            "no PostgreSQL server on this host (/usr/lib/postgresql is missing): apt-get install postgresql"
                .to_string()
        })?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    let (_, bin) = versions.pop().ok_or_else(|| {
        "no PostgreSQL server binary under /usr/lib/postgresql: apt-get install postgresql"
            .to_string()
    })?;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let (uid, gid) = passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| "the system user postgres does not exist".to_string())?;
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if me != 0 && me != uid {
        return Err(
            "running a PostgreSQL server needs root (to become postgres) or the postgres user"
                .into(),
        );
    }
    Ok((bin, uid, gid))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(String::from).collect()
}

fn contents_sql(table: &str) -> String {
    format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY 1")
}

/// Makes sure `drover-postgres:15` exists (`scripts/postgres-image.sh`: built once, reused by
/// tag) and returns its name. Runs the script once per test process.
pub fn postgres_image() -> String {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(root.join("scripts/postgres-image.sh"))
            .status()
            .expect("run scripts/postgres-image.sh");
        assert!(status.success(), "scripts/postgres-image.sh failed");
        if started.elapsed() > Duration::from_secs(5) {
            eprintln!("built drover-postgres:15 in {:?}", started.elapsed());
        }
    });
    "drover-postgres:15".into()
}

/// A running `drover-postgres:15` container with a unique name, removed when dropped. Its
/// server trusts local connections; reach it with `docker exec` (as the agent does).
pub struct PgContainer {
    pub name: String,
}

impl PgContainer {
    /// Runs the image (building it first if needed) and waits until `pg_isready` succeeds in
    /// it. Check `docker_available` first.
    pub fn start() -> PgContainer {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let image = postgres_image();
        let name = format!(
            "drover-pg-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &name, &image])
            .output()
            .expect("docker run");
        assert!(
            out.status.success(),
            "docker run {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let container = PgContainer { name };
        let deadline = Instant::now() + READY_PATIENCE;
        loop {
            let ready = Command::new("docker")
                .args([
                    "exec",
                    "-u",
                    "postgres",
                    &container.name,
                    "pg_isready",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return container;
            }
            if Instant::now() >= deadline {
                let logs = Command::new("docker")
                    .args(["logs", "--tail", "30", &container.name])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                panic!(
                    "{} not ready after {READY_PATIENCE:?}:\n{logs}",
                    container.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `sql` in `db` inside the container as `postgres`; panics on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("docker")
            .args([
                "exec", "-u", "postgres", &self.name, "psql", "-X", "-A", "-t", "-q",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql])
            .output()
            .expect("docker exec psql");
        assert!(
            out.status.success(),
            "psql in {}/{db} failed: {}\n{sql}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    pub fn create_db(&self, db: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\""));
    }

    /// Every row of `table` as JSON text, sorted.
    pub fn table_contents(&self, db: &str, table: &str) -> Vec<String> {
        lines(&self.psql(db, &contents_sql(table)))
    }
}

impl Drop for PgContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.name])
            .output();
    }
}
