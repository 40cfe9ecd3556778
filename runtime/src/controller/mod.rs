//! An NVMe controller as pure logic: properties (CAP, VS, CC, CSTS), admin commands (Identify,
//! Get/Set Features, Get Log Page, Keep Alive, Asynchronous Event Request, Abort) and the state
//! they change, for one host association.
//!
//! Nothing here does I/O or knows the transport. The NVMe/TCP target decodes capsules, calls
//! [`Controller::property_get`] / [`Controller::property_set`] for the Fabrics Property commands
//! and [`Controller::admin`] for everything else on the admin queue, and acts on what comes back:
//!
//! | result | the transport must |
//! |---|---|
//! | [`PropertyEffect::reset`] | tear down every I/O queue of the association; complete the AERs in [`PropertyEffect::aborted_aers`] (or drop them with the admin queue) |
//! | [`PropertyEffect::shutdown`] | flush the back ends (the host already sees CSTS.SHST = complete) |
//! | [`AdminOutcome::Held`] | keep the command outstanding; complete it later with [`Controller::take_event_completion`] |
//! | [`Controller::io_queues`] | refuse a Connect for an I/O queue whose QID exceeds it |
//! | [`Controller::wce`] | set FUA on writes to namespaces with a volatile cache while it is off |
//! | [`Controller::keep_alive_expired`] | end the association (NVMe over Fabrics 1.1, section 3.2.1.3) |
//!
//! Everything a host sends is hostile: every field is checked, arithmetic is checked, and a
//! command never panics the controller (a property test drives random entries through it).
//!
//! Files: `config` (the subsystem-wide [`ControllerConfig`]), `props` (controller properties),
//! `identify`, `features`, `logs` (log pages, the error ring, discovery log encoding) and
//! `events` (asynchronous events).

mod config;
mod events;
mod features;
mod identify;
mod logs;
mod props;

pub use config::{ConfigError, ControllerConfig, ControllerKind, DISCOVERY_NQN};
pub use features::{aec, HOST_BEHAVIOR_SIZE};
pub use identify::{nidt, NamespaceIds, CNS_CS_CONTROLLER, CNS_CS_INDEPENDENT_NAMESPACE};
pub use logs::{
    discovery, lid, DiscoveryEntryInfo, DiscoverySnapshot, DiscoverySource, ErrorInfo,
    HealthCounters, HealthSource, CHANGED_NS_MAX, ERROR_LOG_ENTRIES,
};
pub use props::{cc, csts, reg, PropertyEffect};

use crate::exec::Namespaces;
use events::Events;
use features::Features;
use leap_queues::nvme::{admin, StatusCodeType};
use leap_queues::{Sqe, Status};
use logs::{ChangedNamespaces, ErrorLog};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Command Sequence Error (Base Specification 2.0, figure 94, 0Ch): the command is not allowed in
/// the controller's current state, e.g. an admin command while CC.EN or CSTS.RDY is 0.
pub const COMMAND_SEQUENCE_ERROR: Status = Status::new(StatusCodeType::Generic, 0x0c).with_dnr();
/// Asynchronous Event Request Limit Exceeded (Base Specification 2.0, figure 141, 05h): more
/// than AERL + 1 Asynchronous Event Requests are outstanding.
pub const AER_LIMIT_EXCEEDED: Status =
    Status::new(StatusCodeType::CommandSpecific, 0x05).with_dnr();
/// Invalid Log Page (Base Specification 2.0, figure 198, 09h): the log page is not supported.
pub const INVALID_LOG_PAGE: Status = Status::new(StatusCodeType::CommandSpecific, 0x09).with_dnr();

/// NVMe memory page size the controller supports (CAP.MPSMIN = CAP.MPSMAX = 0): 4 KiB. MDTS is
/// in units of it.
pub const PAGE_SIZE: u64 = 4096;

/// How an admin command ended (Base Specification 2.0, section 4.2: the completion queue entry).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminOutcome {
    /// Send a completion now.
    Complete {
        /// Completion status.
        status: Status,
        /// CQE dword 0 (command specific).
        dw0: u32,
        /// CQE dword 1 (command specific).
        dw1: u32,
        /// How many leading bytes of `out` are the command's controller-to-host data; the rest of
        /// `out` is zeroed and need not be sent.
        bytes: usize,
    },
    /// An Asynchronous Event Request the controller keeps outstanding (Base Specification 2.0,
    /// section 5.2): no completion now. [`Controller::take_event_completion`] hands it back when
    /// an event is to be reported.
    Held,
}

impl AdminOutcome {
    /// The status, or `None` for a held command.
    pub fn status(&self) -> Option<Status> {
        match self {
            AdminOutcome::Complete { status, .. } => Some(*status),
            AdminOutcome::Held => None,
        }
    }
}

/// A failed command: the status and where in the command the bad field is (Parameter Error
/// Location of the Error Information log, Base Specification 2.0, figure 206: byte in bits 7:0,
/// bit in bits 10:8; 0xFFFF when not applicable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fail {
    status: Status,
    loc: u16,
}

impl Fail {
    /// `status` caused by bit `bit` of byte `byte` of the submission queue entry.
    fn at(status: Status, byte: u8, bit: u8) -> Fail {
        Fail {
            status,
            loc: byte as u16 | (((bit & 7) as u16) << 8),
        }
    }
    /// Invalid Field in Command at byte `byte` (bit 0).
    fn field(byte: u8) -> Fail {
        Fail::at(Status::INVALID_FIELD, byte, 0)
    }
}

impl From<Status> for Fail {
    fn from(status: Status) -> Fail {
        Fail {
            status,
            loc: 0xffff,
        }
    }
}

/// Byte offsets of submission queue entry fields, for error locations.
mod at {
    pub const FUSE: u8 = 1;
    pub const NSID: u8 = 4;
    pub const DPTR: u8 = 24;
    pub const CDW10: u8 = 40;
    pub const CDW11: u8 = 44;
    pub const CDW12: u8 = 48;
    pub const CDW14: u8 = 56;
}

/// A successful command: CQE dword 0 and the number of data bytes in `out`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Done {
    dw0: u32,
    bytes: usize,
}

enum Reply {
    Done(Done),
    Held,
}

impl From<Done> for Reply {
    fn from(d: Done) -> Reply {
        Reply::Done(d)
    }
}

/// One controller of an NVM subsystem, for one host association (NVMe over Fabrics 1.1, section
/// 3.3: created when the host's admin queue connects, gone when the association ends).
pub struct Controller {
    cfg: Arc<ControllerConfig>,
    cntlid: u16,
    hostnqn: String,
    hostid: [u8; 16],
    namespaces: Arc<Namespaces>,
    health: Option<Arc<dyn HealthSource>>,
    discovery: Option<Arc<dyn DiscoverySource>>,
    /// Controller Configuration property (writable bits only).
    cc: u32,
    /// Controller Status property.
    csts: u32,
    features: Features,
    /// KATO from the Connect command: the Keep Alive Timer's default.
    connect_kato_ms: u32,
    last_keep_alive: Instant,
    events: Events,
    errors: ErrorLog,
    changed: ChangedNamespaces,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("subnqn", &self.cfg.subnqn)
            .field("cntlid", &self.cntlid)
            .field("hostnqn", &self.hostnqn)
            .field("cc", &format_args!("{:#x}", self.cc))
            .field("csts", &format_args!("{:#x}", self.csts))
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A disabled controller (CC.EN = 0, CSTS.RDY = 0) for the host `hostnqn` / `hostid` that
    /// connected with Keep Alive Timeout `kato_ms` (NVMe over Fabrics 1.1, figure 20: Connect
    /// command), serving `namespaces`. The host enables it through Property Set of CC.
    ///
    /// `kato_ms` is rounded up to the keep alive granularity (KAS); 0 disables the timer.
    pub fn new(
        cfg: Arc<ControllerConfig>,
        cntlid: u16,
        hostnqn: &str,
        hostid: [u8; 16],
        kato_ms: u32,
        namespaces: Arc<Namespaces>,
    ) -> Controller {
        let kato_ms = features::round_kato(&cfg, kato_ms);
        let features = Features::defaults(&namespaces, kato_ms);
        Controller {
            errors: ErrorLog::default(),
            changed: ChangedNamespaces::default(),
            events: Events::default(),
            features,
            connect_kato_ms: kato_ms,
            last_keep_alive: Instant::now(),
            cc: 0,
            csts: 0,
            health: None,
            discovery: None,
            cntlid,
            hostnqn: hostnqn.to_owned(),
            hostid,
            namespaces,
            cfg,
        }
    }

    /// Reports the SMART / Health Information log (02h) from `source`; without one the counters
    /// read 0.
    pub fn with_health(mut self, source: Arc<dyn HealthSource>) -> Controller {
        self.health = Some(source);
        self
    }

    /// Serves the Discovery log page (70h) from `source`; only discovery controllers use it.
    /// Without one the log has no records.
    pub fn with_discovery(mut self, source: Arc<dyn DiscoverySource>) -> Controller {
        self.discovery = Some(source);
        self
    }

    /// The subsystem configuration.
    pub fn config(&self) -> &Arc<ControllerConfig> {
        &self.cfg
    }
    /// The controller ID (CNTLID) the Connect response carries.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }
    /// The host NQN of the association.
    pub fn hostnqn(&self) -> &str {
        &self.hostnqn
    }
    /// The host identifier of the association.
    pub fn hostid(&self) -> [u8; 16] {
        self.hostid
    }
    /// The namespaces the controller serves.
    pub fn namespaces(&self) -> &Arc<Namespaces> {
        &self.namespaces
    }

    /// Replaces the namespace table (attach, detach, resize) and records every NSID whose
    /// namespace changed in the Changed Namespace List, raising a Namespace Attribute Changed
    /// event if the host enabled it (Base Specification 2.0, section 5.27.1.3).
    pub fn set_namespaces(&mut self, namespaces: Arc<Namespaces>) {
        let old = std::mem::replace(&mut self.namespaces, namespaces);
        let changed: Vec<u32> = Namespaces::changed(&old, &self.namespaces)
            .map(|(nsid, _)| nsid)
            .collect();
        for nsid in changed {
            self.notify_namespace_changed(nsid);
        }
    }

    /// Whether CC.EN is set and CSTS.RDY reports ready: the controller processes admin commands.
    pub fn is_ready(&self) -> bool {
        self.cc & cc::EN != 0 && self.csts & csts::RDY != 0
    }

    /// The largest data transfer one command may have, in bytes: 2^MDTS pages of 4 KiB
    /// (Base Specification 2.0, figure 275, MDTS), or `u64::MAX` when MDTS is 0 (no limit).
    pub fn max_transfer_bytes(&self) -> u64 {
        self.cfg.max_transfer_bytes()
    }

    /// Checks a command's transfer length against MDTS: Invalid Field in Command beyond it. The
    /// transport uses it for I/O commands too.
    pub fn check_transfer(&self, bytes: u64) -> Result<(), Status> {
        self.cfg.check_transfer(bytes)
    }

    /// Volatile Write Cache Enable (feature 06h, Base Specification 2.0, section 5.27.1.4).
    /// While it is off, the transport sets FUA on writes to namespaces with a volatile cache.
    pub fn wce(&self) -> bool {
        self.features.wce
    }

    /// Advanced Command Retry Enable from Host Behavior Support (feature 16h): when set, the host
    /// honours the CRD field, so the target may answer with retryable statuses carrying a delay.
    pub fn acre(&self) -> bool {
        self.features.acre
    }

    /// The number of I/O queues granted through Set Features Number of Queues (feature 07h), or
    /// the maximum (the feature's default) before the host set it. The transport refuses a
    /// Connect whose QID is above it.
    pub fn io_queues(&self) -> u16 {
        self.features.io_queues(&self.cfg)
    }

    /// The Keep Alive Timeout in force (0: the timer is disabled).
    pub fn kato(&self) -> Duration {
        Duration::from_millis(self.features.kato_ms as u64)
    }

    /// Records keep-alive traffic at `now` (Keep Alive does this itself).
    pub fn touch(&mut self, now: Instant) {
        if now > self.last_keep_alive {
            self.last_keep_alive = now;
        }
    }

    /// When the keep alive timer expires if no Keep Alive arrives first, or `None` when it is
    /// disabled (NVMe over Fabrics 1.1, section 3.2.1.3; Base Specification 2.0, section 3.9).
    pub fn keep_alive_deadline(&self) -> Option<Instant> {
        match self.kato() {
            k if k.is_zero() => None,
            k => self.last_keep_alive.checked_add(k),
        }
    }

    /// Whether the Keep Alive Timeout passed at `now` without a Keep Alive command: the
    /// transport then ends the association.
    pub fn keep_alive_expired(&self, now: Instant) -> bool {
        match self.keep_alive_deadline() {
            Some(deadline) => now > deadline,
            None => false,
        }
    }

    /// Executes admin command `sqe` at the current time; see [`Controller::admin_at`].
    pub fn admin(&mut self, sqe: &Sqe, host_data: &[u8], out: &mut [u8]) -> AdminOutcome {
        self.admin_at(Instant::now(), sqe, host_data, out)
    }

    /// Executes admin command `sqe` received at `now`. `host_data` is the command's
    /// host-to-controller data (e.g. Set Features Host Behavior Support), `out` the
    /// controller-to-host buffer, as long as the command's data transfer. Both are refused beyond
    /// MDTS. A failed command is recorded in the Error Information log.
    ///
    /// Fabrics commands (opcode 7Fh: Connect, Property Get/Set) belong to the transport, which
    /// calls [`Controller::property_get`] / [`Controller::property_set`]; here they are an
    /// invalid opcode, like Create/Delete I/O Queue (NVMe over Fabrics 1.1, section 2.1: I/O
    /// queues are created with Connect).
    pub fn admin_at(
        &mut self,
        now: Instant,
        sqe: &Sqe,
        host_data: &[u8],
        out: &mut [u8],
    ) -> AdminOutcome {
        out.fill(0);
        match self.dispatch(now, sqe, host_data, out) {
            Ok(Reply::Held) => AdminOutcome::Held,
            Ok(Reply::Done(d)) => AdminOutcome::Complete {
                status: Status::SUCCESS,
                dw0: d.dw0,
                dw1: 0,
                bytes: d.bytes.min(out.len()),
            },
            Err(f) => {
                out.fill(0);
                self.errors.record(ErrorInfo {
                    param_location: f.loc,
                    nsid: sqe.nsid(),
                    ..ErrorInfo::new(0, sqe.cid(), f.status)
                });
                AdminOutcome::Complete {
                    status: f.status,
                    dw0: 0,
                    dw1: 0,
                    bytes: 0,
                }
            }
        }
    }

    fn dispatch(
        &mut self,
        now: Instant,
        sqe: &Sqe,
        host_data: &[u8],
        out: &mut [u8],
    ) -> Result<Reply, Fail> {
        // Base Specification 2.0, section 3.5.1 and NVMe over Fabrics 1.1, section 3.5: only
        // Fabrics commands are processed until the host has enabled the controller.
        if !self.is_ready() {
            return Err(COMMAND_SEQUENCE_ERROR.into());
        }
        if sqe.fuse() != 0 {
            return Err(Fail::at(Status::INVALID_FIELD, at::FUSE, 0));
        }
        let too_long = |n: usize| self.cfg.check_transfer(n as u64).is_err();
        if too_long(out.len()) || too_long(host_data.len()) {
            return Err(Fail::field(at::DPTR));
        }
        match sqe.opcode() {
            admin::IDENTIFY => self.identify(sqe, out).map(Reply::from),
            admin::GET_FEATURES => self.get_features(sqe, out).map(Reply::from),
            admin::SET_FEATURES => self.set_features(sqe, host_data).map(Reply::from),
            admin::GET_LOG_PAGE => self.get_log_page(sqe, out).map(Reply::from),
            admin::ASYNC_EVENT_REQUEST => self.async_event_request(sqe),
            admin::KEEP_ALIVE if self.cfg.kas != 0 => {
                self.touch(now);
                Ok(Done::default().into())
            }
            // Base Specification 2.0, section 5.1: dword 0 bit 0 set means "not aborted".
            admin::ABORT => Ok(Done { dw0: 1, bytes: 0 }.into()),
            _ => Err(Status::INVALID_OPCODE.into()),
        }
    }

    /// Adds an entry to the Error Information log (01h; Base Specification 2.0, section 5.16.1.2)
    /// for a command the transport failed, e.g. an I/O command. Failed admin commands are
    /// recorded by [`Controller::admin`] itself.
    pub fn record_error(&mut self, e: ErrorInfo) {
        self.errors.record(e);
    }

    /// The number of errors recorded over the controller's life.
    pub fn error_count(&self) -> u64 {
        self.errors.total()
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builders shared by the controller tests.

    use super::*;
    use crate::backend::{Backend, BackendError, BackendQueue, DiskInfo};
    use crate::exec::Namespace;
    use leap_queues::nvme::admin;

    /// A back end that only describes a disk.
    pub struct InfoBackend(pub DiskInfo);

    impl Backend for InfoBackend {
        fn info(&self) -> &DiskInfo {
            &self.0
        }
        fn open_queue(&self, _depth: usize) -> Result<Box<dyn BackendQueue>, BackendError> {
            Err(BackendError::Invalid("test back end".into()))
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    /// A disk of `size` bytes with `block_size`-byte blocks and no optional features.
    pub fn disk(size: u64, block_size: u32) -> DiskInfo {
        DiskInfo {
            size,
            block_size,
            read_only: false,
            discard: false,
            write_zeroes: false,
            volatile_cache: false,
            max_transfer: 0,
            serial: "test".into(),
        }
    }

    /// A namespace over `info`.
    pub fn ns(info: DiskInfo) -> Arc<Namespace> {
        Namespace::new(Arc::new(InfoBackend(info)))
    }

    /// The configuration of an I/O controller for the subsystem `nqn.2026-01.io.leap:test`.
    pub fn io_config() -> Arc<ControllerConfig> {
        Arc::new(ControllerConfig {
            subnqn: "nqn.2026-01.io.leap:test".into(),
            ..ControllerConfig::default()
        })
    }

    /// A discovery controller configuration.
    pub fn discovery_config() -> Arc<ControllerConfig> {
        Arc::new(ControllerConfig::discovery())
    }

    /// A disabled controller (CNTLID 7, KATO 5 s) over `namespaces`.
    pub fn controller_with(cfg: Arc<ControllerConfig>, namespaces: Arc<Namespaces>) -> Controller {
        Controller::new(
            cfg,
            7,
            "nqn.2014-08.org.nvmexpress:uuid:host",
            [9; 16],
            5000,
            namespaces,
        )
    }

    /// The CC value Linux writes to enable a controller.
    pub const LINUX_CC_ENABLE: u64 = (6 << 16) | (4 << 20) | 1;

    /// An enabled controller.
    pub fn enabled(cfg: Arc<ControllerConfig>, namespaces: Arc<Namespaces>) -> Controller {
        let mut c = controller_with(cfg, namespaces);
        let e = c
            .property_set(reg::CC, 4, LINUX_CC_ENABLE)
            .expect("CC write");
        assert!(e.enabled && c.is_ready());
        c
    }

    /// An enabled I/O controller with one 1 MiB namespace of 512-byte blocks.
    pub fn io_controller() -> Controller {
        enabled(io_config(), Namespaces::single(ns(disk(1 << 20, 512))))
    }

    /// A zeroed command with opcode `opcode` and CID 0x42.
    pub fn cmd(opcode: u8) -> Sqe {
        Sqe::new(opcode, 0x42)
    }

    /// An Identify command for `cns` and `nsid`.
    pub fn identify(cns: u8, nsid: u32) -> Sqe {
        let mut s = cmd(admin::IDENTIFY);
        s.set_cdw(10, cns as u32);
        s.set_nsid(nsid);
        s
    }

    /// Runs `sqe` with no host data and a 4096-byte buffer; returns (status, dw0, data).
    pub fn run(c: &mut Controller, sqe: &Sqe) -> (Status, u32, Vec<u8>) {
        run_with(c, sqe, &[], 4096)
    }

    /// Runs `sqe` with `host_data` and an `out_len`-byte buffer.
    pub fn run_with(
        c: &mut Controller,
        sqe: &Sqe,
        host_data: &[u8],
        out_len: usize,
    ) -> (Status, u32, Vec<u8>) {
        let mut out = vec![0xa5; out_len];
        match c.admin(sqe, host_data, &mut out) {
            AdminOutcome::Complete {
                status, dw0, bytes, ..
            } => {
                assert!(out[bytes..].iter().all(|&b| b == 0), "tail not zeroed");
                out.truncate(bytes);
                (status, dw0, out)
            }
            AdminOutcome::Held => panic!("command held"),
        }
    }

    /// Little-endian u16 at `off`.
    pub fn le16(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    /// Little-endian u32 at `off`.
    pub fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    /// Little-endian u64 at `off`.
    pub fn le64(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::backend::DiskInfo;
    use crate::exec::Namespaces;
    use leap_queues::nvme::{admin, cns, feature};
    use proptest::prelude::*;

    #[test]
    fn controllers_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Controller>();
        assert_send_sync::<ControllerConfig>();
    }

    #[test]
    fn admin_commands_wait_for_enable() {
        // Arrange
        let mut c = controller_with(io_config(), Namespaces::single(ns(disk(1 << 20, 512))));
        // Act
        let (status, _, data) = run(&mut c, &identify(cns::CONTROLLER, 0));
        // Assert
        assert_eq!(status, COMMAND_SEQUENCE_ERROR);
        assert!(data.is_empty());
        assert_eq!(c.error_count(), 1);
    }

    #[test]
    fn unknown_and_pcie_only_opcodes_are_invalid() {
        let mut c = io_controller();
        for op in [
            admin::CREATE_IO_SQ,
            admin::DELETE_IO_SQ,
            admin::CREATE_IO_CQ,
            admin::DELETE_IO_CQ,
            admin::FABRICS,
            0x80,
            0xff,
        ] {
            assert_eq!(run(&mut c, &cmd(op)).0, Status::INVALID_OPCODE, "{op:#x}");
        }
    }

    #[test]
    fn fused_admin_commands_are_refused() {
        let mut c = io_controller();
        let mut s = identify(cns::CONTROLLER, 0);
        s.cdw0 |= (1u32 << 8).to_le();
        assert_eq!(run(&mut c, &s).0, Status::INVALID_FIELD);
    }

    #[test]
    fn abort_never_aborts() {
        let mut c = io_controller();
        let (status, dw0, _) = run(&mut c, &cmd(admin::ABORT));
        assert_eq!((status, dw0 & 1), (Status::SUCCESS, 1));
    }

    #[test]
    fn transfers_beyond_mdts_are_refused() {
        // Arrange: MDTS 1 = 8 KiB.
        let cfg = Arc::new(ControllerConfig {
            mdts: 1,
            ..(*io_config()).clone()
        });
        let mut c = enabled(cfg, Namespaces::single(ns(disk(1 << 20, 512))));
        // Act / Assert
        assert_eq!(c.max_transfer_bytes(), 8192);
        assert_eq!(c.check_transfer(8192), Ok(()));
        assert_eq!(c.check_transfer(8193), Err(Status::INVALID_FIELD));
        let s = identify(cns::CONTROLLER, 0);
        assert_eq!(run_with(&mut c, &s, &[], 8192).0, Status::SUCCESS);
        assert_eq!(run_with(&mut c, &s, &[], 8196).0, Status::INVALID_FIELD);
        let mut set = cmd(admin::SET_FEATURES);
        set.set_cdw(10, feature::HOST_BEHAVIOR_SUPPORT as u32);
        assert_eq!(
            run_with(&mut c, &set, &[0; 8200], 0).0,
            Status::INVALID_FIELD
        );
    }

    #[test]
    fn mdts_zero_means_no_limit() {
        let cfg = ControllerConfig {
            mdts: 0,
            ..ControllerConfig::default()
        };
        assert_eq!(cfg.max_transfer_bytes(), u64::MAX);
        assert_eq!(cfg.check_transfer(u64::MAX), Ok(()));
    }

    #[test]
    fn keep_alive_restarts_the_timer() {
        // Arrange: KATO 5 s from Connect.
        let mut c = io_controller();
        let t0 = Instant::now();
        c.touch(t0);
        // Act / Assert
        assert_eq!(c.kato(), Duration::from_secs(5));
        assert!(!c.keep_alive_expired(t0 + Duration::from_secs(5)));
        assert!(c.keep_alive_expired(t0 + Duration::from_millis(5001)));
        let ka = c.admin_at(
            t0 + Duration::from_secs(4),
            &cmd(admin::KEEP_ALIVE),
            &[],
            &mut [],
        );
        assert_eq!(ka.status(), Some(Status::SUCCESS));
        assert!(!c.keep_alive_expired(t0 + Duration::from_millis(8999)));
        assert!(c.keep_alive_expired(t0 + Duration::from_millis(9001)));
        assert_eq!(c.keep_alive_deadline(), Some(t0 + Duration::from_secs(9)));
    }

    #[test]
    fn a_zero_kato_never_expires() {
        let mut c = Controller::new(io_config(), 1, "h", [0; 16], 0, Namespaces::new(vec![]));
        c.touch(Instant::now());
        assert_eq!(c.keep_alive_deadline(), None);
        assert!(!c.keep_alive_expired(Instant::now() + Duration::from_secs(1 << 20)));
    }

    #[test]
    fn kato_is_rounded_up_to_the_granularity() {
        // KAS 10: 1 s granularity.
        let c = Controller::new(io_config(), 1, "h", [0; 16], 1500, Namespaces::new(vec![]));
        assert_eq!(c.kato(), Duration::from_secs(2));
        let c = Controller::new(
            io_config(),
            1,
            "h",
            [0; 16],
            u32::MAX,
            Namespaces::new(vec![]),
        );
        assert!(c.kato() >= Duration::from_millis(u32::MAX as u64 - 1000));
    }

    #[test]
    fn keep_alive_is_invalid_without_kas() {
        let cfg = Arc::new(ControllerConfig {
            kas: 0,
            ..(*io_config()).clone()
        });
        let mut c = enabled(cfg, Namespaces::new(vec![]));
        assert_eq!(
            run(&mut c, &cmd(admin::KEEP_ALIVE)).0,
            Status::INVALID_OPCODE
        );
    }

    #[test]
    fn replacing_namespaces_reports_the_changed_ones() {
        // Arrange: NSIDs 1 and 2; enable namespace attribute notices.
        let a = ns(disk(1 << 20, 512));
        let b = ns(disk(1 << 20, 512));
        let mut c = enabled(io_config(), Namespaces::new(vec![a.clone(), b]));
        let mut aec = cmd(admin::SET_FEATURES);
        aec.set_cdw(10, feature::ASYNC_EVENT_CONFIG as u32);
        aec.set_cdw(11, 1 << 8);
        assert_eq!(run(&mut c, &aec).0, Status::SUCCESS);
        // Act: keep 1, replace 2, add 3.
        c.set_namespaces(Namespaces::new(vec![
            a,
            ns(disk(2 << 20, 512)),
            ns(disk(1 << 20, 512)),
        ]));
        // Assert
        assert_eq!(c.changed.list(), vec![2, 3]);
        assert_eq!(c.events.pending_len(), 1);
    }

    fn arb_sqe() -> impl Strategy<Value = Sqe> {
        let opcode = prop_oneof![
            Just(admin::IDENTIFY),
            Just(admin::GET_FEATURES),
            Just(admin::SET_FEATURES),
            Just(admin::GET_LOG_PAGE),
            Just(admin::ASYNC_EVENT_REQUEST),
            Just(admin::KEEP_ALIVE),
            Just(admin::ABORT),
            any::<u8>(),
        ];
        // Small values for the fields that select things, random ones elsewhere.
        let small = prop_oneof![0u32..16, Just(0x70), Just(0xffff_ffff), any::<u32>()];
        (
            opcode,
            any::<u16>(),
            small.clone(),
            prop::array::uniform6(small),
            any::<[u64; 2]>(),
        )
            .prop_map(|(op, cid, nsid, cdw, dptr)| {
                let mut s = Sqe::new(op, cid);
                s.set_nsid(nsid);
                s.dptr = dptr;
                for (k, v) in cdw.iter().enumerate() {
                    s.set_cdw(10 + k, *v);
                }
                s
            })
    }

    proptest! {
        #[test]
        fn random_admin_commands_never_panic(
            sqes in prop::collection::vec(arb_sqe(), 1..24),
            host in prop::collection::vec(any::<u8>(), 0..1100),
            out_len in prop_oneof![Just(0usize), Just(512), Just(4096), 0usize..9000],
            discovery in any::<bool>(),
            notify in prop::collection::vec(any::<u32>(), 0..4),
        ) {
            let cfg = if discovery { discovery_config() } else { io_config() };
            let nss = Namespaces::new(vec![
                ns(disk(1 << 20, 512)),
                ns(DiskInfo { discard: true, volatile_cache: true, ..disk(1 << 21, 4096) }),
            ]);
            let snapshot = DiscoverySnapshot {
                genctr: 3,
                entries: vec![DiscoveryEntryInfo::tcp("nqn.x", "10.0.0.1", "4420", 1)],
            };
            let mut c = enabled(cfg, nss).with_discovery(Arc::new(snapshot));
            let mut out = vec![0u8; out_len];
            for (k, sqe) in sqes.iter().enumerate() {
                let o = c.admin(sqe, &host, &mut out);
                if let AdminOutcome::Complete { bytes, .. } = o {
                    prop_assert!(bytes <= out.len());
                }
                if let Some(&n) = notify.get(k) {
                    c.notify_namespace_changed(n);
                    c.notify_discovery_changed();
                }
                while let Some((_cid, _dw0)) = c.take_event_completion() {}
            }
        }

        #[test]
        fn random_property_accesses_never_panic(
            ops in prop::collection::vec((any::<bool>(), 0u32..0x40, any::<u8>(), any::<u64>()), 1..32),
        ) {
            let mut c = controller_with(io_config(), Namespaces::new(vec![]));
            for (set, offset, size, value) in ops {
                if set {
                    let _ = c.property_set(offset, size, value);
                } else {
                    let _ = c.property_get(offset, size);
                }
                let csts = c.property_get(reg::CSTS, 4).unwrap();
                // RDY is only ever set while CC.EN is.
                prop_assert!(csts & 1 == 0 || c.property_get(reg::CC, 4).unwrap() & 1 == 1);
            }
        }
    }
}
