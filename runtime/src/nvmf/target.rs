//! The NVMe/TCP target: a subsystem of namespaces exported over TCP to any NVMe/TCP host (the
//! Linux kernel's `nvme connect`, SPDK, a Leap initiator), with a discovery controller.
//!
//! - An acceptor thread takes connections; a short-lived handshake thread per connection does the
//!   ICReq/ICResp exchange and the Fabrics Connect (bounded time and count, control path), then
//!   hands the connection to a poller as a [`Port`]: from then on a connection is served like a
//!   virtqueue, run to completion, sleeping on socket readiness when idle.
//! - I/O commands go through the poller's queue pair to the namespaces' back ends; their data
//!   lives in the connection's [`BufPool`] (one buffer per queue entry, MDTS bytes each), which is
//!   also the memory the commands' SGLs point at. Admin and Fabrics commands are answered by the
//!   association's [`Controller`] inside the port.
//! - Overload control (the DAOS engine's design): commands in flight are bounded per queue and
//!   per subsystem; beyond the bound a command completes at once with a retryable status (DNR
//!   clear) and a Command Retry Delay. A share of the subsystem's capacity is reserved for
//!   priority hosts and for commands retried after a reject. Admin commands and Keep Alive are
//!   never throttled.
//! - Every field a host sends is checked before use (the codec checks framing; this module
//!   checks command ids, transfer tags, offsets and lengths against its own state). A broken PDU
//!   ends that connection only, with a TermReq carrying the right FES, counted and logged
//!   rate-limited.

use super::conn::{ConnError, Pieces, Rx, RxEvent, Tx};
use super::fabrics::{self, ConnectCmd, ConnectData, ConnectReject, PropertyGet, PropertySet};
use super::pdu::{self, DataDigest, DataHdr, Fatal, IcReq, IcResp, Limits, Params, R2t, Role};
use super::pool::BufPool;
use crate::addr::AddressSpace;
use crate::controller::{
    AdminOutcome, Controller, ControllerConfig, DiscoveryEntryInfo, DiscoverySnapshot,
    HealthCounters,
};
use crate::exec::Namespaces;
use crate::log_limited;
use crate::notify::Notifier;
use crate::poller::{Poller, Port};
use crate::stats::IoStats;
use leap_queues::nvme::{io, sgl_subtype, sgl_type, StatusCodeType};
use leap_queues::{Cqe, SglDescriptor, Sqe, Status, Submitter};
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Command Interrupted (Base Specification 2.0, figure 94, 21h): the controller could not
/// process the command now; the host should retry it (after the Command Retry Delay its CRD
/// selects). The target's overload reject.
pub const COMMAND_INTERRUPTED: Status = Status::new(StatusCodeType::Generic, 0x21);

/// How long a peer may take over the ICReq and Connect before the handshake gives up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once (each has a short-lived thread).
const MAX_HANDSHAKES: usize = 64;
/// PDUs handled per connection per poll round, so one busy host cannot starve the others.
const RX_BUDGET: usize = 64;

/// What a target exports and how it protects itself.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// The subsystem NQN.
    pub nqn: String,
    /// Hosts (NQNs) allowed to connect; empty: any host.
    pub allowed_hosts: Vec<String>,
    /// Hosts whose commands may use the reserved share of capacity.
    pub priority_hosts: Vec<String>,
    /// Largest transfer per command, as a power of two of 4 KiB (MDTS). Each queue entry gets a
    /// buffer of this size.
    pub mdts: u8,
    /// Largest queue a host may connect (entries).
    pub max_queue_entries: u16,
    /// Most I/O queues per host association.
    pub max_io_queues: u16,
    /// Commands in flight per I/O queue beyond which new ones are rejected (retryable).
    pub queue_inflight: u32,
    /// Commands in flight in the whole subsystem beyond which new ones are rejected.
    pub total_inflight: u32,
    /// Percent of `total_inflight` kept for priority hosts and retried commands.
    pub reserve_pct: u8,
    /// Command Retry Delay Times 1..3 (100 ms units) advertised in Identify Controller; rejects
    /// use CRD 1.
    pub crdt: [u16; 3],
    /// Accept header and data digests when a host asks for them.
    pub digests: bool,
    /// Serial number reported in Identify Controller.
    pub serial: String,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            nqn: "nqn.2026-12.io.leap:target".into(),
            allowed_hosts: Vec::new(),
            priority_hosts: Vec::new(),
            mdts: 5,
            max_queue_entries: 128,
            max_io_queues: 8,
            queue_inflight: 128,
            total_inflight: 4096,
            reserve_pct: 10,
            crdt: [1, 5, 20],
            digests: true,
            serial: "LEAP-TARGET".into(),
        }
    }
}

impl TargetConfig {
    /// Largest transfer per command, in bytes.
    pub fn max_transfer(&self) -> usize {
        4096usize << self.mdts.min(12)
    }
}

/// Counters of a target (relaxed atomics; read by the control plane).
#[derive(Debug, Default)]
pub struct TargetStats {
    /// Connections that completed the handshake.
    pub connections: AtomicU64,
    /// Handshakes refused or failed (bad ICReq, bad Connect, unknown host or subsystem).
    pub handshake_failures: AtomicU64,
    /// Connections ended by a protocol error of the peer (TermReq sent).
    pub fatal_errors: AtomicU64,
    /// Commands rejected by overload control (retryable).
    pub rejects: AtomicU64,
    /// Commands that arrived again after a reject (retries) and were admitted.
    pub retries_admitted: AtomicU64,
    /// Commands with a data digest mismatch (completed with Transient Transport Error).
    pub digest_errors: AtomicU64,
    /// Keep-alive timeouts (association ended).
    pub keep_alive_timeouts: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One host association: its controller and the state its queues share.
struct Association {
    ctrl: Mutex<Controller>,
    cntlid: u16,
    hostnqn: String,
    /// Ends every queue of the association (admin queue gone, keep-alive expired).
    dead: AtomicBool,
    /// Bumped by a controller reset: I/O queues connected before it close.
    epoch: AtomicU32,
    /// Volatile write cache enabled (Set Features 06h), read by I/O queues per write.
    wce: AtomicBool,
    /// The host may use the reserved share.
    priority: bool,
    /// A shutdown flush is running.
    flushing: AtomicBool,
}

/// The exported subsystem (and its discovery service).
pub struct Subsystem {
    cfg: TargetConfig,
    io_cfg: Arc<ControllerConfig>,
    disc_cfg: Arc<ControllerConfig>,
    nss: Arc<Namespaces>,
    assocs: Mutex<HashMap<u16, Arc<Association>>>,
    next_cntlid: Mutex<u16>,
    inflight: AtomicU32,
    stats: TargetStats,
    /// Per-queue I/O counters, summed for the SMART log.
    io_stats: Mutex<Vec<Weak<IoStats>>>,
    /// Discovery log records (the ports we listen on).
    discovery: Mutex<DiscoverySnapshot>,
}

impl Subsystem {
    /// A subsystem exporting `nss` as configured.
    pub fn new(cfg: TargetConfig, nss: Arc<Namespaces>) -> Arc<Subsystem> {
        let io_cfg = ControllerConfig {
            subnqn: cfg.nqn.clone(),
            serial: cfg.serial.clone(),
            mdts: cfg.mdts,
            max_io_queues: cfg.max_io_queues,
            max_queue_entries: cfg.max_queue_entries as u32,
            crdt: cfg.crdt,
            ..ControllerConfig::default()
        };
        let disc_cfg = ControllerConfig {
            serial: cfg.serial.clone(),
            mdts: cfg.mdts,
            ..ControllerConfig::discovery()
        };
        Arc::new(Subsystem {
            io_cfg: Arc::new(io_cfg),
            disc_cfg: Arc::new(disc_cfg),
            nss,
            assocs: Mutex::new(HashMap::new()),
            next_cntlid: Mutex::new(1),
            inflight: AtomicU32::new(0),
            stats: TargetStats::default(),
            io_stats: Mutex::new(Vec::new()),
            discovery: Mutex::new(DiscoverySnapshot::default()),
            cfg,
        })
    }

    /// The counters.
    pub fn stats(&self) -> &TargetStats {
        &self.stats
    }

    /// Commands in flight now, over all queues.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The configuration.
    pub fn config(&self) -> &TargetConfig {
        &self.cfg
    }

    fn host_allowed(&self, hostnqn: &str) -> bool {
        self.cfg.allowed_hosts.is_empty() || self.cfg.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    fn health(&self) -> HealthCounters {
        let mut h = HealthCounters::default();
        if let Ok(mut v) = self.io_stats.lock() {
            v.retain(|w| w.strong_count() > 0);
            for s in v.iter().filter_map(|w| w.upgrade()) {
                h.bytes_read += s.bytes_read.load(Ordering::Relaxed);
                h.bytes_written += s.bytes_written.load(Ordering::Relaxed);
                h.read_commands += s.reads.load(Ordering::Relaxed);
                h.write_commands += s.writes.load(Ordering::Relaxed);
            }
        }
        h
    }

    fn discovery_log(&self, hostnqn: &str) -> DiscoverySnapshot {
        let snap = self.discovery.lock().map(|d| d.clone()).unwrap_or_default();
        if self.host_allowed(hostnqn) {
            snap
        } else {
            DiscoverySnapshot {
                genctr: snap.genctr,
                entries: Vec::new(),
            }
        }
    }

    /// Allocates a controller ID (1..=0xFFEF, never one in use).
    fn cntlid(&self) -> Option<u16> {
        let assocs = self.assocs.lock().ok()?;
        let mut next = self.next_cntlid.lock().ok()?;
        for _ in 0..0xffef {
            let id = *next;
            *next = if id >= 0xffef { 1 } else { id + 1 };
            if !assocs.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    fn end_association(&self, cntlid: u16) {
        if let Ok(mut a) = self.assocs.lock() {
            if let Some(x) = a.remove(&cntlid) {
                x.dead.store(true, Ordering::Release);
                log::info!("target: association {cntlid} ({}) ended", x.hostnqn);
            }
        }
    }
}

/// A running target: listeners, the acceptor thread, and the subsystem.
pub struct Target {
    sub: Arc<Subsystem>,
    stop: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    addrs: Vec<SocketAddr>,
}

impl Target {
    /// Listens on `listen` (I/O and discovery; every port answers both, as Linux nvmet does) and
    /// serves `sub` on `pollers`. The first address is the subsystem's port in the discovery log.
    pub fn start(
        sub: Arc<Subsystem>,
        listen: &[SocketAddr],
        pollers: Arc<Vec<Poller>>,
    ) -> std::io::Result<Target> {
        if pollers.is_empty() || listen.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a target needs a poller and an address",
            ));
        }
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for a in listen {
            let l = TcpListener::bind(a)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            l.set_nonblocking(true)?;
            addrs.push(l.local_addr()?);
            listeners.push(l);
        }
        if let Ok(mut d) = sub.discovery.lock() {
            let a = addrs[0];
            d.genctr += 1;
            d.entries = vec![DiscoveryEntryInfo::tcp(
                &sub.cfg.nqn,
                &a.ip().to_string(),
                &a.port().to_string(),
                1,
            )];
        }
        let stop = Arc::new(crate::eventfd::new()?);
        let (s2, stop2) = (sub.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("leap-target-accept".into())
            .spawn(move || accept_loop(s2, listeners, stop2, pollers))?;
        Ok(Target {
            sub,
            stop,
            thread: Some(thread),
            addrs,
        })
    }

    /// The addresses listened on (with the ports the system chose for port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The subsystem.
    pub fn subsystem(&self) -> &Arc<Subsystem> {
        &self.sub
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        crate::eventfd::signal(self.stop.as_raw_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Connections end with their pollers; associations go with the subsystem.
        if let Ok(a) = self.sub.assocs.lock() {
            for x in a.values() {
                x.dead.store(true, Ordering::Release);
            }
        }
    }
}

fn accept_loop(
    sub: Arc<Subsystem>,
    listeners: Vec<TcpListener>,
    stop: Arc<OwnedFd>,
    pollers: Arc<Vec<Poller>>,
) {
    let handshakes = Arc::new(AtomicUsize::new(0));
    let next = AtomicUsize::new(0);
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    fds.push(libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if fds.last().is_some_and(|f| f.revents != 0) {
            return;
        }
        for l in &listeners {
            while let Ok((s, peer)) = l.accept() {
                if handshakes.load(Ordering::Relaxed) >= MAX_HANDSHAKES {
                    log_limited!(
                        log::Level::Warn,
                        "target: too many handshakes in progress; dropping {peer}"
                    );
                    continue;
                }
                handshakes.fetch_add(1, Ordering::Relaxed);
                let (sub, pollers, hs) = (sub.clone(), pollers.clone(), handshakes.clone());
                let pick = next.fetch_add(1, Ordering::Relaxed);
                let r = std::thread::Builder::new()
                    .name("leap-target-hs".into())
                    .spawn(move || {
                        if let Err(e) = handshake(&sub, s, peer, &pollers, pick) {
                            inc(&sub.stats.handshake_failures);
                            log_limited!(log::Level::Warn, "target: {peer}: {e}");
                        }
                        hs.fetch_sub(1, Ordering::Relaxed);
                    });
                if r.is_err() {
                    handshakes.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("timed out")]
    Timeout,
    #[error("connect refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Setup(String),
}

/// Waits until `fd` is readable or the deadline passes.
fn wait_readable(fd: RawFd, deadline: Instant) -> Result<(), HandshakeError> {
    if super::conn::wait_for(fd, libc::POLLIN, deadline) {
        Ok(())
    } else {
        Err(HandshakeError::Timeout)
    }
}

/// Runs `rx` until the next event other than Idle, within the deadline.
fn next_event(
    rx: &mut Rx,
    fd: RawFd,
    params: &Params,
    limits: &Limits,
    deadline: Instant,
) -> Result<RxEvent, HandshakeError> {
    loop {
        match rx.poll(fd, Role::Controller, params, limits)? {
            RxEvent::Idle => wait_readable(fd, deadline)?,
            e => return Ok(e),
        }
    }
}

/// Sends everything queued, blocking up to the deadline.
fn send_all(tx: &mut Tx, fd: RawFd, deadline: Instant) -> Result<(), HandshakeError> {
    while !tx.flush(fd, &mut |_| {})? {
        if Instant::now() >= deadline {
            return Err(HandshakeError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Sends a TermReq for `f` (when allowed) and reports the error.
fn terminate(fd: RawFd, f: Fatal, offending: &[u8], ty: u8) -> HandshakeError {
    if pdu::may_send_term_req(ty) {
        let mut tx = Tx::new(1);
        tx.push(f.term_req(Role::Controller, offending), None);
        let _ = tx.flush(fd, &mut |_| {});
    }
    HandshakeError::Conn(ConnError::Fatal(f))
}

fn handshake(
    sub: &Arc<Subsystem>,
    sock: TcpStream,
    peer: SocketAddr,
    pollers: &[Poller],
    pick: usize,
) -> Result<(), HandshakeError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    sock.set_nonblocking(true)
        .map_err(|e| HandshakeError::Setup(e.to_string()))?;
    let _ = sock.set_nodelay(true);
    let fd = sock.as_raw_fd();
    let mut rx = Rx::new();
    let ic_limits = Limits {
        max_icd: 0,
        max_plen: pdu::IC_HLEN as u32,
    };
    // ICReq → ICResp.
    let ev = next_event(&mut rx, fd, &Params::default(), &ic_limits, deadline);
    let ev = match ev {
        Err(HandshakeError::Conn(ConnError::Fatal(f))) => {
            return Err(terminate(fd, f, rx.header(), rx.common().pdu_type))
        }
        e => e?,
    };
    if ev != RxEvent::Header || rx.common().pdu_type != pdu::pdu_type::IC_REQ {
        return Err(terminate(
            fd,
            Fatal::sequence(),
            rx.header(),
            rx.common().pdu_type,
        ));
    }
    let req = IcReq::decode(rx.header())
        .map_err(|f| terminate(fd, f, rx.header(), pdu::pdu_type::IC_REQ))?;
    next_event(&mut rx, fd, &Params::default(), &ic_limits, deadline)?;
    let maxh2cdata = sub.cfg.max_transfer() as u32;
    let resp = IcResp::answer(&req, sub.cfg.digests, sub.cfg.digests, 0, maxh2cdata);
    let params = Params::from_exchange(&req, &resp).map_err(|f| terminate(fd, f, &[], 0))?;
    let mut tx = Tx::new(2);
    if let Some(h) = pdu::HeaderBuf::from_bytes(&resp.encode()) {
        tx.push(h, None);
    }
    send_all(&mut tx, fd, deadline)?;

    // The Connect capsule, data in-capsule.
    let limits = Limits {
        max_icd: pdu::ADMIN_MAX_ICD,
        max_plen: pdu::ADMIN_MAX_ICD + 256,
    };
    let ev = match next_event(&mut rx, fd, &params, &limits, deadline) {
        Err(HandshakeError::Conn(ConnError::Fatal(f))) => {
            return Err(terminate(fd, f, rx.header(), rx.common().pdu_type))
        }
        e => e?,
    };
    if ev != RxEvent::Header || rx.common().pdu_type != pdu::pdu_type::CAPSULE_CMD {
        return Err(terminate(
            fd,
            Fatal::sequence(),
            rx.header(),
            rx.common().pdu_type,
        ));
    }
    let sqe = pdu::decode_capsule_cmd(rx.header())
        .map_err(|f| terminate(fd, f, rx.header(), pdu::pdu_type::CAPSULE_CMD))?;
    pdu::check_in_capsule(&sqe, rx.layout())
        .map_err(|f| terminate(fd, f, rx.header(), pdu::pdu_type::CAPSULE_CMD))?;
    let mut data = [0u8; fabrics::connect_data::LEN];
    let datal = rx.layout().datal as usize;
    let v = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: datal.min(data.len()),
    };
    // SAFETY: `v` and `data` outlive the PDU, which `next_event` completes below.
    rx.set_sink(unsafe { Pieces::new(&v, 1, 0) });
    let RxEvent::Pdu { digest_ok } = next_event(&mut rx, fd, &params, &limits, deadline)? else {
        return Err(HandshakeError::Setup("unexpected receive state".into()));
    };
    let respond = |tx: &mut Tx, cqe: Cqe| -> Result<(), HandshakeError> {
        tx.push(pdu::encode_capsule_resp(&cqe, &params), None);
        send_all(tx, fd, deadline)
    };
    let Some(cmd) = ConnectCmd::from_sqe(&sqe) else {
        respond(&mut tx, Cqe::new(sqe.cid(), Status::INVALID_OPCODE))?;
        return Err(HandshakeError::Refused(
            "first command is not Connect".into(),
        ));
    };
    if !digest_ok {
        respond(&mut tx, Cqe::new(sqe.cid(), pdu::TRANSIENT_TRANSPORT_ERROR))?;
        return Err(HandshakeError::Refused(
            "Connect data digest mismatch".into(),
        ));
    }
    let reject = |tx: &mut Tx, r: ConnectReject, why: String| -> HandshakeError {
        match respond(tx, r.cqe(sqe.cid())) {
            Ok(()) => HandshakeError::Refused(why),
            Err(e) => e,
        }
    };
    if let Err(r) = cmd.validate(sub.cfg.max_queue_entries.saturating_sub(1)) {
        return Err(reject(&mut tx, r, "bad Connect command".into()));
    }
    if datal != fabrics::connect_data::LEN {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_sqe_field(24),
            "Connect data not in the capsule".into(),
        ));
    }
    let cd = match ConnectData::decode(&data) {
        Ok(c) => c,
        Err(e) => return Err(reject(&mut tx, e.connect_reject(), e.to_string())),
    };
    let discovery = cd.subnqn == fabrics::DISCOVERY_NQN;
    if !discovery && cd.subnqn != sub.cfg.nqn {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_data_field(fabrics::connect_data::SUBNQN as u16),
            format!("unknown subsystem {}", cd.subnqn),
        ));
    }
    if !discovery && !sub.host_allowed(cd.hostnqn) {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_host(),
            format!("host {} is not allowed", cd.hostnqn),
        ));
    }
    if discovery && !cmd.is_admin() {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_sqe_field(fabrics::connect_sqe_field::QID),
            "I/O queue on the discovery subsystem".into(),
        ));
    }
    let entries = cmd.entries() as u16;
    let (assoc, epoch) = if cmd.is_admin() {
        if cd.cntlid != fabrics::CNTLID_DYNAMIC && cd.cntlid != fabrics::CNTLID_STATIC_ANY {
            return Err(reject(
                &mut tx,
                ConnectReject::invalid_data_field(fabrics::connect_data::CNTLID as u16),
                "admin queue must ask for a dynamic controller".into(),
            ));
        }
        let Some(cntlid) = sub.cntlid() else {
            return Err(reject(
                &mut tx,
                ConnectReject {
                    status: fabrics::CONNECT_CONTROLLER_BUSY,
                    dw0: 0,
                },
                "no controller IDs left".into(),
            ));
        };
        let (cfg, nss) = if discovery {
            (sub.disc_cfg.clone(), Arc::new(Namespaces::default()))
        } else {
            (sub.io_cfg.clone(), sub.nss.clone())
        };
        let mut ctrl = Controller::new(cfg, cntlid, cd.hostnqn, cd.hostid, cmd.kato, nss);
        let s = Arc::downgrade(sub);
        if discovery {
            ctrl = ctrl.with_discovery(Arc::new(move |host: &str| {
                s.upgrade()
                    .map(|s| s.discovery_log(host))
                    .unwrap_or_default()
            }));
        } else {
            ctrl = ctrl.with_health(Arc::new(move || {
                s.upgrade().map(|s| s.health()).unwrap_or_default()
            }));
        }
        let wce = ctrl.wce();
        let a = Arc::new(Association {
            ctrl: Mutex::new(ctrl),
            cntlid,
            hostnqn: cd.hostnqn.to_owned(),
            dead: AtomicBool::new(false),
            epoch: AtomicU32::new(0),
            wce: AtomicBool::new(wce),
            priority: sub.cfg.priority_hosts.iter().any(|h| h == cd.hostnqn),
            flushing: AtomicBool::new(false),
        });
        if let Ok(mut m) = sub.assocs.lock() {
            m.insert(cntlid, a.clone());
        }
        (a, 0)
    } else {
        let a = sub
            .assocs
            .lock()
            .ok()
            .and_then(|m| m.get(&cd.cntlid).cloned());
        let Some(a) = a.filter(|a| a.hostnqn == cd.hostnqn && !a.dead.load(Ordering::Acquire))
        else {
            return Err(reject(
                &mut tx,
                ConnectReject::invalid_data_field(fabrics::connect_data::CNTLID as u16),
                format!("no controller {} for host {}", cd.cntlid, cd.hostnqn),
            ));
        };
        let granted = a.ctrl.lock().map(|c| c.io_queues()).unwrap_or(0);
        if cmd.qid > granted {
            return Err(reject(
                &mut tx,
                ConnectReject::invalid_sqe_field(fabrics::connect_sqe_field::QID),
                format!("queue {} beyond the {granted} granted", cmd.qid),
            ));
        }
        let e = a.epoch.load(Ordering::Acquire);
        (a, e)
    };
    let cntlid = assoc.cntlid;
    let q = TcpQueue::new(
        sub.clone(),
        sock,
        params,
        cmd.qid,
        entries,
        assoc.clone(),
        epoch,
        discovery,
    );
    let mut q = match q {
        Ok(q) => q,
        Err(e) => {
            if cmd.is_admin() {
                sub.end_association(cntlid);
            }
            return Err(HandshakeError::Setup(e.to_string()));
        }
    };
    // The Connect response goes out first, from the poller.
    q.tx.push(
        pdu::encode_capsule_resp(&fabrics::connect_response(sqe.cid(), cntlid), &params),
        None,
    );
    q.sqhd = 1 % entries;
    let stats = q.stats.clone();
    let pi = if cmd.qid == 0 {
        pick % pollers.len()
    } else {
        (cmd.qid as usize - 1 + pick) % pollers.len()
    };
    let nss = if cmd.qid == 0 {
        Arc::new(Namespaces::default())
    } else {
        sub.nss.clone()
    };
    if let Err(e) = pollers[pi].attach(Box::new(q), nss, entries.max(2), 16, stats) {
        if cmd.is_admin() {
            sub.end_association(cntlid);
        }
        return Err(HandshakeError::Setup(format!("poller: {e}")));
    }
    inc(&sub.stats.connections);
    log::info!(
        "target: {peer}: {} queue {} ({entries} entries) of controller {cntlid} for {}{}",
        if discovery { "discovery" } else { "subsystem" },
        cmd.qid,
        cd.hostnqn,
        match (params.hdgst, params.ddgst) {
            (false, false) => "",
            (true, false) => ", header digests",
            (false, true) => ", data digests",
            (true, true) => ", header and data digests",
        }
    );
    Ok(())
}

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
struct TcpQueue {
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
    stats: Arc<IoStats>,
}

// SAFETY: `iovs` describe pool memory owned by this queue; the queue moves between threads only
// as a whole (handshake thread → poller), never while a PDU refers to them mid-transfer from
// another thread.
unsafe impl Send for TcpQueue {}

impl TcpQueue {
    #[allow(clippy::too_many_arguments)]
    fn new(
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
        let stats = Arc::new(IoStats::default());
        if let Ok(mut v) = sub.io_stats.lock() {
            v.push(Arc::downgrade(&stats));
        }
        Ok(TcpQueue {
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
            sock,
            sub,
        })
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
        let (nss, assoc) = (self.sub.nss.clone(), self.assoc.clone());
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
}

impl Drop for TcpQueue {
    fn drop(&mut self) {
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
