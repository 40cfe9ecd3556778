//! Counters shared between the data path (which increments them with relaxed atomics) and the
//! control plane (which reads them). Relaxed is enough: each counter is independent and readers
//! only need eventually-consistent totals.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Per-queue-pair I/O counters.
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
