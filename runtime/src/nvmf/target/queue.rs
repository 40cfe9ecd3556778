//! One NVMe/TCP queue (admin or I/O) of a host, as a [`Port`] a poller serves: PDUs in,
//! commands to the controller or the queue pair, responses and data out.

use super::QueueStats;
use super::{inc, Association, Subsystem, COMMAND_INTERRUPTED, RX_BUDGET};
use crate::addr::AddressSpace;
use crate::backend::BackendQueue;
use crate::controller::AdminOutcome;
use crate::exec::Namespaces;
use crate::log_limited;
use crate::notify::Notifier;
use crate::nvmf::conn::{ConnError, Pieces, Rx, RxEvent, Tx};
use crate::nvmf::fabrics::{self, PropertyGet, PropertySet};
use crate::nvmf::pdu::{self, DataDigest, DataHdr, Fatal, Limits, Params, R2t, Role};
use crate::nvmf::pool::BufPool;
use crate::poller::Port;
use crate::stats::IoStats;
use leap_queues::nvme::{io, sgl_subtype, sgl_type};
use leap_queues::{Cqe, SglDescriptor, Sqe, Status, Submitter};
use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Where a command is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Receiving host-to-controller data (in-capsule or H2CData after R2T).
    Receiving,
    /// Data complete; waiting to enter the queue pair.
    Ready,
    /// In the queue pair / back end.
    Executing,
    /// An Asynchronous Event Request the controller holds.
    Held,
    /// Response queued; the slot frees when it is on the wire.
    Responding,
}

/// Data direction of an opcode (Base Specification 2.0, figure 87: bits 1:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    None,
    ToController,
    ToHost,
}

fn direction(opcode: u8) -> Dir {
    match opcode & 3 {
        1 => Dir::ToController,
        2 => Dir::ToHost,
        _ => Dir::None,
    }
}

/// Per-command state of one connection, indexed by slot (= buffer, = transfer tag).
#[derive(Clone, Copy)]
struct Slot {
    state: SlotState,
    host_cid: u16,
    sqe: Sqe,
    dir: Dir,
    /// Transfer length in bytes.
    len: u32,
    /// Bytes of host data received.
    got: u32,
    /// End of the data requested by the last R2T.
    r2t_end: u32,
    /// A status decided before execution (digest mismatch, CID conflict...).
    failed: Option<Status>,
    /// Counted against the subsystem's in-flight bound.
    admitted: bool,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            state: SlotState::Free,
            host_cid: 0,
            sqe: Sqe::default(),
            dir: Dir::None,
            len: 0,
            got: 0,
            r2t_end: 0,
            failed: None,
            admitted: false,
        }
    }
}

/// A bitmap over the 65536 command identifiers.
struct CidSet(Vec<u64>);

impl CidSet {
    fn new() -> CidSet {
        CidSet(vec![0; 1024])
    }
    fn get(&self, cid: u16) -> bool {
        self.0[cid as usize >> 6] & (1 << (cid & 63)) != 0
    }
    fn set(&mut self, cid: u16, on: bool) {
        let w = &mut self.0[cid as usize >> 6];
        if on {
            *w |= 1 << (cid & 63);
        } else {
            *w &= !(1 << (cid & 63));
        }
    }
}

/// What the current PDU's data is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Receiving {
    Nothing,
    Capsule(u16),
    H2c(u16),
    Term,
}

/// One NVMe/TCP queue (admin or I/O) of a host, served by a poller.
pub(super) struct TcpQueue {
    sub: Arc<Subsystem>,
    sock: TcpStream,
    fd: RawFd,
    notifier: Notifier,
    want_out: bool,
    rx: Rx,
    tx: Tx,
    params: Params,
    limits: Limits,
    qid: u16,
    entries: u16,
    sqhd: u16,
    assoc: Arc<Association>,
    epoch: u32,
    discovery: bool,
    /// The pool's DMA mappings for the namespaces' back ends that need them (a VFIO
    /// controller), one per back end seen; before `pool`, so they go before its memory.
    dma: Vec<(
        std::sync::Weak<dyn crate::backend::Backend>,
        crate::backend::DmaGuard,
    )>,
    pool: BufPool,
    empty: Arc<AddressSpace>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    busy: CidSet,
    rejected: CidSet,
    /// Queue-pair cid → slot.
    by_qcid: Vec<u16>,
    ready: VecDeque<u16>,
    cur: Receiving,
    /// Admitted commands in flight on this queue.
    inflight: u32,
    finished: bool,
    /// Close once everything queued is sent (after a Disconnect).
    closing: bool,
    /// One iovec per slot describing its buffer for a C2HData PDU, and one more for the
    /// receive sink (a Vec: its entries never move while PDUs refer to them).
    iovs: Vec<libc::iovec>,
    /// Slots whose responses went out during a flush.
    sent: Vec<u32>,
    stats: Arc<QueueStats>,
    /// The subsystem's namespace generation this queue last saw, and its table then.
    ns_gen: u64,
    nss: Arc<Namespaces>,
    /// PDUs received whole (published to `stats` with the sent count).
    pdus_rx: u64,
}

// SAFETY: `iovs` describe pool memory owned by this queue; the queue moves between threads only
// as a whole (handshake thread → poller), never while a PDU refers to them mid-transfer from
// another thread.
unsafe impl Send for TcpQueue {}

impl TcpQueue {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        sub: Arc<Subsystem>,
        sock: TcpStream,
        params: Params,
        qid: u16,
        entries: u16,
        assoc: Arc<Association>,
        epoch: u32,
        discovery: bool,
    ) -> std::io::Result<TcpQueue> {
        let fd = sock.as_raw_fd();
        let notifier = Notifier::new()?;
        notifier.add(fd, false)?;
        let slot = sub.cfg.max_transfer().max(8192);
        let pool = BufPool::new(entries as usize, slot)?;
        let max_icd = if qid == 0 {
            pdu::ADMIN_MAX_ICD
        } else {
            (sub.io_cfg.ioccsz.saturating_sub(4) * 16).min(slot as u32)
        };
        let stats = Arc::new(QueueStats {
            io_queue: qid != 0 && !discovery,
            ..QueueStats::default()
        });
        if let Ok(mut v) = sub.queues.lock() {
            v.push(Arc::downgrade(&stats));
        }
        let mut q = TcpQueue {
            dma: Vec::new(),
            limits: Limits {
                max_icd,
                max_plen: (slot as u32).saturating_add(512),
            },
            fd,
            notifier,
            want_out: false,
            rx: Rx::new(),
            tx: Tx::new(entries as usize * 3 + 8),
            params,
            qid,
            entries,
            sqhd: 0,
            assoc,
            epoch,
            discovery,
            pool,
            empty: Arc::new(AddressSpace::empty()),
            slots: vec![Slot::default(); entries as usize],
            free: (0..entries).rev().collect(),
            busy: CidSet::new(),
            rejected: CidSet::new(),
            by_qcid: vec![u16::MAX; entries.max(2) as usize],
            ready: VecDeque::with_capacity(entries as usize),
            cur: Receiving::Nothing,
            inflight: 0,
            finished: false,
            closing: false,
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                entries as usize + 1
            ],
            sent: Vec::with_capacity(entries as usize * 3 + 8),
            stats,
            ns_gen: sub.ns_gen(),
            // Only I/O queues address namespaces (and only they follow changes): an admin
            // queue holding a table would keep a detached namespace alive.
            nss: if qid != 0 && !discovery {
                sub.namespaces()
            } else {
                Arc::new(Namespaces::default())
            },
            pdus_rx: 0,
            sock,
            sub,
        };
        let nss = q.nss.clone();
        q.map_pool(&nss)?;
        Ok(q)
    }

    /// DMA-maps the buffer pool for every back end in `nss` that needs it (a VFIO controller
    /// reads and writes the pool itself), once per back end.
    fn map_pool(&mut self, nss: &Namespaces) -> std::io::Result<()> {
        // A back end that is gone cannot be doing DMA any more: its mapping can go too.
        self.dma.retain(|(w, _)| w.strong_count() > 0);
        for (_, ns) in nss.iter() {
            let b = ns.backend();
            if self
                .dma
                .iter()
                .any(|(w, _)| w.upgrade().is_some_and(|a| Arc::ptr_eq(&a, b)))
            {
                continue;
            }
            let (base, len) = (self.pool.ptr(0), self.pool.len() * self.pool.slot_size());
            let Some(base) = base else { continue };
            // SAFETY: the pool's mapping outlives the guard (declared before `pool`, so dropped
            // first), and pool memory is only accessed through raw pointers.
            match unsafe { b.map_dma(base, len) } {
                Ok(Some(g)) => self.dma.push((Arc::downgrade(b), g)),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        Ok(())
    }

    /// Queues the Connect response: the first PDU the host gets on this queue.
    pub(super) fn accept_connect(&mut self, cid: u16, cntlid: u16) {
        let cqe = fabrics::connect_response(cid, cntlid);
        self.tx
            .push(pdu::encode_capsule_resp(&cqe, &self.params), None);
        self.sqhd = 1 % self.entries;
    }

    /// Makes the PDU counts visible to metrics (only this queue writes them: plain stores).
    fn publish_pdus(&self) {
        self.stats.pdus_rx.store(self.pdus_rx, Ordering::Relaxed);
        self.stats
            .pdus_tx
            .store(self.tx.pushed(), Ordering::Relaxed);
    }

    /// The queue's I/O counters.
    pub(super) fn io_stats(&self) -> Arc<IoStats> {
        self.stats.io.clone()
    }

    /// Ends the connection (after a TermReq for `f`, if any). In-flight commands still complete
    /// (their results are dropped), then the poller drops the queue.
    fn close(&mut self, why: &str, f: Option<Fatal>) {
        if self.finished {
            return;
        }
        if let Some(f) = f {
            inc(&self.sub.stats.fatal_errors);
            if pdu::may_send_term_req(self.rx.common().pdu_type) {
                let mut tx = Tx::new(1);
                tx.push(f.term_req(Role::Controller, self.rx.header()), None);
                let _ = tx.flush(self.fd, &mut |_| {});
            }
        }
        log_limited!(
            if f.is_some() {
                log::Level::Warn
            } else {
                log::Level::Info
            },
            "target: queue {} of controller {}: {why}",
            self.qid,
            self.assoc.cntlid
        );
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.finished = true;
        if self.qid == 0 {
            self.sub.end_association(self.assoc.cntlid);
        }
    }

    fn fail(&mut self, e: ConnError) {
        match e {
            ConnError::Fatal(f) => self.close(&format!("protocol error: {f}"), Some(f)),
            ConnError::Closed => self.close("host disconnected", None),
            ConnError::Terminated { fes, fei } => self.close(
                &format!("host terminated the connection (FES {fes:#x}, FEI {fei:#x})"),
                None,
            ),
            ConnError::Io(e) => self.close(&format!("socket error: {e}"), None),
        }
    }

    /// Slot `s`'s buffer from byte `off`, `len` bytes, as a one-piece list in iovec `which`.
    fn pieces(&mut self, which: usize, s: u16, off: usize, len: usize) -> Option<Pieces> {
        let base = self.pool.ptr(s as usize)?;
        if off.checked_add(len)? > self.pool.slot_size() {
            return None;
        }
        let v = self.iovs.get_mut(which)?;
        // SAFETY: off + len ≤ the slot size (checked above): inside the slot's buffer.
        let start = unsafe { base.add(off) };
        *v = libc::iovec {
            iov_base: start.cast(),
            iov_len: len,
        };
        // SAFETY: the iovec lives in `self.iovs` (heap, never resized) and describes the slot's
        // buffer, which stays allocated and is not reused until the PDU is received or sent.
        Some(unsafe { Pieces::new(v, 1, 0) })
    }

    /// The slot's buffer as a byte slice of `len` bytes.
    fn buffer(&mut self, s: u16, len: usize) -> &mut [u8] {
        match self.pool.ptr(s as usize) {
            // SAFETY: the slot owns its buffer (slot size bytes, len clamped to it); nothing
            // else uses it while the slot is not executing.
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p, len.min(self.pool.slot_size())) },
            None => &mut [],
        }
    }

    /// Queues the response for slot `s`, with its first `len` buffer bytes as
    /// controller-to-host data before it.
    fn respond(&mut self, s: u16, status: Status, dw0: u32, dw1: u32, len: usize) {
        let slot = self.slots[s as usize];
        if self.tx.room() < 2 {
            // Cannot happen by construction (three PDUs per entry fit); never answer without
            // the data, so give up the connection instead.
            log_limited!(log::Level::Error, "target: send queue full; closing");
            self.close("send queue full", None);
            return;
        }
        if len > 0 && status.is_success() {
            let hdr = pdu::encode_c2h_data(
                &DataHdr {
                    cccid: slot.host_cid,
                    ttag: 0,
                    datao: 0,
                    datal: len as u32,
                    last: true,
                    success: false,
                },
                &self.params,
            );
            let digest = self.params.ddgst.then(|| {
                let mut d = DataDigest::new();
                d.update(self.buffer(s, len));
                d.to_bytes()
            });
            if let (Ok(hdr), Some(p)) = (hdr, self.pieces(s as usize, s, 0, len)) {
                self.tx.push_data(hdr, Some(p), len, digest, None);
            }
        }
        let mut cqe = Cqe::new(slot.host_cid, status);
        cqe.set_dw0(dw0);
        cqe.dw1 = dw1.to_le();
        cqe.set_sq(self.sqhd, self.qid);
        self.tx
            .push(pdu::encode_capsule_resp(&cqe, &self.params), Some(s as u32));
        self.slots[s as usize].state = SlotState::Responding;
    }

    fn free_slot(&mut self, s: u16) {
        let Some(slot) = self.slots.get_mut(s as usize) else {
            return;
        };
        if slot.state == SlotState::Free {
            return;
        }
        if slot.failed != Some(Status::CID_CONFLICT) {
            self.busy.set(slot.host_cid, false);
        }
        if slot.admitted {
            slot.admitted = false;
            self.inflight -= 1;
            self.sub.inflight.fetch_sub(1, Ordering::Relaxed);
        }
        slot.state = SlotState::Free;
        self.free.push(s);
    }

    /// A PDU header arrived: check it against the queue's state and say where its data goes.
    fn on_header(&mut self) -> Result<(), Fatal> {
        self.cur = Receiving::Nothing;
        let layout = *self.rx.layout();
        match layout.pdu_type {
            pdu::pdu_type::CAPSULE_CMD => {
                let sqe = pdu::decode_capsule_cmd(self.rx.header())?;
                pdu::check_in_capsule(&sqe, &layout)?;
                // A host may not have more commands outstanding than its queue holds.
                let s = self.free.pop().ok_or(Fatal::sequence())?;
                self.sqhd = (self.sqhd + 1) % self.entries;
                let cid = sqe.cid();
                let mut failed = None;
                if self.busy.get(cid) {
                    failed = Some(Status::CID_CONFLICT);
                } else {
                    self.busy.set(cid, true);
                }
                let fabrics = sqe.opcode() == fabrics::OPCODE;
                let dir = if fabrics {
                    Dir::None
                } else {
                    direction(sqe.opcode())
                };
                let d = sqe.sgl1();
                let len = if dir == Dir::None {
                    0
                } else if layout.datal > 0 {
                    layout.datal
                } else if (d.ty(), d.subtype())
                    == (sgl_type::TRANSPORT_DATA_BLOCK, sgl_subtype::TRANSPORT_A)
                    && sqe.psdt() != leap_queues::nvme::psdt::PRP
                {
                    d.len()
                } else {
                    failed = failed.or(Some(if sqe.psdt() == leap_queues::nvme::psdt::PRP {
                        Status::INVALID_FIELD
                    } else {
                        Status::SGL_TYPE_INVALID
                    }));
                    0
                };
                if len as usize > self.pool.slot_size() {
                    // Beyond MDTS.
                    failed = failed.or(Some(Status::INVALID_FIELD));
                }
                self.slots[s as usize] = Slot {
                    state: SlotState::Receiving,
                    host_cid: cid,
                    sqe,
                    dir,
                    len,
                    got: layout.datal,
                    r2t_end: layout.datal,
                    failed,
                    admitted: false,
                };
                if layout.datal > 0 {
                    let sink = self.entries as usize;
                    if let Some(p) = self.pieces(sink, s, 0, layout.datal as usize) {
                        self.rx.set_sink(p);
                    }
                }
                self.cur = Receiving::Capsule(s);
            }
            pdu::pdu_type::H2C_DATA => {
                let h = pdu::decode_data_hdr(self.rx.header())?;
                let s = h.ttag;
                let slot = self
                    .slots
                    .get(s as usize)
                    .filter(|x| x.state == SlotState::Receiving && x.r2t_end > x.got)
                    .ok_or(Fatal::invalid_field(pdu::field::TTAG))?;
                if h.cccid != slot.host_cid {
                    return Err(Fatal::invalid_field(pdu::field::CCCID));
                }
                h.validate(&layout, slot.r2t_end)?;
                if h.datao != slot.got {
                    return Err(Fatal::sequence());
                }
                let sink = self.entries as usize;
                if let Some(p) = self.pieces(sink, s, h.datao as usize, h.datal as usize) {
                    self.rx.set_sink(p);
                }
                self.cur = Receiving::H2c(s);
            }
            pdu::pdu_type::H2C_TERM_REQ => self.cur = Receiving::Term,
            _ => return Err(Fatal::sequence()),
        }
        Ok(())
    }

    /// A PDU is complete.
    fn on_pdu(&mut self, digest_ok: bool) -> Result<(), ConnError> {
        self.pdus_rx += 1;
        match self.cur {
            Receiving::Nothing => {}
            Receiving::Term => {
                let (fes, fei) = pdu::decode_term(self.rx.header()).map_err(ConnError::Fatal)?;
                return Err(ConnError::Terminated { fes, fei });
            }
            Receiving::Capsule(s) => {
                self.digest_check(s, digest_ok);
                self.capsule(s);
            }
            Receiving::H2c(s) => {
                self.digest_check(s, digest_ok);
                let datal = self.rx.layout().datal;
                let slot = &mut self.slots[s as usize];
                slot.got += datal;
                if slot.got == slot.r2t_end {
                    if slot.got < slot.len && slot.failed.is_none() {
                        self.r2t(s);
                    } else {
                        self.data_complete(s);
                    }
                }
            }
        }
        self.cur = Receiving::Nothing;
        Ok(())
    }

    fn digest_check(&mut self, s: u16, ok: bool) {
        if !ok {
            inc(&self.sub.stats.digest_errors);
            log_limited!(
                log::Level::Warn,
                "target: queue {}: data digest mismatch on command {}",
                self.qid,
                self.slots[s as usize].host_cid
            );
            let f = &mut self.slots[s as usize].failed;
            *f = f.or(Some(pdu::TRANSIENT_TRANSPORT_ERROR));
        }
    }

    /// Asks the host for the next part of slot `s`'s data.
    fn r2t(&mut self, s: u16) {
        let slot = &mut self.slots[s as usize];
        let end = slot
            .len
            .min(slot.got.saturating_add(self.params.maxh2cdata));
        let r = R2t {
            cccid: slot.host_cid,
            ttag: s,
            r2to: slot.got,
            r2tl: end - slot.got,
        };
        slot.r2t_end = end;
        self.tx.push(pdu::encode_r2t(&r, &self.params), None);
    }

    /// A command capsule is complete: decide what happens to it.
    fn capsule(&mut self, s: u16) {
        let slot = self.slots[s as usize];
        if let Some(st) = slot.failed {
            self.respond(s, st, 0, 0, 0);
            return;
        }
        if slot.sqe.opcode() == fabrics::OPCODE {
            self.fabrics(s);
            return;
        }
        if self.qid != 0 && !self.admit(s) {
            return;
        }
        if slot.dir == Dir::ToController && slot.got < slot.len {
            self.r2t(s);
        } else {
            self.data_complete(s);
        }
    }

    fn data_complete(&mut self, s: u16) {
        if let Some(st) = self.slots[s as usize].failed {
            self.respond(s, st, 0, 0, 0);
        } else if self.qid == 0 {
            self.admin(s);
        } else {
            self.slots[s as usize].state = SlotState::Ready;
            self.ready.push_back(s);
        }
    }

    /// Overload control: admits slot `s`'s command or completes it with a retryable reject.
    fn admit(&mut self, s: u16) -> bool {
        let cfg = &self.sub.cfg;
        let cid = self.slots[s as usize].host_cid;
        let retry = self.rejected.get(cid);
        let total = cfg.total_inflight.max(1);
        let reserve = (total as u64 * cfg.reserve_pct.min(100) as u64 / 100) as u32;
        let cap = if self.assoc.priority || retry {
            total
        } else {
            total - reserve.min(total - 1)
        };
        let mut ok = self.inflight < cfg.queue_inflight.max(1);
        if ok && self.sub.inflight.fetch_add(1, Ordering::Relaxed) >= cap {
            // Over the subsystem's bound: take the increment back.
            self.sub.inflight.fetch_sub(1, Ordering::Relaxed);
            ok = false;
        }
        if ok {
            self.inflight += 1;
            self.slots[s as usize].admitted = true;
            if retry {
                self.rejected.set(cid, false);
                inc(&self.sub.stats.retries_admitted);
            }
            return true;
        }
        self.rejected.set(cid, true);
        inc(&self.sub.stats.rejects);
        self.respond(s, COMMAND_INTERRUPTED.with_crd(1), 0, 0, 0);
        false
    }

    /// An admin command (data complete) for the controller.
    fn admin(&mut self, s: u16) {
        let slot = self.slots[s as usize];
        let len = slot.len as usize;
        let assoc = self.assoc.clone();
        let Ok(mut ctrl) = assoc.ctrl.lock() else {
            self.respond(s, Status::INTERNAL_ERROR, 0, 0, 0);
            return;
        };
        let buf = self.buffer(s, len);
        let outcome = match slot.dir {
            Dir::ToController => ctrl.admin(&slot.sqe, buf, &mut []),
            Dir::ToHost => ctrl.admin(&slot.sqe, &[], buf),
            Dir::None => ctrl.admin(&slot.sqe, &[], &mut []),
        };
        assoc.wce.store(ctrl.wce(), Ordering::Relaxed);
        match outcome {
            AdminOutcome::Complete {
                status,
                dw0,
                dw1,
                bytes,
            } => {
                let bytes = if slot.dir == Dir::ToHost {
                    bytes.min(len)
                } else {
                    0
                };
                self.respond(s, status, dw0, dw1, bytes);
            }
            AdminOutcome::Held => self.slots[s as usize].state = SlotState::Held,
        }
        drop(ctrl);
        self.events();
    }

    /// Completes Asynchronous Event Requests the controller has events for.
    fn events(&mut self) {
        let assoc = self.assoc.clone();
        let Ok(mut ctrl) = assoc.ctrl.lock() else {
            return;
        };
        while let Some((cid, dw0)) = ctrl.take_event_completion() {
            if let Some(s) = self.held(cid) {
                self.respond(s, Status::SUCCESS, dw0, 0, 0);
            }
        }
    }

    fn held(&self, cid: u16) -> Option<u16> {
        self.slots
            .iter()
            .position(|x| x.state == SlotState::Held && x.host_cid == cid)
            .map(|k| k as u16)
    }

    /// A Fabrics command other than the first Connect.
    fn fabrics(&mut self, s: u16) {
        let sqe = self.slots[s as usize].sqe;
        let admin_q = self.qid == 0;
        let assoc = self.assoc.clone();
        match fabrics::fctype_of(&sqe) {
            Some(fabrics::fctype::PROPERTY_GET) if admin_q => {
                let r = PropertyGet::from_sqe(&sqe).and_then(|g| {
                    let ctrl = assoc.ctrl.lock().map_err(|_| Status::INTERNAL_ERROR)?;
                    ctrl.property_get(g.offset, g.size.bytes() as u8)
                });
                match r {
                    Ok(v) => self.respond(s, Status::SUCCESS, v as u32, (v >> 32) as u32, 0),
                    Err(st) => self.respond(s, st, 0, 0, 0),
                }
            }
            Some(fabrics::fctype::PROPERTY_SET) if admin_q => {
                let r = PropertySet::from_sqe(&sqe).and_then(|p| {
                    let mut ctrl = assoc.ctrl.lock().map_err(|_| Status::INTERNAL_ERROR)?;
                    ctrl.property_set(p.offset, p.size.bytes() as u8, p.value)
                });
                match r {
                    Ok(effect) => {
                        if effect.reset {
                            // Controller reset: the association's I/O queues go.
                            assoc.epoch.fetch_add(1, Ordering::AcqRel);
                            for cid in effect.aborted_aers {
                                if let Some(h) = self.held(cid) {
                                    self.respond(h, Status::ABORTED_SQ_DELETION, 0, 0, 0);
                                }
                            }
                        }
                        if effect.shutdown {
                            self.shutdown_flush();
                        }
                        self.respond(s, Status::SUCCESS, 0, 0, 0);
                    }
                    Err(st) => self.respond(s, st, 0, 0, 0),
                }
            }
            Some(fabrics::fctype::DISCONNECT) => {
                self.respond(s, Status::SUCCESS, 0, 0, 0);
                self.closing = true;
            }
            Some(fabrics::fctype::CONNECT) => {
                self.respond(s, crate::controller::COMMAND_SEQUENCE_ERROR, 0, 0, 0)
            }
            _ => self.respond(s, Status::INVALID_OPCODE, 0, 0, 0),
        }
    }

    /// The host shut the controller down: make every namespace's completed writes durable,
    /// off the poller thread.
    fn shutdown_flush(&self) {
        if self.discovery || self.assoc.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (nss, assoc) = (self.sub.namespaces(), self.assoc.clone());
        let r = std::thread::Builder::new()
            .name("leap-target-flush".into())
            .spawn(move || {
                for (nsid, ns) in nss.iter() {
                    if let Err(e) = crate::backend::sync(&**ns.backend()) {
                        log::warn!("target: shutdown flush of namespace {nsid}: {e}");
                    }
                }
                assoc.flushing.store(false, Ordering::Release);
            });
        if r.is_err() {
            self.assoc.flushing.store(false, Ordering::Release);
        }
    }

    /// Sends what the socket takes; frees slots whose responses went out.
    fn flush_tx(&mut self) {
        if self.finished {
            return;
        }
        self.publish_pdus();
        let mut sent = std::mem::take(&mut self.sent);
        let r = self.tx.flush(self.fd, &mut |t| sent.push(t));
        for &t in &sent {
            self.free_slot(t as u16);
        }
        sent.clear();
        self.sent = sent;
        match r {
            Err(e) => self.fail(e),
            Ok(empty) => {
                if empty && self.closing {
                    self.close("host disconnected the queue", None);
                    return;
                }
                let want = !empty;
                if want != self.want_out {
                    self.want_out = want;
                    let _ = self.notifier.modify(self.fd, want);
                }
            }
        }
    }

    /// The association ended, the controller was reset, or keep-alive expired.
    fn housekeeping(&mut self) {
        if self.assoc.dead.load(Ordering::Acquire) {
            self.close("association ended", None);
            return;
        }
        if self.qid != 0 {
            if self.assoc.epoch.load(Ordering::Acquire) != self.epoch {
                self.close("controller reset", None);
            }
            return;
        }
        // Namespaces attached or detached: the controller holds events for the host.
        let gen = self.sub.ns_gen();
        if gen != self.ns_gen {
            self.ns_gen = gen;
            self.events();
        }
        // The admin queue's poller may sleep up to a second between rounds: look at the clock
        // every round (admin queues are few; I/O queues never get here).
        let expired = self
            .assoc
            .ctrl
            .lock()
            .map(|c| c.keep_alive_expired(Instant::now()))
            .unwrap_or(false);
        if expired {
            inc(&self.sub.stats.keep_alive_timeouts);
            self.close("keep-alive timeout", None);
        }
    }
}

impl Port for TcpQueue {
    fn submit(&mut self, sq: &mut Submitter) -> usize {
        if self.finished {
            return 0;
        }
        self.housekeeping();
        let mut work = 0;
        for _ in 0..RX_BUDGET {
            if self.finished {
                return work;
            }
            match self
                .rx
                .poll(self.fd, Role::Controller, &self.params, &self.limits)
            {
                Ok(RxEvent::Idle) => break,
                Ok(RxEvent::Header) => {
                    if let Err(f) = self.on_header() {
                        self.close(&format!("protocol error: {f}"), Some(f));
                        return work;
                    }
                }
                Ok(RxEvent::Pdu { digest_ok }) => {
                    work += 1;
                    if let Err(e) = self.on_pdu(digest_ok) {
                        self.fail(e);
                        return work;
                    }
                }
                Err(e) => {
                    self.fail(e);
                    return work;
                }
            }
        }
        // Commands whose data is complete go to the queue pair, in order.
        let wce = self.assoc.wce.load(Ordering::Relaxed);
        while let Some(&s) = self.ready.front() {
            let slot = self.slots[s as usize];
            let addr = self.pool.addr(s as usize);
            let r = sq.submit_with(|cid, sqe, _| {
                *sqe = slot.sqe;
                sqe.set_cid(cid);
                if slot.len > 0 {
                    sqe.set_sgl1(SglDescriptor::data(addr, slot.len));
                } else {
                    sqe.dptr = [0, 0];
                }
                if !wce && sqe.opcode() == io::WRITE {
                    sqe.set_fua(true);
                }
                Ok::<(), ()>(())
            });
            let Ok(qcid) = r else { break };
            if let Some(b) = self.by_qcid.get_mut(qcid as usize) {
                *b = s;
            }
            self.slots[s as usize].state = SlotState::Executing;
            self.ready.pop_front();
            work += 1;
        }
        self.flush_tx();
        work
    }

    fn complete(&mut self, sq: &mut Submitter) -> usize {
        let mut n = 0;
        while let Some(cqe) = sq.reap() {
            n += 1;
            let Some(&s) = self.by_qcid.get(cqe.cid() as usize) else {
                continue;
            };
            if self.finished {
                self.free_slot(s);
                continue;
            }
            let slot = self.slots[s as usize];
            let st = cqe.status();
            let len = if st.is_success() && slot.dir == Dir::ToHost {
                slot.len as usize
            } else {
                0
            };
            self.respond(s, st, cqe.dw0(), 0, len);
        }
        sq.release_completions();
        if n > 0 {
            self.flush_tx();
        }
        n
    }

    fn arm(&mut self) -> bool {
        // A header or data already staged is work the socket will not announce again.
        !self.finished && (self.rx.buffered() || !self.ready.is_empty())
    }

    fn disarm(&mut self) {}

    fn address_space(&self) -> &Arc<AddressSpace> {
        if self.qid == 0 {
            &self.empty
        } else {
            self.pool.address_space()
        }
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.notifier.fd())
    }

    fn finished(&self) -> bool {
        self.finished
    }
    fn namespaces_changed(&mut self) -> Option<Arc<Namespaces>> {
        if self.qid == 0 || self.discovery {
            return None;
        }
        let gen = self.sub.ns_gen();
        if gen == self.ns_gen {
            return None;
        }
        self.ns_gen = gen;
        let new = self.sub.namespaces();
        // Commands received for a namespace that has since gone (or been replaced) must not
        // reach whatever now has their NSID: they fail with Invalid Namespace.
        let gone: Vec<u32> = Namespaces::changed(&self.nss, &new)
            .filter(|&(_, had)| had)
            .map(|(nsid, _)| nsid)
            .collect();
        if !gone.is_empty() {
            for s in 0..self.slots.len() {
                let slot = self.slots[s];
                if !gone.contains(&slot.sqe.nsid()) {
                    continue;
                }
                match slot.state {
                    SlotState::Receiving => {
                        let f = &mut self.slots[s].failed;
                        *f = f.or(Some(Status::INVALID_NAMESPACE));
                    }
                    SlotState::Ready => {
                        self.ready.retain(|&r| r as usize != s);
                        self.respond(s as u16, Status::INVALID_NAMESPACE, 0, 0, 0);
                    }
                    _ => {}
                }
            }
        }
        if let Err(e) = self.map_pool(&new) {
            crate::log_limited!(
                log::Level::Error,
                "NVMe/TCP queue {}: cannot map its buffers for a new namespace's device: {e}",
                self.qid
            );
        }
        self.nss = new.clone();
        Some(new)
    }
    fn prepared_queue(&mut self, nsid: u32) -> Option<Box<dyn BackendQueue>> {
        self.sub.prepared_queue(nsid)
    }
}

impl Drop for TcpQueue {
    fn drop(&mut self) {
        // Its counters join the subsystem's totals (the poller counts nothing after this).
        self.publish_pdus();
        // Under the list's lock, so a reader never counts them twice or not at all.
        if let Ok(mut v) = self.sub.queues.lock() {
            self.sub.closed.absorb(&self.stats);
            v.retain(|w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.stats)));
        }
        for s in 0..self.slots.len() {
            if self.slots[s].admitted {
                self.slots[s].admitted = false;
                self.sub.inflight.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if self.qid == 0 {
            self.sub.end_association(self.assoc.cntlid);
        }
    }
}
