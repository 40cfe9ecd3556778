//! NVMe-style submission and completion rings over caller-provided memory (NVM Express Base
//! Specification 2.0, section 3.3.1 "Memory-based Transport Queue Model").
//!
//! A queue of `size` slots holds at most `size - 1` entries: it is empty when head == tail and
//! full when tail + 1 == head (modulo `size`, which need not be a power of two).
//!
//! * Submission queue: the producer writes entries at its tail and publishes the tail through the
//!   tail doorbell; the consumer reads entries up to that tail and gives slots back through the
//!   head doorbell.
//! * Completion queue: the producer writes an entry and then its status word, whose bit 0 is the
//!   phase tag; the value of the phase tag written flips every time the producer wraps, so the
//!   consumer recognises new entries without a tail doorbell. The consumer gives slots back
//!   through the CQ head doorbell.
//!
//! # Memory ordering
//! Every hand-off is one Release store paired with one Acquire load of the same location:
//!
//! | data                       | published by (Release)            | observed by (Acquire)        |
//! |----------------------------|-----------------------------------|------------------------------|
//! | SQ entries                 | [`SqProducer::publish`] (SQ tail) | [`SqConsumer::pop`]          |
//! | SQ slots free for reuse    | [`SqConsumer::release`] (SQ head) | [`SqProducer::push`]         |
//! | CQ entry body              | [`CqProducer::push`] (status word)| [`CqConsumer::pop`]          |
//! | CQ slots free for reuse    | [`CqConsumer::release`] (CQ head) | [`CqProducer::push`]         |
//!
//! Nothing relies on the stronger ordering of x86: on ARM the same code is correct because every
//! read of data the other side wrote is preceded by an Acquire load that observed the Release
//! store made after that write. The loom tests at the bottom of this file check this.
//!
//! # Hostile peers
//! A doorbell the other side writes is never trusted: a value `>= size` is reported as
//! [`RingError::InvalidDoorbell`] and never used as an index. A peer that moves its doorbell
//! inconsistently can only make this side read or overwrite entries it should not — values, not
//! memory safety — as long as the slot memory is accessed through [`RawSlots`] (volatile).

use core::marker::PhantomData;
use core::ops::Deref;

use crate::nvme::Cqe;
use crate::sync::{AtomicU32, Ordering};

/// Largest number of slots an NVMe queue can have (CAP.MQES is a 0-based 16-bit field).
pub const MAX_QUEUE_SIZE: usize = 65536;
/// Smallest useful number of slots (one usable entry).
pub const MIN_QUEUE_SIZE: usize = 2;

/// Ring errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The slot memory has a number of slots outside 2..=65536.
    #[error("queue size {0} is outside 2..=65536")]
    InvalidSize(usize),
    /// The peer wrote a doorbell value that is not a valid index.
    #[error("doorbell value {value} is not below the queue size {size}")]
    InvalidDoorbell {
        /// The value read.
        value: u32,
        /// The queue size.
        size: u32,
    },
    /// No free slot.
    #[error("queue is full")]
    Full,
}

/// Slot memory of a ring: `len()` slots of `T`, read and written by index.
///
/// # Safety
/// Implementors guarantee that `len()` never changes, that for every `i < len()` the methods
/// access one properly aligned `T` in memory that stays valid while `self` lives, and that
/// different indices are different, non-overlapping slots. The rings rely on this to call the
/// `unsafe` methods with indices they only check against `len()` once, at construction.
pub unsafe trait Slots<T: Copy> {
    /// Number of slots.
    fn len(&self) -> usize;

    /// Whether there are no slots.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads slot `i`.
    ///
    /// # Safety
    /// `i < self.len()`, and no thread of this process writes slot `i` concurrently (the ring
    /// protocol gives each slot to one side at a time).
    unsafe fn read(&self, i: usize) -> T;

    /// Writes slot `i`.
    ///
    /// # Safety
    /// `i < self.len()`, and no thread of this process reads or writes slot `i` concurrently.
    unsafe fn write(&self, i: usize, v: T);
}

/// Completion queue slot memory: the 16-byte entry's status word (bytes 15:14, holding the phase
/// tag in bit 0) is accessed atomically, the rest of the entry with ordinary accesses.
///
/// The producer writes the body with [`CqSlots::write_body`] (which must not touch bytes 15:14),
/// then the status word with a Release [`CqSlots::store_status`]; the consumer polls the status
/// word with Acquire [`CqSlots::load_status`] and reads the body only after it saw the new phase.
///
/// # Safety
/// As for [`Slots`]; in addition `load_status`/`store_status` must be atomic accesses of the
/// status word of entry `i` with the given ordering (or an ordering at least as strong), and
/// `write_body` must not write the status word.
pub unsafe trait CqSlots: Slots<Cqe> {
    /// Atomically loads the status word of entry `i`, converted to host order.
    ///
    /// # Safety
    /// `i < self.len()`.
    unsafe fn load_status(&self, i: usize, order: Ordering) -> u16;

    /// Atomically stores the status word of entry `i` (`v` in host order).
    ///
    /// # Safety
    /// `i < self.len()`.
    unsafe fn store_status(&self, i: usize, v: u16, order: Ordering);

    /// Writes bytes 13:0 of entry `i` (everything but the status word) from `v`.
    ///
    /// # Safety
    /// `i < self.len()`, and no thread of this process reads or writes those bytes of slot `i`
    /// concurrently.
    unsafe fn write_body(&self, i: usize, v: &Cqe);
}

/// Slots in memory the caller provides (a guest's or a peer's ring, a device's queue, or memory
/// this process allocated), accessed only with volatile and atomic operations.
pub struct RawSlots<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for RawSlots<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for RawSlots<T> {}

impl<T> core::fmt::Debug for RawSlots<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RawSlots")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: `RawSlots` is a pointer to shared ring memory; moving it to another thread is what it
// is for. The constructor's contract makes the memory valid for as long as any copy is used.
unsafe impl<T: Send> Send for RawSlots<T> {}
// SAFETY: all accesses go through the `unsafe` trait methods, whose callers (the rings) ensure
// that a slot is owned by one side at a time; status words are accessed atomically.
unsafe impl<T: Send> Sync for RawSlots<T> {}

impl<T: Copy> RawSlots<T> {
    /// Slot memory of `len` entries starting at `ptr`.
    ///
    /// # Safety
    /// * `ptr` is non-null, aligned for `T`, and valid for reads and writes of `len` consecutive
    ///   `T`s for as long as this value or any copy of it is used;
    /// * every bit pattern is a valid `T` (true of [`crate::Sqe`] and [`Cqe`]), since a peer may
    ///   write anything;
    /// * while it is used, no Rust reference (`&`/`&mut`) to that memory exists elsewhere in
    ///   this process, and other threads of this process access it only through `RawSlots`
    ///   following the ring protocol. Memory shared with another process, a guest or a device
    ///   is accessed with volatile operations, the accepted way of reading memory outside the
    ///   Rust abstract machine's control (as vm-memory does).
    pub unsafe fn new(ptr: *mut T, len: usize) -> Self {
        RawSlots { ptr, len }
    }

    /// The start of the slot memory.
    pub fn as_ptr(&self) -> *mut T {
        self.ptr
    }
}

// SAFETY: `len` is fixed at construction; index `i < len` addresses the i-th `T` of memory the
// constructor's caller guarantees valid and aligned, and distinct indices do not overlap.
unsafe impl<T: Copy> Slots<T> for RawSlots<T> {
    fn len(&self) -> usize {
        self.len
    }

    unsafe fn read(&self, i: usize) -> T {
        // SAFETY: the caller guarantees `i < len`, so the pointer is in bounds of the valid,
        // aligned memory promised by `RawSlots::new`; volatile because a peer outside this
        // process may write it.
        unsafe { self.ptr.add(i).read_volatile() }
    }

    unsafe fn write(&self, i: usize, v: T) {
        // SAFETY: as in `read`; the caller guarantees no concurrent access from this process.
        unsafe { self.ptr.add(i).write_volatile(v) }
    }
}

// SAFETY: status accesses are atomic `AtomicU16` operations on bytes 15:14 of the entry; the
// body write does not touch them (it writes dw0, dw1, sq_head, sq_id and cid only).
unsafe impl CqSlots for RawSlots<Cqe> {
    unsafe fn load_status(&self, i: usize, order: Ordering) -> u16 {
        // SAFETY: `i < len` (caller), so the entry is in bounds; `&raw mut` makes no reference.
        let p = unsafe { &raw mut (*self.ptr.add(i)).status };
        // `Cqe` is `align(16)` and `status` is at offset 14 (asserted in nvme.rs). Non-atomic
        // accesses of these bytes (a consumer's whole-entry read after it saw the new phase) are
        // ordered with the atomic ones by the ring protocol.
        // SAFETY: `p` is 2-byte aligned as `AtomicU16` needs everywhere, and valid for `self`.
        let a = unsafe { core::sync::atomic::AtomicU16::from_ptr(p) };
        u16::from_le(a.load(order))
    }

    unsafe fn store_status(&self, i: usize, v: u16, order: Ordering) {
        // SAFETY: as in `load_status`.
        let p = unsafe { &raw mut (*self.ptr.add(i)).status };
        // SAFETY: as in `load_status`.
        let a = unsafe { core::sync::atomic::AtomicU16::from_ptr(p) };
        a.store(v.to_le(), order);
    }

    unsafe fn write_body(&self, i: usize, v: &Cqe) {
        // SAFETY: `i < len` (caller), so `e` points at a valid, aligned entry; each field pointer
        // is derived with `&raw mut` (no reference) and is aligned because the entry is; the
        // caller guarantees no concurrent access to these bytes from this process.
        unsafe {
            let e = self.ptr.add(i);
            (&raw mut (*e).dw0).write_volatile(v.dw0);
            (&raw mut (*e).dw1).write_volatile(v.dw1);
            (&raw mut (*e).sq_head).write_volatile(v.sq_head);
            (&raw mut (*e).sq_id).write_volatile(v.sq_id);
            (&raw mut (*e).cid).write_volatile(v.cid);
        }
    }
}

/// Slots for loom tests: each slot is a `loom::cell::UnsafeCell`, so loom reports any access
/// that races with another, and each completion entry's status word is a separate loom atomic.
#[cfg(loom)]
pub struct LoomSlots<T> {
    cells: Box<[loom::cell::UnsafeCell<T>]>,
    status: Box<[loom::sync::atomic::AtomicU16]>,
}

#[cfg(loom)]
// SAFETY: slots are only accessed through the `unsafe` trait methods, whose callers guarantee
// one side at a time; loom checks exactly that.
unsafe impl<T: Send> Sync for LoomSlots<T> {}

#[cfg(loom)]
impl<T: Copy> LoomSlots<T> {
    /// `len` slots holding `init`, with zeroed status words.
    pub fn new(len: usize, init: T) -> Self {
        LoomSlots {
            cells: (0..len)
                .map(|_| loom::cell::UnsafeCell::new(init))
                .collect(),
            status: (0..len)
                .map(|_| loom::sync::atomic::AtomicU16::new(0))
                .collect(),
        }
    }
}

#[cfg(loom)]
// SAFETY: `len` is fixed; indices address distinct boxed cells.
unsafe impl<T: Copy> Slots<T> for LoomSlots<T> {
    fn len(&self) -> usize {
        self.cells.len()
    }
    unsafe fn read(&self, i: usize) -> T {
        // SAFETY: `i < len` by the caller; the pointer comes from the cell and is valid; loom's
        // `with` records the access and panics if it races with a write.
        self.cells[i].with(|p| unsafe { *p })
    }
    unsafe fn write(&self, i: usize, v: T) {
        // SAFETY: as in `read`, for a write.
        self.cells[i].with_mut(|p| unsafe { *p = v })
    }
}

#[cfg(loom)]
// SAFETY: status words are loom atomics separate from the cell, so the body write cannot touch
// them.
unsafe impl CqSlots for LoomSlots<Cqe> {
    unsafe fn load_status(&self, i: usize, order: Ordering) -> u16 {
        self.status[i].load(order)
    }
    unsafe fn store_status(&self, i: usize, v: u16, order: Ordering) {
        self.status[i].store(v, order)
    }
    unsafe fn write_body(&self, i: usize, v: &Cqe) {
        // SAFETY: the caller guarantees `i < len` and exclusive access to the body.
        unsafe { self.write(i, *v) }
    }
}

// SAFETY: forwards to `S`, which upholds the contract.
unsafe impl<T: Copy, S: Slots<T> + ?Sized> Slots<T> for &S {
    fn len(&self) -> usize {
        (**self).len()
    }
    unsafe fn read(&self, i: usize) -> T {
        // SAFETY: same contract as the callee.
        unsafe { (**self).read(i) }
    }
    unsafe fn write(&self, i: usize, v: T) {
        // SAFETY: same contract as the callee.
        unsafe { (**self).write(i, v) }
    }
}

// SAFETY: forwards to `S`, which upholds the contract.
unsafe impl<S: CqSlots + ?Sized> CqSlots for &S {
    unsafe fn load_status(&self, i: usize, order: Ordering) -> u16 {
        // SAFETY: same contract as the callee.
        unsafe { (**self).load_status(i, order) }
    }
    unsafe fn store_status(&self, i: usize, v: u16, order: Ordering) {
        // SAFETY: same contract as the callee.
        unsafe { (**self).store_status(i, v, order) }
    }
    unsafe fn write_body(&self, i: usize, v: &Cqe) {
        // SAFETY: same contract as the callee.
        unsafe { (**self).write_body(i, v) }
    }
}

// SAFETY: forwards to `S`, which upholds the contract.
unsafe impl<T: Copy, S: Slots<T> + ?Sized> Slots<T> for crate::sync::Arc<S> {
    fn len(&self) -> usize {
        (**self).len()
    }
    unsafe fn read(&self, i: usize) -> T {
        // SAFETY: same contract as the callee.
        unsafe { (**self).read(i) }
    }
    unsafe fn write(&self, i: usize, v: T) {
        // SAFETY: same contract as the callee.
        unsafe { (**self).write(i, v) }
    }
}

// SAFETY: forwards to `S`, which upholds the contract.
unsafe impl<S: CqSlots + ?Sized> CqSlots for crate::sync::Arc<S> {
    unsafe fn load_status(&self, i: usize, order: Ordering) -> u16 {
        // SAFETY: same contract as the callee.
        unsafe { (**self).load_status(i, order) }
    }
    unsafe fn store_status(&self, i: usize, v: u16, order: Ordering) {
        // SAFETY: same contract as the callee.
        unsafe { (**self).store_status(i, v, order) }
    }
    unsafe fn write_body(&self, i: usize, v: &Cqe) {
        // SAFETY: same contract as the callee.
        unsafe { (**self).write_body(i, v) }
    }
}

/// Checks a slot count and returns it as a doorbell-sized value.
fn ring_size(len: usize) -> Result<u32, RingError> {
    if (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&len) {
        Ok(len as u32)
    } else {
        Err(RingError::InvalidSize(len))
    }
}

/// The index after `i` in a ring of `size` slots (`i < size <= 65536`, so no overflow).
#[inline]
fn next(i: u32, size: u32) -> u32 {
    let n = i + 1;
    if n == size {
        0
    } else {
        n
    }
}

/// A doorbell: where one side of a ring publishes an index for the other.
///
/// In process (an in-process queue pair, a guest's shadow doorbells) it is an [`AtomicU32`]
/// behind any pointer, and the orderings are those of the module table. A device's doorbell is a
/// register behind an MMIO mapping: its `store` must make every earlier write to ring memory
/// visible to the device before the register write (a DMA write barrier), and an SQ producer
/// talking to a device learns the head from completions (SQHD), through an in-process
/// [`AtomicU32`] its owner updates, not from the device.
pub trait DoorbellReg {
    /// Reads the doorbell.
    fn load(&self, order: Ordering) -> u32;
    /// Writes the doorbell.
    fn store(&self, v: u32, order: Ordering);
}

impl<P: Deref<Target = AtomicU32>> DoorbellReg for P {
    #[inline]
    fn load(&self, order: Ordering) -> u32 {
        (**self).load(order)
    }
    #[inline]
    fn store(&self, v: u32, order: Ordering) {
        (**self).store(v, order)
    }
}

/// Loads a doorbell the peer writes, with Acquire, and rejects values that are not indices.
#[inline]
fn load_doorbell(db: &impl DoorbellReg, size: u32) -> Result<u32, RingError> {
    // Acquire: pairs with the peer's Release store of this doorbell (see the module table), so
    // that everything the peer did to the slots before the store happens before what we do
    // after this load.
    let value = db.load(Ordering::Acquire);
    if value < size {
        Ok(value)
    } else {
        Err(RingError::InvalidDoorbell { value, size })
    }
}

/// Producer side of a submission queue. `D` is the tail doorbell, `H` where the head comes from
/// (the consumer's head doorbell in process; for a device, the SQ head its completions report).
pub struct SqProducer<T, S, D, H = D> {
    slots: S,
    size: u32,
    /// Next slot to write (local).
    tail: u32,
    /// Tail value last stored to the doorbell.
    published: u32,
    /// Last head value read from the head doorbell.
    head: u32,
    tail_db: D,
    head_db: H,
    _entry: PhantomData<fn(T) -> T>,
}

impl<T: Copy, S: Slots<T>, D: DoorbellReg, H: DoorbellReg> SqProducer<T, S, D, H> {
    /// A producer writing `slots`, publishing through `tail_db` and learning about free slots
    /// from `head_db`. The queue starts empty at index 0 (as after Create I/O Submission Queue);
    /// the doorbells are not read here.
    pub fn new(slots: S, tail_db: D, head_db: H) -> Result<Self, RingError> {
        let size = ring_size(slots.len())?;
        Ok(SqProducer {
            slots,
            size,
            tail: 0,
            published: 0,
            head: 0,
            tail_db,
            head_db,
            _entry: PhantomData,
        })
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Number of entries pushed but not yet published.
    pub fn unpublished(&self) -> u32 {
        (self.tail + self.size - self.published) % self.size
    }

    /// Writes `v` at the tail. It is not visible to the consumer until [`SqProducer::publish`].
    /// Fails with [`RingError::Full`] when the consumer has not given back a slot, or
    /// [`RingError::InvalidDoorbell`] when the head doorbell holds garbage.
    pub fn push(&mut self, v: T) -> Result<(), RingError> {
        let n = next(self.tail, self.size);
        if n == self.head {
            // The cached head says full: look again. The Acquire load (in `load_doorbell`) pairs
            // with the consumer's Release in `SqConsumer::release`, so its reads of the slots it
            // gave back happen before our overwrite below.
            self.head = load_doorbell(&self.head_db, self.size)?;
            if n == self.head {
                return Err(RingError::Full);
            }
        }
        // The slot at `tail` belongs to the producer: the consumer reads only slots before the
        // published tail, and its reads of this slot in the previous lap happen before this
        // write (Acquire load of the head doorbell above, or in an earlier push).
        // SAFETY: `tail < size == slots.len()`, and the slot is the producer's (above).
        unsafe { self.slots.write(self.tail as usize, v) };
        self.tail = n;
        Ok(())
    }

    /// Makes every pushed entry visible: one Release store of the tail doorbell (skipped when
    /// nothing was pushed since the last call). Call once per batch.
    pub fn publish(&mut self) {
        if self.tail != self.published {
            // Release: the slot writes in `push` happen before this store, so a consumer whose
            // Acquire load of the tail doorbell reads this value sees the entries.
            self.tail_db.store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }
}

/// Consumer side of a submission queue.
pub struct SqConsumer<T, S, D> {
    slots: S,
    size: u32,
    /// Next slot to read (local).
    head: u32,
    /// Head value last stored to the doorbell.
    released: u32,
    /// Last tail value read from the tail doorbell.
    tail: u32,
    tail_db: D,
    head_db: D,
    _entry: PhantomData<fn(T) -> T>,
}

impl<T: Copy, S: Slots<T>, D: DoorbellReg> SqConsumer<T, S, D> {
    /// A consumer reading `slots`, learning about new entries from `tail_db` and giving slots back
    /// through `head_db`. The queue starts empty at index 0; the doorbells are not read here.
    pub fn new(slots: S, tail_db: D, head_db: D) -> Result<Self, RingError> {
        let size = ring_size(slots.len())?;
        Ok(SqConsumer {
            slots,
            size,
            head: 0,
            released: 0,
            tail: 0,
            tail_db,
            head_db,
            _entry: PhantomData,
        })
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The local head: the index of the next entry to read (what an NVMe controller reports in
    /// a completion's SQ Head Pointer field).
    pub fn head(&self) -> u32 {
        self.head
    }

    /// Takes the next published entry, if any. The slot stays owned by the consumer until
    /// [`SqConsumer::release`]. Fails with [`RingError::InvalidDoorbell`] (and reads nothing)
    /// when the tail doorbell holds a value `>= size`.
    pub fn pop(&mut self) -> Result<Option<T>, RingError> {
        if self.head == self.tail {
            // Acquire (in `load_doorbell`): pairs with the producer's Release in
            // `SqProducer::publish`, so the entry writes before it are visible to the read below.
            self.tail = load_doorbell(&self.tail_db, self.size)?;
            if self.head == self.tail {
                return Ok(None);
            }
        }
        // SAFETY: `head < size == slots.len()`; the slot lies between our head and a tail the
        // producer published with Release and we loaded with Acquire, so its write happens
        // before this read, and the producer will not write it again until we release it.
        let v = unsafe { self.slots.read(self.head as usize) };
        self.head = next(self.head, self.size);
        Ok(Some(v))
    }

    /// Gives consumed slots back to the producer: one Release store of the head doorbell
    /// (skipped when nothing was consumed since the last call). Call once per batch.
    pub fn release(&mut self) {
        if self.head != self.released {
            // Release: our reads of the consumed slots happen before this store; the producer's
            // Acquire load of the head doorbell then orders its overwrites after them.
            self.head_db.store(self.head, Ordering::Release);
            self.released = self.head;
        }
    }
}

/// Producer side of a completion queue.
pub struct CqProducer<S, D> {
    slots: S,
    size: u32,
    /// Next slot to write (local).
    tail: u32,
    /// Phase tag written in this lap.
    phase: bool,
    /// Last head value read from the head doorbell.
    head: u32,
    head_db: D,
}

impl<S: CqSlots, D: DoorbellReg> CqProducer<S, D> {
    /// A producer writing `slots` and learning about free slots from `head_db`. The queue starts
    /// at index 0 writing phase tag 1, so the memory must be zeroed before the first use (as the
    /// NVMe host does when it creates a completion queue).
    pub fn new(slots: S, head_db: D) -> Result<Self, RingError> {
        let size = ring_size(slots.len())?;
        Ok(CqProducer {
            slots,
            size,
            tail: 0,
            phase: true,
            head: 0,
            head_db,
        })
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Posts `cqe` (its phase bit is replaced): writes the body, then the status word with the
    /// current phase tag using a Release store, which makes the entry visible. Fails with
    /// [`RingError::Full`] or [`RingError::InvalidDoorbell`] without writing anything.
    pub fn push(&mut self, cqe: Cqe) -> Result<(), RingError> {
        let n = next(self.tail, self.size);
        if n == self.head {
            // Acquire (in `load_doorbell`): pairs with the consumer's Release in
            // `CqConsumer::release`, so its reads of the freed slots happen before our writes.
            self.head = load_doorbell(&self.head_db, self.size)?;
            if n == self.head {
                return Err(RingError::Full);
            }
        }
        let i = self.tail as usize;
        // The slot is free: the consumer stops at the first entry whose phase does not match and
        // reads a body only after the Release store below; its reads from the previous lap
        // happen before this write (Acquire above or in an earlier push).
        // SAFETY: `i < size == slots.len()`, and the slot is free (above).
        unsafe { self.slots.write_body(i, &cqe) };
        let status = (u16::from_le(cqe.status) & !1) | self.phase as u16;
        // Release: the body written above happens before this store, so a consumer whose Acquire
        // load of the status word sees this phase reads the complete body.
        // SAFETY: `i < slots.len()`.
        unsafe { self.slots.store_status(i, status, Ordering::Release) };
        self.tail = n;
        if n == 0 {
            self.phase = !self.phase;
        }
        Ok(())
    }
}

/// Consumer side of a completion queue.
pub struct CqConsumer<S, D> {
    slots: S,
    size: u32,
    /// Next slot to read (local).
    head: u32,
    /// Phase tag expected in this lap.
    phase: bool,
    /// Head value last stored to the doorbell.
    released: u32,
    head_db: D,
}

impl<S: CqSlots, D: DoorbellReg> CqConsumer<S, D> {
    /// A consumer reading `slots` and giving them back through `head_db`. It starts at index 0
    /// expecting phase tag 1; the memory must be zeroed before the producer starts.
    pub fn new(slots: S, head_db: D) -> Result<Self, RingError> {
        let size = ring_size(slots.len())?;
        Ok(CqConsumer {
            slots,
            size,
            head: 0,
            phase: true,
            released: 0,
            head_db,
        })
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The phase tag expected at the head.
    pub fn phase(&self) -> bool {
        self.phase
    }

    /// Whether a new completion waits at the head (its phase tag matches), without taking it.
    pub fn pending(&self) -> bool {
        // Acquire, as in `pop`; nothing else is read.
        // SAFETY: `head < size == slots.len()`.
        let status = unsafe {
            self.slots
                .load_status(self.head as usize, Ordering::Acquire)
        };
        (status & 1 != 0) == self.phase
    }

    /// Takes the next completion, if its phase tag says it is new. The slot stays owned by the
    /// consumer until [`CqConsumer::release`].
    pub fn pop(&mut self) -> Option<Cqe> {
        let i = self.head as usize;
        // Acquire: pairs with the producer's Release store of this status word in
        // `CqProducer::push`; when the phase matches, the body written before it is visible.
        // SAFETY: `i < size == slots.len()`.
        let status = unsafe { self.slots.load_status(i, Ordering::Acquire) };
        if (status & 1 != 0) != self.phase {
            return None;
        }
        // SAFETY: `i < slots.len()`; the producer wrote this body before the status store we
        // observed and will not write the slot again until we release it.
        let mut cqe = unsafe { self.slots.read(i) };
        cqe.status = status.to_le();
        self.head = next(self.head, self.size);
        if self.head == 0 {
            self.phase = !self.phase;
        }
        Some(cqe)
    }

    /// Gives consumed slots back to the producer: one Release store of the head doorbell
    /// (skipped when nothing was consumed since the last call).
    pub fn release(&mut self) {
        if self.head != self.released {
            // Release: our reads of the consumed entries happen before this store; the
            // producer's Acquire load of the doorbell orders its overwrites after them.
            self.head_db.store(self.head, Ordering::Release);
            self.released = self.head;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::nvme::Status;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// Owns slot memory for tests; `RawSlots` borrow it through a raw pointer.
    struct Mem<T>(Box<[core::cell::UnsafeCell<T>]>);
    impl<T: Copy> Mem<T> {
        fn new(len: usize, init: T) -> Self {
            Mem((0..len)
                .map(|_| core::cell::UnsafeCell::new(init))
                .collect())
        }
        fn slots(&self) -> RawSlots<T> {
            // SAFETY: the boxed cells are aligned, valid for `len` entries and outlive every use
            // in the test; they are only accessed through `RawSlots`.
            unsafe { RawSlots::new(self.0.as_ptr() as *mut T, self.0.len()) }
        }
    }

    #[test]
    fn sq_fills_to_size_minus_one_and_wraps() {
        let mem = Mem::new(3, 0u64);
        let (tail, head) = (AtomicU32::new(0), AtomicU32::new(0));
        let mut p = SqProducer::new(mem.slots(), &tail, &head).unwrap();
        let mut c = SqConsumer::new(mem.slots(), &tail, &head).unwrap();

        p.push(1).unwrap();
        p.push(2).unwrap();
        assert_eq!(p.push(3), Err(RingError::Full));
        assert_eq!(c.pop(), Ok(None), "nothing visible before publish");
        p.publish();
        assert_eq!(tail.load(Ordering::Relaxed), 2);
        assert_eq!(c.pop(), Ok(Some(1)));
        assert_eq!(p.push(3), Err(RingError::Full), "slot not released yet");
        c.release();
        p.push(3).unwrap(); // last slot: the tail wraps to index 0
        p.publish();
        assert_eq!(c.pop(), Ok(Some(2)));
        assert_eq!(c.pop(), Ok(Some(3)));
        assert_eq!(c.pop(), Ok(None));
        assert_eq!(c.head(), 0, "the head wrapped too");
    }

    #[test]
    fn hostile_doorbells_are_rejected() {
        let mem = Mem::new(4, 0u32);
        let (tail, head) = (AtomicU32::new(0), AtomicU32::new(0));
        let mut c = SqConsumer::new(mem.slots(), &tail, &head).unwrap();
        tail.store(4, Ordering::Relaxed);
        assert_eq!(
            c.pop(),
            Err(RingError::InvalidDoorbell { value: 4, size: 4 })
        );
        tail.store(u32::MAX, Ordering::Relaxed);
        assert!(c.pop().is_err());

        let mut p = SqProducer::new(mem.slots(), &tail, &head).unwrap();
        head.store(77, Ordering::Relaxed);
        for i in 0..3 {
            p.push(i).unwrap();
        }
        assert_eq!(
            p.push(3),
            Err(RingError::InvalidDoorbell { value: 77, size: 4 })
        );

        let cq = Mem::new(4, Cqe::default());
        let mut cp = CqProducer::new(cq.slots(), &head).unwrap();
        for i in 0..3 {
            cp.push(Cqe::new(i, Status::SUCCESS)).unwrap();
        }
        assert!(matches!(
            cp.push(Cqe::default()),
            Err(RingError::InvalidDoorbell { .. })
        ));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let mem = Mem::new(1, 0u8);
        let db = AtomicU32::new(0);
        assert_eq!(
            SqProducer::new(mem.slots(), &db, &db).err(),
            Some(RingError::InvalidSize(1))
        );
        let big = Mem::new(MAX_QUEUE_SIZE + 1, 0u8);
        assert!(SqConsumer::new(big.slots(), &db, &db).is_err());
    }

    #[test]
    fn cq_phase_flips_on_wrap() {
        let mem = Mem::new(3, Cqe::default());
        let head = AtomicU32::new(0);
        let mut p = CqProducer::new(mem.slots(), &head).unwrap();
        let mut c = CqConsumer::new(mem.slots(), &head).unwrap();
        assert_eq!(c.pop(), None);

        let mut next_cid = 0u16;
        let mut expect = 0u16;
        for round in 0..5 {
            for _ in 0..2 {
                let mut e = Cqe::new(next_cid, Status::LBA_OUT_OF_RANGE);
                e.set_dw0(u32::from(next_cid) * 3);
                p.push(e).unwrap();
                next_cid += 1;
            }
            assert_eq!(
                p.push(Cqe::default()),
                Err(RingError::Full),
                "round {round}"
            );
            for _ in 0..2 {
                let e = c.pop().expect("entry");
                assert_eq!(e.cid(), expect);
                assert_eq!(e.dw0(), u32::from(expect) * 3);
                assert_eq!(e.status(), Status::LBA_OUT_OF_RANGE);
                expect += 1;
            }
            assert_eq!(c.pop(), None);
            c.release();
        }
        // 10 entries through 3 slots: the consumer is on its fourth lap, expecting phase 0.
        assert!(!c.phase());
    }

    #[test]
    fn cq_status_word_is_at_offset_14() {
        let mem = Mem::new(2, Cqe::default());
        let head = AtomicU32::new(0);
        let mut p = CqProducer::new(mem.slots(), &head).unwrap();
        p.push(Cqe::new(9, Status::INVALID_FIELD)).unwrap();
        // SAFETY: no other access is in progress.
        let raw = unsafe { mem.slots().read(0) };
        assert_eq!(
            u16::from_le(raw.status),
            (Status::INVALID_FIELD.raw() << 1) | 1
        );
        assert_eq!(raw.cid(), 9);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        Publish,
        Pop,
        Release,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Push),
            Just(Op::Publish),
            Just(Op::Pop),
            Just(Op::Release)
        ]
    }

    proptest! {
        /// Any sequence of operations on any size keeps FIFO order, never loses or invents an
        /// entry, and reports Full exactly when size - 1 entries are outstanding.
        #[test]
        fn sq_preserves_fifo(size in 2usize..9, ops in proptest::collection::vec(op(), 0..200)) {
            let mem = Mem::new(size, 0u32);
            let (tail, head) = (AtomicU32::new(0), AtomicU32::new(0));
            let mut p = SqProducer::new(mem.slots(), &tail, &head).unwrap();
            let mut c = SqConsumer::new(mem.slots(), &tail, &head).unwrap();
            let mut pushed = 0u32;
            let mut model_pending: VecDeque<u32> = VecDeque::new(); // pushed, not published
            let mut model_visible: VecDeque<u32> = VecDeque::new(); // published, not popped
            let mut unreleased = 0usize; // popped, not released
            for o in ops {
                match o {
                    Op::Push => {
                        let outstanding = model_pending.len() + model_visible.len() + unreleased;
                        let r = p.push(pushed);
                        if outstanding == size - 1 {
                            prop_assert_eq!(r, Err(RingError::Full));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            model_pending.push_back(pushed);
                            pushed += 1;
                        }
                    }
                    Op::Publish => {
                        p.publish();
                        model_visible.extend(model_pending.drain(..));
                    }
                    Op::Pop => {
                        let got = c.pop().unwrap();
                        let want = model_visible.pop_front();
                        prop_assert_eq!(got, want);
                        if want.is_some() {
                            unreleased += 1;
                        }
                    }
                    Op::Release => {
                        c.release();
                        unreleased = 0;
                    }
                }
            }
        }

        /// The same for the completion queue, whose visibility is per entry (phase tag).
        #[test]
        fn cq_preserves_fifo(size in 2usize..9, ops in proptest::collection::vec(op(), 0..200)) {
            let mem = Mem::new(size, Cqe::default());
            let head = AtomicU32::new(0);
            let mut p = CqProducer::new(mem.slots(), &head).unwrap();
            let mut c = CqConsumer::new(mem.slots(), &head).unwrap();
            let mut pushed = 0u16;
            let mut visible: VecDeque<u16> = VecDeque::new();
            let mut unreleased = 0usize;
            for o in ops {
                match o {
                    Op::Push => {
                        let r = p.push(Cqe::new(pushed, Status::SUCCESS));
                        if visible.len() + unreleased == size - 1 {
                            prop_assert_eq!(r, Err(RingError::Full));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            visible.push_back(pushed);
                            pushed = pushed.wrapping_add(1);
                        }
                    }
                    Op::Publish => {}
                    Op::Pop => {
                        let got = c.pop().map(|e| e.cid());
                        let want = visible.pop_front();
                        prop_assert_eq!(got, want);
                        if want.is_some() {
                            unreleased += 1;
                        }
                    }
                    Op::Release => {
                        c.release();
                        unreleased = 0;
                    }
                }
            }
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::nvme::Status;
    use crate::sync::Arc;
    use loom::thread;

    /// Two threads hand three entries through a two-slot SQ (one usable entry), so every entry
    /// after the first reuses a slot: checks the tail Release/Acquire for the entries and the
    /// head Release/Acquire for slot reuse, across wrap-around.
    #[test]
    fn loom_sq_handoff_with_wrap() {
        loom::model(|| {
            let slots = Arc::new(LoomSlots::new(2, 0u32));
            let tail = Arc::new(AtomicU32::new(0));
            let head = Arc::new(AtomicU32::new(0));
            let mut p = SqProducer::new(slots.clone(), tail.clone(), head.clone()).unwrap();
            let mut c = SqConsumer::new(slots, tail, head).unwrap();

            let producer = thread::spawn(move || {
                for v in 1..=3u32 {
                    loop {
                        match p.push(v) {
                            Ok(()) => break,
                            Err(RingError::Full) => thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    p.publish();
                }
            });
            let mut got = Vec::new();
            while got.len() < 3 {
                match c.pop().unwrap() {
                    Some(v) => {
                        got.push(v);
                        c.release();
                    }
                    None => thread::yield_now(),
                }
            }
            producer.join().unwrap();
            assert_eq!(got, [1, 2, 3]);
        });
    }

    /// Three completions through a two-slot CQ: the second and third reuse slots with flipped
    /// phase tags; checks the status-word Release/Acquire and the CQ head hand-back.
    #[test]
    fn loom_cq_handoff_with_phase_flip() {
        loom::model(|| {
            let slots = Arc::new(LoomSlots::new(2, Cqe::default()));
            let head = Arc::new(AtomicU32::new(0));
            let mut p = CqProducer::new(slots.clone(), head.clone()).unwrap();
            let mut c = CqConsumer::new(slots, head).unwrap();

            let producer = thread::spawn(move || {
                for cid in 1..=3u16 {
                    let mut e = Cqe::new(cid, Status::SUCCESS);
                    e.set_dw0(u32::from(cid) * 100);
                    loop {
                        match p.push(e) {
                            Ok(()) => break,
                            Err(RingError::Full) => thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
            let mut got = Vec::new();
            while got.len() < 3 {
                match c.pop() {
                    Some(e) => {
                        assert_eq!(e.dw0(), u32::from(e.cid()) * 100, "body must match phase");
                        got.push(e.cid());
                        c.release();
                    }
                    None => thread::yield_now(),
                }
            }
            producer.join().unwrap();
            assert_eq!(got, [1, 2, 3]);
        });
    }

    /// A three-slot SQ with batched publishing: two entries per publish, one release per pop
    /// batch.
    #[test]
    fn loom_sq_batched_publish() {
        loom::model(|| {
            let slots = Arc::new(LoomSlots::new(3, 0u32));
            let tail = Arc::new(AtomicU32::new(0));
            let head = Arc::new(AtomicU32::new(0));
            let mut p = SqProducer::new(slots.clone(), tail.clone(), head.clone()).unwrap();
            let mut c = SqConsumer::new(slots, tail, head).unwrap();

            let producer = thread::spawn(move || {
                p.push(1).unwrap();
                p.push(2).unwrap();
                p.publish();
                while p.push(3).is_err() {
                    thread::yield_now();
                }
                p.publish();
            });
            let mut got = Vec::new();
            while got.len() < 3 {
                let mut any = false;
                while let Some(v) = c.pop().unwrap() {
                    got.push(v);
                    any = true;
                }
                if any {
                    c.release();
                } else {
                    thread::yield_now();
                }
            }
            producer.join().unwrap();
            assert_eq!(got, [1, 2, 3]);
        });
    }
}
