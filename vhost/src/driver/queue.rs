//! The driver side of one split virtqueue (virtio 1.2 §2.7).
//!
//! Ring memory is shared with the device, possibly in another process and on another core, so
//! nothing here forms a plain `&T` to it: indices and event fields are atomics, descriptors and
//! ring entries are written and read with volatile accesses. The orderings that matter:
//!
//! * publish: descriptors and avail entries are written, then `avail.idx` is stored with
//!   **Release** (virtio 1.2 §2.7.13: "the driver MUST perform a suitable memory barrier before
//!   the idx update"), so a device that reads the new idx also sees the chain.
//! * kick decision: after the idx store, a **SeqCst fence** before reading `avail_event` /
//!   `used.flags`, pairing with the device's fence between writing `avail_event` and re-reading
//!   `avail.idx`. Without it both sides could miss each other's update (store→load reordering is
//!   allowed on ARM and x86 alike), and the device would sleep on a request nobody kicks.
//! * reap: `used.idx` is loaded with **Acquire**, so the used element, the status byte and read
//!   data the device wrote before its Release of `used.idx` are visible.
//! * before sleeping on the call eventfd: `used_event` (or the flags) is stored, then a
//!   **SeqCst fence**, then `used.idx` is checked again, pairing with the device's fence between
//!   storing `used.idx` and reading `used_event`.
//!
//! Free descriptors and chain membership are tracked in driver-private shadow arrays, never read
//! back from the shared table, so a device that scribbles on the descriptor table cannot corrupt
//! the free list.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{DriverError, GuestAddr, GuestMemoryMmap};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer holds an indirect descriptor table (never negotiated by this
/// driver; for malformed-request tests).
pub const DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

const AVAIL_F_NO_INTERRUPT: u16 = virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
const USED_F_NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

/// Bytes of guest memory reserved per descriptor id for request headers and status bytes. The
/// blk helpers use the slot of a chain's head id; since every id heads at most one chain in
/// flight, slots never collide and need no allocation.
pub const SLOT_SCRATCH_BYTES: usize = 128;

/// One buffer of a chain, as a driver means it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub write: bool,
}

impl Desc {
    /// A buffer the device reads.
    pub fn readable(addr: GuestAddr, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: GuestAddr, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

/// A descriptor written into the table exactly as given (for malformed-chain tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `DESC_F_*` bits, verbatim.
    pub flags: u16,
    /// Next descriptor id, verbatim.
    pub next: u16,
}

/// Guest physical addresses of one queue's parts (validated by the caller of `new`).
#[derive(Clone, Copy, Debug)]
pub(super) struct RingGpas {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub scratch: u64,
}

/// Everything `DriverQueue::new` needs.
pub(super) struct QueueSetup {
    pub index: u16,
    pub size: u16,
    pub event_idx: bool,
    pub mem: Arc<GuestMemoryMmap>,
    pub host_base: *mut u8,
    pub gpas: RingGpas,
    pub call: EventFd,
    pub kick: EventFd,
}

/// The driver end of one split virtqueue: owns its ring memory (in guest memory), the call and
/// kick eventfds, and the free-descriptor list. `Send`, not `Sync`: run one per thread.
///
/// Steady state (`add_chain`, `publish_and_kick`, `poll_used`) takes no lock and allocates
/// nothing.
pub struct DriverQueue {
    index: u16,
    size: u16,
    event_idx: bool,
    mem: Arc<GuestMemoryMmap>,
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
    scratch: NonNull<u8>,
    scratch_gpa: u64,
    call: EventFd,
    kick: EventFd,
    /// Free descriptor ids; popped from the end.
    free: Vec<u16>,
    /// Shadow `next` link of every id while it is part of a chain.
    chain_next: Vec<u16>,
    /// Number of descriptors in the chain headed by each id (0: not a head in flight).
    chain_len: Vec<u16>,
    /// Next avail index to fill (free-running, wraps at 2^16).
    avail_idx: u16,
    /// avail index last published to the device.
    published_idx: u16,
    /// Next used index to consume.
    last_used: u16,
    /// Last value read from `used.idx` (saves re-reading the device's cache line).
    used_idx_seen: u16,
    interrupts: bool,
    kicks: u64,
    device_errors: u64,
}

// SAFETY: the raw pointers point into the guest-memory mapping owned by `mem` (an Arc kept in
// the same struct, so the mapping outlives them); the driver side of this ring is only touched
// through `&mut self` or `&self` reads, so moving the whole queue to another thread is sound.
// The device side is another process or thread and synchronises through the ring protocol.
unsafe impl Send for DriverQueue {}

impl DriverQueue {
    /// Builds the driver side of a queue whose parts are at `s.gpas`.
    ///
    /// # Safety
    /// `s.host_base` must map GPA 0 of `s.mem` and stay mapped while `s.mem` lives. The
    /// descriptor table (16·size bytes, 16-aligned), avail ring (6 + 2·size, 2-aligned), used
    /// ring (6 + 8·size, 4-aligned) and scratch (`SLOT_SCRATCH_BYTES`·size) must lie inside
    /// that mapping, must not overlap each other or any other queue, and must be zeroed.
    pub(super) unsafe fn new(s: QueueSetup) -> DriverQueue {
        let n = usize::from(s.size);
        // SAFETY: per this function's contract every offset is inside the mapping at host_base,
        // which is non-null.
        let at = |gpa: u64| unsafe { NonNull::new_unchecked(s.host_base.add(gpa as usize)) };
        DriverQueue {
            index: s.index,
            size: s.size,
            event_idx: s.event_idx,
            desc: at(s.gpas.desc),
            avail: at(s.gpas.avail),
            used: at(s.gpas.used),
            scratch: at(s.gpas.scratch),
            scratch_gpa: s.gpas.scratch,
            mem: s.mem,
            call: s.call,
            kick: s.kick,
            // Reverse so that a fresh queue hands out ids 0, 1, 2, ... in order.
            free: (0..s.size).rev().collect(),
            chain_next: vec![0; n],
            chain_len: vec![0; n],
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
            used_idx_seen: 0,
            interrupts: true,
            kicks: 0,
            device_errors: 0,
        }
    }

    /// Queue index (0-based vring index).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not part of any chain in flight.
    pub fn free_descriptors(&self) -> u16 {
        self.free.len() as u16 // at most size: u16
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in use on this queue.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Kicks sent so far (a measure of notification suppression).
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Used elements that named an id which is not a head in flight (device bugs).
    pub fn device_errors(&self) -> u64 {
        self.device_errors
    }

    /// Shared guest-memory handle.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The id the next `add_chain` / `add_raw_chain` will use as its head, if any is free.
    pub fn next_head(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// The ids the next chain of `n` descriptors will use, in order (head first). On a fresh
    /// queue these are `0, 1, 2, ...`. Lets tests build `RawDesc::next` links that point where
    /// they mean to.
    pub fn peek_free_ids(&self, n: usize) -> Vec<u16> {
        self.free.iter().rev().take(n).copied().collect()
    }

    /// Guest address of the scratch slot of descriptor id `id` ([`SLOT_SCRATCH_BYTES`] bytes).
    pub fn scratch_addr(&self, id: u16) -> GuestAddr {
        assert!(id < self.size, "descriptor id {id} out of range");
        self.scratch_gpa + u64::from(id) * SLOT_SCRATCH_BYTES as u64
    }

    /// Host pointer to byte `off` of the scratch slot of `id`.
    pub(super) fn scratch_ptr(&self, id: u16, off: usize) -> *mut u8 {
        assert!(id < self.size && off < SLOT_SCRATCH_BYTES);
        // SAFETY: id < size and off < SLOT_SCRATCH_BYTES keep the result inside this queue's
        // scratch area (contract of `new`).
        unsafe {
            self.scratch
                .as_ptr()
                .add(usize::from(id) * SLOT_SCRATCH_BYTES + off)
        }
    }

    /// Asks the device to signal the call eventfd when it uses buffers (`true`, the default),
    /// or not (`false`: `VRING_AVAIL_F_NO_INTERRUPT`, or with EVENT_IDX a `used_event` left
    /// behind). Pure pollers turn this off so the backend skips an eventfd write per batch.
    ///
    /// Backends whose notification logic is virtio-queue 0.18's (Leap, vhost-user-backend) ignore
    /// `VRING_AVAIL_F_NO_INTERRUPT`: against them only the EVENT_IDX form saves anything.
    /// [`wait_used`](Self::wait_used) re-arms for the duration of its wait.
    pub fn set_interrupts(&mut self, on: bool) {
        self.interrupts = on;
        if self.event_idx {
            if on {
                self.used_event().store(self.last_used, Ordering::Relaxed);
            }
        } else {
            let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
            // Relaxed: a hint to the device; a stale read only costs one extra or one missing
            // interrupt, and wait_used fences before it relies on it.
            self.avail_flags().store(flags, Ordering::Relaxed);
        }
    }

    /// Writes a chain (linking `NEXT` flags) into free descriptors and puts its head in the
    /// avail ring, not yet published. Returns the head id.
    pub fn add_chain(&mut self, descs: &[Desc]) -> Result<u16, DriverError> {
        let last = descs.len().wrapping_sub(1);
        self.push_chain(descs.len(), |i, next| {
            let d = descs[i];
            let mut flags = if d.write { DESC_F_WRITE } else { 0 };
            if i != last {
                flags |= DESC_F_NEXT;
            }
            RawDesc {
                addr: d.addr,
                len: d.len,
                flags,
                next: if i != last { next } else { 0 },
            }
        })
    }

    /// Writes `descs` verbatim (flags and `next` as given: they may loop or point out of
    /// range) into the free ids [`peek_free_ids`](Self::peek_free_ids) reports, and puts the
    /// first one in the avail ring, not yet published. Returns the head id. The ids return to
    /// the free list when the device returns the head in a used element.
    pub fn add_raw_chain(&mut self, descs: &[RawDesc]) -> Result<u16, DriverError> {
        self.add_raw_chain_at(descs, 0)
    }

    /// Like [`add_raw_chain`](Self::add_raw_chain), but the avail ring gets the id of
    /// `descs[head]` (so the chain can start in the middle of the slots used). All ids return
    /// to the free list when the device returns that id.
    pub fn add_raw_chain_at(&mut self, descs: &[RawDesc], head: usize) -> Result<u16, DriverError> {
        if !descs.is_empty() && head >= descs.len() {
            return Err(DriverError::HeadOutOfChain {
                head,
                len: descs.len(),
            });
        }
        self.push_chain_at(descs.len(), head, |i, _| descs[i])
    }

    /// Common part of `add_chain` and `add_raw_chain`: `make(i, id_of_next)` gives descriptor i.
    pub(super) fn push_chain(
        &mut self,
        n: usize,
        make: impl FnMut(usize, u16) -> RawDesc,
    ) -> Result<u16, DriverError> {
        self.push_chain_at(n, 0, make)
    }

    /// Writes `n` descriptors into the next free ids (`make(i, id of i + 1)` gives the i-th)
    /// and makes the id of the `head`-th one available.
    fn push_chain_at(
        &mut self,
        n: usize,
        head: usize,
        mut make: impl FnMut(usize, u16) -> RawDesc,
    ) -> Result<u16, DriverError> {
        if n == 0 {
            return Err(DriverError::EmptyChain);
        }
        let free = self.free.len();
        if n > free {
            return Err(DriverError::QueueFull {
                needed: n,
                free: free as u16,
            });
        }
        // Ids used, in order: free[free-1], free[free-2], ..., free[free-n].
        let id_of = |free_list: &[u16], i: usize| free_list[free - 1 - i];
        for i in 0..n {
            let id = id_of(&self.free, i);
            let next = id_of(&self.free, (i + 1) % n);
            self.write_desc(id, make(i, next));
            // The shadow links form a ring over the ids used, so walking n steps from any head
            // frees all of them (raw chains may start in the middle).
            self.chain_next[usize::from(id)] = next;
        }
        let head_id = id_of(&self.free, head);
        self.free.truncate(free - n);
        self.chain_len[usize::from(head_id)] = n as u16; // n <= free <= size
        let slot = usize::from(self.avail_idx & (self.size - 1));
        // SAFETY: slot < size, so avail + 4 + 2·slot is inside the avail ring (contract of
        // `new`), 2-aligned. Volatile: the device may read the ring concurrently; it only
        // trusts this entry after the Release store of avail.idx in publish_and_kick.
        unsafe {
            self.avail
                .as_ptr()
                .add(4 + 2 * slot)
                .cast::<u16>()
                .write_volatile(head_id.to_le());
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(head_id)
    }

    fn write_desc(&mut self, id: u16, d: RawDesc) {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&d.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&d.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&d.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&d.next.to_le_bytes());
        debug_assert!(id < self.size);
        // SAFETY: id < size (it came from the free list), so the 16 bytes at desc + 16·id are
        // inside the descriptor table, 16-aligned. Volatile because the mapping is shared.
        unsafe {
            self.desc
                .as_ptr()
                .add(16 * usize::from(id))
                .cast::<[u8; 16]>()
                .write_volatile(bytes);
        }
    }

    /// Publishes `idx` as the avail index, whatever the queue holds, and kicks: a driver that
    /// breaks the ring protocol (an index more than the queue size ahead), for tests.
    pub fn publish_bogus_avail_idx(&mut self, idx: u16) {
        // Release: as in `publish_and_kick`.
        self.avail_idx_atomic()
            .store(idx.to_le(), Ordering::Release);
        if let Err(e) = self.kick.write(1) {
            log::warn!("driver: kick of queue {} failed: {e}", self.index);
        }
    }

    /// Publishes the avail index and kicks the device unless it said it need not be
    /// (`avail_event` with EVENT_IDX, `VRING_USED_F_NO_NOTIFY` without). Returns whether it
    /// kicked. Nothing new to publish: no kick.
    pub fn publish_and_kick(&mut self) -> bool {
        let new = self.avail_idx;
        let old = self.published_idx;
        if new == old {
            return false;
        }
        // Release: descriptors and avail entries written above become visible to a device that
        // reads this idx (pairs with the device's Acquire / read barrier on avail.idx).
        self.avail_idx_atomic()
            .store(new.to_le(), Ordering::Release);
        self.published_idx = new;
        // SeqCst fence: order the idx store before the avail_event / flags load below; pairs
        // with the device's full barrier between publishing avail_event and re-reading avail.idx
        // (virtio 1.2 §2.7.10).
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event = u16::from_le(self.avail_event().load(Ordering::Relaxed));
            need_event(event, new, old)
        } else {
            u16::from_le(self.used_flags().load(Ordering::Relaxed)) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kicks += 1;
            if let Err(e) = self.kick.write(1) {
                // Only possible if the counter would overflow; the device will still poll.
                log::warn!("driver: kick of queue {} failed: {e}", self.index);
            }
        }
        kick
    }

    /// Next used element `(id, len)`, without blocking. Frees the chain's descriptors. With
    /// EVENT_IDX and interrupts on, moves `used_event` past it.
    ///
    /// An id that is not a head in flight (a device bug) is still returned (ids above `u16::MAX`
    /// saturate) and counted in [`device_errors`](Self::device_errors), but frees nothing.
    pub fn poll_used(&mut self) -> Option<(u16, u32)> {
        if self.last_used == self.used_idx_seen {
            // Acquire: the used element and everything the device wrote into the buffers before
            // its Release store of used.idx are visible after this load.
            self.used_idx_seen = u16::from_le(self.used_idx_atomic().load(Ordering::Acquire));
            if self.last_used == self.used_idx_seen {
                return None;
            }
        }
        let slot = usize::from(self.last_used & (self.size - 1));
        // SAFETY: slot < size, so the 8-byte element at used + 4 + 8·slot is inside the used
        // ring, 4-aligned. Volatile: shared with the device; ordered by the Acquire above.
        let (raw_id, len) = unsafe {
            let p = self.used.as_ptr().add(4 + 8 * slot).cast::<u32>();
            (
                u32::from_le(p.read_volatile()),
                u32::from_le(p.add(1).read_volatile()),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx && self.interrupts {
            // Relaxed: a hint for the device; wait_used fences before it sleeps on it.
            self.used_event()
                .store(self.last_used.to_le(), Ordering::Relaxed);
        }
        let id = u16::try_from(raw_id).unwrap_or(u16::MAX);
        if id < self.size && self.chain_len[usize::from(id)] != 0 {
            self.free_chain(id);
        } else {
            self.device_errors += 1;
            log::debug!(
                "driver: queue {} used id {raw_id} is not a head in flight",
                self.index
            );
        }
        Some((id, len))
    }

    fn free_chain(&mut self, head: u16) {
        let n = std::mem::take(&mut self.chain_len[usize::from(head)]);
        let mut id = head;
        for _ in 0..n {
            self.free.push(id);
            id = self.chain_next[usize::from(id)];
        }
    }

    /// Waits up to `timeout` for a used element, sleeping on the call eventfd.
    pub fn wait_used(&mut self, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        let was_on = self.interrupts;
        let got = loop {
            if let Some(e) = self.poll_used() {
                break Some(e);
            }
            // Arm the interrupt for the next used element.
            if !self.interrupts {
                self.set_interrupts(true);
            } else if self.event_idx {
                self.used_event()
                    .store(self.last_used.to_le(), Ordering::Relaxed);
            }
            // SeqCst fence: the used_event / flags store above must be visible before the
            // re-check of used.idx below; pairs with the device's full barrier between its
            // used.idx store and its used_event read. Otherwise the device may skip the
            // interrupt for an element we then fail to see, and we sleep until the timeout.
            fence(Ordering::SeqCst);
            if u16::from_le(self.used_idx_atomic().load(Ordering::Acquire)) != self.last_used {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                break None;
            }
            self.sleep_on_call(deadline - now);
        };
        if !was_on {
            self.set_interrupts(false);
        }
        got
    }

    fn sleep_on_call(&self, left: Duration) {
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.call),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for the duration of the call and nfds is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            // Non-blocking eventfd: reset the counter; EAGAIN (raced with nothing) is fine.
            let _ = self.call.read();
        }
    }

    fn avail_flags(&self) -> &AtomicU16 {
        // SAFETY: avail + 0 is the 2-aligned flags field inside this queue's avail ring, valid
        // while self.mem lives (contract of `new`); accessed only atomically by this driver.
        unsafe { AtomicU16::from_ptr(self.avail.as_ptr().cast()) }
    }

    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: avail + 2 is the 2-aligned idx field inside the avail ring (see avail_flags).
        unsafe { AtomicU16::from_ptr(self.avail.as_ptr().add(2).cast()) }
    }

    fn used_event(&self) -> &AtomicU16 {
        let off = 4 + 2 * usize::from(self.size);
        // SAFETY: used_event follows the size entries of the avail ring (6 + 2·size bytes are
        // reserved), 2-aligned (see avail_flags).
        unsafe { AtomicU16::from_ptr(self.avail.as_ptr().add(off).cast()) }
    }

    fn used_flags(&self) -> &AtomicU16 {
        // SAFETY: used + 0 is the 2-aligned flags field inside the used ring (see avail_flags).
        unsafe { AtomicU16::from_ptr(self.used.as_ptr().cast()) }
    }

    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: used + 2 is the 2-aligned idx field inside the used ring (see avail_flags).
        unsafe { AtomicU16::from_ptr(self.used.as_ptr().add(2).cast()) }
    }

    fn avail_event(&self) -> &AtomicU16 {
        let off = 4 + 8 * usize::from(self.size);
        // SAFETY: avail_event follows the size elements of the used ring (6 + 8·size bytes are
        // reserved), 2-aligned (see avail_flags).
        unsafe { AtomicU16::from_ptr(self.used.as_ptr().add(off).cast()) }
    }
}

/// `vring_need_event` (virtio 1.2 §2.7.10): whether moving an index from `old` to `new` crossed
/// `event`, all modulo 2^16.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use virtio_queue::{Queue, QueueT};

    const N: u16 = 16;

    /// Our driver on one side, rust-vmm's device-side `Queue` on the other, same memory.
    fn pair(event_idx: bool) -> (DriverQueue, Queue, Arc<GuestMemoryMmap>) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let host_base = mem.get_host_address(GuestAddress(0)).unwrap();
        let (l, _) = super::super::layout(1, N, 4096).unwrap();
        let gpas = RingGpas {
            desc: l[0].desc,
            avail: l[0].avail,
            used: l[0].used,
            scratch: l[0].scratch,
        };
        // SAFETY: the layout fits in the 1 MiB anonymous (zeroed) region at host_base, which
        // `mem` keeps mapped.
        let dq = unsafe {
            DriverQueue::new(QueueSetup {
                index: 0,
                size: N,
                event_idx,
                mem: Arc::clone(&mem),
                host_base,
                gpas,
                call: EventFd::new(EFD_NONBLOCK).unwrap(),
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
        };
        let mut vq = Queue::new(N).unwrap();
        vq.set_size(N);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(gpas.desc);
        vq.set_desc_table_address(lo, hi);
        let (lo, hi) = split(gpas.avail);
        vq.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(gpas.used);
        vq.set_used_ring_address(lo, hi);
        vq.set_event_idx(event_idx);
        vq.set_ready(true);
        assert!(vq.is_valid(&*mem));
        (dq, vq, mem)
    }

    /// Many rounds across the 2^16 index wrap: chains arrive intact, used elements come back,
    /// kicks and interrupts happen exactly when the device asked for them.
    fn roundtrip(event_idx: bool) {
        let (mut dq, mut vq, mem) = pair(event_idx);
        let rounds = 70_000u32;
        for r in 0..rounds {
            let descs = [
                Desc::readable(0x8_0000 + u64::from(r % 7), 16),
                Desc::writable(0x9_0000, 1 + r % 5),
            ];
            let head = dq.add_chain(&descs).unwrap();
            // The device re-enabled notifications after draining: every publish must kick.
            assert!(dq.publish_and_kick(), "round {r}: missing kick");
            let chain = vq.pop_descriptor_chain(&*mem).expect("chain");
            assert_eq!(chain.head_index(), head);
            let got: Vec<_> = chain
                .clone()
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            let want: Vec<_> = descs.iter().map(|d| (d.addr, d.len, d.write)).collect();
            assert_eq!(got, want);
            vq.add_used(&*mem, head, 7).unwrap();
            assert!(
                vq.needs_notification(&*mem).unwrap(),
                "round {r}: interrupt suppressed"
            );
            assert!(!vq.enable_notification(&*mem).unwrap());
            assert_eq!(dq.poll_used(), Some((head, 7)));
            assert_eq!(dq.poll_used(), None);
            assert_eq!(dq.free_descriptors(), N);
        }
        assert_eq!(dq.kicks(), u64::from(rounds));
        assert_eq!(dq.device_errors(), 0);
    }

    #[test]
    fn roundtrip_with_event_idx() {
        roundtrip(true);
    }

    #[test]
    fn roundtrip_without_event_idx() {
        roundtrip(false);
    }

    /// Device notifications off and driver interrupts off: almost no kicks or interrupts.
    fn suppressed(event_idx: bool) {
        let (mut dq, mut vq, mem) = pair(event_idx);
        dq.set_interrupts(false);
        vq.disable_notification(&*mem).unwrap();
        let (mut interrupts, rounds) = (0, 70_000u32);
        for _ in 0..rounds {
            let head = dq.add_chain(&[Desc::writable(0x9_0000, 4)]).unwrap();
            dq.publish_and_kick();
            let chain = vq.pop_descriptor_chain(&*mem).unwrap();
            vq.add_used(&*mem, chain.head_index(), 4).unwrap();
            interrupts += u32::from(vq.needs_notification(&*mem).unwrap());
            assert_eq!(dq.poll_used(), Some((head, 4)));
        }
        // EVENT_IDX: one kick / interrupt when the index crosses the stale event (once per
        // 2^16); flags: no kick at all after the first.
        assert!(dq.kicks() <= 3, "{} kicks", dq.kicks());
        if event_idx {
            assert!(interrupts <= 3, "{interrupts} interrupts");
        } else {
            // virtio-queue 0.18 ignores VRING_AVAIL_F_NO_INTERRUPT ("isn't supported yet"), so
            // only check that the driver set it.
            assert_eq!(
                dq.avail_flags().load(Ordering::Relaxed),
                AVAIL_F_NO_INTERRUPT
            );
        }
    }

    #[test]
    fn suppression_with_event_idx() {
        suppressed(true);
    }

    #[test]
    fn suppression_without_event_idx() {
        suppressed(false);
    }

    #[test]
    fn raw_chains_free_every_id_whatever_the_device_sees() {
        let (mut dq, mut vq, mem) = pair(true);
        // A chain starting in the middle of its slots: ids[1] -> ids[0].
        let ids = dq.peek_free_ids(2);
        let head = dq
            .add_raw_chain_at(
                &[
                    RawDesc {
                        addr: 0x9_0000,
                        len: 1,
                        flags: DESC_F_WRITE,
                        next: 0,
                    },
                    RawDesc {
                        addr: 0x8_0000,
                        len: 16,
                        flags: DESC_F_NEXT,
                        next: ids[0],
                    },
                ],
                1,
            )
            .unwrap();
        assert_eq!(head, ids[1]);
        dq.publish_and_kick();
        let chain = vq.pop_descriptor_chain(&*mem).unwrap();
        assert_eq!(chain.head_index(), head);
        assert_eq!(chain.count(), 2);
        vq.add_used(&*mem, head, 0).unwrap();
        assert_eq!(dq.poll_used(), Some((head, 0)));
        assert_eq!(dq.free_descriptors(), N);

        // A chain that loops onto itself: the device must stop walking; ids still come back.
        let ids = dq.peek_free_ids(2);
        let head = dq
            .add_raw_chain(&[
                RawDesc {
                    addr: 0x8_0000,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: ids[1],
                },
                RawDesc {
                    addr: 0x8_0000,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: ids[0],
                },
            ])
            .unwrap();
        dq.publish_and_kick();
        let chain = vq.pop_descriptor_chain(&*mem).unwrap();
        assert!(
            chain.count() <= usize::from(N),
            "device walked the loop forever"
        );
        vq.add_used(&*mem, head, 0).unwrap();
        assert_eq!(dq.poll_used(), Some((head, 0)));
        assert_eq!(dq.free_descriptors(), N);

        // A used element for an id not in flight is reported, counted, and frees nothing.
        vq.add_used(&*mem, 3, 0).unwrap();
        assert_eq!(dq.poll_used(), Some((3, 0)));
        assert_eq!(dq.device_errors(), 1);
        assert_eq!(dq.free_descriptors(), N);
    }

    #[test]
    fn full_queue_and_empty_chain_are_errors() {
        let (mut dq, _vq, _mem) = pair(false);
        assert!(matches!(dq.add_chain(&[]), Err(DriverError::EmptyChain)));
        let big = vec![Desc::readable(0, 1); usize::from(N) + 1];
        assert!(matches!(
            dq.add_chain(&big),
            Err(DriverError::QueueFull {
                needed: 17,
                free: 16
            })
        ));
        dq.add_chain(&big[..usize::from(N)]).unwrap();
        assert_eq!(dq.next_head(), None);
        assert!(dq.add_chain(&big[..1]).is_err());
    }

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Device wants a kick when idx passes 5: moving 3 -> 6 crosses it.
        assert!(need_event(5, 6, 3));
        // Moving 3 -> 5 writes entries 3 and 4 only.
        assert!(!need_event(5, 5, 3));
        // Wrap-around.
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
        assert!(!need_event(10, 2, u16::MAX - 1));
    }
}
