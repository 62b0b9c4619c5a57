//! The agent's reverse proxy in front of real test-app containers: one atomic switch between
//! releases under steady load with no failed request, in-flight requests drained on the old
//! upstream, WebSocket upgrades passed through, forwarding headers, per-upstream counters;
//! malformed requests counted apart from the release's answers (no rollback by anyone who can
//! send garbage), and the connection limits: header and idle timeouts, the connection cap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use drover_agent::proxy::{ConnLimits, Proxy, Upstream};
use drover_e2e::deploys::{AppGuard, Load, deploy_job, spec, test_repo};
use drover_e2e::{
    Container, TestAgent, TestController, assert_ws_echo, docker_available, eventually,
    fast_controller_config, free_port, http, init, testapp_image,
};
use drover_model::jobevent::field;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn app(tag: &str, args: &[&str]) -> (Container, SocketAddr) {
    let c = Container::run(&testapp_image(tag), args);
    let addr = c.addr();
    eventually(
        "the test app answers",
        Duration::from_secs(20),
        || async move { http(addr, "GET", "/version").await.ok().map(|_| ()) },
    )
    .await;
    (c, addr)
}

async fn start_proxy(proxy: &Proxy, shutdown: &CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(proxy.clone().serve(listener, shutdown.clone()));
    addr
}

#[tokio::test]
async fn switching_under_load_fails_no_request_and_drains_the_old_upstream() {
    if !docker_available("switching_under_load_fails_no_request_and_drains_the_old_upstream") {
        return;
    }
    let (_old, old_addr) = app("v1.0.0", &["-e", "LATENCY_MS=300"]).await;
    let (_new, new_addr) = app("v1.1.0", &[]).await;
    let proxy = Proxy::new();
    let shutdown = CancellationToken::new();
    let front = start_proxy(&proxy, &shutdown).await;

    // Nothing live yet: a clear 503.
    let (status, body) = http(front, "GET", "/").await.unwrap();
    assert_eq!(status, 503, "{body}");

    assert!(proxy.switch(Upstream::new(old_addr, "v1.0.0")).is_none());
    assert_eq!(
        http(front, "GET", "/").await.unwrap(),
        (200, "version=v1.0.0\n".into())
    );

    // Steady load from 4 clients while the switch happens.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served_new = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, failures, served_new) = (stop.clone(), failures.clone(), served_new.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http(front, "GET", "/").await {
                    Ok((200, body)) if body == "version=v1.1.0\n" => {
                        served_new.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((200, _)) => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A slow request is in flight on the old upstream at the moment of the switch.
    let slow = tokio::spawn(async move { http(front, "GET", "/").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let old = proxy
        .switch(Upstream::new(new_addr, "v1.1.0"))
        .expect("the old upstream");
    assert!(
        old.inflight() > 0,
        "requests were in flight on the old upstream"
    );
    assert!(
        old.drain(Duration::from_secs(5)).await.finished(),
        "the old upstream drains"
    );
    assert_eq!(
        slow.await.unwrap().unwrap(),
        (200, "version=v1.0.0\n".into()),
        "in-flight requests finish on the old release"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed across the switch"
    );
    assert!(served_new.load(Ordering::Relaxed) > 0);
    assert_eq!(http(front, "GET", "/").await.unwrap().1, "version=v1.1.0\n");
    let old_stats = old.stats.snapshot();
    assert!(old_stats.requests > 0 && old_stats.status_5xx == 0);
    assert!(
        old_stats.p95_ms >= 300,
        "the old release answered in about 300 ms: {old_stats:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn websockets_headers_and_errors_through_the_proxy() {
    if !docker_available("websockets_headers_and_errors_through_the_proxy") {
        return;
    }
    let (_app, addr) = app("v1.0.0", &[]).await;
    let proxy = Proxy::new();
    let shutdown = CancellationToken::new();
    let front = start_proxy(&proxy, &shutdown).await;
    let upstream = Upstream::new(addr, "v1.0.0");
    proxy.switch(upstream.clone());

    assert_ws_echo(front, "ping").await;

    let headers = http(front, "GET", "/headers").await.unwrap().1;
    assert!(headers.contains("x-forwarded-for: 127.0.0.1"), "{headers}");
    assert!(headers.contains("x-forwarded-proto: http"), "{headers}");

    // 5xx answers are counted for the watch window.
    http(addr, "POST", "/control/errors-on").await.unwrap();
    for _ in 0..10 {
        assert_eq!(http(front, "GET", "/").await.unwrap().0, 500);
    }
    let snap = upstream.stats.snapshot();
    assert!(snap.status_5xx >= 10 && snap.ratio_5xx() > 0.5, "{snap:?}");

    // An upstream that is gone: 502, counted as 5xx, and the proxy keeps serving.
    let dead = Upstream::new("127.0.0.1:9".parse().unwrap(), "dead");
    proxy.switch(dead.clone());
    let (status, body) = http(front, "GET", "/").await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert_eq!(dead.stats.snapshot().status_5xx, 1);
    shutdown.cancel();
}

/// Sends `raw` bytes on a new connection (then half-closes it when `half_close`) and returns
/// everything the server sent before it closed (or `patience` ran out).
async fn raw(addr: SocketAddr, raw: &[u8], half_close: bool, patience: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut got = Vec::new();
    let _ = tokio::time::timeout(patience, stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// Requests the proxy cannot or must not forward, each as an attacker would send them.
async fn send_malformed(front: SocketAddr) -> Vec<String> {
    let second = Duration::from_secs(5);
    vec![
        // A target with no place in the container's URI (was a 502 counted as the app's).
        raw(
            front,
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            false,
            second,
        )
        .await,
        raw(
            front,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
            false,
            second,
        )
        .await,
        // A body that breaks off: 10 of 1000 bytes, then the client stops sending.
        raw(
            front,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
            true,
            second,
        )
        .await,
        // A chunked body that is not chunked.
        raw(
            front,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n",
            true,
            second,
        )
        .await,
    ]
}

/// The proxy's own answers to malformed requests used to count as the release's 5xx
/// (issue 11, 7): only answers the release gave count, and a release that cannot be reached.
#[tokio::test]
async fn malformed_requests_are_counted_apart_never_as_the_releases_5xx() {
    if !docker_available("malformed_requests_are_counted_apart_never_as_the_releases_5xx") {
        return;
    }
    let (_app, addr) = app("v1.0.0", &[]).await;
    let proxy = Proxy::new();
    let shutdown = CancellationToken::new();
    let front = start_proxy(&proxy, &shutdown).await;
    let upstream = Upstream::new(addr, "v1.0.0");
    proxy.switch(upstream.clone());

    let answers = send_malformed(front).await;
    assert!(answers[0].starts_with("HTTP/1.1 400"), "{answers:?}");
    assert!(answers[1].starts_with("HTTP/1.1 405"), "{answers:?}");
    for answer in &answers {
        assert!(!answer.contains(" 502 "), "{answers:?}");
    }
    let snap = upstream.stats.snapshot();
    assert_eq!(
        (snap.requests, snap.status_5xx),
        (0, 0),
        "nothing the release did: {snap:?}, answers {answers:?}"
    );
    assert!(
        upstream.stats.client_errors.load(Ordering::Relaxed) >= 2,
        "counted apart: {answers:?}"
    );
    // A whole body still reaches the app, and its answer counts.
    let echo = raw(
        front,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789",
        false,
        Duration::from_secs(5),
    )
    .await;
    assert!(echo.contains("read 10 bytes"), "{echo}");
    assert_eq!(upstream.stats.snapshot().requests, 1);
    shutdown.cancel();
}

/// Anyone who can reach the port used to be able to roll back a good release by sending
/// garbage during its watch window (issue 11, 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_during_a_watch_window_do_not_roll_back_a_good_release() {
    if !docker_available("malformed_requests_during_a_watch_window_do_not_roll_back") {
        return;
    }
    init();
    let app = "garbage";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let host = "garbage-host";
    let mut agent = TestAgent::enroll_and_start(
        &controller,
        host,
        &dir.path().join("a"),
        &controller.addr.to_string(),
    )
    .await;
    agent.wait_connected().await;
    let run = |job: drover_agent::store::JobRecord| {
        let id = job.id.clone();
        agent.jobs.submit(job);
        let controller = &controller;
        async move {
            controller
                .wait_job(host, &id, Duration::from_secs(90))
                .await
        }
    };
    let the_spec = spec(app, &repo, listen, "").replace("window = \"1s\"", "window = \"6s\"");
    let done = run(deploy_job("deploy-1-first", app, "v1.0.0", &the_spec)).await;
    assert_eq!(done.fields[field::RESULT], "succeeded", "{done:?}");

    // Garbage from 4 clients, and a little real traffic, through the whole window.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, sent) = (stop.clone(), sent.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    send_malformed(listen).await;
                    sent.fetch_add(4, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let load = Load::start(listen, 1);
    let done = run(deploy_job("deploy-2-good0", app, "v1.1.0", &the_spec)).await;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.await.unwrap();
    }
    let (ok, failed, failures) = load.finish().await;
    assert!(
        sent.load(Ordering::Relaxed) >= 40,
        "the window saw garbage: {}",
        sent.load(Ordering::Relaxed)
    );
    assert_eq!(
        done.fields[field::RESULT],
        "succeeded",
        "a good release stays: {done:?}"
    );
    assert_eq!(done.fields[field::LIVE_VERSION], "v1.1.0");
    assert!(
        ok > 0 && failed == 0,
        "{ok} ok, {failed} failed: {failures:?}"
    );
    agent.stop().await;
}

/// A proxy with short limits, for the tests below.
fn short_limits(max_connections: usize) -> ConnLimits {
    ConnLimits::new(
        Duration::from_secs(2),
        Duration::from_secs(1),
        max_connections,
        10_000,
    )
}

/// Reads one HTTP/1.1 response with a Content-Length from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5s")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

/// Whether the server closed `stream` within `patience` (EOF or reset).
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Slowloris and idle clients used to hold their connections forever (issue 11, 2).
#[tokio::test]
async fn slow_and_idle_clients_are_closed_and_the_cap_refuses_without_hurting_served_requests() {
    if !docker_available("slow_and_idle_clients_are_closed_and_the_cap_refuses") {
        return;
    }
    let (_app, addr) = app("v1.0.0", &[]).await;
    let proxy = Proxy::with_limits(short_limits(20));
    let shutdown = CancellationToken::new();
    let front = start_proxy(&proxy, &shutdown).await;
    proxy.switch(Upstream::new(addr, "v1.0.0"));
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    // A kept-alive client being served.
    let mut served = TcpStream::connect(front).await.unwrap();
    served.write_all(get).await.unwrap();
    assert!(read_response(&mut served).await.contains("version=v1.0.0"));

    // 19 slowloris clients fill the cap: half a header, then a byte every 300 ms, so only the
    // header timeout (2 s) can end them, not the idle one (1 s).
    let started = tokio::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..19 {
        let mut s = TcpStream::connect(front).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            .await
            .unwrap();
        slow.push(s);
    }
    eventually("20 connections open", Duration::from_secs(5), || async {
        (proxy.open_connections() == 20).then_some(())
    })
    .await;

    // Beyond the cap: refused at once (a 503, or closed before a byte if the refusal raced
    // the request), never served.
    let refused = raw(front, get, false, Duration::from_secs(2)).await;
    assert!(
        refused.is_empty() || refused.starts_with("HTTP/1.1 503"),
        "{refused}"
    );
    assert!(!refused.contains("version="), "{refused}");
    // The served client is not hurt.
    served.write_all(get).await.unwrap();
    assert!(read_response(&mut served).await.contains("version=v1.0.0"));

    // The slow ones keep trickling until the header timeout closes them.
    let trickle = async {
        let mut open: Vec<bool> = vec![true; slow.len()];
        while open.iter().any(|o| *o) && started.elapsed() < Duration::from_secs(6) {
            for (i, s) in slow.iter_mut().enumerate() {
                if open[i] && s.write_all(b"a").await.is_err() {
                    open[i] = false;
                }
            }
            for (i, s) in slow.iter_mut().enumerate() {
                if open[i] && closed_within(s, Duration::from_millis(10)).await {
                    open[i] = false;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        open.iter().filter(|o| **o).count()
    };
    assert_eq!(trickle.await, 0, "every slow client is closed");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "closed at the 2 s header timeout, not before: {took:?}"
    );

    // An idle kept-alive connection, and one that never sends, close after 1 s.
    let mut silent = TcpStream::connect(front).await.unwrap();
    let mut kept = TcpStream::connect(front).await.unwrap();
    kept.write_all(get).await.unwrap();
    assert!(read_response(&mut kept).await.contains("version=v1.0.0"));
    let idle_from = tokio::time::Instant::now();
    assert!(closed_within(&mut kept, Duration::from_secs(3)).await);
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_millis(2500),
        "{idle:?}"
    );
    // Room again: a new client is served.
    eventually("connections released", Duration::from_secs(5), || async {
        (proxy.open_connections() == 0).then_some(())
    })
    .await;
    assert_eq!(http(front, "GET", "/").await.unwrap().0, 200);
    shutdown.cancel();
}
