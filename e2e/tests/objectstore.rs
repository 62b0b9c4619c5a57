//! `drover_agent::objectstore` against a real S3-compatible server (s3s + s3s-fs on
//! 127.0.0.1, signatures checked): multipart upload, read-back hashes, download, list, delete,
//! and the errors an operator meets (refused credentials, missing bucket, corrupt object,
//! unsafe credentials file, plain HTTP off loopback, endpoint down).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use drover_agent::objectstore::{ObjectStoreError, Remote, S3Config};
use drover_e2e::s3::{S3Server, write_credentials};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const ACCESS_KEY: &str = "AKIDDROVERTEST";
const SECRET: &str = "drover-test-secret-5f9a1c7e0b";

fn config(server: &S3Server, credentials_file: &Path) -> S3Config {
    S3Config {
        endpoint: server.endpoint.clone(),
        bucket: server.bucket.clone(),
        prefix: "drover/test".to_string(),
        region: "us-east-1".to_string(),
        credentials_file: credentials_file.to_path_buf(),
    }
}

/// A file of `len` random bytes; returns its SHA-256.
fn random_file(path: &Path, len: usize, seed: u64) -> String {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
    hex::encode(Sha256::digest(&data))
}

async fn setup() -> (S3Server, tempfile::TempDir, Remote) {
    drover_e2e::init();
    let server = S3Server::start(ACCESS_KEY, SECRET, "backups").await;
    let dir = tempfile::tempdir().unwrap();
    let creds = write_credentials(dir.path(), "s3.toml", ACCESS_KEY, SECRET);
    let remote = Remote::open(&config(&server, &creds)).expect("open remote");
    (server, dir, remote)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_read_back_download_list_delete() {
    let (server, dir, remote) = setup().await;
    let local = dir.path().join("big.zst");
    let size = 20 * 1024 * 1024 + 4321;
    let sha = random_file(&local, size, 1);

    let mut calls = Vec::new();
    remote
        .upload_file(&local, "db/big.zst", &mut |sent| calls.push(sent))
        .await
        .expect("upload");
    assert!(
        calls.len() > 10,
        "streamed in chunks: {} calls",
        calls.len()
    );
    assert_eq!(calls.last().copied(), Some(size as u64));
    assert!(server.object_path("drover/test/db/big.zst").is_file());

    assert_eq!(
        remote.read_back("db/big.zst").await.unwrap(),
        (size as u64, sha.clone())
    );

    let down = dir.path().join("down.zst");
    assert_eq!(
        remote.download_to("db/big.zst", &down).await.unwrap(),
        size as u64
    );
    assert_eq!(
        hex::encode(Sha256::digest(std::fs::read(&down).unwrap())),
        sha
    );
    assert!(!dir.path().join("down.zst.partial").exists());

    // A small file goes up in one request.
    let small = dir.path().join("small.zst");
    let small_sha = random_file(&small, 1000, 2);
    remote
        .upload_file(&small, "db/small.zst", &mut |_| {})
        .await
        .unwrap();
    assert_eq!(
        remote.read_back("db/small.zst").await.unwrap(),
        (1000, small_sha)
    );
    remote
        .put_bytes("db/big.zst.manifest.json", b"{\"v\":1}".to_vec())
        .await
        .unwrap();
    remote.put_bytes("other/x", b"x".to_vec()).await.unwrap();

    assert_eq!(
        remote.list("db").await.unwrap(),
        vec![
            ("db/big.zst".to_string(), size as u64),
            ("db/big.zst.manifest.json".to_string(), 7),
            ("db/small.zst".to_string(), 1000),
        ]
    );
    assert_eq!(remote.list("").await.unwrap().len(), 4);

    remote.delete("db/big.zst").await.unwrap();
    remote.delete("db/big.zst").await.unwrap();
    let left: Vec<String> = remote
        .list("db")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left, ["db/big.zst.manifest.json", "db/small.zst"]);

    let err = remote.read_back("db/big.zst").await.unwrap_err();
    assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err:?}");
    let err = remote
        .download_to("db/big.zst", &dir.path().join("gone"))
        .await
        .unwrap_err();
    assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err:?}");
    assert!(!dir.path().join("gone").exists());
    assert!(!dir.path().join("gone.partial").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_stored_object_reads_back_with_another_hash() {
    let (server, dir, remote) = setup().await;
    let local = dir.path().join("f");
    let sha = random_file(&local, 64 * 1024, 3);
    remote
        .upload_file(&local, "db/f", &mut |_| {})
        .await
        .unwrap();
    assert_eq!(remote.read_back("db/f").await.unwrap().1, sha);

    let stored = server.object_path("drover/test/db/f");
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let (size, corrupt) = remote.read_back("db/f").await.unwrap();
    assert_eq!(size, 64 * 1024);
    assert_ne!(corrupt, sha);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_without_showing_it() {
    drover_e2e::init();
    let server = S3Server::start(ACCESS_KEY, SECRET, "backups").await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wrong-secret-never-shown-3b8d";
    let creds = write_credentials(dir.path(), "s3.toml", ACCESS_KEY, wrong);
    let remote = Remote::open(&config(&server, &creds)).unwrap();
    let local = dir.path().join("f");
    random_file(&local, 1000, 4);

    let err = remote
        .upload_file(&local, "db/f", &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, ObjectStoreError::Credentials { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("S3 refused the credentials in"), "{text}");
    assert!(text.contains(&creds.display().to_string()), "{text}");
    assert!(text.contains("backups"), "{text}");
    for shown in [text, format!("{err:?}"), format!("{remote:?}")] {
        assert!(!shown.contains(wrong), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
    }

    let err = remote.list("").await.unwrap_err();
    assert!(
        matches!(err, ObjectStoreError::Credentials { .. }),
        "{err:?}"
    );

    // An unknown access key too.
    let creds = write_credentials(dir.path(), "s3b.toml", "AKIDUNKNOWN", SECRET);
    let remote = Remote::open(&config(&server, &creds)).unwrap();
    let err = remote.read_back("db/f").await.unwrap_err();
    assert!(
        matches!(err, ObjectStoreError::Credentials { .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_is_named() {
    drover_e2e::init();
    let server = S3Server::start(ACCESS_KEY, SECRET, "backups").await;
    let dir = tempfile::tempdir().unwrap();
    let creds = write_credentials(dir.path(), "s3.toml", ACCESS_KEY, SECRET);
    let cfg = S3Config {
        bucket: "no-such-bucket".to_string(),
        ..config(&server, &creds)
    };
    let remote = Remote::open(&cfg).unwrap();
    // s3s-fs answers NoSuchBucket only on bucket-level calls (it creates the directory on
    // PutObject and says NoSuchKey on GetObject, where real S3 says NoSuchBucket), so a
    // listing is what this server can show.
    let err = remote.list("").await.unwrap_err();
    assert!(matches!(err, ObjectStoreError::NoBucket { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("\"no-such-bucket\" does not exist"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_named() {
    drover_e2e::init();
    let dir = tempfile::tempdir().unwrap();
    let creds = write_credentials(dir.path(), "s3.toml", ACCESS_KEY, SECRET);
    let port = drover_e2e::free_port();
    let cfg = S3Config {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: "backups".to_string(),
        prefix: String::new(),
        region: "us-east-1".to_string(),
        credentials_file: creds,
    };
    let remote = Remote::open(&cfg).unwrap();
    let err = remote.read_back("x").await.unwrap_err();
    assert!(
        matches!(err, ObjectStoreError::Unreachable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("cannot be reached"), "{err}");
}

#[tokio::test]
async fn unsafe_configurations_are_refused() {
    drover_e2e::init();
    let dir = tempfile::tempdir().unwrap();
    let creds = write_credentials(dir.path(), "s3.toml", ACCESS_KEY, SECRET);
    let cfg = S3Config {
        endpoint: "http://s3.example.internal:9000".to_string(),
        bucket: "backups".to_string(),
        prefix: String::new(),
        region: "us-east-1".to_string(),
        credentials_file: creds.clone(),
    };
    let err = Remote::open(&cfg).unwrap_err();
    assert!(matches!(err, ObjectStoreError::Endpoint { .. }), "{err:?}");
    assert!(err.to_string().contains("use https://"), "{err}");

    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = S3Config {
        endpoint: "http://127.0.0.1:9".to_string(),
        ..cfg
    };
    let err = Remote::open(&cfg).unwrap_err();
    assert!(
        matches!(err, ObjectStoreError::CredentialsMode { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
    assert!(
        err.to_string().contains(&creds.display().to_string()),
        "{err}"
    );
}
