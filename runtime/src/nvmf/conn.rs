//! Moving NVMe/TCP PDUs over a non-blocking socket: the framing shared by the target and the
//! initiator. [`Rx`] assembles incoming PDUs (common header → checked layout → header and digest
//! → padding → data into the caller's memory → data digest); [`Tx`] sends queued PDUs with
//! vectored writes straight from the caller's memory. Neither allocates per PDU: the staging
//! buffer and the queue are sized when the connection is made.
//!
//! What a PDU means is the caller's business: `Rx` stops after each header so the caller can
//! say where the data goes ([`Rx::set_sink`]), and again when the PDU is complete.

use super::pdu::{self, CommonHeader, DataDigest, Fatal, HeaderBuf, Layout, Limits, Params, Role};
use std::collections::VecDeque;
use std::os::fd::RawFd;

/// Bytes read from the socket at a time when they cannot go straight to their destination.
const STAGE: usize = 16 << 10;
/// Data of at least this many bytes still to come is read straight into its destination.
const DIRECT: usize = 4096;
/// iovecs per `sendmsg`.
const TX_IOV: usize = 64;
/// Where a received data digest is kept in the header buffer (past any header).
const DIGEST_AT: usize = pdu::HEADER_BUF_LEN - pdu::DIGEST_LEN;

/// Memory pieces a PDU's data goes to (receiving) or comes from (sending), in order.
///
/// The memory belongs to the caller, who keeps it valid (and, when receiving, unused by anyone
/// else) until the PDU has been received or sent.
#[derive(Clone, Copy, Debug)]
pub struct Pieces {
    iov: *const libc::iovec,
    cnt: usize,
    /// Bytes to skip at the start of the pieces.
    skip: usize,
}

impl Pieces {
    /// The memory `iov[..cnt]` describes, after skipping `skip` bytes.
    ///
    /// # Safety
    /// `iov` must point to `cnt` iovecs that stay valid, with the memory they describe, until
    /// the PDU using them has been received or sent.
    pub unsafe fn new(iov: *const libc::iovec, cnt: usize, skip: usize) -> Pieces {
        Pieces { iov, cnt, skip }
    }

    fn get(&self, k: usize) -> Option<libc::iovec> {
        // SAFETY: k < cnt, and the constructor's contract keeps the array valid.
        (k < self.cnt).then(|| unsafe { *self.iov.add(k) })
    }
}

/// A position in a [`Pieces`]: which piece and how far into it.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    k: usize,
    off: usize,
}

impl Cursor {
    /// Starts at byte `skip`.
    fn at(p: &Pieces, mut skip: usize) -> Cursor {
        let mut c = Cursor::default();
        while let Some(v) = p.get(c.k) {
            if skip < v.iov_len {
                c.off = skip;
                break;
            }
            skip -= v.iov_len;
            c.k += 1;
        }
        c
    }
    /// The rest of the current piece, at most `max` bytes.
    fn span(&self, p: &Pieces, max: usize) -> Option<(*mut u8, usize)> {
        let v = p.get(self.k)?;
        let n = (v.iov_len - self.off).min(max);
        // SAFETY: off < iov_len, so the pointer stays inside the piece.
        Some((unsafe { v.iov_base.cast::<u8>().add(self.off) }, n))
    }
    fn advance(&mut self, p: &Pieces, mut n: usize) {
        while n > 0 {
            let Some(v) = p.get(self.k) else { return };
            let left = v.iov_len - self.off;
            if n < left {
                self.off += n;
                return;
            }
            n -= left;
            self.k += 1;
            self.off = 0;
        }
    }
}

/// Why a connection cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the connection.
    #[error("connection closed by the peer")]
    Closed,
    /// A socket call failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol: answer with a TermReq (if allowed) and close.
    #[error("{0}")]
    Fatal(Fatal),
    /// The peer sent a TermReq.
    #[error("peer terminated the connection: FES {fes:#x}, FEI {fei:#x}")]
    Terminated {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
}

/// What [`Rx::poll`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum RxEvent {
    /// Nothing more can be read now.
    Idle,
    /// A PDU header (checked, digest verified) is in [`Rx::header`]; its layout in
    /// [`Rx::layout`]. Call [`Rx::set_sink`] if it carries data, then poll again.
    Header,
    /// The PDU is complete. `digest_ok` is false if its data digest did not match.
    Pdu {
        /// Whether the data digest matched (true when there was none).
        digest_ok: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxState {
    Common,
    Header,
    /// Waiting for the caller to look at the header.
    Sink,
    Pad,
    Data,
    Digest,
}

/// The receiving half of a connection.
pub struct Rx {
    stage: Box<[u8]>,
    lo: usize,
    hi: usize,
    state: RxState,
    hdr: [u8; pdu::HEADER_BUF_LEN],
    have: usize,
    ch: CommonHeader,
    layout: Layout,
    sink: Option<Pieces>,
    cur: Cursor,
    /// Data bytes still to come (into the sink, or skipped without one).
    left: usize,
    pad_left: usize,
    digest: DataDigest,
    want_digest: bool,
}

// SAFETY: the raw pointers in `sink` describe memory the owning connection keeps valid (see
// `Pieces::new`); an Rx is used by one thread at a time.
unsafe impl Send for Rx {}

impl Default for Rx {
    fn default() -> Self {
        Rx::new()
    }
}

impl Rx {
    /// A receiver expecting a common header.
    pub fn new() -> Rx {
        Rx {
            stage: vec![0u8; STAGE].into_boxed_slice(),
            lo: 0,
            hi: 0,
            state: RxState::Common,
            hdr: [0; pdu::HEADER_BUF_LEN],
            have: 0,
            ch: CommonHeader::default(),
            layout: Layout {
                pdu_type: 0,
                header_len: 0,
                hdgst: false,
                pad: 0,
                datal: 0,
                ddgst: false,
                plen: 0,
            },
            sink: None,
            cur: Cursor::default(),
            left: 0,
            pad_left: 0,
            digest: DataDigest::new(),
            want_digest: false,
        }
    }

    /// The current PDU's header bytes (header and header digest), valid after
    /// [`RxEvent::Header`] until the next header.
    pub fn header(&self) -> &[u8] {
        &self.hdr[..self.layout.header_len.min(self.hdr.len())]
    }

    /// The current PDU's common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// The current PDU's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether bytes of a next PDU are already buffered (work to do without reading).
    pub fn buffered(&self) -> bool {
        self.hi > self.lo
    }

    /// Where the current PDU's data goes; without a sink it is read and dropped.
    pub fn set_sink(&mut self, p: Pieces) {
        self.cur = Cursor::at(&p, p.skip);
        self.sink = Some(p);
    }

    /// Reads into the staging buffer. Ok(false): nothing available now.
    fn refill(&mut self, fd: RawFd) -> Result<bool, ConnError> {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.hi == self.stage.len() {
            self.stage.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        let room = &mut self.stage[self.hi..];
        match recv(fd, room.as_mut_ptr(), room.len())? {
            Some(n) => {
                self.hi += n;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Copies buffered bytes into the header until it holds `want`. Ok(false): more is needed
    /// and nothing is available.
    fn fill_header(&mut self, fd: RawFd, want: usize) -> Result<bool, ConnError> {
        while self.have < want {
            if self.lo == self.hi && !self.refill(fd)? {
                return Ok(false);
            }
            let n = (want - self.have).min(self.hi - self.lo);
            self.hdr[self.have..self.have + n].copy_from_slice(&self.stage[self.lo..self.lo + n]);
            self.have += n;
            self.lo += n;
        }
        Ok(true)
    }

    /// Advances as far as the socket allows. `receiver` and `params`/`limits` decide what is a
    /// valid PDU.
    pub fn poll(
        &mut self,
        fd: RawFd,
        receiver: Role,
        params: &Params,
        limits: &Limits,
    ) -> Result<RxEvent, ConnError> {
        loop {
            match self.state {
                RxState::Common => {
                    if !self.fill_header(fd, pdu::CH_LEN)? {
                        return Ok(RxEvent::Idle);
                    }
                    self.ch = CommonHeader::from_prefix(&self.hdr).unwrap_or_default();
                    self.layout =
                        pdu::check(&self.ch, receiver, params, limits).map_err(ConnError::Fatal)?;
                    self.state = RxState::Header;
                }
                RxState::Header => {
                    if !self.fill_header(fd, self.layout.header_len)? {
                        return Ok(RxEvent::Idle);
                    }
                    if self.layout.hdgst {
                        pdu::verify_hdgst(self.header()).map_err(ConnError::Fatal)?;
                    }
                    self.state = RxState::Sink;
                    self.sink = None;
                    return Ok(RxEvent::Header);
                }
                RxState::Sink => {
                    self.pad_left = self.layout.pad;
                    self.left = self.layout.datal as usize;
                    self.digest = DataDigest::new();
                    self.want_digest = self.layout.ddgst;
                    self.state = RxState::Pad;
                }
                RxState::Pad => {
                    while self.pad_left > 0 {
                        if self.lo == self.hi && !self.refill(fd)? {
                            return Ok(RxEvent::Idle);
                        }
                        let n = self.pad_left.min(self.hi - self.lo);
                        self.lo += n;
                        self.pad_left -= n;
                    }
                    self.state = RxState::Data;
                }
                RxState::Data => {
                    if !self.data(fd)? {
                        return Ok(RxEvent::Idle);
                    }
                    // The digest goes to the end of `hdr`, so `header()` stays readable.
                    self.have = DIGEST_AT;
                    self.state = RxState::Digest;
                }
                RxState::Digest => {
                    let mut ok = true;
                    if self.want_digest {
                        if !self.fill_header(fd, DIGEST_AT + pdu::DIGEST_LEN)? {
                            return Ok(RxEvent::Idle);
                        }
                        let got: [u8; 4] = self.hdr[DIGEST_AT..].try_into().unwrap_or_default();
                        ok = self.digest.verify(&got).is_ok();
                    }
                    self.have = 0;
                    self.state = RxState::Common;
                    return Ok(RxEvent::Pdu { digest_ok: ok });
                }
            }
        }
    }

    /// Moves the data into the sink (or drops it). Ok(false): more is needed.
    fn data(&mut self, fd: RawFd) -> Result<bool, ConnError> {
        while self.left > 0 {
            let span = self.sink.as_ref().and_then(|p| self.cur.span(p, self.left));
            if self.lo == self.hi {
                // Nothing buffered: large pieces are read straight into place.
                if let Some((ptr, n)) = span.filter(|&(_, n)| n >= DIRECT) {
                    match recv(fd, ptr, n)? {
                        Some(got) => {
                            // SAFETY: `recv` wrote `got` bytes at `ptr`, inside the piece.
                            let landed = unsafe { std::slice::from_raw_parts(ptr, got) };
                            if self.want_digest {
                                self.digest.update(landed);
                            }
                            self.consumed(got);
                            continue;
                        }
                        None => return Ok(false),
                    }
                }
                if !self.refill(fd)? {
                    return Ok(false);
                }
            }
            let avail = (self.hi - self.lo).min(self.left);
            let src = &self.stage[self.lo..self.lo + avail];
            let n = match span {
                Some((ptr, n)) => {
                    let n = n.min(avail);
                    // SAFETY: `ptr` has room for `n` bytes (inside the current piece, which the
                    // caller keeps valid and unused); the staging buffer does not overlap it.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr, n) };
                    n
                }
                None => avail,
            };
            if self.want_digest {
                self.digest.update(&src[..n]);
            }
            self.lo += n;
            self.consumed(n);
        }
        Ok(true)
    }

    fn consumed(&mut self, n: usize) {
        self.left -= n;
        if let Some(p) = &self.sink {
            self.cur.advance(p, n);
            if self.cur.span(p, 1).is_none() && self.left > 0 {
                // The sink is shorter than the data: drop the rest.
                self.sink = None;
            }
        }
    }
}

/// One PDU waiting to be sent.
#[derive(Clone, Copy)]
struct TxItem {
    hdr: HeaderBuf,
    data: Option<Pieces>,
    data_len: usize,
    ddgst: [u8; 4],
    ddgst_len: usize,
    /// Reported through `flush`'s callback once the whole PDU is on the wire.
    token: Option<u32>,
}

impl TxItem {
    fn len(&self) -> usize {
        self.hdr.len() + self.data_len + self.ddgst_len
    }
}

/// The sending half of a connection: a bounded queue of PDUs.
pub struct Tx {
    q: VecDeque<TxItem>,
    cap: usize,
    /// Bytes of the front item already sent.
    sent: usize,
    iov: Vec<libc::iovec>,
    /// PDUs queued so far.
    pushed: u64,
}

// SAFETY: the raw pointers in queued items describe memory the owning connection keeps valid
// until the item is sent (see `Pieces::new`); a Tx is used by one thread at a time.
unsafe impl Send for Tx {}

impl Tx {
    /// A queue of at most `cap` PDUs.
    pub fn new(cap: usize) -> Tx {
        Tx {
            q: VecDeque::with_capacity(cap),
            cap,
            sent: 0,
            iov: Vec::with_capacity(TX_IOV),
            pushed: 0,
        }
    }

    /// PDUs queued since the queue was made.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Free places in the queue.
    pub fn room(&self) -> usize {
        self.cap - self.q.len()
    }

    /// Whether anything waits to be sent.
    pub fn pending(&self) -> bool {
        !self.q.is_empty()
    }

    /// Queues a PDU without data (or a TermReq, whose quote is part of `hdr`). False if full.
    pub fn push(&mut self, hdr: HeaderBuf, token: Option<u32>) -> bool {
        self.push_data(hdr, None, 0, None, token)
    }

    /// Queues a PDU whose `len` bytes of data come from `data`, followed by `digest` (the data
    /// digest, if negotiated). False if full.
    pub fn push_data(
        &mut self,
        hdr: HeaderBuf,
        data: Option<Pieces>,
        len: usize,
        digest: Option<[u8; 4]>,
        token: Option<u32>,
    ) -> bool {
        if self.q.len() == self.cap {
            return false;
        }
        self.pushed += 1;
        self.q.push_back(TxItem {
            hdr,
            data,
            data_len: if data.is_some() { len } else { 0 },
            ddgst: digest.unwrap_or_default(),
            ddgst_len: if digest.is_some() { 4 } else { 0 },
            token,
        });
        true
    }

    /// Sends as much as the socket takes; `done(token)` for each PDU fully sent. Ok(true) when
    /// the queue is empty.
    pub fn flush(&mut self, fd: RawFd, done: &mut dyn FnMut(u32)) -> Result<bool, ConnError> {
        while !self.q.is_empty() {
            self.iov.clear();
            let mut skip = self.sent;
            'items: for it in self.q.iter() {
                let mut push = |ptr: *const u8, len: usize, skip: &mut usize| -> bool {
                    if *skip >= len {
                        *skip -= len;
                        return true;
                    }
                    if self.iov.len() == TX_IOV {
                        return false;
                    }
                    self.iov.push(libc::iovec {
                        // SAFETY: skip < len: the pointer stays inside the segment.
                        iov_base: unsafe { ptr.add(*skip) } as *mut _,
                        iov_len: len - *skip,
                    });
                    *skip = 0;
                    true
                };
                let h = it.hdr.as_bytes();
                if !push(h.as_ptr(), h.len(), &mut skip) {
                    break;
                }
                if let Some(p) = &it.data {
                    let mut c = Cursor::at(p, p.skip);
                    let mut left = it.data_len;
                    while left > 0 {
                        let Some((ptr, n)) = c.span(p, left) else {
                            break;
                        };
                        if !push(ptr, n, &mut skip) {
                            break 'items;
                        }
                        c.advance(p, n);
                        left -= n;
                    }
                }
                if it.ddgst_len > 0 && !push(it.ddgst.as_ptr(), it.ddgst_len, &mut skip) {
                    break;
                }
            }
            let Some(mut n) = send_iov(fd, &self.iov)? else {
                return Ok(false);
            };
            // Retire what went out.
            n += self.sent;
            self.sent = 0;
            while let Some(front) = self.q.front() {
                let l = front.len();
                if n < l {
                    self.sent = n;
                    break;
                }
                n -= l;
                if let Some(t) = front.token {
                    done(t);
                }
                self.q.pop_front();
            }
        }
        Ok(true)
    }
}

/// `recv` without blocking. Ok(None): nothing available. A zero-byte read is `Closed`.
fn recv(fd: RawFd, ptr: *mut u8, len: usize) -> Result<Option<usize>, ConnError> {
    loop {
        // SAFETY: `ptr` has room for `len` bytes (callers pass the unfilled part of a buffer
        // they own or were given).
        let n = unsafe { libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT) };
        if n > 0 {
            return Ok(Some(n as usize));
        }
        if n == 0 {
            return Err(ConnError::Closed);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(ConnError::Io(e)),
        }
    }
}

/// `sendmsg` of `iov` without blocking or SIGPIPE. Ok(None): the socket is full.
fn send_iov(fd: RawFd, iov: &[libc::iovec]) -> Result<Option<usize>, ConnError> {
    if iov.is_empty() {
        return Ok(Some(0));
    }
    loop {
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut _;
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` points at `iov`, whose entries describe memory valid for reading (see
        // `Pieces::new` and the header buffers owned by the queue).
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(ConnError::Io(e)),
        }
    }
}

/// Waits (control path only) until `fd` has `events` (POLLIN, POLLOUT) or `deadline` passes;
/// false when it passed.
pub fn wait_for(fd: RawFd, events: i16, deadline: std::time::Instant) -> bool {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return false;
    }
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe {
        libc::poll(
            &mut p,
            1,
            left.as_millis().clamp(1, i32::MAX as u128) as i32,
        )
    };
    n != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::pdu::{DataHdr, IcReq};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    /// Sends C2HData PDUs with digests from a 3-piece source into a 2-piece sink, in odd
    /// chunks, and checks the bytes and digests arrive intact.
    #[test]
    fn data_pdus_round_trip_between_scattered_buffers() {
        let (a, b) = pair();
        let params = Params {
            hdgst: true,
            ddgst: true,
            hpda: 3,
            ..Params::default()
        };
        let limits = Limits {
            max_icd: 8192,
            max_plen: 1 << 20,
        };
        let mut src: Vec<u8> = (0..100_000u32).map(|i| (i * 31 + 7) as u8).collect();
        let (s1, rest) = src.split_at_mut(10);
        let (s2, s3) = rest.split_at_mut(60_000);
        let siov = [iov(s1), iov(s2), iov(s3)];
        let mut tx = Tx::new(8);
        let total = 100_000usize;
        let mut dg = DataDigest::new();
        for v in &siov {
            // SAFETY: test buffers, alive for the whole test.
            dg.update(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        let hdr = pdu::encode_c2h_data(
            &DataHdr {
                cccid: 9,
                datal: total as u32,
                last: true,
                ..DataHdr::default()
            },
            &params,
        )
        .unwrap();
        // SAFETY: `siov` and `src` outlive the transfer.
        let pieces = unsafe { Pieces::new(siov.as_ptr(), 3, 0) };
        assert!(tx.push_data(hdr, Some(pieces), total, Some(dg.to_bytes()), Some(1)));
        let mut dst = vec![0u8; total];
        let (d1, d2) = dst.split_at_mut(5000);
        let diov = [iov(d1), iov(d2)];
        let mut rx = Rx::new();
        let mut sent = Vec::new();
        let mut got = None;
        for _ in 0..10_000 {
            tx.flush(a.as_raw_fd(), &mut |t| sent.push(t)).unwrap();
            match rx
                .poll(b.as_raw_fd(), Role::Host, &params, &limits)
                .unwrap()
            {
                RxEvent::Header => {
                    let h = pdu::decode_data_hdr(rx.header()).unwrap();
                    assert_eq!((h.cccid, h.datal), (9, total as u32));
                    // SAFETY: `diov`/`dst` outlive the transfer.
                    rx.set_sink(unsafe { Pieces::new(diov.as_ptr(), 2, 0) });
                }
                RxEvent::Pdu { digest_ok } => {
                    got = Some(digest_ok);
                    break;
                }
                RxEvent::Idle => {}
            }
        }
        assert_eq!(got, Some(true), "PDU arrived with a good digest");
        assert_eq!(sent, vec![1]);
        assert!(dst == src, "data arrived intact");
    }

    #[test]
    fn hostile_headers_are_fatal_and_eof_is_closed() {
        let (a, b) = pair();
        let limits = Limits {
            max_icd: 8192,
            max_plen: 1 << 20,
        };
        // A CapsuleCmd claiming 4 GiB.
        let mut bad = [0u8; 8];
        bad[0] = pdu::pdu_type::CAPSULE_CMD;
        bad[2] = pdu::CAPSULE_CMD_HLEN;
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        use std::io::Write;
        (&a).write_all(&bad).unwrap();
        let mut rx = Rx::new();
        let r = rx.poll(b.as_raw_fd(), Role::Controller, &Params::default(), &limits);
        assert!(matches!(r, Err(ConnError::Fatal(_))), "{r:?}");
        // An ICReq in pieces, then EOF.
        let ic = IcReq::default().encode();
        let mut rx = Rx::new();
        (&a).write_all(&ic[..50]).unwrap();
        let p = Params::default();
        assert_eq!(
            rx.poll(b.as_raw_fd(), Role::Controller, &p, &limits)
                .unwrap(),
            RxEvent::Idle
        );
        (&a).write_all(&ic[50..]).unwrap();
        assert_eq!(
            rx.poll(b.as_raw_fd(), Role::Controller, &p, &limits)
                .unwrap(),
            RxEvent::Header
        );
        assert!(IcReq::decode(rx.header()).is_ok());
        assert_eq!(
            rx.poll(b.as_raw_fd(), Role::Controller, &p, &limits)
                .unwrap(),
            RxEvent::Pdu { digest_ok: true }
        );
        drop(a);
        assert!(matches!(
            rx.poll(b.as_raw_fd(), Role::Controller, &p, &limits),
            Err(ConnError::Closed)
        ));
    }
}
