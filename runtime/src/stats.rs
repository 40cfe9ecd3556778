//! Counters shared between the data path (which increments them with relaxed atomics) and the
//! control plane (which reads them). Relaxed is enough: each counter is independent and readers
//! only need eventually-consistent totals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }
     $(extra { $($(#[$xm:meta])* $xfield:ident: $xty:ty),* $(,)? })?) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name {
            $($(#[$fm])* pub $field: AtomicU64,)*
            $($($(#[$xm])* pub $xfield: $xty,)*)?
        }

        impl $name {
            /// The counters as (name, counter) pairs, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, &AtomicU64)> {
                vec![$((stringify!($field), &self.$field),)*]
            }
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
        /// Commands taken off the queue pair (in flight: this minus the latency histograms'
        /// counts, which record every completion).
        submitted,
        /// Commands a rate limit held back (each counted once).
        throttled,
    }
    extra {
        /// Latency from taking a command off the queue pair to its completion, by class.
        latency: [Histogram; 3],
    }
}

/// Latency classes of [`IoStats::latency`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum OpClass {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Everything else (flush, deallocate, write zeroes, ...).
    Other,
}

impl OpClass {
    /// Every class, in index order.
    pub const ALL: [OpClass; 3] = [OpClass::Read, OpClass::Write, OpClass::Other];
    /// Its label.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Other => "other",
        }
    }
}

/// Buckets of a [`Histogram`]: upper bounds 1 µs, 2 µs, 4 µs ... 2^23 µs (8.4 s), then +Inf.
pub const BUCKETS: usize = 25;

/// A latency histogram with power-of-two microsecond buckets. Recording is a division by a
/// constant, a leading-zero count and two relaxed adds: no lock, no allocation. Buckets hold
/// per-bucket counts (not cumulative); readers accumulate them.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// The bucket a latency of `ns` nanoseconds falls in: bucket `k` (below the last) holds
    /// latencies under 2^k µs.
    #[inline]
    pub fn bucket(ns: u64) -> usize {
        let us = ns / 1000;
        ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1)
    }
    /// The upper bound of bucket `k` in seconds (infinite for the last).
    pub fn bound(k: usize) -> f64 {
        if k + 1 >= BUCKETS {
            f64::INFINITY
        } else {
            (1u64 << k) as f64 * 1e-6
        }
    }
    /// Records one latency.
    #[inline]
    pub fn record(&self, ns: u64) {
        self.buckets[Self::bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
    /// Adds this histogram's per-bucket counts into `counts` and returns its sum in ns.
    pub fn add_to(&self, counts: &mut [u64; BUCKETS]) -> u64 {
        for (c, b) in counts.iter_mut().zip(&self.buckets) {
            *c += b.load(Ordering::Relaxed);
        }
        self.sum_ns.load(Ordering::Relaxed)
    }
    /// Recorded latencies.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
    fn absorb(&self, other: &Histogram) {
        for (a, b) in self.buckets.iter().zip(&other.buckets) {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.sum_ns
            .fetch_add(other.sum_ns.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl IoStats {
    /// Commands taken off the queue pair and not completed yet (a reader racing the poller may
    /// see a moment's skew; never negative).
    pub fn in_flight(&self) -> u64 {
        let done: u64 = self.latency.iter().map(Histogram::count).sum();
        self.submitted.load(Ordering::Relaxed).saturating_sub(done)
    }
    /// Adds every counter of `other` into these (a finished connection's counters kept in its
    /// owner's totals, so totals never go back).
    pub fn absorb(&self, other: &IoStats) {
        for ((_, mine), (_, theirs)) in self.fields().into_iter().zip(other.fields()) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for (a, b) in self.latency.iter().zip(&other.latency) {
            a.absorb(b);
        }
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
    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }
    /// The counters of every queue, in queue order.
    pub fn per_queue(&self) -> &[Arc<IoStats>] {
        &self.queues
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_power_of_two_microsecond_buckets() {
        assert_eq!(Histogram::bucket(0), 0);
        assert_eq!(Histogram::bucket(999), 0); // under 1 µs
        assert_eq!(Histogram::bucket(1_000), 1); // under 2 µs
        assert_eq!(Histogram::bucket(1_999), 1);
        assert_eq!(Histogram::bucket(2_000), 2);
        assert_eq!(Histogram::bucket(100_000), 7); // 100 µs < 128 µs
        assert_eq!(Histogram::bucket(u64::MAX), BUCKETS - 1);
        for k in 0..BUCKETS - 1 {
            // Every latency in bucket k is below its bound.
            let just_under = (Histogram::bound(k) * 1e9) as u64 - 1;
            assert!(Histogram::bucket(just_under) <= k, "bucket {k}");
        }
        assert!(Histogram::bound(BUCKETS - 1).is_infinite());
    }

    #[test]
    fn in_flight_is_taken_minus_completed_and_absorb_keeps_totals() {
        let s = IoStats::default();
        add(&s.submitted, 5);
        s.latency[OpClass::Read as usize].record(3_000);
        s.latency[OpClass::Write as usize].record(50_000);
        assert_eq!(s.in_flight(), 3);
        let total = IoStats::default();
        inc(&s.reads);
        total.absorb(&s);
        total.absorb(&s);
        assert_eq!(total.reads.load(Ordering::Relaxed), 2);
        assert_eq!(total.in_flight(), 6);
        let mut counts = [0; BUCKETS];
        let sum = total.latency[OpClass::Read as usize].add_to(&mut counts);
        assert_eq!((sum, counts[2]), (6_000, 2));
    }
}
