//! Two real `drover-agent` processes on one Docker Engine and one machine, enrolled to one
//! controller as two hosts, their proxies on 127.0.0.2 and 127.0.0.3 (`[proxy] listen_ip`):
//! one deploy job runs the same app spec (public address `0.0.0.0:PORT`) on both without a
//! clash of container names or ports, and each agent touches only its own containers: a
//! restarted agent's recovery and orphan sweep, and the pruning of its old releases, leave the
//! other agent's containers (and the image they run) alone.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use drover_e2e::deploys::{AppGuard, spec, test_repo};
use drover_e2e::hostagent::{HostAgent, deploy, version_at};
use drover_e2e::{
    TestController, docker_available, eventually, fast_controller_config, free_port, init,
};
use drover_proto::v1;

/// One container as `docker ps` shows it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    id: String,
    name: String,
    host: String,
    state: String,
}

/// The app's containers, with the host label, sorted by name.
fn containers(app: &str) -> Vec<Seen> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=drover.app={app}"),
            "--format",
            "{{.ID}} {{.Names}} {{.State}} {{.Label \"drover.host\"}}",
        ])
        .output()
        .expect("docker ps");
    let mut list: Vec<Seen> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            Some(Seen {
                id: parts.next()?.to_string(),
                name: parts.next()?.to_string(),
                state: parts.next()?.to_string(),
                host: parts.next().unwrap_or("").to_string(),
            })
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

fn exists(name: &str) -> bool {
    Command::new("docker")
        .args(["container", "inspect", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Creates (not starts) a container `name` from `image` with `labels`.
fn create_labelled(name: &str, image: &str, labels: &[(&str, &str)]) {
    let mut cmd = Command::new("docker");
    cmd.args(["create", "--name", name]);
    for (k, v) in labels {
        cmd.args(["--label", &format!("{k}={v}")]);
    }
    let out = cmd.arg(image).output().expect("docker create");
    assert!(
        out.status.success(),
        "docker create {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the named containers when dropped (the planted ones carry no app label).
struct Planted(Vec<String>);

impl Drop for Planted {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("docker").args(["rm", "-f", name]).output();
        }
    }
}

/// The releases the controller holds of `app` on `host`, as (version, state).
async fn releases(controller: &TestController, app: &str, host: &str) -> Vec<(String, String)> {
    controller
        .admin()
        .list_releases(v1::ListReleasesRequest {
            app: app.into(),
            host: host.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .releases
        .iter()
        .map(|r| (r.version.clone(), r.state.clone()))
        .collect()
}

// Multi-threaded: the in-process controller keeps serving while this thread waits on the
// real programs it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_engine_serve_one_app_and_touch_only_their_own_containers() {
    if !docker_available(
        "two_agents_on_one_engine_serve_one_app_and_touch_only_their_own_containers",
    ) {
        return;
    }
    init();
    let app = "shared";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0", "v2.0.0"]);
    let port = free_port();
    // One spec for both hosts: a wildcard address, which each agent binds on its own IP.
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let mut a = HostAgent::enroll(&controller, dir.path(), "shared-a", "127.0.0.2").await;
    let mut b = HostAgent::enroll(&controller, dir.path(), "shared-b", "127.0.0.3").await;
    a.start(&controller).await;
    b.start(&controller).await;
    controller
        .admin()
        .apply_app(v1::ApplyAppRequest {
            spec_toml: spec(app, &repo, listen, "keep_releases = 1\n"),
            source: "app.toml".into(),
        })
        .await
        .expect("apply the app");

    // One job on both hosts: the same job id, so the same suffix in both agents' names.
    deploy(&controller, app, "v1.0.0", &[&a, &b]).await;
    assert_eq!(version_at(a.public(port)).await.as_deref(), Some("v1.0.0"));
    assert_eq!(version_at(b.public(port)).await.as_deref(), Some("v1.0.0"));
    let both = containers(app);
    assert_eq!(both.len(), 2, "{both:?}");
    // A host's release containers (not the leftovers planted below).
    let of = |list: &[Seen], host: &str| -> Vec<Seen> {
        list.iter()
            .filter(|c| c.host == host && !c.name.contains("-e2e-"))
            .cloned()
            .collect()
    };
    let (a1, b1) = (of(&both, "shared-a"), of(&both, "shared-b"));
    assert_eq!(a1.len(), 1, "{both:?}");
    assert_eq!(b1.len(), 1, "{both:?}");
    assert!(
        a1[0].name.starts_with("drover-shared-a-shared-web-v1.0.0-"),
        "{a1:?}"
    );
    assert!(
        b1[0].name.starts_with("drover-shared-b-shared-web-v1.0.0-"),
        "{b1:?}"
    );
    assert!(both.iter().all(|c| c.state == "running"), "{both:?}");

    // Leftovers for the orphan sweep: one of each agent's, one from before the host label
    // (which the agent restarted next adopts, and so removes), and two scratch containers
    // with A's owner directory, one of them labelled as B's.
    let image = drover_e2e::testapp_image("v1.0.0");
    let orphan_a = "drover-shared-e2e-orphan-a";
    let orphan_b = "drover-shared-e2e-orphan-b";
    let legacy = "drover-shared-e2e-orphan-legacy";
    let scratch_a = "drover-shared-e2e-scratch-a";
    let scratch_b = "drover-shared-e2e-scratch-b";
    let _planted = Planted(
        [orphan_a, orphan_b, legacy, scratch_a, scratch_b]
            .map(String::from)
            .to_vec(),
    );
    for (name, host) in [(orphan_a, "shared-a"), (orphan_b, "shared-b")] {
        create_labelled(
            name,
            &image,
            &[
                ("drover.app", app),
                ("drover.release", "deploy-gone-0000"),
                ("drover.role", "web"),
                ("drover.host", host),
            ],
        );
    }
    create_labelled(
        legacy,
        &image,
        &[("drover.app", app), ("drover.release", "deploy-gone-0001")],
    );
    let owner = a.backups_dir();
    for (name, host) in [(scratch_a, "shared-a"), (scratch_b, "shared-b")] {
        create_labelled(
            name,
            &image,
            &[
                ("drover.scratch", "1"),
                ("drover.scratch.owner", &owner),
                ("drover.host", host),
            ],
        );
    }

    // A restarts: its recovery converges, sweeps and restores only what is A's.
    a.kill9();
    a.start(&controller).await;
    eventually(
        "A's recovery removes its orphans",
        Duration::from_secs(30),
        || async { (!exists(orphan_a) && !exists(legacy) && !exists(scratch_a)).then_some(()) },
    )
    .await;
    assert!(exists(orphan_b), "B's orphan is B's to remove");
    assert!(exists(scratch_b), "B's scratch container is B's to remove");
    eventually("A serves again", Duration::from_secs(30), || async {
        (version_at(a.public(port)).await.as_deref() == Some("v1.0.0")).then_some(())
    })
    .await;
    let after = containers(app);
    assert_eq!(of(&after, "shared-b"), b1, "B's container is untouched");
    assert_eq!(of(&after, "shared-a")[0].id, a1[0].id, "A kept its own");
    assert_eq!(version_at(b.public(port)).await.as_deref(), Some("v1.0.0"));

    // A deploys twice more: with keep_releases = 1 it prunes its v1.0.0 (containers and
    // image tag), which B still runs.
    deploy(&controller, app, "v1.1.0", &[&a]).await;
    deploy(&controller, app, "v2.0.0", &[&a]).await;
    let states = releases(&controller, app, "shared-a").await;
    assert!(
        states.contains(&("v1.0.0".into(), "removed".into())),
        "A pruned v1.0.0: {states:?}"
    );
    assert_eq!(version_at(a.public(port)).await.as_deref(), Some("v2.0.0"));
    let after = containers(app);
    assert_eq!(of(&after, "shared-b"), b1, "B's container is untouched");
    assert!(
        !of(&after, "shared-a")
            .iter()
            .any(|c| c.name.contains("v1.0.0")),
        "{after:?}"
    );
    assert_eq!(version_at(b.public(port)).await.as_deref(), Some("v1.0.0"));
    let tag = format!("{repo}:v1.0.0");
    let inspect = Command::new("docker")
        .args(["image", "inspect", &tag])
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "A's prune kept {tag}, which B's live release runs"
    );
    let b_states = releases(&controller, app, "shared-b").await;
    assert_eq!(b_states, [("v1.0.0".to_string(), "live".to_string())]);

    // A restarts again: B's live container now belongs to a release A's own table holds as
    // removed, so only its host label keeps A's orphan sweep off it.
    a.kill9();
    a.start(&controller).await;
    eventually("A serves again", Duration::from_secs(30), || async {
        (version_at(a.public(port)).await.as_deref() == Some("v2.0.0")).then_some(())
    })
    .await;
    // The sweep runs before the proxies are pointed at the live release for the last time;
    // a deploy takes the app's lock, so it waits for recovery to end.
    deploy(&controller, app, "v2.0.0", &[&a]).await;
    let after = containers(app);
    assert_eq!(of(&after, "shared-b"), b1, "B's container is untouched");
    assert_eq!(version_at(b.public(port)).await.as_deref(), Some("v1.0.0"));

    // B restarts too: it still serves its release, and sweeps its own orphan.
    b.kill9();
    b.start(&controller).await;
    eventually(
        "B's recovery removes its orphan",
        Duration::from_secs(30),
        || async { (!exists(orphan_b)).then_some(()) },
    )
    .await;
    eventually("B serves again", Duration::from_secs(30), || async {
        (version_at(b.public(port)).await.as_deref() == Some("v1.0.0")).then_some(())
    })
    .await;
    let after = containers(app);
    assert_eq!(of(&after, "shared-b")[0].id, b1[0].id);
    assert_eq!(
        of(&after, "shared-a")
            .iter()
            .filter(|c| c.state == "running")
            .count(),
        1,
        "A's live release still runs: {after:?}"
    );
    assert_eq!(version_at(a.public(port)).await.as_deref(), Some("v2.0.0"));

    a.kill9();
    b.kill9();
    controller.stop().await;
}
