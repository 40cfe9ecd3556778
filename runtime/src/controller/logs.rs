//! Get Log Page (Base Specification 2.0, section 5.16): Supported Log Pages (00h), Error
//! Information (01h), SMART / Health Information (02h), Changed Namespace List (04h) and, for
//! discovery controllers, the Discovery log page (70h; NVMe over Fabrics 1.1, section 5.3).
//!
//! Every page is produced through a [`Window`] onto the bytes the host asked for, so offsets,
//! lengths and pages of any size cost only the part that is returned.

use super::config::ControllerKind;
use super::events::Event;
use super::{at, Controller, Done, Fail, INVALID_LOG_PAGE};
use crate::stats::DeviceIoStats;
use leap_queues::{Sqe, Status};
use std::collections::{BTreeSet, VecDeque};

/// Log page identifiers (Base Specification 2.0, figure 202).
pub mod lid {
    /// Supported Log Pages.
    pub const SUPPORTED: u8 = 0x00;
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Changed Namespace List.
    pub const CHANGED_NS: u8 = 0x04;
    /// Discovery (NVMe over Fabrics 1.1, figure 31).
    pub const DISCOVERY: u8 = 0x70;
}

/// Entries in the Error Information log (ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 64;
/// Size of one Error Information log entry (figure 206).
const ERROR_ENTRY_SIZE: usize = 64;
/// Size of the SMART / Health Information log (figure 207).
const SMART_SIZE: usize = 512;
/// Most NSIDs the Changed Namespace List holds (figure 210).
pub const CHANGED_NS_MAX: usize = 1024;
/// Size of the Supported Log Pages log (figure 203): 256 four-byte entries.
const SUPPORTED_SIZE: usize = 1024;

/// The bytes `[start, start + buf.len())` of a log page: pieces written outside it are clipped.
struct Window<'a> {
    buf: &'a mut [u8],
    start: u64,
}

impl Window<'_> {
    fn end(&self) -> u64 {
        self.start.saturating_add(self.buf.len() as u64)
    }
    /// Whether `[at, at + len)` overlaps the window.
    fn wants(&self, at: u64, len: u64) -> bool {
        at < self.end() && at.saturating_add(len) > self.start
    }
    /// Copies the part of `data` (placed at page offset `at`) that falls inside the window.
    fn put(&mut self, at: u64, data: &[u8]) {
        let lo = at.max(self.start);
        let hi = at.saturating_add(data.len() as u64).min(self.end());
        if lo >= hi {
            return;
        }
        // All four differences are below `buf.len()` or `data.len()`, so they fit in usize.
        let (dst, src) = ((lo - self.start) as usize, (lo - at) as usize);
        let n = (hi - lo) as usize;
        self.buf[dst..dst + n].copy_from_slice(&data[src..src + n]);
    }
}

/// One error for the Error Information log (Base Specification 2.0, figure 206).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Submission queue the command came on (0: admin).
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// The status the command completed with.
    pub status: Status,
    /// Parameter Error Location: byte (7:0) and bit (10:8) of the bad field in the command;
    /// 0xFFFF when not applicable.
    pub param_location: u16,
    /// First LBA that had the error (0 if none).
    pub lba: u64,
    /// Namespace of the command (0 if none).
    pub nsid: u32,
    /// Transport type (3: TCP; 0 when not a transport error).
    pub trtype: u8,
    /// Command specific information.
    pub command_specific: u64,
    /// Transport type specific information.
    pub trtype_specific: u16,
}

impl ErrorInfo {
    /// An entry for command `cid` on `sqid` that failed with `status`; no location, LBA or NSID.
    pub fn new(sqid: u16, cid: u16, status: Status) -> ErrorInfo {
        ErrorInfo {
            sqid,
            cid,
            status,
            param_location: 0xffff,
            lba: 0,
            nsid: 0,
            trtype: 0,
            command_specific: 0,
            trtype_specific: 0,
        }
    }

    fn encode(&self, count: u64) -> [u8; ERROR_ENTRY_SIZE] {
        let mut e = [0u8; ERROR_ENTRY_SIZE];
        e[0..8].copy_from_slice(&count.to_le_bytes());
        e[8..10].copy_from_slice(&self.sqid.to_le_bytes());
        e[10..12].copy_from_slice(&self.cid.to_le_bytes());
        // Status Field: the CQE's status in bits 15:1, phase tag 0.
        e[12..14].copy_from_slice(&(self.status.raw() << 1).to_le_bytes());
        e[14..16].copy_from_slice(&self.param_location.to_le_bytes());
        e[16..24].copy_from_slice(&self.lba.to_le_bytes());
        e[24..28].copy_from_slice(&self.nsid.to_le_bytes());
        e[29] = self.trtype;
        e[32..40].copy_from_slice(&self.command_specific.to_le_bytes());
        e[40..42].copy_from_slice(&self.trtype_specific.to_le_bytes());
        e
    }
}

/// The last [`ERROR_LOG_ENTRIES`] errors, newest first, each with its Error Count.
#[derive(Debug, Default)]
pub(super) struct ErrorLog {
    entries: VecDeque<(u64, ErrorInfo)>,
    /// Error Count of the newest entry (never 0 once an error happened: 0 marks an empty slot).
    count: u64,
    total: u64,
}

impl ErrorLog {
    pub fn record(&mut self, e: ErrorInfo) {
        // Figure 206: the count wraps to 1, as 0 means "no entry".
        self.count = self.count.checked_add(1).unwrap_or(1);
        self.total = self.total.saturating_add(1);
        self.entries.push_front((self.count, e));
        self.entries.truncate(ERROR_LOG_ENTRIES);
    }
    pub fn total(&self) -> u64 {
        self.total
    }
    fn write(&self, w: &mut Window<'_>) {
        for (k, (count, e)) in self.entries.iter().enumerate() {
            let at = (k * ERROR_ENTRY_SIZE) as u64;
            if w.wants(at, ERROR_ENTRY_SIZE as u64) {
                w.put(at, &e.encode(*count));
            }
        }
    }
}

/// NSIDs whose namespace changed since the host last read the Changed Namespace List.
#[derive(Debug, Default)]
pub(super) struct ChangedNamespaces {
    ids: BTreeSet<u32>,
    /// More than 1024 changed: the list reads as the single entry FFFFFFFFh.
    overflow: bool,
}

impl ChangedNamespaces {
    pub fn add(&mut self, nsid: u32) {
        if self.overflow || self.ids.contains(&nsid) {
            return;
        }
        if self.ids.len() == CHANGED_NS_MAX {
            self.ids.clear();
            self.overflow = true;
        } else {
            self.ids.insert(nsid);
        }
    }
    pub fn clear(&mut self) {
        self.ids.clear();
        self.overflow = false;
    }
    /// The entries as the log page lists them.
    pub fn list(&self) -> Vec<u32> {
        if self.overflow {
            vec![0xffff_ffff]
        } else {
            self.ids.iter().copied().collect()
        }
    }
}

/// Counters behind the SMART / Health Information log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthCounters {
    /// Bytes read by host read commands.
    pub bytes_read: u64,
    /// Bytes written by host write commands.
    pub bytes_written: u64,
    /// Read commands completed.
    pub read_commands: u64,
    /// Write commands completed.
    pub write_commands: u64,
    /// Commands that ended in an unrecovered data integrity error.
    pub media_errors: u64,
}

/// Where the SMART / Health Information log gets its counters; read each time the host asks.
pub trait HealthSource: Send + Sync {
    /// The current totals.
    fn health(&self) -> HealthCounters;
}

impl<F: Fn() -> HealthCounters + Send + Sync> HealthSource for F {
    fn health(&self) -> HealthCounters {
        self()
    }
}

/// A device's per-queue counters, summed.
impl HealthSource for DeviceIoStats {
    fn health(&self) -> HealthCounters {
        HealthCounters {
            bytes_read: self.total(|s| &s.bytes_read),
            bytes_written: self.total(|s| &s.bytes_written),
            read_commands: self.total(|s| &s.reads),
            write_commands: self.total(|s| &s.writes),
            media_errors: self.total(|s| &s.errors),
        }
    }
}

/// Data Units Read / Written: thousands of 512-byte units, rounded up (figure 207).
fn data_units(bytes: u64) -> u128 {
    (bytes as u128).div_ceil(512 * 1000)
}

/// Discovery log page values and layout (NVMe over Fabrics 1.1, figures 31 and 32).
pub mod discovery {
    /// Transport type TCP.
    pub const TRTYPE_TCP: u8 = 3;
    /// Address family IPv4.
    pub const ADRFAM_IPV4: u8 = 1;
    /// Address family IPv6.
    pub const ADRFAM_IPV6: u8 = 2;
    /// Subsystem type: a referral to another discovery service.
    pub const SUBTYPE_REFERRAL: u8 = 1;
    /// Subsystem type: an NVM subsystem with I/O controllers.
    pub const SUBTYPE_NVME: u8 = 2;
    /// Subsystem type: the discovery subsystem being asked (TP 8013).
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
    /// Transport requirements: secure channel not required.
    pub const TREQ_SECURE_CHANNEL_NOT_REQUIRED: u8 = 0b10;
    /// CNTLID in an entry: the dynamic controller model (any controller).
    pub const CNTLID_DYNAMIC: u16 = 0xffff;
    /// Size of the header and of each entry.
    pub const RECORD_SIZE: usize = 1024;
}

/// One Discovery log page entry (NVMe over Fabrics 1.1, figure 32), before encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntryInfo {
    /// Transport type ([`discovery::TRTYPE_TCP`]).
    pub trtype: u8,
    /// Address family ([`discovery::ADRFAM_IPV4`] or [`discovery::ADRFAM_IPV6`]).
    pub adrfam: u8,
    /// Subsystem type ([`discovery::SUBTYPE_NVME`], ...).
    pub subtype: u8,
    /// Transport requirements.
    pub treq: u8,
    /// NVM subsystem port ID.
    pub portid: u16,
    /// Controller ID ([`discovery::CNTLID_DYNAMIC`]).
    pub cntlid: u16,
    /// Admin max submission queue size.
    pub asqsz: u16,
    /// Entry flags (NVMe over Fabrics 1.1a / TP 8014; 0 when unused).
    pub eflags: u16,
    /// Transport service identifier: the TCP port, e.g. "4420" (at most 32 ASCII characters).
    pub trsvcid: String,
    /// Transport address: the IP address (at most 256 ASCII characters).
    pub traddr: String,
    /// Subsystem NQN (at most 255 bytes).
    pub subnqn: String,
    /// TCP security type in the Transport Specific Address Subtype (0: none).
    pub sectype: u8,
}

impl DiscoveryEntryInfo {
    /// An NVMe/TCP entry for subsystem `subnqn` at `traddr`:`trsvcid` on port `portid`: dynamic
    /// controllers, no secure channel, 32-entry admin queue; IPv6 when the address has a colon.
    pub fn tcp(subnqn: &str, traddr: &str, trsvcid: &str, portid: u16) -> Self {
        DiscoveryEntryInfo {
            trtype: discovery::TRTYPE_TCP,
            adrfam: if traddr.contains(':') {
                discovery::ADRFAM_IPV6
            } else {
                discovery::ADRFAM_IPV4
            },
            subtype: discovery::SUBTYPE_NVME,
            treq: discovery::TREQ_SECURE_CHANNEL_NOT_REQUIRED,
            portid,
            cntlid: discovery::CNTLID_DYNAMIC,
            asqsz: 32,
            eflags: 0,
            trsvcid: trsvcid.into(),
            traddr: traddr.into(),
            subnqn: subnqn.into(),
            sectype: 0,
        }
    }

    /// The 1024-byte wire form (NVMe-oF 1.1, figure 38), encoded by
    /// [`crate::nvmf::fabrics::DiscoveryEntry`] after the strings are made to fit: ASCII fields
    /// keep printable ASCII (anything else becomes `?`) and are cut to their field, the NQN is
    /// cut to 255 bytes (at a character boundary) and loses any NUL.
    pub fn encode(&self) -> [u8; discovery::RECORD_SIZE] {
        let trsvcid = printable(&self.trsvcid, 32);
        let traddr = printable(&self.traddr, 256);
        let mut nqn: String = self.subnqn.chars().filter(|&c| c != '\0').collect();
        while nqn.len() > 255 {
            nqn.pop();
        }
        let e = crate::nvmf::fabrics::DiscoveryEntry {
            trtype: self.trtype,
            adrfam: self.adrfam,
            subtype: self.subtype,
            treq: self.treq,
            portid: self.portid,
            cntlid: self.cntlid,
            asqsz: self.asqsz,
            eflags: self.eflags,
            trsvcid: &trsvcid,
            traddr: &traddr,
            subnqn: if nqn.is_empty() { "?" } else { &nqn },
            sectype: self.sectype,
        };
        e.encode().unwrap_or([0; discovery::RECORD_SIZE])
    }
}

/// `s` with bytes outside printable ASCII replaced by `?`, cut to `max` bytes.
fn printable(s: &str, max: usize) -> String {
    s.bytes()
        .take(max)
        .map(|b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// The Discovery log as it stands: its generation counter and records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoverySnapshot {
    /// Generation counter (GENCTR): changes whenever the records change.
    pub genctr: u64,
    /// The records.
    pub entries: Vec<DiscoveryEntryInfo>,
}

/// Where a discovery controller gets its log; asked on every read, with the host's NQN so the
/// source may list only the subsystems that host may use.
pub trait DiscoverySource: Send + Sync {
    /// The log for host `hostnqn`.
    fn discovery_log(&self, hostnqn: &str) -> DiscoverySnapshot;
}

impl<F: Fn(&str) -> DiscoverySnapshot + Send + Sync> DiscoverySource for F {
    fn discovery_log(&self, hostnqn: &str) -> DiscoverySnapshot {
        self(hostnqn)
    }
}

/// A fixed log, the same for every host.
impl DiscoverySource for DiscoverySnapshot {
    fn discovery_log(&self, _hostnqn: &str) -> DiscoverySnapshot {
        self.clone()
    }
}

impl DiscoverySnapshot {
    /// Size of the whole page: a header and one record per entry.
    fn size(&self) -> u64 {
        (self.entries.len() as u64)
            .saturating_add(1)
            .saturating_mul(discovery::RECORD_SIZE as u64)
    }

    fn write(&self, w: &mut Window<'_>) {
        let rec = discovery::RECORD_SIZE as u64;
        if w.wants(0, rec) {
            let mut h = [0u8; 24];
            h[0..8].copy_from_slice(&self.genctr.to_le_bytes());
            h[8..16].copy_from_slice(&(self.entries.len() as u64).to_le_bytes());
            // RECFMT (bytes 17:16) 0; the rest of the header is reserved.
            w.put(0, &h);
        }
        for (k, e) in self.entries.iter().enumerate() {
            let at = (k as u64 + 1).saturating_mul(rec);
            if w.wants(at, rec) {
                w.put(at, &e.encode());
            }
        }
    }
}

/// A Get Log Page command's fields (figures 197 to 201).
struct LogRequest {
    lid: u8,
    rae: bool,
    offset: u64,
    len: usize,
}

fn parse(sqe: &Sqe, out_len: usize) -> Result<LogRequest, Fail> {
    let cdw10 = sqe.cdw(10);
    let numdl = (cdw10 >> 16) as u64;
    let numdu = (sqe.cdw(11) & 0xffff) as u64;
    // NUMD is a 0-based dword count split over CDW10 and CDW11: at most 2^32 dwords.
    let bytes = ((numdu << 16 | numdl) + 1) * 4;
    let offset = sqe.cdw(12) as u64 | (sqe.cdw(13) as u64) << 32;
    if offset % 4 != 0 {
        return Err(Fail::field(at::CDW12));
    }
    // CDW14: UUID Index (6:0) needs a UUID list; Offset Type (23) index offsets: neither is
    // supported.
    let cdw14 = sqe.cdw(14);
    if cdw14 & 0x7f != 0 || cdw14 & (1 << 23) != 0 {
        return Err(Fail::field(at::CDW14));
    }
    let len = usize::try_from(bytes)
        .ok()
        .filter(|&l| l <= out_len)
        .ok_or(Fail::at(Status::SGL_LENGTH_INVALID, at::CDW10 + 2, 0))?;
    Ok(LogRequest {
        lid: cdw10 as u8,
        rae: cdw10 & (1 << 15) != 0,
        offset,
        len,
    })
}

impl Controller {
    fn supported_logs(&self) -> &'static [u8] {
        match self.cfg.kind {
            ControllerKind::Io => &[lid::SUPPORTED, lid::ERROR, lid::SMART, lid::CHANGED_NS],
            ControllerKind::Discovery => &[lid::SUPPORTED, lid::ERROR, lid::DISCOVERY],
        }
    }

    /// Get Log Page (Base Specification 2.0, section 5.16). The transfer is NUMD dwords from
    /// byte offset LPOL/LPOU (dword aligned, not beyond the page); bytes past the end of the page
    /// read as zero. Reading a page with RAE cleared clears it (Changed Namespace List) and
    /// re-arms its asynchronous event.
    pub(super) fn get_log_page(&mut self, sqe: &Sqe, out: &mut [u8]) -> Result<Done, Fail> {
        let req = parse(sqe, out.len())?;
        if !self.supported_logs().contains(&req.lid) {
            return Err(Fail::at(INVALID_LOG_PAGE, at::CDW10, 0));
        }
        let snapshot = (req.lid == lid::DISCOVERY).then(|| match &self.discovery {
            Some(d) => d.discovery_log(&self.hostnqn),
            None => DiscoverySnapshot::default(),
        });
        let size = match (req.lid, &snapshot) {
            (lid::SUPPORTED, _) => SUPPORTED_SIZE as u64,
            (lid::ERROR, _) => (ERROR_LOG_ENTRIES * ERROR_ENTRY_SIZE) as u64,
            (lid::SMART, _) => SMART_SIZE as u64,
            (lid::CHANGED_NS, _) => (CHANGED_NS_MAX * 4) as u64,
            (_, Some(s)) => s.size(),
            _ => return Err(Fail::at(INVALID_LOG_PAGE, at::CDW10, 0)),
        };
        if req.offset > size {
            return Err(Fail::field(at::CDW12));
        }
        if req.lid == lid::SMART {
            // Only the controller-wide page (LPA bit 0 clear): NSID 0 or FFFFFFFFh.
            let nsid = sqe.nsid();
            if nsid != 0 && nsid != 0xffff_ffff {
                return Err(Fail::field(at::NSID));
            }
        }
        let buf = &mut out[..req.len];
        buf.fill(0);
        let mut w = Window {
            buf,
            start: req.offset,
        };
        match req.lid {
            lid::SUPPORTED => {
                for &l in self.supported_logs() {
                    // LSUPP (bit 0); IOS (bit 1, index offsets) stays clear.
                    w.put(l as u64 * 4, &1u32.to_le_bytes());
                }
            }
            lid::ERROR => self.errors.write(&mut w),
            lid::SMART => w.put(0, &self.smart()),
            lid::CHANGED_NS => {
                for (k, id) in self.changed.list().iter().enumerate() {
                    w.put(k as u64 * 4, &id.to_le_bytes());
                }
                if !req.rae {
                    self.changed.clear();
                    self.events.unmask(Event::NamespaceAttribute);
                }
            }
            _ => {
                if let Some(s) = &snapshot {
                    s.write(&mut w);
                }
                if !req.rae {
                    self.events.unmask(Event::DiscoveryLogChange);
                }
            }
        }
        Ok(Done {
            dw0: 0,
            bytes: req.len,
        })
    }

    /// The SMART / Health Information log (figure 207).
    fn smart(&self) -> [u8; SMART_SIZE] {
        let h = self.health.as_ref().map(|s| s.health()).unwrap_or_default();
        let mut p = [0u8; SMART_SIZE];
        p[3] = 100; // Available Spare: a virtual device never wears out
        p[4] = 10; // Available Spare Threshold
        p[32..48].copy_from_slice(&data_units(h.bytes_read).to_le_bytes());
        p[48..64].copy_from_slice(&data_units(h.bytes_written).to_le_bytes());
        p[64..80].copy_from_slice(&(h.read_commands as u128).to_le_bytes());
        p[80..96].copy_from_slice(&(h.write_commands as u128).to_le_bytes());
        p[160..176].copy_from_slice(&(h.media_errors as u128).to_le_bytes());
        p[176..192].copy_from_slice(&(self.errors.total() as u128).to_le_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::exec::Namespaces;
    use crate::stats::{add, inc};
    use leap_queues::nvme::admin;
    use std::sync::Arc;

    /// Get Log Page for `lid`, `len` bytes (a multiple of 4) at `offset`.
    fn log(lid: u8, len: u64, offset: u64) -> Sqe {
        let numd = len / 4 - 1;
        let mut s = cmd(admin::GET_LOG_PAGE);
        s.set_cdw(10, lid as u32 | ((numd as u32 & 0xffff) << 16));
        s.set_cdw(11, (numd >> 16) as u32);
        s.set_cdw(12, offset as u32);
        s.set_cdw(13, (offset >> 32) as u32);
        s
    }

    fn with_rae(mut s: Sqe) -> Sqe {
        s.set_cdw(10, s.cdw(10) | 1 << 15);
        s
    }

    #[test]
    fn window_clips_every_way() {
        let mut buf = [0u8; 8];
        let mut w = Window {
            buf: &mut buf,
            start: 4,
        };
        w.put(0, &[1, 2, 3, 4, 5, 6]); // overlaps the start
        w.put(10, &[7, 8, 9, 10]); // overlaps the end
        w.put(100, &[1]); // outside
        w.put(u64::MAX, &[1, 2]); // at the very end of the range
        assert_eq!(buf, [5, 6, 0, 0, 0, 0, 7, 8]);
    }

    #[test]
    fn supported_log_pages_lists_what_is_served() {
        let mut c = io_controller();
        let (status, _, b) = run(&mut c, &log(lid::SUPPORTED, 1024, 0));
        assert_eq!(status, Status::SUCCESS);
        let supported: Vec<usize> = (0..256).filter(|&l| le32(&b, l * 4) & 1 == 1).collect();
        assert_eq!(supported, vec![0, 1, 2, 4]);
        let mut d = enabled(discovery_config(), Namespaces::new(vec![]));
        let (_, _, b) = run(&mut d, &log(lid::SUPPORTED, 1024, 0));
        let supported: Vec<usize> = (0..256).filter(|&l| le32(&b, l * 4) & 1 == 1).collect();
        assert_eq!(supported, vec![0, 1, 0x70]);
    }

    #[test]
    fn error_log_keeps_the_newest_entries_first() {
        // Arrange: 70 errors through the transport's hook, one failed admin command.
        let mut c = io_controller();
        for k in 0..70u16 {
            c.record_error(ErrorInfo {
                lba: k as u64,
                nsid: 1,
                ..ErrorInfo::new(1, k, Status::LBA_OUT_OF_RANGE)
            });
        }
        let mut bad = identify(0x55, 0);
        bad.set_cid(0x99);
        assert_eq!(run(&mut c, &bad).0, Status::INVALID_FIELD);
        // Act
        let (status, _, b) = run(&mut c, &log(lid::ERROR, 4096, 0));
        // Assert
        assert_eq!(status, Status::SUCCESS);
        assert_eq!(b.len(), ERROR_LOG_ENTRIES * 64);
        assert_eq!(le64(&b, 0), 71, "error count of the newest");
        assert_eq!((le16(&b, 8), le16(&b, 10)), (0, 0x99));
        assert_eq!(le16(&b, 12) >> 1, Status::INVALID_FIELD.raw());
        assert_eq!(le16(&b, 14), 40, "parameter error location: CDW10");
        let second = &b[64..128];
        assert_eq!(
            (le64(second, 0), le16(second, 8), le16(second, 10)),
            (70, 1, 69)
        );
        assert_eq!((le64(second, 16), le32(second, 24)), (69, 1));
        assert_eq!(le16(second, 14), 0xffff);
        let last = &b[63 * 64..];
        assert_eq!(le64(last, 0), 8, "only the last 64 kept");
        assert_eq!(c.error_count(), 71);
    }

    #[test]
    fn error_log_reads_empty_slots_as_zero() {
        let mut c = io_controller();
        c.record_error(ErrorInfo::new(2, 5, Status::WRITE_FAULT));
        let (_, _, b) = run(&mut c, &log(lid::ERROR, 256, 0));
        assert_eq!(le64(&b, 0), 1);
        assert!(b[64..].iter().all(|&x| x == 0));
    }

    #[test]
    fn smart_log_reports_counters_in_spec_units() {
        // Arrange
        let stats = Arc::new(DeviceIoStats::new(2));
        add(&stats.queue(0).bytes_read, 512_000);
        add(&stats.queue(1).bytes_read, 1);
        add(&stats.queue(1).bytes_written, 512_000 * 3);
        inc(&stats.queue(0).reads);
        inc(&stats.queue(1).reads);
        inc(&stats.queue(1).writes);
        let mut c = io_controller().with_health(stats);
        // Act
        let (status, _, b) = run(&mut c, &log(lid::SMART, 512, 0));
        // Assert
        assert_eq!(status, Status::SUCCESS);
        assert_eq!(b.len(), 512);
        assert_eq!(le64(&b, 32), 2, "512001 bytes round up to 2 thousand units");
        assert_eq!(le64(&b, 48), 3);
        assert_eq!((le64(&b, 64), le64(&b, 80)), (2, 1));
        assert_eq!(b[3], 100);
        let mut ns = log(lid::SMART, 512, 0);
        ns.set_nsid(0xffff_ffff);
        assert_eq!(run(&mut c, &ns).0, Status::SUCCESS);
        ns.set_nsid(1);
        assert_eq!(run(&mut c, &ns).0, Status::INVALID_FIELD);
    }

    #[test]
    fn smart_log_from_a_closure() {
        let mut c = io_controller().with_health(Arc::new(|| HealthCounters {
            write_commands: 7,
            ..HealthCounters::default()
        }));
        let (_, _, b) = run(&mut c, &log(lid::SMART, 512, 0));
        assert_eq!(le64(&b, 80), 7);
        assert_eq!(data_units(0), 0);
        assert_eq!(data_units(1), 1);
        assert_eq!(data_units(512_000), 1);
        assert_eq!(data_units(u64::MAX), (u64::MAX as u128).div_ceil(512_000));
    }

    #[test]
    fn offsets_and_lengths_are_honoured() {
        // Arrange
        let stats = Arc::new(DeviceIoStats::new(1));
        inc(&stats.queue(0).writes);
        let mut c = io_controller().with_health(stats);
        // Act: 8 bytes at offset 80 (Host Write Commands), and a read running past the end.
        let (s1, _, mid) = run(&mut c, &log(lid::SMART, 8, 80));
        let (s2, _, tail) = run_with(&mut c, &log(lid::SMART, 1024, 256), &[], 1024);
        let (s3, _, at_end) = run(&mut c, &log(lid::SMART, 4, 512));
        // Assert
        assert_eq!((s1, mid), (Status::SUCCESS, 1u64.to_le_bytes().to_vec()));
        assert_eq!((s2, tail.len()), (Status::SUCCESS, 1024));
        assert!(tail[256..].iter().all(|&b| b == 0), "zero past the end");
        assert_eq!((s3, at_end), (Status::SUCCESS, vec![0; 4]));
    }

    #[test]
    fn bad_offsets_and_lengths_are_refused() {
        let mut c = io_controller();
        assert_eq!(run(&mut c, &log(lid::SMART, 8, 2)).0, Status::INVALID_FIELD);
        assert_eq!(
            run(&mut c, &log(lid::SMART, 8, 516)).0,
            Status::INVALID_FIELD
        );
        assert_eq!(
            run(&mut c, &log(lid::SMART, 8, u64::MAX - 3)).0,
            Status::INVALID_FIELD
        );
        // NUMD beyond the buffer the transport sized.
        assert_eq!(
            run_with(&mut c, &log(lid::SMART, 512, 0), &[], 256).0,
            Status::SGL_LENGTH_INVALID
        );
        // The largest NUMD (2^32 dwords) does not overflow.
        let mut huge = log(lid::SMART, 4, 0);
        huge.set_cdw(10, lid::SMART as u32 | 0xffff_0000);
        huge.set_cdw(11, 0xffff);
        assert_eq!(run(&mut c, &huge).0, Status::SGL_LENGTH_INVALID);
        let mut uuid = log(lid::SMART, 512, 0);
        uuid.set_cdw(14, 1);
        assert_eq!(run(&mut c, &uuid).0, Status::INVALID_FIELD);
        let mut index = log(lid::SMART, 512, 0);
        index.set_cdw(14, 1 << 23);
        assert_eq!(run(&mut c, &index).0, Status::INVALID_FIELD);
    }

    #[test]
    fn unsupported_logs_are_invalid_log_pages() {
        let mut c = io_controller();
        for l in [0x03, 0x05, 0x0c, 0x70, 0x80, 0xff] {
            assert_eq!(run(&mut c, &log(l, 512, 0)).0, INVALID_LOG_PAGE, "{l:#x}");
        }
        let mut d = enabled(discovery_config(), Namespaces::new(vec![]));
        for l in [lid::SMART, lid::CHANGED_NS] {
            assert_eq!(run(&mut d, &log(l, 512, 0)).0, INVALID_LOG_PAGE, "{l:#x}");
        }
    }

    #[test]
    fn changed_namespace_list_clears_when_read_without_rae() {
        // Arrange
        let mut c = io_controller();
        for nsid in [5, 2, 5, 9] {
            c.notify_namespace_changed(nsid);
        }
        // Act / Assert: RAE keeps it.
        let (_, _, b) = run(&mut c, &with_rae(log(lid::CHANGED_NS, 4096, 0)));
        assert_eq!(
            (le32(&b, 0), le32(&b, 4), le32(&b, 8), le32(&b, 12)),
            (2, 5, 9, 0)
        );
        let (_, _, b) = run(&mut c, &log(lid::CHANGED_NS, 16, 0));
        assert_eq!((le32(&b, 0), le32(&b, 8)), (2, 9));
        let (_, _, b) = run(&mut c, &log(lid::CHANGED_NS, 4096, 0));
        assert!(b.iter().all(|&x| x == 0), "cleared by the read without RAE");
    }

    #[test]
    fn changed_namespace_list_overflows_to_all_ones() {
        let mut c = io_controller();
        for nsid in 1..=1025 {
            c.notify_namespace_changed(nsid);
        }
        let (_, _, b) = run(&mut c, &log(lid::CHANGED_NS, 4096, 0));
        assert_eq!((le32(&b, 0), le32(&b, 4)), (0xffff_ffff, 0));
        c.notify_namespace_changed(3);
        let (_, _, b) = run(&mut c, &log(lid::CHANGED_NS, 8, 0));
        assert_eq!((le32(&b, 0), le32(&b, 4)), (3, 0));
    }

    fn discovery_controller(n: usize) -> Controller {
        let entries = (0..n)
            .map(|k| {
                DiscoveryEntryInfo::tcp(
                    &format!("nqn.2026-01.io.leap:d{k}"),
                    "192.0.2.7",
                    "4420",
                    1,
                )
            })
            .collect();
        let snapshot = DiscoverySnapshot {
            genctr: 42,
            entries,
        };
        enabled(discovery_config(), Namespaces::new(vec![])).with_discovery(Arc::new(snapshot))
    }

    #[test]
    fn discovery_log_encodes_header_and_entries() {
        // Arrange
        let mut d = discovery_controller(2);
        // Act
        let (status, _, b) = run_with(&mut d, &log(lid::DISCOVERY, 3072, 0), &[], 3072);
        // Assert
        assert_eq!((status, b.len()), (Status::SUCCESS, 3072));
        assert_eq!((le64(&b, 0), le64(&b, 8), le16(&b, 16)), (42, 2, 0));
        assert!(b[24..1024].iter().all(|&x| x == 0));
        let e = &b[1024..2048];
        assert_eq!(
            &e[0..4],
            &[3, 1, 2, 0b10],
            "TCP, IPv4, NVM subsystem, no secure channel"
        );
        assert_eq!((le16(e, 4), le16(e, 6), le16(e, 8)), (1, 0xffff, 32));
        assert_eq!(&e[32..36], b"4420");
        assert!(e[36..64].iter().all(|&x| x == b' '));
        assert_eq!(&e[512..521], b"192.0.2.7");
        assert!(e[521..768].iter().all(|&x| x == b' '));
        assert_eq!(&e[256..278], b"nqn.2026-01.io.leap:d0");
        assert!(e[278..512].iter().all(|&x| x == 0));
        assert_eq!(e[768], 0, "TSAS: no security");
        assert_eq!(&b[2048 + 256..2048 + 278], b"nqn.2026-01.io.leap:d1");
    }

    #[test]
    fn discovery_log_pages_like_nvme_cli() {
        // Arrange: 5 entries; read the header, then the entries in odd-sized pieces.
        let mut d = discovery_controller(5);
        let (_, _, whole) = run_with(&mut d, &log(lid::DISCOVERY, 6144, 0), &[], 6144);
        // Act / Assert
        let (_, _, header) = run(&mut d, &log(lid::DISCOVERY, 16, 0));
        assert_eq!((le64(&header, 0), le64(&header, 8)), (42, 5));
        let mut pieces = Vec::new();
        let mut offset = 0u64;
        for len in [1020u64, 4, 2048, 12, 3060] {
            let (s, _, p) = run(&mut d, &log(lid::DISCOVERY, len, offset));
            assert_eq!(s, Status::SUCCESS);
            pieces.extend(p);
            offset += len;
        }
        assert_eq!(pieces, whole);
        // Past the end: zeroes, then an error beyond the page.
        let (s, _, p) = run(&mut d, &log(lid::DISCOVERY, 2048, 5120));
        assert_eq!(s, Status::SUCCESS);
        assert_eq!(&p[..1024], &whole[5120..]);
        assert!(p[1024..].iter().all(|&x| x == 0));
        assert_eq!(
            run(&mut d, &log(lid::DISCOVERY, 4, 6148)).0,
            Status::INVALID_FIELD
        );
    }

    #[test]
    fn discovery_log_without_a_source_is_empty() {
        let mut d = enabled(discovery_config(), Namespaces::new(vec![]));
        let (s, _, b) = run(&mut d, &log(lid::DISCOVERY, 1024, 0));
        assert_eq!(s, Status::SUCCESS);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn discovery_source_sees_the_host() {
        let src = |host: &str| DiscoverySnapshot {
            genctr: host.len() as u64,
            entries: vec![],
        };
        let mut d =
            enabled(discovery_config(), Namespaces::new(vec![])).with_discovery(Arc::new(src));
        let (_, _, b) = run(&mut d, &log(lid::DISCOVERY, 8, 0));
        assert_eq!(
            le64(&b, 0),
            "nqn.2014-08.org.nvmexpress:uuid:host".len() as u64
        );
    }

    #[test]
    fn discovery_entry_strings_are_sanitised() {
        let mut e = DiscoveryEntryInfo::tcp(&"n".repeat(300), "fe80::1", "4420\u{e9}", 7);
        e.traddr.push_str(&"9".repeat(300));
        let b = e.encode();
        assert_eq!(b[1], discovery::ADRFAM_IPV6);
        assert_eq!(&b[32..38], b"4420??");
        assert!(b[512..768].iter().all(|&x| x != b' '), "cut at 256");
        assert_eq!(b[256 + 254], b'n');
        assert_eq!(b[256 + 255], 0, "NQN keeps a terminating NUL");
    }
}
