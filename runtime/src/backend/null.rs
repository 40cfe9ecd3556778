//! The null back end: every request succeeds at once and no data moves. It measures the cost of
//! everything around the back end (the front end, the queue pair, the poller).

use super::{Backend, BackendError, BackendQueue, DiskInfo, IoRequest, Submitted};
use leap_queues::Status;

/// A disk that completes everything immediately and reads back garbage (whatever the buffer held).
pub struct NullBackend {
    info: DiskInfo,
}

impl NullBackend {
    /// A null disk of `size` bytes with `block_size`-byte blocks.
    pub fn new(size: u64, block_size: u32) -> Self {
        NullBackend {
            info: DiskInfo {
                size: size & !(block_size as u64 - 1),
                block_size,
                read_only: false,
                discard: true,
                write_zeroes: true,
                volatile_cache: false,
                max_transfer: 0,
                serial: "leap-null".into(),
            },
        }
    }
}

impl Backend for NullBackend {
    fn info(&self) -> &DiskInfo {
        &self.info
    }
    fn open_queue(&self, _depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
        Ok(Box::new(NullQueue))
    }
    fn kind(&self) -> &'static str {
        "null"
    }
}

struct NullQueue;

impl BackendQueue for NullQueue {
    unsafe fn submit(&mut self, _req: &IoRequest<'_>) -> Submitted {
        Submitted::Done(Status::SUCCESS)
    }
}
