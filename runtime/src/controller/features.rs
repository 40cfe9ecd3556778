//! Get Features and Set Features (Base Specification 2.0, sections 5.15 and 5.27) for the
//! features a fabrics controller needs: Arbitration (01h), Volatile Write Cache (06h), Number of
//! Queues (07h), Interrupt Coalescing (08h), Asynchronous Event Configuration (0Bh), Keep Alive
//! Timer (0Fh) and Host Behavior Support (16h). None is saveable.

use super::config::{ControllerConfig, ControllerKind};
use super::{at, Controller, Done, Fail};
use crate::exec::Namespaces;
use leap_queues::nvme::feature;
use leap_queues::{Sqe, Status};

/// Size of the Host Behavior Support data structure (Base Specification 2.0, figure 363).
pub const HOST_BEHAVIOR_SIZE: usize = 512;

/// Asynchronous Event Configuration bits (Base Specification 2.0, figure 344).
pub mod aec {
    /// SMART / Health critical warnings (bits 7:0).
    pub const SMART_WARNINGS: u32 = 0xff;
    /// Namespace Attribute Notices.
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    /// Discovery Log Page Change Notices (discovery controllers).
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
}

/// Get Features SEL values (Base Specification 2.0, figure 194).
mod sel {
    pub const CURRENT: u32 = 0;
    pub const DEFAULT: u32 = 1;
    pub const SAVED: u32 = 2;
    pub const SUPPORTED_CAPABILITIES: u32 = 3;
}

/// "Changeable" in the capabilities Get Features returns with SEL = 011b (figure 195).
const CAP_CHANGEABLE: u32 = 1 << 2;

/// The current value of every feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Features {
    pub arbitration: u32,
    pub wce: bool,
    /// Granted (submission, completion) I/O queue counts, once the host asked.
    pub queues: Option<(u16, u16)>,
    pub coalescing: u32,
    pub aec: u32,
    pub kato_ms: u32,
    pub acre: bool,
}

impl Features {
    /// Default values: everything off, WCE on when a namespace has a volatile cache.
    pub fn defaults(namespaces: &Namespaces, kato_ms: u32) -> Features {
        Features {
            arbitration: 0,
            wce: has_volatile_cache(namespaces),
            queues: None,
            coalescing: 0,
            aec: 0,
            kato_ms,
            acre: false,
        }
    }

    /// I/O queues the host may connect.
    pub fn io_queues(&self, cfg: &ControllerConfig) -> u16 {
        match self.queues {
            Some((sq, cq)) => sq.min(cq),
            None => cfg.io_queue_limit(),
        }
    }

    /// Number of Queues as dword 0 reports it: 0-based NSQA in 15:0, NCQA in 31:16.
    fn queues_dw0(&self, cfg: &ControllerConfig) -> u32 {
        let max = cfg.io_queue_limit();
        let (sq, cq) = self.queues.unwrap_or((max, max));
        (sq.saturating_sub(1) as u32) | ((cq.saturating_sub(1) as u32) << 16)
    }
}

/// Whether any namespace has a volatile write cache (Identify Controller VWC).
pub(super) fn has_volatile_cache(namespaces: &Namespaces) -> bool {
    namespaces.iter().any(|(_, n)| n.info().volatile_cache)
}

/// `ms` rounded up to the keep alive granularity (KAS × 100 ms; Base Specification 2.0, section
/// 5.27.1.12), saturating.
pub(super) fn round_kato(cfg: &ControllerConfig, ms: u32) -> u32 {
    let step = cfg.kas as u32 * 100;
    if step == 0 || ms == 0 {
        return ms;
    }
    ms.div_ceil(step)
        .checked_mul(step)
        .unwrap_or(u32::MAX - u32::MAX % step)
}

impl Controller {
    /// Whether feature `fid` exists on this controller, and whether Set Features may change it.
    fn feature_info(&self, fid: u8) -> Result<bool, Fail> {
        let io = self.cfg.kind == ControllerKind::Io;
        match fid {
            feature::ASYNC_EVENT_CONFIG => Ok(true),
            feature::KEEP_ALIVE_TIMER if self.cfg.kas != 0 => Ok(true),
            feature::VOLATILE_WRITE_CACHE if io => Ok(has_volatile_cache(&self.namespaces)),
            feature::ARBITRATION
            | feature::NUMBER_OF_QUEUES
            | feature::INTERRUPT_COALESCING
            | feature::HOST_BEHAVIOR_SUPPORT
                if io =>
            {
                Ok(true)
            }
            _ => Err(Fail::field(at::CDW10)),
        }
    }

    fn aec_supported(&self) -> u32 {
        match self.cfg.kind {
            ControllerKind::Io => aec::SMART_WARNINGS | aec::NAMESPACE_ATTRIBUTE,
            ControllerKind::Discovery => aec::DISCOVERY_LOG_CHANGE,
        }
    }

    /// Get Features (Base Specification 2.0, section 5.15). SEL 000b reads the current value,
    /// 001b and 010b the default (nothing is saved), 011b the capabilities.
    pub(super) fn get_features(&mut self, sqe: &Sqe, out: &mut [u8]) -> Result<Done, Fail> {
        let cdw10 = sqe.cdw(10);
        let fid = cdw10 as u8;
        let select = (cdw10 >> 8) & 0x7;
        if select > sel::SUPPORTED_CAPABILITIES {
            return Err(Fail::field(at::CDW10 + 1));
        }
        let changeable = self.feature_info(fid)?;
        if select == sel::SUPPORTED_CAPABILITIES {
            let dw0 = if changeable { CAP_CHANGEABLE } else { 0 };
            return Ok(Done { dw0, bytes: 0 });
        }
        let defaults;
        let f = match select {
            sel::CURRENT => &self.features,
            sel::DEFAULT | sel::SAVED => {
                defaults = Features::defaults(&self.namespaces, self.connect_kato_ms);
                &defaults
            }
            _ => return Err(Fail::field(at::CDW10 + 1)),
        };
        let dw0 = match fid {
            feature::ARBITRATION => f.arbitration,
            feature::VOLATILE_WRITE_CACHE => f.wce as u32,
            feature::NUMBER_OF_QUEUES => f.queues_dw0(&self.cfg),
            feature::INTERRUPT_COALESCING => f.coalescing,
            feature::ASYNC_EVENT_CONFIG => f.aec,
            feature::KEEP_ALIVE_TIMER => f.kato_ms,
            feature::HOST_BEHAVIOR_SUPPORT => {
                let data = out
                    .get_mut(..HOST_BEHAVIOR_SIZE)
                    .ok_or(Fail::from(Status::SGL_LENGTH_INVALID))?;
                data.fill(0);
                data[0] = f.acre as u8;
                return Ok(Done {
                    dw0: 0,
                    bytes: HOST_BEHAVIOR_SIZE,
                });
            }
            _ => return Err(Fail::field(at::CDW10)),
        };
        Ok(Done { dw0, bytes: 0 })
    }

    /// Set Features (Base Specification 2.0, section 5.27). Save (SV) is refused: no feature is
    /// saveable.
    pub(super) fn set_features(&mut self, sqe: &Sqe, host_data: &[u8]) -> Result<Done, Fail> {
        let cdw10 = sqe.cdw(10);
        let fid = cdw10 as u8;
        let cdw11 = sqe.cdw(11);
        // Base Specification 2.0, section 5.27.1.4: without a volatile write cache, setting
        // the Volatile Write Cache feature is Invalid Field in Command.
        if !self.feature_info(fid)? {
            return Err(Fail::field(at::CDW10));
        }
        if cdw10 & (1 << 31) != 0 {
            return Err(Fail::at(Status::FEATURE_NOT_SAVEABLE, at::CDW10 + 3, 7));
        }
        let f = &mut self.features;
        let mut dw0 = 0;
        match fid {
            // AB (2:0) and the priority weights (31:8); bits 7:3 are reserved.
            feature::ARBITRATION => f.arbitration = cdw11 & 0xffff_ff07,
            feature::VOLATILE_WRITE_CACHE => f.wce = cdw11 & 1 != 0,
            feature::NUMBER_OF_QUEUES => {
                // Section 5.27.1.5: NSQR (15:0) and NCQR (31:16) are 0-based; 65535 is invalid.
                let (nsqr, ncqr) = (cdw11 & 0xffff, cdw11 >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Err(Fail::field(at::CDW11));
                }
                let max = self.cfg.io_queue_limit() as u32;
                let grant = |requested: u32| (requested + 1).min(max) as u16;
                f.queues = Some((grant(nsqr), grant(ncqr)));
                dw0 = f.queues_dw0(&self.cfg);
            }
            feature::INTERRUPT_COALESCING => f.coalescing = cdw11 & 0xffff,
            feature::ASYNC_EVENT_CONFIG => {
                if cdw11 & !self.aec_supported() != 0 {
                    return Err(Fail::field(at::CDW11));
                }
                self.features.aec = cdw11;
            }
            feature::KEEP_ALIVE_TIMER => f.kato_ms = round_kato(&self.cfg, cdw11),
            feature::HOST_BEHAVIOR_SUPPORT => {
                let data = host_data
                    .get(..HOST_BEHAVIOR_SIZE)
                    .ok_or(Fail::from(Status::SGL_LENGTH_INVALID))?;
                // Byte 0, ACRE: 0 or 1. Later bytes enable features this controller does not
                // advertise (LBAFEE needs CTRATT.ELBAS); they are accepted and read back as 0.
                f.acre = match data[0] {
                    0 => false,
                    1 => true,
                    _ => return Err(Status::INVALID_FIELD.into()),
                };
            }
            _ => return Err(Fail::field(at::CDW10)),
        }
        Ok(Done { dw0, bytes: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::backend::DiskInfo;
    use leap_queues::nvme::admin;

    fn get(fid: u8, select: u32) -> Sqe {
        let mut s = cmd(admin::GET_FEATURES);
        s.set_cdw(10, fid as u32 | select << 8);
        s
    }

    fn set(fid: u8, cdw11: u32) -> Sqe {
        let mut s = cmd(admin::SET_FEATURES);
        s.set_cdw(10, fid as u32);
        s.set_cdw(11, cdw11);
        s
    }

    fn cached() -> Controller {
        enabled(
            io_config(),
            Namespaces::new(vec![
                ns(disk(1 << 20, 512)),
                ns(DiskInfo {
                    volatile_cache: true,
                    max_transfer: 0,
                    ..disk(1 << 20, 512)
                }),
            ]),
        )
    }

    #[test]
    fn number_of_queues_is_clamped_to_the_maximum() {
        // Arrange: 8 I/O queues at most.
        let mut c = io_controller();
        // Act: the host asks for 64 SQs and 32 CQs (0-based).
        let (status, dw0, _) = run(&mut c, &set(feature::NUMBER_OF_QUEUES, 31 << 16 | 63));
        // Assert
        assert_eq!(status, Status::SUCCESS);
        assert_eq!(dw0, 7 | 7 << 16);
        assert_eq!(c.io_queues(), 8);
        assert_eq!(run(&mut c, &get(feature::NUMBER_OF_QUEUES, 0)).1, dw0);
    }

    #[test]
    fn number_of_queues_grants_fewer_when_asked() {
        let mut c = io_controller();
        let (_, dw0, _) = run(&mut c, &set(feature::NUMBER_OF_QUEUES, 1 << 16 | 2));
        assert_eq!(dw0, 2 | 1 << 16);
        assert_eq!(c.io_queues(), 2, "SQs and CQs come in pairs on fabrics");
        // SEL = default reports the maximum, whatever was granted.
        assert_eq!(
            run(&mut c, &get(feature::NUMBER_OF_QUEUES, 1)).1,
            7 | 7 << 16
        );
    }

    #[test]
    fn number_of_queues_refuses_65535() {
        let mut c = io_controller();
        for v in [0xffff, 0xffff_0000, 0xffff_ffff] {
            assert_eq!(
                run(&mut c, &set(feature::NUMBER_OF_QUEUES, v)).0,
                Status::INVALID_FIELD
            );
        }
        assert_eq!(c.io_queues(), 8);
    }

    #[test]
    fn volatile_write_cache_follows_the_namespaces() {
        // Arrange
        let mut plain = io_controller();
        let mut c = cached();
        // Act / Assert: no cache, nothing to enable.
        assert_eq!(
            run(&mut plain, &set(feature::VOLATILE_WRITE_CACHE, 1)).0,
            Status::INVALID_FIELD
        );
        assert_eq!(run(&mut plain, &get(feature::VOLATILE_WRITE_CACHE, 0)).1, 0);
        assert_eq!(run(&mut plain, &get(feature::VOLATILE_WRITE_CACHE, 3)).1, 0);
        // A cache: on by default, the host may turn it off.
        assert!(c.wce());
        assert_eq!(run(&mut c, &get(feature::VOLATILE_WRITE_CACHE, 0)).1, 1);
        assert_eq!(
            run(&mut c, &set(feature::VOLATILE_WRITE_CACHE, 0)).0,
            Status::SUCCESS
        );
        assert!(!c.wce());
        assert_eq!(run(&mut c, &get(feature::VOLATILE_WRITE_CACHE, 0)).1, 0);
        assert_eq!(run(&mut c, &get(feature::VOLATILE_WRITE_CACHE, 1)).1, 1);
        assert_eq!(
            run(&mut c, &get(feature::VOLATILE_WRITE_CACHE, 3)).1,
            CAP_CHANGEABLE
        );
    }

    #[test]
    fn keep_alive_timer_is_rounded_and_read_back() {
        let mut c = io_controller();
        assert_eq!(run(&mut c, &get(feature::KEEP_ALIVE_TIMER, 0)).1, 5000);
        assert_eq!(
            run(&mut c, &set(feature::KEEP_ALIVE_TIMER, 2500)).0,
            Status::SUCCESS
        );
        assert_eq!(run(&mut c, &get(feature::KEEP_ALIVE_TIMER, 0)).1, 3000);
        assert_eq!(c.kato().as_millis(), 3000);
        assert_eq!(run(&mut c, &get(feature::KEEP_ALIVE_TIMER, 1)).1, 5000);
    }

    #[test]
    fn async_event_config_accepts_only_supported_events() {
        let mut c = io_controller();
        assert_eq!(
            run(&mut c, &set(feature::ASYNC_EVENT_CONFIG, 0x1ff)).0,
            Status::SUCCESS
        );
        assert_eq!(run(&mut c, &get(feature::ASYNC_EVENT_CONFIG, 0)).1, 0x1ff);
        assert_eq!(
            run(&mut c, &set(feature::ASYNC_EVENT_CONFIG, 1 << 9)).0,
            Status::INVALID_FIELD
        );
        assert_eq!(
            run(&mut c, &set(feature::ASYNC_EVENT_CONFIG, 1 << 31)).0,
            Status::INVALID_FIELD
        );
        let mut d = enabled(discovery_config(), Namespaces::new(vec![]));
        assert_eq!(
            run(&mut d, &set(feature::ASYNC_EVENT_CONFIG, 1 << 31)).0,
            Status::SUCCESS
        );
        assert_eq!(
            run(&mut d, &set(feature::ASYNC_EVENT_CONFIG, 1 << 8)).0,
            Status::INVALID_FIELD
        );
    }

    #[test]
    fn host_behavior_support_sets_acre() {
        // Arrange
        let mut c = io_controller();
        let mut data = [0u8; HOST_BEHAVIOR_SIZE];
        data[0] = 1;
        // Act
        let (status, _, _) = run_with(&mut c, &set(feature::HOST_BEHAVIOR_SUPPORT, 0), &data, 0);
        // Assert
        assert_eq!(status, Status::SUCCESS);
        assert!(c.acre());
        let (status, _, out) = run_with(&mut c, &get(feature::HOST_BEHAVIOR_SUPPORT, 0), &[], 512);
        assert_eq!((status, out.len(), out[0]), (Status::SUCCESS, 512, 1));
        let (_, _, out) = run_with(&mut c, &get(feature::HOST_BEHAVIOR_SUPPORT, 1), &[], 512);
        assert_eq!(out[0], 0, "default: ACRE off");
    }

    #[test]
    fn host_behavior_support_checks_its_data() {
        let mut c = io_controller();
        let s = set(feature::HOST_BEHAVIOR_SUPPORT, 0);
        assert_eq!(
            run_with(&mut c, &s, &[1; 100], 0).0,
            Status::SGL_LENGTH_INVALID
        );
        let mut data = [0u8; HOST_BEHAVIOR_SIZE];
        data[0] = 2;
        assert_eq!(run_with(&mut c, &s, &data, 0).0, Status::INVALID_FIELD);
        assert!(!c.acre());
        let g = get(feature::HOST_BEHAVIOR_SUPPORT, 0);
        assert_eq!(run_with(&mut c, &g, &[], 64).0, Status::SGL_LENGTH_INVALID);
    }

    #[test]
    fn arbitration_and_coalescing_are_stored() {
        let mut c = io_controller();
        assert_eq!(
            run(&mut c, &set(feature::ARBITRATION, 0x0302_01ff)).0,
            Status::SUCCESS
        );
        assert_eq!(run(&mut c, &get(feature::ARBITRATION, 0)).1, 0x0302_0107);
        assert_eq!(
            run(&mut c, &get(feature::ARBITRATION, 2)).1,
            0,
            "saved = default"
        );
        assert_eq!(
            run(&mut c, &set(feature::INTERRUPT_COALESCING, 0xdead_0a0b)).0,
            Status::SUCCESS
        );
        assert_eq!(
            run(&mut c, &get(feature::INTERRUPT_COALESCING, 0)).1,
            0x0a0b
        );
    }

    #[test]
    fn save_reserved_select_and_unknown_features_are_refused() {
        let mut c = io_controller();
        let mut save = set(feature::ARBITRATION, 0);
        save.set_cdw(10, feature::ARBITRATION as u32 | 1 << 31);
        assert_eq!(run(&mut c, &save).0, Status::FEATURE_NOT_SAVEABLE);
        assert_eq!(
            run(&mut c, &get(feature::ARBITRATION, 4)).0,
            Status::INVALID_FIELD
        );
        for fid in [0x00, 0x02, 0x09, 0x0e, 0x7f, 0xff] {
            assert_eq!(
                run(&mut c, &get(fid, 0)).0,
                Status::INVALID_FIELD,
                "{fid:#x}"
            );
            assert_eq!(
                run(&mut c, &set(fid, 0)).0,
                Status::INVALID_FIELD,
                "{fid:#x}"
            );
        }
        // Supported capabilities: changeable, not saveable, not namespace specific.
        assert_eq!(run(&mut c, &get(feature::ARBITRATION, 3)).1, CAP_CHANGEABLE);
    }

    #[test]
    fn discovery_controllers_have_only_event_and_keep_alive_features() {
        let mut d = enabled(discovery_config(), Namespaces::new(vec![]));
        for fid in [
            feature::ARBITRATION,
            feature::VOLATILE_WRITE_CACHE,
            feature::NUMBER_OF_QUEUES,
            feature::INTERRUPT_COALESCING,
            feature::HOST_BEHAVIOR_SUPPORT,
        ] {
            assert_eq!(
                run(&mut d, &get(fid, 0)).0,
                Status::INVALID_FIELD,
                "{fid:#x}"
            );
        }
        assert_eq!(
            run(&mut d, &get(feature::KEEP_ALIVE_TIMER, 0)).0,
            Status::SUCCESS
        );
    }

    #[test]
    fn kato_rounding_saturates() {
        let cfg = ControllerConfig::default();
        assert_eq!(round_kato(&cfg, 0), 0);
        assert_eq!(round_kato(&cfg, 1), 1000);
        assert_eq!(round_kato(&cfg, 1000), 1000);
        assert_eq!(round_kato(&cfg, u32::MAX) % 1000, 0);
        let none = ControllerConfig { kas: 0, ..cfg };
        assert_eq!(round_kato(&none, 1234), 1234);
    }
}
