//! NVMe over Fabrics command and data encodings (NVM Express over Fabrics 1.1, sections 3 and
//! 5): the Connect command and its 1024-byte Connect data, Connect responses, Property Get/Set,
//! Disconnect, and the Discovery log page (log identifier 70h).
//!
//! Fabrics commands are SQEs with opcode 7Fh whose byte 4 (the low byte of the NSID dword)
//! holds the Fabrics command type (FCTYPE). Builders return [`Sqe`]s; accessors read them back
//! and say what is wrong with a peer's values as a [`ConnectReject`] or a [`Status`]. Decoders
//! borrow strings from the caller's buffer and allocate nothing.

use super::pdu;
use leap_queues::nvme::{admin, SglDescriptor, StatusCodeType};
use leap_queues::{Cqe, Sqe, Status};

/// The Fabrics command opcode (NVMe-oF 1.1, section 3.1: 7Fh).
pub const OPCODE: u8 = admin::FABRICS;

/// Fabrics command types, SQE byte 4 (NVMe-oF 1.1, figure "Fabrics Command Type").
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTH_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTH_RECV: u8 = 0x06;
    /// Disconnect (I/O queues only).
    pub const DISCONNECT: u8 = 0x08;
}

/// Connect Incompatible Format: RECFMT is not 0 (command specific status 80h).
pub const CONNECT_INCOMPATIBLE_FORMAT: Status =
    Status::new(StatusCodeType::CommandSpecific, 0x80).with_dnr();
/// Connect Controller Busy: the controller is already associated with a host (81h; retryable).
pub const CONNECT_CONTROLLER_BUSY: Status = Status::new(StatusCodeType::CommandSpecific, 0x81);
/// Connect Invalid Parameters (82h): CQE dword 0 holds IPO and IATTR
/// (see [`invalid_param_dw0`]).
pub const CONNECT_INVALID_PARAMETERS: Status =
    Status::new(StatusCodeType::CommandSpecific, 0x82).with_dnr();
/// Connect Restart Discovery (83h): the NVM subsystem requested is not available here.
pub const CONNECT_RESTART_DISCOVERY: Status = Status::new(StatusCodeType::CommandSpecific, 0x83);
/// Connect Invalid Host (84h): the host is not allowed to connect to the NVM subsystem.
pub const CONNECT_INVALID_HOST: Status =
    Status::new(StatusCodeType::CommandSpecific, 0x84).with_dnr();

/// The Fabrics command type of `sqe`, if it is a Fabrics command.
pub fn fctype_of(sqe: &Sqe) -> Option<u8> {
    (sqe.opcode() == OPCODE).then(|| sqe.nsid() as u8)
}

/// A zeroed Fabrics command of type `fctype` with command identifier `cid`.
pub fn fabrics_sqe(fctype: u8, cid: u16) -> Sqe {
    let mut s = Sqe::new(OPCODE, cid);
    s.set_nsid(u32::from(fctype));
    s
}

/// A Disconnect command (NVMe-oF 1.1, section 3.4), RECFMT 0.
pub fn disconnect_sqe(cid: u16) -> Sqe {
    fabrics_sqe(fctype::DISCONNECT, cid)
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// A string field of the Connect data or of a Discovery log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// Connect data SUBNQN (offset 256).
    SubNqn,
    /// Connect data HOSTNQN (offset 512).
    HostNqn,
    /// Discovery log entry TRSVCID (offset 32).
    TrSvcId,
    /// Discovery log entry TRADDR (offset 512).
    TrAddr,
    /// Discovery log entry SUBNQN (offset 256).
    EntrySubNqn,
}

impl Field {
    /// Byte offset of the field within its 1024-byte structure.
    pub fn offset(self) -> u16 {
        match self {
            Field::SubNqn => connect_data::SUBNQN as u16,
            Field::HostNqn => connect_data::HOSTNQN as u16,
            Field::TrSvcId => 32,
            Field::TrAddr => 512,
            Field::EntrySubNqn => 256,
        }
    }
    /// Size of the field in bytes.
    pub fn size(self) -> usize {
        match self {
            Field::TrSvcId => 32,
            _ => 256,
        }
    }
}

impl core::fmt::Display for Field {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Field::SubNqn => "SUBNQN",
            Field::HostNqn => "HOSTNQN",
            Field::TrSvcId => "TRSVCID",
            Field::TrAddr => "TRADDR",
            Field::EntrySubNqn => "discovery entry SUBNQN",
        })
    }
}

/// A malformed Connect data structure or Discovery log, or a value that cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FabricsError {
    /// The field holds an empty string.
    #[error("{0} is empty")]
    Empty(Field),
    /// The field has no NUL terminator within its size.
    #[error("{0} is not NUL-terminated within its field")]
    Unterminated(Field),
    /// The field is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(Field),
    /// The field is not ASCII.
    #[error("{0} is not ASCII")]
    NotAscii(Field),
    /// A string to encode contains a NUL byte.
    #[error("{0} contains a NUL byte")]
    EmbeddedNul(Field),
    /// A string to encode does not fit its field.
    #[error("{field} is {len} bytes; at most {max} fit")]
    TooLong {
        /// The field.
        field: Field,
        /// Length of the string.
        len: usize,
        /// Most bytes the field can hold.
        max: usize,
    },
    /// The buffer is shorter than the structure.
    #[error("buffer holds {got} bytes but {need} are needed")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// A log page length or offset overflows 64 bits.
    #[error("log page offset or length overflows")]
    Overflow,
}

impl FabricsError {
    /// The field at fault, if any.
    pub fn field(&self) -> Option<Field> {
        match *self {
            FabricsError::Empty(f)
            | FabricsError::Unterminated(f)
            | FabricsError::NotUtf8(f)
            | FabricsError::NotAscii(f)
            | FabricsError::EmbeddedNul(f)
            | FabricsError::TooLong { field: f, .. } => Some(f),
            FabricsError::Short { .. } | FabricsError::Overflow => None,
        }
    }
    /// How a controller answers a Connect whose data failed [`ConnectData::decode`] with this
    /// error: Connect Invalid Parameters pointing at the field in the Connect data (IATTR 1),
    /// or Data SGL Length Invalid when the data is shorter than 1024 bytes.
    pub fn connect_reject(&self) -> ConnectReject {
        match self.field() {
            Some(f) => ConnectReject::invalid_data_field(f.offset()),
            None => ConnectReject {
                status: Status::SGL_LENGTH_INVALID,
                dw0: 0,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// String fields.

/// Reads a NUL-terminated UTF-8 string (an NQN) from a fixed-size field.
fn read_nqn(b: &[u8], field: Field) -> Result<&str, FabricsError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(FabricsError::Unterminated(field))?;
    let s = b.get(..end).ok_or(FabricsError::Unterminated(field))?;
    if s.is_empty() {
        return Err(FabricsError::Empty(field));
    }
    core::str::from_utf8(s).map_err(|_| FabricsError::NotUtf8(field))
}

/// Writes a non-empty string without NULs into a NUL-padded field, leaving room for the
/// terminator.
fn write_nqn(out: &mut [u8], s: &str, field: Field) -> Result<(), FabricsError> {
    check_nqn(s, field)?;
    write_padded(out, s.as_bytes(), 0);
    Ok(())
}

fn check_nqn(s: &str, field: Field) -> Result<(), FabricsError> {
    let max = field.size() - 1;
    if s.is_empty() {
        Err(FabricsError::Empty(field))
    } else if s.len() > max {
        Err(FabricsError::TooLong {
            field,
            len: s.len(),
            max,
        })
    } else if s.bytes().any(|c| c == 0) {
        Err(FabricsError::EmbeddedNul(field))
    } else {
        Ok(())
    }
}

fn check_ascii(s: &str, field: Field) -> Result<(), FabricsError> {
    if !s.is_ascii() {
        Err(FabricsError::NotAscii(field))
    } else if s.bytes().any(|c| c == 0) {
        Err(FabricsError::EmbeddedNul(field))
    } else if s.len() > field.size() {
        Err(FabricsError::TooLong {
            field,
            len: s.len(),
            max: field.size(),
        })
    } else {
        Ok(())
    }
}

fn write_padded(out: &mut [u8], s: &[u8], pad: u8) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = s.get(i).copied().unwrap_or(pad);
    }
}

/// Reads a space- (or NUL-) padded ASCII string: up to the first NUL, trailing spaces trimmed.
fn read_padded_ascii(b: &[u8], field: Field) -> Result<&str, FabricsError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = b.get(..end).unwrap_or(&[]);
    let s = s.trim_ascii_end();
    if !s.is_ascii() {
        return Err(FabricsError::NotAscii(field));
    }
    core::str::from_utf8(s).map_err(|_| FabricsError::NotAscii(field))
}

fn field_of<const N: usize>(b: &[u8], off: usize) -> &[u8] {
    b.get(off..)
        .and_then(|s| s.first_chunk::<N>())
        .map(|a| &a[..])
        .unwrap_or(&[])
}

fn rd16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(
        b.get(off..)
            .and_then(|s| s.first_chunk::<2>())
            .copied()
            .unwrap_or([0; 2]),
    )
}

fn rd64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(
        b.get(off..)
            .and_then(|s| s.first_chunk::<8>())
            .copied()
            .unwrap_or([0; 8]),
    )
}

fn wr(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = off.checked_add(v.len()).and_then(|end| b.get_mut(off..end)) {
        d.copy_from_slice(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Connect.

/// Byte offsets of the Connect command fields within the SQE, used as IPO with IATTR 0.
pub mod connect_sqe_field {
    /// RECFMT (CDW10 bits 15:0).
    pub const RECFMT: u16 = 40;
    /// QID (CDW10 bits 31:16).
    pub const QID: u16 = 42;
    /// SQSIZE (CDW11 bits 15:0).
    pub const SQSIZE: u16 = 44;
    /// CATTR (CDW11 bits 23:16).
    pub const CATTR: u16 = 46;
    /// KATO (CDW12).
    pub const KATO: u16 = 48;
}

/// Byte offsets of the Connect data fields (NVMe-oF 1.1, figure "Connect Command Data"), used
/// as IPO with IATTR 1.
pub mod connect_data {
    /// HOSTID: 16-byte host identifier.
    pub const HOSTID: usize = 0;
    /// CNTLID: 0xFFFF (dynamic) for the admin queue, the controller's ID for I/O queues.
    pub const CNTLID: usize = 16;
    /// SUBNQN: 256 bytes, NUL-terminated.
    pub const SUBNQN: usize = 256;
    /// HOSTNQN: 256 bytes, NUL-terminated.
    pub const HOSTNQN: usize = 512;
    /// Size of the Connect data.
    pub const LEN: usize = 1024;
}

/// CNTLID requesting any controller of the dynamic controller model.
pub const CNTLID_DYNAMIC: u16 = 0xffff;
/// CNTLID requesting any controller of the static controller model.
pub const CNTLID_STATIC_ANY: u16 = 0xfffe;
/// CATTR bit 2: the host asks to disable SQ flow control (SQHD is not maintained).
pub const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;
/// Longest NQN the specifications allow, in bytes (the fields hold up to 255).
pub const NQN_MAX_LEN: usize = 223;

/// A Connect command (NVMe-oF 1.1, section 3.3) for queue `qid` with `sqsize0` + 1 entries
/// (SQSIZE is 0's based) and a keep-alive timeout of `kato_ms` milliseconds. SGL descriptor 1
/// describes the 1024 bytes of Connect data as in-capsule data ([`pdu::icd_sgl`]).
pub fn connect_sqe(cid: u16, qid: u16, sqsize0: u16, kato_ms: u32) -> Sqe {
    ConnectCmd {
        cid,
        recfmt: 0,
        qid,
        sqsize: sqsize0,
        cattr: 0,
        kato: kato_ms,
        sgl: pdu::icd_sgl(connect_data::LEN as u32),
    }
    .to_sqe()
}

/// The fields of a Connect command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectCmd {
    /// Command identifier.
    pub cid: u16,
    /// RECFMT: record format, 0 for this revision.
    pub recfmt: u16,
    /// QID: 0 for the admin queue.
    pub qid: u16,
    /// SQSIZE: submission queue size, 0's based.
    pub sqsize: u16,
    /// CATTR: connect attributes (priority class in bits 1:0, [`CATTR_DISABLE_SQFLOW`]).
    pub cattr: u8,
    /// KATO: keep-alive timeout in milliseconds (admin queue only; 0 disables).
    pub kato: u32,
    /// SGL descriptor 1, describing the Connect data.
    pub sgl: SglDescriptor,
}

impl ConnectCmd {
    /// The Connect fields of `sqe`, or `None` if it is not a Connect command.
    pub fn from_sqe(sqe: &Sqe) -> Option<ConnectCmd> {
        if fctype_of(sqe) != Some(fctype::CONNECT) {
            return None;
        }
        let (c10, c11) = (sqe.cdw(10), sqe.cdw(11));
        Some(ConnectCmd {
            cid: sqe.cid(),
            recfmt: c10 as u16,
            qid: (c10 >> 16) as u16,
            sqsize: c11 as u16,
            cattr: (c11 >> 16) as u8,
            kato: sqe.cdw(12),
            sgl: sqe.sgl1(),
        })
    }
    /// The SQE.
    pub fn to_sqe(&self) -> Sqe {
        let mut s = fabrics_sqe(fctype::CONNECT, self.cid);
        s.set_cdw(10, u32::from(self.recfmt) | (u32::from(self.qid) << 16));
        s.set_cdw(11, u32::from(self.sqsize) | (u32::from(self.cattr) << 16));
        s.set_cdw(12, self.kato);
        s.set_sgl1(self.sgl);
        s
    }
    /// Whether this connects the admin queue.
    pub fn is_admin(&self) -> bool {
        self.qid == 0
    }
    /// Number of submission queue entries requested (SQSIZE + 1).
    pub fn entries(&self) -> u32 {
        u32::from(self.sqsize) + 1
    }
    /// Checks the command as a controller must before looking at the Connect data: RECFMT 0
    /// (else Connect Incompatible Format), SQSIZE at least 1 and at most `mqes` (0's based
    /// maximum, as in CAP.MQES; else Connect Invalid Parameters at SQSIZE), and SGL descriptor
    /// 1 describing exactly 1024 bytes (else Data SGL Length Invalid).
    pub fn validate(&self, mqes: u16) -> Result<(), ConnectReject> {
        if self.recfmt != 0 {
            return Err(ConnectReject {
                status: CONNECT_INCOMPATIBLE_FORMAT,
                dw0: 0,
            });
        }
        if self.sqsize == 0 || self.sqsize > mqes {
            return Err(ConnectReject::invalid_sqe_field(connect_sqe_field::SQSIZE));
        }
        if self.sgl.len() != connect_data::LEN as u32 {
            return Err(ConnectReject {
                status: Status::SGL_LENGTH_INVALID,
                dw0: 0,
            });
        }
        Ok(())
    }
}

/// The 1024-byte Connect data (NVMe-oF 1.1, section 3.3, figure "Connect Command Data").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectData<'a> {
    /// HOSTID: the host identifier.
    pub hostid: [u8; 16],
    /// CNTLID: [`CNTLID_DYNAMIC`] on the admin queue, the controller's ID on I/O queues.
    pub cntlid: u16,
    /// SUBNQN: the NVM subsystem to connect to.
    pub subnqn: &'a str,
    /// HOSTNQN: the host's NQN.
    pub hostnqn: &'a str,
}

impl<'a> ConnectData<'a> {
    /// The 1024 wire bytes. NQNs must be non-empty, free of NUL bytes and at most 255 bytes
    /// long (the specification's limit is [`NQN_MAX_LEN`]).
    pub fn encode(&self) -> Result<[u8; connect_data::LEN], FabricsError> {
        let mut b = [0u8; connect_data::LEN];
        wr(&mut b, connect_data::HOSTID, &self.hostid);
        wr(&mut b, connect_data::CNTLID, &self.cntlid.to_le_bytes());
        write_nqn(
            b.get_mut(connect_data::SUBNQN..connect_data::SUBNQN + 256)
                .unwrap_or(&mut []),
            self.subnqn,
            Field::SubNqn,
        )?;
        write_nqn(
            b.get_mut(connect_data::HOSTNQN..connect_data::HOSTNQN + 256)
                .unwrap_or(&mut []),
            self.hostnqn,
            Field::HostNqn,
        )?;
        Ok(b)
    }
    /// Parses Connect data (at least 1024 bytes), borrowing the NQNs from `buf`. An NQN that
    /// is empty, not NUL-terminated within its 256 bytes or not UTF-8 is refused; answer with
    /// [`FabricsError::connect_reject`].
    pub fn decode(buf: &'a [u8]) -> Result<ConnectData<'a>, FabricsError> {
        let b = buf
            .first_chunk::<{ connect_data::LEN }>()
            .ok_or(FabricsError::Short {
                need: connect_data::LEN,
                got: buf.len(),
            })?;
        let hostid = b.first_chunk::<16>().copied().unwrap_or([0; 16]);
        Ok(ConnectData {
            hostid,
            cntlid: rd16(b, connect_data::CNTLID),
            subnqn: read_nqn(field_of::<256>(b, connect_data::SUBNQN), Field::SubNqn)?,
            hostnqn: read_nqn(field_of::<256>(b, connect_data::HOSTNQN), Field::HostNqn)?,
        })
    }
}

/// CQE dword 0 of a successful Connect: CNTLID in bits 15:0 (AUTHREQ, bits 31:16, is 0).
pub fn connect_success_dw0(cntlid: u16) -> u32 {
    u32::from(cntlid)
}

/// CQE dword 0 of a Connect Invalid Parameters completion: IPO (byte offset of the invalid
/// parameter) in bits 15:0 and IATTR in bits 23:16 (0: the offset is in the command, 1: in the
/// Connect data).
pub fn invalid_param_dw0(ipo: u16, in_data: bool) -> u32 {
    u32::from(ipo) | (u32::from(in_data) << 16)
}

/// The completion of a successful Connect for `cid` assigning controller `cntlid`.
pub fn connect_response(cid: u16, cntlid: u16) -> Cqe {
    let mut c = Cqe::new(cid, Status::SUCCESS);
    c.set_dw0(connect_success_dw0(cntlid));
    c
}

/// A failed Connect: the status and CQE dword 0 to complete it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectReject {
    /// Completion status.
    pub status: Status,
    /// CQE dword 0.
    pub dw0: u32,
}

impl ConnectReject {
    /// Connect Invalid Parameters for the SQE field at byte `offset` (IATTR 0; see
    /// [`connect_sqe_field`]).
    pub fn invalid_sqe_field(offset: u16) -> ConnectReject {
        ConnectReject {
            status: CONNECT_INVALID_PARAMETERS,
            dw0: invalid_param_dw0(offset, false),
        }
    }
    /// Connect Invalid Parameters for the Connect data field at byte `offset` (IATTR 1; see
    /// [`connect_data`]), for example an unknown SUBNQN or a CNTLID that names no controller.
    pub fn invalid_data_field(offset: u16) -> ConnectReject {
        ConnectReject {
            status: CONNECT_INVALID_PARAMETERS,
            dw0: invalid_param_dw0(offset, true),
        }
    }
    /// Connect Invalid Host; dword 0 points at HOSTNQN as the Linux target does.
    pub fn invalid_host() -> ConnectReject {
        ConnectReject {
            status: CONNECT_INVALID_HOST,
            dw0: invalid_param_dw0(connect_data::HOSTNQN as u16, true),
        }
    }
    /// The completion for command `cid`.
    pub fn cqe(&self, cid: u16) -> Cqe {
        let mut c = Cqe::new(cid, self.status);
        c.set_dw0(self.dw0);
        c
    }
}

/// How a Connect completed, as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectResult {
    /// Success: the controller ID and the AUTHREQ field (non-zero if authentication is
    /// required).
    Accepted {
        /// CNTLID (CQE dword 0 bits 15:0).
        cntlid: u16,
        /// AUTHREQ (CQE dword 0 bits 31:16).
        authreq: u16,
    },
    /// Connect Invalid Parameters.
    InvalidParameters {
        /// IPO: byte offset of the invalid parameter.
        ipo: u16,
        /// IATTR: 0 if the offset is in the command, 1 if in the Connect data.
        iattr: u8,
    },
    /// Any other failure.
    Failed(Status),
}

impl ConnectResult {
    /// Interprets the completion of a Connect command.
    pub fn from_cqe(cqe: &Cqe) -> ConnectResult {
        let st = cqe.status();
        let dw0 = cqe.dw0();
        if st.is_success() {
            ConnectResult::Accepted {
                cntlid: dw0 as u16,
                authreq: (dw0 >> 16) as u16,
            }
        } else if st.sct() == CONNECT_INVALID_PARAMETERS.sct()
            && st.sc() == CONNECT_INVALID_PARAMETERS.sc()
        {
            ConnectResult::InvalidParameters {
                ipo: dw0 as u16,
                iattr: (dw0 >> 16) as u8,
            }
        } else {
            ConnectResult::Failed(st)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// Controller property offsets (the controller's own map, re-exported for property commands).
pub use crate::controller::reg;

/// Size of a property access (ATTRIB bits 2:0 of CDW10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PropSize {
    /// 4 bytes (ATTRIB 0).
    Four,
    /// 8 bytes (ATTRIB 1).
    Eight,
}

impl PropSize {
    /// The ATTRIB value.
    pub fn attrib(self) -> u32 {
        match self {
            PropSize::Four => 0,
            PropSize::Eight => 1,
        }
    }
    /// From CDW10; `None` for the reserved size values.
    pub fn from_cdw10(cdw10: u32) -> Option<PropSize> {
        match cdw10 & 0x7 {
            0 => Some(PropSize::Four),
            1 => Some(PropSize::Eight),
            _ => None,
        }
    }
    /// Bytes accessed.
    pub fn bytes(self) -> u32 {
        match self {
            PropSize::Four => 4,
            PropSize::Eight => 8,
        }
    }
}

/// The size of a defined property, or `None` for offsets that name no property.
pub fn property_size(offset: u32) -> Option<PropSize> {
    match offset {
        reg::CAP => Some(PropSize::Eight),
        reg::VS | reg::CC | reg::CSTS | reg::NSSR => Some(PropSize::Four),
        _ => None,
    }
}

/// A Property Get command (NVMe-oF 1.1, section 3.6).
pub fn property_get_sqe(cid: u16, offset: u32, size: PropSize) -> Sqe {
    let mut s = fabrics_sqe(fctype::PROPERTY_GET, cid);
    s.set_cdw(10, size.attrib());
    s.set_cdw(11, offset);
    s
}

/// A Property Set command (NVMe-oF 1.1, section 3.7). A 4-byte set sends the low 32 bits of
/// `value`.
pub fn property_set_sqe(cid: u16, offset: u32, size: PropSize, value: u64) -> Sqe {
    let mut s = fabrics_sqe(fctype::PROPERTY_SET, cid);
    let value = match size {
        PropSize::Four => value & 0xffff_ffff,
        PropSize::Eight => value,
    };
    s.set_cdw(10, size.attrib());
    s.set_cdw(11, offset);
    s.set_cdw(12, value as u32);
    s.set_cdw(13, (value >> 32) as u32);
    s
}

/// The fields of a Property Get command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertyGet {
    /// Access size.
    pub size: PropSize,
    /// Property offset.
    pub offset: u32,
}

impl PropertyGet {
    /// Reads a Property Get: Invalid Command Opcode if `sqe` is not one, Invalid Field in
    /// Command for a reserved size.
    pub fn from_sqe(sqe: &Sqe) -> Result<PropertyGet, Status> {
        if fctype_of(sqe) != Some(fctype::PROPERTY_GET) {
            return Err(Status::INVALID_OPCODE);
        }
        Ok(PropertyGet {
            size: PropSize::from_cdw10(sqe.cdw(10)).ok_or(Status::INVALID_FIELD)?,
            offset: sqe.cdw(11),
        })
    }
}

/// The fields of a Property Set command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertySet {
    /// Access size.
    pub size: PropSize,
    /// Property offset.
    pub offset: u32,
    /// Value (only the low 32 bits for a 4-byte set).
    pub value: u64,
}

impl PropertySet {
    /// Reads a Property Set: Invalid Command Opcode if `sqe` is not one, Invalid Field in
    /// Command for a reserved size.
    pub fn from_sqe(sqe: &Sqe) -> Result<PropertySet, Status> {
        if fctype_of(sqe) != Some(fctype::PROPERTY_SET) {
            return Err(Status::INVALID_OPCODE);
        }
        let size = PropSize::from_cdw10(sqe.cdw(10)).ok_or(Status::INVALID_FIELD)?;
        let lo = u64::from(sqe.cdw(12));
        let value = match size {
            PropSize::Four => lo,
            PropSize::Eight => lo | (u64::from(sqe.cdw(13)) << 32),
        };
        Ok(PropertySet {
            size,
            offset: sqe.cdw(11),
            value,
        })
    }
}

/// The successful completion of a Property Get for `cid`: the value in CQE dwords 0 (low) and
/// 1 (high).
pub fn property_get_response(cid: u16, value: u64) -> Cqe {
    let mut c = Cqe::new(cid, Status::SUCCESS);
    c.set_dw0(value as u32);
    c.dw1 = ((value >> 32) as u32).to_le();
    c
}

/// The value returned by a Property Get (CQE dwords 0 and 1).
pub fn property_value(cqe: &Cqe) -> u64 {
    u64::from(cqe.dw0()) | (u64::from(u32::from_le(cqe.dw1)) << 32)
}

// ---------------------------------------------------------------------------------------------
// Discovery log page.

/// Log identifier of the Discovery log page.
pub const LOG_DISCOVERY: u8 = 0x70;
/// The well-known NQN of discovery subsystems.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Size of the Discovery log page header.
pub const DISC_HDR_LEN: usize = 1024;
/// Size of one Discovery log page entry.
pub const DISC_ENTRY_LEN: usize = 1024;

/// Transport types (TRTYPE).
pub mod trtype {
    /// RDMA.
    pub const RDMA: u8 = 1;
    /// Fibre Channel.
    pub const FC: u8 = 2;
    /// TCP.
    pub const TCP: u8 = 3;
}

/// Address families (ADRFAM).
pub mod adrfam {
    /// IPv4.
    pub const IPV4: u8 = 1;
    /// IPv6.
    pub const IPV6: u8 = 2;
}

/// Subsystem types (SUBTYPE).
pub mod subtype {
    /// A referral to another discovery subsystem.
    pub const REFERRAL: u8 = 1;
    /// An NVM subsystem.
    pub const NVME: u8 = 2;
    /// The discovery subsystem being queried.
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// Transport requirements (TREQ).
pub mod treq {
    /// Secure channel requirement not specified (bits 1:0 = 0).
    pub const SECURE_NOT_SPECIFIED: u8 = 0;
    /// Secure channel required (bits 1:0 = 1).
    pub const SECURE_REQUIRED: u8 = 1;
    /// Secure channel not required (bits 1:0 = 2).
    pub const SECURE_NOT_REQUIRED: u8 = 2;
    /// Bit 2: SQ flow control may be disabled.
    pub const DISABLE_SQFLOW: u8 = 1 << 2;
}

/// TCP security types (TSAS byte 0, SECTYPE).
pub mod sectype {
    /// No security.
    pub const NONE: u8 = 0;
    /// TLS 1.2.
    pub const TLS12: u8 = 1;
    /// TLS 1.3.
    pub const TLS13: u8 = 2;
}

/// The Discovery log page header (NVMe-oF 1.1, section 5.3, figure "Discovery Log Page").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DiscoveryHeader {
    /// GENCTR: generation counter, changed whenever the log changes.
    pub genctr: u64,
    /// NUMREC: number of records.
    pub numrec: u64,
    /// RECFMT: record format, 0.
    pub recfmt: u16,
}

impl DiscoveryHeader {
    /// The 1024 wire bytes.
    pub fn encode(&self) -> [u8; DISC_HDR_LEN] {
        let mut b = [0u8; DISC_HDR_LEN];
        wr(&mut b, 0, &self.genctr.to_le_bytes());
        wr(&mut b, 8, &self.numrec.to_le_bytes());
        wr(&mut b, 16, &self.recfmt.to_le_bytes());
        b
    }
    /// From at least the first 18 bytes of the log page (the rest of the header is reserved).
    pub fn decode(buf: &[u8]) -> Result<DiscoveryHeader, FabricsError> {
        if buf.len() < 18 {
            return Err(FabricsError::Short {
                need: 18,
                got: buf.len(),
            });
        }
        Ok(DiscoveryHeader {
            genctr: rd64(buf, 0),
            numrec: rd64(buf, 8),
            recfmt: rd16(buf, 16),
        })
    }
}

/// One Discovery log page entry (NVMe-oF 1.1, section 5.3, figure "Discovery Log Page Entry").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DiscoveryEntry<'a> {
    /// TRTYPE (see [`trtype`]).
    pub trtype: u8,
    /// ADRFAM (see [`adrfam`]).
    pub adrfam: u8,
    /// SUBTYPE (see [`subtype`]).
    pub subtype: u8,
    /// TREQ (see [`treq`]).
    pub treq: u8,
    /// PORTID: the NVM subsystem port.
    pub portid: u16,
    /// CNTLID: [`CNTLID_DYNAMIC`] for the dynamic controller model.
    pub cntlid: u16,
    /// ASQSZ: maximum admin submission queue size.
    pub asqsz: u16,
    /// EFLAGS: entry flags.
    pub eflags: u16,
    /// TRSVCID: transport service identifier (the TCP port, in decimal), at most 32 ASCII
    /// bytes; sent space-padded.
    pub trsvcid: &'a str,
    /// TRADDR: transport address (an IP address), at most 256 ASCII bytes; sent space-padded.
    pub traddr: &'a str,
    /// SUBNQN: the subsystem's NQN, sent NUL-padded.
    pub subnqn: &'a str,
    /// For TCP, TSAS byte 0: SECTYPE (see [`sectype`]).
    pub sectype: u8,
}

impl<'a> DiscoveryEntry<'a> {
    /// An NVMe/TCP entry without a secure channel, for the dynamic controller model with a
    /// 32-entry admin queue.
    pub fn tcp(
        subtype: u8,
        adrfam: u8,
        traddr: &'a str,
        trsvcid: &'a str,
        subnqn: &'a str,
        portid: u16,
    ) -> DiscoveryEntry<'a> {
        DiscoveryEntry {
            trtype: trtype::TCP,
            adrfam,
            subtype,
            treq: treq::SECURE_NOT_REQUIRED,
            portid,
            cntlid: CNTLID_DYNAMIC,
            asqsz: 32,
            eflags: 0,
            trsvcid,
            traddr,
            subnqn,
            sectype: sectype::NONE,
        }
    }
    /// Checks that the strings fit their fields: TRSVCID and TRADDR ASCII without NULs, at
    /// most 32 and 256 bytes; SUBNQN non-empty, without NULs, at most 255 bytes.
    pub fn validate(&self) -> Result<(), FabricsError> {
        check_ascii(self.trsvcid, Field::TrSvcId)?;
        check_ascii(self.traddr, Field::TrAddr)?;
        check_nqn(self.subnqn, Field::EntrySubNqn)
    }
    /// The 1024 wire bytes.
    pub fn encode(&self) -> Result<[u8; DISC_ENTRY_LEN], FabricsError> {
        self.validate()?;
        let mut b = [0u8; DISC_ENTRY_LEN];
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        wr(&mut b, 4, &self.portid.to_le_bytes());
        wr(&mut b, 6, &self.cntlid.to_le_bytes());
        wr(&mut b, 8, &self.asqsz.to_le_bytes());
        wr(&mut b, 10, &self.eflags.to_le_bytes());
        write_padded(
            b.get_mut(32..64).unwrap_or(&mut []),
            self.trsvcid.as_bytes(),
            b' ',
        );
        // NVMe-oF 1.1, figure 38: SUBNQN at 511:256, TRADDR at 767:512.
        write_nqn(
            b.get_mut(256..512).unwrap_or(&mut []),
            self.subnqn,
            Field::EntrySubNqn,
        )?;
        write_padded(
            b.get_mut(512..768).unwrap_or(&mut []),
            self.traddr.as_bytes(),
            b' ',
        );
        b[768] = self.sectype;
        Ok(b)
    }
    /// Parses an entry (at least 1024 bytes), borrowing the strings from `rec`. TRSVCID and
    /// TRADDR end at the first NUL with trailing spaces trimmed and must be ASCII; SUBNQN ends
    /// at the first NUL (or fills its 256 bytes) and must be non-empty UTF-8.
    pub fn decode(rec: &'a [u8]) -> Result<DiscoveryEntry<'a>, FabricsError> {
        let b = rec
            .first_chunk::<DISC_ENTRY_LEN>()
            .ok_or(FabricsError::Short {
                need: DISC_ENTRY_LEN,
                got: rec.len(),
            })?;
        let trsvcid = read_padded_ascii(field_of::<32>(b, 32), Field::TrSvcId)?;
        let traddr = read_padded_ascii(field_of::<256>(b, 512), Field::TrAddr)?;
        let nqn = field_of::<256>(b, 256);
        let end = nqn.iter().position(|&c| c == 0).unwrap_or(nqn.len());
        let nqn = nqn.get(..end).unwrap_or(&[]);
        if nqn.is_empty() {
            return Err(FabricsError::Empty(Field::EntrySubNqn));
        }
        Ok(DiscoveryEntry {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: rd16(b, 4),
            cntlid: rd16(b, 6),
            asqsz: rd16(b, 8),
            eflags: rd16(b, 10),
            trsvcid,
            traddr,
            subnqn: core::str::from_utf8(nqn)
                .map_err(|_| FabricsError::NotUtf8(Field::EntrySubNqn))?,
            sectype: b[768],
        })
    }
}

/// Length in bytes of a Discovery log page with `n` entries.
pub fn discovery_log_len(n: usize) -> Option<u64> {
    (n as u64)
        .checked_add(1)?
        .checked_mul(DISC_ENTRY_LEN as u64)
}

/// Writes bytes `offset .. offset + out.len()` of the Discovery log page made of a header with
/// `genctr` and NUMREC = `entries.len()`, followed by `entries`, as Get Log Page returns them
/// for any offset and length. Bytes past the end of the log are zero. Every entry is validated
/// whether or not it falls in the window, so the result does not depend on the window.
pub fn encode_discovery_log(
    genctr: u64,
    entries: &[DiscoveryEntry<'_>],
    offset: u64,
    out: &mut [u8],
) -> Result<(), FabricsError> {
    for e in entries {
        e.validate()?;
    }
    out.fill(0);
    let total = discovery_log_len(entries.len()).ok_or(FabricsError::Overflow)?;
    let end = offset
        .checked_add(out.len() as u64)
        .ok_or(FabricsError::Overflow)?
        .min(total);
    if offset >= end {
        return Ok(());
    }
    let rec = DISC_ENTRY_LEN as u64;
    let first = offset / rec;
    let last = end.div_ceil(rec); // exclusive, at most entries.len() + 1
    for r in first..last {
        let bytes = if r == 0 {
            DiscoveryHeader {
                genctr,
                numrec: entries.len() as u64,
                recfmt: 0,
            }
            .encode()
        } else {
            let e = usize::try_from(r - 1)
                .ok()
                .and_then(|i| entries.get(i))
                .ok_or(FabricsError::Overflow)?;
            e.encode()?
        };
        let rec_start = r * rec;
        let from = offset.max(rec_start);
        let to = end.min(rec_start + rec);
        // All of these are below 1024 or below out.len(), so they fit in usize.
        let src = bytes.get((from - rec_start) as usize..(to - rec_start) as usize);
        let dst = out.get_mut((from - offset) as usize..(to - offset) as usize);
        if let (Some(src), Some(dst)) = (src, dst) {
            dst.copy_from_slice(src);
        }
    }
    Ok(())
}

/// Parses a Discovery log page: its header and an iterator over the entries present in `log`
/// (at most NUMREC, fewer if `log` was read only in part).
pub fn decode_discovery_log(
    log: &[u8],
) -> Result<(DiscoveryHeader, DiscoveryEntries<'_>), FabricsError> {
    let hdr = DiscoveryHeader::decode(log)?;
    let present = (log.len() / DISC_ENTRY_LEN).saturating_sub(1) as u64;
    Ok((
        hdr,
        DiscoveryEntries {
            log,
            next: 0,
            count: hdr.numrec.min(present),
        },
    ))
}

/// Iterator over the entries of a Discovery log page (see [`decode_discovery_log`]).
#[derive(Clone, Debug)]
pub struct DiscoveryEntries<'a> {
    log: &'a [u8],
    next: u64,
    count: u64,
}

impl<'a> Iterator for DiscoveryEntries<'a> {
    type Item = Result<DiscoveryEntry<'a>, FabricsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count {
            return None;
        }
        let start = usize::try_from(self.next + 1)
            .ok()?
            .checked_mul(DISC_ENTRY_LEN)?;
        self.next += 1;
        Some(DiscoveryEntry::decode(self.log.get(start..).unwrap_or(&[])))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::try_from(self.count.saturating_sub(self.next)).unwrap_or(usize::MAX);
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0c468c4d-a385-47e0-8299-6e95051277db";
    const SUBNQN: &str = "nqn.2024-01.io.leap:vol0";

    #[test]
    fn connect_sqe_wire_layout() {
        let s = connect_sqe(0x1234, 3, 127, 15000);
        let b = pdu::sqe_to_bytes(&s);
        assert_eq!(b[0], 0x7f);
        assert_eq!(b[1] >> 6, 0b01, "PSDT: SGL");
        assert_eq!(&b[2..4], &0x1234u16.to_le_bytes());
        assert_eq!(b[4], fctype::CONNECT);
        assert_eq!(&b[24..32], &[0; 8], "SGL offset 0");
        assert_eq!(&b[32..36], &1024u32.to_le_bytes());
        assert_eq!(b[39], 0x01, "Data Block, Offset subtype");
        assert_eq!(&b[40..42], &[0, 0], "RECFMT");
        assert_eq!(&b[42..44], &3u16.to_le_bytes(), "QID");
        assert_eq!(&b[44..46], &127u16.to_le_bytes(), "SQSIZE");
        assert_eq!(b[46], 0, "CATTR");
        assert_eq!(&b[48..52], &15000u32.to_le_bytes(), "KATO");
        let c = ConnectCmd::from_sqe(&s).unwrap();
        assert_eq!(
            (c.cid, c.qid, c.sqsize, c.kato, c.entries(), c.is_admin()),
            (0x1234, 3, 127, 15000, 128, false)
        );
        assert_eq!(c.to_sqe(), s);
        assert_eq!(c.validate(1023), Ok(()));
        assert_eq!(fctype_of(&s), Some(fctype::CONNECT));
        assert_eq!(ConnectCmd::from_sqe(&disconnect_sqe(1)), None);
        assert_eq!(ConnectCmd::from_sqe(&Sqe::new(0x06, 1)), None);
    }

    #[test]
    fn connect_validation() {
        let c = ConnectCmd::from_sqe(&connect_sqe(1, 0, 31, 0)).unwrap();
        assert!(c.is_admin());
        let bad = ConnectCmd { recfmt: 1, ..c };
        assert_eq!(
            bad.validate(31).unwrap_err().status,
            CONNECT_INCOMPATIBLE_FORMAT
        );
        let bad = ConnectCmd { sqsize: 0, ..c };
        let r = bad.validate(31).unwrap_err();
        assert_eq!(r.status, CONNECT_INVALID_PARAMETERS);
        assert_eq!(r.dw0, 44);
        assert_eq!(c.validate(30).unwrap_err().dw0, 44);
        let bad = ConnectCmd {
            sgl: pdu::icd_sgl(512),
            ..c
        };
        assert_eq!(
            bad.validate(31).unwrap_err().status,
            Status::SGL_LENGTH_INVALID
        );
        let cqe = ConnectReject::invalid_sqe_field(connect_sqe_field::QID).cqe(9);
        assert_eq!(
            ConnectResult::from_cqe(&cqe),
            ConnectResult::InvalidParameters { ipo: 42, iattr: 0 }
        );
        assert!(cqe.status().dnr());
        assert_eq!((cqe.status().sct(), cqe.status().sc()), (1, 0x82));
    }

    #[test]
    fn connect_through_a_capsule() {
        // The whole Connect as it travels: CapsuleCmd with 1024 bytes of in-capsule data.
        let p = pdu::Params::default();
        let sqe = connect_sqe(7, 0, 31, 30000);
        let data = ConnectData {
            hostid: [0xab; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: SUBNQN,
            hostnqn: HOSTNQN,
        }
        .encode()
        .unwrap();
        let h = pdu::encode_capsule_cmd(&sqe, 1024, &p).unwrap();
        let mut wire = h.as_bytes().to_vec();
        wire.extend_from_slice(&data);
        let ch = pdu::CommonHeader::from_prefix(&wire).unwrap();
        let limits = pdu::Limits {
            max_icd: pdu::ADMIN_MAX_ICD,
            max_plen: 1 << 16,
        };
        let l = pdu::check(&ch, pdu::Role::Controller, &p, &limits).unwrap();
        let got = pdu::decode_capsule_cmd(&wire[..l.header_len]).unwrap();
        assert_eq!(pdu::check_in_capsule(&got, &l), Ok(()));
        let cmd = ConnectCmd::from_sqe(&got).unwrap();
        assert_eq!(cmd.validate(31), Ok(()));
        let d = ConnectData::decode(&wire[l.data_offset()..]).unwrap();
        assert_eq!((d.subnqn, d.hostnqn, d.cntlid), (SUBNQN, HOSTNQN, 0xffff));
        let resp = connect_response(cmd.cid, 1);
        assert_eq!(
            ConnectResult::from_cqe(&resp),
            ConnectResult::Accepted {
                cntlid: 1,
                authreq: 0
            }
        );
    }

    #[test]
    fn connect_data_layout_and_errors() {
        let d = ConnectData {
            hostid: *b"0123456789abcdef",
            cntlid: 0x0102,
            subnqn: SUBNQN,
            hostnqn: HOSTNQN,
        };
        let b = d.encode().unwrap();
        assert_eq!(&b[..16], b"0123456789abcdef");
        assert_eq!(&b[16..18], &[2, 1]);
        assert!(b[18..256].iter().all(|&c| c == 0));
        assert_eq!(&b[256..256 + SUBNQN.len()], SUBNQN.as_bytes());
        assert!(b[256 + SUBNQN.len()..512].iter().all(|&c| c == 0));
        assert_eq!(&b[512..512 + HOSTNQN.len()], HOSTNQN.as_bytes());
        assert!(b[768..].iter().all(|&c| c == 0));
        assert_eq!(ConnectData::decode(&b), Ok(d));

        let mut bad = b;
        bad[256..512].fill(b'a');
        let e = ConnectData::decode(&bad).unwrap_err();
        assert_eq!(e, FabricsError::Unterminated(Field::SubNqn));
        assert_eq!(e.connect_reject().dw0, (1 << 16) | 256);
        let mut bad = b;
        bad[512] = 0;
        let e = ConnectData::decode(&bad).unwrap_err();
        assert_eq!(e, FabricsError::Empty(Field::HostNqn));
        assert_eq!(e.connect_reject(), ConnectReject::invalid_data_field(512));
        let mut bad = b;
        bad[513] = 0xff;
        assert_eq!(
            ConnectData::decode(&bad),
            Err(FabricsError::NotUtf8(Field::HostNqn))
        );
        let e = ConnectData::decode(&b[..1023]).unwrap_err();
        assert_eq!(
            e,
            FabricsError::Short {
                need: 1024,
                got: 1023
            }
        );
        assert_eq!(e.connect_reject().status, Status::SGL_LENGTH_INVALID);
        // A 255-byte NQN fits exactly; 256 does not.
        let long = "n".repeat(255);
        let d2 = ConnectData { subnqn: &long, ..d };
        assert_eq!(
            ConnectData::decode(&d2.encode().unwrap()).unwrap().subnqn,
            long
        );
        let too_long = "n".repeat(256);
        assert_eq!(
            ConnectData {
                hostnqn: &too_long,
                ..d
            }
            .encode(),
            Err(FabricsError::TooLong {
                field: Field::HostNqn,
                len: 256,
                max: 255
            })
        );
        assert_eq!(
            ConnectData { subnqn: "", ..d }.encode(),
            Err(FabricsError::Empty(Field::SubNqn))
        );
        assert_eq!(
            ConnectData {
                subnqn: "a\0b",
                ..d
            }
            .encode(),
            Err(FabricsError::EmbeddedNul(Field::SubNqn))
        );
        let invalid_host = ConnectReject::invalid_host().cqe(3);
        assert_eq!(
            (invalid_host.status().sct(), invalid_host.status().sc()),
            (1, 0x84)
        );
        assert_eq!(
            ConnectResult::from_cqe(&invalid_host),
            ConnectResult::Failed(CONNECT_INVALID_HOST)
        );
        assert_eq!(CONNECT_RESTART_DISCOVERY.sc(), 0x83);
        assert_eq!(invalid_param_dw0(0x204, true), 0x0001_0204);
        assert_eq!(connect_success_dw0(0xfffe), 0xfffe);
    }

    #[test]
    fn property_get_and_set() {
        let s = property_get_sqe(5, reg::CAP, PropSize::Eight);
        let b = pdu::sqe_to_bytes(&s);
        assert_eq!((b[0], b[4], b[40], b[44]), (0x7f, 0x04, 1, 0x00));
        assert_eq!(
            PropertyGet::from_sqe(&s),
            Ok(PropertyGet {
                size: PropSize::Eight,
                offset: 0
            })
        );
        let s = property_get_sqe(5, reg::CSTS, PropSize::Four);
        assert_eq!(PropertyGet::from_sqe(&s).unwrap().offset, 0x1c);
        let mut bad = s;
        bad.set_cdw(10, 2);
        assert_eq!(PropertyGet::from_sqe(&bad), Err(Status::INVALID_FIELD));
        assert_eq!(
            PropertyGet::from_sqe(&property_set_sqe(1, 0, PropSize::Four, 0)),
            Err(Status::INVALID_OPCODE)
        );

        let v = 0x0123_4567_89ab_cdef;
        let s = property_set_sqe(6, reg::CC, PropSize::Four, v);
        let b = pdu::sqe_to_bytes(&s);
        assert_eq!((b[4], b[40], b[44]), (0x00, 0, 0x14));
        assert_eq!(&b[48..52], &0x89ab_cdefu32.to_le_bytes());
        assert_eq!(&b[52..56], &[0; 4]);
        assert_eq!(
            PropertySet::from_sqe(&s),
            Ok(PropertySet {
                size: PropSize::Four,
                offset: 0x14,
                value: 0x89ab_cdef
            })
        );
        let s = property_set_sqe(6, 0x40, PropSize::Eight, v);
        assert_eq!(PropertySet::from_sqe(&s).unwrap().value, v);

        let c = property_get_response(5, v);
        let cb = pdu::cqe_to_bytes(&c);
        assert_eq!(&cb[0..4], &0x89ab_cdefu32.to_le_bytes());
        assert_eq!(&cb[4..8], &0x0123_4567u32.to_le_bytes());
        assert_eq!(property_value(&c), v);
        assert_eq!(property_size(reg::CAP), Some(PropSize::Eight));
        assert_eq!(property_size(reg::VS), Some(PropSize::Four));
        assert_eq!(property_size(reg::NSSR).map(PropSize::bytes), Some(4));
        assert_eq!(property_size(0x0c), None);
    }

    fn entries() -> Vec<DiscoveryEntry<'static>> {
        vec![
            DiscoveryEntry::tcp(
                subtype::CURRENT_DISCOVERY,
                adrfam::IPV4,
                "127.0.0.1",
                "8009",
                DISCOVERY_NQN,
                1,
            ),
            DiscoveryEntry::tcp(subtype::NVME, adrfam::IPV4, "127.0.0.1", "4420", SUBNQN, 1),
            DiscoveryEntry {
                eflags: 3,
                sectype: sectype::TLS13,
                treq: treq::SECURE_REQUIRED | treq::DISABLE_SQFLOW,
                cntlid: 7,
                ..DiscoveryEntry::tcp(subtype::NVME, adrfam::IPV6, "::1", "4421", "nqn.x:y", 2)
            },
        ]
    }

    #[test]
    fn discovery_log_round_trip() {
        let es = entries();
        let len = discovery_log_len(es.len()).unwrap() as usize;
        assert_eq!(len, 4096);
        let mut log = vec![0xeeu8; len + 100];
        encode_discovery_log(42, &es, 0, &mut log).unwrap();
        assert!(log[len..].iter().all(|&c| c == 0), "past the end is zero");
        assert_eq!(&log[0..8], &42u64.to_le_bytes());
        assert_eq!(&log[8..16], &3u64.to_le_bytes());
        let e1 = &log[2048..3072];
        assert_eq!(&e1[..4], &[3, 1, 2, 2]);
        assert_eq!(&e1[6..8], &[0xff, 0xff]);
        assert_eq!(&e1[32..36], b"4420");
        assert!(
            e1[36..64].iter().all(|&c| c == b' '),
            "TRSVCID space padded"
        );
        assert_eq!(&e1[512..521], b"127.0.0.1");
        assert!(
            e1[521..768].iter().all(|&c| c == b' '),
            "TRADDR space padded"
        );
        assert!(
            e1[256 + SUBNQN.len()..512].iter().all(|&c| c == 0),
            "SUBNQN NUL padded"
        );
        assert_eq!(e1[768], sectype::NONE);

        let (hdr, it) = decode_discovery_log(&log).unwrap();
        assert_eq!(
            hdr,
            DiscoveryHeader {
                genctr: 42,
                numrec: 3,
                recfmt: 0
            }
        );
        assert_eq!(it.size_hint(), (3, Some(3)));
        let back: Vec<_> = it.collect::<Result<_, _>>().unwrap();
        assert_eq!(back, es);

        // A partial read yields only the entries it holds.
        let (_, it) = decode_discovery_log(&log[..2048]).unwrap();
        assert_eq!(it.count(), 1);
        // A Linux-style NUL-padded TRADDR decodes too.
        let mut linux = log[1024..2048].to_vec();
        linux[256 + 9..512].fill(0);
        linux[32 + 4..64].fill(0);
        let e = DiscoveryEntry::decode(&linux).unwrap();
        assert_eq!((e.traddr, e.trsvcid), ("127.0.0.1", "8009"));
    }

    #[test]
    fn discovery_log_windows_and_errors() {
        let es = entries();
        let mut full = vec![0u8; 4096];
        encode_discovery_log(1, &es, 0, &mut full).unwrap();
        for (off, n) in [
            (0u64, 20usize),
            (1020, 8),
            (3000, 2000),
            (4096, 16),
            (9999, 4),
        ] {
            let mut w = vec![0xaau8; n];
            encode_discovery_log(1, &es, off, &mut w).unwrap();
            for (i, &c) in w.iter().enumerate() {
                let at = off as usize + i;
                assert_eq!(c, full.get(at).copied().unwrap_or(0), "offset {at}");
            }
        }
        let mut w = [0u8; 8];
        assert_eq!(
            encode_discovery_log(1, &es, u64::MAX - 2, &mut w),
            Err(FabricsError::Overflow)
        );
        let bad = [DiscoveryEntry::tcp(
            2,
            1,
            "1.2.3.4",
            "123456789012345678901234567890123",
            SUBNQN,
            1,
        )];
        assert_eq!(
            encode_discovery_log(0, &bad, 0, &mut w),
            Err(FabricsError::TooLong {
                field: Field::TrSvcId,
                len: 33,
                max: 32
            }),
            "validated even outside the window"
        );
        let bad = [DiscoveryEntry::tcp(2, 1, "héhé", "1", SUBNQN, 1)];
        assert_eq!(bad[0].encode(), Err(FabricsError::NotAscii(Field::TrAddr)));
        assert_eq!(
            DiscoveryHeader::decode(&[0; 17]),
            Err(FabricsError::Short { need: 18, got: 17 })
        );
        let mut rec = es[1].encode().unwrap();
        rec[256] = 0;
        assert_eq!(
            DiscoveryEntry::decode(&rec),
            Err(FabricsError::Empty(Field::EntrySubNqn))
        );
        rec[512] = 0x80;
        assert_eq!(
            DiscoveryEntry::decode(&rec),
            Err(FabricsError::NotAscii(Field::TrAddr))
        );
        assert_eq!(
            format!("{}", FabricsError::Unterminated(Field::HostNqn)),
            "HOSTNQN is not NUL-terminated within its field"
        );
    }

    fn nqn() -> impl Strategy<Value = String> {
        "[a-z0-9.:-]{1,255}"
    }

    proptest! {
        #[test]
        fn connect_data_identity(
            hostid in any::<[u8; 16]>(),
            cntlid in any::<u16>(),
            sub in nqn(),
            host in nqn(),
        ) {
            let d = ConnectData { hostid, cntlid, subnqn: &sub, hostnqn: &host };
            let b = d.encode().unwrap();
            prop_assert_eq!(ConnectData::decode(&b).unwrap(), d);
        }

        #[test]
        fn connect_cmd_identity(
            cid in any::<u16>(), qid in any::<u16>(), sqsize in any::<u16>(),
            cattr in any::<u8>(), kato in any::<u32>(), recfmt in any::<u16>(),
            len in any::<u32>(),
        ) {
            let c = ConnectCmd { cid, recfmt, qid, sqsize, cattr, kato, sgl: pdu::icd_sgl(len) };
            prop_assert_eq!(ConnectCmd::from_sqe(&c.to_sqe()), Some(c));
            let via_bytes = pdu::sqe_from_bytes(&pdu::sqe_to_bytes(&c.to_sqe()));
            prop_assert_eq!(ConnectCmd::from_sqe(&via_bytes), Some(c));
        }

        #[test]
        fn property_identity(cid in any::<u16>(), off in any::<u32>(), v in any::<u64>(), eight in any::<bool>()) {
            let size = if eight { PropSize::Eight } else { PropSize::Four };
            let g = PropertyGet::from_sqe(&property_get_sqe(cid, off, size)).unwrap();
            prop_assert_eq!(g, PropertyGet { size, offset: off });
            let s = PropertySet::from_sqe(&property_set_sqe(cid, off, size, v)).unwrap();
            let want = if eight { v } else { v & 0xffff_ffff };
            prop_assert_eq!(s, PropertySet { size, offset: off, value: want });
            prop_assert_eq!(property_value(&property_get_response(cid, v)), v);
        }

        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..3100)) {
            let _ = ConnectData::decode(&buf);
            let _ = DiscoveryEntry::decode(&buf);
            if let Ok((_, it)) = decode_discovery_log(&buf) {
                for e in it {
                    let _ = e;
                }
            }
            let mut sqe_bytes = [0u8; 64];
            for (d, s) in sqe_bytes.iter_mut().zip(&buf) {
                *d = *s;
            }
            let sqe = pdu::sqe_from_bytes(&sqe_bytes);
            let _ = ConnectCmd::from_sqe(&sqe).map(|c| c.validate(1023));
            let _ = PropertyGet::from_sqe(&sqe);
            let _ = PropertySet::from_sqe(&sqe);
        }

        #[test]
        fn discovery_windows_match_the_full_log(
            n in 0usize..4,
            genctr in any::<u64>(),
            off in 0u64..6000,
            len in 0usize..3000,
        ) {
            let es: Vec<_> = entries().into_iter().cycle().take(n).collect();
            let total = discovery_log_len(n).unwrap() as usize;
            let mut full = vec![0u8; total];
            encode_discovery_log(genctr, &es, 0, &mut full).unwrap();
            let mut w = vec![0x55u8; len];
            encode_discovery_log(genctr, &es, off, &mut w).unwrap();
            for (i, &c) in w.iter().enumerate() {
                prop_assert_eq!(c, full.get(off as usize + i).copied().unwrap_or(0));
            }
            let (h, it) = decode_discovery_log(&full).unwrap();
            prop_assert_eq!(h.genctr, genctr);
            let back: Vec<_> = it.collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(back, es);
        }

        #[test]
        fn discovery_entry_identity(
            head in any::<(u8, u8, u8, u8, u16, u16, u16, u16, u8)>(),
            traddr in "[0-9a-f.:]{0,256}",
            trsvcid in "[0-9]{0,32}",
            sub in nqn(),
        ) {
            let e = DiscoveryEntry {
                trtype: head.0, adrfam: head.1, subtype: head.2, treq: head.3,
                portid: head.4, cntlid: head.5, asqsz: head.6, eflags: head.7,
                trsvcid: &trsvcid, traddr: &traddr, subnqn: &sub, sectype: head.8,
            };
            let b = e.encode().unwrap();
            prop_assert_eq!(DiscoveryEntry::decode(&b).unwrap(), e);
        }
    }
}
