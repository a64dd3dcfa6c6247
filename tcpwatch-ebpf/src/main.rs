//! Kernel side of tcpwatch: the eBPF programs, their maps and the globals userspace fills in.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod common;
mod iter;
mod signals;
mod state;
mod timewait;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
