//! virtio-blk feature bits and configuration space (virtio 1.2, section 5.2.3 and 5.2.4).

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod feature {
    /// Maximum size of any single segment is in `size_max`.
    pub const SIZE_MAX: u32 = 1;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u32 = 2;
    /// Device is read-only.
    pub const RO: u32 = 5;
    /// Block size of disk is in `blk_size`.
    pub const BLK_SIZE: u32 = 6;
    /// Cache flush command support.
    pub const FLUSH: u32 = 9;
    /// Device exports information on optimal I/O alignment.
    pub const TOPOLOGY: u32 = 10;
    /// Device can toggle its cache between writeback and writethrough modes.
    pub const CONFIG_WCE: u32 = 11;
    /// Device supports multiqueue.
    pub const MQ: u32 = 12;
    /// Device can support discard command.
    pub const DISCARD: u32 = 13;
    /// Device can support write zeroes command.
    pub const WRITE_ZEROES: u32 = 14;
    /// Descriptors may be indirect tables.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// vhost-user protocol features are supported.
    pub const VHOST_USER_PROTOCOL_FEATURES: u32 = 30;
    /// Compliance with virtio 1.0 or later.
    pub const VERSION_1: u32 = 32;
}

/// virtio-blk request types (virtio 1.2, 5.2.6).
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Get device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values (virtio 1.2, 5.2.6).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported.
    pub const UNSUPP: u8 = 2;
}

/// Length of a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Size of the configuration space this device exposes (up to `write_zeroes_may_unmap` + pad).
pub const CONFIG_SIZE: usize = 60;
/// Offset of the `writeback` byte.
pub const WRITEBACK_OFFSET: usize = 32;

/// The values of the configuration space, as the device encodes them and a driver decodes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes (`SIZE_MAX`).
    pub size_max: u32,
    /// Most data segments per request (`SEG_MAX`).
    pub seg_max: u32,
    /// Logical block size (`BLK_SIZE`).
    pub blk_size: u32,
    /// log2(physical block / logical block) (`TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (`TOPOLOGY`).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks (`TOPOLOGY`).
    pub min_io_size: u16,
    /// Optimal sustained I/O size in blocks (`TOPOLOGY`).
    pub opt_io_size: u32,
    /// Write-back (true) or write-through cache (`wce`, `CONFIG_WCE`).
    pub writeback: bool,
    /// Number of request queues (`MQ`).
    pub num_queues: u16,
    /// Largest discard in sectors (`DISCARD`).
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors (`WRITE_ZEROES`).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write zeroes with UNMAP may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// The little-endian configuration space layout (virtio 1.2, 5.2.4).
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: legacy geometry (unused).
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[WRITEBACK_OFFSET] = self.writeback as u8;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap as u8;
        b
    }

    /// Decodes a configuration space as read by a driver; `None` if shorter than
    /// [`CONFIG_SIZE`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; CONFIG_SIZE] = b.get(..CONFIG_SIZE)?.try_into().ok()?;
        let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&b[0..8]);
        Some(BlkConfig {
            capacity: u64::from_le_bytes(cap),
            size_max: u32at(8),
            seg_max: u32at(12),
            blk_size: u32at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16at(26),
            opt_io_size: u32at(28),
            writeback: b[WRITEBACK_OFFSET] != 0,
            num_queues: u16at(34),
            max_discard_sectors: u32at(36),
            max_discard_seg: u32at(40),
            discard_sector_alignment: u32at(44),
            max_write_zeroes_sectors: u32at(48),
            max_write_zeroes_seg: u32at(52),
            write_zeroes_may_unmap: b[56] != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_at_spec_offsets() {
        let c = BlkConfig {
            capacity: 0x1122_3344_5566,
            size_max: 1 << 18,
            seg_max: 126,
            blk_size: 4096,
            writeback: true,
            num_queues: 4,
            max_discard_sectors: 99,
            max_discard_seg: 32,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 77,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
            min_io_size: 1,
            ..BlkConfig::default()
        };
        let b = c.to_bytes();
        assert_eq!(b[34], 4, "num_queues at offset 34");
        assert_eq!(b[20..24], 4096u32.to_le_bytes(), "blk_size at offset 20");
        assert_eq!(BlkConfig::from_bytes(&b), Some(c));
        assert_eq!(BlkConfig::from_bytes(&b[..10]), None);
        // virtio-bindings agrees on where the fields are.
        use virtio_bindings::virtio_blk::virtio_blk_config as C;
        assert_eq!(std::mem::offset_of!(C, num_queues), 34);
        assert_eq!(std::mem::offset_of!(C, write_zeroes_may_unmap), 56);
        assert_eq!(std::mem::offset_of!(C, wce), WRITEBACK_OFFSET);
    }
}
