//! The NVMe controller behind VFIO: bring-up (CAP, CC, CSTS with CAP.TO timeouts), the admin
//! queue, Identify, Number of Queues, I/O queue creation, and the watchdog that aborts timed-out
//! commands, resets the controller (re-creating every queue and resubmitting what had not
//! completed) and fails everything cleanly when the device is gone.
//!
//! Locks, always taken in this order: `admin` (every admin command, enable/reset), then one
//! queue's `Mutex<QueueHw>` (its rings and slots). A queue's owner takes only its own lock, so
//! the data path never waits for the admin queue; the watchdog and reset take the queue locks
//! only while they touch that queue.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use leap_queues::nvme::{admin, cns, feature};
use leap_queues::ring::{CqConsumer, RawSlots, SqProducer};
use leap_queues::{Cqe, Sqe, Status};
use vmm_sys_util::eventfd::EventFd;

use super::dma::{pci_windows, reserved_regions, Dma, DmaBuf};
use super::pci::PciDevice;
use super::queue::QueueHw;
use super::regs::{csts, reg, Bar, DeviceCq, MmioDoorbell};
use crate::backend::ident::ControllerIdent;
use crate::backend::BackendError;

/// Controller states.
pub(super) const READY: u8 = 0;
pub(super) const RESETTING: u8 = 1;
pub(super) const FAILED: u8 = 2;

/// Admin queue entries.
const ADMIN_ENTRIES: u32 = 32;
/// How long an admin command may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(100);

type DevSq = SqProducer<Sqe, RawSlots<Sqe>, MmioDoorbell, Arc<AtomicU32>>;
type DevCq = CqConsumer<DeviceCq, MmioDoorbell>;

/// One SQ/CQ pair in DMA memory with its doorbells. The SQ head comes from completions (SQHD).
pub(super) struct Rings {
    pub sq_mem: DmaBuf,
    pub cq_mem: DmaBuf,
    pub size: u32,
    pub sq: DevSq,
    pub cq: DevCq,
    head: Arc<AtomicU32>,
    /// Completions whose SQ head was out of range (ignored).
    pub bad_heads: u64,
}

impl Rings {
    pub fn new(
        dma: &Arc<Dma>,
        bar: &Arc<Bar>,
        qid: u16,
        size: u32,
        dstrd: u32,
    ) -> Result<Self, String> {
        let sq_mem = dma
            .alloc(size as usize * std::mem::size_of::<Sqe>())
            .map_err(|e| format!("SQ memory: {e}"))?;
        let cq_mem = dma
            .alloc(size as usize * std::mem::size_of::<Cqe>())
            .map_err(|e| format!("CQ memory: {e}"))?;
        let (sq, cq, head) = Self::rings(&sq_mem, &cq_mem, bar, qid, size, dstrd)?;
        Ok(Rings {
            sq_mem,
            cq_mem,
            size,
            sq,
            cq,
            head,
            bad_heads: 0,
        })
    }

    fn rings(
        sq_mem: &DmaBuf,
        cq_mem: &DmaBuf,
        bar: &Arc<Bar>,
        qid: u16,
        size: u32,
        dstrd: u32,
    ) -> Result<(DevSq, DevCq, Arc<AtomicU32>), String> {
        let q = qid as usize;
        let (Some(tail_db), Some(cq_db)) = (
            MmioDoorbell::new(bar.clone(), 2 * q, dstrd),
            MmioDoorbell::new(bar.clone(), 2 * q + 1, dstrd),
        ) else {
            return Err(format!("queue {qid}'s doorbells lie outside BAR0"));
        };
        let head = Arc::new(AtomicU32::new(0));
        // SAFETY: the buffers are page aligned (so aligned for Sqe/Cqe), hold `size` entries
        // (allocated so), live as long as the Rings holding both, and are touched only through
        // RawSlots (volatile) here and by the device.
        let (sqs, cqs) = unsafe {
            (
                RawSlots::new(sq_mem.ptr().cast::<Sqe>(), size as usize),
                RawSlots::new(cq_mem.ptr().cast::<Cqe>(), size as usize),
            )
        };
        let sq = SqProducer::new(sqs, tail_db, head.clone()).map_err(|e| e.to_string())?;
        let cq = CqConsumer::new(DeviceCq(cqs), cq_db).map_err(|e| e.to_string())?;
        Ok((sq, cq, head))
    }

    /// Starts over at index 0 with zeroed memory, as after the queue is (re-)created.
    pub fn restart(&mut self, bar: &Arc<Bar>, qid: u16, dstrd: u32) -> Result<(), String> {
        self.sq_mem.zero();
        self.cq_mem.zero();
        let (sq, cq, head) = Self::rings(&self.sq_mem, &self.cq_mem, bar, qid, self.size, dstrd)?;
        (self.sq, self.cq, self.head) = (sq, cq, head);
        Ok(())
    }

    /// Takes the next completion, taking the SQ head it reports (when it is a valid index).
    pub fn pop(&mut self) -> Option<Cqe> {
        let c = self.cq.pop()?;
        let h = u32::from(c.sq_head());
        if h < self.size {
            // Release: pairs with the producer's Acquire when it looks for room.
            self.head.store(h, Ordering::Release);
        } else {
            self.bad_heads += 1;
        }
        Some(c)
    }
}

/// The admin queue and a page for Identify data.
pub(super) struct Admin {
    rings: Rings,
    cid: u16,
    data: DmaBuf,
}

impl Admin {
    /// Runs one command and waits for its completion; checks the controller while waiting.
    fn run(&mut self, bar: &Bar, mut sqe: Sqe, timeout: Duration) -> Result<Cqe, String> {
        self.cid = self.cid.wrapping_add(1);
        sqe.set_cid(self.cid);
        self.rings
            .sq
            .push(sqe)
            .map_err(|e| format!("admin queue: {e}"))?;
        self.rings.sq.publish();
        let until = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            while let Some(c) = self.rings.pop() {
                self.rings.cq.release();
                // Anything else is the late completion of an earlier command that timed out.
                if c.cid() == self.cid {
                    return Ok(c);
                }
            }
            let s = bar.read32(reg::CSTS);
            if s == u32::MAX {
                return Err("the controller does not respond (removed?)".into());
            }
            if s & csts::CFS != 0 {
                return Err("controller fatal status (CSTS.CFS)".into());
            }
            if Instant::now() > until {
                return Err(format!("admin command {:#04x} timed out", sqe.opcode()));
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Runs a command that must succeed.
    fn ok(&mut self, bar: &Bar, what: &str, sqe: Sqe) -> Result<Cqe, String> {
        let c = self
            .run(bar, sqe, ADMIN_TIMEOUT)
            .map_err(|e| format!("{what}: {e}"))?;
        if c.status().is_success() {
            Ok(c)
        } else {
            Err(format!("{what}: {}", c.status()))
        }
    }
}

/// Counters of the driver's events (exported as back-end metrics).
#[derive(Debug, Default)]
pub struct VfioStats {
    /// Commands past their timeout.
    pub timeouts: AtomicU64,
    /// Abort commands sent.
    pub aborts: AtomicU64,
    /// Controller resets.
    pub resets: AtomicU64,
    /// Commands resubmitted after a reset.
    pub resubmitted: AtomicU64,
    /// Requests refused because their memory is not DMA-mapped.
    pub unmapped: AtomicU64,
    /// Requests refused because their buffers fit neither PRPs nor (when the controller has
    /// none) SGLs.
    pub unaligned: AtomicU64,
    /// Completions with an unknown command identifier or an invalid SQ head.
    pub bad_completions: AtomicU64,
    /// Commands failed because the controller failed or went away.
    pub failed: AtomicU64,
}

/// What opening a controller needs besides its address.
#[derive(Clone, Debug)]
pub struct CtrlOptions {
    /// I/O queues to ask for.
    pub queues: u16,
    /// Command timeout before Abort (and twice that before a reset).
    pub io_timeout: Duration,
}

/// One NVMe controller.
pub struct Ctrl {
    pub(super) name: String,
    pub(super) bar: Arc<Bar>,
    pub(super) dma: Arc<Dma>,
    pci: Mutex<Option<PciDevice>>,
    admin: Mutex<Admin>,
    pub(super) dstrd: u32,
    /// Largest queue size (CAP.MQES + 1).
    pub(super) mqes: u32,
    /// Memory page size programmed in CC.MPS.
    pub(super) page: u32,
    /// The smallest page size the controller allows (CAP.MPSMIN): MDTS's unit.
    pub(super) page_min: u32,
    mps: u32,
    ready_timeout: Duration,
    pub(super) io_timeout: Duration,
    pub(super) state: AtomicU8,
    pub(super) queues: Mutex<Vec<Weak<Mutex<QueueHw>>>>,
    pub(super) free_qids: Mutex<Vec<u16>>,
    granted: u16,
    /// Eventfds of the interrupt vectors (duplicates: they outlive the device).
    pub(super) vectors: Vec<EventFd>,
    pub(super) stats: VfioStats,
    pub(super) stop: AtomicBool,
    /// Watchdog passes so far: the coarse clock command timeouts are measured with.
    ticks: AtomicU64,
    /// Queues the controller would not delete: their memory stays mapped until the controller
    /// is disabled (it might still DMA into it).
    leaked: Mutex<Vec<Arc<Mutex<QueueHw>>>>,
    /// Identify Controller, as read at open.
    pub(super) ident: ControllerIdent,
}

impl std::fmt::Debug for Ctrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctrl").field("name", &self.name).finish()
    }
}

impl Ctrl {
    /// Opens the controller at `bdf`, enables it and identifies it.
    pub fn open(bdf: &str, opts: &CtrlOptions) -> Result<Arc<Ctrl>, BackendError> {
        let name = format!("vfio:{bdf}");
        let bad = |e: String| BackendError::Invalid(format!("{name}: {e}"));
        let (pci, bar) = PciDevice::open(bdf, opts.queues as usize + 1)?;
        let mut reserved = reserved_regions(pci.group);
        reserved.extend(pci_windows());
        let dma = Dma::new(pci.container.clone(), &reserved);
        let cap = bar.read64(reg::CAP);
        if cap == u64::MAX {
            return Err(bad(
                "the controller does not respond (CAP reads all ones)".into()
            ));
        }
        let mqes = (cap & 0xffff) as u32 + 1;
        let to = ((cap >> 24) & 0xff).max(1);
        let dstrd = ((cap >> 32) & 0xf) as u32;
        let css_nvm = (cap >> 37) & 1 != 0;
        let (mpsmin, mpsmax) = (((cap >> 48) & 0xf) as u32, ((cap >> 52) & 0xf) as u32);
        if !css_nvm {
            return Err(bad(
                "the controller does not support the NVM command set".into()
            ));
        }
        if mqes < 2 {
            return Err(bad(format!("CAP.MQES allows {mqes} entries per queue")));
        }
        // The memory page size: the host's, within what the controller allows.
        let host_shift = crate::mem::page_size().trailing_zeros();
        let mps = host_shift.clamp(12 + mpsmin, 12 + mpsmax.max(mpsmin)) - 12;
        let page = 1u32 << (12 + mps);
        let vectors = pci
            .vectors
            .iter()
            .map(|v| v.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("eventfd: {e}")))?;
        let admin_rings = Rings::new(&dma, &bar, 0, ADMIN_ENTRIES.min(mqes), dstrd).map_err(bad)?;
        let data = dma
            .alloc(4096)
            .map_err(|e| bad(format!("Identify page: {e}")))?;
        let mut admin = Admin {
            rings: admin_rings,
            cid: 0,
            data,
        };
        let ready_timeout = Duration::from_millis(500 * to)
            .clamp(Duration::from_millis(500), Duration::from_secs(60));
        let up = enable(&bar, &mut admin, mps, dstrd, ready_timeout)
            .and_then(|()| identify(&bar, &mut admin, cns::CONTROLLER, 0))
            .and_then(|idc| {
                let ident = ControllerIdent::parse(&idc).map_err(|e| e.to_string())?;
                Ok((ident, set_queues(&bar, &mut admin, opts.queues)?))
            });
        let (ident, mut granted) = match up {
            Ok(x) => x,
            Err(e) => {
                // Nothing of this controller's may DMA into the admin memory about to go.
                bar.write32(reg::CC, bar.read32(reg::CC) & !1);
                pci.stop_dma();
                return Err(bad(e));
            }
        };
        if vectors.len() > 1 {
            granted = granted.min(vectors.len() as u16 - 1);
        }
        log::info!(
            "{name}: NVMe {}.{} controller {} ({}), {granted} I/O queue(s) of up to {mqes} entries, \
             {page}-byte pages, MDTS {}, SGLs {}, {} MSI-X vector(s)",
            bar.read32(reg::VS) >> 16,
            (bar.read32(reg::VS) >> 8) & 0xff,
            ident.model,
            ident.serial,
            ident.mdts,
            if ident.sgls & 3 != 0 { "yes" } else { "no" },
            vectors.len()
        );
        Ok(Arc::new(Ctrl {
            name,
            bar,
            dma,
            pci: Mutex::new(Some(pci)),
            admin: Mutex::new(admin),
            dstrd,
            mqes,
            page,
            page_min: 4096 << mpsmin,
            mps,
            ready_timeout,
            io_timeout: opts.io_timeout,
            state: AtomicU8::new(READY),
            queues: Mutex::new(Vec::new()),
            free_qids: Mutex::new((1..=granted).rev().collect()),
            granted,
            vectors,
            stats: VfioStats::default(),
            stop: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            leaked: Mutex::new(Vec::new()),
            ident,
        }))
    }

    /// I/O queues the controller granted.
    pub fn granted(&self) -> u16 {
        self.granted
    }

    fn admin(&self) -> std::sync::MutexGuard<'_, Admin> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Identify Namespace `nsid`.
    pub fn identify_namespace(&self, nsid: u32) -> Result<Vec<u8>, String> {
        identify(&self.bar, &mut self.admin(), cns::NAMESPACE, nsid)
    }

    /// Whether the controller takes SGLs for NVM commands.
    pub fn sgls(&self) -> bool {
        self.ident.sgls & 3 != 0
    }

    /// The interrupt vector queue `qid` uses, if the device has interrupts.
    pub(super) fn vector(&self, qid: u16) -> Option<u16> {
        // Vector 0 is the admin queue's; each I/O queue has its own (the number of queues is
        // capped to the vectors at open), because a vector's eventfd drained by one poller
        // would hide another queue's completions from its poller.
        (usize::from(qid) < self.vectors.len()).then_some(qid)
    }

    /// Creates I/O queue `qid` (CQ, then SQ) on rings just (re)started.
    pub(super) fn create_queue(
        &self,
        admin: &mut Admin,
        rings: &Rings,
        qid: u16,
    ) -> Result<(), String> {
        let mut c = Sqe::new(admin::CREATE_IO_CQ, 0);
        c.set_prps(rings.cq_mem.iova(), 0);
        c.set_cdw(10, ((rings.size - 1) << 16) | u32::from(qid));
        // PC (physically contiguous), IEN and the vector when the device has interrupts.
        let ien = match self.vector(qid) {
            Some(v) => (u32::from(v) << 16) | 0b10,
            None => 0,
        };
        c.set_cdw(11, ien | 1);
        admin.ok(&self.bar, "Create I/O Completion Queue", c)?;
        let mut s = Sqe::new(admin::CREATE_IO_SQ, 0);
        s.set_prps(rings.sq_mem.iova(), 0);
        s.set_cdw(10, ((rings.size - 1) << 16) | u32::from(qid));
        s.set_cdw(11, (u32::from(qid) << 16) | 1);
        if let Err(e) = admin.ok(&self.bar, "Create I/O Submission Queue", s) {
            let mut d = Sqe::new(admin::DELETE_IO_CQ, 0);
            d.set_cdw(10, u32::from(qid));
            let _ = admin.run(&self.bar, d, ADMIN_TIMEOUT);
            return Err(e);
        }
        Ok(())
    }

    /// Sets up an I/O queue of `size` entries: memory, then the queue on the controller.
    pub(super) fn new_queue(&self, size: u32) -> Result<(u16, Rings), String> {
        let qid = self
            .free_qids
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .ok_or_else(|| {
                format!(
                    "all {} I/O queues are in use (raise queues= in the disk spec)",
                    self.granted
                )
            })?;
        Rings::new(&self.dma, &self.bar, qid, size, self.dstrd)
            .map(|rings| (qid, rings))
            .inspect_err(|_| self.put_qid(qid))
    }

    /// Creates queue `hw` on the controller and registers it with the watchdog and reset, in
    /// one step under the admin lock (a reset or failure in between would miss it).
    pub(super) fn attach(&self, hw: &Arc<Mutex<QueueHw>>) -> Result<(), String> {
        let mut a = self.admin();
        if self.state.load(Ordering::Acquire) == FAILED {
            return Err("the controller has failed".into());
        }
        {
            let h = lock(hw);
            self.create_queue(&mut a, &h.rings, h.qid)?;
        }
        if let Ok(mut v) = self.queues.lock() {
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(hw));
        }
        Ok(())
    }

    /// The watchdog's coarse clock (one relaxed load).
    pub(super) fn tick(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    pub(super) fn put_qid(&self, qid: u16) {
        if let Ok(mut f) = self.free_qids.lock() {
            f.push(qid);
        }
    }

    /// Deletes I/O queue `qid` (SQ, then CQ) and frees its number. The queue's memory must stay
    /// until this returns.
    pub(super) fn delete_queue(&self, qid: u16, hw: &Arc<Mutex<QueueHw>>) {
        let mut a = self.admin();
        let mut deleted = true;
        if self.state.load(Ordering::Acquire) != FAILED {
            let mut s = Sqe::new(admin::DELETE_IO_SQ, 0);
            s.set_cdw(10, u32::from(qid));
            let mut c = Sqe::new(admin::DELETE_IO_CQ, 0);
            c.set_cdw(10, u32::from(qid));
            for (what, cmd) in [
                ("Delete I/O Submission Queue", s),
                ("Delete I/O Completion Queue", c),
            ] {
                if let Err(e) = a.ok(&self.bar, what, cmd) {
                    log::warn!("{}: queue {qid}: {e}; its memory stays mapped", self.name);
                    deleted = false;
                }
            }
        }
        drop(a);
        if deleted {
            self.put_qid(qid);
        } else if let Ok(mut l) = self.leaked.lock() {
            // Neither the number nor the memory is reused while the controller may own them.
            l.push(hw.clone());
        }
    }

    fn live_queues(&self) -> Vec<Arc<Mutex<QueueHw>>> {
        self.queues
            .lock()
            .map(|v| v.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    }

    /// Resets the controller: every queue stops ringing doorbells, the controller is disabled
    /// and enabled again, every I/O queue is re-created and the commands that had not completed
    /// are submitted again (reads and writes are idempotent; a command that had completed on the
    /// device but whose completion was lost is run twice, which writes the same data).
    pub fn reset(&self, why: &str) -> Result<(), String> {
        let mut admin = self.admin();
        if self.state.load(Ordering::Acquire) == FAILED {
            return Err("the controller has failed".into());
        }
        self.state.store(RESETTING, Ordering::Release);
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
        log::warn!("{}: resetting the controller: {why}", self.name);
        let queues = self.live_queues();
        for q in &queues {
            lock(q).frozen = true;
        }
        let r = (|| {
            enable(
                &self.bar,
                &mut admin,
                self.mps,
                self.dstrd,
                self.ready_timeout,
            )?;
            let granted = set_queues(&self.bar, &mut admin, self.granted)?;
            if granted < self.granted {
                return Err(format!(
                    "the controller now grants {granted} I/O queues, not {}",
                    self.granted
                ));
            }
            let now = self.tick();
            for q in &queues {
                let mut hw = lock(q);
                if hw.failed {
                    // Being closed.
                    continue;
                }
                let qid = hw.qid;
                // What completed before the reset is reported, not run again.
                hw.reap();
                hw.rings.restart(&self.bar, qid, self.dstrd)?;
                self.create_queue(&mut admin, &hw.rings, qid)?;
                let n = hw.resubmit(now);
                self.stats
                    .resubmitted
                    .fetch_add(n as u64, Ordering::Relaxed);
                hw.frozen = false;
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                self.state.store(READY, Ordering::Release);
                log::info!(
                    "{}: controller reset done; {} queue(s) re-created",
                    self.name,
                    queues.len()
                );
                self.wake_all();
                Ok(())
            }
            Err(e) => {
                drop(admin);
                self.fail(&format!("reset failed: {e}"));
                Err(e)
            }
        }
    }

    fn wake_all(&self) {
        for v in &self.vectors {
            let _ = v.write(1);
        }
    }

    /// Gives up on the controller: every queue fails what it has and everything after, and the
    /// device is handed back to the kernel (its BAR unmapped once no queue can touch it).
    pub fn fail(&self, why: &str) {
        let admin = self.admin();
        if self.state.swap(FAILED, Ordering::AcqRel) == FAILED {
            return;
        }
        log::error!(
            "{}: controller failed: {why}; its commands fail from now on",
            self.name
        );
        // The device stops mastering the bus first: commands are about to be completed and
        // their buffers reused, and a live but wedged controller must not touch them.
        if let Ok(p) = self.pci.lock() {
            if let Some(p) = p.as_ref() {
                p.stop_dma();
            }
        }
        for q in self.live_queues() {
            let mut hw = lock(&q);
            hw.failed = true;
            hw.frozen = false;
        }
        // No queue touches MMIO once failed (checked under its lock), and the admin queue is
        // held: the BAR can go, and with it the device.
        // SAFETY: as just said, nothing accesses the mapping any more.
        unsafe { self.bar.revoke() };
        self.dma.kill();
        drop(admin);
        if let Ok(mut p) = self.pci.lock() {
            p.take();
        }
        self.wake_all();
    }

    /// One watchdog pass: hot-remove, fatal status, timed-out commands.
    fn watch_once(&self) {
        let now = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        if self.state.load(Ordering::Acquire) == FAILED {
            return;
        }
        let requested = self
            .pci
            .lock()
            .map(|p| p.as_ref().is_some_and(|p| p.requested()))
            .unwrap_or(false);
        if requested {
            self.fail("the kernel asked for the device back (hot-remove or unbind)");
            return;
        }
        // Under the admin lock: a failure elsewhere (a reset that failed) unmaps the BAR while
        // holding it.
        let s = {
            let _a = self.admin();
            if self.state.load(Ordering::Acquire) == FAILED {
                return;
            }
            self.bar.read32(reg::CSTS)
        };
        if s == u32::MAX {
            self.fail("the controller does not respond (removed?)");
            return;
        }
        if s & csts::CFS != 0 {
            let _ = self.reset("controller fatal status (CSTS.CFS)");
            return;
        }
        let timeout = self.timeout_ticks();
        let mut abort = Vec::new();
        let mut stuck = false;
        let queues = self.live_queues();
        for q in &queues {
            let mut hw = lock(q);
            for (cid, seq, st) in hw.expired(now, timeout) {
                match st {
                    Expired::First => {
                        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        abort.push((q.clone(), cid, seq));
                    }
                    Expired::AfterAbort => stuck = true,
                }
            }
        }
        // At most a few Aborts per pass (the controller's limit is ACL + 1, at least 1); the
        // others are aborted on later passes, or swept up by a reset.
        for (q, cid, seq) in abort.into_iter().take(4) {
            let mut a = self.admin();
            // The command may have completed since, and its slot been reused: abort only the
            // submission that timed out.
            let qid = {
                let hw = lock(&q);
                if !hw.holds(cid, seq) {
                    continue;
                }
                hw.qid
            };
            log::warn!(
                "{}: command {cid} on queue {qid} timed out after {:?}; aborting it",
                self.name,
                self.io_timeout
            );
            let mut c = Sqe::new(admin::ABORT, 0);
            c.set_cdw(10, (u32::from(cid) << 16) | u32::from(qid));
            self.stats.aborts.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = a.run(&self.bar, c, ADMIN_TIMEOUT) {
                log::warn!("{}: Abort: {e}", self.name);
                stuck = true;
            }
        }
        if stuck {
            let _ = self.reset("a command did not complete after its Abort");
        }
    }

    /// The command timeout in watchdog ticks (at least one).
    fn timeout_ticks(&self) -> u64 {
        (self.io_timeout.as_millis() / WATCH_EVERY.as_millis()).max(1) as u64
    }

    /// Runs the watchdog until `stop`.
    pub(super) fn watch(self: Arc<Self>) {
        loop {
            std::thread::sleep(WATCH_EVERY);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.watch_once();
        }
    }

    /// Shuts the controller down (CC.SHN normal, waiting for CSTS.SHST) if it is still there.
    pub(super) fn shutdown(&self) {
        let _a = self.admin();
        if self.state.load(Ordering::Acquire) == FAILED {
            return;
        }
        let cc = self.bar.read32(reg::CC);
        self.bar.write32(reg::CC, (cc & !(3 << 14)) | (1 << 14));
        let until = Instant::now() + self.ready_timeout.min(Duration::from_secs(10));
        while self.bar.read32(reg::CSTS) & csts::SHST_MASK != csts::SHST_DONE {
            if Instant::now() > until {
                log::warn!("{}: shutdown did not complete in time", self.name);
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Ctrl {
    /// The last user is gone (the back end after its shutdown, or a half-finished open): the
    /// controller is disabled and stops mastering the bus before the device and its DMA
    /// mappings go, so nothing it still holds can be written to memory that is reused.
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) != FAILED {
            let cc = self.bar.read32(reg::CC);
            if cc & 1 != 0 {
                self.bar.write32(reg::CC, cc & !1);
                let _ = wait_ready(
                    &self.bar,
                    false,
                    self.ready_timeout.min(Duration::from_secs(5)),
                );
            }
        }
        if let Ok(mut p) = self.pci.lock() {
            if let Some(p) = p.as_ref() {
                p.stop_dma();
            }
            // SAFETY: this is the last user of the controller: no queue or watchdog touches the
            // BAR any more.
            unsafe { self.bar.revoke() };
            p.take();
        }
        // The group has left the container with the device: later unmaps would only fail.
        self.dma.kill();
    }
}

/// Whether a command is past its timeout for the first time or after its Abort.
pub(super) enum Expired {
    First,
    AfterAbort,
}

pub(super) fn lock(q: &Mutex<QueueHw>) -> std::sync::MutexGuard<'_, QueueHw> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until CSTS.RDY equals `ready`, failing on CFS or after `timeout`.
fn wait_ready(bar: &Bar, ready: bool, timeout: Duration) -> Result<(), String> {
    let until = Instant::now() + timeout;
    loop {
        let s = bar.read32(reg::CSTS);
        if s == u32::MAX {
            return Err("the controller does not respond (CSTS reads all ones)".into());
        }
        if ready && s & csts::CFS != 0 {
            return Err("controller fatal status (CSTS.CFS) while enabling".into());
        }
        if (s & csts::RDY != 0) == ready {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!(
                "CSTS.RDY did not become {} within CAP.TO ({timeout:?})",
                ready as u8
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Disables the controller (if enabled), programs the admin queue and enables it.
fn enable(
    bar: &Arc<Bar>,
    admin: &mut Admin,
    mps: u32,
    dstrd: u32,
    timeout: Duration,
) -> Result<(), String> {
    let cc = bar.read32(reg::CC);
    if cc & 1 != 0 || bar.read32(reg::CSTS) & csts::RDY != 0 {
        bar.write32(reg::CC, cc & !1);
        wait_ready(bar, false, timeout)?;
    }
    admin.rings.restart(bar, 0, dstrd)?;
    let n = admin.rings.size - 1;
    bar.write32(reg::AQA, (n << 16) | n);
    bar.write64(reg::ASQ, admin.rings.sq_mem.iova());
    bar.write64(reg::ACQ, admin.rings.cq_mem.iova());
    // EN, CSS = NVM (0), MPS, AMS = round robin, IOSQES = 2^6, IOCQES = 2^4.
    bar.write32(reg::CC, 1 | (mps << 7) | (6 << 16) | (4 << 20));
    wait_ready(bar, true, timeout)
}

/// Identify with CNS `c` into the admin data page; returns its 4096 bytes.
fn identify(bar: &Bar, admin: &mut Admin, c: u8, nsid: u32) -> Result<Vec<u8>, String> {
    admin.data.zero();
    let mut s = Sqe::new(admin::IDENTIFY, 0);
    s.set_nsid(nsid);
    s.set_prps(admin.data.iova(), 0);
    s.set_cdw(10, u32::from(c));
    admin.ok(bar, "Identify", s)?;
    let mut out = vec![0u8; 4096];
    admin.data.read(0, &mut out);
    Ok(out)
}

/// Set Features Number of Queues; returns the I/O queue pairs granted (at most `want`).
fn set_queues(bar: &Bar, admin: &mut Admin, want: u16) -> Result<u16, String> {
    let w = u32::from(want.max(1)) - 1;
    let mut s = Sqe::new(admin::SET_FEATURES, 0);
    s.set_cdw(10, feature::NUMBER_OF_QUEUES as u32);
    s.set_cdw(11, w | (w << 16));
    let c = admin.ok(bar, "Set Features Number of Queues", s)?;
    // The controller may grant more or fewer than asked; SQs and CQs are used in pairs.
    let sq = (c.dw0() & 0xffff) as u16;
    let cq = (c.dw0() >> 16) as u16;
    Ok(sq.min(cq).saturating_add(1).min(want.max(1)))
}

/// The status commands get when the controller has failed or gone.
pub(super) const GONE: Status = Status::ABORTED_SQ_DELETION.with_dnr();
