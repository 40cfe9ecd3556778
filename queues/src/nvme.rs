//! NVMe wire types: the 64-byte submission queue entry, the 16-byte completion queue entry, opcodes,
//! status codes and SGL descriptors, laid out as in the NVM Express Base Specification 2.0
//! (section 4.1 "Submission Queue Entry", 4.2 "Completion Queue Entry", 4.1.2 "SGL") and the NVM
//! Command Set Specification 1.0 (section 3 "I/O Commands").
//!
//! All multi-byte fields are little-endian on the wire. The structures are `#[repr(C)]` with only
//! integer fields, so every bit pattern is a valid value: a guest or a peer can write anything into
//! a ring and it decodes without undefined behaviour. Accessors convert from little-endian, so the
//! code is correct on big-endian hosts too.

use core::mem::{offset_of, size_of};

/// Admin command opcodes (Base Specification 2.0, figure 28).
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics command (NVMe over Fabrics 1.1, section 3.1).
    pub const FABRICS: u8 = 0x7f;
}

/// NVM command set I/O opcodes (NVM Command Set Specification 1.0, figure 17).
pub mod io {
    /// Flush: commit volatile write cache contents to non-volatile media.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (deallocate = discard/trim).
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values (Base Specification 2.0, figure 273).
pub mod cns {
    /// Identify Namespace data structure for the given NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace ID list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace identification descriptor list.
    pub const NS_DESCRIPTORS: u8 = 0x03;
}

/// Feature identifiers (Base Specification 2.0, figure 317).
pub mod feature {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Volatile Write Cache (bit 0 of dword 11: WCE).
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    /// Keep Alive Timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    /// Host Behavior Support (ACRE: the host accepts Command Retry Delay).
    pub const HOST_BEHAVIOR_SUPPORT: u8 = 0x16;
}

/// PSDT field values (CDW0 bits 15:14): how the data pointer is to be read.
pub mod psdt {
    /// PRP1/PRP2.
    pub const PRP: u8 = 0;
    /// SGL; MPTR is a contiguous buffer.
    pub const SGL_MPTR_CONTIG: u8 = 1;
    /// SGL; MPTR is an SGL segment.
    pub const SGL_MPTR_SGL: u8 = 2;
}

/// A submission queue entry (Base Specification 2.0, figure 88): 64 bytes.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Sqe {
    /// CDW0: opcode (7:0), FUSE (9:8), PSDT (15:14), command identifier (31:16).
    pub cdw0: u32,
    /// Namespace identifier.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer: PRP1 and PRP2, or SGL descriptor 1 (16 bytes).
    pub dptr: [u64; 2],
    /// Command dwords 10 to 15.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

const _: () = assert!(size_of::<Sqe>() == 64);
const _: () = assert!(offset_of!(Sqe, nsid) == 4);
const _: () = assert!(offset_of!(Sqe, mptr) == 16);
const _: () = assert!(offset_of!(Sqe, dptr) == 24);
const _: () = assert!(offset_of!(Sqe, cdw10) == 40);
const _: () = assert!(offset_of!(Sqe, cdw15) == 60);

impl Sqe {
    /// A zeroed entry with the given opcode and command identifier.
    pub fn new(opcode: u8, cid: u16) -> Self {
        Sqe {
            cdw0: (opcode as u32) | ((cid as u32) << 16),
            ..Default::default()
        }
        .to_le()
    }

    /// Converts every field between host order and little-endian (a no-op on little-endian hosts).
    /// Entries in rings are little-endian; `Sqe` values built by [`Sqe::new`] and the setters are
    /// kept in wire order already.
    fn to_le(mut self) -> Self {
        self.cdw0 = self.cdw0.to_le();
        self
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        u32::from_le(self.cdw0) as u8
    }
    /// The command identifier.
    pub fn cid(&self) -> u16 {
        (u32::from_le(self.cdw0) >> 16) as u16
    }
    /// Sets the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        let v = (u32::from_le(self.cdw0) & 0xffff) | ((cid as u32) << 16);
        self.cdw0 = v.to_le();
    }
    /// The PSDT field: [`psdt::PRP`] or one of the SGL values.
    pub fn psdt(&self) -> u8 {
        ((u32::from_le(self.cdw0) >> 14) & 0x3) as u8
    }
    /// Sets the PSDT field.
    pub fn set_psdt(&mut self, v: u8) {
        let w = (u32::from_le(self.cdw0) & !(0x3 << 14)) | (((v & 0x3) as u32) << 14);
        self.cdw0 = w.to_le();
    }
    /// The fused-operation field.
    pub fn fuse(&self) -> u8 {
        ((u32::from_le(self.cdw0) >> 8) & 0x3) as u8
    }
    /// The namespace identifier.
    pub fn nsid(&self) -> u32 {
        u32::from_le(self.nsid)
    }
    /// Sets the namespace identifier.
    pub fn set_nsid(&mut self, nsid: u32) {
        self.nsid = nsid.to_le();
    }
    /// Command dword `n` (2, 3 or 10..=15); any other index reads as 0.
    pub fn cdw(&self, n: usize) -> u32 {
        u32::from_le(match n {
            2 => self.cdw2,
            3 => self.cdw3,
            10 => self.cdw10,
            11 => self.cdw11,
            12 => self.cdw12,
            13 => self.cdw13,
            14 => self.cdw14,
            15 => self.cdw15,
            _ => 0,
        })
    }
    /// Sets command dword `n` (2, 3 or 10..=15); any other index is ignored.
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        let v = v.to_le();
        match n {
            2 => self.cdw2 = v,
            3 => self.cdw3 = v,
            10 => self.cdw10 = v,
            11 => self.cdw11 = v,
            12 => self.cdw12 = v,
            13 => self.cdw13 = v,
            14 => self.cdw14 = v,
            15 => self.cdw15 = v,
            _ => {}
        }
    }
    /// PRP entry 1.
    pub fn prp1(&self) -> u64 {
        u64::from_le(self.dptr[0])
    }
    /// PRP entry 2.
    pub fn prp2(&self) -> u64 {
        u64::from_le(self.dptr[1])
    }
    /// Sets PRP1 and PRP2 and selects PRP addressing.
    pub fn set_prps(&mut self, prp1: u64, prp2: u64) {
        self.dptr = [prp1.to_le(), prp2.to_le()];
        self.set_psdt(psdt::PRP);
    }
    /// SGL descriptor 1 (meaningful when [`Sqe::psdt`] is not [`psdt::PRP`]).
    pub fn sgl1(&self) -> SglDescriptor {
        SglDescriptor::from_raw(self.dptr)
    }
    /// Sets SGL descriptor 1 and selects SGL addressing (PSDT = 01b).
    pub fn set_sgl1(&mut self, d: SglDescriptor) {
        self.dptr = d.to_raw();
        self.set_psdt(psdt::SGL_MPTR_CONTIG);
    }
    /// Starting LBA of a Read, Write or Write Zeroes command (CDW10, CDW11).
    pub fn slba(&self) -> u64 {
        (self.cdw(10) as u64) | ((self.cdw(11) as u64) << 32)
    }
    /// Sets the starting LBA.
    pub fn set_slba(&mut self, slba: u64) {
        self.set_cdw(10, slba as u32);
        self.set_cdw(11, (slba >> 32) as u32);
    }
    /// Number of logical blocks, as a count (CDW12 bits 15:0 hold it 0-based).
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xffff) + 1
    }
    /// Sets the number of logical blocks; `count` must be in 1..=65536.
    pub fn set_nlb(&mut self, count: u32) {
        debug_assert!((1..=65536).contains(&count));
        let v = (self.cdw(12) & !0xffff) | (count.wrapping_sub(1) & 0xffff);
        self.set_cdw(12, v);
    }
    /// Force Unit Access (CDW12 bit 30): the write is durable when it completes.
    pub fn fua(&self) -> bool {
        self.cdw(12) & (1 << 30) != 0
    }
    /// Sets Force Unit Access.
    pub fn set_fua(&mut self, on: bool) {
        let v = (self.cdw(12) & !(1 << 30)) | ((on as u32) << 30);
        self.set_cdw(12, v);
    }
    /// Deallocate (CDW12 bit 25) of Write Zeroes: the range may be unmapped.
    pub fn deac(&self) -> bool {
        self.cdw(12) & (1 << 25) != 0
    }
    /// Sets Deallocate for Write Zeroes.
    pub fn set_deac(&mut self, on: bool) {
        let v = (self.cdw(12) & !(1 << 25)) | ((on as u32) << 25);
        self.set_cdw(12, v);
    }
}

/// A completion queue entry (Base Specification 2.0, figure 89): 16 bytes.
#[repr(C, align(16))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Cqe {
    /// Command-specific dword 0.
    pub dw0: u32,
    /// Command-specific dword 1.
    pub dw1: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: u16,
}

const _: () = assert!(size_of::<Cqe>() == 16);
const _: () = assert!(offset_of!(Cqe, sq_head) == 8);
const _: () = assert!(offset_of!(Cqe, cid) == 12);
const _: () = assert!(offset_of!(Cqe, status) == 14);

impl Cqe {
    /// A completion for `cid` with `status` and the phase bit clear.
    pub fn new(cid: u16, status: Status) -> Self {
        Cqe {
            cid: cid.to_le(),
            status: (status.raw() << 1).to_le(),
            ..Default::default()
        }
    }
    /// The command identifier.
    pub fn cid(&self) -> u16 {
        u16::from_le(self.cid)
    }
    /// The status (without the phase tag).
    pub fn status(&self) -> Status {
        Status::from_raw(u16::from_le(self.status) >> 1)
    }
    /// The phase tag.
    pub fn phase(&self) -> bool {
        u16::from_le(self.status) & 1 != 0
    }
    /// Command-specific dword 0.
    pub fn dw0(&self) -> u32 {
        u32::from_le(self.dw0)
    }
    /// Sets command-specific dword 0.
    pub fn set_dw0(&mut self, v: u32) {
        self.dw0 = v.to_le();
    }
    /// Submission queue head pointer.
    pub fn sq_head(&self) -> u16 {
        u16::from_le(self.sq_head)
    }
    /// Submission queue identifier.
    pub fn sq_id(&self) -> u16 {
        u16::from_le(self.sq_id)
    }
    /// Sets the submission queue head and identifier.
    pub fn set_sq(&mut self, head: u16, id: u16) {
        self.sq_head = head.to_le();
        self.sq_id = id.to_le();
    }
}

/// Status code type (SCT; Base Specification 2.0, figure 93).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum StatusCodeType {
    /// Generic command status.
    Generic = 0,
    /// Command specific status.
    CommandSpecific = 1,
    /// Media and data integrity errors.
    Media = 2,
    /// Path related status.
    Path = 3,
    /// Reserved (4..=6).
    Reserved = 4,
    /// Vendor specific.
    Vendor = 7,
}

/// A completion status: status code (SC), status code type (SCT), command retry delay (CRD),
/// more (M) and do not retry (DNR), packed as bits 15:1 of CQE dword 3 shifted down by one
/// (Base Specification 2.0, figure 92).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(u16);

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status::generic(0x00);
    /// Invalid command opcode.
    pub const INVALID_OPCODE: Status = Status::generic(0x01).with_dnr();
    /// Invalid field in command.
    pub const INVALID_FIELD: Status = Status::generic(0x02).with_dnr();
    /// Command identifier conflict.
    pub const CID_CONFLICT: Status = Status::generic(0x03).with_dnr();
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
    /// Internal error.
    pub const INTERNAL_ERROR: Status = Status::generic(0x06);
    /// Command abort requested.
    pub const ABORT_REQUESTED: Status = Status::generic(0x07);
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::generic(0x08);
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b).with_dnr();
    /// Invalid SGL segment descriptor.
    pub const INVALID_SGL_SEGMENT: Status = Status::generic(0x0d).with_dnr();
    /// Invalid number of SGL descriptors.
    pub const INVALID_SGL_COUNT: Status = Status::generic(0x0e).with_dnr();
    /// Data SGL length invalid.
    pub const SGL_LENGTH_INVALID: Status = Status::generic(0x0f).with_dnr();
    /// SGL descriptor type invalid.
    pub const SGL_TYPE_INVALID: Status = Status::generic(0x11).with_dnr();
    /// PRP offset invalid.
    pub const INVALID_PRP_OFFSET: Status = Status::generic(0x13).with_dnr();
    /// SGL offset invalid.
    pub const SGL_OFFSET_INVALID: Status = Status::generic(0x16).with_dnr();
    /// Namespace is write protected.
    pub const NS_WRITE_PROTECTED: Status = Status::generic(0x20).with_dnr();
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80).with_dnr();
    /// Namespace not ready (retryable).
    pub const NS_NOT_READY: Status = Status::generic(0x82);
    /// Completion queue invalid (Create I/O SQ).
    pub const CQ_INVALID: Status = Status::specific(0x00).with_dnr();
    /// Invalid queue identifier.
    pub const INVALID_QUEUE_ID: Status = Status::specific(0x01).with_dnr();
    /// Invalid queue size.
    pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02).with_dnr();
    /// Invalid queue deletion (a CQ still has SQs attached).
    pub const INVALID_QUEUE_DELETION: Status = Status::specific(0x0c).with_dnr();
    /// Feature identifier not saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d).with_dnr();
    /// Write fault (media error).
    pub const WRITE_FAULT: Status = Status::media(0x80);
    /// Unrecovered read error (media error).
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(0x81);

    /// A status of the given type and code, CRD 0, DNR clear.
    pub const fn new(sct: StatusCodeType, sc: u8) -> Status {
        Status(((sct as u16) << 8) | sc as u16)
    }
    const fn generic(sc: u8) -> Status {
        Status::new(StatusCodeType::Generic, sc)
    }
    const fn specific(sc: u8) -> Status {
        Status::new(StatusCodeType::CommandSpecific, sc)
    }
    const fn media(sc: u8) -> Status {
        Status::new(StatusCodeType::Media, sc)
    }
    /// From the 15-bit status field (CQE dword 3 bits 31:17, shifted down to bit 0).
    pub const fn from_raw(raw: u16) -> Status {
        Status(raw & 0x7fff)
    }
    /// The 15-bit status field.
    pub const fn raw(self) -> u16 {
        self.0
    }
    /// Status code.
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }
    /// Status code type (0..=7).
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }
    /// Command retry delay selector (0: none; 1..=3 select CRDT1..3 of Identify Controller).
    pub const fn crd(self) -> u8 {
        ((self.0 >> 11) & 0x3) as u8
    }
    /// More status information in the error log.
    pub const fn more(self) -> bool {
        self.0 & (1 << 13) != 0
    }
    /// Do not retry: the same command would fail again.
    pub const fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// This status with DNR set.
    pub const fn with_dnr(self) -> Status {
        Status(self.0 | (1 << 14))
    }
    /// This status with the command retry delay selector `crd` (0..=3) and DNR clear.
    pub const fn with_crd(self, crd: u8) -> Status {
        Status((self.0 & !(0x3 << 11) & !(1 << 14)) | (((crd & 0x3) as u16) << 11))
    }
    /// Whether this is a successful completion.
    pub const fn is_success(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }
}

impl core::fmt::Debug for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Status(sct={:#x} sc={:#04x}", self.sct(), self.sc())?;
        if self.crd() != 0 {
            write!(f, " crd={}", self.crd())?;
        }
        if self.dnr() {
            write!(f, " dnr")?;
        }
        write!(f, ")")
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

/// A failed status is an error value: walkers and back ends return `Result<_, Status>`.
impl std::error::Error for Status {}

/// SGL descriptor types (Base Specification 2.0, figure 115).
pub mod sgl_type {
    /// SGL Data Block.
    pub const DATA_BLOCK: u8 = 0x0;
    /// SGL Bit Bucket.
    pub const BIT_BUCKET: u8 = 0x1;
    /// SGL Segment (points to the next segment; may be followed by more).
    pub const SEGMENT: u8 = 0x2;
    /// SGL Last Segment.
    pub const LAST_SEGMENT: u8 = 0x3;
    /// Keyed SGL Data Block (RDMA).
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    /// Transport SGL Data Block.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
}

/// SGL descriptor subtypes (Base Specification 2.0, figure 116).
pub mod sgl_subtype {
    /// The address field is a memory address.
    pub const ADDRESS: u8 = 0x0;
    /// The address field is an offset into the command's in-capsule data (fabrics) or, for
    /// Leap's in-process queue pairs, into the command's capsule area.
    pub const OFFSET: u8 = 0x1;
    /// Transport specific (NVMe/TCP uses 0xA for "data transferred by the transport").
    pub const TRANSPORT_A: u8 = 0xa;
}

/// A 16-byte SGL descriptor (Base Specification 2.0, figure 114).
#[repr(C, align(16))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SglDescriptor {
    /// Address or offset (little-endian).
    pub addr: u64,
    /// Length in bytes (little-endian).
    pub len: u32,
    /// Reserved.
    pub rsvd: [u8; 3],
    /// Type (7:4) and subtype (3:0).
    pub id: u8,
}

const _: () = assert!(size_of::<SglDescriptor>() == 16);
const _: () = assert!(offset_of!(SglDescriptor, id) == 15);

impl SglDescriptor {
    /// A descriptor of the given type and subtype.
    pub fn new(ty: u8, subtype: u8, addr: u64, len: u32) -> Self {
        SglDescriptor {
            addr: addr.to_le(),
            len: len.to_le(),
            rsvd: [0; 3],
            id: (ty << 4) | (subtype & 0xf),
        }
    }
    /// A Data Block descriptor with a memory address.
    pub fn data(addr: u64, len: u32) -> Self {
        Self::new(sgl_type::DATA_BLOCK, sgl_subtype::ADDRESS, addr, len)
    }
    /// The descriptor type.
    pub fn ty(&self) -> u8 {
        self.id >> 4
    }
    /// The descriptor subtype.
    pub fn subtype(&self) -> u8 {
        self.id & 0xf
    }
    /// The address (or offset).
    pub fn addr(&self) -> u64 {
        u64::from_le(self.addr)
    }
    /// The length in bytes.
    pub fn len(&self) -> u32 {
        u32::from_le(self.len)
    }
    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// From the two little-endian quadwords of an SQE's data pointer.
    pub fn from_raw(q: [u64; 2]) -> Self {
        let hi = u64::from_le(q[1]);
        SglDescriptor {
            addr: q[0],
            len: (hi as u32).to_le(),
            rsvd: [(hi >> 32) as u8, (hi >> 40) as u8, (hi >> 48) as u8],
            id: (hi >> 56) as u8,
        }
    }
    /// As the two little-endian quadwords of an SQE's data pointer.
    pub fn to_raw(&self) -> [u64; 2] {
        let hi = (u32::from_le(self.len) as u64)
            | ((self.rsvd[0] as u64) << 32)
            | ((self.rsvd[1] as u64) << 40)
            | ((self.rsvd[2] as u64) << 48)
            | ((self.id as u64) << 56);
        [self.addr, hi.to_le()]
    }
}

/// One Dataset Management range (NVM Command Set 1.0, figure 39): 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct DsmRange {
    /// Context attributes.
    pub cattr: u32,
    /// Length in logical blocks (a count, not 0-based).
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}

const _: () = assert!(size_of::<DsmRange>() == 16);

impl DsmRange {
    /// A range of `nlb` blocks from `slba`.
    pub fn new(slba: u64, nlb: u32) -> Self {
        DsmRange {
            cattr: 0,
            nlb: nlb.to_le(),
            slba: slba.to_le(),
        }
    }
    /// Starting LBA.
    pub fn slba(&self) -> u64 {
        u64::from_le(self.slba)
    }
    /// Number of logical blocks.
    pub fn nlb(&self) -> u32 {
        u32::from_le(self.nlb)
    }
    /// From 16 little-endian bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        DsmRange {
            cattr: u32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_le(),
            nlb: u32::from_le_bytes([b[4], b[5], b[6], b[7]]).to_le(),
            slba: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
                .to_le(),
        }
    }
}

/// Dataset Management dword 11 attribute: deallocate (AD, bit 2).
pub const DSM_ATTR_DEALLOCATE: u32 = 1 << 2;
/// Maximum number of ranges in one Dataset Management command (NR is 8 bits, 0-based).
pub const DSM_MAX_RANGES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_fields_round_trip() {
        let mut s = Sqe::new(io::READ, 0xbeef);
        s.set_nsid(1);
        s.set_slba(0x1_2345_6789);
        s.set_nlb(8);
        s.set_fua(true);
        assert_eq!(s.opcode(), io::READ);
        assert_eq!(s.cid(), 0xbeef);
        assert_eq!(s.nsid(), 1);
        assert_eq!(s.slba(), 0x1_2345_6789);
        assert_eq!(s.nlb(), 8);
        assert!(s.fua());
        assert!(!s.deac());
        s.set_cid(7);
        assert_eq!(s.cid(), 7);
        assert_eq!(s.opcode(), io::READ);
    }

    #[test]
    fn status_packs_fields() {
        let s = Status::LBA_OUT_OF_RANGE;
        assert_eq!((s.sct(), s.sc(), s.dnr()), (0, 0x80, true));
        let r = Status::NS_NOT_READY.with_crd(2);
        assert_eq!((r.crd(), r.dnr()), (2, false));
        let c = Cqe::new(5, r);
        assert_eq!(c.status(), r);
        assert_eq!(c.cid(), 5);
        assert!(!c.phase());
        assert!(Status::SUCCESS.is_success());
        assert!(!Status::WRITE_FAULT.is_success());
        assert_eq!(Status::WRITE_FAULT.sct(), 2);
    }

    #[test]
    fn sgl_descriptor_round_trips_through_dptr() {
        let d = SglDescriptor::new(sgl_type::LAST_SEGMENT, sgl_subtype::OFFSET, 0x40, 48);
        let mut s = Sqe::new(io::WRITE, 1);
        s.set_sgl1(d);
        assert_eq!(s.psdt(), psdt::SGL_MPTR_CONTIG);
        let back = s.sgl1();
        assert_eq!(back, d);
        assert_eq!(
            (back.ty(), back.subtype(), back.addr(), back.len()),
            (3, 1, 0x40, 48)
        );
    }
}
