//! Files tcpwatch writes for the user (`--json`, `--junit`, `--record`), opened so that
//! someone else's planted symlink or file cannot be overwritten through them: the last path
//! component is never followed, only regular files are written, and in a shared (sticky)
//! directory only the user's own file is taken.
use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Opens `path` for writing from its start, creating it (mode 0644) if it does not exist.
pub fn create(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::PermissionDenied,
                "it is a symbolic link: refusing to write through it",
            ),
            // A FIFO nobody reads (the open is non-blocking): a special file either way.
            Some(libc::ENXIO) => io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not a regular file: refusing to write to it",
            ),
            _ => e,
        })?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a regular file: refusing to write to it",
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me && in_shared_dir(path)? {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {} in a shared directory: refusing to overwrite another user's file",
                m.uid()
            ),
        ));
    }
    f.set_len(0)?;
    // Writes block as they normally would (the open was non-blocking only so that a FIFO
    // planted there could not hold it).
    // SAFETY: F_SETFL on a descriptor we own.
    unsafe {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    Ok(f)
}

/// Makes `path` a directory only this user writes: created with `mode` if missing; an
/// existing one must be a real directory (not a symlink) owned by this user, and is then
/// given `mode` and, when asked, group `gid` (who may then enter or read it).
pub fn private_dir(path: &Path, mode: u32, gid: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)?;
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let m = std::fs::symlink_metadata(path)?;
    if !m.file_type().is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a directory (a symlink or a file): refusing to use it",
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by this user: refusing to use it",
                m.uid()
            ),
        ));
    }
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Whether `path`'s directory is writable by others with the sticky bit (`/tmp`): there a
/// file of another user is theirs to keep.
fn in_shared_dir(path: &Path) -> io::Result<bool> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mode = std::fs::metadata(dir)?.mode();
    Ok(mode & 0o1000 != 0 && mode & 0o002 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("twfiles-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_symlink_is_never_written_through() {
        let d = scratch("link");
        let target = d.join("precious");
        std::fs::write(&target, "keep me").unwrap();
        let link = d.join("report.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn only_regular_files_and_truncated_only_when_taken() {
        let d = scratch("kinds");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = create(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = create(&d).unwrap_err();
        assert!(!e.to_string().is_empty());
        let f = d.join("out.json");
        std::fs::write(&f, "old old old").unwrap();
        let mut w = create(&f).unwrap();
        w.write_all(b"new").unwrap();
        drop(w);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "new");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_private_directory_is_made_or_refused() {
        let d = scratch("private");
        let made = d.join("state");
        private_dir(&made, 0o750, None).unwrap();
        let m = std::fs::symlink_metadata(&made).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o777, 0o750);
        let link = d.join("link");
        std::os::unix::fs::symlink(&made, &link).unwrap();
        let e = private_dir(&link, 0o700, None).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// As root, in a sticky world-writable directory (/tmp's shape), another user's file is
    /// refused; the user's own is fine.
    #[test]
    fn another_users_file_in_a_shared_directory_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let d = scratch("sticky");
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
        let theirs = d.join("report.xml");
        std::fs::write(&theirs, "theirs").unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let e = create(&theirs).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "theirs");
        assert!(create(&d.join("mine.xml")).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }
}
