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

mod handshake;
mod queue;

use crate::backend::BackendQueue;
use crate::controller::{
    Controller, ControllerConfig, DiscoveryEntryInfo, DiscoverySnapshot, HealthCounters,
};
use crate::exec::{Namespace, Namespaces};
use crate::log_limited;
use crate::poller::Poller;
use crate::stats::IoStats;
use leap_queues::nvme::StatusCodeType;
use leap_queues::Status;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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
    /// NSIDs the subsystem has room for (Identify Controller NN): namespaces may be attached
    /// live up to this many.
    pub max_namespaces: u32,
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
            max_namespaces: 32,
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

/// Counters of one connected queue, written only by the poller serving it.
#[derive(Debug, Default)]
pub(crate) struct QueueStats {
    /// An I/O queue (not an admin or discovery queue).
    io_queue: bool,
    /// I/O commands (the queue pair's counters).
    io: Arc<IoStats>,
    /// PDUs received whole.
    pdus_rx: AtomicU64,
    /// PDUs queued to send.
    pdus_tx: AtomicU64,
}

impl QueueStats {
    fn absorb(&self, other: &QueueStats) {
        self.io.absorb(&other.io);
        for (a, b) in [
            (&self.pdus_rx, &other.pdus_rx),
            (&self.pdus_tx, &other.pdus_tx),
        ] {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// A target's traffic, summed over its queues (open and closed).
#[derive(Debug)]
pub struct TargetTotals {
    /// PDUs received.
    pub pdus_rx: u64,
    /// PDUs sent.
    pub pdus_tx: u64,
    /// Queues (admin and I/O) connected now.
    pub open_queues: usize,
    /// I/O queues connected now.
    pub open_io_queues: usize,
    /// I/O counters and latency histograms.
    pub io: Arc<IoStats>,
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
    /// The namespace table; replaced (copy on write) when a namespace is attached or detached.
    nss: Mutex<Arc<Namespaces>>,
    /// Bumped (Release) after each replacement; queues compare it once per round.
    ns_gen: AtomicU64,
    /// Back-end queues opened (off the pollers) for a namespace being attached, one per I/O
    /// queue connected at the time; each I/O queue takes one as it moves to the new table.
    prepared: Mutex<Vec<(u32, Box<dyn BackendQueue>)>>,
    /// The target stopped: no new association may join (checked under `assocs`' lock).
    stopped: AtomicBool,
    assocs: Mutex<HashMap<u16, Arc<Association>>>,
    next_cntlid: Mutex<u16>,
    inflight: AtomicU32,
    stats: TargetStats,
    /// Per-queue counters of the connected queues, summed for the SMART log and metrics.
    queues: Mutex<Vec<Weak<QueueStats>>>,
    /// The counters of queues that have closed, so totals never go back.
    closed: QueueStats,
    /// Discovery log records (the ports we listen on).
    discovery: Mutex<DiscoverySnapshot>,
}

impl Subsystem {
    /// A subsystem exporting `nss` as configured (the table is widened to
    /// `cfg.max_namespaces` NSIDs, so namespaces can be attached live).
    pub fn new(cfg: TargetConfig, nss: Arc<Namespaces>) -> Arc<Subsystem> {
        let list = (1..=nss.slots() as u32)
            .map(|n| nss.get(n).cloned())
            .collect();
        let nss = Namespaces::with_slots(list, cfg.max_namespaces as usize);
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
            nss: Mutex::new(nss),
            ns_gen: AtomicU64::new(0),
            prepared: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            assocs: Mutex::new(HashMap::new()),
            next_cntlid: Mutex::new(1),
            inflight: AtomicU32::new(0),
            stats: TargetStats::default(),
            queues: Mutex::new(Vec::new()),
            closed: QueueStats::default(),
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

    /// The namespace table now.
    pub fn namespaces(&self) -> Arc<Namespaces> {
        self.nss.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Attaches `ns` as NSID `nsid` (or detaches NSID `nsid`, with `None`) while hosts are
    /// connected (prepare the queues first: [`Subsystem::prepare_namespace`]): every controller of the subsystem records the change in its Changed Namespace
    /// List and raises a Namespace Attribute Changed event (hosts that enabled it rescan), and
    /// every I/O queue moves to the new table at its next round; commands in flight on a
    /// detached namespace complete. Returns the namespace that was there. Wake the pollers
    /// afterwards ([`Target::set_namespace`] does).
    pub fn set_namespace(
        &self,
        nsid: u32,
        ns: Option<Arc<Namespace>>,
    ) -> Result<Option<Arc<Namespace>>, String> {
        let mut cur = self.nss.lock().unwrap_or_else(|p| p.into_inner());
        if ns.is_none() {
            self.prepared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(n, _)| *n != nsid);
        }
        let old = cur.get(nsid).cloned();
        let new = cur.with(nsid, ns).ok_or_else(|| {
            format!(
                "NSID {nsid} is outside 1..={} (the subsystem's max_namespaces)",
                cur.slots()
            )
        })?;
        *cur = new.clone();
        if let Ok(a) = self.assocs.lock() {
            for x in a.values() {
                if let Ok(mut c) = x.ctrl.lock() {
                    c.set_namespaces(new.clone());
                }
            }
        }
        self.ns_gen.fetch_add(1, Ordering::Release);
        Ok(old)
    }

    /// The namespace generation (changes whenever the table does).
    fn ns_gen(&self) -> u64 {
        self.ns_gen.load(Ordering::Acquire)
    }

    /// Opens a back-end queue of `ns` for every I/O queue connected now, for them to take when
    /// NSID `nsid` is attached ([`Subsystem::set_namespace`]): opening one can take a
    /// connection to a remote target, which must not happen on a poller. Call it off the
    /// pollers, before the attach; a back end that cannot open them refuses the attach before
    /// anything changed. (An I/O queue that connects in between opens its own, on its
    /// handshake thread, or its poller opens one.)
    pub fn prepare_namespace(&self, nsid: u32, ns: &Namespace) -> Result<(), String> {
        let mut opened = Vec::new();
        for _ in 0..self.totals().open_io_queues {
            let q = ns
                .backend()
                .open_queue(self.cfg.max_queue_entries as usize)
                .map_err(|e| format!("namespace {nsid}: cannot open a queue: {e}"))?;
            opened.push((nsid, q));
        }
        let mut prepared = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        prepared.retain(|(n, _)| *n != nsid);
        prepared.extend(opened);
        Ok(())
    }

    /// A back-end queue [`Subsystem::prepare_namespace`] opened for NSID `nsid`, if one is left.
    fn prepared_queue(&self, nsid: u32) -> Option<Box<dyn BackendQueue>> {
        let mut p = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        let k = p.iter().position(|(n, _)| *n == nsid)?;
        Some(p.swap_remove(k).1)
    }

    /// Brings a just-joined association's controller to the current table: a namespace change
    /// between the handshake reading the table and joining would be missed otherwise. Under the
    /// table's lock, so no change can slip in between (the order set_namespace takes: table,
    /// then controller).
    fn catch_up(&self, a: &Association) {
        let cur = self.nss.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(mut c) = a.ctrl.lock() {
            if !Arc::ptr_eq(c.namespaces(), &cur) {
                c.set_namespaces(cur.clone());
            }
        }
    }

    fn host_allowed(&self, hostnqn: &str) -> bool {
        self.cfg.allowed_hosts.is_empty() || self.cfg.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    /// The counters of every queue ever connected, summed (for metrics; off the I/O path).
    pub fn totals(&self) -> TargetTotals {
        let sum = QueueStats::default();
        let (mut open, mut open_io) = (0, 0);
        if let Ok(mut v) = self.queues.lock() {
            sum.absorb(&self.closed);
            v.retain(|w| w.strong_count() > 0);
            for s in v.iter().filter_map(|w| w.upgrade()) {
                sum.absorb(&s);
                open += 1;
                open_io += s.io_queue as usize;
            }
        }
        TargetTotals {
            pdus_rx: sum.pdus_rx.load(Ordering::Relaxed),
            pdus_tx: sum.pdus_tx.load(Ordering::Relaxed),
            open_queues: open,
            open_io_queues: open_io,
            io: sum.io,
        }
    }

    fn health(&self) -> HealthCounters {
        let t = self.totals();
        HealthCounters {
            bytes_read: t.io.bytes_read.load(Ordering::Relaxed),
            bytes_written: t.io.bytes_written.load(Ordering::Relaxed),
            read_commands: t.io.reads.load(Ordering::Relaxed),
            write_commands: t.io.writes.load(Ordering::Relaxed),
            ..HealthCounters::default()
        }
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
    pollers: Arc<Vec<Poller>>,
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
        let (s2, stop2, p2) = (sub.clone(), stop.clone(), pollers.clone());
        let thread = std::thread::Builder::new()
            .name("leap-target-accept".into())
            .spawn(move || accept_loop(s2, listeners, stop2, p2))?;
        Ok(Target {
            sub,
            pollers,
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

    /// [`Subsystem::prepare_namespace`] (when attaching) and [`Subsystem::set_namespace`], then
    /// wakes the pollers so idle queues move to the new table (and admin queues send the event)
    /// now rather than at their next packet.
    pub fn set_namespace(
        &self,
        nsid: u32,
        ns: Option<Arc<Namespace>>,
    ) -> Result<Option<Arc<Namespace>>, String> {
        if let Some(n) = &ns {
            self.sub.prepare_namespace(nsid, n)?;
        }
        let old = self.sub.set_namespace(nsid, ns)?;
        self.wake_pollers();
        Ok(old)
    }

    /// Wakes the pollers serving the target (after [`Subsystem::set_namespace`]).
    pub fn wake_pollers(&self) {
        for p in self.pollers.iter() {
            p.waker().wake();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        crate::eventfd::signal(self.stop.as_raw_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Connections end with their pollers; associations go with the subsystem. A handshake
        // still running cannot join after this (it checks `stopped` under the same lock).
        if let Ok(a) = self.sub.assocs.lock() {
            self.sub.stopped.store(true, Ordering::Release);
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
                        if let Err(e) = handshake::handshake(&sub, s, peer, &pollers, pick) {
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
