//! An NVMe controller's registers (NVM Express over PCIe, BAR0) and the barriers device memory
//! needs.
//!
//! Ordering with a device is not ordering between threads: the device sees ring memory through
//! DMA and the doorbells through MMIO. Before a doorbell write every earlier write to ring memory
//! must reach the device (`dma_wmb`, Linux's `writel` barrier), and after seeing a completion's
//! phase tag the rest of the entry must be read after it (`dma_rmb`). On x86 both are compiler
//! barriers only (stores are not reordered with each other, loads not with each other); on Arm
//! they are `dmb oshst` and `dmb oshld`, outer shareable because the device is not in the inner
//! shareable domain. Other targets get SeqCst fences, which are only CPU barriers: a port there
//! must add its architecture's I/O barriers.

use leap_queues::ring::{CqSlots, DoorbellReg, RawSlots, Slots};
use leap_queues::sync::Ordering;
use leap_queues::Cqe;
use std::sync::Arc;

/// Register offsets.
pub mod reg {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue Base Address (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue Base Address (64-bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell.
    pub const DOORBELLS: usize = 0x1000;
}

/// CSTS bits.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown status (2 bits): 0b10 = complete.
    pub const SHST_MASK: u32 = 3 << 2;
    /// Shutdown complete.
    pub const SHST_DONE: u32 = 2 << 2;
}

/// Orders earlier writes to DMA memory before a later MMIO write.
#[inline]
pub fn dma_wmb() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction; no memory is accessed.
    unsafe {
        core::arch::asm!("dmb oshst", options(nostack, preserves_flags))
    };
    #[cfg(target_arch = "x86_64")]
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Orders a read of DMA memory (a phase tag) before later reads of DMA memory.
#[inline]
pub fn dma_rmb() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction; no memory is accessed.
    unsafe {
        core::arch::asm!("dmb oshld", options(nostack, preserves_flags))
    };
    #[cfg(target_arch = "x86_64")]
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// BAR0 mapped into this process (unmapped on drop).
pub struct Bar {
    base: *mut u8,
    /// Bytes accessible: the mapping's length, 0 once revoked.
    len: std::sync::atomic::AtomicUsize,
    mapped: usize,
}

// SAFETY: MMIO registers are accessed with volatile 32-bit operations from any thread; the
// driver serialises what must be serialised (admin registers under the controller's lock, each
// doorbell by its queue's owner).
unsafe impl Send for Bar {}
// SAFETY: as for Send.
unsafe impl Sync for Bar {}

impl Bar {
    /// Takes ownership of a mapping of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base .. base + len` is a mapping of the device's BAR0 made with mmap, owned by the
    /// returned value (it unmaps it on drop).
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        Bar {
            base,
            len: len.into(),
            mapped: len,
        }
    }

    /// Length of the mapping (0 once revoked).
    pub fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Unmaps the BAR now (a device being handed back must not stay mapped); later reads give
    /// all ones and writes are ignored.
    ///
    /// # Safety
    /// No other thread may be inside a register access: the driver calls this only after every
    /// user of the BAR has been stopped under its lock.
    pub unsafe fn revoke(&self) {
        if self.len.swap(0, std::sync::atomic::Ordering::AcqRel) != 0 {
            // SAFETY: the mapping made at construction; nobody accesses it (caller).
            unsafe { libc::munmap(self.base.cast(), self.mapped) };
        }
    }

    fn at(&self, off: usize) -> Option<*mut u32> {
        (off % 4 == 0 && off.checked_add(4)? <= self.len())
            // SAFETY: in bounds of the mapping (checked).
            .then(|| unsafe { self.base.add(off) }.cast::<u32>())
    }

    /// Reads a 32-bit register; all ones if `off` is outside the BAR (as a removed device
    /// reads).
    pub fn read32(&self, off: usize) -> u32 {
        match self.at(off) {
            // SAFETY: an aligned register inside the mapping; volatile because it is MMIO.
            Some(p) => u32::from_le(unsafe { p.read_volatile() }),
            None => u32::MAX,
        }
    }

    /// Writes a 32-bit register (ignored outside the BAR).
    pub fn write32(&self, off: usize, v: u32) {
        if let Some(p) = self.at(off) {
            // SAFETY: an aligned register inside the mapping; volatile because it is MMIO.
            unsafe { p.write_volatile(v.to_le()) }
        }
    }

    /// Reads a 64-bit register as two 32-bit reads, low half first (PCIe controllers accept
    /// both; two halves work everywhere).
    pub fn read64(&self, off: usize) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }

    /// Writes a 64-bit register as two 32-bit writes, low half first.
    pub fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: nothing else holds the Bar (no doorbell outlives it: they hold an Arc<Bar>).
        unsafe { self.revoke() };
    }
}

/// A doorbell register in BAR0. A store writes the register after a DMA write barrier; a load
/// reads nothing from the device (doorbells are write-only) and answers 0: no ring reads it.
pub struct MmioDoorbell {
    bar: Arc<Bar>,
    off: usize,
}

impl MmioDoorbell {
    /// Doorbell `index` (2 × qid for an SQ tail, 2 × qid + 1 for a CQ head) with stride
    /// `4 << dstrd`, or `None` if it lies outside the BAR.
    pub fn new(bar: Arc<Bar>, index: usize, dstrd: u32) -> Option<Self> {
        let off = index
            .checked_mul(4usize.checked_shl(dstrd)?)?
            .checked_add(reg::DOORBELLS)?;
        (off.checked_add(4)? <= bar.len()).then_some(MmioDoorbell { bar, off })
    }
}

impl DoorbellReg for MmioDoorbell {
    fn load(&self, _order: Ordering) -> u32 {
        // Never asked: the producer of a device SQ reads its head from completions, and a CQ
        // consumer only stores.
        0
    }
    fn store(&self, v: u32, _order: Ordering) {
        // The ring's Release is for threads; the device needs the DMA barrier.
        dma_wmb();
        self.bar.write32(self.off, v);
    }
}

/// Completion queue memory written by a device: [`RawSlots`] plus a DMA read barrier after each
/// status (phase tag) load, so the rest of the entry is read after the phase is seen.
#[derive(Clone, Copy, Debug)]
pub struct DeviceCq(pub RawSlots<Cqe>);

// SAFETY: forwards to `RawSlots`, which upholds the contract.
unsafe impl Slots<Cqe> for DeviceCq {
    fn len(&self) -> usize {
        self.0.len()
    }
    unsafe fn read(&self, i: usize) -> Cqe {
        // SAFETY: same contract as the callee.
        unsafe { self.0.read(i) }
    }
    unsafe fn write(&self, i: usize, v: Cqe) {
        // SAFETY: same contract as the callee.
        unsafe { self.0.write(i, v) }
    }
}

// SAFETY: forwards to `RawSlots`; the added barrier only strengthens the ordering.
unsafe impl CqSlots for DeviceCq {
    unsafe fn load_status(&self, i: usize, order: Ordering) -> u16 {
        // SAFETY: same contract as the callee.
        let s = unsafe { self.0.load_status(i, order) };
        dma_rmb();
        s
    }
    unsafe fn store_status(&self, i: usize, v: u16, order: Ordering) {
        // SAFETY: same contract as the callee.
        unsafe { self.0.store_status(i, v, order) }
    }
    unsafe fn write_body(&self, i: usize, v: &Cqe) {
        // SAFETY: same contract as the callee.
        unsafe { self.0.write_body(i, v) }
    }
}
