//! `leapd agent`: the host side of the SoC modes. It answers the hypervisor's vhost-user socket
//! and relays only control to leapd in the SoC VM or on the SmartNIC (`leapd serve --mode
//! socvm|arm-soc`) over TCP: memory tables as host addresses, ring addresses, starts and stops,
//! kicks, and completion interrupts back. It never maps guest memory, so no request data can
//! pass through it.
//!
//! Either side may restart. A SoC that goes away (connection closed, or a keep-alive unanswered)
//! ends the hypervisor's connection; the hypervisor reconnects (QEMU: `reconnect-ms`) and its
//! setup is relayed to the SoC again once it is back — meanwhile the guest sees a stall, not an
//! error. An agent that restarts is a new session to the SoC, which stops the old rings first.

use crate::signals;
use leap_vhost::agent::{AgentDevice, Link};
use leap_vhost::{Server, VhostStats};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Size of a new inflight file: a power of two (a BAR's size), room for 32 queues of 1024.
const INFLIGHT_FILE_BYTES: u64 = 1 << 20;

/// How often the agent checks that the SoC answers.
const KEEP_ALIVE: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The vhost-user socket the hypervisor connects to.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The tenant's RAM file (QEMU's memory-backend-file mem-path): the host memory the SoC
    /// reaches through its window. Memory tables from any other file are refused.
    #[arg(long, value_name = "FILE")]
    window_file: PathBuf,
    /// Where leapd on the SoC listens (`leapd serve --mode socvm|arm-soc --listen`).
    #[arg(long, value_name = "HOST:PORT")]
    soc: String,
    /// A file for inflight I/O tracking that the SoC can reach through a window of its own (a
    /// second ivshmem device over this file): created (1 MiB) if absent. With it, a SoC leapd
    /// that restarts resubmits what its predecessor left in flight and the guest sees a stall,
    /// not an error; without it, inflight tracking is not offered.
    #[arg(long, value_name = "FILE")]
    inflight_file: Option<PathBuf>,
    /// Permissions of the socket, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = crate::parse_mode)]
    socket_mode: u32,
}

/// The current link to the SoC, shared by the connection loop and the keep-alive thread.
#[derive(Default)]
struct Current {
    link: Option<Arc<Link>>,
    /// Set while the SoC cannot be reached, so the outage is logged once.
    down_since: Option<Instant>,
}

fn connect(soc: &str, cur: &Mutex<Current>) -> Option<Arc<Link>> {
    let mut c = cur.lock().ok()?;
    if let Some(l) = c.link.as_ref().filter(|l| !l.is_closed()) {
        return Some(l.clone());
    }
    let attempt = soc
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
        .and_then(|a| {
            TcpStream::connect_timeout(&a, Duration::from_secs(1)).map_err(|e| e.to_string())
        })
        .and_then(|s| Link::connect(s, "leapd-agent"));
    match attempt {
        Ok(l) => {
            match c.down_since.take() {
                Some(t) => log::info!("SoC {soc} is back after {:.1} s", t.elapsed().as_secs_f64()),
                None => log::info!("connected to the SoC at {soc}"),
            }
            c.link = Some(l.clone());
            Some(l)
        }
        Err(e) => {
            if c.down_since.is_none() {
                log::warn!("waiting for the SoC at {soc}: {e} (retrying)");
                c.down_since = Some(Instant::now());
            }
            c.link = None;
            None
        }
    }
}

pub fn run(a: AgentArgs) -> Result<(), String> {
    let sigs = signals::block_termination()?;
    // Opened only to know the file (device and inode) the hypervisor's memory must come from;
    // never mapped.
    let window = std::fs::File::open(&a.window_file)
        .map_err(|e| format!("--window-file {}: {e}", a.window_file.display()))?;
    let inflight = match &a.inflight_file {
        Some(p) => Some(Arc::new(
            leap_vhost::inflight::WindowFile::prepare(p, INFLIGHT_FILE_BYTES)
                .map_err(|e| format!("--inflight-file {}: {e}", p.display()))?,
        )),
        None => None,
    };
    let stats = Arc::new(VhostStats::default());
    let mut server =
        Server::listen(&a.socket, a.socket_mode, stats.clone()).map_err(|e| e.to_string())?;
    let stop = server.stop_handle();
    let s = stop.clone();
    let sig_thread = signals::on_termination(sigs, move |sig| {
        log::info!("{sig}: stopping");
        s.stop();
    })?;
    let cur = Arc::new(Mutex::new(Current::default()));
    // Ends the hypervisor's connection when the SoC goes away, so the setup is relayed again
    // once it is back; and checks that a quiet SoC still answers.
    let (c, h) = (cur.clone(), stop.clone());
    let watcher = std::thread::Builder::new()
        .name("leap-agent-watch".into())
        .spawn(move || {
            let mut last = Instant::now();
            while !h.stopped() {
                std::thread::sleep(Duration::from_millis(100));
                let link = c.lock().ok().and_then(|c| c.link.clone());
                let Some(link) = link else { continue };
                if !link.is_closed() && last.elapsed() >= KEEP_ALIVE {
                    last = Instant::now();
                    if let Err(e) = link.keep_alive() {
                        log::warn!("SoC keep-alive: {e}");
                        link.close();
                    }
                }
                if link.is_closed() {
                    let b = link.bytes();
                    log::warn!(
                        "lost the SoC (control bytes sent {}, received {}); ending the \
                         hypervisor's connection until it is back",
                        b.sent,
                        b.received
                    );
                    if let Ok(mut c) = c.lock() {
                        c.link = None;
                    }
                    h.end_connection();
                }
            }
        })
        .map_err(|e| e.to_string())?;
    log::info!(
        "agent: vhost-user on {}, guest memory in {}, SoC at {} (no guest memory is mapped here)",
        a.socket.display(),
        a.window_file.display(),
        a.soc
    );
    let r = server.run_with(|| {
        let link = connect(&a.soc, &cur)?;
        match AgentDevice::new(link, &window, inflight.clone(), stats.clone()) {
            Ok(d) => Some(d),
            Err(e) => {
                log::warn!("agent: {e}");
                None
            }
        }
    });
    let _ = watcher.join();
    if let Some(l) = cur.lock().ok().and_then(|mut c| c.link.take()) {
        let b = l.bytes();
        log::info!(
            "agent: control bytes sent {}, received {}; request data relayed: 0 (guest memory is \
             never mapped here)",
            b.sent,
            b.received
        );
        l.close();
    }
    drop(server);
    drop(sig_thread);
    r.map_err(|e| e.to_string())
}
