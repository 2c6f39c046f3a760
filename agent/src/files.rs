//! Files the agent keeps, written so that a power cut at any moment leaves the old content
//! or the new.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file the agent could not read or write, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// For `map_err`: the error of an operation on `path`.
    pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        move |source| FileError {
            path: path.to_owned(),
            source,
        }
    }
}

/// Writes `text` to `path` atomically and durably: a power cut at any moment leaves the old
/// content or the new, and once this returns, the new.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // On FAT (the boot partition) a rename over a file moves the new file's inode into the
    // old one's directory entry and leaves that entry to the inode's writeback, some 30 s
    // later: a directory fsync does not write it. Without this fsync of the file under its
    // new name, a trial armed just before a power cut was lost (seen by the power-cut
    // test on the QEMU image), and a commit would have been.
    std::fs::File::open(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        // The rename itself must reach the disk.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
