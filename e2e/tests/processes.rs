//! The real programs: `drover-controller run`, `drover-agent enroll|run` and `drover`, as a
//! user would run them. SIGTERM stops each within 5 s; CLI errors have documented exit codes.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use drover_e2e::{bin, drover_cli as drover, free_port};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm_and_wait(daemon: &mut Daemon) -> (Duration, std::process::ExitStatus) {
    let started = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            return (started.elapsed(), status);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not exit within 10s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until(what: &str, patience: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_real_programs_enroll_report_and_stop_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("controller");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = tmp.path().join("controller.toml");
    std::fs::write(
        &config,
        format!("listen = \"{addr}\"\ndata_dir = \"{}\"\n", data.display()),
    )
    .unwrap();
    let mut controller = Daemon(
        Command::new(bin("drover-controller"))
            .args(["run", "--config"])
            .arg(&config)
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = data.join("operator/admin");
    wait_until("the controller serves", Duration::from_secs(20), || {
        admin.join("key.pem").exists() && drover(&addr, &admin, &["hosts"]).status.success()
    });

    // No hosts yet; JSON is an empty array.
    let out = drover(&addr, &admin, &["hosts", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap(),
        serde_json::json!([])
    );

    // token create -> enroll -> run.
    let out = drover(
        &addr,
        &admin,
        &[
            "token", "create", "--host", "web-1", "--label", "role=web", "--ttl", "10m",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    assert!(token.starts_with("drover1."), "{token}");
    let agent_dir = tmp.path().join("agent");
    let out = Command::new(bin("drover-agent"))
        .args([
            "enroll",
            "--controller",
            &addr,
            "--token",
            &token,
            "--data-dir",
        ])
        .arg(&agent_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll: {}", stderr(&out));
    assert!(
        !stdout(&out).contains(&token) && !stderr(&out).contains(&token),
        "the token is never echoed"
    );
    let agent_config = tmp.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        "heartbeat_interval = \"1s\"\nhealth_interval = \"2s\"\nhealth_sample_interval = \"1s\"\n",
    )
    .unwrap();
    let mut agent = Daemon(
        Command::new(bin("drover-agent"))
            .args(["run", "--config"])
            .arg(&agent_config)
            .arg("--data-dir")
            .arg(&agent_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut hosts = serde_json::Value::Null;
    wait_until(
        "web-1 connected with a health report",
        Duration::from_secs(30),
        || {
            let out = drover(&addr, &admin, &["hosts", "--json"]);
            hosts = serde_json::from_str(&stdout(&out)).unwrap_or_default();
            hosts[0]["state"] == "connected" && hosts[0]["health"] != "unknown"
        },
    );
    let host = &hosts[0];
    assert_eq!(host["name"], "web-1");
    assert!(host["last_seen"].as_str().unwrap().ends_with('Z'));
    assert_eq!(host["labels"]["role"], "web");
    let out = drover(&addr, &admin, &["status", "web-1"]);
    assert!(out.status.success());
    for needle in [
        "state:         connected",
        "checks:",
        "docker",
        "certificate",
    ] {
        assert!(
            stdout(&out).contains(needle),
            "status lacks {needle:?}:\n{}",
            stdout(&out)
        );
    }

    // Documented exit codes, one clear line each.
    let out = drover(&addr, &admin, &["status", "nope"]);
    assert_eq!(out.status.code(), Some(68), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown host nope"));
    let out = drover("127.0.0.1:1", &admin, &["hosts"]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot reach the controller at 127.0.0.1:1"),
        "{}",
        stderr(&out)
    );
    let out = drover(&addr, &tmp.path().join("no-such-identity"), &["hosts"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let viewer = tmp.path().join("viewer");
    let out = drover(
        &addr,
        &admin,
        &[
            "operator",
            "create",
            "vic",
            "--role",
            "viewer",
            "--out",
            viewer.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = drover(&addr, &viewer, &["token", "create", "--host", "x"]);
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(stderr(&out).contains("read-only"));
    assert_eq!(
        stderr(&out).lines().count(),
        1,
        "one line: {}",
        stderr(&out)
    );
    let out = drover(&addr, &viewer, &["hosts", "--json"]);
    assert!(out.status.success());

    // SIGTERM: both exit within 5 s, cleanly.
    let (took, status) = sigterm_and_wait(&mut agent);
    assert!(took < Duration::from_secs(5), "agent took {took:?}");
    assert!(status.success(), "agent exit {status:?}");
    let (took, status) = sigterm_and_wait(&mut controller);
    assert!(took < Duration::from_secs(5), "controller took {took:?}");
    assert!(status.success(), "controller exit {status:?}");
}

#[test]
fn sigterm_stops_a_controller_with_live_agent_sessions_within_5s() {
    // The controller must end long-lived agent streams itself, or graceful shutdown hangs.
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tmp.path().join("dev");
    let mut dev = Daemon(
        Command::new(bin("drover-controller"))
            .args(["dev", "--listen", &addr, "--dir"])
            .arg(&dir)
            .current_dir(tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = dir.join("controller/operator/admin");
    let mut hosts = serde_json::Value::Null;
    wait_until(
        "the dev agent is connected",
        Duration::from_secs(30),
        || {
            let out = drover(&addr, &admin, &["hosts", "--json"]);
            hosts = serde_json::from_str(&stdout(&out)).unwrap_or_default();
            hosts[0]["state"] == "connected"
        },
    );
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    // The agent is the `drover-agent` binary, a child of the dev process.
    let agents = agent_processes_under(&dir);
    assert_eq!(agents.len(), 1, "one agent child runs: {agents:?}");
    let (took, status) = sigterm_and_wait(&mut dev);
    assert!(took < Duration::from_secs(5), "dev took {took:?}");
    assert!(status.success());
    assert_eq!(
        agent_processes_under(&dir),
        Vec::<u32>::new(),
        "the agent child stops with the dev environment"
    );
    let mut printed = String::new();
    use std::io::Read;
    dev.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    assert!(
        printed.contains("export DROVER_CONTROLLER="),
        "dev prints the commands to try:\n{printed}"
    );
    assert!(printed.contains("hosts"), "{printed}");
}

/// The pids of `drover-agent` processes whose command line names a path under `dir`.
fn agent_processes_under(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with("drover-agent"));
        // A zombie (exited, not yet reaped) has an empty command line and is not counted.
        if is_agent && args.iter().any(|a| a.contains(&dir)) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn dev_without_the_agent_binary_beside_it_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let lone = tmp.path().join("drover-controller");
    std::fs::copy(bin("drover-controller"), &lone).unwrap();
    let out = Command::new(&lone)
        .args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--dir",
        ])
        .arg(tmp.path().join("dev"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&tmp.path().join("drover-agent").display().to_string())
            && err.contains("cargo build --release"),
        "{err}"
    );
}

#[test]
fn bad_config_files_are_refused_with_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    std::fs::write(&config, "down_after = \"1s\"\n").unwrap();
    let out = Command::new(bin("drover-controller"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains("c.toml") && err.contains("down_after"),
        "{err}"
    );
    let out = Command::new(bin("drover-agent"))
        .args(["run", "--data-dir"])
        .arg(tmp.path().join("empty"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("not enrolled"), "{}", stderr(&out));

    // Values that used to pass validation and then panic a daemon or kill its health task:
    // exit 78, naming the key (issue 11, item 8).
    for (daemon, text, key) in [
        (
            "drover-controller",
            "operator_cert_ttl = \"100000000y\"\n",
            "operator_cert_ttl",
        ),
        (
            "drover-controller",
            "agent_cert_ttl = \"100000000y\"\n",
            "agent_cert_ttl",
        ),
        (
            "drover-agent",
            "health_sample_interval = \"0s\"\n",
            "health_sample_interval",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = Command::new(bin(daemon))
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{daemon}: {err}");
        assert!(
            err.contains("c.toml")
                && err.contains(&format!("`{key}`"))
                && err.contains("out of range"),
            "{daemon}: {err}"
        );
    }
}

/// A command that runs `program` with `WATCHDOG_PID` set to its own pid, as systemd does
/// (the shell execs the program, so the pid stays the same).
fn with_watchdog_pid(program: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(program);
    cmd
}

/// Reads sd_notify datagrams until one contains `want`, or panics after 10 s.
fn expect_notify(socket: &std::os::unix::net::UnixDatagram, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.lines().any(|l| l == want) {
                return;
            }
            seen.push(text);
        }
    }
    panic!("no {want} from the daemon within 10s; got {seen:?}");
}

#[test]
fn both_daemons_speak_sd_notify_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("controller");
    let addr = format!("127.0.0.1:{}", free_port());
    let notify_path = tmp.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut controller = Daemon(
        with_watchdog_pid(&bin("drover-controller"))
            .args(["run", "--listen", &addr, "--data-dir"])
            .arg(&data)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    expect_notify(&socket, "READY=1");
    expect_notify(&socket, "WATCHDOG=1");

    // The agent too, once enrolled.
    let admin = data.join("operator/admin");
    let out = drover(&addr, &admin, &["token", "create", "--host", "web-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let agent_dir = tmp.path().join("agent");
    let enrolled = Command::new(bin("drover-agent"))
        .args(["enroll", "--controller", &addr, "--data-dir"])
        .arg(&agent_dir)
        .env("DROVER_TOKEN", stdout(&out).trim())
        .output()
        .unwrap();
    assert!(enrolled.status.success(), "{}", stderr(&enrolled));
    let agent_notify_path = tmp.path().join("agent-notify.sock");
    let agent_socket = std::os::unix::net::UnixDatagram::bind(&agent_notify_path).unwrap();
    agent_socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut agent = Daemon(
        with_watchdog_pid(&bin("drover-agent"))
            .args(["run", "--data-dir"])
            .arg(&agent_dir)
            .env("NOTIFY_SOCKET", &agent_notify_path)
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    expect_notify(&agent_socket, "READY=1");
    expect_notify(&agent_socket, "WATCHDOG=1");
    let (took, status) = sigterm_and_wait(&mut agent);
    assert!(status.success() && took < Duration::from_secs(5));
    expect_notify(&agent_socket, "STOPPING=1");

    let (took, status) = sigterm_and_wait(&mut controller);
    assert!(status.success() && took < Duration::from_secs(5));
    expect_notify(&socket, "STOPPING=1");
}
