//! NVMe/TCP in-process: Leap's initiator against Leap's target over loopback — data round trips
//! (in-capsule and R2T writes, C2H reads, digests, several queues at once), overload control
//! (rejects invisible to the initiator's user, bounded work on the target), and hostile PDUs
//! (each ends only its own connection).

use leap_runtime::backend::{Backend, RamBackend};
use leap_runtime::nvmf::fabrics;
use leap_runtime::nvmf::host::{HostConn, HostIdentity};
use leap_runtime::nvmf::pdu;
use leap_runtime::nvmf::target::TargetConfig;
use leap_tests::nvmf::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const NQN: &str = "nqn.2026-12.io.leap:test";

fn ram(mib: u64, block: u32) -> Arc<dyn Backend> {
    Arc::new(RamBackend::new(mib << 20, block).unwrap())
}

#[test]
fn round_trips_with_and_without_digests_on_several_queues() {
    let t = TestTarget::start(target_config(NQN), vec![ram(64, 512)], 2);
    for digests in [false, true] {
        let mut cfg = initiator(t.addr, NQN, 2, 64);
        cfg.digests = digests;
        let b = connect(cfg);
        let info = b.info().clone();
        assert_eq!((info.size, info.block_size), (64 << 20, 512));
        assert!(info.discard && info.write_zeroes, "from ONCS");
        assert!(
            !info.volatile_cache,
            "a RAM disk has no volatile cache: VWC clear"
        );
        assert_eq!(info.max_transfer, 128 << 10, "MDTS reaches the front end");
        let threads: Vec<_> = (0..2u64)
            .map(|k| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut d = Driver::new(&b, 64);
                    let base = k * 40_000;
                    // 4 KiB (in-capsule), 64 KiB and 128 KiB (R2T) writes, each read back.
                    d.write_verify(base, 2048, 8, digests as u8, 32);
                    d.write_verify(base + 4096, 4096, 128, 3, 16);
                    d.write_verify(base + 12288, 4096, 256, 5, 8);
                })
            })
            .collect();
        for th in threads {
            th.join().expect("queue thread");
        }
        assert_eq!(b.stats().protocol_errors.load(Ordering::Relaxed), 0);
    }
    assert_eq!(t.sub.stats().fatal_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn overload_rejects_are_retried_and_never_seen_by_the_user() {
    let cfg = TargetConfig {
        queue_inflight: 4,
        total_inflight: 8,
        reserve_pct: 25,
        ..target_config(NQN)
    };
    let t = TestTarget::start(cfg, vec![ram(64, 4096)], 2);
    let b = connect(initiator(t.addr, NQN, 3, 128));
    // Watch the target's work while three queues each keep 64 commands in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU32::new(0));
    let mon = {
        let (sub, stop, peak) = (t.sub.clone(), stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(sub.inflight(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let threads: Vec<_> = (0..3u64)
        .map(|k| {
            let b = b.clone();
            std::thread::spawn(move || {
                let mut d = Driver::new(&b, 128);
                d.write_verify(k * 1000, 192, 1, k as u8, 64);
            })
        })
        .collect();
    for th in threads {
        th.join()
            .expect("every command completed successfully, data intact");
    }
    stop.store(true, Ordering::Relaxed);
    mon.join().unwrap();
    let rejects = t.sub.stats().rejects.load(Ordering::Relaxed);
    let retries = b.stats().retries.load(Ordering::Relaxed);
    eprintln!(
        "overload: rejects={rejects} retries={retries} retries_admitted={} peak_inflight={}",
        t.sub.stats().retries_admitted.load(Ordering::Relaxed),
        peak.load(Ordering::Relaxed)
    );
    assert!(
        rejects > 0,
        "the target rejected nothing: the test did not overload it"
    );
    assert!(
        retries >= rejects,
        "every reject was retried ({retries} < {rejects})"
    );
    assert!(
        peak.load(Ordering::Relaxed) <= 8,
        "the target held {} commands, beyond its bound of 8",
        peak.load(Ordering::Relaxed)
    );
    assert_eq!(t.sub.inflight(), 0, "admission counts return to zero");
}

fn who() -> HostIdentity {
    HostIdentity {
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-8000-8000-0000000evil1".into(),
        hostid: [9; 16],
        subnqn: NQN.into(),
    }
}

/// Reads until EOF (or 2 s); returns the PDU type of the first PDU received, if any.
fn answer(mut s: TcpStream) -> Option<u8> {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.first().copied()
}

#[test]
fn hostile_pdus_end_only_their_own_connection() {
    let t = TestTarget::start(target_config(NQN), vec![ram(16, 512)], 1);
    let good = connect(initiator(t.addr, NQN, 1, 32));
    let mut d = Driver::new(&good, 32);
    d.write_verify(0, 64, 8, 1, 8);
    let raw = || {
        let s = TcpStream::connect(t.addr).unwrap();
        s.set_nodelay(true).unwrap();
        s
    };
    let ic = pdu::IcReq::default().encode();
    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    // (name, bytes after connecting, whether an ICReq exchange comes first)
    let mut unknown = [0u8; 8];
    unknown[0] = 0x42;
    unknown[2] = 24;
    unknown[4] = 24;
    cases.push(("unknown PDU type", unknown.to_vec(), false));
    let mut pfv = ic;
    pfv[8] = 1;
    cases.push(("ICReq with PFV 1", pfv.to_vec(), false));
    let mut huge = [0u8; 8];
    huge[0] = pdu::pdu_type::CAPSULE_CMD;
    huge[2] = pdu::CAPSULE_CMD_HLEN;
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    cases.push(("capsule of 4 GiB", huge.to_vec(), true));
    let mut lying = [0u8; 8];
    lying[0] = pdu::pdu_type::CAPSULE_CMD;
    lying[2] = 99;
    lying[4] = 99;
    cases.push(("wrong HLEN", lying.to_vec(), true));
    let mut short = [0u8; 8];
    short[0] = pdu::pdu_type::CAPSULE_CMD;
    short[2] = pdu::CAPSULE_CMD_HLEN;
    short[4] = 10;
    cases.push(("PLEN shorter than the header", short.to_vec(), true));
    cases.push(("ICReq twice", ic.to_vec(), true));
    for (name, bytes, ic_first) in &cases {
        let mut s = raw();
        if *ic_first {
            s.write_all(&ic).unwrap();
            let mut resp = [0u8; 128];
            s.read_exact(&mut resp).unwrap();
            assert_eq!(resp[0], pdu::pdu_type::IC_RESP, "{name}: ICResp");
        }
        s.write_all(bytes).unwrap();
        assert_eq!(
            answer(s),
            Some(pdu::pdu_type::C2H_TERM_REQ),
            "{name}: the target answers with a C2HTermReq and closes"
        );
    }
    // After Connect: data for a transfer that does not exist, a response-only PDU type, and a
    // bad header digest.
    for (name, digests) in [
        ("H2CData with an unknown tag", false),
        ("bad header digest", true),
    ] {
        let h = HostConn::connect(
            t.addr,
            &who(),
            0,
            32,
            fabrics::CNTLID_DYNAMIC,
            0,
            digests,
            Duration::from_secs(5),
        )
        .expect("admin connect");
        let params = h.params;
        let bytes = if digests {
            let s = leap_queues::Sqe::new(leap_queues::nvme::admin::KEEP_ALIVE, 1);
            let mut c = pdu::encode_capsule_cmd(&s, 0, &params)
                .unwrap()
                .as_bytes()
                .to_vec();
            let n = c.len();
            c[n - 1] ^= 0xff;
            c
        } else {
            pdu::encode_h2c_data(
                &pdu::DataHdr {
                    cccid: 3,
                    ttag: 31,
                    datao: 0,
                    datal: 4,
                    last: true,
                    success: false,
                },
                &params,
            )
            .unwrap()
            .as_bytes()
            .iter()
            .copied()
            .chain([1, 2, 3, 4])
            .collect()
        };
        h.sock.set_nonblocking(false).unwrap();
        (&h.sock).write_all(&bytes).unwrap();
        let s = h.sock.try_clone().unwrap();
        assert_eq!(answer(s), Some(pdu::pdu_type::C2H_TERM_REQ), "{name}");
    }
    // A peer that sends half a header and leaves.
    let mut s = raw();
    s.write_all(&ic[..40]).unwrap();
    drop(s);
    // The good host never noticed.
    d.write_verify(100, 512, 64, 2, 16);
    let fatal = t.sub.stats().fatal_errors.load(Ordering::Relaxed)
        + t.sub.stats().handshake_failures.load(Ordering::Relaxed);
    assert!(
        fatal >= cases.len() as u64 + 2,
        "every hostile connection counted ({fatal})"
    );
    assert_eq!(good.stats().protocol_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn silent_host_loses_its_association_after_the_keep_alive_timeout() {
    let t = TestTarget::start(target_config(NQN), vec![ram(16, 512)], 1);
    let h = HostConn::connect(
        t.addr,
        &who(),
        0,
        32,
        fabrics::CNTLID_DYNAMIC,
        1000,
        false,
        Duration::from_secs(5),
    )
    .expect("admin connect");
    // No Keep Alive: the target ends the association within KATO (1 s) plus its check interval.
    let s = h.sock.try_clone().unwrap();
    assert_eq!(answer(s), None, "the connection closes without a PDU");
    assert_eq!(
        t.sub.stats().keep_alive_timeouts.load(Ordering::Relaxed),
        1,
        "closed by the keep-alive timer (within the 5 s the reader waits)"
    );
}

/// Reads one whole PDU (blocking).
fn read_pdu(s: &mut TcpStream) -> Vec<u8> {
    let mut ch = [0u8; 8];
    s.read_exact(&mut ch).expect("PDU header");
    let plen = u32::from_le_bytes(ch[4..8].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; plen - 8];
    s.read_exact(&mut rest).expect("PDU body");
    let mut v = ch.to_vec();
    v.extend(rest);
    v
}

/// An I/O queue connection made by hand, blocking.
fn io_queue(t: &TestTarget) -> (HostConn, HostConn) {
    let admin = HostConn::connect(
        t.addr,
        &who(),
        0,
        32,
        fabrics::CNTLID_DYNAMIC,
        0,
        false,
        Duration::from_secs(5),
    )
    .expect("admin");
    let io = HostConn::connect(
        t.addr,
        &who(),
        1,
        32,
        admin.cntlid,
        0,
        false,
        Duration::from_secs(5),
    )
    .expect("I/O queue");
    io.sock.set_nonblocking(false).unwrap();
    io.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (admin, io)
}

fn write_cmd(cid: u16, slba: u64, nlb: u32, bytes: u32) -> Vec<u8> {
    let mut s = leap_queues::Sqe::new(leap_queues::nvme::io::WRITE, cid);
    s.set_nsid(1);
    s.set_slba(slba);
    s.set_nlb(nlb);
    s.set_sgl1(pdu::transport_sgl(bytes));
    pdu::encode_capsule_cmd(&s, 0, &pdu::Params::default())
        .unwrap()
        .as_bytes()
        .to_vec()
}

fn h2c(cid: u16, ttag: u16, datao: u32, data: &[u8]) -> Vec<u8> {
    let h = pdu::encode_h2c_data(
        &pdu::DataHdr {
            cccid: cid,
            ttag,
            datao,
            datal: data.len() as u32,
            last: true,
            success: false,
        },
        &pdu::Params::default(),
    )
    .unwrap();
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

#[test]
fn data_beyond_the_transfer_and_reused_command_ids() {
    let t = TestTarget::start(target_config(NQN), vec![ram(16, 512)], 1);
    // A write of 8 KiB whose data comes by R2T; the host sends it out of place.
    for (name, datao, len) in [
        ("data past the R2T window", 0u32, 8192 + 512),
        ("data at an offset the target did not ask for", 4096, 4096),
    ] {
        let (_admin, mut io) = io_queue(&t);
        io.sock.write_all(&write_cmd(5, 0, 16, 8192)).unwrap();
        let r2t = read_pdu(&mut io.sock);
        assert_eq!(
            r2t[0],
            pdu::pdu_type::R2T,
            "{name}: the target asks for the data"
        );
        let r = pdu::decode_r2t(&r2t).unwrap();
        assert_eq!((r.cccid, r.r2to, r.r2tl), (5, 0, 8192));
        io.sock
            .write_all(&h2c(5, r.ttag, datao, &vec![0xab; len as usize]))
            .unwrap();
        let term = read_pdu(&mut io.sock);
        assert_eq!(term[0], pdu::pdu_type::C2H_TERM_REQ, "{name}");
        let (fes, _) = pdu::decode_term(&term).unwrap();
        assert!(
            fes == pdu::fes::DATA_OUT_OF_RANGE
                || fes == pdu::fes::PDU_SEQUENCE_ERROR
                || fes == pdu::fes::DATA_LIMIT_EXCEEDED,
            "{name}: FES {fes:#x}"
        );
    }
    // The same command id twice while the first is outstanding: the second gets Command ID
    // Conflict; the first still completes. Then the id is free again.
    let (_admin, mut io) = io_queue(&t);
    io.sock.write_all(&write_cmd(9, 0, 8, 4096)).unwrap();
    let r2t = read_pdu(&mut io.sock);
    let r = pdu::decode_r2t(&r2t).unwrap();
    io.sock.write_all(&write_cmd(9, 8, 8, 4096)).unwrap();
    let resp = read_pdu(&mut io.sock);
    let cqe = pdu::decode_capsule_resp(&resp).unwrap();
    assert_eq!(
        (cqe.cid(), cqe.status()),
        (9, leap_queues::Status::CID_CONFLICT)
    );
    io.sock
        .write_all(&h2c(9, r.ttag, 0, &[0x5a; 4096]))
        .unwrap();
    let resp = read_pdu(&mut io.sock);
    let cqe = pdu::decode_capsule_resp(&resp).unwrap();
    assert_eq!((cqe.cid(), cqe.status()), (9, leap_queues::Status::SUCCESS));
    io.sock.write_all(&write_cmd(9, 16, 8, 4096)).unwrap();
    assert_eq!(
        read_pdu(&mut io.sock)[0],
        pdu::pdu_type::R2T,
        "the id is free again"
    );
}

/// Namespaces attached and detached while hosts are connected: a host that enabled Namespace
/// Attribute notices gets the event and the Changed Namespace List names the NSID; Identify's
/// active list follows; an I/O queue connected before the change reaches the new namespace (a
/// back-end queue prepared off the poller) and loses it at the detach; I/O on the namespace
/// that stays never stops; a detached NSID answers Invalid Namespace.
#[test]
fn namespaces_come_and_go_while_hosts_stay_connected() {
    use leap_queues::nvme::{admin, cns, feature};
    use leap_runtime::nvmf::fabrics::{property_get_sqe, property_set_sqe, property_value};
    use leap_runtime::nvmf::fabrics::{reg, PropSize};
    use leap_runtime::Namespace;
    let t = TestTarget::start(target_config(NQN), vec![ram(64, 512)], 2);
    let target = t.target.as_ref().unwrap();
    assert_eq!(target.subsystem().namespaces().slots(), 32, "room for 32");

    // Steady verified I/O on NSID 1 for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let b1 = connect(initiator(t.addr, NQN, 1, 32));
    let (s2, b1c) = (stop.clone(), b1.clone());
    let steady = std::thread::spawn(move || {
        let mut d = Driver::new(&b1c, 32);
        let mut rounds = 0u32;
        while !s2.load(Ordering::Relaxed) {
            d.write_verify(0, 256, 8, rounds as u8, 16);
            rounds += 1;
        }
        rounds
    });

    // An I/O queue connected before NSID 2 exists.
    let (_early_admin, mut early) = io_queue(&t);
    let zeroes = |q: &mut HostConn| {
        let mut s = leap_queues::Sqe::new(leap_queues::nvme::io::WRITE_ZEROES, 0);
        s.set_nsid(2);
        s.set_cdw(12, 7);
        q.command(s, &[], None).expect("write zeroes").status()
    };
    assert_eq!(zeroes(&mut early), leap_queues::Status::INVALID_NAMESPACE);

    // A host's admin queue, enabled, with Namespace Attribute notices on and an AER waiting.
    let mut a = HostConn::connect(
        t.addr,
        &who(),
        0,
        32,
        fabrics::CNTLID_DYNAMIC,
        0,
        false,
        Duration::from_secs(10),
    )
    .expect("admin");
    a.ok(
        "CC.EN",
        property_set_sqe(
            0,
            reg::CC,
            PropSize::Four,
            u64::from(leap_runtime::controller::cc::ENABLE),
        ),
        &[],
        None,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    while property_value(
        &a.ok(
            "CSTS",
            property_get_sqe(0, reg::CSTS, PropSize::Four),
            &[],
            None,
        )
        .unwrap(),
    ) & 1
        == 0
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "CSTS.RDY never set");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut s = leap_queues::Sqe::new(admin::SET_FEATURES, 0);
    s.set_cdw(10, feature::ASYNC_EVENT_CONFIG as u32);
    s.set_cdw(11, 1 << 8);
    a.ok("AEC", s, &[], None).unwrap();
    let aer = std::thread::spawn(move || {
        let c = a
            .command(
                leap_queues::Sqe::new(admin::ASYNC_EVENT_REQUEST, 0),
                &[],
                None,
            )
            .expect("the AER completes");
        let mut log = vec![0u8; 4096];
        let mut s = leap_queues::Sqe::new(admin::GET_LOG_PAGE, 0);
        s.set_nsid(0xffff_ffff);
        s.set_cdw(10, 0x04 | (1023 << 16));
        a.ok("Changed Namespace List", s, &[], Some(&mut log))
            .unwrap();
        let mut active = vec![0u8; 4096];
        let mut s = leap_queues::Sqe::new(admin::IDENTIFY, 0);
        s.set_cdw(10, cns::ACTIVE_NS_LIST as u32);
        a.ok("active namespaces", s, &[], Some(&mut active))
            .unwrap();
        let ids = |b: &[u8]| -> Vec<u32> {
            b.chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .take_while(|&n| n != 0)
                .collect()
        };
        (c.dw0(), ids(&log), ids(&active))
    });

    std::thread::sleep(Duration::from_millis(200));
    let ns2 = Namespace::new(ram(16, 512));
    assert!(target.set_namespace(2, Some(ns2)).unwrap().is_none());
    let (dw0, changed, active) = aer.join().unwrap();
    assert_eq!(dw0 & 0x7, 2, "a Notice");
    assert_eq!(
        (dw0 >> 16) & 0xff,
        0x04,
        "pointing at the Changed Namespace List"
    );
    assert_eq!(changed, vec![2]);
    assert_eq!(active, vec![1, 2]);
    assert!(
        zeroes(&mut early).is_success(),
        "the queue connected before the attach reaches NSID 2"
    );

    // A new host reaches NSID 2 with verified I/O; then it is detached under that host.
    let mut cfg2 = initiator(t.addr, NQN, 1, 16);
    cfg2.nsid = 2;
    let b2 = connect(cfg2);
    let mut d2 = Driver::new(&b2, 16);
    d2.write_verify(0, 64, 8, 9, 8);
    let old = target
        .set_namespace(2, None)
        .unwrap()
        .expect("NSID 2 was there");
    let st = d2.run(
        &[Op {
            write: false,
            slba: 0,
            nlb: 8,
        }],
        &mut vec![0u8; 4096],
        4096,
        1,
    );
    assert_eq!(st[0], leap_queues::Status::INVALID_NAMESPACE, "{}", st[0]);
    assert_eq!(zeroes(&mut early), leap_queues::Status::INVALID_NAMESPACE);
    // Every queue and controller lets go of the detached namespace (what leapd waits for
    // before syncing its back end).
    let t0 = std::time::Instant::now();
    while Arc::strong_count(&old) > 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the detached namespace is still held ({} references)",
            Arc::strong_count(&old)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        target.set_namespace(33, None).is_err(),
        "NSIDs beyond max_namespaces are refused"
    );

    stop.store(true, Ordering::Relaxed);
    let rounds = steady.join().expect("I/O on NSID 1 never failed");
    assert!(rounds > 0);
    assert_eq!(t.sub.stats().fatal_errors.load(Ordering::Relaxed), 0);
}
