//! The agent's PostgreSQL tools against real servers: a cluster on the host and a
//! `drover-postgres:15` container reached through the Docker exec API. Round trips (facts,
//! dump, restore, identical contents), a missing database, a pg_dump killed mid-dump, a
//! garbage archive, wrong passwords that never show.

use std::io::{Read, Write};

use drover_agent::docker::{self, DockerClient};
use drover_agent::postgres::{self, Conn, Dump, PgError, RestoreOpts, RestoreSink};
use drover_e2e::pg::{HostPg, PgContainer};

/// Three tables in two schemas: text (with quotes, unicode, NULLs), numbers, timestamps.
const SAMPLE_SQL: &str = "
CREATE TABLE people (id serial PRIMARY KEY, name text NOT NULL, note text);
INSERT INTO people (name, note)
  SELECT 'person ' || g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'it''s \"note\" ✓ ' || md5(g::text) END
  FROM generate_series(1, 3000) g;
CREATE TABLE amounts (id int PRIMARY KEY, amount numeric(12,2), ratio double precision,
  at timestamptz);
INSERT INTO amounts
  SELECT g, g * 1.25, g / 3.0, timestamptz '2024-01-01 00:00+00' + g * interval '1 minute'
  FROM generate_series(1, 2000) g;
CREATE SCHEMA inventory;
CREATE TABLE inventory.items (sku text PRIMARY KEY, qty bigint NOT NULL);
INSERT INTO inventory.items SELECT 'sku-' || g, g::bigint * 1000000007 FROM generate_series(1, 500) g;
ANALYZE;
";

const TABLES: [&str; 3] = ["people", "amounts", "inventory.items"];

fn host(pg: &HostPg) -> Conn {
    Conn::Host {
        url: pg.url.clone(),
        password_file: None,
    }
}

/// Reads the whole dump on a blocking thread, as the pipeline does.
async fn read_all(mut dump: Dump) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut archive = Vec::new();
        dump.read_to_end(&mut archive).map(|_| archive)
    })
    .await
    .unwrap()
}

/// Writes `archive` into the sink and finishes it on a blocking thread.
async fn write_all(mut sink: RestoreSink, archive: Vec<u8>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        // A write may fail first (pg_restore gave up); its message is pg_restore's.
        if let Err(e) = sink.write_all(&archive) {
            return Err(e.to_string());
        }
        sink.finish().map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

fn assert_sample_facts(facts: &postgres::Facts, database: &str) {
    assert_eq!(facts.database, database);
    assert!(facts.server_version.starts_with("15."), "{facts:?}");
    assert!(facts.pg_dump_version.starts_with("15."), "{facts:?}");
    assert!(facts.size_bytes > 1_000_000, "{facts:?}");
    let tables: Vec<(&str, &str, i64)> = facts
        .tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str(), t.row_estimate))
        .collect();
    assert_eq!(
        tables,
        vec![
            ("inventory", "items", 500),
            ("public", "amounts", 2000),
            ("public", "people", 3000),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_round_trip_keeps_every_row() {
    let Some(pg) = HostPg::start() else { return };
    let docker = docker::connect("");
    let conn = host(&pg);
    pg.create_db("shop");
    pg.psql("shop", SAMPLE_SQL);

    let facts = postgres::facts(&docker, &conn, "shop").await.unwrap();
    assert_sample_facts(&facts, "shop");

    let dump = postgres::dump(&docker, &conn, "shop", &[]).await.unwrap();
    assert!(dump.pid().is_some());
    let archive = read_all(dump).await.unwrap();
    assert!(archive.starts_with(b"PGDMP"), "not a custom-format archive");

    let toc = postgres::list_host(&mut archive.as_slice()).unwrap();
    assert!(
        toc.iter().any(|l| l.contains("TABLE DATA public people")),
        "{toc:#?}"
    );
    assert!(toc.iter().any(|l| l.contains("TABLE DATA inventory items")));

    assert!(
        !postgres::database_exists(&docker, &conn, "shop copy")
            .await
            .unwrap()
    );
    postgres::create_database(&docker, &conn, "shop copy")
        .await
        .unwrap();
    assert!(
        postgres::database_exists(&docker, &conn, "shop copy")
            .await
            .unwrap()
    );
    let opts = RestoreOpts {
        single_transaction: true,
        ..RestoreOpts::default()
    };
    let sink = postgres::restore(&docker, &conn, "shop copy", &opts)
        .await
        .unwrap();
    write_all(sink, archive.clone()).await.unwrap();
    for table in TABLES {
        let original = pg.table_contents("shop", table);
        assert!(original.len() >= 500);
        assert_eq!(original, pg.table_contents("shop copy", table), "{table}");
    }

    // Restoring again over the same objects needs --clean.
    let opts = RestoreOpts {
        clean: true,
        single_transaction: true,
        no_owner: true,
    };
    let sink = postgres::restore(&docker, &conn, "shop copy", &opts)
        .await
        .unwrap();
    write_all(sink, archive).await.unwrap();
    assert_eq!(
        pg.table_contents("shop", "people"),
        pg.table_contents("shop copy", "people")
    );

    postgres::drop_database(&docker, &conn, "shop copy")
        .await
        .unwrap();
    assert!(
        !postgres::database_exists(&docker, &conn, "shop copy")
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_round_trip_through_the_exec_api() {
    if !drover_e2e::docker_available("container_round_trip_through_the_exec_api") {
        return;
    }
    let db = PgContainer::start();
    let docker = docker::connect("");
    let conn = Conn::container(&db.name);
    postgres::create_database(&docker, &conn, "shop")
        .await
        .unwrap();
    db.psql("shop", SAMPLE_SQL);

    let facts = postgres::facts(&docker, &conn, "shop").await.unwrap();
    assert_sample_facts(&facts, "shop");

    let dump = postgres::dump(&docker, &conn, "shop", &[]).await.unwrap();
    assert_eq!(dump.pid(), None);
    let archive = read_all(dump).await.unwrap();
    assert!(archive.starts_with(b"PGDMP"), "not a custom-format archive");
    // The container's pg_dump wrote it; the host's pg_restore can read it.
    assert!(postgres::list_host(&mut archive.as_slice()).unwrap().len() > 6);

    postgres::create_database(&docker, &conn, "restored")
        .await
        .unwrap();
    let sink = postgres::restore(&docker, &conn, "restored", &RestoreOpts::default())
        .await
        .unwrap();
    write_all(sink, archive).await.unwrap();
    for table in TABLES {
        let original = db.table_contents("shop", table);
        assert!(original.len() >= 500);
        assert_eq!(original, db.table_contents("restored", table), "{table}");
    }

    // A garbage archive through exec: pg_restore's own complaint comes back.
    let sink = postgres::restore(&docker, &conn, "restored", &RestoreOpts::default())
        .await
        .unwrap();
    let err = write_all(sink, b"not an archive\n".repeat(100))
        .await
        .unwrap_err();
    assert!(err.contains("pg_restore"), "{err}");
    assert!(err.contains("valid archive"), "{err}");

    // A database that does not exist, in the container.
    let err = postgres::facts(&docker, &conn, "nowhere")
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::NoDatabase { .. }), "{err}");
    assert!(
        err.to_string().contains("\"nowhere\" does not exist"),
        "{err}"
    );
    assert!(err.to_string().contains(&db.name), "{err}");
    let dump = postgres::dump(&docker, &conn, "nowhere", &[])
        .await
        .unwrap();
    let err = read_all(dump).await.unwrap_err().to_string();
    assert!(
        err.contains("pg_dump") && err.contains("\"nowhere\" does not exist"),
        "{err}"
    );

    postgres::drop_database(&docker, &conn, "restored")
        .await
        .unwrap();
    assert!(
        !postgres::database_exists(&docker, &conn, "restored")
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_is_named_plainly() {
    let Some(pg) = HostPg::start() else { return };
    let docker = docker::connect("");
    let conn = host(&pg);

    assert!(
        !postgres::database_exists(&docker, &conn, "ghost")
            .await
            .unwrap()
    );
    let err = postgres::facts(&docker, &conn, "ghost").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "psql: database \"ghost\" does not exist at 127.0.0.1:{}",
            pg.port
        )
    );

    let dump = postgres::dump(&docker, &conn, "ghost", &[]).await.unwrap();
    let err = read_all(dump).await.unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "pg_dump: database \"ghost\" does not exist at 127.0.0.1:{}",
            pg.port
        )
    );

    // Said before any archive byte is needed.
    let err = postgres::restore(&docker, &conn, "ghost", &RestoreOpts::default())
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::NoDatabase { .. }), "{err}");

    // Nothing listens: refused, and where.
    let closed = drover_e2e::free_port();
    let nobody = Conn::Host {
        url: format!("postgresql://postgres@127.0.0.1:{closed}/"),
        password_file: None,
    };
    let err = postgres::facts(&docker, &nobody, "x").await.unwrap_err();
    assert!(matches!(err, PgError::Refused { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{closed}: connection refused")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pg_dump_is_never_a_successful_dump() {
    let Some(pg) = HostPg::start() else { return };
    let docker = docker::connect("");
    let conn = host(&pg);
    pg.create_db("big");
    // About 20 MB uncompressed: far more than a pipe holds, so pg_dump is mid-way when killed.
    pg.psql(
        "big",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad \
         FROM generate_series(1, 300000) g",
    );
    let mut dump = postgres::dump(&docker, &conn, "big", &[]).await.unwrap();
    let pid = dump.pid().unwrap();
    let result = tokio::task::spawn_blocking(move || {
        let mut first = vec![0u8; 64 * 1024];
        dump.read_exact(&mut first).expect("the first 64 KiB");
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let mut rest = Vec::new();
        let err = dump.read_to_end(&mut rest).unwrap_err();
        // Asked again, it still fails: EOF never comes.
        let again = dump.read(&mut [0u8; 16]).unwrap_err();
        (first.len() + rest.len(), err.to_string(), again.to_string())
    })
    .await
    .unwrap();
    let (read, err, again) = result;
    assert!(
        read < 20_000_000,
        "read {read} bytes: the kill came too late"
    );
    assert!(err.contains("pg_dump"), "{err}");
    assert!(err.contains("signal 9 (SIGKILL)"), "{err}");
    assert!(err.contains("\"big\""), "{err}");
    assert_eq!(err, again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_archive_fails_the_restore_with_pg_restores_message() {
    let Some(pg) = HostPg::start() else { return };
    let docker = docker::connect("");
    let conn = host(&pg);
    pg.create_db("target");

    let sink = postgres::restore(&docker, &conn, "target", &RestoreOpts::default())
        .await
        .unwrap();
    let err = write_all(sink, b"this is not a pg_dump archive\n".repeat(100))
        .await
        .unwrap_err();
    assert!(
        err.starts_with("pg_restore on database \"target\""),
        "{err}"
    );
    assert!(
        err.contains("input file does not appear to be a valid archive"),
        "{err}"
    );

    // So large that pg_restore quits while it is still being written: the write fails, and
    // says why in pg_restore's words.
    let sink = postgres::restore(&docker, &conn, "target", &RestoreOpts::default())
        .await
        .unwrap();
    let err = write_all(sink, vec![b'x'; 8 * 1024 * 1024])
        .await
        .unwrap_err();
    assert!(err.contains("valid archive"), "{err}");

    // A truncated real archive fails as well.
    pg.psql(
        "target",
        "CREATE TABLE t AS SELECT generate_series(1, 5000) AS n",
    );
    let archive = read_all(postgres::dump(&docker, &conn, "target", &[]).await.unwrap())
        .await
        .unwrap();
    pg.create_db("target2");
    let sink = postgres::restore(&docker, &conn, "target2", &RestoreOpts::default())
        .await
        .unwrap();
    let err = write_all(sink, archive[..archive.len() / 2].to_vec())
        .await
        .unwrap_err();
    assert!(
        err.starts_with("pg_restore on database \"target2\""),
        "{err}"
    );
    // `pg_restore --list` reads only the table of contents at the front: it does not notice a
    // cut-off archive, which is why verification restores for real.
    assert!(postgres::list_host(&mut &archive[..archive.len() / 2]).is_ok());
    assert!(
        postgres::list_host(&mut &b"garbage"[..])
            .unwrap_err()
            .to_string()
            .contains("valid archive")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_show_in_errors_or_arguments() {
    let Some(pg) = HostPg::start() else { return };
    let docker: DockerClient = docker::connect("");
    const RIGHT: &str = "Right-Horse-Battery-42";
    const WRONG: &str = "Wr0ng-Passw0rd-Staple";
    pg.require_password("app", RIGHT);
    pg.create_db("secure");
    pg.psql(
        "secure",
        "CREATE TABLE s AS SELECT generate_series(1, 200000) AS n",
    );

    // A wrong password in the URL: authentication failed, the password nowhere.
    let wrong = Conn::Host {
        url: format!("postgresql://app:{WRONG}@127.0.0.1:{}/", pg.port),
        password_file: None,
    };
    assert!(!format!("{wrong:?}").contains(WRONG));
    let err = postgres::facts(&docker, &wrong, "secure")
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::AuthFailed { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "psql: authentication failed for user \"app\" at 127.0.0.1:{}: password authentication failed",
            pg.port
        )
    );
    assert!(!format!("{err:?}").contains(WRONG));
    let dump = postgres::dump(&docker, &wrong, "secure", &[])
        .await
        .unwrap();
    let err = read_all(dump).await.unwrap_err().to_string();
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains(WRONG), "{err}");
    let err = postgres::database_exists(&docker, &wrong, "secure")
        .await
        .unwrap_err();
    assert!(!err.to_string().contains(WRONG), "{err}");

    // No password at all: said plainly.
    let none = Conn::Host {
        url: format!("postgresql://app@127.0.0.1:{}/", pg.port),
        password_file: None,
    };
    let err = postgres::facts(&docker, &none, "secure").await.unwrap_err();
    assert!(matches!(err, PgError::AuthFailed { .. }), "{err}");

    // The right one from a password file (it wins over the URL's) works, and the running
    // pg_dump's command line does not hold it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgpass");
    std::fs::write(&file, format!("{RIGHT}\n")).unwrap();
    let right = Conn::Host {
        url: format!("postgresql://app:{WRONG}@127.0.0.1:{}/", pg.port),
        password_file: Some(file),
    };
    let facts = postgres::facts(&docker, &right, "secure").await.unwrap();
    assert_eq!(facts.tables.len(), 1);
    let mut dump = postgres::dump(&docker, &right, "secure", &[])
        .await
        .unwrap();
    let pid = dump.pid().unwrap();
    let archive = tokio::task::spawn_blocking(move || {
        let mut first = vec![0u8; 4096];
        dump.read_exact(&mut first).unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("pg_dump"), "{cmdline}");
        assert!(cmdline.contains("app@127.0.0.1"), "{cmdline}");
        assert!(
            !cmdline.contains(RIGHT) && !cmdline.contains(WRONG),
            "{cmdline}"
        );
        let mut rest = Vec::new();
        dump.read_to_end(&mut rest).unwrap();
        first.len() + rest.len()
    })
    .await
    .unwrap();
    assert!(archive > 100_000);

    // An unreadable password file is named, not guessed around.
    let missing = Conn::Host {
        url: pg.url.clone(),
        password_file: Some(dir.path().join("absent")),
    };
    let err = postgres::facts(&docker, &missing, "secure")
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::PasswordFile { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pg_dump_in_a_container_fails_the_read() {
    if !drover_e2e::docker_available("a_killed_pg_dump_in_a_container_fails_the_read") {
        return;
    }
    let db = PgContainer::start();
    let docker = docker::connect("");
    let conn = Conn::container(&db.name);
    db.create_db("big");
    db.psql(
        "big",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad \
         FROM generate_series(1, 300000) g",
    );
    let mut dump = postgres::dump(&docker, &conn, "big", &[]).await.unwrap();
    let name = db.name.clone();
    let err = tokio::task::spawn_blocking(move || {
        let mut first = vec![0u8; 64 * 1024];
        dump.read_exact(&mut first).expect("the first 64 KiB");
        // Keep reading while the kill runs: the Engine reports an exec's end (the kill's too)
        // only once the killed command's output has been taken.
        let mut kill = std::process::Command::new("docker")
            .args(["exec", &name, "sh", "-c", "kill -9 $(pidof pg_dump)"])
            .spawn()
            .unwrap();
        let mut rest = Vec::new();
        let err = dump.read_to_end(&mut rest).unwrap_err().to_string();
        assert!(kill.wait().unwrap().success());
        err
    })
    .await
    .unwrap();
    assert!(err.contains("pg_dump"), "{err}");
    assert!(err.contains("killed by signal 9, SIGKILL"), "{err}");
    assert!(err.contains(&db.name), "{err}");

    // A container that is not there is named.
    let gone = Conn::container("drover-no-such-container");
    let err = postgres::facts(&docker, &gone, "big").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("no container named drover-no-such-container"),
        "{err}"
    );
}
