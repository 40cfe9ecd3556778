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
    map_anon(len, libc::MAP_PRIVATE | libc::MAP_NORESERVE)
}

/// Maps `len` bytes of anonymous memory with `flags` (besides `MAP_ANONYMOUS`).
fn map_anon(len: usize, flags: i32) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(base.cast())
}

/// Private anonymous memory owned by this value (see [`map_anonymous`]), unmapped on drop.
/// Accessed only through raw pointers: back ends and devices read and write it.
pub(crate) struct Anon {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this value; its users (a connection, a back-end queue and the
// I/O they start) order their accesses through the thread that owns them, as for guest memory.
unsafe impl Send for Anon {}
// SAFETY: as for Send: shared only to keep the mapping alive and to hand out its address.
unsafe impl Sync for Anon {}

impl Anon {
    /// `len` bytes (reserved, committed as touched).
    pub(crate) fn new(len: usize) -> std::io::Result<Anon> {
        Ok(Anon {
            ptr: map_anonymous(len)?,
            len,
        })
    }
    /// `len` bytes for a device's DMA: shared (a fork never gives a child copy-on-write pages
    /// under the device) and populated (VFIO pins them anyway).
    pub(crate) fn new_for_dma(len: usize) -> std::io::Result<Anon> {
        Ok(Anon {
            ptr: map_anon(len, libc::MAP_SHARED | libc::MAP_POPULATE)?,
            len,
        })
    }
    /// The first byte.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// The length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; this is the last owner, so nothing uses it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
