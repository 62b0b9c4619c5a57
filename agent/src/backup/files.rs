//! Files as a backup source and a restore destination: a directory (a host path, or a Docker
//! volume's mountpoint) streamed as a tar archive with exclude patterns, and a tar stream
//! unpacked into an empty directory. A thread writes the tar into a pipe that the pipeline
//! reads, so memory stays bounded; a failure of the walk surfaces as the reader's error at
//! end of stream, never as a short but "successful" archive.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use globset::{Glob, GlobSet, GlobSetBuilder};

/// Builds the exclude matcher (patterns are relative to the directory).
pub fn excludes(patterns: &[String]) -> Result<GlobSet, String> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(Glob::new(p).map_err(|e| format!("exclude {p:?}: {e}"))?);
        // `cache/**` should also drop the `cache` directory entry itself.
        if let Some(dir) = p.strip_suffix("/**") {
            builder.add(Glob::new(dir).map_err(|e| format!("exclude {p:?}: {e}"))?);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// Total size of the regular files under `dir` that are not excluded (for the disk check).
pub fn tree_size(dir: &Path, excluded: &GlobSet) -> io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap_or(&path);
            if excluded.is_match(rel) {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// A tar stream of `dir` (paths relative to it), produced on a thread.
#[derive(Debug)]
pub struct TarSource {
    pipe: io::PipeReader,
    worker: Option<JoinHandle<io::Result<()>>>,
}

impl TarSource {
    pub fn start(dir: PathBuf, excluded: GlobSet) -> io::Result<TarSource> {
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", dir.display()),
            ));
        }
        let (reader, writer) = io::pipe()?;
        let worker = std::thread::Builder::new()
            .name("drover-tar".into())
            .spawn(move || write_tar(&dir, &excluded, writer))?;
        Ok(TarSource {
            pipe: reader,
            worker: Some(worker),
        })
    }
}

fn write_tar(dir: &Path, excluded: &GlobSet, out: io::PipeWriter) -> io::Result<()> {
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, out));
    builder.follow_symlinks(false);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&current)
            .map_err(|e| with_path(e, &current))?
            .collect::<Result<_, _>>()
            .map_err(|e| with_path(e, &current))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            if excluded.is_match(&rel) {
                continue;
            }
            let kind = entry.file_type().map_err(|e| with_path(e, &path))?;
            if kind.is_dir() {
                builder
                    .append_dir(&rel, &path)
                    .map_err(|e| with_path(e, &path))?;
                stack.push(path);
            } else if kind.is_file() || kind.is_symlink() {
                builder
                    .append_path_with_name(&path, &rel)
                    .map_err(|e| with_path(e, &path))?;
            }
            // Sockets, fifos and devices are skipped: they hold no data to restore.
        }
    }
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

    #[test]
    fn garbage_does_not_unpack() {
        let dest = tempfile::tempdir().unwrap();
        let mut untar = Untar::start(&dest.path().join("r")).unwrap();
        let _ = untar.write_all(&[0x55; 4096]);
        assert!(untar.finish().is_err());
    }
}
