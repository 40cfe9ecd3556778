//! The NVMe/TCP initiator back end: a remote namespace (on a `leapd target`, Linux nvmet, SPDK
//! or any NVMe/TCP target) as a disk. It speaks NVMe itself ([`Backend::nvme_native`]): the
//! executor hands it the guest's command as it is, with iovecs into guest memory, and it sends
//! that command (renumbered) and moves the data between the socket and guest memory directly.
//!
//! - A control thread owns the admin queue: connect, enable, Identify, Number of Queues, Host
//!   Behavior Support (ACRE, so the target may ask for retry delays), then Keep Alive at half the
//!   keep-alive timeout. It also (re)connects I/O queues on their behalf, so a poller never
//!   blocks on a handshake.
//! - Each poller's [`BackendQueue`] is one I/O queue: non-blocking socket, commands in a table
//!   keyed by command id. A command the target answers with a retryable status (DNR clear) is
//!   sent again after the Command Retry Delay its CRD selects, with random jitter so retries do
//!   not arrive together, until the configured timeout.
//! - On connection loss the queue asks the control thread for a new connection and, once it has
//!   one, sends again every command that had not completed. An outage shorter than the timeout is
//!   a stall for the guest; past it, commands fail with Transient Transport Error (DNR).

use super::conn::{ConnError, Pieces, Rx, RxEvent, Tx};
use super::fabrics;
use super::host::{HostConn, HostError, HostIdentity};
use super::pdu::{self, DataDigest, DataHdr, Limits, Role};
use crate::backend::{
    Backend, BackendError, BackendQueue, DiskInfo, IoRequest, Submitted, MAX_IOVECS,
};
use crate::log_limited;
use crate::notify::Notifier;
use leap_queues::nvme::{admin, cns, feature, StatusCodeType};
use leap_queues::{Sqe, Status};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the disk is and how to reach it.
#[derive(Clone, Debug)]
pub struct InitiatorConfig {
    /// Target address.
    pub addr: SocketAddr,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Namespace ID.
    pub nsid: u32,
    /// I/O queues to ask for (one per poller queue that opens).
    pub queues: u16,
    /// Entries per I/O queue.
    pub depth: u16,
    /// Ask for header and data digests.
    pub digests: bool,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// How long a command may wait (outages, retries) before it fails.
    pub timeout: Duration,
}

impl InitiatorConfig {
    /// A host NQN and ID derived from the machine (stable across runs).
    pub fn default_host() -> (String, [u8; 16]) {
        let seed = std::fs::read_to_string("/etc/machine-id")
            .unwrap_or_else(|_| "leap-host".into())
            .trim()
            .to_string();
        let a = crc32c::crc32c(seed.as_bytes());
        let b = crc32c::crc32c_append(a, b"hostid-1");
        let c = crc32c::crc32c_append(b, b"hostid-2");
        let d = crc32c::crc32c_append(c, b"hostid-3");
        let mut id = [0u8; 16];
        for (k, w) in [a, b, c, d].iter().enumerate() {
            id[k * 4..k * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        id[6] = (id[6] & 0x0f) | 0x80; // UUID version 8
        id[8] = (id[8] & 0x3f) | 0x80;
        let h = id.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        (format!("nqn.2014-08.org.nvmexpress:uuid:{uuid}"), id)
    }
}

/// Counters of an initiator (relaxed atomics).
#[derive(Debug, Default)]
pub struct InitiatorStats {
    /// Connections (admin and I/O) re-established after a loss.
    pub reconnects: AtomicU64,
    /// Commands sent again after a retryable status.
    pub retries: AtomicU64,
    /// Commands sent again after a connection loss.
    pub resent: AtomicU64,
    /// Commands failed because their timeout passed.
    pub timeouts: AtomicU64,
    /// Protocol errors from the target (connection ended).
    pub protocol_errors: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the admin queue learned, shared with the I/O queues.
#[derive(Clone, Copy, Debug, Default)]
struct CtrlView {
    cntlid: u16,
    /// Bumped on every (re)connected association.
    gen: u64,
    connected: bool,
    granted: u16,
    /// Largest in-capsule data on I/O queues.
    max_icd: u32,
    /// Command Retry Delay Times (100 ms units).
    crdt: [u16; 3],
}

/// A request for an I/O queue connection, and where the control thread puts it.
struct Link {
    qid: u16,
    entries: u16,
    ready: Mutex<Option<HostConn>>,
    /// Set (Release) after `ready` is filled, so the queue looks at the lock only then.
    delivered: AtomicBool,
    efd: OwnedFd,
    wanted: AtomicBool,
    cancelled: AtomicBool,
}

struct Shared {
    cfg: InitiatorConfig,
    who: HostIdentity,
    view: Mutex<CtrlView>,
    /// `view.gen`, readable without the lock (queues compare it every poll).
    gen: AtomicU64,
    links: Mutex<Vec<Arc<Link>>>,
    wake: Condvar,
    wake_lock: Mutex<bool>,
    stop: AtomicBool,
    free_qids: Mutex<VecDeque<u16>>,
    stats: InitiatorStats,
}

impl Shared {
    fn view(&self) -> CtrlView {
        self.view.lock().map(|v| *v).unwrap_or_default()
    }
    fn poke(&self) {
        if let Ok(mut w) = self.wake_lock.lock() {
            *w = true;
            self.wake.notify_all();
        }
    }
}

/// A remote namespace over NVMe/TCP.
pub struct NvmeTcpBackend {
    info: DiskInfo,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn keep_alive_ms(timeout: Duration) -> u32 {
    // Keep-alive timeout: 10 s, or less when commands time out sooner.
    timeout.as_millis().clamp(2000, 10_000) as u32
}

/// Connects and enables the admin queue; returns it with Identify Controller's bytes.
fn admin_connect(sh: &Shared) -> Result<(HostConn, Vec<u8>, u16), HostError> {
    let cfg = &sh.cfg;
    let t = Duration::from_secs(5).min(cfg.timeout.max(Duration::from_secs(1)));
    let mut a = HostConn::connect(
        cfg.addr,
        &sh.who,
        0,
        32,
        fabrics::CNTLID_DYNAMIC,
        keep_alive_ms(cfg.timeout),
        cfg.digests,
        t,
    )?;
    use fabrics::{property_get_sqe, property_set_sqe, property_value, reg, PropSize};
    let cap = property_value(&a.ok(
        "Property Get CAP",
        property_get_sqe(0, reg::CAP, PropSize::Eight),
        &[],
        None,
    )?);
    let cc = u64::from(crate::controller::cc::ENABLE);
    a.ok(
        "Property Set CC",
        property_set_sqe(0, reg::CC, PropSize::Four, cc),
        &[],
        None,
    )?;
    let to = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1)).min(Duration::from_secs(30));
    let until = Instant::now() + to;
    loop {
        let csts = property_value(&a.ok(
            "Property Get CSTS",
            property_get_sqe(0, reg::CSTS, PropSize::Four),
            &[],
            None,
        )?);
        if csts & 2 != 0 {
            return Err(HostError::Protocol(
                "controller fatal status (CSTS.CFS)".into(),
            ));
        }
        if csts & 1 != 0 {
            break;
        }
        if Instant::now() > until {
            return Err(HostError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut idc = vec![0u8; 4096];
    let mut s = Sqe::new(admin::IDENTIFY, 0);
    s.set_cdw(10, cns::CONTROLLER as u32);
    a.ok("Identify Controller", s, &[], Some(&mut idc))?;
    let mut s = Sqe::new(admin::SET_FEATURES, 0);
    let q = cfg.queues.max(1) as u32 - 1;
    s.set_cdw(10, feature::NUMBER_OF_QUEUES as u32);
    s.set_cdw(11, q | (q << 16));
    let c = a.ok("Set Features Number of Queues", s, &[], None)?;
    let granted = ((c.dw0() & 0xffff) as u16)
        .saturating_add(1)
        .min(cfg.queues.max(1));
    if le16(&idc, 134) != 0 {
        // Host Behavior Support: ACRE, so the controller may ask for retry delays.
        let mut hbs = [0u8; 512];
        hbs[0] = 1;
        let mut s = Sqe::new(admin::SET_FEATURES, 0);
        s.set_cdw(10, feature::HOST_BEHAVIOR_SUPPORT as u32);
        if let Err(e) = a.ok("Set Features Host Behavior Support", s, &hbs, None) {
            log::warn!("nvme-tcp {}: {e}; retry delays stay off", cfg.addr);
        }
    }
    Ok((a, idc, granted))
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn view_of(idc: &[u8], cntlid: u16, gen: u64, granted: u16) -> CtrlView {
    let ioccsz = le32(idc, 1792);
    CtrlView {
        cntlid,
        gen,
        connected: true,
        granted,
        max_icd: ioccsz.saturating_sub(4).saturating_mul(16),
        crdt: [le16(idc, 134), le16(idc, 136), le16(idc, 138)],
    }
}

impl NvmeTcpBackend {
    /// Connects to the target, identifies the namespace and starts the control thread.
    pub fn open(cfg: InitiatorConfig) -> Result<Arc<NvmeTcpBackend>, BackendError> {
        let who = HostIdentity {
            hostnqn: cfg.hostnqn.clone(),
            hostid: cfg.hostid,
            subnqn: cfg.subnqn.clone(),
        };
        let name = format!("nvme-tcp://{}/{}/{}", cfg.addr, cfg.subnqn, cfg.nsid);
        let err = |e: HostError| BackendError::Io {
            what: "cannot attach",
            path: name.clone(),
            source: std::io::Error::other(e.to_string()),
        };
        let sh = Arc::new(Shared {
            who,
            view: Mutex::new(CtrlView::default()),
            gen: AtomicU64::new(1),
            links: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
            stop: AtomicBool::new(false),
            free_qids: Mutex::new(VecDeque::new()),
            stats: InitiatorStats::default(),
            cfg,
        });
        let (mut a, idc, granted) = admin_connect(&sh).map_err(err)?;
        let mut idn = vec![0u8; 4096];
        let mut s = Sqe::new(admin::IDENTIFY, 0);
        s.set_nsid(sh.cfg.nsid);
        s.set_cdw(10, cns::NAMESPACE as u32);
        a.ok("Identify Namespace", s, &[], Some(&mut idn))
            .map_err(err)?;
        let c = crate::backend::ident::ControllerIdent::parse(&idc)?;
        // MDTS, in units of the minimum memory page size (CAP.MPSMIN, 4 KiB here).
        let info = crate::backend::ident::namespace_info(
            &c,
            &idn,
            &name,
            sh.cfg.nsid,
            c.max_transfer(4096),
        )?;
        let (serial, block_size) = (c.serial.clone(), info.block_size);
        if let Ok(mut v) = sh.view.lock() {
            *v = view_of(&idc, a.cntlid, 1, granted);
        }
        if let Ok(mut f) = sh.free_qids.lock() {
            f.extend(1..=granted);
        }
        log::info!(
            "{name}: controller {} ({serial}), {} bytes in {block_size}-byte blocks, {granted} I/O queue(s){}",
            a.cntlid,
            info.size,
            if a.params.hdgst { ", digests" } else { "" }
        );
        let s2 = sh.clone();
        let thread = std::thread::Builder::new()
            .name("leap-nvmf-ctl".into())
            .spawn(move || control(s2, Some(a)))
            .map_err(|e| BackendError::Io {
                what: "cannot start the control thread for",
                path: name.clone(),
                source: e,
            })?;
        Ok(Arc::new(NvmeTcpBackend {
            info,
            shared: sh,
            thread: Some(thread),
        }))
    }

    /// Counters.
    pub fn stats(&self) -> &InitiatorStats {
        &self.shared.stats
    }
}

impl Drop for NvmeTcpBackend {
    fn drop(&mut self) {
        let st = &self.shared.stats;
        log::info!(
            "nvme-tcp {}: totals: reconnects={} resent={} retries={} timeouts={} protocol_errors={}",
            self.shared.cfg.addr,
            st.reconnects.load(Ordering::Relaxed),
            st.resent.load(Ordering::Relaxed),
            st.retries.load(Ordering::Relaxed),
            st.timeouts.load(Ordering::Relaxed),
            st.protocol_errors.load(Ordering::Relaxed)
        );
        self.shared.stop.store(true, Ordering::Release);
        self.shared.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The control thread: keeps the admin queue alive and connects I/O queues.
fn control(sh: Arc<Shared>, mut admin: Option<HostConn>) {
    let ka = Duration::from_millis(keep_alive_ms(sh.cfg.timeout) as u64 / 2);
    let mut next_ka = Instant::now() + ka;
    let mut backoff = Duration::from_millis(50);
    let mut retry_at = Instant::now();
    let mut gen = 1u64;
    while !sh.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if admin.is_none() && now >= retry_at {
            match admin_connect(&sh) {
                Ok((a, idc, granted)) => {
                    gen += 1;
                    inc(&sh.stats.reconnects);
                    log::info!(
                        "nvme-tcp {}: admin queue reconnected (controller {})",
                        sh.cfg.addr,
                        a.cntlid
                    );
                    if let Ok(mut v) = sh.view.lock() {
                        *v = view_of(&idc, a.cntlid, gen, granted);
                    }
                    sh.gen.store(gen, Ordering::Release);
                    admin = Some(a);
                    backoff = Duration::from_millis(50);
                    next_ka = Instant::now() + ka;
                }
                Err(e) => {
                    log_limited!(
                        log::Level::Warn,
                        "nvme-tcp {}: reconnecting: {e}",
                        sh.cfg.addr
                    );
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        if let Some(a) = admin.as_mut() {
            let mut lost = false;
            // I/O queues waiting for a connection.
            let links: Vec<Arc<Link>> = sh
                .links
                .lock()
                .map(|l| {
                    l.iter()
                        .filter(|k| k.wanted.load(Ordering::Acquire))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let view = sh.view();
            for l in links {
                if l.cancelled.load(Ordering::Acquire) {
                    continue;
                }
                let t = Duration::from_secs(5).min(sh.cfg.timeout.max(Duration::from_secs(1)));
                match HostConn::connect(
                    sh.cfg.addr,
                    &sh.who,
                    l.qid,
                    l.entries,
                    view.cntlid,
                    0,
                    sh.cfg.digests,
                    t,
                ) {
                    Ok(c) => {
                        if let Ok(mut r) = l.ready.lock() {
                            *r = Some(c);
                        }
                        l.delivered.store(true, Ordering::Release);
                        l.wanted.store(false, Ordering::Release);
                        crate::eventfd::signal(l.efd.as_raw_fd());
                    }
                    Err(e) => {
                        log_limited!(
                            log::Level::Warn,
                            "nvme-tcp {}: I/O queue {}: {e}",
                            sh.cfg.addr,
                            l.qid
                        );
                        // The association may be gone (target restarted): start over.
                        lost = true;
                        break;
                    }
                }
            }
            if !lost && Instant::now() >= next_ka {
                match a.ok("Keep Alive", Sqe::new(admin::KEEP_ALIVE, 0), &[], None) {
                    Ok(_) => next_ka = Instant::now() + ka,
                    Err(e) => {
                        log_limited!(
                            log::Level::Warn,
                            "nvme-tcp {}: keep alive: {e}",
                            sh.cfg.addr
                        );
                        lost = true;
                    }
                }
            }
            if lost {
                admin = None;
                if let Ok(mut v) = sh.view.lock() {
                    v.connected = false;
                }
                retry_at = Instant::now() + backoff;
                continue;
            }
        }
        // Sleep until the next keep-alive, reconnect attempt or request.
        let until = if admin.is_some() { next_ka } else { retry_at };
        let wait = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        if let Ok(mut w) = sh.wake_lock.lock() {
            if !*w {
                w = sh
                    .wake
                    .wait_timeout(w, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            *w = false;
        }
    }
    if let Some(mut a) = admin {
        // A clean shutdown: tell the controller (CC.SHN normal) so it flushes.
        let _ = a.command(
            fabrics::property_set_sqe(
                0,
                fabrics::reg::CC,
                fabrics::PropSize::Four,
                u64::from(crate::controller::cc::ENABLE | crate::controller::cc::SHN_NORMAL),
            ),
            &[],
            None,
        );
    }
}

impl Backend for Arc<NvmeTcpBackend> {
    fn info(&self) -> &DiskInfo {
        &self.as_ref().info
    }
    fn open_queue(&self, depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
        let sh = &self.shared;
        let qid = sh
            .free_qids
            .lock()
            .ok()
            .and_then(|mut f| f.pop_front())
            .ok_or_else(|| {
                BackendError::Invalid(format!(
                    "nvme-tcp {}: all {} I/O queues are in use (raise queues=)",
                    sh.cfg.addr,
                    sh.view().granted
                ))
            })?;
        let entries = (sh.cfg.depth as usize).min(depth.max(2)).max(2) as u16;
        let q = IoQueue::new(sh.clone(), qid, entries).map_err(|e| BackendError::Io {
            what: "cannot set up a queue for",
            path: sh.cfg.addr.to_string(),
            source: e,
        });
        let mut q = match q {
            Ok(q) => q,
            Err(e) => {
                if let Ok(mut f) = sh.free_qids.lock() {
                    f.push_back(qid);
                }
                return Err(e);
            }
        };
        // Wait (bounded) for the first connection, so a dead target fails the attach clearly.
        let until = Instant::now() + sh.cfg.timeout.min(Duration::from_secs(10));
        while q.conn.is_none() && Instant::now() < until {
            q.pick_up_link();
            if q.conn.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if q.conn.is_none() {
            log::warn!(
                "nvme-tcp {}: I/O queue {qid} not connected yet; commands wait for it",
                sh.cfg.addr
            );
        }
        Ok(Box::new(q))
    }
    fn kind(&self) -> &'static str {
        "nvme-tcp"
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats();
        [
            ("reconnects", &s.reconnects),
            ("retries", &s.retries),
            ("resent", &s.resent),
            ("timeouts", &s.timeouts),
            ("protocol_errors", &s.protocol_errors),
        ]
        .into_iter()
        .map(|(n, c)| (n, c.load(Ordering::Relaxed)))
        .collect()
    }
    fn nvme_native(&self) -> bool {
        true
    }
}

/// Where a command is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Free,
    /// Waiting to be sent (new, or again after a loss or a retryable status).
    Queued,
    /// On the wire.
    Sent,
    /// Waiting out a retry delay.
    Delayed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    None,
    Out,
    In,
}

#[derive(Clone, Copy)]
struct Slot {
    st: St,
    tag: u64,
    sqe: Sqe,
    dir: Dir,
    len: u32,
    niov: usize,
    /// C2H bytes received so far.
    got: u32,
    bad_digest: bool,
    deadline: Instant,
    retry_at: Instant,
}

/// The connection of an I/O queue.
struct Conn {
    host: HostConn,
    fd: RawFd,
    rx: Rx,
    tx: Tx,
}

/// One I/O queue (one per poller queue).
struct IoQueue {
    sh: Arc<Shared>,
    qid: u16,
    entries: u16,
    link: Arc<Link>,
    conn: Option<Conn>,
    gen: u64,
    notifier: Notifier,
    timer: OwnedFd,
    timer_on: bool,
    slots: Vec<Slot>,
    free: Vec<u16>,
    iovs: Vec<libc::iovec>,
    /// One iovec list per slot describing a data window (R2T or C2H), for `Pieces`.
    sendq: VecDeque<u16>,
    /// Commands finished with a final status, to report from `poll`.
    done: VecDeque<(u64, Status)>,
    rng: u64,
    max_icd: u32,
    crdt: [u16; 3],
}

// SAFETY: the iovecs point into guest memory the submitter keeps valid until completion (see
// `BackendQueue::submit`); the queue is used by one poller thread at a time.
unsafe impl Send for IoQueue {}

fn timerfd() -> std::io::Result<OwnedFd> {
    // SAFETY: timerfd_create has no memory-safety preconditions; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const TICK: Duration = Duration::from_millis(10);

impl IoQueue {
    fn new(sh: Arc<Shared>, qid: u16, entries: u16) -> std::io::Result<IoQueue> {
        let link = Arc::new(Link {
            qid,
            entries,
            ready: Mutex::new(None),
            delivered: AtomicBool::new(false),
            efd: crate::eventfd::new()?,
            wanted: AtomicBool::new(true),
            cancelled: AtomicBool::new(false),
        });
        let notifier = Notifier::new()?;
        notifier.add(link.efd.as_raw_fd(), false)?;
        let timer = timerfd()?;
        notifier.add(timer.as_raw_fd(), false)?;
        if let Ok(mut l) = sh.links.lock() {
            l.retain(|k| !k.cancelled.load(Ordering::Acquire));
            l.push(link.clone());
        }
        sh.poke();
        let now = Instant::now();
        let view = sh.view();
        Ok(IoQueue {
            qid,
            entries,
            link,
            conn: None,
            gen: view.gen,
            notifier,
            timer,
            timer_on: false,
            slots: vec![
                Slot {
                    st: St::Free,
                    tag: 0,
                    sqe: Sqe::default(),
                    dir: Dir::None,
                    len: 0,
                    niov: 0,
                    got: 0,
                    bad_digest: false,
                    deadline: now,
                    retry_at: now,
                };
                entries as usize
            ],
            free: (0..entries).rev().collect(),
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                entries as usize * MAX_IOVECS
            ],
            sendq: VecDeque::with_capacity(entries as usize),
            done: VecDeque::with_capacity(entries as usize),
            rng: 0x9e37_79b9_7f4a_7c15 ^ (qid as u64) << 32 ^ now.elapsed().as_nanos() as u64,
            max_icd: view.max_icd,
            crdt: view.crdt,
            sh,
        })
    }

    /// Takes a connection the control thread made for us.
    fn pick_up_link(&mut self) {
        crate::eventfd::drain(self.link.efd.as_raw_fd());
        if !self.link.delivered.swap(false, Ordering::Acquire) {
            return;
        }
        let Some(host) = self.link.ready.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let fd = host.sock.as_raw_fd();
        if self.notifier.add(fd, false).is_err() {
            return;
        }
        let view = self.sh.view();
        self.max_icd = view.max_icd;
        self.crdt = view.crdt;
        self.gen = view.gen;
        let resend = self.conn.is_none() && self.slots.iter().any(|s| s.st == St::Queued);
        self.conn = Some(Conn {
            host,
            fd,
            rx: Rx::new(),
            tx: Tx::new(self.entries as usize * 3 + 16),
        });
        // Everything not yet answered goes out again, oldest command id first.
        self.sendq.clear();
        for k in 0..self.slots.len() {
            if self.slots[k].st == St::Queued {
                self.sendq.push_back(k as u16);
            }
        }
        if resend {
            log::info!(
                "nvme-tcp {}: I/O queue {} connected; sending {} command(s) again",
                self.sh.cfg.addr,
                self.qid,
                self.sendq.len()
            );
        }
    }

    /// The connection is gone: every command on the wire waits for the next one.
    fn lose(&mut self, why: &str) {
        let Some(c) = self.conn.take() else { return };
        self.notifier.remove(c.fd);
        drop(c);
        let mut n = 0;
        for s in self.slots.iter_mut() {
            if s.st == St::Sent {
                s.st = St::Queued;
                s.got = 0;
                n += 1;
            }
        }
        self.sh.stats.resent.fetch_add(n, Ordering::Relaxed);
        log_limited!(
            log::Level::Warn,
            "nvme-tcp {}: I/O queue {} lost its connection ({why}); {n} command(s) wait for a new one",
            self.sh.cfg.addr,
            self.qid
        );
        inc(&self.sh.stats.reconnects);
        self.link.wanted.store(true, Ordering::Release);
        self.sh.poke();
        self.arm_timer(true);
    }

    fn arm_timer(&mut self, on: bool) {
        if on == self.timer_on {
            return;
        }
        self.timer_on = on;
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts(if on { TICK } else { Duration::ZERO }),
            it_value: ts(if on { TICK } else { Duration::ZERO }),
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut());
        }
    }

    fn jitter(&mut self, base: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        // base × [1, 2): spread retries so they do not arrive together.
        base + base.mul_f64((self.rng >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// Queues slot `k`'s command (and in-capsule data) on the connection.
    fn send(&mut self, k: u16) -> bool {
        let Some(c) = self.conn.as_mut() else {
            return false;
        };
        let s = &mut self.slots[k as usize];
        let mut sqe = s.sqe;
        sqe.set_cid(k);
        sqe.set_nsid(self.sh.cfg.nsid);
        let inline = s.dir == Dir::Out && s.len <= self.max_icd;
        sqe.set_sgl1(if inline {
            pdu::icd_sgl(s.len)
        } else {
            pdu::transport_sgl(if s.dir == Dir::None { 0 } else { s.len })
        });
        let icd = if inline { s.len } else { 0 };
        let Ok(hdr) = pdu::encode_capsule_cmd(&sqe, icd, &c.host.params) else {
            return false;
        };
        let base = k as usize * MAX_IOVECS;
        let ok = if icd > 0 {
            // SAFETY: the slot's iovecs (in `self.iovs`, never resized) describe guest memory
            // valid until the command completes.
            let p = unsafe { Pieces::new(self.iovs[base..].as_ptr(), s.niov, 0) };
            let digest = c
                .host
                .params
                .ddgst
                .then(|| digest_of(&self.iovs[base..base + s.niov], 0, icd as usize));
            c.tx.push_data(hdr, Some(p), icd as usize, digest, None)
        } else {
            c.tx.push(hdr, None)
        };
        if ok {
            s.st = St::Sent;
            s.got = 0;
            s.bad_digest = false;
        }
        ok
    }

    /// Handles one received PDU header.
    fn on_header(&mut self) -> Result<(), ConnError> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        match c.rx.common().pdu_type {
            pdu::pdu_type::C2H_DATA => {
                let h = pdu::decode_data_hdr(c.rx.header()).map_err(ConnError::Fatal)?;
                let s = self
                    .slots
                    .get(h.cccid as usize)
                    .filter(|s| s.st == St::Sent && s.dir == Dir::In)
                    .ok_or(ConnError::Fatal(pdu::Fatal::invalid_field(
                        pdu::field::CCCID,
                    )))?;
                h.validate(c.rx.layout(), s.len).map_err(ConnError::Fatal)?;
                if h.datao != s.got {
                    return Err(ConnError::Fatal(pdu::Fatal::sequence()));
                }
                let base = h.cccid as usize * MAX_IOVECS;
                // SAFETY: the slot's iovecs describe guest memory the executor translated,
                // valid and reserved for this read until the command completes.
                let p =
                    unsafe { Pieces::new(self.iovs[base..].as_ptr(), s.niov, h.datao as usize) };
                c.rx.set_sink(p);
            }
            pdu::pdu_type::R2T => {
                let r = pdu::decode_r2t(c.rx.header()).map_err(ConnError::Fatal)?;
                let s = *self
                    .slots
                    .get(r.cccid as usize)
                    .filter(|s| s.st == St::Sent && s.dir == Dir::Out)
                    .ok_or(ConnError::Fatal(pdu::Fatal::invalid_field(
                        pdu::field::CCCID,
                    )))?;
                r.validate(s.len).map_err(ConnError::Fatal)?;
                let base = r.cccid as usize * MAX_IOVECS;
                let max = c.host.params.maxh2cdata.max(4096);
                let mut off = r.r2to;
                let end = r.r2to + r.r2tl;
                while off < end {
                    let n = (end - off).min(max);
                    let hdr = pdu::encode_h2c_data(
                        &DataHdr {
                            cccid: r.cccid,
                            ttag: r.ttag,
                            datao: off,
                            datal: n,
                            last: off + n == end,
                            success: false,
                        },
                        &c.host.params,
                    )
                    .map_err(|_| ConnError::Fatal(pdu::Fatal::out_of_range()))?;
                    let digest = c.host.params.ddgst.then(|| {
                        digest_of(&self.iovs[base..base + s.niov], off as usize, n as usize)
                    });
                    // SAFETY: as for C2H: guest memory valid until the command completes.
                    let p =
                        unsafe { Pieces::new(self.iovs[base..].as_ptr(), s.niov, off as usize) };
                    if !c.tx.push_data(hdr, Some(p), n as usize, digest, None) {
                        return Err(ConnError::Fatal(pdu::Fatal::limit_exceeded()));
                    }
                    off += n;
                }
            }
            pdu::pdu_type::CAPSULE_RESP => {}
            pdu::pdu_type::C2H_TERM_REQ => {
                let (fes, fei) = pdu::decode_term(c.rx.header()).map_err(ConnError::Fatal)?;
                return Err(ConnError::Terminated { fes, fei });
            }
            _ => return Err(ConnError::Fatal(pdu::Fatal::sequence())),
        }
        Ok(())
    }

    /// Handles a complete PDU.
    fn on_pdu(&mut self, digest_ok: bool) -> Result<(), ConnError> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        match c.rx.common().pdu_type {
            pdu::pdu_type::C2H_DATA => {
                let h = pdu::decode_data_hdr(c.rx.header()).map_err(ConnError::Fatal)?;
                let s = &mut self.slots[h.cccid as usize];
                s.got += h.datal;
                s.bad_digest |= !digest_ok;
                if h.success && h.last {
                    let k = h.cccid;
                    self.finish(k, Status::SUCCESS);
                }
            }
            pdu::pdu_type::CAPSULE_RESP => {
                let cqe = pdu::decode_capsule_resp(c.rx.header()).map_err(ConnError::Fatal)?;
                let k = cqe.cid();
                if self.slots.get(k as usize).is_none_or(|s| s.st != St::Sent) {
                    return Err(ConnError::Fatal(pdu::Fatal::invalid_field(8)));
                }
                let mut st = cqe.status();
                if st.is_success() && self.slots[k as usize].bad_digest {
                    st = pdu::TRANSIENT_TRANSPORT_ERROR;
                }
                self.finish(k, st);
            }
            _ => {}
        }
        Ok(())
    }

    /// A final answer for slot `k`: done, or retried after its delay if the status allows.
    fn finish(&mut self, k: u16, st: Status) {
        let now = Instant::now();
        let s = self.slots[k as usize];
        if !st.is_success() && !st.dnr() && now < s.deadline {
            let base = match st.crd() {
                0 => Duration::from_millis(10),
                n => Duration::from_millis(100 * self.crdt[(n - 1) as usize].max(1) as u64),
            };
            let d = self.jitter(base);
            let slot = &mut self.slots[k as usize];
            slot.st = St::Delayed;
            slot.retry_at = now + d;
            inc(&self.sh.stats.retries);
            self.arm_timer(true);
            return;
        }
        self.slots[k as usize].st = St::Free;
        self.free.push(k);
        self.done.push_back((s.tag, st));
    }

    /// Retries whose delay passed, commands whose deadline passed.
    fn tick(&mut self) {
        let now = Instant::now();
        let mut attention = false;
        for k in 0..self.slots.len() {
            let s = self.slots[k];
            match s.st {
                St::Free => continue,
                St::Sent if self.conn.is_some() && now < s.deadline => continue,
                St::Sent => {
                    // The target holds it past its deadline: reset the connection.
                    self.lose("command timed out");
                    attention = true;
                    continue;
                }
                _ => {}
            }
            if now >= s.deadline {
                inc(&self.sh.stats.timeouts);
                log_limited!(
                    log::Level::Warn,
                    "nvme-tcp {}: command {:#x} failed after {:?} (target unreachable or overloaded)",
                    self.sh.cfg.addr,
                    s.sqe.opcode(),
                    self.sh.cfg.timeout
                );
                self.slots[k].st = St::Free;
                self.free.push(k as u16);
                self.done.push_back((s.tag, TIMED_OUT));
                continue;
            }
            attention = true;
            if s.st == St::Delayed && now >= s.retry_at {
                self.slots[k].st = St::Queued;
                if self.conn.is_some() {
                    self.sendq.push_back(k as u16);
                }
            }
        }
        if !attention && self.conn.is_some() {
            self.arm_timer(false);
        }
    }
}

/// CRC32C of `len` bytes from byte `skip` of the memory `iov` describes.
fn digest_of(iov: &[libc::iovec], mut skip: usize, mut len: usize) -> [u8; 4] {
    let mut d = DataDigest::new();
    for v in iov {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len);
        // SAFETY: the iovec describes guest memory valid for the command's lifetime; the range
        // [skip, skip + n) lies inside it.
        let b = unsafe { std::slice::from_raw_parts((v.iov_base as *const u8).add(skip), n) };
        d.update(b);
        len -= n;
        skip = 0;
    }
    d.to_bytes()
}

impl BackendQueue for IoQueue {
    fn room(&self) -> usize {
        self.free.len()
    }
    fn depth(&self) -> usize {
        self.entries as usize
    }

    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
        let Some(cmd) = req.cmd else {
            return Submitted::Done(Status::INTERNAL_ERROR);
        };
        if req.iov.len() > MAX_IOVECS {
            return Submitted::Done(Status::INVALID_SGL_COUNT);
        }
        let Some(k) = self.free.pop() else {
            return Submitted::Done(Status::INTERNAL_ERROR);
        };
        let base = k as usize * MAX_IOVECS;
        self.iovs[base..base + req.iov.len()].copy_from_slice(req.iov);
        let len: usize = req.iov.iter().map(|v| v.iov_len).sum();
        let dir = match cmd.opcode() & 3 {
            _ if len == 0 => Dir::None,
            1 => Dir::Out,
            2 => Dir::In,
            _ => Dir::None,
        };
        let now = Instant::now();
        self.slots[k as usize] = Slot {
            st: St::Queued,
            tag: req.tag,
            sqe: *cmd,
            dir,
            len: len as u32,
            niov: req.iov.len(),
            got: 0,
            bad_digest: false,
            deadline: now + self.sh.cfg.timeout,
            retry_at: now,
        };
        if self.conn.is_some() {
            self.sendq.push_back(k);
        } else {
            self.arm_timer(true);
        }
        Submitted::Queued
    }

    fn flush(&mut self) {
        while let Some(&k) = self.sendq.front() {
            if self.slots[k as usize].st != St::Queued {
                self.sendq.pop_front();
                continue;
            }
            if !self.send(k) {
                break;
            }
            self.sendq.pop_front();
        }
        if let Some(c) = self.conn.as_mut() {
            let r = c.tx.flush(c.fd, &mut |_| {});
            match r {
                Ok(empty) => {
                    let _ = self.notifier.modify(c.fd, !empty);
                }
                Err(e) => self.lose(&e.to_string()),
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        if self.link.delivered.load(Ordering::Acquire) {
            self.pick_up_link();
        }
        // If the association was re-made (target restarted), this connection is stale.
        if self.conn.is_some() && self.sh.gen.load(Ordering::Acquire) != self.gen {
            self.lose("controller reconnected");
        }
        for _ in 0..64 {
            let Some(c) = self.conn.as_mut() else { break };
            let limits = Limits {
                max_icd: 0,
                max_plen: 16 << 20,
            };
            let params = c.host.params;
            match c.rx.poll(c.fd, Role::Host, &params, &limits) {
                Ok(RxEvent::Idle) => break,
                Ok(RxEvent::Header) => {
                    if let Err(e) = self.on_header() {
                        self.fail(e);
                    }
                }
                Ok(RxEvent::Pdu { digest_ok }) => {
                    if let Err(e) = self.on_pdu(digest_ok) {
                        self.fail(e);
                    }
                }
                Err(e) => self.fail(e),
            }
        }
        if self.timer_on {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a local from a non-blocking timerfd.
            let n = unsafe { libc::read(self.timer.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            if n == 8 || self.conn.is_none() {
                self.tick();
            }
        }
        self.flush();
        let n = self.done.len();
        while let Some((tag, st)) = self.done.pop_front() {
            done(tag, st);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.entries as usize - self.free.len()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.notifier.fd())
    }

    fn clear_wake(&mut self) -> bool {
        crate::eventfd::drain(self.link.efd.as_raw_fd());
        !self.done.is_empty()
            || self.conn.as_ref().is_some_and(|c| c.rx.buffered())
            || self.link.delivered.load(Ordering::Acquire)
            || self.notifier.ready()
    }
}

impl IoQueue {
    fn fail(&mut self, e: ConnError) {
        if matches!(e, ConnError::Fatal(_) | ConnError::Terminated { .. }) {
            inc(&self.sh.stats.protocol_errors);
            if let (ConnError::Fatal(f), Some(c)) = (&e, self.conn.as_mut()) {
                if pdu::may_send_term_req(c.rx.common().pdu_type) {
                    let mut tx = Tx::new(1);
                    tx.push(f.term_req(Role::Host, c.rx.header()), None);
                    let _ = tx.flush(c.fd, &mut |_| {});
                }
            }
        }
        self.lose(&e.to_string());
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        self.link.cancelled.store(true, Ordering::Release);
        if let Some(c) = self.conn.take() {
            let _ = c.host.sock.shutdown(std::net::Shutdown::Both);
        }
        if let Ok(mut f) = self.sh.free_qids.lock() {
            f.push_back(self.qid);
        }
        if let Ok(mut l) = self.sh.links.lock() {
            l.retain(|k| !Arc::ptr_eq(k, &self.link));
        }
    }
}

/// Status the initiator reports for a command that never got an answer in time: Transient
/// Transport Error with DNR (the initiator already retried until its timeout).
pub const TIMED_OUT: Status = Status::new(StatusCodeType::Generic, 0x22).with_dnr();
