//! An in-process NVMe queue pair between a front end ([`Submitter`]) and a poller
//! ([`Processor`]), built on the rings of [`crate::ring`] over memory the pair owns.
//!
//! ```text
//!  Submitter (front end)                         Processor (poller)
//!  submit_with: cid from free list, fill SQE
//!               and the cid's capsule area
//!  publish ──── SQ tail doorbell (Release) ────▶ pop (Acquire): SQE, capsule(cid)
//!                                                complete(cid): CQE body, then
//!  reap (Acquire) ◀── CQE status/phase word ──── status word (Release)
//!  release_completions ── CQ head (Release) ───▶ (CQ producer's Acquire when full)
//!  (SQ producer's Acquire when full) ◀── SQ head (Release) ── publish / complete
//! ```
//!
//! # Sizes and why the rings never overflow
//! A pair of depth `d` has `d` command ids, and both rings have `d + 1` slots (a ring of `n`
//! slots holds `n - 1` entries). A cid is handed out only when it is free, and it becomes free
//! only after its completion's CQ slot has been given back to the processor (the submitter's
//! [`Submitter::release_completions`]), so at most `d` CQ slots are ever occupied. The processor
//! gives back consumed SQ slots before it posts a completion, so every completed command's SQ
//! slot is free before its cid can be reused, and at most `d` SQ slots are occupied.
//! [`SubmitError::Full`] therefore means exactly "`d` commands in flight".
//!
//! # Capsules and command ids
//! Each cid owns a capsule area of `capsule_bytes` (rounded up to a multiple of 16, 16-byte
//! aligned): in-capsule data, an SGL segment (subtype Offset) or Dataset Management ranges.
//! The area of a cid is written only by the submitter while the cid is free or being submitted,
//! and read only by the processor while the cid is in flight:
//! * submitter writes → processor reads: the writes precede the Release store of the SQ tail
//!   doorbell in [`Submitter::publish`]; the processor's Acquire load of it in
//!   [`Processor::pop`] comes before any read.
//! * processor reads → submitter's next writes: the slice [`Processor::capsule`] returns
//!   borrows the processor, so it is gone before [`Processor::complete`], whose Release store
//!   of the CQE status word is observed by the Acquire load in [`Submitter::reap`] before the
//!   cid is handed out again.
//!
//! Nothing is allocated per command: rings, capsules and cid lists are allocated once here.

use core::cell::UnsafeCell;
use core::ops::Deref;

use crate::nvme::{Cqe, Sqe, Status};
use crate::ring::{CqConsumer, CqProducer, RingError, SqConsumer, SqProducer};
use crate::sync::{Arc, AtomicU32};

/// Smallest queue pair depth.
pub const MIN_DEPTH: u16 = 2;
/// Largest queue pair depth.
pub const MAX_DEPTH: u16 = 4096;

/// Why [`Submitter::submit_with`] did not queue a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError<E> {
    /// All `depth` command ids are in flight: reap completions first.
    #[error("all command ids are in flight")]
    Full,
    /// The closure that fills the command failed; nothing was queued and the cid is free again.
    #[error("the command was rejected while it was being built")]
    Rejected(#[source] E),
}

/// Why [`Processor::complete`] did not post a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompleteError {
    /// The cid is out of range or was not popped (or was already completed): a processor bug.
    #[error("command id {0} is not in flight")]
    NotInFlight(u16),
    /// The completion ring refused the entry; cannot happen with the sizing above, reported
    /// rather than assumed.
    #[error("completion ring: {0}")]
    Ring(#[from] RingError),
}

/// A submitted command as the processor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// The submission queue entry; [`Sqe::cid`] is the command id.
    pub sqe: Sqe,
}

impl Command {
    /// The command id.
    pub fn cid(&self) -> u16 {
        self.sqe.cid()
    }
}

/// Keeps a doorbell on its own cache line pair (128 bytes: the line size of some ARM cores and
/// the adjacent-line prefetch unit of x86), so the two sides do not false-share.
#[repr(align(128))]
struct Padded<T>(T);

/// Ring slot memory owned by the pair. Outside loom: boxed cells accessed through
/// [`crate::ring::RawSlots`]. Under loom: [`crate::ring::LoomSlots`], so loom checks the slots.
#[cfg(not(loom))]
mod mem {
    use super::UnsafeCell;
    use crate::ring::RawSlots;

    pub(super) type Slots<T> = RawSlots<T>;

    pub(super) struct RingMem<T>(Box<[UnsafeCell<T>]>);

    impl<T: Copy> RingMem<T> {
        pub(super) fn new(len: usize, init: T) -> Self {
            RingMem((0..len).map(|_| UnsafeCell::new(init)).collect())
        }
        pub(super) fn slots(&self) -> Slots<T> {
            // The boxed cells are aligned for `T` (`Box<[UnsafeCell<T>]>` is laid out as `[T]`)
            // and live as long as the `Shared` that owns them, which every holder of the slots
            // also holds (through an `Arc`). No reference to the contents is ever made (all
            // access goes through `RawSlots`); `UnsafeCell` permits writes through this pointer.
            // SAFETY: valid, aligned, live for `len` entries as argued above; `Sqe` and `Cqe`
            // are valid for every bit pattern.
            unsafe { RawSlots::new(UnsafeCell::raw_get(self.0.as_ptr()), self.0.len()) }
        }
    }
}

#[cfg(loom)]
mod mem {
    use crate::ring::LoomSlots;
    use crate::sync::Arc;

    pub(super) type Slots<T> = Arc<LoomSlots<T>>;

    pub(super) struct RingMem<T>(Arc<LoomSlots<T>>);

    impl<T: Copy> RingMem<T> {
        pub(super) fn new(len: usize, init: T) -> Self {
            RingMem(Arc::new(LoomSlots::new(len, init)))
        }
        pub(super) fn slots(&self) -> Slots<T> {
            self.0.clone()
        }
    }
}

use mem::RingMem;

/// 16 bytes, 16-byte aligned: the unit of capsule memory.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Chunk([u8; 16]);

/// The capsule areas of all cids, one contiguous allocation.
struct Capsules {
    chunks: Box<[UnsafeCell<Chunk>]>,
    /// Bytes per cid (a multiple of 16).
    per_cid: usize,
    depth: usize,
    /// Loom cells standing for each capsule: touched on every access so loom reports an access
    /// that is not ordered after the other side's.
    #[cfg(loom)]
    track: Box<[loom::cell::UnsafeCell<()>]>,
}

impl Capsules {
    fn new(depth: usize, per_cid: usize) -> Self {
        let total = per_cid
            .checked_mul(depth)
            .expect("capsule area size overflows usize")
            / 16;
        Capsules {
            chunks: (0..total)
                .map(|_| UnsafeCell::new(Chunk([0; 16])))
                .collect(),
            per_cid,
            depth,
            #[cfg(loom)]
            track: (0..depth)
                .map(|_| loom::cell::UnsafeCell::new(()))
                .collect(),
        }
    }

    /// Start of `cid`'s area; `cid < depth`.
    fn start(&self, cid: usize) -> *mut u8 {
        debug_assert!(cid < self.depth);
        // `cid * per_cid / 16 <= chunks.len()`, so the offset stays within (or one past) the
        // allocation; `wrapping_add` keeps this function safe regardless.
        UnsafeCell::raw_get(self.chunks.as_ptr())
            .cast::<u8>()
            .wrapping_add(cid * self.per_cid)
    }

    /// The area of `cid`, for writing.
    ///
    /// # Safety
    /// `cid < depth`, and the caller is the submitter holding a free cid: nothing else reads or
    /// writes this area until the borrow ends (see the module documentation).
    #[allow(clippy::mut_from_ref)] // exclusivity is the caller's obligation, stated above
    unsafe fn bytes_mut(&self, cid: usize) -> &mut [u8] {
        #[cfg(loom)]
        self.track[cid].with_mut(|_| ());
        // SAFETY: `start(cid)` points at `per_cid` bytes inside the live allocation (cid <
        // depth), aligned for `u8`; writes through it are permitted by `UnsafeCell`; the caller
        // guarantees exclusive access for the borrow's duration.
        unsafe { core::slice::from_raw_parts_mut(self.start(cid), self.per_cid) }
    }

    /// The area of `cid`, for reading.
    ///
    /// # Safety
    /// `cid < depth`, and the cid is in flight: the submitter does not write the area until the
    /// processor completes the cid, which needs the borrow to have ended.
    unsafe fn bytes(&self, cid: usize) -> &[u8] {
        #[cfg(loom)]
        self.track[cid].with(|_| ());
        // SAFETY: as for `bytes_mut`, for shared access; no writer exists while the cid is in
        // flight.
        unsafe { core::slice::from_raw_parts(self.start(cid), self.per_cid) }
    }
}

/// State shared by both ends.
struct Shared {
    sq_tail: Padded<AtomicU32>,
    sq_head: Padded<AtomicU32>,
    cq_head: Padded<AtomicU32>,
    sq: RingMem<Sqe>,
    cq: RingMem<Cqe>,
    capsules: Capsules,
}

// SAFETY: the ring and capsule memory behind `UnsafeCell`s is accessed only under the protocol
// described in the module documentation (one side at a time, ordered by Release/Acquire on the
// doorbells and CQE status words); doorbells are atomics.
unsafe impl Sync for Shared {}
// SAFETY: as above; `Shared` owns plain memory with no thread affinity.
unsafe impl Send for Shared {}

#[derive(Clone, Copy)]
enum Which {
    SqTail,
    SqHead,
    CqHead,
}

/// A doorbell of the pair, keeping the shared state alive.
struct Doorbell {
    shared: Arc<Shared>,
    which: Which,
}

impl Deref for Doorbell {
    type Target = AtomicU32;
    fn deref(&self) -> &AtomicU32 {
        match self.which {
            Which::SqTail => &self.shared.sq_tail.0,
            Which::SqHead => &self.shared.sq_head.0,
            Which::CqHead => &self.shared.cq_head.0,
        }
    }
}

fn doorbell(shared: &Arc<Shared>, which: Which) -> Doorbell {
    Doorbell {
        shared: shared.clone(),
        which,
    }
}

/// Free command ids in FIFO order. The ids at the front (`usable` of them) may be handed out;
/// the ones behind them were reaped but their CQ slots are not yet given back.
struct CidQueue {
    ids: Box<[u16]>,
    head: usize,
    len: usize,
    usable: usize,
}

impl CidQueue {
    fn full(depth: u16) -> Self {
        let ids: Box<[u16]> = (0..depth).collect();
        let n = ids.len();
        CidQueue {
            ids,
            head: 0,
            len: n,
            usable: n,
        }
    }
    fn peek(&self) -> Option<u16> {
        if self.usable == 0 {
            return None;
        }
        self.ids.get(self.head).copied()
    }
    fn take(&mut self) {
        self.head = (self.head + 1) % self.ids.len();
        self.len -= 1;
        self.usable -= 1;
    }
    fn push_pending(&mut self, cid: u16) {
        let cap = self.ids.len();
        if self.len < cap {
            self.ids[(self.head + self.len) % cap] = cid;
            self.len += 1;
        }
    }
    fn pending(&self) -> usize {
        self.len - self.usable
    }
    fn make_usable(&mut self) {
        self.usable = self.len;
    }
}

/// The front-end side of a queue pair: submits commands and reaps their completions.
pub struct Submitter {
    shared: Arc<Shared>,
    sq: SqProducer<Sqe, mem::Slots<Sqe>, Doorbell>,
    cq: CqConsumer<mem::Slots<Cqe>, Doorbell>,
    depth: u16,
    free: CidQueue,
    /// Per cid: submitted and not yet reaped.
    in_flight: Box<[bool]>,
}

/// The poller side of a queue pair: takes commands and posts their completions.
pub struct Processor {
    shared: Arc<Shared>,
    sq: SqConsumer<Sqe, mem::Slots<Sqe>, Doorbell>,
    cq: CqProducer<mem::Slots<Cqe>, Doorbell>,
    depth: u16,
    /// Per cid: popped and not yet completed.
    in_flight: Box<[bool]>,
}

const _: () = {
    const fn send<T: Send>() {}
    send::<Submitter>();
    send::<Processor>();
};

/// Creates a queue pair of `depth` commands, each with a capsule area of `capsule_bytes`
/// (rounded up to a multiple of 16; for example `16 * 130` for an SGL segment of 130
/// descriptors, or `16 * 256` for the largest Dataset Management range list).
///
/// # Panics
/// If `depth` is outside `2..=4096` or the capsule areas do not fit in memory's address range;
/// both are configuration errors caught at setup, never input from a guest or peer.
pub fn queue_pair(depth: u16, capsule_bytes: usize) -> (Submitter, Processor) {
    assert!(
        (MIN_DEPTH..=MAX_DEPTH).contains(&depth),
        "queue pair depth {depth} is outside 2..=4096"
    );
    let per_cid = capsule_bytes
        .checked_next_multiple_of(16)
        .expect("capsule size overflows usize");
    let slots = usize::from(depth) + 1;
    let shared = Arc::new(Shared {
        sq_tail: Padded(AtomicU32::new(0)),
        sq_head: Padded(AtomicU32::new(0)),
        cq_head: Padded(AtomicU32::new(0)),
        sq: RingMem::new(slots, Sqe::default()),
        cq: RingMem::new(slots, Cqe::default()),
        capsules: Capsules::new(usize::from(depth), per_cid),
    });
    let sq_p = SqProducer::new(
        shared.sq.slots(),
        doorbell(&shared, Which::SqTail),
        doorbell(&shared, Which::SqHead),
    );
    let sq_c = SqConsumer::new(
        shared.sq.slots(),
        doorbell(&shared, Which::SqTail),
        doorbell(&shared, Which::SqHead),
    );
    let cq_p = CqProducer::new(shared.cq.slots(), doorbell(&shared, Which::CqHead));
    let cq_c = CqConsumer::new(shared.cq.slots(), doorbell(&shared, Which::CqHead));
    let (Ok(sq_p), Ok(sq_c), Ok(cq_p), Ok(cq_c)) = (sq_p, sq_c, cq_p, cq_c) else {
        unreachable!("ring sizes 3..=4097 are valid");
    };
    let submitter = Submitter {
        shared: shared.clone(),
        sq: sq_p,
        cq: cq_c,
        depth,
        free: CidQueue::full(depth),
        in_flight: vec![false; usize::from(depth)].into_boxed_slice(),
    };
    let processor = Processor {
        shared,
        sq: sq_c,
        cq: cq_p,
        depth,
        in_flight: vec![false; usize::from(depth)].into_boxed_slice(),
    };
    (submitter, processor)
}

impl Submitter {
    /// The number of command ids (the most commands in flight at once).
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Commands submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        usize::from(self.depth) - self.free.len
    }

    /// Allocates a free command id, lets `f` fill the SQE (cid already set; a change of it is
    /// undone) and the command's capsule area (`capsule_bytes` rounded up to 16; it holds what the
    /// cid's previous command left there, so `f` writes what the SQE refers to), and
    /// queues the command; it becomes visible to the processor at the next
    /// [`Submitter::publish`]. If `f` fails, the cid stays free and nothing is queued.
    ///
    /// When no cid is free but some were reaped since the last
    /// [`Submitter::release_completions`], this releases them first (one Release store).
    pub fn submit_with<E>(
        &mut self,
        f: impl FnOnce(u16, &mut Sqe, &mut [u8]) -> Result<(), E>,
    ) -> Result<u16, SubmitError<E>> {
        if self.free.usable == 0 && self.free.pending() > 0 {
            self.release_completions();
        }
        let cid = self.free.peek().ok_or(SubmitError::Full)?;
        let mut sqe = Sqe::default();
        sqe.set_cid(cid);
        {
            // The cid is free: the processor reads a capsule only while its cid is in flight,
            // and its last read of this one happened before the completion we Acquired in
            // `reap`; the borrow ends in this block, before the command is queued.
            // SAFETY: every id in the free queue is < depth, and nobody else uses its capsule.
            let capsule = unsafe { self.shared.capsules.bytes_mut(usize::from(cid)) };
            f(cid, &mut sqe, capsule).map_err(SubmitError::Rejected)?;
        }
        sqe.set_cid(cid);
        // Cannot fail: at most `depth` SQ slots are occupied (module docs); if it did, the cid
        // stays free.
        self.sq.push(sqe).map_err(|_| SubmitError::Full)?;
        self.free.take();
        if let Some(f) = self.in_flight.get_mut(usize::from(cid)) {
            *f = true;
        }
        Ok(cid)
    }

    /// Makes queued commands visible to the processor: one Release store of the SQ tail
    /// doorbell per batch (none when nothing was queued).
    pub fn publish(&mut self) {
        self.sq.publish();
    }

    /// Takes the next completion, if any (Acquire load of its CQE status word). Its cid is no
    /// longer in flight; it is handed out again once its CQ slot has been given back by
    /// [`Submitter::release_completions`] (or by `submit_with` when it runs out of cids).
    pub fn reap(&mut self) -> Option<Cqe> {
        let cqe = self.cq.pop()?;
        let cid = cqe.cid();
        if let Some(f) = self.in_flight.get_mut(usize::from(cid)) {
            if *f {
                *f = false;
                self.free.push_pending(cid);
            }
        }
        Some(cqe)
    }

    /// Gives consumed CQ slots back to the processor (one Release store of the CQ head doorbell,
    /// none when nothing was reaped) and makes the reaped cids reusable.
    pub fn release_completions(&mut self) {
        self.cq.release();
        self.free.make_usable();
    }
}

impl core::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Submitter")
            .field("depth", &self.depth)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Processor {
    /// The number of command ids.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// The next submitted command, if any (Acquire load of the SQ tail doorbell when the
    /// processor has caught up with the last value it read). Its cid is in flight until
    /// [`Processor::complete`].
    pub fn pop(&mut self) -> Option<Command> {
        // The tail doorbell is written only by our own submitter, so `Err` (a value out of
        // range) cannot happen; it would read as "nothing to do".
        let sqe = self.sq.pop().ok().flatten()?;
        // The submitter only sends free, in-range cids, so the flag is clear; should it not be,
        // the command is still returned and its earlier instance keeps the cid.
        if let Some(f) = self.in_flight.get_mut(usize::from(sqe.cid())) {
            *f = true;
        }
        Some(Command { sqe })
    }

    /// The capsule area of an in-flight command; `None` if `cid` is out of range or not in
    /// flight.
    pub fn capsule(&self, cid: u16) -> Option<&[u8]> {
        let i = usize::from(cid);
        if !*self.in_flight.get(i)? {
            return None;
        }
        // SAFETY: `i < depth` (the flag exists) and the cid is in flight, so the submitter does
        // not write the area; the borrow of `self` ends before `complete` can run.
        Some(unsafe { self.shared.capsules.bytes(i) })
    }

    /// Posts a completion for an in-flight cid with `status` and command-specific `dw0`, making
    /// it visible at once (Release store of the CQE status word). Consumed SQ slots are given
    /// back first, so the submitter can always reuse the cid.
    pub fn complete(&mut self, cid: u16, status: Status, dw0: u32) -> Result<(), CompleteError> {
        let i = usize::from(cid);
        if self.in_flight.get(i) != Some(&true) {
            return Err(CompleteError::NotInFlight(cid));
        }
        self.sq.release();
        let mut cqe = Cqe::new(cid, status);
        cqe.set_dw0(dw0);
        // SQ head fits in 16 bits: the ring has at most 4097 slots.
        cqe.set_sq(self.sq.head() as u16, 0);
        self.cq.push(cqe)?;
        self.in_flight[i] = false;
        Ok(())
    }

    /// Gives consumed SQ slots back to the submitter (one Release store of the SQ head doorbell
    /// per batch, none when nothing was popped). Completions need no publishing: each one is
    /// visible when [`Processor::complete`] returns.
    pub fn publish(&mut self) {
        self.sq.release();
    }
}

impl core::fmt::Debug for Processor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let n = self.in_flight.iter().filter(|&&b| b).count();
        f.debug_struct("Processor")
            .field("depth", &self.depth)
            .field("in_flight", &n)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::nvme::io;

    fn fill(n: u32) -> impl FnOnce(u16, &mut Sqe, &mut [u8]) -> Result<(), ()> {
        move |_, sqe, cap| {
            *sqe = Sqe::new(io::READ, 0xffff); // tries to change the cid: undone
            sqe.set_cdw(10, n);
            cap.fill(n as u8);
            Ok(())
        }
    }

    #[test]
    fn round_trip_with_capsules() {
        let (mut s, mut p) = queue_pair(4, 20);
        assert_eq!(s.depth(), 4);
        let cid = s.submit_with(fill(7)).unwrap();
        assert_eq!(s.in_flight(), 1);
        assert!(p.pop().is_none(), "not visible before publish");
        s.publish();
        let cmd = p.pop().unwrap();
        assert_eq!(cmd.cid(), cid);
        assert_eq!(cmd.sqe.opcode(), io::READ);
        assert_eq!(cmd.sqe.cdw(10), 7);
        let cap = p.capsule(cid).unwrap();
        assert_eq!(cap.len(), 32, "20 rounded up to 16");
        assert!(cap.iter().all(|&b| b == 7));
        assert_eq!(cap.as_ptr() as usize % 16, 0);

        p.complete(cid, Status::SUCCESS, 99).unwrap();
        assert_eq!(p.capsule(cid), None, "no longer in flight");
        let cqe = s.reap().unwrap();
        assert_eq!(
            (cqe.cid(), cqe.dw0(), cqe.status()),
            (cid, 99, Status::SUCCESS)
        );
        assert_eq!(cqe.sq_head(), 1);
        assert_eq!(s.in_flight(), 0);
        assert!(s.reap().is_none());
    }

    #[test]
    fn full_at_depth_and_cids_come_back() {
        let (mut s, mut p) = queue_pair(3, 0);
        let cids: Vec<u16> = (0..3).map(|n| s.submit_with(fill(n)).unwrap()).collect();
        assert_eq!(cids, [0, 1, 2]);
        assert_eq!(s.submit_with(fill(9)), Err(SubmitError::Full));
        s.publish();
        for _ in 0..3 {
            let c = p.pop().unwrap();
            p.complete(c.cid(), Status::SUCCESS, 0).unwrap();
        }
        // Reaped cids are reused once their CQ slots are given back; submit_with does that
        // itself when it runs out.
        assert_eq!(s.reap().map(|c| c.cid()), Some(0));
        assert_eq!(s.in_flight(), 2);
        assert_eq!(s.submit_with(fill(3)), Ok(0));
        assert_eq!(s.submit_with(fill(4)), Err(SubmitError::Full));
    }

    #[test]
    fn rejected_fill_keeps_the_cid_free() {
        let (mut s, _p) = queue_pair(2, 16);
        let r = s.submit_with(|_, _, cap| {
            cap[0] = 1;
            Err::<(), _>(Status::INVALID_FIELD)
        });
        assert_eq!(r, Err(SubmitError::Rejected(Status::INVALID_FIELD)));
        assert_eq!(s.in_flight(), 0);
        // The same cid is offered again.
        let cid = s
            .submit_with(|cid, _, cap| {
                assert_eq!(cap.len(), 16);
                assert_eq!(cid, 0);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(cid, 0);
    }

    #[test]
    fn processor_rejects_bad_cids() {
        let (mut s, mut p) = queue_pair(2, 16);
        assert_eq!(
            p.complete(0, Status::SUCCESS, 0),
            Err(CompleteError::NotInFlight(0))
        );
        assert_eq!(
            p.complete(5000, Status::SUCCESS, 0),
            Err(CompleteError::NotInFlight(5000))
        );
        assert_eq!(p.capsule(5000), None);
        s.submit_with(fill(1)).unwrap();
        s.publish();
        let c = p.pop().unwrap();
        assert_eq!(p.capsule(1), None);
        p.complete(c.cid(), Status::INVALID_OPCODE, 0).unwrap();
        assert_eq!(
            p.complete(c.cid(), Status::SUCCESS, 0),
            Err(CompleteError::NotInFlight(c.cid()))
        );
        assert_eq!(s.reap().unwrap().status(), Status::INVALID_OPCODE);
    }

    #[test]
    fn many_laps_never_report_full_below_depth() {
        let depth = 5u16;
        let (mut s, mut p) = queue_pair(depth, 48);
        let mut next = 0u32;
        let mut done = 0u32;
        // Uneven batches on both sides, without explicit release_completions: the rings must
        // wrap many times and submit_with must only fail at `depth` in flight.
        for round in 0..500u32 {
            let want = (round % 4) as usize + 1;
            for _ in 0..want {
                match s.submit_with(fill(next)) {
                    Ok(_) => next += 1,
                    Err(SubmitError::Full) => assert_eq!(s.in_flight(), usize::from(depth)),
                    Err(SubmitError::Rejected(())) => unreachable!(),
                }
            }
            s.publish();
            let take = (round % 3) as usize + 1;
            for _ in 0..take {
                if let Some(c) = p.pop() {
                    let n = c.sqe.cdw(10);
                    assert!(p.capsule(c.cid()).unwrap().iter().all(|&b| b == n as u8));
                    p.complete(c.cid(), Status::SUCCESS, n).unwrap();
                }
            }
            if round % 5 == 0 {
                p.publish();
            }
            while let Some(c) = s.reap() {
                assert_eq!(c.dw0(), done, "completions in submission order here");
                done += 1;
            }
        }
        assert!(done > 900, "{done}");
    }

    #[test]
    fn threads_move_commands_both_ways() {
        let (mut s, mut p) = queue_pair(8, 64);
        const N: u32 = 20_000;
        let poller = std::thread::spawn(move || {
            let mut seen = 0;
            while seen < N {
                let mut any = false;
                while let Some(c) = p.pop() {
                    let n = c.sqe.cdw(10);
                    let cap = p.capsule(c.cid()).unwrap();
                    assert!(cap.iter().all(|&b| b == n as u8), "capsule of command {n}");
                    p.complete(c.cid(), Status::SUCCESS, n).unwrap();
                    seen += 1;
                    any = true;
                }
                p.publish();
                if !any {
                    std::thread::yield_now();
                }
            }
        });
        let (mut sent, mut got) = (0u32, 0u32);
        while got < N {
            while sent < N && s.submit_with(fill(sent)).is_ok() {
                sent += 1;
            }
            s.publish();
            while let Some(c) = s.reap() {
                assert_eq!(c.dw0(), got);
                got += 1;
            }
            s.release_completions();
            std::thread::yield_now();
        }
        poller.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "outside 2..=4096")]
    fn depth_is_checked() {
        let _ = queue_pair(1, 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Four commands through a depth-2 pair (3-slot rings) on two threads: both rings wrap, the
    /// CQ phase tag flips, cids are reused, capsules are written by the submitter and read by
    /// the processor under loom's race detection, and completions return in order with the
    /// processor's answer.
    #[test]
    fn loom_qpair_capsules_and_cid_reuse() {
        const N: u32 = 4;
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(|| {
            let (mut s, mut p) = queue_pair(2, 16);
            let poller = thread::spawn(move || {
                let mut done = 0;
                while done < N {
                    match p.pop() {
                        Some(c) => {
                            let n = c.sqe.cdw(10);
                            let cap = p.capsule(c.cid()).expect("in flight");
                            assert!(cap.iter().all(|&x| x == n as u8 + 1), "capsule of {n}");
                            p.complete(c.cid(), Status::SUCCESS, n + 100).unwrap();
                            done += 1;
                        }
                        None => {
                            p.publish();
                            thread::yield_now();
                        }
                    }
                }
            });
            let mut got = Vec::new();
            let mut cids = Vec::new();
            let mut n = 0u32;
            while got.len() < N as usize {
                if n < N {
                    let r = s.submit_with(|_, sqe, cap| {
                        sqe.set_cdw(10, n);
                        cap.fill(n as u8 + 1);
                        Ok::<(), ()>(())
                    });
                    if let Ok(cid) = r {
                        cids.push(cid);
                        n += 1;
                        s.publish();
                        continue;
                    }
                }
                match s.reap() {
                    Some(c) => got.push(c.dw0()),
                    None => thread::yield_now(),
                }
                s.release_completions();
            }
            poller.join().unwrap();
            assert_eq!(got, [100, 101, 102, 103]);
            assert_eq!(cids, [0, 1, 0, 1], "cids are reused");
        });
    }
}
