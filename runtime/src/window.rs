//! Guest memory reached through a window onto host memory: the SoCvm and ARM SoC modes.
//!
//! On a SmartNIC SoC (or in a SoC VM) leapd cannot map the tenant's memory from vhost-user file
//! descriptors. It sees host memory through a window instead: a PCIe BAR (or, emulated, an
//! ivshmem BAR over the tenant's RAM file) that exposes host memory to the SoC. Three tables
//! take a guest address to an address this process can touch:
//!
//! ```text
//!   gA ──(guest table, from the host agent: each vhost-user region's gA range and hA)──► hA
//!   hA ──(windows: host range [host, host+len) appears at SoC address soc)─────────────► sA
//!   sA ──(mappings: SoC range [soc, soc+len) is mapped at process address va)──────────► vA
//! ```
//!
//! [`compose`] folds the three into one list of [`Region`]s (gA → vA, with sA as the device
//! address), so the data path keeps one translation mechanism: an [`AddressSpace`] built from
//! them splits at every boundary of every level, checks every byte, and never overflows. A
//! region is cut wherever any level's boundary falls, and composition refuses a guest range
//! that a window or a mapping does not cover entirely: a table that would fail at some later
//! request is refused when it arrives. Every table entry must be page aligned, so every piece
//! boundary is a page boundary (what bounce copies and DMA need); the page size is read at run
//! time.
//!
//! All inputs come from another trust domain (the host agent, over the control channel): any
//! overflow, overlap, misalignment or gap is an error, never a panic.

use crate::addr::Region;

/// A guest range and where it lies in host memory (hA: for the emulated machine, the offset in
/// the tenant's RAM file; on a SmartNIC, a host physical address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    /// First guest address.
    pub guest: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host address of `guest`.
    pub host: u64,
}

/// A window: host range `[host, host + len)` appears at SoC address `soc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First host address the window exposes.
    pub host: u64,
    /// Length in bytes.
    pub len: u64,
    /// SoC address of `host` (a BAR address).
    pub soc: u64,
}

/// A mapping: SoC range `[soc, soc + len)` is mapped at process address `va`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First SoC address mapped.
    pub soc: u64,
    /// Length in bytes.
    pub len: u64,
    /// Process virtual address of `soc`.
    pub va: usize,
}

/// Why a set of tables was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// An entry is empty, overflows, or is not page aligned.
    #[error("{table} entry {index}: {why}")]
    Entry {
        /// Which table.
        table: &'static str,
        /// Entry index.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// Two entries of one table overlap where the table is looked up.
    #[error("{table} entries {0} and {1} overlap", table = .2)]
    Overlap(usize, usize, &'static str),
    /// Part of a guest range is in no window, or part of a window's SoC range in no mapping.
    #[error("guest address {guest:#x} (host {host:#x}) is not reachable: {why}")]
    Unreachable {
        /// First unreachable guest address.
        guest: u64,
        /// Its host address.
        host: u64,
        /// Which level is missing.
        why: &'static str,
    },
}

fn check_entries<T>(
    table: &'static str,
    entries: &[T],
    page: u64,
    key: impl Fn(&T) -> (u64, u64, u64),
) -> Result<(), WindowError> {
    for (index, e) in entries.iter().enumerate() {
        let (start, len, to) = key(e);
        let bad = |why: String| WindowError::Entry { table, index, why };
        if len == 0 {
            return Err(bad("length 0".into()));
        }
        if start.checked_add(len).is_none() || to.checked_add(len).is_none() {
            return Err(bad(format!("{start:#x} + {len:#x} overflows")));
        }
        if start % page != 0 || len % page != 0 || to % page != 0 {
            return Err(bad(format!(
                "{start:#x} + {len:#x} -> {to:#x} is not aligned to the page size ({page:#x})"
            )));
        }
    }
    // Lookups go by `start`: starts must not overlap.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| key(&entries[i]).0);
    for w in order.windows(2) {
        let (a, b) = (key(&entries[w[0]]), key(&entries[w[1]]));
        if a.0 + a.1 > b.0 {
            return Err(WindowError::Overlap(w[0], w[1], table));
        }
    }
    Ok(())
}

/// The entry of `entries` that contains `addr` (by `start`/`len`), and the offset in it.
fn lookup<T: Copy>(entries: &[T], addr: u64, key: impl Fn(&T) -> (u64, u64)) -> Option<(T, u64)> {
    entries.iter().find_map(|e| {
        let (start, len) = key(e);
        (addr >= start && addr - start < len).then(|| (*e, addr - start))
    })
}

/// A guest range and the SoC address it appears at through a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocRange {
    /// First guest address.
    pub guest: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host address of `guest`.
    pub host: u64,
    /// SoC address of `guest`.
    pub soc: u64,
}

/// Folds the first two tables: guest ranges → SoC addresses, cut at every window boundary. For a
/// process that maps each piece itself (from a BAR's resource file, say) rather than through a
/// table of existing mappings.
pub fn compose_soc(
    guest: &[GuestRange],
    windows: &[Window],
    page: u64,
) -> Result<Vec<SocRange>, WindowError> {
    debug_assert!(page.is_power_of_two());
    check_entries("guest table", guest, page, |g| (g.guest, g.len, g.host))?;
    check_entries("window", windows, page, |w| (w.host, w.len, w.soc))?;
    // Different guest ranges may show the same host memory (aliases); windows may not overlap in
    // SoC space either, since mappings are looked up by SoC address.
    let mut by_soc = windows.to_vec();
    by_soc.sort_by_key(|w| w.soc);
    for (k, w) in by_soc.windows(2).enumerate() {
        if w[0].soc + w[0].len > w[1].soc {
            return Err(WindowError::Overlap(k, k + 1, "window (SoC side)"));
        }
    }
    let mut out = Vec::new();
    for g in guest {
        let mut off = 0u64;
        while off < g.len {
            let (ga, ha) = (g.guest + off, g.host + off);
            let (w, woff) =
                lookup(windows, ha, |w| (w.host, w.len)).ok_or(WindowError::Unreachable {
                    guest: ga,
                    host: ha,
                    why: "no window exposes it",
                })?;
            let len = (g.len - off).min(w.len - woff);
            out.push(SocRange {
                guest: ga,
                len,
                host: ha,
                soc: w.soc + woff,
            });
            off += len;
        }
    }
    Ok(out)
}

/// Folds the three tables into regions gA → vA (device address sA), cut at every boundary of
/// every level. `page` is the page size (a power of two).
pub fn compose(
    guest: &[GuestRange],
    windows: &[Window],
    maps: &[Mapping],
    page: u64,
) -> Result<Vec<Region>, WindowError> {
    let soc = compose_soc(guest, windows, page)?;
    check_entries("mapping", maps, page, |m| (m.soc, m.len, m.va as u64))?;
    if maps
        .iter()
        .any(|m| usize::try_from(m.len).is_err() || m.va.checked_add(m.len as usize).is_none())
    {
        return Err(WindowError::Entry {
            table: "mapping",
            index: 0,
            why: "does not fit in this process's address space".into(),
        });
    }
    let mut out = Vec::new();
    for r in soc {
        let mut off = 0u64;
        while off < r.len {
            let sa = r.soc + off;
            let (m, moff) =
                lookup(maps, sa, |m| (m.soc, m.len)).ok_or(WindowError::Unreachable {
                    guest: r.guest + off,
                    host: r.host + off,
                    why: "its window is not mapped here",
                })?;
            // The piece ends at the nearest boundary of any level.
            let len = (r.len - off).min(m.len - moff);
            out.push(Region {
                guest: r.guest + off,
                len,
                host: m.va + moff as usize,
                device: sa,
            });
            off += len;
        }
    }
    Ok(out)
}

/// Copies `dst.len()` bytes out of window memory at `src` into ordinary memory.
///
/// Window memory may be uncached or device memory (a BAR): on ARM an unaligned access there
/// faults, and the kernel cannot do I/O into it, so data behind a window is always copied
/// through local buffers with accesses valid for that memory: naturally aligned volatile loads
/// of 8 bytes in the middle, of 1, 2 or 4 bytes at the unaligned edges, never wider than what is
/// asked for, never outside `src .. src + len`.
///
/// # Safety
/// `src .. src + dst.len()` must be readable window (or ordinary) memory for the whole call.
pub unsafe fn copy_from_window(src: *const u8, dst: &mut [u8]) {
    let mut done = 0usize;
    let len = dst.len();
    while done < len {
        let at = src as usize + done;
        let left = len - done;
        // The widest naturally aligned access that starts here and fits.
        let w = access_width(at, left);
        // SAFETY: `at .. at + w` is inside the caller's range (w <= left) and aligned to w.
        unsafe {
            match w {
                8 => dst[done..done + 8]
                    .copy_from_slice(&(at as *const u64).read_volatile().to_ne_bytes()),
                4 => dst[done..done + 4]
                    .copy_from_slice(&(at as *const u32).read_volatile().to_ne_bytes()),
                2 => dst[done..done + 2]
                    .copy_from_slice(&(at as *const u16).read_volatile().to_ne_bytes()),
                _ => dst[done] = (at as *const u8).read_volatile(),
            }
        }
        done += w;
    }
}

/// Copies `src` from ordinary memory into window memory at `dst`, with the same access rules as
/// [`copy_from_window`].
///
/// # Safety
/// `dst .. dst + src.len()` must be writable window (or ordinary) memory for the whole call, and
/// not overlap `src`.
pub unsafe fn copy_to_window(dst: *mut u8, src: &[u8]) {
    let mut done = 0usize;
    let len = src.len();
    while done < len {
        let at = dst as usize + done;
        let w = access_width(at, len - done);
        let b = &src[done..done + w];
        // SAFETY: `at .. at + w` is inside the caller's range and aligned to w.
        unsafe {
            match w {
                8 => (at as *mut u64)
                    .write_volatile(u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]))),
                4 => (at as *mut u32)
                    .write_volatile(u32::from_ne_bytes(b.try_into().unwrap_or([0; 4]))),
                2 => (at as *mut u16)
                    .write_volatile(u16::from_ne_bytes(b.try_into().unwrap_or([0; 2]))),
                _ => (at as *mut u8).write_volatile(b[0]),
            }
        }
        done += w;
    }
}

/// The widest of 8, 4, 2, 1 bytes that `addr` is aligned to and that fits in `left`.
fn access_width(addr: usize, left: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&w| addr % w == 0 && left >= w)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::AddressSpace;
    use proptest::prelude::*;

    const P: u64 = 4096;

    #[test]
    fn composes_across_every_level() {
        // Two guest ranges; the second spans two windows; one window is mapped in two pieces.
        let guest = [
            GuestRange {
                guest: 0,
                len: 4 * P,
                host: 0x10_0000,
            },
            GuestRange {
                guest: 1 << 32,
                len: 6 * P,
                host: 0x20_0000,
            },
        ];
        let windows = [
            Window {
                host: 0x10_0000,
                len: 4 * P,
                soc: 0x8000_0000,
            },
            Window {
                host: 0x20_0000,
                len: 2 * P,
                soc: 0x9000_0000,
            },
            Window {
                host: 0x20_0000 + 2 * P,
                len: 4 * P,
                soc: 0xa000_0000,
            },
        ];
        let maps = [
            Mapping {
                soc: 0x8000_0000,
                len: 4 * P,
                va: 0x7000_0000,
            },
            Mapping {
                soc: 0x9000_0000,
                len: 2 * P,
                va: 0x7100_0000,
            },
            Mapping {
                soc: 0xa000_0000,
                len: P,
                va: 0x7200_0000,
            },
            Mapping {
                soc: 0xa000_0000 + P,
                len: 3 * P,
                va: 0x7300_0000,
            },
        ];
        let r = compose(&guest, &windows, &maps, P).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[0],
            Region {
                guest: 0,
                len: 4 * P,
                host: 0x7000_0000,
                device: 0x8000_0000
            }
        );
        assert_eq!(r[3].guest, (1 << 32) + 3 * P);
        assert_eq!(r[3].host, 0x7300_0000);
        let a = AddressSpace::new(r, None).unwrap();
        let mut pieces = Vec::new();
        a.translate((1 << 32) + P, 3 * P, 8, |p| pieces.push(p))
            .unwrap();
        assert_eq!(
            pieces.len(),
            3,
            "split at the window and the mapping boundary"
        );
    }

    #[test]
    fn gaps_overlaps_and_misalignment_are_refused() {
        let g = [GuestRange {
            guest: 0,
            len: 2 * P,
            host: 0,
        }];
        let w = [Window {
            host: 0,
            len: 2 * P,
            soc: 0x1000_0000,
        }];
        let m = [Mapping {
            soc: 0x1000_0000,
            len: 2 * P,
            va: 0x7000_0000,
        }];
        assert!(compose(&g, &w, &m, P).is_ok());
        // A guest range partly outside every window, a window partly unmapped.
        let w1 = [Window {
            host: 0,
            len: P,
            soc: 0x1000_0000,
        }];
        assert!(matches!(
            compose(&g, &w1, &m, P),
            Err(WindowError::Unreachable { .. })
        ));
        let m1 = [Mapping {
            soc: 0x1000_0000,
            len: P,
            va: 0x7000_0000,
        }];
        assert!(matches!(
            compose(&g, &w, &m1, P),
            Err(WindowError::Unreachable { .. })
        ));
        // Misaligned, empty, overflowing, overlapping entries.
        let gm = [GuestRange {
            guest: 8,
            len: P,
            host: 0,
        }];
        assert!(compose(&gm, &w, &m, P).is_err());
        let ge = [GuestRange {
            guest: 0,
            len: 0,
            host: 0,
        }];
        assert!(compose(&ge, &w, &m, P).is_err());
        let go = [GuestRange {
            guest: u64::MAX - P + 1,
            len: 2 * P,
            host: 0,
        }];
        assert!(compose(&go, &w, &m, P).is_err());
        let gov = [
            g[0],
            GuestRange {
                guest: P,
                len: P,
                host: 0,
            },
        ];
        assert!(matches!(
            compose(&gov, &w, &m, P),
            Err(WindowError::Overlap(..))
        ));
        let ws = [
            w[0],
            Window {
                host: 8 * P,
                len: P,
                soc: 0x1000_0000 + P,
            },
        ];
        assert!(matches!(
            compose(&g, &ws, &m, P),
            Err(WindowError::Overlap(..))
        ));
        let mv = [Mapping {
            soc: 0x1000_0000,
            len: 2 * P,
            va: usize::MAX & !(P as usize - 1),
        }];
        assert!(compose(&g, &w, &mv, P).is_err());
    }

    /// Random, valid layouts: a guest table of page-granular ranges, host memory cut into
    /// windows at random SoC addresses, and each window's SoC range mapped in random pieces.
    fn layout() -> impl Strategy<Value = (Vec<GuestRange>, Vec<Window>, Vec<Mapping>)> {
        (
            prop::collection::vec(1u64..6, 1..4),
            prop::collection::vec(1u64..5, 1..6),
            prop::collection::vec(1u64..4, 1..8),
            any::<u64>(),
        )
            .prop_map(|(glens, wlens, mlens, seed)| {
                // Guest ranges: consecutive in host memory (pages 0..), spread in guest space.
                let mut guest = Vec::new();
                let mut host = 0;
                for (k, &l) in glens.iter().enumerate() {
                    guest.push(GuestRange {
                        guest: ((k as u64) << 32) + ((seed >> (k * 8)) & 0xff) * P,
                        len: l * P,
                        host,
                    });
                    host += l * P;
                }
                let total = host;
                // Windows cut [0, total) into pieces (the last takes the rest).
                let mut windows = Vec::new();
                let mut at = 0;
                for (k, &l) in wlens.iter().enumerate() {
                    if at >= total {
                        break;
                    }
                    let len = if k + 1 == wlens.len() {
                        total - at
                    } else {
                        (l * P).min(total - at)
                    };
                    windows.push(Window {
                        host: at,
                        len,
                        soc: (0x100 + k as u64) << 28,
                    });
                    at += len;
                }
                if at < total {
                    let k = windows.len() as u64;
                    windows.push(Window {
                        host: at,
                        len: total - at,
                        soc: (0x100 + k) << 28,
                    });
                }
                // Mappings cut each window's SoC range into pieces at scattered addresses.
                let mut maps = Vec::new();
                let mut va = 0x10_0000_0000usize;
                let mut mi = 0;
                for w in &windows {
                    let mut o = 0;
                    while o < w.len {
                        let l = (mlens[mi % mlens.len()] * P).min(w.len - o);
                        mi += 1;
                        maps.push(Mapping {
                            soc: w.soc + o,
                            len: l,
                            va,
                        });
                        va += l as usize + 3 * P as usize;
                        o += l;
                    }
                }
                (guest, windows, maps)
            })
    }

    /// The reference: one byte through the three tables.
    fn reference(g: &[GuestRange], w: &[Window], m: &[Mapping], ga: u64) -> Option<(usize, u64)> {
        let (r, o) = lookup(g, ga, |r| (r.guest, r.len))?;
        let (win, wo) = lookup(w, r.host + o, |x| (x.host, x.len))?;
        let (map, mo) = lookup(m, win.soc + wo, |x| (x.soc, x.len))?;
        Some((map.va + mo as usize, win.soc + wo))
    }

    proptest! {
        #[test]
        fn window_copies_are_exact_aligned_and_stay_in_range(
            data in prop::collection::vec(any::<u8>(), 0..200),
            off in 0usize..16,
        ) {
            // A "window" with guard bytes on both sides.
            let mut win = vec![0xa5u8; 256 + 32];
            // SAFETY: off + data.len() <= 16 + 200 < 256, inside `win`.
            unsafe { copy_to_window(win.as_mut_ptr().add(16 + off), &data) };
            prop_assert!(win[..16 + off].iter().all(|&b| b == 0xa5));
            prop_assert!(win[16 + off + data.len()..].iter().all(|&b| b == 0xa5));
            prop_assert_eq!(&win[16 + off..16 + off + data.len()], &data[..]);
            let mut back = vec![0u8; data.len()];
            // SAFETY: the same range, readable.
            unsafe { copy_from_window(win.as_ptr().add(16 + off), &mut back) };
            prop_assert_eq!(back, data);
        }

        #[test]
        fn accesses_are_naturally_aligned_and_never_too_wide(addr in any::<usize>(), left in 1usize..64) {
            let w = access_width(addr, left);
            prop_assert!(w <= left && addr % w == 0);
        }

        #[test]
        fn composed_regions_translate_like_the_three_tables(
            (g, w, m) in layout(),
            picks in prop::collection::vec((any::<u8>(), 0u64..6 * 4096, 1u64..3 * 4096), 1..16),
        ) {
            let regions = compose(&g, &w, &m, P).unwrap();
            let a = AddressSpace::new(regions, None).unwrap();
            for (which, off, len) in picks {
                let r = g[which as usize % g.len()];
                let start = r.guest + off % r.len;
                let mut pieces = Vec::new();
                let res = a.translate(start, len, usize::MAX, |p| pieces.push(p));
                let end = start + len;
                if end <= r.guest + r.len {
                    prop_assert!(res.is_ok());
                    // Every byte lands where the three tables say; pieces are cut only at page
                    // boundaries.
                    let mut ga = start;
                    for (i, p) in pieces.iter().enumerate() {
                        if i > 0 {
                            prop_assert_eq!(ga % P, 0);
                        }
                        for k in [0, p.len - 1] {
                            let want = reference(&g, &w, &m, ga + k as u64).unwrap();
                            prop_assert_eq!((p.host + k, p.device + k as u64), want);
                        }
                        ga += p.len as u64;
                    }
                    prop_assert_eq!(ga, end);
                } else if reference(&g, &w, &m, end - 1).is_none() {
                    prop_assert!(res.is_err(), "a range leaving guest memory must fail");
                }
            }
        }

        #[test]
        fn any_tables_are_checked_never_trusted(
            g in prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..4),
            w in prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..4),
            m in prop::collection::vec((any::<u64>(), any::<u64>(), any::<usize>()), 0..4),
            align in any::<bool>(),
        ) {
            let mask = if align { !(P - 1) } else { u64::MAX };
            let g: Vec<_> = g.into_iter().map(|(a, b, c)| GuestRange { guest: a & mask, len: b & mask, host: c & mask }).collect();
            let w: Vec<_> = w.into_iter().map(|(a, b, c)| Window { host: a & mask, len: b & mask, soc: c & mask }).collect();
            let m: Vec<_> = m.into_iter().map(|(a, b, c)| Mapping { soc: a & mask, len: b & mask, va: c & mask as usize }).collect();
            if let Ok(regions) = compose(&g, &w, &m, P) {
                // Whatever was accepted makes a valid address space.
                prop_assert!(AddressSpace::new(regions, None).is_ok());
            }
        }
    }
}
