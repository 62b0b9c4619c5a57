//! App specs through the real controller and the real `drover` binary: apply validates and
//! versions, list and show read back, invalid specs name the file and key, viewers only read.

use std::path::Path;

use drover_e2e::{TestController, drover_cli as drover, fast_controller_config, init};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_list_show_and_refusals() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let admin = controller.admin_dir();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/api.toml");
    let example = example.to_str().unwrap().to_string();

    let (a, e) = (addr.clone(), admin.clone());
    let run = move |args: Vec<String>| {
        let (a, e) = (a.clone(), e.clone());
        tokio::task::spawn_blocking(move || {
            drover(&a, &e, &args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let out = run(vec!["app".into(), "apply".into(), example.clone()])
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "app api applied: revision 1");
    let out = run(vec!["app".into(), "apply".into(), example.clone()])
        .await
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "app api unchanged (revision 1)");

    let changed = tmp.path().join("api.toml");
    let spec = std::fs::read_to_string(&example)
        .unwrap()
        .replace("keep_releases = 3", "keep_releases = 5");
    std::fs::write(&changed, spec).unwrap();
    let out = run(vec![
        "app".into(),
        "apply".into(),
        changed.display().to_string(),
        "--json".into(),
    ])
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"name": "api", "revision": 2, "changed": true})
    );

    let out = run(vec!["app".into(), "list".into(), "--json".into()])
        .await
        .unwrap();
    let apps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(apps[0]["name"], "api");
    assert_eq!(apps[0]["workers"], serde_json::json!(["bot"]));
    assert_eq!(apps[0]["updated_by"], "admin");
    let out = run(vec!["app".into(), "show".into(), "api".into()])
        .await
        .unwrap();
    assert!(
        text(&out.stdout).contains("keep_releases = 5"),
        "{}",
        text(&out.stdout)
    );
    let out = run(vec!["app".into(), "show".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(68), "{}", text(&out.stderr));

    // An invalid spec: exit 65, one line naming the file and the key; nothing stored.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"api\"\nimage = \"acme/api:v1\"\n[web]\nport = 8000\nlisten = \"0.0.0.0:80\"\n",
    )
    .unwrap();
    let out = run(vec![
        "app".into(),
        "apply".into(),
        bad.display().to_string(),
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("`image`"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        controller
            .shared
            .store
            .app("api")
            .unwrap()
            .unwrap()
            .revision,
        2
    );

    // A TOML mistake under a comment: one line naming the file, the line and the key (not
    // toml's caret drawing), and out-of-range values are refused by name.
    let commented = |body: &str| {
        format!(
            "# the api\n# deployed by drover\nname = \"api\"\nimage = \"acme/api\"\n[web]\nport = 8000\nlisten = \"0.0.0.0:80\"\n{body}"
        )
    };
    for (spec, want) in [
        (
            commented("[watch]\nwindow = \"soon\"\n"),
            "bad.toml, line 9, key `watch.window`: invalid duration",
        ),
        (
            commented("[watch]\nwindow = \"18446744073709551615s\"\n"),
            "key `watch.window`: ",
        ),
        (
            commented("[health]\nretries = 4294967295\n"),
            "key `health.retries`: 4294967295 is out of range",
        ),
        (
            commented("[env]\n\"A=B\" = \"1\"\n"),
            "key `env`: the name \"A=B\" contains '='",
        ),
        // A host mount only with allow_host_mounts (and then `drover app show` says so).
        (
            format!("volumes = [\"/srv/www:/www:ro\"]\n{}", commented("")),
            "allow_host_mounts = true",
        ),
    ] {
        std::fs::write(&bad, spec).unwrap();
        let out = run(vec![
            "app".into(),
            "apply".into(),
            bad.display().to_string(),
        ])
        .await
        .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(65), "{err}");
        assert!(err.contains(want), "wanted {want:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let allowed = tmp.path().join("www.toml");
    std::fs::write(
        &allowed,
        format!(
            "allow_host_mounts = true\nvolumes = [\"/srv/www:/www:ro\"]\n{}",
            commented("").replace("name = \"api\"", "name = \"www\"")
        ),
    )
    .unwrap();
    let out = run(vec![
        "app".into(),
        "apply".into(),
        allowed.display().to_string(),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(vec!["app".into(), "show".into(), "www".into()])
        .await
        .unwrap();
    assert!(
        text(&out.stdout)
            .contains("# allowed beyond a plain container: host mounts (/srv/www:/www)"),
        "{}",
        text(&out.stdout)
    );
    let out = run(vec![
        "app".into(),
        "show".into(),
        "www".into(),
        "--json".into(),
    ])
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["privileges"],
        serde_json::json!(["host mounts (/srv/www:/www)"])
    );

    // A viewer reads but may not apply.
    let viewer = tmp.path().join("viewer");
    controller.viewer("vic").await.save(&viewer).unwrap();
    let (a, v, ex) = (addr.clone(), viewer.clone(), example.clone());
    let out = tokio::task::spawn_blocking(move || drover(&a, &v, &["app", "apply", &ex]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    let (a, v) = (addr.clone(), viewer.clone());
    let out = tokio::task::spawn_blocking(move || drover(&a, &v, &["app", "list"]))
        .await
        .unwrap();
    assert!(
        out.status.success() && text(&out.stdout).contains("api"),
        "{}",
        text(&out.stdout)
    );
    controller.stop().await;
}
