//! One I/O queue pair on the controller, owned by one poller: commands go out on the SQ with
//! their data described by PRPs (or an SGL) pointing straight at the caller's memory, and come
//! back on the CQ, recognised by their phase tag.
//!
//! The queue's state sits behind a mutex the owner takes once per call; the watchdog and a reset
//! take it too (to find timed-out commands, to stop doorbells and re-create the queue), which is
//! why it is not simply owned. Uncontended, the lock costs a few tens of nanoseconds per call
//! next to a device round trip of microseconds.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use leap_queues::nvme::{io, psdt, sgl_subtype, sgl_type};
use leap_queues::prp::{build_prps, PrpBuildError};
use leap_queues::{SglDescriptor, Sqe, Status};
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{lock, Ctrl, Expired, Rings, GONE};
use super::dma::{DmaBuf, Table};
use super::LIST_BYTES;
use crate::backend::{BackendQueue, IoRequest, Submitted, MAX_IOVECS};

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    tag: u64,
    /// The command as sent (resubmitted after a reset).
    sqe: Sqe,
    /// The watchdog tick it was (re)submitted at: no clock read per command.
    started: u64,
    /// Bumped at every submission, so an Abort decided earlier can tell the slot was reused.
    seq: u64,
    aborted: bool,
}

/// The shared part of a queue.
pub(crate) struct QueueHw {
    pub qid: u16,
    pub rings: Rings,
    /// One PRP list (or SGL segment, or DSM range list) of [`LIST_BYTES`] per slot.
    lists: DmaBuf,
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: usize,
    /// A reset is under way: no doorbell is rung, nothing new is taken.
    pub frozen: bool,
    /// The controller failed or went away: everything completes with [`GONE`].
    pub failed: bool,
    /// Completions taken off the CQ by a reset (before it wiped the ring), for the next poll.
    reaped: Vec<(u64, Status)>,
}

impl QueueHw {
    /// Pushes every command still in flight again (after the queue was re-created); returns
    /// how many.
    pub fn resubmit(&mut self, now: u64) -> usize {
        let mut n = 0;
        for k in 0..self.slots.len() {
            if !self.slots[k].busy {
                continue;
            }
            self.slots[k].started = now;
            self.slots[k].aborted = false;
            // Cannot be full: the ring has one more entry than there are slots.
            if self.rings.sq.push(self.slots[k].sqe).is_ok() {
                n += 1;
            }
        }
        self.rings.sq.publish();
        n
    }

    /// Takes every completion already in the CQ (a reset is about to wipe it): their commands
    /// finished and must not run again; the next `poll` reports them.
    pub fn reap(&mut self) {
        while let Some(c) = self.rings.pop() {
            let k = c.cid() as usize;
            if let Some(s) = self.slots.get(k).filter(|s| s.busy) {
                self.reaped.push((s.tag, c.status()));
                self.slots[k].busy = false;
                self.free.push(k as u16);
                self.in_flight -= 1;
            }
        }
    }

    /// Commands older than `timeout` watchdog ticks (now is `now`): the first time (abort them:
    /// slot, sequence), or twice that after their Abort (reset the controller).
    pub fn expired(&mut self, now: u64, timeout: u64) -> Vec<(u16, u64, Expired)> {
        let mut out = Vec::new();
        if self.frozen || self.failed {
            return out;
        }
        for (k, s) in self.slots.iter_mut().enumerate() {
            if !s.busy {
                continue;
            }
            let age = now.saturating_sub(s.started);
            if !s.aborted && age > timeout {
                s.aborted = true;
                out.push((k as u16, s.seq, Expired::First));
            } else if s.aborted && age > 2 * timeout {
                out.push((k as u16, s.seq, Expired::AfterAbort));
            }
        }
        out
    }

    /// Whether slot `k` still holds the submission numbered `seq`.
    pub fn holds(&self, k: u16, seq: u64) -> bool {
        self.slots
            .get(k as usize)
            .is_some_and(|s| s.busy && s.seq == seq)
    }

    fn list(&self, k: u16) -> (*mut u8, u64) {
        let off = k as usize * LIST_BYTES;
        // SAFETY: `k < slots.len()` and the buffer holds LIST_BYTES per slot.
        (
            unsafe { self.lists.ptr().add(off) },
            self.lists.iova() + off as u64,
        )
    }
}

/// A poller's queue on a VFIO controller.
pub struct VfioQueue {
    ctrl: Arc<Ctrl>,
    hw: Arc<Mutex<QueueHw>>,
    qid: u16,
    nsid: u32,
    depth: usize,
    table: Arc<Table>,
    gen: u64,
    segs: Vec<(u64, u64)>,
    done: Vec<(u64, Status)>,
    wake: Option<EventFd>,
}

impl VfioQueue {
    /// Creates a queue of up to `entries` entries on `ctrl` for namespace `nsid`.
    pub(super) fn open(ctrl: Arc<Ctrl>, nsid: u32, entries: u32) -> Result<VfioQueue, String> {
        let size = entries.clamp(2, ctrl.mqes.min(1025));
        let (qid, rings) = ctrl.new_queue(size)?;
        let nslots = size as usize - 1;
        // Everything the queue needs first; then it is created on the controller and
        // registered in one step, so no reset or failure can miss it.
        let parts = ctrl
            .dma
            .alloc(nslots * LIST_BYTES)
            .map_err(|e| format!("PRP list pages: {e}"))
            .and_then(|lists| match ctrl.vector(qid) {
                Some(v) => ctrl.vectors[v as usize]
                    .try_clone()
                    .map(|fd| (lists, Some(fd)))
                    .map_err(|e| format!("eventfd: {e}")),
                None => Ok((lists, None)),
            });
        let (lists, wake) = match parts {
            Ok(p) => p,
            Err(e) => {
                ctrl.put_qid(qid);
                return Err(e);
            }
        };
        let hw = Arc::new(Mutex::new(QueueHw {
            qid,
            rings,
            lists,
            slots: vec![
                Slot {
                    busy: false,
                    tag: 0,
                    sqe: Sqe::default(),
                    started: 0,
                    seq: 0,
                    aborted: false,
                };
                nslots
            ],
            free: (0..nslots as u16).rev().collect(),
            in_flight: 0,
            frozen: false,
            failed: false,
            reaped: Vec::with_capacity(nslots),
        }));
        if let Err(e) = ctrl.attach(&hw) {
            ctrl.put_qid(qid);
            return Err(e);
        }
        let (table, gen) = ctrl.dma.table();
        Ok(VfioQueue {
            ctrl,
            hw,
            qid,
            nsid,
            depth: nslots,
            table,
            gen,
            segs: Vec::with_capacity(MAX_IOVECS),
            done: Vec::with_capacity(nslots),
            wake,
        })
    }

    /// Translates the request's iovecs to device addresses into `segs`; false if some byte is
    /// not DMA-mapped.
    fn translate(&mut self, req: &IoRequest<'_>) -> bool {
        let g = self.ctrl.dma.generation();
        if g != self.gen {
            (self.table, self.gen) = self.ctrl.dma.table();
        }
        self.segs.clear();
        for v in req.iov {
            if v.iov_len == 0 {
                continue;
            }
            match self.table.iova(v.iov_base as usize, v.iov_len) {
                Some(a) => self.segs.push((a, v.iov_len as u64)),
                None => return false,
            }
        }
        true
    }
}

fn refuse(counter: &std::sync::atomic::AtomicU64, status: Status) -> Submitted {
    counter.fetch_add(1, Ordering::Relaxed);
    Submitted::Done(status)
}

/// Writes an SGL for `segs` at `list` (device address `list_iova`, room for `max` descriptors)
/// and returns SGL1.
///
/// # Safety
/// `list` points at `max * 16` writable bytes the device does not use now.
unsafe fn write_sgl(
    segs: &[(u64, u64)],
    list: *mut u8,
    list_iova: u64,
    max: usize,
) -> Option<SglDescriptor> {
    if segs.len() > max || segs.iter().any(|s| s.1 > u32::MAX as u64) {
        return None;
    }
    if let [(a, l)] = segs {
        return Some(SglDescriptor::data(*a, *l as u32));
    }
    for (i, &(a, l)) in segs.iter().enumerate() {
        let raw = SglDescriptor::data(a, l as u32).to_raw();
        // SAFETY: `i < max`, so 16 bytes at `list + 16 i` are in the caller's range; the page is
        // 16-byte aligned.
        unsafe {
            let p = list.add(16 * i).cast::<u64>();
            p.write_volatile(raw[0].to_le());
            p.add(1).write_volatile(raw[1].to_le());
        }
    }
    Some(SglDescriptor::new(
        sgl_type::LAST_SEGMENT,
        sgl_subtype::ADDRESS,
        list_iova,
        (segs.len() * 16) as u32,
    ))
}

impl BackendQueue for VfioQueue {
    fn room(&self) -> usize {
        let hw = lock(&self.hw);
        if hw.frozen && !hw.failed {
            0
        } else {
            // A failed queue takes everything, to answer it at once with GONE.
            hw.free.len()
        }
    }

    fn depth(&self) -> usize {
        self.depth
    }

    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
        let Some(cmd) = req.cmd else {
            return Submitted::Done(Status::INTERNAL_ERROR);
        };
        let dsm = cmd.opcode() == io::DATASET_MANAGEMENT;
        if !dsm && !self.translate(req) {
            crate::log_limited!(
                log::Level::Warn,
                "{}: request {:#x} refused: its memory is not mapped for the device's DMA",
                self.ctrl.name,
                req.tag
            );
            return refuse(
                &self.ctrl.stats.unmapped,
                Status::DATA_TRANSFER_ERROR.with_dnr(),
            );
        }
        let stats = &self.ctrl.stats;
        let mut hw = lock(&self.hw);
        if hw.failed {
            return refuse(&stats.failed, GONE);
        }
        let Some(k) = hw.free.pop() else {
            return Submitted::Done(Status::INTERNAL_ERROR);
        };
        let (list, list_iova) = hw.list(k);
        let mut sqe = *cmd;
        sqe.set_cid(k);
        sqe.set_nsid(self.nsid);
        sqe.set_psdt(psdt::PRP);
        let r: Result<(), (Status, bool)> = if dsm {
            // The range list goes into the slot's page: the caller's copy may be in a capsule
            // the device cannot reach.
            let total: usize = req.iov.iter().map(|v| v.iov_len).sum();
            if total > LIST_BYTES {
                Err((Status::INVALID_FIELD, false))
            } else {
                let mut at = 0;
                for v in req.iov {
                    // SAFETY: the iovec is readable memory of the caller's (submit's contract)
                    // and `at + len <= total <= LIST_BYTES` bytes of the slot's list are free.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            v.iov_base.cast::<u8>(),
                            list.add(at),
                            v.iov_len,
                        )
                    };
                    at += v.iov_len;
                }
                sqe.set_prps(list_iova, 0);
                Ok(())
            }
        } else if self.segs.is_empty() {
            sqe.set_prps(0, 0);
            Ok(())
        } else {
            let put = |i: usize, e: u64| {
                // SAFETY: `i < LIST_BYTES / 8` (build_prps never exceeds the length given), inside the
                // slot's list page, which the device does not read until this command is sent.
                unsafe { list.cast::<u64>().add(i).write_volatile(e.to_le()) }
            };
            match build_prps(
                self.segs.iter().copied(),
                u64::from(self.ctrl.page),
                list_iova,
                LIST_BYTES / 8,
                put,
            ) {
                Ok((p1, p2)) => {
                    sqe.set_prps(p1, p2);
                    Ok(())
                }
                Err(PrpBuildError::Unaligned) if self.ctrl.sgls() => {
                    // SAFETY: the slot's list, LIST_BYTES bytes, unused by the device now.
                    match unsafe { write_sgl(&self.segs, list, list_iova, LIST_BYTES / 16) } {
                        Some(d) => {
                            sqe.set_psdt(psdt::SGL_MPTR_CONTIG);
                            sqe.set_sgl1(d);
                            Ok(())
                        }
                        None => Err((Status::INVALID_FIELD, true)),
                    }
                }
                Err(PrpBuildError::Unaligned) => Err((Status::INVALID_FIELD, true)),
                Err(PrpBuildError::TooLong(_)) => Err((Status::INVALID_FIELD, false)),
            }
        };
        if let Err((status, unaligned)) = r {
            hw.free.push(k);
            drop(hw);
            if unaligned {
                crate::log_limited!(
                    log::Level::Warn,
                    "{}: request {:#x} refused: its buffers are not page aligned as PRPs need, and {}",
                    self.ctrl.name,
                    req.tag,
                    if self.ctrl.sgls() {
                        "they need more SGL descriptors than fit"
                    } else {
                        "the controller has no SGLs"
                    }
                );
                return refuse(&stats.unaligned, status);
            }
            return Submitted::Done(status);
        }
        let seq = hw.slots[k as usize].seq.wrapping_add(1);
        hw.slots[k as usize] = Slot {
            busy: true,
            tag: req.tag,
            sqe,
            started: self.ctrl.tick(),
            seq,
            aborted: false,
        };
        hw.in_flight += 1;
        // While a reset is under way the command waits in its slot: the reset submits it with
        // the others once the queue exists again.
        if !hw.frozen && hw.rings.sq.push(sqe).is_err() {
            // Cannot happen (one more entry than slots); keep the books straight if it does.
            hw.slots[k as usize].busy = false;
            hw.in_flight -= 1;
            hw.free.push(k);
            return Submitted::Done(Status::INTERNAL_ERROR);
        }
        Submitted::Queued
    }

    fn flush(&mut self) {
        let mut hw = lock(&self.hw);
        if !hw.frozen && !hw.failed {
            hw.rings.sq.publish();
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.done.clear();
        {
            let mut hw = lock(&self.hw);
            self.done.append(&mut hw.reaped);
            if hw.failed {
                for k in 0..hw.slots.len() {
                    if hw.slots[k].busy {
                        hw.slots[k].busy = false;
                        self.done.push((hw.slots[k].tag, GONE));
                        hw.free.push(k as u16);
                    }
                }
                hw.in_flight = 0;
                self.ctrl
                    .stats
                    .failed
                    .fetch_add(self.done.len() as u64, Ordering::Relaxed);
            } else if !hw.frozen {
                let bad0 = hw.rings.bad_heads;
                while self.done.len() < 2 * self.depth {
                    let Some(c) = hw.rings.pop() else { break };
                    let k = c.cid() as usize;
                    match hw.slots.get(k) {
                        Some(s) if s.busy => {
                            let tag = s.tag;
                            hw.slots[k].busy = false;
                            hw.free.push(k as u16);
                            hw.in_flight -= 1;
                            self.done.push((tag, c.status()));
                        }
                        _ => {
                            self.ctrl
                                .stats
                                .bad_completions
                                .fetch_add(1, Ordering::Relaxed);
                            crate::log_limited!(
                                log::Level::Warn,
                                "{}: queue {}: completion for command {k}, which is not in flight; ignored",
                                self.ctrl.name,
                                self.qid
                            );
                        }
                    }
                }
                hw.rings.cq.release();
                let bad = hw.rings.bad_heads - bad0;
                if bad > 0 {
                    self.ctrl
                        .stats
                        .bad_completions
                        .fetch_add(bad, Ordering::Relaxed);
                }
            }
        }
        for &(tag, s) in &self.done {
            done(tag, s);
        }
        self.done.len()
    }

    fn in_flight(&self) -> usize {
        lock(&self.hw).in_flight
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.wake.as_ref().map(|w| w.as_raw_fd())
    }

    fn clear_wake(&mut self) -> bool {
        if let Some(w) = &self.wake {
            let _ = w.read();
        }
        let hw = lock(&self.hw);
        if !hw.reaped.is_empty() {
            return true;
        }
        if hw.failed || self.wake.is_none() {
            // Failed: finish what is in flight. No interrupts: poll while anything is.
            return hw.in_flight > 0;
        }
        if hw.frozen {
            // The reset signals the vector when it is done.
            return false;
        }
        hw.rings.cq.pending()
    }
}

impl Drop for VfioQueue {
    fn drop(&mut self) {
        // Closed first, so a reset does not bring it back; then off the controller; the memory
        // goes with `hw`, once the watchdog lets go of it (or stays with the controller if the
        // controller would not delete the queue: it might still DMA into it).
        lock(&self.hw).failed = true;
        self.ctrl.delete_queue(self.qid, &self.hw);
    }
}
