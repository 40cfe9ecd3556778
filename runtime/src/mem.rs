//! Private anonymous memory the runtime owns (RAM disks, connection buffer pools).

/// Maps `len` bytes of private anonymous memory, reserved but not committed (`MAP_NORESERVE`):
/// pages are backed as they are first touched. The caller owns the mapping and unmaps it.
pub(crate) fn map_anonymous(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(base.cast())
}
