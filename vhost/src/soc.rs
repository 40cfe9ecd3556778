//! leapd on a SoC (or in a SoC VM): the device side of the agent protocol ([`crate::relay`]).
//!
//! The host agent terminates vhost-user for the hypervisor and relays only control. This side
//! serves the rings straight out of guest memory seen through windows
//! ([`MemoryTable::from_window`]) with the same ports and pollers as a vhost-user device
//! ([`crate::device::start_ring`]): a Kick message wakes the ring's poller through a local
//! eventfd, and the poller's completion signal on a local eventfd becomes a Call message. No
//! request data crosses the control channel. Every message is checked before it changes anything;
//! one that cannot be honoured gets a Reply with an errno, is counted (`malformed_message`) and
//! logged, and the session goes on.

use crate::device::{
    blk_config, offered_features, start_ring, DeviceContext, RingAddrs, RingParams, Shared,
};
use crate::queue::Signal;
use crate::region::{MemoryTable, WindowFile};
use crate::relay::{self, Framer, Msg, Role};
use crate::stats::Malformed;
use leap_runtime::window::{GuestRange, Window};
use leap_runtime::{log_limited, Namespaces, PairId};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One ring as the agent described it.
struct SocRing {
    vring: Option<relay::Vring>,
    /// Written when a Kick arrives; the ring's poller sleeps on it.
    kick: File,
    /// The poller signals it; the session turns that into a Call message.
    call: Arc<Signal>,
    call_rx: File,
    running: Option<(usize, PairId)>,
    stopped_at: Arc<AtomicU32>,
}

fn eventfd() -> std::io::Result<File> {
    leap_runtime::eventfd::new().map(File::from)
}

/// The device of one agent session.
pub struct SocDevice {
    ctx: DeviceContext,
    nss: Arc<Namespaces>,
    shared: Arc<Shared>,
    windows: Vec<Window>,
    files: Vec<WindowFile>,
    table: MemoryTable,
    rings: Vec<SocRing>,
    /// The inflight region the agent placed in a window (Inflight message).
    inflight: Option<Arc<crate::inflight::Region>>,
}

const EINVAL: u32 = libc::EINVAL as u32;

impl SocDevice {
    /// A device for `ctx`'s disk, reaching guest memory through `windows` (host ranges at SoC
    /// addresses) mapped from `files`.
    pub fn new(
        ctx: DeviceContext,
        windows: Vec<Window>,
        files: Vec<WindowFile>,
    ) -> std::io::Result<Self> {
        let mut rings = Vec::new();
        for _ in 0..ctx.config.num_queues {
            let call_fd = eventfd()?;
            let call = Arc::new(Signal::default());
            call.set(Some(call_fd.try_clone()?));
            rings.push(SocRing {
                vring: None,
                kick: eventfd()?,
                call,
                call_rx: call_fd,
                running: None,
                stopped_at: Arc::new(AtomicU32::new(0)),
            });
        }
        Ok(SocDevice {
            nss: Namespaces::single(ctx.ns.clone()),
            shared: Shared::new(&ctx),
            ctx,
            windows,
            files,
            table: MemoryTable::empty(),
            rings,
            inflight: None,
        })
    }

    /// Whether a window holds inflight regions (its file starts with the inflight magic), so
    /// the agent may offer inflight tracking to the hypervisor.
    fn has_inflight_window(&self) -> bool {
        self.files
            .iter()
            .any(|f| crate::inflight::is_window_file(&f.file))
    }

    /// Maps the inflight region at host address `host` through the windows.
    fn open_inflight(
        &self,
        host: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<crate::inflight::Region, String> {
        let end = host.checked_add(size).ok_or("host range overflows")?;
        let w = self
            .windows
            .iter()
            .find(|w| host >= w.host && w.host.checked_add(w.len).is_some_and(|e| end <= e))
            .ok_or_else(|| format!("host {host:#x}+{size:#x} is in no window"))?;
        let soc = w
            .soc
            .checked_add(host - w.host)
            .ok_or("SoC address overflows")?;
        let f = self
            .files
            .iter()
            .find(|f| soc >= f.soc && (soc - f.soc).checked_add(size).is_some_and(|e| e <= f.len))
            .ok_or_else(|| format!("SoC address {soc:#x}+{size:#x} is in no window file"))?;
        crate::inflight::Region::open(
            &f.file,
            size,
            soc - f.soc,
            num_queues,
            queue_size,
            self.rings.len() as u16,
        )
        .map_err(|e| e.to_string())
    }

    /// What this side sends first: Hello and the device.
    pub fn greeting(&self) -> Vec<Msg> {
        vec![
            Msg::Hello {
                role: Role::Soc,
                features: 0,
                name: "leapd".into(),
            },
            Msg::DeviceInfo {
                features: offered_features(&self.shared),
                protocol: if self.has_inflight_window() {
                    vhost::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
                } else {
                    0
                },
                num_queues: self.ctx.config.num_queues,
                max_queue_size: self.ctx.config.max_queue_size,
                config: blk_config(&self.ctx, &self.shared).to_bytes().to_vec(),
            },
        ]
    }

    fn refuse(&self, why: String) -> Option<Msg> {
        self.shared.stats.count(Malformed::Message);
        log_limited!(log::Level::Warn, "agent request refused: {why}");
        Some(Msg::Reply {
            status: EINVAL,
            value: 0,
        })
    }

    fn ok(value: u64) -> Option<Msg> {
        Some(Msg::Reply { status: 0, value })
    }

    fn ring(&self, q: u16) -> Result<usize, String> {
        let q = q as usize;
        if q < self.rings.len() {
            Ok(q)
        } else {
            Err(format!(
                "queue {q} does not exist (the device has {})",
                self.rings.len()
            ))
        }
    }

    fn stop(&mut self, q: usize, timeout: Option<Duration>) {
        if let Some((pi, id)) = self.rings[q].running.take() {
            if let Err(e) = self.ctx.pollers[pi].detach_within(id, timeout) {
                log::warn!("queue {q}: stopping: {e}");
            }
        }
    }

    /// Stops every ring (in-flight requests complete first, for at most `timeout` each).
    pub fn shutdown(&mut self, timeout: Option<Duration>) {
        for q in 0..self.rings.len() {
            self.stop(q, timeout);
        }
    }

    /// Handles one message; returns the reply to send, if the message takes one.
    pub fn handle(&mut self, msg: Msg) -> Option<Msg> {
        match msg {
            Msg::Hello { role, name, .. } => {
                if role != Role::Agent {
                    return self.refuse(format!("a Hello from {name} that is not an agent"));
                }
                log::info!("agent {name} connected");
                None
            }
            Msg::MemTable(regions) => {
                let guest: Vec<GuestRange> = regions
                    .iter()
                    .map(|r| GuestRange {
                        guest: r.guest,
                        len: r.len,
                        host: r.host,
                    })
                    .collect();
                match MemoryTable::from_window(&guest, &self.windows, &self.files) {
                    Ok(t) => {
                        self.shared.set_memory(t.clone());
                        self.table = t;
                        Self::ok(0)
                    }
                    Err(e) => self.refuse(format!("memory table: {e}")),
                }
            }
            Msg::Vring(v) => match self.ring(v.queue) {
                Ok(q) if self.rings[q].running.is_some() => {
                    self.refuse(format!("queue {q} is running"))
                }
                Ok(q) if v.size > self.ctx.config.max_queue_size => {
                    self.refuse(format!("queue {q}: size {} beyond the maximum", v.size))
                }
                Ok(q) => {
                    self.rings[q].vring = Some(v);
                    Self::ok(0)
                }
                Err(e) => self.refuse(e),
            },
            Msg::VringStart(q) => {
                let q = match self.ring(q) {
                    Ok(q) => q,
                    Err(e) => return self.refuse(e),
                };
                let r = &self.rings[q];
                let Some(v) = r.vring else {
                    return self.refuse(format!("queue {q} started before its Vring"));
                };
                if r.running.is_some() {
                    return Self::ok(0);
                }
                let params = RingParams {
                    q,
                    size: v.size,
                    addrs: RingAddrs {
                        desc: v.desc,
                        avail: v.avail,
                        used: v.used,
                    },
                    base: v.base,
                    event_idx: v.event_idx,
                    kick: Some(&r.kick),
                    call: &r.call,
                    inflight: self.inflight.as_ref(),
                    stopped_at: &r.stopped_at,
                    mem: &self.table,
                };
                match start_ring(&self.ctx, &self.nss, &self.shared, params) {
                    Ok(running) => {
                        self.rings[q].running = Some(running);
                        Self::ok(0)
                    }
                    Err(e) => self.refuse(e),
                }
            }
            Msg::VringStop(q) => match self.ring(q) {
                Ok(q) => {
                    self.stop(q, None);
                    let base = self.rings[q].stopped_at.load(Ordering::Acquire) as u64;
                    Self::ok(base)
                }
                Err(e) => self.refuse(e),
            },
            Msg::Kick(q) => {
                match self.ring(q) {
                    Ok(q) => {
                        let _ = (&self.rings[q].kick).write(&1u64.to_ne_bytes());
                    }
                    Err(e) => {
                        self.refuse(e);
                    }
                }
                None
            }
            Msg::SetConfig { offset, bytes } => {
                if offset as usize != crate::config::WRITEBACK_OFFSET
                    || bytes.len() != 1
                    || !self.shared.shape.volatile_cache
                {
                    self.shared.stats.count(Malformed::Config);
                    return self.refuse(format!(
                        "configuration write of {} byte(s) at {offset}",
                        bytes.len()
                    ));
                }
                self.shared
                    .writeback
                    .store(bytes[0] != 0, Ordering::Relaxed);
                Self::ok(0)
            }
            Msg::Reset => {
                self.shutdown(None);
                for r in self.rings.iter_mut() {
                    r.vring = None;
                }
                self.inflight = None;
                Self::ok(0)
            }
            Msg::KeepAlive => Self::ok(0),
            Msg::Inflight {
                host,
                size,
                num_queues,
                queue_size,
            } => {
                if self.rings.iter().any(|r| r.running.is_some()) {
                    return self.refuse("an inflight region while rings run".into());
                }
                match self.open_inflight(host, size, num_queues, queue_size) {
                    Ok(r) => {
                        self.inflight = Some(Arc::new(r));
                        Self::ok(0)
                    }
                    Err(e) => self.refuse(format!("inflight region: {e}")),
                }
            }
            // Messages only this side sends, or replies it does not wait for.
            m @ (Msg::DeviceInfo { .. } | Msg::Call(_) | Msg::Reply { .. }) => {
                self.refuse(format!("unexpected {m:?} from the agent"))
            }
        }
    }
}

/// How long an agent may stay silent before its session is ended: `leapd agent` sends a
/// KeepAlive every 2 s, so silence means it is gone (a crashed host, a half-open connection).
pub const AGENT_SILENCE: Duration = Duration::from_secs(15);

/// Serves one agent session on `stream` until the agent goes away (closes the connection, or
/// is silent for [`AGENT_SILENCE`]) or `stop` is set: sends the greeting, answers every message,
/// and turns completion signals into Call messages.
pub fn serve<S: Read + Write + AsRawFd>(
    stream: &mut S,
    dev: &mut SocDevice,
    stop: &AtomicBool,
) -> Result<(), String> {
    serve_within(stream, dev, stop, AGENT_SILENCE)
}

/// [`serve`], with the agent allowed `silence` between messages.
pub fn serve_within<S: Read + Write + AsRawFd>(
    stream: &mut S,
    dev: &mut SocDevice,
    stop: &AtomicBool,
    silence: Duration,
) -> Result<(), String> {
    let mut out = Vec::new();
    for m in dev.greeting() {
        relay::encode(&m, 0, &mut out).map_err(|e| e.to_string())?;
    }
    stream.write_all(&out).map_err(|e| format!("send: {e}"))?;
    let mut framer = Framer::default();
    let mut buf = vec![0u8; 16 << 10];
    let mut heard = std::time::Instant::now();
    // The channel, then each ring's completion eventfd: fixed for the session, built once.
    let mut fds: Vec<libc::pollfd> = std::iter::once(stream.as_raw_fd())
        .chain(dev.rings.iter().map(|r| r.call_rx.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let result = loop {
        if stop.load(Ordering::Acquire) {
            break Ok(());
        }
        if heard.elapsed() > silence {
            break Err(format!(
                "the agent has been silent for {:.1} s: ending its session",
                silence.as_secs_f64()
            ));
        }
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n <= 0 {
            continue;
        }
        out.clear();
        for (q, f) in fds.iter().enumerate().skip(1) {
            if f.revents & libc::POLLIN != 0 {
                let mut v = [0u8; 8];
                let _ = (&dev.rings[q - 1].call_rx).read(&mut v);
                relay::encode(&Msg::Call((q - 1) as u16), 0, &mut out)
                    .map_err(|e| e.to_string())?;
            }
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            let got = stream.read(&mut buf);
            if matches!(got, Ok(n) if n > 0) {
                heard = std::time::Instant::now();
            }
            match got {
                Ok(0) => break Ok(()),
                Ok(n) => match framer.push(&buf[..n]) {
                    Ok(msgs) => {
                        for (seq, m) in msgs {
                            if let Some(reply) = dev.handle(m) {
                                relay::encode(&reply, seq, &mut out).map_err(|e| e.to_string())?;
                            }
                        }
                    }
                    Err(e) => {
                        dev.shared.stats.count(Malformed::Message);
                        break Err(format!("agent: {e}"));
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("receive: {e}")),
            }
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out) {
                break Err(format!("send: {e}"));
            }
        }
    };
    dev.shutdown(Some(Duration::from_secs(5)));
    result
}
