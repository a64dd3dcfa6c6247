//! tracefs: find it, or mount it (aya attaches classic tracepoints through it, and `ip netns
//! exec` remounts /sys without it), and read tracepoint record layouts. Only the classic
//! tracepoint fallbacks need it: the raw BTF tracepoints do not.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

fn populated(p: &Path) -> bool {
    p.join("events").is_dir()
}

/// Returns the tracefs mount, mounting it at `/sys/kernel/tracing` when it is missing; or
/// why it cannot be used (only the classic tracepoint fallbacks need it). A mount this
/// process may not read is said to be that, never "not mounted".
pub fn locate() -> Result<PathBuf, String> {
    for p in [TRACEFS, DEBUGFS_TRACING] {
        if populated(Path::new(p)) {
            return Ok(PathBuf::from(p));
        }
    }
    if let Err(e) = std::fs::read_dir(TRACEFS)
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        return Err(format!(
            "tracefs at {TRACEFS} is not readable by this process (root or CAP_DAC_READ_SEARCH)"
        ));
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EPERM) => format!(
                "tracefs is not mounted and mounting it needs CAP_SYS_ADMIN; run `mount -t tracefs tracefs {TRACEFS}` as root"
            ),
            _ => format!(
                "tracefs is not mounted and mounting it at {TRACEFS} failed ({err}); run `mount -t tracefs tracefs {TRACEFS}` as root"
            ),
        });
    }
    Ok(PathBuf::from(TRACEFS))
}

/// A field of a tracepoint record: byte offset and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parses a tracefs `format` file into field name → layout.
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for (i, part) in rest.split(';').enumerate() {
            let part = part.trim();
            if i == 0 {
                decl = Some(part);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "const void * skaddr", "__u8 saddr[4]", "__u8 saddr_v6[16]"
        let name = decl.rsplit([' ', '*']).next().unwrap_or(decl);
        let name = name.split('[').next().unwrap_or(name);
        out.insert(name.to_string(), Field { offset, size });
    }
    out
}

/// Reads and parses `events/<category>/<name>/format`.
pub fn read_format(
    tracefs: &Path,
    category: &str,
    name: &str,
) -> anyhow::Result<HashMap<String, Field>> {
    let p = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&p)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
    Ok(parse_format(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INET_SOCK_SET_STATE: &str = "name: inet_sock_set_state
ID: 1432
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s ...\"
";

    #[test]
    fn parses_inet_sock_set_state() {
        let f = parse_format(INET_SOCK_SET_STATE);
        assert_eq!(f["skaddr"], Field { offset: 8, size: 8 });
        assert_eq!(
            f["newstate"],
            Field {
                offset: 20,
                size: 4
            }
        );
        assert_eq!(
            f["saddr_v6"],
            Field {
                offset: 40,
                size: 16
            }
        );
        assert_eq!(
            f["daddr"],
            Field {
                offset: 36,
                size: 4
            }
        );
        assert_eq!(f["common_pid"], Field { offset: 4, size: 4 });
        assert_eq!(f.len(), 15);
    }

    #[test]
    fn ignores_garbage() {
        assert!(parse_format("field:\nfield:int x;\toffset:zz;\tsize:4;").is_empty());
    }
}
