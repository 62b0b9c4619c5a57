//! What the two release job kinds (deploy, rollback) share, on the real Docker Engine: container
//! names and labels, a container's spec and env, the health check, smoke requests and the
//! workers' settle, the atomic switch of traffic (committed with the release table), the drain
//! of the old upstream, stopping the old release, the post-deploy watch window (the pure
//! `watch_breach`), the pruning of releases beyond `keep_releases`, and an image made present
//! (pulled with the host's registry credentials when absent; the pull kind uses it too). The kinds themselves are
//! `crate::job::deploy` and `crate::job::rollback`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::apps::Reserved;
use crate::docker::{ContainerInfo, ContainerSpec, DockerError, PullProgress};
use crate::httpcheck::{self, CheckError};
use crate::job::step::{Failure, JobCtx, Report, begin, fail, pause_point, unless_cancelled};
use crate::proxy::{Proxy, StatsSnapshot, Upstream};
use crate::store::JobRecord;
use crate::{secrets, unix_ms};
use drover_model::appspec::{AppSpec, HealthCheck, SmokeProbe, Watch};
use drover_model::jobevent::{JobResult, Release, ReleaseState, field};
use drover_model::releases;

/// Container labels: which app, release and role a container belongs to.
pub const LABEL_APP: &str = "drover.app";
pub const LABEL_RELEASE: &str = "drover.release";
pub const LABEL_ROLE: &str = "drover.role";
pub const LABEL_VERSION: &str = "drover.version";
/// Which agent (its enrolled host name) made a container: several agents may share one Docker
/// Engine, and each touches only its own containers ([`owns`]).
pub const LABEL_HOST: &str = "drover.host";

/// Container names are at most this long (readable in `docker ps`; the Engine sets no limit,
/// but a name is not a place for a 300-character version string).
pub const MAX_NAME: usize = 128;

/// The web role's name in a release's containers.
pub const WEB: &str = "web";

/// Lines of a container's log attached to a failure.
pub(crate) const LOG_LINES: usize = 30;
/// The watch window judges ratios and latency only over at least this many requests.
pub const WATCH_MIN_REQUESTS: u64 = 20;
/// How often the watch window looks at the counters (a breach switches back within this).
pub(crate) const WATCH_TICK: Duration = Duration::from_millis(100);
/// Workers must still run this long after start to count as started.
pub(crate) const WORKER_SETTLE: Duration = Duration::from_secs(1);

/// Docker names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The container name of `role` in a release made by the agent of `host`:
/// `drover-<host>-<app>-<role>-<version>-<suffix>`, the suffix being the random end of the
/// release's job id. Readable in `docker ps` and unique on an Engine several agents share: the
/// agents of one job differ only in `host`, which comes first, and the jobs of one agent differ
/// in their suffix. A name longer than [`MAX_NAME`] keeps its first part and ends with a hash
/// of the whole, so it stays as unique.
pub fn container_name(
    host: &str,
    app: &str,
    role: &str,
    version: &str,
    release_id: &str,
) -> String {
    let suffix = release_id
        .rsplit('-')
        .next()
        .filter(|s| s.len() >= 4)
        .unwrap_or(release_id);
    let full = sanitize(&format!("drover-{host}-{app}-{role}-{version}-{suffix}"));
    if full.len() <= MAX_NAME {
        return full;
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(full.as_bytes()));
    // `full` is ASCII (sanitized), so any byte index is a char boundary.
    format!("{}-{}", &full[..MAX_NAME - 13], &digest[..12])
}

/// Whether the agent of `host` owns a container with these labels: one that names this host in
/// [`LABEL_HOST`], or one with no [`LABEL_HOST`] at all, made by an agent from before the label
/// existed, which the one agent of a host keeps adopting after its upgrade. Pure.
///
/// On an Engine shared by several agents, such an unlabelled container may be another agent's:
/// every agent there must have created its containers with the label (see ARCHITECTURE.md).
pub fn owns(labels: &BTreeMap<String, String>, host: &str) -> bool {
    labels.get(LABEL_HOST).is_none_or(|h| h == host)
}

/// Whether the post-deploy watch window has been breached by the new release's traffic: the
/// reason, or None. Pure: judged only over at least [`WATCH_MIN_REQUESTS`] requests.
pub fn watch_breach(stats: &StatsSnapshot, watch: &Watch) -> Option<String> {
    if stats.requests < WATCH_MIN_REQUESTS {
        return None;
    }
    let ratio = stats.ratio_5xx();
    if ratio > watch.max_5xx_ratio {
        return Some(format!(
            "{:.1}% of {} requests answered 5xx (limit {:.1}%)",
            ratio * 100.0,
            stats.requests,
            watch.max_5xx_ratio * 100.0
        ));
    }
    let limit = watch.max_p95_latency.as_millis() as u64;
    if stats.p95_ms > limit {
        return Some(format!(
            "p95 latency {} ms over {} requests (limit {limit} ms)",
            stats.p95_ms, stats.requests
        ));
    }
    None
}

/// The env of the app's containers: the spec's env plus the host's secrets.
pub(crate) fn app_env(
    ctx: &JobCtx,
    spec: &AppSpec,
) -> Result<BTreeMap<String, String>, secrets::SecretsError> {
    let mut env = spec.env.clone();
    env.extend(secrets::load(&ctx.secrets_dir, spec)?);
    Ok(env)
}

/// The container spec of `role` in `release` on `host`; `image` may be `repo:tag` or an image
/// ID.
pub fn container_spec(
    host: &str,
    spec: &AppSpec,
    release: &Release,
    role: &str,
    image: &str,
    env: &BTreeMap<String, String>,
) -> ContainerSpec {
    let command = spec
        .workers
        .iter()
        .find(|w| w.name == role)
        .map(|w| w.command.clone())
        .unwrap_or_default();
    ContainerSpec {
        name: release.containers.get(role).cloned().unwrap_or_default(),
        image: image.to_string(),
        command,
        env: env.clone(),
        labels: BTreeMap::from([
            (LABEL_APP.to_string(), spec.name.clone()),
            (LABEL_RELEASE.to_string(), release.id.clone()),
            (LABEL_ROLE.to_string(), role.to_string()),
            (LABEL_VERSION.to_string(), release.version.clone()),
            (LABEL_HOST.to_string(), host.to_string()),
        ]),
        publish: (role == WEB)
            .then(|| spec.web.as_ref().map(|w| w.port))
            .flatten(),
        binds: spec.volumes.clone(),
        networks: spec.networks.clone(),
    }
}

/// How often a running image pull reports its progress.
const PULL_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The id of `image` on this host, pulled first when it is absent, with the credentials of
/// its registry from the host's file (`crate::registry`). A failure names the `step`.
pub(crate) async fn ensure_image(
    ctx: &JobCtx,
    report: &Report<'_>,
    step: &'static str,
    image: &str,
) -> Result<String, Failure> {
    let present = |e: DockerError| fail(step, e.to_string());
    if let Some(id) = ctx.docker.image_id(image).await.map_err(present)? {
        return Ok(id);
    }
    let credentials = crate::registry::for_image(&ctx.registry_auth, image).map_err(|e| {
        fail(
            step,
            format!("image {image} is not on this host and cannot be pulled: {e}"),
        )
    })?;
    let with = if credentials.is_some() {
        " with the host's registry credentials"
    } else {
        ""
    };
    report
        .progress(
            step,
            format!("{image} is not on this host; pulling it{with}"),
        )
        .await;
    // The pull's progress, one line a second at most while it runs, and its last state.
    let (progress, mut seen) = tokio::sync::watch::channel(PullProgress::default());
    let pull = ctx.docker.pull(image, credentials, &progress);
    tokio::pin!(pull);
    let mut tick = tokio::time::interval(PULL_PROGRESS_EVERY);
    let pulled = loop {
        tokio::select! {
            pulled = &mut pull => break pulled,
            _ = tick.tick() => {
                if seen.has_changed().unwrap_or(false) {
                    let line = seen.borrow_and_update().describe();
                    report.progress(step, format!("pulling {image}: {line}")).await;
                }
            }
        }
    };
    pulled.map_err(|e| {
        fail(
            step,
            format!("image {image} is not present on this host and pulling it failed: {e}"),
        )
    })?;
    let line = seen.borrow().describe();
    report
        .progress(step, format!("pulled {image}: {line}"))
        .await;
    ctx.docker
        .image_id(image)
        .await
        .map_err(present)?
        .ok_or_else(|| {
            fail(
                step,
                format!("image {image} is still missing after the pull"),
            )
        })
}

/// The last lines of a container's output, for a failure report; empty if unreadable.
pub(crate) async fn logs_of(ctx: &JobCtx, name: &str) -> String {
    ctx.docker
        .logs_tail(name, LOG_LINES)
        .await
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// Where the proxy reaches a web container: its published port on 127.0.0.1.
pub(crate) fn web_addr(info: &ContainerInfo) -> Option<SocketAddr> {
    info.host_port
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
}

/// Waits for the web container to answer its health check: during `start_period` failures do
/// not count; then `retries` tries `interval` apart. A try that finds nothing listening yet is
/// repeated quickly within the interval, so a fast app passes as soon as it listens. A container
/// that exits fails at once, with its logs.
pub(crate) async fn wait_healthy(
    ctx: &JobCtx,
    report: &Report<'_>,
    step: &'static str,
    name: &str,
    addr: SocketAddr,
    h: &HealthCheck,
) -> Result<(), Failure> {
    let exited = |info: Option<ContainerInfo>| -> Option<String> {
        match info {
            None => Some(format!("container {name} is gone")),
            Some(i) if !i.running => Some(format!(
                "container {name} exited with code {}",
                i.exit_code.unwrap_or(-1)
            )),
            Some(_) => None,
        }
    };
    let started = Instant::now();
    let mut next_inspect = started;
    while started.elapsed() < h.start_period {
        if let Ok(answer) = httpcheck::get(addr, &h.path, h.timeout).await
            && httpcheck::healthy(&answer)
        {
            return Ok(());
        }
        // Failures do not count yet, but a container that exited will not start.
        if Instant::now() >= next_inspect {
            next_inspect = Instant::now() + Duration::from_secs(1);
            if let Some(why) = exited(ctx.docker.inspect(name).await.ok().flatten()) {
                return Err(fail(step, why).with_logs(logs_of(ctx, name).await));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut last = String::new();
    for attempt in 1..=h.retries {
        let tried = Instant::now();
        let verdict = loop {
            match httpcheck::get(addr, &h.path, h.timeout).await {
                Ok(answer) if httpcheck::healthy(&answer) => return Ok(()),
                Ok(answer) => {
                    break format!(
                        "{} answered {}: {}",
                        h.path,
                        answer.status,
                        answer.body.lines().next().unwrap_or("").trim()
                    );
                }
                Err(CheckError::NotListening(_)) if tried.elapsed() < h.interval => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => break format!("{}: {e}", h.path),
            }
        };
        last = verdict;
        let info = ctx.docker.inspect(name).await.ok().flatten();
        if let Some(why) = exited(info) {
            return Err(fail(step, why).with_logs(logs_of(ctx, name).await));
        }
        report
            .progress(
                step,
                format!("health check {attempt}/{} failed: {last}", h.retries),
            )
            .await;
        if attempt < h.retries {
            tokio::time::sleep(h.interval.saturating_sub(tried.elapsed())).await;
        }
    }
    Err(fail(
        step,
        format!("the health check failed {} times; last: {last}", h.retries),
    )
    .with_logs(logs_of(ctx, name).await))
}

/// The health step: the web container passes its health check, then every worker still runs a
/// moment after starting. Returns when the web container first answered healthy (Unix ms).
pub(crate) async fn health_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    spec: &AppSpec,
    release: &Release,
    addr: Option<SocketAddr>,
) -> Result<i64, Failure> {
    let since = begin(
        ctx,
        job,
        report,
        "health",
        format!("checking {}", spec.health.path),
    )
    .await?;
    if let (Some(addr), Some(name)) = (addr, release.containers.get(WEB)) {
        let checks = wait_healthy(ctx, report, "health", name, addr, &spec.health);
        unless_cancelled(ctx, job, "health", checks).await?;
    }
    let healthy_at = unix_ms();
    workers_settled(ctx, "health", release).await?;
    let at = BTreeMap::from([(field::HEALTHY_AT_MS.to_string(), healthy_at.to_string())]);
    report.step_done("health", since, "healthy", at).await;
    Ok(healthy_at)
}

/// Checks that every worker container still runs a moment after starting.
pub(crate) async fn workers_settled(
    ctx: &JobCtx,
    step: &'static str,
    release: &Release,
) -> Result<(), Failure> {
    let workers: Vec<&String> = release
        .containers
        .iter()
        .filter(|(role, _)| role.as_str() != WEB)
        .map(|(_, name)| name)
        .collect();
    if workers.is_empty() {
        return Ok(());
    }
    tokio::time::sleep(WORKER_SETTLE).await;
    for name in workers {
        match ctx.docker.inspect(name).await {
            Ok(Some(info)) if info.running => {}
            Ok(info) => {
                return Err(fail(
                    step,
                    format!(
                        "worker container {name} exited with code {}",
                        info.and_then(|i| i.exit_code).unwrap_or(-1)
                    ),
                )
                .with_logs(logs_of(ctx, name).await));
            }
            Err(e) => return Err(fail(step, e.to_string())),
        }
    }
    Ok(())
}

/// Runs the smoke checks against the new web container before it gets traffic.
pub(crate) async fn smoke(
    report: &Report<'_>,
    spec: &AppSpec,
    addr: SocketAddr,
) -> Result<(), Failure> {
    let timeout = spec.health.timeout;
    for check in &spec.smoke {
        let path = &check.path;
        match check.probe() {
            SmokeProbe::Http {
                status,
                body_contains,
            } => {
                let answer = httpcheck::get(addr, path, timeout)
                    .await
                    .map_err(|e| fail("smoke", format!("smoke check {path}: {e}")))?;
                httpcheck::smoke_verdict(&answer, status, body_contains)
                    .map_err(|e| fail("smoke", format!("smoke check {path} {e}")))?;
                report
                    .progress("smoke", format!("{path} answered {}", answer.status))
                    .await;
            }
            SmokeProbe::WebSocket { send, expect } => {
                let what = format!("smoke check {path} (WebSocket, sent {send:?})");
                let answer = httpcheck::websocket(addr, path, send, timeout)
                    .await
                    .map_err(|e| fail("smoke", format!("{what}: {e}")))?;
                httpcheck::websocket_verdict(&answer, expect)
                    .map_err(|e| fail("smoke", format!("{what}: {e}")))?;
                report
                    .progress(
                        "smoke",
                        format!("{path} (WebSocket) answered {:?}", clip(&answer, 80)),
                    )
                    .await;
            }
        }
    }
    Ok(())
}

/// At most `n` characters of `s`.
pub(crate) fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Removes a release's containers (whatever state they are in); returns those that existed.
pub(crate) async fn remove_containers(ctx: &JobCtx, release: &Release) -> Vec<String> {
    let mut removed = Vec::new();
    for name in release.containers.values() {
        match ctx.docker.remove(name).await {
            Ok(true) => removed.push(name.clone()),
            Ok(false) => {}
            Err(e) => warn!(container = %name, error = %e, "cannot remove container"),
        }
    }
    removed
}

/// Stops every running container of `release` (with its own spec's `stop_timeout`). Whether
/// any was running.
pub(crate) async fn stop_running(ctx: &JobCtx, release: &Release) -> bool {
    let timeout = AppSpec::from_toml(&release.spec_toml, "release")
        .map(|s| s.stop_timeout)
        .unwrap_or(Duration::from_secs(10));
    let mut ran = false;
    for name in release.containers.values() {
        if let Ok(Some(info)) = ctx.docker.inspect(name).await
            && info.running
        {
            ran = true;
            if let Err(e) = ctx.docker.stop(name, timeout).await {
                warn!(container = %name, error = %e, "cannot stop container");
            }
        }
    }
    ran
}

/// Stops what still runs of every kept release in `table` but `except` (a release id). The
/// versions that were running.
pub(crate) async fn stop_kept(
    ctx: &JobCtx,
    table: &[Release],
    except: Option<&str>,
) -> Vec<String> {
    let mut stopped = Vec::new();
    for kept in table.iter().filter(|r| r.state == ReleaseState::Kept) {
        if Some(kept.id.as_str()) != except && stop_running(ctx, kept).await {
            stopped.push(kept.version.clone());
        }
    }
    stopped
}

/// Stops the given roles' containers of a release (kept for rollback).
pub(crate) async fn stop_roles(ctx: &JobCtx, release: &Release, web: bool, timeout: Duration) {
    for (role, name) in &release.containers {
        if (role == WEB) != web {
            continue;
        }
        match ctx.docker.stop(name, timeout).await {
            Ok(()) | Err(DockerError::NoSuchContainer(_)) => {}
            Err(e) => warn!(container = %name, error = %e, "cannot stop container"),
        }
    }
}

/// Sets the release table entry `id` to `state` (and `result` when given).
pub(crate) fn set_state(
    table: &mut [Release],
    id: &str,
    state: ReleaseState,
    result: Option<JobResult>,
) {
    if let Some(r) = table.iter_mut().find(|r| r.id == id) {
        r.state = state;
        if result.is_some() {
            r.result = result;
        }
        if r.finished_unix_ms == 0 && result.is_some() {
            r.finished_unix_ms = unix_ms();
        }
    }
}

pub(crate) fn find<'a>(table: &'a [Release], id: &str) -> Option<&'a Release> {
    table.iter().find(|r| r.id == id)
}

/// What moving traffic leaves behind: the app's proxy (to switch back), and the new and old
/// upstreams. All `None` for a worker-only app.
pub(crate) struct Switched {
    pub(crate) proxy: Option<Proxy>,
    pub(crate) new: Option<Arc<Upstream>>,
    pub(crate) old: Option<Arc<Upstream>>,
}

/// The switch step: commits `release` live (and `previous` kept) together with the job in one
/// transaction, makes the new containers restart with the host, swaps the app's proxy to the
/// new web container in one atomic step, and stops the previous release's workers.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn switch_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    table: &mut [Release],
    release: &Release,
    previous: Option<&Release>,
    (addr, reserved): (Option<SocketAddr>, Option<Reserved>),
    spec: &AppSpec,
) -> Result<Switched, Failure> {
    let since = begin(ctx, job, report, "switch", "moving traffic".into()).await?;
    set_state(table, &release.id, ReleaseState::Live, None);
    if let Some(p) = previous {
        set_state(table, &p.id, ReleaseState::Kept, None);
    }
    job.switched = true;
    ctx.store
        .commit(job, table)
        .await
        .map_err(|e| fail("switch", e.to_string()))?;
    pause_point("switch:committed").await;
    for name in release.containers.values() {
        if let Err(e) = ctx.docker.set_restart(name, true).await {
            warn!(container = %name, error = %e, "cannot set the restart policy");
        }
    }
    let mut switched = Switched {
        proxy: None,
        new: addr.map(|a| Upstream::new(a, &release.version)),
        old: None,
    };
    if let (Some(up), Some(reserved)) = (&switched.new, reserved) {
        let proxy = match reserved {
            serving @ Reserved::Serving(_) => {
                let proxy = ctx.apps.install(&job.app, serving, &ctx.shutdown);
                switched.old = proxy.switch(up.clone());
                proxy
            }
            // A first deploy or a new address: the new proxy serves the new release from its
            // first connection (never "no release is live").
            bound => ctx
                .apps
                .install_serving(&job.app, bound, Some(up.clone()), &ctx.shutdown),
        };
        switched.proxy = Some(proxy);
    }
    if let Some(p) = previous {
        stop_roles(ctx, p, false, spec.stop_timeout).await;
    }
    let serves = spec
        .web
        .as_ref()
        .map(|w| ctx.apps.public_addr(w.listen).to_string())
        .unwrap_or_else(|| "(workers)".into());
    report
        .step_done(
            "switch",
            since,
            format!("{} serves {serves}", release.version),
            BTreeMap::new(),
        )
        .await;
    Ok(switched)
}

/// What the drain waits for, as its start line: the requests in flight and the upgraded
/// connections (WebSockets) open on the old release, named.
pub(crate) fn drain_message(old: &Upstream) -> String {
    let open = old.upgraded();
    let mut message = format!(
        "letting {} finish its requests ({} in flight",
        old.release,
        old.inflight()
    );
    if !open.is_empty() {
        message.push_str(&format!(
            "; {} upgraded connection(s) open: {}",
            open.len(),
            crate::proxy::name_some(&open)
        ));
    }
    message.push(')');
    message
}

/// The drain step: in-flight requests and upgraded connections on the old upstream finish (up
/// to `timeout`; WebSockets still open then get a close frame, 1001).
pub(crate) async fn drain_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    old: Option<&Upstream>,
    timeout: Duration,
) -> Result<(), Failure> {
    let Some(old) = old else {
        report.step_skipped("drain", "nothing served before").await;
        return Ok(());
    };
    let since = begin(ctx, job, report, "drain", drain_message(old)).await?;
    let message = old.drain(timeout).await.describe(timeout);
    report
        .step_done("drain", since, message, BTreeMap::new())
        .await;
    Ok(())
}

/// The stop_old step: the previous release's web container stops (kept for rollback).
pub(crate) async fn stop_old_step(
    ctx: &JobCtx,
    job: &mut JobRecord,
    report: &Report<'_>,
    previous: Option<&Release>,
    timeout: Duration,
    keep_previous: bool,
) -> Result<(), Failure> {
    // A kept release still running that is not `previous` (a fleet release kept it for its
    // revert and its retire never came) stops here.
    if let Ok(table) = ctx.store.releases(&job.app) {
        let stopped = stop_kept(ctx, &table, previous.map(|p| p.id.as_str())).await;
        if !stopped.is_empty() {
            info!(app = %job.app, versions = %stopped.join(", "), "stopped kept releases still running");
        }
    }
    let Some(p) = previous else {
        report
            .step_skipped("stop_old", "nothing served before")
            .await;
        return Ok(());
    };
    if keep_previous {
        let why = format!(
            "{} keeps running, not routed, so the fleet release's revert is a switch; the release stops it when it ends",
            p.version
        );
        report.step_skipped("stop_old", why).await;
        return Ok(());
    }
    let message = format!("stopping {} (kept for rollback)", p.version);
    let since = begin(ctx, job, report, "stop_old", message).await?;
    stop_roles(ctx, p, true, timeout).await;
    report
        .step_done(
            "stop_old",
            since,
            format!("{} stopped", p.version),
            BTreeMap::new(),
        )
        .await;
    Ok(())
}

pub(crate) fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// Watches the new release for the window: its traffic (5xx ratio, p95 latency) and its
/// containers. Returns the breach, if any.
pub(crate) async fn watch(
    ctx: &JobCtx,
    spec: &AppSpec,
    release: &Release,
    upstream: Option<&Upstream>,
) -> Option<String> {
    let deadline = Instant::now() + spec.watch.window;
    let mut next_container_check = Instant::now();
    while Instant::now() < deadline {
        if let Some(up) = upstream
            && let Some(breach) = watch_breach(&up.stats.snapshot(), &spec.watch)
        {
            return Some(breach);
        }
        if Instant::now() >= next_container_check {
            next_container_check = Instant::now() + Duration::from_secs(1);
            for name in release.containers.values() {
                if let Ok(Some(info)) = ctx.docker.inspect(name).await
                    && !info.running
                {
                    return Some(format!(
                        "container {name} exited with code {}",
                        info.exit_code.unwrap_or(-1)
                    ));
                }
            }
        }
        tokio::time::sleep(WATCH_TICK.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
    None
}

/// Removes the containers of releases beyond the kept ones (never the live one or the rollback
/// target), and untags their image when nothing uses it any more ([`image_in_use`]). Returns
/// what went.
pub(crate) async fn prune(ctx: &JobCtx, table: &mut [Release], keep: usize) -> Vec<String> {
    let mut pruned = Vec::new();
    for id in releases::to_prune(table, keep) {
        let Some(r) = find(table, &id).cloned() else {
            continue;
        };
        remove_containers(ctx, &r).await;
        set_state(table, &id, ReleaseState::Removed, None);
        // Another agent on this Engine may run the same image: its containers are looked at
        // too (an Engine that cannot list them keeps the image).
        let in_use = match ctx.docker.list_labelled(LABEL_APP, &r.app).await {
            Ok(containers) => image_in_use(table, &r, &containers),
            Err(e) => {
                warn!(image = %r.image, error = %e, "cannot list containers; the old image stays");
                true
            }
        };
        if !in_use {
            match ctx.docker.remove_image(&r.image).await {
                Ok(_) => {}
                Err(e) => warn!(image = %r.image, error = %e, "cannot remove an old image"),
            }
        }
        pruned.push(r.version.clone());
    }
    pruned
}

/// Whether the image of the pruned release `pruned` is still in use, so its tag must stay: by
/// a live, kept or deploying release of `table` with the same tag, or by any container still on
/// the Engine from the same image ID (`containers`, listed after the pruned release's own went:
/// they may be another agent's, whose next start or rollback needs the image). Pure.
pub fn image_in_use(table: &[Release], pruned: &Release, containers: &[ContainerInfo]) -> bool {
    let by_release = table.iter().any(|o| {
        o.image == pruned.image
            && matches!(
                o.state,
                ReleaseState::Live | ReleaseState::Kept | ReleaseState::Deploying
            )
    });
    let by_container = !pruned.image_id.is_empty()
        && containers.iter().any(|c| {
            c.image_id == pruned.image_id && !pruned.containers.values().any(|n| *n == c.name)
        });
    by_release || by_container
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_docker_name(name: &str) -> bool {
        name.len() <= MAX_NAME
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    }

    #[test]
    fn container_names_are_readable_unique_and_valid() {
        assert_eq!(
            container_name(
                "web-1",
                "api",
                "web",
                "v1.2.3",
                "deploy-20261123-142233-3f2a"
            ),
            "drover-web-1-api-web-v1.2.3-3f2a"
        );
        assert_eq!(
            container_name("h", "api", "bot", "v1.0.0+b7", "x"),
            "drover-h-api-bot-v1.0.0-b7-x"
        );
        // A fleet release's job ids end in `-d0`: too short, so the whole id is the suffix.
        assert_eq!(
            container_name("h", "api", "web", "v1", "release-20261123-142233-3f2a-d0"),
            "drover-h-api-web-v1-release-20261123-142233-3f2a-d0"
        );
    }

    #[test]
    fn two_hosts_never_share_a_container_name() {
        let job = "deploy-20261123-142233-3f2a";
        let hosts = ["a", "b", "web-1", "web-1.dc2", "web", "w"];
        for role in ["web", "worker", "migrate"] {
            let names: std::collections::BTreeSet<String> = hosts
                .iter()
                .map(|h| container_name(h, "api", role, "v1.0.0", job))
                .collect();
            assert_eq!(names.len(), hosts.len(), "{names:?}");
        }
        // Even when every part is at its longest, so the names are cut and hashed.
        let long_version = "v".repeat(128);
        let a = container_name(&"a".repeat(63), &"x".repeat(63), "web", &long_version, job);
        let b = container_name(
            &format!("{}b", "a".repeat(62)),
            &"x".repeat(63),
            "web",
            &long_version,
            job,
        );
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(valid_docker_name(name), "{name}");
            assert_eq!(name.len(), MAX_NAME, "{name}");
        }
        // Cut names differ in what was cut off, too.
        assert_ne!(
            container_name("h", "api", "web", &format!("{long_version}1"), job),
            container_name("h", "api", "web", &format!("{long_version}2"), job)
        );
        assert!(valid_docker_name(&container_name(
            "h", "api", "web", "v1+b7 ~x", job
        )));
    }

    #[test]
    fn an_agent_owns_its_own_and_unlabelled_containers_only() {
        let labels = |host: Option<&str>| {
            let mut l = BTreeMap::from([(LABEL_APP.to_string(), "api".to_string())]);
            if let Some(h) = host {
                l.insert(LABEL_HOST.to_string(), h.to_string());
            }
            l
        };
        assert!(owns(&labels(Some("web-1")), "web-1"));
        assert!(!owns(&labels(Some("web-2")), "web-1"));
        assert!(!owns(&labels(Some("")), "web-1"));
        assert!(!owns(&labels(Some("web-1")), "web-10"));
        // Made before the label existed: the host's one agent adopts it.
        assert!(owns(&labels(None), "web-1"));
    }

    fn release(id: &str, image: &str, image_id: &str, state: ReleaseState) -> Release {
        Release {
            id: id.into(),
            app: "api".into(),
            version: id.into(),
            image: image.into(),
            image_id: image_id.into(),
            job_id: id.into(),
            requested_by: "alice".into(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            result: None,
            state,
            spec_toml: String::new(),
            containers: BTreeMap::from([(WEB.to_string(), format!("drover-h-api-web-{id}"))]),
        }
    }

    #[test]
    fn an_image_stays_while_a_release_or_another_agents_container_uses_it() {
        let old = release("v1", "acme/api:v1", "sha256:1", ReleaseState::Removed);
        let live = release("v2", "acme/api:v2", "sha256:2", ReleaseState::Live);
        let container = |name: &str, image_id: &str| ContainerInfo {
            name: name.into(),
            image_id: image_id.into(),
            ..ContainerInfo::default()
        };
        let table = vec![old.clone(), live.clone()];
        assert!(!image_in_use(&table, &old, &[]));
        assert!(!image_in_use(
            &table,
            &old,
            &[container("drover-h-api-web-v2", "sha256:2")]
        ));
        // Another agent on the same Engine still runs v1.
        assert!(image_in_use(
            &table,
            &old,
            &[container("drover-g-api-web-v1", "sha256:1")]
        ));
        // The pruned release's own container (its removal failed) does not keep the image.
        assert!(!image_in_use(
            &table,
            &old,
            &[container("drover-h-api-web-v1", "sha256:1")]
        ));
        // A kept release of the same tag does.
        let kept = release("v1b", "acme/api:v1", "sha256:1", ReleaseState::Kept);
        assert!(image_in_use(&[old.clone(), kept], &old, &[]));
        // Without a recorded image ID only the table decides.
        let no_id = release("v0", "acme/api:v0", "", ReleaseState::Removed);
        assert!(!image_in_use(
            std::slice::from_ref(&no_id),
            &no_id,
            &[container("x", "")]
        ));
    }

    #[test]
    fn container_specs_carry_the_host() {
        let spec = AppSpec::from_toml(
            "name = \"api\"\nimage = \"acme/api\"\n[web]\nport = 8000\nlisten = \"127.0.0.1:8080\"\n",
            "api.toml",
        )
        .unwrap();
        let release = Release {
            id: "deploy-1-abcd".into(),
            app: "api".into(),
            version: "v1".into(),
            image: "acme/api:v1".into(),
            image_id: String::new(),
            job_id: "deploy-1-abcd".into(),
            requested_by: "alice".into(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            result: None,
            state: ReleaseState::Deploying,
            spec_toml: String::new(),
            containers: BTreeMap::from([(WEB.to_string(), "drover-h-api-web-v1-abcd".into())]),
        };
        let c = container_spec("h", &spec, &release, WEB, "acme/api:v1", &BTreeMap::new());
        assert_eq!(c.labels.get(LABEL_HOST).map(String::as_str), Some("h"));
        assert!(owns(&c.labels, "h") && !owns(&c.labels, "other"));
        assert_eq!(c.name, "drover-h-api-web-v1-abcd");
    }

    #[test]
    fn the_watch_window_judges_only_enough_traffic() {
        let watch = Watch {
            window: Duration::from_secs(60),
            max_5xx_ratio: 0.05,
            max_p95_latency: Duration::from_millis(500),
        };
        let snap = |requests, status_5xx, p95_ms| StatsSnapshot {
            requests,
            status_5xx,
            p95_ms,
        };
        assert_eq!(
            watch_breach(&snap(10, 10, 9000), &watch),
            None,
            "too few requests to judge"
        );
        assert_eq!(
            watch_breach(&snap(100, 5, 500), &watch),
            None,
            "at the limits"
        );
        let b = watch_breach(&snap(100, 6, 10), &watch).unwrap();
        assert!(
            b.contains("6.0% of 100 requests answered 5xx (limit 5.0%)"),
            "{b}"
        );
        let b = watch_breach(&snap(100, 0, 750), &watch).unwrap();
        assert!(b.contains("p95 latency 750 ms"), "{b}");
    }
}
