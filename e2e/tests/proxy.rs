//! The agent's reverse proxy in front of real test-app containers: one atomic switch between
//! releases under steady load with no failed request, in-flight requests drained on the old
//! upstream, WebSocket upgrades passed through, forwarding headers, per-upstream counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use drover_agent::proxy::{Proxy, Upstream};
use drover_e2e::{Container, assert_ws_echo, docker_available, eventually, http, testapp_image};
use tokio::net::TcpListener;
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
