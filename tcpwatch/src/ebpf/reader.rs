//! Draining the ring buffer: the kernel side only wakes us past a fill threshold, so the reader
//! also polls on a short timer (the cheap way to batch wakeups).
use std::os::fd::AsRawFd;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};

pub struct RingReader {
    ring: RingBuf<MapData>,
}

impl RingReader {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        RingReader { ring }
    }

    /// Waits until data is announced or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; EINTR and errors just end the wait early.
        unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
    }

    /// Hands every pending record to `f`, returns how many there were. Bounded by `max` so a
    /// flood cannot starve the caller's other duties.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < max {
            match self.ring.next() {
                Some(item) => {
                    f(&item);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }
}
