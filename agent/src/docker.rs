//! The Docker Engine, through bollard. The only module of the agent that imports bollard.
//!
//! The agent probes the Engine for its health report, and manages containers by name for
//! deploys: image presence, pull and untag, create-and-start with labels, a published port and
//! networks, start, stop, remove, restart policy, inspect, list by label, log tails and one-off
//! runs (migrations). Commands in running containers (`exec_read`, `exec_write`) carry the
//! PostgreSQL tools of backups and restores. Tested against the real Engine.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummaryStateEnum, ContainerUpdateBody,
    HostConfig, NetworkConnectRequest, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{Mutex, oneshot};

use crate::health::DockerFacts;

/// How long a probe may take before the Engine counts as unreachable: a hung Engine must not
/// stall health reporting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// bollard's bound on one request until the Engine answers. Stopping a container answers only
/// once it has stopped (after its grace period), so this must be long: bollard's own default,
/// also what `connect_with_local_defaults` uses. Probes carry the short bound above.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Where an image pull stands, from the Engine's per-layer status lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullProgress {
    layers: BTreeMap<String, Layer>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Layer {
    downloaded: u64,
    size: u64,
    done: bool,
}

impl PullProgress {
    /// One status line of layer `id`. Lines that are not about a layer (`Pulling from ...`,
    /// `Digest: ...`) are ignored.
    pub fn apply(&mut self, id: &str, status: &str, current: Option<i64>, total: Option<i64>) {
        let bytes = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        let layer_line = matches!(
            status,
            "Pulling fs layer"
                | "Waiting"
                | "Downloading"
                | "Verifying Checksum"
                | "Download complete"
                | "Extracting"
                | "Pull complete"
                | "Already exists"
        );
        if !layer_line {
            return;
        }
        let layer = self.layers.entry(id.to_string()).or_default();
        match status {
            "Downloading" => {
                if let Some(total) = bytes(total) {
                    layer.size = total;
                }
                if let Some(current) = bytes(current) {
                    layer.downloaded = current;
                }
            }
            "Verifying Checksum" | "Download complete" | "Extracting" => {
                layer.downloaded = layer.size;
            }
            "Pull complete" | "Already exists" => {
                layer.downloaded = layer.size;
                layer.done = true;
            }
            _ => {}
        }
    }

    /// `2/5 layers, 12.3 of 40.0 MiB downloaded`.
    pub fn describe(&self) -> String {
        if self.layers.is_empty() {
            return "asking the registry".into();
        }
        let done = self.layers.values().filter(|l| l.done).count();
        let downloaded: u64 = self.layers.values().map(|l| l.downloaded).sum();
        let size: u64 = self.layers.values().map(|l| l.size).sum();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "{done}/{} layers, {:.1} of {:.1} MiB downloaded",
            self.layers.len(),
            mib(downloaded),
            mib(size)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker Engine at {socket}: {message}")]
    Connect { socket: String, message: String },
    #[error("image {0} is not present on this host")]
    ImageMissing(String),
    #[error("no container named {0}")]
    NoSuchContainer(String),
    #[error("Docker Engine: {action}: {message}")]
    Engine { action: String, message: String },
}

/// What to run: a container of `image`, named `name`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Overrides the image's command when set.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// A container port to publish on 127.0.0.1 at a port the Engine picks.
    pub publish: Option<u16>,
    /// `volume:/path` or `/host/path:/path`.
    pub binds: Vec<String>,
    /// Networks to join: the first is the container's network mode, the others are connected
    /// before it starts. Empty: Docker's default bridge.
    pub networks: Vec<String>,
}

/// What the Engine says about a container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    /// The image ID (`sha256:...`) the container runs.
    pub image_id: String,
    pub running: bool,
    pub exit_code: Option<i64>,
    /// The host port the published container port landed on.
    pub host_port: Option<u16>,
    pub labels: BTreeMap<String, String>,
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
            message: with_causes(&e),
        };
        let raw = self.unconnected().map_err(fail)?;
        let negotiated = raw.negotiate_version().await.map_err(fail)?;
        *guard = Some(negotiated.clone());
        Ok(negotiated)
    }

    /// A bollard client for the configured socket; no I/O yet.
    fn unconnected(&self) -> Result<Docker, bollard::errors::Error> {
        if self.socket.is_empty() {
            Docker::connect_with_local_defaults()
        } else {
            Docker::connect_with_unix(
                &self.shown,
                REQUEST_TIMEOUT.as_secs(),
                bollard::API_DEFAULT_VERSION,
            )
        }
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
                message: with_causes(&e),
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
                out_of_fds: false,
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

    fn engine_err(action: &str, err: bollard::errors::Error) -> DockerError {
        DockerError::Engine {
            action: action.to_string(),
            message: err.to_string(),
        }
    }

    /// The image's ID if `image` (repository:tag) is present locally.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, DockerError> {
        let docker = self.client().await?;
        match docker.inspect_image(image).await {
            Ok(inspect) => Ok(inspect.id),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(Self::engine_err(&format!("inspect image {image}"), e)),
        }
    }

    /// Creates and starts a container; the image must be present.
    pub async fn create_and_start(
        &self,
        spec: &ContainerSpec,
    ) -> Result<ContainerInfo, DockerError> {
        let docker = self.client().await?;
        if self.image_id(&spec.image).await?.is_none() {
            return Err(DockerError::ImageMissing(spec.image.clone()));
        }
        let port_key = spec.publish.map(|p| format!("{p}/tcp"));
        let port_bindings = port_key.as_ref().map(|key| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(String::new()),
            };
            HashMap::from([(key.clone(), Some(vec![binding]))])
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            exposed_ports: port_key.clone().map(|k| vec![k]),
            host_config: Some(HostConfig {
                port_bindings,
                binds: (!spec.binds.is_empty()).then(|| spec.binds.clone()),
                network_mode: spec.networks.first().cloned(),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptionsBuilder::new()
            .name(&spec.name)
            .build();
        docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| Self::engine_err(&format!("create container {}", spec.name), e))?;
        for network in spec.networks.iter().skip(1) {
            let request = NetworkConnectRequest {
                container: spec.name.clone(),
                endpoint_config: None,
            };
            if let Err(e) = docker.connect_network(network, request).await {
                let _ = self.remove(&spec.name).await;
                return Err(Self::engine_err(
                    &format!("connect {} to network {network}", spec.name),
                    e,
                ));
            }
        }
        if let Err(e) = docker.start_container(&spec.name, None).await {
            // Leave nothing half-done: a container that cannot start is removed.
            let _ = self.remove(&spec.name).await;
            return Err(Self::engine_err(
                &format!("start container {}", spec.name),
                e,
            ));
        }
        self.inspect(&spec.name)
            .await?
            .ok_or_else(|| DockerError::NoSuchContainer(spec.name.clone()))
    }

    /// Pulls `image` (repository:tag) from its registry, with `credentials` for it when given,
    /// keeping `progress` up to date from the Engine's stream. Fails with the Engine's reason
    /// (no such image, registry unreachable, not authorized).
    pub async fn pull(
        &self,
        image: &str,
        credentials: Option<crate::registry::Credentials>,
        progress: &tokio::sync::watch::Sender<PullProgress>,
    ) -> Result<(), DockerError> {
        // Sent to the local Engine in the X-Registry-Auth header of this request only.
        let credentials = credentials.map(|c| bollard::auth::DockerCredentials {
            username: c.username,
            password: c.password,
            identitytoken: c.identitytoken,
            serveraddress: Some(c.registry),
            ..Default::default()
        });
        let docker = self.client().await?;
        let (repo, tag) = match image.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag),
            _ => (image, "latest"),
        };
        let options = CreateImageOptionsBuilder::new()
            .from_image(repo)
            .tag(tag)
            .build();
        let mut stream = docker.create_image(Some(options), None, credentials);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| Self::engine_err(&format!("pull {image}"), e))?;
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(DockerError::Engine {
                    action: format!("pull {image}"),
                    message: detail,
                });
            }
            if let (Some(id), Some(status)) = (&info.id, &info.status) {
                let detail = info.progress_detail.unwrap_or_default();
                progress.send_modify(|p| p.apply(id, status, detail.current, detail.total));
            }
        }
        Ok(())
    }

    /// Removes the tag `image`; the image itself goes once no tag or container uses it. An
    /// image still in use, or already gone, is left alone: returns whether it was removed.
    pub async fn remove_image(&self, image: &str) -> Result<bool, DockerError> {
        let docker = self.client().await?;
        let options = RemoveImageOptionsBuilder::new().build();
        match docker.remove_image(image, Some(options), None).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => Ok(false),
            Err(e) => Err(Self::engine_err(&format!("remove image {image}"), e)),
        }
    }

    /// Starts an existing container; starting a running one is fine.
    pub async fn start(&self, name: &str) -> Result<(), DockerError> {
        let docker = self.client().await?;
        match docker.start_container(name, None).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(DockerError::NoSuchContainer(name.to_string())),
            Err(e) => Err(Self::engine_err(&format!("start container {name}"), e)),
        }
    }

    /// Sets a container's restart policy: `true` restarts it whenever it stops unless it was
    /// stopped on purpose (and after a reboot); `false` never restarts it.
    pub async fn set_restart(&self, name: &str, restart: bool) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let policy = RestartPolicy {
            name: Some(if restart {
                RestartPolicyNameEnum::UNLESS_STOPPED
            } else {
                RestartPolicyNameEnum::NO
            }),
            maximum_retry_count: None,
        };
        let body = ContainerUpdateBody {
            restart_policy: Some(policy),
            ..ContainerUpdateBody::default()
        };
        docker
            .update_container(name, body)
            .await
            .map_err(|e| Self::engine_err(&format!("update container {name}"), e))
    }

    /// The container named `name`, if it exists.
    pub async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, DockerError> {
        let docker = self.client().await?;
        match docker.inspect_container(name, None).await {
            Ok(inspect) => Ok(Some(container_info(inspect))),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(Self::engine_err(&format!("inspect container {name}"), e)),
        }
    }

    /// Creates and starts a throw-away container `name` from the image the running container
    /// `source` was created from (its image ID, not its tag, so a re-tagged image cannot slip
    /// in), with the source's command, entrypoint, environment and user, but none of its
    /// mounts, ports or networks. Labelled with `labels` (a scratch carries `drover.scratch=1`
    /// so recovery finds it). Remove it with [`DockerClient::remove_with_volumes`].
    pub async fn run_scratch_like(
        &self,
        source: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<ContainerInfo, DockerError> {
        let docker = self.client().await?;
        let inspect = match docker.inspect_container(source, None).await {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Err(DockerError::NoSuchContainer(source.to_string())),
            Err(e) => return Err(Self::engine_err(&format!("inspect container {source}"), e)),
        };
        let image = inspect.image.clone().unwrap_or_default();
        let config = inspect.config.unwrap_or_default();
        let body = ContainerCreateBody {
            image: Some(image),
            cmd: config.cmd,
            entrypoint: config.entrypoint,
            env: config.env,
            user: config.user,
            working_dir: config.working_dir,
            labels: Some(labels.clone().into_iter().collect()),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| Self::engine_err(&format!("create container {name}"), e))?;
        if let Err(e) = docker.start_container(name, None).await {
            let _ = self.remove_with_volumes(name).await;
            return Err(Self::engine_err(&format!("start container {name}"), e));
        }
        self.inspect(name)
            .await?
            .ok_or_else(|| DockerError::NoSuchContainer(name.to_string()))
    }

    /// Removes a container (forced) and its anonymous volumes; a missing one is fine.
    pub async fn remove_with_volumes(&self, name: &str) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(name, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(Self::engine_err(&format!("remove container {name}"), e)),
        }
    }

    /// Where a named volume's files are on this host (its `Mountpoint`), if the volume exists.
    pub async fn volume_mountpoint(&self, name: &str) -> Result<Option<String>, DockerError> {
        let docker = self.client().await?;
        match docker.inspect_volume(name).await {
            Ok(volume) => Ok(Some(volume.mountpoint)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(Self::engine_err(&format!("inspect volume {name}"), e)),
        }
    }

    /// Stops a container, giving it `timeout` after SIGTERM. Stopping a stopped one is fine.
    pub async fn stop(&self, name: &str, timeout: Duration) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let options = StopContainerOptionsBuilder::new()
            .t(timeout.as_secs() as i32)
            .build();
        match docker.stop_container(name, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(DockerError::NoSuchContainer(name.to_string())),
            Err(e) => Err(Self::engine_err(&format!("stop container {name}"), e)),
        }
    }

    /// Removes a container (running or not). Removing one that is gone is fine: the answer
    /// says whether there was one.
    pub async fn remove(&self, name: &str) -> Result<bool, DockerError> {
        let docker = self.client().await?;
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        match docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(Self::engine_err(&format!("remove container {name}"), e)),
        }
    }

    /// Containers (running or not) carrying `label=value`.
    pub async fn list_labelled(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, DockerError> {
        let docker = self.client().await?;
        let filters = HashMap::from([("label", vec![format!("{label}={value}")])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let found = docker
            .list_containers(Some(options))
            .await
            .map_err(|e| Self::engine_err("list containers", e))?;
        let mut out = Vec::new();
        for summary in found {
            let name = summary
                .names
                .unwrap_or_default()
                .first()
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_default();
            if let Some(info) = self.inspect(&name).await? {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The last `lines` lines of a container's output (stdout and stderr).
    pub async fn logs_tail(&self, name: &str, lines: usize) -> Result<String, DockerError> {
        let docker = self.client().await?;
        let tail = lines.to_string();
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&tail)
            .build();
        let mut stream = docker.logs(name, Some(options));
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Self::engine_err(&format!("logs of {name}"), e))?;
            text.push_str(&chunk.to_string());
        }
        Ok(text)
    }

    /// Runs a one-off container to completion (a migration): its exit code and log tail. The
    /// container is removed afterwards whatever happened; `timeout` bounds the wait.
    pub async fn run_to_completion(
        &self,
        spec: &ContainerSpec,
        timeout: Duration,
    ) -> Result<(i64, String), DockerError> {
        self.create_and_start(spec).await?;
        let docker = self.client().await?;
        let waited = tokio::time::timeout(timeout, async {
            let mut wait = docker.wait_container(&spec.name, None);
            let mut code = None;
            while let Some(item) = wait.next().await {
                match item {
                    Ok(response) => code = Some(response.status_code),
                    // bollard reports a non-zero exit as an error carrying the code.
                    Err(bollard::errors::Error::DockerContainerWaitError { code: c, .. }) => {
                        code = Some(c)
                    }
                    Err(e) => return Err(Self::engine_err(&format!("wait for {}", spec.name), e)),
                }
            }
            Ok(code)
        })
        .await;
        let logs = self.logs_tail(&spec.name, 50).await.unwrap_or_default();
        self.remove(&spec.name).await?;
        match waited {
            Ok(Ok(Some(code))) => Ok((code, logs)),
            Ok(Ok(None)) => Err(DockerError::Engine {
                action: format!("wait for {}", spec.name),
                message: "the Engine reported no exit code".into(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DockerError::Engine {
                action: format!("run {}", spec.name),
                message: format!(
                    "still running after {}s; stopped and removed",
                    timeout.as_secs()
                ),
            }),
        }
    }

    /// Runs `spec` in the running container `container` and streams its stdout: read it from
    /// the returned reader (EOF when the command has closed its stdout), then `ExecDone::wait`
    /// gives the exit code and the tail of stderr. Dropping the reader early stops the
    /// transfer; the command then sees its stdout closed.
    pub async fn exec_read(
        &self,
        container: &str,
        spec: &ExecSpec,
    ) -> Result<(DuplexStream, ExecDone), DockerError> {
        let (docker, id, mut output, _input) = self.exec_start(container, spec, false).await?;
        let (mut writer, reader) = tokio::io::duplex(EXEC_PIPE_BYTES);
        let (tx, rx) = oneshot::channel();
        let action = format!("exec in {container}");
        tokio::spawn(async move {
            let mut stderr = Tail::default();
            while let Some(item) = output.next().await {
                match item {
                    Ok(LogOutput::StdOut { message }) => {
                        if writer.write_all(&message).await.is_err() {
                            let _ = tx.send(Err(DockerError::Engine {
                                action,
                                message: "the reader of its output went away".into(),
                            }));
                            return;
                        }
                    }
                    Ok(LogOutput::StdErr { message }) => stderr.push(&message),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(Self::engine_err(&action, e)));
                        return;
                    }
                }
            }
            // EOF for the reader before the exit code is known: the reader decides when to wait.
            drop(writer);
            let _ = tx.send(exec_exit(&docker, &id, &action, stderr).await);
        });
        Ok((reader, ExecDone { rx }))
    }

    /// Runs `spec` in the running container `container` with a stdin to write to. Shut the
    /// writer down (`AsyncWriteExt::shutdown`) to close the command's stdin; `ExecDone::wait`
    /// then gives the exit code and the tail of its output (stdout and stderr together).
    pub async fn exec_write(
        &self,
        container: &str,
        spec: &ExecSpec,
    ) -> Result<(ExecStdin, ExecDone), DockerError> {
        let (docker, id, mut output, input) = self.exec_start(container, spec, true).await?;
        let (tx, rx) = oneshot::channel();
        let action = format!("exec in {container}");
        tokio::spawn(async move {
            let mut tail = Tail::default();
            while let Some(item) = output.next().await {
                match item {
                    Ok(LogOutput::StdOut { message } | LogOutput::StdErr { message }) => {
                        tail.push(&message)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(Self::engine_err(&action, e)));
                        return;
                    }
                }
            }
            let _ = tx.send(exec_exit(&docker, &id, &action, tail).await);
        });
        Ok((input, ExecDone { rx }))
    }

    /// Creates and starts an attached exec: the exec's ID, its output and its stdin.
    async fn exec_start(
        &self,
        container: &str,
        spec: &ExecSpec,
        stdin: bool,
    ) -> Result<(Docker, String, ExecOutput, ExecStdin), DockerError> {
        let docker = self.client().await?;
        let action = format!("exec in {container}");
        let options = CreateExecOptions {
            cmd: Some(spec.cmd.clone()),
            user: (!spec.user.is_empty()).then(|| spec.user.clone()),
            env: (!spec.env.is_empty()).then(|| spec.env.clone()),
            attach_stdin: Some(stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            ..CreateExecOptions::default()
        };
        let created = match docker.create_exec(container, options).await {
            Ok(created) => created,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Err(DockerError::NoSuchContainer(container.to_string())),
            Err(e) => return Err(Self::engine_err(&action, e)),
        };
        let options = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: Some(EXEC_PIPE_BYTES),
        };
        match docker.start_exec(&created.id, Some(options)).await {
            Ok(StartExecResults::Attached { output, input }) => {
                Ok((docker, created.id, output, input))
            }
            Ok(StartExecResults::Detached) => Err(DockerError::Engine {
                action,
                message: "the Engine started the command detached".into(),
            }),
            Err(e) => Err(Self::engine_err(&action, e)),
        }
    }

    fn unreachable(&self, err: &DockerError) -> DockerFacts {
        if mentions_out_of_fds(&err.to_string()) {
            return DockerFacts {
                reachable: false,
                error: format!("{err} (the agent has too many open files)"),
                out_of_fds: true,
                ..DockerFacts::default()
            };
        }
        DockerFacts {
            reachable: false,
            error: format!("{err} (is dockerd running? may the agent's user use the socket?)"),
            ..DockerFacts::default()
        }
    }
}

/// An error with its chain of causes (bollard's "client error (Connect)" alone hides an
/// EMFILE underneath).
fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Whether an error's text says the process ran out of descriptors (EMFILE, ENFILE).
fn mentions_out_of_fds(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("too many open files")
        || lower.contains("(os error 24)")
        || lower.contains("(os error 23)")
}

/// How much of a command's output an exec buffers between the Engine and its reader.
const EXEC_PIPE_BYTES: usize = 64 * 1024;

/// How much of the end of a command's stderr an exec keeps for error messages.
const EXEC_TAIL_BYTES: usize = 8 * 1024;

/// A command to run in a running container (`docker exec`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    /// Who runs it (`name`, `uid` or `user:group`); empty: the container's user.
    pub user: String,
    /// `KEY=value` entries added to the container's environment.
    pub env: Vec<String>,
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecExit {
    /// The command's exit code; the Engine reports a command killed by signal N as 128 + N.
    pub code: i64,
    /// The last few KiB of its stderr (`exec_read`) or of all its output (`exec_write`).
    pub tail: String,
}

/// The stdin of an exec started by `exec_write`.
pub type ExecStdin = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

type ExecOutput = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;

/// The end of an exec: resolves once its output has ended and the Engine knows its exit code.
#[derive(Debug)]
pub struct ExecDone {
    rx: oneshot::Receiver<Result<ExecExit, DockerError>>,
}

impl ExecDone {
    pub async fn wait(self) -> Result<ExecExit, DockerError> {
        self.rx.await.unwrap_or_else(|_| {
            Err(DockerError::Engine {
                action: "exec".into(),
                message: "the task following the command ended without a result".into(),
            })
        })
    }
}

/// The last `EXEC_TAIL_BYTES` bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > EXEC_TAIL_BYTES {
            let cut = self.0.len() - EXEC_TAIL_BYTES;
            self.0.drain(..cut);
        }
    }
}

/// The exit code of a finished exec. Its output ends when the command closes it, which is
/// usually but not always after the Engine has recorded the exit: ask again briefly.
async fn exec_exit(
    docker: &Docker,
    id: &str,
    action: &str,
    tail: Tail,
) -> Result<ExecExit, DockerError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let inspect = docker
            .inspect_exec(id)
            .await
            .map_err(|e| DockerClient::engine_err(action, e))?;
        if inspect.running != Some(true)
            && let Some(code) = inspect.exit_code
        {
            return Ok(ExecExit {
                code,
                tail: String::from_utf8_lossy(&tail.0).into_owned(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DockerError::Engine {
                action: action.to_string(),
                message: "the command closed its output but the Engine reports no exit code".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn container_info(inspect: ContainerInspectResponse) -> ContainerInfo {
    let state = inspect.state.unwrap_or_default();
    let host_port = inspect
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|ports| {
            ports
                .into_values()
                .flatten()
                .flatten()
                .find_map(|b| b.host_port.and_then(|p| p.parse().ok()))
        });
    ContainerInfo {
        id: inspect.id.unwrap_or_default(),
        name: inspect
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image_id: inspect.image.unwrap_or_default(),
        running: state.running.unwrap_or(false),
        exit_code: state.exit_code,
        host_port,
        labels: inspect
            .config
            .and_then(|c| c.labels)
            .unwrap_or_default()
            .into_iter()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_progress_adds_up_the_layers_the_engine_reports() {
        let mut p = PullProgress::default();
        assert_eq!(p.describe(), "asking the registry");
        // Lines that are not about a layer count for nothing.
        p.apply("v2", "Pulling from acme/api", None, None);
        assert_eq!(p.describe(), "asking the registry");
        let mib = 1024 * 1024;
        p.apply("aaa", "Pulling fs layer", None, None);
        p.apply("bbb", "Waiting", None, None);
        p.apply("ccc", "Already exists", None, None);
        p.apply("aaa", "Downloading", Some(mib), Some(4 * mib));
        p.apply("bbb", "Downloading", Some(mib / 2), Some(2 * mib));
        assert_eq!(p.describe(), "1/3 layers, 1.5 of 6.0 MiB downloaded");
        p.apply("aaa", "Download complete", None, None);
        p.apply("aaa", "Extracting", Some(mib), Some(4 * mib));
        assert_eq!(p.describe(), "1/3 layers, 4.5 of 6.0 MiB downloaded");
        p.apply("aaa", "Pull complete", None, None);
        p.apply("bbb", "Pull complete", None, None);
        p.apply("v2", "Digest: sha256:0123", None, None);
        assert_eq!(p.describe(), "3/3 layers, 6.0 of 6.0 MiB downloaded");
        // A negative or absurd number from the Engine is ignored, not wrapped.
        p.apply("ddd", "Downloading", Some(-5), Some(-1));
        assert_eq!(p.describe(), "3/4 layers, 6.0 of 6.0 MiB downloaded");
    }

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
    async fn a_configured_socket_allows_requests_longer_than_a_stop_grace_period() {
        // A short bound here would cut `stop()` off while the container is still in its grace
        // period; the configured socket must behave like the default one.
        let configured = connect("unix:///var/run/docker.sock")
            .unconnected()
            .unwrap();
        let default = connect("").unconnected().unwrap();
        assert_eq!(configured.timeout(), REQUEST_TIMEOUT);
        assert_eq!(default.timeout(), REQUEST_TIMEOUT);
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
