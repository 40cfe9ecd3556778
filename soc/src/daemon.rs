//! The running disks of one `leapd serve` in host mode, which the control API changes live.
//!
//! Every disk shares the daemon's pollers; its queues start at the poller after the previous
//! disk's, so the queues of all disks spread over all pollers. Each disk's vhost-user socket is
//! served from its own thread: a disk whose front end misbehaves or whose server fails never
//! stops the others. Removing a disk ends its connection (in-flight I/O completes first, bounded
//! by the connection drain), joins its thread, removes its socket and syncs its back end.

use crate::config::{Disk, DiskConfig, NamespaceConfig, TargetConfig};
use crate::serve::open_backend;
use leap_runtime::backend::Backend;
use leap_runtime::nvmf::target::{Subsystem, Target};
use leap_runtime::{DeviceIoStats, Namespace, Namespaces, Poller};
use leap_vhost::{DeviceConfig, DeviceContext, Server, StopHandle, VhostStats};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

struct RunningTarget {
    t: crate::config::Target,
    target: Target,
    /// The back end of each NSID.
    backends: BTreeMap<u32, Arc<dyn Backend>>,
}

/// A target as `target_list` reports it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TargetStatus {
    /// Name.
    pub name: String,
    /// Subsystem NQN.
    pub nqn: String,
    /// Addresses listened on.
    pub listen: Vec<String>,
    /// Queues (admin and I/O) connected now.
    pub queues_open: usize,
    /// Its namespaces.
    pub namespaces: Vec<NamespaceStatus>,
    /// The configuration (NSIDs filled in).
    pub config: TargetConfig,
}

/// A namespace of a target.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NamespaceStatus {
    /// NSID.
    pub nsid: u32,
    /// Back end kind.
    pub backend: String,
    /// Size in bytes.
    pub size: u64,
    /// Its `--disk` spec.
    pub disk: String,
}

/// How long removing a namespace or a target waits for hosts' in-flight commands on it.
const DRAIN: Duration = Duration::from_secs(10);

/// Waits (at most [`DRAIN`]) until `what` is referenced only by the caller: every poller and
/// connection has let go of it, so nothing is in flight on it any more.
fn wait_released<T: ?Sized>(what: &Arc<T>, pollers: &[Poller]) -> bool {
    let t = Instant::now();
    while Arc::strong_count(what) > 1 {
        if t.elapsed() > DRAIN {
            return false;
        }
        for p in pollers {
            p.waker().wake();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// The daemon's disks and NVMe/TCP targets.
pub struct Daemon {
    pollers: Arc<Vec<Poller>>,
    next_poller: AtomicUsize,
    disks: Mutex<BTreeMap<String, Running>>,
    targets: Mutex<BTreeMap<String, RunningTarget>>,
}

impl Daemon {
    /// A daemon whose disks share `pollers`.
    pub fn new(pollers: Arc<Vec<Poller>>) -> Daemon {
        Daemon {
            pollers,
            next_poller: AtomicUsize::new(0),
            disks: Mutex::new(BTreeMap::new()),
            targets: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock_targets(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RunningTarget>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts an NVMe/TCP target: checks `cfg`, opens its namespaces' back ends, listens and
    /// serves it on the daemon's pollers. Nothing is left behind on error.
    pub fn target_add(&self, cfg: &TargetConfig) -> Result<(), String> {
        let t = cfg.validate()?;
        {
            let targets = self.lock_targets();
            if targets.contains_key(&t.name) {
                return Err(format!("target `{}` already exists", t.name));
            }
            if let Some(o) = targets
                .values()
                .find(|o| o.t.listen.iter().any(|a| t.listen.contains(a)))
            {
                return Err(format!(
                    "target `{}`: listen address {} is target `{}`'s",
                    t.name, t.config.listen, o.t.name
                ));
            }
        }
        let mut backends = BTreeMap::new();
        let mut list = vec![None; t.cfg.max_namespaces as usize];
        for (nsid, spec) in &t.namespaces {
            let b = open_backend(spec, t.block_size)
                .map_err(|e| format!("target `{}`: namespace {nsid}: {e}", t.name))?;
            // validate() keeps NSIDs within 1..=max_namespaces.
            if let Some(slot) = (*nsid as usize)
                .checked_sub(1)
                .and_then(|k| list.get_mut(k))
            {
                *slot = Some(Namespace::with_limits(b.clone(), &spec.limits));
            }
            backends.insert(*nsid, b);
        }
        let nss = Namespaces::with_slots(list, 0);
        let sub = Subsystem::new(t.cfg.clone(), nss);
        let target = Target::start(sub, &t.listen, self.pollers.clone())
            .map_err(|e| format!("target `{}`: {e}", t.name))?;
        let addrs: Vec<String> = target.local_addrs().iter().map(|a| a.to_string()).collect();
        let added = format!(
            "event=target_added target={} nqn={} listen={} namespaces={}",
            t.name,
            t.cfg.nqn,
            addrs.join(","),
            backends.len()
        );
        let mut targets = self.lock_targets();
        // Another target_add of the same name may have won while this one opened its back
        // ends (each control client has its own thread): the later one gives way.
        if targets.contains_key(&t.name) {
            drop(targets);
            let name = t.name.clone();
            drop(target);
            return Err(format!("target `{name}` already exists"));
        }
        targets.insert(
            t.name.clone(),
            RunningTarget {
                t,
                target,
                backends,
            },
        );
        log::info!("{added}");
        Ok(())
    }

    /// Stops a target: it stops listening, its hosts' connections end once their in-flight
    /// commands complete, and its namespaces' back ends are synced.
    pub fn target_remove(&self, name: &str) -> Result<(), String> {
        let r = self
            .lock_targets()
            .remove(name)
            .ok_or_else(|| format!("no target `{name}`"))?;
        let sub = r.target.subsystem().clone();
        drop(r.target);
        let drained = wait_released(&sub, &self.pollers);
        let mut err = None;
        for (nsid, b) in &r.backends {
            if let Err(e) = leap_runtime::backend::sync(&**b) {
                err.get_or_insert(format!("target `{name}`: namespace {nsid}: final {e}"));
            }
        }
        let st = sub.stats();
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        log::info!(
            "event=target_removed target={name} drained={drained} connections={} \
             handshake_failures={} fatal_errors={} rejects={} retries_admitted={} \
             digest_errors={} keep_alive_timeouts={}",
            n(&st.connections),
            n(&st.handshake_failures),
            n(&st.fatal_errors),
            n(&st.rejects),
            n(&st.retries_admitted),
            n(&st.digest_errors),
            n(&st.keep_alive_timeouts)
        );
        err.map_or(Ok(()), Err)
    }

    /// Attaches a namespace to a running target (at `nsid`, or the lowest free NSID); hosts
    /// connected to it are told (Namespace Attribute Changed). Returns the NSID.
    pub fn namespace_add(
        &self,
        target: &str,
        nsid: Option<u32>,
        disk: &str,
    ) -> Result<u32, String> {
        // The slow parts (opening the back end and a queue per connected host queue; a remote
        // one can take seconds) run without the table held; the NSID is checked again with it.
        let spec = crate::config::check_spec(disk).map_err(|e| format!("disk: {e}"))?;
        let (block_size, sub, nsid) = {
            let targets = self.lock_targets();
            let r = targets
                .get(target)
                .ok_or_else(|| format!("no target `{target}`"))?;
            let max = r.t.cfg.max_namespaces;
            let nsid = match nsid {
                Some(n) if n == 0 || n > max => {
                    return Err(format!(
                        "target `{target}`: NSID {n} is not between 1 and max_namespaces ({max})"
                    ))
                }
                Some(n) => n,
                None => (1..=max)
                    .find(|n| !r.backends.contains_key(n))
                    .ok_or_else(|| format!("target `{target}`: all {max} NSIDs are in use"))?,
            };
            (r.t.block_size, r.target.subsystem().clone(), nsid)
        };
        let in_use = || format!("target `{target}`: NSID {nsid} is in use");
        if sub.namespaces().get(nsid).is_some() {
            return Err(in_use());
        }
        let b = open_backend(&spec, block_size)?;
        let ns = Namespace::with_limits(b.clone(), &spec.limits);
        sub.prepare_namespace(nsid, &ns)
            .map_err(|e| format!("target `{target}`: {e}"))?;
        let mut targets = self.lock_targets();
        let r = targets
            .get_mut(target)
            .ok_or_else(|| format!("no target `{target}`"))?;
        if r.backends.contains_key(&nsid) {
            return Err(in_use());
        }
        r.target
            .subsystem()
            .set_namespace(nsid, Some(ns))
            .map_err(|e| format!("target `{target}`: {e}"))?;
        r.target.wake_pollers();
        r.backends.insert(nsid, b.clone());
        r.t.config.namespaces.push(NamespaceConfig {
            nsid: Some(nsid),
            disk: disk.to_string(),
        });
        r.t.config.namespaces.sort_by_key(|n| n.nsid);
        log::info!(
            "event=namespace_added target={target} nsid={nsid} backend={} size={}",
            b.kind(),
            b.info().size
        );
        Ok(nsid)
    }

    /// Detaches a namespace from a running target: new commands to it fail (Invalid
    /// Namespace), hosts are told, in-flight ones complete, then its back end is synced. The
    /// target's other namespaces are not disturbed.
    pub fn namespace_remove(&self, target: &str, nsid: u32) -> Result<(), String> {
        let (old, b) = {
            let mut targets = self.lock_targets();
            let r = targets
                .get_mut(target)
                .ok_or_else(|| format!("no target `{target}`"))?;
            let b = r
                .backends
                .remove(&nsid)
                .ok_or_else(|| format!("target `{target}`: no namespace {nsid}"))?;
            let old = r.target.set_namespace(nsid, None)?;
            r.t.config.namespaces.retain(|n| n.nsid != Some(nsid));
            (old, b)
        };
        let drained = old.as_ref().is_none_or(|o| wait_released(o, &self.pollers));
        drop(old);
        let synced = leap_runtime::backend::sync(&*b);
        log::info!("event=namespace_removed target={target} nsid={nsid} drained={drained}");
        synced.map_err(|e| format!("target `{target}`: namespace {nsid}: final {e}"))
    }

    /// Every target, by name.
    pub fn target_list(&self) -> Vec<TargetStatus> {
        self.lock_targets()
            .values()
            .map(|r| {
                let specs: BTreeMap<u32, &str> =
                    r.t.config
                        .namespaces
                        .iter()
                        .filter_map(|n| Some((n.nsid?, n.disk.as_str())))
                        .collect();
                TargetStatus {
                    name: r.t.name.clone(),
                    nqn: r.t.cfg.nqn.clone(),
                    listen: r
                        .target
                        .local_addrs()
                        .iter()
                        .map(|a| a.to_string())
                        .collect(),
                    queues_open: r.target.subsystem().totals().open_queues,
                    namespaces: r
                        .backends
                        .iter()
                        .map(|(nsid, b)| NamespaceStatus {
                            nsid: *nsid,
                            backend: b.kind().to_string(),
                            size: b.info().size,
                            disk: specs.get(nsid).copied().unwrap_or("").to_string(),
                        })
                        .collect(),
                    config: r.t.config.clone(),
                }
            })
            .collect()
    }

    /// The targets' configurations, in name order.
    pub fn target_configs(&self) -> Vec<TargetConfig> {
        self.lock_targets()
            .values()
            .map(|r| r.t.config.clone())
            .collect()
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
        let added = format!(
            "event=disk_added disk={} backend={} size={} block_size={} queues={} socket={}",
            disk.name,
            backend.kind(),
            info.size,
            info.block_size,
            disk.queues,
            disk.socket.display()
        );
        let mut disks = self.lock();
        // Another disk_add of the same name may have won while this one started (each control
        // client has its own thread): the later one gives way.
        if disks.contains_key(&disk.name) {
            drop(disks);
            stop.stop();
            let _ = thread.join();
            return Err(format!("disk `{}` already exists", disk.name));
        }
        disks.insert(
            disk.name.clone(),
            Running {
                disk,
                backend,
                ctx,
                stop,
                thread,
            },
        );
        log::info!("{added}");
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

    /// Removes every disk and target (at shutdown); errors are logged.
    pub fn remove_all(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for n in names {
            if let Err(e) = self.remove(&n) {
                log::warn!("{e}");
            }
        }
        let names: Vec<String> = self.lock_targets().keys().cloned().collect();
        for n in names {
            if let Err(e) = self.target_remove(&n) {
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
    fn targets(&self) -> Vec<crate::metrics::TargetView> {
        self.lock_targets()
            .values()
            .map(|r| crate::metrics::TargetView {
                name: r.t.name.clone(),
                subsystem: r.target.subsystem().clone(),
            })
            .collect()
    }
}
