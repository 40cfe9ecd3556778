//! One virtqueue bound to one NVMe queue pair: the [`leap_runtime::Port`] the poller drives.
//!
//! `submit` pops descriptor chains, checks them (virtio 1.2, 2.7.4 and 5.2.6) and turns each into
//! an NVMe command whose SGL describes the guest's data buffers (no copy). `complete` writes the
//! status byte, adds used elements and notifies the guest once per round, when EVENT_IDX says so.
//! Every malformed request completes with IOERR or UNSUPP, is counted, and is logged rate-limited:
//! nothing a guest writes can panic the poller or touch memory outside the guest's.

use crate::chain::{self, ChainError};
use crate::config::{req_type, status, ID_BYTES};
use crate::device::{DiskShape, Shared};
use crate::inflight::QueueTracker;
use crate::region::MemoryTable;
use crate::stats::Malformed;
use leap_queues::nvme::{io, sgl_subtype, sgl_type, DsmRange, DSM_ATTR_DEALLOCATE};
use leap_queues::{SglDescriptor, Sqe, Status, SubmitError, Submitter};
use leap_runtime::{log_limited, AddressSpace, Port};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The most descriptors one request may have (header, data, status; indirect tables included).
pub const MAX_CHAIN: usize = 1024;

/// A virtqueue's call eventfd. The front end may replace it while the queue runs (QEMU does when
/// it masks and unmasks interrupts), so the queue takes the lock once per signal, never per
/// request.
#[derive(Default)]
pub(crate) struct Signal(Mutex<Option<File>>);

impl Signal {
    /// Replaces the descriptor (None: the front end polls the used ring).
    pub fn set(&self, fd: Option<File>) {
        if let Ok(mut s) = self.0.lock() {
            *s = fd;
        }
    }

    /// Signals the front end.
    pub fn signal(&self) -> std::io::Result<()> {
        let s = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        match s.as_ref() {
            // EAGAIN means the counter is saturated: the front end has a signal pending anyway.
            Some(mut f) => match f.write(&1u64.to_ne_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                r => r.map(|_| ()),
            },
            None => Ok(()),
        }
    }
}

/// What a completed command must do to its chain.
#[derive(Clone, Copy, Default)]
struct Pending {
    head: u16,
    status_addr: u64,
    used_len: u32,
}

/// A piece of one of the chain's two byte streams.
#[derive(Clone, Copy)]
struct Seg {
    addr: u64,
    len: u32,
}

/// Everything a started virtqueue needs, from the device.
pub(crate) struct RingSetup {
    pub index: u16,
    /// The split ring, ready, positioned where requests continue.
    pub queue: Queue,
    /// The kick eventfd (non-blocking): the poller sleeps on it.
    pub kick: File,
    pub call: Arc<Signal>,
    pub shared: Arc<Shared>,
    /// Queue pair depth.
    pub depth: u16,
    /// Inflight tracking, when the front end gave us a region.
    pub tracker: Option<QueueTracker>,
    /// Heads a previous back end left in flight, oldest first: taken before any new request.
    pub resubmit: Vec<u16>,
    /// Where the queue leaves its next avail index when it is dropped.
    pub stopped_at: Arc<AtomicU32>,
}

/// One virtqueue of a vhost-user-blk device, owned by the poller that serves it.
pub struct BlkQueue {
    index: u16,
    queue: Queue,
    kick: File,
    call: Arc<Signal>,
    shared: Arc<Shared>,
    /// Snapshot of the guest memory, refreshed when its generation changes.
    memory: MemoryTable,
    memory_gen: u64,
    tracker: Option<QueueTracker>,
    resubmit: VecDeque<u16>,
    stopped_at: Arc<AtomicU32>,
    pending: Vec<Pending>,
    /// Heads taken from the avail ring this round (no allocation: sized to the depth).
    heads: Vec<u16>,
    /// Chains finished without reaching the queue pair (errors, GET_ID): (head, used length).
    immediate: Vec<(u16, u32)>,
    /// Used entries were added (by `submit`) that the guest has not been told about; `complete`,
    /// which the poller calls later in the same round, signals once for both.
    unsignalled: bool,
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    armed: bool,
    /// The ring broke the ring protocol: no more requests are taken from it, and its kick is not
    /// watched, until the front end restarts it.
    broken: bool,
}

impl BlkQueue {
    pub(crate) fn new(s: RingSetup) -> Self {
        let (memory, memory_gen) = s.shared.memory();
        let depth = s.depth as usize;
        BlkQueue {
            index: s.index,
            queue: s.queue,
            kick: s.kick,
            call: s.call,
            shared: s.shared,
            memory,
            memory_gen,
            tracker: s.tracker,
            resubmit: s.resubmit.into(),
            stopped_at: s.stopped_at,
            pending: vec![Pending::default(); depth],
            heads: Vec::with_capacity(depth),
            immediate: Vec::with_capacity(depth),
            unsignalled: false,
            readable: Vec::with_capacity(MAX_CHAIN),
            writable: Vec::with_capacity(MAX_CHAIN),
            armed: false,
            broken: false,
        }
    }

    fn refresh_memory(&mut self) {
        if self.shared.memory_gen.load(Ordering::Acquire) != self.memory_gen {
            (self.memory, self.memory_gen) = self.shared.memory();
        }
    }

    /// The ring cannot be served any more: counted and logged once, never polled again.
    fn break_ring(&mut self, why: &dyn std::fmt::Display) {
        self.broken = true;
        self.shared.stats.count(Malformed::Ring);
        log_limited!(
            log::Level::Warn,
            "queue {}: {why}; the queue stops until the front end restarts it",
            self.index
        );
    }

    /// Publishes one used element, with the inflight bookkeeping around it.
    fn put_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        put_used(
            &mut self.queue,
            &mut self.tracker,
            self.index,
            mem,
            head,
            len,
        );
    }

    /// Walks and checks the chain at `head` and turns it into a command on `sq` (or finishes it
    /// here). False if the ring itself is broken.
    fn take(&mut self, mem: &GuestMemoryMmap, head: u16, sq: &mut Submitter) -> bool {
        self.readable.clear();
        self.writable.clear();
        let (readable, writable) = (&mut self.readable, &mut self.writable);
        let mut bad = None;
        let walked = chain::walk(
            mem,
            GuestAddress(self.queue.desc_table()),
            self.queue.size(),
            head,
            |d| {
                if readable.len() + writable.len() == MAX_CHAIN {
                    bad = Some(Reject(status::IOERR, Malformed::ChainTooLong));
                    return false;
                }
                let seg = Seg {
                    addr: d.addr().0,
                    len: d.len(),
                };
                if d.is_write_only() {
                    writable.push(seg);
                } else if !writable.is_empty() {
                    // 2.7.4.2: device-readable descriptors must precede writable ones.
                    bad = Some(Reject(status::IOERR, Malformed::Layout));
                    return false;
                } else {
                    readable.push(seg);
                }
                true
            },
        );
        let res = match (walked, bad) {
            // A head beyond the ring cannot even be returned: the ring is broken.
            (Err(ChainError::Head), _) => {
                self.break_ring(&format_args!("avail ring names descriptor {head}"));
                return false;
            }
            (_, Some(r)) => Err((r, false)),
            // A loop, a next index out of range, a bad indirect table, unmapped descriptors.
            (Err(_), None) => Err((Reject(status::IOERR, Malformed::BrokenChain), false)),
            (Ok(()), None) => self.build(mem, head, sq).map_err(|r| (r, true)),
        };
        match res {
            Ok(None) => {}
            Ok(Some(used)) => self.immediate.push((head, used)),
            Err((Reject(st, why), parsed)) => {
                self.shared.stats.count(why);
                log_limited!(
                    log::Level::Warn,
                    "queue {}: request {head} refused: {why:?}",
                    self.index
                );
                // A chain that parsed gets its status byte; one that did not (loop, bad layout)
                // has no trustworthy status location, so nothing is written. Either way it is
                // returned, so the guest never waits forever.
                let used = match self.status_byte() {
                    Some(a) if parsed && mem.write_obj(st, GuestAddress(a)).is_ok() => 1,
                    _ => 0,
                };
                self.immediate.push((head, used));
            }
        }
        true
    }
}

/// Publishes one used element of `queue`, with the inflight bookkeeping around it. A free
/// function so callers can lend the queue and guest memory from one struct without an Arc clone.
fn put_used(
    queue: &mut Queue,
    tracker: &mut Option<QueueTracker>,
    index: u16,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) {
    if let Some(t) = tracker.as_mut() {
        t.before_used(head);
    }
    if let Err(e) = queue.add_used(mem, head, len) {
        log_limited!(log::Level::Warn, "queue {index}: add_used: {e}");
        return;
    }
    if let Some(t) = tracker.as_mut() {
        t.after_used(head, queue.next_used());
    }
}

/// A malformed or unsupported request: its virtio status and the counter it bumps.
#[derive(Debug, Clone, Copy)]
struct Reject(u8, Malformed);

impl Port for BlkQueue {
    fn submit(&mut self, sq: &mut Submitter) -> usize {
        if self.broken {
            return 0;
        }
        self.refresh_memory();
        // Our own handle (an Arc clone) so nothing below borrows `self`.
        let mem = self.memory.mem.clone();
        let room = (sq.depth() as usize).saturating_sub(sq.in_flight());
        // Requests a previous back end left in flight come first, oldest first.
        self.heads.clear();
        while self.heads.len() < room {
            match self.resubmit.pop_front() {
                Some(h) => self.heads.push(h),
                None => break,
            }
        }
        let resubmitted = self.heads.len();
        if self.heads.len() < room && self.resubmit.is_empty() {
            let mut iter = match self.queue.iter(&*mem) {
                Ok(it) => it,
                Err(e) => {
                    self.break_ring(&format_args!("unusable avail ring ({e})"));
                    return 0;
                }
            };
            while self.heads.len() < room {
                match iter.next() {
                    Some(chain) => self.heads.push(chain.head_index()),
                    None => break,
                }
            }
        }
        let n = self.heads.len();
        for k in 0..n {
            let head = self.heads[k];
            if k >= resubmitted {
                if let Some(t) = self.tracker.as_mut() {
                    t.take(head);
                }
            }
            if !self.take(&mem, head, sq) {
                break;
            }
        }
        sq.publish();
        if !self.immediate.is_empty() {
            let done = std::mem::take(&mut self.immediate);
            for &(head, len) in &done {
                self.put_used(&mem, head, len);
            }
            self.immediate = done;
            self.immediate.clear();
            self.unsignalled = true;
        }
        n
    }

    fn complete(&mut self, sq: &mut Submitter) -> usize {
        // Nothing to reap and nothing to signal (most spin rounds): no work.
        let first = sq.reap();
        if first.is_none() && !self.unsignalled {
            return 0;
        }
        let mut n = 0;
        let mem = &*self.memory.mem;
        let mut next = first;
        while let Some(cqe) = next.take().or_else(|| sq.reap()) {
            let Some(p) = self.pending.get(cqe.cid() as usize).copied() else {
                continue;
            };
            let st = cqe.status();
            let byte = if st.is_success() {
                status::OK
            } else if st == Status::INVALID_OPCODE {
                status::UNSUPP
            } else {
                status::IOERR
            };
            let used = if mem.write_obj(byte, GuestAddress(p.status_addr)).is_ok() {
                p.used_len
            } else {
                0
            };
            put_used(
                &mut self.queue,
                &mut self.tracker,
                self.index,
                mem,
                p.head,
                used,
            );
            n += 1;
        }
        sq.release_completions();
        if n > 0 || self.unsignalled {
            self.unsignalled = false;
            // EVENT_IDX (or its absence) says whether the guest wants to hear about these.
            if self.queue.needs_notification(mem).unwrap_or(true) {
                if let Err(e) = self.call.signal() {
                    log_limited!(log::Level::Warn, "queue {}: signal: {e}", self.index);
                }
            }
        }
        n
    }

    fn arm(&mut self) -> bool {
        if self.broken {
            // Nothing to wait for: work on a broken ring is never taken.
            return false;
        }
        if !self.resubmit.is_empty() {
            return true;
        }
        self.armed = true;
        // Consume the kicks that woke us (or arrived while we polled): from here on a new kick
        // makes the eventfd readable again, and the re-check below catches work published
        // before notifications were re-enabled.
        let mut buf = [0u8; 8];
        let _ = (&self.kick).read(&mut buf);
        // enable_notification publishes avail_event (or clears NO_NOTIFY), fences, and re-reads
        // avail idx: true means the guest added work we must not sleep through.
        self.queue
            .enable_notification(&*self.memory.mem)
            .unwrap_or(false)
    }

    fn disarm(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let _ = self.queue.disable_notification(&*self.memory.mem);
    }

    fn address_space(&self) -> &Arc<AddressSpace> {
        &self.memory.aspace
    }

    fn wake_fd(&self) -> Option<RawFd> {
        // The kick eventfd, which only this poller reads; none for a broken ring, which costs
        // no CPU until the front end restarts it.
        (!self.broken).then(|| self.kick.as_raw_fd())
    }
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        self.stopped_at
            .store(self.queue.next_avail() as u32, Ordering::Release);
    }
}

impl BlkQueue {
    /// The last writable byte: where the status goes.
    fn status_byte(&self) -> Option<u64> {
        let s = self.writable.iter().rev().find(|s| s.len > 0)?;
        s.addr.checked_add(s.len as u64 - 1)
    }

    /// Turns the current chain into a command on `sq`. `Ok(None)`: queued; `Ok(Some(used))`:
    /// finished here (GET_ID) with `used` bytes written.
    fn build(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        sq: &mut Submitter,
    ) -> Result<Option<u32>, Reject> {
        let shape: &DiskShape = &self.shared.shape;
        // Header: the first 16 readable bytes (any layout: virtio 1.2, 2.7.4.3 / 5.2.6.2).
        let mut hdr = [0u8; 16];
        read_stream(mem, &self.readable, 0, &mut hdr).map_err(|e| Reject(status::IOERR, e))?;
        let rtype = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        // Status: the last writable byte; it must exist.
        let status_addr = self
            .status_byte()
            .ok_or(Reject(status::IOERR, Malformed::NoStatus))?;
        let out_len: u64 = self.readable.iter().map(|s| s.len as u64).sum::<u64>() - 16;
        let in_len: u64 = self.writable.iter().map(|s| s.len as u64).sum::<u64>() - 1;
        let block = shape.block_size as u64;
        match rtype {
            req_type::IN | req_type::OUT => {
                let (len, write) = if rtype == req_type::IN {
                    (in_len, false)
                } else {
                    (out_len, true)
                };
                if rtype == req_type::IN && out_len != 0 || rtype == req_type::OUT && in_len != 0 {
                    return Err(Reject(status::IOERR, Malformed::Layout));
                }
                if write && shape.read_only {
                    return Err(Reject(status::IOERR, Malformed::ReadOnly));
                }
                if len == 0 || len % block != 0 || (sector << 9) % block != 0 {
                    return Err(Reject(status::IOERR, Malformed::Length));
                }
                let nlb = len / block;
                if nlb > 65536 {
                    return Err(Reject(status::IOERR, Malformed::Length));
                }
                let end = sector
                    .checked_add(len >> 9)
                    .ok_or(Reject(status::IOERR, Malformed::Range))?;
                if end > shape.sectors || sector >= 1 << 55 {
                    return Err(Reject(status::IOERR, Malformed::Range));
                }
                let slba = (sector << 9) / block;
                let fua = write && !self.shared.writeback.load(Ordering::Relaxed);
                let (segs, skip) = if write {
                    (&self.readable, 16u64)
                } else {
                    (&self.writable, 0)
                };
                let used = if write { 1 } else { len as u32 + 1 };
                queue_cmd(
                    &mut self.pending,
                    sq,
                    head,
                    status_addr,
                    used,
                    |cid, sqe, capsule| {
                        *sqe = Sqe::new(if write { io::WRITE } else { io::READ }, cid);
                        sqe.set_nsid(1);
                        sqe.set_slba(slba);
                        sqe.set_nlb(nlb as u32);
                        sqe.set_fua(fua);
                        data_sgl(sqe, capsule, segs, skip, len)
                    },
                )
            }
            req_type::FLUSH => queue_cmd(
                &mut self.pending,
                sq,
                head,
                status_addr,
                1,
                |cid, sqe, _| {
                    *sqe = Sqe::new(io::FLUSH, cid);
                    sqe.set_nsid(1);
                    Ok(())
                },
            ),
            req_type::GET_ID => {
                if in_len == 0 {
                    return Err(Reject(status::IOERR, Malformed::Length));
                }
                let mut id = [0u8; ID_BYTES];
                let s = shape.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let n = (in_len as usize).min(ID_BYTES);
                write_stream(mem, &self.writable, &id[..n])
                    .map_err(|e| Reject(status::IOERR, e))?;
                mem.write_obj(status::OK, GuestAddress(status_addr))
                    .map_err(|_| Reject(status::IOERR, Malformed::Unmapped))?;
                Ok(Some(n as u32 + 1))
            }
            req_type::DISCARD | req_type::WRITE_ZEROES => {
                let discard = rtype == req_type::DISCARD;
                if discard && !shape.discard || !discard && !shape.write_zeroes {
                    // Not offered: the back end cannot do it.
                    return Err(Reject(status::UNSUPP, Malformed::Unsupported));
                }
                if shape.read_only {
                    return Err(Reject(status::IOERR, Malformed::ReadOnly));
                }
                if out_len == 0 || out_len % 16 != 0 || in_len != 0 {
                    return Err(Reject(status::IOERR, Malformed::Length));
                }
                let nseg = (out_len / 16) as usize;
                let max = if discard { shape.max_discard_seg } else { 1 };
                if nseg > max as usize {
                    return Err(Reject(status::IOERR, Malformed::Length));
                }
                let mut ranges = [DsmRange::default(); 256];
                let mut unmap = false;
                for (k, r) in ranges.iter_mut().take(nseg).enumerate() {
                    let mut raw = [0u8; 16];
                    read_stream(mem, &self.readable, 16 + 16 * k as u64, &mut raw)
                        .map_err(|e| Reject(status::IOERR, e))?;
                    let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
                    let num = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")) as u64;
                    let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
                    // 5.2.6.2: discard must have flags 0; write zeroes may have UNMAP (bit 0).
                    if flags & !1 != 0 || discard && flags != 0 {
                        return Err(Reject(status::UNSUPP, Malformed::Flags));
                    }
                    unmap |= flags & 1 != 0;
                    let end = sector
                        .checked_add(num)
                        .ok_or(Reject(status::IOERR, Malformed::Range))?;
                    if end > shape.sectors {
                        return Err(Reject(status::IOERR, Malformed::Range));
                    }
                    if (sector << 9) % block != 0 || (num << 9) % block != 0 {
                        return Err(Reject(status::IOERR, Malformed::Length));
                    }
                    let nlb = (num << 9) / block;
                    let lim = if discard { u32::MAX as u64 } else { 65536 };
                    if nlb > lim {
                        return Err(Reject(status::IOERR, Malformed::Length));
                    }
                    *r = DsmRange::new((sector << 9) / block, nlb as u32);
                }
                if discard {
                    queue_cmd(
                        &mut self.pending,
                        sq,
                        head,
                        status_addr,
                        1,
                        |cid, sqe, capsule| {
                            *sqe = Sqe::new(io::DATASET_MANAGEMENT, cid);
                            sqe.set_nsid(1);
                            sqe.set_cdw(10, nseg.saturating_sub(1) as u32);
                            sqe.set_cdw(11, DSM_ATTR_DEALLOCATE);
                            let bytes = nseg * 16;
                            let dst = capsule.get_mut(..bytes).ok_or(Status::INVALID_SGL_COUNT)?;
                            for (k, r) in ranges[..nseg].iter().enumerate() {
                                dst[k * 16..k * 16 + 4].copy_from_slice(&r.cattr.to_ne_bytes());
                                dst[k * 16 + 4..k * 16 + 8].copy_from_slice(&r.nlb.to_ne_bytes());
                                dst[k * 16 + 8..k * 16 + 16].copy_from_slice(&r.slba.to_ne_bytes());
                            }
                            sqe.set_sgl1(SglDescriptor::new(
                                sgl_type::DATA_BLOCK,
                                sgl_subtype::OFFSET,
                                0,
                                bytes as u32,
                            ));
                            Ok(())
                        },
                    )
                } else {
                    let r = ranges[0];
                    if nseg == 0 || r.nlb() == 0 {
                        // Nothing to zero: complete at once.
                        mem.write_obj(status::OK, GuestAddress(status_addr))
                            .map_err(|_| Reject(status::IOERR, Malformed::Unmapped))?;
                        return Ok(Some(1));
                    }
                    queue_cmd(
                        &mut self.pending,
                        sq,
                        head,
                        status_addr,
                        1,
                        |cid, sqe, _| {
                            *sqe = Sqe::new(io::WRITE_ZEROES, cid);
                            sqe.set_nsid(1);
                            sqe.set_slba(r.slba());
                            sqe.set_nlb(r.nlb());
                            sqe.set_deac(unmap);
                            Ok(())
                        },
                    )
                }
            }
            _ => Err(Reject(status::UNSUPP, Malformed::Unsupported)),
        }
    }
}

/// Queues a command built by `fill`, remembering how to complete its chain.
fn queue_cmd(
    pending: &mut [Pending],
    sq: &mut Submitter,
    head: u16,
    status_addr: u64,
    used_len: u32,
    fill: impl FnOnce(u16, &mut Sqe, &mut [u8]) -> Result<(), Status>,
) -> Result<Option<u32>, Reject> {
    match sq.submit_with(fill) {
        Ok(cid) => {
            if let Some(p) = pending.get_mut(cid as usize) {
                *p = Pending {
                    head,
                    status_addr,
                    used_len,
                };
            }
            Ok(None)
        }
        Err(SubmitError::Rejected(_)) => Err(Reject(status::IOERR, Malformed::TooManySegments)),
        // The caller checks for room before popping, so this means the pair is broken.
        Err(SubmitError::Full) => Err(Reject(status::IOERR, Malformed::Ring)),
    }
}

/// Describes `len` bytes of `segs`, after skipping `skip` bytes, as the command's SGL: one Data Block descriptor inline, or a Last Segment in the
/// capsule holding one descriptor per piece.
fn data_sgl(
    sqe: &mut Sqe,
    capsule: &mut [u8],
    segs: &[Seg],
    skip: u64,
    len: u64,
) -> Result<(), Status> {
    let mut skip = skip;
    let mut left = len;
    let mut n = 0usize;
    let mut first = SglDescriptor::default();
    for s in segs {
        if left == 0 {
            break;
        }
        let mut addr = s.addr;
        let mut l = s.len as u64;
        if skip >= l {
            skip -= l;
            continue;
        }
        addr = addr.checked_add(skip).ok_or(Status::DATA_TRANSFER_ERROR)?;
        l -= skip;
        skip = 0;
        let take = l.min(left);
        left -= take;
        let d = SglDescriptor::data(addr, take as u32);
        let slot = capsule
            .get_mut(n * 16..n * 16 + 16)
            .ok_or(Status::INVALID_SGL_COUNT)?;
        slot.copy_from_slice(&desc_bytes(&d));
        if n == 0 {
            first = d;
        }
        n += 1;
    }
    if left != 0 {
        return Err(Status::SGL_LENGTH_INVALID);
    }
    if n == 1 {
        sqe.set_sgl1(first);
    } else {
        sqe.set_sgl1(SglDescriptor::new(
            sgl_type::LAST_SEGMENT,
            sgl_subtype::OFFSET,
            0,
            (n * 16) as u32,
        ));
    }
    Ok(())
}

fn desc_bytes(d: &SglDescriptor) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr().to_le_bytes());
    b[8..12].copy_from_slice(&d.len().to_le_bytes());
    b[15] = d.id;
    b
}

/// Reads `out.len()` bytes at `offset` of the stream formed by `segs`.
fn read_stream(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    mut offset: u64,
    out: &mut [u8],
) -> Result<(), Malformed> {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let l = s.len as u64;
        if offset >= l {
            offset -= l;
            continue;
        }
        let take = ((l - offset) as usize).min(out.len() - done);
        let addr = s.addr.checked_add(offset).ok_or(Malformed::Unmapped)?;
        mem.read_slice(&mut out[done..done + take], GuestAddress(addr))
            .map_err(|_| Malformed::Unmapped)?;
        done += take;
        offset = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(Malformed::Header)
    }
}

/// Writes `data` at the start of the stream formed by `segs`.
fn write_stream(mem: &GuestMemoryMmap, segs: &[Seg], data: &[u8]) -> Result<(), Malformed> {
    let mut done = 0usize;
    for s in segs {
        if done == data.len() {
            break;
        }
        let take = (s.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + take], GuestAddress(s.addr))
            .map_err(|_| Malformed::Unmapped)?;
        done += take;
    }
    Ok(())
}
