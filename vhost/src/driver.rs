//! In-process vhost-user **driver**: the guest side of a vhost-user-blk device.
//!
//! Tests and `leapd bench` use it to talk to a vhost-user-blk backend (Leap itself, or
//! `qemu-storage-daemon`) the way a VMM plus guest kernel would, without a VM:
//!
//! ```text
//!   Driver::connect ── vhost-user socket ──► backend
//!     │  guest memory: one memfd, MAP_SHARED here and in the backend
//!     │  ┌──────────────────────────────────────────────────────────────┐
//!     │  │ per queue: desc table │ avail ring │ used ring │ slot scratch │ data area (alloc) │
//!     │  └──────────────────────────────────────────────────────────────┘
//!     └─ take_queues() ─► DriverQueue (one per thread; kick/call eventfds)
//!                            └─ blk helpers: submit_blk / blk_request
//! ```
//!
//! The control path (feature negotiation, memory table, vring setup) goes through the `vhost`
//! crate's [`Frontend`]. The data path ([`DriverQueue`]) is this module's own split-virtqueue
//! driver (virtio 1.2 §2.7), written so that the steady state takes no lock and allocates nothing.
//!
//! Guest physical addresses start at 0 and map 1:1 onto the memfd. Ring addresses given to the
//! backend in `SET_VRING_ADDR` are this process's virtual addresses, as the vhost-user spec
//! ("Vring address description") requires.

mod blk;
mod queue;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use blk::{
    blk_data_desc, blk_request, blk_status, submit_blk, submit_blk_segments, DiscardSegment,
    BLK_OUTHDR_LEN, MAX_INLINE_SEGMENTS, STATUS_UNSET,
};
pub use queue::{
    Desc, DriverQueue, RawDesc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, SLOT_SCRATCH_BYTES,
};
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Guest memory as the driver sees it: one memfd-backed, shared region starting at GPA 0.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// A guest physical address (what descriptors carry).
pub type GuestAddr = u64;

/// `VHOST_USER_F_PROTOCOL_FEATURES` (vhost-user spec, bit 30 of the virtio feature word).
const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Feature bits 0..=23 are device-type specific (virtio 1.2 §6): for us, virtio-blk's.
const DEVICE_FEATURE_BITS: u64 = (1 << 24) - 1;

pub use crate::config::BlkConfig;

/// Bytes of `struct virtio_blk_config` the driver reads: everything up to and including
/// `write_zeroes_may_unmap` and its padding (virtio 1.2 §5.2.4). Secure-erase and zoned fields
/// are left out so backends with a shorter config space still answer.
pub const BLK_CONFIG_LEN: u32 = crate::config::CONFIG_SIZE as u32;

/// Offset of `writeback` (`wce`) in `struct virtio_blk_config`.
const BLK_CONFIG_WCE_OFFSET: u32 = crate::config::WRITEBACK_OFFSET as u32;

/// Ring parts and scratch areas start on this boundary so the avail ring (written by the
/// driver) and the used ring (written by the device) never share a cache line. 128 bytes covers
/// both 64-byte and 128-byte line sizes found on ARM.
const RING_ALIGN: u64 = 128;

/// Largest split-queue size (virtio 1.2 §2.7: "Queue Size ... maximum 32768").
const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The options cannot describe a valid device setup.
    #[error("invalid driver options: {0}")]
    InvalidOptions(&'static str),
    /// Creating or sizing the memfd that backs guest memory failed.
    #[error("cannot create guest memory memfd")]
    Memfd(#[source] std::io::Error),
    /// Mapping guest memory failed.
    #[error("cannot map guest memory")]
    MapMemory(#[source] vm_memory::mmap::FromRangesError),
    /// Building the guest memory collection failed.
    #[error("cannot build guest memory")]
    MemoryCollection(#[source] vm_memory::GuestRegionCollectionError),
    /// An eventfd could not be created.
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    /// A vhost-user request failed (transport error, or the backend refused it).
    #[error("vhost-user {op} failed")]
    Vhost {
        /// The request that failed.
        op: &'static str,
        /// What the vhost crate reported.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not offer something the driver needs.
    #[error("backend does not offer {0}")]
    MissingFeature(&'static str),
    /// More queues were asked for than the backend has.
    #[error("backend has {available} queues, {requested} requested")]
    TooManyQueues {
        /// Queues the backend reports (`GET_QUEUE_NUM`, or 1 without MQ).
        available: u64,
        /// Queues asked for in [`DriverOptions::num_queues`].
        requested: u16,
    },
    /// The backend answered `GET_CONFIG` with fewer bytes than asked for.
    #[error("config space reply too short: {0} bytes")]
    ShortConfig(usize),
    /// The bump allocator ran out of guest memory.
    #[error("out of guest memory: {len} bytes aligned to {align} requested, {free} free")]
    OutOfMemory {
        /// Requested length.
        len: usize,
        /// Requested alignment.
        align: usize,
        /// Bytes left in the data area (before alignment).
        free: u64,
    },
    /// An allocation request was malformed (zero length, alignment not a power of two).
    #[error("invalid allocation: {len} bytes aligned to {align}")]
    InvalidAlloc {
        /// Requested length.
        len: usize,
        /// Requested alignment.
        align: usize,
    },
    /// A chain was empty.
    #[error("a descriptor chain needs at least one descriptor")]
    EmptyChain,
    /// `add_raw_chain_at` was asked to start at a descriptor the chain does not have.
    #[error("head index {head} outside a chain of {len}")]
    HeadOutOfChain {
        /// Requested head index.
        head: usize,
        /// Descriptors in the chain.
        len: usize,
    },
    /// Not enough free descriptors for the chain.
    #[error("queue full: chain needs {needed} descriptors, {free} free")]
    QueueFull {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: u16,
    },
    /// More discard / write-zeroes segments than fit in a slot's scratch area.
    #[error("{0} segments do not fit inline; pass a data buffer instead")]
    TooManySegments(usize),
    /// No used element came back in time.
    #[error("timed out waiting for the device")]
    Timeout,
    /// A blocking request saw a completion for another chain.
    #[error("expected completion of head {expected}, got {got}")]
    UnexpectedCompletion {
        /// The head that was submitted.
        expected: u16,
        /// The id the device returned.
        got: u16,
    },
}

fn vhost_err(op: &'static str) -> impl FnOnce(vhost::Error) -> DriverError {
    move |source| DriverError::Vhost { op, source }
}

/// How to set up the device.
#[derive(Clone, Copy, Debug)]
pub struct DriverOptions {
    /// Number of virtqueues to set up and enable (1 ..= what the backend offers).
    pub num_queues: u16,
    /// Entries per split virtqueue: a power of two, at most 32768.
    pub queue_size: u16,
    /// Bytes of guest memory (rounded up to the page size). Rings and per-slot scratch come
    /// first; the rest is the data area [`Driver::alloc`] hands out.
    pub mem_size: usize,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if the backend offers it.
    pub event_idx: bool,
    /// Feature bits the driver refuses even if offered (applied after everything else).
    pub features_mask: u64,
    /// Negotiate inflight I/O tracking (INFLIGHT_SHMFD) if the backend offers it, as QEMU
    /// does, so [`Driver::reconnect`] to a restarted backend loses nothing.
    pub inflight: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            num_queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            event_idx: true,
            features_mask: 0,
            inflight: true,
        }
    }
}

/// Where one queue's parts live in guest memory (offsets = guest physical addresses).
#[derive(Clone, Copy, Debug)]
struct QueueLayout {
    desc: u64,
    avail: u64,
    used: u64,
    scratch: u64,
}

/// Lays out `num_queues` rings plus scratch from GPA 0; returns them and the data-area start.
fn layout(num_queues: u16, size: u16, page: u64) -> Option<(Vec<QueueLayout>, u64)> {
    let n = u64::from(size);
    let mut off = 0u64;
    let mut out = Vec::with_capacity(usize::from(num_queues));
    for _ in 0..num_queues {
        let desc = align_up(off, RING_ALIGN)?;
        // virtio 1.2 §2.7: descriptor table 16·N, avail 6 + 2·N, used 6 + 8·N bytes.
        let avail = align_up(desc.checked_add(16 * n)?, RING_ALIGN)?;
        let used = align_up(avail.checked_add(6 + 2 * n)?, RING_ALIGN)?;
        let scratch = align_up(used.checked_add(6 + 8 * n)?, RING_ALIGN)?;
        off = scratch.checked_add(SLOT_SCRATCH_BYTES as u64 * n)?;
        out.push(QueueLayout {
            desc,
            avail,
            used,
            scratch,
        });
    }
    Some((out, align_up(off, page)?))
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// The system page size, read at run time (never assumed to be 4 KiB).
fn page_size() -> u64 {
    leap_runtime::mem::page_size() as u64
}

/// What one queue's setup needs again when the driver reconnects.
struct RingSetup {
    config: VringConfigData,
    /// Guest address of the used ring (its index is where a reconnect continues).
    used: u64,
    call: EventFd,
    kick: EventFd,
}

/// Everything the handshake sends, kept so a restarted backend can be set up again.
struct Setup {
    socket: PathBuf,
    opts: DriverOptions,
    region: VhostUserMemoryRegionInfo,
    rings: Vec<RingSetup>,
    /// The inflight region the backend gave us (GET_INFLIGHT_FD), handed back on reconnect.
    inflight: Option<(VhostUserInflight, File)>,
}

/// The outcome of one handshake.
struct Negotiated {
    frontend: Frontend,
    device_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
}

impl Setup {
    /// Connects and brings the device up: features, memory table, inflight region, and every
    /// ring starting at `bases[i]`.
    fn handshake(&mut self, bases: &[u16]) -> Result<Negotiated, DriverError> {
        let opts = self.opts;
        let mut frontend = Frontend::connect(&self.socket, u64::from(opts.num_queues))
            .map_err(vhost_err("connect"))?;
        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let device_features = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;

        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if device_features & PROTOCOL_FEATURES_BIT != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            let mut wanted = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            if opts.inflight {
                wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            protocol_features = offered & wanted;
            frontend
                .set_protocol_features(protocol_features)
                .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // The vhost crate only waits for an ack when the request carries NEED_REPLY;
                // backends only answer setters with an ack, so this is safe for getters too.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }

        let available = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            frontend
                .get_queue_num()
                .map_err(vhost_err("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if u64::from(opts.num_queues) > available {
            return Err(DriverError::TooManyQueues {
                available,
                requested: opts.num_queues,
            });
        }

        let mut wanted = (1u64 << VIRTIO_F_VERSION_1)
            | PROTOCOL_FEATURES_BIT
            | (device_features & DEVICE_FEATURE_BITS);
        if opts.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let acked_features = wanted & device_features & !opts.features_mask;
        if acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(DriverError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        frontend
            .set_features(acked_features)
            .map_err(vhost_err("SET_FEATURES"))?;
        frontend
            .set_mem_table(&[self.region])
            .map_err(vhost_err("SET_MEM_TABLE"))?;

        // Inflight tracking, as QEMU does it: the backend creates the region once; every later
        // connection (a restarted backend) gets the same region back.
        if protocol_features.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, opts.num_queues, opts.queue_size);
                self.inflight = Some(
                    frontend
                        .get_inflight_fd(&ask)
                        .map_err(vhost_err("GET_INFLIGHT_FD"))?,
                );
            }
            if let Some((info, file)) = &self.inflight {
                frontend
                    .set_inflight_fd(info, file.as_raw_fd())
                    .map_err(vhost_err("SET_INFLIGHT_FD"))?;
            }
        }

        for (i, r) in self.rings.iter().enumerate() {
            frontend
                .set_vring_num(i, opts.queue_size)
                .map_err(vhost_err("SET_VRING_NUM"))?;
            frontend
                .set_vring_base(i, bases.get(i).copied().unwrap_or(0))
                .map_err(vhost_err("SET_VRING_BASE"))?;
            frontend
                .set_vring_addr(i, &r.config)
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            frontend
                .set_vring_call(i, &r.call)
                .map_err(vhost_err("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(i, &r.kick)
                .map_err(vhost_err("SET_VRING_KICK"))?;
        }
        // Without PROTOCOL_FEATURES rings start enabled; with it they start disabled
        // (vhost-user spec, "Ring states").
        if acked_features & PROTOCOL_FEATURES_BIT != 0 {
            for i in 0..self.rings.len() {
                frontend
                    .set_vring_enable(i, true)
                    .map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
        }
        log::debug!(
            "driver: connected to {}: features {device_features:#x} offered, {acked_features:#x} \
             acked, protocol {protocol_features:?}, {} queue(s) x {}",
            self.socket.display(),
            opts.num_queues,
            opts.queue_size
        );
        Ok(Negotiated {
            frontend,
            device_features,
            acked_features,
            protocol_features,
        })
    }
}

/// A connected vhost-user-blk device, seen from the guest side.
pub struct Driver {
    frontend: Frontend,
    setup: Setup,
    mem: Arc<GuestMemoryMmap>,
    mem_size: u64,
    device_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queues: Vec<DriverQueue>,
    /// Next free byte of the data area (bump allocator).
    next_free: u64,
}

impl Driver {
    /// Connects to a vhost-user-blk backend socket and brings the device up.
    ///
    /// Negotiates `VIRTIO_F_VERSION_1` (required), `VIRTIO_RING_F_EVENT_IDX` if asked and
    /// offered, `VHOST_USER_F_PROTOCOL_FEATURES`, and every virtio-blk feature (bits 0..=23) the
    /// device offers, minus [`DriverOptions::features_mask`]; protocol features MQ, CONFIG and
    /// REPLY_ACK when offered, and INFLIGHT_SHMFD when offered and asked for (with REPLY_ACK
    /// every request asks for an ack, so a refusal is an error here rather than later). Then
    /// SET_OWNER, one memfd-backed region in SET_MEM_TABLE, GET/SET_INFLIGHT_FD, and for each
    /// queue SET_VRING_NUM/BASE/ADDR/CALL/KICK and SET_VRING_ENABLE.
    pub fn connect(socket: &Path, opts: DriverOptions) -> Result<Driver, DriverError> {
        if opts.num_queues == 0 {
            return Err(DriverError::InvalidOptions("num_queues must be at least 1"));
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size > MAX_QUEUE_SIZE {
            return Err(DriverError::InvalidOptions(
                "queue_size must be a power of two, at most 32768",
            ));
        }
        let page = page_size();
        let mem_size = align_up(opts.mem_size as u64, page)
            .ok_or(DriverError::InvalidOptions("mem_size too large"))?;
        let (layouts, data_start) = layout(opts.num_queues, opts.queue_size, page)
            .ok_or(DriverError::InvalidOptions("rings do not fit in u64"))?;
        if data_start >= mem_size {
            return Err(DriverError::InvalidOptions(
                "mem_size too small for the rings and slot scratch",
            ));
        }
        let mem_len = usize::try_from(mem_size)
            .map_err(|_| DriverError::InvalidOptions("mem_size too large"))?;

        // Guest memory: a memfd so the backend can map the same pages (vhost-user needs an fd
        // per region); MAP_SHARED (vm-memory's from_file) so both sides see each other's writes.
        let fd = nix::sys::memfd::memfd_create(
            c"leap-driver-guest-mem",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| DriverError::Memfd(e.into()))?;
        let file = File::from(fd);
        file.set_len(mem_size).map_err(DriverError::Memfd)?;
        let region = GuestRegionMmap::<()>::from_range(
            GuestAddress(0),
            mem_len,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(DriverError::MapMemory)?;
        let region_info = VhostUserMemoryRegionInfo::from_guest_region(&region)
            .map_err(vhost_err("memory region info"))?;
        let host_base = region.as_ptr();
        debug_assert_eq!(region.len(), mem_size);
        let mem = Arc::new(
            GuestMemoryMmap::from_regions(vec![region]).map_err(DriverError::MemoryCollection)?,
        );

        let mut rings = Vec::with_capacity(layouts.len());
        let mut queue_fds = Vec::with_capacity(layouts.len());
        for l in &layouts {
            let call = EventFd::new(EFD_NONBLOCK).map_err(DriverError::EventFd)?;
            let kick = EventFd::new(EFD_NONBLOCK).map_err(DriverError::EventFd)?;
            // Vring addresses are frontend virtual addresses (vhost-user spec); host_base maps
            // GPA 0 and stays mapped while `mem` lives.
            let va = |gpa: u64| host_base as u64 + gpa;
            rings.push(RingSetup {
                config: VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: va(l.desc),
                    used_ring_addr: va(l.used),
                    avail_ring_addr: va(l.avail),
                    log_addr: None,
                },
                used: l.used,
                call: call.try_clone().map_err(DriverError::EventFd)?,
                kick: kick.try_clone().map_err(DriverError::EventFd)?,
            });
            queue_fds.push((call, kick));
        }
        let mut setup = Setup {
            socket: socket.to_path_buf(),
            opts,
            region: region_info,
            rings,
            inflight: None,
        };
        let n = setup.handshake(&[])?;
        let event_idx = n.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(layouts.len());
        for (i, (l, (call, kick))) in layouts.iter().zip(queue_fds).enumerate() {
            // SAFETY: the layout puts every part of this queue inside [0, data_start) with the
            // alignment split rings need, data_start < mem_size, host_base maps mem_size bytes,
            // and the queue keeps `mem` (which owns the mapping) alive.
            let q = unsafe {
                DriverQueue::new(queue::QueueSetup {
                    index: i as u16, // i < num_queues: u16
                    size: opts.queue_size,
                    event_idx,
                    mem: Arc::clone(&mem),
                    host_base,
                    gpas: queue::RingGpas {
                        desc: l.desc,
                        avail: l.avail,
                        used: l.used,
                        scratch: l.scratch,
                    },
                    call,
                    kick,
                })
            };
            queues.push(q);
        }
        Ok(Driver {
            frontend: n.frontend,
            setup,
            mem,
            mem_size,
            device_features: n.device_features,
            acked_features: n.acked_features,
            protocol_features: n.protocol_features,
            queues,
            next_free: data_start,
        })
    }

    /// Connects again after the backend went away (a crash and restart): the same memory,
    /// rings and eventfds, each ring's base at its used index (what QEMU sends after a backend
    /// died: it cannot ask a dead backend where it stopped), and the inflight region handed
    /// back, so the backend resubmits what it had not completed. Queues already taken keep
    /// working; requests in flight complete from the new backend.
    pub fn reconnect(&mut self) -> Result<(), DriverError> {
        let bases: Vec<u16> = self
            .setup
            .rings
            .iter()
            .map(|r| {
                self.mem
                    .load::<u16>(
                        GuestAddress(r.used + 2),
                        std::sync::atomic::Ordering::Acquire,
                    )
                    .map(u16::from_le)
                    .unwrap_or(0)
            })
            .collect();
        let n = self.setup.handshake(&bases)?;
        self.frontend = n.frontend;
        self.device_features = n.device_features;
        self.acked_features = n.acked_features;
        self.protocol_features = n.protocol_features;
        Ok(())
    }

    /// Virtio feature bits the device offered (`GET_FEATURES`).
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Virtio feature bits negotiated (`SET_FEATURES`).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// vhost-user protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The vhost-user connection, for tests that send requests the driver does not wrap.
    pub fn frontend(&self) -> &Frontend {
        &self.frontend
    }

    /// Reads and decodes the virtio-blk config space (`GET_CONFIG`, needs protocol CONFIG).
    pub fn config(&self) -> Result<BlkConfig, DriverError> {
        let buf = [0u8; BLK_CONFIG_LEN as usize];
        // Frontend is an Arc'd handle; the trait wants &mut for no reason we depend on.
        let (_, payload) = self
            .frontend
            .clone()
            .get_config(0, BLK_CONFIG_LEN, VhostUserConfigFlags::empty(), &buf)
            .map_err(vhost_err("GET_CONFIG"))?;
        BlkConfig::from_bytes(&payload).ok_or(DriverError::ShortConfig(payload.len()))
    }

    /// Turns the device's write-back cache on or off: `SET_CONFIG` of the one `writeback`
    /// byte (virtio 1.2 §5.2.6.1, `VIRTIO_BLK_F_CONFIG_WCE`).
    ///
    /// The flags word is 0, QEMU's `VHOST_SET_CONFIG_TYPE_FRONTEND`. Not the vhost crate's
    /// `VhostUserConfigFlags::WRITABLE` (= 1): that is QEMU's `..._TYPE_MIGRATION`, which
    /// qemu-storage-daemon refuses with a `vu_panic` that drops the connection.
    pub fn set_writeback(&mut self, on: bool) -> Result<(), DriverError> {
        self.frontend
            .set_config(
                BLK_CONFIG_WCE_OFFSET,
                VhostUserConfigFlags::empty(),
                &[u8::from(on)],
            )
            .map_err(vhost_err("SET_CONFIG"))
    }

    /// Writes `bytes` at `offset` of the device's configuration space (SET_CONFIG, frontend
    /// type), whatever the field: for tests of what a device refuses.
    pub fn set_config_raw(&mut self, offset: u32, bytes: &[u8]) -> Result<(), DriverError> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::empty(), bytes)
            .map_err(vhost_err("SET_CONFIG"))
    }

    /// Guest memory, to fill and check data buffers (`vm_memory::Bytes`).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The file behind guest memory (the memfd the backend maps): what a window onto this
    /// "tenant's RAM" maps, for tests of leapd on a SoC.
    pub fn memory_file(&self) -> Option<File> {
        use vm_memory::GuestMemoryBackend;
        let r = self.mem.iter().next()?;
        r.file_offset()?.file().try_clone().ok()
    }

    /// Where guest memory is in this process (the addresses vring messages carry).
    pub fn memory_va_range(&self) -> std::ops::Range<u64> {
        let start = self.setup.region.userspace_addr;
        start..start + self.setup.region.memory_size
    }

    /// Bytes left in the data area.
    pub fn free_memory(&self) -> u64 {
        self.mem_size - self.next_free
    }

    /// Hands out `len` bytes of the data area aligned to `align` (a power of two). A bump
    /// allocator: memory is never given back while the driver lives.
    pub fn alloc(&mut self, len: usize, align: usize) -> Result<GuestAddr, DriverError> {
        if len == 0 || !align.is_power_of_two() {
            return Err(DriverError::InvalidAlloc { len, align });
        }
        let oom = DriverError::OutOfMemory {
            len,
            align,
            free: self.free_memory(),
        };
        let start = match align_up(self.next_free, align as u64) {
            Some(s) => s,
            None => return Err(oom),
        };
        match start.checked_add(len as u64) {
            Some(end) if end <= self.mem_size => {
                self.next_free = end;
                Ok(start)
            }
            _ => Err(oom),
        }
    }

    /// Takes the queues out, one per thread. A second call returns an empty vector.
    pub fn take_queues(&mut self) -> Vec<DriverQueue> {
        std::mem::take(&mut self.queues)
    }

    /// Closes the vhost-user connection; the backend sees a disconnect. Queues already taken
    /// keep their guest memory mapped but the device no longer serves them.
    pub fn disconnect(self) {
        drop(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_parts_apart_and_aligned() {
        let (l, data) = layout(2, 256, 4096).unwrap();
        assert_eq!(l[0].desc, 0);
        assert!(l[0].avail >= 16 * 256 && l[0].avail % RING_ALIGN == 0);
        assert!(l[0].used >= l[0].avail + 6 + 2 * 256);
        assert!(l[0].scratch >= l[0].used + 6 + 8 * 256);
        assert!(l[1].desc >= l[0].scratch + SLOT_SCRATCH_BYTES as u64 * 256);
        assert_eq!(data % 4096, 0);
        assert!(data >= l[1].scratch + SLOT_SCRATCH_BYTES as u64 * 256);
        // A 64 KiB page size (some ARM kernels) only moves the data area.
        let (_, data64k) = layout(2, 256, 65536).unwrap();
        assert_eq!(data64k % 65536, 0);
    }

    #[test]
    fn layout_overflow_is_none() {
        assert!(align_up(u64::MAX, 128).is_none());
    }

    #[test]
    fn config_decodes_little_endian_fields() {
        let mut raw = [0u8; BLK_CONFIG_LEN as usize];
        raw[0..8].copy_from_slice(&131072u64.to_le_bytes());
        raw[12..16].copy_from_slice(&126u32.to_le_bytes());
        raw[20..24].copy_from_slice(&512u32.to_le_bytes());
        raw[32] = 1;
        raw[34..36].copy_from_slice(&2u16.to_le_bytes());
        raw[40..44].copy_from_slice(&1u32.to_le_bytes());
        raw[56] = 1;
        let c = BlkConfig::from_bytes(&raw).unwrap();
        assert_eq!(c.capacity, 131072);
        assert_eq!(c.seg_max, 126);
        assert_eq!(c.blk_size, 512);
        assert!(c.writeback);
        assert_eq!(c.num_queues, 2);
        assert_eq!(c.max_discard_seg, 1);
        assert!(c.write_zeroes_may_unmap);
        assert_eq!(BlkConfig::from_bytes(&raw[..10]), None);
    }

    #[test]
    fn handles_can_move_to_worker_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Driver>();
        assert_send::<DriverQueue>();
    }

    #[test]
    fn page_size_is_a_power_of_two() {
        assert!(page_size().is_power_of_two());
    }
}
