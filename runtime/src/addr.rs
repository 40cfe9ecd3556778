//! Address translation: guest addresses (gA) to this process's virtual addresses (vA) and to the
//! addresses a DMA-capable device uses (IOVA / hA).
//!
//! An [`AddressSpace`] holds one table of regions, sorted and non-overlapping, checked once when it
//! is built. [`AddressSpace::translate`] turns `(addr, len)` from a descriptor, a PRP or an SGL into
//! pieces split at region boundaries, in O(log regions) per region crossed. Its inputs come straight
//! from a guest or a peer: it never panics, never overflows, and answers an error for any byte that
//! is not inside a region.

use std::any::Any;
use std::sync::Arc;

/// One contiguous mapping of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First guest address of the region.
    pub guest: u64,
    /// Length in bytes (non-zero).
    pub len: u64,
    /// Where the region is mapped in this process.
    pub host: usize,
    /// The address a DMA-capable device uses for `guest` (IOVA or host physical); equal to `guest`
    /// when nothing remaps it.
    pub device: u64,
}

/// One piece of a translated range: contiguous in both the process and the device view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Process virtual address.
    pub host: usize,
    /// Device address.
    pub device: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Why a region table or a translation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// A region of length zero.
    #[error("region at guest address {0:#x} is empty")]
    EmptyRegion(u64),
    /// A region whose end does not fit in 64 bits, or whose host or device end overflows.
    #[error("region at guest address {0:#x} wraps around the address space")]
    RegionOverflow(u64),
    /// Two regions share guest addresses.
    #[error("regions at guest addresses {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    /// The range `addr .. addr + len` overflows 64 bits.
    #[error("range {addr:#x}+{len:#x} overflows")]
    Overflow {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Some byte of the range is not in any region.
    #[error("guest address {0:#x} is outside guest memory")]
    Unmapped(u64),
    /// The range needs more pieces than the caller allowed.
    #[error("range needs more than {0} pieces")]
    TooManyPieces(usize),
}

/// A region table plus whatever keeps its mappings alive.
pub struct AddressSpace {
    regions: Vec<Region>,
    // Dropped last: the mappings `regions` points into stay valid as long as this lives.
    _keep: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("regions", &self.regions)
            .finish()
    }
}

impl AddressSpace {
    /// Builds an address space from `regions` (any order). `keep` owns the mappings the regions'
    /// host addresses point into; it is dropped with the address space, so holding an
    /// `Arc<AddressSpace>` keeps the memory mapped while I/O into it is in flight.
    pub fn new(
        mut regions: Vec<Region>,
        keep: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<Self, AddrError> {
        regions.sort_by_key(|r| r.guest);
        for r in &regions {
            if r.len == 0 {
                return Err(AddrError::EmptyRegion(r.guest));
            }
            let ok = r.guest.checked_add(r.len - 1).is_some()
                && r.device.checked_add(r.len - 1).is_some()
                && usize::try_from(r.len)
                    .ok()
                    .and_then(|l| r.host.checked_add(l - 1))
                    .is_some();
            if !ok {
                return Err(AddrError::RegionOverflow(r.guest));
            }
        }
        for w in regions.windows(2) {
            // Checked above: guest + len - 1 does not overflow.
            if w[0].guest + (w[0].len - 1) >= w[1].guest {
                return Err(AddrError::Overlap(w[0].guest, w[1].guest));
            }
        }
        Ok(AddressSpace {
            regions,
            _keep: keep,
        })
    }

    /// An address space with no memory: every non-empty translation fails.
    pub fn empty() -> Self {
        AddressSpace {
            regions: Vec::new(),
            _keep: None,
        }
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region containing `addr`, if any.
    fn find(&self, addr: u64) -> Option<&Region> {
        // First region starting after addr; the one before it is the only candidate.
        let i = self.regions.partition_point(|r| r.guest <= addr);
        let r = self.regions.get(i.checked_sub(1)?)?;
        // addr >= r.guest here, so the subtraction cannot underflow.
        (addr - r.guest < r.len).then_some(r)
    }

    /// Translates `addr .. addr + len`, calling `each` with every piece in order. At most
    /// `max_pieces` pieces are produced. Nothing is reported unless the whole range is mapped,
    /// so callers may build iovecs straight from the callback and discard them on error.
    pub fn translate(
        &self,
        addr: u64,
        len: u64,
        max_pieces: usize,
        mut each: impl FnMut(Piece),
    ) -> Result<usize, AddrError> {
        let end = addr
            .checked_add(len)
            .ok_or(AddrError::Overflow { addr, len })?;
        // First pass validates, second emits: a range is usually one piece, so this costs two
        // binary searches, and callers never see a partial translation.
        let count = self.walk(addr, end, max_pieces, |_| {})?;
        self.walk(addr, end, max_pieces, &mut each)?;
        Ok(count)
    }

    fn walk(
        &self,
        mut addr: u64,
        end: u64,
        max_pieces: usize,
        mut each: impl FnMut(Piece),
    ) -> Result<usize, AddrError> {
        let mut n = 0;
        while addr < end {
            let r = self.find(addr).ok_or(AddrError::Unmapped(addr))?;
            if n == max_pieces {
                return Err(AddrError::TooManyPieces(max_pieces));
            }
            let off = addr - r.guest;
            let chunk = (r.len - off).min(end - addr);
            // The region was checked to fit in usize and not overflow host/device, and
            // off + chunk <= r.len, so these conversions and additions are in range.
            each(Piece {
                host: r.host + off as usize,
                device: r.device + off,
                len: chunk as usize,
            });
            n += 1;
            addr += chunk;
        }
        Ok(n)
    }

    /// Translates a range that must lie within one region, returning its host address.
    pub fn host_range(&self, addr: u64, len: u64) -> Result<usize, AddrError> {
        let mut host = 0;
        self.translate(addr, len, 1, |p| host = p.host)?;
        Ok(host)
    }

    /// Copies `out.len()` bytes of guest memory at `addr` into `out`.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), AddrError> {
        let mut done = 0;
        self.translate(addr, out.len() as u64, usize::MAX, |p| {
            // Guest memory may change under us, so this is a byte copy, never a reference into it.
            // SAFETY: `translate` reports only pieces inside regions, kept mapped while `self`
            // lives by `keep`; `out[done..done + p.len]` is in bounds (pieces sum to its length).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p.host as *const u8,
                    out.as_mut_ptr().add(done),
                    p.len,
                );
            }
            done += p.len;
        })?;
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), AddrError> {
        let mut done = 0;
        self.translate(addr, data.len() as u64, usize::MAX, |p| {
            // SAFETY: as in `read`: the piece is mapped guest memory of `p.len` bytes and the
            // source slice holds at least `done + p.len` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr().add(done), p.host as *mut u8, p.len);
            }
            done += p.len;
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn space(regions: &[(u64, u64, usize)]) -> AddressSpace {
        AddressSpace::new(
            regions
                .iter()
                .map(|&(g, l, h)| Region {
                    guest: g,
                    len: l,
                    host: h,
                    device: g,
                })
                .collect(),
            None,
        )
        .unwrap()
    }

    fn pieces(s: &AddressSpace, a: u64, l: u64) -> Result<Vec<Piece>, AddrError> {
        let mut v = Vec::new();
        s.translate(a, l, 16, |p| v.push(p))?;
        Ok(v)
    }

    #[test]
    fn splits_at_adjacent_region_boundary() {
        let s = space(&[(0x1000, 0x1000, 0x10_0000), (0x2000, 0x1000, 0x50_0000)]);
        let v = pieces(&s, 0x1800, 0x1000).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].host, v[0].len), (0x10_0800, 0x800));
        assert_eq!((v[1].host, v[1].len), (0x50_0000, 0x800));
    }

    #[test]
    fn rejects_holes_edges_and_overflow() {
        let s = space(&[(0x1000, 0x1000, 0x10_0000), (0x3000, 0x1000, 0x20_0000)]);
        assert_eq!(pieces(&s, 0x1800, 0x1000), Err(AddrError::Unmapped(0x2000)));
        assert_eq!(pieces(&s, 0xfff, 2), Err(AddrError::Unmapped(0xfff)));
        assert_eq!(pieces(&s, 0x3fff, 2), Err(AddrError::Unmapped(0x4000)));
        assert!(matches!(
            pieces(&s, u64::MAX, 2),
            Err(AddrError::Overflow { .. })
        ));
        assert_eq!(pieces(&s, 0x1fff, 0).unwrap(), vec![]);
        let mut n = 0;
        assert_eq!(
            s.translate(0x1000, 0x1000, 0, |_| n += 1),
            Err(AddrError::TooManyPieces(0))
        );
        assert_eq!(n, 0, "nothing is reported for a refused range");
    }

    #[test]
    fn refuses_bad_tables() {
        let r = |g, l| Region {
            guest: g,
            len: l,
            host: 0x1000,
            device: g,
        };
        assert!(matches!(
            AddressSpace::new(vec![r(0, 0)], None),
            Err(AddrError::EmptyRegion(0))
        ));
        assert!(matches!(
            AddressSpace::new(vec![r(0x2000, 0x1000), r(0x1000, 0x1001)], None),
            Err(AddrError::Overlap(..))
        ));
        assert!(matches!(
            AddressSpace::new(vec![r(u64::MAX - 1, 3)], None),
            Err(AddrError::RegionOverflow(_))
        ));
        assert!(AddressSpace::new(vec![r(u64::MAX, 1)], None).is_ok());
    }

    #[test]
    fn copies_through_host_memory() {
        let mut backing = vec![0u8; 8192];
        let host = backing.as_mut_ptr() as usize;
        let s = space(&[(0x1_0000, 4096, host), (0x1_1000, 4096, host + 4096)]);
        s.write(0x1_0ffe, b"abcd").unwrap();
        let mut out = [0u8; 4];
        s.read(0x1_0ffe, &mut out).unwrap();
        assert_eq!(&out, b"abcd");
        assert_eq!(&backing[4094..4098], b"abcd");
        assert!(s.write(0x1_1ffe, b"abcd").is_err());
        assert_eq!(backing[8190..], [0, 0], "a refused write changes nothing");
    }

    proptest! {
        #[test]
        fn translate_never_panics_and_stays_inside(
            regs in proptest::collection::vec((0u64..1 << 20, 1u64..1 << 16), 0..8),
            addr in any::<u64>(), len in any::<u64>(), near in 0u64..1 << 21, small in 0u64..1 << 17,
        ) {
            let mut table = Vec::new();
            let mut next = 0u64;
            for (gap, l) in regs {
                let g = next + gap;
                table.push(Region { guest: g, len: l, host: 0x1000_0000 + g as usize, device: g });
                next = g + l;
            }
            let s = AddressSpace::new(table.clone(), None).unwrap();
            for (a, l) in [(addr, len), (near, small), (addr, small)] {
                let mut total = 0u64;
                let mut cursor = a;
                let r = s.translate(a, l, 64, |p| {
                    let r = table.iter().find(|r| p.device >= r.guest && p.device + p.len as u64 <= r.guest + r.len);
                    assert!(r.is_some(), "piece outside every region");
                    assert_eq!(p.device, cursor);
                    cursor += p.len as u64;
                    total += p.len as u64;
                });
                if r.is_ok() { prop_assert_eq!(total, l); }
            }
        }
    }
}
