//! The host side of NVMe/TCP connection set-up, blocking and bounded in time: for the control
//! path only (the initiator's control thread), never a poller.
//!
//! [`HostConn::connect`] does the ICReq/ICResp exchange and the Fabrics Connect of one queue;
//! [`HostConn::command`] runs one admin command (with in-capsule data out, or C2HData in).

use super::conn::{ConnError, Pieces, Rx, RxEvent, Tx};
use super::fabrics::{self, ConnectData, ConnectResult};
use super::pdu::{self, DataDigest, IcReq, IcResp, Limits, Params, Role};
use leap_queues::{Cqe, Sqe, Status};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Why a connection could not be made or a command failed on the control path.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// TCP or framing failure.
    #[error("{0}")]
    Conn(#[from] ConnError),
    /// The peer did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The controller refused the Connect.
    #[error("connect refused: {0}")]
    Refused(String),
    /// A command completed with an error status.
    #[error("{what} failed: {status}")]
    Status {
        /// The command.
        what: &'static str,
        /// Its status.
        status: Status,
    },
    /// The peer said something that makes no sense here.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Who connects and to what.
#[derive(Clone, Debug)]
pub struct HostIdentity {
    /// The host NQN.
    pub hostnqn: String,
    /// The host identifier.
    pub hostid: [u8; 16],
    /// The subsystem NQN.
    pub subnqn: String,
}

/// One connected queue, blocking.
pub struct HostConn {
    /// The socket (non-blocking).
    pub sock: TcpStream,
    /// Negotiated parameters.
    pub params: Params,
    /// The controller ID the Connect returned.
    pub cntlid: u16,
    rx: Rx,
    tx: Tx,
    next_cid: u16,
    timeout: Duration,
}

fn wait(fd: RawFd, events: i16, deadline: Instant) -> Result<(), HostError> {
    if super::conn::wait_for(fd, events, deadline) {
        Ok(())
    } else {
        Err(HostError::Timeout)
    }
}

impl HostConn {
    /// Connects queue `qid` (0: admin) with `entries` entries to the controller `cntlid`
    /// (dynamic for the admin queue). `digests` asks for header and data digests.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        addr: SocketAddr,
        who: &HostIdentity,
        qid: u16,
        entries: u16,
        cntlid: u16,
        kato_ms: u32,
        digests: bool,
        timeout: Duration,
    ) -> Result<HostConn, HostError> {
        let deadline = Instant::now() + timeout;
        let sock = TcpStream::connect_timeout(&addr, timeout).map_err(ConnError::Io)?;
        sock.set_nonblocking(true).map_err(ConnError::Io)?;
        let _ = sock.set_nodelay(true);
        let mut c = HostConn {
            sock,
            params: Params::default(),
            cntlid,
            rx: Rx::new(),
            tx: Tx::new(8),
            next_cid: 0,
            timeout,
        };
        let req = IcReq {
            hpda: 0,
            hdgst: digests,
            ddgst: digests,
            maxr2t: 0,
        };
        if let Some(h) = pdu::HeaderBuf::from_bytes(&req.encode()) {
            c.tx.push(h, None);
        }
        c.send_all(deadline)?;
        let ic_limits = Limits {
            max_icd: 0,
            max_plen: pdu::IC_HLEN as u32,
        };
        c.next(&Params::default(), &ic_limits, deadline)?;
        if c.rx.common().pdu_type != pdu::pdu_type::IC_RESP {
            return Err(HostError::Protocol("expected ICResp".into()));
        }
        let resp = IcResp::decode(c.rx.header()).map_err(ConnError::Fatal)?;
        c.next(&Params::default(), &ic_limits, deadline)?;
        c.params = Params::from_exchange(&req, &resp).map_err(ConnError::Fatal)?;
        // Connect, data in the capsule.
        let data = ConnectData {
            hostid: who.hostid,
            cntlid,
            subnqn: &who.subnqn,
            hostnqn: &who.hostnqn,
        }
        .encode()
        .map_err(|e| HostError::Protocol(e.to_string()))?;
        let sqe = fabrics::connect_sqe(0, qid, entries.saturating_sub(1), kato_ms);
        let cqe = c.exchange(&sqe, &data, None, deadline)?;
        match ConnectResult::from_cqe(&cqe) {
            ConnectResult::Accepted { cntlid, .. } => {
                if qid == 0 {
                    c.cntlid = cntlid;
                }
                Ok(c)
            }
            ConnectResult::InvalidParameters { ipo, iattr } => Err(HostError::Refused(format!(
                "invalid parameter at offset {ipo} of the {}",
                if iattr == 1 {
                    "Connect data (unknown subsystem or controller?)"
                } else {
                    "Connect command"
                }
            ))),
            ConnectResult::Failed(s) => Err(HostError::Refused(format!("status {s}"))),
        }
    }

    fn send_all(&mut self, deadline: Instant) -> Result<(), HostError> {
        let fd = self.sock.as_raw_fd();
        while !self.tx.flush(fd, &mut |_| {})? {
            wait(fd, libc::POLLOUT, deadline)?;
        }
        Ok(())
    }

    /// The next event other than Idle.
    fn next(
        &mut self,
        params: &Params,
        limits: &Limits,
        deadline: Instant,
    ) -> Result<RxEvent, HostError> {
        let fd = self.sock.as_raw_fd();
        loop {
            match self.rx.poll(fd, Role::Host, params, limits)? {
                RxEvent::Idle => wait(fd, libc::POLLIN, deadline)?,
                e => return Ok(e),
            }
        }
    }

    /// Sends `sqe` with `out` as in-capsule data, receives `into` through C2HData, returns the
    /// completion.
    fn exchange(
        &mut self,
        sqe: &Sqe,
        out: &[u8],
        mut into: Option<&mut [u8]>,
        deadline: Instant,
    ) -> Result<Cqe, HostError> {
        let mut s = *sqe;
        let params = self.params;
        match (&into, out.is_empty()) {
            (_, false) => s.set_sgl1(pdu::icd_sgl(out.len() as u32)),
            (Some(b), true) => s.set_sgl1(pdu::transport_sgl(b.len() as u32)),
            (None, true) => s.set_sgl1(pdu::transport_sgl(0)),
        }
        let hdr = pdu::encode_capsule_cmd(&s, out.len() as u32, &params)
            .map_err(|e| HostError::Protocol(e.to_string()))?;
        let v = libc::iovec {
            iov_base: out.as_ptr() as *mut _,
            iov_len: out.len(),
        };
        if out.is_empty() {
            self.tx.push(hdr, None);
        } else {
            let digest = params.ddgst.then(|| {
                let mut d = DataDigest::new();
                d.update(out);
                d.to_bytes()
            });
            // SAFETY: `v` and `out` outlive `send_all` below, which sends them.
            let p = unsafe { Pieces::new(&v, 1, 0) };
            self.tx.push_data(hdr, Some(p), out.len(), digest, None);
        }
        self.send_all(deadline)?;
        let limits = Limits {
            max_icd: 0,
            max_plen: 1 << 24,
        };
        let cid = sqe.cid();
        let mut sink = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        loop {
            match self.next(&params, &limits, deadline)? {
                RxEvent::Header => match self.rx.common().pdu_type {
                    pdu::pdu_type::C2H_DATA => {
                        let h = pdu::decode_data_hdr(self.rx.header()).map_err(ConnError::Fatal)?;
                        let buf = into.as_deref_mut().unwrap_or(&mut []);
                        if h.cccid != cid {
                            return Err(HostError::Protocol("data for another command".into()));
                        }
                        h.validate(self.rx.layout(), buf.len() as u32)
                            .map_err(ConnError::Fatal)?;
                        sink = libc::iovec {
                            iov_base: buf.as_mut_ptr().cast(),
                            iov_len: buf.len(),
                        };
                        // SAFETY: `sink` and `buf` outlive this PDU (received in this loop).
                        self.rx
                            .set_sink(unsafe { Pieces::new(&sink, 1, h.datao as usize) });
                    }
                    pdu::pdu_type::CAPSULE_RESP => {}
                    pdu::pdu_type::C2H_TERM_REQ => {
                        let (fes, fei) =
                            pdu::decode_term(self.rx.header()).map_err(ConnError::Fatal)?;
                        return Err(ConnError::Terminated { fes, fei }.into());
                    }
                    t => return Err(HostError::Protocol(format!("unexpected PDU type {t}"))),
                },
                RxEvent::Pdu { digest_ok } => {
                    if !digest_ok {
                        return Err(HostError::Protocol("data digest mismatch".into()));
                    }
                    if self.rx.common().pdu_type == pdu::pdu_type::CAPSULE_RESP {
                        let cqe =
                            pdu::decode_capsule_resp(self.rx.header()).map_err(ConnError::Fatal)?;
                        if cqe.cid() == cid {
                            let _ = sink;
                            return Ok(cqe);
                        }
                    }
                }
                RxEvent::Idle => {}
            }
        }
    }

    /// Runs an admin command, returning its completion (success or not).
    pub fn command(
        &mut self,
        mut sqe: Sqe,
        out: &[u8],
        into: Option<&mut [u8]>,
    ) -> Result<Cqe, HostError> {
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe.set_cid(self.next_cid);
        let deadline = Instant::now() + self.timeout;
        self.exchange(&sqe, out, into, deadline)
    }

    /// Runs an admin command that must succeed.
    pub fn ok(
        &mut self,
        what: &'static str,
        sqe: Sqe,
        out: &[u8],
        into: Option<&mut [u8]>,
    ) -> Result<Cqe, HostError> {
        let c = self.command(sqe, out, into)?;
        if c.status().is_success() {
            Ok(c)
        } else {
            Err(HostError::Status {
                what,
                status: c.status(),
            })
        }
    }
}
