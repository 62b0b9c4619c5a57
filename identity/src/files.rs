//! Writing key and certificate files atomically, private keys 0600 in 0700 directories.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::Error;

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing; tightens an existing one to 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))
}

/// Writes `contents` to `path` with `mode` through a temporary file, fsync and rename, so a
/// crash leaves either the old file or the new one, never half of it.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    // The mode given to open() is masked by the umask; set it explicitly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(&tmp, e))?;
    file.write_all(contents).map_err(|e| io_err(&tmp, e))?;
    file.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a private key: mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    write_atomic(path, contents, 0o600)
}

/// Writes a certificate or other public file: mode 0644.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), Error> {
    write_atomic(path, contents, 0o644)
}

/// Reads a file to a string, naming the path in the error.
pub fn read_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// A certificate bundle on disk: `ca.pem`, `cert.pem`, `key.pem` in one directory.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Bundle {
    pub const CA: &'static str = "ca.pem";
    pub const CERT: &'static str = "cert.pem";
    pub const KEY: &'static str = "key.pem";

    pub fn exists(dir: &Path) -> bool {
        dir.join(Self::CERT).is_file() && dir.join(Self::KEY).is_file()
    }

    pub fn load(dir: &Path) -> Result<Bundle, Error> {
        Ok(Bundle {
            ca_pem: read_string(&dir.join(Self::CA))?,
            cert_pem: read_string(&dir.join(Self::CERT))?,
            key_pem: read_string(&dir.join(Self::KEY))?,
        })
    }

    /// Writes the bundle; the key first, so a cert on disk always has its key beside it.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        ensure_private_dir(dir)?;
        write_private(&dir.join(Self::KEY), self.key_pem.as_bytes())?;
        write_public(&dir.join(Self::CA), self.ca_pem.as_bytes())?;
        write_public(&dir.join(Self::CERT), self.cert_pem.as_bytes())
    }
}

impl Bundle {
    /// Replaces the bundle in `dir` as a whole: the new files go to `<dir>.new`, then the
    /// directories are swapped by renames, so a crash never leaves a certificate beside a key
    /// it does not belong to. [`Bundle::recover`] finishes an interrupted swap.
    pub fn replace(&self, dir: &Path) -> Result<(), Error> {
        let new = sibling(dir, "new");
        let old = sibling(dir, "old");
        if new.exists() {
            fs::remove_dir_all(&new).map_err(|e| io_err(&new, e))?;
        }
        self.save(&new)?;
        if dir.exists() {
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
            }
            fs::rename(dir, &old).map_err(|e| io_err(dir, e))?;
        }
        fs::rename(&new, dir).map_err(|e| io_err(&new, e))?;
        if let Some(parent) = dir.parent().and_then(|p| fs::File::open(p).ok()) {
            let _ = parent.sync_all();
        }
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
        }
        Ok(())
    }

    /// Completes or rolls back a [`Bundle::replace`] that a crash interrupted.
    pub fn recover(dir: &Path) -> Result<(), Error> {
        let new = sibling(dir, "new");
        let old = sibling(dir, "old");
        if !dir.exists() {
            // Crashed between the two renames: the new bundle was complete (it is only renamed
            // after being written and synced), so prefer it; else fall back to the old one.
            if Bundle::exists(&new) {
                fs::rename(&new, dir).map_err(|e| io_err(&new, e))?;
            } else if old.exists() {
                fs::rename(&old, dir).map_err(|e| io_err(&old, e))?;
            }
        }
        for leftover in [new, old] {
            if leftover.exists() {
                fs::remove_dir_all(&leftover).map_err(|e| io_err(&leftover, e))?;
            }
        }
        Ok(())
    }
}

fn sibling(dir: &Path, suffix: &str) -> std::path::PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}.{suffix}"))
}

/// Why a file that holds a secret cannot be used.
#[derive(Debug)]
pub enum PrivateFileError {
    Missing,
    Unreadable(std::io::Error),
    /// Group or others have some access: `mode` is its permission bits.
    Open {
        mode: u32,
    },
}

/// Reads a file that holds a secret (app secrets, S3 credentials, an SMTP password), refused
/// when its group or others have any access.
pub fn read_private_file(path: &Path) -> Result<String, PrivateFileError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PrivateFileError::Missing
        } else {
            PrivateFileError::Unreadable(e)
        }
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Open { mode });
    }
    std::fs::read_to_string(path).map_err(PrivateFileError::Unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_dirs_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let bundle = Bundle {
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        };
        bundle.save(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("key.pem")), 0o600);
        assert_eq!(mode(&dir.join("cert.pem")), 0o644);
        let loaded = Bundle::load(&dir).unwrap();
        assert_eq!(loaded.key_pem, "key");
        // Overwriting keeps the mode and leaves no temporary file behind.
        write_private(&dir.join("key.pem"), b"key2").unwrap();
        assert_eq!(mode(&dir.join("key.pem")), 0o600);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 3);
    }

    #[test]
    fn replace_swaps_whole_bundles_and_recover_finishes_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("identity");
        let b = |k: &str| Bundle {
            ca_pem: "ca".into(),
            cert_pem: format!("cert-{k}"),
            key_pem: format!("key-{k}"),
        };
        b("1").save(&dir).unwrap();
        b("2").replace(&dir).unwrap();
        assert_eq!(Bundle::load(&dir).unwrap().key_pem, "key-2");
        // Simulate a crash after `identity` was moved aside, before `.new` was renamed in.
        b("3").save(&sibling(&dir, "new")).unwrap();
        fs::rename(&dir, sibling(&dir, "old")).unwrap();
        Bundle::recover(&dir).unwrap();
        let loaded = Bundle::load(&dir).unwrap();
        assert_eq!(
            (loaded.cert_pem.as_str(), loaded.key_pem.as_str()),
            ("cert-3", "key-3")
        );
        assert!(!sibling(&dir, "old").exists() && !sibling(&dir, "new").exists());
    }
}
