//! Typed event payloads over real mTLS, with scripted agents (real enrolled certificates): a
//! release table sent as a typed record is kept as one; an agent from before payloads, whose
//! outbox still holds the JSON-in-fields form, is read the same; and a record that does not
//! read, or rides on an event of another kind, is dropped while its event is kept and
//! acknowledged, so the agent's outbox drains.

use std::collections::BTreeMap;

use drover_controller::store::EventRecord;
use drover_e2e::{ScriptedAgent, TestController, fast_controller_config, init};
use drover_model::jobevent::{self, JobResult, Payload, Release, ReleaseState};
use drover_proto::v1;

const APP: &str = "api";

fn release(id: &str, version: &str, state: ReleaseState) -> Release {
    Release {
        id: id.into(),
        app: APP.into(),
        version: version.into(),
        image: format!("acme/api:{version}"),
        image_id: format!("sha256:{id}"),
        job_id: id.into(),
        requested_by: "alice".into(),
        started_unix_ms: 1_000,
        finished_unix_ms: 5_000,
        result: Some(JobResult::Succeeded),
        state,
        spec_toml: "name = \"api\"".into(),
        containers: BTreeMap::from([("web".into(), format!("api-web-{id}"))]),
    }
}

fn last_event(controller: &TestController, host: &str) -> EventRecord {
    let events = controller.shared.store.events(host, 0, 100).unwrap();
    events.last().cloned().expect("an event was stored")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_tables_are_kept_from_typed_and_from_legacy_json_events() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let b1 = ScriptedAgent::enroll(&controller, "web-1", &[], &tmp.path().join("web-1")).await;
    let b2 = ScriptedAgent::enroll(&controller, "web-2", &[], &tmp.path().join("web-2")).await;
    let mut web1 = ScriptedAgent::connect(&addr, &b1, "web-1").await;
    let mut web2 = ScriptedAgent::connect(&addr, &b2, "web-2").await;

    // Today's agent: the table is a typed record; the fields hold only the app.
    let typed = vec![
        release("r1", "v1.0.0", ReleaseState::Kept),
        release("r2", "v1.1.0", ReleaseState::Live),
    ];
    web1.send_releases(APP, &typed).await;
    assert_eq!(
        controller.shared.store.releases(APP, "web-1").unwrap(),
        typed
    );
    let stored = last_event(&controller, "web-1");
    assert_eq!(
        stored.payload,
        Some(Payload::Releases {
            app: APP.into(),
            releases: typed.clone()
        })
    );
    assert_eq!(stored.fields.keys().collect::<Vec<_>>(), ["app"]);

    // An agent from before payloads: the same table as JSON inside the fields.
    let legacy = vec![release("r9", "v0.9.0", ReleaseState::Live)];
    let fields = BTreeMap::from([
        ("app".to_string(), APP.to_string()),
        (
            jobevent::field::RELEASES.to_string(),
            serde_json::to_string(&legacy).unwrap(),
        ),
    ]);
    web2.event_with("", jobevent::RELEASES, "", fields).await;
    assert_eq!(
        controller.shared.store.releases(APP, "web-2").unwrap(),
        legacy
    );
    // It is stored in today's form: the record typed, no JSON left in the fields.
    let stored = last_event(&controller, "web-2");
    assert_eq!(
        stored.payload,
        Some(Payload::Releases {
            app: APP.into(),
            releases: legacy.clone()
        })
    );
    assert_eq!(stored.fields.keys().collect::<Vec<_>>(), ["app"]);

    // Operators read the typed record back.
    let events = controller
        .admin()
        .list_events(v1::ListEventsRequest {
            host: "web-2".into(),
            after_seq: 0,
            limit: 100,
        })
        .await
        .expect("list events")
        .into_inner()
        .events;
    let carried = events.last().and_then(|e| e.payload.clone());
    assert!(
        matches!(carried, Some(v1::job_event::Payload::Releases(ref t)) if t.releases.len() == 1 && t.releases[0].version == "v0.9.0"),
        "{carried:?}"
    );
    web1.close();
    web2.close();
    controller.stop().await;
}

/// Event `seq` of web-1 was stored and acknowledged without its record, and web-1's release
/// table is still `table`.
fn assert_dropped(controller: &TestController, seq: u64, table: &[Release]) {
    let stored = last_event(controller, "web-1");
    assert_eq!(
        (stored.seq, stored.payload.clone()),
        (seq, None),
        "{stored:?}"
    );
    assert_eq!(
        controller.shared.store.releases(APP, "web-1").unwrap(),
        table
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_read_is_dropped_and_its_event_kept() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let b1 = ScriptedAgent::enroll(&controller, "web-1", &[], &tmp.path().join("web-1")).await;
    let mut web1 = ScriptedAgent::connect(&addr, &b1, "web-1").await;
    let good = vec![release("r1", "v1.0.0", ReleaseState::Live)];
    web1.send_releases(APP, &good).await;

    // A release state this controller does not know: the event is acknowledged (the call
    // returns only once it is), the table it carried is not kept, and the one before stands.
    let mut wire = drover_proto::payload::to_proto(&Payload::Releases {
        app: APP.into(),
        releases: vec![release("r2", "v2.0.0", ReleaseState::Live)],
    });
    if let v1::job_event::Payload::Releases(t) = &mut wire {
        t.releases[0].state = "exploded".into();
    }
    assert_eq!(
        drover_proto::payload::from_proto(wire.clone())
            .unwrap_err()
            .to_string(),
        "release r2: state \"exploded\" is not one this controller knows (upgrade it)"
    );
    let fields = BTreeMap::from([("app".to_string(), APP.to_string())]);
    let seq = web1
        .event_wire("", jobevent::RELEASES, "", fields, Some(wire))
        .await;
    assert_dropped(&controller, seq, &good);

    // A release table riding on a progress line: not kept either.
    let seq = web1
        .event_carrying(
            "",
            jobevent::PROGRESS,
            "",
            BTreeMap::new(),
            Some(Payload::Releases {
                app: APP.into(),
                releases: vec![],
            }),
        )
        .await;
    assert_dropped(&controller, seq, &good);

    // Legacy JSON that does not parse: same.
    let seq = web1
        .event_with(
            "",
            jobevent::RELEASES,
            "",
            BTreeMap::from([
                ("app".to_string(), APP.to_string()),
                ("releases".to_string(), "[{\"id\":".to_string()),
            ]),
        )
        .await;
    assert_dropped(&controller, seq, &good);
    web1.close();
    controller.stop().await;
}
