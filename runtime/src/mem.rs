//! Memory helpers: the page size, and private anonymous memory the runtime owns (RAM disks,
//! connection buffer pools).

/// The system page size, read at run time (4 KiB, 16 KiB and 64 KiB all occur on ARM). If the
/// query fails, 64 KiB: a multiple of every page size we ship on.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a system constant.
    let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(raw)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(64 << 10)
}

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
