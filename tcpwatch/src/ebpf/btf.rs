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

/// The struct fields the eBPF programs read, by the global each one fills.
pub const SOCK_FIELDS: &[(&str, &str, &str)] = &[
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
];

/// Resolves every field of `fields`; the first missing one is an error.
pub fn resolve(
    btf: &KernelBtf,
    fields: &[(&'static str, &str, &str)],
) -> Result<Vec<(&'static str, u32)>, BtfError> {
    fields
        .iter()
        .map(|(global, ty, path)| Ok((*global, btf.offset_of(ty, path)?)))
        .collect()
}
