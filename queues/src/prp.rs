//! PRP walker: turns a command's PRP1/PRP2 into address ranges (NVM Express Base Specification
//! 2.0, section 4.1.1 "Physical Region Page Entry and List").
//!
//! Rules applied, with the status reported when one is broken:
//! * The memory page size is a run-time parameter (CC.MPS): a power of two from 4 KiB to
//!   128 MiB. Nothing here assumes 4 KiB. Otherwise [`Status::INVALID_FIELD`].
//! * PRP1 may start anywhere in a page but must be dword aligned (bits 1:0 clear); it describes
//!   data up to the end of its page. Otherwise [`Status::INVALID_PRP_OFFSET`].
//! * If the rest of the transfer fits in one page, PRP2 points at it and must be page aligned.
//!   Otherwise PRP2 is a PRP List pointer: it may have an offset, which must be qword aligned
//!   (entries are 8 bytes), and the list runs to the end of that page.
//! * Entries in a list are page aligned. When more entries are needed than fit in the list page,
//!   the last entry of the page points to the next list page, which must be page aligned (as
//!   QEMU and SPDK require; this also guarantees every list page yields data entries, so the
//!   walk always progresses). Otherwise [`Status::INVALID_PRP_OFFSET`].
//! * No address range may wrap past the end of the 64-bit space: [`Status::DATA_TRANSFER_ERROR`].
//!
//! The walk is proportional to the transfer length: at most `len / page_size + 2` data entries
//! and one chain pointer per full list page are read, so a hostile list cannot loop. Transfer
//! lengths come from the command (NLB × block size), which the caller bounds by MDTS first.
//!
//! The walker allocates nothing: list entries are fetched through a caller closure in chunks of
//! at most [`LIST_CHUNK`] entries (never crossing a list page, never past the last entry the
//! transfer needs), and segments go out through a
//! callback. Adjacent segments that continue each other are merged, so a physically contiguous
//! buffer yields one segment.

use crate::nvme::Status;

/// Smallest memory page size NVMe allows (CAP.MPSMIN = 0).
pub const MIN_PAGE_SIZE: u64 = 4096;
/// Largest memory page size NVMe allows (CAP.MPSMAX = 15: 2^(12 + 15)).
pub const MAX_PAGE_SIZE: u64 = 1 << 27;
/// Largest number of list entries requested from the `read_list` closure in one call.
pub const LIST_CHUNK: usize = 32;

/// Whether `page_size` is a memory page size NVMe allows.
pub fn valid_page_size(page_size: u64) -> bool {
    page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
}

/// Merges adjacent ranges before handing them to the caller.
struct Coalesce<E> {
    pending: Option<(u64, u64)>,
    emitted: usize,
    emit: E,
}

impl<E: FnMut(u64, u64) -> Result<(), Status>> Coalesce<E> {
    /// Adds `[addr, addr + len)`; the caller has checked that it does not wrap.
    fn push(&mut self, addr: u64, len: u64) -> Result<(), Status> {
        if let Some((a, l)) = &mut self.pending {
            // `a + l` cannot overflow: it was checked when the range was added.
            if *a + *l == addr {
                *l += len;
                return Ok(());
            }
            let (a, l) = (*a, *l);
            self.emitted += 1;
            (self.emit)(a, l)?;
        }
        self.pending = Some((addr, len));
        Ok(())
    }

    fn finish(mut self) -> Result<usize, Status> {
        if let Some((a, l)) = self.pending.take() {
            self.emitted += 1;
            (self.emit)(a, l)?;
        }
        Ok(self.emitted)
    }
}

/// Checks that `[addr, addr + len)` does not wrap around the address space.
fn check_range(addr: u64, len: u64) -> Result<(), Status> {
    addr.checked_add(len)
        .map(|_| ())
        .ok_or(Status::DATA_TRANSFER_ERROR)
}

/// Why [`build_prps`] cannot describe a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrpBuildError {
    /// A segment other than the first does not start on a page boundary, a segment other than
    /// the last does not end on one, the first is not dword aligned, or a segment is empty or
    /// wraps: PRPs cannot express it (an SGL or a bounce buffer can).
    #[error("data segments are not page aligned as PRPs need")]
    Unaligned,
    /// More list entries are needed than the list holds.
    #[error("transfer needs more than {0} PRP list entries")]
    TooLong(usize),
}

/// Builds the PRPs of a transfer, the inverse of [`walk_prps`]: `segs` are the data's device
/// addresses and lengths, in order; `put(i, entry)` stores entry `i` of the PRP list, which the
/// device finds at `list_addr` (page aligned; at most `list_len` entries, all in one page, so no
/// chaining). Returns (PRP1, PRP2). Nothing is allocated.
pub fn build_prps(
    segs: impl IntoIterator<Item = (u64, u64)>,
    page_size: u64,
    list_addr: u64,
    list_len: usize,
    mut put: impl FnMut(usize, u64),
) -> Result<(u64, u64), PrpBuildError> {
    debug_assert!(valid_page_size(page_size));
    let mask = page_size - 1;
    // Entry 0 is PRP1; entries 1.. go to the list, entry 1 is PRP2 when there are only two.
    let mut first: Option<u64> = None;
    let mut second = 0u64;
    let mut n = 0usize;
    let mut prev_end: Option<u64> = None;
    for (addr, len) in segs {
        let end = addr.checked_add(len).ok_or(PrpBuildError::Unaligned)?;
        if len == 0 {
            return Err(PrpBuildError::Unaligned);
        }
        let mut page = match prev_end {
            None if addr & 3 != 0 => return Err(PrpBuildError::Unaligned),
            None => addr,
            // A later segment starts on a page boundary and follows one that ended on one.
            Some(pe) if pe & mask != 0 || addr & mask != 0 => return Err(PrpBuildError::Unaligned),
            Some(_) => addr,
        };
        loop {
            match n {
                0 => first = Some(page),
                _ if n > list_len => return Err(PrpBuildError::TooLong(list_len)),
                _ => {
                    if n == 1 {
                        second = page;
                    }
                    put(n - 1, page);
                }
            }
            n += 1;
            // The next page boundary after `page`; stop at the end of the segment.
            match (page & !mask).checked_add(page_size) {
                Some(next) if next < end => page = next,
                _ => break,
            }
        }
        prev_end = Some(end);
    }
    Ok(match n {
        0 => (0, 0),
        1 => (first.unwrap_or(0), 0),
        2 => (first.unwrap_or(0), second),
        _ => (first.unwrap_or(0), list_addr),
    })
}

/// Walks the PRPs of a command transferring `len` bytes with memory page size `page_size`.
///
/// `read_list(addr, out)` must fill `out` with the `out.len()` consecutive 8-byte PRP list
/// entries stored at `addr`, converted to host order (for example with `u64::from_le_bytes`); it
/// is never asked to cross a page boundary. Its error is returned as is (typically
/// [`Status::DATA_TRANSFER_ERROR`] when `addr` is not mapped).
///
/// `emit(addr, len)` receives the data ranges in order; its error stops the walk and is returned.
/// When the walk fails, ranges already emitted must be discarded: a later entry may be invalid.
///
/// Returns the number of ranges emitted. A zero-length transfer emits nothing and ignores both
/// PRPs.
pub fn walk_prps<R, E>(
    prp1: u64,
    prp2: u64,
    len: u64,
    page_size: u64,
    mut read_list: R,
    emit: E,
) -> Result<usize, Status>
where
    R: FnMut(u64, &mut [u64]) -> Result<(), Status>,
    E: FnMut(u64, u64) -> Result<(), Status>,
{
    if !valid_page_size(page_size) {
        return Err(Status::INVALID_FIELD);
    }
    if len == 0 {
        return Ok(0);
    }
    let mask = page_size - 1;
    let mut out = Coalesce {
        pending: None,
        emitted: 0,
        emit,
    };

    // PRP1: any dword-aligned offset, up to the end of its page.
    if prp1 & 0x3 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let first = len.min(page_size - (prp1 & mask));
    check_range(prp1, first)?;
    out.push(prp1, first)?;
    let mut remaining = len - first;
    if remaining == 0 {
        return out.finish();
    }

    // PRP2 is the second (and last) data page.
    if remaining <= page_size {
        if prp2 & mask != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        check_range(prp2, remaining)?;
        out.push(prp2, remaining)?;
        return out.finish();
    }

    // PRP2 is a PRP List pointer.
    if prp2 & 0x7 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let mut list = prp2;
    // Entries left in the current list page, counting those not yet fetched.
    let mut left_in_page = (page_size - (prp2 & mask)) / 8;
    let mut buf = [0u64; LIST_CHUNK];
    let (mut pos, mut filled) = (0usize, 0usize);
    // Bound on entries read, independent of the structural argument in the module docs: every
    // data entry but the last moves `page_size` bytes, and each chain pointer is followed by at
    // least `page_size / 8 - 1 >= 511` data entries.
    let mut budget = 2 * (remaining / page_size + 2);

    while remaining > 0 {
        if pos == filled {
            // `left_in_page >= 1` here: a page's last entry is either data (then `remaining`
            // becomes 0) or a chain pointer (then the count is reset below).
            // Never read past the entries the transfer needs: a host may allocate only that
            // much of the list page (Linux uses 256-byte pools for short lists).
            let needed = remaining.div_ceil(page_size);
            let n = left_in_page.min(needed).min(LIST_CHUNK as u64) as usize;
            read_list(list, &mut buf[..n])?;
            list = list
                .checked_add(n as u64 * 8)
                .ok_or(Status::DATA_TRANSFER_ERROR)?;
            left_in_page -= n as u64;
            pos = 0;
            filled = n;
        }
        if budget == 0 {
            return Err(Status::INVALID_FIELD);
        }
        budget -= 1;
        let entry = buf[pos];
        pos += 1;
        let last_in_page = left_in_page == 0 && pos == filled;
        if last_in_page && remaining > page_size {
            // More than one entry still needed and this is the page's last slot: it points to
            // the next list page.
            if entry & mask != 0 {
                return Err(Status::INVALID_PRP_OFFSET);
            }
            list = entry;
            left_in_page = page_size / 8;
            pos = 0;
            filled = 0;
            continue;
        }
        if entry & mask != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        let n = remaining.min(page_size);
        check_range(entry, n)?;
        out.push(entry, n)?;
        remaining -= n;
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Guest memory holding PRP lists, keyed by entry address.
    #[derive(Default)]
    struct Lists(HashMap<u64, u64>);

    impl Lists {
        fn read(&self, addr: u64, out: &mut [u64]) -> Result<(), Status> {
            for (i, o) in out.iter_mut().enumerate() {
                *o = *self
                    .0
                    .get(&(addr + 8 * i as u64))
                    .ok_or(Status::DATA_TRANSFER_ERROR)?;
            }
            Ok(())
        }
    }

    fn walk(
        prp1: u64,
        prp2: u64,
        len: u64,
        ps: u64,
        lists: &Lists,
    ) -> Result<Vec<(u64, u64)>, Status> {
        let mut segs = Vec::new();
        let n = walk_prps(
            prp1,
            prp2,
            len,
            ps,
            |a, o| lists.read(a, o),
            |a, l| {
                segs.push((a, l));
                Ok(())
            },
        )?;
        assert_eq!(n, segs.len());
        Ok(segs)
    }

    /// Lays out PRPs the way a host driver does (Linux `nvme_pci_setup_prps`), independently of
    /// the walker: data pages `pages` (page aligned), the first used from `off`.
    fn build(
        pages: &[u64],
        off: u64,
        len: u64,
        ps: u64,
        list_base: u64,
        list_off: u64,
    ) -> (u64, u64, Lists) {
        let mut lists = Lists::default();
        let prp1 = pages[0] + off;
        let needed = {
            let first = len.min(ps - off);
            (len - first).div_ceil(ps) as usize
        };
        let prp2 = match needed {
            0 => 0,
            1 => pages[1],
            _ => {
                let per_page = (ps / 8) as usize;
                let mut slot_addr = list_base + list_off;
                let mut slots_left = (ps - list_off) as usize / 8;
                let mut next_list = list_base + ps;
                for (k, &p) in pages[1..=needed].iter().enumerate() {
                    let more_after = needed - k - 1;
                    if slots_left == 1 && more_after > 0 {
                        lists.0.insert(slot_addr, next_list);
                        slot_addr = next_list;
                        slots_left = per_page;
                        next_list += ps;
                    }
                    lists.0.insert(slot_addr, p);
                    slot_addr += 8;
                    slots_left -= 1;
                }
                list_base + list_off
            }
        };
        (prp1, prp2, lists)
    }

    fn coalesce(pages: &[u64], off: u64, len: u64, ps: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut remaining = len;
        for (i, &p) in pages.iter().enumerate() {
            if remaining == 0 {
                break;
            }
            let (a, room) = if i == 0 { (p + off, ps - off) } else { (p, ps) };
            let n = remaining.min(room);
            match out.last_mut() {
                Some((la, ll)) if *la + *ll == a => *ll += n,
                _ => out.push((a, n)),
            }
            remaining -= n;
        }
        out
    }

    #[test]
    fn single_page_with_offset() {
        let segs = walk(
            0x1_0000 + 0x200,
            0xdead_0000,
            0x800,
            4096,
            &Lists::default(),
        )
        .unwrap();
        assert_eq!(segs, [(0x1_0200, 0x800)]);
    }

    #[test]
    fn zero_length_ignores_prps() {
        assert_eq!(walk(3, 5, 0, 4096, &Lists::default()).unwrap(), []);
    }

    #[test]
    fn two_pages_use_prp2_directly() {
        let segs = walk(0x5000 + 0xf00, 0x9000, 0x200, 4096, &Lists::default()).unwrap();
        assert_eq!(segs, [(0x5f00, 0x100), (0x9000, 0x100)]);
        // Contiguous pages merge.
        let segs = walk(0x5000 + 0xf00, 0x6000, 0x200, 4096, &Lists::default()).unwrap();
        assert_eq!(segs, [(0x5f00, 0x200)]);
        // PRP2 must be page aligned when it is a data pointer.
        assert_eq!(
            walk(0x5000, 0x9008, 0x2000, 4096, &Lists::default()),
            Err(Status::INVALID_PRP_OFFSET)
        );
    }

    #[test]
    fn list_with_offset_and_chaining_at_16k_pages() {
        let ps = 16384;
        // 3 list pages' worth of entries: 2048 entries per 16 KiB list page.
        let n_pages = 2 * 2048 + 10;
        let pages: Vec<u64> = (0..n_pages as u64)
            .map(|i| 0x10_0000_0000 + i * 2 * ps)
            .collect();
        let len = (n_pages as u64 - 1) * ps + 100;
        let (prp1, prp2, lists) = build(&pages, 0, len, ps, 0x7000_0000, 0x40);
        let segs = walk(prp1, prp2, len, ps, &lists).unwrap();
        assert_eq!(segs, coalesce(&pages, 0, len, ps));
        assert_eq!(segs.len(), n_pages);
        assert_eq!(segs.iter().map(|s| s.1).sum::<u64>(), len);
    }

    #[test]
    fn misaligned_entries_are_rejected() {
        let ps = 4096;
        let pages = [0x1000, 0x3000, 0x5000, 0x7000];
        let (prp1, prp2, mut lists) = build(&pages, 0, 4 * ps, ps, 0x10_0000, 0);
        assert_eq!(
            walk(prp1 + 2, prp2, 4 * ps - 2, ps, &lists),
            Err(Status::INVALID_PRP_OFFSET)
        );
        assert_eq!(
            walk(prp1, prp2 + 4, 4 * ps, ps, &lists),
            Err(Status::INVALID_PRP_OFFSET)
        );
        lists.0.insert(0x10_0008, 0x5004);
        assert_eq!(
            walk(prp1, prp2, 4 * ps, ps, &lists),
            Err(Status::INVALID_PRP_OFFSET)
        );
    }

    #[test]
    fn misaligned_chain_pointer_is_rejected() {
        let ps = 4096;
        let pages: Vec<u64> = (0..600u64).map(|i| 0x100_0000 + i * ps).collect();
        let len = 600 * ps;
        let (prp1, prp2, mut lists) = build(&pages, 0, len, ps, 0x10_0000, 0);
        assert!(walk(prp1, prp2, len, ps, &lists).is_ok());
        let chain_slot = 0x10_0000 + ps - 8;
        let next = lists.0[&chain_slot];
        lists.0.insert(chain_slot, next + 8);
        assert_eq!(
            walk(prp1, prp2, len, ps, &lists),
            Err(Status::INVALID_PRP_OFFSET)
        );
    }

    #[test]
    fn self_referencing_chain_terminates() {
        // Every list page points back to itself: the walk must still end (with data entries
        // being the page's own address, which is page aligned, so it ends successfully after
        // the transfer length is consumed).
        let ps = 4096;
        let mut lists = Lists::default();
        for i in 0..512 {
            lists.0.insert(0x20_0000 + 8 * i, 0x20_0000);
        }
        let len = 2000 * ps;
        let r = walk(0x1000, 0x20_0000, len, ps, &lists);
        let segs = r.unwrap();
        assert_eq!(segs.iter().map(|s| s.1).sum::<u64>(), len);
    }

    #[test]
    fn errors_from_memory_and_emit_propagate() {
        let ps = 4096;
        assert_eq!(
            walk(0x1000, 0x9000, 3 * ps, ps, &Lists::default()),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        let r = walk_prps(
            0x1000,
            0,
            16,
            ps,
            |_, _| Ok(()),
            |_, _| Err(Status::INTERNAL_ERROR),
        );
        assert_eq!(r, Err(Status::INTERNAL_ERROR));
    }

    #[test]
    fn address_wrap_is_rejected() {
        let ps = 4096;
        let top = u64::MAX - (ps - 1); // last page of the address space
        assert_eq!(
            walk(top, 0, ps, ps, &Lists::default()),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            walk(0x1000, top, 2 * ps, ps, &Lists::default()),
            Err(Status::DATA_TRANSFER_ERROR)
        );
    }

    #[test]
    fn bad_page_sizes_are_rejected() {
        for ps in [0, 512, 4095, 6144, 1 << 28] {
            assert_eq!(
                walk(0, 0, 1, ps, &Lists::default()),
                Err(Status::INVALID_FIELD),
                "{ps}"
            );
        }
        assert!(walk(0, 0, 1, 65536, &Lists::default()).is_ok());
    }

    proptest! {
        /// Host-built PRPs for random page sizes, offsets, lengths and page placements are
        /// walked back to the same ranges.
        #[test]
        fn host_layouts_round_trip(
            ps_shift in 12u32..17,
            off_dw in 0u64..16384,
            len in 1u64..(600 * 4096),
            scatter in proptest::collection::vec(0u64..4, 0..1000),
            list_off_q in 0u64..64,
        ) {
            let ps = 1u64 << ps_shift;
            let off = (off_dw * 4) % ps;
            let n_pages = ((len + off).div_ceil(ps)) as usize;
            // Pages mostly contiguous, sometimes with gaps, so merging is exercised.
            let mut pages = Vec::with_capacity(n_pages);
            let mut a = 0x1_0000_0000u64;
            for i in 0..n_pages {
                pages.push(a);
                a += ps * (1 + scatter.get(i).copied().unwrap_or(0) % 2);
            }
            let list_off = (list_off_q * 8) % ps;
            let (prp1, prp2, lists) = build(&pages, off, len, ps, 0x7_0000_0000, list_off);
            let segs = walk(prp1, prp2, len, ps, &lists).unwrap();
            prop_assert_eq!(segs, coalesce(&pages, off, len, ps));
        }

        /// Arbitrary PRPs and list contents never panic, and a successful walk covers exactly
        /// the transfer length with ranges that do not wrap.
        #[test]
        fn hostile_input_never_panics(
            prp1 in any::<u64>(),
            prp2 in any::<u64>(),
            len in 0u64..(1 << 24),
            ps_shift in 10u32..29,
            entries in proptest::collection::vec(any::<u64>(), 1..64),
        ) {
            let ps = 1u64 << ps_shift;
            let mut total = 0u64;
            let r = walk_prps(prp1, prp2, len, ps, |a, out| {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = entries[((a / 8) as usize + i) % entries.len()];
                }
                Ok(())
            }, |a, l| {
                assert!(a.checked_add(l).is_some());
                total += l;
                Ok(())
            });
            if r.is_ok() {
                prop_assert_eq!(total, len);
            }
        }
            /// PRPs built from segments a device could be given (first at any dword offset, the
        /// rest page aligned, all but the last ending on a page boundary) walk back to the same
        /// data, merged; segments PRPs cannot express are refused.
        #[test]
        fn built_prps_walk_back(
            ps_shift in 12u32..17,
            off_dw in 0u64..16384,
            pages in proptest::collection::vec((1u64..4, 0u64..3), 1..40),
            tail in 1u64..65536,
            bad in any::<bool>(),
        ) {
            let ps = 1u64 << ps_shift;
            let off = (off_dw * 4) % ps;
            let mut segs = Vec::new();
            let mut a = 0x2_0000_0000u64;
            for (k, &(n, gap)) in pages.iter().enumerate() {
                let start = if k == 0 { a + off } else { a };
                let mut len = n * ps - if k == 0 { off } else { 0 };
                if k + 1 == pages.len() {
                    len = len.min(tail).max(1);
                }
                segs.push((start, len));
                a += (n + gap) * ps;
            }
            if bad && segs.len() > 1 {
                segs[1].0 += 512;
                let r = build_prps(segs.iter().copied(), ps, 0x9_0000_0000, 4096, |_, _| {});
                prop_assert_eq!(r, Err(PrpBuildError::Unaligned));
                return Ok(());
            }
            let len: u64 = segs.iter().map(|s| s.1).sum();
            let mut lists = Lists::default();
            let list_addr = 0x9_0000_0000u64;
            let max = (ps / 8) as usize;
            let r = build_prps(segs.iter().copied(), ps, list_addr, max, |i, e| {
                lists.0.insert(list_addr + 8 * i as u64, e);
            });
            let pages_needed = segs.iter().enumerate().map(|(k, &(s, l))| {
                let first = if k == 0 { s & !(ps - 1) } else { s };
                (s + l - first).div_ceil(ps)
            }).sum::<u64>() as usize;
            if pages_needed - 1 > max {
                prop_assert_eq!(r, Err(PrpBuildError::TooLong(max)));
                return Ok(());
            }
            let (prp1, prp2) = r.unwrap();
            let got = walk(prp1, prp2, len, ps, &lists).unwrap();
            let mut want: Vec<(u64, u64)> = Vec::new();
            for &(s, l) in &segs {
                match want.last_mut() {
                    Some(p) if p.0 + p.1 == s => p.1 += l,
                    _ => want.push((s, l)),
                }
            }
            prop_assert_eq!(got, want);
        }
    }
}
