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
    ],
};

pub const GROUPS: &[&FieldGroup] = &[&CORE, &LISTENER, &PACKET, &MISC, &TIMEWAIT, &INVENTORY];

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
