//! Draining the ring buffers. The kernel side never wakes us (see `emit`), so the reader polls
//! on a short timer; records come from one ring per CPU group and are merged by timestamp by
//! the caller. Another thread can cut a wait short with a [`Waker`].
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};

pub struct RingReader {
    rings: Vec<RingBuf<MapData>>,
    /// An eventfd polled with the rings; `None` if the kernel would not give one.
    wake: Option<OwnedFd>,
}

/// Ends the reader's current (or next) wait at once.
pub struct Waker(Option<OwnedFd>);

impl Waker {
    pub fn wake(&self) {
        if let Some(fd) = &self.0 {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to an eventfd we own; a full counter
            // (EAGAIN) already means "wake".
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl RingReader {
    pub fn new(rings: Vec<RingBuf<MapData>>) -> Self {
        // SAFETY: eventfd has no preconditions; a negative result is an error we tolerate.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        // SAFETY: a fresh descriptor this process owns.
        let wake = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        RingReader { rings, wake }
    }

    pub fn waker(&self) -> Waker {
        Waker(self.wake.as_ref().and_then(|f| f.try_clone().ok()))
    }

    /// Sleeps `timeout`, or less if woken (or if the kernel ever signals data).
    pub fn wait(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .rings
            .iter()
            .map(|r| r.as_raw_fd())
            .chain(self.wake.as_ref().map(|f| f.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
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
        if let Some(f) = &self.wake
            && fds.last().is_some_and(|p| p.revents & libc::POLLIN != 0)
        {
            let mut v: u64 = 0;
            // SAFETY: reading 8 bytes into a live u64 resets the eventfd counter.
            unsafe { libc::read(f.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
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
