//! The RAM back end: a disk held in anonymous memory, for tests and benchmarks that need data to
//! round-trip without touching a file system. Its memory is populated when it is created, so
//! I/O never waits for page faults.

use super::{Backend, BackendError, BackendQueue, DiskInfo, IoOp, IoRequest, Submitted};
use leap_queues::Status;

/// A disk in anonymous memory, populated up front; discarded ranges are given back to the kernel.
pub struct RamBackend {
    info: DiskInfo,
    base: *mut u8,
    page: usize,
}

// SAFETY: `base` is a private anonymous mapping owned by this value. Queues on several threads
// copy into and out of it through raw pointers only (never references), like DMA into a device:
// overlapping concurrent requests leave unspecified contents, as on a real disk, but each byte is
// accessed as plain memory of a mapping that outlives every queue (queues hold an Arc).
unsafe impl Send for RamBackend {}
// SAFETY: see `Send`: all shared access is through raw-pointer copies.
unsafe impl Sync for RamBackend {}

impl RamBackend {
    /// A RAM disk of `size` bytes (rounded down to the block size).
    pub fn new(size: u64, block_size: u32) -> Result<std::sync::Arc<Self>, BackendError> {
        let size = size & !(block_size as u64 - 1);
        let len = usize::try_from(size)
            .map_err(|_| BackendError::Invalid("RAM disk too large".into()))?;
        if len == 0 {
            return Err(BackendError::Invalid(
                "RAM disk size must be at least one block".into(),
            ));
        }
        let base = crate::mem::map_anonymous(len).map_err(|source| BackendError::Io {
            what: "mmap",
            path: "ram".into(),
            source,
        })?;
        let page = crate::mem::page_size();
        // Transparent huge pages cut TLB misses on random access, then populate (Linux 5.14's
        // MADV_POPULATE_WRITE) so I/O never waits on page faults. Both are hints: on older
        // kernels or with THP off the disk still works, faulting pages in on first use.
        const MADV_POPULATE_WRITE: i32 = 23;
        // SAFETY: advising our own fresh mapping.
        unsafe {
            libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE);
            libc::madvise(base.cast(), len, MADV_POPULATE_WRITE);
        }
        Ok(std::sync::Arc::new(RamBackend {
            info: DiskInfo {
                size,
                block_size,
                read_only: false,
                discard: true,
                write_zeroes: true,
                volatile_cache: false,
                max_transfer: 0,
                serial: "leap-ram".into(),
            },
            base,
            page,
        }))
    }

    /// Zeroes `len` bytes at `offset`, giving whole pages back to the kernel.
    fn zero(&self, offset: usize, len: usize) {
        let start = offset.next_multiple_of(self.page).min(offset + len);
        let end = ((offset + len) / self.page * self.page).max(start);
        // SAFETY: the caller checked offset + len <= size; all three ranges lie inside the mapping.
        unsafe {
            std::ptr::write_bytes(self.base.add(offset), 0, start - offset);
            if end > start {
                // MADV_DONTNEED on a private anonymous mapping makes the pages read as zeros.
                if libc::madvise(
                    self.base.add(start).cast(),
                    end - start,
                    libc::MADV_DONTNEED,
                ) != 0
                {
                    std::ptr::write_bytes(self.base.add(start), 0, end - start);
                }
            }
            std::ptr::write_bytes(self.base.add(end), 0, offset + len - end);
        }
    }
}

impl Drop for RamBackend {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no queue is alive (they hold an Arc to us).
        unsafe {
            libc::munmap(self.base.cast(), self.info.size as usize);
        }
    }
}

impl Backend for std::sync::Arc<RamBackend> {
    fn info(&self) -> &DiskInfo {
        &self.as_ref().info
    }
    fn open_queue(&self, _depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
        Ok(Box::new(RamQueue { disk: self.clone() }))
    }
    fn kind(&self) -> &'static str {
        "ram"
    }
}

struct RamQueue {
    disk: std::sync::Arc<RamBackend>,
}

impl BackendQueue for RamQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
        let d = &*self.disk;
        if req
            .offset
            .checked_add(req.len)
            .is_none_or(|end| end > d.info.size)
        {
            return Submitted::Done(Status::LBA_OUT_OF_RANGE);
        }
        let mut off = req.offset as usize;
        match req.op {
            IoOp::Read | IoOp::Write { .. } => {
                for v in req.iov {
                    if (off - req.offset as usize) + v.iov_len > req.len as usize {
                        return Submitted::Done(Status::SGL_LENGTH_INVALID);
                    }
                    // Copies, never references: either side may be written concurrently by a
                    // guest or another queue.
                    // SAFETY: off + iov_len <= offset + len <= size keeps the disk side in the
                    // mapping; the caller guarantees the iovec memory (`BackendQueue::submit`).
                    unsafe {
                        let disk = d.base.add(off);
                        if req.op == IoOp::Read {
                            std::ptr::copy(disk, v.iov_base.cast::<u8>(), v.iov_len);
                        } else {
                            std::ptr::copy(v.iov_base.cast::<u8>(), disk, v.iov_len);
                        }
                    }
                    off += v.iov_len;
                }
            }
            IoOp::Discard | IoOp::WriteZeroes { .. } => d.zero(off, req.len as usize),
            IoOp::Flush => {}
        }
        Submitted::Done(Status::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::run;
    use super::*;

    #[test]
    fn round_trips_and_zeroes() {
        let disk = RamBackend::new(1 << 20, 512).unwrap();
        let mut q = disk.open_queue(8).unwrap();
        let mut w = vec![0xabu8; 8192];
        assert_eq!(
            run(&mut *q, IoOp::Write { fua: false }, 4096, &mut w),
            Status::SUCCESS
        );
        let mut r = vec![0u8; 8192];
        assert_eq!(run(&mut *q, IoOp::Read, 4096, &mut r), Status::SUCCESS);
        assert_eq!(r, w);
        let mut none = vec![0u8; 5000];
        assert_eq!(
            run(&mut *q, IoOp::Discard, 4096 + 512, &mut none),
            Status::SUCCESS
        );
        assert_eq!(run(&mut *q, IoOp::Read, 4096, &mut r), Status::SUCCESS);
        assert!(r[..512].iter().all(|&b| b == 0xab));
        assert!(r[512..5512].iter().all(|&b| b == 0));
        assert!(r[5512..].iter().all(|&b| b == 0xab));
        let mut big = vec![0u8; 4096];
        assert_eq!(
            run(&mut *q, IoOp::Read, (1 << 20) - 2048, &mut big),
            Status::LBA_OUT_OF_RANGE
        );
    }
}
