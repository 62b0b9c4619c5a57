//! The durable outbox: 1,000 events across 20 forced disconnects and one controller restart
//! arrive exactly once, in order.

use std::time::Duration;

use drover_e2e::{Proxy, TestAgent, TestController, eventually, fast_controller_config, init};
use drover_proto::v1;

#[tokio::test]
async fn a_thousand_events_survive_twenty_cuts_and_a_controller_restart() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let config = fast_controller_config(&tmp.path().join("ctl"));
    let mut controller = TestController::start(config.clone()).await;
    let proxy = Proxy::start(controller.addr).await;
    let mut agent = TestAgent::enroll_and_start(
        &controller,
        "web-1",
        &tmp.path().join("agent"),
        &proxy.addr.to_string(),
    )
    .await;
    agent.wait_connected().await;

    const ROUNDS: u64 = 20;
    const PER_ROUND: u64 = 50;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            let n = round * PER_ROUND + i + 1;
            assert_eq!(
                agent.record(&format!("event {n}")).await,
                n,
                "consecutive sequence numbers"
            );
        }
        // Let part of the round through, then cut mid-stream.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sessions = agent.status.borrow().sessions;
        proxy.cut();
        if round == ROUNDS / 2 {
            // Restart the controller on a new port; the proxy follows it.
            controller.stop().await;
            let restarted = TestController::start(config.clone()).await;
            proxy.retarget(restarted.addr);
            controller = restarted;
        }
        // Wait for the reconnect, so every cut hits a live session.
        tokio::time::timeout(
            Duration::from_secs(20),
            agent
                .status
                .wait_for(|s| s.sessions > sessions && s.connected),
        )
        .await
        .expect("the agent reconnects within 20s")
        .unwrap();
    }

    let total = ROUNDS * PER_ROUND;
    let shared = controller.shared.clone();
    eventually(
        "all events stored and acknowledged",
        Duration::from_secs(60),
        || {
            let shared = shared.clone();
            let pending = agent.outbox.pending();
            async move {
                (shared.store.last_event_seq("web-1").ok()? == total && pending == 0).then_some(())
            }
        },
    )
    .await;

    let events = controller
        .admin()
        .list_events(v1::ListEventsRequest {
            host: "web-1".into(),
            after_seq: 0,
            limit: 10_000,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len() as u64, total, "exactly once");
    for (i, event) in events.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(event.seq, n, "in order");
        assert_eq!(event.message, format!("event {n}"));
        assert_eq!(event.host, "web-1");
    }
    assert!(
        agent.status.borrow().sessions > ROUNDS,
        "one session plus one per cut"
    );
    agent.stop().await;
    controller.stop().await;
}

#[tokio::test]
async fn an_agent_restart_replays_what_was_not_acknowledged() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let proxy = Proxy::start(controller.addr).await;
    let agent_dir = tmp.path().join("agent");
    let mut agent =
        TestAgent::enroll_and_start(&controller, "web-1", &agent_dir, &proxy.addr.to_string())
            .await;
    agent.wait_connected().await;
    // Freeze the link: events are stored locally but cannot be acknowledged.
    proxy.freeze(true);
    for n in 1..=10 {
        agent.record(&format!("event {n}")).await;
    }
    assert_eq!(agent.outbox.pending(), 10);
    agent.stop().await;
    proxy.freeze(false);
    let config = drover_e2e::fast_agent_config(&agent_dir, &controller.addr.to_string());
    let agent = TestAgent::start(config).await;
    controller.wait_stored("web-1", 10).await;
    assert_eq!(
        agent.record("event 11").await,
        11,
        "numbering continues after a restart"
    );
    controller.wait_stored("web-1", 11).await;
    let events = controller.shared.store.events("web-1", 0, 100).unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>()
    );
    agent.stop().await;
    controller.stop().await;
}
