//! `leapd target`: export disks as the namespaces of one NVMe/TCP subsystem until SIGINT or
//! SIGTERM.

use crate::diskspec::{DiskSpec, DISK_SYNTAX};
use crate::platform::Platform;
use leap_runtime::nvmf::target::{Subsystem, Target, TargetConfig};
use leap_runtime::{Namespace, Namespaces};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Options of `leapd target`.
#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// Address to serve NVMe/TCP on (loopback unless you say otherwise).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:4420")]
    listen: String,
    /// Port of the discovery service on the same address (the well-known 8009); 0: none (the I/O
    /// port answers discovery too).
    #[arg(long, value_name = "PORT", default_value_t = 8009)]
    discovery_port: u16,
    /// The subsystem NQN.
    #[arg(long, value_name = "NQN", default_value = "nqn.2026-12.io.leap:target")]
    nqn: String,
    /// A disk to export (repeatable; NSIDs 1, 2, ... in order).
    #[arg(long, value_name = "SPEC", required = true, long_help = format!("A disk to export: {DISK_SYNTAX}. Repeat for more namespaces (NSID 1, 2, ...)."))]
    disk: Vec<DiskSpec>,
    /// Logical block size of the namespaces.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = crate::parse_block_size)]
    block_size: u32,
    /// Only these hosts may connect (repeatable; default: any host).
    #[arg(long, value_name = "NQN")]
    allow_host: Vec<String>,
    /// Hosts that may use the reserved share of capacity (repeatable).
    #[arg(long, value_name = "NQN")]
    priority_host: Vec<String>,
    /// Commands in flight per I/O queue beyond which new ones get a retryable reject.
    #[arg(long, value_name = "N", default_value_t = 128)]
    queue_inflight: u32,
    /// Commands in flight over all queues beyond which new ones get a retryable reject.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_inflight: u32,
    /// Percent of --max-inflight reserved for priority hosts and retried commands.
    #[arg(long, value_name = "PCT", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=90))]
    reserve_pct: u8,
    /// Largest I/O queue a host may connect, in entries (each entry holds a buffer of the
    /// largest transfer, 128 KiB: this bounds the memory a connection can use).
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u16).range(2..=1024))]
    queue_entries: u16,
    /// Refuse header and data digests (hosts then run without them).
    #[arg(long)]
    no_digests: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
    #[command(flatten)]
    poll: crate::PollerArgs,
}

fn resolve(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("bad --listen `{s}`: {e}"))?
        .next()
        .ok_or_else(|| format!("bad --listen `{s}`: no address"))
}

/// Runs the target until a signal arrives.
pub fn run(platform: &dyn Platform, a: TargetArgs) -> Result<(), String> {
    let signals = crate::signals::block_termination()?;
    let addr = resolve(&a.listen)?;
    let mut listen = vec![addr];
    if a.discovery_port != 0 && a.discovery_port != addr.port() {
        listen.push(SocketAddr::new(addr.ip(), a.discovery_port));
    }
    let mut backends = Vec::new();
    for d in &a.disk {
        backends.push(crate::serve::open_backend(d, a.block_size)?);
    }
    let nss = Namespaces::new(
        backends
            .iter()
            .zip(&a.disk)
            .map(|(b, d)| Namespace::with_limits(b.clone(), &d.limits))
            .collect(),
    );
    let cfg = TargetConfig {
        nqn: a.nqn.clone(),
        allowed_hosts: a.allow_host.clone(),
        priority_hosts: a.priority_host.clone(),
        max_queue_entries: a.queue_entries,
        queue_inflight: a.queue_inflight,
        total_inflight: a.max_inflight,
        reserve_pct: a.reserve_pct,
        digests: !a.no_digests,
        ..TargetConfig::default()
    };
    let sub = Subsystem::new(cfg, nss);
    let cpus = platform.poller_cpus().len().max(1);
    let placement = crate::serve::Placement::from_args(
        a.poll.cores.as_ref().map(|c| c.0.as_slice()),
        a.poll.pollers.map(|p| p as usize),
        a.poll.pin,
        cpus.min(4),
    )?;
    let n = placement.count();
    let pollers = crate::serve::start_pollers(
        platform,
        &placement,
        Duration::from_micros(a.poll.idle_spin_us),
    )?;
    let target = Target::start(sub.clone(), &listen, pollers.clone()).map_err(|e| e.to_string())?;
    let metrics = match &a.metrics {
        None => None,
        Some(m) => Some(crate::metrics::MetricsServer::start(
            m,
            std::sync::Arc::new(crate::metrics::Fixed {
                disks: Vec::new(),
                targets: vec![crate::metrics::TargetView {
                    name: "target".to_string(),
                    subsystem: sub.clone(),
                }],
            }),
            pollers.clone(),
        )?),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let sig_thread = crate::signals::on_termination(signals, move |sig| {
        log::info!("{sig}: stopping the target");
        let _ = tx.send(());
    })?;
    for (k, b) in backends.iter().enumerate() {
        let i = b.info();
        log::info!(
            "namespace {}: {} ({} bytes, {}-byte blocks{})",
            k + 1,
            b.kind(),
            i.size,
            i.block_size,
            if i.read_only { ", read-only" } else { "" }
        );
    }
    let addrs: Vec<String> = target.local_addrs().iter().map(|a| a.to_string()).collect();
    log::info!(
        "target {} listening on {} with {n} poller(s)",
        a.nqn,
        addrs.join(", ")
    );
    println!("leapd: NVMe/TCP target {} on {}", a.nqn, addrs.join(", "));
    println!(
        "leapd: connect with: nvme connect -t tcp -a {} -s {} -n {}",
        addr.ip(),
        target.local_addrs()[0].port(),
        a.nqn
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = rx.recv();
    drop(metrics);
    drop(target);
    drop(pollers);
    drop(sig_thread);
    let st = sub.stats();
    log::info!(
        "target totals: connections={} handshake_failures={} fatal_errors={} rejects={} retries_admitted={} digest_errors={} keep_alive_timeouts={}",
        st.connections.load(Ordering::Relaxed),
        st.handshake_failures.load(Ordering::Relaxed),
        st.fatal_errors.load(Ordering::Relaxed),
        st.rejects.load(Ordering::Relaxed),
        st.retries_admitted.load(Ordering::Relaxed),
        st.digest_errors.load(Ordering::Relaxed),
        st.keep_alive_timeouts.load(Ordering::Relaxed),
    );
    for b in &backends {
        leap_runtime::backend::sync(&**b).map_err(|e| format!("final {e}"))?;
    }
    log::info!("stopped cleanly");
    Ok(())
}
