//! Per-disk rate limits: token buckets for IOPS and bandwidth, for reads, writes or both (as
//! qemu-storage-daemon's throttle groups and cloud-hypervisor's rate limiter offer).
//!
//! The executor asks [`Throttle::admit`] before starting a Read or Write; a command the buckets
//! cannot pay for now is not started (`Started::Busy`), and the poller holds it, in order, and
//! tries again on its next round (it sleeps at most a millisecond while a command is held). So a
//! throttled queue waits without blocking its poller, and other queues are never stuck behind it.
//! The buckets are shared by every queue of the disk; a command is admitted whole or not at all.
//! Limits can change while the disk serves ([`Throttle::set`]); an unlimited disk pays one
//! atomic load per command, never the lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Limits of one disk; `None`: unlimited. Rates are per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Read and write commands together.
    pub iops: Option<u64>,
    /// Read commands.
    pub iops_rd: Option<u64>,
    /// Write commands.
    pub iops_wr: Option<u64>,
    /// Bytes read and written together.
    pub bps: Option<u64>,
    /// Bytes read.
    pub bps_rd: Option<u64>,
    /// Bytes written.
    pub bps_wr: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        [
            self.iops,
            self.iops_rd,
            self.iops_wr,
            self.bps,
            self.bps_rd,
            self.bps_wr,
        ]
        .iter()
        .any(|l| l.is_some())
    }
}

/// What a bucket counts, and for which commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ops,
    Bytes,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    kind: Kind,
    /// Applies to reads / writes.
    reads: bool,
    writes: bool,
    /// Tokens per second.
    rate: f64,
    /// Most tokens held (the burst): one second's worth, and at least one command's.
    cap: f64,
    level: f64,
}

/// The token buckets of one disk.
#[derive(Debug)]
pub struct Throttle {
    /// Any limit set (Relaxed: a limit set by another thread takes effect a moment later).
    active: AtomicBool,
    state: Mutex<(Vec<Bucket>, Instant, Limits)>,
}

fn buckets(limits: &Limits) -> Vec<Bucket> {
    let mut b = Vec::new();
    let mut add = |l: Option<u64>, kind, reads, writes| {
        if let Some(rate) = l {
            let rate = rate.max(1) as f64;
            b.push(Bucket {
                kind,
                reads,
                writes,
                rate,
                cap: rate,
                level: rate,
            });
        }
    };
    add(limits.iops, Kind::Ops, true, true);
    add(limits.iops_rd, Kind::Ops, true, false);
    add(limits.iops_wr, Kind::Ops, false, true);
    add(limits.bps, Kind::Bytes, true, true);
    add(limits.bps_rd, Kind::Bytes, true, false);
    add(limits.bps_wr, Kind::Bytes, false, true);
    b
}

impl Throttle {
    /// Buckets for `limits`, full at the start (none: everything is admitted).
    pub fn new(limits: &Limits) -> Throttle {
        Throttle {
            active: AtomicBool::new(limits.any()),
            state: Mutex::new((buckets(limits), Instant::now(), *limits)),
        }
    }

    /// Replaces the limits; the new buckets start full.
    pub fn set(&self, limits: &Limits) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *st = (buckets(limits), Instant::now(), *limits);
        self.active.store(limits.any(), Ordering::Relaxed);
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.state.lock().map(|s| s.2).unwrap_or_default()
    }

    /// Takes what a read (`write` false) or write of `bytes` costs from every bucket that
    /// applies, if all of them can pay now; otherwise takes nothing and returns false.
    pub fn admit(&self, write: bool, bytes: u64) -> bool {
        self.admit_at(write, bytes, Instant::now())
    }

    /// [`Throttle::admit`] at a given time (tests).
    pub fn admit_at(&self, write: bool, bytes: u64, now: Instant) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return true;
        }
        let Ok(mut st) = self.state.lock() else {
            return true;
        };
        let (buckets, last, _) = &mut *st;
        let dt = now.saturating_duration_since(*last).as_secs_f64();
        *last = now.max(*last);
        let cost = |b: &Bucket| match b.kind {
            Kind::Ops => 1.0,
            Kind::Bytes => bytes as f64,
        };
        let mut ok = true;
        for b in buckets.iter_mut() {
            // A command larger than the bucket may still pass once the bucket is full.
            b.level = (b.level + dt * b.rate).min(b.cap.max(cost(b)));
            if (if write { b.writes } else { b.reads }) && b.level < cost(b) {
                ok = false;
            }
        }
        if ok {
            for b in buckets.iter_mut() {
                if if write { b.writes } else { b.reads } {
                    b.level -= cost(b);
                }
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_refill_at_their_rate_and_admit_whole_commands() {
        let t = Throttle::new(&Limits {
            iops_wr: Some(10),
            bps: Some(100_000),
            ..Limits::default()
        });
        let t0 = Instant::now();
        // The burst: one second's worth of writes.
        let n = (0..20).filter(|_| t.admit_at(true, 4096, t0)).count();
        assert_eq!(n, 10, "ten writes from a full 10 IOPS bucket");
        // Reads are limited only by bandwidth: 100 KB/s minus the 40 KiB written.
        assert!(t.admit_at(false, 50_000, t0));
        assert!(!t.admit_at(false, 50_000, t0), "bandwidth is spent");
        // Half a second later five writes are back (and the bandwidth they need).
        let t1 = t0 + Duration::from_millis(500);
        let n = (0..20).filter(|_| t.admit_at(true, 4096, t1)).count();
        assert_eq!(n, 5);
        // A command bigger than the burst still passes once the bucket is full.
        let t2 = t1 + Duration::from_secs(5);
        assert!(t.admit_at(false, 500_000, t2));
    }

    #[test]
    fn limits_change_while_serving() {
        let t = Throttle::new(&Limits::default());
        let t0 = Instant::now();
        assert_eq!(
            (0..1000).filter(|_| t.admit_at(true, 4096, t0)).count(),
            1000
        );
        let two = Limits {
            iops: Some(2),
            ..Limits::default()
        };
        t.set(&two);
        assert_eq!(t.limits(), two);
        let t1 = Instant::now();
        assert_eq!((0..10).filter(|_| t.admit_at(false, 512, t1)).count(), 2);
        t.set(&Limits::default());
        assert_eq!((0..10).filter(|_| t.admit_at(false, 512, t1)).count(), 10);
    }
}
