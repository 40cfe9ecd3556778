//! Data behind a window goes through local bounce buffers: the Host DRAM → SoC DRAM hop of
//! LeapIO.
//!
//! In the SoCvm and ARM SoC modes guest memory is a window onto host memory (a BAR). It may be
//! uncached or device memory: the kernel cannot do I/O straight into it (no O_DIRECT, no
//! page-cache copy with unaligned accesses on ARM), and neither can a socket. [`BounceBackend`]
//! wraps any back end so that its queues never see window addresses: a write's data is copied
//! from the window into a local buffer before the inner queue gets it, and a read's data is
//! copied from the local buffer into the window when the inner queue completes it, both with
//! the window's access rules ([`crate::window::copy_from_window`]). Everything else passes
//! through. Buffers are allocated once per queue (one per request slot, `max_transfer` bytes
//! each), so nothing is allocated per request, and the transfer limit is announced through
//! [`DiskInfo::max_transfer`], so front ends never build a larger request.

use super::{Backend, BackendError, BackendQueue, DiskInfo, IoOp, IoRequest, Submitted};
use crate::window::{copy_from_window, copy_to_window};
use leap_queues::Status;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A back end whose requests' data is bounced through local memory.
pub struct BounceBackend {
    inner: Arc<dyn Backend>,
    info: DiskInfo,
    /// One counter pair per queue opened, summed when read: the data path never shares a line.
    counters: Mutex<Vec<Arc<Copied>>>,
}

/// Bytes one queue copied across the window. Written only by the queue's poller (Relaxed: a
/// statistic, read by others whenever they like).
#[derive(Default)]
struct Copied {
    from_window: AtomicU64,
    to_window: AtomicU64,
}

impl Copied {
    fn add(c: &AtomicU64, n: usize) {
        c.store(c.load(Ordering::Relaxed) + n as u64, Ordering::Relaxed);
    }
}

/// Request data that crossed the window, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowBytes {
    /// Copied out of the window (write data).
    pub from_window: u64,
    /// Copied into the window (read data).
    pub to_window: u64,
}

impl BounceBackend {
    /// Wraps `inner`; each request carries at most `max_transfer` bytes (a multiple of the
    /// block size, or the inner back end's own limit if smaller).
    pub fn new(inner: Arc<dyn Backend>, max_transfer: u32) -> Result<Self, BackendError> {
        let mut info = inner.info().clone();
        let bs = info.block_size;
        let limit = match info.max_transfer {
            0 => max_transfer,
            m => m.min(max_transfer),
        };
        if limit < bs || limit % bs != 0 {
            return Err(BackendError::Invalid(format!(
                "bounce buffers of {limit} bytes do not hold whole {bs}-byte blocks"
            )));
        }
        info.max_transfer = limit;
        Ok(BounceBackend {
            inner,
            info,
            counters: Mutex::new(Vec::new()),
        })
    }

    /// Request data copied across the window so far, by every queue ever opened.
    pub fn window_bytes(&self) -> WindowBytes {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().fold(WindowBytes::default(), |t, q| WindowBytes {
            from_window: t.from_window + q.from_window.load(Ordering::Relaxed),
            to_window: t.to_window + q.to_window.load(Ordering::Relaxed),
        })
    }
}

impl Backend for BounceBackend {
    fn info(&self) -> &DiskInfo {
        &self.info
    }
    fn open_queue(&self, depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
        let inner = self.inner.open_queue(depth)?;
        let slots = depth.min(inner.depth()).max(1);
        let size = self.info.max_transfer as usize;
        let bytes = slots
            .checked_mul(size)
            .ok_or_else(|| BackendError::Invalid("bounce pool too large".into()))?;
        let copied = Arc::new(Copied::default());
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(copied.clone());
        Ok(Box::new(BounceQueue {
            copied,
            inner,
            pool: vec![0u8; bytes].into_boxed_slice(),
            size,
            free: (0..slots).rev().collect(),
            by_tag: Vec::with_capacity(slots),
            iov: (0..slots).map(|_| Vec::with_capacity(16)).collect(),
        }))
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn nvme_native(&self) -> bool {
        self.inner.nvme_native()
    }
    fn direct_fallbacks(&self) -> u64 {
        self.inner.direct_fallbacks()
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let w = self.window_bytes();
        let mut c = vec![
            ("window_bytes_in", w.from_window),
            ("window_bytes_out", w.to_window),
        ];
        c.extend(self.inner.counters());
        c
    }
}

/// A request in flight through a bounce slot.
struct InFlight {
    tag: u64,
    slot: usize,
    /// A read: copy the slot into the saved iovecs at completion.
    read: bool,
    len: usize,
}

struct BounceQueue {
    copied: Arc<Copied>,
    inner: Box<dyn BackendQueue>,
    pool: Box<[u8]>,
    size: usize,
    free: Vec<usize>,
    by_tag: Vec<InFlight>,
    /// Per slot: the request's iovecs into window memory (kept for reads until completion).
    iov: Vec<Vec<libc::iovec>>,
}

// SAFETY: the saved iovecs point into window memory that the submitter keeps valid until the
// completion is reported (BackendQueue::submit's contract); they are only dereferenced on the
// thread that owns the queue.
unsafe impl Send for BounceQueue {}

impl BounceQueue {
    fn slot_ptr(&mut self, slot: usize) -> *mut u8 {
        self.pool[slot * self.size..].as_mut_ptr()
    }

    /// Copies a finished read's data into the window and frees its slot.
    fn finish(&mut self, k: usize) {
        let f = self.by_tag.swap_remove(k);
        if f.read {
            let src = self.slot_ptr(f.slot);
            let mut done = 0usize;
            for v in &self.iov[f.slot] {
                let n = v.iov_len.min(f.len - done);
                // SAFETY: `src .. src + f.len` is this slot of the pool; the iovec is window
                // memory the submitter keeps valid until this completion (submit's contract).
                unsafe {
                    copy_to_window(
                        v.iov_base.cast(),
                        std::slice::from_raw_parts(src.add(done), n),
                    )
                };
                done += n;
            }
            Copied::add(&self.copied.to_window, done);
        }
        self.free.push(f.slot);
    }
}

impl BackendQueue for BounceQueue {
    fn room(&self) -> usize {
        self.inner.room().min(self.free.len())
    }
    fn depth(&self) -> usize {
        self.inner.depth().min(self.iov.len())
    }
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
        let read = match req.op {
            IoOp::Read => true,
            IoOp::Write { .. } => false,
            // No data in guest memory: straight through.
            // SAFETY: the caller's contract, unchanged.
            _ => return unsafe { self.inner.submit(req) },
        };
        let len = req.len as usize;
        if len > self.size {
            return Submitted::Done(Status::INVALID_FIELD);
        }
        let Some(slot) = self.free.pop() else {
            // `room` said there was one: a caller bug, not a guest's.
            return Submitted::Done(Status::INTERNAL_ERROR);
        };
        let buf = self.slot_ptr(slot);
        self.iov[slot].clear();
        self.iov[slot].extend_from_slice(req.iov);
        if !read {
            let mut done = 0usize;
            for v in req.iov {
                let n = v.iov_len.min(len - done);
                // SAFETY: the iovec is window memory valid for this call (submit's contract);
                // the destination is this slot, `done + n <= len <= size` bytes into it.
                unsafe {
                    copy_from_window(
                        v.iov_base.cast(),
                        std::slice::from_raw_parts_mut(buf.add(done), n),
                    )
                };
                done += n;
            }
            Copied::add(&self.copied.from_window, done);
        }
        let local = [libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        }];
        let inner = IoRequest {
            iov: &local,
            ..*req
        };
        // SAFETY: the slot stays ours (not on the free list) until this tag completes.
        match unsafe { self.inner.submit(&inner) } {
            Submitted::Done(st) => {
                self.by_tag.push(InFlight {
                    tag: req.tag,
                    slot,
                    read: read && st.is_success(),
                    len,
                });
                let k = self.by_tag.len() - 1;
                self.finish(k);
                Submitted::Done(st)
            }
            Submitted::Queued => {
                self.by_tag.push(InFlight {
                    tag: req.tag,
                    slot,
                    read,
                    len,
                });
                Submitted::Queued
            }
        }
    }
    fn flush(&mut self) {
        self.inner.flush()
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut finished: [(u64, Status); 32] = [(0, Status::SUCCESS); 32];
        let mut n = 0;
        let mut extra = Vec::new();
        let count = self.inner.poll(&mut |tag, st| {
            if n < finished.len() {
                finished[n] = (tag, st);
                n += 1;
            } else {
                extra.push((tag, st));
            }
        });
        for &(tag, st) in finished[..n].iter().chain(extra.iter()) {
            if let Some(k) = self.by_tag.iter().position(|f| f.tag == tag) {
                if !st.is_success() {
                    self.by_tag[k].read = false;
                }
                self.finish(k);
            }
            done(tag, st);
        }
        count
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn wake_fd(&self) -> Option<RawFd> {
        self.inner.wake_fd()
    }
    fn clear_wake(&mut self) -> bool {
        self.inner.clear_wake()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::run;
    use super::*;
    use crate::backend::RamBackend;

    /// A back end that records the data addresses it is given, over a RAM disk.
    struct Spy {
        ram: Arc<RamBackend>,
        seen: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
    }
    struct SpyQueue {
        q: Box<dyn BackendQueue>,
        seen: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
    }
    impl Backend for Spy {
        fn info(&self) -> &DiskInfo {
            self.ram.info()
        }
        fn open_queue(&self, depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
            Ok(Box::new(SpyQueue {
                q: self.ram.open_queue(depth)?,
                seen: self.seen.clone(),
            }))
        }
        fn kind(&self) -> &'static str {
            "spy"
        }
    }
    impl BackendQueue for SpyQueue {
        unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
            for v in req.iov {
                self.seen
                    .lock()
                    .unwrap()
                    .push((v.iov_base as usize, v.iov_len));
            }
            // SAFETY: passed through under the caller's contract.
            unsafe { self.q.submit(req) }
        }
    }

    #[test]
    fn data_goes_through_local_buffers_only() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spy = Arc::new(Spy {
            ram: RamBackend::new(1 << 20, 512).unwrap(),
            seen: seen.clone(),
        });
        let b = BounceBackend::new(spy, 64 << 10).unwrap();
        assert_eq!(b.info().max_transfer, 64 << 10);
        let mut q = b.open_queue(4).unwrap();
        // "Window" memory: ordinary memory here, at odd offsets.
        let mut win = vec![0u8; 3 * 8192 + 3];
        for (i, x) in win.iter_mut().enumerate() {
            *x = (i * 7 + 1) as u8;
        }
        let data = win[3..3 + 8192].to_vec();
        assert_eq!(
            run(
                &mut *q,
                IoOp::Write { fua: false },
                4096,
                &mut win[3..3 + 8192]
            ),
            Status::SUCCESS
        );
        let mut back = vec![0u8; 8192 + 1];
        assert_eq!(
            run(&mut *q, IoOp::Read, 4096, &mut back[1..]),
            Status::SUCCESS
        );
        assert_eq!(&back[1..], &data[..]);
        assert_eq!(
            b.window_bytes(),
            WindowBytes {
                from_window: 8192,
                to_window: 8192
            }
        );
        // The inner back end saw only its pool, never the window's addresses.
        let win_range = win.as_ptr() as usize..win.as_ptr() as usize + win.len();
        let back_range = back.as_ptr() as usize..back.as_ptr() as usize + back.len();
        for &(a, l) in seen.lock().unwrap().iter() {
            assert!(
                !win_range.contains(&a) && !back_range.contains(&a),
                "{a:#x}+{l}"
            );
        }
        // Larger than a bounce buffer: refused, never overflowing it.
        let mut big = vec![0u8; 128 << 10];
        assert_eq!(run(&mut *q, IoOp::Read, 0, &mut big), Status::INVALID_FIELD);
        // Flush passes through; slots are all free again.
        assert_eq!(run(&mut *q, IoOp::Flush, 0, &mut []), Status::SUCCESS);
        assert_eq!(q.room(), 4);
    }

    #[test]
    fn queued_completions_copy_back_through_poll() {
        // The file back end completes on io_uring, so reads finish in `poll`.
        let dir = tempfile::tempdir().unwrap();
        let file = crate::backend::FileBackend::open(&crate::backend::FileOptions {
            path: dir.path().join("b.img"),
            size: Some(1 << 20),
            direct: false,
            read_only: false,
            block_size: 512,
        })
        .unwrap();
        let b = BounceBackend::new(Arc::new(file), 16 << 10).unwrap();
        let mut q = b.open_queue(8).unwrap();
        let mut w: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        let want = w.clone();
        assert_eq!(
            run(&mut *q, IoOp::Write { fua: false }, 8192, &mut w),
            Status::SUCCESS
        );
        let mut r = vec![0u8; 16384];
        assert_eq!(run(&mut *q, IoOp::Read, 8192, &mut r), Status::SUCCESS);
        assert_eq!(r, want);
        assert_eq!(q.room().min(8), 8, "every slot free again");
        let mut q2 = b.open_queue(8).unwrap();
        assert_eq!(run(&mut *q2, IoOp::Read, 0, &mut r), Status::SUCCESS);
        assert_eq!(
            b.window_bytes(),
            WindowBytes {
                from_window: 16384,
                to_window: 32768
            },
            "every queue's copies are counted"
        );
    }

    #[test]
    fn limits_must_hold_whole_blocks() {
        let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 4096).unwrap());
        assert!(BounceBackend::new(ram.clone(), 2048).is_err());
        assert!(BounceBackend::new(ram.clone(), 6000).is_err());
        assert!(BounceBackend::new(ram, 8192).is_ok());
    }
}
