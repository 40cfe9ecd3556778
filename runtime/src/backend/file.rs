//! The file back end: a regular file or a block device, driven by io_uring with reads and writes
//! going straight between the disk and guest memory.
//!
//! Flush is `fdatasync`, Discard punches a hole, Write Zeroes uses `FALLOC_FL_ZERO_RANGE` (falling
//! back to a hole, then to writing zeros, where the file system cannot). With `direct`, the file is
//! opened with `O_DIRECT`; requests whose buffers are not aligned for it go through a second,
//! buffered descriptor instead of failing. Where io_uring is unavailable (old kernel, seccomp, or
//! `LEAP_NO_IO_URING=1`), a small thread pool runs the same operations with blocking calls; this is
//! logged once at open.

use super::sync_io::{self, advance, PUNCH, ZERO};
use super::{
    errno_status, Backend, BackendError, BackendQueue, DiskInfo, IoOp, IoRequest, Submitted,
    MAX_IOVECS,
};
use io_uring::{opcode, types, IoUring};
use leap_queues::Status;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// How to open a file or block device.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// The file or device.
    pub path: PathBuf,
    /// Create the file, or grow it, to this many bytes (sparse). `None`: the file must exist.
    pub size: Option<u64>,
    /// Use `O_DIRECT` (bypass the page cache).
    pub direct: bool,
    /// Refuse writes.
    pub read_only: bool,
    /// Logical block size reported to guests: 512 or 4096.
    pub block_size: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Engine {
    Uring,
    Pool,
}

/// A disk backed by a file or block device.
pub struct FileBackend {
    info: DiskInfo,
    path: PathBuf,
    /// The descriptor requests use: `O_DIRECT` when asked for.
    fd: OwnedFd,
    /// A buffered descriptor for requests `O_DIRECT` cannot take (same file).
    buffered: Option<OwnedFd>,
    /// Alignment `O_DIRECT` needs of buffers, lengths and offsets.
    dio_align: usize,
    engine: Engine,
    /// Cleared once the file system refuses `FALLOC_FL_ZERO_RANGE`.
    zero_range: AtomicBool,
    /// Transfers that could not use `O_DIRECT` (unaligned buffers, or refused by the kernel)
    /// and went through the page cache: counted, and logged once per disk.
    fallbacks: AtomicU64,
}

fn io_err(what: &'static str, path: &Path, source: std::io::Error) -> BackendError {
    BackendError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// BLKGETSIZE64 from linux/fs.h: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong =
    (2 << 30) | ((std::mem::size_of::<usize>() as libc::c_ulong) << 16) | (0x12 << 8) | 114;
/// BLKSSZGET from linux/fs.h: `_IO(0x12, 104)`.
const BLKSSZGET: libc::c_ulong = (0x12 << 8) | 104;

impl FileBackend {
    /// Opens (and if asked, creates or grows) the file.
    pub fn open(opts: &FileOptions) -> Result<Arc<Self>, BackendError> {
        let path = &opts.path;
        if !matches!(opts.block_size, 512 | 4096) {
            return Err(BackendError::Invalid(format!(
                "block size {} is not 512 or 4096",
                opts.block_size
            )));
        }
        let exists = path.exists();
        if !exists && opts.size.is_none() {
            return Err(BackendError::Invalid(format!(
                "{} does not exist (add size=SIZE to create it)",
                path.display()
            )));
        }
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(!opts.read_only)
            .create(!opts.read_only && opts.size.is_some());
        oo.custom_flags(libc::O_CLOEXEC);
        let file = oo.open(path).map_err(|e| io_err("cannot open", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_err("cannot stat", path, e))?;
        let is_block = meta.file_type().is_block_device();
        let mut dio_align = 512usize;
        let size = if is_block {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass, which is valid.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes as *mut u64) }
                != 0
            {
                return Err(io_err(
                    "cannot read the size of",
                    path,
                    std::io::Error::last_os_error(),
                ));
            }
            let mut ssz: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int to the pointer we pass, which is valid.
            if unsafe {
                libc::ioctl(
                    file.as_raw_fd(),
                    BLKSSZGET as _,
                    &mut ssz as *mut libc::c_int,
                )
            } == 0
                && ssz > 0
            {
                dio_align = ssz as usize;
            }
            if let Some(want) = opts.size {
                if want > bytes {
                    return Err(BackendError::Invalid(format!(
                        "{} is a block device of {bytes} bytes; it cannot grow to {want}",
                        path.display()
                    )));
                }
            }
            bytes
        } else if meta.file_type().is_file() {
            let mut len = meta.len();
            if let Some(want) = opts.size {
                if want > len {
                    if opts.read_only {
                        return Err(BackendError::Invalid(format!(
                            "{} is {len} bytes; a read-only disk cannot grow to {want}",
                            path.display()
                        )));
                    }
                    file.set_len(want)
                        .map_err(|e| io_err("cannot grow", path, e))?;
                    len = want;
                }
            }
            len
        } else {
            return Err(BackendError::Invalid(format!(
                "{} is neither a file nor a block device",
                path.display()
            )));
        };
        let size = size & !(opts.block_size as u64 - 1);
        if size == 0 {
            return Err(BackendError::Invalid(format!(
                "{} is smaller than one {}-byte block",
                path.display(),
                opts.block_size
            )));
        }
        let (fd, buffered) = if opts.direct {
            let mut d = OpenOptions::new();
            d.read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT);
            let direct = d
                .open(path)
                .map_err(|e| io_err("cannot open with O_DIRECT", path, e))?;
            (OwnedFd::from(direct), Some(OwnedFd::from(file)))
        } else {
            (OwnedFd::from(file), None)
        };
        let engine = if std::env::var_os("LEAP_NO_IO_URING").is_some_and(|v| v != "0") {
            log::warn!(
                "{}: io_uring disabled by LEAP_NO_IO_URING; using the thread-pool fallback",
                path.display()
            );
            Engine::Pool
        } else {
            match IoUring::new(4) {
                Ok(_) => Engine::Uring,
                Err(e) => {
                    log::warn!(
                        "{}: io_uring unavailable ({e}); using the thread-pool fallback",
                        path.display()
                    );
                    Engine::Pool
                }
            }
        };
        use std::os::unix::fs::MetadataExt;
        let serial = format!("leap-{:x}-{:x}", meta.dev(), meta.ino());
        Ok(Arc::new(FileBackend {
            info: DiskInfo {
                size,
                block_size: opts.block_size,
                read_only: opts.read_only,
                discard: true,
                write_zeroes: true,
                volatile_cache: true,
                max_transfer: 0,
                serial,
            },
            path: path.clone(),
            fd,
            buffered,
            dio_align,
            engine,
            zero_range: AtomicBool::new(true),
            fallbacks: AtomicU64::new(0),
        }))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether requests go through io_uring (false: the thread-pool fallback).
    pub fn uses_io_uring(&self) -> bool {
        self.engine == Engine::Uring
    }

    /// The descriptor for a transfer: the `O_DIRECT` one if every piece is aligned for it.
    fn fd_for(&self, offset: u64, iov: &[libc::iovec]) -> RawFd {
        if let Some(b) = &self.buffered {
            let a = self.dio_align;
            let aligned = offset as usize % a == 0
                && iov
                    .iter()
                    .all(|v| (v.iov_base as usize) % a == 0 && v.iov_len % a == 0);
            if !aligned {
                self.fell_back("buffers not aligned to {a} bytes");
                return b.as_raw_fd();
            }
        }
        self.fd.as_raw_fd()
    }

    /// Counts a transfer that went through the page cache although `direct=on`; the first one
    /// per disk is logged (a guest or bench whose every request falls back measures memory, not
    /// the disk, and should know).
    fn fell_back(&self, why: &str) {
        if self.fallbacks.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                "{}: direct=on, but a transfer went through the page cache ({why}); such \
                 transfers are counted (direct_fallbacks) and not logged again",
                self.path.display()
            );
        }
    }

    /// Transfers that went through the page cache although the disk was opened with `direct=on`.
    pub fn direct_fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    fn buffered_fd(&self) -> RawFd {
        self.buffered.as_ref().unwrap_or(&self.fd).as_raw_fd()
    }
}

impl Backend for Arc<FileBackend> {
    fn info(&self) -> &DiskInfo {
        &self.as_ref().info
    }
    fn open_queue(&self, depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
        // Room for multi-range Dataset Management commands on top of the queue depth.
        let slots = depth + 256;
        if self.engine == Engine::Uring {
            match UringQueue::new(self.clone(), slots) {
                Ok(q) => return Ok(Box::new(q)),
                Err(e) => log::warn!(
                    "{}: io_uring setup failed ({e}); using the thread-pool fallback",
                    self.path.display()
                ),
            }
        }
        Ok(Box::new(PoolQueue::new(self.clone(), slots)?))
    }
    fn kind(&self) -> &'static str {
        "file"
    }
    fn direct_fallbacks(&self) -> u64 {
        self.as_ref().direct_fallbacks()
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("direct_fallbacks", self.as_ref().direct_fallbacks())]
    }
}

/// Where a Write Zeroes request is in its fallback chain.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ZeroStage {
    ZeroRange,
    Punch,
    Write,
}

/// Per-request state, kept until the request completes, with the iovecs it transfers.
#[derive(Clone, Copy, Debug)]
struct Slot {
    tag: u64,
    op: IoOp,
    offset: u64,
    left: u64,
    fd: RawFd,
    iov_start: usize,
    iov_end: usize,
    stage: ZeroStage,
}

/// Preallocated request slots and their iovec storage: no allocation per request.
struct Slots {
    slots: Vec<Slot>,
    iov: Vec<libc::iovec>,
    free: Vec<u32>,
}

// SAFETY: the iovecs are addresses of memory the submitter guarantees valid until completion
// (see `BackendQueue::submit`); the table is used by one poller thread at a time.
unsafe impl Send for Slots {}

impl Slots {
    fn new(n: usize) -> Self {
        let blank = Slot {
            tag: 0,
            op: IoOp::Flush,
            offset: 0,
            left: 0,
            fd: -1,
            iov_start: 0,
            iov_end: 0,
            stage: ZeroStage::ZeroRange,
        };
        Slots {
            slots: vec![blank; n],
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                n * MAX_IOVECS
            ],
            free: (0..n as u32).rev().collect(),
        }
    }

    /// Takes a slot for `req`, copying its iovecs. `None` when all slots are busy.
    fn take(&mut self, disk: &FileBackend, req: &IoRequest<'_>) -> Option<u32> {
        let i = self.free.pop()?;
        let base = i as usize * MAX_IOVECS;
        let n = req.iov.len().min(MAX_IOVECS);
        self.iov[base..base + n].copy_from_slice(&req.iov[..n]);
        let fd = match req.op {
            IoOp::Read | IoOp::Write { .. } => disk.fd_for(req.offset, req.iov),
            _ => disk.fd.as_raw_fd(),
        };
        let stage = match req.op {
            IoOp::WriteZeroes { unmap: true } => ZeroStage::Punch,
            IoOp::WriteZeroes { unmap: false } if !disk.zero_range.load(Ordering::Relaxed) => {
                ZeroStage::Punch
            }
            _ => ZeroStage::ZeroRange,
        };
        self.slots[i as usize] = Slot {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            left: req.len,
            fd,
            iov_start: base,
            iov_end: base + n,
            stage,
        };
        Some(i)
    }

    fn release(&mut self, i: u32) {
        self.free.push(i);
    }
}

/// What to do with a request after one step of it finished with `res` (bytes or -errno).
enum Next {
    Done(Status),
    Again,
}

/// Advances slot `s` by the result of one step. Shared by both engines.
fn step(disk: &FileBackend, s: &mut Slot, iov: &mut [libc::iovec], res: i64) -> Next {
    let err = if res < 0 { (-res) as i32 } else { 0 };
    if err == libc::EINTR || err == libc::EAGAIN {
        return Next::Again;
    }
    match s.op {
        IoOp::Read | IoOp::Write { .. } => {
            if err == libc::EINVAL && s.fd != disk.buffered_fd() {
                // O_DIRECT refused this buffer's alignment: retry through the page cache.
                disk.fell_back("the kernel refused the O_DIRECT alignment");
                s.fd = disk.buffered_fd();
                return Next::Again;
            }
            if err != 0 {
                return Next::Done(errno_status(s.op, err));
            }
            if res == 0 && s.left > 0 {
                return Next::Done(errno_status(s.op, libc::EIO));
            }
            let n = (res as u64).min(s.left);
            s.left -= n;
            s.offset += n;
            let mut start = s.iov_start;
            advance(&mut iov[..s.iov_end], &mut start, n as usize);
            s.iov_start = start;
            if s.left == 0 {
                Next::Done(Status::SUCCESS)
            } else {
                Next::Again
            }
        }
        IoOp::Flush => Next::Done(if err == 0 {
            Status::SUCCESS
        } else {
            errno_status(s.op, err)
        }),
        IoOp::Discard => Next::Done(match err {
            // Discard is advisory.
            0 | libc::EOPNOTSUPP => Status::SUCCESS,
            e => errno_status(s.op, e),
        }),
        IoOp::WriteZeroes { .. } => match (s.stage, err) {
            (ZeroStage::Write, 0) => {
                let n = (res as u64).min(s.left);
                if n == 0 {
                    return Next::Done(errno_status(s.op, libc::EIO));
                }
                s.left -= n;
                s.offset += n;
                if s.left == 0 {
                    Next::Done(Status::SUCCESS)
                } else {
                    Next::Again
                }
            }
            (_, 0) => Next::Done(Status::SUCCESS),
            (ZeroStage::ZeroRange, libc::EOPNOTSUPP | libc::EINVAL) => {
                disk.zero_range.store(false, Ordering::Relaxed);
                s.stage = ZeroStage::Punch;
                Next::Again
            }
            (ZeroStage::Punch, libc::EOPNOTSUPP | libc::EINVAL) => {
                s.stage = ZeroStage::Write;
                Next::Again
            }
            (_, e) => Next::Done(errno_status(s.op, e)),
        },
    }
}

/// A queue on io_uring: one ring per poller, submitted once per poll round.
struct UringQueue {
    disk: Arc<FileBackend>,
    ring: IoUring,
    slots: Slots,
    eventfd: OwnedFd,
    in_flight: usize,
    unsubmitted: usize,
    reaped: Vec<(u64, i32)>,
}

impl UringQueue {
    fn new(disk: Arc<FileBackend>, slots: usize) -> std::io::Result<Self> {
        let entries = (slots as u32).next_power_of_two().clamp(8, 4096);
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let eventfd = crate::eventfd::new()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(UringQueue {
            disk,
            ring,
            slots: Slots::new(slots),
            eventfd,
            in_flight: 0,
            unsubmitted: 0,
            reaped: Vec::with_capacity(entries as usize * 2),
        })
    }

    /// Queues the next step of slot `i` on the ring.
    fn push(&mut self, i: u32) {
        let s = &self.slots.slots[i as usize];
        let fd = types::Fd(s.fd);
        let iov = &self.slots.iov[s.iov_start..s.iov_end];
        let entry = match s.op {
            IoOp::Read => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(s.offset)
                .build(),
            IoOp::Write { fua } => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(s.offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Discard => opcode::Fallocate::new(fd, s.left)
                .offset(s.offset)
                .mode(PUNCH)
                .build(),
            IoOp::WriteZeroes { .. } => match s.stage {
                ZeroStage::ZeroRange => opcode::Fallocate::new(fd, s.left)
                    .offset(s.offset)
                    .mode(ZERO)
                    .build(),
                ZeroStage::Punch => opcode::Fallocate::new(fd, s.left)
                    .offset(s.offset)
                    .mode(PUNCH)
                    .build(),
                ZeroStage::Write => {
                    // One iovec over the static zero buffer, kept in the slot's iovec storage.
                    let z = sync_io::zero_buffer();
                    let base = i as usize * MAX_IOVECS;
                    self.slots.iov[base] = libc::iovec {
                        iov_base: z.as_ptr() as *mut _,
                        iov_len: (s.left as usize).min(z.len()),
                    };
                    opcode::Writev::new(
                        types::Fd(self.disk.buffered_fd()),
                        &self.slots.iov[base],
                        1,
                    )
                    .offset(s.offset)
                    .build()
                }
            },
        }
        .user_data(i as u64);
        loop {
            // SAFETY: the entry points at iovecs in `self.slots`, which are neither moved (the
            // Vec never grows) nor reused until this slot's completion is reaped, and at data
            // memory the caller of `submit` keeps valid until then.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // The submission ring is full: hand it to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                crate::log_limited!(log::Level::Warn, "io_uring submit: {e}");
            }
            self.unsubmitted = 0;
        }
        self.unsubmitted += 1;
    }
}

impl BackendQueue for UringQueue {
    fn room(&self) -> usize {
        self.slots.free.len()
    }
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
        if req.iov.len() > MAX_IOVECS {
            return Submitted::Done(Status::INVALID_FIELD);
        }
        let Some(i) = self.slots.take(&self.disk, req) else {
            // The caller checks `room` first; reaching here is a caller bug, never a guest's.
            crate::log_limited!(log::Level::Error, "io_uring queue: submit without room");
            return Submitted::Done(Status::INTERNAL_ERROR);
        };
        self.push(i);
        self.in_flight += 1;
        Submitted::Queued
    }

    fn flush(&mut self) {
        if self.unsubmitted > 0 {
            if let Err(e) = self.ring.submit() {
                crate::log_limited!(log::Level::Warn, "io_uring submit: {e}");
            }
            self.unsubmitted = 0;
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        if self.in_flight == 0 {
            return 0;
        }
        self.reaped.clear();
        self.reaped
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut n = 0;
        for k in 0..self.reaped.len() {
            let (ud, res) = self.reaped[k];
            let i = ud as u32;
            let Some(mut s) = self.slots.slots.get(i as usize).copied() else {
                continue;
            };
            match step(&self.disk, &mut s, &mut self.slots.iov, res as i64) {
                Next::Again => {
                    self.slots.slots[i as usize] = s;
                    self.push(i);
                }
                Next::Done(status) => {
                    self.slots.release(i);
                    self.in_flight -= 1;
                    n += 1;
                    done(s.tag, status);
                }
            }
        }
        self.flush();
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn clear_wake(&mut self) -> bool {
        crate::eventfd::drain(self.eventfd.as_raw_fd());
        // A completion posted before the drain has had its wake-up consumed: look at the ring.
        let mut cq = self.ring.completion();
        cq.sync();
        !cq.is_empty()
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still write into slot iovecs and guest memory: wait for what is in flight.
        while self.in_flight > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.poll(&mut |_, _| {});
        }
    }
}

/// One blocking operation handed to a pool thread.
struct Job {
    slot: u32,
    slot_state: Slot,
    iov: *mut libc::iovec,
}

// SAFETY: `iov` points into the owning PoolQueue's slot storage, which outlives the workers (they
// are joined in Drop) and which the queue does not touch while the job is in flight.
unsafe impl Send for Job {}

/// The fallback: blocking calls on a few threads, completions through an eventfd.
struct PoolQueue {
    disk: Arc<FileBackend>,
    slots: Slots,
    jobs: Option<mpsc::SyncSender<Job>>,
    done: Arc<crossbeam_queue::ArrayQueue<(u32, i64, Slot)>>,
    eventfd: Arc<OwnedFd>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl PoolQueue {
    fn new(disk: Arc<FileBackend>, n: usize) -> Result<Self, BackendError> {
        let err = |e| BackendError::Io {
            what: "thread pool for",
            path: disk.path.display().to_string(),
            source: e,
        };
        let eventfd = Arc::new(crate::eventfd::new().map_err(err)?);
        let (tx, rx) = mpsc::sync_channel::<Job>(n);
        let rx = Arc::new(Mutex::new(rx));
        let done = Arc::new(crossbeam_queue::ArrayQueue::new(n));
        let mut workers = Vec::new();
        for k in 0..2 {
            let (rx, done, eventfd, disk) =
                (rx.clone(), done.clone(), eventfd.clone(), disk.clone());
            let h = std::thread::Builder::new()
                .name(format!("leap-io{k}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => match r.recv() {
                            Ok(j) => j,
                            Err(_) => return,
                        },
                        Err(_) => return,
                    };
                    let mut s = job.slot_state;
                    let res = run_blocking(&disk, &mut s, job.iov);
                    let _ = done.push((job.slot, res, s));
                    crate::eventfd::signal(eventfd.as_raw_fd());
                })
                .map_err(err)?;
            workers.push(h);
        }
        Ok(PoolQueue {
            disk,
            slots: Slots::new(n),
            jobs: Some(tx),
            done,
            eventfd,
            workers,
            in_flight: 0,
        })
    }

    fn send(&mut self, i: u32) {
        let s = self.slots.slots[i as usize];
        let job = Job {
            slot: i,
            slot_state: s,
            iov: self.slots.iov.as_mut_ptr(),
        };
        if let Some(tx) = &self.jobs {
            // Capacity equals the slot count, so this never blocks.
            let _ = tx.send(job);
        }
    }
}

/// Runs the whole request on a pool thread; returns 0 or -errno.
fn run_blocking(disk: &FileBackend, s: &mut Slot, iov_base: *mut libc::iovec) -> i64 {
    let r = match (s.op, s.stage) {
        (IoOp::Read | IoOp::Write { .. }, _) => {
            // SAFETY: the job owns slot storage [iov_start, iov_end) until it completes (see Job).
            let iov = unsafe {
                std::slice::from_raw_parts_mut(iov_base.add(s.iov_start), s.iov_end - s.iov_start)
            };
            // SAFETY: the caller of `submit` keeps the data memory valid until completion.
            let r = unsafe { sync_io::execute(s.fd, s.op, s.offset, s.left, iov) };
            if r == Err(libc::EINVAL) && s.fd != disk.buffered_fd() {
                disk.fell_back("the kernel refused the O_DIRECT alignment");
                // SAFETY: as above.
                unsafe { sync_io::execute(disk.buffered_fd(), s.op, s.offset, s.left, iov) }
            } else {
                r
            }
        }
        // SAFETY: data-less operations touch no memory.
        _ => unsafe { sync_io::execute(s.fd, s.op, s.offset, s.left, &mut []) },
    };
    match r {
        Ok(()) => 0,
        Err(e) => -(e as i64),
    }
}

impl BackendQueue for PoolQueue {
    fn room(&self) -> usize {
        self.slots.free.len()
    }
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
        if req.iov.len() > MAX_IOVECS {
            return Submitted::Done(Status::INVALID_FIELD);
        }
        let Some(i) = self.slots.take(&self.disk, req) else {
            // The caller checks `room` first; reaching here is a caller bug, never a guest's.
            crate::log_limited!(log::Level::Error, "thread-pool queue: submit without room");
            return Submitted::Done(Status::INTERNAL_ERROR);
        };
        self.send(i);
        self.in_flight += 1;
        Submitted::Queued
    }
    fn flush(&mut self) {}
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut n = 0;
        while let Some((i, res, s)) = self.done.pop() {
            let status = if res == 0 {
                Status::SUCCESS
            } else {
                errno_status(s.op, (-res) as i32)
            };
            self.slots.release(i);
            self.in_flight -= 1;
            n += 1;
            done(s.tag, status);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }
    fn clear_wake(&mut self) -> bool {
        crate::eventfd::drain(self.eventfd.as_raw_fd());
        !self.done.is_empty()
    }
}

impl Drop for PoolQueue {
    fn drop(&mut self) {
        // Closing the channel lets the workers finish queued jobs and exit; joining them keeps the
        // slot storage alive until no job can touch it.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::run;
    use super::*;

    fn open(dir: &Path, direct: bool) -> Arc<FileBackend> {
        FileBackend::open(&FileOptions {
            path: dir.join("d.img"),
            size: Some(4 << 20),
            direct,
            read_only: false,
            block_size: 512,
        })
        .unwrap()
    }

    fn exercise(disk: Arc<FileBackend>) {
        let mut q = disk.open_queue(16).unwrap();
        let mut w: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(
            run(&mut *q, IoOp::Write { fua: false }, 8192, &mut w),
            Status::SUCCESS
        );
        assert_eq!(run(&mut *q, IoOp::Flush, 0, &mut []), Status::SUCCESS);
        let mut r = vec![0u8; 65536];
        assert_eq!(run(&mut *q, IoOp::Read, 8192, &mut r), Status::SUCCESS);
        assert!(r == w, "read back differs");
        let mut z = vec![0u8; 4096];
        assert_eq!(
            run(&mut *q, IoOp::WriteZeroes { unmap: false }, 8192, &mut z),
            Status::SUCCESS
        );
        assert_eq!(
            run(&mut *q, IoOp::Discard, 8192 + 8192, &mut z),
            Status::SUCCESS
        );
        assert_eq!(run(&mut *q, IoOp::Read, 8192, &mut r), Status::SUCCESS);
        assert!(r[..4096].iter().all(|&b| b == 0));
        assert_eq!(r[4096..8192], w[4096..8192]);
        assert!(r[8192..12288].iter().all(|&b| b == 0));
        assert_eq!(r[12288..], w[12288..]);
        // Misaligned buffer: with O_DIRECT it must take the buffered path, not fail.
        let mut odd = vec![0u8; 4097];
        assert_eq!(
            run(&mut *q, IoOp::Read, 8192 + 4096, &mut odd[1..]),
            Status::SUCCESS
        );
        assert_eq!(odd[1..], w[4096..8192]);
    }

    #[test]
    fn io_uring_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let disk = open(dir.path(), false);
        if !disk.uses_io_uring() {
            // qemu-user (the aarch64 test runner) does not emulate io_uring; a real kernel must
            // have it, so CI on the build machine insists.
            assert!(
                std::env::var("CI").as_deref() != Ok("true") || !cfg!(target_arch = "x86_64"),
                "io_uring is unavailable, so this exercised the thread-pool fallback instead"
            );
            eprintln!("### io_uring unavailable here: exercising the thread-pool fallback ###");
        }
        exercise(disk);
    }

    #[test]
    fn direct_io_round_trips() {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        exercise(open(dir.path(), true));
    }

    #[test]
    fn thread_pool_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = open(dir.path(), false);
        Arc::get_mut(&mut disk).unwrap().engine = Engine::Pool;
        exercise(disk);
    }

    #[test]
    fn clear_errors_for_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let o = |p: &str, size| FileOptions {
            path: dir.path().join(p),
            size,
            direct: false,
            read_only: false,
            block_size: 512,
        };
        let e = FileBackend::open(&o("missing.img", None))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = FileBackend::open(&o("nodir/x.img", Some(4096)))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot open"), "{e}");
        let e = FileBackend::open(&o("tiny.img", Some(100)))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("smaller than one"), "{e}");
        let mut bad = o("x.img", Some(4096));
        bad.block_size = 1000;
        assert!(FileBackend::open(&bad).is_err());
    }
}
