//! Identify data structures: Identify Controller (NVM Express Base Specification 2.0, figures 275
//! and 276) and the NVM command set's Identify Namespace (NVM Command Set Specification 1.0,
//! figure 97). Both are exactly 4096 bytes, as returned by the Identify admin command.
//!
//! The structures are `#[repr(C)]` with only integer and integer-array fields laid out so that
//! there is no padding (checked at compile time: the sum of the field sizes equals the struct
//! size), so every bit pattern is a valid value and [`IdentifyController::as_bytes`] /
//! [`IdentifyController::from_bytes`] are plain copies. Multi-byte fields hold little-endian
//! values: the constructors and `with_*` helpers convert; code that writes the public fields
//! directly must store `value.to_le()`.

use core::mem::{align_of, offset_of, size_of};

/// Declares a wire structure and a private `FIELD_BYTES` constant with the sum of its field sizes,
/// so a compile-time assertion can prove the structure has no padding bytes.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }
        impl $name {
            /// Sum of the field sizes; equal to `size_of::<Self>()` exactly when there is no padding.
            const FIELD_BYTES: usize = 0 $( + size_of::<$ty>() )*;
        }
    };
}

/// Size of every Identify data structure.
pub const IDENTIFY_SIZE: usize = 4096;

/// Errors from building Identify structures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentifyError {
    /// LBA data size must be 2^9 (512 bytes) or more (NVM Command Set 1.0, figure 98, LBADS);
    /// Leap also caps it at 2^20.
    #[error("LBA data size shift {0} is outside 9..=20")]
    InvalidLbaShift(u8),
}

/// Optional NVM Command Support bits (ONCS, Identify Controller bytes 521:520).
pub mod oncs {
    /// Compare command.
    pub const COMPARE: u16 = 1 << 0;
    /// Write Uncorrectable command.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset Management command (deallocate).
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes command.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Save field in Set/Get Features.
    pub const SAVE_FEATURES: u16 = 1 << 4;
    /// Reservations.
    pub const RESERVATIONS: u16 = 1 << 5;
    /// Timestamp feature.
    pub const TIMESTAMP: u16 = 1 << 6;
}

/// SGL Support bits (SGLS, Identify Controller bytes 539:536).
pub mod sgls {
    /// SGLs supported for the NVM command set, no alignment or granularity requirement.
    pub const SUPPORTED: u32 = 0b01;
    /// SGLs supported, data blocks dword aligned and dword granular.
    pub const SUPPORTED_DWORD_ALIGNED: u32 = 0b10;
    /// Keyed SGL Data Block descriptor supported.
    pub const KEYED_DATA_BLOCK: u32 = 1 << 2;
    /// SGL Bit Bucket descriptor supported.
    pub const BIT_BUCKET: u32 = 1 << 16;
    /// Commands whose SGL describes more data than the transfer length are accepted.
    pub const LENGTH_LARGER_THAN_DATA: u32 = 1 << 18;
    /// MPTR may point to an SGL segment.
    pub const MPTR_SGL: u32 = 1 << 19;
    /// The address field of a descriptor may be an offset (SGL subtype Offset).
    pub const OFFSET: u32 = 1 << 20;
    /// Transport SGL Data Block descriptor supported.
    pub const TRANSPORT_DATA_BLOCK: u32 = 1 << 21;
}

/// Optional Admin Command Support bits (OACS, Identify Controller bytes 257:256).
pub mod oacs {
    /// Security Send / Receive.
    pub const SECURITY: u16 = 1 << 0;
    /// Format NVM.
    pub const FORMAT_NVM: u16 = 1 << 1;
    /// Firmware Commit / Image Download.
    pub const FIRMWARE: u16 = 1 << 2;
    /// Namespace Management.
    pub const NS_MANAGEMENT: u16 = 1 << 3;
}

wire_struct! {
    /// One power state descriptor (Base Specification 2.0, figure 276): 32 bytes.
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
    pub struct PowerStateDescriptor {
        /// Maximum power, in units of 0.01 W (or 0.0001 W if MXPS is set).
        pub mp: u16,
        /// Reserved.
        pub rsvd2: u8,
        /// MXPS (bit 0) and NOPS (bit 1, non-operational state).
        pub flags: u8,
        /// Entry latency in microseconds.
        pub enlat: u32,
        /// Exit latency in microseconds.
        pub exlat: u32,
        /// Relative read throughput.
        pub rrt: u8,
        /// Relative read latency.
        pub rrl: u8,
        /// Relative write throughput.
        pub rwt: u8,
        /// Relative write latency.
        pub rwl: u8,
        /// Idle power.
        pub idlp: u16,
        /// Idle power scale (bits 7:6).
        pub ips: u8,
        /// Reserved.
        pub rsvd19: u8,
        /// Active power.
        pub actp: u16,
        /// Active power workload (bits 2:0) and active power scale (bits 7:6).
        pub apws: u8,
        /// Reserved.
        pub rsvd23: [u8; 9],
    }
}

const _: () = assert!(size_of::<PowerStateDescriptor>() == 32);
const _: () = assert!(PowerStateDescriptor::FIELD_BYTES == size_of::<PowerStateDescriptor>());
const _: () = assert!(offset_of!(PowerStateDescriptor, enlat) == 4);
const _: () = assert!(offset_of!(PowerStateDescriptor, idlp) == 16);
const _: () = assert!(offset_of!(PowerStateDescriptor, actp) == 20);

wire_struct! {
    /// The Identify Controller data structure (CNS 01h; Base Specification 2.0, figure 275).
    ///
    /// Fields are little-endian on the wire; string fields (`sn`, `mn`, `fr`) are ASCII, left
    /// justified and padded with spaces; `subnqn` is UTF-8 and NUL padded.
    #[repr(C)]
    #[derive(Clone, PartialEq, Eq, Debug)]
    pub struct IdentifyController {
        /// PCI vendor ID.
        pub vid: u16,
        /// PCI subsystem vendor ID.
        pub ssvid: u16,
        /// Serial number (ASCII, space padded).
        pub sn: [u8; 20],
        /// Model number (ASCII, space padded).
        pub mn: [u8; 40],
        /// Firmware revision (ASCII, space padded).
        pub fr: [u8; 8],
        /// Recommended arbitration burst (2^n commands).
        pub rab: u8,
        /// IEEE OUI identifier.
        pub ieee: [u8; 3],
        /// Controller multi-path I/O and namespace sharing capabilities.
        pub cmic: u8,
        /// Maximum data transfer size, 2^n units of CAP.MPSMIN; 0 means no limit.
        pub mdts: u8,
        /// Controller ID.
        pub cntlid: u16,
        /// Version (major 31:16, minor 15:8, tertiary 7:0).
        pub ver: u32,
        /// RTD3 resume latency (microseconds).
        pub rtd3r: u32,
        /// RTD3 entry latency (microseconds).
        pub rtd3e: u32,
        /// Optional asynchronous events supported.
        pub oaes: u32,
        /// Controller attributes.
        pub ctratt: u32,
        /// Read recovery levels supported.
        pub rrls: u16,
        /// Reserved.
        pub rsvd102: [u8; 9],
        /// Controller type (1: I/O controller).
        pub cntrltype: u8,
        /// FRU globally unique identifier.
        pub fguid: [u8; 16],
        /// Command retry delay time 1, in units of 100 ms (selected by CQE status CRD = 1).
        pub crdt1: u16,
        /// Command retry delay time 2 (CRD = 2).
        pub crdt2: u16,
        /// Command retry delay time 3 (CRD = 3).
        pub crdt3: u16,
        /// Reserved, and the NVMe Management Interface area (bytes 255:240).
        pub rsvd134: [u8; 122],
        /// Optional admin command support (see [`oacs`]).
        pub oacs: u16,
        /// Abort command limit (0-based).
        pub acl: u8,
        /// Asynchronous event request limit (0-based).
        pub aerl: u8,
        /// Firmware updates.
        pub frmw: u8,
        /// Log page attributes.
        pub lpa: u8,
        /// Error log page entries (0-based).
        pub elpe: u8,
        /// Number of power states supported (0-based).
        pub npss: u8,
        /// Admin vendor specific command configuration.
        pub avscc: u8,
        /// Autonomous power state transition attributes.
        pub apsta: u8,
        /// Warning composite temperature threshold (kelvin).
        pub wctemp: u16,
        /// Critical composite temperature threshold (kelvin).
        pub cctemp: u16,
        /// Maximum time for firmware activation (100 ms units).
        pub mtfa: u16,
        /// Host memory buffer preferred size (4 KiB units).
        pub hmpre: u32,
        /// Host memory buffer minimum size (4 KiB units).
        pub hmmin: u32,
        /// Total NVM capacity in bytes (128-bit little-endian).
        pub tnvmcap: [u8; 16],
        /// Unallocated NVM capacity in bytes (128-bit little-endian).
        pub unvmcap: [u8; 16],
        /// Replay protected memory block support.
        pub rpmbs: u32,
        /// Extended device self-test time (minutes).
        pub edstt: u16,
        /// Device self-test options.
        pub dsto: u8,
        /// Firmware update granularity (4 KiB units).
        pub fwug: u8,
        /// Keep alive support: granularity in 100 ms units; 0 means not supported.
        pub kas: u16,
        /// Host controlled thermal management attributes.
        pub hctma: u16,
        /// Minimum thermal management temperature.
        pub mntmt: u16,
        /// Maximum thermal management temperature.
        pub mxtmt: u16,
        /// Sanitize capabilities.
        pub sanicap: u32,
        /// Host memory buffer minimum descriptor entry size.
        pub hmminds: u32,
        /// Host memory maximum descriptors entries.
        pub hmmaxd: u16,
        /// NVM set identifier maximum.
        pub nsetidmax: u16,
        /// Endurance group identifier maximum.
        pub endgidmax: u16,
        /// ANA transition time (seconds).
        pub anatt: u8,
        /// Asymmetric namespace access capabilities.
        pub anacap: u8,
        /// ANA group identifier maximum.
        pub anagrpmax: u32,
        /// Number of ANA group identifiers.
        pub nanagrpid: u32,
        /// Persistent event log size (64 KiB units).
        pub pels: u32,
        /// Domain identifier.
        pub domainid: u16,
        /// Reserved.
        pub rsvd358: [u8; 10],
        /// Max endurance group capacity (128-bit little-endian).
        pub megcap: [u8; 16],
        /// Reserved.
        pub rsvd384: [u8; 128],
        /// Submission queue entry size: required (3:0) and maximum (7:4), as powers of two.
        pub sqes: u8,
        /// Completion queue entry size: required (3:0) and maximum (7:4), as powers of two.
        pub cqes: u8,
        /// Maximum outstanding commands (fabrics); 0 elsewhere.
        pub maxcmd: u16,
        /// Number of namespaces (the largest valid NSID).
        pub nn: u32,
        /// Optional NVM command support (see [`oncs`]).
        pub oncs: u16,
        /// Fused operation support.
        pub fuses: u16,
        /// Format NVM attributes.
        pub fna: u8,
        /// Volatile write cache: bit 0 set when present (then Flush matters).
        pub vwc: u8,
        /// Atomic write unit normal (logical blocks, 0-based).
        pub awun: u16,
        /// Atomic write unit power fail (logical blocks, 0-based).
        pub awupf: u16,
        /// I/O command set vendor specific command configuration.
        pub icsvscc: u8,
        /// Namespace write protection capabilities.
        pub nwpc: u8,
        /// Atomic compare & write unit.
        pub acwu: u16,
        /// Copy formats supported.
        pub ocfs: u16,
        /// SGL support (see [`sgls`]).
        pub sgls: u32,
        /// Maximum number of allowed namespaces.
        pub mnan: u32,
        /// Maximum domain namespace attachments (128-bit little-endian).
        pub maxdna: [u8; 16],
        /// Maximum I/O controller namespace attachments.
        pub maxcna: u32,
        /// Reserved.
        pub rsvd564: [u8; 204],
        /// NVM subsystem NVMe qualified name (UTF-8, NUL padded).
        pub subnqn: [u8; 256],
        /// Reserved.
        pub rsvd1024: [u8; 768],
        /// I/O queue command capsule supported size, in 16-byte units (fabrics).
        pub ioccsz: u32,
        /// I/O queue response capsule supported size, in 16-byte units (fabrics).
        pub iorcsz: u32,
        /// In-capsule data offset, in 16-byte units (fabrics).
        pub icdoff: u16,
        /// Fabrics controller attributes (bit 0: dynamic controller model).
        pub fcatt: u8,
        /// Maximum SGL data block descriptors per command (fabrics; 0 = no limit).
        pub msdbd: u8,
        /// Optional fabric commands support.
        pub ofcs: u16,
        /// Discovery controller type.
        pub dctype: u8,
        /// Reserved.
        pub rsvd1807: [u8; 241],
        /// Power state descriptors 0..=31.
        pub psd: [PowerStateDescriptor; 32],
        /// Vendor specific.
        pub vs: [u8; 1024],
    }
}

const _: () = assert!(size_of::<IdentifyController>() == IDENTIFY_SIZE);
const _: () = assert!(IdentifyController::FIELD_BYTES == IDENTIFY_SIZE);
const _: () = assert!(align_of::<IdentifyController>() <= 4);
const _: () = assert!(offset_of!(IdentifyController, sn) == 0x04);
const _: () = assert!(offset_of!(IdentifyController, mn) == 0x18);
const _: () = assert!(offset_of!(IdentifyController, fr) == 0x40);
const _: () = assert!(offset_of!(IdentifyController, mdts) == 0x4d);
const _: () = assert!(offset_of!(IdentifyController, cntlid) == 0x4e);
const _: () = assert!(offset_of!(IdentifyController, ver) == 0x50);
const _: () = assert!(offset_of!(IdentifyController, cntrltype) == 0x6f);
const _: () = assert!(offset_of!(IdentifyController, crdt1) == 0x80);
const _: () = assert!(offset_of!(IdentifyController, crdt3) == 0x84);
const _: () = assert!(offset_of!(IdentifyController, oacs) == 0x100);
const _: () = assert!(offset_of!(IdentifyController, npss) == 0x107);
const _: () = assert!(offset_of!(IdentifyController, tnvmcap) == 0x118);
const _: () = assert!(offset_of!(IdentifyController, kas) == 0x140);
const _: () = assert!(offset_of!(IdentifyController, anagrpmax) == 0x158);
const _: () = assert!(offset_of!(IdentifyController, megcap) == 0x170);
const _: () = assert!(offset_of!(IdentifyController, sqes) == 0x200);
const _: () = assert!(offset_of!(IdentifyController, nn) == 0x204);
const _: () = assert!(offset_of!(IdentifyController, oncs) == 0x208);
const _: () = assert!(offset_of!(IdentifyController, vwc) == 0x20d);
const _: () = assert!(offset_of!(IdentifyController, awupf) == 0x210);
const _: () = assert!(offset_of!(IdentifyController, sgls) == 0x218);
const _: () = assert!(offset_of!(IdentifyController, subnqn) == 0x300);
const _: () = assert!(offset_of!(IdentifyController, ioccsz) == 0x700);
const _: () = assert!(offset_of!(IdentifyController, icdoff) == 0x708);
const _: () = assert!(offset_of!(IdentifyController, msdbd) == 0x70b);
const _: () = assert!(offset_of!(IdentifyController, psd) == 0x800);
const _: () = assert!(offset_of!(IdentifyController, vs) == 0xc00);

/// NVMe version 2.0.0 as encoded in VER.
pub const NVME_VERSION_2_0: u32 = 0x0002_0000;

/// Fabrics-specific Identify Controller fields (bytes 1803:1792).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct FabricsAttributes {
    /// I/O command capsule size in 16-byte units (minimum 4: the 64-byte SQE).
    pub ioccsz: u32,
    /// I/O response capsule size in 16-byte units (minimum 1: the 16-byte CQE).
    pub iorcsz: u32,
    /// In-capsule data offset in 16-byte units.
    pub icdoff: u16,
    /// Controller attributes (bit 0: dynamic controller model).
    pub fcatt: u8,
    /// Maximum SGL data block descriptors per command (0: no limit).
    pub msdbd: u8,
}

/// Copies `s` into an ASCII field, left justified and padded with spaces (Base Specification
/// 2.0, section 1.5 "ASCII string"). Bytes outside printable ASCII become `?`; longer input is
/// truncated.
fn ascii_field<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (o, b) in out.iter_mut().zip(s.bytes()) {
        *o = if (0x20..0x7f).contains(&b) { b } else { b'?' };
    }
    out
}

impl IdentifyController {
    /// An all-zero structure.
    pub fn zeroed() -> Self {
        Self::from_bytes(&[0; IDENTIFY_SIZE])
    }

    /// A controller description with the identity strings set and defaults suitable for a
    /// virtual NVMe controller: version 2.0, 64-byte SQEs and 16-byte CQEs, one namespace, one
    /// power state, 4 outstanding aborts and async events, no transfer size limit (MDTS 0).
    /// Adjust with the `with_*` helpers.
    pub fn new(vid: u16, ssvid: u16, serial: &str, model: &str, firmware: &str) -> Self {
        let mut c = Self::zeroed();
        c.vid = vid.to_le();
        c.ssvid = ssvid.to_le();
        c.sn = ascii_field(serial);
        c.mn = ascii_field(model);
        c.fr = ascii_field(firmware);
        c.ver = NVME_VERSION_2_0.to_le();
        c.cntrltype = 1; // I/O controller
        c.acl = 3;
        c.aerl = 3;
        c.frmw = 0b0011; // one firmware slot, read only
        c.sqes = 0x66;
        c.cqes = 0x44;
        c.nn = 1u32.to_le();
        c.psd[0].mp = 2500u16.to_le(); // 25 W, the figure is informational
        c
    }

    /// Sets MDTS: the maximum transfer is 2^`mdts` units of the minimum memory page size.
    pub fn with_mdts(mut self, mdts: u8) -> Self {
        self.mdts = mdts;
        self
    }
    /// Sets the controller ID.
    pub fn with_cntlid(mut self, cntlid: u16) -> Self {
        self.cntlid = cntlid.to_le();
        self
    }
    /// Sets the number of namespaces.
    pub fn with_nn(mut self, nn: u32) -> Self {
        self.nn = nn.to_le();
        self
    }
    /// Sets the optional NVM command support bits (see [`oncs`]).
    pub fn with_oncs(mut self, bits: u16) -> Self {
        self.oncs = bits.to_le();
        self
    }
    /// Sets the optional admin command support bits (see [`oacs`]).
    pub fn with_oacs(mut self, bits: u16) -> Self {
        self.oacs = bits.to_le();
        self
    }
    /// Declares a volatile write cache (hosts then send Flush).
    pub fn with_vwc(mut self, present: bool) -> Self {
        self.vwc = present as u8;
        self
    }
    /// Sets the SGL support bits (see [`sgls`]).
    pub fn with_sgls(mut self, bits: u32) -> Self {
        self.sgls = bits.to_le();
        self
    }
    /// Sets the command retry delay times CRDT1..3 (100 ms units), used with the CRD field of a
    /// completion status.
    pub fn with_crdt(mut self, crdt: [u16; 3]) -> Self {
        self.crdt1 = crdt[0].to_le();
        self.crdt2 = crdt[1].to_le();
        self.crdt3 = crdt[2].to_le();
        self
    }
    /// Sets the keep alive granularity (100 ms units; 0: not supported).
    pub fn with_kas(mut self, kas: u16) -> Self {
        self.kas = kas.to_le();
        self
    }
    /// Sets the maximum number of outstanding commands (fabrics).
    pub fn with_maxcmd(mut self, maxcmd: u16) -> Self {
        self.maxcmd = maxcmd.to_le();
        self
    }
    /// Sets the atomic write units (0-based logical block counts).
    pub fn with_atomic_write(mut self, awun: u16, awupf: u16) -> Self {
        self.awun = awun.to_le();
        self.awupf = awupf.to_le();
        self
    }
    /// Sets the multi-path / sharing capabilities.
    pub fn with_cmic(mut self, cmic: u8) -> Self {
        self.cmic = cmic;
        self
    }
    /// Sets the IEEE OUI (stored least significant byte first).
    pub fn with_ieee(mut self, oui: [u8; 3]) -> Self {
        self.ieee = oui;
        self
    }
    /// Sets the subsystem NQN. At most 255 bytes are kept, so the field always ends with a NUL.
    pub fn with_subnqn(mut self, nqn: &str) -> Self {
        self.subnqn = [0; 256];
        let n = nqn.len().min(255);
        self.subnqn[..n].copy_from_slice(&nqn.as_bytes()[..n]);
        self
    }
    /// Sets the fabrics fields (NVMe over Fabrics; zero for PCIe-style controllers).
    pub fn with_fabrics(mut self, f: FabricsAttributes) -> Self {
        self.ioccsz = f.ioccsz.to_le();
        self.iorcsz = f.iorcsz.to_le();
        self.icdoff = f.icdoff.to_le();
        self.fcatt = f.fcatt;
        self.msdbd = f.msdbd;
        self
    }

    /// PCI vendor ID.
    pub fn vid_value(&self) -> u16 {
        u16::from_le(self.vid)
    }
    /// Controller ID.
    pub fn cntlid_value(&self) -> u16 {
        u16::from_le(self.cntlid)
    }
    /// Version.
    pub fn ver_value(&self) -> u32 {
        u32::from_le(self.ver)
    }
    /// Number of namespaces.
    pub fn nn_value(&self) -> u32 {
        u32::from_le(self.nn)
    }
    /// Optional NVM command support bits.
    pub fn oncs_value(&self) -> u16 {
        u16::from_le(self.oncs)
    }
    /// SGL support bits.
    pub fn sgls_value(&self) -> u32 {
        u32::from_le(self.sgls)
    }
    /// Command retry delay time `n` (1..=3) in 100 ms units; other values give 0 (no delay).
    pub fn crdt_value(&self, n: u8) -> u16 {
        u16::from_le(match n {
            1 => self.crdt1,
            2 => self.crdt2,
            3 => self.crdt3,
            _ => 0,
        })
    }
    /// The subsystem NQN up to its first NUL, if it is valid UTF-8.
    pub fn subnqn_str(&self) -> Option<&str> {
        let end = self
            .subnqn
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.subnqn.len());
        core::str::from_utf8(&self.subnqn[..end]).ok()
    }

    /// The structure as the 4096 bytes the Identify command returns.
    pub fn as_bytes(&self) -> &[u8; IDENTIFY_SIZE] {
        // SAFETY: `IdentifyController` is `repr(C)`, exactly IDENTIFY_SIZE bytes, and has no
        // padding (FIELD_BYTES == size, asserted above), so all 4096 bytes are initialised
        // integer bytes. `[u8; N]` has alignment 1, and the returned borrow is tied to `self`.
        unsafe { &*(self as *const Self).cast::<[u8; IDENTIFY_SIZE]>() }
    }

    /// Decodes the 4096 bytes an Identify command returned (any bit pattern is a valid value).
    pub fn from_bytes(bytes: &[u8; IDENTIFY_SIZE]) -> Self {
        // SAFETY: the source is valid for IDENTIFY_SIZE bytes of reads, which is the size of
        // `Self`; `read_unaligned` does not need the source to be aligned; every field is an
        // integer or integer array, so every bit pattern is a valid `Self`.
        unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() }
    }
}

/// One LBA format descriptor (NVM Command Set 1.0, figure 98): 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct LbaFormat {
    /// Metadata size per logical block, in bytes.
    pub ms: u16,
    /// LBA data size as a power of two (9 = 512 bytes).
    pub lbads: u8,
    /// Relative performance (bits 1:0; 0 is best).
    pub rp: u8,
}

const _: () = assert!(size_of::<LbaFormat>() == 4);

/// Namespace feature bits (NSFEAT, Identify Namespace byte 24).
pub mod nsfeat {
    /// Thin provisioning: NUSE may be smaller than NCAP.
    pub const THIN_PROVISIONING: u8 = 1 << 0;
    /// NAWUN, NAWUPF and NACWU are namespace specific.
    pub const NS_ATOMICS: u8 = 1 << 1;
    /// Deallocated or unwritten logical block error is supported.
    pub const DAE: u8 = 1 << 2;
    /// NGUID / EUI64 are never reused.
    pub const UIDREUSE: u8 = 1 << 3;
    /// NPWG, NPWA, NPDG, NPDA and NOWS are defined (optimal I/O performance hints).
    pub const OPTPERF: u8 = 1 << 4;
}

wire_struct! {
    /// The NVM command set's Identify Namespace data structure (CNS 00h; NVM Command Set
    /// Specification 1.0, figure 97).
    #[repr(C)]
    #[derive(Clone, PartialEq, Eq, Debug)]
    pub struct IdentifyNamespace {
        /// Namespace size, in logical blocks.
        pub nsze: u64,
        /// Namespace capacity, in logical blocks.
        pub ncap: u64,
        /// Namespace utilization, in logical blocks.
        pub nuse: u64,
        /// Namespace features (see [`nsfeat`]).
        pub nsfeat: u8,
        /// Number of LBA formats, 0-based.
        pub nlbaf: u8,
        /// Formatted LBA size: format index bits 3:0 (low) and 6:5 (high), metadata at end of
        /// LBA (bit 4).
        pub flbas: u8,
        /// Metadata capabilities.
        pub mc: u8,
        /// End-to-end data protection capabilities.
        pub dpc: u8,
        /// End-to-end data protection type settings.
        pub dps: u8,
        /// Namespace multi-path I/O and sharing capabilities.
        pub nmic: u8,
        /// Reservation capabilities.
        pub rescap: u8,
        /// Format progress indicator.
        pub fpi: u8,
        /// Deallocate logical block features: bits 2:0 read value after deallocate (001b:
        /// zeroes), bit 3 Write Zeroes may deallocate, bit 4 guard field.
        pub dlfeat: u8,
        /// Namespace atomic write unit normal.
        pub nawun: u16,
        /// Namespace atomic write unit power fail.
        pub nawupf: u16,
        /// Namespace atomic compare & write unit.
        pub nacwu: u16,
        /// Namespace atomic boundary size normal.
        pub nabsn: u16,
        /// Namespace atomic boundary offset.
        pub nabo: u16,
        /// Namespace atomic boundary size power fail.
        pub nabspf: u16,
        /// Namespace optimal I/O boundary (logical blocks).
        pub noiob: u16,
        /// NVM capacity in bytes (128-bit little-endian).
        pub nvmcap: [u8; 16],
        /// Namespace preferred write granularity (0-based logical blocks).
        pub npwg: u16,
        /// Namespace preferred write alignment (0-based logical blocks).
        pub npwa: u16,
        /// Namespace preferred deallocate granularity (0-based logical blocks).
        pub npdg: u16,
        /// Namespace preferred deallocate alignment (0-based logical blocks).
        pub npda: u16,
        /// Namespace optimal write size (0-based logical blocks).
        pub nows: u16,
        /// Maximum single source range length (Copy).
        pub mssrl: u16,
        /// Maximum copy length.
        pub mcl: u32,
        /// Maximum source range count (Copy).
        pub msrc: u8,
        /// Reserved.
        pub rsvd81: u8,
        /// Number of unique capability LBA formats.
        pub nulbaf: u8,
        /// Reserved.
        pub rsvd83: [u8; 9],
        /// ANA group identifier.
        pub anagrpid: u32,
        /// Reserved.
        pub rsvd96: [u8; 3],
        /// Namespace attributes (bit 0: write protected).
        pub nsattr: u8,
        /// NVM set identifier.
        pub nvmsetid: u16,
        /// Endurance group identifier.
        pub endgid: u16,
        /// Namespace globally unique identifier.
        pub nguid: [u8; 16],
        /// IEEE extended unique identifier.
        pub eui64: [u8; 8],
        /// LBA formats 0..=63.
        pub lbaf: [LbaFormat; 64],
        /// Reserved and vendor specific.
        pub vs: [u8; 3712],
    }
}

const _: () = assert!(size_of::<IdentifyNamespace>() == IDENTIFY_SIZE);
const _: () = assert!(IdentifyNamespace::FIELD_BYTES == IDENTIFY_SIZE);
const _: () = assert!(align_of::<IdentifyNamespace>() <= 8);
const _: () = assert!(offset_of!(IdentifyNamespace, ncap) == 8);
const _: () = assert!(offset_of!(IdentifyNamespace, nsfeat) == 24);
const _: () = assert!(offset_of!(IdentifyNamespace, flbas) == 26);
const _: () = assert!(offset_of!(IdentifyNamespace, dlfeat) == 33);
const _: () = assert!(offset_of!(IdentifyNamespace, noiob) == 46);
const _: () = assert!(offset_of!(IdentifyNamespace, nvmcap) == 48);
const _: () = assert!(offset_of!(IdentifyNamespace, npwg) == 64);
const _: () = assert!(offset_of!(IdentifyNamespace, mcl) == 76);
const _: () = assert!(offset_of!(IdentifyNamespace, anagrpid) == 92);
const _: () = assert!(offset_of!(IdentifyNamespace, nsattr) == 99);
const _: () = assert!(offset_of!(IdentifyNamespace, nguid) == 104);
const _: () = assert!(offset_of!(IdentifyNamespace, eui64) == 120);
const _: () = assert!(offset_of!(IdentifyNamespace, lbaf) == 128);
const _: () = assert!(offset_of!(IdentifyNamespace, vs) == 384);

/// Smallest LBA data size shift the specification allows (512-byte blocks).
pub const MIN_LBA_SHIFT: u8 = 9;
/// Largest LBA data size shift Leap accepts (1 MiB blocks).
pub const MAX_LBA_SHIFT: u8 = 20;

impl IdentifyNamespace {
    /// An all-zero structure (what Identify returns for an inactive namespace).
    pub fn zeroed() -> Self {
        Self::from_bytes(&[0; IDENTIFY_SIZE])
    }

    /// A fully provisioned namespace of `nsze_blocks` logical blocks of 2^`lba_shift` bytes,
    /// with one LBA format and no metadata. Adjust with the `with_*` helpers.
    pub fn new(nsze_blocks: u64, lba_shift: u8) -> Result<Self, IdentifyError> {
        if !(MIN_LBA_SHIFT..=MAX_LBA_SHIFT).contains(&lba_shift) {
            return Err(IdentifyError::InvalidLbaShift(lba_shift));
        }
        let mut ns = Self::zeroed();
        ns.nsze = nsze_blocks.to_le();
        ns.ncap = nsze_blocks.to_le();
        ns.nuse = nsze_blocks.to_le();
        ns.nlbaf = 0;
        ns.flbas = 0;
        ns.lbaf[0] = LbaFormat {
            ms: 0,
            lbads: lba_shift,
            rp: 0,
        };
        Ok(ns)
    }

    /// Declares thin provisioning with `nuse_blocks` currently allocated.
    pub fn with_thin_provisioning(mut self, nuse_blocks: u64) -> Self {
        self.nsfeat |= nsfeat::THIN_PROVISIONING;
        self.nuse = nuse_blocks.to_le();
        self
    }
    /// Declares that deallocated blocks read as zeroes and that Write Zeroes may deallocate
    /// (DLFEAT = 1001b), which lets hosts use Write Zeroes with DEAC and Dataset Management.
    pub fn with_deallocate_zeroes(mut self) -> Self {
        self.dlfeat = 0b1001;
        self
    }
    /// Sets the optimal I/O hints (counts of logical blocks, not 0-based; 0 is taken as 1):
    /// preferred write granularity and alignment, deallocate granularity and alignment, optimal
    /// write size.
    pub fn with_optimal_io(
        mut self,
        npwg: u16,
        npwa: u16,
        npdg: u16,
        npda: u16,
        nows: u16,
    ) -> Self {
        let z = |v: u16| v.saturating_sub(1).to_le();
        self.nsfeat |= nsfeat::OPTPERF;
        self.npwg = z(npwg);
        self.npwa = z(npwa);
        self.npdg = z(npdg);
        self.npda = z(npda);
        self.nows = z(nows);
        self
    }
    /// Sets the optimal I/O boundary in logical blocks (0: none).
    pub fn with_noiob(mut self, blocks: u16) -> Self {
        self.noiob = blocks.to_le();
        self
    }
    /// Sets the namespace atomic write units (0-based logical block counts).
    pub fn with_atomic_write(mut self, nawun: u16, nawupf: u16) -> Self {
        self.nsfeat |= nsfeat::NS_ATOMICS;
        self.nawun = nawun.to_le();
        self.nawupf = nawupf.to_le();
        self
    }
    /// Marks the namespace as possibly shared between controllers (NMIC bit 0).
    pub fn with_shared(mut self, shared: bool) -> Self {
        self.nmic = shared as u8;
        self
    }
    /// Sets the namespace globally unique identifier.
    pub fn with_nguid(mut self, nguid: [u8; 16]) -> Self {
        self.nguid = nguid;
        self
    }
    /// Sets the IEEE extended unique identifier.
    pub fn with_eui64(mut self, eui64: [u8; 8]) -> Self {
        self.eui64 = eui64;
        self
    }
    /// Marks the namespace write protected (NSATTR bit 0).
    pub fn with_write_protected(mut self, wp: bool) -> Self {
        self.nsattr = wp as u8;
        self
    }

    /// Namespace size in logical blocks.
    pub fn nsze_value(&self) -> u64 {
        u64::from_le(self.nsze)
    }
    /// Index of the formatted LBA format (FLBAS bits 3:0 and 6:5).
    pub fn format_index(&self) -> usize {
        ((self.flbas & 0xf) | (((self.flbas >> 5) & 0x3) << 4)) as usize
    }
    /// LBA data size shift of the formatted LBA format, if it is in 9..=20.
    pub fn lba_shift(&self) -> Option<u8> {
        let s = self.lbaf.get(self.format_index())?.lbads;
        (MIN_LBA_SHIFT..=MAX_LBA_SHIFT).contains(&s).then_some(s)
    }
    /// Logical block size in bytes, if the formatted LBA format is valid.
    pub fn block_size(&self) -> Option<u32> {
        self.lba_shift().map(|s| 1u32 << s)
    }

    /// The structure as the 4096 bytes the Identify command returns.
    pub fn as_bytes(&self) -> &[u8; IDENTIFY_SIZE] {
        // SAFETY: `IdentifyNamespace` is `repr(C)`, exactly IDENTIFY_SIZE bytes and has no
        // padding (FIELD_BYTES == size, asserted above), so every byte is an initialised integer
        // byte; `[u8; N]` has alignment 1 and the borrow is tied to `self`.
        unsafe { &*(self as *const Self).cast::<[u8; IDENTIFY_SIZE]>() }
    }

    /// Decodes the 4096 bytes an Identify command returned (any bit pattern is a valid value).
    pub fn from_bytes(bytes: &[u8; IDENTIFY_SIZE]) -> Self {
        // SAFETY: the source is valid for IDENTIFY_SIZE bytes, the size of `Self`;
        // `read_unaligned` needs no alignment; every field is an integer or integer array, so
        // every bit pattern is a valid `Self`.
        unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le16(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn controller_fields_land_at_spec_offsets() {
        let c = IdentifyController::new(0x1af4, 0x1af4, "SN123", "Leap virtual NVMe", "0.1")
            .with_mdts(8)
            .with_cntlid(7)
            .with_nn(3)
            .with_oncs(oncs::DSM | oncs::WRITE_ZEROES)
            .with_vwc(true)
            .with_sgls(sgls::SUPPORTED | sgls::OFFSET)
            .with_crdt([1, 10, 100])
            .with_kas(10)
            .with_subnqn("nqn.2026-11.io.leap:disk0")
            .with_fabrics(FabricsAttributes {
                ioccsz: 4 + 512,
                iorcsz: 1,
                icdoff: 0,
                fcatt: 0,
                msdbd: 1,
            });
        let b = c.as_bytes();

        assert_eq!(le16(b, 0), 0x1af4);
        assert_eq!(&b[4..9], b"SN123");
        assert!(b[9..24].iter().all(|&x| x == b' '));
        assert_eq!(&b[24..41], b"Leap virtual NVMe");
        assert_eq!(&b[64..67], b"0.1");
        assert_eq!(b[77], 8);
        assert_eq!(le16(b, 78), 7);
        assert_eq!(le32(b, 80), NVME_VERSION_2_0);
        assert_eq!((le16(b, 0x80), le16(b, 0x82), le16(b, 0x84)), (1, 10, 100));
        assert_eq!(le16(b, 320), 10);
        assert_eq!((b[512], b[513]), (0x66, 0x44));
        assert_eq!(le32(b, 516), 3);
        assert_eq!(le16(b, 520), 0b1100);
        assert_eq!(b[525], 1);
        assert_eq!(le32(b, 536), sgls::SUPPORTED | sgls::OFFSET);
        assert_eq!(&b[768..793], b"nqn.2026-11.io.leap:disk0");
        assert_eq!(b[793], 0);
        assert_eq!(le32(b, 1792), 516);
        assert_eq!(b[1803], 1);
        assert_eq!(le16(b, 2048), 2500);

        assert_eq!(c.crdt_value(2), 10);
        assert_eq!(c.crdt_value(0), 0);
        assert_eq!(c.subnqn_str(), Some("nqn.2026-11.io.leap:disk0"));
    }

    #[test]
    fn controller_round_trips_through_bytes() {
        let c = IdentifyController::new(1, 2, "s", "m", "f").with_nn(9);
        let back = IdentifyController::from_bytes(c.as_bytes());
        assert_eq!(back, c);
        assert_eq!(
            (back.vid_value(), back.nn_value(), back.ver_value()),
            (1, 9, NVME_VERSION_2_0)
        );
    }

    #[test]
    fn strings_are_sanitised_and_truncated() {
        let c = IdentifyController::new(0, 0, "é-0123456789012345678901234", "", "");
        // 'é' is two non-ASCII bytes; the result stays exactly 20 bytes.
        assert_eq!(&c.sn[..4], b"??-0");
        assert_eq!(c.sn.len(), 20);
        assert!(c.mn.iter().all(|&x| x == b' '));
        let long = "x".repeat(400);
        let c = c.with_subnqn(&long);
        assert_eq!(c.subnqn[255], 0);
        assert_eq!(c.subnqn_str().map(str::len), Some(255));
    }

    #[test]
    fn namespace_fields_land_at_spec_offsets() {
        let ns = IdentifyNamespace::new(1 << 21, 12)
            .unwrap()
            .with_thin_provisioning(5)
            .with_deallocate_zeroes()
            .with_optimal_io(8, 8, 8, 8, 32);
        let b = ns.as_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 1 << 21);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 5);
        assert_eq!(b[24], nsfeat::THIN_PROVISIONING | nsfeat::OPTPERF);
        assert_eq!((b[25], b[26]), (0, 0));
        assert_eq!(b[33], 0b1001);
        assert_eq!(le16(b, 64), 7);
        assert_eq!(le16(b, 72), 31);
        assert_eq!(b[128 + 2], 12);
        assert_eq!(ns.block_size(), Some(4096));
        assert_eq!(ns.nsze_value(), 1 << 21);
        assert_eq!(IdentifyNamespace::from_bytes(b), ns);
    }

    #[test]
    fn namespace_rejects_bad_block_sizes() {
        assert_eq!(
            IdentifyNamespace::new(1, 8).unwrap_err(),
            IdentifyError::InvalidLbaShift(8)
        );
        assert!(IdentifyNamespace::new(1, 21).is_err());
        assert!(IdentifyNamespace::new(1, 9).is_ok());
    }

    #[test]
    fn hostile_format_index_is_handled() {
        let mut bytes = [0xffu8; IDENTIFY_SIZE];
        bytes[26] = 0x7f; // FLBAS: index 63
        let ns = IdentifyNamespace::from_bytes(&bytes);
        assert_eq!(ns.format_index(), 63);
        assert_eq!(ns.lba_shift(), None); // lbads 0xff is out of range
        assert_eq!(IdentifyNamespace::zeroed().lba_shift(), None);
    }
}
