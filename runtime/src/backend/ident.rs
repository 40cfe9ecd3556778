//! What a real NVMe controller's Identify data says about one namespace, checked before use: the
//! data comes from a device or a remote target and is not trusted.

use super::{BackendError, DiskInfo};

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Identify Controller fields Leap uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerIdent {
    /// Serial number, trimmed.
    pub serial: String,
    /// Model number, trimmed.
    pub model: String,
    /// Maximum data transfer size: 2^mdts units of the minimum page size; 0 = no limit.
    pub mdts: u8,
    /// Number of namespaces.
    pub nn: u32,
    /// Optional NVM command support.
    pub oncs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// SGL support (bits 1:0 non-zero: SGLs for NVM commands).
    pub sgls: u32,
}

impl ControllerIdent {
    /// Parses a 4096-byte Identify Controller page.
    pub fn parse(idc: &[u8]) -> Result<Self, BackendError> {
        if idc.len() < 4096 {
            return Err(BackendError::Invalid(
                "Identify Controller data is short".into(),
            ));
        }
        let text = |r: std::ops::Range<usize>| {
            String::from_utf8_lossy(&idc[r])
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string()
        };
        Ok(ControllerIdent {
            serial: text(4..24),
            model: text(24..64),
            mdts: idc[77],
            nn: u32::from_le_bytes([idc[516], idc[517], idc[518], idc[519]]),
            oncs: le16(idc, 520),
            vwc: idc[525] & 1 != 0,
            sgls: u32::from_le_bytes([idc[536], idc[537], idc[538], idc[539]]),
        })
    }

    /// The largest transfer in bytes given the minimum memory page size (`page_min`), or 0.
    pub fn max_transfer(&self, page_min: u32) -> u32 {
        match self.mdts {
            0 => 0,
            m => page_min.checked_shl(m as u32).unwrap_or(0),
        }
    }
}

/// The disk namespace `nsid` is, from Identify Namespace data `idn` and its controller's `c`;
/// `name` is for messages. Refused: an inactive namespace, a block size other than 512 B to
/// 4 KiB, metadata with each block, or a size that overflows.
pub fn namespace_info(
    c: &ControllerIdent,
    idn: &[u8],
    name: &str,
    nsid: u32,
    max_transfer: u32,
) -> Result<DiskInfo, BackendError> {
    if idn.len() < 4096 {
        return Err(BackendError::Invalid(format!(
            "{name}: Identify Namespace data is short"
        )));
    }
    let nsze = u64::from_le_bytes(idn[0..8].try_into().unwrap_or_default());
    if nsze == 0 {
        return Err(BackendError::Invalid(format!(
            "{name}: namespace {nsid} is not active"
        )));
    }
    let flbas = idn[26];
    let fmt = ((flbas & 0xf) | ((flbas >> 5) & 3) << 4) as usize;
    let lbaf = idn.get(128 + fmt * 4..128 + fmt * 4 + 4).unwrap_or(&[0; 4]);
    let (ms, lbads) = (le16(lbaf, 0), lbaf[2]);
    if !(9..=12).contains(&lbads) {
        return Err(BackendError::Invalid(format!(
            "{name}: logical block size 2^{lbads} is not supported (512 to 4096 bytes)"
        )));
    }
    if ms != 0 {
        return Err(BackendError::Invalid(format!(
            "{name}: namespace {nsid} is formatted with {ms} bytes of metadata per block; \
             Leap needs a format without (nvme format --lbaf)"
        )));
    }
    let block_size = 1u32 << lbads;
    let size = nsze
        .checked_mul(block_size as u64)
        .ok_or_else(|| BackendError::Invalid(format!("{name}: namespace size overflows")))?;
    Ok(DiskInfo {
        size,
        block_size,
        read_only: idn[99] & 1 != 0,
        discard: c.oncs & (1 << 2) != 0,
        write_zeroes: c.oncs & (1 << 3) != 0,
        volatile_cache: c.vwc,
        max_transfer,
        serial: format!("{}-{nsid}", c.serial),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idc() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[4..12].copy_from_slice(b"SN123   ");
        b[77] = 5;
        b[516] = 2;
        b[520] = 0b1100;
        b[525] = 1;
        b
    }

    fn idn(nsze: u64, lbads: u8, ms: u16) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&nsze.to_le_bytes());
        b[26] = 1;
        b[132..134].copy_from_slice(&ms.to_le_bytes());
        b[134] = lbads;
        b
    }

    #[test]
    fn identify_data_is_checked() {
        let c = ControllerIdent::parse(&idc()).unwrap();
        assert_eq!((c.serial.as_str(), c.nn, c.mdts), ("SN123", 2, 5));
        assert_eq!(c.max_transfer(4096), 128 << 10);
        let d = namespace_info(&c, &idn(100, 12, 0), "x", 1, 0).unwrap();
        assert_eq!((d.size, d.block_size), (409600, 4096));
        assert!(d.discard && d.write_zeroes && d.volatile_cache);
        for bad in [
            idn(0, 9, 0),
            idn(1, 13, 0),
            idn(1, 8, 0),
            idn(1, 9, 8),
            idn(u64::MAX, 12, 0),
        ] {
            assert!(namespace_info(&c, &bad, "x", 1, 0).is_err());
        }
        assert!(ControllerIdent::parse(&[0u8; 100]).is_err());
    }
}
