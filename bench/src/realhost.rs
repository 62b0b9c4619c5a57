//! One real host for the benchmarks that drive Drover end to end: the real
//! `drover-controller` and an enrolled `drover-agent` as processes, and the real `drover` CLI
//! to talk to them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Proc, free_port, start_controller, wait_serving};

/// A controller and one enrolled, running agent (host name `bench`), all under `dir`.
pub struct RealHost {
    /// Kept so the controller lives (and is killed) with the host.
    _controller: Proc,
    pub agent: Proc,
    pub addr: String,
    pub admin: PathBuf,
    pub drover_bin: PathBuf,
}

impl RealHost {
    /// Starts the controller, enrolls the agent with a token from the real CLI, and starts it
    /// with `agent_toml` as its config file.
    pub async fn start(bin_dir: &Path, dir: &Path, agent_toml: &str) -> Result<RealHost> {
        let bin = |name: &str| bin_dir.join(name);
        let addr = format!("127.0.0.1:{}", free_port()?);
        let data = dir.join("controller");
        let mut controller = start_controller(
            &bin("drover-controller"),
            &data,
            &addr,
            &dir.join("controller.log"),
        )?;
        let admin = data.join("operator/admin");
        wait_serving(&mut controller, &addr, &admin).await?;
        let drover_bin = bin("drover");
        let (_, _, token) = drover(
            &drover_bin,
            &addr,
            &admin,
            &["token", "create", "--host", "bench"],
        )
        .await?;
        let agent_dir = dir.join("agent");
        let enrolled = Command::new(bin("drover-agent"))
            .args(["enroll", "--controller", &addr, "--data-dir"])
            .arg(&agent_dir)
            .env("DROVER_TOKEN", token.trim())
            .output()?;
        if !enrolled.status.success() {
            bail!("enroll: {}", String::from_utf8_lossy(&enrolled.stderr));
        }
        let agent_config = dir.join("agent.toml");
        std::fs::write(&agent_config, agent_toml)?;
        let agent_dir_s = agent_dir.to_str().context("agent dir is not UTF-8")?;
        let agent_config_s = agent_config.to_str().context("path is not UTF-8")?;
        let agent = Proc::spawn(
            &bin("drover-agent"),
            &["run", "--config", agent_config_s, "--data-dir", agent_dir_s],
            &dir.join("agent.log"),
        )?;
        Ok(RealHost {
            _controller: controller,
            agent,
            addr,
            admin,
            drover_bin,
        })
    }

    /// Runs the real `drover` CLI against this controller.
    pub async fn drover(&self, args: &[&str]) -> Result<(Duration, i32, String)> {
        drover(&self.drover_bin, &self.addr, &self.admin, args).await
    }

    /// Retries `args` until it succeeds (the agent needs a moment to connect).
    pub async fn drover_until_ok(
        &self,
        args: &[&str],
        patience: Duration,
    ) -> Result<(Duration, i32, String)> {
        let deadline = Instant::now() + patience;
        loop {
            match self.drover(args).await {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("not done within {patience:?}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// Runs the real `drover` CLI; returns (wall time, exit code, stdout).
pub async fn drover(
    bin: &Path,
    addr: &str,
    identity: &Path,
    args: &[&str],
) -> Result<(Duration, i32, String)> {
    let started = Instant::now();
    let out = tokio::process::Command::new(bin)
        .args(args)
        .env("DROVER_CONTROLLER", addr)
        .env("DROVER_IDENTITY", identity)
        .output()
        .await
        .context("running drover")?;
    let took = started.elapsed();
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        bail!(
            "drover {} exited {code}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((
        took,
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}
