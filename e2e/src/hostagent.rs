//! A real `drover-agent run` process per host for multi-host tests on one machine and one
//! Docker Engine: its own data dir, config and log, its app proxies on its own loopback address
//! (`[proxy] listen_ip`), enrolled with the real binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_model::jobevent::field;
use drover_proto::v1;

use crate::{TestController, bin, eventually, http};

/// One `drover-agent run` process of a host, with its own data dir, config and log; killed
/// with SIGKILL when dropped.
pub struct HostAgent {
    pub host: String,
    pub ip: String,
    pub config: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl HostAgent {
    /// Enrolls `host` with the real binary into `dir/<host>`; its proxies listen on `ip`.
    pub async fn enroll(
        controller: &TestController,
        dir: &Path,
        host: &str,
        ip: &str,
    ) -> HostAgent {
        HostAgent::enroll_with(controller, dir, host, ip, "").await
    }

    /// As [`HostAgent::enroll`], with `extra` TOML lines at the top of its config.
    pub async fn enroll_with(
        controller: &TestController,
        dir: &Path,
        host: &str,
        ip: &str,
        extra: &str,
    ) -> HostAgent {
        let token = controller.token(host).await;
        HostAgent::enroll_at(&controller.addr.to_string(), &token, dir, host, ip, extra)
    }

    /// Enrolls `host` to the controller at `addr` with `token` (a controller in its own
    /// process); its proxies listen on `ip`, `extra` heads its config.
    pub fn enroll_at(
        addr: &str,
        token: &str,
        dir: &Path,
        host: &str,
        ip: &str,
        extra: &str,
    ) -> HostAgent {
        let home = dir.join(host);
        let data = home.join("data");
        let out = Command::new(bin("drover-agent"))
            .args(["enroll", "--controller", addr, "--data-dir"])
            .arg(&data)
            .env("DROVER_TOKEN", token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enroll {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = home.join("agent.toml");
        // Many agents share this machine's cores, so its load average is all of theirs: the
        // load check would call every one of them unhealthy under a test's own load.
        std::fs::write(
            &config,
            format!(
                "{extra}\nheartbeat_interval = \"1s\"\nhealth_interval = \"2s\"\nhealth_sample_interval = \"1s\"\n\
                 reconnect_max = \"2s\"\nlock_lease = \"3s\"\nsecrets_dir = \"{}\"\n\
                 health.load_degraded_per_cpu = 50.0\nhealth.load_unhealthy_per_cpu = 100.0\n\
                 [proxy]\nlisten_ip = \"{ip}\"\n",
                home.join("secrets").display()
            ),
        )
        .unwrap();
        HostAgent {
            host: host.to_string(),
            ip: ip.to_string(),
            config,
            data,
            log: home.join("agent.log"),
            child: None,
        }
    }

    /// Starts the agent and waits until a session opened after now is up.
    pub async fn start(&mut self, controller: &TestController) {
        let since = drover_agent::unix_ms();
        self.spawn();
        eventually(
            &format!("{}'s new session", self.host),
            Duration::from_secs(30),
            || async {
                let h = controller.host(&self.host).await?;
                (h.session_open && h.last_seen_unix_ms > since).then_some(())
            },
        )
        .await;
    }

    /// Starts the agent process, not waiting for its session.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("drover-agent"))
            .args(["run", "--config"])
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start drover-agent");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let _ = child.wait();
        }
    }

    /// The address the app's proxy serves on this host.
    pub fn public(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ip).parse().unwrap()
    }

    /// Where this agent's backups (and so its scratch containers' owner label) live.
    pub fn backups_dir(&self) -> String {
        self.data.join("backups").display().to_string()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What `GET /` on `addr` says the version is.
pub async fn version_at(addr: SocketAddr) -> Option<String> {
    match http(addr, "GET", "/").await {
        Ok((200, body)) => Some(body.trim().trim_start_matches("version=").to_string()),
        _ => None,
    }
}

/// One deploy job of `version` to `hosts`, waited for until each ended well.
pub async fn deploy(controller: &TestController, app: &str, version: &str, hosts: &[&HostAgent]) {
    let id = controller
        .admin()
        .deploy(v1::DeployRequest {
            app: app.into(),
            version: version.into(),
            hosts: hosts.iter().map(|h| h.host.clone()).collect(),
            ..Default::default()
        })
        .await
        .expect("deploy accepted")
        .into_inner()
        .id;
    for h in hosts {
        let done = controller
            .wait_job(&h.host, &id, Duration::from_secs(90))
            .await;
        assert_eq!(
            done.fields[field::RESULT],
            "succeeded",
            "{version} on {}: {done:?}",
            h.host
        );
    }
}
