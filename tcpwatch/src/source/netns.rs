//! Network namespaces: finding them, and running code inside one. A thread may switch its own
//! netns (setns), so per-netns reads (/proc/thread-self/net, /proc/sys/net, iter/tcp) happen on
//! the calling thread and switch back afterwards.
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

/// A namespace and a path that keeps it reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsRef {
    pub inode: u32,
    pub path: PathBuf,
}

/// Every network namespace in use: named ones (/run/netns) and those of running processes.
pub fn list() -> Vec<NetnsRef> {
    let mut found: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let own = PathBuf::from("/proc/thread-self/ns/net");
    if let Ok(m) = std::fs::metadata(&own) {
        // The caller's own netns, by a path that stays valid.
        found.insert(
            m.ino() as u32,
            PathBuf::from(format!("/proc/{}/ns/net", std::process::id())),
        );
    }
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                found.entry(m.ino() as u32).or_insert_with(|| e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let p = e.path().join("ns/net");
            if let Ok(m) = std::fs::metadata(&p) {
                found.entry(m.ino() as u32).or_insert(p);
            }
        }
    }
    // Without CAP_SYS_ADMIN setns fails: list only the namespace that can be read.
    let own = std::fs::metadata(&own).map(|m| m.ino() as u32).ok();
    let enter = super::caps::can_enter_namespaces();
    found
        .into_iter()
        .filter(|(inode, _)| enter || Some(*inode) == own)
        .map(|(inode, path)| NetnsRef { inode, path })
        .collect()
}

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`): the kind of namespace an nsfs file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The inode of the network namespace at `path` (an nsfs file: `/proc/PID/ns/net`,
/// `/run/netns/NAME`), read through one open descriptor, so a PID reused meanwhile cannot
/// make it another namespace. Anything else is an error saying what it is.
pub fn inode_of(path: &std::path::Path) -> std::io::Result<u32> {
    use std::io::{Error, ErrorKind};
    let f = File::open(path)?;
    // SAFETY: an ioctl without argument on a descriptor we own; a file that is not nsfs
    // answers ENOTTY.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a namespace file (expected /proc/PID/ns/net or /run/netns/NAME)",
        ));
    }
    if kind != libc::CLONE_NEWNET {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "a namespace, but not a network namespace",
        ));
    }
    Ok(f.metadata()?.ino() as u32)
}

/// Runs `f` with this thread inside `ns`, then returns the thread to its own namespace.
/// Fails (the namespace is gone) when the path now leads elsewhere: a `/proc/PID` path whose
/// process ended and whose PID was reused.
pub fn run_in<T>(ns: &NetnsRef, f: impl FnOnce() -> T) -> std::io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(&ns.path)?;
    if target.metadata()?.ino() as u32 != ns.inode {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the namespace is gone (its path leads to another one now)",
        ));
    }
    let same = home.metadata()?.ino() == target.metadata()?.ino();
    if !same {
        setns(&target)?;
    }
    struct Back(File, bool);
    impl Drop for Back {
        fn drop(&mut self) {
            if self.1 {
                // Returning to our own namespace cannot fail for a thread that left it.
                let _ = setns(&self.0);
            }
        }
    }
    let _back = Back(home, !same);
    Ok(f())
}

fn setns(f: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) on a valid nsfs descriptor, affecting this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
