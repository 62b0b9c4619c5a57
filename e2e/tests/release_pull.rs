//! A fleet release's image pull on real agents and the real Docker Engine: two real
//! `drover-agent` processes get the release's pull before its first wave, and the Engine
//! pulls from a registry on loopback (a small HTTP server here that asks for Basic
//! credentials, records what it was sent, and knows no image). Proves that the credentials
//! in the host's 0600 file in Docker's `config.json` format reach the registry, that a file
//! others can read is refused with the fix and nothing is sent, that a host that cannot pull
//! halts the release before any host changes, and that no credential appears in the job's
//! events, the release or the agent's log.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use drover_e2e::hostagent::HostAgent;
use drover_e2e::{TestController, docker_available, eventually, fast_controller_config, init};
use drover_proto::v1;

const PASSWORD: &str = "pull-s3cret-7781";

/// A registry that answers every request 401 without the expected credentials and "manifest
/// unknown" with them; it keeps the `Authorization` header of each request.
struct Registry {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Registry {
    async fn start(expected: String) -> Registry {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                let expected = expected.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut got = Vec::new();
                    // One request per connection: read to the end of its headers.
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < buf.len() {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&got).to_string();
                    let auth = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("authorization")
                                .then(|| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    log.lock().unwrap().push(auth.clone());
                    let body =
                        r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
                    let answer = if auth == expected {
                        format!(
                            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                             Docker-Distribution-API-Version: registry/2.0\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"\r\n\
                         Docker-Distribution-API-Version: registry/2.0\r\n\
                         Content-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    };
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Registry { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Writes a Docker `config.json` for `registry` with user `ci` at `mode`.
fn auth_file(path: &std::path::Path, registry: &str, mode: u32) {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("ci:{PASSWORD}"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        path,
        format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

// Multi-threaded: the in-process controller and registry keep serving while this waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_pulls_first_with_the_host_s_credentials_and_a_failed_pull_changes_no_host() {
    init();
    if !docker_available("release_pull") {
        return;
    }
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("ci:{PASSWORD}"))
    );
    let registry = Registry::start(basic.clone()).await;
    let repo = format!("{}/acme/pull-test", registry.addr);

    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let good = tmp.path().join("auth-good/registry-auth.json");
    let open = tmp.path().join("auth-open/registry-auth.json");
    auth_file(&good, &registry.addr.to_string(), 0o600);
    auth_file(&open, &registry.addr.to_string(), 0o644);
    let with = |p: &std::path::Path| format!("registry_auth = \"{}\"", p.display());
    let mut a =
        HostAgent::enroll_with(&controller, tmp.path(), "pull-a", "127.0.0.2", &with(&good)).await;
    let mut b =
        HostAgent::enroll_with(&controller, tmp.path(), "pull-b", "127.0.0.3", &with(&open)).await;
    a.start(&controller).await;
    b.start(&controller).await;
    controller
        .admin()
        .apply_app(v1::ApplyAppRequest {
            spec_toml: format!(
                "name = \"pulltest\"\nimage = \"{repo}\"\n[web]\nport = 8080\nlisten = \"0.0.0.0:18099\"\n[health]\npath = \"/healthz\"\n"
            ),
            source: "pulltest.toml".into(),
        })
        .await
        .expect("apply the app");

    let started = controller
        .admin()
        .start_release(v1::StartReleaseRequest {
            app: "pulltest".into(),
            version: "v9.0.0".into(),
            hosts: vec!["pull-a".into(), "pull-b".into()],
            waves: "1,100%".into(),
            skip_backup: true,
            ..Default::default()
        })
        .await
        .expect("start the release")
        .into_inner();
    assert_eq!(started.state, "pulling");
    let halted = eventually(
        "the release halts and both pulls end",
        Duration::from_secs(60),
        || async {
            let r = controller
                .admin()
                .get_release(v1::GetReleaseRequest {
                    id: started.id.clone(),
                })
                .await
                .ok()?
                .into_inner();
            // A failed pull halts it at once; the other pull still ends and is recorded.
            (r.state == "halted" && r.hosts.iter().all(|h| h.pull != "pulling")).then_some(r)
        },
    )
    .await;
    let host = |name: &str| {
        halted
            .hosts
            .iter()
            .find(|h| h.host == name)
            .unwrap()
            .clone()
    };
    // Both pulls failed; no host was deployed to.
    assert!(
        halted
            .why
            .starts_with("the image could not be pulled, so no host was changed"),
        "{}",
        halted.why
    );
    for h in ["pull-a", "pull-b"] {
        assert_eq!(host(h).pull, "failed", "{:?}", host(h));
        assert_eq!(host(h).state, "skipped");
        assert!(host(h).deploy_started_unix_ms == 0);
    }
    // pull-a's credentials reached the registry through its Engine: the registry answered
    // "manifest unknown" only to them.
    assert!(
        registry.seen().contains(&basic),
        "the registry saw {:?}",
        registry.seen()
    );
    assert!(
        host("pull-a").pull_why.contains("manifest unknown"),
        "{}",
        host("pull-a").pull_why
    );
    // pull-b's file is readable by others: refused before any pull, with the fix.
    let why_b = host("pull-b").pull_why;
    assert!(
        why_b.contains("chmod 600") && why_b.contains("registry-auth.json"),
        "{why_b}"
    );

    // No credential in what the controller holds or the agents logged.
    let shown = format!("{halted:?}");
    let events = controller
        .admin()
        .list_jobs(v1::ListJobsRequest {
            app: "pulltest".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let shown = format!("{shown}{events:?}");
    let auth64 = basic.trim_start_matches("Basic ");
    for secret in [PASSWORD, auth64] {
        assert!(
            !shown.contains(secret),
            "a credential in the release or jobs"
        );
        for agent in [&a, &b] {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            assert!(
                !log.contains(secret),
                "a credential in {}'s log",
                agent.host
            );
        }
    }
}

/// A real registry (Debian's `docker-registry`, the distribution registry) on loopback,
/// killed when dropped. None when the binary is missing outside CI (the reason is printed).
struct RealRegistry {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl RealRegistry {
    fn start(test: &str) -> Option<RealRegistry> {
        let Some(bin) = ["/usr/bin/docker-registry", "/usr/local/bin/docker-registry"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: docker-registry is missing (scripts/test.sh installs it)");
            }
            eprintln!(
                "skipping {test}: docker-registry is missing (apt-get install docker-registry)"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", drover_e2e::free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = RealRegistry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry does not listen on {}",
                registry.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(registry)
    }
}

impl Drop for RealRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Pushes the test app at `version` to `image` with an 8 MiB layer of its own (so no layer is
/// on this host yet), then removes it here: the agents' Engine has to download it.
fn push_unique_image(image: &str, version: &str, dir: &std::path::Path) {
    let base = drover_e2e::testapp_image(version);
    let made = docker(&["create", &base]);
    let fs = dir.join("fs.tar");
    docker(&["export", "-o", fs.to_str().unwrap(), &made]);
    docker(&["rm", &made]);
    let filler = dir.join("filler");
    std::fs::create_dir_all(&filler).unwrap();
    let bytes: Vec<u8> = (0..8 * 1024 * 1024).map(|_| rand::random::<u8>()).collect();
    std::fs::write(filler.join("filler.bin"), bytes).unwrap();
    let status = std::process::Command::new("tar")
        .arg("--append")
        .arg("-f")
        .arg(&fs)
        .arg("-C")
        .arg(&filler)
        .arg("filler.bin")
        .status()
        .unwrap();
    assert!(status.success(), "tar --append");
    docker(&[
        "import",
        "--change",
        "ENTRYPOINT [\"/app\"]",
        "--change",
        "EXPOSE 8080",
        "--change",
        &format!("ENV APP_VERSION={version}"),
        fs.to_str().unwrap(),
        image,
    ]);
    docker(&["push", "--quiet", image]);
    docker(&["rmi", image]);
}

// Multi-threaded: the in-process controller keeps serving while this waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_pulls_from_a_real_registry_before_its_first_wave_with_progress() {
    init();
    let test = "a_release_pulls_from_a_real_registry_before_its_first_wave_with_progress";
    if !docker_available(test) {
        return;
    }
    let Some(registry) = RealRegistry::start(test) else {
        return;
    };
    let app = "pullreal";
    let _guard = drover_e2e::deploys::AppGuard(app.into());
    let tmp = tempfile::tempdir().unwrap();
    let repo = format!("{}/drover-t-{app}", registry.addr);
    let image = format!("{repo}:v1.1.0");
    push_unique_image(&image, "v1.1.0", tmp.path());

    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let mut agents = Vec::new();
    for (name, ip) in [("pullreal-a", "127.0.0.12"), ("pullreal-b", "127.0.0.13")] {
        let mut agent = HostAgent::enroll(&controller, tmp.path(), name, ip).await;
        agent.start(&controller).await;
        agents.push(agent);
    }
    let port = drover_e2e::free_port();
    controller
        .admin()
        .apply_app(v1::ApplyAppRequest {
            spec_toml: format!(
                "name = \"{app}\"\nimage = \"{repo}\"\n[web]\nport = 8080\nlisten = \"0.0.0.0:{port}\"\n[health]\npath = \"/healthz\"\ninterval = \"200ms\"\n[watch]\nwindow = \"1s\"\n"
            ),
            source: "pullreal.toml".into(),
        })
        .await
        .expect("apply the app");
    let started = controller
        .admin()
        .start_release(v1::StartReleaseRequest {
            app: app.into(),
            version: "v1.1.0".into(),
            hosts: agents.iter().map(|a| a.host.clone()).collect(),
            waves: "1,100%".into(),
            min_healthy_ms: 1_000,
            skip_backup: true,
            ..Default::default()
        })
        .await
        .expect("start the release")
        .into_inner();
    assert_eq!(started.state, "pulling");
    let done = eventually("the release succeeds", Duration::from_secs(120), || async {
        let r = controller
            .admin()
            .get_release(v1::GetReleaseRequest {
                id: started.id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        assert!(
            !matches!(r.state.as_str(), "halted" | "reverted"),
            "{}: {:?}",
            r.why,
            r.hosts
        );
        (r.state == "succeeded").then_some(r)
    })
    .await;
    for h in &done.hosts {
        assert_eq!(h.pull, "pulled", "{h:?}");
    }
    // The Engine downloaded the 8 MiB layer for the first pull and reported it as it went;
    // the pull's last line says what came down.
    let lines: Vec<String> = agents
        .iter()
        .enumerate()
        .flat_map(|(i, a)| controller.job_events(&a.host, &format!("{}-p{i}", started.id)))
        .filter(|e| e.kind == drover_model::jobevent::PROGRESS)
        .map(|e| e.message)
        .collect();
    let pulled = lines
        .iter()
        .find(|l| l.starts_with(&format!("pulled {image}: 1/1 layers")))
        .unwrap_or_else(|| panic!("no pull progress: {lines:?}"));
    let mib: f64 = pulled
        .split(" of ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{pulled}"));
    assert!(mib >= 8.0, "{pulled}");
    for a in &agents {
        assert_eq!(
            drover_e2e::hostagent::version_at(a.public(port))
                .await
                .as_deref(),
            Some("v1.1.0"),
            "{}",
            a.host
        );
    }
    drop(agents);
    drover_e2e::deploys::remove_app_containers(app);
    let _ = std::process::Command::new("docker")
        .args(["rmi", &image])
        .output();
}
