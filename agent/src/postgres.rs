//! PostgreSQL through its own tools (`pg_dump`, `pg_restore`, `psql`): the only module of the
//! agent that runs them, either on the host or inside the database container through the
//! Docker exec API.
//!
//! A dump is a `std::io::Read` and a restore a `std::io::Write`, so the backup pipeline moves
//! the bytes on a blocking thread without holding the archive in memory. Neither can end in a
//! silent success: at EOF a dump waits for `pg_dump` and fails the read if it exited non-zero
//! or was killed, and `RestoreSink::finish` fails unless `pg_restore` exited 0.
//!
//! Passwords never appear in arguments (they would show in `ps`), errors or logs: the host
//! tools get them through `PGPASSWORD`, and the URL they are given has the password removed.
//! Errors say which tool failed, on which database, where, and why (no such database,
//! connection refused, authentication failed, or the tool's own last lines).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread::JoinHandle;

use regex::Regex;
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio_util::io::SyncIoBridge;

use crate::docker::{DockerClient, DockerError, ExecDone, ExecSpec, ExecStdin};

/// How long the tools may try to connect before giving up (libpq's `PGCONNECT_TIMEOUT`).
const CONNECT_TIMEOUT_SECS: &str = "10";

/// The database `psql` connects to for catalog questions and CREATE/DROP DATABASE.
const MAINTENANCE_DB: &str = "postgres";

/// How many of a tool's last stderr lines an error quotes.
const STDERR_LINES: usize = 10;

/// How much of a tool's stderr is kept while it runs.
const STDERR_BYTES: usize = 8 * 1024;

/// How to reach a database server.
#[derive(Clone, PartialEq)]
pub enum Conn {
    /// The host's tools with a libpq URL (`postgresql://user:pw@127.0.0.1:5432/`); its
    /// database part is replaced by the database each call names. The password comes from
    /// `password_file` when given (its first line), else from the URL.
    Host {
        url: String,
        password_file: Option<PathBuf>,
    },
    /// The tools inside the running container `container`, run as the container's OS user
    /// `user` and connecting as the database role of the same name over the local socket.
    Container { container: String, user: String },
}

impl Conn {
    /// The tools in `container`, as user `postgres`.
    pub fn container(container: &str) -> Conn {
        Conn::Container {
            container: container.to_string(),
            user: "postgres".into(),
        }
    }
}

/// Shows the URL without its password.
impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conn::Host { url, password_file } => f
                .debug_struct("Host")
                .field(
                    "url",
                    &PgUrl::parse(url)
                        .map(|u| u.redacted())
                        .unwrap_or_else(|_| "<unparsable URL>".into()),
                )
                .field("password_file", password_file)
                .finish(),
            Conn::Container { container, user } => f
                .debug_struct("Container")
                .field("container", container)
                .field("user", user)
                .finish(),
        }
    }
}

/// A user table and the planner's estimate of its rows (`pg_class.reltuples`; -1 when the
/// table was never vacuumed or analysed).
#[derive(Debug, Clone, PartialEq)]
pub struct TableFact {
    pub schema: String,
    pub name: String,
    pub row_estimate: i64,
}

/// What a backup manifest records about its source.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// `server_version` as the server reports it (`15.13 (Debian 15.13-0+deb12u1)`).
    pub server_version: String,
    /// The version of the `pg_dump` that would dump it (`15.13 (Debian 15.13-0+deb12u1)`).
    pub pg_dump_version: String,
    pub database: String,
    pub size_bytes: u64,
    /// Sorted by schema, then name.
    pub tables: Vec<TableFact>,
}

/// How `restore` runs `pg_restore`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RestoreOpts {
    /// Drop each object before creating it (`--clean --if-exists`).
    pub clean: bool,
    /// All or nothing (`--single-transaction`).
    pub single_transaction: bool,
    /// Do not set object owners (`--no-owner`): for a target without the source's roles.
    pub no_owner: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{tool} is not installed on this host: install postgresql-client")]
    NotInstalled { tool: String },
    #[error("{tool}: database \"{database}\" does not exist at {place}")]
    NoDatabase {
        tool: String,
        database: String,
        place: String,
    },
    #[error(
        "{tool}: cannot connect to PostgreSQL at {place}: connection refused (is the server running and listening there?)"
    )]
    Refused { tool: String, place: String },
    #[error("{tool}: authentication failed for user \"{user}\" at {place}: {detail}")]
    AuthFailed {
        tool: String,
        user: String,
        place: String,
        detail: String,
    },
    #[error("{tool} on database \"{database}\" at {place} {status}{}", quoted(.stderr))]
    Failed {
        tool: String,
        database: String,
        place: String,
        /// `exited with status 1`, `was killed by signal 9 (SIGKILL)`.
        status: String,
        /// The tool's last stderr lines, passwords removed.
        stderr: String,
    },
    #[error("pg_restore --list cannot read the archive: it {status}{}", quoted(.stderr))]
    BadArchive { status: String, stderr: String },
    #[error("invalid PostgreSQL connection URL: {0}")]
    BadUrl(String),
    #[error("invalid database name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("cannot read the password file {path}: {message}")]
    PasswordFile { path: String, message: String },
    #[error("{tool}: {message}")]
    Io { tool: String, message: String },
    #[error("{tool} in container {container}: {source}")]
    Docker {
        tool: String,
        container: String,
        source: DockerError,
    },
    #[error("unexpected output from {tool}: {message}")]
    Output { tool: String, message: String },
}

fn quoted(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

// ---- the operations ----------------------------------------------------------------------

/// The server's version, the database's size and its user tables with row estimates (one
/// `psql` call), and the version of `pg_dump`.
pub async fn facts(docker: &DockerClient, conn: &Conn, database: &str) -> Result<Facts, PgError> {
    check_name(database)?;
    let target = Target::resolve(conn)?;
    let out = target
        .run(
            docker,
            "psql",
            database,
            psql_args(&target, database, FACTS_SQL),
        )
        .await?;
    let (server_version, size_bytes, tables) = parse_facts(&out)?;
    let version = target
        .run(docker, "pg_dump", database, vec!["--version".into()])
        .await?;
    Ok(Facts {
        server_version,
        pg_dump_version: parse_tool_version(&String::from_utf8_lossy(&version)),
        database: database.to_string(),
        size_bytes,
        tables,
    })
}

/// Starts `pg_dump -Fc -Z0` of `database` (the pipeline compresses); `extra_args` go after
/// Drover's own. Read the archive from the returned `Dump`.
pub async fn dump(
    docker: &DockerClient,
    conn: &Conn,
    database: &str,
    extra_args: &[String],
) -> Result<Dump, PgError> {
    check_name(database)?;
    let target = Target::resolve(conn)?;
    let mut args = vec!["--format=custom".into(), "--compress=0".into(), "-w".into()];
    args.extend(target.db_args(database));
    args.extend(extra_args.iter().cloned());
    let ctx = target.ctx("pg_dump", database);
    let source = match &target {
        Target::Host { .. } => {
            let mut child = target
                .host_command("pg_dump", &args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| spawn_error("pg_dump", e))?;
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = drain_tail(child.stderr.take().expect("piped stderr"));
            DumpSource::Host {
                child,
                stdout,
                stderr: Some(stderr),
            }
        }
        Target::Container { container, .. } => {
            let spec = target.exec_spec("pg_dump", &args);
            let (stdout, done) = docker
                .exec_read(container, &spec)
                .await
                .map_err(|e| ctx.docker(e))?;
            DumpSource::Container {
                stdout: SyncIoBridge::new(stdout),
                done: Some(done),
                handle: tokio::runtime::Handle::current(),
            }
        }
    };
    Ok(Dump {
        ctx,
        source,
        state: DumpState::Reading,
    })
}

/// Starts `pg_restore` into `database` (which must exist), reading a custom-format archive
/// from the returned sink; `RestoreSink::finish` says whether it worked. The connection is
/// tried first, so a missing database or a refused login fails here, before any archive bytes
/// are fetched (pg_restore itself connects only after reading the archive's table of contents).
pub async fn restore(
    docker: &DockerClient,
    conn: &Conn,
    database: &str,
    opts: &RestoreOpts,
) -> Result<RestoreSink, PgError> {
    check_name(database)?;
    let target = Target::resolve(conn)?;
    target
        .run(
            docker,
            "psql",
            database,
            psql_args(&target, database, "SELECT 1"),
        )
        .await?;
    let mut args = vec!["--exit-on-error".into(), "-w".into()];
    if opts.clean {
        args.extend(["--clean".into(), "--if-exists".into()]);
    }
    if opts.single_transaction {
        args.push("--single-transaction".into());
    }
    if opts.no_owner {
        args.push("--no-owner".into());
    }
    args.extend(target.db_args(database));
    let ctx = target.ctx("pg_restore", database);
    let sink = match &target {
        Target::Host { .. } => {
            let mut child = target
                .host_command("pg_restore", &args)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| spawn_error("pg_restore", e))?;
            let stdin = child.stdin.take().expect("piped stdin");
            let stderr = drain_tail(child.stderr.take().expect("piped stderr"));
            SinkTarget::Host {
                child,
                stdin: Some(stdin),
                stderr: Some(stderr),
            }
        }
        Target::Container { container, .. } => {
            let spec = target.exec_spec("pg_restore", &args);
            let (stdin, done) = docker
                .exec_write(container, &spec)
                .await
                .map_err(|e| ctx.docker(e))?;
            SinkTarget::Container {
                stdin: SyncIoBridge::new(stdin),
                done: Some(done),
                handle: tokio::runtime::Handle::current(),
            }
        }
    };
    Ok(RestoreSink {
        ctx,
        sink,
        failed: None,
        finished: false,
    })
}

/// The table of contents of a custom-format archive, by the host's `pg_restore --list`: one
/// line per entry, comments left out. It reads only the front of the archive (the table of
/// contents), so it does not notice a cut-off data section: only a test restore does.
/// Blocking: call it on a blocking thread.
pub fn list_host(archive: &mut dyn Read) -> Result<Vec<String>, PgError> {
    let mut child = Command::new("pg_restore")
        .arg("--list")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error("pg_restore", e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = drain_tail(child.stderr.take().expect("piped stderr"));
    let listing = std::thread::spawn(move || {
        let mut text = String::new();
        let mut stdout = stdout;
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let mut stdin = child.stdin.take().expect("piped stdin");
    let copied = io::copy(archive, &mut stdin);
    drop(stdin);
    let status = child.wait().map_err(|e| PgError::Io {
        tool: "pg_restore".into(),
        message: format!("waiting for it: {e}"),
    })?;
    let stderr = join_tail(stderr);
    let listing = listing.join().unwrap_or_else(|_| Ok(String::new()));
    if !status.success() {
        return Err(PgError::BadArchive {
            status: describe_status(status),
            stderr: last_lines(&String::from_utf8_lossy(&stderr), STDERR_LINES),
        });
    }
    // pg_restore reads only the table of contents at the front of the archive and then
    // closes its stdin: a broken pipe after it succeeded is expected. Anything else is the
    // reader's failure.
    match copied {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            return Err(PgError::Io {
                tool: "pg_restore".into(),
                message: format!("reading the archive: {e}"),
            });
        }
        _ => {}
    }
    let listing = listing.map_err(|e| PgError::Io {
        tool: "pg_restore".into(),
        message: format!("reading its output: {e}"),
    })?;
    Ok(toc_entries(&listing))
}

/// The databases on the server whose names start with `prefix` (letters, digits and `_`),
/// sorted.
pub async fn databases_with_prefix(
    docker: &DockerClient,
    conn: &Conn,
    prefix: &str,
) -> Result<Vec<String>, PgError> {
    check_name(prefix)?;
    // left() rather than LIKE: `_` is a LIKE wildcard.
    let sql = format!(
        "SELECT datname FROM pg_database WHERE left(datname, {}) = {} ORDER BY 1",
        prefix.len(),
        quote_literal(prefix)
    );
    let out = maintenance_psql(docker, conn, MAINTENANCE_DB, &sql).await?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .map(|l| l.trim_matches(['\0', ' ']).to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Runs `sql` with psql in the maintenance database; `database` names what it is about (for
/// errors).
async fn maintenance_psql(
    docker: &DockerClient,
    conn: &Conn,
    database: &str,
    sql: &str,
) -> Result<Vec<u8>, PgError> {
    let target = Target::resolve(conn)?;
    target
        .run(
            docker,
            "psql",
            database,
            psql_args(&target, MAINTENANCE_DB, sql),
        )
        .await
}

/// Whether `database` exists on the server.
pub async fn database_exists(
    docker: &DockerClient,
    conn: &Conn,
    database: &str,
) -> Result<bool, PgError> {
    check_name(database)?;
    let sql = format!(
        "SELECT count(*) FROM pg_database WHERE datname = {}",
        quote_literal(database)
    );
    let out = maintenance_psql(docker, conn, database, &sql).await?;
    match String::from_utf8_lossy(&out).trim_matches(['\0', '\n', ' ']) {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(PgError::Output {
            tool: "psql".into(),
            message: format!("expected a count of 0 or 1, got {other:?}"),
        }),
    }
}

/// `CREATE DATABASE` (fails if it exists).
pub async fn create_database(
    docker: &DockerClient,
    conn: &Conn,
    database: &str,
) -> Result<(), PgError> {
    check_name(database)?;
    let sql = format!("CREATE DATABASE {}", quote_ident(database));
    maintenance_psql(docker, conn, database, &sql)
        .await
        .map(drop)
}

/// `DROP DATABASE IF EXISTS ... WITH (FORCE)`: sessions still connected to it are ended.
pub async fn drop_database(
    docker: &DockerClient,
    conn: &Conn,
    database: &str,
) -> Result<(), PgError> {
    check_name(database)?;
    let sql = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(database)
    );
    maintenance_psql(docker, conn, database, &sql)
        .await
        .map(drop)
}

/// Every user table of `database` with its exact row count (`count(*)` of each), sorted by
/// schema, then name: the sanity check after a test restore.
pub async fn row_counts(
    docker: &DockerClient,
    conn: &Conn,
    database: &str,
) -> Result<Vec<TableFact>, PgError> {
    check_name(database)?;
    let target = Target::resolve(conn)?;
    let out = target
        .run(
            docker,
            "psql",
            database,
            psql_args(&target, database, COUNTS_SQL),
        )
        .await?;
    parse_counts(&out)
}

/// Whether the server answers (`SELECT 1` on the maintenance database).
pub async fn answers(docker: &DockerClient, conn: &Conn) -> bool {
    let Ok(target) = Target::resolve(conn) else {
        return false;
    };
    target
        .run(
            docker,
            "psql",
            MAINTENANCE_DB,
            psql_args(&target, MAINTENANCE_DB, "SELECT 1"),
        )
        .await
        .is_ok()
}

// ---- dump --------------------------------------------------------------------------------

/// A running `pg_dump`, read as its custom-format archive. Read it on a blocking thread (the
/// container path blocks on the runtime). EOF comes only after `pg_dump` exited 0; otherwise
/// the last read fails with a message naming `pg_dump`, its exit status or signal and its last
/// stderr lines. Dropped early, the host's `pg_dump` is killed.
pub struct Dump {
    ctx: ErrCtx,
    source: DumpSource,
    state: DumpState,
}

impl fmt::Debug for Dump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dump")
            .field("database", &self.ctx.database)
            .field("place", &self.ctx.place)
            .finish_non_exhaustive()
    }
}

enum DumpSource {
    Host {
        child: Child,
        stdout: ChildStdout,
        stderr: Option<JoinHandle<Vec<u8>>>,
    },
    Container {
        stdout: SyncIoBridge<DuplexStream>,
        done: Option<ExecDone>,
        handle: tokio::runtime::Handle,
    },
}

enum DumpState {
    Reading,
    Done,
    Failed(String),
}

impl Dump {
    /// The process ID of the host's `pg_dump` (None inside a container).
    pub fn pid(&self) -> Option<u32> {
        match &self.source {
            DumpSource::Host { child, .. } => Some(child.id()),
            DumpSource::Container { .. } => None,
        }
    }

    /// Waits for `pg_dump` to end; Ok only when it exited 0.
    fn finish(&mut self) -> Result<(), PgError> {
        match &mut self.source {
            DumpSource::Host { child, stderr, .. } => {
                let status = child.wait().map_err(|e| PgError::Io {
                    tool: "pg_dump".into(),
                    message: format!("waiting for it: {e}"),
                })?;
                let stderr = stderr.take().map(join_tail).unwrap_or_default();
                if status.success() {
                    Ok(())
                } else {
                    Err(self.ctx.classify(describe_status(status), &stderr))
                }
            }
            DumpSource::Container { done, handle, .. } => {
                let Some(done) = done.take() else {
                    return Ok(());
                };
                let exit = handle
                    .block_on(done.wait())
                    .map_err(|e| self.ctx.docker(e))?;
                if exit.code == 0 {
                    Ok(())
                } else {
                    Err(self
                        .ctx
                        .classify(describe_exec_code(exit.code), exit.tail.as_bytes()))
                }
            }
        }
    }
}

impl Read for Dump {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.state {
            DumpState::Done => return Ok(0),
            DumpState::Failed(message) => return Err(io::Error::other(message.clone())),
            DumpState::Reading => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let read = match &mut self.source {
            DumpSource::Host { stdout, .. } => stdout.read(buf),
            DumpSource::Container { stdout, .. } => stdout.read(buf),
        };
        match read {
            Ok(n) if n > 0 => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            _ => {}
        }
        // EOF, or the pipe broke: how pg_dump ended decides.
        let ended = self.finish();
        match (ended, read) {
            (Ok(()), Ok(_)) => {
                self.state = DumpState::Done;
                Ok(0)
            }
            (Ok(()), Err(e)) => {
                let message = format!("reading pg_dump's output: {e}");
                self.state = DumpState::Failed(message.clone());
                Err(io::Error::other(message))
            }
            (Err(err), _) => {
                let message = err.to_string();
                self.state = DumpState::Failed(message);
                Err(io::Error::other(err))
            }
        }
    }
}

impl Drop for Dump {
    fn drop(&mut self) {
        if let DumpSource::Host { child, stderr, .. } = &mut self.source
            && matches!(self.state, DumpState::Reading)
        {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(stderr) = stderr.take() {
                let _ = stderr.join();
            }
        }
    }
}

// ---- restore -----------------------------------------------------------------------------

/// The stdin of a running `pg_restore`. Write the archive, then call `finish`. Use it on a
/// blocking thread (the container path blocks on the runtime). A write that fails because
/// `pg_restore` gave up carries its message. Dropped without `finish`, the host's
/// `pg_restore` is killed.
pub struct RestoreSink {
    ctx: ErrCtx,
    sink: SinkTarget,
    /// Why `pg_restore` stopped, when a write found out first.
    failed: Option<PgError>,
    finished: bool,
}

impl fmt::Debug for RestoreSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestoreSink")
            .field("database", &self.ctx.database)
            .field("place", &self.ctx.place)
            .finish_non_exhaustive()
    }
}

enum SinkTarget {
    Host {
        child: Child,
        stdin: Option<ChildStdin>,
        stderr: Option<JoinHandle<Vec<u8>>>,
    },
    Container {
        stdin: SyncIoBridge<ExecStdin>,
        done: Option<ExecDone>,
        handle: tokio::runtime::Handle,
    },
}

impl RestoreSink {
    /// Closes `pg_restore`'s stdin and waits for it: Ok only when it exited 0.
    pub fn finish(mut self) -> Result<(), PgError> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        self.end()
    }

    fn end(&mut self) -> Result<(), PgError> {
        self.finished = true;
        match &mut self.sink {
            SinkTarget::Host {
                child,
                stdin,
                stderr,
            } => {
                drop(stdin.take());
                let status = child.wait().map_err(|e| PgError::Io {
                    tool: "pg_restore".into(),
                    message: format!("waiting for it: {e}"),
                })?;
                let stderr = stderr.take().map(join_tail).unwrap_or_default();
                if status.success() {
                    Ok(())
                } else {
                    Err(self.ctx.classify(describe_status(status), &stderr))
                }
            }
            SinkTarget::Container {
                stdin,
                done,
                handle,
            } => {
                // The command may have ended already; its exit code says more than this.
                let _ = stdin.shutdown();
                let Some(done) = done.take() else {
                    return Ok(());
                };
                let exit = handle
                    .block_on(done.wait())
                    .map_err(|e| self.ctx.docker(e))?;
                if exit.code == 0 {
                    Ok(())
                } else {
                    Err(self
                        .ctx
                        .classify(describe_exec_code(exit.code), exit.tail.as_bytes()))
                }
            }
        }
    }

    /// A write failed: find out why from `pg_restore` itself.
    fn write_failed(&mut self, err: io::Error) -> io::Error {
        let cause = match self.end() {
            Err(pg) => pg,
            Ok(()) => PgError::Io {
                tool: "pg_restore".into(),
                message: format!("writing to its stdin: {err}"),
            },
        };
        let message = cause.to_string();
        self.failed = Some(cause);
        io::Error::other(message)
    }
}

impl Write for RestoreSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(err) = &self.failed {
            return Err(io::Error::other(err.to_string()));
        }
        if self.finished {
            return Err(io::Error::other("pg_restore has already ended"));
        }
        let written = match &mut self.sink {
            SinkTarget::Host { stdin, .. } => match stdin {
                Some(stdin) => stdin.write(buf),
                None => Err(io::ErrorKind::BrokenPipe.into()),
            },
            SinkTarget::Container { stdin, .. } => stdin.write(buf),
        };
        match written {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(self.write_failed(e)),
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.finished {
            return Ok(());
        }
        let flushed = match &mut self.sink {
            SinkTarget::Host { stdin, .. } => stdin.as_mut().map_or(Ok(()), |s| s.flush()),
            SinkTarget::Container { stdin, .. } => stdin.flush(),
        };
        flushed.map_err(|e| self.write_failed(e))
    }
}

impl Drop for RestoreSink {
    fn drop(&mut self) {
        if let SinkTarget::Host { child, stderr, .. } = &mut self.sink
            && !self.finished
        {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(stderr) = stderr.take() {
                let _ = stderr.join();
            }
        }
    }
}

// ---- where the tools run -----------------------------------------------------------------

/// A `Conn` made ready: the URL parsed and the password read.
enum Target {
    Host {
        url: PgUrl,
        password: Option<String>,
    },
    Container {
        container: String,
        user: String,
    },
}

impl Target {
    fn resolve(conn: &Conn) -> Result<Target, PgError> {
        match conn {
            Conn::Host { url, password_file } => {
                let url = PgUrl::parse(url)?;
                let password = match password_file {
                    Some(path) => Some(read_password_file(path)?),
                    None => url.password.clone(),
                };
                Ok(Target::Host { url, password })
            }
            Conn::Container { container, user } => Ok(Target::Container {
                container: container.clone(),
                user: if user.is_empty() {
                    "postgres".into()
                } else {
                    user.clone()
                },
            }),
        }
    }

    fn ctx(&self, tool: &str, database: &str) -> ErrCtx {
        let (place, user, secret) = match self {
            Target::Host { url, password } => (
                url.place(),
                url.user.clone().unwrap_or_else(|| "(default)".into()),
                password.clone(),
            ),
            Target::Container { container, user } => {
                (format!("container {container}"), user.clone(), None)
            }
        };
        ErrCtx {
            tool: tool.to_string(),
            database: database.to_string(),
            place,
            user,
            secret,
            container: match self {
                Target::Container { container, .. } => Some(container.clone()),
                Target::Host { .. } => None,
            },
        }
    }

    /// The arguments that connect a tool to `database`.
    fn db_args(&self, database: &str) -> Vec<String> {
        match self {
            Target::Host { url, .. } => vec![format!("--dbname={}", url.for_database(database))],
            // A conninfo string, so a database name with `=` in it stays a name.
            Target::Container { user, .. } => vec![format!(
                "--dbname=dbname={} user={}",
                conninfo_value(database),
                conninfo_value(user)
            )],
        }
    }

    fn host_command(&self, tool: &str, args: &[String]) -> Command {
        let mut cmd = Command::new(tool);
        cmd.args(args);
        if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
            cmd.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS);
        }
        if let Target::Host {
            password: Some(password),
            ..
        } = self
        {
            cmd.env("PGPASSWORD", password);
        }
        cmd
    }

    fn exec_spec(&self, tool: &str, args: &[String]) -> ExecSpec {
        let user = match self {
            Target::Container { user, .. } => user.clone(),
            Target::Host { .. } => String::new(),
        };
        let mut cmd = vec![tool.to_string()];
        cmd.extend(args.iter().cloned());
        ExecSpec {
            cmd,
            user,
            env: vec![format!("PGCONNECT_TIMEOUT={CONNECT_TIMEOUT_SECS}")],
        }
    }

    /// Runs a short command to completion: its stdout, or an error about `database` (which
    /// may not be the database it connects to: CREATE DATABASE runs in the maintenance one).
    async fn run(
        &self,
        docker: &DockerClient,
        tool: &str,
        database: &str,
        args: Vec<String>,
    ) -> Result<Vec<u8>, PgError> {
        let ctx = self.ctx(tool, database);
        match self {
            Target::Host { .. } => {
                let mut cmd = tokio::process::Command::from(self.host_command(tool, &args));
                cmd.stdin(Stdio::null()).kill_on_drop(true);
                let out = cmd.output().await.map_err(|e| spawn_error(tool, e))?;
                if out.status.success() {
                    Ok(out.stdout)
                } else {
                    Err(ctx.classify(describe_status(out.status), &out.stderr))
                }
            }
            Target::Container { container, .. } => {
                let spec = self.exec_spec(tool, &args);
                let (mut stdout, done) = docker
                    .exec_read(container, &spec)
                    .await
                    .map_err(|e| ctx.docker(e))?;
                let mut out = Vec::new();
                let read = stdout.read_to_end(&mut out).await;
                let exit = done.wait().await.map_err(|e| ctx.docker(e))?;
                if exit.code != 0 {
                    return Err(ctx.classify(describe_exec_code(exit.code), exit.tail.as_bytes()));
                }
                read.map_err(|e| PgError::Io {
                    tool: tool.to_string(),
                    message: format!("reading its output: {e}"),
                })?;
                Ok(out)
            }
        }
    }
}

fn psql_args(target: &Target, database: &str, sql: &str) -> Vec<String> {
    // No psqlrc, unaligned tuples only, NUL between fields and records (names may hold
    // anything else), stop at the first error, never prompt for a password.
    let mut args: Vec<String> = ["-X", "-A", "-t", "-q", "-z", "-0", "-w"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(["-v".into(), "ON_ERROR_STOP=1".into()]);
    args.extend(target.db_args(database));
    args.extend(["-c".into(), sql.to_string()]);
    args
}

/// The password a `password_file` holds (its first line), as the tools get it; also read by
/// the agent's redactor (`redact`).
pub fn read_password_file(path: &std::path::Path) -> Result<String, PgError> {
    let text = std::fs::read_to_string(path).map_err(|e| PgError::PasswordFile {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

fn spawn_error(tool: &str, err: io::Error) -> PgError {
    if err.kind() == io::ErrorKind::NotFound {
        PgError::NotInstalled {
            tool: tool.to_string(),
        }
    } else {
        PgError::Io {
            tool: tool.to_string(),
            message: format!("cannot start it: {err}"),
        }
    }
}

/// Reads `stream` to its end on a thread, keeping its last `STDERR_BYTES`.
fn drain_tail(mut stream: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut tail = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > STDERR_BYTES {
                        tail.drain(..tail.len() - STDERR_BYTES);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        tail
    })
}

fn join_tail(handle: JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}

// ---- errors ------------------------------------------------------------------------------

/// What an error about one tool run names.
struct ErrCtx {
    tool: String,
    database: String,
    place: String,
    user: String,
    /// Removed from anything quoted.
    secret: Option<String>,
    container: Option<String>,
}

impl ErrCtx {
    fn classify(&self, status: String, stderr: &[u8]) -> PgError {
        classify(
            &self.tool,
            &self.database,
            &self.place,
            &self.user,
            status,
            &String::from_utf8_lossy(stderr),
            self.secret.as_deref(),
        )
    }

    fn docker(&self, source: DockerError) -> PgError {
        PgError::Docker {
            tool: self.tool.clone(),
            container: self.container.clone().unwrap_or_default(),
            source,
        }
    }
}

/// Turns a failed run into the error that says why: no such database, connection refused,
/// authentication failed, or else the tool's status and last stderr lines. `secret` is cut
/// out of anything quoted.
pub fn classify(
    tool: &str,
    database: &str,
    place: &str,
    user: &str,
    status: String,
    stderr: &str,
    secret: Option<&str>,
) -> PgError {
    static NO_DB: OnceLock<Regex> = OnceLock::new();
    static AUTH: OnceLock<Regex> = OnceLock::new();
    let no_db =
        NO_DB.get_or_init(|| Regex::new(r#"FATAL:\s+database "(.*)" does not exist"#).unwrap());
    let auth = AUTH.get_or_init(|| {
        Regex::new(r#"FATAL:\s+(\w+ authentication failed) for user "(.*)""#).unwrap()
    });
    let stderr = redact(stderr, secret);
    if let Some(found) = no_db.captures(&stderr) {
        return PgError::NoDatabase {
            tool: tool.to_string(),
            database: found[1].to_string(),
            place: place.to_string(),
        };
    }
    if let Some(found) = auth.captures(&stderr) {
        return PgError::AuthFailed {
            tool: tool.to_string(),
            user: found[2].to_string(),
            place: place.to_string(),
            detail: found[1].to_string(),
        };
    }
    if stderr.contains("no password supplied") {
        return PgError::AuthFailed {
            tool: tool.to_string(),
            user: user.to_string(),
            place: place.to_string(),
            detail: "the server wants a password and none was given".into(),
        };
    }
    let socket_missing = stderr.contains("connection to server on socket")
        && stderr.contains("No such file or directory");
    if stderr.contains("Connection refused") || socket_missing {
        return PgError::Refused {
            tool: tool.to_string(),
            place: place.to_string(),
        };
    }
    PgError::Failed {
        tool: tool.to_string(),
        database: database.to_string(),
        place: place.to_string(),
        status,
        stderr: last_lines(&stderr, STDERR_LINES),
    }
}

fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(secret) if !secret.is_empty() => text.replace(secret, "***"),
        _ => text.to_string(),
    }
}

/// The last `n` non-empty lines of `text`, joined by "; ".
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("; ")
}

/// `exited with status 1`, `was killed by signal 9 (SIGKILL)`.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal} ({})", signal_name(signal)),
        (None, None) => "ended without an exit status".into(),
    }
}

/// An exec's exit code: the Engine reports a command killed by signal N as 128 + N.
pub fn describe_exec_code(code: i64) -> String {
    if (129..=159).contains(&code) {
        let signal = (code - 128) as i32;
        format!(
            "exited with status {code} (killed by signal {signal}, {})",
            signal_name(signal)
        )
    } else {
        format!("exited with status {code}")
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "signal",
    }
}

// ---- pure helpers ------------------------------------------------------------------------

/// A libpq URL taken apart so the password can travel apart from it.
#[derive(Debug, Clone, PartialEq)]
struct PgUrl {
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    /// `host:port`, possibly several, comma-separated; empty for the default socket.
    hosts: String,
    /// Query parameters other than `password`, still encoded.
    params: Vec<String>,
}

impl PgUrl {
    fn parse(url: &str) -> Result<PgUrl, PgError> {
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| *s == "postgresql" || *s == "postgres")
            .ok_or_else(|| {
                PgError::BadUrl("it must start with postgresql:// or postgres://".into())
            })?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (user, mut password) = match userinfo {
            Some(info) => match info.split_once(':') {
                Some((user, pw)) => (Some(percent_decode(user)?), Some(percent_decode(pw)?)),
                None => (Some(percent_decode(info)?), None),
            },
            None => (None, None),
        };
        let mut params = Vec::new();
        if let Some((_, query)) = tail.split_once('?') {
            for param in query.split('&').filter(|p| !p.is_empty()) {
                match param.strip_prefix("password=") {
                    Some(pw) => {
                        if password.is_none() {
                            password = Some(percent_decode(pw)?);
                        }
                    }
                    None => params.push(param.to_string()),
                }
            }
        }
        Ok(PgUrl {
            scheme: scheme.to_string(),
            user: user.filter(|u| !u.is_empty()),
            password: password.filter(|p| !p.is_empty()),
            hosts: hosts.to_string(),
            params,
        })
    }

    /// The URL for `database`, without the password.
    fn for_database(&self, database: &str) -> String {
        let mut url = format!("{}://", self.scheme);
        if let Some(user) = &self.user {
            url.push_str(&percent_encode(user));
            url.push('@');
        }
        url.push_str(&self.hosts);
        url.push('/');
        url.push_str(&percent_encode(database));
        if !self.params.is_empty() {
            url.push('?');
            url.push_str(&self.params.join("&"));
        }
        url
    }

    /// The URL as given, password replaced, for Debug output.
    fn redacted(&self) -> String {
        let mut url = format!("{}://", self.scheme);
        if let Some(user) = &self.user {
            url.push_str(&percent_encode(user));
            if self.password.is_some() {
                url.push_str(":***");
            }
            url.push('@');
        }
        url.push_str(&self.hosts);
        url
    }

    /// Where the server is, for messages.
    fn place(&self) -> String {
        if self.hosts.is_empty() {
            return "the local socket".into();
        }
        if self.hosts.contains(':') && !self.hosts.ends_with(']') {
            self.hosts.clone()
        } else {
            format!("{}:5432", self.hosts)
        }
    }
}

fn percent_decode(text: &str) -> Result<String, PgError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    PgError::BadUrl("a % escape is not followed by two hex digits".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgError::BadUrl("an escape decodes to invalid UTF-8".into()))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A value for a libpq `keyword=value` string.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// An SQL identifier, quoted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings, the default since 9.1).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn check_name(database: &str) -> Result<(), PgError> {
    let reason = if database.is_empty() {
        "it is empty"
    } else if database.contains('\0') {
        "it contains a NUL byte"
    } else if database.len() > 63 {
        "it is longer than 63 bytes"
    } else {
        return Ok(());
    };
    Err(PgError::BadName {
        name: database.to_string(),
        reason,
    })
}

/// One query for `facts`: rows of four NUL-separated fields, the first saying what the row is.
/// Unused fields hold `-`, never an empty string: the output's trailing NULs are trimmed, and
/// an empty last field would go with them (a database without tables ends on the size row).
const FACTS_SQL: &str = "\
SELECT 'version', current_setting('server_version'), '-', '-' \
UNION ALL SELECT 'size', pg_database_size(current_database())::text, '-', '-' \
UNION ALL (SELECT 'table', n.nspname, c.relname, c.reltuples::bigint::text \
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
  WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
  ORDER BY n.nspname, c.relname)";

/// Exact row counts through `query_to_xml`, so one statement counts every table.
const COUNTS_SQL: &str = "\
SELECT n.nspname, c.relname, \
  (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text \
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
  WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
  ORDER BY n.nspname, c.relname";

/// Parses `COUNTS_SQL`'s output (rows of schema, name, count) into tables whose `row_estimate`
/// is the exact count.
fn parse_counts(out: &[u8]) -> Result<Vec<TableFact>, PgError> {
    let text = String::from_utf8_lossy(out);
    let trimmed = text.trim_end_matches(['\0', '\n']);
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let fields: Vec<&str> = trimmed.split('\0').collect();
    if !fields.len().is_multiple_of(3) {
        return Err(PgError::Output {
            tool: "psql".into(),
            message: format!("{} fields, not rows of three", fields.len()),
        });
    }
    fields
        .chunks(3)
        .map(|row| {
            Ok(TableFact {
                schema: row[0].to_string(),
                name: row[1].to_string(),
                row_estimate: row[2].parse().map_err(|_| PgError::Output {
                    tool: "psql".into(),
                    message: format!("row count {:?}", row[2]),
                })?,
            })
        })
        .collect()
}

/// Parses `FACTS_SQL`'s output: server version, database size, tables.
fn parse_facts(out: &[u8]) -> Result<(String, u64, Vec<TableFact>), PgError> {
    let bad = |message: String| PgError::Output {
        tool: "psql".into(),
        message,
    };
    let text = String::from_utf8_lossy(out);
    let fields: Vec<&str> = text.trim_end_matches(['\0', '\n']).split('\0').collect();
    if !fields.len().is_multiple_of(4) {
        return Err(bad(format!("{} fields, not rows of four", fields.len())));
    }
    let (mut version, mut size, mut tables) = (None, None, Vec::new());
    for row in fields.chunks(4) {
        match row[0] {
            "version" => version = Some(row[1].to_string()),
            "size" => {
                size = Some(
                    row[1]
                        .parse::<u64>()
                        .map_err(|_| bad(format!("database size {:?}", row[1])))?,
                )
            }
            "table" => tables.push(TableFact {
                schema: row[1].to_string(),
                name: row[2].to_string(),
                row_estimate: row[3]
                    .parse()
                    .map_err(|_| bad(format!("row estimate {:?}", row[3])))?,
            }),
            other => return Err(bad(format!("unknown row kind {other:?}"))),
        }
    }
    match (version, size) {
        (Some(version), Some(size)) => Ok((version, size, tables)),
        _ => Err(bad("no version or size row".into())),
    }
}

/// `pg_dump (PostgreSQL) 15.13 (Debian ...)` → `15.13 (Debian ...)`.
fn parse_tool_version(out: &str) -> String {
    let line = out.lines().next().unwrap_or_default().trim();
    match line.split_once("(PostgreSQL) ") {
        Some((_, version)) => version.to_string(),
        None => line.to_string(),
    }
}

/// The entries of a `pg_restore --list` listing: comments (`;`) and blank lines left out.
fn toc_entries(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_loses_its_password_and_takes_the_database() {
        let url =
            PgUrl::parse("postgresql://app:s%40cret@127.0.0.1:5433/old?sslmode=disable").unwrap();
        assert_eq!(url.password.as_deref(), Some("s@cret"));
        assert_eq!(url.user.as_deref(), Some("app"));
        assert_eq!(url.place(), "127.0.0.1:5433");
        assert_eq!(
            url.for_database("my db"),
            "postgresql://app@127.0.0.1:5433/my%20db?sslmode=disable"
        );
        assert!(!url.redacted().contains("cret"));
    }

    #[test]
    fn a_password_parameter_is_taken_out_of_the_query() {
        let url =
            PgUrl::parse("postgres://u@db.internal/x?password=hunter2&connect_timeout=3").unwrap();
        assert_eq!(url.password.as_deref(), Some("hunter2"));
        assert_eq!(url.place(), "db.internal:5432");
        let built = url.for_database("x");
        assert!(!built.contains("hunter2"), "{built}");
        assert!(built.ends_with("?connect_timeout=3"), "{built}");
    }

    #[test]
    fn urls_without_user_or_host_work_and_others_are_refused() {
        let url = PgUrl::parse("postgresql:///").unwrap();
        assert_eq!(url.for_database("d"), "postgresql:///d");
        assert_eq!(url.place(), "the local socket");
        let err = PgUrl::parse("mysql://root:pw@h/").unwrap_err().to_string();
        assert!(!err.contains("pw"), "{err}");
        assert!(PgUrl::parse("postgresql://u:%zz@h/").is_err());
    }

    #[test]
    fn debug_of_a_conn_hides_the_password() {
        let conn = Conn::Host {
            url: "postgresql://u:topsecret@h:1/".into(),
            password_file: None,
        };
        let shown = format!("{conn:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("u:***@h:1"), "{shown}");
    }

    #[test]
    fn stderr_is_classified() {
        let err = classify(
            "pg_dump",
            "nope",
            "127.0.0.1:5432",
            "postgres",
            "exited with status 1".into(),
            "pg_dump: error: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  database \"nope\" does not exist\n",
            None,
        );
        assert_eq!(
            err.to_string(),
            "pg_dump: database \"nope\" does not exist at 127.0.0.1:5432"
        );
        let err = classify(
            "psql",
            "d",
            "127.0.0.1:1",
            "u",
            "exited with status 2".into(),
            "psql: error: connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
            None,
        );
        assert!(matches!(err, PgError::Refused { .. }), "{err}");
        let err = classify(
            "psql",
            "d",
            "h:5432",
            "app",
            "exited with status 2".into(),
            "psql: error: connection to server at \"h\" failed: FATAL:  password authentication failed for user \"app\"",
            Some("pw"),
        );
        assert_eq!(
            err.to_string(),
            "psql: authentication failed for user \"app\" at h:5432: password authentication failed"
        );
    }

    #[test]
    fn other_failures_quote_the_last_lines_without_the_secret() {
        let err = classify(
            "pg_restore",
            "d",
            "h:5432",
            "u",
            "exited with status 1".into(),
            "line 1\n\nthe secret is hunter2\npg_restore: error: input file is too short\n",
            Some("hunter2"),
        );
        let text = err.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.starts_with("pg_restore on database \"d\" at h:5432 exited with status 1: line 1; the secret is ***; pg_restore: error: input file is too short"), "{text}");
    }

    #[test]
    fn statuses_name_the_signal() {
        assert_eq!(
            describe_status(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(1 << 8)),
            "exited with status 1"
        );
        assert_eq!(
            describe_exec_code(137),
            "exited with status 137 (killed by signal 9, SIGKILL)"
        );
        assert_eq!(describe_exec_code(1), "exited with status 1");
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("o'neil"), "'o''neil'");
        assert_eq!(conninfo_value("a'b\\c"), "'a\\'b\\\\c'");
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
        assert!(check_name("ok").is_ok());
    }

    #[test]
    fn facts_output_is_parsed() {
        let out = b"version\x0015.13 (Debian)\x00-\x00-\x00size\x00123\x00-\x00-\x00table\x00public\x00a\x0042\x00table\x00s\x00b\x00-1\x00";
        let (version, size, tables) = parse_facts(out).unwrap();
        assert_eq!(version, "15.13 (Debian)");
        assert_eq!(size, 123);
        assert_eq!(
            tables,
            vec![
                TableFact {
                    schema: "public".into(),
                    name: "a".into(),
                    row_estimate: 42
                },
                TableFact {
                    schema: "s".into(),
                    name: "b".into(),
                    row_estimate: -1
                },
            ]
        );
        assert!(parse_facts(b"version\x00x\x00").is_err());
        // A database without tables: the output ends on the size row.
        let empty = b"version\x0015.13\x00-\x00-\x00size\x007000000\x00-\x00-\x00";
        let (version, size, tables) = parse_facts(empty).unwrap();
        assert_eq!(
            (version.as_str(), size, tables.len()),
            ("15.13", 7_000_000, 0)
        );
    }

    #[test]
    fn tool_versions_and_listings_are_parsed() {
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)\n"),
            "15.13 (Debian 15.13-0+deb12u1)"
        );
        let listing = ";\n; Archive created at ...\n;\n215; 1259 16386 TABLE public t postgres\n\n3320; 0 16386 TABLE DATA public t postgres\n";
        assert_eq!(toc_entries(listing).len(), 2);
    }
}
