//! The vhost-user-blk device: features, configuration space, memory table, and the binding of
//! each virtqueue to a queue pair on a poller. One `BlkDevice` serves one connection.

use crate::config::{feature, BlkConfig, WRITEBACK_OFFSET};
use crate::queue::BlkQueue;
use crate::stats::VhostStats;
use leap_runtime::{
    log_limited, AddressSpace, DeviceIoStats, Namespace, Namespaces, PairId, Poller, Region,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Device parameters that are not properties of the disk.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Number of request queues offered.
    pub num_queues: u16,
    /// Largest virtqueue size accepted.
    pub max_queue_size: u16,
    /// Most data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Largest data segment in bytes (`size_max`).
    pub size_max: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            num_queues: 1,
            max_queue_size: 1024,
            seg_max: 126,
            size_max: 256 << 10,
            max_discard_seg: 32,
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
    memory: Mutex<Memory>,
    /// Bumped (Release) after `memory` changes; queues check it (Acquire) once per round and
    /// take a new snapshot only then, so the data path never touches the lock.
    pub memory_gen: AtomicU64,
}

/// The guest memory as of one memory table: the mapping and its address space.
#[derive(Clone)]
pub(crate) struct Memory {
    pub mem: Arc<GuestMemoryMmap>,
    pub aspace: Arc<AddressSpace>,
}

impl Shared {
    /// The current memory and its generation.
    pub fn memory(&self) -> (Memory, u64) {
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

/// A vhost-user-blk device for one connection.
pub struct BlkDevice {
    ctx: DeviceContext,
    /// The one namespace (NSID 1) every queue's commands go to.
    nss: Arc<Namespaces>,
    shared: Arc<Shared>,
    pairs: Mutex<Vec<Option<(usize, PairId)>>>,
    exit: Vec<(Mutex<Option<EventConsumer>>, EventNotifier)>,
}

impl BlkDevice {
    /// A device for one connection. Guest memory arrives through `update_memory`.
    pub fn new(ctx: DeviceContext) -> std::io::Result<Arc<Self>> {
        let info = ctx.ns.info();
        let shared = Arc::new(Shared {
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
            memory: Mutex::new(Memory {
                mem: Arc::new(GuestMemoryMmap::new()),
                aspace: Arc::new(AddressSpace::empty()),
            }),
            memory_gen: AtomicU64::new(0),
        });
        // One worker thread (see `queues_per_thread`), one exit event.
        let (c, n) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let exit = vec![(Mutex::new(Some(c)), n)];
        let n = ctx.config.num_queues as usize;
        Ok(Arc::new(BlkDevice {
            nss: Namespaces::single(ctx.ns.clone()),
            ctx,
            shared,
            pairs: Mutex::new(vec![None; n]),
            exit,
        }))
    }

    /// The configuration space values.
    pub fn blk_config(&self) -> BlkConfig {
        let s = &self.shared.shape;
        let c = &self.ctx.config;
        let block_sectors = s.block_size / 512;
        // A back end with a transfer limit (a remote controller's MDTS): segments of at most one
        // 4 KiB page and no more of them than the limit holds, so no request exceeds it.
        let (size_max, seg_max) = match s.max_transfer {
            0 => (c.size_max, c.seg_max),
            m => (c.size_max.min(4096), c.seg_max.min(m / 4096).max(1)),
        };
        BlkConfig {
            capacity: s.sectors,
            size_max,
            seg_max,
            blk_size: s.block_size,
            // TOPOLOGY is not offered; min_io_size 1 keeps the field sane for drivers that read it.
            min_io_size: 1,
            writeback: self.shared.writeback.load(Ordering::Relaxed),
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

    /// Queue pair capsule size: enough for an SGL of `seg_max` descriptors or the discard ranges.
    fn capsule_bytes(&self) -> usize {
        16 * (self.ctx.config.seg_max as usize + 2).max(self.shared.shape.max_discard_seg as usize)
    }

    fn attach(&self, q: usize, vring: &VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>) {
        let Ok(mut pairs) = self.pairs.lock() else {
            return;
        };
        if pairs.get(q).is_none_or(|p| p.is_some()) {
            return;
        }
        // One depth for both sides: the pair needs at least 2 entries, and the port's per-cid
        // table must cover every cid the pair can hand out (a 1-entry virtqueue is legal).
        let depth = vring.get_ref().get_queue().size().max(2);
        let port = BlkQueue::new(q as u16, vring.clone(), self.shared.clone(), depth);
        let pi = q % self.ctx.pollers.len();
        match self.ctx.pollers[pi].attach(
            Box::new(port),
            self.nss.clone(),
            depth,
            self.capsule_bytes(),
            self.ctx.io_stats.queue(q),
        ) {
            Ok(id) => {
                log::debug!("queue {q} ({depth} entries) attached to poller {pi}");
                pairs[q] = Some((pi, id));
            }
            Err(e) => log::error!("queue {q}: cannot attach to poller: {e}"),
        }
    }

    fn detach(&self, q: usize) {
        let taken = self
            .pairs
            .lock()
            .ok()
            .and_then(|mut p| p.get_mut(q).and_then(|s| s.take()));
        if let Some((pi, id)) = taken {
            // Waits until every in-flight request of the queue has been completed to the guest.
            if let Err(e) = self.ctx.pollers[pi].detach(id) {
                log::error!("queue {q}: detach: {e}");
            }
            log::debug!("queue {q} detached");
        }
    }

    /// Stops every queue, completing what is in flight. Called when the connection ends.
    pub fn shutdown(&self) {
        for q in 0..self.ctx.config.num_queues as usize {
            self.detach(q);
        }
    }

    /// Wakes the worker threads so they exit.
    pub fn send_exit_events(&self) {
        for (_, n) in &self.exit {
            let _ = n.notify();
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

    fn num_queues(&self) -> usize {
        self.ctx.config.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.ctx.config.max_queue_size as usize
    }

    fn features(&self) -> u64 {
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
        let s = &self.shared.shape;
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

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library configures the vrings; queues ask them (`needs_notification`).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Guests read the whole (growing) struct; answer zeros past what we define, within reason.
        let size = (size as usize).min(4096);
        let bytes = self.blk_config().to_bytes();
        (0..size)
            .map(|i| bytes.get(offset as usize + i).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only the writeback byte is writable, and only with CONFIG_WCE (virtio 1.2, 5.2.4).
        // Anything else is ignored, counted and logged. (It should be refused with a failure
        // reply, but vhost-user-backend 0.24 ends the whole connection on any handler error;
        // the reply comes with leapd's own request handling.)
        let refuse = |why: &str| {
            self.shared.stats.count(crate::stats::Malformed::Config);
            log_limited!(log::Level::Warn, "SET_CONFIG ignored: {why}");
            Ok(())
        };
        if offset as usize != WRITEBACK_OFFSET || buf.len() != 1 {
            return refuse(&format!(
                "{} byte(s) at offset {offset}: only the writeback byte (offset {WRITEBACK_OFFSET}) is writable",
                buf.len()
            ));
        }
        if !self.shared.shape.volatile_cache {
            return refuse("the disk has no volatile cache (CONFIG_WCE is not offered)");
        }
        let wb = buf[0] != 0;
        self.shared.writeback.store(wb, Ordering::Relaxed);
        log::info!(
            "guest set the write cache to {}",
            if wb { "write-back" } else { "write-through" }
        );
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        let guard = mem.memory();
        let mut regions = Vec::new();
        for r in guard.iter() {
            let start = r.start_addr();
            let host = guard.get_host_address(start).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?;
            regions.push(Region {
                guest: start.0,
                len: r.len(),
                host: host as usize,
                device: start.0,
            });
        }
        let mem = guard.into_inner();
        let keep: Arc<dyn std::any::Any + Send + Sync> = mem.clone();
        let aspace = AddressSpace::new(regions, Some(keep))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        if let Ok(mut m) = self.shared.memory.lock() {
            *m = Memory {
                mem,
                aspace: Arc::new(aspace),
            };
        }
        self.shared.memory_gen.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread for all queues: it only forwards kicks to pollers, and with one
        // thread the library's event ids are the global queue indexes.
        vec![(1u64 << self.ctx.config.num_queues) - 1]
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exit.get(thread_index)?;
        let consumer = c.lock().ok()?.take()?;
        Some((consumer, n.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.detach(queue_index as usize);
        Ok(())
    }

    fn reset_device(&self) {
        self.shutdown();
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread: usize,
    ) -> std::io::Result<()> {
        let q = device_event as usize;
        if let Some(vring) = vrings.get(q) {
            // The library has consumed the kick already. Attach on first use (the library calls
            // us once when the ring is enabled), then hand the work to the queue's poller.
            self.attach(q, vring);
            let pi = q % self.ctx.pollers.len();
            self.ctx.pollers[pi].waker().wake();
        }
        Ok(())
    }
}
