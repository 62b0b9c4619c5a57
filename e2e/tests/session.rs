//! The live session: health reports reach the controller, certificates renew without dropping
//! the session, and silence turns a host suspect, then down, then connected again.

use std::time::Duration;

use drover_e2e::{Proxy, TestAgent, TestController, eventually, fast_controller_config, init};

#[tokio::test]
async fn health_reports_carry_every_check_and_docker_facts() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let mut agent = TestAgent::enroll_and_start(
        &controller,
        "web-1",
        &tmp.path().join("agent"),
        &controller.addr.to_string(),
    )
    .await;
    agent.wait_connected().await;
    let host = eventually("a health report", Duration::from_secs(20), || async {
        controller
            .host("web-1")
            .await
            .filter(|h| h.last_report.is_some())
    })
    .await;
    assert_eq!(host.state, "connected");
    assert!(
        ["healthy", "degraded", "unhealthy"].contains(&host.health.as_str()),
        "{}",
        host.health
    );
    let report = host.last_report.unwrap();
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    for expected in [
        "disk",
        "memory",
        "load",
        "docker",
        "certificate",
        "clock",
        "fds",
    ] {
        assert!(
            names.contains(&expected),
            "check {expected} missing from {names:?}"
        );
    }
    assert!(report.mem_total_bytes > 0 && report.uptime_secs > 0 && !report.disks.is_empty());
    assert_eq!(report.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(report.cert_not_after_unix > drover_identity::pki::unix_now());
    // Docker runs on every machine this suite runs on; in CI its absence is a failure.
    let docker = report.checks.iter().find(|c| c.name == "docker").unwrap();
    if report.docker_reachable {
        assert!(!report.docker_version.is_empty());
    } else if std::env::var("CI").as_deref() == Ok("true") {
        panic!("Docker Engine not reachable in CI: {}", docker.reason);
    } else {
        eprintln!("note: Docker Engine not reachable here: {}", docker.reason);
    }
    // The clock offset is measured from heartbeats; both ends share a clock here. The first
    // measurement is reported at once, well before the next periodic report (5 s here).
    let host = eventually("a clock offset", Duration::from_secs(3), || async {
        let h = controller.host("web-1").await?;
        let r = h.last_report.as_ref()?;
        r.checks
            .iter()
            .any(|c| c.name == "clock" && !c.reason.contains("not measured"))
            .then_some(h)
    })
    .await;
    assert!(host.last_report.unwrap().clock_offset_ms.abs() < 1000);
    agent.stop().await;
    controller.stop().await;
}

#[tokio::test]
async fn certificates_renew_over_the_live_session() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.agent_cert_ttl = Duration::from_secs(10);
    let controller = TestController::start(config).await;
    let proxy = Proxy::start(controller.addr).await;
    let mut agent = TestAgent::enroll_and_start(
        &controller,
        "web-1",
        &tmp.path().join("agent"),
        &proxy.addr.to_string(),
    )
    .await;
    agent.wait_connected().await;
    let first_expiry = agent.status.borrow().cert_not_after_unix;
    // A 10 s certificate renews at 40 % of its life: three renewals take about 12 s, and the
    // enrollment certificate has expired by the end.
    tokio::time::timeout(
        Duration::from_secs(40),
        agent.status.wait_for(|s| s.renewals >= 3),
    )
    .await
    .expect("three renewals within 40s")
    .unwrap();
    let status = agent.status.borrow().clone();
    assert_eq!(status.sessions, 1, "renewal did not drop the session");
    assert!(status.connected);
    assert!(status.cert_not_after_unix > first_expiry);
    assert!(
        drover_identity::pki::unix_now() > first_expiry,
        "the first certificate has expired"
    );
    // A reconnect now must use the renewed certificate (the first one would be refused).
    proxy.cut();
    tokio::time::timeout(
        Duration::from_secs(20),
        agent.status.wait_for(|s| s.sessions >= 2 && s.connected),
    )
    .await
    .expect("reconnects with the renewed certificate")
    .unwrap();
    let seq = agent.record("after renewal").await;
    controller.wait_stored("web-1", seq).await;
    agent.stop().await;
    controller.stop().await;
}

#[tokio::test]
async fn silence_makes_a_host_suspect_then_down_and_it_recovers() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let proxy = Proxy::start(controller.addr).await;
    let mut agent = TestAgent::enroll_and_start(
        &controller,
        "web-1",
        &tmp.path().join("agent"),
        &proxy.addr.to_string(),
    )
    .await;
    agent.wait_connected().await;
    let state = |c: &TestController| {
        let mut api = c.admin();
        async move {
            api.get_host(drover_proto::v1::GetHostRequest {
                name: "web-1".into(),
            })
            .await
            .ok()
            .map(|h| h.into_inner().state)
        }
    };
    assert_eq!(state(&controller).await.as_deref(), Some("connected"));
    // The host goes silent: connection open, no bytes (config: suspect 3s, down 6s).
    proxy.freeze(true);
    eventually("suspect", Duration::from_secs(10), || async {
        (state(&controller).await? == "suspect").then_some(())
    })
    .await;
    eventually("down", Duration::from_secs(10), || async {
        (state(&controller).await? == "down").then_some(())
    })
    .await;
    proxy.freeze(false);
    proxy.cut();
    eventually("connected again", Duration::from_secs(20), || async {
        (state(&controller).await? == "connected").then_some(())
    })
    .await;
    agent.stop().await;
    controller.stop().await;
}

/// A controller that takes the connection and the session's request but never answers: TLS
/// with a real certificate of the CA, HTTP/2, then silence.
async fn silent_controller(
    controller: &TestController,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let names = controller.shared.config.tls_names.clone();
    let (chain, key) = controller
        .shared
        .ca
        .issue_server(&names, Duration::from_secs(3600))
        .unwrap();
    let config =
        drover_identity::tls::server_config(&chain, &key, controller.shared.ca.cert_pem()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                // Take requests, answer none, keep them open.
                let mut held = Vec::new();
                while let Some(Ok(request)) = conn.accept().await {
                    held.push(request);
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_never_welcomes_does_not_hang_the_session_loop() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let (silent, server) = silent_controller(&controller).await;
    let agent = TestAgent::enroll_and_start(
        &controller,
        "web-1",
        &tmp.path().join("agent"),
        &silent.to_string(),
    )
    .await;
    // The session gives up after 30 s and tries again; all along the loop beats, so the
    // watchdog never sees a hung part.
    let started = std::time::Instant::now();
    let mut status = agent.status.clone();
    loop {
        assert!(
            agent.liveness.check().is_ok(),
            "{:?}",
            agent.liveness.check()
        );
        let said = status.borrow_and_update().last_error.clone();
        if said.contains("did not welcome the session within 30 s") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "no session timeout after {:?}; last error {said:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(29),
        "{:?}",
        started.elapsed()
    );
    assert!(!status.borrow().connected);
    server.abort();
    agent.stop().await;
    controller.stop().await;
}
