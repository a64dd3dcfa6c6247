//! Draining the ring buffers. The kernel side never wakes us (see `emit`), so the reader polls
//! on a short timer; records come from one ring per CPU group and are merged by timestamp by
//! the caller.
use std::os::fd::AsRawFd;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};

pub struct RingReader {
    rings: Vec<RingBuf<MapData>>,
}

impl RingReader {
    pub fn new(rings: Vec<RingBuf<MapData>>) -> Self {
        RingReader { rings }
    }

    /// Sleeps `timeout` (or less, if the kernel ever signals data).
    pub fn wait(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .rings
            .iter()
            .map(|r| libc::pollfd {
                fd: r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: valid pollfd array; EINTR and errors just end the wait early.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
    }

    pub fn len(&self) -> usize {
        self.rings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }

    /// Hands pending records to `f(ring, bytes)`, at most `max` per ring so a flood cannot
    /// starve the caller.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(usize, &[u8])) -> usize {
        let mut n = 0;
        for (idx, ring) in self.rings.iter_mut().enumerate() {
            let mut k = 0;
            while k < max {
                match ring.next() {
                    Some(item) => {
                        f(idx, &item);
                        k += 1;
                    }
                    None => break,
                }
            }
            n += k;
        }
        n
    }
}
