//! One wake-up descriptor for many sources.
//!
//! A poller sleeps in `poll(2)` on one descriptor per back-end queue and per front end. A queue
//! that owns several sources (an NVMe/TCP initiator has a socket and a timer; a mirror has a ring
//! per leg) registers them all with a [`Notifier`] and hands the poller the notifier's descriptor:
//! an epoll set, which is readable while any registered source is. Level-triggered, so a source
//! the queue has not drained keeps the poller awake, and nothing is lost between a check and a
//! sleep.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An epoll set that becomes readable when any of its sources is readable (or writable, if asked).
#[derive(Debug)]
pub struct Notifier {
    ep: OwnedFd,
}

impl Notifier {
    /// An empty set.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Notifier { ep })
    }

    fn ctl(&self, op: i32, fd: RawFd, writable: bool) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32
                | if writable { libc::EPOLLOUT as u32 } else { 0 },
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; epoll_ctl does not
        // keep the pointer.
        if unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for input (and for room to write, if `writable`).
    pub fn add(&self, fd: RawFd, writable: bool) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, writable)
    }

    /// Changes whether `fd` is also watched for room to write (a sender with queued output wants
    /// to hear when the socket drains; otherwise a writable socket would keep the poller awake).
    pub fn modify(&self, fd: RawFd, writable: bool) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, writable)
    }

    /// Stops watching `fd` (call before closing it).
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since Linux 2.6.9).
        unsafe {
            libc::epoll_ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            );
        }
    }

    /// Whether any source is ready now (does not consume anything).
    pub fn ready(&self) -> bool {
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 1];
        // SAFETY: `ev` has room for the one event asked for; timeout 0 never blocks.
        unsafe { libc::epoll_wait(self.ep.as_raw_fd(), ev.as_mut_ptr(), 1, 0) > 0 }
    }

    /// The descriptor to sleep on.
    pub fn fd(&self) -> RawFd {
        self.ep.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; timeout 0.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn readable_while_any_source_is() {
        let n = Notifier::new().unwrap();
        let a = crate::eventfd::new().unwrap();
        let b = crate::eventfd::new().unwrap();
        n.add(a.as_raw_fd(), false).unwrap();
        n.add(b.as_raw_fd(), false).unwrap();
        assert!(!poll_readable(n.fd()) && !n.ready());
        crate::eventfd::signal(b.as_raw_fd());
        assert!(poll_readable(n.fd()) && n.ready());
        // Level-triggered: still ready until the source is drained.
        assert!(n.ready());
        crate::eventfd::drain(b.as_raw_fd());
        assert!(!n.ready());
        n.remove(a.as_raw_fd());
        crate::eventfd::signal(a.as_raw_fd());
        assert!(!n.ready(), "a removed source no longer wakes");
    }
}
