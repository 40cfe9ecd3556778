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
        let pool = crate::mem::Anon::new(bytes.max(1)).map_err(|e| BackendError::Io {
            what: "cannot allocate bounce buffers for",
            path: self.inner.kind().into(),
            source: e,
        })?;
        // SAFETY: the pool outlives the guard (dropped before it, field order), and is only
        // accessed through raw pointers.
        let dma = unsafe { self.inner.map_dma(pool.ptr(), pool.len()) }?;
        Ok(Box::new(BounceQueue {
            copied,
            inner,
            dma,
            pool,
            size,
            free: (0..slots).rev().collect(),
            by_slot: (0..slots).map(|_| None).collect(),
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

/// Tags the inner back end sees for requests through a slot (the slot in the low bits); a
/// request without data (flush, deallocate, write zeroes) passes through under the front end's
/// own tag, which never has this bit (front ends tag with command ids).
const SLOT_TAG: u64 = 1 << 63;

/// A request in flight through a bounce slot. The inner back end knows it by its slot (a
/// front end may have several requests with one tag in flight: a command split for the
/// transfer limit), and its completion goes to the front end under `tag`.
#[derive(Clone, Copy)]
struct InFlight {
    tag: u64,
    /// A read: copy the slot into the saved iovecs at completion.
    read: bool,
    len: usize,
}

struct BounceQueue {
    copied: Arc<Copied>,
    inner: Box<dyn BackendQueue>,
    /// The pool's DMA mapping for an inner back end with a device (VFIO); before `pool`.
    #[allow(dead_code)]
    dma: Option<super::DmaGuard>,
    pool: crate::mem::Anon,
    size: usize,
    free: Vec<usize>,
    /// What each slot holds while its request is in flight.
    by_slot: Vec<Option<InFlight>>,
    /// Per slot: the request's iovecs into window memory (kept for reads until completion).
    iov: Vec<Vec<libc::iovec>>,
}

// SAFETY: the saved iovecs point into window memory that the submitter keeps valid until the
// completion is reported (BackendQueue::submit's contract); they are only dereferenced on the
// thread that owns the queue.
unsafe impl Send for BounceQueue {}

impl BounceQueue {
    fn slot_ptr(&mut self, slot: usize) -> *mut u8 {
        debug_assert!((slot + 1) * self.size <= self.pool.len());
        // SAFETY: `slot` < number of slots, so the offset is inside the pool.
        unsafe { self.pool.ptr().add(slot * self.size) }
    }

    /// Copies a finished read's data into the window and frees slot `slot`; returns the
    /// front end's tag (None for a slot with nothing in flight: a back end's stray tag).
    fn finish(&mut self, slot: usize, ok: bool) -> Option<u64> {
        let f = self.by_slot.get_mut(slot)?.take()?;
        if f.read && ok {
            let src = self.slot_ptr(slot);
            let mut done = 0usize;
            for v in &self.iov[slot] {
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
        self.free.push(slot);
        Some(f.tag)
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
            // No data in guest memory: straight through, under its own tag.
            _ if req.tag & SLOT_TAG != 0 => return Submitted::Done(Status::INTERNAL_ERROR),
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
            tag: SLOT_TAG | slot as u64,
            iov: &local,
            ..*req
        };
        self.by_slot[slot] = Some(InFlight {
            tag: req.tag,
            read,
            len,
        });
        // SAFETY: the slot stays ours (not on the free list) until its request completes.
        match unsafe { self.inner.submit(&inner) } {
            Submitted::Done(st) => {
                self.finish(slot, st.is_success());
                Submitted::Done(st)
            }
            Submitted::Queued => Submitted::Queued,
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
            if tag & SLOT_TAG == 0 {
                // A request without data, passed through under the front end's tag.
                done(tag, st);
                continue;
            }
            let slot = tag & !SLOT_TAG;
            match usize::try_from(slot)
                .ok()
                .and_then(|k| self.finish(k, st.is_success()))
            {
                Some(tag) => done(tag, st),
                None => crate::log_limited!(
                    log::Level::Error,
                    "bounce: the back end completed request {slot}, which is not in flight"
                ),
            }
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

    /// Over a RAM disk: holds each request and carries out one per poll, last in first out (so
    /// a later part of a command finishes, alone, before an earlier one).
    struct Lifo {
        ram: Arc<RamBackend>,
    }
    struct LifoQueue {
        q: Box<dyn BackendQueue>,
        held: Vec<(u64, IoOp, u64, Vec<libc::iovec>)>,
    }
    // SAFETY: the held iovecs point into bounce slots that stay valid until their completion.
    unsafe impl Send for LifoQueue {}
    impl Backend for Lifo {
        fn info(&self) -> &DiskInfo {
            self.ram.info()
        }
        fn open_queue(&self, depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
            Ok(Box::new(LifoQueue {
                q: self.ram.open_queue(depth)?,
                held: Vec::new(),
            }))
        }
        fn kind(&self) -> &'static str {
            "lifo"
        }
    }
    impl BackendQueue for LifoQueue {
        unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
            self.held
                .push((req.tag, req.op, req.offset, req.iov.to_vec()));
            Submitted::Queued
        }
        fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
            let n = self.held.len().min(1);
            if let Some((tag, op, offset, iov)) = self.held.pop() {
                let req = IoRequest {
                    tag,
                    op,
                    offset,
                    len: iov.iter().map(|v| v.iov_len as u64).sum(),
                    iov: &iov,
                    cmd: None,
                };
                // SAFETY: the iovecs are bounce slots, valid until this completion.
                let st = match unsafe { self.q.submit(&req) } {
                    Submitted::Done(st) => st,
                    Submitted::Queued => Status::INTERNAL_ERROR,
                };
                done(tag, st);
            }
            n
        }
        fn in_flight(&self) -> usize {
            self.held.len()
        }
    }

    #[test]
    fn parts_of_one_command_complete_in_any_order() {
        // A command split for the transfer limit: two reads under one tag, completed in the
        // reverse order; each part's data must land in its own place.
        let ram = RamBackend::new(1 << 20, 512).unwrap();
        let pattern: Vec<u8> = (0..16384u32).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        let mut wq = ram.open_queue(4).unwrap();
        let mut w = pattern.clone();
        assert_eq!(
            run(&mut *wq, IoOp::Write { fua: false }, 0, &mut w),
            Status::SUCCESS
        );
        let b = BounceBackend::new(Arc::new(Lifo { ram }), 8192).unwrap();
        let mut q = b.open_queue(4).unwrap();
        let mut out = vec![0u8; 16384];
        let (first, second) = out.split_at_mut(8192);
        for (off, buf) in [(0u64, first), (8192, second)] {
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            let req = IoRequest {
                tag: 7,
                op: IoOp::Read,
                offset: off,
                len: 8192,
                iov: &iov,
                cmd: None,
            };
            // SAFETY: `out` outlives the requests, which complete in the poll below.
            assert!(matches!(unsafe { q.submit(&req) }, Submitted::Queued));
        }
        // And a flush, which passes through under its own tag.
        let flush = IoRequest {
            tag: 9,
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            iov: &[],
            cmd: None,
        };
        // SAFETY: no data.
        assert!(matches!(unsafe { q.submit(&flush) }, Submitted::Queued));
        let mut tags = Vec::new();
        while q.in_flight() > 0 {
            q.poll(&mut |t, st| tags.push((t, st)));
        }
        assert_eq!(
            tags,
            vec![
                (9, Status::SUCCESS),
                (7, Status::SUCCESS),
                (7, Status::SUCCESS)
            ],
            "completions under the front end's tags"
        );
        assert_eq!(out, pattern, "each part's data in its own place");
        assert_eq!(q.room(), 4);
    }

    #[test]
    fn limits_must_hold_whole_blocks() {
        let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 4096).unwrap());
        assert!(BounceBackend::new(ram.clone(), 2048).is_err());
        assert!(BounceBackend::new(ram.clone(), 6000).is_err());
        assert!(BounceBackend::new(ram, 8192).is_ok());
    }
}
