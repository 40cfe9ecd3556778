//! Inflight I/O tracking (vhost-user specification, "Inflight I/O tracking", split virtqueues).
//!
//! The front end keeps a shared-memory region for the back end across back-end restarts. Per
//! queue it holds, with the layout libvhost-user uses (so regions are interchangeable):
//!
//! ```text
//! offset 0   u64 features
//!        8   u16 version (1)
//!       10   u16 desc_num (queue size)
//!       12   u16 last_batch_head
//!       14   u16 used_idx
//!       16   desc[desc_num]: u8 inflight, u8 pad[5], u16 next, u64 counter   (16 bytes each)
//! queue region size: align_up(16 * desc_num + 2, 64)
//! ```
//!
//! A request is marked in flight (with an increasing counter) when it is taken from the avail
//! ring, and cleared after its used element is published; `last_batch_head`/`next` and `used_idx`
//! let a successor tell which marks of the last batch are stale (the last-batch rule). After a
//! restart the successor resubmits what is still marked, oldest first, before taking new
//! requests, and continues the avail ring at `used.idx + in flight`.
//!
//! The region comes from the front end, which may be buggy or hostile, and which can write it at
//! any time: every access goes through vm-memory's bounds- and alignment-checked atomic
//! references, every value read is checked before use, and a region that fails a check is
//! refused (or, once in use, only ever costs its own queue correctness, never memory safety).
//!
//! Ordering: a process crash, not another CPU, is the reader; stores are Release so the compiler
//! keeps them in program order (mark after counter, clear after the used index is published).

use std::fs::File;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// The only layout version defined.
pub const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;

/// The first bytes of a file that holds inflight regions for a SoC ([`WindowFile`]): how the SoC
/// tells that window from guest-memory windows.
pub const WINDOW_MAGIC: [u8; 8] = *b"LEAPINFL";
/// Where regions start in such a file: page aligned for any page size up to 64 KiB.
pub const WINDOW_REGION_OFFSET: u64 = 64 << 10;

/// A file in which the host agent keeps inflight regions where a SoC can reach them (through a
/// window onto it, e.g. a second ivshmem BAR): a header page ([`WINDOW_MAGIC`]), then regions.
/// The agent writes it with `pwrite` only; it never maps it.
pub struct WindowFile {
    file: File,
    len: u64,
}

impl WindowFile {
    /// Opens `path`, creating it (and growing it to `len` bytes) if needed, and writes the header.
    pub fn prepare(path: &std::path::Path, len: u64) -> Result<WindowFile, InflightError> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(InflightError::Os)?;
        let have = file.metadata().map_err(InflightError::Os)?.len();
        if have < len {
            file.set_len(len).map_err(InflightError::Os)?;
        }
        let len = have.max(len);
        if len <= WINDOW_REGION_OFFSET {
            return Err(invalid(format!(
                "{}: {len} bytes leave no room for regions",
                path.display()
            )));
        }
        file.write_all_at(&WINDOW_MAGIC, 0)
            .map_err(InflightError::Os)?;
        Ok(WindowFile { file, len })
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A fresh, zeroed region for `num_queues` queues of `queue_size` (every queue at version 0,
    /// "never used"): its offset and size in the file.
    pub fn fresh_region(
        &self,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<(u64, u64), InflightError> {
        use std::os::unix::fs::FileExt;
        check_shape(num_queues, queue_size, max_queues)?;
        let size = num_queues as u64 * queue_region_bytes(queue_size) as u64;
        if WINDOW_REGION_OFFSET + size > self.len {
            return Err(invalid(format!(
                "{num_queues} queue(s) of {queue_size} need {size} bytes; the window file holds {}",
                self.len - WINDOW_REGION_OFFSET
            )));
        }
        self.file
            .write_all_at(&vec![0u8; size as usize], WINDOW_REGION_OFFSET)
            .map_err(InflightError::Os)?;
        Ok((WINDOW_REGION_OFFSET, size))
    }
}

/// Whether `file` (a window) starts with [`WINDOW_MAGIC`]: it holds inflight regions, not guest
/// memory. Reads the first bytes through a mapping, with naturally aligned accesses (a BAR
/// cannot be read with `pread`, and on ARM it is device memory).
pub fn is_window_file(file: &File) -> bool {
    let Ok(file) = file.try_clone() else {
        return false;
    };
    let Ok(map) = MmapRegion::<()>::build(
        Some(FileOffset::new(file, 0)),
        WINDOW_MAGIC.len(),
        libc::PROT_READ,
        libc::MAP_SHARED,
    ) else {
        return false;
    };
    map.get_atomic_ref::<AtomicU64>(0)
        .map(|v| v.load(Ordering::Acquire).to_le_bytes() == WINDOW_MAGIC)
        .unwrap_or(false)
}

/// Bytes of one queue's region for queues of `size` entries.
pub fn queue_region_bytes(size: u16) -> usize {
    (DESC * size as usize + 2).div_ceil(ALIGN) * ALIGN
}

/// Why a region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The sizes in the message do not describe a region we can use.
    #[error("inflight region: {0}")]
    Invalid(String),
    /// The file could not be created, sized or mapped.
    #[error("inflight region: {0}")]
    Os(#[source] std::io::Error),
}

fn invalid(s: impl Into<String>) -> InflightError {
    InflightError::Invalid(s.into())
}

/// One mapped inflight region: `num_queues` queue regions of `queue_size` descriptors.
pub struct Region {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

fn check_shape(num_queues: u16, queue_size: u16, max_queues: u16) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues {
        return Err(invalid(format!(
            "{num_queues} queue(s) requested, the device has {max_queues}"
        )));
    }
    if !queue_size.is_power_of_two() || queue_size > 32768 {
        return Err(invalid(format!(
            "queue size {queue_size} is not a power of two up to 32768"
        )));
    }
    Ok(())
}

impl Region {
    /// A new zeroed region in a memfd for the front end to keep (GET_INFLIGHT_FD). Every queue
    /// starts at version 0, "never used", as libvhost-user leaves it: the first start of the
    /// ring initializes it against the ring's used index. Returns the region, the file and its
    /// size.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<(Region, File, u64), InflightError> {
        check_shape(num_queues, queue_size, max_queues)?;
        let bytes = num_queues as usize * queue_region_bytes(queue_size);
        let fd =
            nix::sys::memfd::memfd_create(c"leap-inflight", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| InflightError::Os(e.into()))?;
        let file = File::from(fd);
        file.set_len(bytes as u64).map_err(InflightError::Os)?;
        let region = Self::map(&file, 0, bytes, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = q as usize * queue_region_bytes(queue_size);
            region
                .u16_at(base + 10)?
                .store(queue_size, Ordering::Release);
            region.u16_at(base + 8)?.store(VERSION, Ordering::Release);
        }
        Ok((region, file, bytes as u64))
    }

    /// Maps a region the front end hands back (SET_INFLIGHT_FD) after checking the message
    /// against the file and the device, and every queue's header.
    pub fn open(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<Region, InflightError> {
        check_shape(num_queues, queue_size, max_queues)?;
        let want = num_queues as u64 * queue_region_bytes(queue_size) as u64;
        if mmap_size != want {
            return Err(invalid(format!(
                "size {mmap_size} does not match {num_queues} queue(s) of {queue_size} ({want} bytes)"
            )));
        }
        let page = crate::region::page_size();
        if mmap_offset % page != 0 {
            return Err(invalid(format!(
                "offset {mmap_offset:#x} is not page aligned"
            )));
        }
        crate::region::check_file_covers(file, mmap_offset, mmap_size)
            .map_err(|e| invalid(e.to_string()))?;
        let region = Self::map(file, mmap_offset, want as usize, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = q as usize * queue_region_bytes(queue_size);
            let version = region.u16_at(base + 8)?.load(Ordering::Acquire);
            let desc_num = region.u16_at(base + 10)?.load(Ordering::Acquire);
            // Version 0 is a region nobody has initialized yet (all zeros): fine, nothing in flight.
            if version != VERSION && version != 0 {
                return Err(invalid(format!("queue {q}: unknown version {version}")));
            }
            if version == VERSION && desc_num != queue_size {
                return Err(invalid(format!(
                    "queue {q}: desc_num {desc_num} differs from queue size {queue_size}"
                )));
            }
            for i in 0..queue_size as usize {
                let f = region
                    .u8_at(base + HEADER + i * DESC)?
                    .load(Ordering::Acquire);
                if f > 1 {
                    return Err(invalid(format!(
                        "queue {q}: descriptor {i} has inflight flag {f}"
                    )));
                }
            }
        }
        Ok(region)
    }

    fn map(
        file: &File,
        offset: u64,
        bytes: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        let file = file.try_clone().map_err(InflightError::Os)?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), bytes)
            .map_err(|e| InflightError::Os(std::io::Error::other(e.to_string())))?;
        Ok(Region {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Queues described.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn u8_at(&self, off: usize) -> Result<&AtomicU8, InflightError> {
        self.map
            .get_atomic_ref::<AtomicU8>(off)
            .map_err(|e| invalid(e.to_string()))
    }
    fn u16_at(&self, off: usize) -> Result<&AtomicU16, InflightError> {
        self.map
            .get_atomic_ref::<AtomicU16>(off)
            .map_err(|e| invalid(e.to_string()))
    }
    fn u64_at(&self, off: usize) -> Result<&AtomicU64, InflightError> {
        self.map
            .get_atomic_ref::<AtomicU64>(off)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// One queue's part of a region, owned by the queue's port.
pub struct QueueTracker {
    region: Arc<Region>,
    base: usize,
    size: u16,
    counter: u64,
}

impl QueueTracker {
    /// The tracker of queue `q` for a ring of `ring_size` entries.
    pub fn new(region: Arc<Region>, q: u16, ring_size: u16) -> Result<Self, InflightError> {
        if q >= region.num_queues {
            return Err(invalid(format!(
                "queue {q} is not in the region ({} queue(s))",
                region.num_queues
            )));
        }
        if ring_size != region.queue_size {
            return Err(invalid(format!(
                "queue {q} has {ring_size} entries, the region {}",
                region.queue_size
            )));
        }
        let base = q as usize * queue_region_bytes(region.queue_size);
        Ok(QueueTracker {
            region,
            base,
            size: ring_size,
            counter: 1,
        })
    }

    fn desc(&self, head: u16) -> usize {
        self.base + HEADER + head as usize * DESC
    }

    /// Recovers after a restart (the spec's "When reconnecting"): applies the last-batch rule
    /// against the used ring's index `used_idx`, then returns the heads still in flight, oldest
    /// first. The counter continues after the newest.
    pub fn recover(&mut self, used_idx: u16) -> Result<Vec<u16>, InflightError> {
        let r = &*self.region;
        let version = r.u16_at(self.base + 8)?.load(Ordering::Acquire);
        if version == 0 {
            // Never used: initialize.
            r.u16_at(self.base + 10)?
                .store(self.size, Ordering::Release);
            r.u16_at(self.base + 14)?.store(used_idx, Ordering::Release);
            r.u16_at(self.base + 8)?.store(VERSION, Ordering::Release);
            return Ok(Vec::new());
        }
        if version != VERSION {
            return Err(invalid(format!("unknown version {version}")));
        }
        let desc_num = r.u16_at(self.base + 10)?.load(Ordering::Acquire);
        if desc_num != self.size {
            return Err(invalid(format!(
                "desc_num {desc_num} differs from the queue size {}",
                self.size
            )));
        }
        let region_used = r.u16_at(self.base + 14)?.load(Ordering::Acquire);
        let batch = used_idx.wrapping_sub(region_used);
        if batch > self.size {
            return Err(invalid(format!(
                "last batch of {batch} is larger than the queue ({})",
                self.size
            )));
        }
        // The used ring is ahead of used_idx: the last batch was published but its marks may
        // not have been cleared. Walk it from last_batch_head and clear them.
        let mut head = r.u16_at(self.base + 12)?.load(Ordering::Acquire);
        for _ in 0..batch {
            if head >= self.size {
                return Err(invalid(format!("last batch names descriptor {head}")));
            }
            let d = self.desc(head);
            r.u8_at(d)?.store(0, Ordering::Release);
            head = r.u16_at(d + 6)?.load(Ordering::Acquire);
        }
        r.u16_at(self.base + 14)?.store(used_idx, Ordering::Release);
        let mut marked = Vec::new();
        for i in 0..self.size {
            let d = self.desc(i);
            match r.u8_at(d)?.load(Ordering::Acquire) {
                0 => {}
                1 => marked.push((r.u64_at(d + 8)?.load(Ordering::Acquire), i)),
                f => return Err(invalid(format!("descriptor {i} has inflight flag {f}"))),
            }
        }
        marked.sort_unstable();
        self.counter = marked.last().map_or(1, |&(c, _)| c.saturating_add(1));
        Ok(marked.into_iter().map(|(_, i)| i).collect())
    }

    /// `head` was taken from the avail ring.
    pub fn take(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let d = self.desc(head);
        let r = &*self.region;
        if let (Ok(c), Ok(f)) = (r.u64_at(d + 8), r.u8_at(d)) {
            c.store(self.counter, Ordering::Release);
            f.store(1, Ordering::Release);
        }
        self.counter = self.counter.wrapping_add(1);
    }

    /// `head` is about to be published in the used ring (a batch of one).
    pub fn before_used(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let r = &*self.region;
        if let (Ok(last), Ok(next)) = (r.u16_at(self.base + 12), r.u16_at(self.desc(head) + 6)) {
            next.store(last.load(Ordering::Relaxed), Ordering::Release);
            last.store(head, Ordering::Release);
        }
    }

    /// `head` was published; the used ring's index is now `used_idx`.
    pub fn after_used(&mut self, head: u16, used_idx: u16) {
        if head >= self.size {
            return;
        }
        let r = &*self.region;
        if let (Ok(f), Ok(u)) = (r.u8_at(self.desc(head)), r.u16_at(self.base + 14)) {
            f.store(0, Ordering::Release);
            u.store(used_idx, Ordering::Release);
        }
    }

    /// Descriptors marked in flight now (for tests and diagnostics).
    pub fn marked(&self) -> usize {
        (0..self.size)
            .filter(|&i| {
                self.region
                    .u8_at(self.desc(i))
                    .is_ok_and(|f| f.load(Ordering::Acquire) == 1)
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sizes_match_libvhost_user() {
        assert_eq!(queue_region_bytes(1), 64);
        assert_eq!(queue_region_bytes(128), 128 * 16 + 64);
        assert_eq!(queue_region_bytes(256), 256 * 16 + 64);
    }

    #[test]
    fn marks_survive_and_come_back_oldest_first() {
        let (r, file, size) = Region::create(2, 8, 2).unwrap();
        let r = Arc::new(r);
        let mut t = QueueTracker::new(r.clone(), 1, 8).unwrap();
        assert!(t.recover(0).unwrap().is_empty());
        for h in [5, 2, 7, 0] {
            t.take(h);
        }
        // 2 completes (used idx 1).
        t.before_used(2);
        t.after_used(2, 1);
        assert_eq!(t.marked(), 3);
        // A successor maps the same file.
        let r2 = Arc::new(Region::open(&file, size, 0, 2, 8, 2).unwrap());
        let mut t2 = QueueTracker::new(r2, 1, 8).unwrap();
        assert_eq!(t2.recover(1).unwrap(), vec![5, 7, 0]);
        // Queue 0 was untouched.
        let mut t0 = QueueTracker::new(
            Arc::new(Region::open(&file, size, 0, 2, 8, 2).unwrap()),
            0,
            8,
        )
        .unwrap();
        assert!(t0.recover(0).unwrap().is_empty());
    }

    #[test]
    fn the_last_batch_rule_clears_published_marks() {
        let (r, _file, _) = Region::create(1, 8, 1).unwrap();
        let mut t = QueueTracker::new(Arc::new(r), 0, 8).unwrap();
        t.recover(0).unwrap();
        t.take(3);
        t.take(4);
        // Published to the used ring (idx 1) but the process died before clearing the mark.
        t.before_used(4);
        assert_eq!(t.recover(1).unwrap(), vec![3]);
        // A batch claiming more than the queue holds is refused.
        assert!(t.recover(100).is_err());
    }

    #[test]
    fn hostile_regions_are_refused() {
        let (_r, file, size) = Region::create(1, 8, 1).unwrap();
        // Wrong size, unaligned offset, too many queues, not a power of two, past the file.
        assert!(Region::open(&file, size + 64, 0, 1, 8, 1).is_err());
        assert!(Region::open(&file, size, 1, 1, 8, 1).is_err());
        assert!(Region::open(&file, size, 0, 2, 8, 1).is_err());
        assert!(Region::open(&file, size, 0, 1, 6, 1).is_err());
        assert!(Region::open(&file, size, 4096, 1, 8, 1).is_err());
        // A flag other than 0/1, a wrong version, a wrong desc_num.
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[7], 16).unwrap();
        assert!(Region::open(&file, size, 0, 1, 8, 1).is_err());
        file.write_all_at(&[0], 16).unwrap();
        file.write_all_at(&9u16.to_ne_bytes(), 8).unwrap();
        assert!(Region::open(&file, size, 0, 1, 8, 1).is_err());
        file.write_all_at(&1u16.to_ne_bytes(), 8).unwrap();
        file.write_all_at(&4u16.to_ne_bytes(), 10).unwrap();
        assert!(Region::open(&file, size, 0, 1, 8, 1).is_err());
        // A tracker for a ring of another size is refused.
        file.write_all_at(&8u16.to_ne_bytes(), 10).unwrap();
        let r = Arc::new(Region::open(&file, size, 0, 1, 8, 1).unwrap());
        assert!(QueueTracker::new(r.clone(), 0, 16).is_err());
        assert!(QueueTracker::new(r, 1, 8).is_err());
    }
}
