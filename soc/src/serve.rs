//! `leapd serve`: one vhost-user-blk disk until SIGINT or SIGTERM — on a unix socket in host
//! mode, or, in the SoC modes, to host agents over TCP with guest memory reached through the
//! platform's windows and request data bounced through local memory.

use crate::diskspec::{DiskKind, DiskSpec};
use crate::platform::Platform;
use leap_runtime::backend::{
    Backend, BounceBackend, FileBackend, FileOptions, NullBackend, RamBackend,
};
use leap_runtime::nvmf::initiator::{InitiatorConfig, NvmeTcpBackend};
use leap_runtime::{DeviceIoStats, Namespace, Poller, PollerConfig};
use leap_vhost::{DeviceConfig, DeviceContext, VhostStats};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest request through a window's bounce buffers (the virtio config says so to the guest).
pub(crate) const BOUNCE_MAX_TRANSFER: u32 = 128 << 10;

/// Everything `serve` needs, after defaults are applied.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The disks (host mode: any number, each on its socket; SoC modes: exactly one).
    pub disks: Vec<crate::config::Disk>,
    /// NVMe/TCP targets (host mode), on the same pollers.
    pub targets: Vec<crate::config::Target>,
    /// Number of poller threads (None: one per queue, at most one per CPU).
    pub pollers: Option<usize>,
    /// How long a poller spins idle before sleeping.
    pub idle_spin: Duration,
    /// Pin pollers to CPUs.
    pub pin: bool,
    /// One pinned poller per listed core.
    pub cores: Option<Vec<usize>>,
    /// SoC modes: where host agents connect.
    pub listen: String,
    /// Host mode: the control API's socket (None: no control API).
    pub rpc: Option<RpcOptions>,
    /// Where to serve Prometheus metrics (None: nowhere).
    pub metrics: Option<String>,
    /// The `--config` file (where the control API writes changes back).
    pub config_file: Option<PathBuf>,
    /// The pollers section, as configured (written back with the disks).
    pub pollers_cfg: crate::config::Pollers,
}

/// Where the control API listens.
#[derive(Clone, Debug)]
pub struct RpcOptions {
    /// Socket path.
    pub path: PathBuf,
    /// Permissions.
    pub mode: u32,
    /// Given on the command line: a socket in use is then an error, not a warning.
    pub explicit: bool,
}

/// Opens the back end a disk spec names.
pub fn open_backend(disk: &DiskSpec, block_size: u32) -> Result<Arc<dyn Backend>, String> {
    let default_mem = 1u64 << 30;
    Ok(match &disk.kind {
        DiskKind::Null => Arc::new(NullBackend::new(
            disk.size.unwrap_or(default_mem),
            block_size,
        )),
        DiskKind::Ram => Arc::new(
            RamBackend::new(disk.size.unwrap_or(default_mem), block_size)
                .map_err(|e| e.to_string())?,
        ),
        DiskKind::NvmeTcp(t) => {
            use std::net::ToSocketAddrs;
            let addr = t
                .addr
                .to_socket_addrs()
                .map_err(|e| format!("nvme-tcp://{}: {e}", t.addr))?
                .next()
                .ok_or_else(|| format!("nvme-tcp://{}: no address", t.addr))?;
            let (default_nqn, hostid) = InitiatorConfig::default_host();
            Arc::new(
                NvmeTcpBackend::open(InitiatorConfig {
                    addr,
                    subnqn: t.nqn.clone(),
                    nsid: t.nsid,
                    queues: t.queues,
                    depth: t.depth,
                    digests: t.digest,
                    hostnqn: t.hostnqn.clone().unwrap_or(default_nqn),
                    hostid,
                    timeout: t.timeout,
                })
                .map_err(|e| e.to_string())?,
            )
        }
        DiskKind::Vfio(v) => Arc::new(
            leap_runtime::backend::VfioBackend::open(leap_runtime::backend::VfioOptions {
                bdf: v.bdf.clone(),
                nsid: v.nsid,
                queues: v.queues,
                depth: u32::from(v.depth),
                io_timeout: v.timeout,
            })
            .map_err(|e| e.to_string())?,
        ),
        DiskKind::File(path) => Arc::new(
            FileBackend::open(&FileOptions {
                path: path.clone(),
                size: disk.size,
                direct: disk.direct,
                read_only: disk.read_only,
                block_size,
            })
            .map_err(|e| e.to_string())?,
        ),
    })
}

/// Where pollers run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// This many pollers, left to the scheduler.
    Float(usize),
    /// This many pollers, each pinned to its own CPU of the platform's (in order).
    Pin(usize),
    /// One poller per listed core, pinned (`--cores`), like a DAOS engine's targets.
    Cores(Vec<usize>),
}

impl Placement {
    /// From the command line: `--cores` wins (and must agree with `--pollers` if both are given);
    /// else `--pollers` (or `default`), pinned with `--pin`.
    pub fn from_args(
        cores: Option<&[usize]>,
        pollers: Option<usize>,
        pin: bool,
        default: usize,
    ) -> Result<Placement, String> {
        match cores {
            Some(c) => match pollers {
                Some(n) if n != c.len() => Err(format!(
                    "--pollers {n} disagrees with --cores ({} core(s): one poller per core)",
                    c.len()
                )),
                _ => Ok(Placement::Cores(c.to_vec())),
            },
            None => {
                let n = pollers.unwrap_or(default).max(1);
                Ok(if pin {
                    Placement::Pin(n)
                } else {
                    Placement::Float(n)
                })
            }
        }
    }

    /// Number of pollers.
    pub fn count(&self) -> usize {
        match self {
            Placement::Float(n) | Placement::Pin(n) => *n,
            Placement::Cores(c) => c.len(),
        }
    }
}

/// Starts pollers as `placement` says, logging each one's core and NUMA node.
pub fn start_pollers(
    platform: &dyn Platform,
    placement: &Placement,
    idle_spin: Duration,
) -> Result<Arc<Vec<Poller>>, String> {
    let allowed = platform.poller_cpus();
    let cpus: Vec<Option<usize>> = match placement {
        Placement::Float(n) => vec![None; *n],
        Placement::Pin(n) => (0..*n)
            .map(|i| allowed.get(i % allowed.len().max(1)).copied())
            .collect(),
        Placement::Cores(c) => {
            for &core in c {
                if !allowed.contains(&core) {
                    return Err(format!(
                        "--cores: core {core} is not available to leapd (allowed: {})",
                        format_cores(&allowed)
                    ));
                }
            }
            c.iter().map(|&c| Some(c)).collect()
        }
    };
    let mut v = Vec::new();
    for (i, cpu) in cpus.into_iter().enumerate() {
        let cfg = PollerConfig {
            name: format!("leap-poller{i}"),
            idle_spin,
            cpu,
            ..Default::default()
        };
        match cpu {
            Some(c) => log::info!(
                "poller {i} on core {c} (NUMA node {})",
                platform
                    .numa_node(c)
                    .map_or_else(|| "unknown".to_string(), |n| n.to_string())
            ),
            None => log::debug!("poller {i} not pinned"),
        }
        v.push(Poller::spawn(cfg).map_err(|e| format!("cannot start poller: {e}"))?);
    }
    Ok(Arc::new(v))
}

/// A `--cores` value (one argument, not a list of arguments, for clap).
#[derive(Clone, Debug)]
pub struct CoreList(pub Vec<usize>);

/// clap's parser for `--cores`.
pub fn parse_core_list(s: &str) -> Result<CoreList, String> {
    parse_cores(s).map(CoreList)
}

/// Parses a core list: `2-3`, `0,2,4-6`. Sorted, no duplicates, at most 1024 cores.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{part}' is not a core number or range (e.g. 2-3,6)"))
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("'{part}': range runs backwards"));
        }
        if b >= 1024 {
            return Err(format!("'{part}': core numbers go up to 1023"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    let n = out.len();
    out.dedup();
    if out.len() != n {
        return Err(format!("'{s}' lists a core twice"));
    }
    Ok(out)
}

/// `0-1,4` style.
fn format_cores(c: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let mut j = i;
        while j + 1 < c.len() && c[j + 1] == c[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            c[i].to_string()
        } else {
            format!("{}-{}", c[i], c[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Serves until a signal arrives. Prints `how_to_attach` once listening (host mode).
pub fn run(
    platform: &dyn Platform,
    o: &ServeOptions,
    how_to_attach: impl FnOnce(&ServeOptions),
) -> Result<(), String> {
    let soc = !platform.windows().is_empty();
    if soc && (o.disks.len() != 1 || !o.targets.is_empty()) {
        return Err(format!(
            "{} mode serves one disk per leapd and no targets (got {} disk(s), {} target(s))",
            platform.name(),
            o.disks.len(),
            o.targets.len()
        ));
    }
    let signals = crate::signals::block_termination()?;
    let total_queues: usize = o.disks.iter().map(|d| d.queues as usize).sum::<usize>()
        + o.targets
            .iter()
            .map(|t| t.cfg.max_io_queues as usize)
            .sum::<usize>();
    let cpus = platform.poller_cpus().len().max(1);
    let placement =
        Placement::from_args(o.cores.as_deref(), o.pollers, o.pin, total_queues.min(cpus))?;
    let where_ = format!(
        "{} poller(s), platform {} ({} KiB pages)",
        placement.count(),
        platform.name(),
        platform.page_size() >> 10
    );
    if soc {
        return run_soc(platform, o, &placement, &where_, signals);
    }
    let pollers = start_pollers(platform, &placement, o.idle_spin)?;
    let daemon = Arc::new(crate::daemon::Daemon::new(pollers.clone()));
    for d in &o.disks {
        if let Err(e) = daemon.add(&d.config) {
            daemon.remove_all();
            return Err(e);
        }
    }
    for t in &o.targets {
        if let Err(e) = daemon.target_add(&t.config) {
            daemon.remove_all();
            return Err(e);
        }
    }
    log::info!(
        "serving {} disk(s) and {} target(s) on {where_}",
        o.disks.len(),
        o.targets.len()
    );
    let rpc = match &o.rpc {
        None => None,
        Some(r) => {
            let ctl = Arc::new(crate::rpc::Control {
                daemon: daemon.clone(),
                config_file: o.config_file.clone(),
                pollers: o.pollers_cfg.clone(),
            });
            match crate::rpc::RpcServer::start(&r.path, r.mode, ctl) {
                Ok(s) => Some(s),
                Err(e) if !r.explicit => {
                    log::warn!("control API disabled: {e}");
                    None
                }
                Err(e) => {
                    daemon.remove_all();
                    return Err(e);
                }
            }
        }
    };
    let metrics = match &o.metrics {
        None => None,
        Some(addr) => {
            match crate::metrics::MetricsServer::start(addr, daemon.clone(), pollers.clone()) {
                Ok(m) => Some(m),
                Err(e) => {
                    drop(rpc);
                    daemon.remove_all();
                    return Err(e);
                }
            }
        }
    };
    let (stop, sig_thread) = stop_on_signal(signals)?;
    how_to_attach(o);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(metrics);
    drop(rpc);
    // Each disk's connection ends once its in-flight I/O completes; sockets go, back ends sync.
    daemon.remove_all();
    drop(sig_thread);
    drop(daemon);
    drop(pollers);
    log::info!("stopped cleanly");
    Ok(())
}

/// A flag the first SIGINT or SIGTERM sets (in-flight I/O then completes and leapd stops), and
/// the thread that waits for it.
fn stop_on_signal(
    signals: nix::sys::signal::SigSet,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let t = crate::signals::on_termination(signals, move |sig| {
        log::info!("{sig}: finishing in-flight I/O and stopping");
        s.store(true, Ordering::Release);
    })?;
    Ok((stop, t))
}

/// The SoC modes: the one disk, bounced, to host agents.
fn run_soc(
    platform: &dyn Platform,
    o: &ServeOptions,
    placement: &Placement,
    where_: &str,
    signals: nix::sys::signal::SigSet,
) -> Result<(), String> {
    let d = &o.disks[0];
    let inner = open_backend(&d.spec, d.block_size)?;
    // Through a window, the back end never sees window addresses: data is bounced.
    let bounce = Arc::new(
        BounceBackend::new(inner.clone(), BOUNCE_MAX_TRANSFER).map_err(|e| e.to_string())?,
    );
    let backend: Arc<dyn Backend> = bounce.clone();
    let pollers = start_pollers(platform, placement, o.idle_spin)?;
    let ctx = DeviceContext {
        ns: Namespace::with_limits(backend.clone(), &d.spec.limits),
        pollers: pollers.clone(),
        config: DeviceConfig {
            num_queues: d.queues,
            inflight: d.inflight,
            name: d.name.clone(),
            ..DeviceConfig::default()
        },
        stats: Arc::new(VhostStats::default()),
        io_stats: Arc::new(DeviceIoStats::new(d.queues as usize)),
        writeback: true,
    };
    let metrics = match &o.metrics {
        None => None,
        Some(addr) => Some(crate::metrics::MetricsServer::start(
            addr,
            Arc::new(crate::metrics::Fixed {
                disks: vec![crate::metrics::DiskView {
                    name: d.name.clone(),
                    io: ctx.io_stats.clone(),
                    malformed: ctx.stats.clone(),
                    backend: backend.clone(),
                }],
                targets: Vec::new(),
            }),
            pollers.clone(),
        )?),
    };
    let (stop, sig_thread) = stop_on_signal(signals)?;
    let info = backend.info();
    log::info!(
        "serving {} ({} bytes, {}-byte blocks{}) with {} queue(s), {where_}, to host agents on {}",
        backend.kind(),
        info.size,
        info.block_size,
        if info.read_only { ", read-only" } else { "" },
        d.queues,
        o.listen
    );
    let r = serve_agents(platform, &o.listen, &ctx, &bounce, &stop);
    drop(sig_thread);
    drop(metrics);
    // Pollers drain in-flight work when dropped; then make the data durable.
    drop(ctx);
    drop(pollers);
    leap_runtime::backend::sync(&*backend).map_err(|e| format!("final {e}"))?;
    log::info!("stopped cleanly");
    r
}

/// The SoC modes: one host agent session at a time on `listen` (TCP), each served through the
/// platform's windows, until `stop`. An agent that goes away (or restarts) ends its session: its
/// rings stop, in-flight requests complete, and the next agent is served from scratch.
fn serve_agents(
    platform: &dyn Platform,
    listen: &str,
    ctx: &DeviceContext,
    bounce: &BounceBackend,
    stop: &AtomicBool,
) -> Result<(), String> {
    use leap_vhost::region::WindowFile;
    use leap_vhost::soc::{serve, SocDevice};
    let mut windows = Vec::new();
    let mut files = Vec::new();
    for src in platform.windows() {
        let (w, f) = src.open()?;
        log::info!(
            "window {}: host {:#x}+{:#x} at SoC address {:#x}",
            src.what,
            w.host,
            w.len,
            w.soc
        );
        windows.push(w);
        files.push(f);
    }
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| format!("cannot listen for host agents on {listen}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{listen}: {e}"))?;
    while !stop.load(Ordering::Acquire) {
        let (mut stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                log::warn!("{listen}: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let session_files = files
            .iter()
            .map(|f| {
                Ok(WindowFile {
                    file: f.file.try_clone()?,
                    soc: f.soc,
                    len: f.len,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("window: {e}"))?;
        let mut dev = SocDevice::new(ctx.clone(), windows.clone(), session_files)
            .map_err(|e| format!("device: {e}"))?;
        log::info!("host agent {peer} connected");
        let before = bounce.window_bytes();
        let r = serve(&mut stream, &mut dev, stop);
        let now = bounce.window_bytes();
        let end = match r {
            Ok(()) => "ended".to_string(),
            Err(e) => format!("ended: {e}"),
        };
        log::info!(
            "host agent {peer}: session {end}; request data through the window: {} bytes \
             (from it {}, to it {}); window_bytes_total={}",
            (now.from_window - before.from_window) + (now.to_window - before.to_window),
            now.from_window - before.from_window,
            now.to_window - before.to_window,
            now.from_window + now.to_window
        );
        log::info!(
            "totals: {}",
            leap_vhost::server::counters(Some(&ctx.io_stats), &ctx.stats)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists_parse_and_bad_ones_say_why() {
        assert_eq!(parse_cores("2-3").unwrap(), vec![2, 3]);
        assert_eq!(parse_cores("6,0, 2-4").unwrap(), vec![0, 2, 3, 4, 6]);
        for bad in ["", "x", "3-1", "1,1", "0-2000", "-1"] {
            assert!(parse_cores(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_cores(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    #[test]
    fn placement_follows_cores_then_pollers() {
        assert_eq!(
            Placement::from_args(Some(&[2, 3]), None, false, 1).unwrap(),
            Placement::Cores(vec![2, 3])
        );
        assert!(Placement::from_args(Some(&[2, 3]), Some(3), false, 1).is_err());
        assert_eq!(
            Placement::from_args(None, Some(3), true, 1).unwrap(),
            Placement::Pin(3)
        );
        assert_eq!(
            Placement::from_args(None, None, false, 2).unwrap(),
            Placement::Float(2)
        );
    }
}
