//! The deploy tests' HTTP app, as a container on the real Docker Engine: built static, imported
//! as an image with no registry, reporting its version and failing on demand.

use std::time::Duration;

use drover_e2e::{Container, assert_ws_echo, docker_available, eventually, http, testapp_image};

async fn ready(c: &Container) -> std::net::SocketAddr {
    let addr = c.addr();
    eventually(
        "the test app answers",
        Duration::from_secs(20),
        || async move { http(addr, "GET", "/version").await.ok().map(|_| ()) },
    )
    .await;
    addr
}

#[tokio::test]
async fn the_test_app_reports_its_version_and_fails_on_demand() {
    if !docker_available("the_test_app_reports_its_version_and_fails_on_demand") {
        return;
    }
    let image = testapp_image("v1.0.0");
    let app = Container::run(&image, &[]);
    let addr = ready(&app).await;
    assert_eq!(
        http(addr, "GET", "/").await.unwrap(),
        (200, "version=v1.0.0\n".into())
    );
    assert_eq!(http(addr, "GET", "/healthz").await.unwrap().0, 200);
    assert_eq!(http(addr, "GET", "/smoke").await.unwrap().0, 200);
    assert_eq!(
        http(addr, "POST", "/control/fail-health").await.unwrap().0,
        200
    );
    assert_eq!(http(addr, "GET", "/healthz").await.unwrap().0, 503);
    assert_eq!(http(addr, "POST", "/control/heal").await.unwrap().0, 200);
    assert_eq!(http(addr, "GET", "/healthz").await.unwrap().0, 200);
    assert_eq!(
        http(addr, "POST", "/control/errors-on").await.unwrap().0,
        200
    );
    assert_eq!(http(addr, "GET", "/").await.unwrap().0, 500);

    // Failures chosen at start, and a version other than the image's.
    let broken = Container::run(
        &image,
        &[
            "-e",
            "FAIL_SMOKE=1",
            "-e",
            "FAIL_HEALTH=1",
            "-e",
            "APP_VERSION=v9.9.9",
        ],
    );
    let addr = ready(&broken).await;
    assert_eq!(http(addr, "GET", "/smoke").await.unwrap().0, 500);
    assert_eq!(http(addr, "GET", "/healthz").await.unwrap().0, 503);
    assert_eq!(http(addr, "GET", "/version").await.unwrap().1, "v9.9.9\n");

    // A container that exits on its own, with status 3.
    let exiting = Container::run(&image, &["-e", "EXIT_AFTER_MS=200"]);
    let code = eventually("the container exits", Duration::from_secs(20), || async {
        let out = std::process::Command::new("docker")
            .args([
                "inspect",
                "--format",
                "{{.State.Running}} {{.State.ExitCode}}",
                &exiting.id,
            ])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        text.strip_prefix("false ").map(str::to_string)
    })
    .await;
    assert_eq!(code, "3");
}

#[tokio::test]
async fn the_test_app_echoes_websockets() {
    if !docker_available("the_test_app_echoes_websockets") {
        return;
    }
    let app = Container::run(&testapp_image("v1.1.0"), &[]);
    let addr = ready(&app).await;
    assert_ws_echo(addr, "hello").await;
    assert_eq!(http(addr, "GET", "/").await.unwrap().1, "version=v1.1.0\n");
}
