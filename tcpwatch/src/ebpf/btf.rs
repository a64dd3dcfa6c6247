//! Kernel struct offsets and enum values from `/sys/kernel/btf/vmlinux`: the eBPF side has no
//! CO-RE relocations, so every field it reads is located here and passed in as a global.
use std::path::Path;

use btfparse::{Offset, Readable, TypeInformation, TypeVariant};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse kernel BTF: {0}")]
    Parse(String),
    #[error("kernel BTF has no type {0}")]
    NoType(String),
    #[error("kernel BTF: {ty}.{path}: {msg}")]
    Field {
        ty: String,
        path: String,
        msg: String,
    },
}

struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = offset as usize;
        match start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF blob",
            )),
        }
    }
}

pub struct KernelBtf {
    types: TypeInformation,
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let types =
            TypeInformation::new(&Bytes(data)).map_err(|e| BtfError::Parse(format!("{e:?}")))?;
        Ok(KernelBtf { types })
    }

    /// Byte offset of a (dotted, anonymous-union-transparent) member path in a struct.
    pub fn offset_of(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        let id = self.struct_id(ty)?;
        let field = |msg: String| BtfError::Field {
            ty: ty.into(),
            path: path.into(),
            msg,
        };
        match self.types.offset_of(id, path) {
            Ok((_, Offset::ByteOffset(b))) => Ok(b),
            Ok((_, Offset::BitOffsetAndSize(bits, _))) if bits % 8 == 0 => Ok(bits / 8),
            Ok((_, Offset::BitOffsetAndSize(..))) => Err(field("is a bit field".into())),
            Err(e) => Err(field(format!("{e:?}"))),
        }
    }

    fn struct_id(&self, ty: &str) -> Result<u32, BtfError> {
        // Names are shared by structs, functions and typedefs; prefer the struct.
        let found = self.types.get().iter().find(|(_, t)| match t {
            TypeVariant::Struct(s) => s.name().as_deref() == Some(ty),
            _ => false,
        });
        match found {
            Some((id, _)) => Ok(*id),
            None => self
                .types
                .id_of(ty)
                .ok_or_else(|| BtfError::NoType(ty.into())),
        }
    }

    /// All enumerators of a named enum (e.g. `skb_drop_reason`), names as written in the kernel.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, u64)>, BtfError> {
        for t in self.types.get().values() {
            match t {
                TypeVariant::Enum(e) if e.name().as_deref() == Some(name) => {
                    return Ok(e
                        .named_value_list()
                        .iter()
                        .map(|v| {
                            let n = match v.value {
                                btfparse::Integer32Value::Signed(s) => s as i64 as u64,
                                btfparse::Integer32Value::Unsigned(u) => u as u64,
                            };
                            (v.name.clone(), n)
                        })
                        .collect());
                }
                TypeVariant::Enum64(e) if e.name().as_deref() == Some(name) => {
                    return Ok(e
                        .named_value_list()
                        .iter()
                        .map(|v| {
                            let n = match v.value {
                                btfparse::Integer64Value::Signed(s) => s as u64,
                                btfparse::Integer64Value::Unsigned(u) => u,
                            };
                            (v.name.clone(), n)
                        })
                        .collect());
                }
                _ => {}
            }
        }
        Err(BtfError::NoType(name.into()))
    }

    /// True when the kernel has a function of this name (a candidate fentry/fexit target).
    pub fn has_func(&self, name: &str) -> bool {
        self.types
            .get()
            .values()
            .any(|t| matches!(t, TypeVariant::Func(f) if f.name().as_deref() == Some(name)))
    }
}

/// Struct fields one signal's programs read, by the global each one fills.
pub struct FieldGroup {
    pub name: &'static str,
    pub fields: &'static [(&'static str, &'static str, &'static str)],
}

/// Fields of sockets every program reads: without them there is no BTF strategy at all.
pub const CORE: FieldGroup = FieldGroup {
    name: "socket",
    fields: &[
        ("OFF_SKC_DADDR", "sock_common", "skc_daddr"),
        ("OFF_SKC_RCV_SADDR", "sock_common", "skc_rcv_saddr"),
        ("OFF_SKC_DPORT", "sock_common", "skc_dport"),
        ("OFF_SKC_FAMILY", "sock_common", "skc_family"),
        ("OFF_SKC_NET", "sock_common", "skc_net"),
        ("OFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr"),
        ("OFF_SKC_V6_RCV_SADDR", "sock_common", "skc_v6_rcv_saddr"),
        ("OFF_NET_NS_INUM", "net", "ns.inum"),
        ("OFF_SK_PROTOCOL", "sock", "sk_protocol"),
        ("OFF_INET_SPORT", "inet_sock", "inet_sport"),
        ("OFF_SKC_STATE", "sock_common", "skc_state"),
        ("OFF_SKC_NUM", "sock_common", "skc_num"),
    ],
};

pub const LISTENER: FieldGroup = FieldGroup {
    name: "listener queues",
    fields: &[
        ("OFF_SK_ACK_BACKLOG", "sock", "sk_ack_backlog"),
        ("OFF_SK_MAX_ACK_BACKLOG", "sock", "sk_max_ack_backlog"),
        (
            "OFF_ICSK_QLEN",
            "inet_connection_sock",
            "icsk_accept_queue.qlen",
        ),
        (
            "OFF_ICSK_YOUNG",
            "inet_connection_sock",
            "icsk_accept_queue.young",
        ),
        ("OFF_SK_DROPS", "sock", "sk_drops"),
    ],
};

pub const PACKET: FieldGroup = FieldGroup {
    name: "packet headers",
    fields: &[
        ("OFF_SKB_HEAD", "sk_buff", "head"),
        ("OFF_SKB_NETWORK_HEADER", "sk_buff", "network_header"),
        ("OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header"),
        ("OFF_SKB_DEV", "sk_buff", "dev"),
        ("OFF_NETDEV_NET", "net_device", "nd_net"),
        ("OFF_SKB_CB", "sk_buff", "cb"),
        ("OFF_TCB_TCP_FLAGS", "tcp_skb_cb", "tcp_flags"),
    ],
};

/// Segments per retransmit. Optional: without them (globals left 0) a sent retransmit counts
/// one segment.
pub const RETRANS_SEGS: FieldGroup = FieldGroup {
    name: "retransmitted segments",
    fields: &[
        ("OFF_TCB_GSO_SEGS", "tcp_skb_cb", "tcp_gso_segs"),
        ("OFF_TP_TOTAL_RETRANS", "tcp_sock", "total_retrans"),
    ],
};

pub const MISC: FieldGroup = FieldGroup {
    name: "errors and requests",
    fields: &[
        ("OFF_SK_ERR", "sock", "sk_err"),
        ("OFF_REQ_NUM_RETRANS", "request_sock", "num_retrans"),
        ("OFF_REQ_LISTENER", "request_sock", "sk"),
    ],
};

pub const TIMEWAIT: FieldGroup = FieldGroup {
    name: "timewait",
    fields: &[
        ("OFF_TIMER_FUNCTION", "timer_list", "function"),
        ("OFF_TW_TIMER", "inet_timewait_sock", "tw_timer"),
        ("OFF_TIMER_PPREV", "timer_list", "entry.pprev"),
        ("OFF_TW_SUBSTATE", "inet_timewait_sock", "tw_substate"),
        ("OFF_SKC_COOKIE", "sock_common", "skc_cookie"),
    ],
};

pub const INVENTORY: FieldGroup = FieldGroup {
    name: "inventory",
    fields: &[
        ("OFF_SK_SOCKET", "sock", "sk_socket"),
        ("OFF_SOCKET_INODE", "socket_alloc", "vfs_inode"),
        ("OFF_INODE_INO", "inode", "i_ino"),
        (
            "OFF_ICSK_RETRANSMITS",
            "inet_connection_sock",
            "icsk_retransmits",
        ),
        (
            "OFF_ICSK_PROBES_OUT",
            "inet_connection_sock",
            "icsk_probes_out",
        ),
        ("OFF_TCP_MSTAMP", "tcp_sock", "tcp_mstamp"),
    ],
};

/// Socket owners from `iter/task_file`.
pub const OWNERS: FieldGroup = FieldGroup {
    name: "owners",
    fields: &[
        ("OFF_FILE_INODE", "file", "f_inode"),
        ("OFF_INODE_MODE", "inode", "i_mode"),
        ("OFF_INODE_INO", "inode", "i_ino"),
        ("OFF_TASK_TGID", "task_struct", "tgid"),
        ("OFF_TASK_COMM", "task_struct", "comm"),
    ],
};

pub const GROUPS: &[&FieldGroup] = &[
    &CORE,
    &LISTENER,
    &PACKET,
    &RETRANS_SEGS,
    &MISC,
    &TIMEWAIT,
    &INVENTORY,
    &OWNERS,
];

/// Resolves every field of a group; the first missing one is an error.
pub fn resolve(btf: &KernelBtf, group: &FieldGroup) -> Result<Vec<(&'static str, u32)>, BtfError> {
    group
        .fields
        .iter()
        .map(|(global, ty, path)| Ok((*global, btf.offset_of(ty, path)?)))
        .collect()
}

/// A value of `enum skb_drop_reason` by its short name (`TCP_LISTEN_OVERFLOW`).
pub fn drop_reason(btf: &KernelBtf, name: &str) -> Option<u32> {
    let full = format!("SKB_DROP_REASON_{name}");
    btf.enum_values("skb_drop_reason")
        .ok()?
        .into_iter()
        .find(|(n, _)| *n == full)
        .map(|(_, v)| v as u32)
}

/// Everything the probe takes from kernel BTF, resolved once per kernel build and cached.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// (global, byte offset) of every group that resolved.
    pub offsets: Vec<(String, u32)>,
    /// (group, why) of every group that did not.
    pub group_errors: Vec<(String, String)>,
    /// `skb_drop_reason` values the programs filter on, `u32::MAX` when absent.
    pub listen_overflow: u32,
    pub no_socket: u32,
    /// `sk_rst_reason` names by value.
    pub rst_reasons: Vec<(u32, String)>,
}

impl Facts {
    pub fn from_btf(b: &KernelBtf) -> Facts {
        let mut f = Facts::default();
        for g in GROUPS {
            match resolve(b, g) {
                Ok(o) => f
                    .offsets
                    .extend(o.into_iter().map(|(n, v)| (n.to_string(), v))),
                Err(e) => f.group_errors.push((g.name.to_string(), e.to_string())),
            }
        }
        f.listen_overflow = drop_reason(b, "TCP_LISTEN_OVERFLOW").unwrap_or(u32::MAX);
        f.no_socket = drop_reason(b, "NO_SOCKET").unwrap_or(u32::MAX);
        if let Ok(vals) = b.enum_values("sk_rst_reason") {
            f.rst_reasons = vals
                .into_iter()
                .map(|(n, v)| (v as u32, n.trim_start_matches("SK_RST_REASON_").to_string()))
                .collect();
        }
        f
    }

    /// The offsets with their globals' static names (unknown names are dropped).
    pub fn globals(&self) -> Vec<(&'static str, u32)> {
        let known = GROUPS
            .iter()
            .flat_map(|g| g.fields.iter().map(|(n, _, _)| *n));
        known
            .filter_map(|n| {
                self.offsets
                    .iter()
                    .find(|(m, _)| m == n)
                    .map(|(_, v)| (n, *v))
            })
            .collect()
    }

    pub fn group_ok(&self, group: &FieldGroup) -> bool {
        !self.group_errors.iter().any(|(g, _)| g == group.name)
    }

    pub fn group_error(&self, group: &FieldGroup) -> Option<&str> {
        self.group_errors
            .iter()
            .find(|(g, _)| g == group.name)
            .map(|(_, e)| e.as_str())
    }
}

/// Where resolved facts are kept between runs: tmpfs, so a reboot (a new kernel) clears it.
/// Root-only, below the daemon's socket directory (which its group may enter).
pub const CACHE_DIR: &str = "/run/tcpwatch/cache";

/// What a cache entry must match: this build of tcpwatch (its field list) and this kernel.
pub fn cache_key(btf_len: u64) -> String {
    let version = std::fs::read_to_string("/proc/version").unwrap_or_default();
    // FNV-1a over the field groups, so a changed list invalidates old entries.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for g in GROUPS {
        for (a, b, c) in g.fields {
            for byte in a.bytes().chain(b.bytes()).chain(c.bytes()) {
                h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    format!(
        "{}|{:x}|{btf_len}|{}",
        env!("CARGO_PKG_VERSION"),
        h,
        version.trim()
    )
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    key: String,
    facts: Facts,
}

/// Resolves the facts, from the cache when it matches this kernel and build (the full BTF
/// parse is most of tcpwatch's start-up time); returns whether the cache was used.
pub fn facts(path: &Path) -> Result<(Facts, bool), BtfError> {
    let len = std::fs::metadata(path)
        .map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?
        .len();
    let key = cache_key(len);
    let file = Path::new(CACHE_DIR).join("btf-facts.json");
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(c) = serde_json::from_str::<CacheFile>(&text)
        && c.key == key
    {
        return Ok((c.facts, true));
    }
    let f = Facts::from_btf(&KernelBtf::load(path)?);
    // Best effort: a read-only /run only costs the next start the parse again.
    if std::fs::create_dir_all(CACHE_DIR).is_ok() {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(CACHE_DIR, std::fs::Permissions::from_mode(0o700));
        if let Ok(text) = serde_json::to_string(&CacheFile {
            key,
            facts: f.clone(),
        }) {
            let tmp = file.with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &file);
            }
        }
    }
    Ok((f, false))
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn facts_round_trip_and_globals_keep_static_names() {
        let f = Facts {
            offsets: vec![("OFF_SKC_DADDR".into(), 0), ("NOT_A_GLOBAL".into(), 9)],
            group_errors: vec![("timewait".into(), "no tw_timer".into())],
            listen_overflow: 40,
            no_socket: 3,
            rst_reasons: vec![(1, "NO_SOCKET".into())],
        };
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<Facts>(&text).unwrap(), f);
        assert_eq!(f.globals(), vec![("OFF_SKC_DADDR", 0)]);
        assert!(!f.group_ok(&TIMEWAIT) && f.group_ok(&CORE));
        assert_eq!(f.group_error(&TIMEWAIT), Some("no tw_timer"));
    }

    #[test]
    fn the_key_changes_with_the_btf() {
        assert_ne!(cache_key(1), cache_key(2));
    }
}
