//! The host agent: terminates vhost-user for the hypervisor and relays only control to leapd on
//! the SoC over the agent protocol ([`crate::relay`]). It never maps guest memory and never
//! touches request data: memory-table regions become host addresses (the region's offset in the
//! window's file, which the SoC sees through its window), ring addresses become guest addresses,
//! the hypervisor's kicks become Kick messages, and Call messages are written to the
//! hypervisor's call eventfds.
//!
//! A region whose file is not the window's (compared by device and inode) is refused: the SoC
//! could not reach that memory.

use crate::inflight;
use crate::relay::{self, Framer, MemRegion, Msg, Role, Vring};
use crate::stats::VhostStats;
use leap_runtime::log_limited;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;

/// What the SoC said about its device.
#[derive(Clone, Debug)]
struct DeviceInfo {
    features: u64,
    protocol: u64,
    num_queues: u16,
    max_queue_size: u16,
    config: Vec<u8>,
}

/// A byte stream to the SoC: TCP (a SoC VM, a SmartNIC) or a unix socket (a SoC-mode leapd on
/// this host, tests).
pub enum Channel {
    /// A unix stream socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl From<UnixStream> for Channel {
    fn from(s: UnixStream) -> Self {
        Channel::Unix(s)
    }
}

impl From<TcpStream> for Channel {
    fn from(s: TcpStream) -> Self {
        // Control messages are small and latency-bound (kicks, calls).
        let _ = s.set_nodelay(true);
        Channel::Tcp(s)
    }
}

impl Channel {
    fn try_clone(&self) -> std::io::Result<Channel> {
        Ok(match self {
            Channel::Unix(s) => Channel::Unix(s.try_clone()?),
            Channel::Tcp(s) => Channel::Tcp(s.try_clone()?),
        })
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Channel::Unix(s) => s.set_read_timeout(t),
            Channel::Tcp(s) => s.set_read_timeout(t),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Channel::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Channel::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Channel::Unix(s) => s.read(buf),
            Channel::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Channel::Unix(s) => s.write(buf),
            Channel::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Channel::Unix(s) => s.as_raw_fd(),
            Channel::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// Bytes that crossed the control channel (all of it control: the agent has no access to guest
/// memory, so no request data can be among them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBytes {
    /// Sent to the SoC.
    pub sent: u64,
    /// Received from the SoC.
    pub received: u64,
}

/// The connection to the SoC: requests wait for their Reply; Calls go to the hypervisor.
pub struct Link {
    /// The stream and the buffer messages are encoded into.
    tx: Mutex<(Channel, Vec<u8>)>,
    sent: AtomicU64,
    received: AtomicU64,
    seq: AtomicU32,
    pending: Mutex<HashMap<u32, mpsc::Sender<(u32, u64)>>>,
    calls: Mutex<Vec<Option<File>>>,
    info: DeviceInfo,
    closed: AtomicBool,
}

impl Link {
    /// Greets the SoC over `stream` and waits for its device description.
    pub fn connect(stream: impl Into<Channel>, name: &str) -> Result<Arc<Link>, String> {
        let stream = stream.into();
        let mut rx = stream.try_clone().map_err(|e| e.to_string())?;
        let mut framer = Framer::default();
        let mut info = None;
        let mut buf = [0u8; 4096];
        rx.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        while info.is_none() {
            let n = rx
                .read(&mut buf)
                .map_err(|e| format!("SoC greeting: {e}"))?;
            if n == 0 {
                return Err("the SoC closed the connection before describing its device".into());
            }
            for (_, m) in framer.push(&buf[..n]).map_err(|e| e.to_string())? {
                if let Msg::DeviceInfo {
                    features,
                    protocol,
                    num_queues,
                    max_queue_size,
                    config,
                } = m
                {
                    info = Some(DeviceInfo {
                        features,
                        protocol,
                        num_queues,
                        max_queue_size,
                        config,
                    });
                }
            }
        }
        rx.set_read_timeout(None).map_err(|e| e.to_string())?;
        let info = info.unwrap_or(DeviceInfo {
            features: 0,
            protocol: 0,
            num_queues: 1,
            max_queue_size: 1,
            config: Vec::new(),
        });
        let link = Arc::new(Link {
            tx: Mutex::new((stream, Vec::with_capacity(relay::HEADER + relay::MAX_BODY))),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            seq: AtomicU32::new(1),
            pending: Mutex::new(HashMap::new()),
            calls: Mutex::new((0..info.num_queues).map(|_| None).collect()),
            info,
            closed: AtomicBool::new(false),
        });
        link.send(
            0,
            &Msg::Hello {
                role: Role::Agent,
                features: 0,
                name: name.into(),
            },
        )?;
        let l = link.clone();
        std::thread::Builder::new()
            .name("leap-agent-rx".into())
            .spawn(move || l.receive(rx, framer))
            .map_err(|e| e.to_string())?;
        Ok(link)
    }

    fn send(&self, seq: u32, m: &Msg) -> Result<(), String> {
        // One encode buffer, kept with the stream: no allocation per kick.
        let mut tx = self.tx.lock().map_err(|_| "poisoned")?;
        let (stream, out) = &mut *tx;
        out.clear();
        relay::encode(m, seq, out).map_err(|e| e.to_string())?;
        stream
            .write_all(out)
            .map_err(|e| format!("send to the SoC: {e}"))?;
        self.sent.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the SoC went away (or sent something unreadable): the link is of no further use.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the link (the receiving thread ends and waiters are released).
    pub fn close(&self) {
        if let Ok(tx) = self.tx.lock() {
            tx.0.shutdown();
        }
    }

    /// Control bytes exchanged so far.
    pub fn bytes(&self) -> LinkBytes {
        LinkBytes {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }

    /// Asks the SoC whether it is alive: Ok once it answers.
    pub fn keep_alive(&self) -> Result<(), String> {
        self.request(&Msg::KeepAlive).map(|_| ())
    }

    /// Sends a request and waits for its Reply: `Ok(value)` or the SoC's refusal.
    fn request(&self, m: &Msg) -> Result<u64, String> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.pending.lock().map_err(|_| "poisoned")?.insert(seq, tx);
        self.send(seq, m)?;
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((0, value)) => Ok(value),
            Ok((status, _)) => Err(format!("the SoC refused {m:?} (errno {status})")),
            Err(_) if self.is_closed() => Err(format!("the SoC went away before answering {m:?}")),
            Err(_) => {
                // A SoC that does not answer within 30 s is as good as gone.
                self.close();
                Err(format!("no reply from the SoC to {m:?} within 30 s"))
            }
        }
    }

    fn receive(&self, mut rx: Channel, mut framer: Framer) {
        let mut buf = [0u8; 4096];
        loop {
            let n = match rx.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.received.fetch_add(n as u64, Ordering::Relaxed);
            let msgs = match framer.push(&buf[..n]) {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("agent: bad frame from the SoC: {e}");
                    break;
                }
            };
            for (seq, m) in msgs {
                match m {
                    Msg::Reply { status, value } => {
                        if let Some(tx) = self.pending.lock().ok().and_then(|mut p| p.remove(&seq))
                        {
                            let _ = tx.send((status, value));
                        }
                    }
                    Msg::Call(q) => {
                        if let Ok(calls) = self.calls.lock() {
                            if let Some(Some(f)) = calls.get(q as usize) {
                                let _ = (&*f).write(&1u64.to_ne_bytes());
                            }
                        }
                    }
                    other => {
                        log_limited!(log::Level::Warn, "agent: unexpected {other:?} from the SoC")
                    }
                }
            }
        }
        self.closed.store(true, Ordering::Release);
        // Wake every waiter: their requests will never be answered.
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }
}

/// (device, inode) of a file.
fn identity(f: &File) -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(f.as_fd()).ok()?;
    Some((st.st_dev, st.st_ino))
}

#[derive(Default, Clone)]
struct AgentRing {
    size: u16,
    base: u16,
    addrs: Option<(u64, u64, u64)>,
    kick: Option<Arc<File>>,
    enabled: bool,
    running: bool,
}

/// The vhost-user device the hypervisor sees; its rings are served on the SoC.
pub struct AgentDevice {
    link: Arc<Link>,
    /// Where inflight regions live for the SoC to reach (None: tracking is not offered).
    inflight: Option<Arc<inflight::WindowFile>>,
    /// A getter was refused: the hypervisor waits for an answer that will not come.
    hangup: bool,
    window: (u64, u64),
    stats: Arc<VhostStats>,
    acked: u64,
    /// (front-end address, size, guest address) per region, for ring addresses.
    table: Vec<(u64, u64, u64)>,
    rings: Vec<AgentRing>,
    kicker: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl AgentDevice {
    /// A device relayed over `link`; guest memory must live in `window_file`, which the SoC
    /// maps through its window from offset 0.
    /// With `inflight`, inflight I/O tracking is offered to the hypervisor (if the SoC can reach
    /// that file): its regions are kept there and their place relayed to the SoC.
    pub fn new(
        link: Arc<Link>,
        window_file: &File,
        inflight: Option<Arc<inflight::WindowFile>>,
        stats: Arc<VhostStats>,
    ) -> Result<Self, String> {
        let window = identity(window_file).ok_or("cannot stat the window file")?;
        let n = link.info.num_queues as usize;
        let soc_tracks = link.info.protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0;
        if inflight.is_some() && !soc_tracks {
            log::warn!(
                "agent: the SoC has no window onto the inflight file; inflight tracking is not \
                 offered (a SoC restart may lose in-flight requests)"
            );
        }
        Ok(AgentDevice {
            link,
            inflight: inflight.filter(|_| soc_tracks),
            hangup: false,
            window,
            stats,
            acked: 0,
            table: Vec::new(),
            rings: vec![AgentRing::default(); n],
            kicker: None,
        })
    }

    fn refuse(&self, why: String) -> VuError {
        crate::device::refused(&self.stats, why)
    }

    fn ring(&self, index: u32) -> VuResult<usize> {
        let q = index as usize;
        if q < self.rings.len() {
            Ok(q)
        } else {
            Err(self.refuse(format!("queue {index} does not exist")))
        }
    }

    fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        let end = va.checked_add(len)?;
        self.table
            .iter()
            .find(|&&(s, l, _)| va >= s && s.checked_add(l).is_some_and(|e| end <= e))
            .map(|&(s, _, g)| g + (va - s))
    }

    /// Forwards kicks: one thread polls every started ring's kick eventfd.
    fn restart_kicker(&mut self) {
        if let Some((stop, t)) = self.kicker.take() {
            stop.store(true, Ordering::Release);
            let _ = t.join();
        }
        let kicks: Vec<(u16, Arc<File>)> = self
            .rings
            .iter()
            .enumerate()
            .filter(|(_, r)| r.running)
            .filter_map(|(q, r)| r.kick.clone().map(|k| (q as u16, k)))
            .collect();
        if kicks.is_empty() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (s, link) = (stop.clone(), self.link.clone());
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) && !link.closed.load(Ordering::Acquire) {
                let mut fds: Vec<libc::pollfd> = kicks
                    .iter()
                    .map(|(_, k)| libc::pollfd {
                        fd: k.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: a valid array of pollfd of the given length.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
                if n <= 0 {
                    continue;
                }
                for (f, (q, k)) in fds.iter().zip(&kicks) {
                    if f.revents & libc::POLLIN != 0 {
                        let mut v = [0u8; 8];
                        let _ = (&**k).read(&mut v);
                        let _ = link.send(0, &Msg::Kick(*q));
                    }
                }
            }
        });
        self.kicker = Some((stop, t));
    }

    fn try_start(&mut self, q: usize) -> VuResult<()> {
        let r = self.rings[q].clone();
        if r.running || r.kick.is_none() || !r.enabled {
            return Ok(());
        }
        let Some((desc, avail, used)) = r.addrs else {
            return Err(self.refuse(format!("queue {q} enabled before its addresses")));
        };
        let v = Vring {
            queue: q as u16,
            size: r.size,
            event_idx: self.acked & (1 << crate::config::feature::RING_EVENT_IDX) != 0,
            desc,
            avail,
            used,
            base: r.base,
        };
        self.link
            .request(&Msg::Vring(v))
            .and_then(|_| self.link.request(&Msg::VringStart(q as u16)))
            .map_err(|e| self.refuse(e))?;
        self.rings[q].running = true;
        self.restart_kicker();
        Ok(())
    }

    fn stop(&mut self, q: usize) -> VuResult<u16> {
        if !self.rings[q].running {
            return Ok(self.rings[q].base);
        }
        let base = self
            .link
            .request(&Msg::VringStop(q as u16))
            .map_err(|e| self.refuse(e))?;
        let base = u16::try_from(base).map_err(|_| {
            self.refuse(format!(
                "queue {q}: the SoC says it stopped at {base}, not a ring index"
            ))
        })?;
        self.rings[q].running = false;
        self.rings[q].base = base;
        self.restart_kicker();
        Ok(base)
    }

    /// A fresh inflight region in the inflight file, relayed to the SoC (GET_INFLIGHT_FD).
    fn fresh_inflight(&mut self, i: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let Some(w) = self.inflight.clone() else {
            return Err(self.refuse("GET_INFLIGHT_FD: inflight tracking was not offered".into()));
        };
        let (offset, size) = w
            .fresh_region(i.num_queues, i.queue_size, self.rings.len() as u16)
            .map_err(|e| self.refuse(format!("GET_INFLIGHT_FD: {e}")))?;
        self.relay_inflight(offset, size, i.num_queues, i.queue_size)?;
        let file = w
            .file()
            .try_clone()
            .map_err(|e| self.refuse(format!("GET_INFLIGHT_FD: {e}")))?;
        Ok((
            VhostUserInflight::new(size, offset, i.num_queues, i.queue_size),
            file,
        ))
    }

    /// Tells the SoC where the inflight region is: its offset in the inflight file, as a host
    /// address.
    fn relay_inflight(&mut self, offset: u64, size: u64, nq: u16, qs: u16) -> VuResult<()> {
        let host = relay::INFLIGHT_HOST
            .checked_add(offset)
            .ok_or_else(|| self.refuse(format!("inflight offset {offset:#x} overflows")))?;
        self.link
            .request(&Msg::Inflight {
                host,
                size,
                num_queues: nq,
                queue_size: qs,
            })
            .map(|_| ())
            .map_err(|e| self.refuse(e))
    }

    /// Stops every ring on the SoC (the connection ended). The SoC bounds each stop itself.
    pub fn shutdown(&mut self) {
        for q in 0..self.rings.len() {
            if self.link.is_closed() {
                self.rings[q].running = false;
            }
            let _ = self.stop(q);
        }
        if let Some((stop, t)) = self.kicker.take() {
            stop.store(true, Ordering::Release);
            let _ = t.join();
        }
    }
}

impl VhostUserBackendReqHandlerMut for AgentDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.shutdown();
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.shutdown();
        Ok(())
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.link.info.features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.link.info.features != 0 {
            return Err(self.refuse(format!("features never offered: {features:#x}")));
        }
        self.acked = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut relayed = Vec::new();
        let mut table = Vec::new();
        for (i, (r, f)) in regions.iter().zip(&files).enumerate() {
            let (gpa, size, ua, off) =
                (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
            if identity(f) != Some(self.window) {
                return Err(self.refuse(format!(
                    "memory region {i} is not in the window's file: the SoC cannot reach it"
                )));
            }
            relayed.push(MemRegion {
                guest: gpa,
                len: size,
                host: off,
            });
            table.push((ua, size, gpa));
        }
        self.link
            .request(&Msg::MemTable(relayed))
            .map_err(|e| self.refuse(e))?;
        self.table = table;
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let q = self.ring(index)?;
        if num == 0 || !num.is_power_of_two() || num > self.link.info.max_queue_size as u32 {
            return Err(self.refuse(format!("queue {q}: size {num}")));
        }
        self.rings[q].size = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let q = self.ring(index)?;
        let n = self.rings[q].size as u64;
        let (d, a, u) = (
            self.va_to_gpa(descriptor, 16 * n),
            self.va_to_gpa(available, 6 + 2 * n),
            self.va_to_gpa(used, 6 + 8 * n),
        );
        match (d, a, u) {
            (Some(d), Some(a), Some(u)) => {
                self.rings[q].addrs = Some((d, a, u));
                Ok(())
            }
            _ => Err(self.refuse(format!("queue {q}: ring addresses outside guest memory"))),
        }
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let q = self.ring(index)?;
        self.rings[q].base = u16::try_from(base).map_err(|_| {
            self.refuse(format!("queue {q}: base {base} is not a split-ring index"))
        })?;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let q = self.ring(index)?;
        let base = self.stop(q).inspect_err(|_| self.hangup = true)?;
        self.rings[q].kick = None;
        Ok(VhostUserVringState::new(index, base as u32))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.ring(index as u32)?;
        self.rings[q].kick = fd.map(Arc::new);
        if self.rings[q].running {
            self.restart_kicker();
        }
        self.try_start(q)
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.ring(index as u32)?;
        if let Ok(mut c) = self.link.calls.lock() {
            c[q] = fd;
        }
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        Ok(match self.inflight {
            Some(_) => f | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            None => f,
        })
    }
    fn set_protocol_features(&mut self, _features: u64) -> VuResult<()> {
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.rings.len() as u64)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let q = self.ring(index)?;
        self.rings[q].enabled = enable;
        if enable {
            self.try_start(q)
        } else {
            self.stop(q).map(|_| ())
        }
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _f: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let c = &self.link.info.config;
        Ok((0..(size as usize).min(4096))
            .map(|i| c.get(offset as usize + i).copied().unwrap_or(0))
            .collect())
    }
    fn set_config(&mut self, offset: u32, buf: &[u8], _f: VhostUserConfigFlags) -> VuResult<()> {
        self.link
            .request(&Msg::SetConfig {
                offset,
                bytes: buf.to_vec(),
            })
            .map(|_| ())
            .map_err(|e| self.refuse(e))
    }
    fn get_inflight_fd(&mut self, i: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let r = self.fresh_inflight(i);
        r.inspect_err(|_| self.hangup = true)
    }
    fn set_inflight_fd(&mut self, i: &VhostUserInflight, file: File) -> VuResult<()> {
        let Some(w) = self.inflight.clone() else {
            return Err(self.refuse("SET_INFLIGHT_FD: inflight tracking was not offered".into()));
        };
        if identity(&file).is_none() || identity(&file) != identity(w.file()) {
            return Err(self.refuse(
                "SET_INFLIGHT_FD: the region is not in the inflight file the SoC can reach".into(),
            ));
        }
        self.relay_inflight(i.mmap_offset, i.mmap_size, i.num_queues, i.queue_size)
    }

    refuse_unsupported_requests!();
}

impl crate::server::Session for AgentDevice {
    fn take_hangup(&mut self) -> bool {
        std::mem::take(&mut self.hangup)
    }
    fn shutdown(&mut self, _timeout: Option<Duration>) {
        AgentDevice::shutdown(self)
    }
}
