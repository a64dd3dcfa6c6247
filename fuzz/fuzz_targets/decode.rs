//! Ring records and iterator records from the kernel side, as bytes: decoding never panics,
//! whatever they hold.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcpwatch::ebpf::{decode, records};

fuzz_target!(|data: &[u8]| {
    let _ = decode::decode(data);
    let (socks, bad) = records::parse(data);
    assert!(socks.len() + bad <= data.len() / 16 + 1);
    let _ = records::parse_owner_records(data);
});
