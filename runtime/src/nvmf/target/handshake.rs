//! Connection set-up on a short-lived thread: ICReq/ICResp and the Fabrics Connect, bounded in
//! time, then the connection goes to a poller as a [`TcpQueue`].

use super::queue::TcpQueue;
use super::{inc, Association, Subsystem, HANDSHAKE_TIMEOUT};
use crate::controller::Controller;
use crate::exec::Namespaces;
use crate::nvmf::conn::{ConnError, Pieces, Rx, RxEvent, Tx};
use crate::nvmf::fabrics::{self, ConnectCmd, ConnectData, ConnectReject};
use crate::nvmf::pdu::{self, Fatal, IcReq, IcResp, Limits, Params, Role};
use crate::poller::Poller;
use leap_queues::{Cqe, Status};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("timed out")]
    Timeout,
    #[error("connect refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Setup(String),
}

/// Waits until `fd` is readable or the deadline passes.
fn wait_readable(fd: RawFd, deadline: Instant) -> Result<(), HandshakeError> {
    if crate::nvmf::conn::wait_for(fd, libc::POLLIN, deadline) {
        Ok(())
    } else {
        Err(HandshakeError::Timeout)
    }
}

/// Runs `rx` until the next event other than Idle, within the deadline.
fn next_event(
    rx: &mut Rx,
    fd: RawFd,
    params: &Params,
    limits: &Limits,
    deadline: Instant,
) -> Result<RxEvent, HandshakeError> {
    loop {
        match rx.poll(fd, Role::Controller, params, limits)? {
            RxEvent::Idle => wait_readable(fd, deadline)?,
            e => return Ok(e),
        }
    }
}

/// Sends everything queued, blocking up to the deadline.
fn send_all(tx: &mut Tx, fd: RawFd, deadline: Instant) -> Result<(), HandshakeError> {
    while !tx.flush(fd, &mut |_| {})? {
        if Instant::now() >= deadline {
            return Err(HandshakeError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Sends a TermReq for `f` (when allowed) and reports the error.
fn terminate(fd: RawFd, f: Fatal, offending: &[u8], ty: u8) -> HandshakeError {
    if pdu::may_send_term_req(ty) {
        let mut tx = Tx::new(1);
        tx.push(f.term_req(Role::Controller, offending), None);
        let _ = tx.flush(fd, &mut |_| {});
    }
    HandshakeError::Conn(ConnError::Fatal(f))
}

pub(super) fn handshake(
    sub: &Arc<Subsystem>,
    sock: TcpStream,
    peer: SocketAddr,
    pollers: &[Poller],
    pick: usize,
) -> Result<(), HandshakeError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    sock.set_nonblocking(true)
        .map_err(|e| HandshakeError::Setup(e.to_string()))?;
    let _ = sock.set_nodelay(true);
    let fd = sock.as_raw_fd();
    let mut rx = Rx::new();
    let ic_limits = Limits {
        max_icd: 0,
        max_plen: pdu::IC_HLEN as u32,
    };
    // ICReq → ICResp.
    let ev = next_event(&mut rx, fd, &Params::default(), &ic_limits, deadline);
    let ev = match ev {
        Err(HandshakeError::Conn(ConnError::Fatal(f))) => {
            return Err(terminate(fd, f, rx.header(), rx.common().pdu_type))
        }
        e => e?,
    };
    if ev != RxEvent::Header || rx.common().pdu_type != pdu::pdu_type::IC_REQ {
        return Err(terminate(
            fd,
            Fatal::sequence(),
            rx.header(),
            rx.common().pdu_type,
        ));
    }
    let req = IcReq::decode(rx.header())
        .map_err(|f| terminate(fd, f, rx.header(), pdu::pdu_type::IC_REQ))?;
    next_event(&mut rx, fd, &Params::default(), &ic_limits, deadline)?;
    let maxh2cdata = sub.cfg.max_transfer() as u32;
    let resp = IcResp::answer(&req, sub.cfg.digests, sub.cfg.digests, 0, maxh2cdata);
    let params = Params::from_exchange(&req, &resp).map_err(|f| terminate(fd, f, &[], 0))?;
    let mut tx = Tx::new(2);
    if let Some(h) = pdu::HeaderBuf::from_bytes(&resp.encode()) {
        tx.push(h, None);
    }
    send_all(&mut tx, fd, deadline)?;

    // The Connect capsule, data in-capsule.
    let limits = Limits {
        max_icd: pdu::ADMIN_MAX_ICD,
        max_plen: pdu::ADMIN_MAX_ICD + 256,
    };
    let ev = match next_event(&mut rx, fd, &params, &limits, deadline) {
        Err(HandshakeError::Conn(ConnError::Fatal(f))) => {
            return Err(terminate(fd, f, rx.header(), rx.common().pdu_type))
        }
        e => e?,
    };
    if ev != RxEvent::Header || rx.common().pdu_type != pdu::pdu_type::CAPSULE_CMD {
        return Err(terminate(
            fd,
            Fatal::sequence(),
            rx.header(),
            rx.common().pdu_type,
        ));
    }
    let sqe = pdu::decode_capsule_cmd(rx.header())
        .map_err(|f| terminate(fd, f, rx.header(), pdu::pdu_type::CAPSULE_CMD))?;
    pdu::check_in_capsule(&sqe, rx.layout())
        .map_err(|f| terminate(fd, f, rx.header(), pdu::pdu_type::CAPSULE_CMD))?;
    let mut data = [0u8; fabrics::connect_data::LEN];
    let datal = rx.layout().datal as usize;
    let v = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: datal.min(data.len()),
    };
    // SAFETY: `v` and `data` outlive the PDU, which `next_event` completes below.
    rx.set_sink(unsafe { Pieces::new(&v, 1, 0) });
    let RxEvent::Pdu { digest_ok } = next_event(&mut rx, fd, &params, &limits, deadline)? else {
        return Err(HandshakeError::Setup("unexpected receive state".into()));
    };
    let respond = |tx: &mut Tx, cqe: Cqe| -> Result<(), HandshakeError> {
        tx.push(pdu::encode_capsule_resp(&cqe, &params), None);
        send_all(tx, fd, deadline)
    };
    let Some(cmd) = ConnectCmd::from_sqe(&sqe) else {
        respond(&mut tx, Cqe::new(sqe.cid(), Status::INVALID_OPCODE))?;
        return Err(HandshakeError::Refused(
            "first command is not Connect".into(),
        ));
    };
    if !digest_ok {
        respond(&mut tx, Cqe::new(sqe.cid(), pdu::TRANSIENT_TRANSPORT_ERROR))?;
        return Err(HandshakeError::Refused(
            "Connect data digest mismatch".into(),
        ));
    }
    let reject = |tx: &mut Tx, r: ConnectReject, why: String| -> HandshakeError {
        match respond(tx, r.cqe(sqe.cid())) {
            Ok(()) => HandshakeError::Refused(why),
            Err(e) => e,
        }
    };
    if let Err(r) = cmd.validate(sub.cfg.max_queue_entries.saturating_sub(1)) {
        return Err(reject(&mut tx, r, "bad Connect command".into()));
    }
    if datal != fabrics::connect_data::LEN {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_sqe_field(24),
            "Connect data not in the capsule".into(),
        ));
    }
    let cd = match ConnectData::decode(&data) {
        Ok(c) => c,
        Err(e) => return Err(reject(&mut tx, e.connect_reject(), e.to_string())),
    };
    let discovery = cd.subnqn == fabrics::DISCOVERY_NQN;
    if !discovery && cd.subnqn != sub.cfg.nqn {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_data_field(fabrics::connect_data::SUBNQN as u16),
            format!("unknown subsystem {}", cd.subnqn),
        ));
    }
    if !discovery && !sub.host_allowed(cd.hostnqn) {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_host(),
            format!("host {} is not allowed", cd.hostnqn),
        ));
    }
    if discovery && !cmd.is_admin() {
        return Err(reject(
            &mut tx,
            ConnectReject::invalid_sqe_field(fabrics::connect_sqe_field::QID),
            "I/O queue on the discovery subsystem".into(),
        ));
    }
    let entries = cmd.entries() as u16;
    let (assoc, epoch) = if cmd.is_admin() {
        if cd.cntlid != fabrics::CNTLID_DYNAMIC && cd.cntlid != fabrics::CNTLID_STATIC_ANY {
            return Err(reject(
                &mut tx,
                ConnectReject::invalid_data_field(fabrics::connect_data::CNTLID as u16),
                "admin queue must ask for a dynamic controller".into(),
            ));
        }
        let Some(cntlid) = sub.cntlid() else {
            return Err(reject(
                &mut tx,
                ConnectReject {
                    status: fabrics::CONNECT_CONTROLLER_BUSY,
                    dw0: 0,
                },
                "no controller IDs left".into(),
            ));
        };
        let (cfg, nss) = if discovery {
            (sub.disc_cfg.clone(), Arc::new(Namespaces::default()))
        } else {
            (sub.io_cfg.clone(), sub.namespaces())
        };
        let mut ctrl = Controller::new(cfg, cntlid, cd.hostnqn, cd.hostid, cmd.kato, nss);
        let s = Arc::downgrade(sub);
        if discovery {
            ctrl = ctrl.with_discovery(Arc::new(move |host: &str| {
                s.upgrade()
                    .map(|s| s.discovery_log(host))
                    .unwrap_or_default()
            }));
        } else {
            ctrl = ctrl.with_health(Arc::new(move || {
                s.upgrade().map(|s| s.health()).unwrap_or_default()
            }));
        }
        let wce = ctrl.wce();
        let a = Arc::new(Association {
            ctrl: Mutex::new(ctrl),
            cntlid,
            hostnqn: cd.hostnqn.to_owned(),
            dead: AtomicBool::new(false),
            epoch: AtomicU32::new(0),
            wce: AtomicBool::new(wce),
            priority: sub.cfg.priority_hosts.iter().any(|h| h == cd.hostnqn),
            flushing: AtomicBool::new(false),
        });
        let joined = match sub.assocs.lock() {
            Ok(mut m) if !sub.stopped.load(Ordering::Acquire) => {
                m.insert(cntlid, a.clone());
                true
            }
            _ => false,
        };
        if !joined {
            return Err(reject(
                &mut tx,
                ConnectReject {
                    status: fabrics::CONNECT_CONTROLLER_BUSY,
                    dw0: 0,
                },
                "the target is stopping".into(),
            ));
        }
        // A namespace attached or detached between reading the table above and joining would
        // be missed: catch up (set_namespace updates joined associations itself).
        if !discovery {
            sub.catch_up(&a);
        }
        (a, 0)
    } else {
        let a = sub
            .assocs
            .lock()
            .ok()
            .and_then(|m| m.get(&cd.cntlid).cloned());
        let Some(a) = a.filter(|a| a.hostnqn == cd.hostnqn && !a.dead.load(Ordering::Acquire))
        else {
            return Err(reject(
                &mut tx,
                ConnectReject::invalid_data_field(fabrics::connect_data::CNTLID as u16),
                format!("no controller {} for host {}", cd.cntlid, cd.hostnqn),
            ));
        };
        let granted = a.ctrl.lock().map(|c| c.io_queues()).unwrap_or(0);
        if cmd.qid > granted {
            return Err(reject(
                &mut tx,
                ConnectReject::invalid_sqe_field(fabrics::connect_sqe_field::QID),
                format!("queue {} beyond the {granted} granted", cmd.qid),
            ));
        }
        let e = a.epoch.load(Ordering::Acquire);
        (a, e)
    };
    let cntlid = assoc.cntlid;
    let q = TcpQueue::new(
        sub.clone(),
        sock,
        params,
        cmd.qid,
        entries,
        assoc.clone(),
        epoch,
        discovery,
    );
    let mut q = match q {
        Ok(q) => q,
        Err(e) => {
            if cmd.is_admin() {
                sub.end_association(cntlid);
            }
            return Err(HandshakeError::Setup(e.to_string()));
        }
    };
    // The Connect response goes out first, from the poller.
    q.accept_connect(sqe.cid(), cntlid);
    let stats = q.io_stats();
    let pi = if cmd.qid == 0 {
        pick % pollers.len()
    } else {
        (cmd.qid as usize - 1 + pick) % pollers.len()
    };
    let nss = if cmd.qid == 0 {
        Arc::new(Namespaces::default())
    } else {
        sub.namespaces()
    };
    if let Err(e) = pollers[pi].attach(Box::new(q), nss, entries.max(2), 16, stats) {
        if cmd.is_admin() {
            sub.end_association(cntlid);
        }
        return Err(HandshakeError::Setup(format!("poller: {e}")));
    }
    inc(&sub.stats.connections);
    log::info!(
        "target: {peer}: {} queue {} ({entries} entries) of controller {cntlid} for {}{}",
        if discovery { "discovery" } else { "subsystem" },
        cmd.qid,
        cd.hostnqn,
        match (params.hdgst, params.ddgst) {
            (false, false) => "",
            (true, false) => ", header digests",
            (false, true) => ", data digests",
            (true, true) => ", header and data digests",
        }
    );
    Ok(())
}
