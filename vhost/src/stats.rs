//! Counters of malformed requests, by reason. Incremented with relaxed atomics on the data path.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was refused before reaching the queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Malformed {
    /// The header is shorter than 16 bytes.
    Header,
    /// There is no writable status byte.
    NoStatus,
    /// Readable after writable descriptors, or data in the wrong direction.
    Layout,
    /// Length zero, not a multiple of the block size, or too large.
    Length,
    /// Sector (or sector + length) beyond the disk.
    Range,
    /// Write to a read-only disk.
    ReadOnly,
    /// A buffer outside guest memory.
    Unmapped,
    /// A descriptor loop, out-of-range next index, or bad indirect table.
    BrokenChain,
    /// More descriptors than a request may have.
    ChainTooLong,
    /// More data segments than a command can carry.
    TooManySegments,
    /// Reserved flags set in a discard / write-zeroes segment.
    Flags,
    /// Unknown request type.
    Unsupported,
    /// A configuration-space write the device refused (read-only field, no CONFIG_WCE).
    Config,
    /// The avail ring itself is invalid (index beyond the queue size).
    Ring,
    /// A vhost-user message the device refused.
    Message,
}

const N: usize = Malformed::Message as usize + 1;
const NAMES: [&str; N] = [
    "header",
    "no_status",
    "layout",
    "length",
    "range",
    "read_only",
    "unmapped",
    "broken_chain",
    "chain_too_long",
    "too_many_segments",
    "flags",
    "unsupported",
    "config",
    "ring",
    "message",
];

/// Counters for one device, and the budget of its lifecycle log events.
#[derive(Debug)]
pub struct VhostStats {
    malformed: [AtomicU64; N],
    /// Lifecycle events (front end connected, queue started, ...) of this disk: a guest can
    /// trigger them (a driver reset restarts every queue), so they are rate-limited, per disk
    /// so that one disk's churn cannot silence another's.
    pub events: leap_runtime::ratelimit::RateLimit,
}

impl Default for VhostStats {
    fn default() -> Self {
        VhostStats {
            malformed: Default::default(),
            events: leap_runtime::ratelimit::RateLimit::new(EVENTS_PER_SECOND),
        }
    }
}

/// Lifecycle events a disk may log per second (a start of 32 queues and its connection fit).
const EVENTS_PER_SECOND: u32 = 40;

impl VhostStats {
    /// Counts one refused request.
    pub fn count(&self, why: Malformed) {
        self.malformed[why as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// How many requests were refused for `why`.
    pub fn get(&self, why: Malformed) -> u64 {
        self.malformed[why as usize].load(Ordering::Relaxed)
    }
    /// All refused requests.
    pub fn total(&self) -> u64 {
        self.malformed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
    /// (name, count) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        NAMES
            .iter()
            .zip(&self.malformed)
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
            .collect()
    }
}
