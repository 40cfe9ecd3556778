//! The running disks of one `leapd serve` in host mode, which the control API changes live.
//!
//! Every disk shares the daemon's pollers; its queues start at the poller after the previous
//! disk's, so the queues of all disks spread over all pollers. Each disk's vhost-user socket is
//! served from its own thread: a disk whose front end misbehaves or whose server fails never
//! stops the others. Removing a disk ends its connection (in-flight I/O completes first, bounded
//! by the connection drain), joins its thread, removes its socket and syncs its back end.

use crate::config::{Disk, DiskConfig};
use crate::serve::open_backend;
use leap_runtime::backend::Backend;
use leap_runtime::{DeviceIoStats, Namespace, Poller};
use leap_vhost::{DeviceConfig, DeviceContext, Server, StopHandle, VhostStats};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

struct Running {
    disk: Disk,
    backend: Arc<dyn Backend>,
    ctx: DeviceContext,
    stop: StopHandle,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

/// A disk as `disk_list` reports it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskStatus {
    /// Name.
    pub name: String,
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Back end kind and size.
    pub backend: String,
    /// Virtqueues.
    pub queues: u16,
    /// Logical block size.
    pub block_size: u32,
    /// Size in bytes.
    pub size: u64,
    /// The configuration it was added with.
    pub config: DiskConfig,
}

/// The daemon's disks.
pub struct Daemon {
    pollers: Arc<Vec<Poller>>,
    next_poller: AtomicUsize,
    disks: Mutex<BTreeMap<String, Running>>,
}

impl Daemon {
    /// A daemon whose disks share `pollers`.
    pub fn new(pollers: Arc<Vec<Poller>>) -> Daemon {
        Daemon {
            pollers,
            next_poller: AtomicUsize::new(0),
            disks: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `cfg`, opens its back end, binds its socket and serves it. The error names the
    /// disk and what is wrong; nothing is left behind on error.
    pub fn add(&self, cfg: &DiskConfig) -> Result<(), String> {
        let disk = cfg.validate()?;
        {
            let disks = self.lock();
            if disks.contains_key(&disk.name) {
                return Err(format!("disk `{}` already exists", disk.name));
            }
            let socket = crate::config::normalize(&disk.socket);
            if let Some(other) = disks
                .values()
                .find(|r| crate::config::normalize(&r.disk.socket) == socket)
            {
                return Err(format!(
                    "disk `{}`: socket {} is disk `{}`'s",
                    disk.name,
                    disk.socket.display(),
                    other.disk.name
                ));
            }
        }
        if let Some(dir) = disk.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!("disk `{}`: cannot create {}: {e}", disk.name, dir.display())
            })?;
        }
        let backend = open_backend(&disk.spec, disk.block_size)
            .map_err(|e| format!("disk `{}`: {e}", disk.name))?;
        let first_poller = self
            .next_poller
            .fetch_add(disk.queues as usize, Ordering::Relaxed);
        let ctx = DeviceContext {
            ns: Namespace::with_limits(backend.clone(), &disk.spec.limits),
            pollers: self.pollers.clone(),
            config: DeviceConfig {
                num_queues: disk.queues,
                inflight: disk.inflight,
                first_poller,
                name: disk.name.clone(),
                ..DeviceConfig::default()
            },
            stats: Arc::new(VhostStats::default()),
            io_stats: Arc::new(DeviceIoStats::new(disk.queues as usize)),
            writeback: true,
        };
        let mut server = Server::bind(&disk.socket, disk.socket_mode, ctx.clone())
            .map_err(|e| format!("disk `{}`: {e}", disk.name))?;
        let stop = server.stop_handle();
        let name = disk.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("leap-disk-{name}"))
            .spawn(move || {
                let r = server.run().map_err(|e| format!("disk `{name}`: {e}"));
                if let Err(e) = &r {
                    log::error!("{e}; the other disks go on");
                }
                r
            })
            .map_err(|e| format!("cannot start a disk thread: {e}"))?;
        let info = backend.info();
        log::info!(
            "event=disk_added disk={} backend={} size={} block_size={} queues={} socket={}",
            disk.name,
            backend.kind(),
            info.size,
            info.block_size,
            disk.queues,
            disk.socket.display()
        );
        self.lock().insert(
            disk.name.clone(),
            Running {
                disk,
                backend,
                ctx,
                stop,
                thread,
            },
        );
        Ok(())
    }

    /// Removes a disk: its front end is disconnected once in-flight I/O completes, its socket
    /// goes and its back end is synced. The other disks are not disturbed.
    pub fn remove(&self, name: &str) -> Result<(), String> {
        let r = self
            .lock()
            .remove(name)
            .ok_or_else(|| format!("no disk `{name}`"))?;
        r.stop.stop();
        let served = r
            .thread
            .join()
            .unwrap_or_else(|_| Err(format!("disk `{name}`: its thread panicked")));
        let synced = leap_runtime::backend::sync(&*r.backend).map_err(|e| e.to_string());
        log::info!(
            "event=disk_removed disk={name} {}",
            leap_vhost::server::counters(Some(&r.ctx.io_stats), &r.ctx.stats)
        );
        served?;
        synced.map_err(|e| format!("disk `{name}`: final {e}"))
    }

    /// Replaces a disk's rate limits while it serves (the configuration follows, for
    /// `config_save`).
    pub fn set_limits(
        &self,
        name: &str,
        limits: &leap_runtime::throttle::Limits,
    ) -> Result<(), String> {
        let mut disks = self.lock();
        let r = disks
            .get_mut(name)
            .ok_or_else(|| format!("no disk `{name}`"))?;
        r.ctx.ns.set_limits(limits);
        r.disk.spec.limits = *limits;
        r.disk.config.disk = crate::diskspec::with_limits(&r.disk.config.disk, limits);
        log::info!(
            "event=disk_limits disk={name} disk_spec={:?}",
            r.disk.config.disk
        );
        Ok(())
    }

    /// Every disk, by name.
    pub fn list(&self) -> Vec<DiskStatus> {
        self.lock()
            .values()
            .map(|r| {
                let info = r.backend.info();
                DiskStatus {
                    name: r.disk.name.clone(),
                    socket: r.disk.socket.clone(),
                    backend: r.backend.kind().to_string(),
                    queues: r.disk.queues,
                    block_size: info.block_size,
                    size: info.size,
                    config: r.disk.config.clone(),
                }
            })
            .collect()
    }

    /// Counters of one disk (or all): name → (counter, value), the malformed ones by reason.
    pub fn stats(
        &self,
        name: Option<&str>,
    ) -> Result<BTreeMap<String, BTreeMap<String, u64>>, String> {
        let disks = self.lock();
        if let Some(n) = name {
            if !disks.contains_key(n) {
                return Err(format!("no disk `{n}`"));
            }
        }
        Ok(disks
            .iter()
            .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
            .map(|(n, r)| {
                let mut m: BTreeMap<String, u64> = r
                    .ctx
                    .io_stats
                    .snapshot()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                for (k, v) in r.ctx.stats.snapshot() {
                    m.insert(format!("malformed_{k}"), v);
                }
                (n.clone(), m)
            })
            .collect())
    }

    /// The disks' configurations, in name order.
    pub fn configs(&self) -> Vec<DiskConfig> {
        self.lock()
            .values()
            .map(|r| r.disk.config.clone())
            .collect()
    }

    /// Removes every disk (at shutdown); errors are logged.
    pub fn remove_all(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for n in names {
            if let Err(e) = self.remove(&n) {
                log::warn!("{e}");
            }
        }
    }
}

impl crate::metrics::Source for Daemon {
    fn disks(&self) -> Vec<crate::metrics::DiskView> {
        self.lock()
            .values()
            .map(|r| crate::metrics::DiskView {
                name: r.disk.name.clone(),
                io: r.ctx.io_stats.clone(),
                malformed: r.ctx.stats.clone(),
                backend: r.backend.clone(),
            })
            .collect()
    }
}
