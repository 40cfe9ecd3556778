//! Data buffers of one NVMe/TCP connection: a fixed number of equal slots in one anonymous
//! mapping, sized by configuration (queue depth × largest transfer), so what a connection can
//! hold never depends on what its peer sends.
//!
//! The pool is also the "guest memory" of the target's queue pair: commands handed to the poller
//! point into it through SGL Data Block descriptors at [`BufPool::addr`], and the executor
//! translates those through the pool's [`AddressSpace`] like any other memory. Back ends then
//! read and write the pool directly; the connection sends from it and receives into it.

use crate::addr::{AddressSpace, Region};
use std::sync::Arc;

/// The address the first buffer has in commands (any non-zero base works: it only needs to be
/// what the pool's address space maps).
pub const POOL_BASE: u64 = 0x1_0000_0000;

/// `n` buffers of `slot` bytes each.
pub struct BufPool {
    /// Unmapped when the last user (pool or a retired address space) lets go.
    map: Arc<crate::mem::Anon>,
    slot: usize,
    n: usize,
    aspace: Arc<AddressSpace>,
}

impl BufPool {
    /// A pool of `n` buffers of `slot` bytes (a multiple of 4096). Memory is reserved, not
    /// committed: pages are touched only as transfers use them.
    pub fn new(n: usize, slot: usize) -> std::io::Result<BufPool> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad pool size");
        if n == 0 || slot == 0 || slot % 4096 != 0 {
            return Err(bad());
        }
        let len = n.checked_mul(slot).ok_or_else(bad)?;
        let map = Arc::new(crate::mem::Anon::new(len)?);
        let base = map.ptr();
        let keep: Arc<dyn std::any::Any + Send + Sync> = map.clone();
        let aspace = AddressSpace::new(
            vec![Region {
                guest: POOL_BASE,
                len: len as u64,
                host: base as usize,
                device: POOL_BASE,
            }],
            Some(keep),
        )
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(BufPool {
            map,
            slot,
            n,
            aspace: Arc::new(aspace),
        })
    }

    /// Bytes per buffer.
    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Number of buffers.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the pool has no buffers (never: `new` refuses that).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The address buffer `i` has in commands.
    pub fn addr(&self, i: usize) -> u64 {
        POOL_BASE + (i * self.slot) as u64
    }

    /// Where buffer `i` is in this process, or `None` for an index outside the pool.
    pub fn ptr(&self, i: usize) -> Option<*mut u8> {
        // SAFETY: i < n, so the offset stays inside the mapping.
        (i < self.n).then(|| unsafe { self.map.ptr().add(i * self.slot) })
    }

    /// The address space commands into this pool translate through.
    pub fn address_space(&self) -> &Arc<AddressSpace> {
        &self.aspace
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_translate_into_the_mapping() {
        let p = BufPool::new(4, 8192).unwrap();
        let host = p.ptr(2).unwrap() as usize;
        let mut pieces = Vec::new();
        p.address_space()
            .translate(p.addr(2), 8192, 4, |pc| pieces.push((pc.host, pc.len)))
            .unwrap();
        assert_eq!(pieces, vec![(host, 8192)]);
        assert!(p.ptr(4).is_none());
        assert!(p
            .address_space()
            .translate(p.addr(3) + 4096, 8192, 4, |_| {})
            .is_err());
        assert!(BufPool::new(1, 100).is_err());
    }
}
