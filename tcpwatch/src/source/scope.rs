//! Which sockets belong to `check`'s command: a cgroup v2 made for the run (every descendant
//! stays in it, however short-lived), or the process tree by parent pid where cgroup v2 is
//! not available. Owners carry the cgroup id recorded in task context, so softirq events of
//! the command's sockets are attributed too.
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::event::Owner;

enum Kind {
    /// Every process.
    Any,
    Cgroup {
        dir: PathBuf,
        /// The cgroup's path as /proc/PID/cgroup shows it.
        rel: String,
        ids: HashSet<u64>,
        /// Ids seen and found outside after a rescan.
        outside: HashSet<u64>,
        scanned: Instant,
    },
    /// Descendants of this pid.
    Tree(u32),
}

pub struct RunScope {
    kind: Kind,
    /// Per pid: in scope or not (for owners without a cgroup id, and the pid fallback).
    pids: HashMap<u32, bool>,
    /// Why the cgroup could not be used, when it could not.
    pub warning: Option<String>,
}

/// The cgroup v2 mount point and this process's cgroup under it.
fn own_cgroup() -> Result<(PathBuf, String), String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let mount = mi
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2").then(|| {
                let f: Vec<&str> = pre.split_whitespace().collect();
                (
                    f.get(3).copied().unwrap_or("/").to_string(),
                    f.get(4).copied().unwrap_or("").to_string(),
                )
            })
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let cg = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let path = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is not in a cgroup v2 hierarchy")?
        .trim()
        .to_string();
    // Inside a container the mount's root is this process's cgroup namespace root.
    let under = path
        .strip_prefix(mount.0.trim_end_matches('/'))
        .unwrap_or(&path);
    Ok((
        PathBuf::from(mount.1).join(under.trim_start_matches('/')),
        path,
    ))
}

fn inode(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// Cgroups `tcpwatch-check-PID` below `parent` whose run is gone (killed before it could
/// remove its own): their processes move to `parent`, untouched, and the cgroups go.
fn remove_stale(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tcpwatch-check-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "tcpwatch");
        if !alive {
            release_dir(&e.path());
        }
    }
}

/// Moves every process of the cgroup `dir` (at any depth) to its parent and removes it.
fn release_dir(dir: &Path) {
    let parent_procs = dir.parent().map(|p| p.join("cgroup.procs"));
    for d in subtree(dir) {
        if let (Ok(s), Some(pp)) = (
            std::fs::read_to_string(d.join("cgroup.procs")),
            &parent_procs,
        ) {
            for pid in s.lines() {
                let _ = std::fs::write(pp, pid);
            }
        }
        let _ = std::fs::remove_dir(&d);
    }
}

/// Every cgroup at or below `dir`, deepest first.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

fn parent_pid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cgroup_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

impl RunScope {
    pub fn any() -> RunScope {
        RunScope {
            kind: Kind::Any,
            pids: HashMap::new(),
            warning: None,
        }
    }

    /// A fresh cgroup below this process's own (so resource accounting stays where it was);
    /// `None` kind falls back to the pid tree once the child exists.
    pub fn for_command() -> RunScope {
        let mut s = RunScope {
            kind: Kind::Tree(0),
            pids: HashMap::new(),
            warning: None,
        };
        match Self::make_cgroup() {
            Ok(k) => s.kind = k,
            Err(e) => s.warning = Some(e),
        }
        s
    }

    fn make_cgroup() -> Result<Kind, String> {
        let (parent, rel_parent) = own_cgroup()?;
        remove_stale(&parent);
        let name = format!("tcpwatch-check-{}", std::process::id());
        let dir = parent.join(&name);
        std::fs::create_dir(&dir).map_err(|e| format!("creating cgroup {}: {e}", dir.display()))?;
        let id = inode(&dir).ok_or("cgroup vanished")?;
        Ok(Kind::Cgroup {
            rel: format!("{}/{name}", rel_parent.trim_end_matches('/')),
            dir,
            ids: HashSet::from([id]),
            outside: HashSet::new(),
            scanned: Instant::now(),
        })
    }

    /// Starts `cmd` with its arguments inside the scope: the child joins the run's cgroup
    /// before exec and gets back the signals tcpwatch blocks for its own signal thread.
    pub fn spawn(&mut self, cmd: &[String]) -> std::io::Result<std::process::Child> {
        use std::os::unix::process::CommandExt as _;
        let join = self.join_path();
        let mut c = std::process::Command::new(&cmd[0]);
        c.args(&cmd[1..]);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec: sigprocmask, prctl,
        // getppid, open, write, close.
        unsafe {
            c.pre_exec(move || {
                // The command dies with tcpwatch, even a tcpwatch killed with SIGKILL, so a
                // run never leaves it behind under init. (Its own children stay in the run's
                // cgroup, which the next run clears.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != parent {
                    libc::_exit(127);
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                if let Some(p) = &join {
                    // A failure here shows in `adopt`, which falls back to the pid tree.
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let child = c.spawn()?;
        self.adopt(child.id());
        Ok(child)
    }

    /// `cgroup.procs` of the run's cgroup, for the child to join before exec.
    fn join_path(&self) -> Option<CString> {
        match &self.kind {
            Kind::Cgroup { dir, .. } => {
                CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok()
            }
            _ => None,
        }
    }

    /// Called once the child runs: checks it landed in the cgroup, else follows its pid tree.
    fn adopt(&mut self, child: u32) {
        match &self.kind {
            Kind::Cgroup { rel, .. } => {
                if cgroup_of(child).as_deref() != Some(rel.as_str()) {
                    self.warning = Some(format!("the command did not join cgroup {rel}"));
                    self.release();
                    self.kind = Kind::Tree(child);
                }
            }
            Kind::Tree(_) => self.kind = Kind::Tree(child),
            Kind::Any => {}
        }
    }

    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Any => "every process".into(),
            Kind::Cgroup { rel, .. } => format!("the command's process tree (cgroup {rel})"),
            Kind::Tree(p) => format!(
                "the command's process tree (descendants of pid {p}; processes that exit within a few ms may be missed)"
            ),
        }
    }

    fn pid_in(&mut self, pid: u32) -> bool {
        if let Some(&v) = self.pids.get(&pid) {
            return v;
        }
        let v = match &self.kind {
            Kind::Any => true,
            Kind::Cgroup { rel, .. } => {
                cgroup_of(pid).is_some_and(|c| c == *rel || c.starts_with(&format!("{rel}/")))
            }
            Kind::Tree(root) => {
                let mut p = pid;
                let mut hit = false;
                for _ in 0..64 {
                    if p == *root {
                        hit = true;
                        break;
                    }
                    match parent_pid(p) {
                        Some(pp) if pp > 1 => p = pp,
                        _ => break,
                    }
                }
                hit
            }
        };
        self.pids.insert(pid, v);
        v
    }

    /// Whether a socket with this owner belongs to the run. Sockets whose owner is unknown
    /// do not, except when every process is watched.
    pub fn owner_in(&mut self, o: &Option<Owner>) -> bool {
        let Some(o) = o else {
            return matches!(self.kind, Kind::Any);
        };
        match &mut self.kind {
            Kind::Any => true,
            Kind::Cgroup {
                dir,
                ids,
                outside,
                scanned,
                ..
            } if o.cgroup_id != 0 => {
                if ids.contains(&o.cgroup_id) {
                    return true;
                }
                // The command may have made cgroups of its own below ours: an id never seen
                // before rescans at once; one already found outside at most every 100 ms.
                let fresh = !outside.contains(&o.cgroup_id);
                if fresh || scanned.elapsed() > Duration::from_millis(100) {
                    *scanned = Instant::now();
                    ids.extend(subtree(dir).iter().filter_map(|p| inode(p)));
                }
                let inside = ids.contains(&o.cgroup_id);
                if !inside {
                    outside.insert(o.cgroup_id);
                }
                inside
            }
            _ => self.pid_in(o.pid),
        }
    }

    /// Sends `sig` to every process of the run (the cgroup's, at every depth).
    pub fn signal_all(&self, sig: i32) {
        for pid in self.remaining() {
            // SAFETY: kill(2) on pids read from our own cgroup.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// Processes of the run still alive.
    pub fn remaining(&self) -> Vec<u32> {
        match &self.kind {
            Kind::Cgroup { dir, .. } => subtree(dir)
                .iter()
                .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
                .flat_map(|s| {
                    s.lines()
                        .filter_map(|l| l.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Removes the cgroup; processes left running move to the parent cgroup, untouched.
    pub fn release(&mut self) {
        if let Kind::Cgroup { dir, .. } = &self.kind {
            release_dir(dir);
        }
    }
}

impl Drop for RunScope {
    fn drop(&mut self) {
        self.release();
    }
}
