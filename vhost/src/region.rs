//! The guest memory of one vhost-user memory table, checked before anything is mapped.
//!
//! Each region arrives as (guest address, size, front-end virtual address, file offset) with a
//! file descriptor. A region is refused, and the whole table with it, unless its arithmetic does
//! not overflow, its offset is page aligned, its file is a regular file (memfd, tmpfs, hugetlbfs)
//! that covers `offset + size` bytes (a mapping past the end of a file raises SIGBUS on first
//! access), its ranges overlap no other region in either address space, and the mapping succeeds.
//! Only then does the table replace the previous one, so a refused table leaves the device as it
//! was.

use leap_runtime::window::{compose_soc, GuestRange, Window};
use leap_runtime::{AddressSpace, Region as AsRegion};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// A file through which the SoC reaches a window: offset 0 is SoC address `soc`, and `len`
/// bytes are mappable.
pub struct WindowFile {
    /// The file (a BAR's sysfs `resourceN`, or any file in tests).
    pub file: File,
    /// SoC address of offset 0.
    pub soc: u64,
    /// Mappable bytes.
    pub len: u64,
}

/// The most regions a table may have (vhost-user's limit without CONFIGURE_MEM_SLOTS).
pub const MAX_REGIONS: usize = 8;

/// The page size at run time.
pub fn page_size() -> u64 {
    leap_runtime::mem::page_size() as u64
}

/// Why a memory table (or one of its regions) was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// A region's numbers are inconsistent.
    #[error("memory region {index}: {why}")]
    Region {
        /// Region index in the message.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The regions overlap.
    #[error("memory regions {0} and {1} overlap")]
    Overlap(usize, usize),
    /// More regions than allowed, or not one file per region.
    #[error("memory table: {0}")]
    Table(String),
}

/// Checks that `file` is a regular file with at least `offset + len` bytes.
pub fn check_file_covers(file: &File, offset: u64, len: u64) -> Result<(), String> {
    let st = nix::sys::stat::fstat(file.as_fd()).map_err(|e| format!("fstat: {e}"))?;
    let kind =
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT;
    if kind != nix::sys::stat::SFlag::S_IFREG {
        return Err("the file descriptor is not a regular file (memfd, tmpfs or hugetlbfs)".into());
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| format!("offset {offset:#x} + size {len:#x} overflows"))?;
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if end > size {
        return Err(format!(
            "offset {offset:#x} + size {len:#x} lies past the end of its file ({size:#x} bytes)"
        ));
    }
    Ok(())
}

/// One mapped memory table.
#[derive(Clone)]
pub struct MemoryTable {
    /// The mappings, as vm-memory sees them (virtqueue access).
    pub mem: Arc<GuestMemoryMmap>,
    /// The same regions for the runtime (command data).
    pub aspace: Arc<AddressSpace>,
    /// (front-end virtual address, size, guest address) per region, for ring addresses.
    frontend: Vec<(u64, u64, u64)>,
}

impl MemoryTable {
    /// No memory (before the first table).
    pub fn empty() -> Self {
        MemoryTable {
            mem: Arc::new(GuestMemoryMmap::new()),
            aspace: Arc::new(AddressSpace::empty()),
            frontend: Vec::new(),
        }
    }

    /// Whether a table has been set.
    pub fn is_empty(&self) -> bool {
        self.aspace.regions().is_empty()
    }

    /// Guest memory seen through windows (leapd on a SoC): the guest table and windows the host
    /// agent describes, composed (`leap_runtime::window::compose_soc`: every entry page aligned,
    /// every guest byte reachable, nothing overlapping), and each piece mapped from the window
    /// file that holds its SoC addresses (a BAR's sysfs resource file; in tests, the tenant's RAM
    /// file itself). The device address of each region is its SoC address. Ring addresses come
    /// as guest addresses from the agent, so there is no front-end address table.
    pub fn from_window(
        guest: &[GuestRange],
        windows: &[Window],
        files: &[WindowFile],
    ) -> Result<Self, MemError> {
        let page = page_size();
        let pieces =
            compose_soc(guest, windows, page).map_err(|e| MemError::Table(e.to_string()))?;
        if pieces.is_empty() {
            return Err(MemError::Table("no guest memory".into()));
        }
        let mut mapped = Vec::with_capacity(pieces.len());
        let mut table = Vec::with_capacity(pieces.len());
        for (index, p) in pieces.iter().enumerate() {
            let bad = |why: String| MemError::Region { index, why };
            let f = files
                .iter()
                .find(|f| p.soc >= f.soc && p.soc - f.soc + p.len <= f.len)
                .ok_or_else(|| {
                    bad(format!(
                        "SoC addresses {:#x}+{:#x} are in no window file",
                        p.soc, p.len
                    ))
                })?;
            let offset = p.soc - f.soc;
            // The window file must really hold those bytes (a mapping past its end would SIGBUS).
            check_file_covers(&f.file, offset, p.len).map_err(bad)?;
            let len = usize::try_from(p.len).map_err(|_| bad("too large".into()))?;
            let file = f.file.try_clone().map_err(|e| bad(format!("dup: {e}")))?;
            let region = GuestRegionMmap::<()>::from_range(
                GuestAddress(p.guest),
                len,
                Some(FileOffset::new(file, offset)),
            )
            .map_err(|e| bad(format!("mmap of the window at {offset:#x}: {e}")))?;
            table.push(AsRegion {
                guest: p.guest,
                len: p.len,
                host: region.as_ptr() as usize,
                device: p.soc,
            });
            mapped.push(region);
        }
        let mem = Arc::new(
            GuestMemoryMmap::from_regions(mapped)
                .map_err(|e| MemError::Table(format!("regions: {e}")))?,
        );
        let keep: Arc<dyn std::any::Any + Send + Sync> = mem.clone();
        let aspace =
            AddressSpace::new(table, Some(keep)).map_err(|e| MemError::Table(e.to_string()))?;
        Ok(MemoryTable {
            mem,
            aspace: Arc::new(aspace),
            frontend: Vec::new(),
        })
    }

    /// Checks and maps a table.
    pub fn build(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, MemError> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(MemError::Table(format!(
                "{} regions (1 to {MAX_REGIONS} allowed)",
                regions.len()
            )));
        }
        if files.len() != regions.len() {
            return Err(MemError::Table(format!(
                "{} file descriptors for {} regions",
                files.len(),
                regions.len()
            )));
        }
        let page = page_size();
        for (index, r) in regions.iter().enumerate() {
            let bad = |why: String| MemError::Region { index, why };
            // Copies: the message struct is packed.
            let (size, gpa, ua, offset) =
                (r.memory_size, r.guest_phys_addr, r.user_addr, r.mmap_offset);
            if size == 0 {
                return Err(bad("size 0".into()));
            }
            for (what, start) in [
                ("guest address", gpa),
                ("user address", ua),
                ("offset", offset),
            ] {
                if start.checked_add(size).is_none() {
                    return Err(bad(format!("{what} {start:#x} + size {size:#x} overflows")));
                }
            }
            if offset % page != 0 {
                return Err(bad(format!(
                    "offset {offset:#x} is not a multiple of the page size ({page:#x})"
                )));
            }
            if usize::try_from(size).is_err() {
                return Err(bad(format!("size {size:#x} does not fit in memory")));
            }
            check_file_covers(&files[index], offset, size).map_err(bad)?;
        }
        for i in 0..regions.len() {
            for j in i + 1..regions.len() {
                let (a, b) = (&regions[i], &regions[j]);
                let overlap = |s1: u64, s2: u64| s1 < s2 + b.memory_size && s2 < s1 + a.memory_size;
                if overlap(a.guest_phys_addr, b.guest_phys_addr)
                    || overlap(a.user_addr, b.user_addr)
                {
                    return Err(MemError::Overlap(i, j));
                }
            }
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (index, (r, file)) in regions.iter().zip(files).enumerate() {
            let region = GuestRegionMmap::<()>::from_range(
                GuestAddress(r.guest_phys_addr),
                r.memory_size as usize,
                Some(FileOffset::new(file, r.mmap_offset)),
            )
            .map_err(|e| MemError::Region {
                index,
                why: format!("mmap: {e}"),
            })?;
            mapped.push(region);
        }
        let mut table = Vec::with_capacity(mapped.len());
        for (r, m) in regions.iter().zip(&mapped) {
            table.push(AsRegion {
                guest: r.guest_phys_addr,
                len: r.memory_size,
                host: m.as_ptr() as usize,
                device: r.guest_phys_addr,
            });
        }
        let mem = Arc::new(
            GuestMemoryMmap::from_regions(mapped)
                .map_err(|e| MemError::Table(format!("regions: {e}")))?,
        );
        let keep: Arc<dyn std::any::Any + Send + Sync> = mem.clone();
        let aspace =
            AddressSpace::new(table, Some(keep)).map_err(|e| MemError::Table(e.to_string()))?;
        Ok(MemoryTable {
            mem,
            aspace: Arc::new(aspace),
            frontend: regions
                .iter()
                .map(|r| (r.user_addr, r.memory_size, r.guest_phys_addr))
                .collect(),
        })
    }

    /// Maps every region for `backend`'s DMA (a VFIO controller then reads and writes guest
    /// pages itself, with no copy); each region's device address becomes its IOVA, and the
    /// mappings live exactly as long as the returned table's address space, which I/O in flight
    /// holds. Back ends that do no DMA leave the table as it
    /// is. A mapping the IOMMU refuses refuses the whole table.
    pub fn map_for_dma(
        mut self,
        backend: &dyn leap_runtime::backend::Backend,
    ) -> Result<Self, MemError> {
        /// Unmaps (guards, first field) before the memory goes (second).
        struct Keep(
            #[allow(dead_code)] Vec<leap_runtime::backend::DmaGuard>,
            #[allow(dead_code)] Arc<GuestMemoryMmap>,
        );
        let mut guards = Vec::new();
        let mut table = self.aspace.regions().to_vec();
        for (index, r) in table.iter_mut().enumerate() {
            let len = usize::try_from(r.len).map_err(|_| MemError::Region {
                index,
                why: "too large".into(),
            })?;
            // SAFETY: the region is mapped by `self.mem`, which the new address space keeps
            // (after the guards, so the DMA mapping goes first); guest memory is only ever
            // accessed through raw pointers and volatile copies.
            match unsafe { backend.map_dma(r.host as *mut u8, len) } {
                Ok(Some(g)) => {
                    // The address space now gives the device address of each guest page.
                    r.device = g.iova();
                    guards.push(g);
                }
                Ok(None) => return Ok(self),
                Err(e) => {
                    return Err(MemError::Region {
                        index,
                        why: format!("DMA mapping for the disk's device: {e}"),
                    })
                }
            }
        }
        let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Keep(guards, self.mem.clone()));
        let aspace =
            AddressSpace::new(table, Some(keep)).map_err(|e| MemError::Table(e.to_string()))?;
        self.aspace = Arc::new(aspace);
        Ok(self)
    }

    /// The guest address of front-end virtual address `va`, if `va .. va + len` lies inside one
    /// region (vring addresses are front-end virtual addresses; a ring must not straddle two).
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        let end = va.checked_add(len)?;
        self.frontend
            .iter()
            .find(|&&(start, size, _)| va >= start && end <= start + size)
            .map(|&(start, _, gpa)| gpa + (va - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        let fd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let f = File::from(fd);
        f.set_len(len).unwrap();
        f
    }

    fn region(gpa: u64, size: u64, ua: u64, off: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, ua, off)
    }

    #[test]
    fn a_good_table_maps_and_translates_ring_addresses() {
        let p = page_size();
        let t = MemoryTable::build(
            &[
                region(0, 4 * p, 0x7000_0000, 0),
                region(1 << 32, 2 * p, 0x9000_0000, 4 * p),
            ],
            vec![memfd(4 * p), memfd(6 * p)],
        )
        .unwrap();
        assert_eq!(t.va_to_gpa(0x7000_0010, 16), Some(0x10));
        assert_eq!(t.va_to_gpa(0x9000_0000, p), Some(1 << 32));
        // Straddling the end of a region, or outside every region.
        assert_eq!(t.va_to_gpa(0x7000_0000 + 4 * p - 8, 16), None);
        assert_eq!(t.va_to_gpa(0x1000, 1), None);
        assert_eq!(t.va_to_gpa(u64::MAX, 2), None);
    }

    /// A back end with a device: records what it was asked to map, keeps a count of live
    /// mappings, and hands out IOVAs from 0x10_0000_0000.
    struct Dmaing(
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        leap_runtime::backend::DiskInfo,
    );
    impl leap_runtime::backend::Backend for Dmaing {
        fn info(&self) -> &leap_runtime::backend::DiskInfo {
            &self.1
        }
        fn open_queue(
            &self,
            _depth: usize,
        ) -> Result<Box<dyn leap_runtime::backend::BackendQueue>, leap_runtime::backend::BackendError>
        {
            Err(leap_runtime::backend::BackendError::Invalid(
                "no queues".into(),
            ))
        }
        fn kind(&self) -> &'static str {
            "dma"
        }
        unsafe fn map_dma(
            &self,
            _host: *mut u8,
            _len: usize,
        ) -> Result<Option<leap_runtime::backend::DmaGuard>, leap_runtime::backend::BackendError>
        {
            use std::sync::atomic::Ordering::SeqCst;
            struct Live(std::sync::Arc<std::sync::atomic::AtomicUsize>);
            impl Drop for Live {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, SeqCst);
                }
            }
            let n = self.0.fetch_add(1, SeqCst) as u64;
            Ok(Some(leap_runtime::backend::DmaGuard::new(
                0x10_0000_0000 + (n << 32),
                Box::new(Live(self.0.clone())),
            )))
        }
    }

    #[test]
    fn dma_mappings_give_device_addresses_and_live_with_the_address_space() {
        use leap_runtime::backend::Backend;
        use std::sync::atomic::Ordering::SeqCst;
        let p = page_size();
        let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let b = Dmaing(
            live.clone(),
            leap_runtime::backend::NullBackend::new(1 << 20, 512)
                .info()
                .clone(),
        );
        let t = MemoryTable::build(
            &[
                region(0, 4 * p, 0x7000_0000, 0),
                region(1 << 32, 2 * p, 0x9000_0000, 0),
            ],
            vec![memfd(4 * p), memfd(2 * p)],
        )
        .unwrap()
        .map_for_dma(&b)
        .unwrap();
        assert_eq!(live.load(SeqCst), 2, "one mapping per region");
        let mut dev = Vec::new();
        t.aspace
            .translate(8, 16, 4, |pc| dev.push(pc.device))
            .unwrap();
        t.aspace
            .translate((1 << 32) + p, 8, 4, |pc| dev.push(pc.device))
            .unwrap();
        assert_eq!(dev, [0x10_0000_0008, 0x11_0000_0000 + p]);
        // I/O in flight holds the address space: the mappings stay until it goes.
        let held = t.aspace.clone();
        drop(t);
        assert_eq!(live.load(SeqCst), 2);
        drop(held);
        assert_eq!(live.load(SeqCst), 0, "unmapped with the last user");
    }

    #[test]
    fn window_memory_is_the_tenant_memory() {
        use vm_memory::Bytes;
        let p = page_size();
        // The tenant's RAM file, which the SoC sees as a BAR at 0xc000_0000.
        let ram = memfd(16 * p);
        use std::os::unix::fs::FileExt;
        ram.write_all_at(b"hello through the window", 3 * p + 8)
            .unwrap();
        let t = MemoryTable::from_window(
            &[GuestRange {
                guest: 1 << 32,
                len: 8 * p,
                host: 2 * p,
            }],
            &[Window {
                host: 0,
                len: 16 * p,
                soc: 0xc000_0000,
            }],
            &[WindowFile {
                file: ram.try_clone().unwrap(),
                soc: 0xc000_0000,
                len: 16 * p,
            }],
        )
        .unwrap();
        assert!(!t.is_empty());
        // Guest address 4G + p + 8 is host (file) offset 3p + 8.
        let mut got = [0u8; 24];
        t.mem
            .read_slice(&mut got, GuestAddress((1 << 32) + p + 8))
            .unwrap();
        assert_eq!(&got, b"hello through the window");
        let r = t.aspace.regions()[0];
        assert_eq!((r.guest, r.device), (1 << 32, 0xc000_0000 + 2 * p));
        // Writes land in the tenant's file.
        t.mem.write_slice(b"back", GuestAddress(1 << 32)).unwrap();
        let mut f = [0u8; 4];
        ram.read_exact_at(&mut f, 2 * p).unwrap();
        assert_eq!(&f, b"back");
        // A guest range the window does not cover, or a window no file holds: refused.
        let no_window = MemoryTable::from_window(
            &[GuestRange {
                guest: 0,
                len: 4 * p,
                host: 14 * p,
            }],
            &[Window {
                host: 0,
                len: 16 * p,
                soc: 0xc000_0000,
            }],
            &[WindowFile {
                file: ram.try_clone().unwrap(),
                soc: 0xc000_0000,
                len: 16 * p,
            }],
        );
        assert!(no_window.is_err());
        // A window file that claims more than it holds (SIGBUS if mapped): refused.
        let short = MemoryTable::from_window(
            &[GuestRange {
                guest: 0,
                len: 4 * p,
                host: 20 * p,
            }],
            &[Window {
                host: 0,
                len: 64 * p,
                soc: 0xc000_0000,
            }],
            &[WindowFile {
                file: ram.try_clone().unwrap(),
                soc: 0xc000_0000,
                len: 64 * p,
            }],
        );
        assert!(short.is_err());
        let no_file = MemoryTable::from_window(
            &[GuestRange {
                guest: 0,
                len: 4 * p,
                host: 0,
            }],
            &[Window {
                host: 0,
                len: 16 * p,
                soc: 0xd000_0000,
            }],
            &[WindowFile {
                file: ram,
                soc: 0xc000_0000,
                len: 16 * p,
            }],
        );
        assert!(no_file.is_err());
    }

    #[test]
    fn hostile_tables_are_refused() {
        let p = page_size();
        let cases: Vec<(Vec<VhostUserMemoryRegion>, Vec<File>)> = vec![
            // Past the end of its file (the SIGBUS case), offset beyond the file.
            (vec![region(0, 4 * p, 0, 0)], vec![memfd(2 * p)]),
            (vec![region(0, p, 0, 8 * p)], vec![memfd(2 * p)]),
            // Unaligned offset, zero size, overflowing sizes.
            (vec![region(0, p, 0, 1)], vec![memfd(2 * p)]),
            (vec![region(0, 0, 0, 0)], vec![memfd(p)]),
            (vec![region(u64::MAX - 1, p, 0, 0)], vec![memfd(p)]),
            // Overlapping guest ranges, overlapping front-end ranges.
            (
                vec![region(0, 2 * p, 0, 0), region(p, p, 1 << 40, 0)],
                vec![memfd(2 * p), memfd(p)],
            ),
            (
                vec![region(0, p, 0, 0), region(1 << 32, p, 0, 0)],
                vec![memfd(p), memfd(p)],
            ),
            // Not one file per region, no regions.
            (vec![region(0, p, 0, 0)], vec![]),
            (vec![], vec![]),
        ];
        for (k, (r, f)) in cases.into_iter().enumerate() {
            assert!(MemoryTable::build(&r, f).is_err(), "case {k} accepted");
        }
        // Not a regular file: a pipe.
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        assert!(MemoryTable::build(&[region(0, p, 0, 0)], vec![File::from(rd)]).is_err());
    }
}
