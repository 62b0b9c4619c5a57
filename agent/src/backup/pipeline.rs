//! Backup files on the local disk: the streaming pipeline source → zstd → age (when
//! recipients are configured) → SHA-256 → `<name>.partial` → fsync → rename, and its reverse
//! (hash check, decryption, decompression), plus the disk-space rule.
//!
//! Everything here is synchronous and streams through fixed buffers: callers run it on
//! tokio's blocking pool. A stage that fails fails the whole file: the `.partial` is removed and
//! nothing under the final name appears.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Size of the copy buffers and of the file buffers.
const CHUNK: usize = 1024 * 1024;
/// How much source data passes between two progress calls.
const PROGRESS_EVERY: u64 = 1024 * 1024;
/// The suffix of a file being written.
const PARTIAL_SUFFIX: &str = ".partial";
/// How every age file starts.
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";
/// Space kept free on top of the estimate.
const DISK_MARGIN: u64 = 64 * 1024 * 1024;

/// How a backup file is encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encode {
    pub zstd_level: i32,
    /// zstd worker threads; 0 or 1 compresses on the calling thread.
    pub zstd_threads: u32,
    /// age x25519 public keys (`age1...`); empty means no encryption.
    pub recipients: Vec<String>,
}

/// A backup file written and synced under its final name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    /// Bytes stored on disk.
    pub size: u64,
    /// SHA-256 (hex) of the stored bytes.
    pub sha256: String,
    /// Bytes read from the source.
    pub source_bytes: u64,
}

/// What a read went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadStats {
    pub stored_bytes: u64,
    pub plain_bytes: u64,
}

/// Why writing or reading a backup file failed; each message names the stage.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading the source failed: {0}")]
    Source(#[source] io::Error),
    #[error("the source produced no data (an empty dump is never a backup)")]
    EmptySource,
    #[error("zstd compression failed: {0}")]
    Compress(#[source] io::Error),
    #[error("age encryption failed: {0}")]
    Encrypt(String),
    #[error(
        "age recipient {entry:?} is not valid: {reason} (expected an x25519 public key, age1...)"
    )]
    Recipient { entry: String, reason: String },
    /// ENOSPC or EDQUOT anywhere in the write path; `path` is the backup directory.
    #[error(
        "the disk holding {path} is full: free space there or move the backup directory to a larger disk"
    )]
    DiskFull { path: PathBuf },
    #[error("writing {path} failed: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the restored data failed: {0}")]
    Output(#[source] io::Error),
    #[error("age decryption failed: {reason}")]
    Decrypt { reason: String },
    #[error(
        "the backup file is encrypted with age, and no identity (AGE-SECRET-KEY-1...) was given"
    )]
    NeedsKey,
    #[error("zstd decompression failed: {0}")]
    Decompress(#[source] io::Error),
    #[error(
        "the stored object is corrupt: its SHA-256 is {actual}, the catalog expects {expected}"
    )]
    HashMismatch { expected: String, actual: String },
    #[error("the backup file {path} is missing")]
    Missing { path: PathBuf },
}

/// Parses age x25519 recipients; the error names the entry that is not one.
pub fn parse_recipients(list: &[String]) -> Result<Vec<age::x25519::Recipient>, PipelineError> {
    list.iter()
        .map(|entry| {
            age::x25519::Recipient::from_str(entry.trim()).map_err(|reason| {
                PipelineError::Recipient {
                    entry: entry.clone(),
                    reason: reason.to_string(),
                }
            })
        })
        .collect()
}

/// Streams `source` into `dir/file_name` through zstd and, with recipients, age; returns the
/// size and hash of what was stored. `progress(source_bytes, stored_bytes)` is called about
/// every MiB of source and once at the end. On any error nothing named `file_name` is left.
pub fn write(
    source: &mut dyn Read,
    dir: &Path,
    file_name: &str,
    encode: &Encode,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Written, PipelineError> {
    let path = dir.join(file_name);
    if file_name.is_empty() || file_name.contains('/') || file_name.ends_with(PARTIAL_SUFFIX) {
        return Err(PipelineError::Write {
            path,
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a plain file name"),
        });
    }
    // Backups are immutable: never replace one that exists.
    if path.exists() {
        return Err(PipelineError::Write {
            path,
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a backup file with this name exists already",
            ),
        });
    }
    let recipients = parse_recipients(&encode.recipients)?;
    let partial = dir.join(format!("{file_name}{PARTIAL_SUFFIX}"));
    let mut guard = RemoveOnDrop(Some(partial.clone()));

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(|e| write_error(dir, &partial, e))?;
    let state = Rc::new(SinkState::default());
    let sink = Sink {
        file: BufWriter::with_capacity(CHUNK, file),
        hasher: Sha256::new(),
        state: state.clone(),
    };
    let fail = |err: io::Error, stage: fn(io::Error) -> PipelineError| {
        if is_disk_full(&err) {
            PipelineError::DiskFull {
                path: dir.to_path_buf(),
            }
        } else if state.failed.get() {
            PipelineError::Write {
                path: partial.clone(),
                source: err,
            }
        } else {
            stage(err)
        }
    };

    let output = if recipients.is_empty() {
        Output::Plain(sink)
    } else {
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| PipelineError::Encrypt(e.to_string()))?;
        let writer = encryptor
            .wrap_output(sink)
            .map_err(|e| fail(e, |e| PipelineError::Encrypt(e.to_string())))?;
        Output::Age(writer)
    };
    let mut encoder = zstd::stream::write::Encoder::new(output, encode.zstd_level)
        .map_err(PipelineError::Compress)?;
    encoder
        .include_checksum(true)
        .map_err(PipelineError::Compress)?;
    if encode.zstd_threads > 1 {
        encoder
            .multithread(encode.zstd_threads)
            .map_err(PipelineError::Compress)?;
    }

    let mut buf = vec![0u8; CHUNK];
    let mut source_bytes: u64 = 0;
    let mut reported: u64 = 0;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PipelineError::Source(e)),
        };
        encoder
            .write_all(&buf[..n])
            .map_err(|e| fail(e, PipelineError::Compress))?;
        source_bytes += n as u64;
        if source_bytes - reported >= PROGRESS_EVERY {
            reported = source_bytes;
            progress(source_bytes, state.stored.get());
        }
    }
    if source_bytes == 0 {
        return Err(PipelineError::EmptySource);
    }
    let output = encoder
        .finish()
        .map_err(|e| fail(e, PipelineError::Compress))?;
    let sink = match output {
        Output::Plain(sink) => sink,
        Output::Age(writer) => writer
            .finish()
            .map_err(|e| fail(e, |e| PipelineError::Encrypt(e.to_string())))?,
    };
    let (size, sha256) = sink.finish().map_err(|e| write_error(dir, &partial, e))?;

    std::fs::rename(&partial, &path).map_err(|e| write_error(dir, &path, e))?;
    guard.0 = None;
    // The rename is durable only once the directory is synced; until then a crash may lose the
    // file, so a failure here is a failed backup (and the file goes).
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        let _ = std::fs::remove_file(&path);
        return Err(write_error(dir, dir, e));
    }
    progress(source_bytes, size);
    Ok(Written {
        path,
        size,
        sha256,
        source_bytes,
    })
}

/// Streams the stored file at `path` through the hash check, age decryption (when the file
/// has an age header; `identity` is the `AGE-SECRET-KEY-1...` text) and zstd decompression
/// into `out`. `progress(stored_bytes, plain_bytes)` is called about every MiB of output. A
/// file whose hash differs is reported as [`PipelineError::HashMismatch`] even when it happened
/// to decode.
pub fn read(
    path: &Path,
    expected_sha256: &str,
    identity: Option<&str>,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReadStats, PipelineError> {
    let file = open_existing(path)?;
    let state = Rc::new(SourceState::default());
    let mut input = BufReader::with_capacity(
        CHUNK,
        HashingReader {
            file: &file,
            state: state.clone(),
        },
    );
    let encrypted = input
        .fill_buf()
        .map(|head| head.starts_with(AGE_MAGIC))
        .map_err(|e| read_error(path, e))?;

    let decoded = decode(&mut input, encrypted, identity, out, progress, &state);
    if let Err(PipelineError::Output(e)) = decoded {
        return Err(PipelineError::Output(e));
    }
    drop(input);
    if let Some(err) = state.failed.take() {
        return Err(read_error(path, err));
    }
    // Hash what the decoders left unread, so the check covers the whole file.
    let mut rest = HashingReader {
        file: &file,
        state: state.clone(),
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(path, e)),
        }
    }
    let actual = hex::encode(state.hasher.borrow().clone().finalize());
    if !actual.eq_ignore_ascii_case(expected_sha256.trim()) {
        return Err(PipelineError::HashMismatch {
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    let plain_bytes = decoded?;
    let stored_bytes = state.read.get();
    progress(stored_bytes, plain_bytes);
    Ok(ReadStats {
        stored_bytes,
        plain_bytes,
    })
}

/// Decrypts (when `encrypted`) and decompresses `input` into `out`; returns the plain bytes.
fn decode(
    input: &mut BufReader<HashingReader<'_>>,
    encrypted: bool,
    identity: Option<&str>,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
    state: &SourceState,
) -> Result<u64, PipelineError> {
    if !encrypted {
        let decoder =
            zstd::stream::read::Decoder::with_buffer(input).map_err(PipelineError::Decompress)?;
        return copy_plain(decoder, out, progress, state);
    }
    let text = identity.ok_or(PipelineError::NeedsKey)?;
    let identities = parse_identities(text)?;
    let decryptor = age::Decryptor::new_buffered(input).map_err(decrypt_error)?;
    let plain = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(decrypt_error)?;
    let decoder = zstd::stream::read::Decoder::new(plain).map_err(PipelineError::Decompress)?;
    copy_plain(decoder, out, progress, state)
}

/// The identities of an age identity file, in the format `age-keygen` writes: `#` comment
/// lines, blank lines and one or more `AGE-SECRET-KEY-1...` lines (surrounding whitespace and
/// CRLF line ends are tolerated). An error names the line, never its content.
pub fn parse_identities(text: &str) -> Result<Vec<Box<dyn age::Identity>>, PipelineError> {
    let cleaned: String = text.lines().map(|l| format!("{}\n", l.trim())).collect();
    let file = age::IdentityFile::from_buffer(cleaned.as_bytes()).map_err(|e| {
        PipelineError::Decrypt {
            reason: format!(
                "the identity is not an age identity file (comment lines starting with #, blank lines, AGE-SECRET-KEY-1... lines): {e}"
            ),
        }
    })?;
    let identities = file.into_identities().map_err(decrypt_error)?;
    if identities.is_empty() {
        return Err(PipelineError::Decrypt {
            reason: "the identity file holds no AGE-SECRET-KEY-1... line".into(),
        });
    }
    Ok(identities)
}

fn copy_plain(
    mut decoder: impl Read,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
    state: &SourceState,
) -> Result<u64, PipelineError> {
    let mut buf = vec![0u8; CHUNK];
    let mut plain: u64 = 0;
    let mut reported: u64 = 0;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // age reports a damaged or truncated payload as InvalidData from inside zstd's
            // reads; either way the caller checks the hash before believing this.
            Err(e) => return Err(PipelineError::Decompress(e)),
        };
        out.write_all(&buf[..n]).map_err(PipelineError::Output)?;
        plain += n as u64;
        if plain - reported >= PROGRESS_EVERY {
            reported = plain;
            progress(state.read.get(), plain);
        }
    }
    out.flush().map_err(PipelineError::Output)?;
    Ok(plain)
}

fn decrypt_error(err: age::DecryptError) -> PipelineError {
    let reason = match err {
        age::DecryptError::NoMatchingKeys => {
            "the file is encrypted to other recipients: the identity given is not one of them"
                .to_string()
        }
        other => other.to_string(),
    };
    PipelineError::Decrypt { reason }
}

/// Checks the stored file's SHA-256; returns its size.
pub fn verify_hash(path: &Path, expected_sha256: &str) -> Result<u64, PipelineError> {
    let (size, actual) = hash_file(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            PipelineError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            read_error(path, e)
        }
    })?;
    if !actual.eq_ignore_ascii_case(expected_sha256.trim()) {
        return Err(PipelineError::HashMismatch {
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    Ok(size)
}

/// Size and SHA-256 (hex) of a file, streamed.
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size: u64 = 0;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Removes the `*.partial` files a crash left in `dir`; returns what it removed. A missing
/// directory holds none.
pub fn sweep_partials(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let is_partial = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.ends_with(PARTIAL_SUFFIX));
        if is_partial && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    removed.sort();
    Ok(removed)
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The disk-space rule, checked before a backup starts: `free` must hold half the estimated
/// source size (what zstd leaves of a typical dump, with room to spare) plus 64 MiB.
pub fn disk_check(free: u64, estimate: u64) -> Result<(), DiskShort> {
    let need = (estimate / 2).saturating_add(DISK_MARGIN);
    if free >= need {
        return Ok(());
    }
    Err(DiskShort {
        free,
        need,
        estimate,
    })
}

/// Too little free disk for a backup: what is there, what is needed, and why that much.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "not enough free disk space for the backup: {} available, {} needed \
     (half the estimated source size of {} plus {} of margin); \
     free space on that disk or move the backup directory to a larger one",
    human_bytes(*free),
    human_bytes(*need),
    human_bytes(*estimate),
    human_bytes(DISK_MARGIN)
)]
pub struct DiskShort {
    pub free: u64,
    pub need: u64,
    pub estimate: u64,
}

/// `1536` → `1.5 KiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn is_disk_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || err.kind() == io::ErrorKind::StorageFull
        || err.kind() == io::ErrorKind::QuotaExceeded
}

/// A failed write of `path` in `dir`; a full disk names the directory.
fn write_error(dir: &Path, path: &Path, err: io::Error) -> PipelineError {
    if is_disk_full(&err) {
        PipelineError::DiskFull {
            path: dir.to_path_buf(),
        }
    } else {
        PipelineError::Write {
            path: path.to_path_buf(),
            source: err,
        }
    }
}

fn read_error(path: &Path, err: io::Error) -> PipelineError {
    PipelineError::Read {
        path: path.to_path_buf(),
        source: err,
    }
}

fn open_existing(path: &Path) -> Result<File, PipelineError> {
    File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            PipelineError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            read_error(path, e)
        }
    })
}

/// Removes the file it names when dropped, unless disarmed (set to `None`).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the sink tells the layers above it: bytes stored so far, and whether the file itself
/// failed (so an error coming out of zstd or age is blamed on the right stage).
#[derive(Default)]
struct SinkState {
    stored: Cell<u64>,
    failed: Cell<bool>,
}

/// The end of the write pipeline: hashes and counts what it stores.
struct Sink {
    file: BufWriter<File>,
    hasher: Sha256,
    state: Rc<SinkState>,
}

impl Sink {
    /// Flushes and syncs the file; returns (size, sha256 hex).
    fn finish(self) -> io::Result<(u64, String)> {
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((self.state.stored.get(), hex::encode(self.hasher.finalize())))
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.file.write(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.state.stored.set(self.state.stored.get() + n as u64);
                Ok(n)
            }
            Err(e) => {
                self.state.failed.set(true);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file
            .flush()
            .inspect_err(|_| self.state.failed.set(true))
    }
}

/// The sink, with or without age in front.
enum Output {
    Plain(Sink),
    Age(age::stream::StreamWriter<Sink>),
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Plain(w) => w.write(buf),
            Output::Age(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Plain(w) => w.flush(),
            Output::Age(w) => w.flush(),
        }
    }
}

/// Hash and count of what was read from the stored file, and its first read error.
#[derive(Default)]
struct SourceState {
    hasher: RefCell<Sha256>,
    read: Cell<u64>,
    failed: Cell<Option<io::Error>>,
}

/// The start of the read pipeline: hashes everything it reads from the file.
struct HashingReader<'a> {
    file: &'a File,
    state: Rc<SourceState>,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.file.read(buf) {
            Ok(n) => {
                self.state.hasher.borrow_mut().update(&buf[..n]);
                self.state.read.set(self.state.read.get() + n as u64);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.state
                        .failed
                        .set(Some(io::Error::new(e.kind(), e.to_string())));
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;
    use rand::{RngCore, SeedableRng};

    const MIB: usize = 1024 * 1024;

    /// The spec's check of a recipient (in drover-model, which does not link age) accepts what
    /// age parses and refuses what it refuses.
    #[test]
    fn the_spec_check_of_an_age_recipient_agrees_with_age() {
        use drover_model::backup::target::is_age_recipient;
        for _ in 0..50 {
            let key = age::x25519::Identity::generate().to_public().to_string();
            assert!(is_age_recipient(&key), "{key}");
            assert!(parse_recipients(std::slice::from_ref(&key)).is_ok());
            let mut flipped = key.clone().into_bytes();
            let last = flipped.len() - 1;
            flipped[last] = if flipped[last] == b'q' { b'p' } else { b'q' };
            let flipped = String::from_utf8(flipped).unwrap();
            assert!(!is_age_recipient(&flipped), "{flipped}");
            assert!(parse_recipients(std::slice::from_ref(&flipped)).is_err());
            let upper = key.to_uppercase();
            assert_eq!(
                is_age_recipient(&upper),
                parse_recipients(std::slice::from_ref(&upper)).is_ok(),
                "{upper}"
            );
        }
        let secret = age::x25519::Identity::generate();
        let secret = secret.to_string();
        for bad in [
            "",
            "age1",
            "age1qqqq",
            secret.expose_secret(),
            "ssh-ed25519 AAAA",
        ] {
            assert!(!is_age_recipient(bad), "{bad}");
            assert!(parse_recipients(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    fn plain() -> Encode {
        Encode {
            zstd_level: 3,
            zstd_threads: 1,
            recipients: Vec::new(),
        }
    }

    /// (secret key text, public key text)
    fn keypair() -> (String, String) {
        let identity = age::x25519::Identity::generate();
        (
            identity.to_string().expose_secret().to_string(),
            identity.to_public().to_string(),
        )
    }

    fn encrypted(recipient: &str) -> Encode {
        Encode {
            recipients: vec![recipient.to_string()],
            ..plain()
        }
    }

    /// Half random, half repetitive text, in 64 KiB stripes.
    fn mixed(len: usize) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; len];
        for (i, stripe) in data.chunks_mut(64 * 1024).enumerate() {
            if i % 2 == 0 {
                rng.fill_bytes(stripe);
            } else {
                for (j, b) in stripe.iter_mut().enumerate() {
                    *b = b"INSERT INTO t VALUES (1, 'drover');\n"[j % 36];
                }
            }
        }
        data
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn write_bytes(dir: &Path, name: &str, data: &[u8], encode: &Encode) -> Written {
        write(&mut &data[..], dir, name, encode, &mut |_, _| {}).expect("write")
    }

    fn read_all(
        w: &Written,
        sha: &str,
        identity: Option<&str>,
    ) -> Result<(Vec<u8>, ReadStats), PipelineError> {
        let mut out = Vec::new();
        let stats = read(&w.path, sha, identity, &mut out, &mut |_, _| {})?;
        Ok((out, stats))
    }

    #[test]
    fn round_trip_plain() {
        let dir = tempfile::tempdir().unwrap();
        let data = mixed(300 * 1024);
        let w = write_bytes(dir.path(), "db.dump.zst", &data, &plain());
        assert_eq!(w.path, dir.path().join("db.dump.zst"));
        assert_eq!(w.source_bytes, data.len() as u64);
        assert_eq!(hash_file(&w.path).unwrap(), (w.size, w.sha256.clone()));
        assert!(w.size < data.len() as u64, "the repetitive half compresses");
        assert_eq!(files_in(dir.path()), ["db.dump.zst"]);
        assert_eq!(verify_hash(&w.path, &w.sha256).unwrap(), w.size);

        let (out, stats) = read_all(&w, &w.sha256, None).unwrap();
        assert_eq!(out, data);
        assert_eq!(
            stats,
            ReadStats {
                stored_bytes: w.size,
                plain_bytes: data.len() as u64
            }
        );
        // An identity given for a plain file is simply not needed.
        let (out, _) = read_all(&w, &w.sha256, Some(&keypair().0)).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn round_trip_encrypted_multi_mib_with_two_zstd_threads() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = keypair();
        let data = mixed(6 * MIB + 123);
        let encode = Encode {
            zstd_threads: 2,
            ..encrypted(&public)
        };
        let mut calls = Vec::new();
        let w = write(
            &mut &data[..],
            dir.path(),
            "db.dump.zst.age",
            &encode,
            &mut |src, stored| calls.push((src, stored)),
        )
        .unwrap();
        assert!(
            (6..=8).contains(&calls.len()),
            "about one progress call per MiB plus the last: {calls:?}"
        );
        assert_eq!(*calls.last().unwrap(), (data.len() as u64, w.size));
        assert!(calls.windows(2).all(|p| p[0].0 < p[1].0));

        let head = std::fs::read(&w.path).unwrap();
        assert!(head.starts_with(AGE_MAGIC));
        assert!(
            !head
                .windows(36)
                .any(|win| win == &data[64 * 1024..64 * 1024 + 36]),
            "no plaintext on disk"
        );

        let mut out = Vec::new();
        let mut read_calls = 0;
        let stats = read(&w.path, &w.sha256, Some(&secret), &mut out, &mut |_, _| {
            read_calls += 1
        })
        .unwrap();
        assert!(out == data, "decrypted and decompressed data differ");
        assert_eq!(stats.stored_bytes, w.size);
        assert_eq!(stats.plain_bytes, data.len() as u64);
        assert!(read_calls >= 6);
    }

    #[test]
    fn plain_multi_mib_with_two_zstd_threads() {
        let dir = tempfile::tempdir().unwrap();
        let data = mixed(5 * MIB);
        let encode = Encode {
            zstd_threads: 2,
            zstd_level: 1,
            ..plain()
        };
        let w = write_bytes(dir.path(), "big", &data, &encode);
        let (out, _) = read_all(&w, &w.sha256, None).unwrap();
        assert!(out == data);
    }

    /// An identity file exactly as `age-keygen -o key.txt` writes it.
    fn keygen_file(secret: &str, public: &str) -> String {
        format!("# created: 2026-12-02T03:00:00Z\n# public key: {public}\n{secret}\n")
    }

    #[test]
    fn age_keygen_identity_files_with_comments_and_several_keys_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = keypair();
        let (other_secret, other_public) = keypair();
        let w = write_bytes(dir.path(), "f", b"some rows", &encrypted(&public));
        let one = keygen_file(&secret, &public);
        assert_eq!(read_all(&w, &w.sha256, Some(&one)).unwrap().0, b"some rows");
        // Two keys (the right one second), blank lines, CRLF line ends.
        let two = format!(
            "{}\n\n{}",
            keygen_file(&other_secret, &other_public),
            keygen_file(&secret, &public)
        )
        .replace('\n', "\r\n");
        assert_eq!(read_all(&w, &w.sha256, Some(&two)).unwrap().0, b"some rows");
        assert_eq!(parse_identities(&two).unwrap().len(), 2);
        // Only comments: no key; a stray line is named by its number, not shown.
        let err = parse_identities("# created: x\n\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no AGE-SECRET-KEY-1"), "{err}");
        let bad = format!("{one}{}x\n", &secret[..20]);
        let err = parse_identities(&bad).err().unwrap().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(!err.contains(&secret[..20]), "{err}");
    }

    #[test]
    fn wrong_key_and_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = keypair();
        let (other_secret, _) = keypair();
        let w = write_bytes(dir.path(), "f", b"some rows", &encrypted(&public));

        let err = read_all(&w, &w.sha256, Some(&other_secret)).unwrap_err();
        assert!(matches!(err, PipelineError::Decrypt { .. }), "{err:?}");
        assert!(err.to_string().contains("other recipients"), "{err}");
        assert!(!err.to_string().contains(&other_secret));

        let err = read_all(&w, &w.sha256, None).unwrap_err();
        assert!(matches!(err, PipelineError::NeedsKey), "{err:?}");

        let err = read_all(&w, &w.sha256, Some("not a key")).unwrap_err();
        assert!(matches!(err, PipelineError::Decrypt { .. }), "{err:?}");
    }

    #[test]
    fn flipped_byte_is_a_hash_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = keypair();
        let data = mixed(MIB);
        for (name, encode) in [("plain", plain()), ("age", encrypted(&public))] {
            let w = write_bytes(dir.path(), name, &data, &encode);
            let mut stored = std::fs::read(&w.path).unwrap();
            let middle = stored.len() / 2;
            stored[middle] ^= 0x01;
            std::fs::write(&w.path, &stored).unwrap();

            let err = read_all(&w, &w.sha256, Some(&secret)).unwrap_err();
            assert!(
                matches!(err, PipelineError::HashMismatch { .. }),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains("corrupt"), "{err}");
            assert!(matches!(
                verify_hash(&w.path, &w.sha256),
                Err(PipelineError::HashMismatch { .. })
            ));
        }
    }

    #[test]
    fn hash_mismatch_wins_even_when_the_file_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let w = write_bytes(dir.path(), "f", b"rows", &plain());
        let wrong = "0".repeat(64);
        let err = read_all(&w, &wrong, None).unwrap_err();
        assert!(matches!(err, PipelineError::HashMismatch { .. }), "{err:?}");
    }

    #[test]
    fn truncated_file_is_a_hash_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = keypair();
        let data = mixed(2 * MIB);
        for (name, encode) in [("plain", plain()), ("age", encrypted(&public))] {
            let w = write_bytes(dir.path(), name, &data, &encode);
            let file = OpenOptions::new().write(true).open(&w.path).unwrap();
            file.set_len(w.size - 100).unwrap();
            let err = read_all(&w, &w.sha256, Some(&secret)).unwrap_err();
            assert!(
                matches!(err, PipelineError::HashMismatch { .. }),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let err = read(&path, "00", None, &mut io::sink(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, PipelineError::Missing { .. }), "{err:?}");
        let err = verify_hash(&path, "00").unwrap_err();
        assert!(matches!(err, PipelineError::Missing { .. }), "{err:?}");
    }

    #[test]
    fn empty_source_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(&mut io::empty(), dir.path(), "f", &plain(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, PipelineError::EmptySource), "{err:?}");
        assert!(err.to_string().contains("empty dump is never a backup"));
        assert!(files_in(dir.path()).is_empty());
    }

    /// Gives `good` bytes, then fails like a dump whose process exited non-zero.
    struct FailingSource {
        good: usize,
    }

    impl Read for FailingSource {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.good == 0 {
                return Err(io::Error::other(
                    "pg_dump exited with status 1: no such table",
                ));
            }
            let n = buf.len().min(self.good);
            buf[..n].fill(b'x');
            self.good -= n;
            Ok(n)
        }
    }

    #[test]
    fn failing_source_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = keypair();
        for encode in [plain(), encrypted(&public)] {
            let err = write(
                &mut FailingSource { good: 3 * MIB },
                dir.path(),
                "f",
                &encode,
                &mut |_, _| {},
            )
            .unwrap_err();
            assert!(matches!(err, PipelineError::Source(_)), "{err:?}");
            assert_eq!(
                err.to_string(),
                "reading the source failed: pg_dump exited with status 1: no such table"
            );
            assert!(files_in(dir.path()).is_empty());
        }
    }

    #[test]
    fn an_existing_backup_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let w = write_bytes(dir.path(), "f", b"first", &plain());
        let err = write(
            &mut &b"second"[..],
            dir.path(),
            "f",
            &plain(),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, PipelineError::Write { .. }), "{err:?}");
        assert_eq!(hash_file(&w.path).unwrap().1, w.sha256);
        assert_eq!(files_in(dir.path()), ["f"]);
    }

    #[test]
    fn bad_recipients_are_named() {
        let (_, public) = keypair();
        assert_eq!(parse_recipients(&[]).unwrap().len(), 0);
        assert_eq!(
            parse_recipients(std::slice::from_ref(&public))
                .unwrap()
                .len(),
            1
        );
        let err = parse_recipients(&[public, "age1nope".into()]).unwrap_err();
        assert!(matches!(err, PipelineError::Recipient { .. }), "{err:?}");
        assert!(err.to_string().contains("\"age1nope\""), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let err = write(
            &mut &b"x"[..],
            dir.path(),
            "f",
            &encrypted("ssh-ed25519 AAAA"),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, PipelineError::Recipient { .. }), "{err:?}");
        assert!(files_in(dir.path()).is_empty());
    }

    #[test]
    fn sweep_removes_only_partials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.partial"), b"x").unwrap();
        std::fs::write(dir.path().join("b.zst.partial"), b"x").unwrap();
        std::fs::write(dir.path().join("c.zst"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("d.partial")).unwrap();
        let removed = sweep_partials(dir.path()).unwrap();
        assert_eq!(
            removed,
            [
                dir.path().join("a.partial"),
                dir.path().join("b.zst.partial")
            ]
        );
        assert_eq!(files_in(dir.path()), ["c.zst", "d.partial"]);
        assert!(sweep_partials(&dir.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn disk_check_rule() {
        const M: u64 = 1024 * 1024;
        assert!(disk_check(64 * M, 0).is_ok());
        assert!(disk_check(64 * M - 1, 0).is_err());
        assert!(disk_check(564 * M, 1000 * M).is_ok());
        let err = disk_check(100 * M, 10 * 1024 * M).unwrap_err().to_string();
        assert!(err.contains("100.0 MiB available"), "{err}");
        assert!(err.contains("5.1 GiB needed"), "{err}");
        assert!(err.contains("free space"), "{err}");
        assert!(disk_check(u64::MAX, u64::MAX).is_ok());
        assert!(disk_check(0, u64::MAX).is_err());
    }

    #[test]
    fn free_bytes_of_a_real_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    /// A small tmpfs, unmounted when dropped.
    struct Tmpfs {
        dir: tempfile::TempDir,
    }

    impl Tmpfs {
        fn mount(size: &str) -> Result<Tmpfs, String> {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .output()
                .map_err(|e| format!("running mount: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
            Ok(Tmpfs { dir })
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    #[test]
    fn full_disk_is_reported_and_leaves_nothing() {
        let tmpfs = match Tmpfs::mount("2m") {
            Ok(t) => t,
            Err(reason) => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("cannot mount a tmpfs, and CI needs the full-disk test: {reason}");
                }
                eprintln!("skipping full_disk_is_reported_and_leaves_nothing: {reason}");
                return;
            }
        };
        let mut data = vec![0u8; 8 * MIB];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
        let (_, public) = keypair();
        for encode in [plain(), encrypted(&public)] {
            let err = write(
                &mut &data[..],
                tmpfs.dir.path(),
                "db.zst",
                &encode,
                &mut |_, _| {},
            )
            .unwrap_err();
            assert!(matches!(err, PipelineError::DiskFull { .. }), "{err:?}");
            assert!(err.to_string().contains("is full"), "{err}");
            assert!(
                matches!(&err, PipelineError::DiskFull { path } if path == tmpfs.dir.path()),
                "{err:?}"
            );
            assert!(files_in(tmpfs.dir.path()).is_empty());
        }
    }
}
