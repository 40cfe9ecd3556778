//! The poller: one thread per core, run-to-completion over the queue pairs it owns.
//!
//! Each round it asks every front end ([`Port`]) for new commands, executes them against the
//! namespace's back end, reaps back-end completions into completion entries, and lets the front end
//! complete them to the guest (notifications batched per round). While work flows it busy-polls;
//! with nothing to do it spins for an adaptive window (see [`IdleSpin`]), then re-arms every
//! notification source and sleeps on their eventfds, so an idle disk costs no CPU. Per-command state lives in tables sized at attach time
//! and indexed by command id: nothing is allocated or locked per I/O.

use crate::addr::AddressSpace;
use crate::backend::BackendQueue;
use crate::exec::{self, Kind, Namespaces, Scratch, Started};
use crate::stats::{self, IoStats, OpClass};
use leap_queues::{queue_pair, Processor, Sqe, Status, Submitter};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A front end as the poller sees it: a source of NVMe commands and a sink of completions.
/// Implemented by the vhost-user-blk queue; the runtime knows nothing of virtio.
pub trait Port: Send {
    /// Moves new requests from the front end into `sq` (as SQEs with capsules). Returns how many.
    fn submit(&mut self, sq: &mut Submitter) -> usize;
    /// Reaps completions from `sq` and completes them to the front end, notifying it at most once.
    /// Called every round after `submit`, so it can also deliver a notification `submit` owes.
    /// Returns how many.
    fn complete(&mut self, sq: &mut Submitter) -> usize;
    /// The poller is about to sleep: re-enable notifications. Returns true if work arrived
    /// meanwhile (the poller then keeps polling).
    fn arm(&mut self) -> bool;
    /// The poller is polling again: notifications may be suppressed.
    fn disarm(&mut self);
    /// The memory the port's data pointers refer to.
    fn address_space(&self) -> &Arc<AddressSpace>;
    /// A descriptor that becomes readable when the front end has new work (a virtqueue's kick
    /// eventfd), for the poller to sleep on directly. Someone else may consume its events first,
    /// so a front end with one must also wake the poller through its [`Waker`]; this only saves
    /// the extra hop when it can.
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The front end is gone for good (a peer closed its connection): the poller stops taking
    /// commands from it, lets what is in flight complete (`complete` is still called), then
    /// drops the port and its queue pair. Nobody waits for it, unlike [`Poller::detach`].
    fn finished(&self) -> bool {
        false
    }
    /// The namespaces this front end's commands address, when they changed since the last call
    /// (an NVMe/TCP subsystem attached or detached one live); asked once per round, so it should
    /// cost one atomic load when nothing changed. The poller opens back-end queues for new
    /// namespaces and keeps the queues of detached ones until what they hold completes.
    fn namespaces_changed(&mut self) -> Option<Arc<Namespaces>> {
        None
    }
    /// A back-end queue for newly attached NSID `nsid` that the front end's owner opened off
    /// the poller; without one the poller opens it itself.
    fn prepared_queue(&mut self, _nsid: u32) -> Option<Box<dyn BackendQueue>> {
        None
    }
}

/// How a poller behaves.
#[derive(Clone, Debug)]
pub struct PollerConfig {
    /// Thread name.
    pub name: String,
    /// The longest the poller keeps polling with nothing to do before it sleeps. The window
    /// adapts below this bound to how soon work actually returns ([`IdleSpin`]).
    pub idle_spin: Duration,
    /// Pin the thread to this CPU.
    pub cpu: Option<usize>,
    /// When the poller stops, how long it lets in-flight commands finish before it abandons
    /// them (counted in [`PollerStats::abandoned`]), so stopping is bounded whatever a back end
    /// or front end does.
    pub stop_timeout: Duration,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            name: "leap-poller".into(),
            idle_spin: Duration::from_micros(100),
            cpu: None,
            stop_timeout: Duration::from_secs(5),
        }
    }
}

/// Identifies an attached queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PairId(u64);

/// Why the poller refused something.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    /// An OS call failed.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    /// The back end could not open a queue.
    #[error("back end: {0}")]
    Backend(#[from] crate::backend::BackendError),
    /// The poller thread is gone.
    #[error("poller thread has stopped")]
    Stopped,
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(&'static str),
    /// The pair's in-flight commands did not finish in time; it keeps draining on the poller.
    #[error("in-flight commands did not finish within {0:?}")]
    Timeout(Duration),
}

/// Wakes a sleeping poller (from a kick forwarder, say). Cheap to clone.
#[derive(Clone)]
pub struct Waker(Arc<WakeState>);

struct WakeState {
    fd: OwnedFd,
    /// Set (SeqCst) by the poller before its last look for work ahead of sleeping, cleared when
    /// it wakes. A waker publishes its work first, then reads this (SeqCst): either it sees
    /// `true` and signals, or the poller's last look sees the work. So a busy poller costs
    /// wakers nothing but one load.
    sleeping: AtomicBool,
}

impl Waker {
    /// Wakes the poller if it sleeps (or is about to). Call after making the work visible.
    pub fn wake(&self) {
        if self.0.sleeping.load(Ordering::SeqCst) {
            crate::eventfd::signal(self.0.fd.as_raw_fd());
        }
    }
}

/// Counters of one poller.
#[derive(Default, Debug)]
pub struct PollerStats {
    /// Commands completed.
    pub completed: AtomicU64,
    /// Poll rounds.
    pub rounds: AtomicU64,
    /// Times the poller went to sleep (and so woke up again: its wake-ups).
    pub sleeps: AtomicU64,
    /// Nanoseconds spent idle: spinning with nothing to do, or asleep (added when the idle
    /// spell ends). Busy time is the poller's age ([`Poller::age`]) minus this and the sleep in
    /// progress ([`Poller::busy`]).
    pub idle_ns: AtomicU64,
    /// While the poller sleeps: when its idle spell began, in nanoseconds of its age plus one;
    /// 0 while awake.
    pub idle_since_ns: AtomicU64,
    /// Commands still unfinished when the poller had to stop (a back end that never answered
    /// within [`PollerConfig::stop_timeout`]): abandoned, never completed to their front end.
    pub abandoned: AtomicU64,
}

enum Ctl {
    Attach(Box<Pair>),
    Detach(PairId, mpsc::Sender<Box<dyn Port>>),
}

struct Shared {
    ctl: Mutex<Vec<Ctl>>,
    /// Set (Release) after pushing to `ctl`; the poller swaps it (Acquire) once per round, so the
    /// lock is only taken when a request is waiting.
    ctl_pending: AtomicBool,
    stop: AtomicBool,
    wake: Waker,
    stats: PollerStats,
    born: Instant,
}

/// A poller thread.
pub struct Poller {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pthread: libc::pthread_t,
    next_id: AtomicU64,
}

/// Per-command state, indexed by command id.
#[derive(Clone, Copy, Default)]
struct Cmd {
    pending: u16,
    status: Option<Status>,
    kind: Kind,
    bytes: u64,
    /// When the command was taken off the queue pair ([`RoundClock`] nanoseconds).
    t0: u64,
}

/// The poller's clock for latencies: read at most once per phase of a round with work (taking
/// commands, reaping completions), so a batch shares one reading and an idle round reads none.
struct RoundClock {
    epoch: Instant,
    now: Option<u64>,
}

impl RoundClock {
    fn new() -> Self {
        RoundClock {
            epoch: Instant::now(),
            now: None,
        }
    }
    /// Forgets the last reading: the next `now` reads the clock.
    fn tick(&mut self) {
        self.now = None;
    }
    /// Nanoseconds since the poller started, read once per tick.
    fn now(&mut self) -> u64 {
        let epoch = self.epoch;
        *self
            .now
            .get_or_insert_with(|| epoch.elapsed().as_nanos() as u64)
    }
}

struct Pair {
    id: PairId,
    port: Box<dyn Port>,
    sq: Submitter,
    proc: Processor,
    /// One back-end queue per namespace slot.
    bqs: Vec<Option<Box<dyn BackendQueue>>>,
    nss: Arc<Namespaces>,
    cmds: Vec<Cmd>,
    /// Commands not started yet, oldest first: ones a back end had no room for (nothing newer
    /// starts before them) and ones a rate limit holds (nothing newer of the same class, reads
    /// or writes, starts before them).
    held: VecDeque<u16>,
    /// The entries of held commands, by command id (apart from `cmds`, so the per-command
    /// state of the common path stays small).
    held_sqes: Vec<Sqe>,
    stats: Arc<IoStats>,
    clock: RoundClock,
    /// Address spaces replaced while I/O was in flight, kept mapped until it drains.
    retired: Vec<Arc<AddressSpace>>,
    /// Back-end queues of namespaces detached while they had commands in flight, polled until
    /// those complete, with the tables that held their namespaces.
    detached: Vec<Box<dyn BackendQueue>>,
    detached_nss: Vec<Arc<Namespaces>>,
    current: Arc<AddressSpace>,
    draining: Option<mpsc::Sender<Box<dyn Port>>>,
}

impl Poller {
    /// Starts a poller thread.
    pub fn spawn(cfg: PollerConfig) -> Result<Poller, PollerError> {
        let wake = Waker(Arc::new(WakeState {
            fd: crate::eventfd::new().map_err(|e| PollerError::Os("eventfd", e))?,
            sleeping: AtomicBool::new(false),
        }));
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Vec::new()),
            ctl_pending: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake,
            stats: PollerStats::default(),
            born: Instant::now(),
        });
        let s = shared.clone();
        let c = cfg.clone();
        let thread = std::thread::Builder::new()
            .name(cfg.name.clone())
            .spawn(move || run(s, c))
            .map_err(|e| PollerError::Os("spawn", e))?;
        use std::os::unix::thread::JoinHandleExt;
        let pthread = thread.as_pthread_t();
        Ok(Poller {
            shared,
            thread: Some(thread),
            pthread,
            next_id: AtomicU64::new(1),
        })
    }

    /// A handle that wakes this poller.
    pub fn waker(&self) -> Waker {
        self.shared.wake.clone()
    }

    /// Counters.
    pub fn stats(&self) -> &PollerStats {
        &self.shared.stats
    }

    /// How long the poller has run.
    pub fn age(&self) -> Duration {
        self.shared.born.elapsed()
    }

    /// Time spent doing work: its age minus the time it spent idle (spinning or asleep, the
    /// sleep in progress included). Read racing a wake-up it may be off by that one spell.
    pub fn busy(&self) -> Duration {
        let st = &self.shared.stats;
        let since = st.idle_since_ns.load(Ordering::Acquire);
        let idle = Duration::from_nanos(st.idle_ns.load(Ordering::Relaxed));
        let age = self.age();
        let current = match since {
            0 => Duration::ZERO,
            s => age.saturating_sub(Duration::from_nanos(s - 1)),
        };
        age.saturating_sub(idle + current)
    }

    /// CPU time the poller thread has used.
    pub fn cpu_time(&self) -> Duration {
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `pthread` is our live thread (joined only in Drop); both out-pointers are valid.
        let ok = unsafe {
            libc::pthread_getcpuclockid(self.pthread, &mut clock) == 0
                && libc::clock_gettime(clock, &mut ts) == 0
        };
        if ok {
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        } else {
            Duration::ZERO
        }
    }

    /// Attaches a front end to this poller on a new queue pair of `depth` entries whose commands
    /// carry `capsule_bytes` of SGL descriptors or range data each. I/O goes to the namespaces
    /// `nss` (each gets a back-end queue of its own on this poller).
    pub fn attach(
        &self,
        port: Box<dyn Port>,
        nss: Arc<Namespaces>,
        depth: u16,
        capsule_bytes: usize,
        stats: Arc<IoStats>,
    ) -> Result<PairId, PollerError> {
        if !(2..=4096).contains(&depth) {
            return Err(PollerError::Invalid("queue depth must be 2..=4096"));
        }
        let mut bqs = Vec::with_capacity(nss.slots());
        for k in 0..nss.slots() {
            bqs.push(match nss.get(k as u32 + 1) {
                Some(ns) => Some(ns.backend().open_queue(depth as usize)?),
                None => None,
            });
        }
        let (sq, proc) = queue_pair(depth, capsule_bytes);
        let id = PairId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let current = port.address_space().clone();
        let pair = Box::new(Pair {
            id,
            port,
            sq,
            proc,
            bqs,
            nss,
            cmds: vec![Cmd::default(); depth as usize],
            held: VecDeque::with_capacity(depth as usize),
            held_sqes: vec![Sqe::default(); depth as usize],
            stats,
            clock: RoundClock::new(),
            retired: Vec::new(),
            detached: Vec::new(),
            detached_nss: Vec::new(),
            current,
            draining: None,
        });
        self.control(Ctl::Attach(pair))?;
        Ok(id)
    }

    /// Stops taking new commands from the pair, waits for its in-flight commands to complete to
    /// the front end, and hands the front end back.
    pub fn detach(&self, id: PairId) -> Result<Box<dyn Port>, PollerError> {
        self.detach_within(id, None)
    }

    /// [`Poller::detach`], waiting at most `timeout` (None: as long as it takes). On a timeout
    /// the pair keeps draining on the poller (its memory stays mapped until it has), and the
    /// port is dropped there once it has.
    pub fn detach_within(
        &self,
        id: PairId,
        timeout: Option<Duration>,
    ) -> Result<Box<dyn Port>, PollerError> {
        let (tx, rx) = mpsc::channel();
        self.control(Ctl::Detach(id, tx))?;
        let gone = || {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                PollerError::Stopped
            } else {
                PollerError::Invalid("no such queue pair on this poller")
            }
        };
        match timeout {
            None => rx.recv().map_err(|_| gone()),
            Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => PollerError::Timeout(t),
                mpsc::RecvTimeoutError::Disconnected => gone(),
            }),
        }
    }

    fn control(&self, c: Ctl) -> Result<(), PollerError> {
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return Err(PollerError::Stopped);
        }
        self.shared
            .ctl
            .lock()
            .map_err(|_| PollerError::Stopped)?
            .push(c);
        self.shared.ctl_pending.store(true, Ordering::SeqCst);
        self.shared.wake.wake();
        Ok(())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The adaptive idle window. Spinning on an idle queue pays off only when work returns soon: a
/// spin that waits long for it costs more CPU than the sleep and wake-up it saves, and that CPU is
/// taken from everything else on the host, the guest's vCPUs included. So the window doubles (up
/// to `max`) when spinning caught work within the first half of the window, or a sleep turned out
/// shorter than a quarter of `max` (a short spin would have caught it); it halves (down to zero:
/// sleep at once) when spinning caught work only late in the window, or a sleep lasted longer than
/// `max`. Work that keeps returning within microseconds keeps the full window; work that returns
/// tens of microseconds apart (a guest under emulation) is met asleep, one wake-up per kick.
#[derive(Clone, Copy, Debug)]
pub struct IdleSpin {
    max: Duration,
    cur: Duration,
}

impl IdleSpin {
    const STEP: Duration = Duration::from_micros(1);

    /// A window starting at, and bounded by, `max`.
    pub fn new(max: Duration) -> Self {
        IdleSpin { max, cur: max }
    }
    /// How long to spin now.
    pub fn window(&self) -> Duration {
        self.cur
    }
    fn grow(&mut self) {
        self.cur = (self.cur * 2 + Self::STEP).min(self.max);
    }
    fn shrink(&mut self) {
        self.cur /= 2;
        if self.cur < Self::STEP {
            self.cur = Duration::ZERO;
        }
    }
    /// Spinning found work `after` this long.
    pub fn caught(&mut self, after: Duration) {
        if after <= self.cur / 2 {
            self.grow();
        } else {
            self.shrink();
        }
    }
    /// The poller slept for `gap` before work (or a timeout) woke it.
    pub fn slept(&mut self, gap: Duration) {
        if gap < self.max / 4 {
            self.grow();
        } else if gap > self.max {
            self.shrink();
        }
    }
}

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET indexes within it (checked by the bound below);
    // sched_setaffinity(0) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::warn!(
                "cannot pin poller to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn run(shared: Arc<Shared>, cfg: PollerConfig) {
    if let Some(cpu) = cfg.cpu {
        pin(cpu);
    }
    let mut pairs: Vec<Box<Pair>> = Vec::new();
    let mut scratch = Scratch::default();
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    // Idle rounds in a row, and when the idle spell began: the clock is read once per spell and
    // then every 64 rounds, not every round (clock reads are not free on every platform).
    let mut idle_rounds = 0u32;
    let mut idle_since = Instant::now();
    let mut spin = IdleSpin::new(cfg.idle_spin);
    let wake_fd = shared.wake.0.fd.as_raw_fd();
    let sleeping = &shared.wake.0.sleeping;
    loop {
        // Control requests are rare: one atomic swap per round, the lock only when one waits.
        if shared.ctl_pending.load(Ordering::Relaxed)
            && shared.ctl_pending.swap(false, Ordering::Acquire)
        {
            let mut ctl = match shared.ctl.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            for c in ctl.drain(..) {
                match c {
                    Ctl::Attach(p) => pairs.push(p),
                    Ctl::Detach(id, tx) => match pairs.iter_mut().find(|p| p.id == id) {
                        Some(p) => {
                            log::debug!(
                                "poller: draining pair {id:?}: {} command(s) in flight",
                                p.sq.in_flight()
                            );
                            p.draining = Some(tx)
                        }
                        None => drop(tx),
                    },
                }
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            // Finish what is in flight, for at most the stop timeout, then drop everything
            // (ports complete nothing more).
            let deadline = Instant::now() + cfg.stop_timeout;
            let mut abandoned = 0;
            for p in pairs.iter_mut() {
                while (p.in_flight() > 0 || !p.held.is_empty()) && Instant::now() < deadline {
                    if round(p, &mut scratch, &shared.stats, false) == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                round(p, &mut scratch, &shared.stats, false);
                abandoned += p.sq.in_flight();
            }
            if abandoned > 0 {
                shared
                    .stats
                    .abandoned
                    .fetch_add(abandoned as u64, Ordering::Relaxed);
                log::warn!(
                    "{}: {abandoned} command(s) did not finish within {:?} and were abandoned",
                    cfg.name,
                    cfg.stop_timeout
                );
            }
            return;
        }
        let mut work = 0;
        for p in pairs.iter_mut() {
            let take_new = p.draining.is_none() && !p.port.finished();
            work += round(p, &mut scratch, &shared.stats, take_new);
        }
        // Hand drained pairs back; drop finished ones.
        let mut k = 0;
        while k < pairs.len() {
            let p = &pairs[k];
            let leaving = p.draining.is_some() || p.port.finished();
            if leaving && p.in_flight() == 0 && p.held.is_empty() && p.sq.in_flight() == 0 {
                let mut p = pairs.swap_remove(k);
                match p.draining.take() {
                    Some(tx) => {
                        let _ = tx.send(p.port);
                    }
                    None => log::debug!("poller: pair {:?} finished", p.id),
                }
            } else {
                k += 1;
            }
        }
        shared.stats.rounds.fetch_add(1, Ordering::Relaxed);
        if work > 0 {
            if idle_rounds > 0 {
                let idle = idle_since.elapsed();
                spin.caught(idle);
                stats::add(&shared.stats.idle_ns, idle.as_nanos() as u64);
            }
            idle_rounds = 0;
            continue;
        }
        idle_rounds += 1;
        if idle_rounds == 1 {
            idle_since = Instant::now();
        }
        let window = spin.window();
        if !window.is_zero() && (idle_rounds % 64 != 0 || idle_since.elapsed() < window) {
            std::hint::spin_loop();
            continue;
        }
        // Going to sleep: announce it (wakers signal from now on), consume pending wake-ups,
        // then re-arm every source and re-check, so work published before the announcement is
        // seen here and a wake-up after it makes an fd readable.
        sleeping.store(true, Ordering::SeqCst);
        crate::eventfd::drain(wake_fd);
        let mut raced = false;
        for p in pairs.iter_mut() {
            for q in p.bqs.iter_mut().flatten().chain(p.detached.iter_mut()) {
                raced |= q.clear_wake();
            }
            raced |= p.port.arm();
        }
        if raced || shared.ctl_pending.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst)
        {
            sleeping.store(false, Ordering::Relaxed);
            for p in pairs.iter_mut() {
                p.port.disarm();
            }
            idle_rounds = 0;
            continue;
        }
        pollfds.clear();
        pollfds.push(libc::pollfd {
            fd: wake_fd,
            events: libc::POLLIN,
            revents: 0,
        });
        for p in pairs.iter() {
            let bq_fds = p
                .bqs
                .iter()
                .flatten()
                .chain(p.detached.iter())
                .map(|q| q.wake_fd());
            for fd in bq_fds.chain([p.port.wake_fd()]).flatten() {
                pollfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        shared.stats.sleeps.fetch_add(1, Ordering::Relaxed);
        let slept_at = Instant::now();
        let spell_began = idle_since.saturating_duration_since(shared.born);
        shared
            .stats
            .idle_since_ns
            .store(spell_began.as_nanos() as u64 + 1, Ordering::Release);
        // A command held back by a rate limit has no descriptor to wake us: look again soon.
        let timeout = if pairs.iter().any(|p| !p.held.is_empty()) {
            1
        } else {
            1000
        };
        // SAFETY: `pollfds` is a valid array of pollfd of the given length.
        unsafe {
            libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout);
        }
        sleeping.store(false, Ordering::Relaxed);
        let slept = slept_at.elapsed();
        spin.slept(slept);
        // The spell's spinning before the sleep, and the sleep.
        let idle = slept + slept_at.saturating_duration_since(idle_since);
        stats::add(&shared.stats.idle_ns, idle.as_nanos() as u64);
        shared.stats.idle_since_ns.store(0, Ordering::Release);
        for p in pairs.iter_mut() {
            p.port.disarm();
        }
        idle_rounds = 0;
    }
}

impl Pair {
    /// Back-end operations in flight, over all namespaces (detached ones included).
    fn in_flight(&self) -> usize {
        let detached: usize = self.detached.iter().map(|q| q.in_flight()).sum();
        self.bqs
            .iter()
            .flatten()
            .map(|q| q.in_flight())
            .sum::<usize>()
            + detached
    }

    /// Moves to namespace table `new`: an NSID whose namespace stayed keeps its queue; a new
    /// one gets the queue the front end prepared (or one opened here, if none was); a detached
    /// one's queue is dropped, or kept polling until what it holds completes. Held commands for
    /// an NSID whose namespace went fail with Invalid Namespace (they must not reach whatever
    /// takes the NSID next). Control path: runs once per change.
    fn switch_namespaces(&mut self, new: Arc<Namespaces>) {
        let old = std::mem::replace(&mut self.nss, new);
        let changed: Vec<(u32, bool)> = Namespaces::changed(&old, &self.nss).collect();
        self.bqs
            .resize_with(old.slots().max(self.nss.slots()), || None);
        let depth = self.cmds.len();
        for &(nsid, had) in &changed {
            // `changed` yields NSIDs 1..=slots and `bqs` has that many entries.
            let Some(slot) = (nsid as usize)
                .checked_sub(1)
                .and_then(|k| self.bqs.get_mut(k))
            else {
                continue;
            };
            if let Some(q) = slot.take() {
                if q.in_flight() > 0 {
                    self.detached.push(q);
                }
            }
            if let Some(ns) = self.nss.get(nsid) {
                let q = match self.port.prepared_queue(nsid) {
                    Some(q) => Ok(q),
                    None => ns.backend().open_queue(depth),
                };
                match q {
                    Ok(q) => *slot = Some(q),
                    Err(e) => log::warn!("event=namespace_queue_error nsid={nsid} error=\"{e}\""),
                }
            }
            if had {
                let gone: Vec<u16> = self
                    .held
                    .iter()
                    .copied()
                    .filter(|&cid| self.held_sqes[cid as usize].nsid() == nsid)
                    .collect();
                self.held.retain(|cid| !gone.contains(cid));
                for cid in gone {
                    finish(self, cid, Status::INVALID_NAMESPACE);
                }
            }
        }
        self.bqs.truncate(self.nss.slots());
        if !self.detached.is_empty() {
            self.detached_nss.push(old);
        }
    }

    /// Starts command `cid`, or says why it must wait (nothing was started then).
    fn start(&mut self, cid: u16, sqe: &Sqe, scratch: &mut Scratch) -> Held {
        let capsule = self.proc.capsule(cid).unwrap_or(&[]);
        // SAFETY: `self.current` (and any address space retired while I/O is in flight) stays
        // alive until the back ends have nothing in flight (see `retired` in `round`); the
        // capsule belongs to `cid` in the queue pair until the command is completed below.
        let started = unsafe {
            exec::start(
                &self.nss,
                &mut self.bqs,
                sqe,
                capsule,
                &self.current,
                scratch,
            )
        };
        match started {
            Started::Busy => return Held::Room,
            Started::Throttled => return Held::Throttled,
            Started::Done(status) => finish(self, cid, status),
            Started::Pending(n, err) => {
                let c = &mut self.cmds[cid as usize];
                c.pending = n;
                c.status = err;
            }
        }
        Held::No
    }
}

/// Whether (and why) a command was not started.
enum Held {
    /// Started (or finished).
    No,
    /// A back end had no room: everything after it waits.
    Room,
    /// A rate limit holds it: later commands of its class wait.
    Throttled,
}

/// Ordering classes of held commands (bit masks): reads, writes, everything else.
const CLASS_READ: u8 = 1;
const CLASS_WRITE: u8 = 2;
const CLASS_OTHER: u8 = 4;
const CLASS_ALL: u8 = CLASS_READ | CLASS_WRITE | CLASS_OTHER;

fn class_of(sqe: &Sqe) -> u8 {
    match sqe.opcode() {
        leap_queues::nvme::io::READ => CLASS_READ,
        leap_queues::nvme::io::WRITE => CLASS_WRITE,
        _ => CLASS_OTHER,
    }
}

/// One poll round over one pair. Returns the amount of work done.
fn round(p: &mut Pair, scratch: &mut Scratch, pstats: &PollerStats, take_new: bool) -> usize {
    let mut work = 0;
    p.clock.tick();
    if take_new {
        // Pick up a new address space (memory table change); keep the old one mapped while I/O
        // that translated through it is in flight.
        let cur = p.port.address_space();
        if !Arc::ptr_eq(cur, &p.current) {
            let old = std::mem::replace(&mut p.current, cur.clone());
            if p.in_flight() > 0 || !p.held.is_empty() {
                p.retired.push(old);
            }
        }
        if let Some(nss) = p.port.namespaces_changed() {
            p.switch_namespaces(nss);
        }
        work += p.port.submit(&mut p.sq);
        p.sq.publish();
    }
    if !p.retired.is_empty() && p.held.is_empty() && p.in_flight() == 0 {
        p.retired.clear();
    }
    // Held commands go first, in order. One a back end had no room for blocks everything after
    // it; one a rate limit holds blocks only later commands of its class, so throttled writes
    // never hold up reads (as in qemu's throttle groups) and each class keeps its order.
    let mut blocked = 0u8;
    let mut k = 0;
    while k < p.held.len() && blocked != CLASS_ALL {
        let cid = p.held[k];
        let sqe = p.held_sqes[cid as usize];
        let class = class_of(&sqe);
        if blocked & class != 0 {
            k += 1;
            continue;
        }
        match p.start(cid, &sqe, scratch) {
            Held::No => {
                p.held.remove(k);
                work += 1;
            }
            Held::Room => blocked = CLASS_ALL,
            Held::Throttled => {
                blocked |= class;
                k += 1;
            }
        }
    }
    while blocked != CLASS_ALL {
        let Some(cmd) = p.proc.pop() else { break };
        work += 1;
        let sqe = cmd.sqe;
        let cid = sqe.cid();
        if cid as usize >= p.cmds.len() {
            // The in-process pair hands out only cids below its depth; anything else is a bug in
            // it, not a guest's doing. Never index with it.
            crate::log_limited!(
                log::Level::Error,
                "queue pair produced out-of-range cid {cid}"
            );
            continue;
        }
        let shift = p
            .nss
            .get(sqe.nsid())
            .map_or(0, |ns| ns.info().block_shift());
        p.cmds[cid as usize] = Cmd {
            pending: 0,
            status: None,
            kind: exec::kind(sqe.opcode()),
            bytes: (sqe.nlb() as u64) << shift,
            t0: p.clock.now(),
        };
        stats::inc(&p.stats.submitted);
        let class = class_of(&sqe);
        let held = if blocked & class != 0 {
            Held::Throttled
        } else {
            p.start(cid, &sqe, scratch)
        };
        if matches!(held, Held::Throttled) {
            stats::inc(&p.stats.throttled);
        }
        match held {
            Held::No => {}
            Held::Room => blocked = CLASS_ALL,
            Held::Throttled => blocked |= class,
        }
        if !matches!(held, Held::No) {
            p.held_sqes[cid as usize] = sqe;
            p.held.push_back(cid);
        }
    }
    // Completions are timed by a fresh reading (commands taken above may complete below).
    p.clock.tick();
    let Pair {
        bqs,
        detached,
        cmds,
        proc,
        stats,
        clock,
        ..
    } = p;
    for bq in bqs.iter_mut().flatten().chain(detached.iter_mut()) {
        bq.flush();
        work += bq.poll(&mut |tag, status| {
            let cid = tag as u16;
            let Some(c) = cmds.get_mut(cid as usize) else {
                return;
            };
            if !status.is_success() && c.status.is_none() {
                c.status = Some(status);
            }
            c.pending = c.pending.saturating_sub(1);
            if c.pending == 0 {
                let st = c.status.unwrap_or(Status::SUCCESS);
                count(stats, c, st, clock.now());
                let _ = proc.complete(cid, st, 0);
            }
        });
    }
    if !p.detached.is_empty() {
        p.detached.retain(|q| q.in_flight() > 0);
        if p.detached.is_empty() {
            p.detached_nss.clear();
        }
    }
    p.proc.publish();
    let done = p.port.complete(&mut p.sq);
    pstats.completed.fetch_add(done as u64, Ordering::Relaxed);
    work + done
}

fn finish(p: &mut Pair, cid: u16, status: Status) {
    let c = p.cmds[cid as usize];
    count(&p.stats, &c, status, p.clock.now());
    if p.proc.complete(cid, status, 0).is_err() {
        crate::log_limited!(
            log::Level::Error,
            "completing cid {cid} that is not in flight"
        );
    }
}

fn count(s: &IoStats, c: &Cmd, status: Status, now: u64) {
    let class = match c.kind {
        Kind::Read => OpClass::Read,
        Kind::Write => OpClass::Write,
        _ => OpClass::Other,
    };
    s.latency[class as usize].record(now.saturating_sub(c.t0));
    if !status.is_success() {
        if status.sct() == 0 && status.sc() < 0x80
            || status == Status::LBA_OUT_OF_RANGE
            || status == Status::NS_WRITE_PROTECTED
        {
            stats::inc(&s.invalid);
            crate::log_limited!(
                log::Level::Warn,
                "event=command_refused op={:?} status=\"{status}\"",
                c.kind
            );
        } else {
            stats::inc(&s.errors);
            crate::log_limited!(
                log::Level::Warn,
                "event=backend_error op={:?} status=\"{status}\"",
                c.kind
            );
        }
        return;
    }
    match c.kind {
        Kind::Read => {
            stats::inc(&s.reads);
            stats::add(&s.bytes_read, c.bytes);
        }
        Kind::Write => {
            stats::inc(&s.writes);
            stats::add(&s.bytes_written, c.bytes);
        }
        Kind::Flush => stats::inc(&s.flushes),
        Kind::Discard => stats::inc(&s.discards),
        Kind::WriteZeroes => stats::inc(&s.write_zeroes),
        Kind::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NullBackend;
    use leap_queues::nvme::io;
    use leap_queues::Sqe;
    use std::sync::atomic::AtomicUsize;

    /// A front end that sends `left` flushes and counts their completions.
    struct FlushPort {
        aspace: Arc<AddressSpace>,
        left: usize,
        done: Arc<AtomicUsize>,
        failed: Arc<AtomicUsize>,
    }

    impl Port for FlushPort {
        fn submit(&mut self, sq: &mut Submitter) -> usize {
            let mut n = 0;
            while self.left > 0 {
                let r = sq.submit_with(|cid, sqe, _| {
                    *sqe = Sqe::new(io::FLUSH, cid);
                    sqe.set_nsid(1);
                    Ok::<(), ()>(())
                });
                if r.is_err() {
                    break;
                }
                self.left -= 1;
                n += 1;
            }
            n
        }
        fn complete(&mut self, sq: &mut Submitter) -> usize {
            let mut n = 0;
            while let Some(c) = sq.reap() {
                if !c.status().is_success() {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            sq.release_completions();
            self.done.fetch_add(n, Ordering::Relaxed);
            n
        }
        fn arm(&mut self) -> bool {
            false
        }
        fn disarm(&mut self) {}
        fn address_space(&self) -> &Arc<AddressSpace> {
            &self.aspace
        }
    }

    /// An NVMe-native back end that takes at most `room` commands at a time, completes one per
    /// poll, and answers every third command with a vendor status the front end must see as is.
    struct TightBackend {
        info: crate::backend::DiskInfo,
        seen: Arc<Mutex<Vec<u32>>>,
    }

    struct TightQueue {
        room: usize,
        queued: VecDeque<(u64, u32)>,
        seen: Arc<Mutex<Vec<u32>>>,
        wake: OwnedFd,
    }

    const ODD_STATUS: Status =
        Status::new(leap_queues::nvme::StatusCodeType::Vendor, 0x42).with_crd(1);

    impl crate::backend::Backend for TightBackend {
        fn info(&self) -> &crate::backend::DiskInfo {
            &self.info
        }
        fn open_queue(
            &self,
            _depth: usize,
        ) -> Result<Box<dyn BackendQueue>, crate::backend::BackendError> {
            Ok(Box::new(TightQueue {
                room: 2,
                queued: VecDeque::new(),
                seen: self.seen.clone(),
                wake: crate::eventfd::new().unwrap(),
            }))
        }
        fn kind(&self) -> &'static str {
            "tight"
        }
        fn nvme_native(&self) -> bool {
            true
        }
    }

    impl BackendQueue for TightQueue {
        fn room(&self) -> usize {
            self.room - self.queued.len()
        }
        unsafe fn submit(
            &mut self,
            req: &crate::backend::IoRequest<'_>,
        ) -> crate::backend::Submitted {
            assert!(self.room() > 0, "submit without room");
            let seq = req.cmd.expect("a native back end gets the command").cdw(2);
            self.seen.lock().unwrap().push(seq);
            self.queued.push_back((req.tag, seq));
            crate::eventfd::signal(self.wake.as_raw_fd());
            crate::backend::Submitted::Queued
        }
        fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
            match self.queued.pop_front() {
                Some((tag, seq)) => {
                    done(
                        tag,
                        if seq % 3 == 0 {
                            ODD_STATUS
                        } else {
                            Status::SUCCESS
                        },
                    );
                    1
                }
                None => 0,
            }
        }
        fn in_flight(&self) -> usize {
            self.queued.len()
        }
        fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
            Some(self.wake.as_raw_fd())
        }
        fn clear_wake(&mut self) -> bool {
            crate::eventfd::drain(self.wake.as_raw_fd());
            !self.queued.is_empty()
        }
    }

    /// Sends `total` flushes numbered in CDW2 and records each completion's status by number.
    struct SeqPort {
        aspace: Arc<AddressSpace>,
        next: u32,
        total: u32,
        by_cid: Vec<u32>,
        statuses: Arc<Mutex<Vec<(u32, Status)>>>,
    }

    impl Port for SeqPort {
        fn submit(&mut self, sq: &mut Submitter) -> usize {
            let mut n = 0;
            while self.next < self.total {
                let seq = self.next;
                let Ok(cid) = sq.submit_with(|cid, sqe, _| {
                    *sqe = Sqe::new(io::FLUSH, cid);
                    sqe.set_nsid(1);
                    sqe.set_cdw(2, seq);
                    Ok::<(), ()>(())
                }) else {
                    break;
                };
                self.by_cid[cid as usize] = seq;
                self.next += 1;
                n += 1;
            }
            n
        }
        fn complete(&mut self, sq: &mut Submitter) -> usize {
            let mut n = 0;
            while let Some(c) = sq.reap() {
                let seq = self.by_cid[c.cid() as usize];
                self.statuses.lock().unwrap().push((seq, c.status()));
                n += 1;
            }
            sq.release_completions();
            n
        }
        fn arm(&mut self) -> bool {
            false
        }
        fn disarm(&mut self) {}
        fn address_space(&self) -> &Arc<AddressSpace> {
            &self.aspace
        }
    }

    #[test]
    fn full_back_end_holds_commands_in_order_and_statuses_pass_through() {
        let poller = Poller::spawn(PollerConfig::default()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let backend = TightBackend {
            info: crate::backend::DiskInfo {
                size: 1 << 20,
                block_size: 512,
                read_only: false,
                discard: false,
                write_zeroes: false,
                volatile_cache: true,
                max_transfer: 0,
                serial: "tight".into(),
            },
            seen: seen.clone(),
        };
        let nss = Namespaces::single(crate::Namespace::new(Arc::new(backend)));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let total = 500;
        let port = SeqPort {
            aspace: Arc::new(AddressSpace::empty()),
            next: 0,
            total,
            by_cid: vec![0; 32],
            statuses: statuses.clone(),
        };
        // A queue pair 16 deep over a back end that takes 2 at a time.
        let stats = Arc::new(IoStats::default());
        poller
            .attach(Box::new(port), nss, 32, 64, stats.clone())
            .unwrap();
        let t = Instant::now();
        while statuses.lock().unwrap().len() < total as usize {
            assert!(t.elapsed() < Duration::from_secs(20), "commands stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Every command was counted once taken and timed once completed.
        assert_eq!(stats.submitted.load(Ordering::Relaxed), total as u64);
        assert_eq!(stats.in_flight(), 0);
        let timed: u64 = stats.latency.iter().map(|h| h.count()).sum();
        assert_eq!(timed, total as u64);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            (0..total).collect::<Vec<_>>(),
            "held commands reach the back end once each, in arrival order"
        );
        for &(seq, st) in statuses.lock().unwrap().iter() {
            let want = if seq % 3 == 0 {
                ODD_STATUS
            } else {
                Status::SUCCESS
            };
            assert_eq!(st, want, "command {seq}: the back end's status, unchanged");
        }
    }

    #[test]
    fn an_idle_poller_counts_its_sleep_as_idle_time() {
        let poller = Poller::spawn(PollerConfig::default()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Asleep since it started (the sleep in progress counts), so nearly all of its age is
        // idle; an accounting that missed the sleep would call it busy throughout.
        let (age, busy) = (poller.age(), poller.busy());
        assert!(busy < age / 2, "busy {busy:?} of {age:?}");
        assert!(poller.stats().sleeps.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn idle_spin_shrinks_for_sparse_work_and_recovers_for_dense() {
        let max = Duration::from_micros(50);
        let mut s = IdleSpin::new(max);
        for _ in 0..10 {
            s.slept(Duration::from_micros(300));
        }
        assert_eq!(s.window(), Duration::ZERO, "sparse requests: sleep at once");
        for _ in 0..10 {
            s.slept(Duration::from_micros(5));
        }
        assert_eq!(s.window(), max, "dense requests: spin the full window");
        s.slept(Duration::from_secs(1));
        assert_eq!(s.window(), max / 2);
        s.caught(Duration::from_micros(2));
        assert_eq!(s.window(), max, "work caught early in the window");
        // Work that returns late in the window, or tens of microseconds apart: not worth spinning.
        s.caught(Duration::from_micros(40));
        assert_eq!(s.window(), max / 2);
        s.slept(Duration::from_micros(30));
        assert_eq!(
            s.window(),
            max / 2,
            "a sleep between max/4 and max changes nothing"
        );
        for _ in 0..10 {
            s.caught(max);
        }
        assert_eq!(s.window(), Duration::ZERO);
    }

    #[test]
    fn runs_commands_then_sleeps_at_no_cost() {
        let poller = Poller::spawn(PollerConfig {
            idle_spin: Duration::from_micros(20),
            ..Default::default()
        })
        .unwrap();
        let ns = Namespaces::single(crate::Namespace::new(Arc::new(NullBackend::new(
            1 << 20,
            512,
        ))));
        let done = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let port = FlushPort {
            aspace: Arc::new(AddressSpace::empty()),
            left: 10_000,
            done: done.clone(),
            failed: failed.clone(),
        };
        let stats = Arc::new(IoStats::default());
        let id = poller
            .attach(Box::new(port), ns, 64, 64, stats.clone())
            .unwrap();
        let t = Instant::now();
        while done.load(Ordering::Relaxed) < 10_000 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "commands did not complete"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(failed.load(Ordering::Relaxed), 0);
        assert_eq!(stats.flushes.load(Ordering::Relaxed), 10_000);
        // Idle: the poller must go to sleep and stay asleep.
        std::thread::sleep(Duration::from_millis(50));
        let (cpu0, sleeps0) = (
            poller.cpu_time(),
            poller.stats().sleeps.load(Ordering::Relaxed),
        );
        std::thread::sleep(Duration::from_millis(500));
        let cpu = poller.cpu_time() - cpu0;
        assert!(
            poller.stats().sleeps.load(Ordering::Relaxed) >= sleeps0,
            "sleeps counted"
        );
        assert!(
            cpu < Duration::from_millis(50),
            "an idle poller used {cpu:?} of CPU in 500 ms"
        );
        // Detach hands the port back; the poller stays usable.
        let port = poller.detach(id).unwrap();
        assert_eq!(port.address_space().regions().len(), 0);
        assert!(
            matches!(poller.detach(id), Err(PollerError::Invalid(_))),
            "a pair detaches once"
        );
    }
}
