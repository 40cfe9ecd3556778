//! Blocking implementations of each operation, shared by the thread-pool fallback and by the
//! io_uring path's slow cases. Each loops over short transfers and retries EINTR.

use super::IoOp;

/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE`: deallocate, reads return zeros.
pub(crate) const PUNCH: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE`: zero, keeping the blocks allocated.
pub(crate) const ZERO: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_ZERO_RANGE;

/// A zero-filled buffer for writing zeros where fallocate cannot.
pub(crate) fn zero_buffer() -> &'static [u8] {
    static ZEROS: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; 1 << 20].into_boxed_slice())
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Runs `op` to completion on `fd`. Returns the errno on failure.
///
/// # Safety
/// The iovecs must describe memory valid for the transfer direction for the whole call.
pub(crate) unsafe fn execute(
    fd: i32,
    op: IoOp,
    offset: u64,
    len: u64,
    iov: &mut [libc::iovec],
) -> Result<(), i32> {
    match op {
        IoOp::Read | IoOp::Write { .. } => {
            let mut start = 0;
            let mut off = offset;
            let mut left = len;
            while left > 0 {
                let rest = &iov[start..];
                let (ptr, cnt) = (rest.as_ptr(), rest.len().min(1024) as i32);
                let flags = if let IoOp::Write { fua: true } = op {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                // SAFETY: the caller guarantees the iovecs' memory is valid for this transfer;
                // `rest` is the not-yet-transferred tail of them.
                let n = unsafe {
                    if op == IoOp::Read {
                        libc::preadv2(fd, ptr, cnt, off as i64, flags)
                    } else {
                        libc::pwritev2(fd, ptr, cnt, off as i64, flags)
                    }
                };
                if n < 0 {
                    match errno() {
                        libc::EINTR | libc::EAGAIN => continue,
                        e => return Err(e),
                    }
                }
                if n == 0 {
                    return Err(libc::EIO); // end of file inside the disk: it was truncated
                }
                off += n as u64;
                left = left.saturating_sub(n as u64);
                advance(iov, &mut start, n as usize);
            }
            Ok(())
        }
        IoOp::Flush => retry(|| {
            // SAFETY: fdatasync has no memory-safety preconditions.
            unsafe { libc::fdatasync(fd) }
        }),
        IoOp::Discard => match fallocate(fd, PUNCH, offset, len) {
            // Discard is advisory: a file system that cannot punch holes loses nothing.
            Err(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        },
        IoOp::WriteZeroes { unmap } => {
            let first = if unmap { PUNCH } else { ZERO };
            match fallocate(fd, first, offset, len) {
                Err(libc::EOPNOTSUPP) | Err(libc::EINVAL) => {}
                r => return r,
            }
            if !unmap && fallocate(fd, PUNCH, offset, len).is_ok() {
                return Ok(());
            }
            write_zeros(fd, offset, len)
        }
    }
}

fn retry(mut f: impl FnMut() -> i32) -> Result<(), i32> {
    loop {
        if f() == 0 {
            return Ok(());
        }
        match errno() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

fn fallocate(fd: i32, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
    retry(|| {
        // SAFETY: fallocate has no memory-safety preconditions.
        unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) }
    })
}

fn write_zeros(fd: i32, mut offset: u64, mut len: u64) -> Result<(), i32> {
    let z = zero_buffer();
    while len > 0 {
        let n = len.min(z.len() as u64) as usize;
        let mut iov = [libc::iovec {
            iov_base: z.as_ptr() as *mut _,
            iov_len: n,
        }];
        // SAFETY: the zero buffer is static and only read from.
        unsafe { execute(fd, IoOp::Write { fua: false }, offset, n as u64, &mut iov)? };
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Drops `n` transferred bytes from the front of `v[*start..]`, in place.
pub(crate) fn advance(v: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while n > 0 && *start < v.len() {
        let cur = &mut v[*start];
        if n >= cur.iov_len {
            n -= cur.iov_len;
            *start += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the original buffer.
            cur.iov_base = unsafe { cur.iov_base.cast::<u8>().add(n) }.cast();
            cur.iov_len -= n;
            n = 0;
        }
    }
}
