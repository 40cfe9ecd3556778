//! `leapd serve`: one vhost-user-blk disk on a unix socket until SIGINT or SIGTERM.

use crate::diskspec::{DiskKind, DiskSpec};
use crate::platform::Platform;
use leap_runtime::backend::{Backend, FileBackend, FileOptions, NullBackend, RamBackend};
use leap_runtime::nvmf::initiator::{InitiatorConfig, NvmeTcpBackend};
use leap_runtime::{DeviceIoStats, Namespace, Poller, PollerConfig};
use leap_vhost::{DeviceConfig, DeviceContext, Server, VhostStats};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything `serve` needs, after defaults are applied.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The socket path.
    pub socket: PathBuf,
    /// The disk.
    pub disk: DiskSpec,
    /// Number of virtqueues offered.
    pub queues: u16,
    /// Logical block size.
    pub block_size: u32,
    /// Socket permissions.
    pub socket_mode: u32,
    /// Offer inflight I/O tracking.
    pub inflight: bool,
    /// Number of poller threads (None: one per queue, at most one per CPU).
    pub pollers: Option<usize>,
    /// How long a poller spins idle before sleeping.
    pub idle_spin: Duration,
    /// Pin pollers to CPUs.
    pub pin: bool,
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

/// Starts `n` pollers over the platform's CPUs.
pub fn start_pollers(
    platform: &dyn Platform,
    n: usize,
    idle_spin: Duration,
    pin: bool,
) -> Result<Arc<Vec<Poller>>, String> {
    let cpus = platform.poller_cpus();
    let mut v = Vec::new();
    for i in 0..n {
        let cfg = PollerConfig {
            name: format!("leap-poller{i}"),
            idle_spin,
            cpu: if pin {
                cpus.get(i % cpus.len().max(1)).copied()
            } else {
                None
            },
            ..Default::default()
        };
        v.push(Poller::spawn(cfg).map_err(|e| format!("cannot start poller: {e}"))?);
    }
    Ok(Arc::new(v))
}

/// Serves until a signal arrives. Prints `how_to_attach` once listening.
pub fn run(
    platform: &dyn Platform,
    o: &ServeOptions,
    how_to_attach: impl FnOnce(&ServeOptions),
) -> Result<(), String> {
    let signals = crate::signals::block_termination()?;
    let backend = open_backend(&o.disk, o.block_size)?;
    let ns = Namespace::with_limits(backend.clone(), &o.disk.limits);
    let cpus = platform.poller_cpus().len().max(1);
    let npollers = o
        .pollers
        .unwrap_or_else(|| (o.queues as usize).min(cpus))
        .max(1);
    let pollers = start_pollers(platform, npollers, o.idle_spin, o.pin)?;
    let ctx = DeviceContext {
        ns,
        pollers: pollers.clone(),
        config: DeviceConfig {
            num_queues: o.queues,
            inflight: o.inflight,
            ..DeviceConfig::default()
        },
        stats: Arc::new(VhostStats::default()),
        io_stats: Arc::new(DeviceIoStats::new(o.queues as usize)),
        writeback: true,
    };
    let mut server =
        Server::bind(&o.socket, o.socket_mode, ctx.clone()).map_err(|e| e.to_string())?;
    let stop = server.stop_handle();
    let sig_thread = crate::signals::on_termination(signals, move |sig| {
        log::info!("{sig}: finishing in-flight I/O and stopping");
        stop.stop();
    })?;
    let info = backend.info();
    log::info!(
        "serving {} ({} bytes, {}-byte blocks{}) on {} with {} queue(s), {} poller(s), platform {} ({} KiB pages)",
        backend.kind(),
        info.size,
        info.block_size,
        if info.read_only { ", read-only" } else { "" },
        o.socket.display(),
        o.queues,
        npollers,
        platform.name(),
        platform.page_size() >> 10
    );
    how_to_attach(o);
    let r = server.run().map_err(|e| e.to_string());
    drop(server); // removes the socket
    drop(sig_thread);
    // Pollers drain in-flight work when dropped; then make the data durable.
    drop(ctx);
    drop(pollers);
    leap_runtime::backend::sync(&*backend).map_err(|e| format!("final {e}"))?;
    log::info!("stopped cleanly");
    r
}
