//! A capture file from anywhere (`top --replay`): read in bounded memory, never a panic, and
//! a file without events is an error, not a hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcpwatch::source::replay::{Limits, Reader};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_line: 4096,
        max_leading_bytes: 1 << 16,
    };
    let mut r = Reader::new(std::io::Cursor::new(data), limits);
    let mut n = 0;
    loop {
        match r.next_event() {
            Ok(Some(_)) => n += 1,
            Ok(None) | Err(_) => break,
        }
        assert!(n <= data.len(), "more events than bytes");
    }
    let _ = r.new_reasons();
});
