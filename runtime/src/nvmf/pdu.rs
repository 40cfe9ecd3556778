//! NVMe/TCP PDU codec: pure functions over byte buffers.
//!
//! This module frames and parses the protocol data units of the NVMe/TCP transport binding
//! (NVMe/TCP Transport Specification 1.0, section 3 "NVMe/TCP Transport Binding"; NVMe over
//! Fabrics 1.1, section 7.4). It owns no sockets and allocates nothing: a receiver reads the
//! 8-byte common header, asks [`check`] how the rest of the PDU is laid out, reads the header
//! (and its digest) into a buffer, verifies it with [`verify_hdgst`], decodes it with one of the
//! `decode_*` functions and then moves the data (if any) straight to its destination, feeding a
//! [`DataDigest`] on the way. A sender builds headers with the `encode_*` functions, which
//! return a [`HeaderBuf`] holding everything that precedes the data.
//!
//! Every length and offset in a received PDU is controlled by the peer. Nothing here indexes a
//! slice in a way that can panic, every sum is checked, and each violation is reported as a
//! [`Fatal`] error carrying the Fatal Error Status (FES) and Fatal Error Information (FEI) that
//! go into the H2CTermReq/C2HTermReq the receiver sends before closing the connection
//! (NVMe/TCP 1.0, section 3.6.2.4/3.6.2.5; NVMe-oF 1.1, section 7.4.7).
//!
//! Wire layout reminders (all multi-byte fields little-endian):
//!
//! | PDU | type | HLEN | PDU-specific header |
//! |---|---|---|---|
//! | ICReq | 0x00 | 128 | PFV u16 @8, HPDA u8 @10, DGST u8 @11, MAXR2T u32 @12 |
//! | ICResp | 0x01 | 128 | PFV u16 @8, CPDA u8 @10, DGST u8 @11, MAXH2CDATA u32 @12 |
//! | H2CTermReq / C2HTermReq | 0x02 / 0x03 | 24 | FES u16 @8, FEI u32 @10 |
//! | CapsuleCmd | 0x04 | 72 | SQE @8 |
//! | CapsuleResp | 0x05 | 24 | CQE @8 |
//! | H2CData / C2HData | 0x06 / 0x07 | 24 | CCCID u16 @8, TTAG u16 @10, DATAO u32 @12, DATAL u32 @16 |
//! | R2T | 0x09 | 24 | CCCID u16 @8, TTAG u16 @10, R2TO u32 @12, R2TL u32 @16 |

use leap_queues::nvme::{sgl_subtype, sgl_type, SglDescriptor, StatusCodeType};
use leap_queues::{Cqe, Sqe, Status};

/// PDU type values (NVMe/TCP 1.0, section 3.6.1, figure "PDU Type").
pub mod pdu_type {
    /// Initialize Connection Request (host to controller).
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response (controller to host).
    pub const IC_RESP: u8 = 0x01;
    /// Host to Controller Terminate Connection Request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to Host Terminate Connection Request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command Capsule (host to controller).
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response Capsule (controller to host).
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to Controller Data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to Host Data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to Transfer (controller to host).
    pub const R2T: u8 = 0x09;
}

/// Common header FLAGS bits (NVMe/TCP 1.0, section 3.6.1 and the data PDU definitions).
pub mod flags {
    /// HDGSTF: a header digest follows the PDU header.
    pub const HDGSTF: u8 = 1 << 0;
    /// DDGSTF: a data digest follows the PDU data.
    pub const DDGSTF: u8 = 1 << 1;
    /// LAST_PDU (H2CData and C2HData): the last data PDU of the transfer (or of the R2T).
    pub const LAST_PDU: u8 = 1 << 2;
    /// SUCCESS (C2HData only): the command completed successfully and no CapsuleResp follows.
    /// Only valid together with [`LAST_PDU`].
    pub const SUCCESS: u8 = 1 << 3;
}

/// Fatal Error Status values carried by H2CTermReq/C2HTermReq (NVMe/TCP 1.0, section 3.6.2.4,
/// figure "Fatal Error Status"; the names follow the Linux kernel's `nvme-tcp.h`).
pub mod fes {
    /// Invalid PDU Header Field; FEI is the byte offset of the offending field in the PDU.
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// PDU Sequence Error: a PDU arrived that is not allowed in the current state.
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    /// Header Digest Error; FEI carries the received (wrong) header digest value.
    pub const HDGST_ERROR: u16 = 0x03;
    /// Data Transfer Out of Range: DATAO/DATAL (or R2TO/R2TL) fall outside the command's data.
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// Data Transfer Limit Exceeded: a PDU carries more data than the receiver advertised
    /// (MAXH2CDATA, or the in-capsule data size). Named "R2T Limit Exceeded" in older drafts.
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    /// Alias of [`DATA_LIMIT_EXCEEDED`] (Linux `NVME_TCP_FES_R2T_LIMIT_EXCEEDED`).
    pub const R2T_LIMIT_EXCEEDED: u16 = 0x05;
    /// Unsupported Parameter (for example a PDU format version other than 0); FEI is the byte
    /// offset of the offending field.
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Byte offsets of header fields, used as Fatal Error Information for
/// [`fes::INVALID_HEADER_FIELD`] and [`fes::UNSUPPORTED_PARAMETER`].
pub mod field {
    /// Common header: PDU-TYPE.
    pub const PDU_TYPE: u32 = 0;
    /// Common header: FLAGS.
    pub const FLAGS: u32 = 1;
    /// Common header: HLEN.
    pub const HLEN: u32 = 2;
    /// Common header: PDO.
    pub const PDO: u32 = 3;
    /// Common header: PLEN.
    pub const PLEN: u32 = 4;
    /// ICReq/ICResp: PFV.
    pub const IC_PFV: u32 = 8;
    /// ICReq: HPDA; ICResp: CPDA.
    pub const IC_PDA: u32 = 10;
    /// ICReq/ICResp: DGST.
    pub const IC_DGST: u32 = 11;
    /// ICReq: MAXR2T; ICResp: MAXH2CDATA.
    pub const IC_MAX: u32 = 12;
    /// Data PDUs and R2T: CCCID.
    pub const CCCID: u32 = 8;
    /// Data PDUs and R2T: TTAG.
    pub const TTAG: u32 = 10;
    /// Data PDUs: DATAO; R2T: R2TO.
    pub const DATAO: u32 = 12;
    /// Data PDUs: DATAL; R2T: R2TL.
    pub const DATAL: u32 = 16;
    /// CapsuleCmd: the address (offset) field of SGL descriptor 1 inside the SQE (8 + 24).
    pub const SQE_SGL1_ADDR: u32 = 32;
}

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest (CRC32C).
pub const DIGEST_LEN: usize = 4;
/// HLEN (and PLEN) of ICReq and ICResp.
pub const IC_HLEN: u8 = 128;
/// HLEN of H2CTermReq and C2HTermReq.
pub const TERM_HLEN: u8 = 24;
/// HLEN of CapsuleCmd: common header plus a 64-byte SQE.
pub const CAPSULE_CMD_HLEN: u8 = 72;
/// HLEN of CapsuleResp: common header plus a 16-byte CQE.
pub const CAPSULE_RESP_HLEN: u8 = 24;
/// HLEN of H2CData and C2HData.
pub const DATA_HLEN: u8 = 24;
/// HLEN of R2T.
pub const R2T_HLEN: u8 = 24;
/// Largest number of bytes of the offending PDU header a TermReq carries.
pub const TERM_MAX_DATA: usize = 128;
/// Largest PLEN of a TermReq (24 + 128).
pub const TERM_MAX_PLEN: u32 = 152;
/// Smallest MAXH2CDATA a controller may advertise (NVMe/TCP 1.0, section 3.6.2.3).
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Largest HPDA/CPDA value (0's based dwords: 31 means 128-byte alignment).
pub const MAX_PDA: u8 = 31;
/// In-capsule data every controller accepts on the admin queue and for Fabrics commands
/// (NVMe-oF 1.1, section 7.4.3: 8 KiB).
pub const ADMIN_MAX_ICD: u32 = 8192;
/// IANA port for NVMe/TCP I/O controllers.
pub const NVME_TCP_PORT: u16 = 4420;
/// IANA port for NVMe/TCP discovery controllers.
pub const NVME_TCP_DISCOVERY_PORT: u16 = 8009;
/// ICReq/ICResp DGST bit 0: header digests.
pub const DGST_HDGST_ENABLE: u8 = 1 << 0;
/// ICReq/ICResp DGST bit 1: data digests.
pub const DGST_DDGST_ENABLE: u8 = 1 << 1;
/// Size of a [`HeaderBuf`]: large enough for any header, digest and padding (PDO is 8 bits),
/// and for a whole TermReq.
pub const HEADER_BUF_LEN: usize = 256;

/// Completion status for a command whose data digest failed: Transient Transport Error (generic
/// command status 22h, retryable). A data digest error is not fatal to the connection
/// (NVMe/TCP 1.0, "Header and Data Digests"): the affected command fails instead.
pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::new(StatusCodeType::Generic, 0x22);

// ---------------------------------------------------------------------------------------------
// Little-endian helpers that never panic: callers check lengths first, and an out-of-range
// access reads as zero or writes nothing instead of panicking.

fn rd<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    b.get(off..)
        .and_then(|s| s.first_chunk::<N>())
        .copied()
        .unwrap_or([0; N])
}
fn rd16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(rd(b, off))
}
fn rd32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(rd(b, off))
}
fn rd64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(rd(b, off))
}
fn wr(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = off.checked_add(v.len()).and_then(|end| b.get_mut(off..end)) {
        d.copy_from_slice(v);
    }
}
fn wr16(b: &mut [u8], off: usize, v: u16) {
    wr(b, off, &v.to_le_bytes());
}
fn wr32(b: &mut [u8], off: usize, v: u32) {
    wr(b, off, &v.to_le_bytes());
}
fn wr64(b: &mut [u8], off: usize, v: u64) {
    wr(b, off, &v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------

/// A fatal transport error: the receiver sends a TermReq with these values and closes the
/// connection (NVMe/TCP 1.0, section 3.6.2.4; NVMe-oF 1.1, section 7.4.7).
///
/// Never answer a received TermReq with a TermReq: when [`check`] fails on a header whose type
/// is H2CTermReq/C2HTermReq, just close the connection ([`may_send_term_req`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("NVMe/TCP fatal error: {} (FES {fes:#04x}, FEI {fei:#x})", fes_name(.fes))]
pub struct Fatal {
    /// Fatal Error Status (see [`fes`]).
    pub fes: u16,
    /// Fatal Error Information: for [`fes::INVALID_HEADER_FIELD`] and
    /// [`fes::UNSUPPORTED_PARAMETER`] the byte offset of the offending field within the PDU
    /// header (see [`field`]); for [`fes::HDGST_ERROR`] the received digest; otherwise 0.
    pub fei: u32,
}

fn fes_name(fes: &u16) -> &'static str {
    match *fes {
        fes::INVALID_HEADER_FIELD => "invalid PDU header field",
        fes::PDU_SEQUENCE_ERROR => "PDU sequence error",
        fes::HDGST_ERROR => "header digest error",
        fes::DATA_OUT_OF_RANGE => "data transfer out of range",
        fes::DATA_LIMIT_EXCEEDED => "data transfer limit exceeded",
        fes::UNSUPPORTED_PARAMETER => "unsupported parameter",
        _ => "unknown fatal error status",
    }
}

impl Fatal {
    /// A fatal error with the given status and information.
    pub const fn new(fes: u16, fei: u32) -> Fatal {
        Fatal { fes, fei }
    }
    /// Invalid PDU Header Field at byte offset `offset` (see [`field`]).
    pub const fn invalid_field(offset: u32) -> Fatal {
        Fatal::new(fes::INVALID_HEADER_FIELD, offset)
    }
    /// PDU Sequence Error (a PDU that is not allowed in the current state, such as a second
    /// ICReq, an H2CData without an outstanding R2T, or a data offset that skips ahead).
    pub const fn sequence() -> Fatal {
        Fatal::new(fes::PDU_SEQUENCE_ERROR, 0)
    }
    /// Data Transfer Out of Range.
    pub const fn out_of_range() -> Fatal {
        Fatal::new(fes::DATA_OUT_OF_RANGE, 0)
    }
    /// Data Transfer Limit Exceeded.
    pub const fn limit_exceeded() -> Fatal {
        Fatal::new(fes::DATA_LIMIT_EXCEEDED, 0)
    }
    /// Unsupported Parameter at byte offset `offset`.
    pub const fn unsupported(offset: u32) -> Fatal {
        Fatal::new(fes::UNSUPPORTED_PARAMETER, offset)
    }
    /// The TermReq that `sender` transmits for this error, quoting up to 128 bytes of the
    /// offending PDU header (see [`encode_term_req`]).
    pub fn term_req(&self, sender: Role, offending: &[u8]) -> HeaderBuf {
        encode_term_req(sender, self.fes, self.fei, offending)
    }
}

/// Whether a fatal error found in a received PDU of type `pdu_type` may be reported with a
/// TermReq. A TermReq is never answered with a TermReq, so this is false for both TermReq types
/// (NVMe-oF 1.1, section 7.4.7: a malformed TermReq just closes the connection).
pub fn may_send_term_req(pdu_type: u8) -> bool {
    !matches!(pdu_type, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ)
}

/// An error building a PDU from local values (never from peer data).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The PDU length does not fit in the 32-bit PLEN field.
    #[error("PDU length does not fit in 32 bits")]
    TooLong,
    /// The data alignment cannot be met with an 8-bit PDO (a PDA above 31).
    #[error("PDU data alignment {0} cannot be met with an 8-bit PDO")]
    Alignment(u32),
    /// H2CData and C2HData PDUs must carry at least one byte of data.
    #[error("data PDUs must carry data")]
    NoData,
}

/// The 8-byte common header that starts every PDU (NVMe/TCP 1.0, section 3.6.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CommonHeader {
    /// PDU-TYPE (see [`pdu_type`]).
    pub pdu_type: u8,
    /// FLAGS (see [`flags`]).
    pub flags: u8,
    /// HLEN: length of the PDU header, without the header digest.
    pub hlen: u8,
    /// PDO: offset of the PDU data from the start of the PDU, or 0 if there is no data.
    pub pdo: u8,
    /// PLEN: total length of the PDU, headers, padding, data and digests included.
    pub plen: u32,
}

impl CommonHeader {
    /// From the first 8 bytes of a PDU.
    pub fn decode(b: &[u8; CH_LEN]) -> CommonHeader {
        CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
    /// From the start of a buffer, if it holds at least 8 bytes.
    pub fn from_prefix(b: &[u8]) -> Option<CommonHeader> {
        b.first_chunk::<CH_LEN>().map(CommonHeader::decode)
    }
    /// The 8 wire bytes.
    pub fn encode(&self) -> [u8; CH_LEN] {
        let p = self.plen.to_le_bytes();
        [
            self.pdu_type,
            self.flags,
            self.hlen,
            self.pdo,
            p[0],
            p[1],
            p[2],
            p[3],
        ]
    }
    /// Whether all bits of `flag` are set in FLAGS.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag == flag
    }
}

/// Which end of the connection we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The NVMe controller (target): receives ICReq, CapsuleCmd, H2CData and H2CTermReq.
    Controller,
    /// The host (initiator): receives ICResp, CapsuleResp, C2HData, R2T and C2HTermReq.
    Host,
}

impl Role {
    /// The TermReq type this side sends.
    pub fn term_req_type(self) -> u8 {
        match self {
            Role::Controller => pdu_type::C2H_TERM_REQ,
            Role::Host => pdu_type::H2C_TERM_REQ,
        }
    }
}

/// Connection parameters negotiated by the ICReq/ICResp exchange (NVMe/TCP 1.0, sections
/// 3.6.2.2 and 3.6.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Params {
    /// Header digests are enabled for all PDUs that carry them.
    pub hdgst: bool,
    /// Data digests are enabled for all PDUs that carry data (TermReq excepted).
    pub ddgst: bool,
    /// Controller PDU Data Alignment (0's based dwords, at most 31): the alignment of PDU data
    /// within PDUs the host sends.
    pub cpda: u8,
    /// Host PDU Data Alignment (0's based dwords, at most 31): the alignment of PDU data within
    /// PDUs the controller sends.
    pub hpda: u8,
    /// Largest DATAL of an H2CData PDU, advertised by the controller in ICResp.
    pub maxh2cdata: u32,
    /// Maximum outstanding R2Ts per command, 0's based, advertised by the host in ICReq.
    pub maxr2t: u32,
}

impl Default for Params {
    /// No digests, dword alignment, the minimum MAXH2CDATA, one R2T: the state before the
    /// ICReq/ICResp exchange.
    fn default() -> Self {
        Params {
            hdgst: false,
            ddgst: false,
            cpda: 0,
            hpda: 0,
            maxh2cdata: MIN_MAXH2CDATA,
            maxr2t: 0,
        }
    }
}

impl Params {
    /// The parameters agreed by an ICReq and the ICResp answering it. Checks, as the host
    /// must, that the controller enabled no digest the host did not ask for (FES Unsupported
    /// Parameter at the DGST field), and the ranges of the alignment and MAXH2CDATA fields.
    pub fn from_exchange(req: &IcReq, resp: &IcResp) -> Result<Params, Fatal> {
        if (resp.hdgst && !req.hdgst) || (resp.ddgst && !req.ddgst) {
            return Err(Fatal::unsupported(field::IC_DGST));
        }
        if req.hpda > MAX_PDA || resp.cpda > MAX_PDA {
            return Err(Fatal::invalid_field(field::IC_PDA));
        }
        if !maxh2cdata_ok(resp.maxh2cdata) {
            return Err(Fatal::invalid_field(field::IC_MAX));
        }
        Ok(Params {
            hdgst: resp.hdgst,
            ddgst: resp.ddgst,
            cpda: resp.cpda,
            hpda: req.hpda,
            maxh2cdata: resp.maxh2cdata,
            maxr2t: req.maxr2t,
        })
    }
    /// Required alignment in bytes of data in host-to-controller PDUs: `(CPDA + 1) * 4`.
    pub fn h2c_align(&self) -> u32 {
        (u32::from(self.cpda) + 1) * 4
    }
    /// Required alignment in bytes of data in controller-to-host PDUs: `(HPDA + 1) * 4`.
    pub fn c2h_align(&self) -> u32 {
        (u32::from(self.hpda) + 1) * 4
    }
    /// Alignment of data in PDUs that `receiver` receives.
    pub fn rx_align(&self, receiver: Role) -> u32 {
        match receiver {
            Role::Controller => self.h2c_align(),
            Role::Host => self.c2h_align(),
        }
    }
    /// Alignment of data in PDUs that `sender` sends.
    pub fn tx_align(&self, sender: Role) -> u32 {
        match sender {
            Role::Controller => self.c2h_align(),
            Role::Host => self.h2c_align(),
        }
    }
    /// Bytes of header digest after the header of PDUs that carry digests (0 or 4).
    pub fn hdgst_len(&self) -> u32 {
        if self.hdgst {
            DIGEST_LEN as u32
        } else {
            0
        }
    }
    /// Bytes of data digest after the data of PDUs that carry data (0 or 4).
    pub fn ddgst_len(&self) -> u32 {
        if self.ddgst {
            DIGEST_LEN as u32
        } else {
            0
        }
    }
}

fn maxh2cdata_ok(v: u32) -> bool {
    v >= MIN_MAXH2CDATA && v % 4 == 0
}

/// Receiver limits that do not come from the ICReq/ICResp exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Largest in-capsule data accepted in a CapsuleCmd ([`ADMIN_MAX_ICD`] on the admin queue,
    /// `(IOCCSZ - 4) * 16` on I/O queues).
    pub max_icd: u32,
    /// Hard cap on PLEN for any PDU, checked before anything past the common header is read.
    pub max_plen: u32,
}

/// How a PDU that passed [`check`] is laid out after its common header.
///
/// Invariant: `header_len + pad + datal + (4 if ddgst) == plen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The PDU type.
    pub pdu_type: u8,
    /// Bytes of header to read from the start of the PDU: HLEN, plus 4 if a header digest
    /// follows. Pass this many bytes to [`verify_hdgst`] and the `decode_*` functions.
    pub header_len: usize,
    /// A header digest follows the header.
    pub hdgst: bool,
    /// Padding bytes between the end of the header (and digest) and the data.
    pub pad: usize,
    /// Bytes of PDU data (for a TermReq: the quoted header of the offending PDU).
    pub datal: u32,
    /// A data digest follows the data.
    pub ddgst: bool,
    /// PLEN.
    pub plen: u32,
}

impl Layout {
    /// Offset of the data from the start of the PDU (PDO, or the end of a TermReq header).
    pub fn data_offset(&self) -> usize {
        self.header_len.saturating_add(self.pad)
    }
    /// Bytes after the header (and header digest): padding, data and data digest.
    pub fn rest_len(&self) -> u64 {
        self.pad as u64 + u64::from(self.datal) + if self.ddgst { DIGEST_LEN as u64 } else { 0 }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DataKind {
    /// The PDU never carries data.
    Never,
    /// CapsuleCmd: in-capsule data is optional.
    Optional,
    /// H2CData/C2HData: data is mandatory.
    Required,
    /// TermReq: the quoted header is data, without PDO or digests.
    Term,
}

struct Shape {
    hlen: u8,
    digests: bool,
    data: DataKind,
}

fn shape(ty: u8, receiver: Role) -> Option<Shape> {
    use pdu_type::*;
    let s = |hlen, digests, data| {
        Some(Shape {
            hlen,
            digests,
            data,
        })
    };
    match (receiver, ty) {
        (Role::Controller, IC_REQ) | (Role::Host, IC_RESP) => s(IC_HLEN, false, DataKind::Never),
        (Role::Controller, H2C_TERM_REQ) | (Role::Host, C2H_TERM_REQ) => {
            s(TERM_HLEN, false, DataKind::Term)
        }
        (Role::Controller, CAPSULE_CMD) => s(CAPSULE_CMD_HLEN, true, DataKind::Optional),
        (Role::Controller, H2C_DATA) => s(DATA_HLEN, true, DataKind::Required),
        (Role::Host, CAPSULE_RESP) => s(CAPSULE_RESP_HLEN, true, DataKind::Never),
        (Role::Host, C2H_DATA) => s(DATA_HLEN, true, DataKind::Required),
        (Role::Host, R2T) => s(R2T_HLEN, true, DataKind::Never),
        _ => None,
    }
}

/// Validates a received common header and returns the layout of the rest of the PDU.
///
/// `receiver` is our side, `params` the negotiated parameters ([`Params::default`] before the
/// ICReq/ICResp exchange) and `limits` our local limits. Which PDU types are acceptable in the
/// current state (an ICReq only first, an H2CData only after an R2T, ...) is the caller's
/// business: report those with [`Fatal::sequence`].
///
/// Fields are checked in wire order so that the lowest offending field is reported
/// (NVMe-oF 1.1, section 7.4.7). All failures are FES [`fes::INVALID_HEADER_FIELD`] with the
/// FEI naming the field, except where noted:
///
/// 1. PDU-TYPE (FEI 0): known and travelling towards `receiver`.
/// 2. FLAGS (FEI 1): HDGSTF set exactly when header digests are negotiated and the type
///    carries digests; DDGSTF set exactly when data digests are negotiated and the PDU carries
///    data; ICReq/ICResp/TermReq carry no digests; C2HData SUCCESS requires LAST_PDU. Other
///    (reserved or type-specific) bits are ignored.
/// 3. HLEN (FEI 2): exactly the fixed header length of the type.
/// 4. PDO (FEI 3): 0 for PDUs without data; otherwise at least HLEN plus the header digest, a
///    multiple of the receiver's data alignment ([`Params::rx_align`]) and not beyond PLEN.
/// 5. PLEN (FEI 4): exactly HLEN (+ digest) without data; 128 for ICReq/ICResp; 24..=152 for a
///    TermReq; with data, room for at least one data byte plus the data digest.
/// 6. Data length: in-capsule data above `limits.max_icd`, or H2CData above MAXH2CDATA, is FES
///    [`fes::DATA_LIMIT_EXCEEDED`] (FEI 0).
/// 7. PLEN above `limits.max_plen` (FEI 4), so a hostile length is refused before anything is
///    buffered.
pub fn check(
    ch: &CommonHeader,
    receiver: Role,
    params: &Params,
    limits: &Limits,
) -> Result<Layout, Fatal> {
    let s = shape(ch.pdu_type, receiver).ok_or(Fatal::invalid_field(field::PDU_TYPE))?;
    let plen = ch.plen;
    let hlen = u32::from(s.hlen);
    let hdgst = s.digests && params.hdgst;
    let hd_len = if hdgst { DIGEST_LEN as u32 } else { 0 };
    let full = hlen + hd_len;
    let data_present = match s.data {
        DataKind::Never | DataKind::Term => false,
        DataKind::Optional => plen > full,
        DataKind::Required => true,
    };
    let ddgst = s.digests && params.ddgst && data_present;
    let dd_len = if ddgst { DIGEST_LEN as u32 } else { 0 };

    // FLAGS.
    if ch.has(flags::HDGSTF) != hdgst || ch.has(flags::DDGSTF) != ddgst {
        return Err(Fatal::invalid_field(field::FLAGS));
    }
    if ch.pdu_type == pdu_type::C2H_DATA && ch.has(flags::SUCCESS) && !ch.has(flags::LAST_PDU) {
        return Err(Fatal::invalid_field(field::FLAGS));
    }

    // HLEN.
    if ch.hlen != s.hlen {
        return Err(Fatal::invalid_field(field::HLEN));
    }

    // PDO.
    let pdo = u32::from(ch.pdo);
    if data_present {
        if pdo < full || pdo % params.rx_align(receiver) != 0 || pdo > plen {
            return Err(Fatal::invalid_field(field::PDO));
        }
    } else if pdo != 0 {
        return Err(Fatal::invalid_field(field::PDO));
    }

    // PLEN.
    let (header_len, pad, datal) = match s.data {
        DataKind::Term => {
            if !(hlen..=TERM_MAX_PLEN).contains(&plen) {
                return Err(Fatal::invalid_field(field::PLEN));
            }
            (hlen, 0, plen - hlen)
        }
        _ if !data_present => {
            if plen != full {
                return Err(Fatal::invalid_field(field::PLEN));
            }
            (full, 0, 0)
        }
        _ => {
            // pdo <= plen was checked above.
            let rest = plen - pdo;
            if rest <= dd_len {
                return Err(Fatal::invalid_field(field::PLEN));
            }
            (full, pdo - full, rest - dd_len)
        }
    };

    // Data limits advertised by the receiver.
    let limit = match ch.pdu_type {
        pdu_type::CAPSULE_CMD => Some(limits.max_icd),
        pdu_type::H2C_DATA => Some(params.maxh2cdata),
        _ => None,
    };
    if limit.is_some_and(|l| datal > l) {
        return Err(Fatal::limit_exceeded());
    }

    // Hard cap.
    if plen > limits.max_plen {
        return Err(Fatal::invalid_field(field::PLEN));
    }

    Ok(Layout {
        pdu_type: ch.pdu_type,
        header_len: header_len as usize,
        hdgst,
        pad: pad as usize,
        datal,
        ddgst,
        plen,
    })
}

// ---------------------------------------------------------------------------------------------
// Digests.

/// The header digest of `hdr` (the HLEN header bytes): CRC32C, sent little-endian right after
/// the header (NVMe/TCP 1.0, "Header and Data Digests").
pub fn hdgst(hdr: &[u8]) -> u32 {
    crc32c::crc32c(hdr)
}

/// Checks the header digest of a received header. `buf` starts at the common header and holds
/// at least HLEN + 4 bytes (HLEN is read from byte 2); use [`Layout::header_len`] bytes.
///
/// A mismatch is FES [`fes::HDGST_ERROR`] with the received digest as FEI. A buffer too short
/// to hold the digest is reported the same way with FEI 0.
pub fn verify_hdgst(buf: &[u8]) -> Result<(), Fatal> {
    let short = Fatal::new(fes::HDGST_ERROR, 0);
    let hlen = usize::from(*buf.get(2).ok_or(short)?);
    let hdr = buf.get(..hlen).ok_or(short)?;
    let received = buf
        .get(hlen..)
        .and_then(|s| s.first_chunk::<DIGEST_LEN>())
        .map(|d| u32::from_le_bytes(*d))
        .ok_or(short)?;
    if hdgst(hdr) == received {
        Ok(())
    } else {
        Err(Fatal::new(fes::HDGST_ERROR, received))
    }
}

/// A data digest that failed to verify. Not fatal to the connection: the command completes
/// with [`TRANSIENT_TRANSPORT_ERROR`] (see [`DigestMismatch::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("NVMe/TCP data digest mismatch: computed {computed:#010x}, received {received:#010x}")]
pub struct DigestMismatch {
    /// The CRC32C computed over the received data.
    pub computed: u32,
    /// The digest that followed the data.
    pub received: u32,
}

impl DigestMismatch {
    /// The completion status for the affected command: Transient Transport Error.
    pub fn status(&self) -> Status {
        TRANSIENT_TRANSPORT_ERROR
    }
}

/// An incremental data digest (CRC32C over the PDU data, excluding padding), for data that is
/// moved piecewise between the socket and guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataDigest(u32);

impl DataDigest {
    /// An empty digest.
    pub fn new() -> DataDigest {
        DataDigest(0)
    }
    /// Adds the next piece of data.
    pub fn update(&mut self, data: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, data);
    }
    /// The digest of everything added so far.
    pub fn finish(&self) -> u32 {
        self.0
    }
    /// The digest as the 4 bytes sent after the data (little-endian).
    pub fn to_bytes(&self) -> [u8; DIGEST_LEN] {
        self.0.to_le_bytes()
    }
    /// Compares with the 4 digest bytes received after the data.
    pub fn verify(&self, received: &[u8; DIGEST_LEN]) -> Result<(), DigestMismatch> {
        let received = u32::from_le_bytes(*received);
        if received == self.0 {
            Ok(())
        } else {
            Err(DigestMismatch {
                computed: self.0,
                received,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQE / CQE byte conversion.

/// An SQE from its 64 wire bytes, built field by field (the buffer need not be aligned).
pub fn sqe_from_bytes(b: &[u8; 64]) -> Sqe {
    Sqe {
        cdw0: rd32(b, 0).to_le(),
        nsid: rd32(b, 4).to_le(),
        cdw2: rd32(b, 8).to_le(),
        cdw3: rd32(b, 12).to_le(),
        mptr: rd64(b, 16).to_le(),
        dptr: [rd64(b, 24).to_le(), rd64(b, 32).to_le()],
        cdw10: rd32(b, 40).to_le(),
        cdw11: rd32(b, 44).to_le(),
        cdw12: rd32(b, 48).to_le(),
        cdw13: rd32(b, 52).to_le(),
        cdw14: rd32(b, 56).to_le(),
        cdw15: rd32(b, 60).to_le(),
    }
}

/// The 64 wire bytes of an SQE.
pub fn sqe_to_bytes(s: &Sqe) -> [u8; 64] {
    let mut b = [0u8; 64];
    wr32(&mut b, 0, u32::from_le(s.cdw0));
    wr32(&mut b, 4, u32::from_le(s.nsid));
    wr32(&mut b, 8, u32::from_le(s.cdw2));
    wr32(&mut b, 12, u32::from_le(s.cdw3));
    wr64(&mut b, 16, u64::from_le(s.mptr));
    wr64(&mut b, 24, u64::from_le(s.dptr[0]));
    wr64(&mut b, 32, u64::from_le(s.dptr[1]));
    wr32(&mut b, 40, u32::from_le(s.cdw10));
    wr32(&mut b, 44, u32::from_le(s.cdw11));
    wr32(&mut b, 48, u32::from_le(s.cdw12));
    wr32(&mut b, 52, u32::from_le(s.cdw13));
    wr32(&mut b, 56, u32::from_le(s.cdw14));
    wr32(&mut b, 60, u32::from_le(s.cdw15));
    b
}

/// A CQE from its 16 wire bytes.
pub fn cqe_from_bytes(b: &[u8; 16]) -> Cqe {
    Cqe {
        dw0: rd32(b, 0).to_le(),
        dw1: rd32(b, 4).to_le(),
        sq_head: rd16(b, 8).to_le(),
        sq_id: rd16(b, 10).to_le(),
        cid: rd16(b, 12).to_le(),
        status: rd16(b, 14).to_le(),
    }
}

/// The 16 wire bytes of a CQE.
pub fn cqe_to_bytes(c: &Cqe) -> [u8; 16] {
    let mut b = [0u8; 16];
    wr32(&mut b, 0, u32::from_le(c.dw0));
    wr32(&mut b, 4, u32::from_le(c.dw1));
    wr16(&mut b, 8, u16::from_le(c.sq_head));
    wr16(&mut b, 10, u16::from_le(c.sq_id));
    wr16(&mut b, 12, u16::from_le(c.cid));
    wr16(&mut b, 14, u16::from_le(c.status));
    b
}

/// SGL descriptor 1 for in-capsule data over NVMe/TCP: an SGL Data Block with the Offset
/// subtype, offset 0 (NVMe/TCP 1.0, "Command Capsules and Data Transfer").
pub fn icd_sgl(len: u32) -> SglDescriptor {
    SglDescriptor::new(sgl_type::DATA_BLOCK, sgl_subtype::OFFSET, 0, len)
}

/// SGL descriptor 1 for data moved by H2CData/C2HData PDUs: a Transport SGL Data Block with
/// the transport-specific subtype 0xA.
pub fn transport_sgl(len: u32) -> SglDescriptor {
    SglDescriptor::new(
        sgl_type::TRANSPORT_DATA_BLOCK,
        sgl_subtype::TRANSPORT_A,
        0,
        len,
    )
}

/// Checks SGL descriptor 1 of a received CapsuleCmd against its in-capsule data. When the
/// descriptor is an in-capsule (Data Block, Offset) descriptor, its offset must be 0 (FES
/// Unsupported Parameter, FEI [`field::SQE_SGL1_ADDR`]) and its length must equal the data
/// carried (FES Invalid Header Field, FEI PLEN); any other descriptor must come without
/// in-capsule data (FEI PLEN). Whether the descriptor type suits the command is the command
/// layer's business.
pub fn check_in_capsule(sqe: &Sqe, layout: &Layout) -> Result<(), Fatal> {
    let d = sqe.sgl1();
    if d.ty() == sgl_type::DATA_BLOCK && d.subtype() == sgl_subtype::OFFSET {
        if d.addr() != 0 {
            return Err(Fatal::unsupported(field::SQE_SGL1_ADDR));
        }
        if d.len() != layout.datal {
            return Err(Fatal::invalid_field(field::PLEN));
        }
    } else if layout.datal != 0 {
        return Err(Fatal::invalid_field(field::PLEN));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// PDU-specific structures.

/// ICReq fields (NVMe/TCP 1.0, section 3.6.2.2). PFV is always 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IcReq {
    /// HPDA: host PDU data alignment, 0's based dwords (0..=31).
    pub hpda: u8,
    /// DGST bit 0: the host wants header digests.
    pub hdgst: bool,
    /// DGST bit 1: the host wants data digests.
    pub ddgst: bool,
    /// MAXR2T: maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// ICResp fields (NVMe/TCP 1.0, section 3.6.2.3). PFV is always 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IcResp {
    /// CPDA: controller PDU data alignment, 0's based dwords (0..=31).
    pub cpda: u8,
    /// DGST bit 0: header digests enabled.
    pub hdgst: bool,
    /// DGST bit 1: data digests enabled.
    pub ddgst: bool,
    /// MAXH2CDATA: largest DATAL of an H2CData PDU; at least 4096 and a multiple of 4.
    pub maxh2cdata: u32,
}

fn ic_common(ty: u8) -> [u8; IC_HLEN as usize] {
    let mut b = [0u8; IC_HLEN as usize];
    let ch = CommonHeader {
        pdu_type: ty,
        flags: 0,
        hlen: IC_HLEN,
        pdo: 0,
        plen: u32::from(IC_HLEN),
    };
    wr(&mut b, 0, &ch.encode());
    b
}

fn dgst_byte(hdgst: bool, ddgst: bool) -> u8 {
    (if hdgst { DGST_HDGST_ENABLE } else { 0 }) | (if ddgst { DGST_DDGST_ENABLE } else { 0 })
}

/// Checks the common header of an ICReq/ICResp arriving at `receiver` and returns the whole
/// 128-byte PDU.
fn ic_pdu(buf: &[u8], receiver: Role) -> Result<&[u8; IC_HLEN as usize], Fatal> {
    let ch = CommonHeader::from_prefix(buf).ok_or(Fatal::invalid_field(field::PLEN))?;
    let limits = Limits {
        max_icd: 0,
        max_plen: u32::from(IC_HLEN),
    };
    let layout = check(&ch, receiver, &Params::default(), &limits)?;
    let want = match receiver {
        Role::Controller => pdu_type::IC_REQ,
        Role::Host => pdu_type::IC_RESP,
    };
    if layout.pdu_type != want {
        return Err(Fatal::sequence());
    }
    buf.first_chunk::<{ IC_HLEN as usize }>()
        .ok_or(Fatal::invalid_field(field::PLEN))
}

impl IcReq {
    /// The 128-byte ICReq PDU.
    pub fn encode(&self) -> [u8; IC_HLEN as usize] {
        let mut b = ic_common(pdu_type::IC_REQ);
        wr16(&mut b, 8, 0);
        b[10] = self.hpda;
        b[11] = dgst_byte(self.hdgst, self.ddgst);
        wr32(&mut b, 12, self.maxr2t);
        b
    }
    /// Parses and validates a whole ICReq PDU (at least 128 bytes from the common header):
    /// the common header as [`check`] does (any other PDU type is a PDU Sequence Error),
    /// PFV 0 (else FES Unsupported Parameter, FEI 8) and HPDA at most 31 (FEI 10). Reserved
    /// DGST bits are ignored.
    pub fn decode(buf: &[u8]) -> Result<IcReq, Fatal> {
        let b = ic_pdu(buf, Role::Controller)?;
        if rd16(b, 8) != 0 {
            return Err(Fatal::unsupported(field::IC_PFV));
        }
        if b[10] > MAX_PDA {
            return Err(Fatal::invalid_field(field::IC_PDA));
        }
        Ok(IcReq {
            hpda: b[10],
            hdgst: b[11] & DGST_HDGST_ENABLE != 0,
            ddgst: b[11] & DGST_DDGST_ENABLE != 0,
            maxr2t: rd32(b, 12),
        })
    }
}

impl IcResp {
    /// The controller's answer to `req`: each digest is enabled when the host asked for it and
    /// `allow_hdgst`/`allow_ddgst` permit it.
    pub fn answer(
        req: &IcReq,
        allow_hdgst: bool,
        allow_ddgst: bool,
        cpda: u8,
        maxh2cdata: u32,
    ) -> IcResp {
        IcResp {
            cpda,
            hdgst: req.hdgst && allow_hdgst,
            ddgst: req.ddgst && allow_ddgst,
            maxh2cdata,
        }
    }
    /// The 128-byte ICResp PDU.
    pub fn encode(&self) -> [u8; IC_HLEN as usize] {
        let mut b = ic_common(pdu_type::IC_RESP);
        wr16(&mut b, 8, 0);
        b[10] = self.cpda;
        b[11] = dgst_byte(self.hdgst, self.ddgst);
        wr32(&mut b, 12, self.maxh2cdata);
        b
    }
    /// Parses and validates a whole ICResp PDU (at least 128 bytes): the common header as
    /// [`check`] does, PFV 0 (FES Unsupported Parameter, FEI 8), CPDA at most 31 (FEI 10) and
    /// MAXH2CDATA at least 4096 and a multiple of 4 (FEI 12).
    pub fn decode(buf: &[u8]) -> Result<IcResp, Fatal> {
        let b = ic_pdu(buf, Role::Host)?;
        if rd16(b, 8) != 0 {
            return Err(Fatal::unsupported(field::IC_PFV));
        }
        if b[10] > MAX_PDA {
            return Err(Fatal::invalid_field(field::IC_PDA));
        }
        let maxh2cdata = rd32(b, 12);
        if !maxh2cdata_ok(maxh2cdata) {
            return Err(Fatal::invalid_field(field::IC_MAX));
        }
        Ok(IcResp {
            cpda: b[10],
            hdgst: b[11] & DGST_HDGST_ENABLE != 0,
            ddgst: b[11] & DGST_DDGST_ENABLE != 0,
            maxh2cdata,
        })
    }
}

/// The PDU-specific header of H2CData and C2HData (NVMe/TCP 1.0, sections 3.6.2.8 and
/// 3.6.2.9), with the flags that matter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DataHdr {
    /// CCCID: the command identifier of the command the data belongs to.
    pub cccid: u16,
    /// TTAG: the transfer tag from the R2T (H2CData); reserved and sent as 0 in C2HData.
    pub ttag: u16,
    /// DATAO: offset of this data within the command's data.
    pub datao: u32,
    /// DATAL: bytes of data in this PDU.
    pub datal: u32,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (C2HData only; requires `last`).
    pub success: bool,
}

impl DataHdr {
    /// Checks a decoded data header against its [`Layout`] and the length of the command's
    /// data: DATAL must equal the data the PDU carries (FES Invalid Header Field, FEI 16) and
    /// must be non-zero (FEI 16), and DATAO + DATAL must not pass `xfer_len` (FES Data
    /// Transfer Out of Range). Whether DATAO is the next expected offset is a sequence
    /// question for the caller ([`Fatal::sequence`]).
    pub fn validate(&self, layout: &Layout, xfer_len: u32) -> Result<(), Fatal> {
        if self.datal != layout.datal || self.datal == 0 {
            return Err(Fatal::invalid_field(field::DATAL));
        }
        check_range(self.datao, self.datal, xfer_len)
    }
}

/// The PDU-specific header of R2T (NVMe/TCP 1.0, section 3.6.2.10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct R2t {
    /// CCCID: the command the controller wants data for.
    pub cccid: u16,
    /// TTAG: transfer tag the host echoes in its H2CData PDUs.
    pub ttag: u16,
    /// R2TO: offset of the requested data within the command's data.
    pub r2to: u32,
    /// R2TL: bytes requested (may exceed MAXH2CDATA; the host then sends several PDUs).
    pub r2tl: u32,
}

impl R2t {
    /// Checks a received R2T against the length of the command's data: R2TL must be non-zero
    /// (FES Invalid Header Field, FEI 16) and R2TO + R2TL must not pass `xfer_len` (FES Data
    /// Transfer Out of Range).
    pub fn validate(&self, xfer_len: u32) -> Result<(), Fatal> {
        if self.r2tl == 0 {
            return Err(Fatal::invalid_field(field::DATAL));
        }
        check_range(self.r2to, self.r2tl, xfer_len)
    }
}

/// FES Data Transfer Out of Range unless `offset + len <= xfer_len` (computed without
/// overflow).
pub fn check_range(offset: u32, len: u32, xfer_len: u32) -> Result<(), Fatal> {
    match offset.checked_add(len) {
        Some(end) if end <= xfer_len => Ok(()),
        _ => Err(Fatal::out_of_range()),
    }
}

// ---------------------------------------------------------------------------------------------
// Encoders.

/// The bytes a sender transmits before a PDU's data: header, header digest and padding (up to
/// PDO); for a TermReq the whole PDU. Any data, then its data digest, follow.
#[derive(Clone, Copy)]
pub struct HeaderBuf {
    buf: [u8; HEADER_BUF_LEN],
    len: usize,
}

impl HeaderBuf {
    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
    /// Number of bytes to send; for a PDU with data this is PDO, where the data starts.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether there is nothing to send (never true for a built PDU).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A buffer holding `bytes` as they are (at most [`HEADER_BUF_LEN`]): for PDUs built
    /// elsewhere, such as the 128-byte ICReq/ICResp.
    pub fn from_bytes(bytes: &[u8]) -> Option<HeaderBuf> {
        let mut buf = [0u8; HEADER_BUF_LEN];
        buf.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(HeaderBuf {
            buf,
            len: bytes.len(),
        })
    }
    /// The common header.
    pub fn common(&self) -> CommonHeader {
        CommonHeader::from_prefix(&self.buf).unwrap_or_default()
    }
}

impl AsRef<[u8]> for HeaderBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl core::fmt::Debug for HeaderBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeaderBuf")
            .field("common", &self.common())
            .field("len", &self.len)
            .finish()
    }
}

/// Frames a PDU: writes the common header, lets `psh` fill the PDU-specific header, appends
/// the header digest and zero padding. `datal` bytes of data (and a data digest) follow.
fn frame(
    ty: u8,
    extra_flags: u8,
    hlen: u8,
    datal: u32,
    params: &Params,
    align: u32,
    psh: impl FnOnce(&mut [u8]),
) -> Result<HeaderBuf, EncodeError> {
    let hd = params.hdgst;
    let dd = params.ddgst && datal > 0;
    let full = u32::from(hlen) + params.hdgst_len();
    let (pdo, plen) = if datal > 0 {
        let pdo = full
            .div_ceil(align.max(1))
            .checked_mul(align.max(1))
            .filter(|p| *p <= u32::from(u8::MAX))
            .ok_or(EncodeError::Alignment(align))?;
        let plen = pdo
            .checked_add(datal)
            .and_then(|p| p.checked_add(if dd { DIGEST_LEN as u32 } else { 0 }))
            .ok_or(EncodeError::TooLong)?;
        (pdo, plen)
    } else {
        (0, full)
    };
    let mut out = HeaderBuf {
        buf: [0; HEADER_BUF_LEN],
        len: if datal > 0 {
            pdo as usize
        } else {
            full as usize
        },
    };
    let ch = CommonHeader {
        pdu_type: ty,
        flags: extra_flags
            | if hd { flags::HDGSTF } else { 0 }
            | if dd { flags::DDGSTF } else { 0 },
        hlen,
        pdo: pdo as u8,
        plen,
    };
    wr(&mut out.buf, 0, &ch.encode());
    if let Some(h) = out.buf.get_mut(..usize::from(hlen)) {
        psh(h);
    }
    if hd {
        let d = hdgst(out.buf.get(..usize::from(hlen)).unwrap_or(&[]));
        wr32(&mut out.buf, usize::from(hlen), d);
    }
    Ok(out)
}

/// A CapsuleCmd header for `sqe` followed by `icd_len` bytes of in-capsule data (0 for
/// none), with header digest and padding to the controller's alignment (CPDA) as negotiated.
/// The returned buffer's length is where the in-capsule data starts (PDO). The caller sets
/// SGL descriptor 1 (see [`icd_sgl`]) and sends the data and, if `params.ddgst` and there is
/// data, its [`DataDigest`].
pub fn encode_capsule_cmd(
    sqe: &Sqe,
    icd_len: u32,
    params: &Params,
) -> Result<HeaderBuf, EncodeError> {
    let bytes = sqe_to_bytes(sqe);
    frame(
        pdu_type::CAPSULE_CMD,
        0,
        CAPSULE_CMD_HLEN,
        icd_len,
        params,
        params.h2c_align(),
        |h| wr(h, CH_LEN, &bytes),
    )
}

/// A CapsuleResp for `cqe`, with a header digest if negotiated.
pub fn encode_capsule_resp(cqe: &Cqe, params: &Params) -> HeaderBuf {
    let bytes = cqe_to_bytes(cqe);
    frame(
        pdu_type::CAPSULE_RESP,
        0,
        CAPSULE_RESP_HLEN,
        0,
        params,
        4,
        |h| wr(h, CH_LEN, &bytes),
    )
    // A PDU without data always frames: its length is at most 28 bytes.
    .unwrap_or(HeaderBuf {
        buf: [0; HEADER_BUF_LEN],
        len: 0,
    })
}

fn encode_data(
    ty: u8,
    d: &DataHdr,
    params: &Params,
    align: u32,
    ttag: u16,
) -> Result<HeaderBuf, EncodeError> {
    if d.datal == 0 {
        return Err(EncodeError::NoData);
    }
    let mut f = if d.last { flags::LAST_PDU } else { 0 };
    if ty == pdu_type::C2H_DATA && d.success {
        f |= flags::SUCCESS | flags::LAST_PDU;
    }
    frame(ty, f, DATA_HLEN, d.datal, params, align, |h| {
        wr16(h, 8, d.cccid);
        wr16(h, 10, ttag);
        wr32(h, 12, d.datao);
        wr32(h, 16, d.datal);
    })
}

/// An H2CData header (host to controller) with LAST_PDU from `d.last`, header digest and
/// padding to CPDA as negotiated. `d.success` is ignored. The buffer's length is PDO.
pub fn encode_h2c_data(d: &DataHdr, params: &Params) -> Result<HeaderBuf, EncodeError> {
    encode_data(pdu_type::H2C_DATA, d, params, params.h2c_align(), d.ttag)
}

/// A C2HData header (controller to host) with LAST_PDU and SUCCESS from `d` (SUCCESS implies
/// LAST_PDU), header digest and padding to HPDA as negotiated. TTAG is reserved and sent as
/// 0. The buffer's length is PDO. SUCCESS replaces the CapsuleResp, so it is only for
/// connections whose host disabled SQ flow control (Connect CATTR bit 2): no SQHD is reported.
pub fn encode_c2h_data(d: &DataHdr, params: &Params) -> Result<HeaderBuf, EncodeError> {
    encode_data(pdu_type::C2H_DATA, d, params, params.c2h_align(), 0)
}

/// An R2T, with a header digest if negotiated.
pub fn encode_r2t(r: &R2t, params: &Params) -> HeaderBuf {
    frame(pdu_type::R2T, 0, R2T_HLEN, 0, params, 4, |h| {
        wr16(h, 8, r.cccid);
        wr16(h, 10, r.ttag);
        wr32(h, 12, r.r2to);
        wr32(h, 16, r.r2tl);
    })
    .unwrap_or(HeaderBuf {
        buf: [0; HEADER_BUF_LEN],
        len: 0,
    })
}

/// A complete TermReq from `sender` (C2HTermReq from the controller, H2CTermReq from the host)
/// quoting the first (up to 128) bytes of the offending PDU. TermReqs never carry digests and
/// their PDO is 0.
pub fn encode_term_req(sender: Role, fes: u16, fei: u32, offending: &[u8]) -> HeaderBuf {
    let quoted = offending.get(..TERM_MAX_DATA).unwrap_or(offending);
    let hlen = usize::from(TERM_HLEN);
    let mut out = HeaderBuf {
        buf: [0; HEADER_BUF_LEN],
        len: hlen + quoted.len(),
    };
    let ch = CommonHeader {
        pdu_type: sender.term_req_type(),
        flags: 0,
        hlen: TERM_HLEN,
        pdo: 0,
        plen: out.len as u32,
    };
    wr(&mut out.buf, 0, &ch.encode());
    wr16(&mut out.buf, 8, fes);
    wr32(&mut out.buf, 10, fei);
    wr(&mut out.buf, hlen, quoted);
    out
}

// ---------------------------------------------------------------------------------------------
// Decoders. Each takes the PDU from its first byte, at least HLEN bytes (a digest and more may
// follow); a shorter buffer is reported as an invalid HLEN.

fn header<const N: usize>(hdr: &[u8]) -> Result<&[u8; N], Fatal> {
    hdr.first_chunk::<N>()
        .ok_or(Fatal::invalid_field(field::HLEN))
}

/// The SQE carried by a CapsuleCmd, copied out of the (possibly unaligned) buffer.
pub fn decode_capsule_cmd(hdr: &[u8]) -> Result<Sqe, Fatal> {
    let h = header::<{ CAPSULE_CMD_HLEN as usize }>(hdr)?;
    Ok(sqe_from_bytes(&rd(h, CH_LEN)))
}

/// The CQE carried by a CapsuleResp.
pub fn decode_capsule_resp(hdr: &[u8]) -> Result<Cqe, Fatal> {
    let h = header::<{ CAPSULE_RESP_HLEN as usize }>(hdr)?;
    Ok(cqe_from_bytes(&rd(h, CH_LEN)))
}

/// The header of an H2CData or C2HData PDU. SUCCESS is reported for C2HData only.
pub fn decode_data_hdr(hdr: &[u8]) -> Result<DataHdr, Fatal> {
    let h = header::<{ DATA_HLEN as usize }>(hdr)?;
    let f = h[1];
    Ok(DataHdr {
        cccid: rd16(h, 8),
        ttag: rd16(h, 10),
        datao: rd32(h, 12),
        datal: rd32(h, 16),
        last: f & flags::LAST_PDU != 0,
        success: h[0] == pdu_type::C2H_DATA && f & flags::SUCCESS != 0,
    })
}

/// The header of an R2T PDU.
pub fn decode_r2t(hdr: &[u8]) -> Result<R2t, Fatal> {
    let h = header::<{ R2T_HLEN as usize }>(hdr)?;
    Ok(R2t {
        cccid: rd16(h, 8),
        ttag: rd16(h, 10),
        r2to: rd32(h, 12),
        r2tl: rd32(h, 16),
    })
}

/// FES and FEI of a received TermReq.
pub fn decode_term(hdr: &[u8]) -> Result<(u16, u32), Fatal> {
    let h = header::<{ TERM_HLEN as usize }>(hdr)?;
    Ok((rd16(h, 8), rd32(h, 10)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_icd: 8192,
        max_plen: 1 << 20,
    };

    fn params(hdgst: bool, ddgst: bool, cpda: u8, hpda: u8) -> Params {
        Params {
            hdgst,
            ddgst,
            cpda,
            hpda,
            maxh2cdata: 65536,
            maxr2t: 0,
        }
    }

    /// Builds a whole PDU: header bytes, then data and its digest.
    fn pdu(h: &HeaderBuf, data: &[u8], ddgst: bool) -> Vec<u8> {
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(data);
        if ddgst && !data.is_empty() {
            let mut d = DataDigest::new();
            d.update(data);
            v.extend_from_slice(&d.to_bytes());
        }
        v
    }

    /// Receives one PDU the way a connection would: check, verify, and return the layout.
    fn receive(buf: &[u8], role: Role, p: &Params) -> Result<Layout, Fatal> {
        let ch = CommonHeader::from_prefix(buf).unwrap();
        let l = check(&ch, role, p, &LIMITS)?;
        assert_eq!(l.plen as usize, buf.len(), "layout covers the whole PDU");
        if l.hdgst {
            verify_hdgst(&buf[..l.header_len])?;
        }
        if l.ddgst {
            let start = l.data_offset();
            let end = start + l.datal as usize;
            let mut d = DataDigest::new();
            d.update(&buf[start..end]);
            d.verify(buf[end..end + 4].try_into().unwrap()).unwrap();
        }
        Ok(l)
    }

    fn sample_sqe() -> Sqe {
        let mut s = Sqe::new(0x01, 0xbeef);
        s.set_nsid(7);
        s.set_cdw(2, 0x0102_0304);
        s.set_cdw(3, 0x0506_0708);
        s.mptr = 0x1122_3344_5566_7788u64.to_le();
        s.set_sgl1(icd_sgl(512));
        for n in 10..=15 {
            s.set_cdw(n, 0xa0b0_c0d0 + n as u32);
        }
        s
    }

    #[test]
    fn crc32c_known_answer() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(hdgst(b"123456789"), 0xE306_9283);
        let mut d = DataDigest::new();
        d.update(b"1234");
        d.update(b"");
        d.update(b"56789");
        assert_eq!(d.finish(), 0xE306_9283);
        assert_eq!(d.to_bytes(), [0x83, 0x92, 0x06, 0xE3]);
    }

    #[test]
    fn header_digest_placed_like_linux() {
        // Linux: put_unaligned_le32(~crc32c(~0, pdu, hlen), pdu + hlen).
        let p = params(true, false, 0, 0);
        let cqe = Cqe::new(0x1234, Status::SUCCESS);
        let h = encode_capsule_resp(&cqe, &p);
        let b = h.as_bytes();
        assert_eq!(b.len(), 28);
        assert_eq!(b[1], flags::HDGSTF);
        assert_eq!(b[2], 24);
        assert_eq!(b[3], 0);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 28);
        let crc = crc32c::crc32c(&b[..24]);
        assert_eq!(&b[24..28], &crc.to_le_bytes());
        assert!(verify_hdgst(b).is_ok());
        let mut bad = b.to_vec();
        bad[12] ^= 1;
        assert_eq!(
            verify_hdgst(&bad),
            Err(Fatal::new(fes::HDGST_ERROR, crc)),
            "FEI is the received digest"
        );
        assert_eq!(verify_hdgst(&b[..27]), Err(Fatal::new(fes::HDGST_ERROR, 0)));
    }

    #[test]
    fn common_header_wire_layout() {
        let ch = CommonHeader {
            pdu_type: 7,
            flags: 0x0c,
            hlen: 24,
            pdo: 28,
            plen: 0x0102_0304,
        };
        assert_eq!(ch.encode(), [7, 0x0c, 24, 28, 4, 3, 2, 1]);
        assert_eq!(CommonHeader::decode(&ch.encode()), ch);
        assert_eq!(CommonHeader::from_prefix(&[0; 7]), None);
    }

    #[test]
    fn ic_req_round_trip_and_validation() {
        let req = IcReq {
            hpda: 3,
            hdgst: true,
            ddgst: false,
            maxr2t: 15,
        };
        let b = req.encode();
        assert_eq!(&b[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
        assert_eq!((b[10], b[11]), (3, 1));
        let l = receive(&b, Role::Controller, &Params::default()).unwrap();
        assert_eq!(l.header_len, 128);
        assert_eq!(IcReq::decode(&b), Ok(req));

        let mut bad = b;
        bad[8] = 1;
        assert_eq!(
            IcReq::decode(&bad),
            Err(Fatal::new(fes::UNSUPPORTED_PARAMETER, 8))
        );
        let mut bad = b;
        bad[10] = 32;
        assert_eq!(IcReq::decode(&bad), Err(Fatal::invalid_field(10)));
        let mut bad = b;
        bad[4] = 127;
        assert_eq!(IcReq::decode(&bad), Err(Fatal::invalid_field(field::PLEN)));
        let mut bad = b;
        bad[1] = flags::HDGSTF;
        assert_eq!(IcReq::decode(&bad), Err(Fatal::invalid_field(field::FLAGS)));
        assert_eq!(
            IcReq::decode(&b[..127]),
            Err(Fatal::invalid_field(field::PLEN))
        );
        // An ICResp sent to a controller is the wrong direction.
        let resp = IcResp::answer(&req, true, true, 0, 8192).encode();
        assert_eq!(IcReq::decode(&resp), Err(Fatal::invalid_field(0)));
    }

    #[test]
    fn ic_resp_round_trip_and_validation() {
        let req = IcReq {
            hpda: 0,
            hdgst: true,
            ddgst: true,
            maxr2t: 0,
        };
        let resp = IcResp::answer(&req, true, false, 1, 131072);
        assert_eq!((resp.hdgst, resp.ddgst), (true, false));
        let b = resp.encode();
        assert_eq!(b[0], pdu_type::IC_RESP);
        assert_eq!(IcResp::decode(&b), Ok(resp));
        let p = Params::from_exchange(&req, &resp).unwrap();
        assert_eq!(
            p,
            Params {
                hdgst: true,
                ddgst: false,
                cpda: 1,
                hpda: 0,
                maxh2cdata: 131072,
                maxr2t: 0
            }
        );
        assert_eq!(p.h2c_align(), 8);
        assert_eq!(p.c2h_align(), 4);

        for (v, fei) in [(4092u32, 12u32), (4098, 12), (0, 12)] {
            let mut bad = b;
            bad[12..16].copy_from_slice(&v.to_le_bytes());
            assert_eq!(IcResp::decode(&bad), Err(Fatal::invalid_field(fei)));
        }
        let mut bad = b;
        bad[10] = 200;
        assert_eq!(IcResp::decode(&bad), Err(Fatal::invalid_field(10)));
        let mut bad = b;
        bad[9] = 1;
        assert_eq!(IcResp::decode(&bad), Err(Fatal::unsupported(8)));
        // The controller may not enable a digest the host did not ask for.
        let plain = IcReq::default();
        let greedy = IcResp {
            cpda: 0,
            hdgst: false,
            ddgst: true,
            maxh2cdata: 4096,
        };
        assert_eq!(
            Params::from_exchange(&plain, &greedy),
            Err(Fatal::unsupported(11))
        );
    }

    #[test]
    fn capsule_cmd_round_trip_every_option() {
        let sqe = sample_sqe();
        let data: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        for hd in [false, true] {
            for dd in [false, true] {
                for cpda in [0u8, 1, 7, 31] {
                    let p = params(hd, dd, cpda, 0);
                    for icd in [&data[..], &[][..]] {
                        let h = encode_capsule_cmd(&sqe, icd.len() as u32, &p).unwrap();
                        let buf = pdu(&h, icd, dd);
                        let l = receive(&buf, Role::Controller, &p).unwrap();
                        assert_eq!(l.datal as usize, icd.len());
                        assert_eq!(l.hdgst, hd);
                        assert_eq!(l.ddgst, dd && !icd.is_empty());
                        if !icd.is_empty() {
                            assert_eq!(l.data_offset(), h.len());
                            assert_eq!(l.data_offset() % p.h2c_align() as usize, 0);
                            assert_eq!(&buf[l.data_offset()..][..icd.len()], icd);
                        } else {
                            assert_eq!(buf[3], 0, "no data, PDO 0");
                        }
                        let got = decode_capsule_cmd(&buf[..l.header_len]).unwrap();
                        assert_eq!(got, sqe);
                        assert_eq!(got.cid(), 0xbeef);
                    }
                }
            }
        }
    }

    #[test]
    fn in_capsule_sgl_checks() {
        let sqe = sample_sqe();
        let p = params(false, false, 0, 0);
        let h = encode_capsule_cmd(&sqe, 512, &p).unwrap();
        let buf = pdu(&h, &[0; 512], false);
        let l = receive(&buf, Role::Controller, &p).unwrap();
        assert_eq!(check_in_capsule(&sqe, &l), Ok(()));
        let mut s2 = sqe;
        s2.set_sgl1(icd_sgl(511));
        assert_eq!(check_in_capsule(&s2, &l), Err(Fatal::invalid_field(4)));
        s2.set_sgl1(SglDescriptor::new(
            sgl_type::DATA_BLOCK,
            sgl_subtype::OFFSET,
            8,
            512,
        ));
        assert_eq!(check_in_capsule(&s2, &l), Err(Fatal::unsupported(32)));
        s2.set_sgl1(transport_sgl(4096));
        assert_eq!(check_in_capsule(&s2, &l), Err(Fatal::invalid_field(4)));
    }

    #[test]
    fn capsule_resp_round_trip() {
        for hd in [false, true] {
            let p = params(hd, true, 0, 0);
            let mut cqe = Cqe::new(0x4321, Status::LBA_OUT_OF_RANGE);
            cqe.set_dw0(0xdead_beef);
            cqe.dw1 = 0x0bad_f00du32.to_le();
            cqe.set_sq(17, 3);
            cqe.status |= 1u16.to_le(); // phase bit travels too
            let h = encode_capsule_resp(&cqe, &p);
            let buf = h.as_bytes();
            let l = receive(buf, Role::Host, &p).unwrap();
            assert_eq!((l.datal, l.ddgst), (0, false));
            assert_eq!(decode_capsule_resp(buf).unwrap(), cqe);
        }
    }

    #[test]
    fn data_pdus_round_trip() {
        let data = vec![0x5au8; 1000];
        for hd in [false, true] {
            for dd in [false, true] {
                for pda in [0u8, 3, 31] {
                    let p = params(hd, dd, pda, pda);
                    let d = DataHdr {
                        cccid: 9,
                        ttag: 0x77,
                        datao: 4096,
                        datal: 1000,
                        last: true,
                        success: false,
                    };
                    let h = encode_h2c_data(&d, &p).unwrap();
                    let buf = pdu(&h, &data, dd);
                    let l = receive(&buf, Role::Controller, &p).unwrap();
                    let got = decode_data_hdr(&buf).unwrap();
                    assert_eq!(got, d);
                    assert_eq!(got.validate(&l, 5096), Ok(()));
                    assert_eq!(got.validate(&l, 5095), Err(Fatal::out_of_range()));

                    let c = DataHdr {
                        ttag: 0,
                        success: true,
                        ..d
                    };
                    let h = encode_c2h_data(&c, &p).unwrap();
                    assert_eq!(h.len() % p.c2h_align() as usize, 0);
                    let buf = pdu(&h, &data, dd);
                    let l = receive(&buf, Role::Host, &p).unwrap();
                    assert_eq!(decode_data_hdr(&buf).unwrap(), c);
                    // Sent to the wrong side, a data PDU is an invalid type.
                    assert_eq!(
                        check(&h.common(), Role::Controller, &p, &LIMITS),
                        Err(Fatal::invalid_field(0))
                    );
                    assert_eq!(l.datal, 1000);
                }
            }
        }
        let p = Params::default();
        let empty = DataHdr::default();
        assert_eq!(
            encode_h2c_data(&empty, &p).unwrap_err(),
            EncodeError::NoData
        );
        // SUCCESS implies LAST_PDU on the wire; C2H TTAG is sent as 0.
        let h = encode_c2h_data(
            &DataHdr {
                ttag: 5,
                datal: 4,
                success: true,
                ..DataHdr::default()
            },
            &p,
        )
        .unwrap();
        assert_eq!(h.as_bytes()[1], flags::LAST_PDU | flags::SUCCESS);
        assert_eq!(&h.as_bytes()[10..12], &[0, 0]);
    }

    #[test]
    fn data_header_datal_must_match_plen() {
        let p = params(false, false, 0, 0);
        let d = DataHdr {
            datal: 16,
            ..DataHdr::default()
        };
        let h = encode_h2c_data(&d, &p).unwrap();
        let mut buf = pdu(&h, &[0; 16], false);
        buf[16] = 17; // DATAL says 17, PLEN says 16
        let l = receive(&buf, Role::Controller, &p).unwrap();
        let got = decode_data_hdr(&buf).unwrap();
        assert_eq!(got.validate(&l, 1 << 20), Err(Fatal::invalid_field(16)));
    }

    #[test]
    fn r2t_round_trip() {
        for hd in [false, true] {
            let p = params(hd, true, 0, 0);
            let r = R2t {
                cccid: 3,
                ttag: 0xfffe,
                r2to: 8192,
                r2tl: 1 << 20,
            };
            let h = encode_r2t(&r, &p);
            let l = receive(h.as_bytes(), Role::Host, &p).unwrap();
            assert_eq!(l.header_len, if hd { 28 } else { 24 });
            let got = decode_r2t(h.as_bytes()).unwrap();
            assert_eq!(got, r);
            assert_eq!(got.validate(8192 + (1 << 20)), Ok(()));
            assert_eq!(got.validate(8192), Err(Fatal::out_of_range()));
            assert_eq!(
                R2t { r2tl: 0, ..r }.validate(u32::MAX),
                Err(Fatal::invalid_field(16))
            );
            assert_eq!(
                R2t {
                    r2to: u32::MAX,
                    ..r
                }
                .validate(u32::MAX),
                Err(Fatal::out_of_range())
            );
        }
    }

    #[test]
    fn term_req_round_trip() {
        let offending: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let f = Fatal::invalid_field(field::HLEN);
        let h = f.term_req(Role::Controller, &offending);
        let b = h.as_bytes();
        assert_eq!(b.len(), 152);
        assert_eq!(&b[..4], &[pdu_type::C2H_TERM_REQ, 0, 24, 0]);
        assert_eq!(&b[24..], &offending[..128]);
        // Digests negotiated or not, a TermReq carries none.
        let p = params(true, true, 0, 0);
        let l = receive(b, Role::Host, &p).unwrap();
        assert_eq!(
            (l.header_len, l.datal, l.hdgst, l.ddgst),
            (24, 128, false, false)
        );
        assert_eq!(decode_term(b), Ok((fes::INVALID_HEADER_FIELD, 2)));
        assert!(!may_send_term_req(b[0]));

        let short = encode_term_req(Role::Host, fes::HDGST_ERROR, 0xdead_beef, &offending[..8]);
        assert_eq!(short.len(), 32);
        assert_eq!(short.as_bytes()[0], pdu_type::H2C_TERM_REQ);
        let l = receive(short.as_bytes(), Role::Controller, &p).unwrap();
        assert_eq!(l.datal, 8);
        assert_eq!(decode_term(short.as_bytes()), Ok((3, 0xdead_beef)));
        assert_eq!(
            format!("{}", Fatal::new(3, 7)),
            "NVMe/TCP fatal error: header digest error (FES 0x03, FEI 0x7)"
        );
    }

    fn ch(ty: u8, flags: u8, hlen: u8, pdo: u8, plen: u32) -> CommonHeader {
        CommonHeader {
            pdu_type: ty,
            flags,
            hlen,
            pdo,
            plen,
        }
    }

    #[test]
    fn lying_headers_give_the_right_fes_and_fei() {
        use pdu_type::*;
        let plain = params(false, false, 0, 0);
        let hd = params(true, false, 0, 0);
        let dd = params(false, true, 0, 0);
        let aligned = params(false, false, 7, 7); // 32-byte alignment
        let ctl = Role::Controller;
        let host = Role::Host;
        let inv = Fatal::invalid_field;
        let cases: Vec<(CommonHeader, Role, Params, Fatal)> = vec![
            // Unknown or wrong-direction type.
            (ch(0x08, 0, 24, 0, 24), ctl, plain, inv(0)),
            (ch(0x0a, 0, 24, 0, 24), host, plain, inv(0)),
            (ch(0xff, 0, 24, 0, 24), ctl, plain, inv(0)),
            (ch(CAPSULE_RESP, 0, 24, 0, 24), ctl, plain, inv(0)),
            (ch(CAPSULE_CMD, 0, 72, 0, 72), host, plain, inv(0)),
            (ch(H2C_TERM_REQ, 0, 24, 0, 24), host, plain, inv(0)),
            (ch(IC_REQ, 0, 128, 0, 128), host, plain, inv(0)),
            // Digests flagged but not negotiated, or negotiated but missing.
            (
                ch(CAPSULE_CMD, flags::HDGSTF, 72, 0, 76),
                ctl,
                plain,
                inv(1),
            ),
            (ch(CAPSULE_CMD, 0, 72, 0, 72), ctl, hd, inv(1)),
            (
                ch(CAPSULE_CMD, flags::DDGSTF, 72, 72, 80),
                ctl,
                plain,
                inv(1),
            ),
            (ch(CAPSULE_CMD, 0, 72, 72, 80), ctl, dd, inv(1)),
            (ch(CAPSULE_CMD, flags::DDGSTF, 72, 0, 72), ctl, dd, inv(1)),
            (ch(CAPSULE_RESP, flags::DDGSTF, 24, 0, 24), host, dd, inv(1)),
            (ch(R2T, flags::DDGSTF, 24, 0, 24), host, dd, inv(1)),
            (ch(H2C_TERM_REQ, flags::HDGSTF, 24, 0, 24), ctl, hd, inv(1)),
            (ch(IC_REQ, flags::HDGSTF, 128, 0, 128), ctl, hd, inv(1)),
            (
                ch(C2H_DATA, flags::SUCCESS, 24, 24, 28),
                host,
                plain,
                inv(1),
            ),
            // Wrong HLEN.
            (ch(CAPSULE_CMD, 0, 64, 0, 64), ctl, plain, inv(2)),
            (ch(H2C_DATA, 0, 0, 24, 28), ctl, plain, inv(2)),
            (ch(H2C_TERM_REQ, 0, 8, 0, 24), ctl, plain, inv(2)),
            (ch(IC_RESP, 0, 24, 0, 128), host, plain, inv(2)),
            // PDO inside the header, misaligned, past PLEN or set without data.
            (ch(CAPSULE_CMD, 0, 72, 8, 100), ctl, plain, inv(3)),
            (ch(CAPSULE_CMD, 0, 72, 0, 100), ctl, plain, inv(3)),
            (ch(CAPSULE_CMD, flags::HDGSTF, 72, 72, 100), ctl, hd, inv(3)),
            (ch(CAPSULE_CMD, 0, 72, 74, 100), ctl, plain, inv(3)),
            (ch(CAPSULE_CMD, 0, 72, 72, 100), ctl, aligned, inv(3)),
            (ch(CAPSULE_CMD, 0, 72, 76, 72), ctl, plain, inv(3)),
            (ch(H2C_DATA, 0, 24, 0, 28), ctl, plain, inv(3)),
            (ch(H2C_DATA, 0, 24, 24, 20), ctl, plain, inv(3)),
            (ch(CAPSULE_RESP, 0, 24, 24, 24), host, plain, inv(3)),
            (ch(R2T, 0, 24, 24, 24), host, plain, inv(3)),
            (ch(C2H_TERM_REQ, 0, 24, 24, 30), host, plain, inv(3)),
            // PLEN lies.
            (ch(CAPSULE_CMD, 0, 72, 0, 71), ctl, plain, inv(4)),
            (ch(CAPSULE_CMD, 0, 72, 0, 0), ctl, plain, inv(4)),
            (ch(CAPSULE_CMD, flags::HDGSTF, 72, 0, 75), ctl, hd, inv(4)),
            (ch(CAPSULE_RESP, 0, 24, 0, 23), host, plain, inv(4)),
            (ch(CAPSULE_RESP, 0, 24, 0, 40), host, plain, inv(4)),
            (ch(R2T, 0, 24, 0, 0), host, plain, inv(4)),
            (ch(H2C_DATA, 0, 24, 24, 24), ctl, plain, inv(4)),
            (ch(H2C_DATA, flags::DDGSTF, 24, 24, 28), ctl, dd, inv(4)),
            (ch(C2H_DATA, flags::DDGSTF, 24, 24, 27), host, dd, inv(4)),
            (ch(H2C_TERM_REQ, 0, 24, 0, 23), ctl, plain, inv(4)),
            (ch(H2C_TERM_REQ, 0, 24, 0, 153), ctl, plain, inv(4)),
            (ch(IC_REQ, 0, 128, 0, 129), ctl, plain, inv(4)),
            (
                ch(CAPSULE_CMD, 0, 72, 72, u32::MAX),
                ctl,
                plain,
                Fatal::limit_exceeded(),
            ),
            // Data beyond what the receiver advertised.
            (
                ch(CAPSULE_CMD, 0, 72, 72, 72 + 8193),
                ctl,
                plain,
                Fatal::limit_exceeded(),
            ),
            (
                ch(H2C_DATA, 0, 24, 24, 24 + 65537),
                ctl,
                plain,
                Fatal::limit_exceeded(),
            ),
            // Hostile PLEN beyond the hard cap.
            (ch(C2H_DATA, 0, 24, 24, u32::MAX), host, plain, inv(4)),
            (ch(C2H_DATA, 0, 24, 24, 24 + (1 << 20)), host, plain, inv(4)),
        ];
        for (i, (h, role, p, want)) in cases.iter().enumerate() {
            assert_eq!(
                check(h, *role, p, &LIMITS),
                Err(*want),
                "case {i}: {h:?} {role:?} {p:?}"
            );
        }
        // And the matching well-formed headers pass.
        let ok: Vec<(CommonHeader, Role, Params)> = vec![
            (ch(CAPSULE_CMD, 0, 72, 72, 72 + 8192), ctl, plain),
            (ch(CAPSULE_CMD, 0, 72, 96, 97), ctl, aligned),
            (ch(CAPSULE_CMD, flags::HDGSTF, 72, 0, 76), ctl, hd),
            (ch(CAPSULE_CMD, flags::DDGSTF, 72, 72, 77), ctl, dd),
            (ch(CAPSULE_CMD, 0, 72, 0, 72), ctl, dd),
            (
                ch(H2C_DATA, flags::LAST_PDU, 24, 24, 24 + 65536),
                ctl,
                plain,
            ),
            (
                ch(C2H_DATA, flags::SUCCESS | flags::LAST_PDU, 24, 28, 29),
                host,
                plain,
            ),
            (ch(C2H_TERM_REQ, 0, 24, 0, 24), host, hd),
            (ch(IC_RESP, 0, 128, 0, 128), host, plain),
            // Reserved flag bits are ignored.
            (ch(CAPSULE_RESP, 0xf0, 24, 0, 24), host, plain),
        ];
        for (h, role, p) in ok {
            assert!(check(&h, role, &p, &LIMITS).is_ok(), "{h:?} {role:?} {p:?}");
        }
    }

    #[test]
    fn layout_of_padded_data() {
        let p = params(true, true, 7, 0);
        let l = check(
            &ch(pdu_type::CAPSULE_CMD, 3, 72, 96, 96 + 10 + 4),
            Role::Controller,
            &p,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            l,
            Layout {
                pdu_type: 4,
                header_len: 76,
                hdgst: true,
                pad: 20,
                datal: 10,
                ddgst: true,
                plen: 110
            }
        );
        assert_eq!(l.data_offset(), 96);
        assert_eq!(l.rest_len(), 34);
    }

    #[test]
    fn short_buffers_do_not_decode() {
        assert!(decode_capsule_cmd(&[0; 71]).is_err());
        assert!(decode_capsule_resp(&[0; 23]).is_err());
        assert!(decode_data_hdr(&[0; 23]).is_err());
        assert!(decode_r2t(&[]).is_err());
        assert!(decode_term(&[0; 10]).is_err());
        assert!(verify_hdgst(&[]).is_err());
    }

    #[test]
    fn encoder_rejects_impossible_framing() {
        let p = params(false, true, 0, 0);
        assert_eq!(
            encode_capsule_cmd(&Sqe::default(), u32::MAX - 10, &p).unwrap_err(),
            EncodeError::TooLong
        );
        let bad = Params {
            cpda: 100,
            ..Params::default()
        };
        assert_eq!(
            encode_capsule_cmd(&Sqe::default(), 1, &bad).unwrap_err(),
            EncodeError::Alignment(404)
        );
    }

    fn any_params() -> impl Strategy<Value = Params> {
        (
            any::<bool>(),
            any::<bool>(),
            0u8..=31,
            0u8..=31,
            1u32..=4096,
        )
            .prop_map(|(hdgst, ddgst, cpda, hpda, m)| Params {
                hdgst,
                ddgst,
                cpda,
                hpda,
                maxh2cdata: m * 4 + 4092,
                maxr2t: 0,
            })
    }

    fn any_role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Controller), Just(Role::Host)]
    }

    proptest! {
        #[test]
        fn check_never_panics_and_layout_is_consistent(
            b in any::<[u8; 8]>(),
            role in any_role(),
            p in any::<(bool, bool, u8, u8, u32, u32)>(),
            limits in any::<(u32, u32)>(),
        ) {
            let p = Params { hdgst: p.0, ddgst: p.1, cpda: p.2, hpda: p.3, maxh2cdata: p.4, maxr2t: p.5 };
            let limits = Limits { max_icd: limits.0, max_plen: limits.1 };
            let ch = CommonHeader::decode(&b);
            if let Ok(l) = check(&ch, role, &p, &limits) {
                prop_assert_eq!(l.header_len as u64 + l.rest_len(), u64::from(l.plen));
                prop_assert!(l.plen <= limits.max_plen);
                prop_assert!(l.header_len >= usize::from(ch.hlen));
                if l.datal > 0 && may_send_term_req(ch.pdu_type) {
                    prop_assert_eq!(l.data_offset(), usize::from(ch.pdo));
                    prop_assert_eq!(l.data_offset() as u32 % p.rx_align(role), 0);
                }
            }
        }

        #[test]
        fn check_near_valid_headers_never_panics(
            ty in 0u8..12,
            fl in 0u8..16,
            hlen in prop_oneof![Just(24u8), Just(72), Just(128), any::<u8>()],
            pdo in any::<u8>(),
            plen in prop_oneof![0u32..300, any::<u32>()],
            role in any_role(),
            p in any_params(),
        ) {
            let _ = check(&ch(ty, fl, hlen, pdo, plen), role, &p, &LIMITS);
        }

        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_capsule_cmd(&buf);
            let _ = decode_capsule_resp(&buf);
            let _ = decode_data_hdr(&buf);
            let _ = decode_r2t(&buf);
            let _ = decode_term(&buf);
            let _ = verify_hdgst(&buf);
            let _ = IcReq::decode(&buf);
            let _ = IcResp::decode(&buf);
            let _ = CommonHeader::from_prefix(&buf);
        }

        #[test]
        fn sqe_and_cqe_bytes_round_trip(s in any::<[u8; 64]>(), c in any::<[u8; 16]>()) {
            prop_assert_eq!(sqe_to_bytes(&sqe_from_bytes(&s)), s);
            prop_assert_eq!(cqe_to_bytes(&cqe_from_bytes(&c)), c);
        }

        #[test]
        fn capsule_cmd_encode_decode_identity(
            s in any::<[u8; 64]>(),
            icd in 0u32..=8192,
            p in any_params(),
        ) {
            let sqe = sqe_from_bytes(&s);
            let h = encode_capsule_cmd(&sqe, icd, &p).unwrap();
            let l = check(&h.common(), Role::Controller, &p, &LIMITS).unwrap();
            prop_assert_eq!(l.datal, icd);
            prop_assert!(h.len() >= l.header_len);
            if icd > 0 {
                prop_assert_eq!(l.data_offset(), h.len());
            }
            if l.hdgst {
                prop_assert!(verify_hdgst(h.as_bytes()).is_ok());
            }
            prop_assert_eq!(decode_capsule_cmd(h.as_bytes()).unwrap(), sqe);
        }

        #[test]
        fn data_encode_decode_identity(
            d in any::<(u16, u16, u32, bool, bool)>(),
            datal in 1u32..=65536,
            p in any_params(),
        ) {
            let p = Params { maxh2cdata: 65536, ..p };
            let h2c = DataHdr { cccid: d.0, ttag: d.1, datao: d.2, datal, last: d.3, success: false };
            let h = encode_h2c_data(&h2c, &p).unwrap();
            let l = check(&h.common(), Role::Controller, &p, &LIMITS).unwrap();
            prop_assert_eq!(l.data_offset(), h.len());
            prop_assert_eq!(decode_data_hdr(h.as_bytes()).unwrap(), h2c);
            prop_assert!(h2c.validate(&l, u32::MAX).is_ok() || d.2.checked_add(datal).is_none());

            let c2h = DataHdr { ttag: 0, success: d.4, last: d.3 || d.4, ..h2c };
            let h = encode_c2h_data(&c2h, &p).unwrap();
            let l = check(&h.common(), Role::Host, &p, &LIMITS).unwrap();
            prop_assert_eq!(l.datal, datal);
            prop_assert_eq!(decode_data_hdr(h.as_bytes()).unwrap(), c2h);
            if l.hdgst {
                prop_assert!(verify_hdgst(h.as_bytes()).is_ok());
            }
        }

        #[test]
        fn r2t_resp_term_identity(
            r in any::<(u16, u16, u32, u32)>(),
            c in any::<[u8; 16]>(),
            f in any::<(u16, u32)>(),
            quoted in proptest::collection::vec(any::<u8>(), 0..200),
            p in any_params(),
        ) {
            let r2t = R2t { cccid: r.0, ttag: r.1, r2to: r.2, r2tl: r.3 };
            let h = encode_r2t(&r2t, &p);
            prop_assert!(check(&h.common(), Role::Host, &p, &LIMITS).is_ok());
            prop_assert_eq!(decode_r2t(h.as_bytes()).unwrap(), r2t);

            let cqe = cqe_from_bytes(&c);
            let h = encode_capsule_resp(&cqe, &p);
            prop_assert!(check(&h.common(), Role::Host, &p, &LIMITS).is_ok());
            prop_assert_eq!(decode_capsule_resp(h.as_bytes()).unwrap(), cqe);

            let h = encode_term_req(Role::Host, f.0, f.1, &quoted);
            let l = check(&h.common(), Role::Controller, &p, &LIMITS).unwrap();
            prop_assert_eq!(l.datal as usize, quoted.len().min(128));
            prop_assert_eq!(decode_term(h.as_bytes()).unwrap(), f);
        }

        #[test]
        fn ic_encode_decode_identity(
            hpda in 0u8..=31, cpda in 0u8..=31,
            dg in any::<(bool, bool, bool, bool)>(),
            maxr2t in any::<u32>(), m in 1024u32..=(u32::MAX / 4),
        ) {
            let req = IcReq { hpda, hdgst: dg.0, ddgst: dg.1, maxr2t };
            prop_assert_eq!(IcReq::decode(&req.encode()).unwrap(), req);
            let resp = IcResp::answer(&req, dg.2, dg.3, cpda, m * 4);
            prop_assert_eq!(IcResp::decode(&resp.encode()).unwrap(), resp);
            let p = Params::from_exchange(&req, &resp).unwrap();
            prop_assert_eq!((p.hpda, p.cpda, p.maxh2cdata), (hpda, cpda, m * 4));
        }

        #[test]
        fn corrupted_header_digest_is_caught(
            s in any::<[u8; 64]>(),
            bit in 0usize..(76 * 8),
        ) {
            let p = params(true, false, 0, 0);
            let h = encode_capsule_cmd(&sqe_from_bytes(&s), 0, &p).unwrap();
            let mut b = h.as_bytes().to_vec();
            // Flip one bit anywhere except HLEN (which moves the digest) - all are caught.
            prop_assume!(bit / 8 != 2);
            b[bit / 8] ^= 1 << (bit % 8);
            let e = verify_hdgst(&b).unwrap_err();
            prop_assert_eq!(e.fes, fes::HDGST_ERROR);
        }

        #[test]
        fn data_digest_is_split_invariant(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.sort_unstable();
            let mut d = DataDigest::new();
            let mut at = 0;
            for c in cuts {
                d.update(&data[at..c]);
                at = c;
            }
            d.update(&data[at..]);
            prop_assert_eq!(d.finish(), crc32c::crc32c(&data));
            prop_assert!(d.verify(&crc32c::crc32c(&data).to_le_bytes()).is_ok());
            let wrong = (crc32c::crc32c(&data) ^ 1).to_le_bytes();
            prop_assert_eq!(d.verify(&wrong).unwrap_err().status(), TRANSIENT_TRANSPORT_ERROR);
        }
    }
}
