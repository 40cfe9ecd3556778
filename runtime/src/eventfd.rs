//! The few eventfd operations the runtime needs, in one place.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A new non-blocking, close-on-exec eventfd.
pub fn new() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to the counter, waking whoever polls it.
pub fn signal(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a local to an eventfd.
    unsafe {
        libc::write(fd, (&one as *const u64).cast(), 8);
    }
}

/// Resets the counter (non-blocking: a no-op when it is zero).
pub fn drain(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local from a non-blocking eventfd.
    unsafe {
        libc::read(fd, (&mut v as *mut u64).cast(), 8);
    }
}
