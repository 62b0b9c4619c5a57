//! Files as a backup source and a restore destination: a directory (a host path, or a Docker
//! volume's mountpoint) streamed as a tar archive with exclude patterns, and a tar stream
//! unpacked into an empty directory. A thread writes the tar into a pipe that the pipeline
//! reads, so memory stays bounded; a failure of the walk surfaces as the reader's error at
//! end of stream, never as a short but "successful" archive. The walk never follows a
//! symlink below the directory: each directory is opened relative to its parent with
//! `O_NOFOLLOW`, each file likewise, and symlinks are archived as symlinks.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use globset::{Glob, GlobSet, GlobSetBuilder};

/// Builds the exclude matcher (patterns are relative to the directory).
pub fn excludes(patterns: &[String]) -> Result<GlobSet, ExcludeError> {
    let pattern_error = |p: &String| {
        let pattern = p.clone();
        move |err| ExcludeError::Pattern { pattern, err }
    };
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(Glob::new(p).map_err(pattern_error(p))?);
        // `cache/**` should also drop the `cache` directory entry itself.
        if let Some(dir) = p.strip_suffix("/**") {
            builder.add(Glob::new(dir).map_err(pattern_error(p))?);
        }
    }
    builder.build().map_err(ExcludeError::Build)
}

/// An exclude pattern that is not a glob.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExcludeError {
    #[error("exclude {pattern:?}: {err}")]
    Pattern {
        pattern: String,
        err: globset::Error,
    },
    #[error("{0}")]
    Build(globset::Error),
}

/// Total size of the regular files under `dir` that are not excluded (for the disk check).
/// Walks like the archive does: no symlink is followed.
pub fn tree_size(dir: &Path, excluded: &GlobSet) -> io::Result<u64> {
    let mut total = 0;
    walk(dir, excluded, false, &mut |_| {}, &mut |_, found| {
        if let Found::File { meta, .. } = found {
            total += meta.len();
        }
        Ok(())
    })?;
    Ok(total)
}

/// What the walk found at one path, opened relative to its parent without following a
/// symlink.
enum Found {
    /// A directory (its metadata from the opened directory itself).
    Dir { meta: std::fs::Metadata },
    /// A regular file, opened (when the walk opens files) with `O_NOFOLLOW`.
    File {
        meta: std::fs::Metadata,
        file: Option<std::fs::File>,
    },
    /// A symlink: archived as a link to `target`, never followed.
    Symlink {
        meta: std::fs::Metadata,
        target: PathBuf,
    },
}

/// How often one entry may turn out to be something else between being looked at and being
/// opened (a directory swapped for a symlink) before the walk gives up on it.
const CHANGED_RETRIES: usize = 3;

/// Walks the tree under `root` (which itself may be reached through a symlink: it is the
/// configured path). Every directory below it is opened relative to its parent's descriptor
/// with `O_NOFOLLOW | O_DIRECTORY`, its entries read from that descriptor, and every file
/// opened relative to it with `O_NOFOLLOW`: a directory swapped for a symlink mid-walk is
/// seen as the symlink it now is, never followed. `before_open(rel)` runs after an entry is
/// looked at and before it is opened (a test hook for the swap). `visit(rel, found)` gets
/// every entry that is not excluded, a directory before its contents. Sockets, fifos and
/// devices are skipped: they hold no data to restore.
fn walk(
    root: &Path,
    excluded: &GlobSet,
    open_files: bool,
    before_open: &mut dyn FnMut(&Path),
    visit: &mut dyn FnMut(&Path, Found) -> io::Result<()>,
) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let top = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| with_path(e.into(), root))?;
    let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(top, PathBuf::new())];
    while let Some((dir_fd, dir_rel)) = stack.pop() {
        let shown = root.join(&dir_rel);
        let mut names: Vec<std::ffi::CString> = Vec::new();
        let mut listing =
            rustix::fs::Dir::read_from(&dir_fd).map_err(|e| with_path(e.into(), &shown))?;
        while let Some(entry) = listing.read() {
            let entry = entry.map_err(|e| with_path(e.into(), &shown))?;
            let name = entry.file_name();
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                names.push(name.to_owned());
            }
        }
        names.sort();
        // Directories are pushed in reverse so they are archived in name order.
        let mut subdirs = Vec::new();
        for name in names {
            let rel = dir_rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            if excluded.is_match(&rel) {
                continue;
            }
            let path = root.join(&rel);
            match open_entry(&dir_fd, &name, &rel, open_files, before_open)
                .map_err(|e| with_path(e, &path))?
            {
                None => {}
                Some((found, sub)) => {
                    visit(&rel, found).map_err(|e| with_path(e, &path))?;
                    if let Some(fd) = sub {
                        subdirs.push((fd, rel));
                    }
                }
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// Looks at `name` in the directory `dir` and opens it without following a symlink; a
/// directory's descriptor comes back for the walk to descend into. `None`: a kind that is
/// not archived. When the entry changes kind between the look and the open (`ELOOP`,
/// `ENOTDIR`, or a file that is no longer one), it is looked at again.
fn open_entry(
    dir: &OwnedFd,
    name: &std::ffi::CStr,
    rel: &Path,
    open_files: bool,
    before_open: &mut dyn FnMut(&Path),
) -> io::Result<Option<(Found, Option<OwnedFd>)>> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    for _ in 0..CHANGED_RETRIES {
        let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        before_open(rel);
        let changed =
            |e: rustix::io::Errno| e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR;
        match kind {
            FileType::Directory => {
                let fd = match rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(e) if changed(e) => continue,
                    Err(e) => return Err(e.into()),
                };
                let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
                return Ok(Some((Found::Dir { meta }, Some(fd))));
            }
            FileType::RegularFile => {
                // O_NONBLOCK: a file swapped for a fifo must not block the walk.
                let flags = if open_files {
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK
                } else {
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC
                };
                let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(e) if changed(e) => continue,
                    Err(e) => return Err(e.into()),
                };
                let file = std::fs::File::from(fd);
                let meta = file.metadata()?;
                if !meta.is_file() {
                    continue;
                }
                let file = open_files.then_some(file);
                return Ok(Some((Found::File { meta, file }, None)));
            }
            FileType::Symlink => {
                let fd = match rustix::fs::openat(
                    dir,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(e) if changed(e) => continue,
                    Err(e) => return Err(e.into()),
                };
                let meta = std::fs::File::from(fd).metadata()?;
                if !meta.file_type().is_symlink() {
                    continue;
                }
                let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
                let target = PathBuf::from(std::ffi::OsString::from_vec(target.into_bytes()));
                return Ok(Some((Found::Symlink { meta, target }, None)));
            }
            _ => return Ok(None),
        }
    }
    Err(io::Error::other(format!(
        "it changed kind {CHANGED_RETRIES} times while being archived"
    )))
}

/// A tar stream of `dir` (paths relative to it), produced on a thread.
#[derive(Debug)]
pub struct TarSource {
    pipe: io::PipeReader,
    worker: Option<JoinHandle<io::Result<()>>>,
}

/// Runs after an entry (its path relative to the archived directory) is looked at and
/// before it is opened: lets a test swap it at exactly that moment.
pub type BeforeOpen = Box<dyn FnMut(&Path) + Send>;

impl TarSource {
    pub fn start(dir: PathBuf, excluded: GlobSet) -> io::Result<TarSource> {
        Self::start_with_hook(dir, excluded, Box::new(|_| {}))
    }

    /// [`TarSource::start`] with a hook run before each entry is opened (for tests).
    pub fn start_with_hook(
        dir: PathBuf,
        excluded: GlobSet,
        mut before_open: BeforeOpen,
    ) -> io::Result<TarSource> {
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", dir.display()),
            ));
        }
        let (reader, writer) = io::pipe()?;
        let worker = std::thread::Builder::new()
            .name("drover-tar".into())
            .spawn(move || write_tar(&dir, &excluded, &mut *before_open, writer))?;
        Ok(TarSource {
            pipe: reader,
            worker: Some(worker),
        })
    }
}

fn write_tar(
    dir: &Path,
    excluded: &GlobSet,
    before_open: &mut dyn FnMut(&Path),
    out: io::PipeWriter,
) -> io::Result<()> {
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, out));
    builder.follow_symlinks(false);
    walk(dir, excluded, true, before_open, &mut |rel, found| {
        let mut header = tar::Header::new_gnu();
        match found {
            Found::Dir { meta } => {
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                builder.append_data(&mut header, rel, io::empty())
            }
            Found::File { file, .. } => match file {
                Some(mut file) => builder.append_file(rel, &mut file),
                None => Err(io::Error::other("the file was not opened")),
            },
            Found::Symlink { meta, target } => {
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder.append_link(&mut header, rel, &target)
            }
        }
    })?;
    builder.into_inner()?.flush()
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Read for TarSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.pipe.read(buf)?;
        if n == 0 && !buf.is_empty() {
            // End of the pipe: the archive is complete only if the walk succeeded.
            if let Some(worker) = self.worker.take() {
                match worker.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Err(io::Error::new(e.kind(), format!("archiving files: {e}")));
                    }
                    Err(_) => return Err(io::Error::other("the archiving thread panicked")),
                }
            }
        }
        Ok(n)
    }
}

/// A writer that unpacks a tar stream into `dest` on a thread; `finish` says whether it all
/// went in.
#[derive(Debug)]
pub struct Untar {
    pipe: Option<io::PipeWriter>,
    worker: Option<JoinHandle<io::Result<()>>>,
}

impl Untar {
    /// `dest` must not exist or be an empty directory: a restore never mixes into live files.
    pub fn start(dest: &Path) -> io::Result<Untar> {
        if dest.exists() {
            let mut entries = std::fs::read_dir(dest)?;
            if entries.next().is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} is not empty; restore into an empty or new directory, then move the files",
                        dest.display()
                    ),
                ));
            }
        } else {
            std::fs::create_dir_all(dest)?;
        }
        let (reader, writer) = io::pipe()?;
        let dest = dest.to_path_buf();
        let worker = std::thread::Builder::new()
            .name("drover-untar".into())
            .spawn(move || {
                let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, reader));
                archive.set_preserve_permissions(true);
                archive.set_overwrite(false);
                archive.unpack(&dest)
            })?;
        Ok(Untar {
            pipe: Some(writer),
            worker: Some(worker),
        })
    }

    pub fn finish(mut self) -> io::Result<()> {
        drop(self.pipe.take());
        match self.worker.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the unpacking thread panicked")),
            None => Ok(()),
        }
    }
}

impl Write for Untar {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.pipe.as_mut() {
            Some(pipe) => pipe.write(buf),
            None => Err(io::Error::other("unpacking already finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.pipe.as_mut() {
            Some(pipe) => pipe.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_round_trips_without_its_excluded_files() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::create_dir_all(src.path().join("cache/x")).unwrap();
        std::fs::write(src.path().join("a/b/keep.txt"), b"hello").unwrap();
        std::fs::write(src.path().join("top.bin"), vec![7u8; 100_000]).unwrap();
        std::fs::write(src.path().join("a/skip.tmp"), b"no").unwrap();
        std::fs::write(src.path().join("cache/x/big"), b"no").unwrap();
        let ex = excludes(&["**/*.tmp".into(), "cache/**".into()]).unwrap();
        assert_eq!(tree_size(src.path(), &ex).unwrap(), 100_005);

        let mut tar = TarSource::start(src.path().to_path_buf(), ex).unwrap();
        let mut bytes = Vec::new();
        tar.read_to_end(&mut bytes).unwrap();

        let dest = tempfile::tempdir().unwrap();
        let out = dest.path().join("restored");
        let mut untar = Untar::start(&out).unwrap();
        untar.write_all(&bytes).unwrap();
        untar.finish().unwrap();
        assert_eq!(
            std::fs::read(out.join("a/b/keep.txt")).unwrap(),
            b"hello".to_vec()
        );
        assert_eq!(std::fs::read(out.join("top.bin")).unwrap().len(), 100_000);
        assert!(!out.join("a/skip.tmp").exists());
        assert!(!out.join("cache").exists());
    }

    #[test]
    fn a_missing_directory_and_a_non_empty_destination_are_refused() {
        let err = TarSource::start("/nonexistent/drover".into(), excludes(&[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/drover"), "{err}");
        let dest = tempfile::tempdir().unwrap();
        std::fs::write(dest.path().join("x"), b"live").unwrap();
        let err = Untar::start(dest.path()).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    /// Every entry of a tar stream: path, kind, link target, data.
    fn entries(bytes: &[u8]) -> Vec<(String, tar::EntryType, Option<PathBuf>, Vec<u8>)> {
        let mut archive = tar::Archive::new(bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let kind = e.header().entry_type();
                let link = e.link_name().unwrap().map(|l| l.into_owned());
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, kind, link, data)
            })
            .collect()
    }

    #[test]
    fn a_directory_or_file_swapped_for_a_symlink_mid_walk_is_archived_as_the_symlink() {
        let root = tempfile::tempdir().unwrap();
        let secret = root.path().join("etc");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("shadow"), b"root:$6$secret-hash").unwrap();
        let src = root.path().join("data");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/mine.txt"), b"mine").unwrap();
        std::fs::write(src.join("top.txt"), b"top").unwrap();

        // After the walk has looked at `sub` (a directory) and `top.txt` (a file), and before
        // it opens them, each is swapped for a symlink into the secret directory.
        let (s, sec) = (src.clone(), secret.clone());
        let mut swapped = Vec::new();
        let hook: BeforeOpen = Box::new(move |rel: &Path| {
            let name = rel.display().to_string();
            if (name == "sub" || name == "top.txt") && !swapped.contains(&name) {
                swapped.push(name.clone());
                std::fs::rename(s.join(&name), s.join(format!("{name}.moved"))).unwrap();
                let to = if name == "sub" {
                    sec.clone()
                } else {
                    sec.join("shadow")
                };
                std::os::unix::fs::symlink(&to, s.join(&name)).unwrap();
            }
        });
        let mut tar =
            TarSource::start_with_hook(src.clone(), excludes(&[]).unwrap(), hook).unwrap();
        let mut bytes = Vec::new();
        tar.read_to_end(&mut bytes).unwrap();

        let found = entries(&bytes);
        for (path, _, _, data) in &found {
            assert!(!path.contains("shadow"), "{path} archived: {found:?}");
            assert!(
                !String::from_utf8_lossy(data).contains("secret-hash"),
                "the secret's bytes are in {path}"
            );
        }
        let sub = found.iter().find(|e| e.0 == "sub").expect("sub archived");
        assert_eq!(sub.1, tar::EntryType::Symlink, "{found:?}");
        assert_eq!(sub.2.as_deref(), Some(secret.as_path()));
        let top = found
            .iter()
            .find(|e| e.0 == "top.txt")
            .expect("top archived");
        assert_eq!(top.1, tar::EntryType::Symlink, "{found:?}");
        assert_eq!(top.2.as_deref(), Some(secret.join("shadow").as_path()));
    }

    #[test]
    fn a_symlink_in_the_tree_is_archived_and_restored_as_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("key"), b"private key bytes").unwrap();
        let src = root.path().join("data");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/real.txt"), b"real").unwrap();
        std::os::unix::fs::symlink("../../outside/key", src.join("d/rel-link")).unwrap();
        std::os::unix::fs::symlink(&outside, src.join("abs-dir-link")).unwrap();
        let ex = excludes(&[]).unwrap();
        // The size estimate does not count what the links point to either.
        assert_eq!(tree_size(&src, &ex).unwrap(), 4);

        let mut tar = TarSource::start(src.clone(), ex).unwrap();
        let mut bytes = Vec::new();
        tar.read_to_end(&mut bytes).unwrap();
        for (path, _, _, data) in entries(&bytes) {
            assert!(
                !String::from_utf8_lossy(&data).contains("private key"),
                "followed into {path}"
            );
        }

        let out = root.path().join("restored");
        let mut untar = Untar::start(&out).unwrap();
        untar.write_all(&bytes).unwrap();
        untar.finish().unwrap();
        assert_eq!(std::fs::read(out.join("d/real.txt")).unwrap(), b"real");
        let rel = out.join("d/rel-link");
        assert!(
            std::fs::symlink_metadata(&rel)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_link(&rel).unwrap(),
            PathBuf::from("../../outside/key")
        );
        let abs = out.join("abs-dir-link");
        assert!(
            std::fs::symlink_metadata(&abs)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_link(&abs).unwrap(), outside);
    }

    #[test]
    fn garbage_does_not_unpack() {
        let dest = tempfile::tempdir().unwrap();
        let mut untar = Untar::start(&dest.path().join("r")).unwrap();
        let _ = untar.write_all(&[0x55; 4096]);
        assert!(untar.finish().is_err());
    }
}
