//! Controller properties (Base Specification 2.0, section 3.1.4; on fabrics read and written with
//! the Property Get and Property Set commands, NVMe over Fabrics 1.1, sections 3.4 and 3.5) and
//! the enable, reset and shutdown sequences they drive (Base Specification 2.0, sections 3.5.1,
//! 3.6 and 3.7.2).

use super::{Controller, Features};
use leap_queues::identify::NVME_VERSION_2_0;
use leap_queues::Status;

/// Property offsets (Base Specification 2.0, figure 33).
pub mod reg {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1c;
    /// NVM Subsystem Reset (4 bytes; not supported here, but a Fabrics peer may name it).
    pub const NSSR: u32 = 0x20;
}

/// Controller Configuration fields (Base Specification 2.0, figure 41).
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1 << 0;
    /// I/O Command Set Selected (bits 6:4); 000b is the NVM command set.
    pub const CSS_SHIFT: u32 = 4;
    /// Memory Page Size (bits 10:7): 2^(12 + MPS).
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism Selected (bits 13:11); 000b is round robin.
    pub const AMS_SHIFT: u32 = 11;
    /// Shutdown Notification (bits 15:14): 01b normal, 10b abrupt.
    pub const SHN_SHIFT: u32 = 14;
    /// The SHN field.
    pub const SHN_MASK: u32 = 0b11 << SHN_SHIFT;
    /// I/O Submission Queue Entry Size (bits 19:16), a power of two: must be 6 (64 bytes).
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size (bits 23:20), a power of two: must be 4 (16 bytes).
    pub const IOCQES_SHIFT: u32 = 20;
    /// The bits a host may write (CRIME, bit 24, needs CAP.CRMS, which is not advertised).
    pub const WRITABLE: u32 = 0x00ff_fff1;
    /// What a host writes to enable a controller: EN, the NVM command set, 4 KiB pages, round
    /// robin, 64-byte submission and 16-byte completion entries.
    pub const ENABLE: u32 = EN | (6 << IOSQES_SHIFT) | (4 << IOCQES_SHIFT);
    /// SHN = 01b: normal shutdown.
    pub const SHN_NORMAL: u32 = 0b01 << SHN_SHIFT;
}

/// Controller Status fields (Base Specification 2.0, figure 42).
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1 << 0;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status (bits 3:2).
    pub const SHST_SHIFT: u32 = 2;
    /// The SHST field.
    pub const SHST_MASK: u32 = 0b11 << SHST_SHIFT;
    /// SHST = 10b: shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 0b10 << SHST_SHIFT;
}

/// What a Property Set changed that the transport must act on.
#[must_use]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PropertyEffect {
    /// CC.EN went 0 → 1 and the controller is ready (CSTS.RDY = 1).
    pub enabled: bool,
    /// CC.EN went 0 → 1 with settings the controller cannot use (I/O entry sizes other than
    /// 64/16 bytes, another command set, page size or arbitration): CSTS.CFS is set, RDY stays 0,
    /// as Linux nvmet does. The host recovers by clearing CC.EN.
    pub enable_failed: bool,
    /// CC.EN went 1 → 0: a Controller Level Reset (Base Specification 2.0, section 3.7.2). RDY,
    /// features and pending events are reset; the transport must tear down every I/O queue of
    /// the association (NVMe over Fabrics 1.1, section 3.3).
    pub reset: bool,
    /// CC.SHN was set: the controller reports the shutdown complete (CSTS.SHST = 10b). A host
    /// flushes before it shuts a controller with a volatile write cache down; the transport
    /// flushes the back ends too.
    pub shutdown: bool,
    /// Held Asynchronous Event Requests the reset discarded. The transport completes each with
    /// [`Status::ABORTED_SQ_DELETION`] if the admin queue stays up (Linux tears it down anyway).
    pub aborted_aers: Vec<u16>,
}

impl Controller {
    /// The CAP property (Base Specification 2.0, figure 36): MQES, CQR = 1, TO, CSS = NVM command
    /// set (bit 37), MPSMIN = MPSMAX = 0 (4 KiB), DSTRD = 0.
    pub fn cap(&self) -> u64 {
        let mqes = (self.cfg.queue_entries() - 1) as u64;
        mqes | 1 << 16 | (self.cfg.ready_timeout as u64) << 24 | 1 << 37
    }

    /// Reads property `offset` with a `size`-byte access (4 or 8): CAP is 8 bytes; VS, CC and
    /// CSTS are 4. Anything else is Invalid Field in Command (NVMe over Fabrics 1.1, section
    /// 3.4).
    pub fn property_get(&self, offset: u32, size: u8) -> Result<u64, Status> {
        match (offset, size) {
            (reg::CAP, 8) => Ok(self.cap()),
            (reg::VS, 4) => Ok(NVME_VERSION_2_0 as u64),
            (reg::CC, 4) => Ok(self.cc as u64),
            (reg::CSTS, 4) => Ok(self.csts as u64),
            _ => Err(Status::INVALID_FIELD),
        }
    }

    /// Writes property `offset` with a `size`-byte access. Only CC (4 bytes) is writable; the
    /// upper half of an 8-byte value is ignored for it. Read-only or unknown properties are
    /// Invalid Field in Command (NVMe over Fabrics 1.1, section 3.5).
    pub fn property_set(
        &mut self,
        offset: u32,
        size: u8,
        value: u64,
    ) -> Result<PropertyEffect, Status> {
        match (offset, size) {
            (reg::CC, 4) => Ok(self.write_cc(value as u32)),
            _ => Err(Status::INVALID_FIELD),
        }
    }

    fn write_cc(&mut self, value: u32) -> PropertyEffect {
        let new = value & cc::WRITABLE;
        let old = self.cc;
        let mut effect = PropertyEffect::default();
        let (was_on, on) = (old & cc::EN != 0, new & cc::EN != 0);
        let shn = |v: u32| v & cc::SHN_MASK;
        // Base Specification 2.0, section 3.6.1: the host sets SHN while the controller is
        // enabled; it may clear EN in the same write.
        if was_on && shn(new) != 0 && shn(old) == 0 {
            effect.shutdown = true;
        }
        match (was_on, on) {
            (true, false) => {
                effect.aborted_aers = self.reset();
                effect.reset = true;
                self.cc = new;
            }
            (false, true) => {
                self.cc = new;
                if enable_settings_ok(new) {
                    self.csts = csts::RDY;
                    effect.enabled = true;
                } else {
                    self.csts = csts::CFS;
                    effect.enable_failed = true;
                }
            }
            (false, false) => self.cc = new,
            // While enabled only SHN may change (the other fields are fixed by the host until
            // the next reset, section 3.1.4.5).
            (true, true) => {
                self.cc = (old & !cc::SHN_MASK) | shn(new);
                self.csts &= !csts::SHST_MASK;
                if shn(new) != 0 {
                    self.csts |= csts::SHST_COMPLETE;
                }
            }
        }
        effect
    }

    /// Controller Level Reset: CSTS cleared, features back to their defaults, events and held
    /// AERs dropped (returned). The Keep Alive Timeout from Connect stays.
    fn reset(&mut self) -> Vec<u16> {
        self.csts = 0;
        self.features = Features::defaults(&self.namespaces, self.connect_kato_ms);
        self.events.reset()
    }
}

/// Whether a CC value with EN set selects what the controller supports: the NVM command set,
/// 4 KiB pages, round robin arbitration, 64-byte SQEs and 16-byte CQEs (Base Specification 2.0,
/// figure 41).
fn enable_settings_ok(v: u32) -> bool {
    let field = |shift: u32, mask: u32| (v >> shift) & mask;
    field(cc::CSS_SHIFT, 0x7) == 0
        && field(cc::MPS_SHIFT, 0xf) == 0
        && field(cc::AMS_SHIFT, 0x7) == 0
        && field(cc::IOSQES_SHIFT, 0xf) == 6
        && field(cc::IOCQES_SHIFT, 0xf) == 4
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::exec::Namespaces;
    use leap_queues::nvme::{admin, feature};

    fn fresh() -> Controller {
        controller_with(io_config(), Namespaces::single(ns(disk(1 << 20, 512))))
    }

    #[test]
    fn cap_and_vs_describe_the_controller() {
        // Arrange
        let c = fresh();
        // Act
        let cap = c.property_get(reg::CAP, 8).unwrap();
        let vs = c.property_get(reg::VS, 4).unwrap();
        // Assert
        assert_eq!(cap & 0xffff, 127, "MQES: 128 entries, 0-based");
        assert_eq!((cap >> 16) & 1, 1, "CQR");
        assert_eq!((cap >> 17) & 3, 0, "AMS: round robin only");
        assert_eq!((cap >> 24) & 0xff, 15, "TO");
        assert_eq!((cap >> 32) & 0xf, 0, "DSTRD");
        assert_eq!((cap >> 37) & 0xff, 1, "CSS: NVM command set only");
        assert_eq!((cap >> 48) & 0xff, 0, "MPSMIN = MPSMAX = 4 KiB");
        assert_eq!(vs, 0x0002_0000);
    }

    #[test]
    fn property_sizes_and_offsets_are_checked() {
        let mut c = fresh();
        assert_eq!(c.property_get(reg::CAP, 4), Err(Status::INVALID_FIELD));
        assert_eq!(c.property_get(reg::CC, 8), Err(Status::INVALID_FIELD));
        assert_eq!(c.property_get(0x04, 4), Err(Status::INVALID_FIELD));
        assert_eq!(c.property_get(0x20, 4), Err(Status::INVALID_FIELD));
        assert_eq!(c.property_get(reg::VS, 3), Err(Status::INVALID_FIELD));
        for (offset, size) in [
            (reg::CAP, 8),
            (reg::VS, 4),
            (reg::CSTS, 4),
            (0x20, 4),
            (reg::CC, 8),
        ] {
            assert_eq!(
                c.property_set(offset, size, 1),
                Err(Status::INVALID_FIELD),
                "{offset:#x}/{size}"
            );
        }
        assert_eq!(c.property_get(reg::CSTS, 4), Ok(0));
    }

    #[test]
    fn linux_enable_sequence_makes_the_controller_ready() {
        // Arrange: Linux first writes CC with the entry sizes and EN = 0, then sets EN.
        let mut c = fresh();
        // Act
        let first = c.property_set(reg::CC, 4, LINUX_CC_ENABLE & !1).unwrap();
        let ready_before = c.property_get(reg::CSTS, 4).unwrap();
        let second = c.property_set(reg::CC, 4, LINUX_CC_ENABLE).unwrap();
        // Assert
        assert_eq!(first, PropertyEffect::default());
        assert_eq!(ready_before & csts::RDY as u64, 0);
        assert!(second.enabled && !second.reset);
        assert_eq!(c.property_get(reg::CSTS, 4), Ok(1));
        assert_eq!(c.property_get(reg::CC, 4), Ok(LINUX_CC_ENABLE));
        assert!(c.is_ready());
    }

    #[test]
    fn enabling_with_wrong_entry_sizes_is_fatal_until_reset() {
        for bad in [
            (7 << 16) | (4 << 20) | 1,
            (6 << 16) | (5 << 20) | 1,
            1,
            LINUX_CC_ENABLE | (1 << 4),
            LINUX_CC_ENABLE | (1 << 7),
            LINUX_CC_ENABLE | (1 << 11),
        ] {
            // Arrange
            let mut c = fresh();
            // Act
            let e = c.property_set(reg::CC, 4, bad).unwrap();
            // Assert
            assert!(e.enable_failed && !e.enabled, "{bad:#x}");
            assert_eq!(c.property_get(reg::CSTS, 4), Ok(csts::CFS as u64));
            assert!(!c.is_ready());
            let r = c.property_set(reg::CC, 4, 0).unwrap();
            assert!(r.reset);
            assert_eq!(c.property_get(reg::CSTS, 4), Ok(0));
            assert!(c.property_set(reg::CC, 4, LINUX_CC_ENABLE).unwrap().enabled);
        }
    }

    #[test]
    fn disabling_resets_features_and_drops_held_aers() {
        // Arrange: an enabled controller with WCE off, a queue count and a held AER.
        let mut c = enabled(
            io_config(),
            Namespaces::single(ns(crate::backend::DiskInfo {
                volatile_cache: true,
                max_transfer: 0,
                ..disk(1 << 20, 512)
            })),
        );
        let mut vwc = cmd(admin::SET_FEATURES);
        vwc.set_cdw(10, feature::VOLATILE_WRITE_CACHE as u32);
        assert_eq!(run(&mut c, &vwc).0, Status::SUCCESS);
        let mut noq = cmd(admin::SET_FEATURES);
        noq.set_cdw(10, feature::NUMBER_OF_QUEUES as u32);
        noq.set_cdw(11, 0x0001_0001);
        assert_eq!(run(&mut c, &noq).0, Status::SUCCESS);
        let aer = leap_queues::Sqe::new(admin::ASYNC_EVENT_REQUEST, 77);
        assert_eq!(
            c.admin(&aer, &[], &mut []),
            super::super::AdminOutcome::Held
        );
        assert!(!c.wce());
        assert_eq!(c.io_queues(), 2);
        // Act
        let e = c.property_set(reg::CC, 4, LINUX_CC_ENABLE & !1).unwrap();
        // Assert
        assert!(e.reset && !e.enabled);
        assert_eq!(e.aborted_aers, vec![77]);
        assert_eq!(c.property_get(reg::CSTS, 4), Ok(0));
        assert!(c.wce(), "WCE back to its default");
        assert_eq!(c.io_queues(), 8, "queue count back to its default");
        assert_eq!(c.kato().as_millis(), 5000, "KATO from Connect kept");
        assert_eq!(run(&mut c, &noq).0, super::super::COMMAND_SEQUENCE_ERROR);
        assert_eq!(c.take_event_completion(), None);
    }

    #[test]
    fn shutdown_reports_complete_and_a_reset_clears_it() {
        // Arrange
        let mut c = io_controller();
        // Act: normal shutdown (SHN = 01b) with EN still set.
        let e = c
            .property_set(reg::CC, 4, LINUX_CC_ENABLE | (1 << 14))
            .unwrap();
        // Assert
        assert!(e.shutdown && !e.reset);
        let status = c.property_get(reg::CSTS, 4).unwrap() as u32;
        assert_eq!(status & csts::SHST_MASK, csts::SHST_COMPLETE);
        assert_eq!(status & csts::RDY, csts::RDY);
        // Writing the same SHN again is not a new shutdown.
        let again = c
            .property_set(reg::CC, 4, LINUX_CC_ENABLE | (1 << 14))
            .unwrap();
        assert!(!again.shutdown);
        // A reset clears SHST; enabling again works.
        assert!(c.property_set(reg::CC, 4, 0).unwrap().reset);
        assert_eq!(c.property_get(reg::CSTS, 4), Ok(0));
        assert!(c.property_set(reg::CC, 4, LINUX_CC_ENABLE).unwrap().enabled);
    }

    #[test]
    fn abrupt_shutdown_with_disable_reports_both() {
        let mut c = io_controller();
        let e = c.property_set(reg::CC, 4, 2 << 14).unwrap();
        assert!(e.shutdown && e.reset);
        assert!(!c.is_ready());
    }

    #[test]
    fn settings_are_fixed_while_enabled() {
        // Arrange
        let mut c = io_controller();
        // Act: try to change IOSQES while enabled.
        let e = c
            .property_set(reg::CC, 4, (LINUX_CC_ENABLE & !(0xf << 16)) | (7 << 16))
            .unwrap();
        // Assert
        assert_eq!(e, PropertyEffect::default());
        assert_eq!(c.property_get(reg::CC, 4), Ok(LINUX_CC_ENABLE));
        assert!(c.is_ready());
    }

    #[test]
    fn reserved_cc_bits_read_as_zero() {
        let mut c = fresh();
        let _ = c.property_set(reg::CC, 4, 0xffff_ffff_ff00_000e).unwrap();
        assert_eq!(c.property_get(reg::CC, 4), Ok(0));
    }
}
