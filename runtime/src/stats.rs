//! Counters shared between the data path (which increments them with relaxed atomics) and the
//! control plane (which reads them). Relaxed is enough: each counter is independent and readers
//! only need eventually-consistent totals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name { $($(#[$fm])* pub $field: AtomicU64,)* }

        impl $name {
            /// A snapshot as (name, value) pairs, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Per-queue-pair I/O counters. Aligned to 128 bytes (two cache lines on x86, one on Apple
    /// and some Arm cores) so counters of pairs on different pollers never share a line.
    #[repr(align(128))]
    IoStats {
        /// Read commands completed.
        reads,
        /// Write commands completed.
        writes,
        /// Flush commands completed.
        flushes,
        /// Dataset Management (deallocate) commands completed.
        discards,
        /// Write Zeroes commands completed.
        write_zeroes,
        /// Bytes read.
        bytes_read,
        /// Bytes written.
        bytes_written,
        /// Commands refused before reaching a back end (bad opcode, LBA range, data pointer...).
        invalid,
        /// Commands a back end failed.
        errors,
    }
}

/// The I/O counters of a device with several queue pairs: one [`IoStats`] per queue, written
/// only by the poller that owns the queue, summed when read. (One shared set would bounce its
/// cache line between pollers on every I/O.)
#[derive(Debug)]
pub struct DeviceIoStats {
    queues: Vec<Arc<IoStats>>,
}

impl DeviceIoStats {
    /// Counters for `queues` queue pairs (at least one).
    pub fn new(queues: usize) -> Self {
        DeviceIoStats {
            queues: (0..queues.max(1)).map(|_| Arc::default()).collect(),
        }
    }
    /// The counters queue `q` writes.
    pub fn queue(&self, q: usize) -> Arc<IoStats> {
        self.queues[q % self.queues.len()].clone()
    }
    /// The sum of one counter over all queues, e.g. `total(|s| &s.reads)`.
    pub fn total(&self, field: impl Fn(&IoStats) -> &AtomicU64) -> u64 {
        self.queues
            .iter()
            .map(|s| field(s).load(Ordering::Relaxed))
            .sum()
    }
    /// All counters summed over the queues, as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut total = IoStats::default().snapshot();
        for q in &self.queues {
            for (t, (_, v)) in total.iter_mut().zip(q.snapshot()) {
                t.1 += v;
            }
        }
        total
    }
}

/// Adds one to a counter.
#[inline]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
