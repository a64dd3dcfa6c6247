//! The iterators, read on demand: the socket inventory (`iter/tcp`, in the caller's
//! namespace), socket owners (`iter/task_file`) and every namespace's listeners
//! (`iter/bpf_sk_storage_map` over LISTEN_SK, a link aya 0.14 cannot make with a map).
use anyhow::{Context as _, anyhow};
use aya::maps::MapData;
use aya::programs::Iter;

use super::config::Inventory;
use super::probe::Probe;
use super::verifier::short;

impl Probe {
    /// Runs the inventory iterator in the calling thread's network namespace (the kernel binds
    /// the iterator to the namespace of the task that creates it). `listeners_only` skips
    /// everything but LISTEN sockets in the kernel.
    pub fn iterate(&mut self, listeners_only: bool) -> anyhow::Result<Vec<u8>> {
        {
            let mode = self
                .ebpf
                .as_mut()
                .context("no BPF object loaded")?
                .map_mut("ITER_MODE")
                .context("map ITER_MODE missing")?;
            let mut mode: aya::maps::Array<&mut MapData, u32> =
                aya::maps::Array::try_from(mode).map_err(|e| anyhow!("map ITER_MODE: {e}"))?;
            mode.set(0, u32::from(listeners_only), 0)
                .map_err(|e| anyhow!("setting ITER_MODE: {e}"))?;
        }
        // The listeners-only program ends the walk (EAGAIN) at the first socket that is not
        // listening: listeners come first, the rest is not needed.
        self.read_iter("dump_tcp", "tcp", listeners_only)
    }

    /// Runs iterator program `prog` (`iter/{target}`) once and returns all it wrote; EAGAIN
    /// ends the read normally when the program may stop the walk early.
    fn read_iter(
        &mut self,
        prog: &str,
        target: &str,
        eagain_ends: bool,
    ) -> anyhow::Result<Vec<u8>> {
        use std::io::Read as _;
        let p: &mut Iter = self
            .ebpf
            .as_mut()
            .context("no BPF object loaded")?
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing"))?
            .try_into()
            .map_err(|e| anyhow!("program {prog}: {e}"))?;
        let id = p
            .attach()
            .map_err(|e| anyhow!("attaching iter/{target}: {}", short(&e)))?;
        let link = p
            .take_link(id)
            .map_err(|e| anyhow!("iter/{target} link: {e}"))?;
        let mut file = link
            .into_file()
            .map_err(|e| anyhow!("creating the {target} iterator: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if eagain_ends && e.raw_os_error() == Some(libc::EAGAIN) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow!("reading the {target} iterator: {e}")),
            }
        }
        Ok(buf)
    }

    /// Socket inode -> owning process, from `iter/task_file`; `None` when that iterator is
    /// not loaded (the caller falls back to /proc/*/fd).
    pub fn socket_owners(&mut self) -> Option<anyhow::Result<Vec<u8>>> {
        if !self
            .status
            .iter()
            .any(|s| s.signal == "socket owners" && s.hook.as_deref() == Some("iter/task_file"))
        {
            return None;
        }
        Some(self.read_iter("dump_task_file", "task_file", false))
    }

    /// The listeners of every namespace in one read (`iter/bpf_sk_storage_map` over
    /// LISTEN_SK), or `None` when that iterator is not loaded.
    pub fn all_listeners(&mut self) -> Option<anyhow::Result<Vec<u8>>> {
        if !self.status.iter().any(|s| {
            s.signal == "listener samples" && s.hook.as_deref() == Some("iter/bpf_sk_storage_map")
        }) {
            return None;
        }
        Some(self.read_map_iter("dump_listeners", "LISTEN_SK"))
    }

    /// Runs map iterator `prog` over map `map` once. aya 0.14 attaches iterators without
    /// target parameters, so the link is created here (BPF_LINK_CREATE with the map's fd).
    fn read_map_iter(&mut self, prog: &str, map: &str) -> anyhow::Result<Vec<u8>> {
        use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd};
        use std::io::Read as _;
        use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
        let ebpf = self.ebpf.as_ref().context("no BPF object loaded")?;
        let prog_fd = ebpf
            .program(prog)
            .with_context(|| format!("program {prog} missing"))?
            .fd()
            .map_err(|e| anyhow!("program {prog}: {e}"))?
            .as_fd()
            .as_raw_fd();
        let map_fd = match ebpf.map(map) {
            Some(aya::maps::Map::SkStorage(m)) => m.fd().as_fd().as_raw_fd(),
            _ => anyhow::bail!("map {map} missing"),
        };
        let sys = |cmd: bpf_cmd, attr: &mut bpf_attr| -> std::io::Result<OwnedFd> {
            // SAFETY: a zero-initialised bpf_attr with the fields this command reads set.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    cmd as libc::c_long,
                    attr as *mut bpf_attr,
                    std::mem::size_of::<bpf_attr>(),
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: the kernel returned a new descriptor we now own.
            Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
        };
        // union bpf_iter_link_info: its first member is the map's fd.
        let info: [u32; 4] = [map_fd as u32, 0, 0, 0];
        // SAFETY: bpf_attr is plain old data.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.link_create.__bindgen_anon_1.prog_fd = prog_fd as u32;
        attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
        attr.link_create.__bindgen_anon_3.__bindgen_anon_1.iter_info = info.as_ptr() as u64;
        attr.link_create
            .__bindgen_anon_3
            .__bindgen_anon_1
            .iter_info_len = std::mem::size_of_val(&info) as u32;
        let link = sys(bpf_cmd::BPF_LINK_CREATE, &mut attr)
            .map_err(|e| anyhow!("attaching iter/bpf_sk_storage_map: {e}"))?;
        // SAFETY: as above, for iter_create.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.iter_create.link_fd = link.as_raw_fd() as u32;
        let iter = sys(bpf_cmd::BPF_ITER_CREATE, &mut attr)
            .map_err(|e| anyhow!("creating the {map} iterator: {e}"))?;
        let mut file = std::fs::File::from(iter);
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| anyhow!("reading the {map} iterator: {e}"))?;
        Ok(buf)
    }

    /// Where the inventory comes from, if anywhere.
    pub fn inventory(&self) -> Option<Inventory> {
        let s = self.status.iter().find(|s| s.signal == "inventory")?;
        match s.hook.as_deref()? {
            "iter/tcp" => Some(Inventory::Iter),
            "sock_diag" => Some(Inventory::SockDiag),
            _ => None,
        }
    }
}
