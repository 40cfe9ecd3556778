//! A userspace NVMe driver over VFIO: one namespace of a PCIe NVMe controller as a Leap disk.
//!
//! The controller is opened through its IOMMU group (vfio-ioctls), BAR0 is mapped, bus mastering
//! enabled, and the controller reset and enabled with an admin queue. Each poller gets an I/O
//! queue pair of its own (Create I/O CQ/SQ), driven through the `leap-queues` rings with MMIO
//! doorbells; completions are found by their phase tag, and the SQ head is taken from each
//! completion. Commands pass through as the front end sent them (renumbered: command identifier
//! and NSID), with their data pointer rewritten to device addresses of the caller's own memory:
//! guest RAM and buffer pools are DMA-mapped by whoever owns them ([`Backend::map_dma`]), so the
//! SSD reads and writes them with no copy. Memory that is not mapped is refused before a command
//! is built.
//!
//! | file | what |
//! |---|---|
//! | `pci.rs` | VFIO device, BAR0, bus master, MSI-X and hot-remove eventfds, clear errors |
//! | `dma.rs` | IOVA space, driver-owned DMA buffers, mappings of outside memory |
//! | `regs.rs` | registers, MMIO doorbells, DMA barriers, device CQ slots |
//! | `ctrl.rs` | bring-up, admin queue, queue creation, watchdog: Abort, reset, failure |
//! | `queue.rs` | the I/O queue: PRP/SGL building, submission, completion |

mod ctrl;
mod dma;
mod pci;
mod queue;
mod regs;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::ident::namespace_info;
use super::{Backend, BackendError, BackendQueue, DiskInfo, DmaGuard};
pub use ctrl::{CtrlOptions, VfioStats};
pub use pci::check_bdf;
pub use queue::VfioQueue;

/// Bytes of PRP list (or SGL, or Dataset Management ranges) each queue slot has: 512 PRP
/// entries, 256 SGL descriptors or 256 ranges. 4 KiB aligned, so a list never crosses a memory
/// page of the controller's, whatever the host's page size.
pub(crate) const LIST_BYTES: usize = 4096;

/// How to open a VFIO disk.
#[derive(Clone, Debug)]
pub struct VfioOptions {
    /// PCI address, e.g. 0000:01:00.0.
    pub bdf: String,
    /// Namespace (default 1).
    pub nsid: u32,
    /// I/O queues to ask the controller for (one per poller that uses the disk).
    pub queues: u16,
    /// Entries per I/O queue.
    pub depth: u32,
    /// Command timeout: then Abort; twice that and the controller is reset.
    pub io_timeout: Duration,
}

impl VfioOptions {
    /// Defaults for `bdf`: namespace 1, 8 queues of 256 entries, 30 s timeout.
    pub fn new(bdf: &str) -> Self {
        VfioOptions {
            bdf: bdf.to_string(),
            nsid: 1,
            queues: 8,
            depth: 256,
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// One namespace of an NVMe controller driven from userspace.
pub struct VfioBackend {
    ctrl: Arc<ctrl::Ctrl>,
    info: DiskInfo,
    opts: VfioOptions,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for VfioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioBackend")
            .field("bdf", &self.opts.bdf)
            .field("nsid", &self.opts.nsid)
            .finish()
    }
}

impl VfioBackend {
    /// Opens the controller, identifies the namespace and starts the watchdog.
    pub fn open(opts: VfioOptions) -> Result<VfioBackend, BackendError> {
        let name = format!("vfio:{}/{}", opts.bdf, opts.nsid);
        let c = ctrl::Ctrl::open(
            &opts.bdf,
            &CtrlOptions {
                queues: opts.queues.max(1),
                io_timeout: opts.io_timeout,
            },
        )?;
        let nn = c.ident.nn;
        if opts.nsid == 0 || opts.nsid > nn {
            return Err(BackendError::Invalid(format!(
                "{name}: the controller has namespaces 1 to {nn}"
            )));
        }
        let idn = c
            .identify_namespace(opts.nsid)
            .map_err(|e| BackendError::Invalid(format!("{name}: {e}")))?;
        // MDTS is in units of the minimum page size; one slot's PRP list bounds a command too.
        let page = c.page;
        let mpsmin = c.page_min;
        let by_list = page.saturating_mul((LIST_BYTES / 8) as u32);
        let max = match c.ident.max_transfer(mpsmin) {
            0 => by_list,
            m => m.min(by_list),
        };
        let info = namespace_info(&c.ident, &idn, &name, opts.nsid, max)?;
        log::info!(
            "{name}: {} bytes in {}-byte blocks, transfers up to {max} bytes",
            info.size,
            info.block_size
        );
        let w = c.clone();
        let watchdog = std::thread::Builder::new()
            .name("leap-vfio-watch".into())
            .spawn(move || w.watch())
            .map_err(|e| BackendError::Io {
                what: "cannot start the watchdog for",
                path: name.clone(),
                source: e,
            })?;
        Ok(VfioBackend {
            ctrl: c,
            info,
            opts,
            watchdog: Some(watchdog),
        })
    }

    /// Resets the controller now (re-creating every queue and resubmitting what was in flight).
    pub fn reset(&self) -> Result<(), String> {
        self.ctrl.reset("asked to")
    }

    /// The driver's counters.
    pub fn stats(&self) -> &VfioStats {
        &self.ctrl.stats
    }

    /// I/O queues the controller granted.
    pub fn queues(&self) -> u16 {
        self.ctrl.granted()
    }
}

impl Backend for VfioBackend {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
        let entries = (depth.min(self.opts.depth as usize) as u32).saturating_add(1);
        queue::VfioQueue::open(self.ctrl.clone(), self.opts.nsid, entries)
            .map(|q| Box::new(q) as Box<dyn BackendQueue>)
            .map_err(|e| BackendError::Invalid(format!("vfio:{}: {e}", self.opts.bdf)))
    }

    fn kind(&self) -> &'static str {
        "vfio"
    }

    fn nvme_native(&self) -> bool {
        true
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.ctrl.stats;
        [
            ("timeouts", &s.timeouts),
            ("aborts", &s.aborts),
            ("resets", &s.resets),
            ("resubmitted", &s.resubmitted),
            ("unmapped", &s.unmapped),
            ("unaligned", &s.unaligned),
            ("bad_completions", &s.bad_completions),
            ("failed", &s.failed),
        ]
        .into_iter()
        .map(|(n, c)| (n, c.load(Ordering::Relaxed)))
        .collect()
    }

    unsafe fn map_dma(&self, host: *mut u8, len: usize) -> Result<Option<DmaGuard>, BackendError> {
        // SAFETY: forwarded from the caller.
        let m = unsafe { self.ctrl.dma.map_outside(host, len) }.map_err(|e| BackendError::Io {
            what: "cannot map memory for DMA by",
            path: format!("vfio:{}", self.opts.bdf),
            source: e,
        })?;
        Ok(Some(DmaGuard::new(m.iova_of(host as usize), Box::new(m))))
    }
}

impl Drop for VfioBackend {
    fn drop(&mut self) {
        self.ctrl.stop.store(true, Ordering::Release);
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
        self.ctrl.shutdown();
    }
}
