//! SIGINT/SIGTERM: blocked in every thread and taken by one waiter, which sets a flag every
//! loop checks. A second one during the shutdown ends the process at once (128 + signal).
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks SIGINT and SIGTERM (call before any other thread starts, so all inherit the mask)
/// and returns the flag a delivered signal sets.
pub fn install() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY: plain sigset manipulation; the mask is set before any other thread exists so all
    // threads inherit it and only the waiter below receives the signals; write and _exit are
    // safe to call from any thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let s = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                libc::sigwait(&set, &mut sig);
                s.store(true, Ordering::SeqCst);
                // Whatever the shutdown waits for (a command ignoring SIGTERM, a stdout
                // nobody reads), a second signal means now.
                libc::sigwait(&set, &mut sig);
                let msg = b"tcpwatch: signalled again: exiting now\n";
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(128 + sig);
            })
            .expect("spawning the signal thread");
    }
    stop
}
