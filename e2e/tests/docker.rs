//! The agent's Docker module against the real Engine, with the test app image: containers
//! created by name with labels and a published port, inspected, listed, stopped, removed;
//! one-off runs to completion with their exit code and logs.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_agent::docker::{self, ContainerSpec, DockerError};
use drover_e2e::{docker_available, eventually, http, testapp_image};

fn spec(name: &str, image: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.to_string(),
        image: image.to_string(),
        labels: BTreeMap::from([("drover.test".to_string(), std::process::id().to_string())]),
        publish: Some(8080),
        ..ContainerSpec::default()
    }
}

#[tokio::test]
async fn containers_are_managed_by_name_on_the_real_engine() {
    if !docker_available("containers_are_managed_by_name_on_the_real_engine") {
        return;
    }
    let image = testapp_image("v1.0.0");
    let engine = docker::connect("");
    let name = format!("drover-test-{}-web", std::process::id());
    let _ = engine.remove(&name).await;

    assert!(
        engine
            .image_id(&image)
            .await
            .unwrap()
            .is_some_and(|id| id.starts_with("sha256:"))
    );
    assert_eq!(
        engine
            .image_id("drover-testapp:v0.0.0-missing")
            .await
            .unwrap(),
        None
    );
    let err = engine
        .create_and_start(&spec(&name, "drover-testapp:v0.0.0-missing"))
        .await
        .unwrap_err();
    assert!(matches!(err, DockerError::ImageMissing(_)), "{err}");
    assert!(
        engine.inspect(&name).await.unwrap().is_none(),
        "nothing left behind"
    );

    let mut web = spec(&name, &image);
    web.env.insert("APP_VERSION".into(), "v1.0.0-test".into());
    let info = engine.create_and_start(&web).await.unwrap();
    assert!(info.running);
    assert_eq!(info.name, name);
    assert_eq!(
        info.labels.get("drover.test"),
        Some(&std::process::id().to_string())
    );
    let addr =
        std::net::SocketAddr::from(([127, 0, 0, 1], info.host_port.expect("published port")));
    let body = eventually(
        "the container answers",
        Duration::from_secs(20),
        || async move { http(addr, "GET", "/").await.ok().map(|(_, body)| body) },
    )
    .await;
    assert_eq!(body, "version=v1.0.0-test\n");

    let listed = engine
        .list_labelled("drover.test", &std::process::id().to_string())
        .await
        .unwrap();
    assert!(listed.iter().any(|c| c.name == name));

    let err = engine.create_and_start(&web).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("create container {name}")),
        "a name conflict says so: {err}"
    );

    engine.stop(&name, Duration::from_secs(2)).await.unwrap();
    engine.stop(&name, Duration::from_secs(2)).await.unwrap();
    let stopped = engine.inspect(&name).await.unwrap().unwrap();
    assert!(!stopped.running);
    assert!(
        engine
            .logs_tail(&name, 10)
            .await
            .unwrap()
            .contains("listening on port 8080")
    );
    assert!(engine.remove(&name).await.unwrap(), "there was a container");
    assert!(engine.inspect(&name).await.unwrap().is_none());
    assert!(
        !engine.remove(&name).await.unwrap(),
        "removing a gone container is fine, and says so"
    );
    assert!(matches!(
        engine.stop(&name, Duration::from_secs(1)).await,
        Err(DockerError::NoSuchContainer(_))
    ));
}

#[tokio::test]
async fn one_off_runs_report_exit_code_and_logs_and_leave_nothing() {
    if !docker_available("one_off_runs_report_exit_code_and_logs_and_leave_nothing") {
        return;
    }
    let image = testapp_image("v1.0.0");
    let engine = docker::connect("");
    let name = format!("drover-test-{}-migrate", std::process::id());
    let _ = engine.remove(&name).await;
    let mut once = spec(&name, &image);
    once.publish = None;
    once.env.insert("EXIT_AFTER_MS".into(), "100".into());
    let (code, logs) = engine
        .run_to_completion(&once, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(code, 3);
    assert!(logs.contains("exiting as told by EXIT_AFTER_MS"), "{logs}");
    assert!(
        engine.inspect(&name).await.unwrap().is_none(),
        "the one-off container is removed"
    );

    // A run that outlives its timeout is stopped, removed and reported.
    once.env.remove("EXIT_AFTER_MS");
    let err = engine
        .run_to_completion(&once, Duration::from_secs(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("still running after 1s"), "{err}");
    assert!(engine.inspect(&name).await.unwrap().is_none());
}
