//! The Docker Engine, through bollard. The only module of the agent that imports bollard.
//!
//! For now the agent only probes the Engine for its health report; deploys will add to this
//! module behind a trait so their logic can be tested against a fake.

use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerSummaryStateEnum;
use bollard::query_parameters::ListContainersOptionsBuilder;
use tokio::sync::Mutex;

use crate::health::DockerFacts;

/// How long a probe may take before the Engine counts as unreachable: a hung Engine must not
/// stall health reporting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker Engine at {socket}: {message}")]
    Connect { socket: String, message: String },
}

/// A client of the local Docker Engine. It connects on first use, and again after a failure,
/// so an Engine that starts after the agent (or restarts) is picked up. The API version is
/// negotiated, so an older Engine (API 1.41) works as well as a current one.
#[derive(Debug)]
pub struct DockerClient {
    /// As configured: empty for the defaults, else a path or `unix://` URL.
    socket: String,
    /// For messages.
    shown: String,
    docker: Mutex<Option<Docker>>,
}

/// A client for `socket` (a path or `unix://` URL); empty means `DOCKER_HOST` or the default
/// `/var/run/docker.sock`. No I/O happens until the first call.
pub fn connect(socket: &str) -> DockerClient {
    let shown = if socket.is_empty() {
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "/var/run/docker.sock".into())
    } else {
        socket.trim_start_matches("unix://").to_string()
    };
    DockerClient {
        socket: socket.to_string(),
        shown,
        docker: Mutex::new(None),
    }
}

impl DockerClient {
    async fn client(&self) -> Result<Docker, DockerError> {
        let mut guard = self.docker.lock().await;
        if let Some(docker) = guard.as_ref() {
            return Ok(docker.clone());
        }
        let fail = |e: bollard::errors::Error| DockerError::Connect {
            socket: self.shown.clone(),
            message: e.to_string(),
        };
        let raw = if self.socket.is_empty() {
            Docker::connect_with_local_defaults()
        } else {
            Docker::connect_with_unix(
                &self.shown,
                PROBE_TIMEOUT.as_secs(),
                bollard::API_DEFAULT_VERSION,
            )
        }
        .map_err(fail)?;
        let negotiated = raw.negotiate_version().await.map_err(fail)?;
        *guard = Some(negotiated.clone());
        Ok(negotiated)
    }

    /// Pings the Engine, reads its version and counts containers. Never fails: an error is
    /// reported as `reachable: false` with the cause and the likely fix.
    pub async fn probe(&self) -> DockerFacts {
        let result = tokio::time::timeout(PROBE_TIMEOUT, async {
            let docker = self.client().await?;
            let calls = async {
                docker.ping().await?;
                let version = docker.version().await?;
                let options = ListContainersOptionsBuilder::new().all(true).build();
                let containers = docker.list_containers(Some(options)).await?;
                Ok::<_, bollard::errors::Error>((version, containers))
            };
            calls.await.map_err(|e| DockerError::Connect {
                socket: self.shown.clone(),
                message: e.to_string(),
            })
        })
        .await;
        match result {
            Ok(Ok((version, containers))) => DockerFacts {
                reachable: true,
                version: version.version.unwrap_or_default(),
                error: String::new(),
                containers_running: containers
                    .iter()
                    .filter(|c| c.state == Some(ContainerSummaryStateEnum::RUNNING))
                    .count() as u32,
                containers_total: containers.len() as u32,
            },
            Ok(Err(err)) => {
                // Forget a negotiated client: the Engine may have been upgraded or restarted.
                *self.docker.lock().await = None;
                self.unreachable(&err)
            }
            Err(_) => self.unreachable(&DockerError::Connect {
                socket: self.shown.clone(),
                message: format!("no answer within {}s", PROBE_TIMEOUT.as_secs()),
            }),
        }
    }

    fn unreachable(&self, err: &DockerError) -> DockerFacts {
        DockerFacts {
            reachable: false,
            error: format!("{err} (is dockerd running? may the agent's user use the socket?)"),
            ..DockerFacts::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_the_real_engine() {
        let facts = connect("").probe().await;
        if !facts.reachable {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("the Docker Engine must be reachable in CI: {}", facts.error);
            }
            eprintln!("skipping: {}", facts.error);
            return;
        }
        assert!(!facts.version.is_empty());
        assert!(facts.containers_running <= facts.containers_total);
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_with_its_path_in_the_reason() {
        let facts = connect("unix:///nonexistent/docker.sock").probe().await;
        assert!(!facts.reachable);
        assert!(
            facts.error.contains("/nonexistent/docker.sock"),
            "{}",
            facts.error
        );
    }
}
