//! Socket owners from /proc/*/fd: the inode of every socket a process holds, for sockets that
//! existed before tcpwatch started (the kernel side only learns owners from new activity).
use std::collections::HashMap;

use crate::model::event::{Comm, Owner, OwnerSource};

/// `socket:[12345]` → 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Socket inode → owning process (the first one found when several share it).
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
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = link.to_str().and_then(socket_inode) else {
                continue;
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
        }
    }
    out
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
