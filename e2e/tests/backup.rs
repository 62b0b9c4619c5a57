//! Backups and restores end to end, on real parts: a real controller and agent over mTLS, a
//! real PostgreSQL cluster on the host, the real Docker Engine (volumes), a real S3 server
//! (s3s in process). Proves the round trip (dump → zstd → age → S3 → read back → restore with
//! equal table contents), the emergency backup before a restore over a live database, a
//! corrupted copy never restored, retention, and that each failure names its stage: a missing
//! database, a wrong S3 secret, too little disk.

use std::path::Path;
use std::time::Duration;

use drover_e2e::backups::{
    assert_job_failed_at, assert_job_succeeded, backup_fixture, event_field,
};
use drover_e2e::docker_available;
use drover_e2e::pg::HostPg;
use drover_e2e::s3::{S3Server, write_credentials};
use drover_model::jobevent::field;
use drover_proto::v1;

fn shop(pg: &HostPg, db: &str) {
    pg.create_db(db);
    pg.psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric);
         INSERT INTO items SELECT i, md5(i::text) || ' ' || repeat(chr(65 + i % 26), i % 40), (i * 7 % 1000) / 10.0 FROM generate_series(1, 5000) i;
         CREATE TABLE orders (id serial PRIMARY KEY, item int REFERENCES items, qty int);
         INSERT INTO orders (item, qty) SELECT 1 + i % 5000, i % 9 FROM generate_series(1, 3000) i;
         ANALYZE;",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backups_are_encrypted_uploaded_read_back_and_restore_to_equal_tables() {
    let Some(pg) = HostPg::start() else { return };
    let f = backup_fixture().await;
    shop(&pg, "shop");
    let s3 = S3Server::start("AKTEST", "s3cr3t-key-0123456789", "backups").await;
    let creds = write_credentials(f.dir.path(), "s3.toml", "AKTEST", "s3cr3t-key-0123456789");
    let identity = age::x25519::Identity::generate();
    let identity_file = f.dir.path().join("age.key");
    std::fs::write(
        &identity_file,
        age::secrecy::ExposeSecret::expose_secret(&identity.to_string()),
    )
    .unwrap();
    let target = format!(
        "name = \"shop-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n\
         [storage.s3]\nendpoint = \"{}\"\nbucket = \"backups\"\nprefix = \"prod\"\ncredentials_file = \"{}\"\n\
         [encryption]\nrecipients = [\"{}\"]\n[retention]\nkeep_last = 2\ndaily = 0\nweekly = 0\nmonthly = 0\n",
        pg.url,
        s3.endpoint,
        creds.display(),
        identity.to_public()
    );
    f.apply(&target).await;

    let done = f.backup("shop-db").await;
    assert_job_succeeded(&done);
    let list = f.backups("shop-db").await;
    assert_eq!(list.len(), 1, "{list:#?}");
    let b = &list[0];
    assert!(b.encrypted && b.verified_unix_ms > 0, "{b:#?}");
    assert!(
        b.started_unix_ms > 1_700_000_000_000 && b.finished_unix_ms >= b.started_unix_ms,
        "{b:#?}"
    );
    assert!(b.remote.starts_with("s3://backups/prod/shop-db/"), "{b:#?}");
    assert!(b.size_bytes > 0 && b.source_bytes > b.size_bytes, "{b:#?}");
    let manifest: serde_json::Value = serde_json::from_str(&b.manifest_json).unwrap();
    let part = &manifest["parts"][0];
    assert!(
        part["server_version"].as_str().unwrap().contains("15"),
        "{manifest}"
    );
    let tables: Vec<(String, i64)> = part["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["rows"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(tables.contains(&("items".into(), 5000)), "{tables:?}");
    // The stored object is the encrypted file: its bytes start with the age header.
    let object = s3.object_path(&format!("prod/shop-db/{}/shop.dump.zst.age", b.id));
    let stored = std::fs::read(&object).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1"));
    assert!(
        s3.object_path(&format!("prod/shop-db/{}/manifest.json", b.id))
            .exists()
    );

    // Into a new database: equal tables.
    let restore = |to: &str, confirmed: bool| v1::RestoreRequest {
        target: "shop-db".into(),
        backup_id: b.id.clone(),
        part: String::new(),
        to_database: to.into(),
        to_dir: String::new(),
        confirmed,
        identity_file: identity_file.display().to_string(),
    };
    assert_job_succeeded(&f.restore(restore("shop_copy", false)).await);
    assert_eq!(
        pg.table_contents("shop_copy", "items"),
        pg.table_contents("shop", "items")
    );
    assert_eq!(
        pg.table_contents("shop_copy", "orders"),
        pg.table_contents("shop", "orders")
    );

    // Without the key: refused before anything is touched.
    let mut no_key = restore("shop_nokey", false);
    no_key.identity_file.clear();
    assert_job_failed_at(&f.restore(no_key).await, "locate", "--identity-file");

    // Over a live database: only when confirmed, and after an emergency backup of it.
    pg.psql(
        "shop",
        "DELETE FROM orders; DELETE FROM items WHERE id > 10;",
    );
    assert_job_failed_at(
        &f.restore(restore("shop", false)).await,
        "emergency_backup",
        "--yes",
    );
    assert_eq!(pg.table_contents("shop", "items").len(), 10, "untouched");
    assert_job_succeeded(&f.restore(restore("shop", true)).await);
    assert_eq!(pg.table_contents("shop", "items").len(), 5000);
    let list = f.backups("shop-db").await;
    let emergency: Vec<_> = list.iter().filter(|b| b.trigger == "emergency").collect();
    assert_eq!(emergency.len(), 1, "{list:#?}");

    // A corrupted local copy: the remote copy is fetched and checked instead.
    let local = Path::new(&b.local_dir).join("shop.dump.zst.age");
    let mut bytes = std::fs::read(&local).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&local, &bytes).unwrap();
    assert_job_succeeded(&f.restore(restore("shop_from_s3", false)).await);
    assert_eq!(pg.table_contents("shop_from_s3", "items").len(), 5000);
    // Both copies corrupted: never restored.
    let mut remote = std::fs::read(&object).unwrap();
    remote[middle] ^= 0x01;
    std::fs::write(&object, &remote).unwrap();
    assert_job_failed_at(
        &f.restore(restore("shop_bad", false)).await,
        "locate",
        "corrupt",
    );

    // Retention: keep_last = 2 (the emergency backup counts), local and remote alike.
    assert_job_succeeded(&f.backup("shop-db").await);
    assert_job_succeeded(&f.backup("shop-db").await);
    let list = f.backups("shop-db").await;
    assert_eq!(list.len(), 2, "{list:#?}");
    assert!(list.iter().all(|x| x.id != b.id), "the oldest went first");
    assert!(!Path::new(&b.local_dir).exists());
    assert!(!object.exists());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_names_its_stage_and_leaves_nothing_half_written() {
    let Some(pg) = HostPg::start() else { return };
    let f = backup_fixture().await;
    shop(&pg, "shop");

    // A database that does not exist: the check says so.
    f.apply(&format!(
        "name = \"ghost\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"nope\"]\n",
        pg.url
    ))
    .await;
    assert_job_failed_at(&f.backup("ghost").await, "check", "nope");

    // A wrong S3 secret: the upload fails naming the credentials file, never the secret;
    // the good local copy is kept and nothing stays in the bucket.
    let s3 = S3Server::start("AKTEST", "the-right-secret-000", "backups").await;
    let creds = write_credentials(f.dir.path(), "bad.toml", "AKTEST", "a-wrong-secret-1111");
    f.apply(&format!(
        "name = \"shop-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n\
         [storage.s3]\nendpoint = \"{}\"\nbucket = \"backups\"\ncredentials_file = \"{}\"\n",
        pg.url,
        s3.endpoint,
        creds.display()
    ))
    .await;
    let failed = f.backup("shop-db").await;
    assert_job_failed_at(&failed, "upload", "credentials");
    assert!(!event_field(&failed, field::ERROR).contains("a-wrong-secret-1111"));
    let list = f.backups("shop-db").await;
    assert_eq!(list.len(), 1, "{list:#?}");
    assert!(list[0].remote.is_empty() && !list[0].local_dir.is_empty());
    let dir = Path::new(&list[0].local_dir)
        .parent()
        .unwrap()
        .to_path_buf();
    let partials: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");

    // Too little disk: refused before anything is written.
    let tmpfs = f.dir.path().join("small");
    std::fs::create_dir_all(&tmpfs).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&tmpfs)
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        f.apply(&format!(
            "name = \"tight\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n[storage]\ndir = \"{}\"\n",
            pg.url,
            tmpfs.display()
        ))
        .await;
        assert_job_failed_at(&f.backup("tight").await, "check", "free");
        let _ = std::process::Command::new("umount").arg(&tmpfs).status();
    } else if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot mount a tmpfs, and CI needs the full-disk check");
    } else {
        eprintln!("skipping the full-disk part: cannot mount a tmpfs (not root?)");
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_paths_restore_to_a_directory_without_their_excluded_files() {
    if !docker_available("volumes_and_paths_restore_to_a_directory") {
        return;
    }
    let f = backup_fixture().await;
    // A host path with excludes.
    let src = f.dir.path().join("uploads");
    std::fs::create_dir_all(src.join("cache")).unwrap();
    std::fs::create_dir_all(src.join("img")).unwrap();
    std::fs::write(src.join("img/logo.png"), vec![42u8; 300_000]).unwrap();
    std::fs::write(src.join("cache/tmp.bin"), b"skip").unwrap();
    std::fs::write(src.join("notes.txt"), b"keep me").unwrap();
    f.apply(&format!(
        "name = \"uploads\"\n[path]\ndir = \"{}\"\nexclude = [\"cache/**\"]\n",
        src.display()
    ))
    .await;
    assert_job_succeeded(&f.backup("uploads").await);
    let b = f.backups("uploads").await.remove(0);
    let out = f.dir.path().join("restored");
    let req = |dir: &Path| v1::RestoreRequest {
        target: "uploads".into(),
        backup_id: b.id.clone(),
        part: String::new(),
        to_database: String::new(),
        to_dir: dir.display().to_string(),
        confirmed: false,
        identity_file: String::new(),
    };
    assert_job_succeeded(&f.restore(req(&out)).await);
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read(out.join("img/logo.png")).unwrap().len(),
        300_000
    );
    assert!(!out.join("cache").exists());
    // Never into a directory with files in it.
    assert_job_failed_at(&f.restore(req(&src)).await, "restore", "not empty");

    // A Docker volume, read from its mountpoint.
    let volume = format!("drover-t-vol-{}", std::process::id());
    let made = std::process::Command::new("docker")
        .args(["volume", "create", &volume])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let mount = String::from_utf8(
        std::process::Command::new("docker")
            .args(["volume", "inspect", "-f", "{{.Mountpoint}}", &volume])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::fs::write(Path::new(mount.trim()).join("data.db"), b"volume bytes").unwrap();
    f.apply(&format!("name = \"vol\"\n[volume]\nname = \"{volume}\"\n"))
        .await;
    assert_job_succeeded(&f.backup("vol").await);
    let vb = f.backups("vol").await.remove(0);
    let out = f.dir.path().join("vol-restored");
    let mut r = req(&out);
    r.target = "vol".into();
    r.backup_id = vb.id.clone();
    assert_job_succeeded(&f.restore(r).await);
    assert_eq!(std::fs::read(out.join("data.db")).unwrap(), b"volume bytes");
    let _ = std::process::Command::new("docker")
        .args(["volume", "rm", "-f", &volume])
        .output();
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_takes_its_pre_deploy_backup_first_and_stops_when_it_fails() {
    use drover_e2e::deploys::{AppGuard, spec, test_repo};
    if !docker_available("a_deploy_takes_its_pre_deploy_backup_first") {
        return;
    }
    let app = "prebackup";
    let _guard = AppGuard(app.into());
    let repo = test_repo(app, &["v1.0.0", "v1.1.0"]);
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", drover_e2e::free_port())
        .parse()
        .unwrap();
    let spec = spec(app, &repo, listen, "pre_deploy_backup = \"app-files\"");
    let f = backup_fixture().await;
    let files = f.dir.path().join("app-files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("state.json"), b"{}").unwrap();
    let target = format!(
        "name = \"app-files\"\napp = \"{app}\"\n[path]\ndir = \"{}\"\n",
        files.display()
    );
    f.apply(&target).await;
    // Through the controller, which attaches the stored target to the deploy's command (it
    // keeps a catalog only from a job it sent).
    f.controller
        .admin()
        .apply_app(v1::ApplyAppRequest {
            spec_toml: spec.clone(),
            source: "prebackup.toml".into(),
        })
        .await
        .expect("apply the app");
    let fx = &f;
    let run = |version: &'static str| async move {
        let f = fx;
        let id = f
            .controller
            .admin()
            .deploy(v1::DeployRequest {
                app: app.into(),
                version: version.into(),
                ..Default::default()
            })
            .await
            .expect("deploy")
            .into_inner()
            .id;
        let done = f
            .controller
            .wait_job(&f.agent().host, &id, Duration::from_secs(90))
            .await;
        let steps: Vec<String> = f
            .controller
            .job_events(&f.agent().host, &id)
            .iter()
            .filter(|e| {
                e.kind == drover_model::jobevent::STEP && event_field(e, field::STATUS) != "started"
            })
            .map(|e| {
                format!(
                    "{}:{}",
                    event_field(e, field::STEP),
                    event_field(e, field::STATUS)
                )
            })
            .collect();
        (done, steps)
    };
    let (done, steps) = run("v1.0.0").await;
    assert_job_succeeded(&done);
    assert_eq!(steps[2], "backup:done", "{steps:?}");
    // The second deploy's backup records the release live when it was taken.
    let (done, _) = run("v1.1.0").await;
    assert_job_succeeded(&done);
    let list = f.backups("app-files").await;
    assert_eq!(list.len(), 2, "{list:#?}");
    assert!(list.iter().all(|b| b.trigger == "pre_deploy"), "{list:#?}");
    assert_eq!(list[0].release, format!("{app} v1.0.0"), "{list:#?}");

    // A backup that fails stops the deploy before anything changes.
    std::fs::remove_dir_all(&files).unwrap();
    let (done, steps) = run("v1.0.0").await;
    assert_job_failed_at(&done, "backup", "check");
    assert_eq!(steps.last().unwrap(), "backup:failed", "{steps:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_in_a_container_is_dumped_and_restored_through_docker_exec() {
    use drover_e2e::pg::PgContainer;
    if !docker_available("a_database_in_a_container_is_dumped_and_restored") {
        return;
    }
    let db = PgContainer::start();
    db.create_db("crm");
    db.psql(
        "crm",
        "CREATE TABLE contacts (id int PRIMARY KEY, email text, score int);
         INSERT INTO contacts SELECT i, 'user' || i || '@example.net', i % 97 FROM generate_series(1, 4000) i;
         ANALYZE;",
    );
    let f = backup_fixture().await;
    f.apply(&format!(
        "name = \"crm-db\"\n[postgres]\ncontainer = \"{}\"\ndatabases = [\"crm\"]\n",
        db.name
    ))
    .await;
    assert_job_succeeded(&f.backup("crm-db").await);
    let b = f.backups("crm-db").await.remove(0);
    let manifest: serde_json::Value = serde_json::from_str(&b.manifest_json).unwrap();
    assert_eq!(
        manifest["parts"][0]["tables"][0]["rows"], 4000,
        "{manifest}"
    );
    let req = |to: &str, confirmed: bool| v1::RestoreRequest {
        target: "crm-db".into(),
        backup_id: b.id.clone(),
        part: String::new(),
        to_database: to.into(),
        to_dir: String::new(),
        confirmed,
        identity_file: String::new(),
    };
    assert_job_succeeded(&f.restore(req("crm_copy", false)).await);
    assert_eq!(
        db.table_contents("crm_copy", "contacts"),
        db.table_contents("crm", "contacts")
    );
    // Over the live database, confirmed: the emergency backup comes first.
    db.psql("crm", "UPDATE contacts SET score = -1");
    assert_job_succeeded(&f.restore(req("crm", true)).await);
    assert_eq!(
        db.table_contents("crm", "contacts"),
        db.table_contents("crm_copy", "contacts")
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drover_binary_backs_up_lists_shows_prunes_and_restores() {
    let f = backup_fixture().await;
    let addr = f.controller.addr.to_string();
    let admin = f.controller.admin_dir();
    let cli = |args: &[&str]| {
        let out = drover_e2e::drover_cli(&addr, &admin, args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let src = f.dir.path().join("site");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("index.html"), b"<h1>hi</h1>").unwrap();
    let file = f.dir.path().join("site.toml");
    std::fs::write(
        &file,
        format!("name = \"site\"\n[path]\ndir = \"{}\"\n", src.display()),
    )
    .unwrap();
    let bad = f.dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"site\"\n[path]\ndir = \"relative\"\n").unwrap();

    let (code, out, err) = cli(&["backup-target", "apply", file.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["changed"],
        true
    );
    let (code, _, err) = cli(&["backup-target", "apply", bad.to_str().unwrap()]);
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("path.dir"),
        "{err}"
    );

    let (code, out, err) = cli(&["backup", "run", "site", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("job.finished"), "{out}");
    // The job line names the target, and no release (a backup has none).
    assert!(out.contains("\"backup site asked by "), "{out}");
    assert!(!out.contains("previous release"), "{out}");
    // The catalog event follows job.finished: wait until the controller has it.
    assert_eq!(f.backups("site").await.len(), 1);
    let (code, out, err) = cli(&["backup", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["target"], "site");
    assert!(list[0]["size_bytes"].as_u64().unwrap() > 0, "{list}");
    assert_eq!(list[0]["manifest"]["parts"][0]["name"], "files", "{list}");
    // The manifest names the host that took it, in the catalog and on disk.
    assert_eq!(list[0]["manifest"]["host"], "db-1", "{list}");
    let local_dir = list[0]["local_dir"].as_str().unwrap();
    let on_disk: serde_json::Value = serde_json::from_slice(
        &std::fs::read(std::path::Path::new(local_dir).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(on_disk["host"], "db-1", "{on_disk}");
    let (code, out, _) = cli(&["backup", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("local"), "{out}");
    let (code, out, _) = cli(&["backup", "show", &id]);
    assert_eq!(code, 0);
    assert!(
        out.contains("part files") && out.contains("sha256"),
        "{out}"
    );
    let (code, _, err) = cli(&["backup", "show", "site-nope"]);
    assert_eq!(code, 68, "{err}");
    let (code, out, err) = cli(&["backup", "prune", "site", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nothing to delete"), "{out}");

    let dest = f.dir.path().join("site-restored");
    let dest_s = dest.to_str().unwrap();
    let (code, out, err) = cli(&["restore", "site", "--backup", &id, "--to-dir", dest_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read(dest.join("index.html")).unwrap(),
        b"<h1>hi</h1>"
    );
    let (code, _, err) = cli(&["restore", "site", "--backup", &id, "--to-dir", dest_s]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty"), "{err}");
    let (code, _, err) = cli(&["restore", "site", "--backup", &id, "--to", "db"]);
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("--to-dir"), "{err}");
    f.stop().await;
}
