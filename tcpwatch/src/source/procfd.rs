//! Socket owners for sockets that existed before tcpwatch started (the kernel side only learns
//! owners from new activity): the inode of every socket a process holds, from the
//! `iter/task_file` records (`ebpf::records`) or, without that iterator, from /proc/*/fd.
use std::collections::HashMap;

use crate::model::event::{Comm, Owner, OwnerSource};

/// `socket:[12345]` → 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Socket inode → owning process (the first one found when several share it). Each link is
/// read relative to its process's open fd directory, so the kernel resolves one path component
/// per descriptor instead of four (most of the cost with thousands of sockets).
pub fn socket_owners() -> HashMap<u64, Owner> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let mut comm = None;
        for_each_fd_link(pid, |link| {
            let Some(ino) = std::str::from_utf8(link).ok().and_then(socket_inode) else {
                return;
            };
            let c = *comm.get_or_insert_with(|| {
                let s = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                Comm::new(s.trim_end())
            });
            out.entry(ino).or_insert(Owner {
                pid,
                tid: pid,
                comm: c,
                cgroup_id: 0,
                source: OwnerSource::Inventory,
            });
        });
    }
    out
}

/// Calls `f` with the target of every descriptor link of process `pid` that fits 64 bytes
/// (a socket's does; longer ones are files, not wanted here). A process that exits meanwhile
/// just ends the walk.
fn for_each_fd_link(pid: u32, mut f: impl FnMut(&[u8])) {
    let Ok(path) = std::ffi::CString::new(format!("/proc/{pid}/fd")) else {
        return;
    };
    // SAFETY: a NUL-terminated path; the descriptor is owned by the DIR stream from here on.
    let dir = unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return;
        }
        let d = libc::fdopendir(fd);
        if d.is_null() {
            libc::close(fd);
            return;
        }
        d
    };
    // SAFETY: `dir` is a valid stream until closedir; readdir's entry lives until the next call.
    unsafe {
        let dfd = libc::dirfd(dir);
        let mut buf = [0u8; 64];
        loop {
            let e = libc::readdir(dir);
            if e.is_null() {
                break;
            }
            let name = (*e).d_name.as_ptr();
            if *name == b'.' as libc::c_char {
                continue;
            }
            let n = libc::readlinkat(dfd, name, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 && (n as usize) < buf.len() {
                f(&buf[..n as usize]);
            }
        }
        libc::closedir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_from_link() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[1]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn finds_our_own_socket() {
        use std::os::unix::fs::MetadataExt as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = std::fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&l)
        ))
        .unwrap()
        .ino();
        let owners = socket_owners();
        assert_eq!(owners.get(&ino).map(|o| o.pid), Some(std::process::id()));
    }
}
