//! Storage back ends behind one trait pair: a [`Backend`] is a disk shared by every queue; each
//! poller opens its own [`BackendQueue`] on it (an io_uring instance, say) so the data path needs no
//! lock.
//!
//! Requests carry byte offsets and iovecs that point straight into guest memory (translated by the
//! caller through an [`crate::AddressSpace`]), so reads and writes are zero-copy.

use leap_queues::Status;
use std::os::fd::RawFd;

pub mod bounce;
pub mod file;
pub mod ident;
pub mod null;
pub mod ram;
mod sync_io;
pub mod vfio;

pub use bounce::{BounceBackend, WindowBytes};
pub use file::{FileBackend, FileOptions};
pub use null::NullBackend;
pub use ram::RamBackend;
pub use vfio::{VfioBackend, VfioOptions};

/// Memory mapped for a device's DMA (see [`Backend::map_dma`]): its device address, and what
/// keeps the mapping until this is dropped.
pub struct DmaGuard {
    iova: u64,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl DmaGuard {
    /// A mapping whose first byte the device reaches at `iova`, kept while `keep` lives.
    pub fn new(iova: u64, keep: Box<dyn std::any::Any + Send + Sync>) -> Self {
        DmaGuard { iova, _keep: keep }
    }
    /// The device address (IOVA) of the mapped range's first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }
}

impl std::fmt::Debug for DmaGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaGuard(iova {:#x})", self.iova)
    }
}

/// The most iovecs one request may carry.
pub const MAX_IOVECS: usize = 256;

/// What a disk is and can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Whether Discard (deallocate) does anything.
    pub discard: bool,
    /// Whether Write Zeroes is supported natively.
    pub write_zeroes: bool,
    /// Whether completed writes may sit in a volatile cache until a Flush.
    pub volatile_cache: bool,
    /// Largest transfer one command may carry, in bytes (a remote controller's MDTS); 0: no
    /// limit. Front ends tell their guests.
    pub max_transfer: u32,
    /// A short identifier (at most 20 bytes are reported to guests).
    pub serial: String,
}

impl DiskInfo {
    /// log2 of the block size.
    pub fn block_shift(&self) -> u32 {
        self.block_size.trailing_zeros()
    }
    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.size >> self.block_shift()
    }
}

/// One back-end operation. Offsets and lengths are in bytes and already checked against the
/// disk's size by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read into the iovecs.
    Read,
    /// Write from the iovecs; `fua`: durable when it completes.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate a range (contents become unspecified; Leap's back ends read zeros).
    Discard,
    /// Zero a range; `unmap`: it may also be deallocated.
    WriteZeroes {
        /// Deallocate while zeroing.
        unmap: bool,
    },
}

/// One request to a [`BackendQueue`].
///
/// For back ends that take byte ranges (files, RAM) `op`, `offset` and `len` say what to do. For
/// back ends that speak NVMe themselves ([`Backend::nvme_native`]: an NVMe/TCP initiator, a VFIO
/// driver) `cmd` holds the command exactly as the front end sent it, already checked by the
/// executor (namespace, LBA range, data pointer), and `iov` describes all of its data, whatever
/// the opcode (for Dataset Management: the range list); the back end sends the command on
/// unchanged (renumbering only its command identifier and NSID) and its completion status reaches
/// the front end unchanged.
#[derive(Debug)]
pub struct IoRequest<'a> {
    /// Returned with the completion.
    pub tag: u64,
    /// What to do (for NVMe-native back ends: what the command is, for counting and logs).
    pub op: IoOp,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Byte length (for Read/Write equal to the iovecs' total).
    pub len: u64,
    /// Data buffers for Read and Write (and for NVMe-native back ends, any command's data);
    /// empty otherwise.
    pub iov: &'a [libc::iovec],
    /// The NVMe command itself, given only to NVMe-native back ends.
    pub cmd: Option<&'a leap_queues::Sqe>,
}

/// The result of [`BackendQueue::submit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Finished already, with this status.
    Done(Status),
    /// In flight: the completion comes from [`BackendQueue::poll`].
    Queued,
}

/// Why a back end could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An operating system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file concerned.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A parameter is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// A disk shared by all queues.
pub trait Backend: Send + Sync {
    /// What the disk is.
    fn info(&self) -> &DiskInfo;
    /// Opens a queue for one poller with room for `depth` requests in flight.
    fn open_queue(&self, depth: usize) -> Result<Box<dyn BackendQueue>, BackendError>;
    /// A short name for logs ("null", "ram", "file").
    fn kind(&self) -> &'static str;
    /// Whether the back end speaks NVMe itself and takes commands as they are
    /// ([`IoRequest::cmd`]) instead of decoded byte ranges.
    fn nvme_native(&self) -> bool {
        false
    }
    /// Requests that could not use `O_DIRECT` and went through the page cache instead (file back
    /// ends opened with `direct=on`); 0 for everything else.
    fn direct_fallbacks(&self) -> u64 {
        0
    }
    /// Events the back end counts for the operator, as (name, total): reconnects and retries of
    /// a remote one, page-cache fallbacks of a file, bytes through a window. Read when metrics
    /// are scraped; the names are stable metric labels.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Makes `len` bytes at `host` reachable by the back end's device (a VFIO controller's DMA),
    /// so requests whose iovecs point into it go to the device with no copy, until the returned
    /// guard drops. Front ends call it for guest memory when a memory table arrives (and drop
    /// the guard when the table goes), targets for their buffer pools. Back ends that do no DMA
    /// return `None`: they reach any memory of this process.
    ///
    /// # Safety
    /// The memory must stay mapped while the guard lives, and the device may read and write it
    /// at any time meanwhile: nothing may hold a Rust reference into it.
    unsafe fn map_dma(
        &self,
        _host: *mut u8,
        _len: usize,
    ) -> Result<Option<DmaGuard>, BackendError> {
        Ok(None)
    }
}

/// One poller's queue on a [`Backend`]. Not shared: all calls come from the owning poller thread.
/// The provided methods fit back ends that finish every request inside `submit` (null, ram).
///
/// Back-pressure: a queue that cannot take more work says so through [`BackendQueue::room`]; the
/// caller then keeps the command (in order) and retries after the queue's wake-up source fires.
/// A queue never runs a request synchronously on the caller's thread because it is full, and
/// never invents a status for it.
pub trait BackendQueue: Send {
    /// How many more requests [`BackendQueue::submit`] accepts now. The caller checks this before
    /// starting a command (all of its requests at once, for commands that need several).
    fn room(&self) -> usize {
        usize::MAX
    }
    /// The most requests the queue can ever hold at once (`room` when nothing is in flight): a
    /// command needing more is refused rather than held forever.
    fn depth(&self) -> usize {
        usize::MAX
    }
    /// Starts `req`. Called only while [`BackendQueue::room`] is non-zero.
    ///
    /// # Safety
    /// The memory the iovecs describe must stay valid (mapped, and not otherwise used for the
    /// direction being transferred) until the completion for `req.tag` is returned by
    /// [`BackendQueue::poll`] or `Done` is returned here. The iovec array itself is copied.
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted;
    /// Hands queued requests to the kernel: one call per poll round batches them.
    fn flush(&mut self) {}
    /// Calls `done(tag, status)` for each finished request; returns how many.
    fn poll(&mut self, _done: &mut dyn FnMut(u64, Status)) -> usize {
        0
    }
    /// Requests in flight.
    fn in_flight(&self) -> usize {
        0
    }
    /// A file descriptor that becomes readable when the queue has something to do: completions
    /// arrived, room freed up, a timer expired, a connection came back. The poller sleeps on it.
    /// A queue with several sources (sockets, rings, timers) combines them into this one
    /// descriptor with a [`crate::Notifier`]. `None` for back ends that finish everything inside
    /// `submit`.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// Consumes pending wake-ups on `wake_fd` before the poller sleeps, and says whether
    /// completions are already waiting (reaped after the last `poll`, so their wake-up may just
    /// have been consumed): then the poller must not sleep.
    fn clear_wake(&mut self) -> bool {
        false
    }
}

/// Maps an OS error number from a failed operation to an NVMe status.
pub fn errno_status(op: IoOp, errno: i32) -> Status {
    match (op, errno) {
        (_, libc::ENOSPC) | (_, libc::EDQUOT) => {
            Status::new(leap_queues::nvme::StatusCodeType::Generic, 0x81).with_dnr()
        }
        (_, libc::EOPNOTSUPP) | (_, libc::EINVAL) => Status::INVALID_FIELD,
        (IoOp::Read, _) => Status::UNRECOVERED_READ_ERROR,
        (IoOp::Write { .. }, _)
        | (IoOp::WriteZeroes { .. }, _)
        | (IoOp::Flush, _)
        | (IoOp::Discard, _) => Status::WRITE_FAULT,
    }
}

/// Runs one request on `q` and waits for it (polling; for the control path, not the data path).
///
/// # Safety
/// As for [`BackendQueue::submit`]; the call returns only after the request completed.
pub unsafe fn run_one(q: &mut dyn BackendQueue, req: &IoRequest<'_>) -> Status {
    while q.room() == 0 {
        // Full: let what is in flight finish first.
        q.poll(&mut |_, _| {});
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    // SAFETY: forwarded from the caller.
    match unsafe { q.submit(req) } {
        Submitted::Done(s) => s,
        Submitted::Queued => {
            q.flush();
            loop {
                let mut out = None;
                q.poll(&mut |tag, s| {
                    if tag == req.tag {
                        out = Some(s);
                    }
                });
                if let Some(s) = out {
                    return s;
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }
}

/// Makes every completed write to `backend` durable: a Flush on a queue of its own. Used when
/// leapd stops.
pub fn sync(backend: &dyn Backend) -> Result<(), String> {
    if backend.info().read_only {
        return Ok(());
    }
    let mut q = backend.open_queue(1).map_err(|e| e.to_string())?;
    let mut flush = leap_queues::Sqe::new(leap_queues::nvme::io::FLUSH, 0);
    flush.set_nsid(1);
    let req = IoRequest {
        tag: 0,
        op: IoOp::Flush,
        offset: 0,
        len: 0,
        iov: &[],
        cmd: backend.nvme_native().then_some(&flush),
    };
    // SAFETY: a flush carries no buffers.
    match unsafe { run_one(&mut *q, &req) } {
        s if s.is_success() => Ok(()),
        s => Err(format!("flush failed: {s}")),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// Submits one request and waits for it, polling.
    pub fn run(q: &mut dyn BackendQueue, op: IoOp, offset: u64, buf: &mut [u8]) -> Status {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let has_data = matches!(op, IoOp::Read | IoOp::Write { .. });
        let req = IoRequest {
            tag: 7,
            op,
            offset,
            len: buf.len() as u64,
            iov: if has_data { &iov } else { &[] },
            cmd: None,
        };
        // SAFETY: `buf` outlives the call, which waits for the completion.
        unsafe { run_one(q, &req) }
    }
}
