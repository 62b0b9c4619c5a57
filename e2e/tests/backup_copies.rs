//! Backups at their edges, end to end on real parts (a real controller and agent over mTLS, a
//! real PostgreSQL cluster on the host, the in-process S3 server, the real `drover` CLI):
//! an empty database backs up, validates and is restored over; identity files in the format
//! `age-keygen` writes decrypt restores and validations, and a failed restore leaves no
//! database behind; a corrupt local copy is reported as such while validation and restore use
//! the intact S3 copy, and a refused restore leaves no fetched copy; a path backup archives
//! its symlinks as symlinks and never what they point to.

use std::path::{Path, PathBuf};

use drover_e2e::backups::{
    BackupFixture, assert_job_failed_at, assert_job_succeeded, backup_fixture, event_field,
};
use drover_e2e::pg::HostPg;
use drover_e2e::s3::{S3Server, write_credentials};
use drover_model::backup::catalog::Backup;
use drover_model::jobevent::field;
use drover_proto::v1;

fn shop(pg: &HostPg, db: &str) {
    pg.create_db(db);
    pg.psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items SELECT i, md5(i::text) FROM generate_series(1, 3000) i;
         ANALYZE;",
    );
}

fn database_exists(pg: &HostPg, db: &str) -> bool {
    pg.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
    ) == "1"
}

fn check<'a>(v: &'a v1::VerificationInfo, name: &str) -> &'a v1::VerificationCheck {
    v.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in {v:#?}"))
}

fn restore_req(target: &str, id: &str, to: &str, identity: &Path) -> v1::RestoreRequest {
    v1::RestoreRequest {
        target: target.into(),
        backup_id: id.into(),
        part: String::new(),
        to_database: to.into(),
        to_dir: String::new(),
        confirmed: true,
        identity_file: identity.display().to_string(),
    }
}

/// The real `drover` CLI against the fixture's controller: (exit code, stdout, stderr).
fn cli(f: &BackupFixture, args: &[&str]) -> (i32, String, String) {
    let out = drover_e2e::drover_cli(
        &f.controller.addr.to_string(),
        &f.controller.admin_dir(),
        args,
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_database_backs_up_validates_and_is_restored_over() {
    let Some(pg) = HostPg::start() else { return };
    let f = backup_fixture().await;
    pg.create_db("blank");
    f.apply(&format!(
        "name = \"blank-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"blank\"]\n[verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\n",
        pg.url
    ))
    .await;
    assert_job_succeeded(&f.backup("blank-db").await);
    assert_job_succeeded(&f.verify("blank-db").await);
    let v = &f.history("blank-db").await[0];
    assert!(v.passed, "{v:#?}");
    for name in ["decompress", "pg_list", "restore", "sanity"] {
        assert_eq!(check(v, name).result, "passed", "{v:#?}");
    }
    assert_eq!(check(v, "sanity").evidence["tables"], "0");

    // Over the existing empty database: its emergency backup works, then the restore.
    let b = f.newest("blank-db").await;
    let done = f
        .restore(restore_req("blank-db", &b.id, "blank", Path::new("")))
        .await;
    assert_job_succeeded(&done);
    let list = f.backups("blank-db").await;
    assert_eq!(
        list.iter().filter(|x| x.trigger == "emergency").count(),
        1,
        "{list:#?}"
    );
    // And into another existing empty database.
    pg.create_db("blank_two");
    assert_job_succeeded(
        &f.restore(restore_req("blank-db", &b.id, "blank_two", Path::new("")))
            .await,
    );
    f.stop().await;
}

/// An identity file written by the real `age-keygen -o` (apt package `age`); without it
/// (outside CI) the same format written with the age crate: `# created:` and `# public key:`
/// comment lines, then the key. Returns (file, public key).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let ran = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .output();
    match ran {
        Ok(out) => assert!(out.status.success(), "age-keygen: {out:?}"),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "age-keygen is needed in CI (apt-get install age): {e}"
            );
            eprintln!("age-keygen missing ({e}): writing its format with the age crate");
            let id = age::x25519::Identity::generate();
            std::fs::write(
                &path,
                format!(
                    "# created: 2026-12-02T03:00:00Z\n# public key: {}\n{}\n",
                    id.to_public(),
                    age::secrecy::ExposeSecret::expose_secret(&id.to_string())
                ),
            )
            .unwrap();
        }
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# created: "), "{text}");
    let public = text
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("a # public key: line")
        .to_string();
    (path, public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_keygen_identity_files_decrypt_and_a_failed_restore_leaves_no_database() {
    let Some(pg) = HostPg::start() else { return };
    let f = backup_fixture().await;
    shop(&pg, "shop");
    let (key, public) = keygen(f.dir.path(), "key.txt");
    let (other, _) = keygen(f.dir.path(), "other.txt");
    // Several keys in one file, the right one last, with a blank line between.
    let both = f.dir.path().join("both.txt");
    std::fs::write(
        &both,
        format!(
            "{}\n{}",
            std::fs::read_to_string(&other).unwrap(),
            std::fs::read_to_string(&key).unwrap()
        ),
    )
    .unwrap();
    f.apply(&format!(
        "name = \"shop-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n[encryption]\nrecipients = [\"{public}\"]\n[verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\nidentity_file = \"{}\"\n",
        pg.url,
        key.display()
    ))
    .await;
    assert_job_succeeded(&f.backup("shop-db").await);
    // [verify] identity_file in age-keygen's format.
    assert_job_succeeded(&f.verify("shop-db").await);
    let b = f.newest("shop-db").await;

    // drover restore --identity-file with age-keygen's file, and with two keys.
    let (code, out, err) = cli(
        &f,
        &[
            "restore",
            "shop-db",
            "--backup",
            &b.id,
            "--to",
            "shop_copy",
            "--yes",
            "--identity-file",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        pg.table_contents("shop_copy", "items"),
        pg.table_contents("shop", "items")
    );
    assert_job_succeeded(
        &f.restore(restore_req("shop-db", &b.id, "shop_two", &both))
            .await,
    );
    assert_eq!(pg.table_contents("shop_two", "items").len(), 3000);

    // A valid key that is not a recipient: the restore fails after creating the database,
    // and the database it created is dropped.
    let failed = f
        .restore(restore_req("shop-db", &b.id, "shop_wrong", &other))
        .await;
    assert_job_failed_at(&failed, "restore", "dropped");
    assert!(!database_exists(&pg, "shop_wrong"), "{failed:#?}");
    // Not an identity file at all: refused at locate, before anything is touched.
    let junk = f.dir.path().join("junk.txt");
    std::fs::write(&junk, "# a comment\nnot-a-key\n").unwrap();
    let refused = f
        .restore(restore_req("shop-db", &b.id, "shop_junk", &junk))
        .await;
    assert_job_failed_at(&refused, "locate", "line 2");
    assert!(!event_field(&refused, field::ERROR).contains("not-a-key"));
    assert!(!database_exists(&pg, "shop_junk"));
    f.stop().await;
}

/// The `<id>.fetch.partial` folders in a target's folder.
fn fetch_partials(target_dir: &Path) -> Vec<String> {
    std::fs::read_dir(target_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".fetch.partial"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_local_copy_is_reported_while_validation_and_restore_use_the_s3_copy() {
    let Some(pg) = HostPg::start() else { return };
    let f = backup_fixture().await;
    shop(&pg, "shop");
    let s3 = S3Server::start("AKTEST", "s3cr3t-key-0123456789", "backups").await;
    let creds = write_credentials(f.dir.path(), "s3.toml", "AKTEST", "s3cr3t-key-0123456789");
    f.apply(&format!(
        "name = \"shop-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"shop\"]\n\
         [storage.s3]\nendpoint = \"{}\"\nbucket = \"backups\"\nprefix = \"prod\"\ncredentials_file = \"{}\"\n\
         [verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\n",
        pg.url,
        s3.endpoint,
        creds.display()
    ))
    .await;
    assert_job_succeeded(&f.backup("shop-db").await);
    let b = f.newest("shop-db").await;
    assert!(
        b.verified_unix_ms > 0 && b.local_corrupt.is_empty(),
        "{b:#?}"
    );
    let manifest: Backup = serde_json::from_str(&b.manifest_json).unwrap();
    let local = Path::new(&b.local_dir).join(&manifest.parts[0].file);
    let target_dir = Path::new(&b.local_dir).parent().unwrap().to_path_buf();
    let mut bytes = std::fs::read(&local).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&local, &bytes).unwrap();

    // The restore says which copy it used and why, and the catalog marks the local copy.
    let (code, out, err) = cli(
        &f,
        &[
            "restore", "shop-db", "--backup", &b.id, "--to", "shop_s3", "--yes",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(
        said.contains(
            "local copy corrupt (sha256 mismatch), restored from S3 copy s3://backups/prod/shop-db/"
        ),
        "{said}"
    );
    assert_eq!(
        pg.table_contents("shop_s3", "items"),
        pg.table_contents("shop", "items")
    );
    assert!(fetch_partials(&target_dir).is_empty());
    let marked = f.newest("shop-db").await;
    assert_eq!(
        marked.local_corrupt, "corrupt (sha256 mismatch)",
        "{marked:#?}"
    );
    assert_eq!(marked.verified_unix_ms, 0, "{marked:#?}");
    let (code, out, err) = cli(&f, &["backup", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("local (corrupt)+s3"), "{out}");
    assert!(out.contains("no (local corrupt)"), "{out}");

    // Validation runs every content check on the S3 copy and reports the local one.
    let done = f.verify("shop-db").await;
    assert_job_failed_at(&done, "hash_local", "SHA-256");
    assert!(
        event_field(&done, field::ERROR).contains("the checks ran on the S3 copy"),
        "{done:#?}"
    );
    let v = &f.history("shop-db").await[0];
    assert_eq!(check(v, "hash_local").result, "failed", "{v:#?}");
    for name in [
        "hash_remote",
        "decompress",
        "pg_list",
        "restore",
        "sanity",
        "scratch_removed",
    ] {
        assert_eq!(check(v, name).result, "passed", "{name}: {v:#?}");
    }
    assert_eq!(check(v, "sanity").evidence["rows"], "3000", "{v:#?}");
    assert!(check(v, "decompress").message.contains("S3 copy"), "{v:#?}");
    assert_eq!(v.copy, "remote", "{v:#?}");
    assert_eq!(v.local_corrupt, "corrupt (sha256 mismatch)", "{v:#?}");
    assert!(!v.passed);
    assert!(fetch_partials(&target_dir).is_empty());
    let still = f.newest("shop-db").await;
    assert!(!still.local_corrupt.is_empty() && still.verified_unix_ms == 0);

    // Both copies corrupt: refused, and the fetched copy is not left behind.
    let object = s3.object_path(&format!("prod/shop-db/{}/{}", b.id, manifest.parts[0].file));
    let mut remote = std::fs::read(&object).unwrap();
    remote[middle] ^= 0x01;
    std::fs::write(&object, &remote).unwrap();
    let refused = f
        .restore(restore_req("shop-db", &b.id, "shop_bad", Path::new("")))
        .await;
    assert_job_failed_at(&refused, "locate", "remote copy is unusable");
    assert!(
        fetch_partials(&target_dir).is_empty(),
        "{:?}",
        fetch_partials(&target_dir)
    );
    assert!(!database_exists(&pg, "shop_bad"));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_backup_archives_symlinks_as_symlinks_never_their_targets() {
    let f = backup_fixture().await;
    let secret = f.dir.path().join("secrets");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("shadow"), b"root:$6$never-archived").unwrap();
    let src = f.dir.path().join("site");
    std::fs::create_dir_all(src.join("img")).unwrap();
    std::fs::write(src.join("img/logo.png"), b"png bytes").unwrap();
    std::os::unix::fs::symlink(&secret, src.join("etc")).unwrap();
    std::os::unix::fs::symlink("../../secrets/shadow", src.join("img/key")).unwrap();
    f.apply(&format!(
        "name = \"site\"\n[path]\ndir = \"{}\"\n",
        src.display()
    ))
    .await;
    assert_job_succeeded(&f.backup("site").await);
    let b = f.newest("site").await;
    let manifest: Backup = serde_json::from_str(&b.manifest_json).unwrap();
    let stored = std::fs::read(Path::new(&b.local_dir).join(&manifest.parts[0].file)).unwrap();
    let plain = zstd::decode_all(&stored[..]).unwrap();
    let needle = b"never-archived";
    assert!(
        !plain.windows(needle.len()).any(|w| w == needle),
        "a symlink's target was archived"
    );

    let out = f.dir.path().join("restored");
    let done = f
        .restore(v1::RestoreRequest {
            target: "site".into(),
            backup_id: b.id.clone(),
            part: String::new(),
            to_database: String::new(),
            to_dir: out.display().to_string(),
            confirmed: false,
            identity_file: String::new(),
        })
        .await;
    assert_job_succeeded(&done);
    assert_eq!(
        std::fs::read(out.join("img/logo.png")).unwrap(),
        b"png bytes"
    );
    for (link, target) in [
        ("etc", secret.clone()),
        ("img/key", PathBuf::from("../../secrets/shadow")),
    ] {
        let meta = std::fs::symlink_metadata(out.join(link)).unwrap();
        assert!(meta.file_type().is_symlink(), "{link} is not a symlink");
        assert_eq!(std::fs::read_link(out.join(link)).unwrap(), target);
    }
    f.stop().await;
}
