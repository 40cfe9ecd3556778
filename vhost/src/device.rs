//! The vhost-user-blk device of one connection: leapd's own handling of the front end's requests
//! (on the `vhost` crate's [`VhostUserBackendReqHandlerMut`]), the configuration space, the
//! memory table, inflight regions, and the binding of each started virtqueue to a queue pair on
//! a poller.
//!
//! Every request is checked before it changes anything; a request that cannot be honoured is
//! refused (the front end gets a failure reply when it asked for one with REPLY_ACK), counted as
//! `malformed_message`, and logged rate-limited, and the connection goes on. There are no worker
//! threads: the poller that owns a queue waits on its kick eventfd itself.

use crate::config::{feature, BlkConfig, WRITEBACK_OFFSET};
use crate::inflight::{self, QueueTracker};
use crate::queue::{BlkQueue, RingSetup, Signal};
use crate::region::MemoryTable;
use crate::stats::{Malformed, VhostStats};
use leap_runtime::{
    log_limited, log_limited_by, DeviceIoStats, Namespace, Namespaces, PairId, Poller,
};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;

/// Device parameters that are not properties of the disk.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Number of request queues offered.
    pub num_queues: u16,
    /// Largest virtqueue size accepted (a power of two).
    pub max_queue_size: u16,
    /// Most data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Largest data segment in bytes (`size_max`).
    pub size_max: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Offer inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so a restarted leapd
    /// resubmits what a crashed one held. Off only to show what goes wrong without it.
    pub inflight: bool,
    /// The poller of queue 0; queue q runs on poller (first_poller + q) mod pollers, so the
    /// queues of several disks sharing pollers spread over all of them.
    pub first_poller: usize,
    /// The disk's name in log events (`disk=NAME`).
    pub name: String,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            num_queues: 1,
            max_queue_size: 1024,
            seg_max: 126,
            size_max: 256 << 10,
            max_discard_seg: 32,
            inflight: true,
            first_poller: 0,
            name: "disk0".into(),
        }
    }
}

/// What the request parser needs to know about the disk.
#[derive(Clone, Debug)]
pub(crate) struct DiskShape {
    pub sectors: u64,
    pub block_size: u32,
    pub read_only: bool,
    /// The back end deallocates (DISCARD is offered).
    pub discard: bool,
    /// The back end zeroes ranges (WRITE_ZEROES is offered).
    pub write_zeroes: bool,
    /// Completed writes may sit in a volatile cache: CONFIG_WCE is offered and FLUSH matters.
    pub volatile_cache: bool,
    /// Largest data transfer per request the back end takes (0: no limit).
    pub max_transfer: u32,
    pub serial: String,
    pub max_discard_seg: u32,
}

/// State shared by the device and its queues.
pub(crate) struct Shared {
    pub shape: DiskShape,
    /// Write-back (true) or write-through (false) cache, as the guest last set it.
    pub writeback: AtomicBool,
    pub stats: Arc<VhostStats>,
    memory: Mutex<MemoryTable>,
    /// Bumped (Release) after `memory` changes; queues check it (Acquire) once per round and
    /// take a new snapshot only then, so the data path never touches the lock.
    pub memory_gen: AtomicU64,
}

impl Shared {
    /// The state of a new device of `ctx`'s disk: no memory yet, the configured cache mode.
    pub fn new(ctx: &DeviceContext) -> Arc<Shared> {
        let info = ctx.ns.info();
        Arc::new(Shared {
            shape: DiskShape {
                sectors: info.size >> 9,
                block_size: info.block_size,
                read_only: info.read_only,
                discard: info.discard,
                write_zeroes: info.write_zeroes,
                volatile_cache: info.volatile_cache,
                max_transfer: info.max_transfer,
                serial: info.serial.clone(),
                max_discard_seg: ctx.config.max_discard_seg.min(256),
            },
            writeback: AtomicBool::new(ctx.writeback && info.volatile_cache),
            stats: ctx.stats.clone(),
            memory: Mutex::new(MemoryTable::empty()),
            memory_gen: AtomicU64::new(0),
        })
    }

    /// Replaces the guest memory; queues pick it up at their next round.
    pub fn set_memory(&self, table: MemoryTable) {
        if let Ok(mut m) = self.memory.lock() {
            *m = table;
        }
        self.memory_gen.fetch_add(1, Ordering::Release);
    }

    /// The current memory and its generation.
    pub fn memory(&self) -> (MemoryTable, u64) {
        let g = self.memory_gen.load(Ordering::Acquire);
        let m = self
            .memory
            .lock()
            .map(|m| m.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        (m, g)
    }
}

/// Everything one device needs from the daemon: the namespace, the pollers, shared counters.
#[derive(Clone)]
pub struct DeviceContext {
    /// The namespace I/O goes to.
    pub ns: Arc<Namespace>,
    /// Pollers to spread queues over (queue i goes to poller i mod n).
    pub pollers: Arc<Vec<Poller>>,
    /// Device parameters.
    pub config: DeviceConfig,
    /// Malformed-request counters (kept across connections).
    pub stats: Arc<VhostStats>,
    /// NVMe I/O counters (kept across connections).
    pub io_stats: Arc<DeviceIoStats>,
    /// The cache mode each connection starts with (a new connection is a device reset): write-back
    /// (true) so guests send FLUSH. Only meaningful when the back end has a volatile cache; a
    /// disk without one is always write-through.
    pub writeback: bool,
}

/// Split-ring addresses of one virtqueue, as guest addresses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What the front end told us about one virtqueue.
struct Ring {
    size: u16,
    addrs: Option<RingAddrs>,
    /// SET_VRING_BASE, or where the ring stopped.
    base: u16,
    kick: Option<File>,
    call: Arc<Signal>,
    _err: Option<File>,
    enabled: bool,
    /// The poller and pair serving the ring while it runs.
    running: Option<(usize, PairId)>,
    /// Where the port leaves its next avail index when it is dropped.
    stopped_at: Arc<AtomicU32>,
}

impl Ring {
    fn new() -> Self {
        Ring {
            size: 0,
            addrs: None,
            base: 0,
            kick: None,
            call: Arc::new(Signal::default()),
            _err: None,
            enabled: false,
            running: None,
            stopped_at: Arc::new(AtomicU32::new(0)),
        }
    }
}

/// A vhost-user-blk device for one connection.
pub struct BlkDevice {
    ctx: DeviceContext,
    /// The one namespace (NSID 1) every queue's commands go to.
    nss: Arc<Namespaces>,
    shared: Arc<Shared>,
    acked_features: u64,
    acked_protocol: u64,
    table: MemoryTable,
    rings: Vec<Ring>,
    inflight: Option<Arc<inflight::Region>>,
    /// A request failed without a reply the front end waits for: the connection must end.
    hangup: bool,
}

pub(crate) fn refused(stats: &VhostStats, why: String) -> VuError {
    stats.count(Malformed::Message);
    log_limited!(log::Level::Warn, "vhost-user request refused: {why}");
    VuError::ReqHandlerError(std::io::Error::new(std::io::ErrorKind::InvalidInput, why))
}

impl BlkDevice {
    /// A device for one connection.
    pub fn new(ctx: DeviceContext) -> Self {
        let shared = Shared::new(&ctx);
        let rings = (0..ctx.config.num_queues).map(|_| Ring::new()).collect();
        BlkDevice {
            nss: Namespaces::single(ctx.ns.clone()),
            ctx,
            shared,
            acked_features: 0,
            acked_protocol: 0,
            table: MemoryTable::empty(),
            rings,
            inflight: None,
            hangup: false,
        }
    }

    /// Whether a refused request left the front end waiting for a reply it will never get (the
    /// connection must then end). Clears the flag.
    pub fn take_hangup(&mut self) -> bool {
        std::mem::take(&mut self.hangup)
    }

    fn refuse(&self, why: impl Into<String>) -> VuError {
        refused(&self.shared.stats, why.into())
    }

    /// The configuration space values.
    pub fn blk_config(&self) -> BlkConfig {
        blk_config(&self.ctx, &self.shared)
    }

    /// Virtio features offered.
    pub fn features(&self) -> u64 {
        offered_features(&self.shared)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut p = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        if self.ctx.config.inflight {
            p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        p
    }

    fn ring_index(&self, index: u32) -> VuResult<usize> {
        let q = index as usize;
        if q < self.rings.len() {
            Ok(q)
        } else {
            Err(self.refuse(format!(
                "queue {index} does not exist (the device has {})",
                self.rings.len()
            )))
        }
    }

    fn running(&self, q: usize) -> VuResult<()> {
        if self.rings[q].running.is_some() {
            Err(self.refuse(format!("queue {q} is running")))
        } else {
            Ok(())
        }
    }

    /// Starts ring `q` if everything it needs has arrived and it is enabled.
    fn try_start(&mut self, q: usize) -> VuResult<()> {
        let protocol = self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let r = &self.rings[q];
        // Without PROTOCOL_FEATURES a ring is enabled once it has a kick (vhost-user, "Ring
        // states"); with it, SET_VRING_ENABLE decides.
        if r.running.is_some() || r.kick.is_none() || protocol && !r.enabled {
            return Ok(());
        }
        let (Some(addrs), size) = (r.addrs, r.size) else {
            return Err(self.refuse(format!("queue {q} started before its size and addresses")));
        };
        if size == 0 {
            return Err(self.refuse(format!("queue {q} started before its size")));
        }
        let params = RingParams {
            q,
            size,
            addrs,
            base: r.base,
            event_idx: self.acked_features & (1 << feature::RING_EVENT_IDX) != 0,
            kick: r.kick.as_ref(),
            call: &r.call,
            inflight: self.inflight.as_ref(),
            stopped_at: &r.stopped_at,
            mem: &self.table,
        };
        match start_ring(&self.ctx, &self.nss, &self.shared, params) {
            Ok(running) => {
                self.rings[q].running = Some(running);
                Ok(())
            }
            Err(e) => Err(self.refuse(e)),
        }
    }

    /// Stops ring `q` if it runs: no new requests are taken, in-flight ones complete to the
    /// guest, and the ring's base becomes where it stopped.
    fn stop(&mut self, q: usize) {
        self.stop_within(q, None)
    }

    /// [`Self::stop`], waiting at most `timeout` for in-flight requests; past it they are left to
    /// finish on the poller (the ring's memory stays mapped until they have).
    fn stop_within(&mut self, q: usize, timeout: Option<std::time::Duration>) {
        let Some((pi, id)) = self.rings[q].running.take() else {
            return;
        };
        match self.ctx.pollers[pi].detach_within(id, timeout) {
            Ok(port) => drop(port),
            Err(e) => log::warn!(
                "event=queue_stop_error disk={} queue={q} error=\"{e}\"",
                self.ctx.config.name
            ),
        }
        let r = &mut self.rings[q];
        r.base = r.stopped_at.load(Ordering::Acquire) as u16;
        log_limited_by!(
            &self.ctx.stats.events,
            log::Level::Info,
            "event=queue_stopped disk={} queue={q} at={}",
            self.ctx.config.name,
            r.base
        );
    }

    /// Stops every queue, completing what is in flight, waiting at most `timeout` per queue
    /// (None: as long as it takes). Called when the connection ends.
    pub fn shutdown(&mut self, timeout: Option<std::time::Duration>) {
        for q in 0..self.rings.len() {
            self.stop_within(q, timeout);
        }
    }

    fn reset(&mut self) {
        self.shutdown(None);
        for r in self.rings.iter_mut() {
            *r = Ring::new();
        }
        self.acked_features = 0;
        self.inflight = None;
    }

    fn check_ring_layout(&self, q: usize, a: &RingAddrsVa) -> VuResult<RingAddrs> {
        let size = self.rings[q].size as u64;
        if size == 0 {
            return Err(self.refuse(format!("queue {q}: SET_VRING_ADDR before SET_VRING_NUM")));
        }
        if self.table.is_empty() {
            return Err(self.refuse(format!("queue {q}: SET_VRING_ADDR before SET_MEM_TABLE")));
        }
        // virtio 1.2, 2.7: alignment and size of each part of a split ring.
        let parts = [
            ("descriptor table", a.desc, 16 * size, 16),
            ("avail ring", a.avail, 6 + 2 * size, 2),
            ("used ring", a.used, 6 + 8 * size, 4),
        ];
        let mut gpa = [0u64; 3];
        for (k, (what, va, len, align)) in parts.into_iter().enumerate() {
            if va % align != 0 {
                return Err(self.refuse(format!(
                    "queue {q}: {what} at {va:#x} is not {align}-byte aligned"
                )));
            }
            gpa[k] = self.table.va_to_gpa(va, len).ok_or_else(|| {
                self.refuse(format!(
                    "queue {q}: {what} at {va:#x} ({len} bytes) is not inside one memory region"
                ))
            })?;
        }
        Ok(RingAddrs {
            desc: gpa[0],
            avail: gpa[1],
            used: gpa[2],
        })
    }
}

/// Most commands one request to a back end with a transfer limit is split into (1 MiB requests
/// at a 128 KiB limit).
const SPLIT_PARTS: u64 = 8;

/// The configuration space of a device of `ctx`'s disk.
pub(crate) fn blk_config(ctx: &DeviceContext, shared: &Shared) -> BlkConfig {
    let s = &shared.shape;
    let c = &ctx.config;
    let block_sectors = s.block_size / 512;
    // A back end with a transfer limit (a remote controller's MDTS, bounce slots) gets larger
    // requests split by the executor: segments up to the limit (never below a 16 or 64 KiB
    // guest page for the usual 128 KiB limit; Linux refuses a max_segment_size under its page
    // size), and few enough of them that a request splits into at most SPLIT_PARTS commands,
    // which any back-end queue of 8 or more entries takes.
    let (size_max, seg_max) = match s.max_transfer {
        0 => (c.size_max, c.seg_max),
        m => {
            let size_max = c.size_max.min(m).max(1);
            let most = (SPLIT_PARTS * m as u64 / size_max as u64) as u32;
            (size_max, c.seg_max.min(most).max(1))
        }
    };
    BlkConfig {
        capacity: s.sectors,
        size_max,
        seg_max,
        blk_size: s.block_size,
        // TOPOLOGY is not offered; min_io_size 1 keeps the field sane for drivers that read it.
        min_io_size: 1,
        writeback: shared.writeback.load(Ordering::Relaxed),
        num_queues: c.num_queues,
        // Whole blocks, no more than the disk, and at most 2^30 sectors (one Dataset
        // Management range holds 2^32 - 1 blocks).
        max_discard_sectors: (s.sectors.min(1 << 30) as u32 / block_sectors * block_sectors)
            .max(block_sectors),
        max_discard_seg: s.max_discard_seg,
        discard_sector_alignment: block_sectors,
        // One NVMe Write Zeroes command covers at most 65536 blocks.
        max_write_zeroes_sectors: 65536 * block_sectors,
        max_write_zeroes_seg: 1,
        write_zeroes_may_unmap: s.discard,
        ..BlkConfig::default()
    }
}

/// The virtio features a device of this disk offers: what the back end can do, nothing more.
pub(crate) fn offered_features(shared: &Shared) -> u64 {
    let mut f = 1u64 << feature::VERSION_1
        | 1 << feature::RING_EVENT_IDX
        | 1 << feature::RING_INDIRECT_DESC
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | 1 << feature::SIZE_MAX
        | 1 << feature::SEG_MAX
        | 1 << feature::BLK_SIZE
        | 1 << feature::FLUSH
        | 1 << feature::MQ;
    // Offer what the back end can do (DiskInfo), nothing more.
    let s = &shared.shape;
    if s.volatile_cache {
        f |= 1 << feature::CONFIG_WCE;
    }
    if s.read_only {
        f |= 1 << feature::RO;
    } else {
        if s.discard {
            f |= 1 << feature::DISCARD;
        }
        if s.write_zeroes {
            f |= 1 << feature::WRITE_ZEROES;
        }
    }
    f
}

/// Everything a ring needs to start, whoever described it (a vhost-user front end, or the host
/// agent for leapd on a SoC).
pub(crate) struct RingParams<'a> {
    pub q: usize,
    pub size: u16,
    pub addrs: RingAddrs,
    /// Where to start without an inflight region.
    pub base: u16,
    pub event_idx: bool,
    pub kick: Option<&'a File>,
    pub call: &'a Arc<Signal>,
    pub inflight: Option<&'a Arc<inflight::Region>>,
    pub stopped_at: &'a Arc<AtomicU32>,
    pub mem: &'a MemoryTable,
}

/// Queue pair capsule size: enough for an SGL of `seg_max` descriptors or the discard ranges.
fn capsule_bytes(ctx: &DeviceContext, shared: &Shared) -> usize {
    16 * (ctx.config.seg_max as usize + 2).max(shared.shape.max_discard_seg as usize)
}

/// Starts a ring: builds and checks its `Queue` in guest memory, positions it (from the
/// inflight region when there is one: requests a previous back end took but never completed
/// come back first; else from `base`), and attaches its port to a poller. Returns the poller and
/// pair serving it.
pub(crate) fn start_ring(
    ctx: &DeviceContext,
    nss: &Arc<Namespaces>,
    shared: &Arc<Shared>,
    p: RingParams<'_>,
) -> Result<(usize, PairId), String> {
    use virtio_queue::QueueT;
    let q = p.q;
    if p.mem.is_empty() {
        return Err(format!("queue {q} started before the memory table"));
    }
    let mem = p.mem.mem.clone();
    let mut queue = virtio_queue::Queue::new(ctx.config.max_queue_size)
        .map_err(|e| format!("queue {q}: {e}"))?;
    let a = p.addrs;
    queue.set_size(p.size);
    queue.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
    queue.set_avail_ring_address(Some(a.avail as u32), Some((a.avail >> 32) as u32));
    queue.set_used_ring_address(Some(a.used as u32), Some((a.used >> 32) as u32));
    queue.set_event_idx(p.event_idx);
    queue.set_ready(true);
    if !queue.is_valid(&*mem) {
        return Err(format!("queue {q}: its rings are not inside guest memory"));
    }
    let mut tracker = None;
    let mut resubmit = Vec::new();
    if let Some(region) = p.inflight {
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| format!("queue {q}: used ring: {e}"))?
            .0;
        let mut t = QueueTracker::new(region.clone(), q as u16, p.size)
            .map_err(|e| format!("queue {q}: {e}"))?;
        resubmit = t.recover(used_idx).map_err(|e| format!("queue {q}: {e}"))?;
        queue.set_next_used(used_idx);
        queue.set_next_avail(used_idx.wrapping_add(resubmit.len() as u16));
        if !resubmit.is_empty() {
            log::info!(
                "queue {q}: resubmitting {} request(s) a previous back end left in flight",
                resubmit.len()
            );
        }
        tracker = Some(t);
    } else {
        queue.set_next_avail(p.base);
        queue.set_next_used(p.base);
    }
    let kick = p
        .kick
        .and_then(|k| k.try_clone().ok())
        .ok_or_else(|| format!("queue {q}: no kick fd, or it cannot be duplicated"))?;
    let depth = p.size.max(2);
    let port = BlkQueue::new(RingSetup {
        index: q as u16,
        queue,
        kick,
        call: p.call.clone(),
        shared: shared.clone(),
        depth,
        tracker,
        resubmit,
        stopped_at: p.stopped_at.clone(),
    });
    let pi = (ctx.config.first_poller + q) % ctx.pollers.len();
    let id = ctx.pollers[pi]
        .attach(
            Box::new(port),
            nss.clone(),
            depth,
            capsule_bytes(ctx, shared),
            ctx.io_stats.queue(q),
        )
        .map_err(|e| format!("queue {q}: cannot attach to a poller: {e}"))?;
    // The guest may wait for an interrupt nobody will send: a predecessor (or the host agent
    // relaying its signals) died between publishing completions and signalling them. One
    // interrupt at start ends that wait; virtio drivers take spurious interrupts in their stride.
    if let Err(e) = p.call.signal() {
        log::debug!("queue {q}: start signal: {e}");
    }
    log_limited_by!(
        &ctx.stats.events,
        log::Level::Info,
        "event=queue_started disk={} queue={q} size={} poller={pi} base={}",
        ctx.config.name,
        p.size,
        p.base
    );
    Ok((pi, id))
}

struct RingAddrsVa {
    desc: u64,
    avail: u64,
    used: u64,
}

impl VhostUserBackendReqHandlerMut for BlkDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let extra = features & !self.features();
        if extra != 0 {
            return Err(self.refuse(format!(
                "SET_FEATURES acks features never offered ({extra:#x})"
            )));
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let table = MemoryTable::build(regions, files)
            .and_then(|t| t.map_for_dma(&**self.ctx.ns.backend()))
            .map_err(|e| self.refuse(e.to_string()))?;
        // Only a table that passed every check replaces the current one. Queues pick it up at
        // their next round; the old mappings live until I/O that used them completes.
        self.shared.set_memory(table.clone());
        self.table = table;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let q = self.ring_index(index)?;
        self.running(q)?;
        let max = self.ctx.config.max_queue_size as u32;
        if num == 0 || !num.is_power_of_two() || num > max {
            return Err(self.refuse(format!(
                "queue {q}: size {num} is not a power of two from 1 to {max}"
            )));
        }
        self.rings[q].size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let q = self.ring_index(index)?;
        self.running(q)?;
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return Err(self.refuse(format!("queue {q}: dirty logging is not supported")));
        }
        let addrs = self.check_ring_layout(
            q,
            &RingAddrsVa {
                desc: descriptor,
                avail: available,
                used,
            },
        )?;
        self.rings[q].addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let q = self.ring_index(index)?;
        self.running(q)?;
        let base = u16::try_from(base).map_err(|_| {
            self.refuse(format!("queue {q}: base {base} is not a split-ring index"))
        })?;
        self.rings[q].base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let q = match self.ring_index(index) {
            Ok(q) => q,
            Err(e) => {
                // No reply goes out on an error, and the front end waits for one.
                self.hangup = true;
                return Err(e);
            }
        };
        // Stops the ring (vhost-user, "Ring states"); a new kick starts it again.
        self.stop(q);
        self.rings[q].kick = None;
        Ok(VhostUserVringState::new(index, self.rings[q].base as u32))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.ring_index(index as u32)?;
        let Some(fd) = fd else {
            return Err(self.refuse(format!(
                "queue {q}: a kick file descriptor is required (polling mode is not supported)"
            )));
        };
        // The poller reads it only when poll(2) says it is readable, and never blocks on it.
        let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| self.refuse(format!("queue {q}: kick fd: {e}")))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| self.refuse(format!("queue {q}: kick fd: {e}")))?;
        // A new kick for a running ring: restart it on the new descriptor.
        self.stop(q);
        self.rings[q].kick = Some(fd);
        self.try_start(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.ring_index(index as u32)?;
        // Swapped in place: a running queue signals the new descriptor from its next round.
        self.rings[q].call.set(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.ring_index(index as u32)?;
        self.rings[q]._err = fd;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let extra = features & !self.protocol_features().bits();
        if extra != 0 {
            return Err(self.refuse(format!(
                "SET_PROTOCOL_FEATURES acks features never offered ({extra:#x})"
            )));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.rings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let q = self.ring_index(index)?;
        self.rings[q].enabled = enable;
        if enable {
            self.try_start(q)
        } else {
            self.stop(q);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // Guests read the whole (growing) struct; answer zeros past what we define, within reason.
        let size = (size as usize).min(4096);
        let bytes = self.blk_config().to_bytes();
        Ok((0..size)
            .map(|i| bytes.get(offset as usize + i).copied().unwrap_or(0))
            .collect())
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only the writeback byte is writable, and only with CONFIG_WCE (virtio 1.2, 5.2.4).
        if offset as usize != WRITEBACK_OFFSET || buf.len() != 1 {
            self.shared.stats.count(Malformed::Config);
            return Err(self.refuse(format!(
                "SET_CONFIG of {} byte(s) at offset {offset}: only the writeback byte (offset \
                 {WRITEBACK_OFFSET}) is writable",
                buf.len()
            )));
        }
        if !self.shared.shape.volatile_cache {
            self.shared.stats.count(Malformed::Config);
            return Err(self.refuse(
                "SET_CONFIG of the writeback byte: the disk has no volatile cache (CONFIG_WCE \
                 is not offered)",
            ));
        }
        let wb = buf[0] != 0;
        self.shared.writeback.store(wb, Ordering::Relaxed);
        log::info!(
            "guest set the write cache to {}",
            if wb { "write-back" } else { "write-through" }
        );
        Ok(())
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        match inflight::Region::create(msg.num_queues, msg.queue_size, self.rings.len() as u16) {
            Ok((region, file, size)) => {
                self.inflight = Some(Arc::new(region));
                Ok((
                    VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
                    file,
                ))
            }
            Err(e) => {
                // No reply goes out on an error, and the front end waits for one.
                self.hangup = true;
                Err(self.refuse(format!("GET_INFLIGHT_FD: {e}")))
            }
        }
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = inflight::Region::open(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
            self.rings.len() as u16,
        )
        .map_err(|e| self.refuse(format!("SET_INFLIGHT_FD: {e}")))?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    refuse_unsupported_requests!();
}
