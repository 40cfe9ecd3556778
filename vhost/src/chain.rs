//! Walking one split-ring descriptor chain from its head (virtio 1.2, 2.7.5 and 2.7.5.3).
//!
//! virtio-queue iterates the avail ring, but its `DescriptorChain` can only be built from there;
//! inflight resubmission after a reconnect starts from heads recorded in the inflight region.
//! So every chain, new or resubmitted, is walked here, one way. Everything read comes from guest
//! memory and is checked: head and next indexes in range, no more descriptors than the table
//! they come from has entries (so loops end; an indirect table may be longer than the queue, as
//! Linux makes them), indirect tables well formed and not nested, the total length within 2^32
//! bytes.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

const DESC_BYTES: u64 = 16;

/// Why a chain could not be walked. The chain cannot be trusted (nor completed with a status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index is not below the queue size.
    #[error("head index out of range")]
    Head,
    /// A next index is not below the size of its table.
    #[error("next index out of range")]
    Next,
    /// More descriptors than the table holds: a loop.
    #[error("descriptor loop")]
    Loop,
    /// An indirect descriptor with NEXT set, a bad length, inside another table, or not last.
    #[error("malformed indirect table")]
    Indirect,
    /// A descriptor or table outside guest memory.
    #[error("descriptor outside guest memory")]
    Unmapped,
    /// The chain describes more than 2^32 - 1 bytes.
    #[error("chain longer than 2^32 bytes")]
    TooLong,
    /// The visitor stopped the walk.
    #[error("stopped")]
    Stopped,
}

/// Visits each data descriptor (never an indirect-table pointer) of the chain at `head` of a
/// queue of `size` entries whose table is at `table`. `visit` returns false to stop the walk
/// (which then fails with [`ChainError::Stopped`]).
pub fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
    mut visit: impl FnMut(&Descriptor) -> bool,
) -> Result<(), ChainError> {
    if head >= size {
        return Err(ChainError::Head);
    }
    let mut bytes: u32 = 0;
    let mut count = |d: &Descriptor| -> Result<(), ChainError> {
        bytes = bytes.checked_add(d.len()).ok_or(ChainError::TooLong)?;
        if visit(d) {
            Ok(())
        } else {
            Err(ChainError::Stopped)
        }
    };
    let indirect = match walk_table(mem, table, size, head, &mut count)? {
        None => return Ok(()),
        Some(d) => d,
    };
    // 2.7.5.3.1: NEXT and INDIRECT together are invalid, and an indirect descriptor is the only
    // (hence last) one in the chain that points to a table.
    if indirect.has_next() || indirect.len() == 0 || indirect.len() as u64 % DESC_BYTES != 0 {
        return Err(ChainError::Indirect);
    }
    let n = u16::try_from(indirect.len() as u64 / DESC_BYTES).map_err(|_| ChainError::Indirect)?;
    match walk_table(mem, indirect.addr(), n, 0, &mut count)? {
        None => Ok(()),
        // 2.7.5.3.1: no indirect table inside an indirect table.
        Some(_) => Err(ChainError::Indirect),
    }
}

/// Walks one table of `n` entries (the ring's, or an indirect one) from `start`, handing each
/// data descriptor to `count`, visiting at most `n` (2.7.5.2: no loops). Stops at the chain's end
/// (None) or at a descriptor that points to an indirect table (returned).
fn walk_table<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    n: u16,
    start: u16,
    count: &mut impl FnMut(&Descriptor) -> Result<(), ChainError>,
) -> Result<Option<Descriptor>, ChainError> {
    let mut index = start;
    for _ in 0..n {
        let d = read_desc(mem, table, index)?;
        if d.refers_to_indirect_table() {
            return Ok(Some(d));
        }
        count(&d)?;
        if !d.has_next() {
            return Ok(None);
        }
        index = d.next();
        if index >= n {
            return Err(ChainError::Next);
        }
    }
    Err(ChainError::Loop)
}

fn read_desc<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    index: u16,
) -> Result<Descriptor, ChainError> {
    let addr = table
        .checked_add(index as u64 * DESC_BYTES)
        .ok_or(ChainError::Unmapped)?;
    mem.read_obj::<Descriptor>(addr)
        .map_err(|_| ChainError::Unmapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap<()>, table: u64, i: u16, d: Descriptor) {
        m.write_obj(d, GuestAddress(table + 16 * i as u64)).unwrap();
    }

    fn collect(
        m: &GuestMemoryMmap<()>,
        size: u16,
        head: u16,
    ) -> Result<Vec<(u64, u32)>, ChainError> {
        let mut v = Vec::new();
        walk(m, GuestAddress(0), size, head, |d| {
            v.push((d.addr().0, d.len()));
            true
        })
        .map(|_| v)
    }

    #[test]
    fn direct_chain_in_order() {
        let m = mem();
        put(&m, 0, 3, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&m, 0, 1, Descriptor::new(0x2000, 512, NEXT | WRITE, 2));
        put(&m, 0, 2, Descriptor::new(0x3000, 1, WRITE, 0));
        assert_eq!(
            collect(&m, 8, 3).unwrap(),
            vec![(0x1000, 16), (0x2000, 512), (0x3000, 1)]
        );
    }

    #[test]
    fn bad_heads_nexts_and_loops_are_errors() {
        let m = mem();
        assert_eq!(collect(&m, 8, 8), Err(ChainError::Head));
        put(&m, 0, 0, Descriptor::new(0x1000, 16, NEXT, 9));
        assert_eq!(collect(&m, 8, 0), Err(ChainError::Next));
        put(&m, 0, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&m, 0, 1, Descriptor::new(0x1000, 16, NEXT, 0));
        assert_eq!(collect(&m, 8, 0), Err(ChainError::Loop));
        // A table past the end of guest memory.
        assert_eq!(
            walk(&m, GuestAddress(0xfff8), 8, 1, |_| true),
            Err(ChainError::Unmapped)
        );
    }

    #[test]
    fn indirect_tables_are_walked_and_checked() {
        let m = mem();
        put(&m, 0x800, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&m, 0x800, 1, Descriptor::new(0x2000, 1, WRITE, 0));
        put(&m, 0, 0, Descriptor::new(0x800, 32, INDIRECT, 0));
        assert_eq!(collect(&m, 4, 0).unwrap(), vec![(0x1000, 16), (0x2000, 1)]);
        // NEXT with INDIRECT, a length not a multiple of 16, a nested table.
        put(&m, 0, 0, Descriptor::new(0x800, 32, INDIRECT | NEXT, 1));
        assert_eq!(collect(&m, 4, 0), Err(ChainError::Indirect));
        put(&m, 0, 0, Descriptor::new(0x800, 24, INDIRECT, 0));
        assert_eq!(collect(&m, 4, 0), Err(ChainError::Indirect));
        put(&m, 0, 0, Descriptor::new(0x800, 32, INDIRECT, 0));
        put(&m, 0x800, 1, Descriptor::new(0x900, 16, INDIRECT, 0));
        assert_eq!(collect(&m, 4, 0), Err(ChainError::Indirect));
        // A loop inside the table.
        put(&m, 0x800, 1, Descriptor::new(0x2000, 1, NEXT, 0));
        assert_eq!(collect(&m, 4, 0), Err(ChainError::Loop));
    }

    #[test]
    fn total_length_is_bounded() {
        let m = mem();
        put(&m, 0, 0, Descriptor::new(0x1000, u32::MAX, NEXT, 1));
        put(&m, 0, 1, Descriptor::new(0x1000, 1, 0, 0));
        assert_eq!(collect(&m, 4, 0), Err(ChainError::TooLong));
    }
}
