//! virtio-blk requests on top of a [`DriverQueue`] (virtio 1.2 §5.2.6).
//!
//! A request is a chain `header (16 B, device-readable) | data... | status (1 B, writable)`.
//! Header and status live in the scratch slot of the chain's head id, so submitting allocates
//! nothing:
//!
//! ```text
//! slot of head id:  0..16 struct virtio_blk_outhdr | 16 status | 32..128 discard segments
//! ```

use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use super::queue::{Desc, DriverQueue, RawDesc, DESC_F_NEXT, DESC_F_WRITE, SLOT_SCRATCH_BYTES};
use super::DriverError;

/// Size of `struct virtio_blk_outhdr` (type u32, ioprio u32, sector u64).
pub const BLK_OUTHDR_LEN: u32 = 16;

/// What the status byte holds until the device writes it; no virtio-blk status has this value,
/// so a test can tell "device never wrote the status" from a real answer.
pub const STATUS_UNSET: u8 = 0xff;

const STATUS_OFF: usize = 16;
const SEGMENTS_OFF: usize = 32;
const SEGMENT_LEN: usize = 16;

/// Discard / write-zeroes segments that fit in a slot's scratch area.
pub const MAX_INLINE_SEGMENTS: usize = (SLOT_SCRATCH_BYTES - SEGMENTS_OFF) / SEGMENT_LEN;

/// One `struct virtio_blk_discard_write_zeroes` (virtio 1.2 §5.2.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap (write-zeroes only); the rest are reserved and must be zero.
    pub flags: u32,
}

impl DiscardSegment {
    /// The unmap flag of write-zeroes segments.
    pub const FLAG_UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

    /// The 16 little-endian bytes the device reads.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// A data descriptor with the direction `req_type` implies: device-writable for IN and GET_ID,
/// device-readable otherwise.
pub fn blk_data_desc(req_type: u32, addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: matches!(req_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID),
    }
}

/// Adds (does not publish) a virtio-blk request: header `{req_type, ioprio 0, sector}` and a
/// status byte preset to [`STATUS_UNSET`] in the head's scratch slot, with `data` in between
/// exactly as given. Returns the head id; read the status with [`blk_status`] once the device
/// returns it.
///
/// The head will be [`DriverQueue::next_head`], known before the call, and ids are below
/// [`DriverQueue::size`]: a benchmark can give every id its own data buffer
/// (`base + head * block_size`) and so allocate nothing per request.
pub fn submit_blk(
    q: &mut DriverQueue,
    req_type: u32,
    sector: u64,
    data: &[Desc],
) -> Result<u16, DriverError> {
    let head = prepare(q, data.len() + 2, req_type, sector)?;
    let hdr = q.scratch_addr(head);
    let last = data.len() + 1;
    q.push_chain(last + 1, |i, next| {
        let (addr, len, flags) = if i == 0 {
            (hdr, BLK_OUTHDR_LEN, DESC_F_NEXT)
        } else if i == last {
            (hdr + STATUS_OFF as u64, 1, DESC_F_WRITE)
        } else {
            let d = data[i - 1];
            let w = if d.write { DESC_F_WRITE } else { 0 };
            (d.addr, d.len, w | DESC_F_NEXT)
        };
        RawDesc {
            addr,
            len,
            flags,
            next: if i == last { 0 } else { next },
        }
    })
}

/// Adds (does not publish) a DISCARD or WRITE_ZEROES request (or any type, for tests) whose
/// data is `segs`, stored in the head's scratch slot. At most [`MAX_INLINE_SEGMENTS`]; for more,
/// write them into allocated memory and use [`submit_blk`].
pub fn submit_blk_segments(
    q: &mut DriverQueue,
    req_type: u32,
    segs: &[DiscardSegment],
) -> Result<u16, DriverError> {
    if segs.len() > MAX_INLINE_SEGMENTS {
        return Err(DriverError::TooManySegments(segs.len()));
    }
    let head = q
        .next_head()
        .ok_or(DriverError::QueueFull { needed: 3, free: 0 })?;
    for (k, s) in segs.iter().enumerate() {
        let p = q.scratch_ptr(head, SEGMENTS_OFF + k * SEGMENT_LEN);
        // SAFETY: k < MAX_INLINE_SEGMENTS keeps the 16 bytes inside the head's scratch slot;
        // the id is free, so the device is not reading this slot.
        unsafe { p.cast::<[u8; 16]>().write_volatile(s.to_bytes()) };
    }
    let seg_addr = q.scratch_addr(head) + SEGMENTS_OFF as u64;
    let seg_len = (segs.len() * SEGMENT_LEN) as u32;
    submit_blk(q, req_type, 0, &[Desc::readable(seg_addr, seg_len)])
}

/// The status byte of the request headed by `head` ([`STATUS_UNSET`] if the device has not
/// written it). Read it after [`DriverQueue::poll_used`] returned `head`: the Acquire there
/// makes the device's write visible.
pub fn blk_status(q: &DriverQueue, head: u16) -> u8 {
    let p = q.scratch_ptr(head, STATUS_OFF);
    // SAFETY: inside the head's scratch slot (scratch_ptr checks); volatile, shared memory.
    unsafe { p.read_volatile() }
}

/// Submits one request, publishes, and waits for it: returns `(status, used_len)`. For tests
/// with nothing else in flight on `q`: a completion of another chain is an error.
pub fn blk_request(
    q: &mut DriverQueue,
    req_type: u32,
    sector: u64,
    data: &[Desc],
    timeout: Duration,
) -> Result<(u8, u32), DriverError> {
    let head = submit_blk(q, req_type, sector, data)?;
    q.publish_and_kick();
    match q.wait_used(timeout) {
        Some((id, len)) if id == head => Ok((blk_status(q, head), len)),
        Some((got, _)) => Err(DriverError::UnexpectedCompletion {
            expected: head,
            got,
        }),
        None => Err(DriverError::Timeout),
    }
}

/// Checks room for `n` descriptors, then writes the header and presets the status in the slot
/// of the head the chain will get.
fn prepare(q: &mut DriverQueue, n: usize, req_type: u32, sector: u64) -> Result<u16, DriverError> {
    let free = q.free_descriptors();
    let head = match q.next_head() {
        Some(h) if usize::from(free) >= n => h,
        _ => return Err(DriverError::QueueFull { needed: n, free }),
    };
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
    // 4..8: ioprio, 0.
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    let p = q.scratch_ptr(head, 0);
    // SAFETY: the header and status byte lie inside the head's scratch slot; the id is free,
    // so the device is not reading it. Volatile: shared memory. Published by the Release store
    // of avail.idx in publish_and_kick.
    unsafe {
        p.cast::<[u8; 16]>().write_volatile(hdr);
        p.add(STATUS_OFF).write_volatile(STATUS_UNSET);
    }
    Ok(head)
}
