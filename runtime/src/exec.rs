//! Executes NVMe I/O commands against a namespace: checks every field a front end or a peer
//! controls (namespace, LBA range, data pointer, lengths) and turns the command into back-end
//! operations whose buffers point straight into guest memory.

use crate::addr::{AddrError, AddressSpace};
use crate::backend::{Backend, BackendQueue, DiskInfo, IoOp, IoRequest, Submitted, MAX_IOVECS};
use leap_queues::nvme::{
    io, psdt, sgl_subtype, sgl_type, DsmRange, DSM_ATTR_DEALLOCATE, DSM_MAX_RANGES,
};
use leap_queues::prp::walk_prps;
use leap_queues::sgl::{decode_descriptor, read_capsule_segment, walk_sgl};
use leap_queues::{SglDescriptor, Sqe, Status};
use std::sync::Arc;

/// The NVMe controller memory page size (CC.MPS) used to read PRPs: 4 KiB, as every NVMe host
/// programs it. This is an NVMe setting, not the CPU page size (which may be 16 or 64 KiB on ARM).
pub const NVME_PAGE_SIZE: u64 = 4096;

/// The most SGL descriptors one command may use, across all segments.
pub const MAX_SGL_DESCRIPTORS: usize = 512;

/// A namespace: a back end seen through NVMe (its size in blocks, whether it is writable).
pub struct Namespace {
    backend: Arc<dyn Backend>,
    info: DiskInfo,
    shift: u32,
    blocks: u64,
    /// The back end takes NVMe commands as they are.
    native: bool,
    /// Rate limits (none set: every command passes at the cost of one atomic load).
    throttle: crate::throttle::Throttle,
}

impl Namespace {
    /// The namespace of a back end.
    pub fn new(backend: Arc<dyn Backend>) -> Arc<Self> {
        Self::with_limits(backend, &crate::throttle::Limits::default())
    }
    /// The namespace of a back end, with rate limits on its reads and writes.
    pub fn with_limits(backend: Arc<dyn Backend>, limits: &crate::throttle::Limits) -> Arc<Self> {
        let info = backend.info().clone();
        Arc::new(Namespace {
            shift: info.block_shift(),
            blocks: info.blocks(),
            native: backend.nvme_native(),
            throttle: crate::throttle::Throttle::new(limits),
            info,
            backend,
        })
    }
    /// Changes the rate limits while the namespace serves.
    pub fn set_limits(&self, limits: &crate::throttle::Limits) {
        self.throttle.set(limits)
    }
    /// The rate limits in force.
    pub fn limits(&self) -> crate::throttle::Limits {
        self.throttle.limits()
    }
    /// The disk behind it.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }
    /// The back end.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Checks `slba .. slba + nlb` lies inside the namespace; returns the byte offset and length.
    fn range(&self, slba: u64, nlb: u64) -> Result<(u64, u64), Status> {
        match slba.checked_add(nlb) {
            Some(end) if end <= self.blocks => Ok((slba << self.shift, nlb << self.shift)),
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    }

    fn writable(&self) -> Result<(), Status> {
        if self.info.read_only {
            Err(Status::NS_WRITE_PROTECTED)
        } else {
            Ok(())
        }
    }
}

/// The namespaces commands on a queue pair may address: NSID `k` (1-based) is entry `k - 1`. A
/// vhost-user disk has one; a `leapd target` subsystem has one per exported disk. Entries may be
/// empty (an NSID that was detached), so NSIDs never shift.
#[derive(Clone, Default)]
pub struct Namespaces {
    list: Vec<Option<Arc<Namespace>>>,
}

impl Namespaces {
    /// NSIDs 1..=n for the given namespaces, in order.
    pub fn new(list: Vec<Arc<Namespace>>) -> Arc<Self> {
        Arc::new(Namespaces {
            list: list.into_iter().map(Some).collect(),
        })
    }
    /// A table with one namespace, NSID 1.
    pub fn single(ns: Arc<Namespace>) -> Arc<Self> {
        Self::new(vec![ns])
    }
    /// A table of at least `slots` NSIDs (room to attach namespaces later without changing the
    /// controller's NN) holding `list`: NSID `k + 1` is `list[k]`, `None` an empty slot.
    pub fn with_slots(mut list: Vec<Option<Arc<Namespace>>>, slots: usize) -> Arc<Self> {
        if list.len() < slots {
            list.resize(slots, None);
        }
        Arc::new(Namespaces { list })
    }
    /// The NSIDs whose namespace differs between `old` and `new` (attached, detached or
    /// replaced), each with whether `old` had one there.
    pub fn changed<'a>(
        old: &'a Namespaces,
        new: &'a Namespaces,
    ) -> impl Iterator<Item = (u32, bool)> + 'a {
        let slots = old.slots().max(new.slots());
        (1..=slots as u32).filter_map(move |nsid| {
            let (a, b) = (old.get(nsid), new.get(nsid));
            let same = match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            (!same).then_some((nsid, a.is_some()))
        })
    }
    /// A copy of this table with NSID `nsid` attached to `ns` (or detached, with `None`). None if
    /// `nsid` is outside the table.
    pub fn with(&self, nsid: u32, ns: Option<Arc<Namespace>>) -> Option<Arc<Self>> {
        let k = (nsid as usize).checked_sub(1)?;
        let mut list = self.list.clone();
        *list.get_mut(k)? = ns;
        Some(Arc::new(Namespaces { list }))
    }
    /// The namespace with this NSID, if it is active.
    pub fn get(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        let k = (nsid as usize).checked_sub(1)?;
        self.list.get(k)?.as_ref()
    }
    /// The highest NSID the table can hold (Identify Controller NN).
    pub fn max_nsid(&self) -> u32 {
        self.list.len() as u32
    }
    /// Active namespaces as (NSID, namespace), in increasing NSID order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Arc<Namespace>)> {
        self.list
            .iter()
            .enumerate()
            .filter_map(|(k, n)| n.as_ref().map(|n| (k as u32 + 1, n)))
    }
    /// Number of table slots (active or not); slot `k` is NSID `k + 1`.
    pub fn slots(&self) -> usize {
        self.list.len()
    }
}

/// The most parts a command is split into for a back end's transfer limit.
pub const MAX_SPLIT: u64 = 64;

/// Reusable scratch space for one poller: no allocation per command.
pub struct Scratch {
    iov: Vec<libc::iovec>,
    /// One part of a split command.
    part: Vec<libc::iovec>,
    ranges: Vec<u8>,
}

// SAFETY: the iovecs are plain addresses used only by the owning poller thread while it builds a
// request; nothing is shared.
unsafe impl Send for Scratch {}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            iov: Vec::with_capacity(MAX_IOVECS),
            part: Vec::with_capacity(MAX_IOVECS),
            ranges: vec![0; DSM_MAX_RANGES * 16],
        }
    }
}

/// How a started command continues.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// Finished now with this status.
    Done(Status),
    /// This many back-end operations are in flight for it (tagged with the command id); the
    /// status is an error some of its other operations already failed with, if any.
    Pending(u16, Option<Status>),
    /// A back-end queue it needs has no room: nothing was started; retry the same command later
    /// (before any command that arrived after it).
    Busy,
    /// The namespace's rate limit cannot pay for it now: nothing was started; retry it later,
    /// before later commands of the same kind (reads or writes). Commands of the other kind
    /// are not held up by it, as with qemu's throttle groups.
    Throttled,
}

/// The back-end queues of one queue pair, one per namespace slot (slot `k` is NSID `k + 1`; an
/// inactive namespace has none).
pub type BackendQueues = [Option<Box<dyn BackendQueue>>];

/// What the command is, for counting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush.
    Flush,
    /// Dataset Management.
    Discard,
    /// Write Zeroes.
    WriteZeroes,
    /// Anything else.
    #[default]
    Other,
}

/// The kind of an I/O opcode.
pub fn kind(opcode: u8) -> Kind {
    match opcode {
        io::READ => Kind::Read,
        io::WRITE => Kind::Write,
        io::FLUSH => Kind::Flush,
        io::DATASET_MANAGEMENT => Kind::Discard,
        io::WRITE_ZEROES => Kind::WriteZeroes,
        _ => Kind::Other,
    }
}

fn addr_status(e: AddrError) -> Status {
    match e {
        AddrError::TooManyPieces(_) => Status::INVALID_SGL_COUNT,
        _ => Status::DATA_TRANSFER_ERROR.with_dnr(),
    }
}

/// Starts I/O command `sqe` (whose capsule area is `capsule`) on the queues `bqs` of the
/// namespaces `nss`.
///
/// # Safety
/// `aspace` (and the memory it maps) and `capsule` must stay alive and in place until every
/// back-end operation started here completes: the back end reads and writes them through iovecs.
pub unsafe fn start(
    nss: &Namespaces,
    bqs: &mut BackendQueues,
    sqe: &Sqe,
    capsule: &[u8],
    aspace: &AddressSpace,
    scratch: &mut Scratch,
) -> Started {
    match start_inner(nss, bqs, sqe, capsule, aspace, scratch) {
        Ok(s) => s,
        Err(status) => Started::Done(status),
    }
}

/// The namespace `nsid` names and its back-end queue.
fn target<'a>(
    nss: &'a Namespaces,
    bqs: &'a mut BackendQueues,
    nsid: u32,
) -> Result<(&'a Namespace, &'a mut dyn BackendQueue), Status> {
    let ns = nss.get(nsid).ok_or(Status::INVALID_NAMESPACE)?;
    let bq = bqs
        .get_mut(nsid as usize - 1)
        .and_then(|q| q.as_deref_mut())
        .ok_or(Status::INVALID_NAMESPACE)?;
    Ok((ns, bq))
}

/// Submits one request (the caller checked `room`).
fn one(bq: &mut dyn BackendQueue, req: IoRequest<'_>) -> Started {
    // SAFETY: forwarded from `start`'s contract: the iovecs point into `aspace`'s memory or the
    // command's capsule, which the caller keeps alive until completion.
    match unsafe { bq.submit(&req) } {
        Submitted::Done(s) => Started::Done(s),
        Submitted::Queued => Started::Pending(1, None),
    }
}

fn start_inner(
    nss: &Namespaces,
    bqs: &mut BackendQueues,
    sqe: &Sqe,
    capsule: &[u8],
    aspace: &AddressSpace,
    scratch: &mut Scratch,
) -> Result<Started, Status> {
    let opcode = sqe.opcode();
    let nsid = sqe.nsid();
    if sqe.fuse() != 0 {
        return Err(Status::INVALID_FIELD);
    }
    let tag = sqe.cid() as u64;
    match opcode {
        io::FLUSH if nsid == 0xffff_ffff => {
            // Every namespace (NVM Command Set 1.0, 3.2.1): all queues must have room first.
            if bqs.iter().flatten().any(|q| q.room() == 0) {
                return Ok(Started::Busy);
            }
            let mut pending = 0u16;
            let mut first_err = None;
            for (k, q) in bqs.iter_mut().enumerate() {
                let (Some(q), Some(ns)) = (q.as_deref_mut(), nss.get(k as u32 + 1)) else {
                    continue;
                };
                let mut cmd = *sqe;
                cmd.set_nsid(k as u32 + 1);
                let req = IoRequest {
                    tag,
                    op: IoOp::Flush,
                    offset: 0,
                    len: 0,
                    iov: &[],
                    cmd: ns.native.then_some(&cmd),
                };
                match one(q, req) {
                    Started::Pending(n, _) => pending += n,
                    Started::Done(s) if !s.is_success() => first_err = first_err.or(Some(s)),
                    _ => {}
                }
            }
            Ok(settle(pending, first_err))
        }
        io::FLUSH => {
            let (ns, bq) = target(nss, bqs, nsid)?;
            if bq.room() == 0 {
                return Ok(Started::Busy);
            }
            let req = IoRequest {
                tag,
                op: IoOp::Flush,
                offset: 0,
                len: 0,
                iov: &[],
                cmd: ns.native.then_some(sqe),
            };
            Ok(one(bq, req))
        }
        io::READ | io::WRITE => {
            let (ns, bq) = target(nss, bqs, nsid)?;
            let (offset, len) = ns.range(sqe.slba(), sqe.nlb() as u64)?;
            let op = if opcode == io::READ {
                IoOp::Read
            } else {
                ns.writable()?;
                IoOp::Write { fua: sqe.fua() }
            };
            // A back end with a transfer limit (a remote controller's MDTS, a SoC window's
            // bounce slots) gets a larger command as several, each within the limit: the front
            // end then needs no segment limit below a guest's page size (Linux refuses a
            // max_segment_size under PAGE_SIZE, and Arm guests run 16 and 64 KiB pages).
            let max = ns.info.max_transfer as u64;
            let parts = if max > 0 { len.div_ceil(max) } else { 1 };
            if parts > MAX_SPLIT || parts as usize > bq.depth() {
                return Err(Status::INVALID_FIELD);
            }
            if (bq.room() as u64) < parts {
                return Ok(Started::Busy);
            }
            // Rate limits last, so tokens are only taken by a command that then starts.
            if !ns.throttle.admit(opcode == io::WRITE, len) {
                return Ok(Started::Throttled);
            }
            scratch.iov.clear();
            let iov = &mut scratch.iov;
            data_segments(sqe, capsule, aspace, len, |d| match d {
                Data::Guest(addr, l) => push_guest(aspace, iov, addr, l),
                // Read and Write data lives in guest memory, never in the capsule.
                Data::Capsule(..) => Err(Status::SGL_TYPE_INVALID),
            })?;
            if parts > 1 {
                let mut pending = 0u16;
                let mut first_err = None;
                let (mut k, mut off) = (0usize, 0usize);
                for i in 0..parts {
                    let plen = max.min(len - i * max);
                    // This part's iovecs: `plen` bytes from (k, off) of the whole list.
                    scratch.part.clear();
                    let mut left = plen as usize;
                    while left > 0 {
                        let v = scratch.iov[k];
                        let n = (v.iov_len - off).min(left);
                        scratch.part.push(libc::iovec {
                            // SAFETY: off < iov_len: inside the piece the executor translated.
                            iov_base: unsafe { v.iov_base.cast::<u8>().add(off) }.cast(),
                            iov_len: n,
                        });
                        left -= n;
                        off += n;
                        if off == v.iov_len {
                            k += 1;
                            off = 0;
                        }
                    }
                    let mut sub = *sqe;
                    sub.set_slba(sqe.slba() + ((i * max) >> ns.shift));
                    sub.set_nlb((plen >> ns.shift) as u32);
                    let req = IoRequest {
                        tag,
                        op,
                        offset: offset + i * max,
                        len: plen,
                        iov: &scratch.part,
                        cmd: ns.native.then_some(&sub),
                    };
                    match one(bq, req) {
                        Started::Pending(n, _) => pending += n,
                        Started::Done(s) if !s.is_success() => first_err = first_err.or(Some(s)),
                        _ => {}
                    }
                }
                return Ok(settle(pending, first_err));
            }
            let req = IoRequest {
                tag,
                op,
                offset,
                len,
                iov: &scratch.iov,
                cmd: ns.native.then_some(sqe),
            };
            Ok(one(bq, req))
        }
        io::WRITE_ZEROES => {
            let (ns, bq) = target(nss, bqs, nsid)?;
            ns.writable()?;
            let (offset, len) = ns.range(sqe.slba(), sqe.nlb() as u64)?;
            if bq.room() == 0 {
                return Ok(Started::Busy);
            }
            let req = IoRequest {
                tag,
                op: IoOp::WriteZeroes { unmap: sqe.deac() },
                offset,
                len,
                iov: &[],
                cmd: ns.native.then_some(sqe),
            };
            Ok(one(bq, req))
        }
        io::DATASET_MANAGEMENT => {
            let (ns, bq) = target(nss, bqs, nsid)?;
            let nr = (sqe.cdw(10) & 0xff) as usize + 1;
            if sqe.cdw(11) & DSM_ATTR_DEALLOCATE == 0 && !ns.native {
                // Only hints (integral read/write): nothing to do.
                return Ok(Started::Done(Status::SUCCESS));
            }
            ns.writable()?;
            let want = (nr * 16) as u64;
            // Linux sends the range list in a 4 KiB buffer whatever NR says (some devices read
            // the whole buffer), so a single data block may be longer than the ranges: read only
            // the ranges, as Linux nvmet does (transfer length at least the list's).
            let mut trimmed;
            let mut sqe = sqe;
            let d = sqe.sgl1();
            if sqe.psdt() != psdt::PRP
                && d.ty() == sgl_type::DATA_BLOCK
                && u64::from(d.len()) > want
                && d.len() as usize <= DSM_MAX_RANGES * 16
            {
                trimmed = *sqe;
                trimmed.set_sgl1(SglDescriptor::new(
                    d.ty(),
                    d.subtype(),
                    d.addr(),
                    want as u32,
                ));
                trimmed.set_psdt(sqe.psdt());
                sqe = &trimmed;
            }
            let buf = &mut scratch.ranges[..nr * 16];
            let iov = &mut scratch.iov;
            iov.clear();
            let mut filled = 0usize;
            data_segments(sqe, capsule, aspace, want, |d| {
                let l = match d {
                    Data::Guest(_, l) | Data::Capsule(_, l) => l as usize,
                };
                let dst = buf
                    .get_mut(filled..filled + l)
                    .ok_or(Status::SGL_LENGTH_INVALID)?;
                match d {
                    Data::Guest(addr, _) => {
                        aspace.read(addr, dst).map_err(addr_status)?;
                        if ns.native {
                            push_guest(aspace, iov, addr, l as u64)?;
                        }
                    }
                    Data::Capsule(off, _) => {
                        let o = usize::try_from(off).map_err(|_| Status::SGL_OFFSET_INVALID)?;
                        let src = capsule
                            .get(o..o.saturating_add(l))
                            .ok_or(Status::SGL_OFFSET_INVALID)?;
                        dst.copy_from_slice(src);
                        if ns.native {
                            if iov.len() == MAX_IOVECS {
                                return Err(Status::INVALID_SGL_COUNT);
                            }
                            // The back end only reads it (host-to-controller data).
                            iov.push(libc::iovec {
                                iov_base: src.as_ptr() as *mut _,
                                iov_len: l,
                            });
                        }
                    }
                }
                filled += l;
                Ok(())
            })?;
            // Check every range before starting any, so a bad list changes nothing.
            let mut ops = 0usize;
            for chunk in buf.chunks_exact(16) {
                let r = DsmRange::from_bytes(chunk.try_into().expect("16-byte chunk"));
                ns.range(r.slba(), r.nlb() as u64)?;
                ops += (r.nlb() != 0) as usize;
            }
            if ns.native {
                // One command carries the whole list to a back end that speaks NVMe.
                if bq.room() == 0 {
                    return Ok(Started::Busy);
                }
                let req = IoRequest {
                    tag,
                    op: IoOp::Discard,
                    offset: 0,
                    len: want,
                    iov: &scratch.iov,
                    cmd: Some(sqe),
                };
                return Ok(one(bq, req));
            }
            if bq.room() < ops {
                return Ok(Started::Busy);
            }
            let mut pending = 0u16;
            let mut first_err = None;
            for k in 0..nr {
                let chunk: &[u8; 16] = scratch.ranges[k * 16..k * 16 + 16]
                    .try_into()
                    .expect("16-byte chunk");
                let r = DsmRange::from_bytes(chunk);
                if r.nlb() == 0 {
                    continue;
                }
                let (offset, len) = ns.range(r.slba(), r.nlb() as u64)?;
                let req = IoRequest {
                    tag,
                    op: IoOp::Discard,
                    offset,
                    len,
                    iov: &[],
                    cmd: None,
                };
                match one(bq, req) {
                    Started::Pending(n, _) => pending += n,
                    Started::Done(s) if !s.is_success() => first_err = first_err.or(Some(s)),
                    _ => {}
                }
            }
            Ok(settle(pending, first_err))
        }
        _ => Err(Status::INVALID_OPCODE),
    }
}

/// The outcome of a command split into several back-end operations.
fn settle(pending: u16, first_err: Option<Status>) -> Started {
    match (pending, first_err) {
        (0, Some(s)) => Started::Done(s),
        (0, None) => Started::Done(Status::SUCCESS),
        (n, err) => Started::Pending(n, err),
    }
}

/// Appends the host pieces of guest range `addr .. addr + len` to `iov`.
fn push_guest(
    aspace: &AddressSpace,
    iov: &mut Vec<libc::iovec>,
    addr: u64,
    len: u64,
) -> Result<(), Status> {
    aspace
        .translate(addr, len, MAX_IOVECS - iov.len(), |p| {
            iov.push(libc::iovec {
                iov_base: p.host as *mut _,
                iov_len: p.len,
            })
        })
        .map_err(addr_status)?;
    Ok(())
}

/// A piece of a command's data: guest memory, or bytes of the command's capsule.
#[derive(Clone, Copy, Debug)]
enum Data {
    Guest(u64, u64),
    Capsule(u64, u64),
}

/// Walks the command's data pointer (PRP or SGL) for a transfer of `expected` bytes, calling
/// `each` with every piece in order. The walkers check every address, length and list bound and
/// that the pieces add up to `expected`.
fn data_segments(
    sqe: &Sqe,
    capsule: &[u8],
    aspace: &AddressSpace,
    expected: u64,
    mut each: impl FnMut(Data) -> Result<(), Status>,
) -> Result<(), Status> {
    if sqe.psdt() == psdt::PRP {
        walk_prps(
            sqe.prp1(),
            sqe.prp2(),
            expected,
            NVME_PAGE_SIZE,
            |list, out: &mut [u64]| {
                let mut bytes = [0u8; 8];
                for (k, e) in out.iter_mut().enumerate() {
                    let at = list
                        .checked_add(8 * k as u64)
                        .ok_or(Status::DATA_TRANSFER_ERROR)?;
                    aspace.read(at, &mut bytes).map_err(addr_status)?;
                    *e = u64::from_le_bytes(bytes);
                }
                Ok(())
            },
            |addr, len| each(Data::Guest(addr, len)),
        )?;
        return Ok(());
    }
    walk_sgl(
        sqe.sgl1(),
        expected,
        MAX_SGL_DESCRIPTORS,
        |seg: &SglDescriptor, out: &mut [SglDescriptor]| {
            if seg.subtype() == sgl_subtype::OFFSET {
                return read_capsule_segment(capsule, seg, out);
            }
            let mut raw = [0u8; 16];
            for (k, d) in out.iter_mut().enumerate() {
                let at = seg
                    .addr()
                    .checked_add(16 * k as u64)
                    .ok_or(Status::DATA_TRANSFER_ERROR)?;
                aspace.read(at, &mut raw).map_err(addr_status)?;
                *d = decode_descriptor(&raw);
            }
            Ok(out.len())
        },
        |d: &SglDescriptor| match (d.ty(), d.subtype()) {
            (sgl_type::DATA_BLOCK, sgl_subtype::ADDRESS) => {
                each(Data::Guest(d.addr(), d.len() as u64))
            }
            (sgl_type::DATA_BLOCK, sgl_subtype::OFFSET) => {
                each(Data::Capsule(d.addr(), d.len() as u64))
            }
            _ => Err(Status::SGL_TYPE_INVALID),
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Region;
    use crate::backend::RamBackend;
    use leap_queues::nvme::sgl_subtype;

    const GUEST: u64 = 0x10_0000;

    struct Fixture {
        ns: Arc<Namespace>,
        nss: Arc<Namespaces>,
        mem: Vec<u8>,
        scratch: Scratch,
        bqs: Vec<Option<Box<dyn BackendQueue>>>,
    }

    impl Fixture {
        fn new(read_only: bool) -> Self {
            let ram = RamBackend::new(1 << 20, 512).unwrap();
            let backend: Arc<dyn Backend> = Arc::new(ram);
            let bq = backend.open_queue(8).unwrap();
            let ns = Namespace::new(backend);
            let ns = if read_only {
                // The same disk seen through a write-protected namespace.
                let mut n = Arc::try_unwrap(ns).ok().unwrap();
                n.info.read_only = true;
                Arc::new(n)
            } else {
                ns
            };
            Fixture {
                nss: Namespaces::single(ns.clone()),
                ns,
                mem: vec![0; 64 << 10],
                scratch: Scratch::default(),
                bqs: vec![Some(bq)],
            }
        }
        fn aspace(&mut self) -> AddressSpace {
            let host = self.mem.as_mut_ptr() as usize;
            AddressSpace::new(
                vec![Region {
                    guest: GUEST,
                    len: self.mem.len() as u64,
                    host,
                    device: GUEST,
                }],
                None,
            )
            .unwrap()
        }
        fn run(&mut self, sqe: &Sqe, capsule: &[u8]) -> Status {
            let a = self.aspace();
            // SAFETY: `self.mem` outlives the call; the RAM back end finishes inside `submit`.
            match unsafe {
                start(
                    &self.nss,
                    &mut self.bqs,
                    sqe,
                    capsule,
                    &a,
                    &mut self.scratch,
                )
            } {
                Started::Done(s) => s,
                other => panic!("RAM back end did not finish at once: {other:?}"),
            }
        }
    }

    fn rw(op: u8, slba: u64, nlb: u32) -> Sqe {
        let mut s = Sqe::new(op, 3);
        s.set_nsid(1);
        s.set_slba(slba);
        s.set_nlb(nlb);
        s
    }

    #[test]
    fn prp_and_sgl_writes_read_back() {
        let mut f = Fixture::new(false);
        f.mem[..4096].fill(0x5a);
        // Write 8 blocks with PRP1 only (one 4 KiB page).
        let mut w = rw(io::WRITE, 16, 8);
        w.set_prps(GUEST, 0);
        assert_eq!(f.run(&w, &[]), Status::SUCCESS);
        // Read them back through a two-descriptor SGL held in the capsule.
        let mut r = rw(io::READ, 16, 8);
        let mut capsule = [0u8; 32];
        capsule[..16].copy_from_slice(&leap_queues::sgl::encode_descriptor(&SglDescriptor::data(
            GUEST + 8192,
            1024,
        )));
        capsule[16..].copy_from_slice(&leap_queues::sgl::encode_descriptor(&SglDescriptor::data(
            GUEST + 16384,
            3072,
        )));
        r.set_sgl1(SglDescriptor::new(
            sgl_type::LAST_SEGMENT,
            sgl_subtype::OFFSET,
            0,
            32,
        ));
        assert_eq!(f.run(&r, &capsule), Status::SUCCESS);
        assert!(f.mem[8192..9216].iter().all(|&b| b == 0x5a));
        assert!(f.mem[16384..19456].iter().all(|&b| b == 0x5a));
        // A PRP list: 12 KiB starting mid-page (PRP1 offset 512, list in guest memory).
        let list = GUEST + 0xf000;
        for (k, page) in [GUEST + 0x1000, GUEST + 0x2000, GUEST + 0x3000]
            .iter()
            .enumerate()
        {
            let at = 0xf000 + 8 * k;
            f.mem[at..at + 8].copy_from_slice(&page.to_le_bytes());
        }
        let mut r = rw(io::READ, 0, 24);
        r.set_prps(GUEST + 512, list);
        assert_eq!(f.run(&r, &[]), Status::SUCCESS);
    }

    #[test]
    fn refuses_bad_commands_without_touching_memory() {
        let mut f = Fixture::new(false);
        let blocks = f.ns.blocks();
        let mut cases: Vec<(&str, Sqe, Status)> = Vec::new();
        let mut s = rw(io::READ, blocks - 1, 2);
        s.set_sgl1(SglDescriptor::data(GUEST, 1024));
        cases.push(("past the end", s, Status::LBA_OUT_OF_RANGE));
        let mut s = rw(io::READ, u64::MAX, 1);
        s.set_sgl1(SglDescriptor::data(GUEST, 512));
        cases.push(("slba overflow", s, Status::LBA_OUT_OF_RANGE));
        let mut s = rw(io::READ, 0, 1);
        s.set_nsid(2);
        cases.push(("bad namespace", s, Status::INVALID_NAMESPACE));
        let mut s = rw(io::READ, 0, 2);
        s.set_sgl1(SglDescriptor::data(GUEST, 512));
        cases.push((
            "SGL shorter than the transfer",
            s,
            Status::SGL_LENGTH_INVALID,
        ));
        let mut s = rw(io::READ, 0, 1);
        s.set_sgl1(SglDescriptor::data(GUEST + (64 << 10) - 256, 512));
        cases.push((
            "buffer past guest memory",
            s,
            Status::DATA_TRANSFER_ERROR.with_dnr(),
        ));
        let mut s = rw(io::READ, 0, 1);
        s.set_sgl1(SglDescriptor::new(
            sgl_type::DATA_BLOCK,
            sgl_subtype::OFFSET,
            0,
            512,
        ));
        cases.push(("read into the capsule", s, Status::SGL_TYPE_INVALID));
        let mut s = rw(io::READ, 0, 1);
        s.set_sgl1(SglDescriptor::new(
            sgl_type::LAST_SEGMENT,
            sgl_subtype::OFFSET,
            4096,
            32,
        ));
        cases.push(("segment outside the capsule", s, Status::SGL_OFFSET_INVALID));
        let mut s = rw(io::READ, 0, 8);
        s.set_prps(GUEST + 1, 0);
        cases.push(("unaligned PRP list", s, Status::INVALID_PRP_OFFSET));
        cases.push(("unknown opcode", rw(0x7e, 0, 1), Status::INVALID_OPCODE));
        let mut s = rw(io::DATASET_MANAGEMENT, 0, 1);
        s.set_cdw(10, 0);
        s.set_cdw(11, DSM_ATTR_DEALLOCATE);
        s.set_sgl1(SglDescriptor::new(
            sgl_type::DATA_BLOCK,
            sgl_subtype::OFFSET,
            0,
            16,
        ));
        let mut capsule = [0u8; 16];
        capsule[4..8].copy_from_slice(&8u32.to_le_bytes());
        capsule[8..16].copy_from_slice(&(blocks - 4).to_le_bytes());
        f.mem.fill(0xcc);
        for (name, sqe, want) in cases {
            assert_eq!(f.run(&sqe, &[0; 16]), want, "{name}");
        }
        assert_eq!(
            f.run(&s, &capsule),
            Status::LBA_OUT_OF_RANGE,
            "discard range past the end"
        );
        assert!(
            f.mem.iter().all(|&b| b == 0xcc),
            "no refused command wrote guest memory"
        );
    }

    #[test]
    fn discard_ranges_in_guest_memory() {
        // As a fabrics host sends it: one 16-byte range in a Data Block in (pool) memory.
        let mut f = Fixture::new(false);
        f.mem[..4].copy_from_slice(&0u32.to_le_bytes());
        f.mem[4..8].copy_from_slice(&2048u32.to_le_bytes());
        f.mem[8..16].copy_from_slice(&0u64.to_le_bytes());
        let mut s = rw(io::DATASET_MANAGEMENT, 0, 1);
        s.set_cdw(10, 0);
        s.set_cdw(11, DSM_ATTR_DEALLOCATE);
        s.set_cdw(12, 0);
        s.set_sgl1(SglDescriptor::data(GUEST, 16));
        assert_eq!(f.run(&s, &[]), Status::SUCCESS);
        // Linux's 4 KiB range buffer with NR = 0.
        s.set_sgl1(SglDescriptor::data(GUEST, 4096));
        assert_eq!(f.run(&s, &[]), Status::SUCCESS);
        // But never less than the list.
        s.set_cdw(10, 1);
        s.set_sgl1(SglDescriptor::data(GUEST, 16));
        assert_eq!(f.run(&s, &[]), Status::SGL_LENGTH_INVALID);
    }

    /// What a recording back end was given: (SLBA, NLB, iovecs as (address, length)).
    type Seen = Arc<std::sync::Mutex<Vec<(u64, u32, Vec<(usize, usize)>)>>>;

    /// A back end with an 8 KiB transfer limit, recording what it is given; it speaks NVMe
    /// (takes commands) or takes byte ranges.
    struct Recorder {
        info: DiskInfo,
        seen: Seen,
        native: bool,
    }

    struct RecorderQueue(Seen);

    impl Backend for Recorder {
        fn info(&self) -> &DiskInfo {
            &self.info
        }
        fn open_queue(
            &self,
            _: usize,
        ) -> Result<Box<dyn BackendQueue>, crate::backend::BackendError> {
            Ok(Box::new(RecorderQueue(self.seen.clone())))
        }
        fn kind(&self) -> &'static str {
            "recorder"
        }
        fn nvme_native(&self) -> bool {
            self.native
        }
    }

    impl BackendQueue for RecorderQueue {
        fn depth(&self) -> usize {
            8
        }
        unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Submitted {
            let iov = req
                .iov
                .iter()
                .map(|v| (v.iov_base as usize, v.iov_len))
                .collect();
            // A command for a native back end; a byte range (512-byte blocks here) otherwise.
            let (slba, nlb) = match req.cmd {
                Some(c) => (c.slba(), c.nlb()),
                None => (req.offset / 512, (req.len / 512) as u32),
            };
            self.0.lock().unwrap().push((slba, nlb, iov));
            Submitted::Done(Status::SUCCESS)
        }
    }

    #[test]
    fn commands_beyond_a_back_ends_limit_are_split() {
        for native in [true, false] {
            split_for(native);
        }
    }

    fn split_for(native: bool) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let backend: Arc<dyn Backend> = Arc::new(Recorder {
            info: DiskInfo {
                size: 1 << 20,
                block_size: 512,
                read_only: false,
                discard: false,
                write_zeroes: false,
                volatile_cache: false,
                max_transfer: 8192,
                serial: "rec".into(),
            },
            seen: seen.clone(),
            native,
        });
        let mut f = Fixture::new(false);
        f.nss = Namespaces::single(Namespace::new(backend.clone()));
        f.bqs = vec![Some(backend.open_queue(8).unwrap())];
        // 20 KiB from LBA 100 in two guest pieces of 6 KiB and 14 KiB (an SGL in the capsule).
        let mut capsule = [0u8; 32];
        capsule[..16].copy_from_slice(&leap_queues::sgl::encode_descriptor(&SglDescriptor::data(
            GUEST, 6144,
        )));
        capsule[16..].copy_from_slice(&leap_queues::sgl::encode_descriptor(&SglDescriptor::data(
            GUEST + 0x4000,
            14336,
        )));
        let mut r = rw(io::READ, 100, 40);
        r.set_sgl1(SglDescriptor::new(
            sgl_type::LAST_SEGMENT,
            sgl_subtype::OFFSET,
            0,
            32,
        ));
        assert_eq!(f.run(&r, &capsule), Status::SUCCESS);
        let host = f.mem.as_ptr() as usize;
        let got = seen.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                (100, 16, vec![(host, 6144), (host + 0x4000, 2048)]),
                (116, 16, vec![(host + 0x4800, 8192)]),
                (132, 8, vec![(host + 0x6800, 4096)]),
            ],
            "three requests within 8 KiB, contiguous in LBA and in memory (native: {native})"
        );
        // More parts than the queue can ever hold: refused, not held forever.
        let mut big = rw(io::READ, 0, 256);
        big.set_sgl1(SglDescriptor::data(GUEST, 128 << 10));
        assert_eq!(f.run(&big, &[]), Status::INVALID_FIELD);
    }

    #[test]
    fn rate_limited_commands_wait_without_side_effects() {
        let mut f = Fixture::new(false);
        let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 512).unwrap());
        let limits = crate::throttle::Limits {
            iops_wr: Some(2),
            ..Default::default()
        };
        f.nss = Namespaces::single(Namespace::with_limits(ram.clone(), &limits));
        f.bqs = vec![Some(ram.open_queue(8).unwrap())];
        let a = f.aspace();
        f.mem[..512].fill(0x77);
        let mut w = rw(io::WRITE, 0, 1);
        w.set_sgl1(SglDescriptor::data(GUEST, 512));
        let mut r = rw(io::READ, 0, 1);
        r.set_sgl1(SglDescriptor::data(GUEST + 4096, 512));
        let mut go = |sqe: &Sqe| {
            // SAFETY: `f.mem` outlives the call; the RAM back end finishes inside `submit`.
            unsafe { start(&f.nss, &mut f.bqs, sqe, &[], &a, &mut f.scratch) }
        };
        assert_eq!(go(&w), Started::Done(Status::SUCCESS));
        assert_eq!(go(&w), Started::Done(Status::SUCCESS));
        assert_eq!(
            go(&w),
            Started::Throttled,
            "the third write waits for a token"
        );
        assert_eq!(
            go(&r),
            Started::Done(Status::SUCCESS),
            "reads are not limited"
        );
        assert!(
            f.mem[4096..4608].iter().all(|&b| b == 0x77),
            "the read saw the two writes"
        );
    }

    #[test]
    fn read_only_namespaces_refuse_writes() {
        let mut f = Fixture::new(true);
        let mut w = rw(io::WRITE, 0, 1);
        w.set_sgl1(SglDescriptor::data(GUEST, 512));
        assert_eq!(f.run(&w, &[]), Status::NS_WRITE_PROTECTED);
        assert_eq!(
            f.run(&rw(io::WRITE_ZEROES, 0, 1), &[]),
            Status::NS_WRITE_PROTECTED
        );
    }
}
