//! DMA for a VFIO device: an IOVA space the driver manages, memory the driver allocates for the
//! device (rings, PRP lists, Identify pages), and memory others own that the device reaches
//! without copies (guest RAM, a target's buffer pool).
//!
//! IOVAs are not process addresses: they come from [`IovaSpace`], which starts above 4 GiB (clear
//! of the x86 MSI window at 0xfee00000), skips whatever the IOMMU group reserves (sysfs) and all
//! PCI memory (bridge windows and BARs, [`pci_windows`]), and stays below 2^39, the smallest
//! address width an IOMMU of interest offers. Every mapping of
//! outside memory is recorded in a table the I/O queues translate iovecs through; memory that is
//! not in it is refused before a command is built, never sent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vfio_ioctls::VfioContainer;

/// Lowest IOVA handed out.
const IOVA_BASE: u64 = 1 << 32;
/// One past the highest IOVA handed out (39-bit IOMMU address width).
const IOVA_END: u64 = 1 << 39;
/// Mappings at least this large are aligned to it, so an IOMMU may use large pages.
const LARGE: u64 = 2 << 20;

/// Free IOVA ranges, first fit.
#[derive(Debug)]
pub struct IovaSpace {
    /// start → length of each free range; ranges never touch (freed neighbours merge).
    free: BTreeMap<u64, u64>,
}

impl IovaSpace {
    /// `[IOVA_BASE, IOVA_END)` minus `reserved` (inclusive start, inclusive end pairs).
    pub fn new(reserved: &[(u64, u64)]) -> Self {
        let mut s = IovaSpace {
            free: BTreeMap::from([(IOVA_BASE, IOVA_END - IOVA_BASE)]),
        };
        for &(a, b) in reserved {
            s.carve(a, b.saturating_add(1));
        }
        s
    }

    /// Removes `[a, b)` from the free ranges.
    fn carve(&mut self, a: u64, b: u64) {
        let hit: Vec<(u64, u64)> = self
            .free
            .iter()
            .filter(|(&s, &l)| s < b && a < s + l)
            .map(|(&s, &l)| (s, l))
            .collect();
        for (s, l) in hit {
            self.free.remove(&s);
            if s < a {
                self.free.insert(s, a - s);
            }
            if s + l > b {
                self.free.insert(b, s + l - b);
            }
        }
    }

    /// A free range of `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let (start, flen, at) = self.free.iter().find_map(|(&s, &l)| {
            let at = s.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(len)? <= s + l).then_some((s, l, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + len < start + flen {
            self.free.insert(at + len, start + flen - at - len);
        }
        Some(at)
    }

    /// Returns `[at, at + len)`, merging it with free neighbours.
    pub fn release(&mut self, at: u64, len: u64) {
        let (mut s, mut l) = (at, len);
        if let Some((&ps, &pl)) = self.free.range(..at).next_back() {
            if ps + pl == at {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(at + len)) {
            self.free.remove(&(at + len));
            l += nl;
        }
        self.free.insert(s, l);
    }
}

/// The reserved IOVA ranges of IOMMU group `group` (its sysfs `reserved_regions`: "start end
/// type" per line, inclusive, hex).
pub fn reserved_regions(group: u32) -> Vec<(u64, u64)> {
    let path = format!("/sys/kernel/iommu_groups/{group}/reserved_regions");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let a = u64::from_str_radix(w.next()?.trim_start_matches("0x"), 16).ok()?;
            let b = u64::from_str_radix(w.next()?.trim_start_matches("0x"), 16).ok()?;
            Some((a, b))
        })
        .collect()
}

/// Physical address ranges of PCI memory (host bridge windows from /proc/iomem, every device's
/// BARs from sysfs), which IOVAs must avoid: a device's DMA to an address in a BAR may be routed
/// to that BAR (peer to peer) instead of through the IOMMU, and QEMU's NVMe controller refuses
/// DMA into its own BAR0 outright. Linux's DMA API reserves the same ranges.
pub fn pci_windows() -> Vec<(u64, u64)> {
    let mut out = parse_iomem(&std::fs::read_to_string("/proc/iomem").unwrap_or_default());
    if let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") {
        for d in dir.flatten() {
            let text = std::fs::read_to_string(d.path().join("resource")).unwrap_or_default();
            out.extend(parse_resources(&text));
        }
    }
    out
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// "start-end : PCI Bus ..." lines of /proc/iomem (addresses show as zeros without root: then
/// nothing is gained, and the BARs from sysfs still count).
fn parse_iomem(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter(|l| l.contains("PCI Bus"))
        .filter_map(|l| {
            let (a, b) = l.split(':').next()?.trim().split_once('-')?;
            let (a, b) = (hex(a)?, hex(b)?);
            (b > a).then_some((a, b))
        })
        .collect()
}

/// "start end flags" lines of a PCI device's sysfs `resource` file.
fn parse_resources(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (a, b) = (hex(w.next()?)?, hex(w.next()?)?);
            (a != 0 && b > a).then_some((a, b))
        })
        .collect()
}

/// One mapping of outside memory: process range → IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Process address.
    pub host: usize,
    /// Length in bytes.
    pub len: usize,
    /// Device address of `host`.
    pub iova: u64,
}

/// A table of mappings, sorted by process address.
#[derive(Debug, Default, Clone)]
pub struct Table(Vec<Mapping>);

impl Table {
    /// The device address of `host .. host + len`, if it lies inside one mapping.
    pub fn iova(&self, host: usize, len: usize) -> Option<u64> {
        let i = self.0.partition_point(|m| m.host <= host);
        let m = self.0.get(i.checked_sub(1)?)?;
        let off = host - m.host;
        (off.checked_add(len)? <= m.len).then(|| m.iova + off as u64)
    }
}

/// A device's DMA: its container, its IOVA space and the table of outside memory it may reach.
pub struct Dma {
    container: Arc<VfioContainer>,
    iovas: Mutex<IovaSpace>,
    table: RwLock<Arc<Table>>,
    /// Bumped whenever `table` changes, so queues re-read it only then.
    gen: AtomicU64,
    page: usize,
    /// The device is gone: unmapping is pointless (and fails), IOVAs are simply dropped.
    dead: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dma").field("gen", &self.gen).finish()
    }
}

/// Rounds `len` up to a multiple of `page` (a power of two).
fn round_up(len: usize, page: usize) -> Option<usize> {
    Some(len.checked_add(page - 1)? & !(page - 1))
}

impl Dma {
    /// DMA through `container`, avoiding `reserved` IOVAs.
    pub fn new(container: Arc<VfioContainer>, reserved: &[(u64, u64)]) -> Arc<Self> {
        Arc::new(Dma {
            container,
            iovas: Mutex::new(IovaSpace::new(reserved)),
            table: RwLock::new(Arc::new(Table::default())),
            gen: AtomicU64::new(0),
            page: crate::mem::page_size(),
            dead: false.into(),
        })
    }

    /// Marks the device gone: later unmaps only forget their IOVAs.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
    }

    /// The current table and its generation.
    pub fn table(&self) -> (Arc<Table>, u64) {
        // Generation first: a table read after it is at least that new.
        let gen = self.gen.load(Ordering::Acquire);
        let t = self
            .table
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        (t, gen)
    }

    /// The table's generation (one atomic load: queues call it per request).
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Maps `len` bytes at `host` for the device at a fresh IOVA.
    ///
    /// # Safety
    /// `host .. host + len` must stay mapped in this process until the IOVA is unmapped, and is
    /// from now on read and written by the device: nothing may hold a Rust reference to it.
    unsafe fn map(&self, host: *mut u8, len: usize) -> std::io::Result<u64> {
        let align = if len as u64 >= LARGE {
            LARGE
        } else {
            self.page as u64
        };
        let iova = self
            .iovas
            .lock()
            .map_err(|_| std::io::Error::other("IOVA allocator poisoned"))?
            .alloc(len as u64, align)
            .ok_or_else(|| {
                std::io::Error::other(format!("no free IOVA range of {len} bytes below 2^39"))
            })?;
        // SAFETY: forwarded from the caller.
        if let Err(e) = unsafe { self.container.vfio_dma_map(iova, len, host) } {
            self.free_iova(iova, len);
            return Err(std::io::Error::other(format!(
                "VFIO DMA map of {len} bytes at IOVA {iova:#x}: {e}"
            )));
        }
        Ok(iova)
    }

    fn free_iova(&self, iova: u64, len: usize) {
        if let Ok(mut s) = self.iovas.lock() {
            s.release(iova, len as u64);
        }
    }

    fn unmap(&self, iova: u64, len: usize) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.container.vfio_dma_unmap(iova, len) {
            // The device may be gone (hot-remove): the IOVA is then dead anyway, but not reused.
            log::warn!("VFIO DMA unmap of {len} bytes at IOVA {iova:#x}: {e}");
            return;
        }
        self.free_iova(iova, len);
    }

    /// Makes `len` bytes of outside memory at `host` reachable by the device until the returned
    /// mapping drops; queues translate iovecs in it from then on.
    ///
    /// # Safety
    /// As for the private `map`: the memory stays mapped in this process while the returned
    /// value lives, and is accessed only through raw pointers (it is shared with the device).
    pub unsafe fn map_outside(
        self: &Arc<Self>,
        host: *mut u8,
        len: usize,
    ) -> std::io::Result<DmaMapping> {
        let page = self.page;
        let start = host as usize & !(page - 1);
        let len = round_up(host as usize - start + len, page)
            .ok_or_else(|| std::io::Error::other("mapping length overflows"))?;
        // SAFETY: forwarded from the caller (rounding to pages covers only memory of the same
        // mappings: the caller's range is page aligned in practice, guest RAM and pools are).
        let iova = unsafe { self.map(start as *mut u8, len)? };
        let m = Mapping {
            host: start,
            len,
            iova,
        };
        self.edit(|t| {
            let i = t.0.partition_point(|x| x.host < m.host);
            t.0.insert(i, m);
        });
        Ok(DmaMapping {
            dma: self.clone(),
            m,
        })
    }

    fn edit(&self, f: impl FnOnce(&mut Table)) {
        let mut g = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut t = (**g).clone();
        f(&mut t);
        *g = Arc::new(t);
        self.gen.fetch_add(1, Ordering::Release);
    }

    /// Allocates `len` bytes (rounded up to pages) of zeroed memory the device reaches.
    pub fn alloc(self: &Arc<Self>, len: usize) -> std::io::Result<DmaBuf> {
        let len = round_up(len.max(1), self.page)
            .ok_or_else(|| std::io::Error::other("DMA buffer length overflows"))?;
        let mem = crate::mem::Anon::new_for_dma(len)?;
        // SAFETY: `mem` is a fresh mapping owned by the DmaBuf below, which unmaps the IOVA
        // before the memory goes; no reference to it is ever made.
        let iova = unsafe { self.map(mem.ptr(), len)? };
        Ok(DmaBuf {
            dma: self.clone(),
            mem,
            iova,
        })
    }
}

/// Outside memory mapped for the device (see [`Dma::map_outside`]); unmapped on drop.
pub struct DmaMapping {
    dma: Arc<Dma>,
    m: Mapping,
}

impl std::fmt::Debug for DmaMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.m.fmt(f)
    }
}

impl DmaMapping {
    /// The device address of process address `host` inside the mapping.
    pub fn iova_of(&self, host: usize) -> u64 {
        self.m.iova + (host - self.m.host) as u64
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        let m = self.m;
        // Out of the table first: no request built from now on uses it.
        self.dma.edit(|t| t.0.retain(|x| *x != m));
        self.dma.unmap(m.iova, m.len);
    }
}

/// Memory the driver allocated for the device: zeroed, page aligned, contiguous in IOVA space.
/// Accessed only through raw pointers (the device reads and writes it).
pub struct DmaBuf {
    dma: Arc<Dma>,
    /// Unmapped after the IOVA (field order: `Drop` unmaps the IOVA first).
    mem: crate::mem::Anon,
    iova: u64,
}

impl DmaBuf {
    /// Process address of the first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.mem.ptr()
    }
    /// Device address of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Zeroes the buffer (volatile: the device may look at it).
    pub fn zero(&self) {
        for i in 0..self.mem.len() / 8 {
            // SAFETY: in bounds (len is a multiple of 8) and 8-byte aligned (page aligned base).
            unsafe { self.ptr().cast::<u64>().add(i).write_volatile(0) };
        }
    }
    /// Copies `out.len()` bytes from offset `at` (clamped to the buffer).
    pub fn read(&self, at: usize, out: &mut [u8]) {
        let n = out.len().min(self.mem.len().saturating_sub(at));
        // SAFETY: `at + n <= len`; the device does not write this buffer while the caller reads
        // it (command data is read after its completion).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().add(at), out.as_mut_ptr(), n) };
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // The device loses the memory first; `mem` then unmaps it.
        self.dma.unmap(self.iova, self.mem.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iova_space_avoids_reserved_ranges_and_merges() {
        let mut s = IovaSpace::new(&[(0xfee0_0000, 0xfeef_ffff), (0x1_0000_0000, 0x1_0000_0fff)]);
        let a = s.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(a, 0x1_0000_1000, "the reserved page at 4 GiB is skipped");
        let b = s.alloc(4 << 20, 2 << 20).unwrap();
        assert_eq!(b % (2 << 20), 0);
        assert!(b >= a + 0x1000);
        s.release(a, 0x1000);
        s.release(b, 4 << 20);
        assert_eq!(s.free.len(), 1, "freed ranges merge back: {:?}", s.free);
        assert_eq!(s.alloc(IOVA_END, 0x1000), None);
    }

    #[test]
    fn pci_ranges_are_read_from_iomem_and_sysfs() {
        let iomem = "00000000-00000fff : Reserved\nc0001000-eebfffff : PCI Bus 0000:00\n  \
                     eec00000-eecfffff : PCI Bus 0000:00\n4000000000-7fffffffff : PCI Bus 0000:00\n";
        assert_eq!(
            parse_iomem(iomem),
            [
                (0xc000_1000, 0xeebf_ffff),
                (0xeec0_0000, 0xeecf_ffff),
                (0x40_0000_0000, 0x7f_ffff_ffff)
            ]
        );
        let res = "0x0000000100000000 0x0000000100003fff 0x0000000000140204\n\
                   0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        assert_eq!(parse_resources(res), [(0x1_0000_0000, 0x1_0000_3fff)]);
        let mut s = IovaSpace::new(&parse_resources(res));
        assert!(
            s.alloc(0x1000, 0x1000).unwrap() >= 0x1_0000_4000,
            "a BAR at 4 GiB is avoided"
        );
    }

    #[test]
    fn table_translates_only_inside_one_mapping() {
        let t = Table(vec![
            Mapping {
                host: 0x10_0000,
                len: 0x2000,
                iova: 0x1_0000_0000,
            },
            Mapping {
                host: 0x40_0000,
                len: 0x1000,
                iova: 0x2_0000_0000,
            },
        ]);
        assert_eq!(t.iova(0x10_0800, 0x100), Some(0x1_0000_0800));
        assert_eq!(t.iova(0x10_1f00, 0x100), Some(0x1_0000_1f00));
        assert_eq!(t.iova(0x10_1f00, 0x101), None, "runs past the end");
        assert_eq!(t.iova(0xf_ffff, 1), None);
        assert_eq!(t.iova(0x40_0000, 0x1000), Some(0x2_0000_0000));
        assert_eq!(t.iova(0x30_0000, 1), None);
        assert_eq!(t.iova(usize::MAX, 2), None);
    }
}
