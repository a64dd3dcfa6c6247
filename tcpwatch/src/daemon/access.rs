//! Who may reach the daemon, and where: the API socket (mode 0660 root:tcpwatch when a
//! `tcpwatch` group exists, 0600 otherwise), the state directory (0750 root:tcpwatch, or
//! 0700), and each client's credentials checked again on every connection (SO_PEERCRED):
//! the file mode is the first gate, not the only one.
use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::server::api::Peer;
use crate::source::{files, host};

/// Members of this group may use the API without any capability.
pub const GROUP: &str = "tcpwatch";
pub const DEFAULT_SOCKET: &str = "/run/tcpwatch/tcpwatch.sock";
pub const DEFAULT_STATE: &str = "/var/lib/tcpwatch";

pub fn group() -> Option<u32> {
    host::group_id(GROUP)
}

pub fn describe(group: Option<u32>) -> String {
    match group {
        Some(_) => format!("root and members of group {GROUP}"),
        None => format!("root only: there is no group {GROUP}"),
    }
}

/// Listens on `path`: a stale socket (nobody answers) is replaced, a live one means another
/// daemon runs, anything else there is left alone.
pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if std::fs::symlink_metadata(dir).is_err() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| anyhow::anyhow!("--socket {shown}: creating its directory: {e}"))?;
        }
        let m = std::fs::metadata(dir)
            .map_err(|e| anyhow::anyhow!("--socket {shown}: its directory: {e}"))?;
        // Someone else could swap the socket for theirs in a directory they may write to
        // (a sticky one like /tmp only lets them touch their own files).
        let shared = m.mode() & 0o1000 != 0;
        if m.uid() != host::euid() && m.uid() != 0 && !shared {
            anyhow::bail!(
                "--socket {shown}: its directory belongs to uid {}: refusing to serve there",
                m.uid()
            );
        }
        if m.mode() & 0o022 != 0 && !shared {
            anyhow::bail!(
                "--socket {shown}: its directory is writable by others: refusing to serve there"
            );
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if m.uid() != host::euid() {
                anyhow::bail!(
                    "--socket {shown}: a socket of uid {} is there: refusing to replace it",
                    m.uid()
                );
            }
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "--socket {shown}: a daemon already listens there (stop it first, or use another --socket)"
                );
            }
            std::fs::remove_file(path)
                .map_err(|e| anyhow::anyhow!("--socket {shown}: removing the stale socket: {e}"))?;
        }
        Ok(_) => anyhow::bail!("--socket {shown}: something that is not a socket is there"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("--socket {shown}: {e}"),
    }
    // The default directory is tcpwatch's own: others must be able to reach the socket in
    // it (an older tcpwatch made it root-only for its cache, which now lives below it).
    if path == Path::new(DEFAULT_SOCKET)
        && let Some(dir) = path.parent()
    {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    let l = UnixListener::bind(path).map_err(|e| anyhow::anyhow!("--socket {shown}: {e}"))?;
    l.set_nonblocking(true)?;
    // Until these two calls the socket has the umask's mode, which never lets others
    // connect (that needs write permission): no window where more may connect than intended.
    if let Some(g) = group {
        std::os::unix::fs::chown(path, None, Some(g))
            .map_err(|e| anyhow::anyhow!("--socket {shown}: giving it to group {GROUP}: {e}"))?;
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("--socket {shown}: {e}"))?;
    Ok(l)
}

/// The record's directory: made (or checked) to be this user's, readable by the group.
pub fn state_dir(dir: &Path, group: Option<u32>) -> anyhow::Result<()> {
    let mode = if group.is_some() { 0o750 } else { 0o700 };
    files::private_dir(dir, mode, group)
        .map_err(|e| anyhow::anyhow!("--state-dir {}: {e}", dir.display()))
}

/// Whether `peer` may use the API: root, the daemon's own user, or a member of the group.
pub fn check(peer: &Peer, group: Option<u32>) -> Result<(), String> {
    if peer.uid == 0 || peer.uid == host::euid() {
        return Ok(());
    }
    if let Some(g) = group
        && (peer.gid == g || peer.pid.is_some_and(|p| host::groups_of(p).contains(&g)))
    {
        return Ok(());
    }
    Err(match group {
        Some(_) => format!(
            "uid {} may not use this daemon: it answers root and members of group {GROUP} (usermod -aG {GROUP} USER, then log in again)",
            peer.uid
        ),
        None => format!(
            "uid {} may not use this daemon: it answers root only (create group {GROUP} and restart it to let others in)",
            peer.uid
        ),
    })
}
