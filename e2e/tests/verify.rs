//! Backup validation end to end, on real parts: a real controller and agent over mTLS, a real
//! PostgreSQL cluster on the host (scratch databases on the same server) and a PostgreSQL
//! container (a throw-away scratch container from the same image). A good backup passes with
//! evidence and is marked verified; each broken one is caught and the job names the failing
//! check: a flipped byte, a truncated file, a valid zstd stream of something that is not an
//! archive or of an empty dump, a wrong age key, an old backup, a restore that needs a role the
//! scratch lacks.

use std::path::PathBuf;
use std::time::Duration;

use drover_e2e::backups::{assert_job_failed_at, assert_job_succeeded, backup_fixture};
use drover_e2e::pg::HostPg;
use drover_e2e::{TestAgent, docker_available, fast_agent_config};
use drover_model::backup::catalog::Backup;
use drover_proto::v1;

/// The first part file of a backup.
fn part_file(b: &v1::BackupInfo) -> PathBuf {
    let manifest: Backup = serde_json::from_str(&b.manifest_json).unwrap();
    PathBuf::from(&b.local_dir).join(&manifest.parts[0].file)
}

fn shop(pg: &HostPg, db: &str) {
    pg.create_db(db);
    pg.psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items SELECT i, md5(i::text) FROM generate_series(1, 5000) i;
         CREATE TABLE orders (id serial PRIMARY KEY, item int REFERENCES items, qty int);
         INSERT INTO orders (item, qty) SELECT 1 + i % 5000, i % 9 FROM generate_series(1, 3000) i;
         ANALYZE;",
    );
}

fn check<'a>(v: &'a v1::VerificationInfo, name: &str) -> &'a v1::VerificationCheck {
    v.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in {v:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_backup_passes_with_evidence_and_each_broken_one_names_its_check() {
    let Some(pg) = HostPg::start() else { return };
    let mut f = backup_fixture().await;
    shop(&pg, "shop");
    let target = format!(
        "name = \"shop-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n[verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\n",
        pg.url
    );
    f.apply(&target).await;

    // No backup yet: `exists` fails.
    assert_job_failed_at(&f.verify("shop-db").await, "exists", "no backup of shop-db");

    // A good backup passes every check, with evidence, and is marked verified.
    assert_job_succeeded(&f.backup("shop-db").await);
    assert_job_succeeded(&f.verify("shop-db").await);
    let history = f.history("shop-db").await;
    let v = &history[0];
    assert!(v.passed, "{v:#?}");
    assert_eq!(v.host, "db-1");
    for name in [
        "exists",
        "age",
        "hash_local",
        "decompress",
        "pg_list",
        "restore",
        "sanity",
        "scratch_removed",
        "disk",
    ] {
        assert_eq!(check(v, name).result, "passed", "{v:#?}");
    }
    assert_eq!(check(v, "hash_remote").result, "skipped");
    assert_eq!(check(v, "sanity").evidence["tables"], "2");
    assert_eq!(check(v, "sanity").evidence["rows"], "8000");
    assert!(
        check(v, "decompress").evidence["plain_bytes"]
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert!(f.newest("shop-db").await.verified_unix_ms > 0);
    // The scratch database is gone.
    let left = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'drover_verify_%'",
    );
    assert_eq!(left.trim(), "0");

    // One flipped byte.
    assert_job_succeeded(&f.backup("shop-db").await);
    let file = part_file(&f.newest("shop-db").await);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    assert_job_failed_at(&f.verify("shop-db").await, "hash_local", "SHA-256");

    // A truncated file.
    assert_job_succeeded(&f.backup("shop-db").await);
    let file = part_file(&f.newest("shop-db").await);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_job_failed_at(&f.verify("shop-db").await, "hash_local", "");

    // A valid zstd stream (its hash in the catalog, so every integrity check passes) of
    // something that is not an archive, and of nothing at all (an empty dump that `gunzip -t`
    // or `zstd -t` would pass): only pg_restore notices.
    let junk = b"SELECT 1;\n".repeat(1000);
    for plain in [&junk[..], &[][..]] {
        assert_job_succeeded(&f.backup("shop-db").await);
        let b = f.newest("shop-db").await;
        let file = part_file(&b);
        let agent = f.agent.take().unwrap();
        let data_dir = agent.data_dir.clone();
        agent.stop().await;
        let packed = zstd::encode_all(plain, 3).unwrap();
        std::fs::write(&file, &packed).unwrap();
        {
            use sha2::Digest;
            let store = drover_agent::store::Store::open(&data_dir.join("store")).unwrap();
            let mut backup = store.backup("shop-db", &b.id).unwrap().unwrap();
            backup.parts[0].size = packed.len() as u64;
            backup.parts[0].sha256 = hex::encode(sha2::Sha256::digest(&packed));
            backup.parts[0].source_bytes = plain.len() as u64;
            store.put_backup(&backup).await.unwrap();
        }
        let mut agent =
            TestAgent::start(fast_agent_config(&data_dir, &f.controller.addr.to_string())).await;
        agent.wait_connected().await;
        f.agent = Some(agent);
        assert_job_failed_at(&f.verify("shop-db").await, "pg_list", "");
        let v = &f.history("shop-db").await[0];
        assert_eq!(check(v, "hash_local").result, "passed", "{v:#?}");
        assert_eq!(check(v, "decompress").result, "passed", "{v:#?}");
    }

    // An old backup: max_age exceeded.
    assert_job_succeeded(&f.backup("shop-db").await);
    f.apply(&format!("{target}max_age = \"1s\"\n")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_job_failed_at(
        &f.verify("shop-db").await,
        "age",
        "older than [verify] max_age",
    );

    // Encrypted: the right key passes, a wrong one is caught at decompress.
    let right = age::x25519::Identity::generate();
    let wrong = age::x25519::Identity::generate();
    let key = |name: &str, id: &age::x25519::Identity| {
        let path = f.dir.path().join(name);
        std::fs::write(
            &path,
            age::secrecy::ExposeSecret::expose_secret(&id.to_string()),
        )
        .unwrap();
        path
    };
    let (right_file, wrong_file) = (key("right.key", &right), key("wrong.key", &wrong));
    let encrypted = |identity: &PathBuf| {
        format!(
            "name = \"shop-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n[encryption]\nrecipients = [\"{}\"]\n[verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\nidentity_file = \"{}\"\n",
            pg.url,
            right.to_public(),
            identity.display()
        )
    };
    f.apply(&encrypted(&right_file)).await;
    assert_job_succeeded(&f.backup("shop-db").await);
    assert_job_succeeded(&f.verify("shop-db").await);
    f.apply(&encrypted(&wrong_file)).await;
    assert_job_failed_at(&f.verify("shop-db").await, "decompress", "");

    // The history keeps every run, newest first.
    let history = f.history("shop-db").await;
    let results: Vec<(bool, Vec<String>)> = history
        .iter()
        .map(|v| {
            (
                v.passed,
                v.checks
                    .iter()
                    .filter(|c| c.result == "failed")
                    .map(|c| c.name.clone())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(results.len(), 9, "{results:?}");
    assert!(
        !results[0].0 && results[0].1[0] == "decompress",
        "{results:?}"
    );
    assert!(results[1].0, "{results:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_backup_restores_into_a_scratch_from_the_same_image_and_a_missing_role_fails() {
    use drover_e2e::pg::PgContainer;
    if !docker_available("a_container_backup_restores_into_a_scratch") {
        return;
    }
    let db = PgContainer::start();
    db.create_db("crm");
    db.psql(
        "crm",
        "CREATE TABLE contacts (id int PRIMARY KEY, email text);
         INSERT INTO contacts SELECT i, 'user' || i || '@example.net' FROM generate_series(1, 4000) i;
         ANALYZE;",
    );
    let f = backup_fixture().await;
    f.apply(&format!(
        "name = \"crm-db\"\n[postgres]\ncontainer = \"{}\"\ndatabases = [\"crm\"]\n[verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\n",
        db.name
    ))
    .await;
    assert_job_succeeded(&f.backup("crm-db").await);
    assert_job_succeeded(&f.verify("crm-db").await);
    let v = &f.history("crm-db").await[0];
    assert!(
        check(v, "restore")
            .message
            .contains("container drover-verify-db-1-crm-db-"),
        "{v:#?}"
    );
    assert_eq!(check(v, "sanity").evidence["rows"], "4000", "{v:#?}");
    assert_eq!(check(v, "scratch_removed").result, "passed");

    // A table owned by a role the scratch server does not have: the restore fails.
    db.psql(
        "crm",
        "CREATE ROLE app_owner; ALTER TABLE contacts OWNER TO app_owner;",
    );
    assert_job_succeeded(&f.backup("crm-db").await);
    assert_job_failed_at(&f.verify("crm-db").await, "restore", "app_owner");
    let v = &f.history("crm-db").await[0];
    assert_eq!(check(v, "scratch_removed").result, "passed", "{v:#?}");
    // No scratch container is left.
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            "name=drover-verify-db-1-crm-db-",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    f.stop().await;
}
