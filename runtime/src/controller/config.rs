//! The configuration every controller of one NVM subsystem shares.

use super::PAGE_SIZE;
use leap_queues::Status;

/// What a controller is for (Base Specification 2.0, figure 275, CNTRLTYPE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControllerKind {
    /// An I/O controller (CNTRLTYPE 1): namespaces, I/O queues.
    #[default]
    Io,
    /// A discovery controller (CNTRLTYPE 2; NVMe over Fabrics 1.1, section 5): no namespaces,
    /// no I/O queues, the Discovery log page (70h).
    Discovery,
}

impl ControllerKind {
    /// The CNTRLTYPE value.
    pub fn cntrltype(self) -> u8 {
        match self {
            ControllerKind::Io => 1,
            ControllerKind::Discovery => 2,
        }
    }
}

/// Settings shared (through an `Arc`) by all controllers of a subsystem. [`Default`] gives an
/// NVMe/TCP I/O controller; [`ControllerConfig::discovery`] a discovery controller. Check a
/// configuration from a file with [`ControllerConfig::validate`]; the controller copes with any
/// value anyway (strings are truncated, counts clamped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Subsystem NQN (Identify Controller SUBNQN; at most 223 bytes, NVMe Base 2.0 section 4.5).
    pub subnqn: String,
    /// Serial number (SN): at most 20 printable ASCII characters.
    pub serial: String,
    /// Model number (MN): at most 40 printable ASCII characters.
    pub model: String,
    /// Firmware revision (FR): at most 8 printable ASCII characters.
    pub firmware: String,
    /// PCI vendor ID (VID); 0 for a fabrics-only controller.
    pub vid: u16,
    /// PCI subsystem vendor ID (SSVID).
    pub ssvid: u16,
    /// Maximum data transfer size as a power of two of 4 KiB pages (MDTS); 0 means no limit.
    pub mdts: u8,
    /// Most I/O queues a host may be granted (Set Features Number of Queues).
    pub max_io_queues: u16,
    /// Most entries an I/O queue may have (CAP.MQES + 1), 2..=65536; also MAXCMD.
    pub max_queue_entries: u32,
    /// I/O queue command capsule size in 16-byte units (IOCCSZ): 4 for the SQE plus in-capsule
    /// data.
    pub ioccsz: u32,
    /// I/O queue response capsule size in 16-byte units (IORCSZ): at least 1.
    pub iorcsz: u32,
    /// In-capsule data offset in 16-byte units (ICDOFF; 0 for NVMe/TCP).
    pub icdoff: u16,
    /// Command Retry Delay Times 1..3 in 100 ms units (CRDT1..3), selected by a status' CRD.
    pub crdt: [u16; 3],
    /// Keep alive granularity in 100 ms units (KAS); 0: Keep Alive not supported.
    pub kas: u16,
    /// CAP.TO: worst-case time to become ready after CC.EN changes, in 500 ms units.
    pub ready_timeout: u8,
    /// Asynchronous Event Request Limit (AERL, 0-based): up to `aerl + 1` are held.
    pub aerl: u8,
    /// Admin queue size advertised in Discovery log entries (ASQSZ).
    pub admin_queue_entries: u16,
    /// I/O or discovery controller.
    pub kind: ControllerKind,
}

/// The well-known discovery subsystem NQN (NVMe over Fabrics 1.1, section 7.1).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            subnqn: "nqn.2026-01.io.leap:default".into(),
            serial: "LEAP0001".into(),
            model: "Leap virtual NVMe".into(),
            firmware: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
            vid: 0,
            ssvid: 0,
            mdts: 8,
            max_io_queues: 8,
            max_queue_entries: 128,
            // 64-byte SQE plus 8 KiB of in-capsule data.
            ioccsz: 4 + 8192 / 16,
            iorcsz: 1,
            icdoff: 0,
            crdt: [1, 10, 100],
            kas: 10,
            ready_timeout: 15,
            aerl: 3,
            admin_queue_entries: 32,
            kind: ControllerKind::Io,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A string field is too long or not printable ASCII.
    #[error("{field} must be at most {max} printable ASCII characters: {value:?}")]
    BadString {
        /// Which field.
        field: &'static str,
        /// Its limit.
        max: usize,
        /// The value given.
        value: String,
    },
    /// A number is out of range.
    #[error("{field} = {value} is outside {range}")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The allowed range.
        range: &'static str,
    },
}

fn check_ascii(field: &'static str, value: &str, max: usize) -> Result<(), ConfigError> {
    if value.len() <= max && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Ok(())
    } else {
        Err(ConfigError::BadString {
            field,
            max,
            value: value.into(),
        })
    }
}

fn check_range(
    field: &'static str,
    value: u64,
    ok: bool,
    range: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            field,
            value,
            range,
        })
    }
}

impl ControllerConfig {
    /// The configuration of the discovery subsystem (well-known NQN, no I/O queues).
    pub fn discovery() -> Self {
        ControllerConfig {
            subnqn: DISCOVERY_NQN.into(),
            max_io_queues: 1,
            kind: ControllerKind::Discovery,
            ..ControllerConfig::default()
        }
    }

    /// Checks every field against the limits of the specification.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_ascii("serial", &self.serial, 20)?;
        check_ascii("model", &self.model, 40)?;
        check_ascii("firmware", &self.firmware, 8)?;
        if self.subnqn.is_empty() || self.subnqn.len() > 223 {
            return Err(ConfigError::BadString {
                field: "subnqn",
                max: 223,
                value: self.subnqn.clone(),
            });
        }
        // 2^(12 + 20) = 4 GiB is more than any transport moves in one command.
        check_range("mdts", self.mdts as u64, self.mdts <= 20, "0..=20")?;
        check_range(
            "max_io_queues",
            self.max_io_queues as u64,
            (1..=0xfffe).contains(&self.max_io_queues),
            "1..=65534",
        )?;
        check_range(
            "max_queue_entries",
            self.max_queue_entries as u64,
            (2..=65536).contains(&self.max_queue_entries),
            "2..=65536",
        )?;
        check_range("ioccsz", self.ioccsz as u64, self.ioccsz >= 4, "4 or more")?;
        check_range("iorcsz", self.iorcsz as u64, self.iorcsz >= 1, "1 or more")?;
        check_range(
            "admin_queue_entries",
            self.admin_queue_entries as u64,
            (2..=4096).contains(&self.admin_queue_entries),
            "2..=4096",
        )?;
        Ok(())
    }

    /// The largest data transfer of one command in bytes: 2^MDTS × 4 KiB, or `u64::MAX` when
    /// MDTS is 0 (Base Specification 2.0, figure 275).
    pub fn max_transfer_bytes(&self) -> u64 {
        if self.mdts == 0 {
            return u64::MAX;
        }
        // `checked_shl` only refuses shifts of 64 or more; check the value does not overflow.
        let shift = self.mdts as u32 + PAGE_SIZE.trailing_zeros();
        if shift >= u64::BITS {
            u64::MAX
        } else {
            1u64 << shift
        }
    }

    /// Invalid Field in Command if `bytes` exceeds [`ControllerConfig::max_transfer_bytes`].
    pub fn check_transfer(&self, bytes: u64) -> Result<(), Status> {
        if bytes <= self.max_transfer_bytes() {
            Ok(())
        } else {
            Err(Status::INVALID_FIELD)
        }
    }

    /// CAP.MQES + 1 clamped to 2..=65536.
    pub(super) fn queue_entries(&self) -> u32 {
        self.max_queue_entries.clamp(2, 65536)
    }

    /// At least one I/O queue, at most 65534 (QID 65535 does not exist).
    pub(super) fn io_queue_limit(&self) -> u16 {
        self.max_io_queues.clamp(1, 0xfffe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(ControllerConfig::default().validate(), Ok(()));
        assert_eq!(ControllerConfig::discovery().validate(), Ok(()));
        assert_eq!(ControllerConfig::default().max_transfer_bytes(), 1 << 20);
    }

    #[test]
    fn bad_values_are_named() {
        let c = ControllerConfig {
            serial: "x".repeat(21),
            ..ControllerConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BadString {
                field: "serial",
                ..
            })
        ));
        let c = ControllerConfig {
            model: "caf\u{e9}".into(),
            ..ControllerConfig::default()
        };
        assert!(c.validate().is_err());
        let c = ControllerConfig {
            max_queue_entries: 1,
            ..ControllerConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::OutOfRange {
                field: "max_queue_entries",
                ..
            })
        ));
        let c = ControllerConfig {
            mdts: 60,
            ..ControllerConfig::default()
        };
        assert!(c.validate().is_err());
        // Unvalidated, a huge MDTS still gives a sane limit.
        assert_eq!(c.max_transfer_bytes(), u64::MAX);
    }
}
