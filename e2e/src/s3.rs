//! A real S3-compatible server for tests: the `s3s` service over `s3s-fs` (objects are plain
//! files under a temporary directory, one directory per bucket), served in this process on
//! 127.0.0.1 with signature checking for one access key.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An S3 server on 127.0.0.1, stopped when dropped.
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    pub bucket: String,
    /// The directory the buckets live in.
    pub root: PathBuf,
    _dir: tempfile::TempDir,
    task: JoinHandle<()>,
}

impl S3Server {
    /// Starts a server that accepts only `access_key`/`secret` and holds one empty `bucket`.
    pub async fn start(access_key: &str, secret: &str, bucket: &str) -> S3Server {
        let dir = tempfile::tempdir().expect("S3 server root");
        let root = dir.path().canonicalize().expect("canonical root");
        std::fs::create_dir(root.join(bucket)).expect("create the bucket directory");
        let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs over the root");
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(access_key, secret));
        let service = builder.build();

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind S3");
        let addr = listener.local_addr().expect("S3 address");
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server {
            endpoint: format!("http://{addr}"),
            bucket: bucket.to_string(),
            root,
            _dir: dir,
            task,
        }
    }

    /// Where the object `key` (the full key, prefix included) is stored on disk.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(&self.bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes an S3 credentials file (mode 0600) at `dir/name` for `drover_agent::objectstore`.
pub fn write_credentials(dir: &Path, name: &str, access_key: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("access_key_id = \"{access_key}\"\nsecret_access_key = \"{secret}\"\n"),
    )
    .expect("write credentials");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod credentials");
    path
}
