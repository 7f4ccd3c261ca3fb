//! Atomic file writes: readers of a path see the old file or the whole new one, never a half-written
//! file, and a failed write leaves nothing behind.

use std::io;
use std::path::Path;

/// Writes `path` atomically: `write` fills a new temporary file in the same folder (it gets that file's
/// path), which is then synced and renamed over `path`. On any error the temporary file is removed and
/// an existing `path` is left untouched. `io_err` turns a failure of this mechanism (creating, syncing
/// or renaming, with the path concerned) into the caller's error type.
pub fn write_atomic<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
    io_err: impl Fn(&Path, io::Error) -> E,
) -> Result<(), E> {
    let name = path.file_name().ok_or_else(|| {
        io_err(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // As `File::create`: read-write for everyone the umask allows.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    // Dropping `tmp` before `persist` (on any error below) deletes the temporary file.
    let tmp = builder.tempfile_in(dir).map_err(|e| io_err(dir, e))?;
    write(tmp.path())?;
    std::fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    Ok(())
}

/// [`write_atomic`] of a byte string.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, bytes), |_, e| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.json");
        write_bytes_atomic(&path, b"old").unwrap();
        let err = write_atomic(
            &path,
            |tmp| {
                std::fs::write(tmp, b"half").unwrap();
                Err("disk full")
            },
            |_, _| "io",
        );
        assert_eq!(err, Err("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["results.json"]);
        write_bytes_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(entries(dir.path()), ["results.json"]);
    }

    #[test]
    fn a_folder_in_the_way_or_a_missing_folder_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("taken");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("inside"), b"x").unwrap();
        let named = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
        let write = |tmp: &Path| std::fs::write(tmp, b"x").map_err(|e| named(tmp, e));
        let err = write_atomic(&sub, write, named).unwrap_err();
        assert!(err.contains("taken"), "{err}");
        assert_eq!(entries(dir.path()), ["taken"]);
        let nowhere = dir.path().join("no/such/dir/file");
        let err = write_atomic(&nowhere, write, named).unwrap_err();
        assert!(err.contains("no/such/dir"), "{err}");
    }
}
